#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "core/grouping.h"
#include "ops/dispatch.h"
#include "ops/grouping.h"

namespace expertflow::ops {
namespace {

template <typename scalar_t>
void combine_rows(const scalar_t* rows, int64_t hidden, const float* weights,
                  const int32_t* inverse, int64_t num_tokens, int64_t top_k, scalar_t* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, hidden * top_k));
  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      // Slots in order 0..k-1: a fixed summation order, so results are deterministic.
      for (int64_t j = 0; j < top_k; ++j) {
        const int32_t row = inverse[t * top_k + j];
        if (row < 0) continue;
        const float w = weights[t * top_k + j];
        const scalar_t* src = rows + row * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += w * static_cast<float>(src[h]);
      }
      scalar_t* dst = out + t * hidden;
      for (int64_t h = 0; h < hidden; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_expert_cpu(
    const at::Tensor& topk_ids, int64_t num_experts) {
  const at::Tensor ids = flat_expert_ids(topk_ids, num_experts);
  const int64_t n = ids.numel();
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor order = at::empty({n}, opts);
  at::Tensor counts = at::empty({num_experts}, opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  at::Tensor inverse = at::empty({n}, opts);
  core::group_by_expert(ids.const_data_ptr<int32_t>(), n, static_cast<int32_t>(num_experts),
                        order.mutable_data_ptr<int32_t>(), counts.mutable_data_ptr<int32_t>(),
                        offsets.mutable_data_ptr<int32_t>(), inverse.mutable_data_ptr<int32_t>());
  return {order, counts, offsets, inverse};
}

at::Tensor combine_cpu(const at::Tensor& expert_outputs, const at::Tensor& topk_weights,
                       const at::Tensor& inverse) {
  check_combine_args(expert_outputs, topk_weights, inverse);
  const at::Tensor rows = expert_outputs.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  const at::Tensor inv = inverse.contiguous();
  const int64_t num_rows = rows.size(0);
  const int32_t* inv_ptr = inv.const_data_ptr<int32_t>();
  for (int64_t p = 0; p < inv.numel(); ++p) {
    TORCH_CHECK_INDEX(inv_ptr[p] >= -1 && inv_ptr[p] < num_rows, "combine: inverse[", p,
                      "] = ", inv_ptr[p], " is outside [-1, ", num_rows, ") (expert_outputs has ",
                      num_rows, " rows)");
  }
  const int64_t num_tokens = weights.size(0);
  const int64_t hidden = rows.size(1);
  at::Tensor out = at::empty({num_tokens, hidden}, rows.options());
  EXPERTFLOW_DISPATCH_FLOAT_TYPES(rows.scalar_type(), "combine", [&] {
    combine_rows(rows.const_data_ptr<scalar_t>(), hidden, weights.const_data_ptr<float>(), inv_ptr,
                 num_tokens, weights.size(1), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(expertflow, CPU, m) {
  m.impl("group_by_expert", &group_by_expert_cpu);
  m.impl("combine", &combine_cpu);
}

}  // namespace expertflow::ops
