// Argument checks shared by the ops' common checking code (*_common.cpp), run by the CPU and
// the CUDA kernels alike (the Python fake kernels in expertflow/ops/_fake.py mirror them).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace expertflow::ops {

// The most experts an op accepts. Real MoE models route over at most a few hundred experts per
// layer; per-expert outputs (group_by_expert's counts and offsets, topk_gating's per-thread
// workspace) are O(num_experts), so an absurd count would allocate gigabytes before any work
// (2^30 experts: 12.8 GB). 2^20 keeps those under 8 MB and is the same bound for every op, so
// ids one op produces are always accepted by the next.
inline constexpr int64_t kMaxExperts = int64_t{1} << 20;

// ValueError unless `tensor` (argument `name`) is on the device of `first` (argument
// `first_name`), naming both devices. The dispatcher picks one kernel from the devices of all
// the inputs together (a meta input selects the fake kernel, a CUDA one the CUDA kernel), so an
// input on another device would be read from the wrong memory or never be read at all.
inline void check_same_device(const char* op, const at::Tensor& first, const char* first_name,
                              const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.device() == first.device(), op, ": ", name, " must be on ", first_name,
                    "' device ", first.device(), " (all inputs on one device), got ",
                    tensor.device());
}

}  // namespace expertflow::ops
