"""Replay through the native policy: against a plain-Python LRU, Belady's optimality, the
policy's invariants under random operations, the timing model and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="property tests need hypothesis (requirements/dev.txt)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from expertflow import _C  # noqa: E402
from expertflow.cli import main  # noqa: E402
from expertflow.prediction import REUSE_HORIZONS, multi_hot, uses_within  # noqa: E402
from expertflow.runtime.policies import POLICIES  # noqa: E402
from expertflow.traces.format import Trace, TraceError, save_trace
from expertflow.traces.replay import load_predictions, replay


@st.composite
def traces(draw, max_tokens=40):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(1, max_tokens))
    sequences = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    popularity = rng.dirichlet(np.full(experts, 0.5))  # skewed, as real routers are
    ids = np.stack(
        [rng.choice(experts, size=k, replace=False, p=popularity) for _ in range(tokens * layers)]
    ).reshape(tokens, layers, k)
    meta = {"model": "random", "num_experts": experts, "top_k": k, "expert_bytes": 4096}
    seq = rng.integers(0, sequences, size=tokens)
    return Trace(expert_ids=ids.astype(np.int32), meta=meta, sequence_ids=seq)


def python_lru_misses(trace: Trace, slots: int, per_layer: bool) -> int:
    """LRU as documented: same-step entries share a tick, ties go to the lowest slot, free
    slots are taken lowest first, the current layer's experts are never evicted."""
    layers = trace.num_layers
    pool_size = slots // layers if per_layer else slots
    owner: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert)
    where: dict[tuple[int, int], int] = {}
    last: dict[int, int] = {}
    tick = misses = 0
    for tokens in trace.steps():
        for layer in range(layers):
            ids = trace.expert_ids[tokens, layer].ravel()
            experts = sorted(set(ids[ids >= 0].tolist()))
            if not experts:
                continue
            tick += 1
            pool = layer if per_layer else 0
            pool_slots = range(pool * pool_size, (pool + 1) * pool_size)
            wanted = {(layer, e) for e in experts}
            for e in experts:
                if (layer, e) in where:
                    last[where[(layer, e)]] = tick
            for e in experts:
                if (layer, e) in where:
                    continue
                misses += 1
                free = [s for s in pool_slots if s not in owner]
                if free:
                    slot = free[0]
                else:
                    slot = min(
                        (s for s in pool_slots if owner[s] not in wanted),
                        key=lambda s: (last[s], s),
                    )
                    del where[owner[slot]]
                owner[slot] = (layer, e)
                where[(layer, e)] = slot
                last[slot] = tick
    return misses


def min_slots(trace: Trace) -> int:
    """The largest union of one layer's experts in one step: the least a global pool needs."""
    need = 1
    for tokens in trace.steps():
        for layer in range(trace.num_layers):
            ids = trace.expert_ids[tokens, layer].ravel()
            need = max(need, len(set(ids[ids >= 0].tolist())))
    return need


@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(0, 6), st.booleans())
def test_lru_replay_equals_python_lru(trace, extra, per_layer):
    need = min_slots(trace)
    if per_layer:
        result = replay(trace, "lru", slots_per_layer=need + extra)
        want = python_lru_misses(trace, (need + extra) * trace.num_layers, True)
    else:
        result = replay(trace, "lru", slots=need + extra)
        want = python_lru_misses(trace, need + extra, False)
    assert result.misses == want


@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(0, 8))
def test_belady_never_misses_more(trace, extra):
    slots = min_slots(trace) + extra
    belady = replay(trace, "belady", slots=slots).misses
    for policy in POLICIES:
        assert belady <= replay(trace, policy, slots=slots).misses, policy


@settings(max_examples=40, deadline=None)
@given(traces(), st.integers(0, 6), st.booleans())
def test_expertflow_without_predictions_is_lrfu(trace, extra, per_layer):
    """With every score 0 only the decayed request counts rank evictions: no predictor costs
    nothing against LRFU."""
    need = min_slots(trace) + extra
    budget = dict(slots_per_layer=need) if per_layer else dict(slots=need)
    flow, lrfu = (replay(trace, p, **budget) for p in ("expertflow", "lrfu"))
    assert (flow.hits, flow.misses, flow.bytes_moved) == (lrfu.hits, lrfu.misses, lrfu.bytes_moved)


