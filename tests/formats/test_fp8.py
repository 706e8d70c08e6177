"""fp8 block format (e4m3 + 128 x 128 float32 tile scales) against torch's own e4m3 conversion
and against a tile-by-tile loop written from the DeepSeek-V3 layout."""

from __future__ import annotations

import pytest
import torch

from expertflow.formats import FP8_E4M3_MAX, dequantize_fp8_block, quantize_fp8_block
from tests.formats.conftest import random_weight

# e4m3: 3 mantissa bits -> nearest rounding has relative error <= 2^-4 for normal values
# (|x| >= 2^-6) and absolute error <= half the subnormal step 2^-9 below that.
REL = 2.0**-4
SUB_ABS = 2.0**-10
MIN_NORMAL = 2.0**-6
ROUNDING = 2.0**-21  # float32 rounding of code * scale and of the difference, relative to |w|


def _tile_scales(scale: torch.Tensor, rows: int, cols: int, block=(128, 128)) -> torch.Tensor:
    """Each element's tile scale, by an explicit loop over tiles."""
    out = torch.empty(rows, cols)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            r0, c0 = bi * block[0], bj * block[1]
            out[r0 : r0 + block[0], c0 : c0 + block[1]] = scale[bi, bj]
    return out


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 5), (257, 129)])
def test_round_trip_within_e4m3_error(gen, shape):
    rows, cols = shape
    w = random_weight(gen, rows, cols)
    q, scale = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32
    assert scale.shape == (-(-rows // 128), -(-cols // 128))
    s = _tile_scales(scale, rows, cols)
    # scale = amax / 448 per tile, tails included
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            tile = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert scale[bi, bj] == tile.abs().max() / FP8_E4M3_MAX
    back = dequantize_fp8_block(q, scale, dtype=torch.float32)
    err = (back - w).abs()
    bound = torch.maximum(REL * w.abs(), SUB_ABS * s) + ROUNDING * w.abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    normal = (w / s).abs() >= MIN_NORMAL
    assert bool((err[normal] <= (REL + ROUNDING) * w.abs()[normal]).all())


def test_matches_torch_e4m3_conversion(gen):
    # Each tile holds 448 so its scale is exactly 1: the codes must be torch's own conversion.
    w = (torch.randn(256, 384, generator=gen) * 100).clamp(-440, 440)
    w[::128, ::128] = FP8_E4M3_MAX
    q, scale = quantize_fp8_block(w)
    assert bool((scale == 1).all())
    assert torch.equal(q.view(torch.uint8), w.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(dequantize_fp8_block(q, scale, dtype=torch.float32), q.float())


def test_dequantize_against_tile_loop(gen):
    rows, cols = 300, 200
    codes = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN encodings here
    weight = codes.view(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=gen) * 10 ** torch.randint(-4, 4, (3, 2), generator=gen)
    expected = weight.float() * _tile_scales(scale, rows, cols)
    assert torch.equal(dequantize_fp8_block(weight, scale, dtype=torch.float32), expected)
    got = dequantize_fp8_block(weight, scale)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.to(torch.bfloat16))


def test_other_block_shape(gen):
    w = random_weight(gen, 70, 50)
    q, scale = quantize_fp8_block(w, block=(32, 16))
    assert scale.shape == (3, 4)
    back = dequantize_fp8_block(q, scale, block=(32, 16), dtype=torch.float32)
    s = _tile_scales(scale, 70, 50, block=(32, 16))
    bound = torch.maximum(REL * w.abs(), SUB_ABS * s) + ROUNDING * w.abs()
    assert bool(((back - w).abs() <= bound).all())


def test_exact_on_representable_values(gen):
    # fp8 codes times a power-of-two tile scale, each tile holding +-448: round trip is exact.
    codes = torch.randint(0, 256, (256, 256), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # NaN encodings -> 448
    codes[::128, ::128] = 0xFE  # -448 in every tile
    tile = 2.0 ** torch.randint(-20, 20, (2, 2), generator=gen).float()
    w = codes.view(torch.float8_e4m3fn).float() * _tile_scales(tile, 256, 256)
    q, scale = quantize_fp8_block(w)
    assert torch.equal(scale, tile)
    assert torch.equal(dequantize_fp8_block(q, scale, dtype=torch.float32), w)


def test_zero_tiles_and_extremes():
    w = torch.zeros(200, 300)
    w[150, 290] = -3.5  # only the last (partial) tile is non-zero
    w[0, 0] = 0.0
    q, scale = quantize_fp8_block(w)
    assert scale.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 3.5 / 448]]
    assert q.view(torch.uint8)[150, 290] == 0xFE  # -448, the largest finite magnitude
    back = dequantize_fp8_block(q, scale, dtype=torch.float32)
    expected = torch.zeros(200, 300)
    expected[150, 290] = -3.5
    assert torch.equal(back, expected)
    q, scale = quantize_fp8_block(torch.full((4, 4), 1e-44))  # amax / 448 underflows float32
    assert scale.item() == 1.0 and bool((q.float() == 0).all())


def test_nan_weight_code_propagates():
    weight = torch.zeros(2, 2, dtype=torch.uint8)
    weight[0, 1] = 0x7F  # e4m3fn NaN
    back = dequantize_fp8_block(weight.view(torch.float8_e4m3fn), torch.ones(1, 1))
    assert back.isnan().tolist() == [[False, True], [False, False]]


def test_bad_input():
    w8 = torch.zeros(200, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv: expected shape \(2, 3\), given \(2, 2\)"):
        dequantize_fp8_block(w8, torch.ones(2, 2))
    with pytest.raises(ValueError, match="scale_inv: expected dtype torch.float32"):
        dequantize_fp8_block(w8, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale_inv: expected finite values, given 1 NaN or inf"):
        bad = torch.ones(2, 3)
        bad[1, 2] = float("inf")
        dequantize_fp8_block(w8, bad)
    with pytest.raises(ValueError, match="weight: expected dtype torch.float8_e4m3fn"):
        dequantize_fp8_block(torch.zeros(200, 300), torch.ones(2, 3))
    with pytest.raises(ValueError, match="weight: expected 2 dimensions, given 3"):
        dequantize_fp8_block(w8[None], torch.ones(2, 3))
    with pytest.raises(ValueError, match="block"):
        dequantize_fp8_block(w8, torch.ones(2, 3), block=(128, 0))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        dequantize_fp8_block(w8, torch.ones(2, 3), dtype=torch.int8)
    with pytest.raises(ValueError, match="w: expected finite values"):
        quantize_fp8_block(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="w: expected dtype"):
        quantize_fp8_block(torch.ones(2, 2, dtype=torch.int32))
