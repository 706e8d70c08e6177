// The expert cache's contracts over the CPU transfer engine: copies that fail to start give
// their slot back, refusals name the argument, stats are a consistent snapshot.
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <atomic>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "expert_cache_fixtures.h"
#include "runtime/transfer_engine.h"

namespace expertflow::runtime {
namespace {

using testing::holds;
using testing::patterned_store;

// The CPU engine, except that the copy numbered `fail_at` (0-based, counting every copy asked
// for) throws before anything is queued, as a CUDA engine does when cudaMemcpyAsync fails.
class FailingEngine final : public TransferEngine {
 public:
  FailingEngine(int32_t num_slots, int fail_at)
      : inner_(make_cpu_transfer_engine(num_slots)), fail_at_(fail_at) {}
  void copy(int32_t slot, const at::Tensor& src, const at::Tensor& dst, bool urgent) override {
    if (copies_++ == fail_at_) throw std::runtime_error("injected copy failure");
    inner_->copy(slot, src, dst, urgent);
  }
  bool arrived(int32_t slot) override { return inner_->arrived(slot); }
  double wait(int32_t slot) override { return inner_->wait(slot); }
  double block_until_arrived(int32_t slot) override { return inner_->block_until_arrived(slot); }
  void release(int32_t slot) override { inner_->release(slot); }
  void synchronize() override { inner_->synchronize(); }