def test_lrfu_keeps_a_hot_expert_through_bursts_of_one_off_experts():
    """Expert 0 every other token, a fresh expert between: with two slots LRU evicts 0 whenever
    two one-offs arrive in a row, LRFU keeps it by its decayed request count."""
    ids, fresh = [], 1
    for _ in range(12):
        ids += [0, 0, fresh, fresh + 1]  # 0 twice, then two experts seen once
        fresh += 2
    trace = Trace(
        expert_ids=np.array(ids, dtype=np.int32).reshape(-1, 1, 1),
        meta={"model": "hot", "num_experts": fresh, "top_k": 1, "expert_bytes": 4096},
    )
    lru, lrfu = (replay(trace, p, slots=2).misses for p in ("lru", "lrfu"))
    assert lrfu == 1 + 24  # 0 once, every one-off once
    assert lru == lrfu + 11  # 0 again after every burst but the first
    assert replay(trace, "belady", slots=2).misses <= lrfu


def test_lfu_counts_since_load_and_lfu_history_over_the_whole_run(tmp_path, capsys):
    """1 used three times, 0 twice; 2 pushes 0 out, 0 comes back, then 3 arrives: lfu counts
    0's one request since its reload and evicts it, lfu_history counts its three requests over
    the run (as many as 1's, which is older: 1 goes). The last request for 0 tells them apart."""
    requests = [1, 1, 1, 0, 0, 2, 0, 3, 0]
    trace = Trace(
        expert_ids=np.array(requests, dtype=np.int32).reshape(-1, 1, 1),
        meta={"model": "m", "num_experts": 4, "top_k": 1, "expert_bytes": 1},
    )
    assert "lfu_history" in POLICIES  # from the native core: the CLI and cache offer it too
    assert replay(trace, "lfu", slots=2).misses == 6
    assert replay(trace, "lfu_history", slots=2).misses == 5
    save_trace(trace, tmp_path / "t.npz")
    argv = ["replay", "--trace", str(tmp_path / "t.npz"), "--slots", "2", "--json"]
    assert main(argv + ["--policy", "lfu_history"]) == 0
    assert json.loads(capsys.readouterr().out)["misses"] == 5


@settings(max_examples=40, deadline=None)
@given(traces(max_tokens=25), st.integers(0, 3))
def test_oracle_predictions_remove_every_miss(trace, extra):
    """With the true routing as predictions and room for each step, every expert is prefetched
    before its layer runs: no urgent loads at all."""
    scores = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
    for t, layer, j in np.ndindex(trace.expert_ids.shape):
        scores[t, layer, trace.expert_ids[t, layer, j]] = 1.0
    result = replay(
        trace, "expertflow", slots_per_layer=min_slots(trace) + extra, predictions=scores
    )
    assert result.misses == 0
    assert result.hits == sum(
        len(set(trace.expert_ids[tokens, layer].ravel().tolist()))
        for tokens in trace.steps()
        for layer in range(trace.num_layers)
    )
    assert result.bytes_moved == (result.prefetches + result.misses) * 4096


