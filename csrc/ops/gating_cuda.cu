// CUDA topk_gating: one warp per token, the token's keys staged in shared memory.
// Reproduces core::route_token (csrc/core/routing.cpp) exactly on ids whenever the keys are the
// raw logits (no correction bias), and to fp32 rounding otherwise.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/cuda_utils.cuh"
#include "ops/dispatch.h"
#include "ops/gating.h"

namespace expertflow::ops {
namespace {

using cuda::kFullMask;
using cuda::kWarpSize;

constexpr int kMaxExpertsCuda = 2048;
constexpr int kMaxWarpsPerBlock = 8;

struct Best {
  float value;
  int32_t id;
};

__device__ __forceinline__ Best warp_best(Best b) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    const float v = __shfl_xor_sync(kFullMask, b.value, o);
    const int32_t i = __shfl_xor_sync(kFullMask, b.id, o);
    if (core::ranks_before(v, i, b.value, b.id)) b = {v, i};
  }
  return b;
}

// Best entry among [0, n) of `values` that ranks strictly after `prev` and passes `eligible`.
template <typename Eligible>
__device__ __forceinline__ Best next_best(const float* values, int n, Best prev, bool first,
                                          Eligible eligible) {
  Best b{0.0f, -1};
  for (int i = threadIdx.x % kWarpSize; i < n; i += kWarpSize) {
    if (!eligible(i)) continue;
    const float v = values[i];
    if (!first && !core::ranks_before(prev.value, prev.id, v, i)) continue;
    if (b.id < 0 || core::ranks_before(v, i, b.value, b.id)) b = {v, i};
  }
  // Lanes with no candidate carry id -1: make them lose every comparison.
  if (b.id < 0) b = {__int_as_float(0x7fffffff), 0x7fffffff};
  return warp_best(b);
}

// Per-warp shared memory layout; sizes in elements.
struct WarpSmem {
  float* keys;      // [E]
  float* scores;    // [E] (bias path)
  float* gkeys;     // [G]
  int32_t* chosen;  // [k]
  bool* gsel;       // [G]
};

__host__ __device__ inline size_t warp_smem_bytes(const core::RouterSpec& s) {
  return sizeof(float) * (2 * s.num_experts + s.num_groups) + sizeof(int32_t) * s.top_k +
         ((s.num_groups + 15) / 16) * 16;
}

