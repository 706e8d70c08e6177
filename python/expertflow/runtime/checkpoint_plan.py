"""What each tensor of a checkpoint is, decided from the safetensors headers alone before any
weight is read: a plain tensor of the model, an fp8 weight or scale to pair and dequantize, or
a piece of an experts stack (float, or a shipped format's codes or scales). Shapes and dtypes
of every piece are checked here against the host store's layout, so that a wrong checkpoint is
refused before the store is allocated and the streaming starts."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from expertflow.runtime.checkpoint import SAFETENSORS_DTYPES, KeyTranslator
from expertflow.runtime.experts import expert_param_names
from expertflow.runtime.quant_config import CheckpointQuant

__all__ = ["Entry", "Stack", "plan_checkpoint", "skipped_keys", "stacks_of"]

SCALE_INV = "_scale_inv"  # fp8: X.weight_scale_inv is the multiplier of X.weight's tiles
MX_SUFFIXES = {"_blocks": "codes", "_scales": "scales"}  # GPT-OSS: X_blocks, X_scales


@dataclasses.dataclass(frozen=True)
class Stack:
    """One experts module's stacked tensor: ``layer`` and ``index`` in the store's logical
    tensors, ``experts`` in the layer, ``name`` its qualified name."""

    layer: int
    index: int
    experts: int
    name: str
    is_weight: bool


@dataclasses.dataclass
class Entry:
    """One checkpoint tensor. ``role``: ``"tensor"`` (read as is), ``"fp8"`` / ``"fp8_scale"``
    (a non-expert fp8 weight and its scale, paired by ``target``), ``"expert"`` (a float
    piece of ``stack``), ``"codes"`` / ``"scales"`` (a shipped packed piece), ``"skip"``."""

    key: str
    file: Path
    target: str
    role: str
    piece: tuple[int, int, int] | None = None  # (expert, part, parts) of a merged stack
    stack: Stack | None = None


def stacks_of(found) -> dict[str, Stack]:
    """Model key of every experts stack -> its Stack."""
    return {
        f"{name}.{param}": Stack(
            layer, i, module.num_experts, f"{name}.{param}", "bias" not in param
        )
        for layer, (name, module) in enumerate(found)
        for i, param in enumerate(expert_param_names(module))
    }


def _classify(key, dtype, quant, translate, stacks, skip) -> tuple[str, str, object]:
    """(role, target, piece) of one checkpoint key."""
    base, kind = None, None
    if quant.method == "fp8" and key.endswith(SCALE_INV):
        base, kind = key.removesuffix(SCALE_INV), "scale"
    elif quant.method == "mxfp4":
        for suffix, what in MX_SUFFIXES.items():
            if key.endswith(suffix):
                base, kind = key.removesuffix(suffix), what
    if base is not None:
        target, piece = translate(base)
        if skip(key, target):
            return "skip", target, piece
        if target in stacks:
            return ("codes" if kind == "codes" else "scales"), target, piece
        if kind == "scale":
            return "fp8_scale", target, piece
    target, piece = translate(key)
    if skip(key, target):
        return "skip", target, piece
    if target in stacks:
        packed = quant.method == "fp8" and dtype == torch.float8_e4m3fn
        return ("codes" if packed else "expert"), target, piece
    if quant.method == "fp8" and dtype == torch.float8_e4m3fn:
        return "fp8", target, piece
    return "tensor", target, piece


def plan_checkpoint(model, found, headers: dict[Path, dict], quant: CheckpointQuant, skip):
    """Every checkpoint key as an Entry, in shard order, and the sources each experts stack
    is merged from (``{stack name: parts}``). Refuses a key given twice, a piece of an
    unknown stack or of an expert the layer does not have."""
    translate = KeyTranslator(model)
    stacks = stacks_of(found)
    entries, seen, parts = [], {}, {}
    for file, header in headers.items():
        for key, info in header.items():
            if key in seen:  # the later copy would silently win
                raise ValueError(f"from_pretrained: tensor {key} is in both {seen[key]} and {file}")
            seen[key] = file
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            role, target, piece = _classify(key, dtype, quant, translate, stacks, skip)
            entry = Entry(key, file, target, role, piece, stacks.get(target))
            if role in ("expert", "codes", "scales"):
                _check_piece_index(entry, info["shape"])
                n = 1 if piece is None else piece[2]
                parts[target] = max(parts.get(target, 1), n)
            elif piece is not None and role != "skip":
                raise ValueError(
                    f"from_pretrained: {file} has tensor {key}, a piece of experts stack "
                    f"{target}, which the model does not have"
                )
            entries.append(entry)
    return entries, parts


def _check_piece_index(entry: Entry, shape: list[int]) -> None:
    experts = entry.stack.experts
    if entry.piece is None and (not shape or shape[0] > experts):
        raise ValueError(
            f"from_pretrained: {entry.file}: tensor {entry.key} has shape {shape}, expected a "
            f"stack of at most the layer's {experts} experts"
        )
    if entry.piece is not None and entry.piece[0] >= experts:
        raise ValueError(
            f"from_pretrained: {entry.file}: tensor {entry.key} is of expert {entry.piece[0]}, "
            f"the model's layer has experts 0 to {experts - 1}"
        )


def skipped_keys(model, stacks):
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
