// expertflow::cpu_expert on the CPU: up projection over all tokens (threads split the output
// rows), activation, down projection (threads split the rows again), each weight read once
// from where it lies, fp32 throughout, the result cast to x's dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/expert_kernels.h"
#include "ops/cpu_expert.h"

namespace expertflow::ops {
namespace {

// y [tokens, w.out] = x [tokens, w.in] W^T, threads over blocks of output rows. The threads
// take runs of blocks from a shared counter rather than fixed halves: on a loaded machine a
// thread that is scheduled late then finds less left to do instead of holding up the others.
void parallel_linear(const core::PackedWeight& w, const float* x, int64_t tokens, float* y) {
  const int64_t block = core::linear_row_block(w);
  const int64_t blocks = (w.out + block - 1) / block;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  const int64_t run = std::max<int64_t>(1, blocks / (16 * std::max<int64_t>(threads, 1)));
  const int64_t workspace = core::linear_workspace_floats(w);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(workspace);
    for (int64_t b0 = next.fetch_add(run); b0 < blocks; b0 = next.fetch_add(run)) {
      const int64_t b1 = std::min(b0 + run, blocks);
      core::linear_rows(w, x, w.in, tokens, b0 * block, std::min(b1 * block, w.out), y, w.out,
                        scratch.data());
    }
  });
}

at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat) : at::Tensor();
}

}  // namespace

at::Tensor cpu_expert_cpu(const at::Tensor& x, at::TensorList up,
                          const std::optional<at::Tensor>& up_bias, at::TensorList down,
                          const std::optional<at::Tensor>& down_bias, c10::string_view format,
                          c10::string_view activation, bool transposed, double alpha, double limit,
                          c10::IntArrayRef fp8_block) {
  TORCH_CHECK_VALUE(x.dim() == 2, "cpu_expert: x must be 2-D [tokens, hidden], got shape ",
                    x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "cpu_expert: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "cpu_expert: x must be on the CPU, got ", x.device());
  const std::string_view fmt(format.data(), format.size());
  const core::Activation act =
      parse_activation(std::string_view(activation.data(), activation.size()));
  const core::PackedWeight w_up = packed_weight("up", up, fmt, transposed, fp8_block);
  const core::PackedWeight w_down = packed_weight("down", down, fmt, transposed, fp8_block);
  check_expert_shapes(x, w_up, up_bias, w_down, down_bias, act);

  const int64_t tokens = x.size(0);
  const int64_t hidden = x.size(1);
  const int64_t inter = w_down.in;
  const auto f32 = x.options().dtype(at::kFloat);
  if (tokens == 0) return at::empty({0, hidden}, x.options());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor pre = at::empty({tokens, w_up.out}, f32);
  parallel_linear(w_up, xf.const_data_ptr<float>(), tokens, pre.mutable_data_ptr<float>());
  if (up_bias.has_value()) pre.add_(float_bias(up_bias));

  at::Tensor h = at::empty({tokens, inter}, f32);
  const float* pre_ptr = pre.const_data_ptr<float>();
  float* h_ptr = h.mutable_data_ptr<float>();
  at::parallel_for(0, tokens, 1, [&](int64_t t0, int64_t t1) {
    core::apply_activation(act, pre_ptr + t0 * w_up.out, w_up.out, t1 - t0, inter,
                           static_cast<float>(alpha), static_cast<float>(limit),
                           h_ptr + t0 * inter);
  });

  at::Tensor out = at::empty({tokens, hidden}, f32);
  parallel_linear(w_down, h_ptr, tokens, out.mutable_data_ptr<float>());
  if (down_bias.has_value()) out.add_(float_bias(down_bias));
  return out.to(dtype);
}

TORCH_LIBRARY_IMPL(expertflow, CPU, m) { m.impl("cpu_expert", &cpu_expert_cpu); }

}  // namespace expertflow::ops
