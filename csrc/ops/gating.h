// expertflow::topk_gating: fused router scoring + top-k selection.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "core/routing.h"

namespace expertflow::ops {

// Checks every argument (TORCH_CHECK_VALUE: ValueError, naming it) and returns the router it
// describes. router_logits: [num_tokens, num_experts]; correction_bias: [num_experts] or none.
core::RouterSpec make_router_spec(const at::Tensor& router_logits, int64_t top_k,
                                  std::string_view scoring, bool renormalize,
                                  const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                                  int64_t topk_group, double routed_scaling_factor,
                                  bool softmax_after_topk);

// Returns (topk_ids int32 [num_tokens, top_k], topk_weights float32 [num_tokens, top_k]).
std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                   std::string_view scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   int64_t n_group, int64_t topk_group,
                                                   double routed_scaling_factor,
                                                   bool softmax_after_topk);

}  // namespace expertflow::ops
