"""Native dequantization of the expert weight formats (CPU and CUDA kernels).

Each function wraps a ``torch.ops.expertflow`` operator and returns exactly what the plain-torch
reference of the same name in ``expertflow.formats`` returns (computed in float32, then cast to
``dtype``; NaN in the same places), without its checks for finite scales: the loader checks
scales once per checkpoint. Inputs may be any strided views; contiguous ones are read in place.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_fp8_block", "dequantize_int4", "dequantize_int8", "dequantize_mxfp4"]


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Per-output-channel int8 to floats: ``q.float() * scale[:, None]``.

    Args:
        q: ``[out, in]`` int8.
        scale: ``[out]`` float32.
        dtype: float32, bfloat16 or float16.

    Returns:
        ``[out, in]`` tensor of ``dtype`` on ``q``'s device.

    Raises:
        ValueError: wrong dtypes, dimensions or shapes, or inputs on different devices.
    """
    return torch.ops.expertflow.dequantize_int8(q, scale, dtype)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Packed symmetric group-wise int4 to floats: ``code * scale`` of the code's group.

    Args:
        packed: ``[out, in / 2]`` uint8; element ``2k`` of a row is the low nibble of byte
            ``k``, element ``2k + 1`` the high nibble, both two's complement (-8..7).
        scale: ``[out, in / group_size]`` float32.
        group_size: a positive divisor of ``in``.
        dtype: float32, bfloat16 or float16.

    Returns:
        ``[out, in]`` tensor of ``dtype`` on ``packed``'s device.

    Raises:
        ValueError: wrong dtypes, dimensions or shapes, a ``group_size`` that does not divide
            ``in``, or inputs on different devices.
    """
    return torch.ops.expertflow.dequantize_int4(packed, scale, group_size, dtype)


def dequantize_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled fp8 e4m3 to floats: ``weight.float() * scale_inv`` of each element's tile.

    Args:
        weight: ``[out, in]`` ``torch.float8_e4m3fn``; the NaN codes 0x7F and 0xFF come out NaN.
        scale_inv: ``[ceil(out / block[0]), ceil(in / block[1])]`` float32, the multiplier of
            each tile (the last row and column of tiles may be partial).
        block: tile shape ``(rows, cols)``.
        dtype: float32, bfloat16 or float16.

    Returns:
        ``[out, in]`` tensor of ``dtype`` on ``weight``'s device.

    Raises:
        ValueError: wrong dtypes, dimensions or shapes, a tile side below 1, or inputs on
            different devices.
    """
    rows, cols = block
    return torch.ops.expertflow.dequantize_fp8_block(weight, scale_inv, rows, cols, dtype)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """MXFP4 (GPT-OSS ``*_blocks`` / ``*_scales``) to floats.

    Element ``i`` of a block is the e2m1 code in the low (even ``i``) or high (odd ``i``)
    nibble of byte ``i // 2``, times the block's e8m0 scale ``2^(e - 127)``. A scale of 0xFF
    is NaN: every element of its block is NaN (the reference's ``nan_scales="propagate"``).

    Args:
        blocks: ``[rows, nblocks, 16]`` uint8, 32 e2m1 codes per block.
        scales: ``[rows, nblocks]`` uint8 e8m0 exponents.
        dtype: float32, bfloat16 or float16.

    Returns:
        ``[rows, nblocks * 32]`` tensor of ``dtype`` on ``blocks``' device.

    Raises:
        ValueError: wrong dtypes, dimensions or shapes, or inputs on different devices.
    """
    return torch.ops.expertflow.dequantize_mxfp4(blocks, scales, dtype)
