"""Issue 18: ``replay(cpu_gbps=, cpu_gflops=, cpu_experts=)`` / ``expertflow replay --cpu-gbps``:
a host CPU computes missed experts in place, decided per miss by the native HybridPolicy. Every
expected decision and time below is worked out by hand.

The hand-made traces: 3 MB experts, a 3 GB/s link (a copy takes 1 ms), a 5 GB/s CPU (an expert
at one token takes 0.6 ms), no layer compute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertflow.cli import main
from expertflow.traces.format import Trace, save_trace
from expertflow.traces.replay import replay
from expertflow.traces.replay_options import check_options, option_spelling

EXPERT_BYTES = 3_000_000
TIMING = {"bandwidth_gbps": 3.0, "layer_compute_ms": 0.0}
CPU = {"cpu_gbps": 5.0}


def trace(routing, experts: int = 4, prefill=None) -> Trace:
    """One layer; ``routing`` lists each token's experts."""
    ids = np.asarray(routing, dtype=np.int32)[:, None, :]
    meta = {"model": "m", "num_experts": experts, "top_k": ids.shape[2]}
    meta["expert_bytes"] = EXPERT_BYTES
    if prefill is not None:
        meta["prefill"] = prefill
    return Trace(expert_ids=ids, meta=meta)


# Four one-token steps, each needing two experts, alternating between {0, 1} and {2, 3}.
ALTERNATING = [[0, 1], [2, 3], [0, 1], [2, 3]]


def test_never_copies_every_miss():
    r = replay(trace(ALTERNATING), "lru", slots_per_layer=2, **TIMING, **CPU, cpu_experts="never")
    # Two slots: every step evicts the other pair, 2 copies of 1 ms each per step.
    assert (r.hits, r.misses, r.cpu_experts) == (0, 8, 0)
    assert r.bytes_moved == 8 * EXPERT_BYTES
    assert r.time_per_token_ms == pytest.approx(2.0)


@pytest.mark.parametrize("budget", [{"slots_per_layer": 2}, {"slots": 2}])
def test_always_fills_free_slots_then_computes_every_miss_on_the_cpu(budget):
    r = replay(trace(ALTERNATING), "lru", **budget, **TIMING, **CPU, cpu_experts="always")
    # Step 0: the pool is empty, 0 and 1 are copied into it (2 ms) and stay. Steps 1 and 3:
    # {2, 3} on the CPU one after the other (1.2 ms), never cached. Step 2: two hits (0 ms).
    assert (r.hits, r.misses, r.cpu_experts, r.bytes_moved) == (2, 6, 4, 2 * EXPERT_BYTES)
    assert r.time_per_token_ms == pytest.approx((2.0 + 1.2 + 0.0 + 1.2) / 4)


def test_auto_splits_a_layers_misses_between_the_cpu_and_the_link():
    r = replay(trace(ALTERNATING), "lru", slots_per_layer=2, **TIMING, **CPU)
    # Step 0: expert 0 -> CPU (0.6 < 1.0); expert 1 -> copy (the CPU would finish at 1.2, the
    # link at 1.0): the layer is ready at 1.0 and expert 1 stays cached. Step 1 the same for 2
    # (CPU) and 3 (copied, cached next to 1). Steps 2 and 3: 1 and 3 hit, 0 and 2 on the CPU,
    # 0.6 ms each. (1.0 + 1.0 + 0.6 + 0.6) / 4 tokens.
    assert (r.hits, r.misses, r.cpu_experts) == (2, 6, 4)
    assert r.bytes_moved == 2 * EXPERT_BYTES
    assert r.time_per_token_ms == pytest.approx(0.8)
    assert r.stall_share == pytest.approx(1.0)  # no compute: all of it is waiting


def test_modes_order_auto_below_always_below_never():
    t = trace(ALTERNATING)
    times = {
        mode: replay(t, "lru", slots_per_layer=2, **TIMING, **CPU, cpu_experts=mode)
        for mode in ("never", "always", "auto")
    }
    assert times["auto"].time_per_token_ms < times["always"].time_per_token_ms
    assert times["always"].time_per_token_ms < times["never"].time_per_token_ms


def test_never_with_a_cpu_is_todays_copy_only_replay():
    t = trace(ALTERNATING)
    plain = replay(t, "lru", slots_per_layer=2, **TIMING).as_dict()
    never = replay(t, "lru", slots_per_layer=2, **TIMING, **CPU, cpu_experts="never").as_dict()
    assert plain.pop("cpu_experts") is None and never.pop("cpu_experts") == 0
    assert plain == never


