"""Replays a routing trace through the native cache policy, with an optional timing model.

Every step (:mod:`~expertflow.traces.format`) runs its layers in order: the layer's experts
(the union over the step's tokens) are acquired from the cache, missing ones load at once, then
the layer is released. With predictions and ``policy="expertflow"``, each step starts by
scoring every layer's experts and prefetching the predicted ones in layer order. With
``lookahead`` scores (gate lookahead: layer l's router applied to layer l-1's hidden states),
layer l's are scored and prefetched only when layer l-1 starts, as they are in a real forward
pass. With ``reuse`` scores (a reuse head's predicted demand after the step), each layer's
experts are valued by them from the layer's release on (``CachePolicy.set_scores``). Belady is
told each expert's next use from the trace itself (the optimum no real policy can reach).

Timing model (with ``bandwidth_gbps`` and ``layer_compute_ms``): one host-to-device link of
that bandwidth moves one expert at a time (``meta["expert_bytes"]``, or ``expert_bytes``: e.g.
a quantized format's packed size); prefetches queue on it in issue order, and an urgent
load (a miss) goes ahead of every prefetch that has not started yet. A layer starts when the
previous one has finished and all of its experts have arrived, and then computes for
``layer_compute_ms``. Stalled time is the time layers spend waiting for copies (and CPU experts).

CPU experts (with ``cpu_gbps``): a host CPU computes a missed expert where it lies, reading its
weights at ``cpu_gbps`` GB/s (and, with ``cpu_gflops``, at least 2 x params x tokens flops at
that rate; params = expert bytes / 2, 16-bit weights). Such a miss is neither copied nor cached;
its layer waits for its result. The CPU works one expert at a time on its own queue, concurrently
with the link. ``cpu_experts`` says which misses go there: ``"never"`` (copy-only),
``"always"`` (Fiddler-like: a miss is copied only into a free slot, which evicts nothing,
so the slots end up holding the first experts seen; every later miss runs on the CPU) or
``"auto"`` (the default with ``cpu_gbps``): the native
``HybridPolicy`` decides each miss of a layer in order (experts ascending) from its copy time,
its CPU time at the step's tokens routed to it, the work queued on the link and on the CPU, and
its predicted reuse (the ``reuse`` scores when given, else 0). A miss is an expert absent from
the cache when its layer starts; a CPU expert still counts as a miss but moves no bytes.
``"auto"`` also computes a hit whose copy (a prefetch) is still on its way on the CPU when the
CPU would finish it sooner than the copy arrives (the copy goes on: the expert is cached, a
hit), and runs a miss there when the layer's pool has no room left for its copy (a prompt can
need more experts than the pool holds; copy-only replay refuses such a budget).
``cpu_experts`` counts every expert computed on the CPU, misses and such hits.

Options a policy would not read are refused rather than ignored (:func:`check_options`): only
``expertflow`` reads predictions, lookahead and reuse scores, the prefetch threshold and the
score weight."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np

from expertflow.traces.format import Trace, TraceError
from expertflow.traces.replay_options import (
    PREDICTION_POLICIES,
    Spell,
    check_options,
    clamp_budget,
)
from expertflow.traces.replay_run import ReplayResult, ReplayRun, layer_experts
from expertflow.traces.timing import Link

__all__ = ["PREDICTION_POLICIES", "ReplayResult", "check_options", "load_predictions", "replay"]


def load_predictions(path, trace: Trace) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads predicted routing probabilities: ``scores`` float ``[T, L, E]`` in an ``.npz``,
    and the reuse scores ``reuse`` (same shape) if it holds them, else None."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                scores = data["scores"]
                reuse = data["reuse"] if "reuse" in data.files else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise TraceError(f"{path}: needs a float array 'scores' [T, L, E] ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TraceError(
            f"{path}: predictions are an .npz with a float array 'scores' [T, L, E], got one "
            "bare array (a .npy file?)"
        )
    want = (trace.num_tokens, trace.num_layers, trace.num_experts)
    for name, array in (("scores", scores), ("reuse", reuse)):
        if array is not None and (
            array.shape != want or not np.issubdtype(array.dtype, np.floating)
        ):
            raise TraceError(
                f"predictions: {name} must be float {list(want)} to match the trace, "
                f"got {array.dtype} {list(array.shape)}"
            )
        if array is not None and not np.isfinite(array).all():
            # NaN ranks anywhere in a sort: prefetches and evictions would be arbitrary.
            raise TraceError(f"{path}: {name} must be finite, found NaN or inf")
    return scores, reuse


def _next_uses(trace: Trace, steps: list[np.ndarray]) -> list[list[dict[int, int]]]:
    """For each step and layer: expert -> tick of its next use after this one (-1: never)."""
    layers = trace.num_layers
    upcoming: dict[tuple[int, int], int] = {}
    result: list[list[dict[int, int]]] = [[] for _ in steps]
    for s in range(len(steps) - 1, -1, -1):
        per_layer = []
        for layer in range(layers):
            experts = layer_experts(trace, steps[s], layer)
            per_layer.append({e: upcoming.get((layer, e), -1) for e in experts})
        for layer, experts in enumerate(per_layer):
            for e in experts:
                upcoming[(layer, e)] = s * layers + layer
        result[s] = per_layer
    return result


def _prefetch_plan(
    cache,
    link: Link | None,
    scores: np.ndarray,
    tokens: np.ndarray,
    top_k: int,
    now: float,
    prefetch: bool = True,
    min_score: float = 0.0,
    reuse: np.ndarray | None = None,
) -> None:
    """Scores every layer (max over the step's tokens; with ``reuse``, its scores take over
    at each layer's release), then (with ``prefetch``) prefetches the predicted experts, each
    token's top-k per layer scored at least ``min_score``, best first, in layer order."""
    step_scores = scores[tokens].max(axis=0)  # [L, E]
    step_reuse = None if reuse is None else reuse[tokens].max(axis=0)
    for layer in range(step_scores.shape[0]):
        after = None if step_reuse is None else step_reuse[layer].tolist()
        cache.set_scores(layer, step_scores[layer].tolist(), after)
    if prefetch:
        for layer in range(step_scores.shape[0]):
            _prefetch_top_k(
                cache, link, scores[tokens, layer], step_scores[layer], top_k, layer, now, min_score
            )


def _prefetch_layer(
    cache, link: Link | None, scores: np.ndarray, tokens: np.ndarray, layer: int, top_k: int,
    now: float, prefetch: bool = True,
) -> None:  # fmt: skip
    """Gate lookahead for one layer: its scores (max over the step's tokens), then (with
    ``prefetch``) each token's top-k experts prefetched, best first."""
    layer_scores = scores[tokens, layer].max(axis=0)  # [E]
    cache.set_scores(layer, layer_scores.tolist())
    if prefetch:
        _prefetch_top_k(cache, link, scores[tokens, layer], layer_scores, top_k, layer, now)


def _prefetch_top_k(
    cache, link, token_scores, layer_scores, top_k, layer, now, min_score=0.0
) -> None:
    """Prefetches each token's ``top_k`` experts of one layer (``token_scores`` ``[tokens, E]``)
    that it scores at least ``min_score``, the best ``layer_scores`` first."""
    wanted = np.argsort(-token_scores, axis=-1, kind="stable")[:, :top_k]
    sure = np.take_along_axis(token_scores, wanted, axis=-1) >= min_score
    for expert in sorted(set(wanted[sure].tolist()), key=lambda e: -layer_scores[e]):
        load = cache.prefetch(layer, expert)
        if load is not None:
            if link is not None:
                link.prefetch(load[0], now)
            cache.loaded(load[0])  # the policy may reuse it; the link model has its timing


def replay(
    trace: Trace,
    policy: str,
    *,
    slots_per_layer: int | None = None,
    slots: int | None = None,
    predictions: np.ndarray | None = None,
    bandwidth_gbps: float | None = None,
    layer_compute_ms: float | None = None,
    prefetch: bool = True,
    lookahead: np.ndarray | None = None,
    prefetch_threshold: float | None = None,
    score_weight: float | None = None,
    reuse: np.ndarray | None = None,
    expert_bytes: int | None = None,
    cpu_gbps: float | None = None,
    cpu_gflops: float | None = None,
    cpu_experts: str | None = None,
    spell: Spell = str,
) -> ReplayResult:
    """Replays ``trace`` through the native policy; see the module docstring.

    Options a policy would not read, budgets no layer could run in, and a half-given or
    non-finite timing model are refused (ValueError naming the argument), never ignored: see
    :func:`~expertflow.traces.replay_options.check_options`. A budget above every expert is
    cut to it, with ``result.note`` saying so.

    Args:
        trace: the routing trace.
        policy: one of :data:`expertflow.runtime.policies.POLICIES` (``lru``, ``lfu``, ...).
        slots_per_layer: a per-layer budget, at least top_k (exactly one of this and
            ``slots``); more than num_experts is replayed as num_experts (``result.note``).
        slots: one global pool of this many slots shared by all layers; more than
            num_layers x num_experts is replayed as that (``result.note``).
        predictions: ``[T, L, E]`` predicted probabilities (``expertflow`` only).
        bandwidth_gbps: host-to-device copy bandwidth, GB/s (timing model, with the next).
        layer_compute_ms: compute time of one layer step (timing model).
        prefetch: copy the predicted experts ahead; without, predictions (and lookahead
            scores) only rank evictions (every copy is then a miss's, and no byte is spent on
            a wrong guess).
        lookahead: ``[T, L, E]`` gate-lookahead scores (``expertflow`` only): layer l's are
            applied when layer l-1 starts (layer 0 has none).
        prefetch_threshold: prefetch only predictions scored at least this (as
            ``offload(..., prefetch_threshold=)``); the others still rank evictions. Needs
            ``predictions``; None: 0, every prediction in a token's top-k.
        score_weight: ``expertflow``'s weight of a predicted score against the decayed request
            count (csrc/core/cache_policy.h; None: the native default). A huge weight evicts by
            next-step scores alone, as the ExpertFlow paper's PLEC does.
        reuse: ``[T, L, E]`` reuse scores (``expertflow`` with ``predictions``): each layer's
            eviction scores from its release on, see the module docstring.
        expert_bytes: the size of every expert, in bytes, in place of the trace's
            ``meta["expert_bytes"]`` (the size it was recorded at): e.g. an expert's packed size
            in a quantized format. Bytes moved and the timing model's copy time follow it; the
            routing, and so hits and misses, do not change. None: the trace's size.
        cpu_gbps: the host CPU's rate computing an expert, GB/s of its weight bytes (timing
            model; see the module docstring). None: no CPU experts.
        cpu_gflops: the CPU's GFLOP/s for the token term (needs ``cpu_gbps``). None: no token
            term (an expert costs its bytes at ``cpu_gbps`` whatever its tokens).
        cpu_experts: ``"never"``, ``"always"`` or ``"auto"`` (the default with ``cpu_gbps``).
        spell: how error messages name an argument (the command line: its option,
            :func:`~expertflow.traces.replay_options.option_spelling`).
    """
    check_options(
        trace, policy, slots_per_layer=slots_per_layer, slots=slots, predictions=predictions,
        lookahead=lookahead, reuse=reuse, prefetch=prefetch,
        prefetch_threshold=prefetch_threshold, score_weight=score_weight,
        bandwidth_gbps=bandwidth_gbps, layer_compute_ms=layer_compute_ms,
        expert_bytes=expert_bytes, cpu_gbps=cpu_gbps, cpu_gflops=cpu_gflops,
        cpu_experts=cpu_experts, spell=spell,
    )  # fmt: skip
    _check_shapes(trace, predictions=predictions, lookahead=lookahead, reuse=reuse)
    requested = slots_per_layer * trace.num_layers if slots_per_layer is not None else slots
    slots_per_layer, slots, note = clamp_budget(trace, slots_per_layer, slots, spell)
    run = ReplayRun(trace, policy, slots_per_layer, slots, score_weight, spell)
    if expert_bytes is not None:
        run.expert_bytes = int(expert_bytes)
    if bandwidth_gbps is not None:
        run.link = Link(run.expert_bytes / (bandwidth_gbps * 1e9))
        run.compute_s = layer_compute_ms / 1e3
    if cpu_gbps is not None:
        run.use_cpu(bandwidth_gbps, cpu_gbps, cpu_gflops, cpu_experts or "auto", reuse)
    steps = trace.steps()
    next_uses = _next_uses(trace, steps) if policy == "belady" else None
    threshold = prefetch_threshold or 0.0
    for s, tokens in enumerate(steps):
        if predictions is not None:
            _prefetch_plan(
                run.cache, run.link, predictions, tokens, trace.top_k, run.now, prefetch,
                threshold, reuse,
            )  # fmt: skip
        for layer in range(trace.num_layers):
            if lookahead is not None and layer + 1 < trace.num_layers:
                _prefetch_layer(
                    run.cache, run.link, lookahead, tokens, layer + 1, trace.top_k, run.now,
                    prefetch,
                )  # fmt: skip
            if not run.run_layer(steps, s, layer):
                continue
            if next_uses is not None:
                for expert, tick in next_uses[s][layer].items():
                    run.cache.set_next_use(layer, expert, tick)
            run.cache.release(layer)
    result = run.result(len(steps))
    result.slots_requested, result.note = requested, note
    return result


def _check_shapes(trace: Trace, **scores: np.ndarray | None) -> None:
    want = (trace.num_tokens, trace.num_layers, trace.num_experts)
    for name, value in scores.items():
        if value is not None and np.shape(value) != want:
            raise ValueError(
                f"{name} must be [T, L, E] = {list(want)} to match the trace, got "
                f"{list(np.shape(value))}"
            )
