#include "runtime/packed_paths.h"

#include <c10/util/Exception.h>

namespace expertflow::runtime {
namespace {

// `paths` as contiguous CPU int64 [requests, words >= 1], or a ValueError naming the caller.
at::Tensor packed(const at::Tensor& paths, const char* name) {
  TORCH_CHECK_VALUE(paths.device().is_cpu() && paths.scalar_type() == at::kLong &&
                        paths.dim() == 2 && paths.size(1) >= 1,
                    name,
                    ": paths must be a CPU int64 tensor [requests, words] of packed bits, got ",
                    paths.scalar_type(), paths.sizes());
  return paths.contiguous();
}

const uint64_t* bits(const at::Tensor& p) {
  return reinterpret_cast<const uint64_t*>(p.const_data_ptr<int64_t>());
}

}  // namespace

core::SplitResult split_two_batches(const at::Tensor& paths, int32_t first_size) {
  const at::Tensor p = packed(paths, "split_two_batches");
  return core::split_two_batches(bits(p), static_cast<int32_t>(p.size(0)),
                                 static_cast<int32_t>(p.size(1)), first_size);
}

core::RegroupResult regroup_batches(const at::Tensor& paths, const std::vector<int32_t>& group,
                                    int32_t num_groups, int32_t max_passes) {
  const at::Tensor p = packed(paths, "regroup_batches");
  return core::regroup_batches(bits(p), static_cast<int32_t>(p.size(0)),
                               static_cast<int32_t>(p.size(1)), group, num_groups, max_passes);
}

}  // namespace expertflow::runtime
