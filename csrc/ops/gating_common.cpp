#include <c10/util/Exception.h>

#include "ops/checks.h"
#include "ops/gating.h"

namespace expertflow::ops {

core::RouterSpec make_router_spec(const at::Tensor& router_logits, int64_t top_k,
                                  std::string_view scoring, bool renormalize,
                                  const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                                  int64_t topk_group, double routed_scaling_factor,
                                  bool softmax_after_topk) {
  TORCH_CHECK_VALUE(router_logits.dim() == 2,
                    "topk_gating: router_logits must be 2-D [num_tokens, num_experts], got shape ",
                    router_logits.sizes());
  const auto dtype = router_logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "topk_gating: router_logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid",
                    "topk_gating: scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  const int64_t num_experts = router_logits.size(1);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts,
                    "topk_gating: router_logits must have between 1 and 2^20 experts (dim 1), got ",
                    num_experts);
  TORCH_CHECK_VALUE(n_group >= 1 && n_group <= num_experts, "topk_gating: n_group must be in [1, ",
                    num_experts, "], got ", n_group);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= num_experts,
                    "topk_gating: top_k must be in [1, num_experts=", num_experts, "], got ",
                    top_k);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group,
                    "topk_gating: topk_group must be in [1, n_group=", n_group, "], got ",
                    topk_group);
  if (correction_bias.has_value()) {
    const at::Tensor& bias = *correction_bias;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == num_experts,
                      "topk_gating: correction_bias must be 1-D [num_experts=", num_experts,
                      "], got shape ", bias.sizes());
    check_same_device("topk_gating", router_logits, "router_logits", bias, "correction_bias");
    TORCH_CHECK_VALUE(bias.is_floating_point(),
                      "topk_gating: correction_bias must be a floating-point tensor, got ",
                      bias.scalar_type());
  }
  core::RouterSpec spec;
  spec.num_experts = static_cast<int32_t>(num_experts);
  spec.top_k = static_cast<int32_t>(top_k);
  spec.scoring = scoring == "sigmoid" ? core::Scoring::kSigmoid : core::Scoring::kSoftmax;
  spec.renormalize = renormalize;
  spec.has_bias = correction_bias.has_value();
  spec.num_groups = static_cast<int32_t>(n_group);
  spec.topk_groups = static_cast<int32_t>(topk_group);
  spec.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  spec.softmax_after_topk = softmax_after_topk;
  const std::string problem = core::validate(spec);
  TORCH_CHECK_VALUE(problem.empty(), "topk_gating: ", problem);
  return spec;
}

}  // namespace expertflow::ops
