"""MXFP4 (OCP Microscaling Formats v1.0) in the layout GPT-OSS ships.

Elements are e2m1 (4 bits: sign, 2 exponent bits with bias 1, 1 mantissa bit; no inf or NaN):
code ``c`` has magnitude ``FP4_VALUES[c & 7]`` = 0, 0.5, 1, 1.5, 2, 3, 4, 6 (0.5 is the one
subnormal) and sign bit ``c & 8``. Blocks of 32 consecutive elements along a row share one e8m0
scale: a uint8 exponent ``e`` meaning ``2^(e - 127)``; ``0xFF`` is NaN.

Layout (GPT-OSS ``*_blocks`` / ``*_scales``, read by transformers'
``integrations/mxfp4.py:convert_moe_packed_tensors``): a weight ``[..., rows, cols]`` is
``blocks`` ``[..., rows, cols / 32, 16]`` uint8 and ``scales`` ``[..., rows, cols / 32]`` uint8.
Byte ``k`` of a block holds element ``2k`` in its LOW nibble and element ``2k + 1`` in its HIGH
nibble. (GPT-OSS's expert tensors are ``[experts, out, in / 32, 16]``; transformers transposes the
dequantized ``[experts, out, in]`` to its ``[experts, in, out]`` parameter, a layout step outside
the format.)
"""

from __future__ import annotations

import torch

from . import _check

__all__ = ["FP4_VALUES", "MXFP4_BLOCK", "dequantize_mxfp4", "quantize_mxfp4"]

FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
MXFP4_BLOCK = 32
E2M1_EMAX = 2  # exponent of the largest e2m1 value, 6 = 1.5 * 2^2
E8M0_BIAS = 127
E8M0_NAN = 0xFF
# Midpoints between consecutive e2m1 magnitudes, and whether a tie there rounds up: ties go to
# the even code (mantissa bit 0), i.e. 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4 (roundTiesToEven, as OCP MX 6.3 asks).
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True))
_MIDPOINTS += ((5.0, False),)


def dequantize_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    nan_scales: str = "raise",
) -> torch.Tensor:
    """Expand MXFP4 (GPT-OSS ``*_blocks`` / ``*_scales``) to floats.

    Args:
        blocks: ``[..., rows, cols / 32, 16]`` uint8, two e2m1 codes per byte (low nibble is the
            even element).
        scales: ``[..., rows, cols / 32]`` uint8 e8m0 exponents, ``2^(e - 127)``.
        dtype: the output's floating dtype.
        nan_scales: what a ``0xFF`` (NaN) scale does: ``"raise"`` (a ValueError; a shipped
            checkpoint never has one, so it means corruption) or ``"propagate"`` (the spec's
            meaning: every element of that block is NaN).

    Returns:
        ``[..., rows, cols]`` tensor of ``dtype``, ``FP4_VALUES[code] * 2^(e - 127)`` computed
        in float32 (exact there, except magnitudes >= 2^128, reachable only with ``e >= 253``,
        which become inf).

    Raises:
        ValueError: wrong dtypes or shapes, a NaN scale under ``nan_scales="raise"``, a bad
            ``dtype`` or ``nan_scales``.
    """
    _check.tensor("blocks", blocks)
    _check.tensor("scales", scales)
    _check.float_out_dtype("dtype", dtype)
    if nan_scales not in ("raise", "propagate"):
        raise ValueError(f"nan_scales: expected 'raise' or 'propagate', given {nan_scales!r}")
    _check.dtype("blocks", blocks, (torch.uint8,))
    _check.ndim("blocks", blocks, 3, at_least=True)
    if blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"blocks: expected a last dimension of {MXFP4_BLOCK // 2} bytes, given shape "
            f"{tuple(blocks.shape)}"
        )
    _check.dtype("scales", scales, (torch.uint8,))
    _check.shape("scales", scales, tuple(blocks.shape[:-1]))
    nan = scales == E8M0_NAN
    if nan_scales == "raise" and bool(nan.any()):
        raise ValueError(
            f"scales: expected finite e8m0 scales, given {int(nan.sum())} NaN (0xFF); pass "
            "nan_scales='propagate' for the spec's NaN blocks"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    values = torch.stack((lut[b & 0xF], lut[b >> 4]), dim=-1).flatten(-2)  # [..., G, 32]
    exp = scales.to(torch.float32) - E8M0_BIAS
    factor = torch.where(nan, torch.full_like(exp, float("nan")), torch.pow(2.0, exp))
    out = values * factor[..., None]
    return out.flatten(-2).to(dtype)


def _e2m1_magnitude_code(a: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 magnitude code (0..7) of ``a >= 0``, ties to even, saturating at 6."""
    code = torch.zeros(a.shape, dtype=torch.int64, device=a.device)
    for mid, tie_up in _MIDPOINTS:
        code += (a >= mid) if tie_up else (a > mid)
    return code


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize floats to MXFP4 as OCP MX v1.0 section 6.3 converts a block.

    For each block of 32 consecutive elements of a row: shared exponent
    ``X = floor(log2(amax)) - 2`` (2 = emax of e2m1), clamped to e8m0's -127..127; an all-zero
    block gets ``X = 0``. Elements ``w / 2^X`` are rounded to the nearest e2m1 value (ties to
    even) and saturate at +-6 (``amax / 2^X`` lies in [4, 8)). Negative values keep their sign
    bit even when they round to zero.

    Args:
        w: ``[..., rows, cols]`` float32, float16, bfloat16 or float64, finite, ``cols`` a
            multiple of 32; computed in float32.

    Returns:
        ``(blocks, scales)``: ``[..., rows, cols / 32, 16]`` uint8 (element ``2k`` of a block in
        the low nibble of byte ``k``) and ``[..., rows, cols / 32]`` uint8 e8m0 exponents.

    Raises:
        ValueError: a non-float ``w``, fewer than 2 dimensions, ``cols`` not a multiple of 32,
            NaN or inf in ``w``.
    """
    _check.tensor("w", w)
    _check.dtype("w", w, _check.FLOAT_DTYPES)
    _check.ndim("w", w, 2, at_least=True)
    cols = w.shape[-1]
    if cols % MXFP4_BLOCK:
        raise ValueError(f"w: expected a last dimension that is a multiple of 32, given {cols}")
    _check.finite("w", w)
    x = w.to(torch.float32).reshape(*w.shape[:-1], cols // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = x.abs().amax(dim=-1)
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    shared = torch.where(amax > 0, e - 1 - E2M1_EMAX, torch.zeros_like(e))
    shared = shared.clamp(-E8M0_BIAS, E8M0_BIAS)
    v = x * torch.pow(2.0, -shared.to(torch.float32))[..., None]
    code = _e2m1_magnitude_code(v.abs()) | (torch.signbit(v).to(torch.int64) << 3)
    pairs = code.reshape(*code.shape[:-1], MXFP4_BLOCK // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, (shared + E8M0_BIAS).to(torch.uint8)
