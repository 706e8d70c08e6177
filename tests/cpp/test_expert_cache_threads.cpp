// The expert cache shared by threads over the CPU transfer engine: workers acquiring, waiting,
// reading views and releasing while others plan, prefetch and read stats. Every acquired slot
// must hold the requested expert's bytes, and the counters must add up. Built with
// EXPERTFLOW_SANITIZE=thread, this is the ThreadSanitizer check of the runtime's locking.
//
// Each worker runs its own layer: release(layer) unpins every slot acquire(layer) pinned,
// whichever thread acquired it, so two threads running one layer must serialise on it.
#include <ATen/ops/rand.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "expert_cache_fixtures.h"

namespace expertflow::runtime {
namespace {

using testing::holds;
using testing::patterned_store;

constexpr int32_t kLayers = 4;
constexpr int32_t kExperts = 8;
constexpr int32_t kTopK = 2;
constexpr int64_t kExpertBytes = 4096;
constexpr int kSteps = 150;

struct Totals {
  std::atomic<int64_t> requests{0};  // distinct experts asked of acquire
  std::atomic<int64_t> waits{0};
  std::atomic<int64_t> wrong{0};  // slots that did not hold the requested expert
};

// kSteps of: acquire kTopK distinct random experts of `layer`, check each slot's bytes in
// ready order, release.
void run_layer(ExpertCache& cache, int32_t layer, Totals& totals) {
  std::mt19937 rng(layer);
  std::vector<int32_t> all(kExperts);
  for (int32_t e = 0; e < kExperts; ++e) all[e] = e;
  for (int step = 0; step < kSteps; ++step) {
    std::shuffle(all.begin(), all.end(), rng);
    const std::vector<int32_t> wanted(all.begin(), all.begin() + kTopK);
    const AcquireResult r = cache.acquire(layer, wanted);
    for (int32_t i : r.ready_order) {
      if (!holds(cache, r.slots[i], layer, wanted[i])) ++totals.wrong;
      ++totals.waits;
    }
    cache.release(layer);
    totals.requests += kTopK;
  }
}

// Plans every layer (random scores) and prefetches lookahead-style until `stop`.
void plan_and_prefetch(ExpertCache& cache, const std::atomic<bool>& stop) {
  std::mt19937 rng(99);
  for (int round = 0; !stop; ++round) {
    cache.plan(at::rand({kLayers, kExperts}), kTopK, round % kLayers, 0.2f,
               at::rand({kLayers, kExperts}));
    const int32_t layer = static_cast<int32_t>(rng() % kLayers);
    cache.prefetch(layer, {static_cast<int32_t>(rng() % kExperts)}, at::rand({kExperts}));
    std::this_thread::yield();
  }
}

// Reads the stats snapshot until `stop`: its counters never go backwards.
void watch_stats(const ExpertCache& cache, const std::atomic<bool>& stop, Totals& totals) {
  int64_t loads = 0;
  while (!stop) {
    const ExpertCacheStats s = cache.stats();
    if (s.policy.loads() < loads) ++totals.wrong;
    if (s.transfers.bytes_copied != s.policy.loads() * kExpertBytes) ++totals.wrong;
    loads = s.policy.loads();
    std::this_thread::yield();
  }
}

void run_threads(core::BudgetMode budget, core::EvictionPolicy policy, int32_t slots) {
  ExpertCache cache(patterned_store(kLayers, kExperts, kExpertBytes), slots, kTopK, budget, policy,
                    at::Device(at::kCPU));
  Totals totals;
  std::atomic<bool> stop{false};
  std::thread planner(plan_and_prefetch, std::ref(cache), std::cref(stop));
  std::thread watcher(watch_stats, std::cref(cache), std::cref(stop), std::ref(totals));
  std::vector<std::thread> workers;
  for (int32_t l = 0; l < kLayers; ++l) {
    workers.emplace_back(run_layer, std::ref(cache), l, std::ref(totals));
  }
  for (std::thread& t : workers) t.join();
  stop = true;
  planner.join();
  watcher.join();
  cache.synchronize();

  EXPECT_EQ(totals.wrong, 0);
  const ExpertCacheStats s = cache.stats();
  EXPECT_EQ(s.policy.hits + s.policy.misses, totals.requests);
  EXPECT_EQ(totals.requests, int64_t{kLayers} * kSteps * kTopK);
  EXPECT_EQ(s.transfers.bytes_copied, s.policy.loads() * kExpertBytes);
  EXPECT_LE(s.policy.prefetch_hits, s.policy.prefetches);
  EXPECT_LE(s.transfers.late_waits, totals.waits);
  EXPECT_GE(s.transfers.wait_seconds, 0.0);
}

TEST(ExpertCacheThreads, PerLayerPoolsExpertFlow) {
  run_threads(core::BudgetMode::kPerLayer, core::EvictionPolicy::kExpertFlow, kLayers * 3);
}

TEST(ExpertCacheThreads, OneGlobalPoolLru) {
  // Few slots shared by four layers: acquires often find the pool full of slots pinned by the
  // other workers or still loading, and wait for a copy to land (full_pool_waits). Two slots
  // beyond what the workers pin keep every acquire possible.
  run_threads(core::BudgetMode::kGlobal, core::EvictionPolicy::kLru, kLayers * kTopK + 2);
}

}  // namespace
}  // namespace expertflow::runtime
