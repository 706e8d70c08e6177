"""Integer formats quantized on load from a float checkpoint: int8 per output channel and int4
per group, both symmetric (no zero points).

Why symmetric int4: expert weights are centred on zero, so a group's ``[min, max]`` is close to
``[-amax, amax]`` and asymmetric codes (16 levels over ``max - min``) would shrink the step by
only ~1/15 while adding a zero point per group to store, copy and apply in every kernel.
Symmetric codes use -7..7 (scale ``amax / 7``); the code -8 is never produced, and is decoded
as ``-8 * scale`` if met.

int4 packing: two's-complement 4-bit codes, two per byte along ``in``; element ``2k`` of a row
is the LOW nibble of byte ``k`` and element ``2k + 1`` the HIGH nibble (the same order as
GPT-OSS's mxfp4 ``*_blocks``).
"""

from __future__ import annotations

import torch

from . import _check

__all__ = ["dequantize_int4", "dequantize_int8", "quantize_int4", "quantize_int8"]

INT8_MAX = 127
INT4_MAX = 7


def _safe_scale(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """``amax / qmax``, with 1.0 where that is zero (all-zero rows or groups, or underflow)."""
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel (row).

    ``scale[o] = amax(|w[o, :]|) / 127`` (1.0 for an all-zero row) and
    ``q = round(w / scale)`` (ties to even) clamped to -127..127, so each element's error is at
    most ``scale[o] / 2``.

    Args:
        w: ``[out, in]`` float32, float16, bfloat16 or float64, finite; computed in float32.

    Returns:
        ``(q, scale)``: ``[out, in]`` int8 and ``[out]`` float32.

    Raises:
        ValueError: a non-float or non-2-D ``w``, or NaN or inf in it.
    """
    _check.tensor("w", w)
    _check.dtype("w", w, _check.FLOAT_DTYPES)
    _check.ndim("w", w, 2)
    _check.finite("w", w)
    x = w.to(torch.float32)
    scale = _safe_scale(x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0]), INT8_MAX)
    q = torch.round(x / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Expand per-output-channel int8 to floats: ``q.float() * scale[:, None]``.

    Args:
        q: ``[out, in]`` int8.
        scale: ``[out]`` float32, finite.
        dtype: the output's floating dtype.

    Returns:
        ``[out, in]`` tensor of ``dtype`` (computed in float32).

    Raises:
        ValueError: wrong dtypes or shapes, a non-finite scale, a bad ``dtype``.
    """
    _check.tensor("q", q)
    _check.tensor("scale", scale)
    _check.float_out_dtype("dtype", dtype)
    _check.dtype("q", q, (torch.int8,))
    _check.ndim("q", q, 2)
    _check.dtype("scale", scale, (torch.float32,))
    _check.shape("scale", scale, (q.shape[0],))
    _check.finite("scale", scale)
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def _group_size(group_size: object, cols: int) -> int:
    g = _check.positive_int("group_size", group_size)
    if cols % g:
        raise ValueError(f"group_size: expected a divisor of in = {cols}, given {g}")
    return g


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4, packed two codes per byte (low nibble first).

    Each row is cut into groups of ``group_size`` consecutive input columns;
    ``scale[o, g] = amax / 7`` of the group (1.0 for an all-zero group) and
    ``q = round(w / scale)`` (ties to even) clamped to -7..7, so each element's error is at
    most ``scale / 2``.

    Args:
        w: ``[out, in]`` float32, float16, bfloat16 or float64, finite; ``in`` even.
        group_size: a positive divisor of ``in``.

    Returns:
        ``(packed, scale)``: ``[out, in / 2]`` uint8 (element ``2k`` in the low nibble of byte
        ``k``, ``2k + 1`` in the high nibble, two's complement) and ``[out, in / group_size]``
        float32.

    Raises:
        ValueError: a non-float or non-2-D ``w``, NaN or inf in it, an odd ``in``, a
            ``group_size`` that is not a positive divisor of ``in``.
    """
    _check.tensor("w", w)
    _check.dtype("w", w, _check.FLOAT_DTYPES)
    _check.ndim("w", w, 2)
    rows, cols = w.shape
    if cols % 2:
        raise ValueError(f"w: expected an even number of columns (in), given {cols}")
    g = _group_size(group_size, cols)
    _check.finite("w", w)
    x = w.to(torch.float32).reshape(rows, cols // g, g)
    scale = _safe_scale(x.abs().amax(dim=2), INT4_MAX)
    q = torch.round(x / scale[:, :, None]).clamp(-INT4_MAX, INT4_MAX).to(torch.int16)
    nib = (q & 0xF).reshape(rows, cols // 2, 2)
    packed = nib[:, :, 0] | (nib[:, :, 1] << 4)
    return packed.to(torch.uint8), scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``[out, in / 2]`` uint8 to the signed codes ``[out, in]`` int8 (-8..7), low nibble first."""
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Expand packed group-wise int4 to floats: ``code * scale`` of the code's group.

    Args:
        packed: ``[out, in / 2]`` uint8 as ``quantize_int4`` makes it.
        scale: ``[out, in / group_size]`` float32, finite.
        group_size: a positive divisor of ``in``.
        dtype: the output's floating dtype.

    Returns:
        ``[out, in]`` tensor of ``dtype`` (computed in float32).

    Raises:
        ValueError: wrong dtypes or dimensions, a ``group_size`` that does not divide ``in``,
            ``scale`` of the wrong shape, a non-finite scale, a bad ``dtype``.
    """
    _check.tensor("packed", packed)
    _check.tensor("scale", scale)
    _check.float_out_dtype("dtype", dtype)
    _check.dtype("packed", packed, (torch.uint8,))
    _check.ndim("packed", packed, 2)
    rows, cols = packed.shape[0], packed.shape[1] * 2
    g = _group_size(group_size, cols)
    _check.dtype("scale", scale, (torch.float32,))
    _check.shape("scale", scale, (rows, cols // g))
    _check.finite("scale", scale)
    codes = unpack_int4(packed).to(torch.float32).reshape(rows, cols // g, g)
    return (codes * scale[:, :, None]).reshape(rows, cols).to(dtype)
