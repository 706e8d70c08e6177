"""``expertflow.ExpertCache``: routed experts in host memory, a budget of them in device slots.

The native cache (``csrc/runtime``) packs every expert into one pinned host buffer, allocates the
slots in one device allocation, decides with the core policy which expert occupies which slot,
and copies on a prefetch stream and an urgent stream with one completion event per slot. This
module is its thin, validated Python face.

Typical use inside an MoE layer::

    cache.plan(predicted_scores, per_layer=top_k)      # once per step, before layer 0
    slots, order = cache.acquire(layer, expert_ids)    # the experts this layer's router chose
    for i in order:                                    # arrived first, misses last
        cache.wait(slots[i])
        w1, w2 = cache.views(slots[i], layer)          # device tensors, no copy
        ...
    cache.release(layer)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from expertflow.runtime.policies import BUDGETS, POLICIES

__all__ = ["ExpertCache"]

_INT32 = 2**31


def _as_int(value, what: str, expected: str) -> int:
    """``value`` as a Python int: a float or bool is refused (the conversion would truncate it
    or read it as 1 silently), naming ``what`` and what was ``expected``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        text = repr(value)[:60]
        raise ValueError(f"{what} must be {expected}, got {type(value).__name__} {text}") from None


def _int_arg(value, what: str, valid: str) -> int:
    """``value`` as a Python int for a native call, which takes int32 and checks the range
    itself. Refused here: what :func:`_as_int` refuses, and a value outside int32 (pybind11's
    TypeError would print every argument)."""
    number = _as_int(value, what, f"an int {valid}")
    if not -_INT32 <= number < _INT32:
        raise IndexError(f"{what} must be {valid}, got {number}")
    return number


