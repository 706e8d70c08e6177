"""``expertflow.offload()``: a transformers MoE model whose routed experts live in host memory.

Every experts module of transformers' shared experts interface (classes decorated with
``use_experts_implementation``: 3-D ``gate_up_proj``/``up_proj`` and ``down_proj`` parameters and
the ``is_transposed``/``has_bias``/``has_gate``/``has_post_expert_norm`` flags) is replaced by an
:class:`OffloadedExperts` module. The model's own routers still decide; the experts run once per
step over their grouped tokens, on device slots of one :class:`~expertflow.ExpertCache`, and the
outputs are combined with the routing weights. Detection is by structure, so a new family using
the same interface needs no code here.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from expertflow import ops
from expertflow.cache import ExpertCache

__all__ = ["OffloadedExperts", "find_experts_modules", "memory_report", "offload", "restore"]

_FLAGS = ("is_transposed", "has_bias", "has_gate")


def _is_experts_module(module: nn.Module) -> bool:
    return all(hasattr(module, f) for f in _FLAGS) and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of ``model`` in layer order, as (qualified name, module)."""
    return [(name, m) for name, m in model.named_modules() if _is_experts_module(m)]


def _check_layout(name: str, module: nn.Module) -> None:
    """Refuses experts modules whose tensors are not the interface's 3-D per-expert stacks."""
    experts = getattr(module, "num_experts", None)
    for attr in expert_param_names(module):
        t = getattr(module, attr, None)
        dims = 2 if attr.endswith("_bias") else 3
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] != experts:
            raise ValueError(
                f"offload: unsupported expert layout in {name} ({type(module).__name__}): "
                f"expected {attr} as a {dims}-D tensor with num_experts={experts} rows, got "
                f"{None if not isinstance(t, torch.Tensor) else list(t.shape)}"
            )


