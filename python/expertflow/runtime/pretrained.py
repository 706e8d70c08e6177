"""``expertflow.from_pretrained()``: load a local checkpoint straight into an offloaded model.

The full model is never materialised on the host. The model is built with its parameters on the
meta device, the host store is allocated from the experts' shapes alone, and the checkpoint is
streamed one safetensors shard at a time: each expert tensor is written into its place in the
store (converted from the checkpoint's per-expert layout where needed, e.g. Mixtral's
``experts.N.w1/w2/w3``), every other tensor goes to the device. Peak host memory is the store
plus one open shard. Checkpoint key names are translated with transformers' own conversion
mapping, so every family transformers can load is read the same way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from expertflow.runtime.checkpoint import KeyTranslator, Shard, checkpoint_files
from expertflow.runtime.experts import expert_param_names, expert_tensors, offloadable_modules
from expertflow.runtime.offload import build_cache, install
from expertflow.runtime.options import OffloadOptions

__all__ = ["from_pretrained"]


@contextlib.contextmanager
def _parameters_on_meta():
    """Module construction with every parameter on the meta device (no memory, no init) while
    buffers (rotary tables and the like, computed at construction) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        old = module._parameters[name]
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(
                f"from_pretrained: {key} has shape {list(value.shape)} in the checkpoint, the "
                f"model expects {list(old.shape)}"
            )
        module._parameters[name] = type(old)(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise ValueError(f"from_pretrained: the model has no tensor {key}")


def from_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cuda",
    slots: int | None = None,
    gpu_memory: int | str | None = None,
    dtype: torch.dtype | None = None,
    policy: str = "expertflow",
    budget: str = "per_layer",
    predictor=None,
    lookahead: bool = False,
    background: bool = False,
    prefetch_threshold: float = 0.0,
) -> nn.Module:
    """Loads a local transformers checkpoint (``config.json`` + safetensors, sharded or not)
    as an offloaded model: like ``offload(AutoModelForCausalLM.from_pretrained(path))`` but
    without ever holding the whole model on the host. No network access is attempted.

    Args:
        path: the checkpoint folder (as written by ``save_pretrained``).
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
            prefetch_threshold: as for :func:`expertflow.offload`.
        dtype: the weights' dtype on the device and in the host store (default: the
            checkpoint's ``dtype`` in its config, else float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    options = OffloadOptions(
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
        prefetch_threshold,
    )  # fmt: skip
    path = Path(path)
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = options.device
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    found = offloadable_modules(model)
    layouts = [[expert_tensors(m, e) for e in range(m.num_experts)] for _, m in found]
    cache = build_cache(model, found, layouts, options)
    del layouts
    filled = _stream_shards(model, found, cache, files, device, dtype)
    model.tie_weights()
    _check_complete(model, found, filled, path)
    return install(model, found, cache, options)


def _stream_shards(model, found, cache, files, device, dtype) -> dict:
    """Reads the checkpoint one shard at a time: expert tensors into the host store, every other
    tensor to ``device``. Returns the expert pieces written, per (layer, part)."""
    # model key of an experts stack -> (layer, part in the store's expert tensors)
    stacks = {
        f"{name}.{param}": (layer, i)
        for layer, (name, module) in enumerate(found)
        for i, param in enumerate(expert_param_names(module))
    }
    filled: dict[tuple[int, int], set] = {key: set() for key in stacks.values()}
    translate = KeyTranslator(model)
    with torch.no_grad():
        for file in files:
            shard = Shard(file)
            try:
                for key in shard.keys():
                    target, piece = translate(key)
                    if target in stacks:
                        layer, part = stacks[target]
                        _fill_expert_piece(cache, shard, key, layer, part, piece, filled)
                    elif piece is None:
                        _set_tensor(model, target, shard.read(key).to(device, dtype))
                    else:
                        raise ValueError(
                            f"from_pretrained: {key} -> {target} is not an experts stack"
                        )
            finally:
                shard.close()
    return filled


def _fill_expert_piece(cache, shard: Shard, key, layer, part, piece, filled) -> None:
    """Writes one checkpoint tensor into the host store: a whole ``[E, ...]`` stack one expert
    at a time, or one expert's (part of a) tensor."""
    if piece is None:
        for e in range(shard.shape(key)[0]):
            shard.read_into(key, cache.host_expert(layer, e)[part], row=e)
            filled[(layer, part)].add((e, 0, 1))
        return
    expert, index, parts = piece
    dst = cache.host_expert(layer, expert)[part]
    rows = dst.shape[0] // parts
    shard.read_into(key, dst[index * rows : (index + 1) * rows])
    filled[(layer, part)].add((expert, index, parts))


def _check_complete(model, found, filled, path) -> None:
    """Every piece of every expert, and every other parameter, came from the checkpoint."""
    for (layer, part), pieces in filled.items():
        module = found[layer][1]
        parts = max((p for _, _, p in pieces), default=1)
        wanted = {(e, i, parts) for e in range(module.num_experts) for i in range(parts)}
        if pieces != wanted:
            missing = sorted({e for e, _, _ in wanted - pieces})
            name = expert_param_names(module)[part]
            raise ValueError(
                f"from_pretrained: {path} lacks experts {missing[:8]} of {found[layer][0]}.{name}"
            )
    expert_params = {id(p) for _, m in found for p in m.parameters(recurse=False)}
    missing = [
        name for name, p in model.named_parameters() if p.is_meta and id(p) not in expert_params
    ]
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks weights for {missing[:8]}")
