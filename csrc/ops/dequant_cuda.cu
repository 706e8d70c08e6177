// CUDA dequantize kernels: each thread decodes 4 consecutive stored bytes of one row (one 32-bit
// load when every row starts 4-byte aligned). Same float32 products and the same round-to-
// nearest-even casts as the CPU loops (csrc/ops/dequant_decode.h), so results match bit for bit.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ops/cuda_utils.cuh"
#include "ops/dequant.h"
#include "ops/dequant_decode.h"
#include "ops/dispatch.h"

namespace expertflow::ops {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;
constexpr int64_t kMaxGridY = 65535;

// Each decoder writes the outputs of stored byte `j` of row `r`.
struct Int8Decoder {
  const float* scale;  // [rows]
  int64_t in;
  template <typename Out>
  __device__ void operator()(int64_t r, int32_t j, uint8_t b, Out* out) const {
    const float v = static_cast<float>(static_cast<int8_t>(b)) * scale[r];
    out[r * in + j] = cuda::from_float<Out>(v);
  }
};

struct Int4Decoder {
  const float* scale;  // [rows, in / group]
  int64_t in;
  int32_t group;
  template <typename Out>
  __device__ void operator()(int64_t r, int32_t j, uint8_t b, Out* out) const {
    const float* s_row = scale + r * (in / group);
    Out* dst = out + r * in + 2 * j;
    dst[0] = cuda::from_float<Out>(int4_low(b) * s_row[(2 * j) / group]);
    dst[1] = cuda::from_float<Out>(int4_high(b) * s_row[(2 * j + 1) / group]);
  }
};

struct Fp8BlockDecoder {
  const float* scale_inv;  // [ceil(rows / block_rows), ceil(in / block_cols)]
  int64_t in;
  int64_t block_rows;
  int32_t block_cols;
  template <typename Out>
  __device__ void operator()(int64_t r, int32_t j, uint8_t b, Out* out) const {
    const int64_t tiles = (in + block_cols - 1) / block_cols;
    const float s = scale_inv[(r / block_rows) * tiles + j / block_cols];
    out[r * in + j] = cuda::from_float<Out>(fp8_e4m3(b) * s);
  }
};

struct Mxfp4Decoder {
  const uint8_t* scales;  // [rows, nblocks], e8m0
  int64_t nblocks;
  template <typename Out>
  __device__ void operator()(int64_t r, int32_t j, uint8_t b, Out* out) const {
    const float s = e8m0(scales[r * nblocks + j / kMxfp4BlockBytes]);
    Out* dst = out + r * nblocks * kMxfp4Block + 2 * j;
    dst[0] = cuda::from_float<Out>(e2m1(b & 0xF) * s);
    dst[1] = cuda::from_float<Out>(e2m1(b >> 4) * s);
  }
};

// Rows in blockIdx.y (grid-strided), 4-byte words of a row across threads in x.
template <bool kAligned, typename Decoder, typename Out>
__global__ void dequantize_kernel(const uint8_t* __restrict__ src, int64_t rows, int32_t row_bytes,
                                  Decoder decode, Out* __restrict__ out) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const uint8_t* row = src + r * row_bytes;
    for (int32_t j0 = (blockIdx.x * blockDim.x + threadIdx.x) * kBytesPerThread; j0 < row_bytes;
         j0 += gridDim.x * blockDim.x * kBytesPerThread) {
      if constexpr (kAligned) {  // row_bytes % 4 == 0 and rows start 4-byte aligned
        const uint32_t word = *reinterpret_cast<const uint32_t*>(row + j0);
#pragma unroll
        for (int k = 0; k < kBytesPerThread; ++k) decode(r, j0 + k, uint8_t(word >> (8 * k)), out);
      } else {
        const int32_t end = min(j0 + kBytesPerThread, row_bytes);
        for (int32_t j = j0; j < end; ++j) decode(r, j, row[j], out);
      }
    }
  }
}

