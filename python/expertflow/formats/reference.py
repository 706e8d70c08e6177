"""Plain-torch reference implementations of the expert formats (DESIGN.md section 8).

Written from the formats' specs; kernels are tested against these. Everything runs on any
device torch supports and computes in float32.

- fp8 block (``fp8.py``): ``[out, in]`` float8_e4m3fn, float32 scales
  ``[ceil(out/128), ceil(in/128)]``.
- mxfp4 (``mxfp4.py``): ``[..., rows, cols/32, 16]`` uint8 e2m1 codes, low nibble first; e8m0
  uint8 scales ``[..., rows, cols/32]``.
- int8 (``intq.py``): ``[out, in]`` int8, float32 scales ``[out]``.
- int4 (``intq.py``): ``[out, in/2]`` uint8, low nibble first; float32 scales ``[out, in/G]``.
"""

from __future__ import annotations

from .fp8 import FP8_E4M3_MAX, dequantize_fp8_block, quantize_fp8_block
from .intq import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, unpack_int4
from .mxfp4 import FP4_VALUES, MXFP4_BLOCK, dequantize_mxfp4, quantize_mxfp4

__all__ = [
    "FP4_VALUES",
    "FP8_E4M3_MAX",
    "MXFP4_BLOCK",
    "dequantize_fp8_block",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_mxfp4",
    "quantize_fp8_block",
    "quantize_int4",
    "quantize_int8",
    "quantize_mxfp4",
    "unpack_int4",
]
