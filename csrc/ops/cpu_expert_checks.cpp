// cpu_expert's argument checks: each packed tensor against its format (the layouts of
// python/expertflow/runtime/expert_format.py), and the shapes tying the expert together.
#include <c10/util/Exception.h>

#include <string>

#include "ops/cpu_expert.h"

namespace expertflow::ops {
namespace {

void check_part(std::string_view name, int64_t i, const at::Tensor& t, at::ScalarType dtype,
                int64_t dims, std::string_view what) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == dims, "cpu_expert: ", name, "[", i,
                    "] must be ", what, " (", dtype, ", ", dims, "-D), got ", t.scalar_type(),
                    " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "cpu_expert: ", name, "[", i, "] must be on the CPU, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "cpu_expert: ", name, "[", i,
                    "] must be contiguous (the kernel reads it where it lies), got strides ",
                    t.strides());
}

void check_count(std::string_view name, at::TensorList parts, size_t n, std::string_view format) {
  TORCH_CHECK_VALUE(parts.size() == n, "cpu_expert: format '", format, "' takes ", n,
                    " tensors per weight, got ", parts.size(), " for ", name);
}

void check_shape(std::string_view name, int64_t i, const at::Tensor& t,
                 std::initializer_list<int64_t> want) {
  TORCH_CHECK_VALUE(t.sizes() == c10::IntArrayRef(want), "cpu_expert: ", name, "[", i,
                    "] must have shape ", c10::IntArrayRef(want), ", got ", t.sizes());
}

core::PackedWeight float_weight(std::string_view name, const at::Tensor& w, bool transposed) {
  const auto dtype = w.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "cpu_expert: format 'float' takes float32, bfloat16 or float16 weights, got ",
                    dtype, " for ", name);
  check_part(name, 0, w, dtype, 2, transposed ? "the weight [in, out]" : "the weight [out, in]");
  core::PackedWeight p;
  p.format = dtype == at::kFloat      ? core::WeightFormat::kF32
             : dtype == at::kBFloat16 ? core::WeightFormat::kBF16
                                      : core::WeightFormat::kF16;
  p.out = transposed ? w.size(1) : w.size(0);
  p.in = transposed ? w.size(0) : w.size(1);
  p.transposed = transposed;
  p.data = w.const_data_ptr();
  return p;
}

}  // namespace

core::PackedWeight packed_weight(std::string_view name, at::TensorList parts,
                                 std::string_view format, bool transposed,
                                 c10::IntArrayRef fp8_block) {
  TORCH_CHECK_VALUE(!transposed || format == "float", "cpu_expert: transposed=True applies to the ",
                    "float format only (packed formats are always [out, in]), got format '", format,
                    "'");
  if (format == "float") {
    check_count(name, parts, 1, format);
    return float_weight(name, parts[0], transposed);
  }
  check_count(name, parts, 2, format);
  const at::Tensor& codes = parts[0];
  const at::Tensor& scale = parts[1];
  core::PackedWeight p;
  p.data = codes.const_data_ptr();
  p.scale = scale.const_data_ptr();
  if (format == "int8") {
    check_part(name, 0, codes, at::kChar, 2, "int8 codes [out, in]");
    check_part(name, 1, scale, at::kFloat, 1, "per-row scales [out]");
    p.format = core::WeightFormat::kInt8;
    p.out = codes.size(0);
    p.in = codes.size(1);
    check_shape(name, 1, scale, {p.out});
  } else if (format == "int4") {
    check_part(name, 0, codes, at::kByte, 2, "packed int4 codes [out, in / 2]");
    check_part(name, 1, scale, at::kFloat, 2, "group scales [out, in / group]");
    p.format = core::WeightFormat::kInt4;
    p.out = codes.size(0);
    p.in = codes.size(1) * 2;
    TORCH_CHECK_VALUE(scale.size(0) == p.out && scale.size(1) >= 1 && p.in % scale.size(1) == 0,
                      "cpu_expert: ", name, "[1] must be [out=", p.out,
                      ", in / group] with a group dividing in=", p.in, ", got ", scale.sizes());
    p.group = p.in / scale.size(1);
  } else if (format == "fp8") {
    check_part(name, 0, codes, at::kFloat8_e4m3fn, 2, "e4m3 values [out, in]");
    check_part(name, 1, scale, at::kFloat, 2, "block scales");
    TORCH_CHECK_VALUE(fp8_block.size() == 2 && fp8_block[0] > 0 && fp8_block[1] > 0,
                      "cpu_expert: fp8_block must be two positive ints, got ", fp8_block);
    p.format = core::WeightFormat::kFp8;
    p.out = codes.size(0);
    p.in = codes.size(1);
    p.block_rows = fp8_block[0];
    p.block_cols = fp8_block[1];
    check_shape(
        name, 1, scale,
        {(p.out + p.block_rows - 1) / p.block_rows, (p.in + p.block_cols - 1) / p.block_cols});
  } else if (format == "mxfp4") {
    check_part(name, 0, codes, at::kByte, 3, "e2m1 blocks [out, in / 32, 16]");
    check_part(name, 1, scale, at::kByte, 2, "e8m0 scales [out, in / 32]");
    TORCH_CHECK_VALUE(codes.size(2) == 16, "cpu_expert: ", name,
                      "[0] must be [out, in / 32, 16], got ", codes.sizes());
    p.format = core::WeightFormat::kMxfp4;
    p.out = codes.size(0);
    p.in = codes.size(1) * 32;
    check_shape(name, 1, scale, {p.out, codes.size(1)});
  } else {
    TORCH_CHECK_VALUE(false, "cpu_expert: format must be 'float', 'int8', 'int4', 'fp8' or ",
                      "'mxfp4', got '", format, "'");
  }
  return p;
}

