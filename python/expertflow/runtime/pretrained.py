"""``expertflow.from_pretrained()``: load a local checkpoint straight into an offloaded model.

The full model is never materialised on the host. The model is built with its parameters on the
meta device, the host store is allocated from the experts' shapes alone, and the checkpoint is
streamed one safetensors shard at a time: each expert tensor is written into its place in the
store (converted from the checkpoint's per-expert layout where needed, e.g. Mixtral's
``experts.N.w1/w2/w3``), every other tensor goes to the device. Peak host memory is the store
plus one open shard. Checkpoint key names are translated with transformers' own conversion
mapping, so every family transformers can load is read the same way.

Expert formats: a float checkpoint's experts are packed one piece at a time while streaming
(``expert_format="int8"`` etc., :mod:`expertflow.runtime.packed_loading`); a checkpoint shipped
in block fp8 or MXFP4 (:mod:`expertflow.runtime.quant_config`) has its expert codes and scales
read straight into the store, and its fp8 non-expert weights dequantized on load
(:mod:`expertflow.runtime.fp8_pairs`). What each tensor is, and whether its shape and dtype fit,
is decided from the headers before any weight is read (:mod:`expertflow.runtime.checkpoint_plan`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from expertflow.runtime.checkpoint import Shard, checkpoint_files
from expertflow.runtime.checkpoint_plan import plan_checkpoint, skipped_keys, stacks_of
from expertflow.runtime.expert_format import ExpertPacking
from expertflow.runtime.experts import expert_param_names, offloadable_modules
from expertflow.runtime.fp8_pairs import Fp8Pairs
from expertflow.runtime.model_building import (
    build_model,
    model_dtype,
    read_config,
    read_generation_config,
)
from expertflow.runtime.offload import build_cache, install, packed_layouts
from expertflow.runtime.options import OffloadOptions
from expertflow.runtime.packed_loading import (
    check_complete,
    check_expert_entries,
    expected_tracks,
    write_expert_piece,
)
from expertflow.runtime.quant_config import (
    drop_quantization_config,
    expert_codec,
    read_quant_config,
)

__all__ = ["from_pretrained"]

log = logging.getLogger("expertflow")


def _owner(model: nn.Module, target: str, where, key: str) -> tuple[nn.Module, str]:
    """The module holding parameter or buffer ``target`` and its name there."""
    module_name, _, name = target.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        module = None
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise ValueError(
            f"from_pretrained: {where} has tensor {key}, which the model does not have "
            f"(as {target}): a checkpoint of another model or config?"
        )
    return module, name


def _set_tensor(model: nn.Module, target: str, shard: Shard, key: str, device, dtype) -> None:
    """Reads checkpoint tensor ``key`` into the model's parameter or buffer ``target``."""
    module, name = _owner(model, target, shard.path, key)
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


