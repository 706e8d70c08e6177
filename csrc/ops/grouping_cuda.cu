// CUDA group_by_expert (a stable radix sort of pair ids by expert) and combine.
// Same results as core::group_by_expert and combine_cpu, bit for bit on integers; combine
// sums the k slots in order 0..k-1 in fp32, as the CPU does.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <bit>
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda_utils.cuh"
#include "ops/dispatch.h"
#include "ops/grouping.h"

namespace expertflow::ops {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, (n + kThreads - 1) / kThreads); }

// Sort keys: the expert, or num_experts for a pair that is not routed (sorts last).
__global__ void sort_inputs_kernel(const int32_t* __restrict__ ids, int32_t n, int32_t experts,
                                   int32_t* __restrict__ keys, int32_t* __restrict__ pairs) {
  const int32_t p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= n) return;
  const int32_t e = ids[p];
  keys[p] = (e >= 0 && e < experts) ? e : experts;
  pairs[p] = p;
}

// offsets[e] = first sorted position whose key is >= e (binary search); counts from offsets.
__global__ void offsets_kernel(const int32_t* __restrict__ sorted_keys, int32_t n, int32_t experts,
                               int32_t* __restrict__ offsets) {
  const int32_t e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e > experts) return;
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] < e)
      lo = mid + 1;
    else
      hi = mid;
  }
  offsets[e] = lo;
}

__global__ void counts_and_inverse_kernel(const int32_t* __restrict__ order,
                                          const int32_t* __restrict__ offsets, int32_t n,
                                          int32_t experts, int32_t* __restrict__ counts,
                                          int32_t* __restrict__ inverse) {
  const int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < experts) counts[i] = offsets[i + 1] - offsets[i];
  if (i < n) inverse[order[i]] = i < offsets[experts] ? i : -1;
}

template <typename scalar_t>
__global__ void combine_kernel(const scalar_t* __restrict__ rows, int64_t num_rows, int64_t hidden,
                               const float* __restrict__ weights,
                               const int32_t* __restrict__ inverse, int64_t top_k,
                               scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      const int32_t row = inverse[t * top_k + j];
      // Out-of-range rows are skipped, never read: a device kernel cannot raise.
      if (row < 0 || row >= num_rows) continue;
      acc += weights[t * top_k + j] * cuda::to_float(rows[row * hidden + h]);
    }
    out[t * hidden + h] = cuda::from_float<scalar_t>(acc);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_by_expert_cuda(
    const at::Tensor& topk_ids, int64_t num_experts) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  cuda::check_device_arch("group_by_expert", reinterpret_cast<const void*>(&sort_inputs_kernel));
  const at::Tensor ids = flat_expert_ids(topk_ids, num_experts);
  const int32_t n = static_cast<int32_t>(ids.numel());
  const int32_t experts = static_cast<int32_t>(num_experts);
  const auto opts = ids.options().dtype(at::kInt);
  at::Tensor order = at::empty({n}, opts);
  at::Tensor counts = at::empty({experts}, opts);
  at::Tensor offsets = at::empty({experts + 1}, opts);
  at::Tensor inverse = at::empty({n}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor keys = at::empty({n}, opts);
  at::Tensor sorted_keys = at::empty({n}, opts);
  at::Tensor pairs = at::empty({n}, opts);
  if (n > 0) {
    sort_inputs_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        ids.const_data_ptr<int32_t>(), n, experts, keys.mutable_data_ptr<int32_t>(),
        pairs.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Only the bits that can differ: keys are in [0, num_experts].
    const int end_bit = std::bit_width(static_cast<uint32_t>(experts));
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, temp_bytes, keys.const_data_ptr<int32_t>(),
        sorted_keys.mutable_data_ptr<int32_t>(), pairs.const_data_ptr<int32_t>(),
        order.mutable_data_ptr<int32_t>(), n, 0, end_bit, stream));
    at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, ids.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.mutable_data_ptr(), temp_bytes, keys.const_data_ptr<int32_t>(),
        sorted_keys.mutable_data_ptr<int32_t>(), pairs.const_data_ptr<int32_t>(),
        order.mutable_data_ptr<int32_t>(), n, 0, end_bit, stream));
  }
  offsets_kernel<<<blocks_for(experts + 1), kThreads, 0, stream>>>(
      sorted_keys.const_data_ptr<int32_t>(), n, experts, offsets.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  counts_and_inverse_kernel<<<blocks_for(std::max(n, experts)), kThreads, 0, stream>>>(
      order.const_data_ptr<int32_t>(), offsets.const_data_ptr<int32_t>(), n, experts,
      counts.mutable_data_ptr<int32_t>(), inverse.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, counts, offsets, inverse};
}

at::Tensor combine_cuda(const at::Tensor& expert_outputs, const at::Tensor& topk_weights,
                        const at::Tensor& inverse) {
  check_combine_args(expert_outputs, topk_weights, inverse);
  const c10::cuda::CUDAGuard guard(expert_outputs.device());
  cuda::check_device_arch("combine", reinterpret_cast<const void*>(&combine_kernel<float>));
  const at::Tensor rows = expert_outputs.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  const at::Tensor inv = inverse.contiguous();
  const int64_t num_tokens = weights.size(0);
  const int64_t hidden = rows.size(1);
  at::Tensor out = at::empty({num_tokens, hidden}, rows.options());
  if (num_tokens == 0 || hidden == 0) return out;
  TORCH_CHECK_VALUE(num_tokens < (int64_t{1} << 31), "combine: too many tokens: ", num_tokens);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (hidden + 31) / 32 * 32));
  EXPERTFLOW_DISPATCH_FLOAT_TYPES(rows.scalar_type(), "combine", [&] {
    combine_kernel<scalar_t><<<num_tokens, threads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), rows.size(0), hidden, weights.const_data_ptr<float>(),
        inv.const_data_ptr<int32_t>(), weights.size(1), out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(expertflow, CUDA, m) {
  m.impl("group_by_expert", &group_by_expert_cuda);
  m.impl("combine", &combine_cuda);
}

}  // namespace expertflow::ops
