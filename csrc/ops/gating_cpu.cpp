#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "ops/dispatch.h"
#include "ops/gating.h"

namespace expertflow::ops {
namespace {

template <typename scalar_t>
void route_rows(const core::RouterSpec& spec, const scalar_t* logits, const float* bias,
                int64_t num_tokens, int32_t* ids, float* weights) {
  const int64_t experts = spec.num_experts;
  const int64_t k = spec.top_k;
  // Enough rows per task to amortise the thread hand-off; tiny batches stay on one thread.
  const int64_t grain = std::max<int64_t>(16, 4096 / experts);
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    core::RoutingWorkspace ws(spec);
    std::vector<float> row(std::is_same_v<scalar_t, float> ? 0 : experts);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* src = logits + t * experts;
      const float* row_ptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        row_ptr = src;
      } else {
        for (int64_t e = 0; e < experts; ++e) row[e] = static_cast<float>(src[e]);
        row_ptr = row.data();
      }
      core::route_token(spec, row_ptr, bias, ws, ids + t * k, weights + t * k);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& router_logits, int64_t top_k,
                                                   std::string_view scoring, bool renormalize,
                                                   const std::optional<at::Tensor>& correction_bias,
                                                   int64_t n_group, int64_t topk_group,
                                                   double routed_scaling_factor,
                                                   bool softmax_after_topk) {
  const core::RouterSpec spec =
      make_router_spec(router_logits, top_k, scoring, renormalize, correction_bias, n_group,
                       topk_group, routed_scaling_factor, softmax_after_topk);
  const at::Tensor logits = router_logits.contiguous();
  const int64_t num_tokens = logits.size(0);
  at::Tensor ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({num_tokens, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? bias.const_data_ptr<float>() : nullptr;

  EXPERTFLOW_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "topk_gating", [&] {
    route_rows(spec, logits.const_data_ptr<scalar_t>(), bias_ptr, num_tokens,
               ids.mutable_data_ptr<int32_t>(), weights.mutable_data_ptr<float>());
  });
  return {ids, weights};
}

TORCH_LIBRARY_IMPL(expertflow, CPU, m) { m.impl("topk_gating", &topk_gating_cpu); }

}  // namespace expertflow::ops
