"""Native MoE ops: fused gating, grouping of tokens by expert, weighted combine, the
dequantization of expert weight formats, and one expert computed on the CPU from its packed
tensors.

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
    "CPU_EXPERT_ACTIVATIONS",
    "CPU_EXPERT_FORMATS",
    "combine",
    "cpu_expert",
    "dequantize_fp8_block",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_mxfp4",
    "group_by_expert",
    "topk_gating",
]

_SCORINGS = ("softmax", "sigmoid")
CPU_EXPERT_FORMATS = ("float", "int8", "int4", "fp8", "mxfp4")
CPU_EXPERT_ACTIVATIONS = (
    "silu_gated",
    "gelu_gated",
    "gelu_tanh_gated",
    "gpt_oss",
    "silu",
    "gelu",
    "gelu_tanh",
    "relu",
    "relu2",
)


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
    """One expert, ``down(act(up(x)))``, on the CPU, reading its packed tensors where they lie.

    A fused pass: the up (or gate-up) projection over all tokens, the activation, the down
    projection; each weight is read from memory once for all the tokens and expanded to fp32
    in small tiles (no dequantized copy of the expert), sums in fp32, the result cast to
    ``x``'s dtype. Threads split each projection's output rows.

    Args:
        x: ``[tokens, hidden]`` float32, bfloat16 or float16 on the CPU.
        up: the up (gated: gate-up) weight's packed tensors, logical shape ``[up_out, hidden]``
            with ``up_out = 2 * inter`` for gated activations, ``inter`` otherwise.
        down: the down weight's packed tensors, logical shape ``[hidden, inter]``.
        up_bias: optional ``[up_out]`` float bias.
        down_bias: optional ``[hidden]`` float bias.
        format: how each weight is held (``expertflow.runtime.expert_format``'s layouts):
            ``"float"``: ``[W]``, W float32/bfloat16/float16 ``[out, in]`` (``[in, out]`` with
            ``transposed``); ``"int8"``: ``[q int8 [out, in], scale f32 [out]]``;
            ``"int4"``: ``[packed uint8 [out, in/2], scale f32 [out, in/group]]`` (the group
            is ``in / scale.shape[1]``); ``"fp8"``: ``[w float8_e4m3fn [out, in], scale_inv
            f32 [ceil(out/b0), ceil(in/b1)]]`` with ``fp8_block = (b0, b1)``; ``"mxfp4"``:
            ``[blocks uint8 [out, in/32, 16], scales uint8 e8m0 [out, in/32]]``.
        activation: ``"silu_gated"``, ``"gelu_gated"``, ``"gelu_tanh_gated"``: the first half
            of the up outputs is the gate, ``act(gate) * up`` (transformers' default
            ``_apply_gate``); ``"gpt_oss"``: gate and up interleaved (even outputs the gate),
            ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
            ``g = min(gate, limit)``; ungated ``"silu"``, ``"gelu"``, ``"gelu_tanh"``,
            ``"relu"``, ``"relu2"`` (``relu(x)^2``).
        transposed: float weights stored ``[in, out]`` (a module's ``is_transposed``).
        alpha, limit: GPT-OSS's ``swiglu_alpha`` and ``swiglu_limit``.
        fp8_block: the fp8 scale tile ``(rows, cols)``.

    Returns:
        ``[tokens, hidden]`` in ``x``'s dtype.
    """
    return torch.ops.expertflow.cpu_expert(
        x,
        list(up),
        up_bias,
        list(down),
        down_bias,
        format,
        activation,
        transposed,
        float(alpha),
        float(limit),
        [int(b) for b in fp8_block],
    )


from expertflow.ops import _fake  # noqa: E402, F401  (registers the fake kernels)