 private:
  std::unique_ptr<TransferEngine> inner_;
  int fail_at_;
  int copies_ = 0;
};

ExpertCache failing_cache(int32_t slots, core::BudgetMode budget, int fail_at) {
  return ExpertCache(patterned_store(2, 6, 512), slots, 2, budget, core::EvictionPolicy::kLru,
                     at::Device(at::kCPU),
                     [fail_at](int32_t n) { return std::make_unique<FailingEngine>(n, fail_at); });
}

TEST(ExpertCache, AMissWhoseCopyFailsLeavesItsSlotFree) {
  // Layer 0 has two slots. The acquire's first or second copy fails: both misses are given
  // back, so the next acquire of two other experts finds both slots (a slot left "loading"
  // could never be freed: the acquire would fail for lack of slots).
  for (const int fail_at : {0, 1}) {
    ExpertCache cache = failing_cache(4, core::BudgetMode::kPerLayer, fail_at);
    EXPECT_THROW(cache.acquire(0, {0, 1}), std::runtime_error) << fail_at;
    cache.release(0);
    const AcquireResult r = cache.acquire(0, {2, 3});
    EXPECT_TRUE(holds(cache, r.slots[0], 0, 2)) << fail_at;
    EXPECT_TRUE(holds(cache, r.slots[1], 0, 3)) << fail_at;
    cache.release(0);
    const ExpertCacheStats s = cache.stats();
    EXPECT_EQ(s.policy.misses, 4);
    EXPECT_EQ(s.transfers.bytes_copied, (fail_at + 2) * 512);  // only the copies started
  }
}

TEST(ExpertCache, APrefetchWhoseCopyFailsIsNotCountedAndCanBeRequestedLater) {
  ExpertCache cache = failing_cache(4, core::BudgetMode::kGlobal, 1);
  at::Tensor scores = at::full({2, 6}, 0.0f);
  scores[1][4] = 1.0f;
  scores[1][5] = 0.5f;
  EXPECT_THROW(cache.plan(scores, 2), std::runtime_error);  // 4 copied, 5 failed
  cache.synchronize();
  EXPECT_EQ(cache.stats().policy.prefetches, 1);
  const AcquireResult r = cache.acquire(1, {4, 5});
  EXPECT_TRUE(holds(cache, r.slots[0], 1, 4));
  EXPECT_TRUE(holds(cache, r.slots[1], 1, 5));
  cache.release(1);
  const ExpertCacheStats s = cache.stats();
  EXPECT_EQ(s.policy.prefetch_hits, 1);
  EXPECT_EQ(s.policy.misses, 1);
}

// The message of the c10 error of type E that `call` throws, or "" if it throws none.
template <typename E, typename Call>
std::string message_of(Call call) {
  try {
    call();
  } catch (const E& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(ExpertCache, NonFiniteScoresAreRefusedNamingTheArgument) {
  ExpertCache cache(patterned_store(2, 6, 512), 4, 2, core::BudgetMode::kGlobal,
                    core::EvictionPolicy::kExpertFlow, at::Device(at::kCPU));
  const at::Tensor good = at::full({2, 6}, 0.5f);
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    at::Tensor scores = good.clone();
    scores[1][3] = bad;
    const std::string given = bad != bad ? "nan" : "inf";
    EXPECT_EQ(message_of<c10::ValueError>([&] { cache.plan(scores, 2); }),
              "ExpertCache.plan: layer_scores must be finite, got " + given + " at [1, 3]");
    EXPECT_EQ(message_of<c10::ValueError>([&] { cache.plan(good, 2, 0, 0.0f, scores); }),
              "ExpertCache.plan: reuse_scores must be finite, got " + given + " at [1, 3]");
    EXPECT_EQ(message_of<c10::ValueError>([&] { cache.prefetch(0, {1}, scores[1]); }),
              "ExpertCache.prefetch: scores must be finite, got " + given + " at [3]");
  }
  // Refused before anything changed: nothing was prefetched.
  EXPECT_EQ(cache.stats().policy.prefetches, 0);
  EXPECT_EQ(cache.stats().transfers.bytes_copied, 0);
}

TEST(ExpertCache, IndicesAreRefusedAsIndexErrorsBeforeAnythingChanges) {
  ExpertCache cache(patterned_store(2, 6, 512), 4, 2, core::BudgetMode::kGlobal,
                    core::EvictionPolicy::kExpertFlow, at::Device(at::kCPU));
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.acquire(2, {0}); }),
            "ExpertCache.acquire: layer must be in [0, 2), got 2");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.acquire(0, {1, 6}); }),
            "ExpertCache.acquire: expert must be in [0, 6), got 6");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.prefetch(0, {1, -1}, at::full({6}, 0.9f)); }),
            "ExpertCache.prefetch: expert must be in [0, 6), got -1");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.views(0, -1); }),
            "ExpertCache.views: layer must be in [0, 2), got -1");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.wait(4); }),
            "ExpertCache.wait: slot must be in [0, 4), got 4");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.release(-1); }),
            "ExpertCache.release: layer must be in [0, 2), got -1");
  const ExpertCacheStats s = cache.stats();
  EXPECT_EQ(s.policy.hits + s.policy.misses + s.policy.prefetches, 0);  // expert 1 not taken
}

TEST(ExpertCache, DuplicateExpertsAreRefusedBeforeAnythingChanges) {
  // The policy would give both positions one slot and count one request: refused instead.
  ExpertCache cache(patterned_store(2, 6, 512), 4, 2, core::BudgetMode::kGlobal,
                    core::EvictionPolicy::kExpertFlow, at::Device(at::kCPU));
  EXPECT_EQ(message_of<c10::ValueError>([&] { cache.acquire(0, {3, 1, 3}); }),
            "ExpertCache.acquire: experts must be distinct, got expert 3 at positions 0 and 2 "
            "(merge the ids first: each gets one slot)");
  EXPECT_EQ(message_of<c10::ValueError>([&] { cache.prefetch(1, {5, 5}, std::nullopt); }),
            "ExpertCache.prefetch: experts must be distinct, got expert 5 at positions 0 and 1 "
            "(merge the ids first: each gets one slot)");
  const ExpertCacheStats s = cache.stats();
  EXPECT_EQ(s.policy.hits + s.policy.misses + s.policy.prefetches, 0);
  EXPECT_EQ(s.transfers.bytes_copied, 0);
  const AcquireResult r = cache.acquire(0, {3, 1});  // distinct: accepted
  EXPECT_TRUE(holds(cache, r.slots[0], 0, 3));
  EXPECT_TRUE(holds(cache, r.slots[1], 0, 1));
  cache.release(0);
}

