"""Plain-torch references of the native ops: slow, simple, and the definition of their results.

The tests compare every native kernel against these on fresh random inputs. They follow the
documented semantics exactly, tie-breaking and NaN handling included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertflow import formats

__all__ = [
    "combine",
    "cpu_expert",
    "dequantize_weight",
    "group_by_expert",
    "rank_descending",
    "topk_gating",
]


def rank_descending(keys: torch.Tensor) -> torch.Tensor:
    """Per-row column order: larger key first, equal keys by lower index, NaN after everything.

    Args:
        keys: ``[rows, n]`` float.

    Returns:
        ``[rows, n]`` int64 column indices in selection order.
    """
    nan = torch.isnan(keys)
    clean = torch.where(nan, torch.full_like(keys, float("-inf")), keys)
    order = torch.sort(clean, dim=-1, descending=True, stable=True).indices
    # A second stable sort moves NaN keys behind -inf without disturbing anything else.
    nan_in_order = torch.gather(nan, -1, order).to(torch.int8)
    return torch.gather(order, -1, torch.sort(nan_in_order, dim=-1, stable=True).indices)


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    softmax_after_topk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`expertflow.ops.topk_gating`; same arguments and results."""
    logits = router_logits.float()
    num_tokens, num_experts = logits.shape
    scores = _scores(logits, scoring)
    if correction_bias is not None and not softmax_after_topk:
        keys = scores + correction_bias.float()
    else:
        # softmax and sigmoid are monotonic: ranking the logits ranks the scores, minus the
        # ties that rounding of exp would create.
        keys = logits

    if n_group is not None and n_group > 1:
        group_size = num_experts // n_group
        grouped = keys.view(num_tokens, n_group, group_size)
        best_of = 2 if (correction_bias is not None and group_size >= 2) else 1
        ranked = torch.gather(
            grouped,
            -1,
            rank_descending(grouped.reshape(-1, group_size)).view(num_tokens, n_group, group_size)[
                ..., :best_of
            ],
        )
        group_keys = ranked.sum(dim=-1)
        kept = rank_descending(group_keys)[:, :topk_group]
        allowed = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=keys.device)
        allowed.scatter_(1, kept, True)
        allowed = allowed.repeat_interleave(group_size, dim=1)
    else:
        allowed = torch.ones_like(keys, dtype=torch.bool)

    order = rank_descending(keys)
    # Move ineligible experts behind every eligible one, keeping the order within each part.
    order = torch.gather(
        order,
        -1,
        torch.sort((~torch.gather(allowed, -1, order)).to(torch.int8), dim=-1, stable=True).indices,
    )
    ids = order[:, :top_k]

    if softmax_after_topk:
        weights = torch.gather(logits, -1, ids).softmax(dim=-1)
    else:
        weights = torch.gather(scores, -1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return ids.to(torch.int32), weights.to(torch.float32)


def group_by_expert(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`expertflow.ops.group_by_expert`; same arguments and results."""
    ids = topk_ids.reshape(-1).long()
    routed = (ids >= 0) & (ids < num_experts)
    sort_key = torch.where(routed, ids, torch.full_like(ids, num_experts))
    order = torch.sort(sort_key, stable=True).indices
    counts = torch.bincount(ids[routed], minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    inverse = torch.empty_like(ids)
    inverse[order] = torch.arange(ids.numel(), device=ids.device)
    inverse[~routed] = -1
    return order.int(), counts.int(), offsets.int(), inverse.int()


def combine(
    expert_outputs: torch.Tensor, topk_weights: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Reference of :func:`expertflow.ops.combine`; same arguments and results."""
    num_tokens, top_k = topk_weights.shape
    acc = torch.zeros(
        num_tokens, expert_outputs.shape[1], dtype=torch.float32, device=expert_outputs.device
    )
    inv = inverse.view(num_tokens, top_k).long()
    for j in range(top_k):
        rows = inv[:, j]
        valid = rows >= 0
        contribution = expert_outputs.float()[rows.clamp(min=0)] * topk_weights[:, j : j + 1]
        acc += torch.where(valid[:, None], contribution, torch.zeros_like(contribution))
    return acc.to(expert_outputs.dtype)


def dequantize_weight(
    parts: list[torch.Tensor],
    format: str,
    *,
    transposed: bool = False,
    fp8_block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """A weight's packed tensors (``expertflow.ops.cpu_expert``'s layouts) to its logical
    ``[out, in]`` float32 matrix, through the formats' references."""
    if format == "float":
        (w,) = parts
        return (w.t() if transposed else w).to(torch.float32)
    codes, scale = parts
    if format == "int8":
        return formats.dequantize_int8(codes, scale, torch.float32)
    if format == "int4":
        group = codes.shape[1] * 2 // scale.shape[1]
        return formats.dequantize_int4(codes, scale, group, torch.float32)
    if format == "fp8":
        return formats.dequantize_fp8_block(codes, scale, tuple(fp8_block), torch.float32)
    if format == "mxfp4":
        return formats.dequantize_mxfp4(codes, scale, torch.float32, nan_scales="propagate")
    raise ValueError(f"cpu_expert: unknown format {format!r}")


def _activate(h: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    if activation == "gpt_oss":
        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    fns = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu,
        "relu2": lambda v: F.relu(v).square(),
    }
    if activation.endswith("_gated"):
        gate, up = h.chunk(2, dim=-1)
        return fns[activation.removesuffix("_gated")](gate) * up
    return fns[activation](h)


def cpu_expert(
    x: torch.Tensor,
    up: list[torch.Tensor],
    down: list[torch.Tensor],
    *,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    format: str = "float",
    activation: str = "silu_gated",
    transposed: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    fp8_block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """``down(act(up(x) + up_bias)) + down_bias`` in float32 from the dequantized weights, cast
    to ``x``'s dtype (``expertflow.ops.cpu_expert``'s semantics)."""
    w_up = dequantize_weight(up, format, transposed=transposed, fp8_block=fp8_block)
    w_down = dequantize_weight(down, format, transposed=transposed, fp8_block=fp8_block)
    h = x.to(torch.float32) @ w_up.t()
    if up_bias is not None:
        h = h + up_bias.to(torch.float32)
    h = _activate(h, activation, alpha, limit)
    out = h @ w_down.t()
    if down_bias is not None:
        out = out + down_bias.to(torch.float32)
    return out.to(x.dtype)
