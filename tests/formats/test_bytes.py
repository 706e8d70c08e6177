"""Packed bytes per weight of each format, scales included, for a Mixtral-8x7B expert
(w1, w3 ``[14336, 4096]``, w2 ``[4096, 14336]``). Run with ``-s`` to see the table.

Every format's bytes grow linearly in whole 128-row stripes (per-row scales, per-128-row fp8
tiles), so one 128-row stripe of each matrix, measured from the real quantized tensors, gives
the full expert's bytes exactly without quantizing 176 M weights in a test."""

from __future__ import annotations

import pytest
import torch

from expertflow.formats import quantize_fp8_block, quantize_int4, quantize_int8, quantize_mxfp4

SHAPES = ((14336, 4096), (4096, 14336), (14336, 4096))
STRIPE = 128


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


FORMATS = {
    "bf16": lambda w: _nbytes(w.to(torch.bfloat16)),
    "fp8 block 128x128": lambda w: _nbytes(*quantize_fp8_block(w)),
    "mxfp4 (e8m0 / 32)": lambda w: _nbytes(*quantize_mxfp4(w)),
    "int8 per channel": lambda w: _nbytes(*quantize_int8(w)),
    "int4 G=32": lambda w: _nbytes(*quantize_int4(w, group_size=32)),
    "int4 G=64": lambda w: _nbytes(*quantize_int4(w, group_size=64)),
    "int4 G=128": lambda w: _nbytes(*quantize_int4(w, group_size=128)),
    "int4 G=256": lambda w: _nbytes(*quantize_int4(w, group_size=256)),
}

# bits per weight from the format definitions: values + scale bits / weights per scale
EXPECTED_BITS = {
    "bf16": 16,
    "fp8 block 128x128": 8 + 32 / (128 * 128),
    "mxfp4 (e8m0 / 32)": 4 + 8 / 32,
    "int8 per channel": None,  # 8 + 32 / in, in differs between w1/w3 and w2
    "int4 G=32": 4 + 32 / 32,
    "int4 G=64": 4 + 32 / 64,
    "int4 G=128": 4 + 32 / 128,
    "int4 G=256": 4 + 32 / 256,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_bytes_per_weight_mixtral_expert(name):
    weights = sum(r * c for r, c in SHAPES)
    total = 0
    for rows, cols in SHAPES:
        stripe = torch.randn(STRIPE, cols, generator=torch.Generator().manual_seed(0))
        total += FORMATS[name](stripe) * (rows // STRIPE)
    bits = EXPECTED_BITS[name]
    if bits is None:
        bits = 8 + 32 * sum(r for r, _ in SHAPES) / weights
    assert total * 8 == pytest.approx(bits * weights, rel=1e-12)
    print(
        f"\nMixtral-8x7B expert, {name:18s}: {total:>11d} bytes, {total / weights:.4f} bytes"
        f"/weight, {total / (2 * weights):.4f} x bf16"
    )
