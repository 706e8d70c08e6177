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
that bandwidth moves one expert at a time; prefetches queue on it in issue order, and an urgent
load (a miss) goes ahead of every prefetch that has not started yet. A layer starts when the
previous one has finished and all of its experts have arrived, and then computes for
``layer_compute_ms``. Stalled time is the time layers spend waiting for copies."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from expertflow.traces.format import Trace, TraceError

__all__ = ["ReplayResult", "replay", "load_predictions"]

POLICIES = ("lru", "lfu", "lrfu", "expertflow", "belady")


@dataclasses.dataclass
class ReplayResult:
    policy: str
    slots: int
    budget: str
    steps: int
    tokens: int
    hits: int
    misses: int
    prefetches: int
    prefetch_hits: int
    wasted_prefetches: int
    bytes_moved: int
    time_per_token_ms: float | None = None
    stall_share: float | None = None

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"hit_ratio": self.hit_ratio}


def load_predictions(path, trace: Trace) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads predicted routing probabilities: ``scores`` float ``[T, L, E]`` in an ``.npz``,
    and the reuse scores ``reuse`` (same shape) if it holds them, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            scores = data["scores"]
            reuse = data["reuse"] if "reuse" in data.files else None
    except (OSError, KeyError, ValueError) as exc:
        raise TraceError(f"{path}: needs a float array 'scores' [T, L, E] ({exc})") from exc
    want = (trace.num_tokens, trace.num_layers, trace.num_experts)
    for name, array in (("scores", scores), ("reuse", reuse)):
        if array is not None and (
            array.shape != want or not np.issubdtype(array.dtype, np.floating)
        ):
            raise TraceError(
                f"predictions: {name} must be float {list(want)} to match the trace, "
                f"got {array.dtype} {list(array.shape)}"
            )
    return scores, reuse


class _Link:
    """One copy link: queued prefetches in order, urgent copies ahead of unstarted ones."""

    def __init__(self, seconds_per_copy: float):
        self.seconds_per_copy = seconds_per_copy
        self.busy_until = 0.0
        self.queue: collections.deque[tuple[int, float]] = collections.deque()
        self.done: dict[int, float] = {}  # slot -> arrival time of its latest copy

    def _start_next(self) -> None:
        slot, issued = self.queue.popleft()
        self.busy_until = max(self.busy_until, issued) + self.seconds_per_copy
        self.done[slot] = self.busy_until

    def prefetch(self, slot: int, now: float) -> None:
        self.done.pop(slot, None)
        self.queue.append((slot, now))

    def urgent(self, slot: int, now: float) -> None:
        while self.queue and max(self.busy_until, self.queue[0][1]) < now:
            self._start_next()  # prefetches already under way when the miss is found
        self.busy_until = max(self.busy_until, now) + self.seconds_per_copy
        self.done[slot] = self.busy_until

    def arrival(self, slot: int) -> float:
        while slot not in self.done and self.queue:
            self._start_next()
        return self.done.get(slot, 0.0)


def _next_uses(trace: Trace, steps: list[np.ndarray]) -> list[list[dict[int, int]]]:
    """For each step and layer: expert -> tick of its next use after this one (-1: never)."""
    layers = trace.num_layers
    upcoming: dict[tuple[int, int], int] = {}
    result: list[list[dict[int, int]]] = [[] for _ in steps]
    for s in range(len(steps) - 1, -1, -1):
        per_layer = []
        for layer in range(layers):
            experts = _layer_experts(trace, steps[s], layer)
            per_layer.append({e: upcoming.get((layer, e), -1) for e in experts})
        for layer, experts in enumerate(per_layer):
            for e in experts:
                upcoming[(layer, e)] = s * layers + layer
        result[s] = per_layer
    return result


def _layer_experts(trace: Trace, tokens: np.ndarray, layer: int) -> list[int]:
    ids = trace.expert_ids[tokens, layer, :].ravel()
    return sorted(set(ids[ids >= 0].tolist()))