core::Activation parse_activation(std::string_view a) {
  using core::Activation;
  if (a == "silu_gated") return Activation::kSiluGated;
  if (a == "gelu_gated") return Activation::kGeluGated;
  if (a == "gelu_tanh_gated") return Activation::kGeluTanhGated;
  if (a == "gpt_oss") return Activation::kGptOss;
  if (a == "silu") return Activation::kSilu;
  if (a == "gelu") return Activation::kGelu;
  if (a == "gelu_tanh") return Activation::kGeluTanh;
  if (a == "relu") return Activation::kRelu;
  if (a == "relu2") return Activation::kRelu2;
  TORCH_CHECK_VALUE(false, "cpu_expert: activation must be one of silu_gated, gelu_gated, ",
                    "gelu_tanh_gated, gpt_oss, silu, gelu, gelu_tanh, relu, relu2; got '", a, "'");
}

void check_expert_shapes(const at::Tensor& x, const core::PackedWeight& up,
                         const std::optional<at::Tensor>& up_bias, const core::PackedWeight& down,
                         const std::optional<at::Tensor>& down_bias, core::Activation act) {
  const int64_t hidden = x.size(1);
  TORCH_CHECK_VALUE(up.in == hidden, "cpu_expert: up's input size ", up.in,
                    " must equal x's hidden size ", hidden);
  const bool gated = core::activation_is_gated(act);
  TORCH_CHECK_VALUE(!gated || up.out % 2 == 0, "cpu_expert: a gated activation needs an even ",
                    "number of up outputs (gate and up), got ", up.out);
  const int64_t inter = gated ? up.out / 2 : up.out;
  TORCH_CHECK_VALUE(down.in == inter && down.out == hidden,
                    "cpu_expert: down must be [out=", hidden, ", in=", inter, "] for up's ", up.out,
                    " outputs, got [", down.out, ", ", down.in, "]");
  const std::pair<const std::optional<at::Tensor>*, int64_t> biases[] = {{&up_bias, up.out},
                                                                         {&down_bias, hidden}};
  for (const auto& [bias, size] : biases) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    const char* which = bias == &up_bias ? "up_bias" : "down_bias";
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == size && b.is_floating_point(),
                      "cpu_expert: ", which, " must be a 1-D float tensor of ", size,
                      " values, got ", b.scalar_type(), " of shape ", b.sizes());
    TORCH_CHECK_VALUE(b.device().is_cpu(), "cpu_expert: ", which, " must be on the CPU, got ",
                      b.device());
  }
}

}  // namespace expertflow::ops
