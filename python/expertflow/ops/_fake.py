"""Fake (meta) kernels of the ``torch.ops.expertflow`` operators: output shapes and dtypes
without data, for ``torch.compile``, CUDA graphs and ``torch.library.opcheck``.

The dispatcher also runs these for real calls with any input on the ``meta`` device (meta
outranks CPU and CUDA), so they repeat the checks of ``csrc/ops/*_common.cpp`` that decide
output sizes or devices: a CPU call with one meta input must fail as on the CPU, not return
uninitialised memory as ids.
"""

from __future__ import annotations

import torch

# csrc/ops/checks.h kMaxExperts: per-expert outputs stay small whatever the input.
MAX_EXPERTS = 2**20


def _check_same_device(op, first, first_name, tensor, name):
    torch._check_value(
        tensor.device == first.device,
        lambda: (
            f"{op}: {name} must be on {first_name}' device {first.device} "
            f"(all inputs on one device), got {tensor.device}"
        ),
    )


@torch.library.register_fake("expertflow::topk_gating")
def _topk_gating_fake(
    router_logits,
    top_k,
    scoring="softmax",
    renormalize=True,
    correction_bias=None,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    softmax_after_topk=False,
):
    torch._check_value(router_logits.dim() == 2, lambda: "topk_gating: router_logits must be 2-D")
    num_tokens, num_experts = router_logits.shape
    torch._check_value(
        1 <= num_experts <= MAX_EXPERTS,
        lambda: (
            "topk_gating: router_logits must have between 1 and 2^20 experts (dim 1), "
            f"got {num_experts}"
        ),
    )
    torch._check_value(
        1 <= top_k <= num_experts,
        lambda: f"topk_gating: top_k must be in [1, num_experts={num_experts}], got {top_k}",
    )
    if correction_bias is not None:
        _check_same_device(
            "topk_gating", router_logits, "router_logits", correction_bias, "correction_bias"
        )
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    return ids, weights


@torch.library.register_fake("expertflow::group_by_expert")
def _group_by_expert_fake(topk_ids, num_experts):
    torch._check_value(topk_ids.dim() == 2, lambda: "group_by_expert: topk_ids must be 2-D")
    torch._check_value(
        num_experts >= 1, lambda: f"group_by_expert: num_experts must be >= 1, got {num_experts}"
    )
    torch._check_value(
        num_experts <= MAX_EXPERTS,
        lambda: (
            f"group_by_expert: num_experts must be <= 2^20 = {MAX_EXPERTS} (counts and offsets "
            f"hold one entry per expert), got {num_experts}"
        ),
    )
    pairs = topk_ids.numel()
    order = topk_ids.new_empty((pairs,), dtype=torch.int32)
    counts = topk_ids.new_empty((num_experts,), dtype=torch.int32)
    offsets = topk_ids.new_empty((num_experts + 1,), dtype=torch.int32)
    inverse = topk_ids.new_empty((pairs,), dtype=torch.int32)
    return order, counts, offsets, inverse


@torch.library.register_fake("expertflow::combine")
def _combine_fake(expert_outputs, topk_weights, inverse):
    torch._check_value(expert_outputs.dim() == 2, lambda: "combine: expert_outputs must be 2-D")
    torch._check_value(topk_weights.dim() == 2, lambda: "combine: topk_weights must be 2-D")
    _check_same_device("combine", expert_outputs, "expert_outputs", topk_weights, "topk_weights")
    _check_same_device("combine", expert_outputs, "expert_outputs", inverse, "inverse")
    return expert_outputs.new_empty((topk_weights.shape[0], expert_outputs.shape[1]))


_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(op, name, t, want, ndim, layout):
    want_name = str(want).removeprefix("torch.")  # as C++ names it: int8, not Char
    torch._check_value(t.dtype == want, lambda: f"{op}: {name} must be {want_name}, got {t.dtype}")
    torch._check_value(
        t.dim() == ndim,
        lambda: f"{op}: {name} must be {ndim}-D {layout}, got shape {list(t.shape)}",
    )


def _check_dequant(op, dtype, tensors):
    """dtype, then each ``(name, tensor, want_dtype, ndim, layout)`` as dequant_common.cpp."""
    torch._check_value(
        dtype in _DEQUANT_DTYPES,
        lambda: f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}",
    )
    for args in tensors:
        _check_tensor(op, *args)
    first_name, first = tensors[0][0], tensors[0][1]
    for name, t, *_ in tensors[1:]:
        _check_same_device(op, first, first_name, t, name)


