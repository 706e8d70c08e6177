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

import dataclasses
import math
import sys
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
from expertflow.traces.timing import Cpu, Link

__all__ = ["PREDICTION_POLICIES", "ReplayResult", "check_options", "load_predictions", "replay"]


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
    cpu_experts: int | None = None  # misses computed on the CPU (CPU model only)
    time_per_step_ms: float | None = None  # a step runs a prompt or one token per sequence
    stall_share: float | None = None
    slots_requested: int | None = None  # the budget asked for, as ``slots`` counts it
    note: str | None = None  # set when the budget was cut to what can ever be used
    expert_bytes: int | None = None  # one expert's copy size the bytes and times count
    trace_expert_bytes: int | None = None  # the trace's own (meta.expert_bytes)

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes_moved / self.tokens if self.tokens else None

    @property
    def bytes_per_step(self) -> float | None:
        return self.bytes_moved / self.steps if self.steps else None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "hit_ratio": self.hit_ratio,
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_step": self.bytes_per_step,
        }


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
    run = _Run(trace, policy, slots_per_layer, slots, score_weight, spell)
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


class _Run:
    """One replay's state: the native policy, the copy link (timing model, if any), the clock."""

    def __init__(self, trace: Trace, policy, slots_per_layer, slots, score_weight, spell: Spell):
        from expertflow import _C

        self.trace = trace
        self.spell = spell
        self.budget = "per_layer" if slots_per_layer is not None else "global"
        self.slots = slots_per_layer * trace.num_layers if slots_per_layer is not None else slots
        self.cache = _C.CachePolicy(
            trace.num_layers,
            trace.num_experts,
            self.slots,
            trace.top_k,
            budget=self.budget,
            policy=policy,
            score_weight=score_weight,
        )
        self.policy = policy
        self.expert_bytes = int(trace.meta["expert_bytes"])  # one copy's size
        self.link: Link | None = None
        self.compute_s = 0.0
        self.now = self.stalled = 0.0
        self.cpu: Cpu | None = None
        self.cpu_mode = "never"
        self.hybrid = None
        self.reuse: np.ndarray | None = None
        self.cpu_experts = 0
        self.cpu_late_hits = 0  # hits on a copy still on its way, computed on the CPU
        self.full_pools: set[int] = set()  # "always": pools found full (they stay full)

    def use_cpu(self, link_gbps, cpu_gbps, cpu_gflops, mode: str, reuse) -> None:
        """Models the host CPU computing misses (see the module docstring)."""
        from expertflow import _C

        # No token term without cpu_gflops: the largest finite rate makes it 0.
        gflops = sys.float_info.max if cpu_gflops is None else float(cpu_gflops)
        self.hybrid = _C.HybridPolicy(float(link_gbps), float(cpu_gbps), gflops)
        self.cpu = Cpu()
        self.cpu_mode = mode
        self.reuse = reuse

    def _place_misses(self, tokens: np.ndarray, layer: int, experts: list[int]):
        """``(to_acquire, cpu_ready, late)``: the experts to take from the cache (hits and the
        misses to copy), when the CPU's share of the layer is done (-inf: none), and the hits
        whose copy is still on its way that the CPU computes instead (their copy goes on)."""
        if self.cpu_mode == "never":
            return experts, -math.inf, set()
        ids = self.trace.expert_ids[tokens, layer, :]
        keep, cpu_ready, hits = [], -math.inf, []
        link_queue = self.link.backlog(self.now)  # the copies decided here go after it
        urgent_s = 0.0
        copies = 0
        resident = {e for e in experts if self.cache.slot_of(layer, e) >= 0}
        # Copies the pool can take next to the pinned hits: past that a miss must run on the CPU
        # (a prompt can need more experts than the pool holds).
        room = self.cache.pool_size(layer) - len(resident)
        for e in experts:
            if e in resident:
                keep.append(e)  # a hit: resident or on its way
                hits.append(e)
                continue
            if self.cpu_mode == "always" and self._pool_has_room(layer, copies):
                keep.append(e)  # filling a free slot evicts nothing: Fiddler's placement
                copies += 1
                continue
            routed = ids == e
            reuse = 0.0
            if self.reuse is not None:
                reuse = float(np.clip(self.reuse[tokens, layer, e].max(), 0.0, 1.0))
            where, copy_ms, cpu_ms = self.hybrid.decide(
                int(routed.any(axis=-1).sum()), self.expert_bytes, self.expert_bytes // 2,
                reuse, link_queue * 1e3, self.cpu.backlog(self.now) * 1e3,
            )  # fmt: skip
            if self.cpu_mode == "always" or where == "cpu" or copies >= room:
                cpu_ready = max(cpu_ready, self.cpu.compute(cpu_ms / 1e3, self.now))
                self.cpu_experts += 1
            else:
                keep.append(e)
                copies += 1
                link_queue += copy_ms / 1e3
                urgent_s += copy_ms / 1e3
        late = set()
        if self.cpu_mode == "auto":
            for e in hits:
                arrival = self.link.expected_arrival(
                    self.cache.slot_of(layer, e), self.now, urgent_s
                )
                if arrival <= self.now:
                    continue
                _, _, cpu_ms = self.hybrid.decide(
                    int((ids == e).any(axis=-1).sum()), self.expert_bytes,
                    self.expert_bytes // 2, 0.0, 0.0, self.cpu.backlog(self.now) * 1e3,
                )  # fmt: skip
                if self.now + self.cpu.backlog(self.now) + cpu_ms / 1e3 < arrival:
                    cpu_ready = max(cpu_ready, self.cpu.compute(cpu_ms / 1e3, self.now))
                    self.cpu_late_hits += 1
                    late.add(e)
        return keep, cpu_ready, late

    def _pool_has_room(self, layer: int, pending: int) -> bool:
        """Whether ``layer``'s pool still has a free slot after ``pending`` copies. Only
        "always" asks: it copies only into free slots, so a pool once full stays full."""
        pool = layer if self.budget == "per_layer" else -1
        if pool in self.full_pools:
            return False
        trace = self.trace
        layers = [layer] if pool >= 0 else range(trace.num_layers)
        used = sum(
            self.cache.slot_of(lay, e) >= 0 for lay in layers for e in range(trace.num_experts)
        )
        if used + pending < self.cache.pool_size(layer):
            return True
        self.full_pools.add(pool)
        return False

    def run_layer(self, steps: list[np.ndarray], s: int, layer: int) -> bool:
        """Acquires step ``s``'s experts of ``layer``, loads the misses and (timing model)
        waits for every copy, then computes. False when the step routes nothing there."""
        experts = _layer_experts(self.trace, steps[s], layer)
        if not experts:
            return False
        wanted = len(experts)
        experts, cpu_ready, late = self._place_misses(steps[s], layer, experts)
        try:
            got, loads = self.cache.acquire(layer, experts)
        except ValueError as exc:
            raise ValueError(self._pool_too_small(steps, s, layer, wanted, exc)) from exc
        for slot, *_ in loads:
            if self.link is not None:
                self.link.urgent(slot, self.now)
            self.cache.loaded(slot)
        if self.link is not None:
            waits = [slot for e, slot in zip(experts, got, strict=True) if e not in late]
            ready = max([self.now, cpu_ready] + [self.link.arrival(slot) for slot in waits])
            self.stalled += ready - self.now
            self.now = ready + self.compute_s
        return True

    def _pool_too_small(self, steps, s: int, layer: int, wanted: int, exc: Exception) -> str:
        """The refusal, with the budget that the whole trace needs (one pass, on failure only)."""
        trace, spell = self.trace, self.spell
        need = max(
            len(_layer_experts(trace, tokens, lay))
            for tokens in steps
            for lay in range(trace.num_layers)
        )
        message = (
            f"step {s} needs {wanted} experts of layer {layer} at once ({exc}). A step runs a "
            "prompt's tokens, or one token of each sequence of a batched trace, together: "
            f"this trace needs up to {need} of one layer's {trace.num_experts} experts at once"
        )
        if self.budget == "global":
            return f"{message}; give {spell('slots')} >= {need}"
        everything = " (every expert: nothing left to cache)" if need == trace.num_experts else ""
        return (
            f"{message}, so a per-layer budget needs {spell('slots_per_layer')} >= {need}"
            f"{everything}; one pool shared by all layers ({spell('slots')}) needs only "
            f"{spell('slots')} >= {need}"
        )

    def result(self, steps: int) -> ReplayResult:
        stats = self.cache.stats()
        tokens = self.trace.num_tokens
        result = ReplayResult(
            policy=self.policy,
            slots=self.slots,
            budget=self.budget,
            steps=steps,
            tokens=tokens,
            hits=stats["hits"],
            misses=stats["misses"] + self.cpu_experts,
            prefetches=stats["prefetches"],
            prefetch_hits=stats["prefetch_hits"],
            wasted_prefetches=stats["wasted_prefetches"],
            bytes_moved=stats["loads"] * self.expert_bytes,
            expert_bytes=self.expert_bytes,
            trace_expert_bytes=int(self.trace.meta["expert_bytes"]),
        )
        if self.link is not None and tokens:
            result.time_per_token_ms = self.now / tokens * 1e3
            if self.cpu is not None:
                result.cpu_experts = self.cpu_experts + self.cpu_late_hits
            result.time_per_step_ms = self.now / steps * 1e3
            result.stall_share = self.stalled / self.now if self.now > 0 else 0.0
        return result
