"""One replay's state (:class:`ReplayRun`: the native policy, the copy link and the CPU of the
timing model, the clock) and its result (:class:`ReplayResult`); the stepping and the options
are :func:`expertflow.traces.replay.replay`'s."""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from expertflow.traces.format import Trace
from expertflow.traces.replay_options import Spell
from expertflow.traces.timing import Cpu, Link

__all__ = ["ReplayResult", "ReplayRun", "layer_experts"]


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


def layer_experts(trace: Trace, tokens: np.ndarray, layer: int) -> list[int]:
    ids = trace.expert_ids[tokens, layer, :].ravel()
    return sorted(set(ids[ids >= 0].tolist()))


class ReplayRun:
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
        experts = layer_experts(self.trace, steps[s], layer)
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
            len(layer_experts(trace, tokens, lay))
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