def _check_shape(op, name, t, layout, want):
    torch._check_value(
        list(t.shape) == list(want),
        lambda: f"{op}: {name} must be {layout} = {list(want)}, got {list(t.shape)}",
    )


@torch.library.register_fake("expertflow::dequantize_int8")
def _dequantize_int8_fake(q, scale, dtype):
    op = "dequantize_int8"
    _check_dequant(
        op,
        dtype,
        [("q", q, torch.int8, 2, "[out, in]"), ("scale", scale, torch.float32, 1, "[out]")],
    )
    _check_shape(op, "scale", scale, "[out]", [q.shape[0]])
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.register_fake("expertflow::dequantize_int4")
def _dequantize_int4_fake(packed, scale, group_size, dtype):
    op = "dequantize_int4"
    layout = "[out, in/group_size]"
    _check_dequant(
        op,
        dtype,
        [
            ("packed", packed, torch.uint8, 2, "[out, in/2]"),
            ("scale", scale, torch.float32, 2, layout),
        ],
    )
    rows, cols = packed.shape[0], packed.shape[1] * 2
    torch._check_value(
        group_size >= 1 and cols % group_size == 0,
        lambda: f"{op}: group_size must be a positive divisor of in = {cols}, got {group_size}",
    )
    _check_shape(op, "scale", scale, layout, [rows, cols // group_size])
    return packed.new_empty((rows, cols), dtype=dtype)


@torch.library.register_fake("expertflow::dequantize_fp8_block")
def _dequantize_fp8_block_fake(weight, scale_inv, block_rows, block_cols, dtype):
    op = "dequantize_fp8_block"
    layout = "[ceil(out/block_rows), ceil(in/block_cols)]"
    torch._check_value(
        block_rows >= 1 and block_cols >= 1,
        lambda: f"{op}: block_rows and block_cols must be >= 1, got {block_rows} and {block_cols}",
    )
    _check_dequant(
        op,
        dtype,
        [
            ("weight", weight, torch.float8_e4m3fn, 2, "[out, in]"),
            ("scale_inv", scale_inv, torch.float32, 2, layout),
        ],
    )
    rows, cols = weight.shape
    tiles = [-(-rows // block_rows), -(-cols // block_cols)]
    _check_shape(op, "scale_inv", scale_inv, layout, tiles)
    return weight.new_empty((rows, cols), dtype=dtype)


@torch.library.register_fake("expertflow::dequantize_mxfp4")
def _dequantize_mxfp4_fake(blocks, scales, dtype):
    op = "dequantize_mxfp4"
    _check_dequant(
        op,
        dtype,
        [
            ("blocks", blocks, torch.uint8, 3, "[rows, nblocks, 16]"),
            ("scales", scales, torch.uint8, 2, "[rows, nblocks]"),
        ],
    )
    torch._check_value(
        blocks.shape[2] == 16,
        lambda: (
            f"{op}: blocks must be [rows, nblocks, 16] (16 bytes = 32 e2m1 codes per block), "
            f"got shape {list(blocks.shape)}"
        ),
    )
    _check_shape(op, "scales", scales, "[rows, nblocks]", list(blocks.shape[:2]))
    return blocks.new_empty((blocks.shape[0], blocks.shape[1] * 32), dtype=dtype)


@torch.library.register_fake("expertflow::cpu_expert")
def _cpu_expert_fake(
    x,
    up,
    up_bias,
    down,
    down_bias,
    format,
    activation,
    transposed=False,
    alpha=1.702,
    limit=7.0,
    fp8_block=(128, 128),
):
    torch._check_value(x.dim() == 2, lambda: "cpu_expert: x must be 2-D [tokens, hidden]")
    torch._check_value(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        lambda: f"cpu_expert: x must be float32, bfloat16 or float16, got {x.dtype}",
    )
    torch._check_value(len(up) >= 1 and len(down) >= 1, lambda: "cpu_expert: empty weight list")
    for name, parts in (("up", up), ("down", down)):
        for i, t in enumerate(parts):
            _check_same_device("cpu_expert", x, "x", t, f"{name}[{i}]")
    # The down weight's output rows are x's hidden size (the kernel checks it).
    return x.new_empty(x.shape)
