#include "core/scheduler.h"

#include <algorithm>
#include <bit>
#include <numeric>
#include <stdexcept>
#include <string>

// The scheduler is popcounts over bitsets: x86-64 builds also get a POPCNT clone of its entry
// points, picked at load time where the CPU has the instruction (about 2x faster than the
// baseline's bit-twiddling popcount), without requiring it of the CPUs that run the build.
// Not under ThreadSanitizer: it instruments the clones' resolver, which the loader runs before
// the sanitizer's runtime is initialised, and the program crashes while loading.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__) && defined(__ELF__) && \
    !defined(__SANITIZE_THREAD__)
#define EXPERTFLOW_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define EXPERTFLOW_POPCNT_CLONES
#endif

namespace expertflow::core {
namespace {

int popcount_words(const uint64_t* a, int32_t words) {
  int n = 0;
  for (int32_t w = 0; w < words; ++w) n += std::popcount(a[w]);
  return n;
}

// Hamming distance: pairs in exactly one of the two paths.
int distance(const uint64_t* a, const uint64_t* b, int32_t words) {
  int n = 0;
  for (int32_t w = 0; w < words; ++w) n += std::popcount(a[w] ^ b[w]);
  return n;
}

// Per-batch state: how many member requests use each pair (bits -> counts), the union, and for
// each member the pairs only it uses (they leave the union when it leaves).
struct Batch {
  int32_t words = 0;
  std::vector<int32_t> counts;    // [words * 64]
  std::vector<uint64_t> union_;   // [words]
  std::vector<uint64_t> single_;  // [words]: pairs with count == 1

  explicit Batch(int32_t w)
      : words(w), counts(static_cast<size_t>(w) * 64), union_(w), single_(w) {}

