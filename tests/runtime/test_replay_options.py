"""What replay refuses rather than misread, what it clamps (with a note), and what it reports:
bytes and time per token and per step, in the Python API and on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertflow.cli import main
from expertflow.cli.replay import human_bytes
from expertflow.runtime.policies import POLICIES
from expertflow.traces.format import Trace, save_trace
from expertflow.traces.replay import PREDICTION_POLICIES, replay

META = {"model": "m", "num_experts": 8, "top_k": 2, "expert_bytes": 2**20}


def random_trace(tokens=20, layers=2, sequences=None, seed=0, **extra) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(tokens * layers)])
    seq = None if sequences is None else np.arange(tokens) % sequences
    return Trace(
        expert_ids=ids.reshape(tokens, layers, 2).astype(np.int32),
        meta=dict(META),
        sequence_ids=seq,
        **extra,
    )


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(random_trace(), path)
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["replay", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in PREDICTION_POLICIES])
def test_options_a_policy_would_ignore_are_refused(policy):
    trace = random_trace()
    scores = np.zeros((20, 2, 8), dtype=np.float32)
    for name, value in (
        ("predictions", scores),
        ("lookahead", scores),
        ("prefetch_threshold", 0.5),
        ("score_weight", 2.0),
    ):
        with pytest.raises(ValueError, match=rf"{name} is read only by the 'expertflow' policy"):
            replay(trace, policy, slots=4, **{name: value})
    assert replay(trace, policy, slots=4).policy == policy  # nothing given: accepted


def test_the_command_line_names_the_option_and_its_policies(trace_file, tmp_path, capsys):
    np.savez(tmp_path / "p.npz", scores=np.full((20, 2, 8), 0.6, dtype=np.float32))
    base = ["--trace", trace_file, "--slots", "4"]
    code, _, err = run_cli(capsys, *base, "--policy", "lru", "--predictions", str(tmp_path / "p"))
    assert code == 2
    assert "--predictions is read only by the 'expertflow' policy; 'lru' would ignore it" in err
    code, _, err = run_cli(capsys, *base, "--policy", "lfu", "--prefetch-threshold", "0.5")
    assert code == 2 and "--prefetch-threshold is read only by the 'expertflow' policy" in err
    code, _, err = run_cli(capsys, *base, "--policy", "belady", "--lookahead")
    assert code == 2 and "--lookahead is read only by the 'expertflow' policy" in err
    code, _, err = run_cli(capsys, *base, "--policy", "expertflow", "--prefetch-threshold", "0.5")
    assert code == 2 and "--prefetch-threshold filters predicted experts: give --predictions" in err


@pytest.mark.parametrize(
    "timing, message",
    [
        (dict(layer_compute_ms=0.1), "needs both bandwidth_gbps and layer_compute_ms: "
         "bandwidth_gbps is missing"),
        (dict(bandwidth_gbps=float("nan"), layer_compute_ms=0.1),
         "bandwidth_gbps must be a finite number > 0, got nan"),
        (dict(bandwidth_gbps=float("inf"), layer_compute_ms=0.1),
         "bandwidth_gbps must be a finite number > 0, got inf"),
        (dict(bandwidth_gbps=0.0, layer_compute_ms=0.1), "bandwidth_gbps must be a finite"),
        (dict(bandwidth_gbps=25.0, layer_compute_ms=float("nan")),
         "layer_compute_ms must be a finite number >= 0, got nan"),
        (dict(bandwidth_gbps=25.0, layer_compute_ms=-1.0), "layer_compute_ms must be a finite"),
        (dict(prefetch_threshold=float("nan")), "prefetch_threshold must be a finite number"),
    ],
)  # fmt: skip
def test_a_half_given_or_non_finite_timing_model_is_refused(timing, message):
    with pytest.raises(ValueError, match=message):
        replay(random_trace(), "expertflow", slots=4, **timing)


def test_the_command_line_refuses_nan_bandwidth_and_compute_alone(trace_file, capsys):
    base = ["--trace", trace_file, "--policy", "lru", "--slots", "4"]
    code, _, err = run_cli(capsys, *base, "--bandwidth-gbps", "nan", "--layer-compute-ms", "1")
    assert code == 2 and "--bandwidth-gbps must be a finite number > 0, got nan" in err
    code, _, err = run_cli(capsys, *base, "--layer-compute-ms", "0.1")
    assert code == 2
    assert "needs both --bandwidth-gbps and --layer-compute-ms: --bandwidth-gbps is missing" in err


def test_the_per_layer_minimum_is_stated_per_layer(trace_file, capsys):
    with pytest.raises(ValueError, match=r"slots_per_layer must be at least top_k=2 .*got 1"):
        replay(random_trace(), "lru", slots_per_layer=1)
    code, _, err = run_cli(
        capsys, "--trace", trace_file, "--policy", "lru", "--slots-per-layer", "1"
    )
    assert code == 2 and "--slots-per-layer must be at least top_k=2" in err and "got 1" in err
    with pytest.raises(ValueError, match="slots must be an integer, got 2.5"):
        replay(random_trace(), "lru", slots=2.5)


@pytest.mark.parametrize("policy", ["lru", "lfu_history", "belady"])
def test_budgets_beyond_every_expert_are_cut_to_it_with_a_note(policy):
    """An oversized pool holds every expert and never evicts, exactly as a full one does: the
    replay is the same, and the result says which budget it used."""
    trace = random_trace(layers=3)
    full = replay(trace, policy, slots_per_layer=8)
    big = replay(trace, policy, slots_per_layer=12)
    assert big.slots == 24 and big.slots_requested == 36
    assert "slots_per_layer 12 is more than num_experts=8: replayed with 8" in big.note
    assert (big.hits, big.misses, big.bytes_moved) == (full.hits, full.misses, full.bytes_moved)
    assert full.note is None and full.slots_requested == 24
    pool = replay(trace, policy, slots=1000)
    assert pool.slots == 24 and "num_layers x num_experts = 3 x 8 = 24" in pool.note
    assert pool.misses == replay(trace, policy, slots=24).misses


def test_the_command_line_prints_the_clamp_note(trace_file, capsys):
    argv = ["--trace", trace_file, "--policy", "lru", "--slots-per-layer", "12"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    assert "16 slots (per_layer)" in out
    assert "note: --slots-per-layer 12 is more than num_experts=8: replayed with 8" in out
    code, out, _ = run_cli(capsys, *argv, "--json")
    result = json.loads(out)
    assert result["slots"] == 16 and result["slots_requested"] == 24 and result["note"]


def test_a_batched_trace_too_wide_for_a_per_layer_pool_gets_the_budget_it_needs(tmp_path, capsys):
    # Four sequences, sequence i routed to experts 2i and 2i+1: every step (one token of each)
    # needs all 8 experts of a layer at once.
    ids = np.stack([[2 * (t % 4), 2 * (t % 4) + 1] for t in range(40)])[:, None].repeat(2, 1)
    trace = Trace(expert_ids=ids.astype(np.int32), meta=META, sequence_ids=np.arange(40) % 4)
    with pytest.raises(ValueError) as refused:
        replay(trace, "lru", slots_per_layer=4)
    message = str(refused.value)
    assert "this trace needs up to 8 of one layer's 8 experts at once" in message
    assert "slots_per_layer >= 8 (every expert: nothing left to cache)" in message
    assert "one pool shared by all layers (slots) needs only slots >= 8" in message
    assert replay(trace, "lru", slots=8).misses > 0  # as the hint says
    save_trace(trace, tmp_path / "b.npz")
    argv = ["--trace", str(tmp_path / "b.npz"), "--policy", "lru"]
    code, _, err = run_cli(capsys, *argv, "--slots-per-layer", "4")
    assert code == 2 and "(--slots) needs only --slots >= 8" in err
    code, _, err = run_cli(capsys, *argv, "--slots", "4")
    assert code == 2 and "give --slots >= 8" in err


def test_time_and_bytes_per_step_and_per_token_on_a_batched_trace(tmp_path, capsys):
    # One layer, two sequences of 3 tokens, 1 GB experts at 10 GB/s, 50 ms per layer, one slot
    # per expert needed: each of the 3 steps copies 2 experts (200 ms) then computes (50 ms).
    ids = np.array([[[0]], [[1]], [[2]], [[3]], [[4]], [[5]]], dtype=np.int32)
    meta = {"model": "m", "num_experts": 6, "top_k": 1, "expert_bytes": 10**9}
    trace = Trace(expert_ids=ids, meta=meta, sequence_ids=np.array([0, 1, 0, 1, 0, 1]))
    result = replay(trace, "lru", slots=2, bandwidth_gbps=10.0, layer_compute_ms=50.0)
    assert (result.steps, result.tokens, result.misses) == (3, 6, 6)
    assert result.time_per_step_ms == pytest.approx(250.0)
    assert result.time_per_token_ms == pytest.approx(125.0)
    assert result.bytes_per_step == 2 * 10**9 and result.bytes_per_token == 10**9
    save_trace(trace, tmp_path / "b.npz")
    argv = ["--trace", str(tmp_path / "b.npz"), "--policy", "lru", "--slots", "2"]
    argv += ["--bandwidth-gbps", "10", "--layer-compute-ms", "50"]
    code, out, _ = run_cli(capsys, *argv, "--json")
    got = json.loads(out)
    assert code == 0 and got["bytes_per_token"] == 10**9 and got["bytes_per_step"] == 2 * 10**9
    assert got["time_per_step_ms"] == pytest.approx(250.0)
    code, out, _ = run_cli(capsys, *argv)
    assert "bytes moved        953.7 MiB per token, 1.9 GiB per step (5.6 GiB in all)" in out
    assert "time per step      250.000 ms, per token 125.000 ms (modelled)" in out


def test_human_bytes_picks_the_unit_by_size():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 2**20) == "5.0 MiB"
    assert human_bytes(3.25 * 2**40) == "3.2 TiB"
    assert human_bytes(2**60) == "1024.0 PiB"


def test_prefetch_off_also_holds_for_lookahead_and_needs_something_to_prefetch():
    trace = random_trace(layers=3)
    picks = np.zeros((20, 3, 8), dtype=np.float32)
    picks[np.arange(20)[:, None, None], np.arange(3)[None, :, None], trace.expert_ids] = 1.0
    assert replay(trace, "expertflow", slots_per_layer=2, lookahead=picks).prefetches > 0
    off = replay(trace, "expertflow", slots_per_layer=2, lookahead=picks, prefetch=False)
    assert off.prefetches == 0
    with pytest.raises(ValueError, match="prefetch=False changes nothing without predictions"):
        replay(trace, "expertflow", slots_per_layer=2, prefetch=False)
