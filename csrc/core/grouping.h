// Grouping of (token, slot) routing pairs by expert: a stable counting sort.
//
// Reference semantics of expertflow::group_by_expert. No torch, CUDA or Python headers here.
#pragma once

#include <cstdint>

namespace expertflow::core {

// ids: [num_pairs] expert of each pair (pair p = token * top_k + slot). Ids outside
// [0, num_experts) are "not routed" (for example -1 for a dropped slot).
// Outputs:
//   order:   [num_pairs] pair indices sorted by expert, ties in pair order (stable); the pairs
//            that are not routed follow all experts' pairs, in pair order
//   counts:  [num_experts] pairs per expert
//   offsets: [num_experts + 1] exclusive prefix sum of counts; offsets[E] = routed pairs
//   inverse: [num_pairs] position of each pair in `order`, or -1 for a pair not routed
void group_by_expert(const int32_t* ids, int64_t num_pairs, int32_t num_experts, int32_t* order,
                     int32_t* counts, int32_t* offsets, int32_t* inverse);

}  // namespace expertflow::core