def _prefetch_plan(
    cache,
    link: _Link | None,
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
    cache, link: _Link | None, scores: np.ndarray, tokens: np.ndarray, layer: int, top_k: int,
    now: float,
) -> None:  # fmt: skip
    """Gate lookahead for one layer: its scores (max over the step's tokens), then each token's
    top-k experts prefetched, best first."""
    layer_scores = scores[tokens, layer].max(axis=0)  # [E]
    cache.set_scores(layer, layer_scores.tolist())
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
    prefetch_threshold: float = 0.0,
    score_weight: float | None = None,
    reuse: np.ndarray | None = None,
) -> ReplayResult:
    """Replays ``trace`` through the native policy; see the module docstring.

    Args:
        trace: the routing trace.
        policy: one of ``lru``, ``lfu``, ``expertflow``, ``belady``.
        slots_per_layer: a per-layer budget (exactly one of this and ``slots``).
        slots: one global pool of this many slots shared by all layers.
        predictions: ``[T, L, E]`` predicted probabilities (used by ``expertflow``).
        bandwidth_gbps: host-to-device copy bandwidth, GB/s (timing model, with the next).
        layer_compute_ms: compute time of one layer step (timing model).
        prefetch: copy the predicted experts ahead; without, predictions only rank evictions
            (every copy is then a miss's, and no byte is spent on a wrong guess).
        lookahead: ``[T, L, E]`` gate-lookahead scores (used by ``expertflow``): layer l's are
            applied when layer l-1 starts (layer 0 has none).
        prefetch_threshold: prefetch only predictions scored at least this (as
            ``offload(..., prefetch_threshold=)``); the others still rank evictions.
        score_weight: ``expertflow``'s weight of a predicted score against the decayed request
            count (csrc/core/cache_policy.h; None: the native default). A huge weight evicts by
            next-step scores alone, as the ExpertFlow paper's PLEC does.
        reuse: ``[T, L, E]`` reuse scores (used by ``expertflow`` with ``predictions``): each
            layer's eviction scores from its release on, see the module docstring.
    """
    from expertflow import _C

    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if (slots_per_layer is None) == (slots is None):
        raise ValueError("give exactly one of slots_per_layer and slots")
    if (bandwidth_gbps is None) != (layer_compute_ms is None):
        raise ValueError("the timing model needs both bandwidth_gbps and layer_compute_ms")
    if bandwidth_gbps is not None and (bandwidth_gbps <= 0 or layer_compute_ms < 0):
        raise ValueError("bandwidth_gbps must be > 0 and layer_compute_ms >= 0")
    if not (np.isfinite(prefetch_threshold) and prefetch_threshold >= 0):
        raise ValueError(
            f"prefetch_threshold must be a finite number >= 0, got {prefetch_threshold}"
        )
    want = (trace.num_tokens, trace.num_layers, trace.num_experts)
    if reuse is not None and predictions is None:
        raise ValueError("reuse scores come with predictions: give predictions too")
    for name, scores in (
        ("predictions", predictions),
        ("lookahead", lookahead),
        ("reuse", reuse),
    ):
        if scores is not None and np.shape(scores) != want:
            raise ValueError(
                f"{name} must be [T, L, E] = {list(want)} to match the trace, got "
                f"{list(np.shape(scores))}"
            )
    budget = "per_layer" if slots_per_layer is not None else "global"
    total = slots_per_layer * trace.num_layers if slots_per_layer is not None else slots
    cache = _C.CachePolicy(
        trace.num_layers,
        trace.num_experts,
        total,
        trace.top_k,
        budget=budget,
        policy=policy,
        score_weight=score_weight,
    )
    steps = trace.steps()
    next_uses = _next_uses(trace, steps) if policy == "belady" else None
    expert_bytes = trace.meta["expert_bytes"]
    link = None
    if bandwidth_gbps is not None:
        link = _Link(expert_bytes / (bandwidth_gbps * 1e9))
        compute = layer_compute_ms / 1e3
    now = stalled = 0.0

    for s, tokens in enumerate(steps):
        if predictions is not None and policy == "expertflow":
            _prefetch_plan(
                cache,
                link,
                predictions,
                tokens,
                trace.top_k,
                now,
                prefetch,
                prefetch_threshold,
                reuse,
            )
        for layer in range(trace.num_layers):
            if lookahead is not None and policy == "expertflow" and layer + 1 < trace.num_layers:
                _prefetch_layer(cache, link, lookahead, tokens, layer + 1, trace.top_k, now)
            experts = _layer_experts(trace, tokens, layer)
            if not experts:
                continue
            try:
                got, loads = cache.acquire(layer, experts)
            except ValueError as exc:
                raise ValueError(
                    f"step {s} needs {len(experts)} experts at layer {layer} at once: {exc}"
                ) from exc
            for slot, *_ in loads:
                if link is not None:
                    link.urgent(slot, now)
                cache.loaded(slot)
            if link is not None:
                ready = max([now] + [link.arrival(slot) for slot in got])
                stalled += ready - now
                now = ready + compute
            if next_uses is not None:
                for expert, tick in next_uses[s][layer].items():
                    cache.set_next_use(layer, expert, tick)
            cache.release(layer)

    stats = cache.stats()
    result = ReplayResult(
        policy=policy,
        slots=total,
        budget=budget,
        steps=len(steps),
        tokens=trace.num_tokens,
        hits=stats["hits"],
        misses=stats["misses"],
        prefetches=stats["prefetches"],
        prefetch_hits=stats["prefetch_hits"],
        wasted_prefetches=stats["wasted_prefetches"],
        bytes_moved=stats["loads"] * expert_bytes,
    )
    if link is not None and trace.num_tokens:
        result.time_per_token_ms = now / trace.num_tokens * 1e3
        result.stall_share = stalled / now if now > 0 else 0.0
    return result
