"""MXFP4 against the OCP MX v1.0 spec (e2m1 elements, e8m0 scales, blocks of 32) in GPT-OSS's
``*_blocks`` / ``*_scales`` layout (element 2k in the low nibble of byte k, as transformers'
``convert_moe_packed_tensors`` reads it)."""

from __future__ import annotations

import math

import pytest
import torch

from expertflow.formats import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4


def _e2m1_from_bits(code: int) -> float:
    """e2m1 decoded from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    if exp == 0:  # subnormal: 2^(1 - bias) * 0.m
        return sign * 0.5 * man
    return sign * 2.0 ** (exp - 1) * (1 + 0.5 * man)


def test_lookup_table_matches_the_spec():
    assert [_e2m1_from_bits(c) for c in range(16)] == list(FP4_VALUES)
    assert [math.copysign(1.0, v) for v in FP4_VALUES] == [1.0] * 8 + [-1.0] * 8


def test_dequantize_hand_example():
    # one row, 64 columns = 2 blocks. Block 0: scale byte 128 -> 2^1; block 1: 125 -> 2^-2.
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # elements 0, 1: low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[0, 0, 15] = 0xF9  # elements 30, 31: low 9 (-0.5), high 15 (-6.0)
    blocks[0, 1, 3] = 0x7C  # elements 38, 39 of the row: low 12 (-2.0), high 7 (6.0)
    scales = torch.tensor([[128, 125]], dtype=torch.uint8)
    expected = torch.zeros(1, 64)
    expected[0, 0], expected[0, 1] = 1.0, 2.0
    expected[0, 30], expected[0, 31] = -1.0, -12.0
    expected[0, 38], expected[0, 39] = -0.5, 1.5
    out = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
    assert out.shape == (1, 64) and torch.equal(out, expected)
    assert torch.equal(dequantize_mxfp4(blocks, scales), expected.to(torch.bfloat16))


def test_quantize_hand_example():
    # amax 5 -> floor(log2 5) - 2 = 0: scale byte 127, elements rounded on the e2m1 grid with
    # ties to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    row = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.3, 0.6, -2.9, 0.0] + [0.0] * 20
    blocks, scales = quantize_mxfp4(torch.tensor([row]))
    assert scales.tolist() == [[127]]
    codes = [0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0xE, 0x9, 0x1, 0xD, 0x0] + [0] * 20
    packed = [codes[2 * k] | (codes[2 * k + 1] << 4) for k in range(16)]
    assert blocks.tolist() == [[packed]]
    # amax 7.9 -> X = 0 too; 7.9 saturates to 6. amax 0.1 -> floor(log2 0.1) - 2 = -6.
    blocks, scales = quantize_mxfp4(torch.tensor([[7.9] + [0.0] * 31, [0.1] + [0.0] * 31]))
    assert scales.tolist() == [[127], [121]]
    assert blocks[:, 0, 0].tolist() == [0x7, 0x7]  # code 7 = 6.0: 7.9 and 0.1 * 2^6 = 6.4 saturate


def _reference_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code by brute force over the 8 magnitudes; ties to the even code."""
    grid = torch.tensor(FP4_VALUES[:8])
    dist = (v.abs()[..., None] - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    even = tied & (torch.arange(8) % 2 == 0)
    mag = torch.where(even.any(-1), even.int().argmax(-1), tied.int().argmax(-1))
    return mag | (torch.signbit(v).long() << 3)


def _unpack(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.long()
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


@pytest.mark.parametrize("shape", [(4, 8, 96), (17, 32), (2, 3, 5, 64)])
def test_quantize_random_against_brute_force(gen, shape):
    w = (
        torch.randn(shape, generator=gen)
        * 10.0 ** (torch.rand(shape[:-1], generator=gen) * 8 - 4)[..., None]
    )
    blocks, scales = quantize_mxfp4(w)
    nblk = shape[-1] // 32
    assert blocks.shape == (*shape[:-1], nblk, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (*shape[:-1], nblk) and scales.dtype == torch.uint8
    x = w.reshape(*shape[:-1], nblk, 32)
    amax = x.abs().amax(-1).double()
    shared = torch.floor(torch.log2(amax)) - 2
    assert torch.equal(scales.long(), (shared + 127).long())
    v = x / torch.pow(2.0, shared.float())[..., None]
    assert torch.equal(_unpack(blocks), _reference_codes(v))
    # error: half the e2m1 step at |v| (0.25, 0.5, 1 below 2, 4, 6) or the saturation above 6
    back = dequantize_mxfp4(blocks, scales, dtype=torch.float32).reshape(x.shape)
    a = v.abs()
    half_step = torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))
    bound = torch.maximum(half_step, a - 6) * torch.pow(2.0, shared.float())[..., None]
    assert bool(((back - x).abs() <= bound).all())


def test_exact_round_trip_on_representable_values(gen):
    codes = torch.randint(0, 16, (8, 4, 32), generator=gen)
    codes[..., 5] = torch.randint(0, 2, (8, 4), generator=gen) * 8 + 6  # +-4: amax in [4, 8)
    exp = torch.randint(0, 252, (8, 4), generator=gen)  # 6 * 2^124 fits float32
    lut = torch.tensor(FP4_VALUES)
    w = (lut[codes] * torch.pow(2.0, (exp - 127).float())[..., None]).reshape(8, 128)
    blocks, scales = quantize_mxfp4(w)
    assert torch.equal(scales.long(), exp)
    assert torch.equal(_unpack(blocks), codes)
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype=torch.float32), w)