@settings(max_examples=40, deadline=None)
@given(traces(max_tokens=25), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_a_prefetch_threshold_between_none_and_all(trace, extra, seed):
    """Threshold 0 prefetches as before; one above every score prefetches nothing and equals
    ranking evictions only; in between, only predictions at or above it are copied."""
    scores = np.random.default_rng(seed).random(
        (trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32
    )
    kwargs = dict(slots_per_layer=min_slots(trace) + extra, predictions=scores)
    plain = replay(trace, "expertflow", **kwargs)
    assert replay(trace, "expertflow", prefetch_threshold=0.0, **kwargs) == plain
    none = replay(trace, "expertflow", prefetch_threshold=1.01, **kwargs)
    assert none == replay(trace, "expertflow", prefetch=False, **kwargs)
    assert none.prefetches == 0
    sure = 0  # (step, layer, expert) some token ranks in its top-k with a score >= 0.5
    for tokens in trace.steps():
        top = np.argsort(-scores[tokens], axis=-1, kind="stable")[..., : trace.top_k]
        confident = np.take_along_axis(scores[tokens], top, axis=-1) >= 0.5
        for layer in range(trace.num_layers):
            sure += len(set(top[:, layer][confident[:, layer]].tolist()))
    assert replay(trace, "expertflow", prefetch_threshold=0.5, **kwargs).prefetches <= sure
    with pytest.raises(ValueError, match="prefetch_threshold must be a finite number >= 0"):
        replay(trace, "expertflow", prefetch_threshold=-1.0, **kwargs)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_policy_invariants_under_random_operations(data):
    layers, experts = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 10))
    k = data.draw(st.integers(1, experts))
    per_layer = data.draw(st.booleans())
    pool = k + data.draw(st.integers(0, 4))
    policy = data.draw(st.sampled_from(POLICIES))
    cache = _C.CachePolicy(
        layers,
        experts,
        pool * layers if per_layer else pool,
        k,
        budget="per_layer" if per_layer else "global",
        policy=policy,
    )
    pinned: dict[int, dict[int, int]] = {}  # layer -> expert -> slot, until release
    loading: dict[tuple[int, int], int] = {}  # prefetched, copy not complete
    for _ in range(data.draw(st.integers(1, 60))):
        layer = data.draw(st.integers(0, layers - 1))
        op = data.draw(st.sampled_from(["acquire", "release", "prefetch", "complete", "score"]))
        if op == "acquire" and layer not in pinned:
            wanted = data.draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=k))
            try:
                slots, loads = cache.acquire(layer, wanted)
            except ValueError:
                continue  # the pool is full of pinned or loading entries: refused, unchanged
            assert len(set(slots)) == len(set(wanted))
            for slot, _, expert, urgent in loads:
                assert urgent and expert in wanted
                cache.loaded(slot)
            pinned[layer] = dict(zip(wanted, slots, strict=True))
            for key in [key for key in loading if key[0] == layer and key[1] in wanted]:
                cache.loaded(loading.pop(key))
        elif op == "release" and layer in pinned:
            cache.release(layer)
            del pinned[layer]
        elif op == "prefetch":
            expert = data.draw(st.integers(0, experts - 1))
            load = cache.prefetch(layer, expert)
            if load is not None:
                loading[(layer, expert)] = load[0]
        elif op == "complete" and loading:
            cache.loaded(loading.pop(next(iter(loading))))
        elif op == "score":
            cache.set_scores(
                layer, data.draw(st.lists(st.floats(0, 1), min_size=experts, max_size=experts))
            )
        # Pinned and loading entries are never evicted; slots are never shared.
        for lay, held in pinned.items():
            for expert, slot in held.items():
                assert cache.slot_of(lay, expert) == slot
        for (lay, expert), slot in loading.items():
            assert cache.slot_of(lay, expert) == slot
        owners = [cache.slot_of(lay, e) for lay in range(layers) for e in range(experts)]
        placed = [s for s in owners if s >= 0]
        assert len(placed) == len(set(placed))
        for lay in range(layers):
            mine = [cache.slot_of(lay, e) for e in range(experts) if cache.slot_of(lay, e) >= 0]
            if per_layer:
                assert all(lay * pool <= s < (lay + 1) * pool for s in mine)
        assert len(placed) <= (pool * layers if per_layer else pool)


def test_timing_model_by_hand():
    # One layer, one expert per token, 1 slot: every token misses and waits for its copy.
    ids = np.array([[[0]], [[1]], [[0]]], dtype=np.int32)
    trace = Trace(
        expert_ids=ids, meta={"model": "m", "num_experts": 2, "top_k": 1, "expert_bytes": 10**9}
    )
    result = replay(trace, "lru", slots=1, bandwidth_gbps=10.0, layer_compute_ms=50.0)
    # Each token: 100 ms copy (1 GB at 10 GB/s) + 50 ms compute.
    assert result.misses == 3
    assert result.time_per_token_ms == pytest.approx(150.0)
    assert result.stall_share == pytest.approx(100 / 150)
    # Two slots: the third token hits, costing compute only.
    roomy = replay(trace, "lru", slots=2, bandwidth_gbps=10.0, layer_compute_ms=50.0)
    assert roomy.time_per_token_ms == pytest.approx((150 + 150 + 50) / 3)