def _assigner(model: nn.Module, device):
    """``assign(target, value, key)``: a value computed from the checkpoint (a dequantized
    fp8 weight) as the model's parameter ``target``."""

    def assign(target: str, value: torch.Tensor, key: str) -> None:
        module, name = _owner(model, target, "the checkpoint", key)
        old = module._parameters[name]
        module._parameters[name] = type(old)(value.to(device), requires_grad=False)

    return assign


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
    expert_format: str = "auto",
    group_size: int | None = None,
    cpu_experts: str = "never",
    hybrid_rates: dict | None = None,
) -> nn.Module:
    """Loads a local transformers checkpoint (``config.json`` + safetensors, sharded or not)
    as an offloaded model: like ``offload(AutoModelForCausalLM.from_pretrained(path))`` but
    without ever holding the whole model on the host. No network access is attempted.

    Args:
        path: the checkpoint folder (as written by ``save_pretrained``).
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
            prefetch_threshold, cpu_experts, hybrid_rates: as for :func:`expertflow.offload`
            (``cpu_experts="auto"`` computes a miss on the CPU from the host store where
            that beats copying it; ``"always"`` every expert).
        dtype: the weights' dtype on the device and in the host store, a floating
            ``torch.dtype`` or its name such as ``"bfloat16"`` (default, or ``"auto"``: the
            checkpoint's ``dtype`` in its config, else float32).
        expert_format: how the experts are kept in host memory and copied to slots. For a
            float checkpoint as for :func:`expertflow.offload`: ``"auto"`` keeps the float
            dtype; ``"int8"``, ``"int4"``, ``"fp8"`` or ``"mxfp4"`` quantize each expert while
            streaming (never the whole float experts on the host). A checkpoint shipped
            quantized (``quantization_config`` with ``quant_method`` ``"fp8"``: e4m3 with
            ``weight_scale_inv`` per ``weight_block_size`` tile, DeepSeek-V3/R1 and
            Qwen3-*-FP8; or ``"mxfp4"``: GPT-OSS's ``*_blocks`` / ``*_scales``) keeps its
            experts exactly as shipped with ``"auto"`` or that format named; its other
            weights (fp8 attention, shared experts) are dequantized to ``dtype`` on load.
        group_size: int4's group of input columns sharing a scale (default 64, or the
            largest divisor of a weight's input size below it); only with ``"int4"``.

    Raises:
        ValueError: for a folder that is not a complete checkpoint of a supported model: no
            or an unreadable config, index or shard, a safetensors header that breaks the
            format (offsets outside the data, overlapping or not matching shape x dtype), a
            tensor the model does not have, one given twice, or a weight missing; a
            ``quantization_config`` other than the two above, or an ``expert_format`` the
            checkpoint cannot give (int8 from fp8, say), before any weight is read; packed
            tensors or scales of the wrong shape or dtype (from the headers, before any
            weight is read), non-finite fp8 scales, NaN (0xFF) mxfp4 scales, an fp8 weight
            without its scale; a ``group_size`` that does not divide an input size.
    """
    options = OffloadOptions(
        device, slots, gpu_memory, policy, budget, predictor, lookahead, background,
        prefetch_threshold, expert_format, group_size, cpu_experts, hybrid_rates,
    )  # fmt: skip
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"from_pretrained: path must be a str or path, got {type(path).__name__}")
    path = Path(path)
    files = checkpoint_files(path)
    headers = {}
    for file in files:  # every header checked before the model is built and the store sized
        shard = Shard(file)
        headers[file] = shard.entries
        shard.close()
    config = read_config(path)
    generation = read_generation_config(path)
    quant = read_quant_config(config, path)
    codec = expert_codec(quant, options.expert_format, options.group_size, path)
    drop_quantization_config(config)
    dtype = model_dtype(dtype, config, path)
    model = build_model(config, dtype, path)
    _check_size(model, files, path)
    found = offloadable_modules(model)
    skip = skipped_keys(model, stacks_of(found))
    entries, parts = plan_checkpoint(model, found, headers, quant, skip)
    packings = _packings(found, codec, parts)
    check_expert_entries(entries, found, packings, headers)
    if quant.method == "fp8":
        Fp8Pairs.check(entries, headers, model, quant.block)
    cache = build_cache(model, found, packed_layouts(found, packings), options)
    filled = _stream_shards(model, found, cache, packings, entries, quant, options.device, dtype)
    model.tie_weights()
    check_complete(model, found, packings, filled, path)
    if generation is not None:
        model.generation_config = generation
    install(model, found, cache, options, packings)
    _log_loaded(model, path)
    return model


def _log_loaded(model: nn.Module, path: Path) -> None:
    from expertflow.runtime.memory import memory_report

    r = memory_report(model)
    cache = model._expertflow.cache
    log.info(
        "from_pretrained: %s loaded: %d slots of %.1f MiB (%s experts) on %s, %.2f GiB on the "
        "device, %.2f GiB of experts in host memory",
        path.name, cache.num_slots, cache.slot_bytes / 2**20, r["expert_format"], cache.device,
        r["device_bytes"] / 2**30, r["host_bytes"] / 2**30,
    )  # fmt: skip


def _packings(found, codec, parts: dict[str, int]) -> list[ExpertPacking]:
    """Each experts module's packing; a codec that cannot pack rows apart (fp8) packs each
    source of a merged weight (gate and up) as a chunk of its own."""
    packings = []
    for name, module in found:
        chunks = None
        if codec is not None and not codec.row_splittable and not module.is_transposed:
            chunks = [
                1 if attr.endswith("_bias") else parts.get(f"{name}.{attr}", 1)
                for attr in expert_param_names(module)
            ]
        packings.append(ExpertPacking(name, module, codec, chunks))
    return packings


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


def _stream_shards(model, found, cache, packings, entries, quant, device, dtype) -> dict:
    """Reads the checkpoint one shard at a time: expert pieces into the host store (packed),
    every other tensor to ``device``. Returns the expert pieces written, per track."""
    filled = expected_tracks(packings)
    pairs = None
    if quant.method == "fp8":
        pairs = Fp8Pairs(quant.block, dtype, _assigner(model, device))
    by_file: dict[Path, list] = {}
    for entry in entries:
        by_file.setdefault(entry.file, []).append(entry)
    with torch.no_grad():
        for number, (file, items) in enumerate(by_file.items(), start=1):
            log.info("from_pretrained: reading %s (%d of %d)", file.name, number, len(by_file))
            shard = Shard(file)
            try:
                for entry in items:
                    if entry.role == "skip":
                        continue
                    if entry.stack is not None:
                        layer = entry.stack.layer
                        module = found[layer][1]
                        write_expert_piece(cache, shard, entry, packings[layer], module, filled)
                    elif entry.role in ("fp8", "fp8_scale"):
                        pairs.add(entry, shard.read(entry.key))
                    else:
                        _set_tensor(model, entry.target, shard, entry.key, device, dtype)
            finally:
                shard.close()
    if pairs is not None:
        pairs.finish()
    return filled
