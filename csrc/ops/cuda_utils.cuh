// Small helpers shared by the CUDA kernels of csrc/ops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace expertflow::ops::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) {
  return __half2float(*reinterpret_cast<const __half*>(&x));
}
__device__ __forceinline__ float to_float(c10::BFloat16 x) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&x));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ c10::Half from_float<c10::Half>(float x) {
  const __half h = __float2half_rn(x);
  return *reinterpret_cast<const c10::Half*>(&h);
}
template <>
__device__ __forceinline__ c10::BFloat16 from_float<c10::BFloat16>(float x) {
  const __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *reinterpret_cast<const c10::BFloat16*>(&b);
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

}  // namespace expertflow::ops::cuda
