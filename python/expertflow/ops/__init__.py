"""Native MoE ops: fused gating, grouping of tokens by expert, weighted combine, and the
dequantization of expert weight formats.

Each function wraps a ``torch.ops.expertflow`` operator (CPU and CUDA kernels, chosen by the
dispatcher from the input's device) and has a fake kernel so that ``torch.compile`` and
``torch.library.opcheck`` work. Plain-torch references of the same semantics live in
``expertflow.ops.reference``.
"""

from __future__ import annotations

import torch

from expertflow.ops.dequantize import (
    dequantize_fp8_block,
    dequantize_int4,
    dequantize_int8,
    dequantize_mxfp4,
)

__all__ = [
    "topk_gating",
    "group_by_expert",
    "combine",
    "dequantize_int8",
    "dequantize_int4",
    "dequantize_fp8_block",
    "dequantize_mxfp4",
]

_SCORINGS = ("softmax", "sigmoid")


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
    """Router scoring and top-k expert selection, fused.

    Presets for the routers of transformers' MoE families:

    * Mixtral, Qwen3-MoE, OLMoE (``norm_topk_prob``), PhiMoE-like: ``scoring="softmax"``,
      ``renormalize=norm_topk_prob``.
    * Qwen2-MoE: ``renormalize=False`` (its default ``norm_topk_prob``).
    * DeepSeek-V2 group-limited greedy: ``renormalize=False, n_group=G, topk_group=g,
      routed_scaling_factor=s``; a group's key is its best expert's score.
    * DeepSeek-V3 / Kimi-K2 / GLM-4-MoE: ``scoring="sigmoid", correction_bias=b, n_group=G,
      topk_group=g, renormalize=norm_topk_prob, routed_scaling_factor=s``; selection runs on
      ``sigmoid(logits) + b``, a group's key is the sum of its two best biased scores, and the
      weights are the unbiased scores.
    * GPT-OSS: ``softmax_after_topk=True`` (top-k on the logits, softmax over the k).

    Semantics: ids are ordered best first. Ties are broken by the lowest expert id. NaN
    scores rank below everything (also -inf), so the ids are always ``top_k`` distinct experts
    in ``[0, num_experts)``, whatever the input. Weights follow IEEE arithmetic as the eager
    torch computation does: a NaN or +inf logit in a softmax row, or a row of -inf, gives NaN
    weights. Renormalisation divides by ``sum + 1e-20``; the scaling factor applies last.

    Args:
        router_logits: ``[num_tokens, num_experts]`` float32, bfloat16 or float16.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: divide the ``top_k`` weights by their sum.
        correction_bias: optional ``[num_experts]`` bias added to the scores for selection
            only (DeepSeek-V3 ``e_score_correction_bias``).
        n_group: split the experts into this many equal groups (group-limited routing).
        topk_group: how many groups stay eligible; required with ``n_group``.
        routed_scaling_factor: multiplies the final weights.
        softmax_after_topk: select on the raw logits, weights are the softmax over the
            selected logits (GPT-OSS).

    Returns:
        ``(topk_ids, topk_weights)``: int32 ``[num_tokens, top_k]`` and float32
        ``[num_tokens, top_k]`` on the input's device.
    """
    if scoring not in _SCORINGS:
        raise ValueError(f"topk_gating: scoring must be one of {_SCORINGS}, got {scoring!r}")
    if n_group is None:
        if topk_group is not None:
            raise ValueError("topk_gating: topk_group was given without n_group")
        n_group = topk_group = 1
    elif topk_group is None:
        raise ValueError(f"topk_gating: n_group={n_group} needs topk_group as well")
    return torch.ops.expertflow.topk_gating(
        router_logits,
        top_k,
        scoring,
        renormalize,
        correction_bias,
        n_group,
        topk_group,
        float(routed_scaling_factor),
        softmax_after_topk,
    )


def group_by_expert(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups the (token, slot) pairs of a routing by expert: a stable counting sort.

    Pair ``p = token * top_k + slot``. Ids outside ``[0, num_experts)`` (for example -1 for a
    dropped slot) are "not routed".

    Args:
        topk_ids: ``[num_tokens, top_k]`` int32 or int64.
        num_experts: number of experts ``E``.

    Returns:
        ``(order, counts, offsets, inverse)``, all int32 on the input's device:
        ``order [T*k]`` pair indices sorted by expert, ties in pair order, pairs not routed
        last; ``counts [E]`` pairs per expert; ``offsets [E+1]`` exclusive prefix sum of counts
        (expert ``e`` owns ``order[offsets[e]:offsets[e+1]]``, ``offsets[E]`` = routed pairs);
        ``inverse [T*k]`` position of each pair in ``order``, or -1 if not routed. The token of
        sorted row ``i`` is ``order[i] // top_k``.
    """
    return torch.ops.expertflow.group_by_expert(topk_ids, num_experts)


def combine(
    expert_outputs: torch.Tensor, topk_weights: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Scatters grouped expert outputs back to tokens, weighted: ``out[t] = sum_j w[t,j] *
    expert_outputs[inverse[t*k+j]]``.

    The k slots are summed in order 0..k-1 in fp32 (deterministic); pairs with
    ``inverse == -1`` contribute nothing. On CPU an ``inverse`` entry outside
    ``[-1, num_rows)`` raises; on CUDA it is skipped (a kernel cannot raise without a sync).

    Args:
        expert_outputs: ``[num_rows, hidden]`` float32, bfloat16 or float16, rows in the
            grouped order of ``group_by_expert``.
        topk_weights: ``[num_tokens, top_k]`` float32.
        inverse: ``[num_tokens * top_k]`` int32, as returned by ``group_by_expert``.

    Returns:
        ``[num_tokens, hidden]`` in ``expert_outputs``' dtype.
    """
    return torch.ops.expertflow.combine(expert_outputs, topk_weights, inverse)


from expertflow.ops import _fake  # noqa: E402, F401  (registers the fake kernels)