class ExpertCache:
    """A device-slot cache over a host store of experts.

    Args:
        experts: ``experts[layer][expert]`` is the list of that expert's tensors (for example
            ``[gate_up_proj, down_proj]``); all experts of a layer must share shapes and dtypes.
            Their bytes are copied into the store, so the caller may drop them afterwards.
            Meta tensors give only the layout; their bytes are then written by the caller
            through :meth:`host_expert` before the expert is first acquired.
        device: ``"cpu"`` (a worker-thread copy engine with the same semantics) or a CUDA device.
        slots: total number of device slots (each the size of the largest expert); at most
            one per expert is made (``num_slots`` is then ``num_layers x num_experts``).
        top_k: experts per token and layer: the least a pool must hold.
        budget: ``"per_layer"`` (``slots // num_layers`` reserved per layer) or ``"global"``.
        policy: ``"lru"``, ``"lfu"`` (fewest requests since the expert was last loaded: its
            count restarts at every load), ``"lfu_history"`` (fewest requests over the whole
            run, kept while the expert is evicted: classic LFU), ``"lrfu"`` (lowest decayed
            request count: each request adds 1, halving in weight about every 70 tokens),
            ``"expertflow"`` (unused prefetches first, then the lowest 4 x predicted score +
            log(decayed request count)) or ``"belady"``. Ties go to the least recently used.
    """

    def __init__(
        self,
        experts: Sequence[Sequence[Sequence[torch.Tensor]]],
        *,
        device: str | torch.device = "cpu",
        slots: int,
        top_k: int,
        budget: str = "per_layer",
        policy: str = "expertflow",
    ):
        from expertflow import _C

        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        nested = [[list(tensors) for tensors in layer] for layer in experts]
        for li, layer in enumerate(nested):
            for e, tensors in enumerate(layer):
                for i, t in enumerate(tensors):
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(
                            f"experts[{li}][{e}][{i}] must be a torch.Tensor, "
                            f"got {type(t).__name__}"
                        )
        self.device = device
        self._planned_reuse: torch.Tensor | None = None  # the last plan's reuse scores
        self._num_layers = len(nested)
        self._num_experts = max((len(layer) for layer in nested), default=0)
        top_k = _int_arg(top_k, "ExpertCache: top_k", f"in [1, {self._num_experts}]")
        self._native = _C.ExpertCache(
            nested, str(device), self._capped_slots(slots), top_k, budget=budget, policy=policy
        )

    def _capped_slots(self, slots) -> int:
        """``slots``, at most one per expert: per layer a pool never needs more than the
        layer's experts, globally more than all of them, so more would be device memory that
        is never used (a byte budget far above the experts' size asks for that)."""
        slots = _as_int(slots, "ExpertCache: slots", "a positive int")
        if slots < 1:
            raise ValueError(f"ExpertCache: slots must be a positive int, got {slots}")
        needed = self._num_layers * self._num_experts
        return min(slots, needed) if needed > 0 else min(slots, _INT32 - 1)

    def _layer(self, method: str, layer) -> int:
        return _int_arg(layer, f"ExpertCache.{method}: layer", f"in [0, {self._num_layers})")

    def _expert(self, method: str, expert) -> int:
        return _int_arg(expert, f"ExpertCache.{method}: expert", f"in [0, {self._num_experts})")

    def _slot(self, method: str, slot) -> int:
        return _int_arg(slot, f"ExpertCache.{method}: slot", f"in [0, {self.num_slots})")

    @staticmethod
    def _in_range(index: int, size: int, what: str) -> int:
        # For methods answered here, not by the native cache (which checks ranges itself).
        if not 0 <= index < size:
            raise IndexError(f"ExpertCache.{what} must be in [0, {size}), got {index}")
        return index

    def _layer_experts(self, method: str, layer, experts) -> tuple[int, list[int]]:
        # Plain ints in range pass without building a message (acquire runs once per layer).
        ids = [
            e if type(e) is int and -_INT32 <= e < _INT32 else self._expert(method, e)
            for e in experts
        ]
        return self._layer(method, layer), ids

    @property
    def num_slots(self) -> int:
        return self._native.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._native.slot_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of the host store (every expert of every layer)."""
        return self._native.host_bytes

    @property
    def host_pinned(self) -> bool:
        return self._native.host_pinned

    def __repr__(self) -> str:
        return (
            f"ExpertCache(device={self.device}, slots={self.num_slots}, "
            f"slot_bytes={self.slot_bytes}, host_bytes={self.host_bytes})"
        )

    def plan(
        self,
        layer_scores: torch.Tensor,
        per_layer: int,
        first_layer: int = 0,
        min_score: float = 0.0,
        reuse_scores: torch.Tensor | None = None,
    ) -> None:
        """Prefetches predicted experts, layer by layer.

        Args:
            layer_scores: float ``[num_layers, num_experts]`` predicted demand (higher = more
                likely needed soon); becomes the policy's eviction scores.
            per_layer: how many of each layer's best positive-score experts to prefetch.
            first_layer: prefetch from this layer on (a plan made while the step already
                runs skips the layers it is too late for); every layer's scores are set.
            min_score: prefetch only experts scored at least this (a confidence threshold:
                fewer wasted copies); lower-scored ones still rank evictions.
            reuse_scores: float ``[num_layers, num_experts]``, a reuse head's predicted demand
                after this step (:meth:`~expertflow.prediction.Predictor.predict_step_with_reuse`):
                each layer's eviction scores once the layer has run this step.
        """
        per_layer = _int_arg(per_layer, "ExpertCache.plan: per_layer", "in [0, 2**31)")
        first_layer = _int_arg(
            first_layer, "ExpertCache.plan: first_layer", f"in [0, {self._num_layers}]"
        )
        self._native.plan(layer_scores, per_layer, first_layer, float(min_score), reuse_scores)
        # Kept for cpu_experts="auto": a miss likely needed again is worth a copy (its slot).
        self._planned_reuse = None if reuse_scores is None else reuse_scores.detach().float().cpu()

    def planned_reuse(self, layer: int, experts: Sequence[int]) -> list[float]:
        """The last :meth:`plan`'s reuse scores of these experts of one layer, clipped to
        [0, 1]; zeros when the last plan had none (or there was no plan)."""
        layer = self._in_range(
            self._layer("planned_reuse", layer), self._num_layers, "planned_reuse: layer"
        )
        experts = [
            self._in_range(
                self._expert("planned_reuse", e), self._num_experts, "planned_reuse: expert"
            )
            for e in experts
        ]
        if self._planned_reuse is None:
            return [0.0] * len(experts)
        return self._planned_reuse[layer, experts].clamp(0.0, 1.0).tolist()

    def prefetch(
        self, layer: int, experts: Sequence[int], scores: torch.Tensor | None = None
    ) -> int:
        """Starts copying these experts of one layer (those not already resident or in flight)
        on the prefetch stream. ``scores`` (float ``[num_experts]``), if given, first become the
        layer's eviction scores. Returns the copies issued. Used by gate lookahead: the next
        layer's router applied one layer early."""
        return self._native.prefetch(*self._layer_experts("prefetch", layer, experts), scores)

    def acquire(self, layer: int, experts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Pins the experts one layer needs, issuing urgent copies for the misses.

        Returns:
            ``(slots, order)``: the slot of each requested expert, and the request positions
            in the order they become ready (arrived hits, hits in flight, then misses).
        """
        return self._native.acquire(*self._layer_experts("acquire", layer, experts))

    def cached(self, layer: int, experts: Sequence[int]) -> list[bool]:
        """Whether each expert is held (resident or on its way), pinning and copying nothing:
        a hint for where a miss runs (``cpu_experts="auto"``); a concurrent prefetch may evict
        an expert before ``acquire`` pins it, which then copies it again."""
        return self._native.cached(*self._layer_experts("cached", layer, experts))

    def copies_ahead(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Where each expert's copy is, pinning and copying nothing: -1 not held, 0 held and
        arrived, n >= 1 on its way as the n-th of the copies now in flight (issue order)."""
        return self._native.copies_ahead(*self._layer_experts("copies_ahead", layer, experts))

    def wait(self, slot: int) -> None:
        """Makes compute wait for the slot's bytes (CUDA: the current stream waits on its
        event; CPU: blocks, without the GIL)."""
        self._native.wait(self._slot("wait", slot))

    def views(self, slot: int, layer: int) -> list[torch.Tensor]:
        """The expert in ``slot`` as tensors viewing the slot memory (no copy)."""
        return self._native.views(self._slot("views", slot), self._layer("views", layer))

    def release(self, layer: int) -> None:
        """Unpins the layer's experts; later copies into their slots wait for compute's uses."""
        self._native.release(self._layer("release", layer))

    def synchronize(self) -> None:
        """Blocks until every issued copy has arrived."""
        self._native.synchronize()

    def host_expert(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The expert's tensors in the host store (views, the source of truth)."""
        layer = self._layer("host_expert", layer)
        return self._native.host_expert(layer, self._expert("host_expert", expert))

    def stats(self) -> dict:
        """hits, misses, prefetch_hits, prefetches, wasted_prefetches, evictions, bytes_copied,
        wait_seconds (host time blocked in wait, or in an acquire whose pool was full of copies
        in flight; on CUDA wait() blocks the stream, not the host), late_waits (waits whose copy
        had not arrived: compute stalled), full_pool_waits (copies an acquire let land first)."""
        return self._native.stats()
