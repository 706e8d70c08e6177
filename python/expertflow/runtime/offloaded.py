"""The experts module an offloaded model runs: a drop-in for a transformers experts module whose
weights live in an :class:`~expertflow.ExpertCache`."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from expertflow import ops
from expertflow.runtime.cache import ExpertCache
from expertflow.runtime.cpu_experts import cpu_expert_spec
from expertflow.runtime.cpu_worker import CpuExpertJob
from expertflow.runtime.experts import EXPERT_FLAGS
from expertflow.runtime.hybrid import expert_params

__all__ = ["OffloadedExperts"]


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers experts module: ``forward(hidden_states, top_k_index,
    top_k_weights) -> [tokens, hidden]`` with the experts' weights in an ExpertCache."""

    def __init__(
        self,
        original: nn.Module,
        cache: ExpertCache,
        layer: int,
        pool_size: int,
        lock: threading.RLock | None = None,
        packing=None,
        cpu_experts: str | None = None,
    ):
        """``cpu_experts``: the module's name to compute every expert on the CPU from the host
        store (``offload(cpu_experts="always")``), None to run them from slots."""
        super().__init__()
        self.cache = cache
        # The model's forward lock (re-entrant: already held inside a whole-model call). Held
        # here too so that a direct call of an inner module cannot interleave with another
        # thread's use of the layer's slots: release() unpins every slot of the layer.
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self.layer = layer
        # How a slot's packed tensors become this layer's weights (None: they already are).
        self.packing = packing if packing is not None and packing.codec is not None else None
        self.pool_size = pool_size  # experts that fit in the layer's slots at once
        self.num_experts = original.num_experts
        for flag in (*EXPERT_FLAGS, "has_post_expert_norm"):
            setattr(self, flag, bool(getattr(original, flag, False)))
        self.act_fn = getattr(original, "act_fn", None)  # gated families may gate without one
        if self.has_post_expert_norm:
            self.post_expert_norm = original.post_expert_norm
        self._gate = type(original)._apply_gate  # the family's own gating (e.g. GPT-OSS clamps)
        # Its attributes (alpha, limit, ...) are read by _apply_gate. Held in a tuple so that it
        # is not registered as a submodule: model.to(device) must not move its host experts.
        self._gate_owner = (original,)
        # Raises ValueError, naming the module, for a gating without a native CPU kernel.
        self._cpu = None if cpu_experts is None else cpu_expert_spec(cpu_experts, original)
        self._hybrid = None  # cpu_experts="auto": the native HybridPolicy (use_hybrid)
        self.cpu_expert_runs = 0  # experts computed on the CPU so far

    def use_hybrid(self, policy) -> None:
        """``cpu_experts="auto"``: each miss copied or computed on the CPU as ``policy`` (a
        native HybridPolicy) decides; None copies every miss (a failed calibration)."""
        self._hybrid = policy
        if policy is None:
            self._cpu = None  # every expert from a slot, as with "never"
        else:
            store = self.cache.host_expert(self.layer, 0)
            self._expert_bytes = sum(t.numel() * t.element_size() for t in store)
            self._expert_params = expert_params(store)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        out = x @ weight if self.is_transposed else x @ weight.t()
        return out + bias if bias is not None else out

    def _run_expert(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.has_bias:
            up, up_bias, down, down_bias = tensors
        else:
            (up, down), up_bias, down_bias = tensors, None, None
        h = self._linear(x, up, up_bias)
        h = self._gate(self._gate_owner[0], h) if self.has_gate else self.act_fn(h)
        h = self._linear(h, down, down_bias)
        return self.post_expert_norm(h) if self.has_post_expert_norm else h

    def forward(self, hidden_states, top_k_index, top_k_weights):
        with self._lock:
            return self._forward(hidden_states, top_k_index, top_k_weights)

    def _forward(self, hidden_states, top_k_index, top_k_weights):
        num_tokens, top_k = top_k_index.shape
        order, counts, offsets, inverse = ops.group_by_expert(top_k_index, self.num_experts)
        tokens = (order // top_k).long()
        bounds = offsets.tolist()
        experts = [e for e in range(self.num_experts) if bounds[e + 1] > bounds[e]]
        rows = hidden_states.new_empty((order.numel(), hidden_states.shape[-1]))
        on_cpu = self._cpu_share(experts, bounds) if self._cpu is not None else []
        if on_cpu:
            on_device = set(experts) - set(on_cpu)
            experts = [e for e in experts if e in on_device]
        # The CPU experts start first and run on the worker thread while the device computes
        # the others and their copies arrive; their rows are written once both are done.
        cpu_job = CpuExpertJob(self, hidden_states, tokens, bounds, on_cpu, inline=not experts)
        try:
            self._device_forward(hidden_states, tokens, bounds, experts, rows)
        except BaseException:
            cpu_job.wait_quietly()  # the host store stays untouched until the job is done
            raise
        cpu_rows = cpu_job.result()  # waits; raises the CPU side's error
        for e, h in zip(on_cpu, cpu_rows, strict=True):
            h = h.to(rows.device)
            rows[bounds[e] : bounds[e + 1]] = (
                self.post_expert_norm(h) if self.has_post_expert_norm else h
            )
        self.cpu_expert_runs += len(on_cpu)
        out = ops.combine(rows, top_k_weights.float(), inverse)
        return out.to(hidden_states.dtype)

    def _cpu_share(self, experts: list[int], bounds: list[int]) -> list[int]:
        """The experts this call computes on the CPU: all of them (``"always"``), or those the
        HybridPolicy places there (``"auto"``): misses valued at their planned reuse, and hits
        too where the CPU is done before the device could be: a prefetch still on its way, or
        a device slower at using a slot than the CPU kernel (a CPU device)."""
        if self._hybrid is None:
            return experts
        ahead = dict(zip(experts, self.cache.copies_ahead(self.layer, experts), strict=True))
        hits = [e for e in experts if ahead[e] >= 0]
        misses = [e for e in experts if ahead[e] < 0]
        reuse = self.cache.planned_reuse(self.layer, misses)
        # A prefetch still on its way lands after about the copies ahead of it and its own.
        copy_ms = self._expert_bytes / (self._hybrid.link_gbps * 1e6)

        def sized(e: int, last: float):  # last: a miss's reuse, a hit's wait in ms
            return (bounds[e + 1] - bounds[e], self._expert_bytes, self._expert_params, last)

        on_hits, on_misses = self._hybrid.plan_step(
            [sized(e, ahead[e] * copy_ms) for e in hits],
            [sized(e, r) for e, r in zip(misses, reuse, strict=True)],
        )
        placed = zip([*hits, *misses], [*on_hits, *on_misses], strict=True)
        return [e for e, where in placed if where == "cpu"]

    def _device_forward(self, hidden_states, tokens, bounds, experts, rows) -> None:
        """The experts run from device slots. A prompt can need more experts than the layer's
        slots: they run in pool-sized groups."""
        for start in range(0, len(experts), self.pool_size):
            group = experts[start : start + self.pool_size]
            slots, ready = self.cache.acquire(self.layer, group)
            try:
                for i in ready:  # experts already on the device first
                    e, slot = group[i], slots[i]
                    lo, hi = bounds[e], bounds[e + 1]
                    self.cache.wait(slot)
                    tensors = self.cache.views(slot, self.layer)
                    if self.packing is not None:
                        tensors = self.packing.unpack(tensors)
                    rows[lo:hi] = self._run_expert(hidden_states[tokens[lo:hi]], tensors)
            finally:
                self.cache.release(self.layer)

    def extra_repr(self) -> str:
        fmt = "float" if self.packing is None else self.packing.format_name
        return (
            f"layer={self.layer}, num_experts={self.num_experts}, pool_size={self.pool_size}, "
            f"expert_format={fmt}"
        )
