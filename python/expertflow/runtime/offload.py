"""``expertflow.offload()``: a transformers MoE model whose routed experts live in host memory.

Every experts module of transformers' shared experts interface (:mod:`expertflow.runtime.experts`)
is replaced by an :class:`~expertflow.runtime.offloaded.OffloadedExperts` module. The model's own
routers still decide; the experts run once per step over their grouped tokens, on device slots of
one :class:`~expertflow.ExpertCache`, and the outputs are combined with the routing weights.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from expertflow.runtime.cache import ExpertCache
from expertflow.runtime.expert_format import ExpertPacking, codec_for
from expertflow.runtime.experts import (
    expert_param_names,
    expert_tensors,
    offloadable_modules,
)
from expertflow.runtime.hybrid import hybrid_policy
from expertflow.runtime.offloaded import OffloadedExperts
from expertflow.runtime.options import OffloadOptions, parse_bytes
from expertflow.runtime.routing import router_of
from expertflow.runtime.state import OffloadState, lock_each_forward, offload_state

__all__ = ["WORKING_MEMORY_FRACTION", "offload", "restore"]

# The share of a gpu_memory budget left to the KV cache and activations: on a 24 GB card,
# 2.4 GB holds Mixtral-8x7B's KV cache for about 18,000 tokens (128 KiB a token in bf16).
WORKING_MEMORY_FRACTION = 0.10


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
    expert_format: str = "auto",
    group_size: int | None = None,
    cpu_experts: str = "never",
    hybrid_rates: dict | None = None,
) -> nn.Module:
    """Moves ``model``'s routed experts into host memory behind one expert cache.

    Non-expert weights (attention, norms, embeddings, routers, shared experts) go to ``device``.

    Args:
        model: a transformers model (or any module) using the shared experts interface.
        device: where the model runs.
        slots: total device slots for experts (exclusive with ``gpu_memory``), a positive
            int. More than one per expert is never allocated: the cache then holds every
            expert (``num_layers x num_experts`` slots).
        gpu_memory: a total budget (bytes as an int or whole float, or a str such as
            "24GiB"). A tenth of it is kept free for the KV cache and activations
            (:data:`WORKING_MEMORY_FRACTION`); slots are what remains after that and the
            resident weights, divided by the slot size, again at most one per expert.
        policy: cache policy, ``"expertflow"`` (prediction-aware), ``"lrfu"`` (decayed
            request counts: the fewest bytes when no predictor prefetches), ``"lru"``, ``"lfu"``
            (fewest requests since the expert was last loaded), ``"lfu_history"`` (fewest
            requests over the whole run: classic LFU) or ``"belady"``
            (:data:`expertflow.runtime.policies.POLICIES`).
        budget: ``"per_layer"`` or ``"global"`` slot pools.
        predictor: an :class:`expertflow.prediction.Predictor` (or the folder of a saved one):
            each decode step it scores every layer's experts before layer 0 runs and the
            cache prefetches the predicted ones (:mod:`expertflow.runtime.prefetch`). A path
            predictor with a reuse head (the bundled one) also ranks each layer's experts,
            once the layer has run, by how soon they are predicted to be needed again.
        lookahead: also apply each layer's router one layer early (to the previous layer's
            hidden states) during decoding and prefetch what it picks.
        background: run the predictor on a worker thread while each step's first layers
            compute, instead of before layer 0 (:mod:`expertflow.runtime.prefetch`).
        prefetch_threshold: copy ahead only the predicted experts scored at least this; the
            others still rank evictions. 0 (default) prefetches every positive score; with
            the path predictor and its reuse head, 0.9 took the least time in our replays at
            25-62.5% budgets, for fewer hits than 0 (README, "Measured results").
        expert_format: how the experts are kept in host memory and copied to slots:
            ``"auto"`` keeps the model's float dtype; ``"int8"`` (per output channel),
            ``"int4"`` (group-wise), ``"fp8"`` (e4m3, 128 x 128 blocks) or ``"mxfp4"`` quantize
            them once (2x to 4x fewer bytes held and copied; each slot is expanded to the
            compute dtype on its device before use). README "Quantized experts" has the
            accuracy of each.
        group_size: int4's group of input columns sharing a scale (default 64, or the
            largest divisor of a weight's input size below it); only with ``"int4"``.
        cpu_experts: ``"never"`` (default: every expert runs from a device slot),
            ``"always"``: every expert is computed on the CPU from the host store
            (``ops.cpu_expert``, in the store's format; only activations move, the slots stay
            unused: the all-CPU baseline), or ``"auto"``: each layer's misses (experts the
            cache does not hold) are copied or computed on the CPU as the native HybridPolicy
            decides from the copy time, the CPU time at their token counts, the device's time
            using a slot, the three queues and the miss's reuse score from the predictor's
            last plan (0 without a reuse head); a miss computed on the CPU is not cached, and
            a hit runs on the CPU only where that is done first (its prefetch still far back
            in the link's queue, or a device slower at using a slot). A layer's CPU experts
            run on a worker thread beside its device experts. Outputs are the same either
            way.
        hybrid_rates: ``"auto"``'s rates, ``{"link_gbps": ..., "cpu_gbps": ...,
            "cpu_gflops": ...}`` and optionally ``"device_gbps"`` (the device using a cached
            expert at one token, expanding it if packed; 0 or absent: not counted); None
            (default) measures all four at offload (one expert copied, used from the copy at
            one token, and run by the CPU kernel at 1 and 16 tokens), once per kind of expert
            in the process (``expertflow.runtime.hybrid.forget_calibrations()`` measures
            again). A calibration that fails warns and falls back to ``"never"``.

    Raises:
        ValueError: an argument of the wrong type or value (named in the message); the model
            is then untouched. Any exception while the model is being modified puts it back
            as it was before re-raising.

    Returns:
        The same model, modified in place. ``restore(model)`` undoes it. Its forward calls
        from several threads run one at a time, each whole (``OffloadState.lock``): the
        cache's slots and the prefetcher serve one call at once.
    """
    options = OffloadOptions(
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
        prefetch_threshold, expert_format, group_size, cpu_experts, hybrid_rates,
    )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"offload: model must be a torch.nn.Module (a transformers MoE model), got "
            f"{type(model).__name__}"
        )
    found = offloadable_modules(model)
    packings = packings_for(found, options)
    if all(p.codec is None for p in packings):  # the store copies the experts' bytes as they are
        experts = [[expert_tensors(m, e) for e in range(m.num_experts)] for _, m in found]
        cache = build_cache(model, found, experts, options)
        del experts
    else:  # packed one expert at a time into the store: one expert's temporaries at most
        cache = build_cache(model, found, packed_layouts(found, packings), options)
        with torch.no_grad():
            for layer, ((_, module), packing) in enumerate(zip(found, packings, strict=True)):
                for e in range(module.num_experts):
                    packed = packing.pack(expert_tensors(module, e))
                    for dst, src in zip(cache.host_expert(layer, e), packed, strict=True):
                        dst.copy_(src)
    return install(model, found, cache, options, packings)


def packings_for(found, options: OffloadOptions) -> list[ExpertPacking]:
    """Each experts module's packing in ``options.expert_format``."""
    codec = codec_for(options.expert_format, options.group_size)
    return [ExpertPacking(name, module, codec) for name, module in found]