def test_prefetch_overlaps_compute_in_the_timing_model():
    # Two layers; oracle predictions prefetch layer 1's expert while layer 0 computes.
    ids = np.array([[[0], [1]]], dtype=np.int32)
    trace = Trace(
        expert_ids=ids, meta={"model": "m", "num_experts": 2, "top_k": 1, "expert_bytes": 10**9}
    )
    scores = np.zeros((1, 2, 2), dtype=np.float32)
    scores[0, 0, 0] = scores[0, 1, 1] = 1.0
    lru = replay(trace, "lru", slots_per_layer=1, bandwidth_gbps=10.0, layer_compute_ms=100.0)
    flow = replay(
        trace,
        "expertflow",
        slots_per_layer=1,
        predictions=scores,
        bandwidth_gbps=10.0,
        layer_compute_ms=100.0,
    )
    assert lru.time_per_token_ms == pytest.approx(400.0)  # copy, compute, copy, compute
    assert flow.time_per_token_ms == pytest.approx(300.0)  # layer 1's copy hides under compute


def test_gate_lookahead_prefetches_one_layer_ahead_not_at_the_step_start():
    # Token 0 warms every layer with expert 0; token 1 needs expert 1 at layer 2 only. Its copy
    # (150 ms) is longer than a layer (100 ms): issued when layer 1 starts it is 50 ms late,
    # issued at the step's start (an oracle path prediction) it is on time.
    ids = np.array([[[0], [0], [0]], [[0], [0], [1]]], dtype=np.int32)
    trace = Trace(
        expert_ids=ids, meta={"model": "m", "num_experts": 2, "top_k": 1, "expert_bytes": 10**9}
    )
    timing = dict(slots_per_layer=1, bandwidth_gbps=1 / 0.15, layer_compute_ms=100.0)
    picks = np.zeros((2, 3, 2), dtype=np.float32)
    picks[np.arange(2)[:, None], np.arange(3)[None, :], ids[..., 0]] = 1.0
    lru = replay(trace, "lru", **timing)
    ahead = replay(trace, "expertflow", lookahead=picks, **timing)
    oracle = replay(trace, "expertflow", predictions=picks, **timing)
    assert ahead.misses < lru.misses
    assert oracle.time_per_token_ms < ahead.time_per_token_ms < lru.time_per_token_ms
    with pytest.raises(ValueError, match=r"lookahead must be \[T, L, E\] = \[2, 3, 2\]"):
        replay(trace, "expertflow", lookahead=picks[:1], **timing)