def test_a_slower_cpu_waits_layer_after_layer_and_auto_copies():
    # Two layers of one slot, two tokens swapping experts 0 and 1; a slow CPU (2 GB/s: 1.5 ms).
    ids = np.array([[[0], [1]], [[1], [0]]], dtype=np.int32)
    t = Trace(expert_ids=ids, meta={"model": "m", "num_experts": 2, "top_k": 1,
                                    "expert_bytes": EXPERT_BYTES})  # fmt: skip
    r = replay(t, "lru", slots_per_layer=1, **TIMING, cpu_gbps=2.0, cpu_experts="always")
    # Token 0 fills both slots (1.0 + 1.0 ms); token 1: layer 0 waits 1.5 ms for its expert on
    # the CPU, layer 1 1.5 ms more.
    assert r.cpu_experts == 2 and r.time_per_token_ms == pytest.approx((2.0 + 3.0) / 2)
    r = replay(t, "lru", slots_per_layer=1, **TIMING, cpu_gbps=2.0)
    # auto: 1.0 ms copies beat 1.5 ms on the CPU, layer after layer, no CPU expert.
    assert (r.cpu_experts, r.time_per_token_ms) == (0, pytest.approx(2.0))


def test_the_token_term_sends_a_prompt_to_the_link():
    # A 4-token prompt on expert 0, then one generated token on expert 1 (1 slot).
    t = trace([[0], [0], [0], [0], [1]], experts=2, prefill=[True] * 4 + [False])
    # 1.5e6 params: 3e6 flops a token, at 10 GFLOP/s 0.3 ms a token. The prompt: max(0.6, 1.2)
    # = 1.2 ms on the CPU against a 1.0 ms copy -> copied. The token: 0.6 ms -> CPU.
    r = replay(t, "lru", slots_per_layer=1, **TIMING, **CPU, cpu_gflops=10.0)
    assert (r.misses, r.cpu_experts, r.bytes_moved) == (2, 1, EXPERT_BYTES)
    assert r.time_per_token_ms == pytest.approx((1.0 + 0.6) / 5)
    # Without the token term the prompt costs its bytes only: both on the CPU.
    r = replay(t, "lru", slots_per_layer=1, **TIMING, **CPU)
    assert (r.cpu_experts, r.bytes_moved) == (2, 0)
    assert r.time_per_token_ms == pytest.approx(1.2 / 5)


def test_a_copy_queued_on_the_link_counts_in_the_next_decision():
    # Three misses in one layer: 0 -> CPU (0.6 < 1.0); 1 -> copy (CPU 1.2 vs link 1.0);
    # 2 -> CPU (done at 1.2 against the link's 2.0). Ready at 1.2: CPU 0.6 + 0.6, link 1.0.
    r = replay(trace([[0, 1, 2]]), "lru", slots_per_layer=3, **TIMING, **CPU)
    assert (r.cpu_experts, r.bytes_moved) == (2, EXPERT_BYTES)
    assert r.time_per_token_ms == pytest.approx(1.2)


def test_auto_computes_a_hit_whose_prefetch_is_still_on_its_way_when_that_is_sooner():
    # One token on expert 0, predicted: its prefetch starts at 0 and lands at 1.0 ms.
    t = trace([[0]], experts=2)
    scores = np.array([[[1.0, 0.0]]], dtype=np.float32)
    kw = dict(slots_per_layer=1, predictions=scores, **TIMING, **CPU)
    never = replay(t, "expertflow", **kw, cpu_experts="never")
    assert (never.hits, never.misses, never.time_per_token_ms) == (1, 0, pytest.approx(1.0))
    # auto: the CPU has it at 0.6 ms; the copy goes on (the expert is cached, a hit).
    auto = replay(t, "expertflow", **kw)
    assert (auto.hits, auto.misses, auto.cpu_experts) == (1, 0, 1)
    assert auto.bytes_moved == EXPERT_BYTES
    assert auto.time_per_token_ms == pytest.approx(0.6)
    # A CPU slower than the copy's remaining time: it waits for the copy.
    slow = replay(t, "expertflow", **{**kw, "cpu_gbps": 2.0})
    assert (slow.cpu_experts, slow.time_per_token_ms) == (0, pytest.approx(1.0))


def test_a_layer_needing_more_experts_than_its_pool_runs_the_rest_on_the_cpu():
    # A 3-token prompt on experts 0, 1, 2 with one slot: copy-only cannot run it.
    t = trace([[0], [1], [2]], experts=3, prefill=[True] * 3)
    with pytest.raises(ValueError, match="needs 3 experts of layer 0 at once"):
        replay(t, "lru", slots_per_layer=1, **TIMING, **CPU, cpu_experts="never")
    # auto: 0 -> CPU (0.6); 1 -> copy (1.2 vs 1.0), which fills the pool; 2 -> CPU (1.2).
    r = replay(t, "lru", slots_per_layer=1, **TIMING, **CPU)
    assert (r.cpu_experts, r.bytes_moved) == (2, EXPERT_BYTES)
    assert r.time_per_token_ms == pytest.approx(1.2 / 3)
    # always: 0 fills the free slot, 1 and 2 on the CPU: ready at max(1.0, 1.2).
    r = replay(t, "lru", slots_per_layer=1, **TIMING, **CPU, cpu_experts="always")
    assert (r.cpu_experts, r.bytes_moved) == (2, EXPERT_BYTES)
    assert r.time_per_token_ms == pytest.approx(1.2 / 3)