TEST(ExpertCache, ViewsAndWaitOnlyForSlotsTheLayerHolds) {
  ExpertCache cache(patterned_store(2, 6, 512), 4, 2, core::BudgetMode::kGlobal,
                    core::EvictionPolicy::kLru, at::Device(at::kCPU));
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.wait(2); }),
            "ExpertCache.wait: slot 2 is not held by any acquire (only slots acquire() "
            "returned, until the release() of their layer)");
  const AcquireResult r = cache.acquire(0, {4});
  const int32_t slot = r.slots[0];
  EXPECT_TRUE(holds(cache, slot, 0, 4));
  const std::string other = "ExpertCache.views: slot " + std::to_string(slot) +
                            " is not held by layer 1 (only slots acquire(1, ...) returned, "
                            "until release(1))";
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.views(slot, 1); }), other);
  cache.release(0);
  // Released: the slot may be refilled with another expert at any time.
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.views(slot, 0); }),
            "ExpertCache.views: slot " + std::to_string(slot) +
                " is not held by layer 0 (only slots acquire(0, ...) returned, until release(0))");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.wait(slot); }),
            "ExpertCache.wait: slot " + std::to_string(slot) +
                " is not held by any acquire (only slots acquire() returned, until the release() "
                "of their layer)");
  // Prefetched but not acquired: not held either.
  at::Tensor scores = at::full({2, 6}, 0.0f);
  scores[1][2] = 1.0f;
  cache.plan(scores, 1);
  cache.synchronize();
  for (int32_t s = 0; s < cache.num_slots(); ++s) {
    EXPECT_FALSE(message_of<c10::IndexError>([&] { cache.views(s, 1); }).empty()) << s;
  }
}

TEST(ExpertCache, AMissWhoseCopyFailedIsNotHeld) {
  // The failed miss went back to the policy: its slot is no longer the layer's to read.
  ExpertCache cache = failing_cache(4, core::BudgetMode::kPerLayer, 1);
  const AcquireResult first = cache.acquire(0, {0});  // copy 0 succeeds
  EXPECT_THROW(cache.acquire(0, {1}), std::runtime_error);
  EXPECT_TRUE(holds(cache, first.slots[0], 0, 0));  // still held
  for (int32_t s = 0; s < cache.num_slots(); ++s) {
    if (s == first.slots[0]) continue;
    EXPECT_FALSE(message_of<c10::IndexError>([&] { cache.views(s, 0); }).empty()) << s;
    EXPECT_FALSE(message_of<c10::IndexError>([&] { cache.wait(s); }).empty()) << s;
  }
  cache.release(0);
}

TEST(ExpertCache, CachedAnswersWithoutPinningCopyingOrCounting) {
  // cpu_experts="auto" asks which experts are held before deciding where each miss runs: the
  // question must change nothing the policy or the engine keeps.
  ExpertCache cache(patterned_store(2, 6, 512), 4, 2, core::BudgetMode::kPerLayer,
                    core::EvictionPolicy::kLru, at::Device(at::kCPU));
  EXPECT_EQ(cache.cached(0, {0, 1, 2}), std::vector<bool>({false, false, false}));
  cache.acquire(0, {1, 4});
  cache.release(0);
  EXPECT_EQ(cache.cached(0, {0, 1, 4}), std::vector<bool>({false, true, true}));
  EXPECT_EQ(cache.cached(1, {1, 4}), std::vector<bool>({false, false}));  // per layer
  at::Tensor scores = at::full({2, 6}, 0.0f);
  scores[1][5] = 1.0f;
  cache.plan(scores, 1);  // a prefetch counts as held while in flight too
  EXPECT_EQ(cache.cached(1, {5}), std::vector<bool>({true}));
  cache.synchronize();
  const ExpertCacheStats before = cache.stats();
  for (int round = 0; round < 3; ++round) cache.cached(0, {0, 1, 2, 3, 4, 5});
  const ExpertCacheStats after = cache.stats();
  EXPECT_EQ(after.policy.hits, before.policy.hits);
  EXPECT_EQ(after.policy.misses, before.policy.misses);
  EXPECT_EQ(after.transfers.bytes_copied, before.transfers.bytes_copied);
  // Nothing pinned: layer 0's two slots take two other experts, evicting 1 and 4 (LRU).
  cache.acquire(0, {2, 3});
  cache.release(0);
  EXPECT_EQ(cache.cached(0, {1, 2, 3, 4}), std::vector<bool>({false, true, true, false}));
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.cached(2, {0}); }),
            "ExpertCache.cached: layer must be in [0, 2), got 2");
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.cached(0, {6}); }),
            "ExpertCache.cached: expert must be in [0, 6), got 6");
}