  void update(const uint64_t* path, int delta) {
    for (int32_t w = 0; w < words; ++w) {
      for (uint64_t bits = path[w]; bits; bits &= bits - 1) {
        const int b = std::countr_zero(bits);
        const int32_t c = counts[w * 64 + b] += delta;
        const uint64_t mask = uint64_t{1} << b;
        union_[w] = c > 0 ? union_[w] | mask : union_[w] & ~mask;
        single_[w] = c == 1 ? single_[w] | mask : single_[w] & ~mask;
      }
    }
  }
  int size() const { return popcount_words(union_.data(), words); }
  // What moving the member with `path` to `other` saves, ignoring its swap partner: the
  // pairs that leave this union minus the pairs it adds to the other's (one pass over both).
  int move_gain(const uint64_t* path, const Batch& other) const {
    int n = 0;
    for (int32_t w = 0; w < words; ++w) {
      n += std::popcount(path[w] & single_[w]) - std::popcount(path[w] & ~other.union_[w]);
    }
    return n;
  }
};

}  // namespace

EXPERTFLOW_POPCNT_CLONES
int64_t split_cost(const uint64_t* paths, int32_t words, const std::vector<int32_t>& first,
                   const std::vector<int32_t>& second) {
  int64_t cost = 0;
  std::vector<uint64_t> u(words);
  for (const auto* batch : {&first, &second}) {
    std::fill(u.begin(), u.end(), 0);
    for (int32_t r : *batch) {
      for (int32_t w = 0; w < words; ++w) u[w] |= paths[static_cast<int64_t>(r) * words + w];
    }
    cost += popcount_words(u.data(), words);
  }
  return cost;
}

EXPERTFLOW_POPCNT_CLONES
SplitResult split_two_batches(const uint64_t* paths, int32_t num_requests, int32_t words,
                              int32_t first_size) {
  if (num_requests < 0 || words < 1) {
    throw std::invalid_argument("split_two_batches: num_requests must be >= 0 and words >= 1");
  }
  if (first_size < 0 || first_size > num_requests) {
    throw std::invalid_argument("split_two_batches: first_size must be in [0, num_requests=" +
                                std::to_string(num_requests) + "], got " +
                                std::to_string(first_size));
  }
  const auto path = [&](int32_t r) { return paths + static_cast<int64_t>(r) * words; };
  const int32_t second_size = num_requests - first_size;
  std::vector<int8_t> side(num_requests, -1);
  Batch batch[2] = {Batch(words), Batch(words)};
  const int32_t capacity[2] = {first_size, second_size};
  int32_t filled[2] = {0, 0};
  const auto join = [&](int32_t r, int s) {
    side[r] = static_cast<int8_t>(s);
    batch[s].update(path(r), +1);
    ++filled[s];
  };

  if (first_size > 0 && second_size > 0) {
    // Seeds: the request with the most pairs, and the one most different from it.
    int32_t a = 0;
    for (int32_t r = 1; r < num_requests; ++r) {
      if (popcount_words(path(r), words) > popcount_words(path(a), words)) a = r;
    }
    int32_t b = a == 0 ? 1 : 0;
    int best = -1;
    for (int32_t r = 0; r < num_requests; ++r) {
      if (r == a) continue;
      const int d = distance(path(r), path(a), words);
      if (d > best) best = d, b = r;
    }
    // Two medoids: every request goes, most decided first, to the seed it is closer to while
    // that batch has room (balanced two-medoid assignment on Hamming distance).
    std::vector<int32_t> order(num_requests);
    std::vector<int> lean(num_requests);
    for (int32_t r = 0; r < num_requests; ++r) {
      // > 0: closer to a
      lean[r] = distance(path(r), path(b), words) - distance(path(r), path(a), words);
    }
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&lean](int32_t x, int32_t y) {
      return std::abs(lean[x]) > std::abs(lean[y]);
    });
    for (int32_t r : order) {
      int s = lean[r] > 0 ? 0 : (lean[r] < 0 ? 1 : (filled[0] <= filled[1] ? 0 : 1));
      if (filled[s] == capacity[s]) s = 1 - s;
      join(r, s);
    }
  } else {
    for (int32_t r = 0; r < num_requests; ++r) join(r, first_size > 0 ? 0 : 1);
  }

  SplitResult result;
  // Local search over swaps; every accepted swap lowers the cost, so this terminates.
  if (first_size > 0 && second_size > 0) {
    std::vector<int32_t> members[2];
    std::vector<int> g(num_requests);
    std::vector<char> used(num_requests);
    const auto overlap = [&](int32_t a, int32_t b) {
      int n = 0;
      for (int32_t w = 0; w < words; ++w) {
        const uint64_t both = path(a)[w] & path(b)[w];
        n += std::popcount(both & batch[0].single_[w]) + std::popcount(both & batch[1].single_[w]);
      }
      return n;
    };
    for (;;) {
      members[0].clear();
      members[1].clear();
      for (int32_t r = 0; r < num_requests; ++r) members[side[r]].push_back(r);
      // gain(a, b) = g[a] + g[b] - |a & b & single(A)| - |a & b & single(B)|, where
      // g[a] = pairs only a holds in A - pairs of a new to B (and symmetrically for b): the
      // separable part bounds every gain, so pairs are scanned best bound first and pruned.
      for (int s = 0; s < 2; ++s) {
        for (int32_t r : members[s]) g[r] = batch[s].move_gain(path(r), batch[1 - s]);
        std::stable_sort(members[s].begin(), members[s].end(),
                         [&g](int32_t x, int32_t y) { return g[x] > g[y]; });
      }
      // One round: the best pair, then the next best among requests not yet swapped, and so
      // on. Later pairs are ranked by the round's (stale) g but applied only if their exact
      // gain in the current state is positive, so the cost of g (every request x every word)
      // is paid per round, not per swap. A round with fresh g that finds no improving swap
      // ends the search at the same local optimum as steepest descent.
      std::fill(used.begin(), used.end(), 0);
      int applied = 0;
      for (;;) {
        int best_gain = 0;
        int32_t best_a = -1, best_b = -1;
        const auto first_b = std::find_if(members[1].begin(), members[1].end(),
                                          [&used](int32_t r) { return !used[r]; });
        if (first_b == members[1].end()) break;
        for (int32_t a : members[0]) {
          if (used[a]) continue;
          if (g[a] + g[*first_b] <= best_gain) break;
          for (auto it = first_b; it != members[1].end(); ++it) {
            const int32_t b = *it;
            if (used[b]) continue;
            const int bound = g[a] + g[b];
            if (bound <= best_gain) break;
            const int gain = bound - overlap(a, b);
            if (gain > best_gain) best_gain = gain, best_a = a, best_b = b;
          }
        }
        if (best_a < 0) break;
        const int exact = batch[0].move_gain(path(best_a), batch[1]) +
                          batch[1].move_gain(path(best_b), batch[0]) - overlap(best_a, best_b);
        used[best_a] = 1;  // swapped now, or its stale bound misled: either way, not again
        if (exact <= 0) continue;
        used[best_b] = 1;
        batch[0].update(path(best_a), -1);
        batch[1].update(path(best_b), -1);
        batch[0].update(path(best_b), +1);
        batch[1].update(path(best_a), +1);
        side[best_a] = 1;
        side[best_b] = 0;
        ++result.swaps;
        ++applied;
      }
      if (applied == 0) break;
    }
  }
  for (int32_t r = 0; r < num_requests; ++r) (side[r] ? result.second : result.first).push_back(r);
  result.cost = batch[0].size() + batch[1].size();
  return result;
}