@pytest.mark.parametrize("policy", ["lru", "lfu", "lrfu", "belady"])
def test_every_policy_replays_with_cpu_experts(policy):
    rng = np.random.default_rng(0)
    routing = [rng.permutation(8)[:2].tolist() for _ in range(40)]
    t = trace(routing, experts=8)
    never = replay(t, policy, slots_per_layer=4, **TIMING, **CPU, cpu_experts="never")
    auto = replay(t, policy, slots_per_layer=4, **TIMING, **CPU)
    assert auto.hits + auto.misses == never.hits + never.misses
    assert 0 < auto.cpu_experts <= auto.misses
    assert auto.time_per_token_ms < never.time_per_token_ms


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cpu_gbps": 5.0}, r"^cpu_gbps is part of the timing model: give bandwidth_gbps"),
        ({**TIMING, "cpu_gbps": 0.0}, r"^cpu_gbps must be a finite number > 0"),
        ({**TIMING, "cpu_gbps": float("inf")}, r"^cpu_gbps must be a finite number > 0"),
        ({**TIMING, "cpu_gbps": "5"}, r"^cpu_gbps must be a finite number > 0"),
        ({**TIMING, **CPU, "cpu_gflops": -1.0}, r"^cpu_gflops must be a finite number > 0"),
        ({**TIMING, **CPU, "cpu_gflops": float("nan")}, r"^cpu_gflops must be a finite"),
        ({**TIMING, "cpu_gflops": 10.0}, r"^cpu_gflops is the CPU model's token term"),
        ({**TIMING, **CPU, "cpu_experts": "sometimes"}, r"^cpu_experts must be one of"),
        ({**TIMING, "cpu_experts": "always"}, r"^cpu_experts always needs a CPU to model"),
        ({**TIMING, "cpu_experts": "auto"}, r"^cpu_experts auto needs a CPU to model"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(options, message):
    t = trace(ALTERNATING)
    with pytest.raises(ValueError, match=message):
        replay(t, "lru", slots_per_layer=2, **options)
    flag = "^--" + message[1:].split(" ")[0].replace("_", "-")
    with pytest.raises(ValueError, match=flag):
        check_options(t, "lru", slots_per_layer=2, spell=option_spelling, **options)


@pytest.fixture
def trace_file(tmp_path) -> str:
    path = tmp_path / "t.npz"
    save_trace(trace(ALTERNATING), path)
    return str(path)


def _cli(capsys, *argv) -> str:
    assert main(["replay", *argv]) == 0
    return capsys.readouterr().out


def test_the_cli_reports_cpu_experts_in_json(trace_file, capsys):
    base = ["--trace", trace_file, "--policy", "lru", "--slots-per-layer", "2"]
    base += ["--bandwidth-gbps", "3", "--layer-compute-ms", "0", "--json"]
    out = json.loads(_cli(capsys, *base, "--cpu-gbps", "5"))
    assert out["cpu_experts"] == 4 and out["time_per_token_ms"] == pytest.approx(0.8)
    keys = list(out)
    assert keys.index("cpu_experts") == keys.index("time_per_token_ms") + 1
    out = json.loads(_cli(capsys, *base, "--cpu-gbps", "5", "--cpu-experts", "always"))
    assert out["cpu_experts"] == 4 and out["time_per_token_ms"] == pytest.approx(1.1)
    assert json.loads(_cli(capsys, *base))["cpu_experts"] is None


def test_the_cli_text_report(trace_file, capsys):
    out = _cli(
        capsys, "--trace", trace_file, "--policy", "lru", "--slots-per-layer", "2",
        "--bandwidth-gbps", "3", "--layer-compute-ms", "0", "--cpu-gbps", "5",
    )  # fmt: skip
    assert "CPU experts        4 computed on the CPU (6 misses in all;" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu-gbps", "5"], "--cpu-gbps is part of the timing model"),
        (["--bandwidth-gbps", "3", "--layer-compute-ms", "0", "--cpu-gbps", "-2"],
         "--cpu-gbps must be a finite number > 0"),
        (["--bandwidth-gbps", "3", "--layer-compute-ms", "0", "--cpu-gflops", "4"],
         "--cpu-gflops is the CPU model's token term: give --cpu-gbps"),
        (["--bandwidth-gbps", "3", "--layer-compute-ms", "0", "--cpu-experts", "always"],
         "--cpu-experts always needs a CPU to model: give --cpu-gbps"),
    ],
)  # fmt: skip
def test_the_cli_refuses_bad_options_naming_the_flag(trace_file, capsys, argv, message):
    base = ["replay", "--trace", trace_file, "--policy", "lru", "--slots-per-layer", "2"]
    assert main([*base, *argv]) != 0
    assert message in capsys.readouterr().err


def test_the_cli_refuses_an_unknown_mode(trace_file, capsys):
    with pytest.raises(SystemExit):
        main(["replay", "--trace", trace_file, "--policy", "lru", "--slots-per-layer", "2",
              "--cpu-experts", "maybe"])  # fmt: skip
    assert "--cpu-experts" in capsys.readouterr().err
