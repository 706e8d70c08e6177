#include <c10/util/Exception.h>

#include <limits>

#include "ops/checks.h"
#include "ops/grouping.h"

namespace expertflow::ops {

at::Tensor flat_expert_ids(const at::Tensor& topk_ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(topk_ids.dim() == 2,
                    "group_by_expert: topk_ids must be 2-D [num_tokens, top_k], got shape ",
                    topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                    "group_by_expert: topk_ids must be int32 or int64, got ",
                    topk_ids.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1, "group_by_expert: num_experts must be >= 1, got ",
                    num_experts);
  // Refused before anything is allocated: counts and offsets are [num_experts] each.
  TORCH_CHECK_VALUE(num_experts <= kMaxExperts,
                    "group_by_expert: num_experts must be <= 2^20 = ", kMaxExperts,
                    " (counts and offsets hold one entry per expert), got ", num_experts);
  TORCH_CHECK_VALUE(topk_ids.numel() < std::numeric_limits<int32_t>::max(),
                    "group_by_expert: topk_ids must have fewer than 2^31 entries, got ",
                    topk_ids.numel());
  if (topk_ids.scalar_type() == at::kLong) {
    return topk_ids.clamp(-1, num_experts).to(at::kInt).reshape({-1}).contiguous();
  }
  return topk_ids.reshape({-1}).contiguous();
}

void check_combine_args(const at::Tensor& expert_outputs, const at::Tensor& topk_weights,
                        const at::Tensor& inverse) {
  TORCH_CHECK_VALUE(expert_outputs.dim() == 2,
                    "combine: expert_outputs must be 2-D [num_rows, hidden], got shape ",
                    expert_outputs.sizes());
  const auto dtype = expert_outputs.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "combine: expert_outputs must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(topk_weights.dim() == 2,
                    "combine: topk_weights must be 2-D [num_tokens, top_k], got shape ",
                    topk_weights.sizes());
  TORCH_CHECK_VALUE(topk_weights.scalar_type() == at::kFloat,
                    "combine: topk_weights must be float32, got ", topk_weights.scalar_type());
  TORCH_CHECK_VALUE(inverse.dim() == 1 && inverse.size(0) == topk_weights.numel(),
                    "combine: inverse must be 1-D [num_tokens * top_k = ", topk_weights.numel(),
                    "], got shape ", inverse.sizes());
  TORCH_CHECK_VALUE(inverse.scalar_type() == at::kInt, "combine: inverse must be int32, got ",
                    inverse.scalar_type());
  check_same_device("combine", expert_outputs, "expert_outputs", topk_weights, "topk_weights");
  check_same_device("combine", expert_outputs, "expert_outputs", inverse, "inverse");
}

}  // namespace expertflow::ops