template <typename scalar_t>
__global__ void topk_gating_kernel(const scalar_t* __restrict__ logits,
                                   const float* __restrict__ bias, int64_t num_tokens,
                                   core::RouterSpec spec, int32_t* __restrict__ ids_out,
                                   float* __restrict__ weights_out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (token >= num_tokens) return;  // whole warps exit together

  const int E = spec.num_experts;
  const int K = spec.top_k;
  unsigned char* base = smem_raw + warp * warp_smem_bytes(spec);
  WarpSmem sm;
  sm.keys = reinterpret_cast<float*>(base);
  sm.scores = sm.keys + E;
  sm.gkeys = sm.scores + E;
  sm.chosen = reinterpret_cast<int32_t*>(sm.gkeys + spec.num_groups);
  sm.gsel = reinterpret_cast<bool*>(sm.chosen + K);

  // Pass 1: load logits (coalesced), row max and whether the row poisons a softmax.
  const scalar_t* row = logits + token * E;
  float m = -INFINITY;
  bool poisoned = false;
  for (int e = lane; e < E; e += kWarpSize) {
    const float l = cuda::to_float(row[e]);
    sm.keys[e] = l;
    m = fmaxf(m, l);
    poisoned |= !(l < INFINITY);
  }
  m = cuda::warp_max(m);
  poisoned = __any_sync(kFullMask, poisoned);

  const bool biased = spec.has_bias && !spec.softmax_after_topk;
  const bool softmax = spec.scoring == core::Scoring::kSoftmax;
  // As on the CPU, a NaN or +inf logit makes a biased softmax row all NaN.
  if (biased && softmax && poisoned) m = NAN;
  float full_sum = 0.0f;
  if (softmax && !spec.softmax_after_topk && (biased || !spec.renormalize)) {
    for (int e = lane; e < E; e += kWarpSize) full_sum += expf(sm.keys[e] - m);
    full_sum = cuda::warp_sum(full_sum);
  }
  __syncwarp();
  if (biased) {
    for (int e = lane; e < E; e += kWarpSize) {
      const float l = sm.keys[e];
      const float s = softmax ? expf(l - m) / full_sum : 1.0f / (1.0f + expf(-l));
      sm.scores[e] = s;
      sm.keys[e] = s + bias[e];
    }
    __syncwarp();
  }

  // Group-limited routing: group keys, then the topk_groups best groups.
  const int group_size = E / spec.num_groups;
  if (spec.num_groups > 1) {
    const bool top2 = spec.has_bias && group_size >= 2;
    for (int g = lane; g < spec.num_groups; g += kWarpSize) {
      Best b1{0.0f, -1}, b2{0.0f, -1};
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
        const float v = sm.keys[e];
        if (b1.id < 0 || core::ranks_before(v, e, b1.value, b1.id)) {
          b2 = b1;
          b1 = {v, e};
        } else if (b2.id < 0 || core::ranks_before(v, e, b2.value, b2.id)) {
          b2 = {v, e};
        }
      }
      sm.gkeys[g] = top2 ? b1.value + b2.value : b1.value;
      sm.gsel[g] = false;
    }
    __syncwarp();
    Best prev{0.0f, -1};
    for (int j = 0; j < spec.topk_groups; ++j) {
      prev = next_best(sm.gkeys, spec.num_groups, prev, j == 0, [](int) { return true; });
      if (lane == 0) sm.gsel[prev.id] = true;
    }
    __syncwarp();
  }

  // Top-k: each round takes the best expert ranking after the previous round's choice.
  const bool grouped = spec.num_groups > 1;
  const bool* gsel = sm.gsel;
  Best prev{0.0f, -1};
  for (int j = 0; j < K; ++j) {
    prev = next_best(sm.keys, E, prev, j == 0,
                     [=](int e) { return !grouped || gsel[e / group_size]; });
    if (lane == 0) sm.chosen[j] = prev.id;
  }
  __syncwarp();

  // Weights, lanes over the k slots.
  const float top_logit = sm.keys[sm.chosen[0]];
  float local_sum = 0.0f;
  bool chosen_poisoned = false;
  for (int j = lane; j < K; j += kWarpSize) {
    const int e = sm.chosen[j];
    chosen_poisoned |= !(sm.keys[e] < INFINITY);
    float w;
    if (biased) {
      w = sm.scores[e];
    } else if (!softmax) {
      w = 1.0f / (1.0f + expf(-sm.keys[e]));
    } else if (spec.softmax_after_topk || spec.renormalize) {
      w = expf(sm.keys[e] - top_logit);  // denominator cancels; normalised below
    } else {
      w = expf(sm.keys[e] - m) / full_sum;
    }
    weights_out[token * K + j] = w;
    ids_out[token * K + j] = e;
    local_sum += w;
  }
  const float chosen_sum = cuda::warp_sum(local_sum);
  chosen_poisoned = __any_sync(kFullMask, chosen_poisoned);
  __syncwarp();

  bool nan_weights = false;
  if (softmax && !biased) {
    nan_weights = (spec.softmax_after_topk ? chosen_poisoned : poisoned) || !isfinite(top_logit) ||
                  (!spec.renormalize && !isfinite(m));
  }
  const bool normalise = spec.softmax_after_topk || spec.renormalize;
  const float denom = spec.softmax_after_topk ? chosen_sum : chosen_sum + 1e-20f;
  for (int j = lane; j < K; j += kWarpSize) {
    float w = weights_out[token * K + j];
    if (normalise) w = w / denom;
    w *= spec.routed_scaling_factor;
    weights_out[token * K + j] = nan_weights ? NAN : w;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(
    const at::Tensor& router_logits, int64_t top_k, std::string_view scoring, bool renormalize,
    const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
    double routed_scaling_factor, bool softmax_after_topk) {
  const core::RouterSpec spec =
      make_router_spec(router_logits, top_k, scoring, renormalize, correction_bias, n_group,
                       topk_group, routed_scaling_factor, softmax_after_topk);
  TORCH_CHECK_VALUE(spec.num_experts <= kMaxExpertsCuda,
                    "topk_gating: on CUDA num_experts must be <= ", kMaxExpertsCuda, ", got ",
                    spec.num_experts);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  cuda::check_device_arch("topk_gating", reinterpret_cast<const void*>(&topk_gating_kernel<float>));
  const at::Tensor logits = router_logits.contiguous();
  const int64_t num_tokens = logits.size(0);
  at::Tensor ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({num_tokens, top_k}, logits.options().dtype(at::kFloat));
  if (num_tokens == 0) return {ids, weights};
  at::Tensor bias;
  if (correction_bias.has_value()) bias = correction_bias->to(at::kFloat).contiguous();

  const size_t per_warp = warp_smem_bytes(spec);
  constexpr size_t kSmemBudget = 48 * 1024;
  const int warps = static_cast<int>(
      std::max<size_t>(1, std::min<size_t>(kMaxWarpsPerBlock, kSmemBudget / per_warp)));
  const int64_t blocks = (num_tokens + warps - 1) / warps;
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "topk_gating: too many tokens: ", num_tokens);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EXPERTFLOW_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "topk_gating", [&] {
    topk_gating_kernel<scalar_t><<<blocks, warps * kWarpSize, warps * per_warp, stream>>>(
        logits.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
        num_tokens, spec, ids.mutable_data_ptr<int32_t>(), weights.mutable_data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids, weights};
}

TORCH_LIBRARY_IMPL(expertflow, CUDA, m) { m.impl("topk_gating", &topk_gating_cuda); }

}  // namespace expertflow::ops
