// The cache policy's contracts at its boundary: refused arguments, names parsed, and a load
// whose copy could not start given back (cancel_load).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/cache_policy.h"

namespace expertflow::core {
namespace {

CacheOptions options(int layers, int experts, int slots, BudgetMode budget, EvictionPolicy policy) {
  CacheOptions o;
  o.num_layers = layers;
  o.num_experts = experts;
  o.num_slots = slots;
  o.top_k = 1;
  o.budget = budget;
  o.policy = policy;
  return o;
}

// The message of the std::invalid_argument `call` throws, or "" if it throws none.
template <typename Call>
std::string invalid_argument_of(Call call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(CachePolicyContracts, ParsesPolicyAndBudgetNames) {
  EXPECT_EQ(parse_eviction_policy("lru"), EvictionPolicy::kLru);
  EXPECT_EQ(parse_eviction_policy("lfu"), EvictionPolicy::kLfu);
  EXPECT_EQ(parse_eviction_policy("lrfu"), EvictionPolicy::kLrfu);
  EXPECT_EQ(parse_eviction_policy("expertflow"), EvictionPolicy::kExpertFlow);
  EXPECT_EQ(parse_eviction_policy("belady"), EvictionPolicy::kBelady);
  EXPECT_EQ(parse_budget_mode("per_layer"), BudgetMode::kPerLayer);
  EXPECT_EQ(parse_budget_mode("global"), BudgetMode::kGlobal);
  // Every listed name parses, and the refusal lists exactly those names.
  std::string listed;
  for (auto name : policy_names()) {
    EXPECT_NO_THROW(parse_eviction_policy(std::string(name))) << name;
    listed += (listed.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  EXPECT_EQ(invalid_argument_of([] { parse_eviction_policy("LRU"); }),
            "policy must be one of " + listed + ", got 'LRU'");
  EXPECT_EQ(invalid_argument_of([] { parse_budget_mode("some"); }),
            "budget must be 'per_layer' or 'global', got 'some'");
}

TEST(CachePolicyContracts, NonFiniteScoresAreRefusedAndChangeNothing) {
  // Expert 1 is valued above expert 0; a refused call must not change that, even in part.
  CachePolicy cache(options(1, 4, 2, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow));
  const std::vector<float> good = {0.1f, 0.9f, 0.0f, 0.0f};
  cache.set_scores(0, good.data());
  for (const float bad : {std::nanf(""), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    const std::vector<float> scores = {0.9f, 0.1f, bad, 0.0f};
    const std::string refused = invalid_argument_of([&] { cache.set_scores(0, scores.data()); });
    EXPECT_NE(refused.find("set_scores: scores must be finite, got "), std::string::npos);
    EXPECT_NE(refused.find(" for expert 2"), std::string::npos) << refused;
    const std::string reuse =
        invalid_argument_of([&] { cache.set_scores(0, good.data(), scores.data()); });
    EXPECT_NE(reuse.find("set_scores: reuse must be finite"), std::string::npos) << reuse;
  }
  for (const int32_t expert : {0, 1, 2}) {
    std::vector<int32_t> slots(1);
    std::vector<Load> loads;
    cache.acquire(0, &expert, 1, slots.data(), loads);
    for (const Load& l : loads) cache.loaded(l.slot);
    cache.release(0);
  }
  EXPECT_EQ(cache.slot_of(0, 0), -1);  // the lowest score went: still 0.1, not 0.9
  EXPECT_GE(cache.slot_of(0, 1), 0);
}

TEST(CachePolicyContracts, ScoreArraysMustHoldOneScorePerExpert) {
  CachePolicy cache(options(2, 4, 2, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow));
  const std::vector<float> four(4, 0.5f), three(3, 0.5f);
  cache.set_scores(1, four, four);
  cache.set_scores(1, four, {});
  EXPECT_EQ(invalid_argument_of([&] { cache.set_scores(1, three, {}); }),
            "set_scores: scores must have num_experts=4 entries, got 3");
  EXPECT_EQ(invalid_argument_of([&] { cache.set_scores(1, four, three); }),
            "set_scores: reuse must have num_experts=4 entries, got 3");
  EXPECT_THROW(cache.set_scores(2, four, {}), std::out_of_range);
}

TEST(CachePolicyContracts, ACancelledMissFreesItsSlotAndIsNotReleasedAgain) {
  CachePolicy cache(options(1, 4, 2, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  const std::vector<int32_t> experts = {0, 1};
  std::vector<int32_t> slots(2);
  std::vector<Load> loads;
  cache.acquire(0, experts.data(), 2, slots.data(), loads);
  ASSERT_EQ(loads.size(), 2u);
  cache.loaded(loads[0].slot);
  cache.cancel_load(loads[1].slot);  // expert 1's copy could not start
  EXPECT_EQ(cache.slot_of(0, 1), -1);
  EXPECT_EQ(cache.pins(loads[1].slot), 0);
  EXPECT_FALSE(cache.is_resident(loads[1].slot));
  EXPECT_EQ(cache.stats().misses, 2);  // the requests did miss
  cache.release(0);
  EXPECT_EQ(cache.pins(loads[0].slot), 0);
  EXPECT_EQ(cache.pins(loads[1].slot), 0);  // not -1: release no longer knew it
  // The freed slot is taken again without evicting expert 0.
  const int32_t two = 2;
  std::vector<Load> again;
  cache.acquire(0, &two, 1, slots.data(), again);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].slot, loads[1].slot);
  EXPECT_GE(cache.slot_of(0, 0), 0);
  EXPECT_EQ(cache.stats().evictions, 0);
}

TEST(CachePolicyContracts, ACancelledPrefetchIsNotCountedNorJudgedAtRelease) {
  CachePolicy cache(options(1, 4, 2, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow));
  const auto load = cache.prefetch(0, 3);
  ASSERT_TRUE(load.has_value());
  EXPECT_EQ(cache.stats().prefetches, 1);
  cache.cancel_load(load->slot);
  EXPECT_EQ(cache.stats().prefetches, 0);
  EXPECT_EQ(cache.slot_of(0, 3), -1);
  // A later prefetch of the same expert takes the same slot and is a fresh, judged prefetch.
  const auto retry = cache.prefetch(0, 3);
  ASSERT_TRUE(retry.has_value());
  EXPECT_EQ(retry->slot, load->slot);
  cache.loaded(retry->slot);
  const int32_t zero = 0;
  std::vector<int32_t> slot(1);
  std::vector<Load> loads;
  cache.acquire(0, &zero, 1, slot.data(), loads);
  cache.loaded(loads[0].slot);
  cache.release(0);  // 3 was not used: contradicted, the first to go
  const int32_t one = 1;
  loads.clear();
  cache.acquire(0, &one, 1, slot.data(), loads);
  EXPECT_EQ(cache.slot_of(0, 3), -1);
  EXPECT_GE(cache.slot_of(0, 0), 0);
}

TEST(CachePolicyContracts, OnlyALoadingSlotCanBeCancelled) {
  CachePolicy cache(options(1, 4, 2, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  EXPECT_THROW(cache.cancel_load(0), std::out_of_range);  // free
  EXPECT_THROW(cache.cancel_load(7), std::out_of_range);  // no such slot
  const auto load = cache.prefetch(0, 1);
  ASSERT_TRUE(load.has_value());
  cache.loaded(load->slot);
  EXPECT_THROW(cache.cancel_load(load->slot), std::out_of_range);  // resident
  EXPECT_GE(cache.slot_of(0, 1), 0);
}

}  // namespace
}  // namespace expertflow::core