def test_zero_blocks_extremes_and_negative_zero():
    w = torch.zeros(2, 64)
    w[1, 40] = -6.0 * 2.0**-127  # the smallest e8m0 scale, largest code
    w[0, 3] = -0.0
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[127, 127], [127, 0]]
    back = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
    assert torch.equal(back, w) and back[0, 3].item() == 0 and math.copysign(1, back[0, 3]) < 0
    tiny = torch.full((1, 32), 2.0**-140)  # below 2^-127 * 0.5: clamped scale, rounds to 0
    blocks, scales = quantize_mxfp4(tiny)
    assert scales.tolist() == [[0]] and bool((blocks == 0).all())
    big = torch.full((1, 32), 3.0e38)
    blocks, scales = quantize_mxfp4(big)
    assert scales.tolist() == [[127 + 125]]  # floor(log2 3e38) = 127
    assert torch.allclose(dequantize_mxfp4(blocks, scales, dtype=torch.float32), big, rtol=0.25)


def test_nan_scale():
    blocks = torch.full((2, 2, 16), 0x22, dtype=torch.uint8)
    scales = torch.tensor([[127, 0xFF], [127, 127]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales: expected finite e8m0 scales, given 1 NaN"):
        dequantize_mxfp4(blocks, scales)
    out = dequantize_mxfp4(blocks, scales, dtype=torch.float32, nan_scales="propagate")
    assert bool(out[0, 32:].isnan().all()) and not bool(out[0, :32].isnan().any())
    assert bool((out[1] == 1.0).all())
    zeros = dequantize_mxfp4(torch.zeros_like(blocks), scales, nan_scales="propagate")
    assert bool(zeros[0, 32:].isnan().all())  # NaN even for zero codes: the block is NaN


def test_bad_input():
    blocks = torch.zeros(3, 2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales: expected shape \(3, 2\), given \(3, 3\)"):
        dequantize_mxfp4(blocks, torch.zeros(3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales: expected dtype torch.uint8, given torch.float32"):
        dequantize_mxfp4(blocks, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="blocks: expected a last dimension of 16 bytes"):
        dequantize_mxfp4(torch.zeros(3, 2, 8, dtype=torch.uint8), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="blocks: expected at least 3 dimensions, given 2"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(ValueError, match="nan_scales"):
        dequantize_mxfp4(blocks, torch.zeros(3, 2, dtype=torch.uint8), nan_scales="ignore")
    with pytest.raises(ValueError, match="w: expected a last dimension that is a multiple of 32"):
        quantize_mxfp4(torch.ones(2, 48))
    with pytest.raises(ValueError, match="w: expected finite values, given 1 NaN or inf"):
        bad = torch.ones(2, 32)
        bad[1, 7] = float("nan")
        quantize_mxfp4(bad)
    with pytest.raises(ValueError, match="w: expected at least 2 dimensions, given 1"):
        quantize_mxfp4(torch.ones(32))