def packed_layouts(found, packings) -> list[list[list[torch.Tensor]]]:
    """``[layer][expert]`` meta tensors of the packed experts, for the store's layout."""
    return [
        [packing.layout(module)] * module.num_experts
        for (_, module), packing in zip(found, packings, strict=True)
    ]


def _top_k(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1)


def _slots_for_memory(model, found, experts, options: OffloadOptions, top_k: int) -> int:
    """The slots that fit in ``options.gpu_memory`` after the working memory and the resident,
    non-expert weights."""
    expert_ids = {id(p) for _, m in found for p in m.parameters(recurse=False)}
    resident = sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_ids
    )
    slot_bytes = max(
        sum((t.numel() * t.element_size() + 255) // 256 * 256 for t in tensors[0])
        for tensors in experts
    )
    usable = int(parse_bytes(options.gpu_memory) * (1 - WORKING_MEMORY_FRACTION))
    slots = (usable - resident) // slot_bytes
    minimum = top_k * (len(found) if options.budget == "per_layer" else 1)
    if slots < minimum:
        raise ValueError(_budget_too_small(options, resident, slot_bytes, minimum, top_k))
    return slots


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def _budget_for(weights: int) -> int:
    """The least gpu_memory whose share for weights holds ``weights`` bytes."""
    return math.ceil(weights / (1 - WORKING_MEMORY_FRACTION))


def _budget_too_small(options, resident, slot_bytes, minimum, top_k) -> str:
    """Why ``gpu_memory`` is too small, with the minimum in GiB and what would fit instead: a
    global pool needs only ``top_k`` slots where per-layer pools need ``top_k`` per layer."""
    need = _budget_for(resident + minimum * slot_bytes)
    text = (
        f"offload: gpu_memory={options.gpu_memory!r} is below the minimum of {_gib(need)} for "
        f"budget={options.budget!r}: {_gib(resident)} resident weights + {minimum} slots x "
        f"{slot_bytes} bytes, plus {WORKING_MEMORY_FRACTION:.0%} kept for the KV cache and "
        "activations"
    )
    global_need = _budget_for(resident + top_k * slot_bytes)
    if options.budget == "per_layer" and parse_bytes(options.gpu_memory) >= global_need:
        text += f"; budget='global' needs only {_gib(global_need)} (one pool for all layers)"
    if options.expert_format == "auto":
        text += "; a quantized expert_format ('int8', 'int4') makes each slot 2-4x smaller"
    return text


def build_cache(model, found, experts, options: OffloadOptions) -> ExpertCache:
    """The cache over ``experts`` (``[layer][expert]`` tensor lists), with the slots given or
    derived from the GPU memory budget."""
    top_k = _top_k(model)
    slots = options.slots
    if options.gpu_memory is not None:
        slots = _slots_for_memory(model, found, experts, options, top_k)
    return ExpertCache(
        experts,
        device=options.device,
        slots=int(slots),
        top_k=top_k,
        budget=options.budget,
        policy=options.policy,
    )


def install(
    model: nn.Module, found, cache: ExpertCache, options: OffloadOptions, packings
) -> nn.Module:
    """Swaps every experts module for an OffloadedExperts over ``cache``; moves the rest of the
    model to the cache's device and attaches the prefetcher the options ask for.

    On any exception (a predictor that does not load or fit, memory running out while moving
    the model, an interrupt) the model is put back as it was, then the exception goes on: a
    half-offloaded model would refuse the next ``offload`` as "already offloaded"."""
    devices = _tensor_devices(model)
    params = [dict(module.named_parameters(recurse=False)) for _, module in found]
    try:
        return _install(model, found, cache, options, packings)
    except BaseException:
        _roll_back(model, found, params, devices)
        raise


def _install(model: nn.Module, found, cache: ExpertCache, options: OffloadOptions, packings):
    per_layer = options.budget == "per_layer"
    pool_size = cache.num_slots // len(found) if per_layer else cache.num_slots
    lock = threading.RLock()
    originals = []  # (parent name, attribute, module)
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        originals.append((parent_name, child, module))
    state = OffloadState(cache, originals, pool_size, _top_k(model), lock=lock, packings=packings)
    model._expertflow = state
    for layer, (parent_name, child, module) in enumerate(originals):
        parent = model.get_submodule(parent_name) if parent_name else model
        name = f"{parent_name}.{child}" if parent_name else child
        cpu = name if options.cpu_experts != "never" else None
        replacement = OffloadedExperts(
            module, cache, layer, pool_size, lock, packings[layer], cpu_experts=cpu
        )
        if options.cpu_experts == "auto":
            if layer == 0:
                hidden = getattr(getattr(model, "config", None), "hidden_size", None)
                dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
                hybrid = hybrid_policy(replacement, hidden, dtype, options.hybrid_rates)
            replacement.use_hybrid(hybrid)
        if packings[layer].codec is None:
            # The original keeps host views of the store (no second copy) for restore().
            _point_at_store(module, cache, layer)
        else:  # its float experts are dropped; restore() expands the store's packed ones
            _drop_experts(module)
        setattr(parent, child, replacement)
    model.to(cache.device)
    model._expertflow.lock_hooks = lock_each_forward(model, lock)
    if options.prefetching:
        model._expertflow.prefetcher = _prefetcher(model, cache, options)
    return model


def _tensor_devices(model: nn.Module) -> dict[str, torch.device]:
    return {
        name: t.device
        for named in (model.named_parameters, model.named_buffers)
        for name, t in named(remove_duplicate=False)
    }


def _roll_back(model: nn.Module, found, params: list[dict], devices: dict) -> None:
    """Undoes whatever part of ``_install`` ran: hooks, state, modules, expert parameters and
    the devices of the other tensors."""
    state = model.__dict__.pop("_expertflow", None)
    if state is not None:
        if state.prefetcher is not None:
            state.prefetcher.remove()
        for handle in state.lock_hooks:
            handle.remove()
    for (name, module), original in zip(found, params, strict=True):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        for param_name, param in original.items():
            setattr(module, param_name, param)
    for name, t in model.named_parameters(remove_duplicate=False):
        if name in devices and t.device != devices[name]:
            t.data = t.data.to(devices[name])
    for name, t in model.named_buffers(remove_duplicate=False):
        if name in devices and t.device != devices[name]:
            module_name, _, buffer = name.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            owner._buffers[buffer] = t.to(devices[name])


def _prefetcher(model: nn.Module, cache: ExpertCache, options: OffloadOptions):
    from expertflow.prediction import Predictor, load_predictor
    from expertflow.runtime.prefetch import PredictivePrefetcher

    state = model._expertflow
    predictor = options.predictor
    if predictor is not None and not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor)
    parents = [model.get_submodule(p) if p else model for p, _, _ in state.originals]
    modules = [
        getattr(parent, c) for parent, (_, c, _) in zip(parents, state.originals, strict=True)
    ]
    routers = None
    if options.lookahead:
        names = [p for p, _, _ in state.originals]
        routers = [router_of(parent, n) for parent, n in zip(parents, names, strict=True)]
    return PredictivePrefetcher(
        model, cache, predictor, modules, state.top_k, state.pool_size, routers,
        options.background, options.prefetch_threshold,
    )  # fmt: skip


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


