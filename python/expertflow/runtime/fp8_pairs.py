"""A block-fp8 checkpoint's non-expert weights (attention, shared experts, dense MLPs):
``X.weight`` in e4m3 and ``X.weight_scale_inv`` per tile, dequantized to the compute dtype on
load. The two may come in either order and from different shards: the first is held until the
second arrives; one left without its pair at the end is an error naming it."""

from __future__ import annotations

from pathlib import Path

import torch

from expertflow import formats
from expertflow.runtime.checkpoint_plan import SCALE_INV

__all__ = ["Fp8Pairs"]


class Fp8Pairs:
    """Pairs fp8 weights with their scales and hands each dequantized weight to ``assign``
    (``assign(target, value, key)``)."""

    def __init__(self, block: tuple[int, int], dtype: torch.dtype, assign):
        self.block, self.dtype, self.assign = block, dtype, assign
        self._pending: dict[str, tuple[str, torch.Tensor, str]] = {}  # target -> (role, t, key)

    @staticmethod
    def check(entries, headers: dict[Path, dict], model, block: tuple[int, int]) -> None:
        """Shapes and dtypes from the headers: each weight the parameter's shape, each scale
        one per tile of it, float32."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for entry in entries:
            if entry.role not in ("fp8", "fp8_scale"):
                continue
            info, where = headers[entry.file][entry.key], f"from_pretrained: {entry.file}: tensor"
            param = params.get(entry.target)
            if param is None or param.dim() != 2:
                what = "scale" if entry.role == "fp8_scale" else "weight"
                raise ValueError(
                    f"{where} {entry.key} is an fp8 {what} of {entry.target}, which the model "
                    "does not have as a 2-D weight"
                )
            rows, cols = param.shape
            want = [rows, cols]
            if entry.role == "fp8_scale":
                want = [-(-rows // block[0]), -(-cols // block[1])]
                if info["dtype"] != "F32":
                    raise ValueError(f"{where} {entry.key} has dtype {info['dtype']}, expected F32")
            if list(info["shape"]) != want:
                raise ValueError(
                    f"{where} {entry.key} has shape {info['shape']}, expected {want} (the "
                    f"{'tiles of ' if entry.role == 'fp8_scale' else ''}weight {entry.target} "
                    f"{[rows, cols]}, block {list(block)})"
                )

    def add(self, entry, tensor: torch.Tensor) -> None:
        """One fp8 weight or scale read; dequantizes once its pair is there."""
        other = self._pending.pop(entry.target, None)
        if other is None:
            self._pending[entry.target] = (entry.role, tensor, entry.key)
            return
        if other[0] == entry.role:
            raise ValueError(f"from_pretrained: {entry.key} and {other[2]} are both {entry.role}")
        weight, scale = (tensor, other[1]) if entry.role == "fp8" else (other[1], tensor)
        weight_key = entry.key if entry.role == "fp8" else other[2]
        if not bool(torch.isfinite(scale).all()):
            scale_key = other[2] if entry.role == "fp8" else entry.key
            raise ValueError(f"from_pretrained: fp8 scale tensor {scale_key} has NaN or inf scales")
        value = formats.dequantize_fp8_block(weight, scale, self.block, self.dtype)
        self.assign(entry.target, value, weight_key)

    def finish(self) -> None:
        """Refuses a weight left without its scale, or a scale without its weight."""
        for role, _, key in self._pending.values():
            if role == "fp8":
                missing = f"its scale {key}{SCALE_INV}"
            else:
                missing = f"its weight {key.removesuffix(SCALE_INV)}"
            raise ValueError(
                f"from_pretrained: fp8 tensor {key} has no pair in the checkpoint ({missing} "
                "is missing)"
            )
