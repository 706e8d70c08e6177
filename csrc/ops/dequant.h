// expertflow::dequantize_{int8,int4,fp8_block,mxfp4}: expand an expert's stored weight format to
// float32, bfloat16 or float16. The semantics (layouts, nibble order, NaN codes) are those of the
// plain-torch references in python/expertflow/formats/; results equal them bit for bit (except
// NaN payloads), since each value is one float32 product of a decoded code and a scale, rounded
// once to the output dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace expertflow::ops {

// Element codes of one fp8 e4m3fn NaN (either sign): 0x7F, 0xFF.
inline constexpr uint8_t kFp8NanMagnitude = 0x7F;
// e8m0 scale exponent meaning NaN (OCP MX v1.0): every element of its block is NaN.
inline constexpr uint8_t kE8m0Nan = 0xFF;
// Elements per mxfp4 block, and the bytes holding them (two e2m1 codes per byte).
inline constexpr int64_t kMxfp4Block = 32;
inline constexpr int64_t kMxfp4BlockBytes = kMxfp4Block / 2;

// The boundary checks (TORCH_CHECK_VALUE: ValueError, naming the argument and what was expected),
// shared by the CPU and CUDA kernels; csrc/ops/dequant_common.cpp. Inputs of any strides pass.
// q: int8 [out, in]; scale: float32 [out].
void check_int8_args(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype);
// packed: uint8 [out, in/2]; scale: float32 [out, in/group_size]; group_size divides in.
void check_int4_args(const at::Tensor& packed, const at::Tensor& scale, int64_t group_size,
                     at::ScalarType dtype);
// weight: float8_e4m3fn [out, in]; scale_inv: float32 [ceil(out/block_rows), ceil(in/block_cols)].
void check_fp8_block_args(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                          int64_t block_cols, at::ScalarType dtype);
// blocks: uint8 [rows, nblocks, 16]; scales: uint8 [rows, nblocks].
void check_mxfp4_args(const at::Tensor& blocks, const at::Tensor& scales, at::ScalarType dtype);

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype);
at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scale,
                               int64_t group_size, at::ScalarType dtype);
at::Tensor dequantize_fp8_block_cpu(const at::Tensor& weight, const at::Tensor& scale_inv,
                                    int64_t block_rows, int64_t block_cols, at::ScalarType dtype);
at::Tensor dequantize_mxfp4_cpu(const at::Tensor& blocks, const at::Tensor& scales,
                                at::ScalarType dtype);

}  // namespace expertflow::ops
