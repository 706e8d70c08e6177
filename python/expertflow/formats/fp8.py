"""Block-scaled fp8 (e4m3) as DeepSeek-V3/R1 and Qwen3-*-FP8 ship it.

A weight ``[out, in]`` is stored as ``torch.float8_e4m3fn`` with one float32 scale per
``block[0] x block[1]`` tile (``weight_scale_inv``, ``[ceil(out / block[0]), ceil(in / block[1])]``;
the last row and column of tiles may be partial). Despite its name, ``weight_scale_inv`` is the
multiplier: ``w ~= weight.float() * weight_scale_inv[i // block[0], j // block[1]]``.

e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, largest finite value 448,
smallest normal 2^-6, subnormal step 2^-9. Rounding (torch's conversion) is to nearest, ties to
even, so a normal value has relative error <= 2^-4 and a subnormal one absolute error <= 2^-10
(in units of the block's scale).
"""

from __future__ import annotations

import torch

from . import _check

__all__ = ["FP8_E4M3_MAX", "dequantize_fp8_block", "quantize_fp8_block"]

FP8_E4M3_MAX = 448.0


def _block(block: object) -> tuple[int, int]:
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise ValueError(f"block: expected a pair of positive ints, given {block!r}")
    return (_check.positive_int("block[0]", block[0]), _check.positive_int("block[1]", block[1]))


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A per-tile ``[ceil(rows/b0), ceil(cols/b1)]`` tensor repeated to ``[rows, cols]``."""
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Expand a block-scaled fp8 weight to floats.

    Args:
        weight: ``[out, in]`` ``torch.float8_e4m3fn``. NaN encodings (0x7F, 0xFF) come out NaN.
        scale_inv: ``[ceil(out / block[0]), ceil(in / block[1])]`` float32, finite (the
            checkpoint's ``weight_scale_inv``: the multiplier of its tile).
        block: tile shape ``(rows, cols)``; DeepSeek-V3 and Qwen3-FP8 use ``(128, 128)``.
        dtype: the output's floating dtype.

    Returns:
        ``[out, in]`` tensor of ``dtype``: ``weight.float() * scale`` of each element's tile,
        computed in float32 then cast.

    Raises:
        ValueError: wrong dtypes or dimensions, ``scale_inv`` of the wrong shape, a non-finite
            scale, a bad ``block`` or ``dtype``.
    """
    _check.tensor("weight", weight)
    _check.tensor("scale_inv", scale_inv)
    block = _block(block)
    _check.float_out_dtype("dtype", dtype)
    _check.dtype("weight", weight, (torch.float8_e4m3fn,))
    _check.ndim("weight", weight, 2)
    _check.dtype("scale_inv", scale_inv, (torch.float32,))
    rows, cols = weight.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    _check.shape("scale_inv", scale_inv, tiles)
    _check.finite("scale_inv", scale_inv)
    out = weight.to(torch.float32) * _expand(scale_inv, rows, cols, block)
    return out.to(dtype)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight to block-scaled fp8 (the inverse of ``dequantize_fp8_block``).

    Each tile's scale is ``amax / 448`` (its largest magnitude maps to e4m3's largest finite
    value); values are ``w / scale`` clamped to +-448 and converted by torch (nearest, ties to
    even). An all-zero tile (or one whose ``amax / 448`` underflows float32) gets scale 1.0:
    any finite scale reproduces its zeros, and 1.0 keeps scales free of zeros.

    Args:
        w: ``[out, in]`` float32, float16, bfloat16 or float64, finite; computed in float32.
        block: tile shape ``(rows, cols)``; partial tiles at the bottom and right edges are
            scaled by their own amax.

    Returns:
        ``(weight, scale_inv)``: ``[out, in]`` ``torch.float8_e4m3fn`` and
        ``[ceil(out / block[0]), ceil(in / block[1])]`` float32.

    Raises:
        ValueError: a non-float or non-2-D ``w``, NaN or inf in ``w``, a bad ``block``.
    """
    _check.tensor("w", w)
    block = _block(block)
    _check.dtype("w", w, _check.FLOAT_DTYPES)
    _check.ndim("w", w, 2)
    _check.finite("w", w)
    rows, cols = w.shape
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    x = w.to(torch.float32)
    padded = x.new_zeros(tiles[0] * block[0], tiles[1] * block[1])
    padded[:rows, :cols] = x
    amax = padded.abs().reshape(tiles[0], block[0], tiles[1], block[1]).amax(dim=(1, 3))
    scale = amax / FP8_E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / _expand(scale, rows, cols, block)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale
