// Token scheduler: re-split the requests of two consecutive decode batches so that the two
// batches together need as few distinct (layer, expert) pairs as possible.
//
// Each request's predicted routing path is a set of (layer, expert) pairs, given as a bitset of
// `words` 64-bit words. The split keeps both batch sizes. No torch, CUDA or Python here.
#pragma once

#include <cstdint>
#include <vector>

namespace expertflow::core {

struct SplitResult {
  std::vector<int32_t> first;   // request indices of the first batch, ascending
  std::vector<int32_t> second;  // the rest, ascending
  int64_t cost = 0;             // |union(first)| + |union(second)| in (layer, expert) pairs
  int32_t swaps = 0;            // improving swaps the local search made
};

// paths: [num_requests * words] bitsets. Splits the requests into batches of `first_size` and
// num_requests - first_size. Deterministic: same input, same split.
//
// Method: a balanced two-medoid assignment (the request with the most pairs and the one
// farthest from it seed the batches; the others join, most decided first, the batch of the
// nearer seed while it has room), then rounds of pair swaps, best first, each evaluated exactly
// from per-batch pair counts, until no swap lowers the cost. ExpertFlow uses balanced k-medoids
// on Hamming similarity; the swaps optimise the quantity that matters (distinct pairs per batch).
SplitResult split_two_batches(const uint64_t* paths, int32_t num_requests, int32_t words,
                              int32_t first_size);

struct RegroupResult {
  std::vector<int32_t> group;  // the batch of every request
  int64_t cost = 0;            // sum over batches of |union| in (layer, expert) pairs
  int32_t resplits = 0;        // pairs of batches whose split changed
};

// Regroups the requests of `num_groups` batches (request r is in batch group[r]) keeping every
// batch's size: passes over all pairs of batches, re-splitting each pair with
// split_two_batches where that lowers the pair's cost, until a pass changes nothing (at most
// `max_passes`). A re-split batch keeps the label of the old batch it shares most requests
// with, so as few requests (and their KV rows) move as possible. Deterministic.
RegroupResult regroup_batches(const uint64_t* paths, int32_t num_requests, int32_t words,
                              const std::vector<int32_t>& group, int32_t num_groups,
                              int32_t max_passes);

// |union| + |union| of a given split (the cost above), for tests and baselines.
int64_t split_cost(const uint64_t* paths, int32_t words, const std::vector<int32_t>& first,
                   const std::vector<int32_t>& second);

}  // namespace expertflow::core
