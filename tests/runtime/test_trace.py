"""The trace format: round trip, atomic writes, and clear errors for every malformed field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertflow.traces.format import Trace, TraceError, load_trace, save_trace


def make_trace(tokens=6, layers=3, experts=8, k=2, seed=0, **extra) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)])
    meta = {"model": "test", "num_experts": experts, "top_k": k, "expert_bytes": 1000}
    meta.update(extra.pop("meta", {}))
    return Trace(expert_ids=ids.reshape(tokens, layers, k).astype(np.int32), meta=meta, **extra)


def test_round_trip(tmp_path):
    trace = make_trace(
        gate_probs=np.random.default_rng(1).random((6, 3, 2), dtype=np.float32),
        token_ids=np.arange(6),
        sequence_ids=np.array([0, 0, 1, 1, 0, 1]),
        meta={"prefill": [True, False, True, False, False, False]},
    )
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    back = load_trace(path)
    assert np.array_equal(back.expert_ids, trace.expert_ids)
    assert np.array_equal(back.gate_probs, trace.gate_probs)
    assert np.array_equal(back.token_ids, trace.token_ids)
    assert np.array_equal(back.sequence_ids, trace.sequence_ids)
    assert back.meta == trace.meta
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_steps_batch_sequences_and_prefill():
    trace = make_trace(
        sequence_ids=np.array([0, 0, 1, 1, 0, 1]),
        meta={"prefill": [True, True, True, False, False, False]},
    )
    steps = [s.tolist() for s in trace.steps()]
    # seq 0: prompt {0, 1}, then 4; seq 1: prompt {2}, then 3, then 5.
    assert steps == [[0, 1, 2], [4, 3], [5]]
    assert [s.tolist() for s in make_trace(tokens=3).steps()] == [[0], [1], [2]]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(KeyboardInterrupt):
        save_trace(make_trace(), tmp_path / "t.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expert_ids": np.zeros((2, 3), dtype=np.int32)}, "expert_ids must be a 3-D integer"),
        ({"expert_ids": np.zeros((2, 3, 2), dtype=np.float32)}, "expert_ids must hold integers"),
        ({"expert_ids": np.full((2, 3, 2), 8)}, r"expert_ids must be in \[-1, num_experts=8\)"),
        ({"expert_ids": np.full((2, 3, 2), -2)}, r"expert_ids must be in \[-1"),
        ({"meta": {"top_k": 3}}, "meta.top_k=3 but expert_ids has K=2"),
        ({"meta": {"expert_bytes": "big"}}, "meta.expert_bytes must be int"),
        ({"gate_probs": np.zeros((6, 3, 1))}, "gate_probs must have expert_ids' shape"),
        ({"sequence_ids": np.zeros(5, dtype=int)}, "sequence_ids must have T=6 entries"),
        ({"token_ids": np.zeros(6)}, "token_ids must hold integers"),
        ({"meta": {"prefill": [True]}}, "meta.prefill must be a list of T=6 bools"),
        # Issue 21: each of these was read silently (or crashed a tool far from the cause).
        ({"meta": {"prefill": ["no"] * 6}}, r"meta.prefill .* got 'no' at index 0"),
        ({"meta": {"prefill": [True] * 5 + [0]}}, r"meta.prefill .* got 0 at index 5"),
        ({"sequence_ids": np.array([0, 0, -1, 1, 1, 1])}, r"sequence_ids must be >= 0"),
        (
            {"sequence_ids": np.array([0, 0, 1, 1, 2, 2]), "meta": {"sequence_sources": ["a"]}},
            "sequence_sources must label every sequence id: sequence_ids reach 2",
        ),
        ({"meta": {"sequence_sources": "abc"}}, "sequence_sources must be a list of strings"),
        ({"meta": {"sequence_sources": [1]}}, "sequence_sources must be a list of strings"),
        ({"meta": {"sequence_sources": []}}, "needs at least 1 labels, got 0"),
        ({"lookahead_ids": np.full((6, 3, 2), 8)}, r"lookahead_ids must be in \[-1, num_"),
        ({"token_ids": np.array([0, 1, -1, 2, 3, 4])}, r"token_ids must be in \[0, "),
        (
            {"token_ids": np.arange(6), "meta": {"vocab_size": 5}},
            r"token_ids must be in \[0, meta.vocab_size=5\), got values in \[0, 5\]",
        ),
        ({"token_ids": np.array([2**40] * 6)}, r"token_ids must be in \[0, the largest vocab"),
        ({"meta": {"vocab_size": "32000"}}, "meta.vocab_size must be an integer"),
        ({"meta": {"vocab_size": 2**40}}, "meta.vocab_size must be an integer in"),
        ({"meta": {"num_experts": 10**9}}, r"meta.num_experts must be in \[1, 65536\]"),
        ({"meta": {"num_experts": 1e9}}, "meta.num_experts must be int, got float"),
        ({"meta": {"num_experts": 1}}, "meta.top_k=2 exceeds meta.num_experts=1"),
        (
            {"expert_ids": np.zeros((6, 0, 2), dtype=np.int32)},
            r"expert_ids must be \[T, L, K\] with L >= 1 .* got shape \(6, 0, 2\)",
        ),
        (
            {"expert_ids": np.zeros((6, 3, 0), dtype=np.int32), "meta": {"top_k": 0}},
            "K >= 1 experts per token",
        ),
        (
            {"expert_ids": np.zeros((1, 10_000, 2), dtype=np.int8), "meta": {"num_experts": 2**16}},
            r"num_layers x meta.num_experts must be at most 1048576, got 10000 x 65536",
        ),
    ],
)
def test_malformed_fields_are_named(kwargs, message):
    meta = {"model": "m", "num_experts": 8, "top_k": 2, "expert_bytes": 10}
    meta.update(kwargs.pop("meta", {}))
    fields = {"expert_ids": np.zeros((6, 3, 2), dtype=np.int32), "meta": meta} | kwargs
    with pytest.raises(TraceError, match=message):
        Trace(**fields)


def test_missing_meta_field():
    with pytest.raises(TraceError, match="meta.expert_bytes is missing"):
        Trace(
            expert_ids=np.zeros((1, 1, 1), dtype=np.int32),
            meta={"model": "m", "num_experts": 2, "top_k": 1},
        )


def test_corrupt_and_incomplete_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(TraceError, match="not a readable .npz trace"):
        load_trace(garbage)
    truncated = tmp_path / "truncated.npz"
    save_trace(make_trace(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(TraceError):
        load_trace(truncated)
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, expert_ids=np.zeros((1, 1, 1), dtype=np.int32))
    with pytest.raises(TraceError, match="needs 'expert_ids' and 'meta'"):
        load_trace(no_meta)
    bad_json = tmp_path / "bad_json.npz"
    np.savez(bad_json, expert_ids=np.zeros((1, 1, 1), dtype=np.int32), meta=np.array("{oops"))
    with pytest.raises(TraceError, match="meta is not valid JSON"):
        load_trace(bad_json)
    pickled = tmp_path / "pickled.npz"
    np.savez(
        pickled,
        expert_ids=np.zeros((1, 1, 1), dtype=np.int32),
        meta=np.array([{"a": 1}], dtype=object),
    )
    with pytest.raises(TraceError):
        load_trace(pickled)  # object arrays need pickle, which is never allowed


def test_plain_npy_and_truncated_members_are_named(tmp_path):
    """Issue 21: a plain .npy as a trace raised AttributeError; a damaged member zlib.error."""
    npy = tmp_path / "ids.npy"
    np.save(npy, np.zeros((2, 1, 1), dtype=np.int32))
    with pytest.raises(TraceError, match=r"ids.npy: a trace is an .npz archive .* \.npy"):
        load_trace(npy)
    for cut in (0, 30, 200, -40, -10):
        damaged = tmp_path / f"cut{cut}.npz"
        save_trace(make_trace(tokens=200), tmp_path / "whole.npz")
        data = (tmp_path / "whole.npz").read_bytes()
        damaged.write_bytes(data[:cut] if cut > 0 else data[:cut] + b"\0" * 5)
        with pytest.raises(TraceError, match=f"cut{cut}.npz"):
            load_trace(damaged)


def test_loaded_field_errors_name_the_file(tmp_path):
    path = tmp_path / "neg.npz"
    trace = make_trace()
    np.savez(
        path,
        expert_ids=trace.expert_ids,
        sequence_ids=np.array([0, 0, -1, 1, 1, 1]),
        meta=np.array(json.dumps(trace.meta | {"sequence_sources": ["a", "b"]})),
    )
    with pytest.raises(TraceError, match=r"neg.npz: sequence_ids must be >= 0"):
        load_trace(path)


def quadratic_sequence_rows(trace: Trace) -> list[np.ndarray]:
    """The former definition (one scan of every row per sequence): the reference."""
    if trace.sequence_ids is None:
        return [np.arange(trace.num_tokens)]
    order = dict.fromkeys(trace.sequence_ids.tolist())
    return [np.flatnonzero(trace.sequence_ids == s) for s in order]


def loop_steps(trace: Trace) -> list[np.ndarray]:
    """The former definition of steps (a Python loop per sequence and step): the reference."""
    prefill = np.asarray(trace.meta.get("prefill") or [False] * trace.num_tokens, dtype=bool)
    per_sequence = []
    for tokens in quadratic_sequence_rows(trace):
        prompt_len = 0
        while prompt_len < len(tokens) and prefill[tokens[prompt_len]]:
            prompt_len += 1
        steps = [tokens[:prompt_len]] if prompt_len else []
        steps += [tokens[i : i + 1] for i in range(prompt_len, len(tokens))]
        per_sequence.append(steps)
    longest = max((len(s) for s in per_sequence), default=0)
    return [np.concatenate([s[i] for s in per_sequence if i < len(s)]) for i in range(longest)]


@pytest.mark.parametrize("seed", range(300))
def test_sequence_rows_and_steps_match_their_former_definitions(seed):
    """Interleaved sequences with arbitrary (sparse, not first-appearance ordered) ids, prompts
    anywhere (a prefill token after a generated one is not part of the prompt), and empty
    traces. Ids start at 0: a negative one is refused (it would index sequence_sources from
    the end)."""
    rng = np.random.default_rng(seed)
    tokens = int(rng.integers(0, 40))
    sequences = rng.integers(0, int(rng.integers(1, 8)), size=tokens) * int(rng.choice([1, 7]))
    meta = {"model": "m", "num_experts": 2, "top_k": 1, "expert_bytes": 1}
    if rng.random() < 0.7:
        meta["prefill"] = (rng.random(tokens) < rng.random()).tolist()
    trace = Trace(
        expert_ids=np.zeros((tokens, 1, 1), dtype=np.int32),
        meta=meta,
        sequence_ids=sequences if rng.random() < 0.9 else None,
    )
    got, want = trace.sequence_rows(), quadratic_sequence_rows(trace)
    assert [r.tolist() for r in got] == [r.tolist() for r in want]
    assert [s.tolist() for s in trace.steps()] == [s.tolist() for s in loop_steps(trace)]