// Launches `decode` over a contiguous [rows, row_bytes] byte tensor into [rows, row_elems] dtype.
template <typename Decoder>
at::Tensor launch(const char* op, const at::Tensor& src, int64_t row_elems, Decoder decode,
                  at::ScalarType dtype) {
  const int64_t rows = src.size(0);
  const int64_t row_bytes = src.numel() / std::max<int64_t>(rows, 1);
  at::Tensor out = at::empty({rows, row_elems}, src.options().dtype(dtype));
  if (out.numel() == 0) return out;
  // In-row offsets are int32 (cheaper division); 2^30 leaves room for the grid stride.
  TORCH_CHECK_VALUE(row_bytes <= (int64_t{1} << 30), op,
                    ": rows of at most 2^30 stored bytes are supported, got ", row_bytes);
  const auto* base = static_cast<const uint8_t*>(src.const_data_ptr());
  const bool aligned = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(base) % 4 == 0;
  const int64_t words = (row_bytes + kBytesPerThread - 1) / kBytesPerThread;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((words + kThreads - 1) / kThreads, 1024)),
                  static_cast<unsigned>(std::min(rows, kMaxGridY)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  EXPERTFLOW_DISPATCH_FLOAT_TYPES(dtype, "dequantize", [&] {
    auto* dst = out.mutable_data_ptr<scalar_t>();
    const auto n = static_cast<int32_t>(row_bytes);
    if (aligned) {
      dequantize_kernel<true><<<grid, kThreads, 0, stream>>>(base, rows, n, decode, dst);
    } else {
      dequantize_kernel<false><<<grid, kThreads, 0, stream>>>(base, rows, n, decode, dst);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void check_arch(const char* op) {
  cuda::check_device_arch(
      op, reinterpret_cast<const void*>(&dequantize_kernel<true, Int8Decoder, float>));
}

}  // namespace

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scale,
                                at::ScalarType dtype) {
  check_int8_args(q, scale, dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  check_arch("dequantize_int8");
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scale.contiguous();
  return launch("dequantize_int8", qc, qc.size(1),
                Int8Decoder{sc.const_data_ptr<float>(), qc.size(1)}, dtype);
}

at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scale,
                                int64_t group_size, at::ScalarType dtype) {
  check_int4_args(packed, scale, group_size, dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  check_arch("dequantize_int4");
  const at::Tensor pc = packed.contiguous();
  const at::Tensor sc = scale.contiguous();
  const int64_t in = pc.size(1) * 2;
  // group_size divides in (or in is 0), and launch refuses rows of more than 2^30 bytes.
  const auto group = static_cast<int32_t>(std::min<int64_t>(group_size, std::max<int64_t>(in, 1)));
  return launch("dequantize_int4", pc, in, Int4Decoder{sc.const_data_ptr<float>(), in, group},
                dtype);
}

at::Tensor dequantize_fp8_block_cuda(const at::Tensor& weight, const at::Tensor& scale_inv,
                                     int64_t block_rows, int64_t block_cols, at::ScalarType dtype) {
  check_fp8_block_args(weight, scale_inv, block_rows, block_cols, dtype);
  const c10::cuda::CUDAGuard guard(weight.device());
  check_arch("dequantize_fp8_block");
  const at::Tensor wc = weight.contiguous();
  const at::Tensor sc = scale_inv.contiguous();
  const int64_t in = wc.size(1);
  // A tile wider than the row is one tile: clamping keeps block_cols in int32.
  const auto cols = static_cast<int32_t>(std::min<int64_t>(block_cols, std::max<int64_t>(in, 1)));
  return launch("dequantize_fp8_block", wc, in,
                Fp8BlockDecoder{sc.const_data_ptr<float>(), in, block_rows, cols}, dtype);
}

at::Tensor dequantize_mxfp4_cuda(const at::Tensor& blocks, const at::Tensor& scales,
                                 at::ScalarType dtype) {
  check_mxfp4_args(blocks, scales, dtype);
  const c10::cuda::CUDAGuard guard(blocks.device());
  check_arch("dequantize_mxfp4");
  const at::Tensor bc = blocks.contiguous();
  const at::Tensor sc = scales.contiguous();
  return launch("dequantize_mxfp4", bc, bc.size(1) * kMxfp4Block,
                Mxfp4Decoder{sc.const_data_ptr<uint8_t>(), bc.size(1)}, dtype);
}

TORCH_LIBRARY_IMPL(expertflow, CUDA, m) {
  m.impl("dequantize_int8", &dequantize_int8_cuda);
  m.impl("dequantize_int4", &dequantize_int4_cuda);
  m.impl("dequantize_fp8_block", &dequantize_fp8_block_cuda);
  m.impl("dequantize_mxfp4", &dequantize_mxfp4_cuda);
}

}  // namespace expertflow::ops
