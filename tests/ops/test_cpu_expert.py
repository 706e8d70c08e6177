"""expertflow::cpu_expert against its plain-torch reference (expertflow.ops.reference) on fresh
random experts in every format and activation, and against the families' own expert math."""

from __future__ import annotations

import math

import pytest
import torch

from expertflow import formats, ops
from expertflow.ops import reference

GATED = ("silu_gated", "gelu_gated", "gelu_tanh_gated", "gpt_oss")
PACKED = ("int8", "int4", "fp8", "mxfp4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack(w: torch.Tensor, fmt: str, *, group: int | None = None, block=(128, 128)):
    """``w`` ``[out, in]`` float32 as the op's tensors of ``fmt``."""
    if fmt == "int8":
        return list(formats.quantize_int8(w))
    if fmt == "int4":
        return list(formats.quantize_int4(w, group or math.gcd(w.shape[1], 64)))
    if fmt == "fp8":
        return list(formats.quantize_fp8_block(w, block))
    return list(formats.quantize_mxfp4(w))


def make_expert(
    fmt,
    hidden,
    inter,
    activation,
    *,
    gen,
    wdtype=torch.float32,
    bias=False,
    transposed=False,
    group=None,
    block=(128, 128),
):
    up_out = 2 * inter if activation in GATED else inter
    w_up = torch.randn(up_out, hidden, generator=gen) / math.sqrt(hidden)
    w_down = torch.randn(hidden, inter, generator=gen) / math.sqrt(inter)
    if fmt == "float":
        up = [(w_up.t() if transposed else w_up).contiguous().to(wdtype)]
        down = [(w_down.t() if transposed else w_down).contiguous().to(wdtype)]
    else:
        up = pack(w_up, fmt, group=group, block=block)
        down = pack(w_down, fmt, group=group, block=block)
    kwargs = dict(format=fmt, activation=activation, transposed=transposed, fp8_block=block)
    if activation == "gpt_oss":
        kwargs.update(alpha=1.702, limit=0.9)  # a small limit: both clamps bite
    if bias:
        kwargs["up_bias"] = torch.randn(up_out, generator=gen).to(wdtype)
        kwargs["down_bias"] = torch.randn(hidden, generator=gen).to(wdtype)
    return up, down, kwargs


def check(x, up, down, kwargs, tol=1e-4):
    got = ops.cpu_expert(x, up, down, **kwargs)
    want = reference.cpu_expert(x, up, down, **kwargs)
    assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype != torch.float32:  # both round the same fp32 value; order can flip one ulp
        tol = 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


# (hidden, inter): odd sizes, vector tails, and sizes whose groups are not multiples of 8.
FLOAT_SIZES = [(40, 37), (300, 131)]
PACKED_SIZES = {
    "int8": [(40, 37), (300, 131)],
    "int4": [(48, 38), (256, 96), (320, 160)],
    "fp8": [(40, 37), (300, 200)],
    "mxfp4": [(64, 96), (288, 160)],
}


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("activation", ops.CPU_EXPERT_ACTIVATIONS)
@pytest.mark.parametrize("wdtype", FLOAT_DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_float_formats(tokens, activation, wdtype, transposed):
    gen = torch.Generator().manual_seed(tokens * 7 + len(activation))
    for hidden, inter in FLOAT_SIZES:
        up, down, kw = make_expert(
            "float",
            hidden,
            inter,
            activation,
            gen=gen,
            wdtype=wdtype,
            bias=activation == "gpt_oss",
            transposed=transposed,
        )
        check(torch.randn(tokens, hidden, generator=gen), up, down, kw)


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("activation", ["silu_gated", "gpt_oss", "relu2", "gelu"])
@pytest.mark.parametrize("fmt", PACKED)
def test_packed_formats(tokens, activation, fmt):
    gen = torch.Generator().manual_seed(tokens * 11 + len(activation) + len(fmt))
    for hidden, inter in PACKED_SIZES[fmt]:
        up, down, kw = make_expert(fmt, hidden, inter, activation, gen=gen, bias=True)
        check(torch.randn(tokens, hidden, generator=gen), up, down, kw)


@pytest.mark.parametrize("group", [8, 16, 32, 128])
def test_int4_group_sizes(group):
    gen = torch.Generator().manual_seed(group)
    up, down, kw = make_expert("int4", 256, 128, "silu_gated", gen=gen, group=group)
    check(torch.randn(5, 256, generator=gen), up, down, kw)


@pytest.mark.parametrize("block", [(128, 128), (16, 12), (7, 32)])
def test_fp8_blocks(block):
    gen = torch.Generator().manual_seed(block[1])
    up, down, kw = make_expert("fp8", 200, 70, "silu_gated", gen=gen, block=block)
    check(torch.randn(4, 200, generator=gen), up, down, kw)


def test_fp8_nan_codes_and_mxfp4_special_scales():
    gen = torch.Generator().manual_seed(3)
    up, down, kw = make_expert("fp8", 64, 32, "relu", gen=gen)
    up[0].view(torch.uint8)[5, 9] = 0x7F  # NaN code
    x = torch.randn(2, 64, generator=gen)
    got = ops.cpu_expert(x, up, down, **kw)
    torch.testing.assert_close(got, reference.cpu_expert(x, up, down, **kw), equal_nan=True)
    assert got.isnan().all()
    up, down, kw = make_expert("mxfp4", 64, 32, "relu", gen=gen)
    up[1][3, 1] = 0  # 2^-127: a subnormal scale
    check(x, up, down, kw)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["float", "int4"])
def test_half_inputs_keep_their_dtype(xdtype, fmt):
    gen = torch.Generator().manual_seed(5)
    up, down, kw = make_expert(fmt, 64, 48, "silu_gated", gen=gen, wdtype=xdtype, bias=True)
    check(torch.randn(3, 64, generator=gen).to(xdtype), up, down, kw)


def test_zero_tokens():
    gen = torch.Generator().manual_seed(0)
    up, down, kw = make_expert("int8", 32, 16, "silu_gated", gen=gen)
    assert ops.cpu_expert(torch.empty(0, 32), up, down, **kw).shape == (0, 32)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4", "fp8", "mxfp4"])
def test_opcheck(fmt):
    gen = torch.Generator().manual_seed(1)
    up, down, kw = make_expert(fmt, 64, 32, "gpt_oss", gen=gen, bias=True)
    x = torch.randn(3, 64, generator=gen)
    args = (
        x,
        up,
        kw.pop("up_bias"),
        down,
        kw.pop("down_bias"),
        kw["format"],
        kw["activation"],
        kw["transposed"],
        kw["alpha"],
        kw["limit"],
        list(kw["fp8_block"]),
    )
    # test_schema compares inputs before and after with arithmetic torch lacks for float8 on the
    # CPU ("mul_cpu_reduced_float" not implemented): fp8 runs the other checks.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    kwargs = {"test_utils": utils} if fmt == "fp8" else {}
    torch.library.opcheck(torch.ops.expertflow.cpu_expert.default, args, **kwargs)


def _err(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_arguments_are_named():
    gen = torch.Generator().manual_seed(2)
    up, down, kw = make_expert("int8", 32, 16, "silu_gated", gen=gen)
    x = torch.randn(2, 32)
    _err(lambda: ops.cpu_expert(x, up, down, **{**kw, "format": "int3"}), "format must be")
    _err(lambda: ops.cpu_expert(x, up, down, **{**kw, "activation": "tanh"}), "activation must")
    _err(lambda: ops.cpu_expert(x, up, down, **{**kw, "format": "int4"}), r"up\[0\] must be")
    _err(lambda: ops.cpu_expert(x, up, down, **{**kw, "transposed": True}), "float format only")
    _err(lambda: ops.cpu_expert(x, up, down, **{**kw, "activation": "silu"}), "down must be")
    _err(lambda: ops.cpu_expert(torch.randn(2, 30), up, down, **kw), "input size 32")
    _err(lambda: ops.cpu_expert(x.long(), up, down, **kw), "x must be float32")
    _err(lambda: ops.cpu_expert(x, up[:1], down, **kw), "takes 2 tensors")
    _err(lambda: ops.cpu_expert(x, up, down, **kw, up_bias=torch.zeros(5)), "up_bias must be")
    w = torch.randn(64, 32)
    _err(lambda: ops.cpu_expert(x, [w.t()], [w], format="float"), "contiguous")
