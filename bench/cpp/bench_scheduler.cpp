// Decision cost of the token scheduler: re-split 2 x B requests into two batches of B, and
// regroup G batches of B (every pair re-split, pass after pass). Target: <= 1 ms per decision
// of 2 x 64. Counters: distinct (layer, expert) pairs of both batches after
// the split and with the requests left in arrival order (FIFO), on clustered synthetic paths
// (8 "domains", 80% of each request's choices from its domain's experts).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>
#include <vector>

#include "core/scheduler.h"

namespace expertflow::core {
namespace {

std::vector<uint64_t> clustered_paths(int requests, int layers, int experts, int k, int words) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> coin(0, 1);
  std::vector<uint64_t> paths(static_cast<size_t>(requests) * words, 0);
  for (int r = 0; r < requests; ++r) {
    const int domain = static_cast<int>(coin(rng) * 8);
    for (int l = 0; l < layers; ++l) {
      std::vector<int> chosen;
      while (static_cast<int>(chosen.size()) < k) {
        const int e = coin(rng) < 0.8
                          ? (domain * experts / 8 + static_cast<int>(coin(rng) * 2 * k)) % experts
                          : static_cast<int>(coin(rng) * experts);
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (int e : chosen) {
        const int bit = l * experts + e;
        paths[static_cast<size_t>(r) * words + bit / 64] |= uint64_t{1} << (bit % 64);
      }
    }
  }
  return paths;
}

void BM_SplitTwoBatches(benchmark::State& state) {
  const int layers = static_cast<int>(state.range(0));
  const int experts = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  const int requests = static_cast<int>(state.range(3));
  const int words = (layers * experts + 63) / 64;
  const auto paths = clustered_paths(requests, layers, experts, k, words);
  SplitResult result;
  for (auto _ : state) {
    result = split_two_batches(paths.data(), requests, words, requests / 2);
    benchmark::DoNotOptimize(result.cost);
  }
  std::vector<int32_t> a, b;
  for (int r = 0; r < requests; ++r) (r < requests / 2 ? a : b).push_back(r);
  state.counters["pairs_split"] = static_cast<double>(result.cost);
  state.counters["pairs_fifo"] = static_cast<double>(split_cost(paths.data(), words, a, b));
  state.counters["swaps"] = result.swaps;
}

// Args: layers, experts, top-k (the demo model, Mixtral-8x7B, a DeepSeek-V3-sized model) and
// the requests of the two batches together (2 x 16, 2 x 64).
BENCHMARK(BM_SplitTwoBatches)
    ->ArgNames({"layers", "experts", "k", "requests"})
    ->Args({6, 16, 2, 32})
    ->Args({6, 16, 2, 128})
    ->Args({32, 8, 2, 32})
    ->Args({32, 8, 2, 128})
    ->Args({58, 256, 8, 32})
    ->Args({58, 256, 8, 128})
    ->Unit(benchmark::kMicrosecond);

void BM_RegroupBatches(benchmark::State& state) {
  const int layers = static_cast<int>(state.range(0));
  const int experts = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  const int groups = static_cast<int>(state.range(3));
  const int batch = static_cast<int>(state.range(4));
  const int requests = groups * batch;
  const int words = (layers * experts + 63) / 64;
  const auto paths = clustered_paths(requests, layers, experts, k, words);
  std::vector<int32_t> fifo(requests);
  for (int r = 0; r < requests; ++r) fifo[r] = r / batch;
  RegroupResult result;
  for (auto _ : state) {
    result = regroup_batches(paths.data(), requests, words, fifo, groups, 4);
    benchmark::DoNotOptimize(result.cost);
  }
  int64_t before = 0;
  for (int g = 0; g < groups; ++g) {
    std::vector<int32_t> members, none;
    for (int r = g * batch; r < (g + 1) * batch; ++r) members.push_back(r);
    before += split_cost(paths.data(), words, members, none);
  }
  state.counters["pairs_regrouped"] = static_cast<double>(result.cost);
  state.counters["pairs_fifo"] = static_cast<double>(before);
}

// Args: layers, experts, top-k, batches, batch size (4 batches of 16 as generate_batch's
// default, 8 of 16).
BENCHMARK(BM_RegroupBatches)
    ->ArgNames({"layers", "experts", "k", "batches", "batch"})
    ->Args({6, 16, 2, 4, 16})
    ->Args({6, 16, 2, 8, 16})
    ->Args({32, 8, 2, 4, 16})
    ->Args({58, 256, 8, 4, 16})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace expertflow::core
