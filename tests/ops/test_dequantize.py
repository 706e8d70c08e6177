"""expertflow.ops.dequantize_* against the plain-torch references of expertflow.formats.

Exact: every output equals the reference's bit for bit, except that NaN only has to be NaN (its
payload is whatever the float32 -> dtype conversion makes of it, which differs between torch's
vectorised and scalar paths). Inputs are both quantized weights and raw random bytes (every code,
NaN codes included) with scales spread over many binades (float16 overflow and subnormals).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import expertflow
from expertflow import formats, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    got = got.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = _BITS[want.dtype]
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


def raw_bytes(shape, gen) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def spread_scales(shape, gen) -> torch.Tensor:
    """Signed float32 scales over 2^-40 .. 2^40: products overflow float16 or become subnormal."""
    sign = torch.where(torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0)
    return sign * torch.exp2(torch.randn(shape, generator=gen) * 12).clamp(2.0**-40, 2.0**40)


def weights(shape, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * torch.exp2(torch.randn(shape[0], 1, generator=gen))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (7, 33), (0, 16), (16, 0), (300, 520)])
@pytest.mark.parametrize("source", ["quantized", "raw"])
def test_int8_matches_reference(device, gen, dtype, shape, source):
    if source == "quantized":
        q, scale = formats.quantize_int8(weights(shape, gen))
    else:
        q, scale = raw_bytes(shape, gen).view(torch.int8), spread_scales(shape[:1], gen)
    got = ops.dequantize_int8(q.to(device), scale.to(device), dtype)
    assert_same(got, formats.dequantize_int8(q, scale, dtype))


INT4_CASES = [(1, 8, 8), (1, 2, 2), (5, 64, 16), (3, 6, 3), (3, 6, 1), (130, 256, 128)]
INT4_CASES += [(0, 64, 32), (300, 512, 64), (4, 128, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out,inp,group", INT4_CASES)
@pytest.mark.parametrize("source", ["quantized", "raw"])
def test_int4_matches_reference(device, gen, dtype, out, inp, group, source):
    if source == "quantized":
        packed, scale = formats.quantize_int4(weights((out, inp), gen), group)
    else:
        packed, scale = raw_bytes((out, inp // 2), gen), spread_scales((out, inp // group), gen)
    got = ops.dequantize_int4(packed.to(device), scale.to(device), group, dtype)
    assert_same(got, formats.dequantize_int4(packed, scale, group, dtype))


FP8_CASES = [(1, 1, (128, 128)), (130, 200, (128, 128)), (256, 256, (128, 128)), (7, 33, (4, 8))]
FP8_CASES += [(0, 16, (128, 128)), (16, 0, (128, 128)), (300, 1000, (128, 128)), (5, 7, (1, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out,inp,block", FP8_CASES)
@pytest.mark.parametrize("source", ["quantized", "raw"])
def test_fp8_block_matches_reference(device, gen, dtype, out, inp, block, source):
    if source == "quantized":
        weight, scale = formats.quantize_fp8_block(weights((out, inp), gen), block)
    else:
        weight = raw_bytes((out, inp), gen).view(torch.float8_e4m3fn)
        scale = spread_scales((-(-out // block[0]), -(-inp // block[1])), gen)
    got = ops.dequantize_fp8_block(weight.to(device), scale.to(device), block, dtype)
    assert_same(got, formats.dequantize_fp8_block(weight, scale, block, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,nblocks", [(1, 1), (3, 5), (0, 4), (4, 0), (300, 16), (7, 90)])
@pytest.mark.parametrize("source", ["quantized", "raw"])
def test_mxfp4_matches_reference(device, gen, dtype, rows, nblocks, source):
    if source == "quantized":
        blocks, scales = formats.quantize_mxfp4(weights((rows, nblocks * 32), gen))
    else:
        blocks, scales = raw_bytes((rows, nblocks, 16), gen), raw_bytes((rows, nblocks), gen)
    got = ops.dequantize_mxfp4(blocks.to(device), scales.to(device), dtype)
    want = formats.dequantize_mxfp4(blocks, scales, dtype, nan_scales="propagate")
    assert_same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_every_code_and_nan(device, dtype):
    weight = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 128)
    weight = weight.view(torch.float8_e4m3fn)
    for s in (1.0, 2.0**-20, 3.0, 2.0**20, -0.75):
        scale = torch.tensor([[s]])
        got = ops.dequantize_fp8_block(weight.to(device), scale.to(device), (128, 128), dtype)
        assert_same(got, formats.dequantize_fp8_block(weight, scale, (128, 128), dtype))
        assert torch.isnan(got.cpu()).flatten().nonzero().flatten().tolist() == [127, 255]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_every_code_and_special_scales(device, dtype):
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 16, 16)  # every byte
    scales = torch.tensor([[0, 1, 126, 127, 128, 253, 254, 255] * 2], dtype=torch.uint8)
    got = ops.dequantize_mxfp4(blocks.to(device), scales.to(device), dtype).cpu()
    assert_same(got, formats.dequantize_mxfp4(blocks, scales, dtype, nan_scales="propagate"))
    nan_blocks = torch.isnan(got.view(16, 32)).all(dim=1).nonzero().flatten().tolist()
    assert nan_blocks == [7, 15] and torch.isnan(got).sum() == 64
    # code 1 (0.5) at scale 2^-127: 2^-128, a float32 subnormal; float16 flushes it to zero.
    assert got[0, 2].item() == (0.0 if dtype == torch.float16 else 2.0**-128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_code_minus_8_and_every_byte(device, dtype):
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(2, 128)
    scale = torch.tensor([[0.5, -3.0], [1.0, 2.0**-30]])
    got = ops.dequantize_int4(packed.to(device), scale.to(device), 128, dtype)
    assert_same(got, formats.dequantize_int4(packed, scale, 128, dtype))
    eights = torch.full((1, 4), 0x88, dtype=torch.uint8)
    got = ops.dequantize_int4(eights.to(device), torch.tensor([[0.25]], device=device), 8, dtype)
    assert got.cpu().float().tolist() == [[-2.0] * 8]


def _views(device, gen):
    """Each op's inputs as views of larger byte buffers: strided, transposed or misaligned."""
    buf = raw_bytes((40, 300), gen).to(device)
    q = buf[:, 1:257:2].view(torch.int8)  # strided columns
    int8 = (ops.dequantize_int8, formats.dequantize_int8, (q, spread_scales(80, gen)[::2]), ())
    packed = buf.flatten()[3 : 3 + 40 * 64].view(40, 64)  # contiguous, odd storage offset
    s4 = spread_scales((8, 40), gen).t()  # transposed scale
    int4 = (ops.dequantize_int4, formats.dequantize_int4, (packed, s4), (16,))
    w8 = buf.t()[:200, :33].view(torch.float8_e4m3fn)  # transposed
    s8 = spread_scales((2, 5), gen)
    fp8 = (ops.dequantize_fp8_block, formats.dequantize_fp8_block, (w8, s8), ((128, 8),))
    blocks = buf[:, :288].reshape(40, 18, 16)[:, ::2]  # every other block
    sc = raw_bytes((9, 40), gen).t()
    mx = (ops.dequantize_mxfp4, formats.dequantize_mxfp4, (blocks, sc), ())
    return [int8, int4, fp8, mx]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, gen, dtype):
    for op, ref, tensors, extra in _views(device, gen):
        tensors = tuple(t.to(device) for t in tensors)
        got = op(*tensors, *extra, dtype)
        kw = {"nan_scales": "propagate"} if op is ops.dequantize_mxfp4 else {}
        assert_same(got, ref(*(t.cpu() for t in tensors), *extra, dtype, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_on_expert_sized_inputs(gen, dtype):
    cases = [
        (ops.dequantize_int8, (raw_bytes((512, 1024), gen).view(torch.int8),), (512,), ()),
        (ops.dequantize_int4, (raw_bytes((512, 512), gen),), (512, 8), (128,)),
        (
            ops.dequantize_fp8_block,
            (raw_bytes((600, 1000), gen).view(torch.float8_e4m3fn),),
            (5, 8),
            ((128, 128),),
        ),
    ]
    for op, (codes,), scale_shape, extra in cases:
        scale = spread_scales(scale_shape, gen)
        want = op(codes, scale, *extra, dtype)
        assert_same(op(codes.cuda(), scale.cuda(), *extra, dtype), want)
    blocks, scales = raw_bytes((512, 90, 16), gen), raw_bytes((512, 90), gen)
    want = ops.dequantize_mxfp4(blocks, scales, dtype)
    assert_same(ops.dequantize_mxfp4(blocks.cuda(), scales.cuda(), dtype), want)


@pytest.mark.cuda
def test_cuda_refuses_cpu_scales():
    with pytest.raises(ValueError, match="scale must be on q' device cuda:0"):
        ops.dequantize_int8(torch.zeros(2, 2, dtype=torch.int8, device="cuda"), torch.ones(2))


def _conversion_inputs(gen) -> torch.Tensor:
    """float32 values probing the float32 -> bfloat16 / float16 rounding: every float16 and
    bfloat16 value, the midpoints between neighbours (ties) and one float32 ulp either side,
    the overflow and subnormal boundaries, and random bit patterns."""
    values = []
    for narrow in (torch.float16, torch.bfloat16):
        grid = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(narrow)
        grid = grid.float()
        grid = grid[torch.isfinite(grid)].sort().values
        mid = (grid[:-1].double() + grid[1:].double()) / 2
        mid = mid[mid.abs() < 3.4e38].float()
        ulp = torch.nextafter(mid, torch.full_like(mid, float("inf"))) - mid
        values += [grid, mid, mid + ulp, mid - ulp]
    random = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64)
    random = random.to(torch.int32).view(torch.float32)
    values.append(random[torch.isfinite(random)])
    return torch.cat(values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_the_output_dtype_is_torchs(device, gen, dtype):
    # q = 1: the output is the scale itself, rounded to dtype.
    scale = _conversion_inputs(gen)
    q = torch.ones(scale.numel(), 1, dtype=torch.int8)
    got = ops.dequantize_int8(q.to(device), scale.to(device), dtype)
    assert_same(got, scale[:, None].to(dtype))


_BASELINE_SCRIPT = """
import torch
from expertflow import formats, ops
from tests.ops.test_dequantize import assert_same, raw_bytes, spread_scales

gen = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    q, s = raw_bytes((9, 70), gen).view(torch.int8), spread_scales(9, gen)
    assert_same(ops.dequantize_int8(q, s, dtype), formats.dequantize_int8(q, s, dtype))
    p, s = raw_bytes((9, 64), gen), spread_scales((9, 4), gen)
    assert_same(ops.dequantize_int4(p, s, 32, dtype), formats.dequantize_int4(p, s, 32, dtype))
    w, s = raw_bytes((9, 70), gen).view(torch.float8_e4m3fn), spread_scales((3, 9), gen)
    want = formats.dequantize_fp8_block(w, s, (4, 8), dtype)
    assert_same(ops.dequantize_fp8_block(w, s, (4, 8), dtype), want)
    b, e = raw_bytes((9, 5, 16), gen), raw_bytes((9, 5), gen)
    want = formats.dequantize_mxfp4(b, e, dtype, nan_scales="propagate")
    assert_same(ops.dequantize_mxfp4(b, e, dtype), want)
print("baseline ok")
"""


@pytest.mark.slow
def test_baseline_loops_without_avx2():
    # ATEN_CPU_CAPABILITY=default selects the x86-64 baseline build of the CPU loops.
    # The child imports the expertflow this process uses, and the tests package.
    paths = [Path(expertflow.__file__).parents[1], Path(__file__).resolve().parents[2]]
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "baseline ok" in done.stdout, done.stderr[-3000:]
