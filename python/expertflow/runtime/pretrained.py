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
import os
import re
from pathlib import Path

import torch
from torch import nn

from expertflow.runtime.checkpoint import KeyTranslator, Shard, checkpoint_files
from expertflow.runtime.experts import expert_param_names, expert_tensors, offloadable_modules
from expertflow.runtime.offload import build_cache, install, packings_for
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


def _set_tensor(model: nn.Module, target: str, shard: Shard, key: str, device, dtype) -> None:
    """Reads checkpoint tensor ``key`` into the model's parameter or buffer ``target``."""
    module_name, _, name = target.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        module = None
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise ValueError(
            f"from_pretrained: {shard.path} has tensor {key}, which the model does not have "
            f"(as {target}): a checkpoint of another model or config?"
        )
    if name in module._parameters:
        old = module._parameters[name]
        if list(old.shape) != shard.shape(key):
            raise ValueError(
                f"from_pretrained: {target} has shape {shard.shape(key)} in {shard.path}, the "
                f"model expects {list(old.shape)}"
            )
        value = shard.read(key).to(device, dtype)
        module._parameters[name] = type(old)(value, requires_grad=False)
    else:
        module._buffers[name] = shard.read(key).to(device, dtype)


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _model_dtype(dtype, config, path: Path) -> torch.dtype:
    """``dtype`` (a floating torch.dtype or its name), else the config's, else float32."""
    source = "dtype"
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        source = f"the dtype in {path / 'config.json'}"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in _FLOAT_DTYPES:
        names = [str(d).removeprefix("torch.") for d in _FLOAT_DTYPES]
        raise ValueError(
            f"from_pretrained: {source} must be a floating torch.dtype or its name "
            f"({', '.join(names)}), got {dtype!r}"
        )
    return dtype


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    # Any failure: transformers raises OSError, ValueError, AttributeError (an unknown dtype
    # name) or huggingface_hub's validation errors (a field of the wrong type).
    except Exception as exc:
        raise ValueError(
            f"from_pretrained: {path / 'config.json'} is not a usable transformers config "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _build_model(config, dtype: torch.dtype, path: Path) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # a config transformers reads but cannot build a model from
        raise ValueError(
            f"from_pretrained: no model can be built from {path / 'config.json'} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return model.eval()


def from_pretrained(
    path: str | Path,
    *,
    device: str | torch.device = "cuda",
    slots: int | None = None,
    gpu_memory: int | str | None = None,
    dtype: torch.dtype | str | None = None,
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
        dtype: the weights' dtype on the device and in the host store, a floating
            ``torch.dtype`` or its name such as ``"bfloat16"`` (default: the checkpoint's
            ``dtype`` in its config, else float32).

    Raises:
        ValueError: for a folder that is not a complete checkpoint of a supported model: no
            or an unreadable config, index or shard, a safetensors header that breaks the
            format (offsets outside the data, overlapping or not matching shape x dtype), a
            tensor the model does not have, one given twice, or a weight missing.
    """
    options = OffloadOptions(
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
        prefetch_threshold,
    )  # fmt: skip
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"from_pretrained: path must be a str or path, got {type(path).__name__}")
    path = Path(path)
    files = checkpoint_files(path)
    for file in files:  # every header checked before the model is built and the store sized
        Shard(file).close()
    config = _read_config(path)
    dtype = _model_dtype(dtype, config, path)
    device = options.device
    model = _build_model(config, dtype, path)
    _check_size(model, files, path)
    found = offloadable_modules(model)
    layouts = [[expert_tensors(m, e) for e in range(m.num_experts)] for _, m in found]
    cache = build_cache(model, found, layouts, options)
    del layouts
    filled = _stream_shards(model, found, cache, files, device, dtype)
    model.tie_weights()
    _check_complete(model, found, filled, path)
    return install(model, found, cache, options, packings_for(found, options))


def _check_size(model: nn.Module, files: list[Path], path: Path) -> None:
    """Refuses a config that asks for far more weights than the shards can hold (a typo such
    as ``num_local_experts: 1000000`` took 86 s, then failed to allocate a 37 GB host store):
    every weight comes from the checkpoint, at 4 bits or more each. Twice that margin again
    covers weights tied to another that are counted twice here."""
    weights = sum(p.numel() for p in model.parameters())
    stored = sum(f.stat().st_size for f in files)
    if weights > 4 * stored:
        raise ValueError(
            f"from_pretrained: {path / 'config.json'} describes a model of {weights} weights, "
            f"far more than its safetensors shards ({stored} bytes) can hold: a wrong config?"
        )


def _stream_shards(model, found, cache, files, device, dtype) -> dict:
    """Reads the checkpoint one shard at a time: expert tensors into the host store, every other
    tensor to ``device``. Returns the expert pieces written, per (layer, part)."""
    # model key of an experts stack -> (layer, part in the store's expert tensors, experts)
    stacks = {
        f"{name}.{param}": (layer, i, module.num_experts)
        for layer, (name, module) in enumerate(found)
        for i, param in enumerate(expert_param_names(module))
    }
    filled: dict[tuple[int, int], set] = {key[:2]: set() for key in stacks.values()}
    translate = KeyTranslator(model)
    skip = _skipped_keys(model, stacks)
    seen: dict[str, Path] = {}
    with torch.no_grad():
        for file in files:
            shard = Shard(file)
            try:
                for key in shard.keys():
                    if key in seen:  # the later copy would silently win
                        raise ValueError(
                            f"from_pretrained: tensor {key} is in both {seen[key]} and {file}"
                        )
                    seen[key] = file
                    target, piece = translate(key)
                    if skip(key, target):
                        continue
                    if target in stacks:
                        _fill_expert_piece(cache, shard, key, stacks[target], piece, filled)
                    elif piece is None:
                        _set_tensor(model, target, shard, key, device, dtype)
                    else:
                        raise ValueError(
                            f"from_pretrained: {file} has tensor {key}, a piece of experts "
                            f"stack {target}, which the model does not have"
                        )
            finally:
                shard.close()
    return filled


def _skipped_keys(model, stacks):
    """Whether a checkpoint key is one transformers skips for this model: not a tensor of the
    model and matched by its ``_keys_to_ignore_on_load_unexpected`` (DeepSeek-V3's
    multi-token-prediction layer 61, for one). Any other unknown key is refused."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if not patterns:
        return lambda key, target: False
    ignored = re.compile("|".join(f"({p})" for p in sorted(patterns)))
    known = set(stacks)
    known.update(name for name, _ in model.named_parameters(remove_duplicate=False))
    known.update(name for name, _ in model.named_buffers(remove_duplicate=False))
    return lambda key, target: target not in known and ignored.search(key) is not None


def _fill_expert_piece(cache, shard: Shard, key, stack, piece, filled) -> None:
    """Writes one checkpoint tensor into the host store: a whole ``[E, ...]`` stack one expert
    at a time, or one expert's (part of a) tensor."""
    layer, part, num_experts = stack
    shape = shard.shape(key)
    if piece is None and (not shape or shape[0] > num_experts):
        raise ValueError(
            f"from_pretrained: {shard.path}: tensor {key} has shape {shape}, expected a stack "
            f"of at most the layer's {num_experts} experts"
        )
    if piece is not None and piece[0] >= num_experts:
        raise ValueError(
            f"from_pretrained: {shard.path}: tensor {key} is of expert {piece[0]}, the model's "
            f"layer has experts 0 to {num_experts - 1}"
        )
    if piece is None:
        for e in range(shape[0]):
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
        name = expert_param_names(module)[part]
        if pieces - wanted:  # some experts both whole and in parts
            twice = sorted({e for e, _, _ in pieces - wanted})
            raise ValueError(
                f"from_pretrained: {path} gives experts {twice[:8]} of {found[layer][0]}.{name} "
                "in two layouts (whole and in parts)"
            )
        if pieces != wanted:
            missing = sorted({e for e, _, _ in wanted - pieces})
            raise ValueError(
                f"from_pretrained: {path} lacks experts {missing[:8]} of {found[layer][0]}.{name}"
            )
    expert_params = {id(p) for _, m in found for p in m.parameters(recurse=False)}
    missing = [
        name for name, p in model.named_parameters() if p.is_meta and id(p) not in expert_params
    ]
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks weights for {missing[:8]}")
