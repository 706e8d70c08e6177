// expertflow::cpu_expert: one expert (up/gate-up -> activation -> down) over a few tokens on the
// CPU, reading the expert's packed tensors where they lie (csrc/core/expert_kernels.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string_view>

#include "core/expert_kernels.h"

namespace expertflow::ops {

// A weight's packed tensors checked against its format and described for the core kernels.
// `name` is the argument ("up" or "down") for messages; `fp8_block` the fp8 scale tile.
core::PackedWeight packed_weight(std::string_view name, at::TensorList parts,
                                 std::string_view format, bool transposed,
                                 c10::IntArrayRef fp8_block);

core::Activation parse_activation(std::string_view activation);

// Checks the shapes that tie x, the two weights and the biases together.
void check_expert_shapes(const at::Tensor& x, const core::PackedWeight& up,
                         const std::optional<at::Tensor>& up_bias, const core::PackedWeight& down,
                         const std::optional<at::Tensor>& down_bias, core::Activation act);

at::Tensor cpu_expert_cpu(const at::Tensor& x, at::TensorList up,
                          const std::optional<at::Tensor>& up_bias, at::TensorList down,
                          const std::optional<at::Tensor>& down_bias, c10::string_view format,
                          c10::string_view activation, bool transposed, double alpha, double limit,
                          c10::IntArrayRef fp8_block);

}  // namespace expertflow::ops
