// Small helpers shared by the CUDA kernels of csrc/ops.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <atomic>

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

// Refuses, with the fix, a GPU on which none of the built architectures (EXPERTFLOW_CUDA_ARCH_LIST)
// runs; checked once per device, so later calls cost one atomic load. The CUDA runtime decides,
// from `kernel` (any __global__ function of the calling file): it knows the SASS and PTX rules
// that expertflow._extension.arch_list_supports writes down for Python. Call it at each CUDA
// entry point, after the device guard.
inline void check_device_arch(const char* op, const void* kernel) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<bool>, kMaxDevices> runnable{};
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && runnable[device].load(std::memory_order_relaxed)) return;
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not a sticky error: clear it before raising
    int major = 0;
    int minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    TORCH_CHECK(false, op, ": expertflow's CUDA kernels were built for TORCH_CUDA_ARCH_LIST=\"",
                EXPERTFLOW_CUDA_ARCH_LIST, "\", none of which runs on cuda:", device,
                ", compute capability ", major, ".", minor,
                ". Rebuild on this machine with `bash scripts/dev setup` (it builds for the GPUs "
                "it sees), or for this GPU anywhere: TORCH_CUDA_ARCH_LIST=",
                major, ".", minor, " bash scripts/dev setup");
  }
  C10_CUDA_CHECK(err);
  if (device < kMaxDevices) runnable[device].store(true, std::memory_order_relaxed);
}

}  // namespace expertflow::ops::cuda
