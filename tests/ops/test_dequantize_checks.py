"""The dequantize ops' boundary: ValueErrors naming the argument, the fake kernels (same checks,
output shapes), and torch.library.opcheck of each op."""

from __future__ import annotations

import pytest
import torch

from expertflow import formats, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _u8(*shape):
    return torch.zeros(shape, dtype=torch.uint8)


def _f32(*shape):
    return torch.ones(shape)


_FP8 = torch.float8_e4m3fn
BAD = [
    (lambda: ops.dequantize_int8(_u8(4, 8), _f32(4)), "dequantize_int8: q must be int8, got Byte"),
    (lambda: ops.dequantize_int8(_u8(4).view(torch.int8), _f32(4)), r"q must be 2-D \[out, in\]"),
    (
        lambda: ops.dequantize_int8(_u8(4, 8).view(torch.int8), _f32(3)),
        r"dequantize_int8: scale must be \[out\] = \[4\], got \[3\]",
    ),
    (
        lambda: ops.dequantize_int8(_u8(4, 8).view(torch.int8), _f32(4).double()),
        "scale must be float32, got Double",
    ),
    (
        lambda: ops.dequantize_int8(_u8(4, 8).view(torch.int8), _f32(4), torch.int32),
        "dtype must be float32, bfloat16 or float16, got Int",
    ),
    (
        lambda: ops.dequantize_int4(_u8(64, 16), _f32(64, 3), 8),
        r"dequantize_int4: scale must be \[out, in/group_size\] = \[64, 4\], got \[64, 3\]",
    ),
    (
        lambda: ops.dequantize_int4(_u8(64, 16), _f32(64, 3), 12),
        "group_size must be a positive divisor of in = 32, got 12",
    ),
    (lambda: ops.dequantize_int4(_u8(64, 16), _f32(64, 3), 0), "positive divisor .* got 0"),
    (lambda: ops.dequantize_int4(_u8(64, 16).view(torch.int8), _f32(64, 4), 8), "be uint8"),
    (
        lambda: ops.dequantize_fp8_block(_u8(130, 200).view(_FP8), _f32(1, 2)),
        r"scale_inv must be \[ceil\(out/block_rows\), ceil\(in/block_cols\)\] = \[2, 2\], "
        r"got \[1, 2\]",
    ),
    (
        lambda: ops.dequantize_fp8_block(_u8(4, 4), _f32(1, 1)),
        "dequantize_fp8_block: weight must be float8_e4m3fn, got Byte",
    ),
    (
        lambda: ops.dequantize_fp8_block(_u8(4, 4).view(_FP8), _f32(1, 1), (0, 128)),
        "block_rows and block_cols must be >= 1, got 0 and 128",
    ),
    (
        lambda: ops.dequantize_mxfp4(_u8(4, 2, 15), _u8(4, 2)),
        r"blocks must be \[rows, nblocks, 16\] .* got shape \[4, 2, 15\]",
    ),
    (lambda: ops.dequantize_mxfp4(_u8(4, 32), _u8(4, 2)), "blocks must be 3-D"),
    (
        lambda: ops.dequantize_mxfp4(_u8(4, 2, 16), _u8(4, 3)),
        r"dequantize_mxfp4: scales must be \[rows, nblocks\] = \[4, 2\], got \[4, 3\]",
    ),
    (lambda: ops.dequantize_mxfp4(_u8(4, 2, 16), _f32(4, 2)), "scales must be uint8, got Float"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs_are_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _meta(call):
    """`call` with torch.zeros/ones making meta tensors: the fake kernel's checks."""
    with torch.device("meta"):
        return call()


@pytest.mark.parametrize("call,message", BAD)
def test_fake_kernels_refuse_as_the_native_ones(call, message):
    # The fake kernel names the dtype as torch does (torch.uint8) where C++ says Byte.
    message = message.replace("Byte", "torch.uint8").replace("Double", "torch.float64")
    message = message.replace("got Float", "got torch.float32").replace(
        "got Int", "got torch.int32"
    )
    with pytest.raises(ValueError, match=message):
        _meta(call)


def test_fake_kernels_give_the_output_shapes():
    with torch.device("meta"):
        q = torch.zeros(5, 7, dtype=torch.int8)
        assert ops.dequantize_int8(q, torch.ones(5)).shape == (5, 7)
        out = ops.dequantize_int4(_u8(5, 6), _f32(5, 3), 4, torch.float16)
        assert out.shape == (5, 12) and out.dtype == torch.float16
        out = ops.dequantize_fp8_block(_u8(130, 200).view(_FP8), _f32(2, 2), dtype=torch.float32)
        assert out.shape == (130, 200) and out.dtype == torch.float32
        out = ops.dequantize_mxfp4(_u8(3, 4, 16), _u8(3, 4))
        assert out.shape == (3, 128) and out.dtype == torch.bfloat16 and out.is_meta


def test_inputs_on_two_devices_are_refused():
    with pytest.raises(ValueError, match="scale must be on q' device meta"):
        ops.dequantize_int8(torch.zeros(2, 2, dtype=torch.int8, device="meta"), _f32(2))


DEFAULT_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")
DEFAULT_TESTS += ("test_aot_dispatch_dynamic",)
# test_schema compares inputs before and after with a multiply torch lacks for float8_e4m3fn
# ("mul_cpu_reduced_float" not implemented): the fp8 op runs the other checks.
FP8_OPCHECK_TESTS = DEFAULT_TESTS[1:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, gen, dtype):
    q, s = formats.quantize_int8(torch.randn(6, 10, generator=gen))
    p4, s4 = formats.quantize_int4(torch.randn(6, 16, generator=gen), 8)
    w8, s8 = formats.quantize_fp8_block(torch.randn(9, 20, generator=gen), (4, 8))
    b, e = formats.quantize_mxfp4(torch.randn(3, 64, generator=gen))
    calls = [
        (torch.ops.expertflow.dequantize_int8.default, (q, s, dtype)),
        (torch.ops.expertflow.dequantize_int4.default, (p4, s4, 8, dtype)),
        (torch.ops.expertflow.dequantize_fp8_block.default, (w8, s8, 4, 8, dtype)),
        (torch.ops.expertflow.dequantize_mxfp4.default, (b, e, dtype)),
    ]
    for op, args in calls:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        tests = FP8_OPCHECK_TESTS if args[0].dtype == torch.float8_e4m3fn else DEFAULT_TESTS
        torch.library.opcheck(op, args, test_utils=tests)
