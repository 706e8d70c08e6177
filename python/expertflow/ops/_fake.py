"""Fake (meta) kernels of the ``torch.ops.expertflow`` operators: output shapes and dtypes
without data, for ``torch.compile``, CUDA graphs and ``torch.library.opcheck``."""

from __future__ import annotations

import torch


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
    num_tokens = router_logits.shape[0]
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    return ids, weights


@torch.library.register_fake("expertflow::group_by_expert")
def _group_by_expert_fake(topk_ids, num_experts):
    torch._check_value(topk_ids.dim() == 2, lambda: "group_by_expert: topk_ids must be 2-D")
    pairs = topk_ids.numel()
    order = topk_ids.new_empty((pairs,), dtype=torch.int32)
    counts = topk_ids.new_empty((num_experts,), dtype=torch.int32)
    offsets = topk_ids.new_empty((num_experts + 1,), dtype=torch.int32)
    inverse = topk_ids.new_empty((pairs,), dtype=torch.int32)
    return order, counts, offsets, inverse


@torch.library.register_fake("expertflow::combine")
def _combine_fake(expert_outputs, topk_weights, inverse):
    torch._check_value(expert_outputs.dim() == 2, lambda: "combine: expert_outputs must be 2-D")
    return expert_outputs.new_empty((topk_weights.shape[0], expert_outputs.shape[1]))