def expert_param_names(module: nn.Module) -> list[str]:
    """The experts module's per-expert stacks, in the order the host store keeps them."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    names = [up] + ([f"{up}_bias"] if module.has_bias else []) + ["down_proj"]
    return names + (["down_proj_bias"] if module.has_bias else [])


def _expert_tensors(module: nn.Module, expert: int) -> list[torch.Tensor]:
    return [getattr(module, name)[expert].detach() for name in expert_param_names(module)]


def _parse_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"gpu_memory must be bytes or like '24GiB', got {value!r}")
    units = {
        "b": 1,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


class OffloadedExperts(nn.Module):
    """Drop-in for a transformers experts module: ``forward(hidden_states, top_k_index,
    top_k_weights) -> [tokens, hidden]`` with the experts' weights in an ExpertCache."""

    def __init__(self, original: nn.Module, cache: ExpertCache, layer: int, pool_size: int):
        super().__init__()
        self.cache = cache
        self.layer = layer
        self.pool_size = pool_size  # experts that fit in the layer's slots at once
        self.num_experts = original.num_experts
        for flag in (*_FLAGS, "has_post_expert_norm"):
            setattr(self, flag, bool(getattr(original, flag, False)))
        self.act_fn = getattr(original, "act_fn", None)  # gated families may gate without one
        if self.has_post_expert_norm:
            self.post_expert_norm = original.post_expert_norm
        self._gate = type(original)._apply_gate  # the family's own gating (e.g. GPT-OSS clamps)
        # Its attributes (alpha, limit, ...) are read by _apply_gate. Held in a tuple so that it
        # is not registered as a submodule: model.to(device) must not move its host experts.
        self._gate_owner = (original,)

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
        num_tokens, top_k = top_k_index.shape
        order, counts, offsets, inverse = ops.group_by_expert(top_k_index, self.num_experts)
        tokens = (order // top_k).long()
        bounds = offsets.tolist()
        experts = [e for e in range(self.num_experts) if bounds[e + 1] > bounds[e]]
        rows = hidden_states.new_empty((order.numel(), hidden_states.shape[-1]))
        # A prompt can need more experts than the layer's slots: run them in pool-sized groups.
        for start in range(0, len(experts), self.pool_size):
            group = experts[start : start + self.pool_size]
            slots, ready = self.cache.acquire(self.layer, group)
            try:
                for i in ready:  # experts already on the device first
                    e, slot = group[i], slots[i]
                    lo, hi = bounds[e], bounds[e + 1]
                    self.cache.wait(slot)
                    tensors = self.cache.views(slot, self.layer)
                    rows[lo:hi] = self._run_expert(hidden_states[tokens[lo:hi]], tensors)
            finally:
                self.cache.release(self.layer)
        out = ops.combine(rows, top_k_weights.float(), inverse)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, pool_size={self.pool_size}"


@dataclasses.dataclass
class PrefetchSettings:
    """What drives prefetching in an offloaded model (see :func:`offload`)."""

    predictor: object = None
    lookahead: bool = False
    background: bool = False
    threshold: float = 0.0

    def __post_init__(self):
        t = self.threshold
        number = isinstance(t, int | float) and not isinstance(t, bool)
        if not (number and math.isfinite(t) and t >= 0):
            raise ValueError(f"prefetch_threshold must be a finite number >= 0, got {t!r}")

    @property
    def enabled(self) -> bool:
        return self.predictor is not None or self.lookahead


def offload(
    model: nn.Module,
    *,
    device: str | torch.device = "cuda",
    slots: int | None = None,
    gpu_memory: int | str | None = None,
    policy: str = "expertflow",
    budget: str = "per_layer",
    predictor=None,
    lookahead: bool = False,
    background: bool = False,
    prefetch_threshold: float = 0.0,
) -> nn.Module:
    """Moves ``model``'s routed experts into host memory behind one expert cache.

    Non-expert weights (attention, norms, embeddings, routers, shared experts) go to ``device``.

    Args:
        model: a transformers model (or any module) using the shared experts interface.
        device: where the model runs.
        slots: total device slots for experts (exclusive with ``gpu_memory``).
        gpu_memory: a total budget ("24GiB" or bytes); slots are what remains after the
            resident weights, divided by the slot size.
        policy: cache policy, ``"expertflow"`` (prediction-aware), ``"lrfu"`` (decayed
            request counts: the fewest bytes when no predictor prefetches), ``"lru"``, ``"lfu"``
            or ``"belady"``.
        budget: ``"per_layer"`` or ``"global"`` slot pools.
        predictor: an :class:`expertflow.predictor.Predictor` (or the folder of a saved one):
            each decode step it scores every layer's experts before layer 0 runs and the
            cache prefetches the predicted ones (:mod:`expertflow.prefetch`). A path
            predictor with a reuse head (the bundled one) also ranks each layer's experts,
            once the layer has run, by how soon they are predicted to be needed again.
        lookahead: also apply each layer's router one layer early (to the previous layer's
            hidden states) during decoding and prefetch what it picks.
        background: run the predictor on a worker thread while each step's first layers
            compute, instead of before layer 0 (:mod:`expertflow.prefetch`).
        prefetch_threshold: copy ahead only the predicted experts scored at least this; the
            others still rank evictions. 0 (default) prefetches every positive score; with
            the path predictor and its reuse head, 0.9 took the least time in our replays at
            25-62.5% budgets, for fewer hits than 0 (README, "Measured results").

    Returns:
        The same model, modified in place. ``restore(model)`` undoes it.
    """
    prefetch = PrefetchSettings(predictor, lookahead, background, prefetch_threshold)
    found = _offloadable_modules(model)
    experts = [[_expert_tensors(m, e) for e in range(m.num_experts)] for _, m in found]
    cache = _build_cache(model, found, experts, device, slots, gpu_memory, budget, policy)
    del experts
    return _install(model, found, cache, budget, prefetch)


def _offloadable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if hasattr(model, "_expertflow"):
        raise ValueError("offload: this model is already offloaded; call restore(model) first")
    found = find_experts_modules(model)
    if not found:
        raise ValueError(
            f"offload: {type(model).__name__} has no MoE experts module (looked for modules with "
            f"a 3-D down_proj parameter and the flags {', '.join(_FLAGS)}, as transformers' "
            "use_experts_implementation classes have)"
        )
    for name, module in found:
        _check_layout(name, module)
    return found


def _build_cache(model, found, experts, device, slots, gpu_memory, budget, policy) -> ExpertCache:
    """The cache over ``experts``, with slots given directly or derived from ``gpu_memory``
    (what remains after the resident, non-expert weights)."""
    if (slots is None) == (gpu_memory is None):
        raise ValueError("offload: give exactly one of slots and gpu_memory")
    config = getattr(model, "config", None)
    top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    if gpu_memory is not None:
        expert_ids = {id(p) for _, m in found for p in m.parameters(recurse=False)}
        resident = sum(
            p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_ids
        )
        slot_bytes = max(
            sum((t.numel() * t.element_size() + 255) // 256 * 256 for t in tensors[0])
            for tensors in experts
        )
        slots = (_parse_bytes(gpu_memory) - resident) // slot_bytes
        minimum = top_k * (len(found) if budget == "per_layer" else 1)
        if slots < minimum:
            need = resident + minimum * slot_bytes
            raise ValueError(
                f"offload: gpu_memory={gpu_memory!r} is below the minimum of {need} bytes "
                f"({resident} resident + {minimum} slots x {slot_bytes} bytes)"
            )
    return ExpertCache(
        experts,
        device=torch.device(device),
        slots=int(slots),
        top_k=top_k,
        budget=budget,
        policy=policy,
    )


def _install(
    model: nn.Module,
    found,
    cache: ExpertCache,
    budget: str,
    prefetch: PrefetchSettings,
):
    """Swaps every experts module for an OffloadedExperts over ``cache``; moves the rest of the
    model to the cache's device."""
    pool_size = cache.num_slots // len(found) if budget == "per_layer" else cache.num_slots
    originals = []
    for layer, (name, module) in enumerate(found):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replacement = OffloadedExperts(module, cache, layer, pool_size)
        # The original keeps host views of the store (no second copy) for restore().
        _point_at_store(module, cache, layer)
        setattr(parent, child, replacement)
        originals.append((parent_name, child, module))
    model.to(cache.device)
    model._expertflow = {"cache": cache, "originals": originals, "prefetcher": None}
    if prefetch.enabled:
        from expertflow.predictor import Predictor, load_predictor
        from expertflow.prefetch import PredictivePrefetcher

        predictor = prefetch.predictor
        try:
            if predictor is not None and not isinstance(predictor, Predictor):
                predictor = load_predictor(predictor)
            parents = [model.get_submodule(p) if p else model for p, _, _ in originals]
            modules = [
                getattr(parent, c) for parent, (_, c, _) in zip(parents, originals, strict=True)
            ]
            routers = None
            if prefetch.lookahead:
                routers = [
                    _router_of(parent, p)
                    for parent, (p, _, _) in zip(parents, originals, strict=True)
                ]
            top_k = int(getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1)
            model._expertflow["prefetcher"] = PredictivePrefetcher(
                model,
                cache,
                predictor,
                modules,
                top_k,
                pool_size,
                routers,
                prefetch.background,
                prefetch.threshold,
            )
        except ValueError:
            restore(model)
            raise
    return model


def _router_of(block: nn.Module, name: str) -> nn.Module:
    """The router beside an experts module: transformers' MoE blocks call it ``gate`` or
    ``router``, and it returns ``(logits, top_k_weights, top_k_index)``."""
    for attr in ("gate", "router"):
        router = getattr(block, attr, None)
        if isinstance(router, nn.Module):
            return router
    raise ValueError(f"lookahead: no router ('gate' or 'router') beside the experts in {name!r}")


def _point_at_store(module: nn.Module, cache: ExpertCache, layer: int) -> None:
    """Replaces the module's expert parameters by strided views of the host store, so that no
    second copy of the experts stays alive and restore() has them back."""
    first = cache.host_expert(layer, 0)
    stride_bytes = 0
    if module.num_experts > 1:
        stride_bytes = cache.host_expert(layer, 1)[0].data_ptr() - first[0].data_ptr()
    for name, base in zip(expert_param_names(module), first, strict=True):
        view = base.as_strided(
            (module.num_experts, *base.shape),
            (stride_bytes // base.element_size(), *base.stride()),
            base.storage_offset(),
        )
        setattr(module, name, nn.Parameter(view, requires_grad=False))


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`offload`: puts the original experts modules back (on the host)."""
    state = getattr(model, "_expertflow", None)
    if state is None:
        raise ValueError("restore: this model was not offloaded by expertflow.offload()")
    if state.get("prefetcher") is not None:
        state["prefetcher"].remove()
    for parent_name, child, module in state["originals"]:
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    del model._expertflow
    return model


def _device_totals(device: torch.device) -> dict | None:
    """Used and total memory of the GPU from NVML, where nvidia-ml-py and a GPU exist. The
    GPU is found by its UUID: NVML numbers every GPU of the machine, CUDA only the visible ones
    (``CUDA_VISIBLE_DEVICES``), so the two indices can differ."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):  # torch prints the bare UUID
            uuid = f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"device_used_bytes": int(info.used), "device_total_bytes": int(info.total)}
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def memory_report(model: nn.Module) -> dict:
    """Where an offloaded model's bytes are, and what the whole model would need on the device.

    Returns:
        ``resident_bytes`` (non-expert weights, on the device), ``slot_bytes`` (the expert slots),
        ``host_bytes`` (every expert, in the host store), ``device_bytes`` (resident + slots),
        ``full_model_bytes`` (resident + every expert), ``saving_percent`` (of device memory
        against the whole model on the device) and, on a GPU with nvidia-ml-py installed,
        ``device_used_bytes`` and ``device_total_bytes``.
    """
    state = getattr(model, "_expertflow", None)
    if state is None:
        raise ValueError("memory_report: this model was not offloaded by expertflow.offload()")
    cache = state["cache"]
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(b.numel() * b.element_size() for b in model.buffers())
    slots = cache.num_slots * cache.slot_bytes
    full = resident + cache.host_bytes
    report = {
        "resident_bytes": resident,
        "slot_bytes": slots,
        "host_bytes": cache.host_bytes,
        "device_bytes": resident + slots,
        "full_model_bytes": full,
        "saving_percent": 100.0 * (1 - (resident + slots) / full) if full else 0.0,
    }
    report.update(_device_totals(cache.device) or {})
    return report