// The CPU engine, except that a copy lands only when the test says so.
class HeldEngine final : public TransferEngine {
 public:
  explicit HeldEngine(int32_t num_slots) : inner_(make_cpu_transfer_engine(num_slots)) {}
  void copy(int32_t slot, const at::Tensor& src, const at::Tensor& dst, bool urgent) override {
    inner_->copy(slot, src, dst, urgent);
    inner_->block_until_arrived(slot);
    landed_[slot] = false;
  }
  bool arrived(int32_t slot) override { return landed_[slot]; }
  double wait(int32_t slot) override { return inner_->wait(slot); }
  double block_until_arrived(int32_t slot) override {
    landed_[slot] = true;
    return inner_->block_until_arrived(slot);
  }
  void release(int32_t slot) override { inner_->release(slot); }
  void synchronize() override { inner_->synchronize(); }
  void land(int32_t slot) { landed_[slot] = true; }

 private:
  std::unique_ptr<TransferEngine> inner_;
  std::map<int32_t, bool> landed_;
};

TEST(ExpertCache, CopiesAheadTellsWhereEachCopyIs) {
  HeldEngine* engine = nullptr;
  ExpertCache cache(patterned_store(2, 6, 512), 6, 2, core::BudgetMode::kGlobal,
                    core::EvictionPolicy::kLru, at::Device(at::kCPU), [&engine](int32_t n) {
                      auto e = std::make_unique<HeldEngine>(n);
                      engine = e.get();
                      return e;
                    });
  at::Tensor scores = at::full({2, 6}, 0.0f);
  scores[0][1] = scores[0][4] = scores[1][2] = 1.0f;
  cache.plan(scores, 2);  // three prefetches, in flight until landed
  EXPECT_EQ(cache.copies_ahead(0, {0, 1, 4}), std::vector<int32_t>({-1, 1, 2}));
  EXPECT_EQ(cache.copies_ahead(1, {2, 3}), std::vector<int32_t>({3, -1}));
  const AcquireResult r = cache.acquire(0, {1});
  engine->land(r.slots[0]);
  cache.release(0);
  EXPECT_EQ(cache.copies_ahead(0, {1, 4}), std::vector<int32_t>({0, 1}));  // 4 moved up
  EXPECT_EQ(cache.copies_ahead(1, {2}), std::vector<int32_t>({2}));
  EXPECT_EQ(message_of<c10::IndexError>([&] { cache.copies_ahead(0, {6}); }),
            "ExpertCache.copies_ahead: expert must be in [0, 6), got 6");
}

TEST(ExpertCache, DestroyedWithCopiesInFlight) {
  // The engine is destroyed before the slots and the store (member order): its worker finishes
  // the queued copies first. Run under ASan/TSan this would show a copy into freed memory.
  for (int round = 0; round < 20; ++round) {
    ExpertCache cache(patterned_store(2, 6, 64 << 10), 12, 2, core::BudgetMode::kGlobal,
                      core::EvictionPolicy::kExpertFlow, at::Device(at::kCPU));
    cache.plan(at::full({2, 6}, 1.0f), 6);
  }
}

}  // namespace
}  // namespace expertflow::runtime