def test_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(40)]).reshape(20, 2, 2).astype(np.int32)
    save_trace(
        Trace(
            expert_ids=ids, meta={"model": "m", "num_experts": 8, "top_k": 2, "expert_bytes": 2**20}
        ),
        tmp_path / "t.npz",
    )
    argv = [
        "replay",
        "--trace",
        str(tmp_path / "t.npz"),
        "--policy",
        "lru",
        "--slots-per-layer",
        "4",
        "--bandwidth-gbps",
        "25",
        "--layer-compute-ms",
        "0.1",
    ]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hits"] + out["misses"] == 80 and 0 <= out["hit_ratio"] <= 1
    assert out["bytes_moved"] == out["misses"] * 2**20 and out["stall_share"] > 0
    assert main(argv) == 0
    assert "hit ratio" in capsys.readouterr().out
    assert (
        main(
            ["replay", "--trace", str(tmp_path / "missing.npz"), "--policy", "lru", "--slots", "4"]
        )
        == 2
    )
    assert "not a readable .npz trace" in capsys.readouterr().err
    assert (
        main(["replay", "--trace", str(tmp_path / "t.npz"), "--policy", "lru", "--slots", "1"]) == 2
    )
    assert "num_slots must be at least 2" in capsys.readouterr().err
    flow = ["replay", "--policy", "expertflow", "--slots", "4", "--lookahead", "--json"]
    assert main(flow + ["--trace", str(tmp_path / "t.npz")]) == 2
    assert "needs a trace recorded with `expertflow trace --lookahead`" in capsys.readouterr().err
    save_trace(
        Trace(
            expert_ids=ids,
            lookahead_ids=ids,
            meta={"model": "m", "num_experts": 8, "top_k": 2, "expert_bytes": 2**20},
        ),
        tmp_path / "ahead.npz",
    )
    assert main(flow + ["--trace", str(tmp_path / "ahead.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["prefetches"] > 0
    np.savez(tmp_path / "p.npz", scores=np.full((20, 2, 8), 0.6, dtype=np.float32))
    flow = ["replay", "--trace", str(tmp_path / "t.npz"), "--policy", "expertflow", "--slots"]
    flow += ["4", "--predictions", str(tmp_path / "p.npz"), "--json"]
    for threshold, prefetching in (("0.5", True), ("0.7", False)):
        assert main(flow + ["--prefetch-threshold", threshold]) == 0
        assert (json.loads(capsys.readouterr().out)["prefetches"] > 0) == prefetching


def test_unrecorded_entries_and_mismatched_predictions(tmp_path):
    ids = np.array([[[0, -1]], [[-1, -1]], [[1, 0]]], dtype=np.int32)  # -1 = not recorded
    trace = Trace(
        expert_ids=ids, meta={"model": "m", "num_experts": 2, "top_k": 2, "expert_bytes": 8}
    )
    result = replay(trace, "lru", slots=2)
    assert result.hits + result.misses == 3 and result.misses == 2
    np.savez(tmp_path / "p.npz", scores=np.zeros((3, 1, 3), dtype=np.float32))
    with pytest.raises(TraceError, match=r"scores must be float \[3, 1, 2\]"):
        load_predictions(tmp_path / "p.npz", trace)
    np.savez(tmp_path / "r.npz", scores=np.zeros((3, 1, 2)), reuse=np.zeros((3, 2, 2)))
    with pytest.raises(TraceError, match=r"reuse must be float \[3, 1, 2\]"):
        load_predictions(tmp_path / "r.npz", trace)
    np.savez(tmp_path / "r.npz", scores=np.zeros((3, 1, 2)), reuse=np.ones((3, 1, 2)))
    scores, reuse = load_predictions(tmp_path / "r.npz", trace)
    assert scores.shape == reuse.shape == (3, 1, 2) and reuse.min() == 1
    np.savez(tmp_path / "q.npz", other=np.zeros(1))
    with pytest.raises(TraceError, match="needs a float array 'scores'"):
        load_predictions(tmp_path / "q.npz", trace)
    with pytest.raises(ValueError, match="exactly one of slots_per_layer and slots"):
        replay(trace, "lru")
    with pytest.raises(ValueError, match="needs both bandwidth_gbps and layer_compute_ms"):
        replay(trace, "lru", slots=2, bandwidth_gbps=1.0)
    with pytest.raises(ValueError, match="score_weight must be a finite number >= 0, got -1"):
        replay(trace, "expertflow", slots=2, score_weight=-1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_true_reuse_scores_bring_evictions_near_belady(seed):
    """Next-step scores say nothing about an expert once its layer has run this step; the
    reuse scores (here the true ones: the mean over horizons of a use within h tokens) take
    over at release and rank by how soon it comes back, which is Belady's order nearly."""
    rng = np.random.default_rng(seed)
    tokens, layers, experts = 1500, 3, 10
    popularity = rng.dirichlet(np.full(experts, 0.5), size=layers)
    ids = np.stack(
        [rng.choice(experts, 2, replace=False, p=popularity[i % layers]) for i in range(4500)]
    ).reshape(tokens, layers, 2)
    meta = {"model": "r", "num_experts": experts, "top_k": 2, "expert_bytes": 1}
    trace = Trace(expert_ids=ids.astype(np.int32), meta=meta)
    hot = multi_hot(trace.expert_ids, experts).astype(np.float32)
    flat = hot.reshape(tokens, -1).astype(np.uint8)
    reuse = uses_within(flat, REUSE_HORIZONS).mean(axis=1).reshape(hot.shape)
    belady = replay(trace, "belady", slots=9).misses
    kw = dict(slots=9, predictions=hot, prefetch=False, score_weight=1e6)
    without = replay(trace, "expertflow", **kw).misses
    with_reuse = replay(trace, "expertflow", reuse=reuse.astype(np.float32), **kw).misses
    assert without > 1.2 * belady and belady <= with_reuse < 1.05 * belady
    with pytest.raises(ValueError, match="reuse scores come with predictions"):
        replay(trace, "expertflow", slots=9, reuse=reuse)
    with pytest.raises(ValueError, match=r"reuse must be \[T, L, E\]"):
        replay(trace, "expertflow", slots=9, predictions=hot, reuse=reuse[1:])
