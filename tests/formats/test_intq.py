"""int8 per output channel and int4 per group (symmetric), against their definitions."""

from __future__ import annotations

import pytest
import torch

from expertflow.formats import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from tests.formats.conftest import random_weight

ROUNDING = 2.0**-21  # float32 rounding of code * scale and of the difference, relative to |w|


# int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_round_trip_error_at_most_half_a_step(gen, dtype):
    w = random_weight(gen, 96, 200).clamp(-6e4, 6e4).to(dtype)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (96,)
    wf = w.float()
    assert torch.equal(scale, wf.abs().amax(dim=1) / 127)
    assert int(q.abs().max(dim=1).values.min()) == 127  # each row's amax uses the full range
    assert int(q.min()) >= -127  # symmetric: -128 is never produced
    back = dequantize_int8(q, scale, dtype=torch.float32)
    assert bool(((back - wf).abs() <= scale[:, None] / 2 + ROUNDING * wf.abs()).all())


def test_int8_exact_on_representable_values(gen):
    codes = torch.randint(-127, 128, (64, 100), generator=gen)
    codes[:, 0] = 127
    step = 2.0 ** torch.randint(-30, 30, (64,), generator=gen).float()
    w = codes.float() * step[:, None]
    q, scale = quantize_int8(w)
    assert torch.equal(scale, step) and torch.equal(q.long(), codes)
    assert torch.equal(dequantize_int8(q, scale, dtype=torch.float32), w)


def test_int8_zero_rows_and_output_dtype():
    w = torch.zeros(3, 8)
    w[1, 2] = -2.54
    q, scale = quantize_int8(w)
    assert scale[0] == 1.0 and scale[2] == 1.0 and bool((q[[0, 2]] == 0).all())
    assert int(q[1, 2]) == -127
    out = dequantize_int8(q, scale)
    assert out.dtype == torch.bfloat16 and bool((out[[0, 2]] == 0).all())


def test_int8_bad_input():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scale: expected shape \(4,\), given \(4, 1\)"):
        dequantize_int8(q, torch.ones(4, 1))
    with pytest.raises(ValueError, match="scale: expected finite values, given 1 NaN or inf"):
        dequantize_int8(q, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="q: expected dtype torch.int8, given torch.uint8"):
        dequantize_int8(q.view(torch.uint8), torch.ones(4))
    with pytest.raises(ValueError, match="w: expected finite values"):
        quantize_int8(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="w: expected 2 dimensions, given 1"):
        quantize_int8(torch.ones(4))


# int4


def test_int4_packing_order_hand_example():
    # amax 7 in the group -> scale 1, codes = the values; element 2k low nibble, 2k+1 high.
    w = torch.tensor([[1.0, -2.0, 7.0, -7.0, 0.0, 3.0, -1.0, 4.0]])
    packed, scale = quantize_int4(w, group_size=8)
    assert scale.tolist() == [[1.0]]
    assert packed.tolist() == [[0xE1, 0x97, 0x30, 0x4F]]
    assert torch.equal(dequantize_int4(packed, scale, group_size=8, dtype=torch.float32), w)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_round_trip_error_at_most_half_a_step(gen, group_size):
    rows, cols = 48, 512
    w = random_weight(gen, rows, cols)
    packed, scale = quantize_int4(w, group_size=group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols // 2)
    assert scale.dtype == torch.float32 and scale.shape == (rows, cols // group_size)
    groups = w.reshape(rows, cols // group_size, group_size)
    assert torch.equal(scale, groups.abs().amax(dim=2) / 7)
    codes = unpack_int4(packed)
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7
    back = dequantize_int4(packed, scale, group_size=group_size, dtype=torch.float32)
    step = scale.repeat_interleave(group_size, dim=1)
    assert bool(((back - w).abs() <= step / 2 + ROUNDING * w.abs()).all())


def test_int4_exact_on_representable_values_and_zero_groups(gen):
    codes = torch.randint(-7, 8, (16, 64), generator=gen)
    codes[:, ::32] = -7
    step = 2.0 ** torch.randint(-30, 30, (16, 2), generator=gen).float()
    w = codes.float() * step.repeat_interleave(32, dim=1)
    w[3, 32:] = 0.0
    packed, scale = quantize_int4(w, group_size=32)
    assert scale[3, 1] == 1.0
    assert torch.equal(scale[torch.arange(16) != 3], step[torch.arange(16) != 3])
    assert torch.equal(dequantize_int4(packed, scale, group_size=32, dtype=torch.float32), w)


def test_int4_code_minus_8_decodes():
    packed = torch.tensor([[0x88, 0x7F]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[-8, -8, -1, 7]]
    out = dequantize_int4(packed, torch.tensor([[0.5]]), group_size=4, dtype=torch.float32)
    assert out.tolist() == [[-4.0, -4.0, -0.5, 3.5]]


def test_int4_bad_input():
    with pytest.raises(ValueError, match="group_size: expected a divisor of in = 96, given 64"):
        quantize_int4(torch.ones(2, 96), group_size=64)
    with pytest.raises(ValueError, match="group_size: expected a positive int, given 0"):
        quantize_int4(torch.ones(2, 96), group_size=0)
    with pytest.raises(ValueError, match="w: expected an even number of columns"):
        quantize_int4(torch.ones(2, 7), group_size=7)
    with pytest.raises(ValueError, match="w: expected finite values"):
        quantize_int4(torch.tensor([[float("nan"), 1.0]]), group_size=2)
    packed = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size: expected a divisor of in = 128, given 48"):
        dequantize_int4(packed, torch.ones(4, 2), group_size=48)
    with pytest.raises(ValueError, match=r"scale: expected shape \(4, 2\), given \(4, 4\)"):
        dequantize_int4(packed, torch.ones(4, 4), group_size=64)
    with pytest.raises(ValueError, match="scale: expected finite values"):
        dequantize_int4(packed, torch.full((4, 2), float("-inf")), group_size=64)
    with pytest.raises(ValueError, match="packed: expected dtype torch.uint8, given torch.int8"):
        dequantize_int4(packed.view(torch.int8), torch.ones(4, 2), group_size=64)
