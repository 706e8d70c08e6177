"""A checkpoint's ``quantization_config``: which shipped quantizations ``from_pretrained`` reads,
and which ``expert_format`` each can give.

Two are read, and their experts kept exactly as shipped in the host store (never expanded on
the host): block fp8 (e4m3 with ``weight_scale_inv`` per tile, DeepSeek-V3/R1, Qwen3-*-FP8)
and MXFP4 (GPT-OSS's ``*_blocks`` / ``*_scales``). Every other ``quant_method`` is refused
before any weight is read. A float checkpoint (no ``quantization_config``) gives every format.

``AutoModelForCausalLM.from_config`` does not apply a config's ``quantization_config`` (only
``from_pretrained`` runs transformers' quantizers), but the field is dropped from the config
before the model is built all the same: the built model holds float (non-expert) weights and
expertflow's own expert formats, so a config saying otherwise would misdescribe it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from expertflow.runtime.expert_format import Fp8Codec, Mxfp4Codec, WeightCodec, codec_for

__all__ = ["CheckpointQuant", "drop_quantization_config", "expert_codec", "read_quant_config"]

SUPPORTED = (
    "fp8 (fmt 'e4m3', activation_scheme 'dynamic', a weight_block_size)",
    "mxfp4",
)


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """How a checkpoint's weights are stored.

    Attributes:
        method: ``"float"`` (no quantization_config), ``"fp8"`` or ``"mxfp4"``.
        block: fp8's ``weight_block_size`` (rows, cols) of one scale's tile.
    """

    method: str = "float"
    block: tuple[int, int] | None = None

    @property
    def quantized(self) -> bool:
        return self.method != "float"


def _as_dict(qc) -> dict | None:
    if qc is None or isinstance(qc, dict):
        return qc
    to_dict = getattr(qc, "to_dict", None)
    return to_dict() if callable(to_dict) else None


def _refuse(path: Path, what: str) -> ValueError:
    return ValueError(
        f"from_pretrained: {path / 'config.json'} has a quantization_config with {what}, which "
        f"expertflow does not read; supported: {'; '.join(SUPPORTED)}, or a float checkpoint"
    )


def _fp8_block(path: Path, qc: dict) -> tuple[int, int]:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse(path, f"quant_method 'fp8' and fmt {fmt!r}")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _refuse(path, f"quant_method 'fp8' and activation_scheme {scheme!r}")
    block = qc.get("weight_block_size")
    if block is None:
        raise _refuse(path, "quant_method 'fp8' and no weight_block_size (per-tensor scales)")
    ok = isinstance(block, list | tuple) and len(block) == 2
    if not ok or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise _refuse(path, f"quant_method 'fp8' and weight_block_size {block!r}")
    return int(block[0]), int(block[1])


def read_quant_config(config, path: Path) -> CheckpointQuant:
    """The checkpoint's quantization from its config; refuses any other than fp8 and mxfp4
    (naming the quant_method and what is supported)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return CheckpointQuant()
    qc = _as_dict(qc)
    if not isinstance(qc, dict):
        raise _refuse(path, f"a value of type {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        return CheckpointQuant("fp8", _fp8_block(path, qc))
    if method == "mxfp4":
        return CheckpointQuant("mxfp4")
    raise _refuse(path, f"quant_method {method!r}")


def drop_quantization_config(config) -> None:
    """Removes ``quantization_config`` from ``config`` (see the module's note)."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def expert_codec(
    quant: CheckpointQuant, expert_format: str, group_size: int | None, path: Path
) -> WeightCodec | None:
    """The codec of the host store: ``expert_format``'s for a float checkpoint; the shipped
    format for a quantized one, whose experts are kept as shipped (``"auto"`` or the same
    format named). Any other ``expert_format`` is refused."""
    if not quant.quantized:
        return codec_for(expert_format, group_size)
    if expert_format not in ("auto", quant.method):
        raise ValueError(
            f"from_pretrained: expert_format={expert_format!r} cannot be given from "
            f"{path}: its experts ship as {quant.method} (quantization_config), which "
            f"expertflow keeps as shipped; this checkpoint gives expert_format='auto' or "
            f"{quant.method!r} (both {quant.method})"
        )
    return Fp8Codec(quant.block) if quant.method == "fp8" else Mxfp4Codec()