EXPERTFLOW_POPCNT_CLONES
RegroupResult regroup_batches(const uint64_t* paths, int32_t num_requests, int32_t words,
                              const std::vector<int32_t>& group, int32_t num_groups,
                              int32_t max_passes) {
  if (num_requests < 0 || words < 1 || num_groups < 1 || max_passes < 0) {
    throw std::invalid_argument(
        "regroup_batches: need num_requests >= 0, words >= 1, num_groups >= 1, max_passes >= 0");
  }
  if (static_cast<int64_t>(group.size()) != num_requests) {
    throw std::invalid_argument("regroup_batches: group has " + std::to_string(group.size()) +
                                " entries for " + std::to_string(num_requests) + " requests");
  }
  for (int32_t g : group) {
    if (g < 0 || g >= num_groups) {
      throw std::invalid_argument("regroup_batches: batch " + std::to_string(g) +
                                  " out of range [0, " + std::to_string(num_groups) + ")");
    }
  }
  RegroupResult result;
  result.group = group;
  std::vector<uint64_t> pair_paths;
  std::vector<int32_t> members;
  for (int32_t pass = 0; pass < max_passes; ++pass) {
    bool changed = false;
    for (int32_t g = 0; g < num_groups; ++g) {
      for (int32_t h = g + 1; h < num_groups; ++h) {
        members.clear();
        for (int32_t r = 0; r < num_requests; ++r) {
          if (result.group[r] == g) members.push_back(r);
        }
        const auto first_size = static_cast<int32_t>(members.size());
        for (int32_t r = 0; r < num_requests; ++r) {
          if (result.group[r] == h) members.push_back(r);
        }
        const auto n = static_cast<int32_t>(members.size());
        if (first_size == 0 || first_size == n) continue;
        pair_paths.resize(static_cast<size_t>(n) * words);
        for (int32_t i = 0; i < n; ++i) {
          std::copy_n(paths + static_cast<int64_t>(members[i]) * words, words,
                      pair_paths.begin() + static_cast<int64_t>(i) * words);
        }
        std::vector<int32_t> old_first(first_size), old_second(n - first_size);
        std::iota(old_first.begin(), old_first.end(), 0);
        std::iota(old_second.begin(), old_second.end(), first_size);
        const int64_t before = split_cost(pair_paths.data(), words, old_first, old_second);
        const SplitResult split = split_two_batches(pair_paths.data(), n, words, first_size);
        if (split.cost >= before) continue;
        // Equal sizes: the new batch sharing fewer requests with g may take h's label instead.
        const auto stay = static_cast<int32_t>(std::count_if(
            split.first.begin(), split.first.end(), [&](int32_t i) { return i < first_size; }));
        const bool flip = first_size * 2 == n && stay * 2 < first_size;
        for (int32_t i : split.first) result.group[members[i]] = flip ? h : g;
        for (int32_t i : split.second) result.group[members[i]] = flip ? g : h;
        ++result.resplits;
        changed = true;
      }
    }
    if (!changed) break;
  }
  std::vector<uint64_t> unions(static_cast<size_t>(num_groups) * words, 0);
  for (int32_t r = 0; r < num_requests; ++r) {
    for (int32_t w = 0; w < words; ++w) {
      unions[static_cast<int64_t>(result.group[r]) * words + w] |=
          paths[static_cast<int64_t>(r) * words + w];
    }
  }
  result.cost = popcount_words(unions.data(), num_groups * words);
  return result;
}

}  // namespace expertflow::core