def _drop_experts(module: nn.Module) -> None:
    """Replaces the module's expert stacks by meta tensors of the same shapes (no memory)."""
    for name in expert_param_names(module):
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(old.to("meta"), requires_grad=False))


def _expand_experts(module: nn.Module, cache: ExpertCache, layer: int, packing) -> None:
    """Gives a module whose experts were dropped the store's experts, expanded to floats
    (a quantized format's values, not the weights before quantization)."""
    experts = [packing.unpack(cache.host_expert(layer, e)) for e in range(module.num_experts)]
    for i, name in enumerate(expert_param_names(module)):
        stack = torch.stack([tensors[i] for tensors in experts])
        setattr(module, name, nn.Parameter(stack, requires_grad=False))


def restore(model: nn.Module) -> nn.Module:
    """Undoes :func:`offload`: puts the original experts modules back (on the host). With a
    quantized ``expert_format`` their experts are the quantized ones expanded to floats."""
    state = offload_state(model, "restore")
    if state.prefetcher is not None:
        state.prefetcher.remove()
    for handle in state.lock_hooks:
        handle.remove()
    for layer, (parent_name, child, module) in enumerate(state.originals):
        if state.packings and state.packings[layer].codec is not None:
            _expand_experts(module, state.cache, layer, state.packings[layer])
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    del model._expertflow
    return model
