// The token scheduler (core/scheduler.h) on routing paths packed as an int64 tensor
// [requests, words] of bitsets. The tensor is checked here (c10::ValueError naming it); the
// core checks sizes and groups (std::invalid_argument).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "core/scheduler.h"

namespace expertflow::runtime {

core::SplitResult split_two_batches(const at::Tensor& paths, int32_t first_size);

core::RegroupResult regroup_batches(const at::Tensor& paths, const std::vector<int32_t>& group,
                                    int32_t num_groups, int32_t max_passes);

}  // namespace expertflow::runtime
