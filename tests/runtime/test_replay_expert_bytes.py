"""Issue 17: ``replay(expert_bytes=)`` / ``expertflow replay --expert-bytes N`` re-sizes every
expert of a trace (e.g. to a quantized format's packed size): bytes moved and the timing model's
copy time follow it, the routing and so hits and misses do not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertflow.cli import main
from expertflow.traces.format import Trace, save_trace
from expertflow.traces.replay import replay
from expertflow.traces.replay_options import check_options, option_spelling

TRACE_BYTES = 393_216  # the demo model's float32 expert
INT4_BYTES = 55_296  # the same expert as int4, group 64 (codes and float32 scales)


def trace(tokens: int = 60, layers: int = 3, experts: int = 8, k: int = 2) -> Trace:
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)])
    meta = {"model": "m", "num_experts": experts, "top_k": k, "expert_bytes": TRACE_BYTES}
    return Trace(expert_ids=ids.reshape(tokens, layers, k).astype(np.int32), meta=meta)


TIMING = {"bandwidth_gbps": 16.0, "layer_compute_ms": 0.0}


def test_the_trace_size_by_default_and_when_given_as_is():
    t = trace()
    plain = replay(t, "lru", slots_per_layer=4, **TIMING)
    same = replay(t, "lru", slots_per_layer=4, expert_bytes=TRACE_BYTES, **TIMING)
    assert plain.as_dict() == same.as_dict()
    assert plain.expert_bytes == plain.trace_expert_bytes == TRACE_BYTES


@pytest.mark.parametrize("policy", ["lru", "lrfu", "belady"])
def test_bytes_and_copy_time_follow_the_size_and_routing_does_not(policy):
    t = trace()
    full = replay(t, policy, slots_per_layer=4, **TIMING)
    packed = replay(t, policy, slots_per_layer=4, expert_bytes=INT4_BYTES, **TIMING)
    for field in ("hits", "misses", "prefetches", "steps", "tokens", "slots"):
        assert getattr(packed, field) == getattr(full, field)
    assert full.bytes_moved == full.misses * TRACE_BYTES
    assert packed.bytes_moved == packed.misses * INT4_BYTES
    assert packed.expert_bytes == INT4_BYTES and packed.trace_expert_bytes == TRACE_BYTES
    # No compute: every layer waits only for its copies, so time scales with the size.
    assert packed.time_per_token_ms == pytest.approx(
        full.time_per_token_ms * INT4_BYTES / TRACE_BYTES, rel=1e-9
    )


def test_with_compute_the_stall_shrinks():
    t = trace()
    timing = {"bandwidth_gbps": 16.0, "layer_compute_ms": 0.02}
    full = replay(t, "lru", slots_per_layer=4, **timing)
    packed = replay(t, "lru", slots_per_layer=4, expert_bytes=INT4_BYTES, **timing)
    assert packed.time_per_token_ms < full.time_per_token_ms
    assert packed.stall_share < full.stall_share


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "55296", np.float64(2.0)])
def test_a_size_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(ValueError, match=r"^expert_bytes must be a positive integer"):
        replay(trace(), "lru", slots_per_layer=4, expert_bytes=bad)
    with pytest.raises(ValueError, match=r"^--expert-bytes must be a positive integer"):
        check_options(trace(), "lru", slots_per_layer=4, expert_bytes=bad, spell=option_spelling)


def test_numpy_ints_are_accepted():
    result = replay(trace(), "lru", slots_per_layer=4, expert_bytes=np.int64(1000))
    assert result.expert_bytes == 1000 and isinstance(result.expert_bytes, int)


@pytest.fixture
def trace_file(tmp_path) -> str:
    path = tmp_path / "t.npz"
    save_trace(trace(), path)
    return str(path)


def cli(trace_file, *extra) -> list[str]:
    return ["replay", "--trace", trace_file, "--policy", "lru", "--slots-per-layer", "4", *extra]


def test_json_reflects_the_size(trace_file, capsys):
    timing = ["--bandwidth-gbps", "16", "--layer-compute-ms", "0"]
    assert main(cli(trace_file, *timing, "--json")) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(cli(trace_file, *timing, "--expert-bytes", str(INT4_BYTES), "--json")) == 0
    packed = json.loads(capsys.readouterr().out)
    assert full["expert_bytes"] == full["trace_expert_bytes"] == TRACE_BYTES
    assert packed["expert_bytes"] == INT4_BYTES
    assert packed["trace_expert_bytes"] == TRACE_BYTES
    assert packed["misses"] == full["misses"]
    ratio = INT4_BYTES / TRACE_BYTES
    assert packed["bytes_per_token"] == pytest.approx(full["bytes_per_token"] * ratio)
    assert packed["time_per_token_ms"] == pytest.approx(full["time_per_token_ms"] * ratio)


def test_text_names_the_size(trace_file, capsys):
    assert main(cli(trace_file, "--expert-bytes", str(INT4_BYTES))) == 0
    out = capsys.readouterr().out
    assert f"expert size        54.0 KiB ({INT4_BYTES} B, --expert-bytes" in out
    assert f"the trace's: {TRACE_BYTES} B" in out
    assert main(cli(trace_file)) == 0
    assert "expert size" not in capsys.readouterr().out  # nothing to say at the trace's size


@pytest.mark.parametrize("value", ["0", "-4", "1.5", "abc", "1e6", "4KiB", ""])
def test_the_command_refuses_in_one_line(trace_file, capsys, value):
    assert main(cli(trace_file, f"--expert-bytes={value}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("expertflow replay: error: --expert-bytes must be a positive integer")
    assert repr(value) in err[0] or value in err[0]
