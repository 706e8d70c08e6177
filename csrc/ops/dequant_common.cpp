// Boundary checks of the dequantize ops, run by the CPU and CUDA kernels alike (the Python fake
// kernels in expertflow/ops/_fake.py repeat the ones that decide output shapes). Kernels never
// check scales for finiteness: the loader does that once per checkpoint.
#include <c10/util/Exception.h>

#include <vector>

#include "ops/checks.h"
#include "ops/dequant.h"

namespace expertflow::ops {
namespace {

void check_out_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": dtype must be float32, bfloat16 or float16, got ", dtype);
}

// `want_name`: torch's Python name of `want` (c10 prints int8 as "Char").
void check_tensor(const char* op, const at::Tensor& t, const char* name, at::ScalarType want,
                  const char* want_name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, op, ": ", name, " must be ", want_name, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
                    t.sizes());
}

void check_shape(const char* op, const at::Tensor& t, const char* name, const char* layout,
                 const std::vector<int64_t>& want) {
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(want), op, ": ", name, " must be ", layout, " = ",
                    c10::IntArrayRef(want), ", got ", t.sizes());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void check_int8_args(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_int8";
  check_out_dtype(op, dtype);
  check_tensor(op, q, "q", at::kChar, "int8", 2, "[out, in]");
  check_tensor(op, scale, "scale", at::kFloat, "float32", 1, "[out]");
  check_shape(op, scale, "scale", "[out]", {q.size(0)});
  check_same_device(op, q, "q", scale, "scale");
}

void check_int4_args(const at::Tensor& packed, const at::Tensor& scale, int64_t group_size,
                     at::ScalarType dtype) {
  constexpr const char* op = "dequantize_int4";
  check_out_dtype(op, dtype);
  check_tensor(op, packed, "packed", at::kByte, "uint8", 2, "[out, in/2]");
  const int64_t in = packed.size(1) * 2;
  TORCH_CHECK_VALUE(group_size >= 1 && in % group_size == 0, op,
                    ": group_size must be a positive divisor of in = ", in, ", got ", group_size);
  check_tensor(op, scale, "scale", at::kFloat, "float32", 2, "[out, in/group_size]");
  check_shape(op, scale, "scale", "[out, in/group_size]", {packed.size(0), in / group_size});
  check_same_device(op, packed, "packed", scale, "scale");
}

void check_fp8_block_args(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                          int64_t block_cols, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_fp8_block";
  check_out_dtype(op, dtype);
  TORCH_CHECK_VALUE(block_rows >= 1 && block_cols >= 1, op,
                    ": block_rows and block_cols must be >= 1, got ", block_rows, " and ",
                    block_cols);
  check_tensor(op, weight, "weight", at::kFloat8_e4m3fn, "float8_e4m3fn", 2, "[out, in]");
  check_tensor(op, scale_inv, "scale_inv", at::kFloat, "float32", 2,
               "[ceil(out/block_rows), ceil(in/block_cols)]");
  check_shape(op, scale_inv, "scale_inv", "[ceil(out/block_rows), ceil(in/block_cols)]",
              {ceil_div(weight.size(0), block_rows), ceil_div(weight.size(1), block_cols)});
  check_same_device(op, weight, "weight", scale_inv, "scale_inv");
}

void check_mxfp4_args(const at::Tensor& blocks, const at::Tensor& scales, at::ScalarType dtype) {
  constexpr const char* op = "dequantize_mxfp4";
  check_out_dtype(op, dtype);
  check_tensor(op, blocks, "blocks", at::kByte, "uint8", 3, "[rows, nblocks, 16]");
  TORCH_CHECK_VALUE(blocks.size(2) == kMxfp4BlockBytes, op,
                    ": blocks must be [rows, nblocks, 16] (16 bytes = 32 e2m1 codes per block), "
                    "got shape ",
                    blocks.sizes());
  check_tensor(op, scales, "scales", at::kByte, "uint8", 2, "[rows, nblocks]");
  check_shape(op, scales, "scales", "[rows, nblocks]", {blocks.size(0), blocks.size(1)});
  check_same_device(op, blocks, "blocks", scales, "scales");
}

}  // namespace expertflow::ops
