#include "grouping.h"

#include <algorithm>
#include <vector>

namespace expertflow::core {

void group_by_expert(const int32_t* ids, int64_t num_pairs, int32_t num_experts, int32_t* order,
                     int32_t* counts, int32_t* offsets, int32_t* inverse) {
  const auto routed = [num_experts](int32_t e) { return e >= 0 && e < num_experts; };
  std::fill(counts, counts + num_experts, 0);
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (routed(ids[p])) ++counts[ids[p]];
  }
  offsets[0] = 0;
  for (int32_t e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];

  std::vector<int32_t> cursor(offsets, offsets + num_experts);
  int32_t unrouted_cursor = offsets[num_experts];
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int32_t e = ids[p];
    const int32_t pos = routed(e) ? cursor[e]++ : unrouted_cursor++;
    order[pos] = static_cast<int32_t>(p);
    inverse[p] = routed(e) ? pos : -1;
  }
}

}  // namespace expertflow::core
