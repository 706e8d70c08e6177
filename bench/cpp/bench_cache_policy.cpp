// Decision cost of the expert cache policy: one acquire of k = 8 experts (plus completing its
// loads and the release) with 64 layers x 256 experts tracked. Target: <= 1 us per acquire.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "core/cache_policy.h"

namespace expertflow::core {
namespace {

constexpr int kLayers = 64;
constexpr int kExperts = 256;
constexpr int kTopK = 8;

struct Setup {
  CachePolicy cache;
  std::vector<std::vector<int32_t>> requests;
};

Setup make_setup(const benchmark::State& state) {
  CacheOptions o;
  o.num_layers = kLayers;
  o.num_experts = kExperts;
  o.top_k = kTopK;
  o.num_slots = static_cast<int32_t>(state.range(0));
  o.budget = state.range(1) ? BudgetMode::kGlobal : BudgetMode::kPerLayer;
  o.policy = static_cast<EvictionPolicy>(state.range(2));
  CachePolicy cache(o);
  // Pre-drawn skewed routings (Zipf-like), so that the loop measures the policy only.
  std::mt19937 rng(1);
  std::vector<double> weights(kExperts);
  for (int e = 0; e < kExperts; ++e) weights[e] = 1.0 / (1 + e);
  std::discrete_distribution<int32_t> pick(weights.begin(), weights.end());
  std::vector<std::vector<int32_t>> requests(4096);
  for (auto& r : requests) {
    while (static_cast<int>(r.size()) < kTopK) {
      const int32_t e = pick(rng);
      if (std::find(r.begin(), r.end(), e) == r.end()) r.push_back(e);
    }
  }
  std::vector<float> scores(kExperts);
  for (int e = 0; e < kExperts; ++e) scores[e] = static_cast<float>(weights[e]);
  for (int l = 0; l < kLayers; ++l) cache.set_scores(l, scores.data());
  return Setup{std::move(cache), std::move(requests)};
}

void BM_AcquireRelease(benchmark::State& state) {
  Setup setup = make_setup(state);
  CachePolicy& cache = setup.cache;
  const auto& requests = setup.requests;
  std::vector<int32_t> slots(kTopK);
  std::vector<Load> loads;
  size_t i = 0;
  int layer = 0;
  for (auto _ : state) {
    loads.clear();
    const auto& r = requests[i++ % requests.size()];
    cache.acquire(layer, r.data(), kTopK, slots.data(), loads);
    for (const Load& l : loads) cache.loaded(l.slot);
    cache.release(layer);
    layer = (layer + 1) % kLayers;
    benchmark::DoNotOptimize(slots.data());
  }
  const CacheStats& s = cache.stats();
  state.counters["hit_ratio"] =
      static_cast<double>(s.hits) / std::max<int64_t>(1, s.hits + s.misses);
}

// The acquire alone: all 64 layers acquired (timed), then completed and released (not timed).
void BM_AcquireOnly(benchmark::State& state) {
  Setup setup = make_setup(state);
  CachePolicy& cache = setup.cache;
  std::vector<int32_t> slots(kTopK);
  std::vector<Load> loads;
  size_t i = 0;
  for (auto _ : state) {
    loads.clear();
    for (int layer = 0; layer < kLayers; ++layer) {
      const auto& r = setup.requests[i++ % setup.requests.size()];
      cache.acquire(layer, r.data(), kTopK, slots.data(), loads);
    }
    state.PauseTiming();
    for (const Load& l : loads) cache.loaded(l.slot);
    for (int layer = 0; layer < kLayers; ++layer) cache.release(layer);
    state.ResumeTiming();
  }
  state.counters["ns_per_acquire"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * kLayers,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Args: total slots (25% of the 16384 experts), global pool?, policy (0 LRU, 2 ExpertFlow).
BENCHMARK(BM_AcquireRelease)
    ->ArgNames({"slots", "global", "policy"})
    ->Args({4096, 0, 0})
    ->Args({4096, 1, 0})
    ->Args({4096, 0, 2})
    ->Args({4096, 1, 2});
BENCHMARK(BM_AcquireOnly)
    ->ArgNames({"slots", "global", "policy"})
    ->Args({4096, 0, 0})
    ->Args({4096, 1, 0})
    ->Args({4096, 0, 2})
    ->Args({4096, 1, 2});

}  // namespace
}  // namespace expertflow::core
