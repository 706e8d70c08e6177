// expertflow::group_by_expert and expertflow::combine: run each expert once over its tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace expertflow::ops {

// Checks topk_ids / num_experts and returns topk_ids flattened as contiguous int32 [T * k].
// int64 ids outside int32's range become "not routed" (-1 or num_experts).
at::Tensor flat_expert_ids(const at::Tensor& topk_ids, int64_t num_experts);

// Checks combine's arguments (TORCH_CHECK_VALUE: ValueError, naming each).
void check_combine_args(const at::Tensor& expert_outputs, const at::Tensor& topk_weights,
                        const at::Tensor& inverse);

// Returns (order int32 [T*k], counts int32 [E], offsets int32 [E+1], inverse int32 [T*k]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_expert_cpu(
    const at::Tensor& topk_ids, int64_t num_experts);

// expert_outputs: [M, H] rows in grouped order; topk_weights: float32 [T, k];
// inverse: int32 [T*k] row of each (token, slot) pair, -1 = not routed. Returns [T, H].
at::Tensor combine_cpu(const at::Tensor& expert_outputs, const at::Tensor& topk_weights,
                       const at::Tensor& inverse);

}  // namespace expertflow::ops
