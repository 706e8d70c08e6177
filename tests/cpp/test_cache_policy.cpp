#include <gtest/gtest.h>

#include <algorithm>
#include <list>
#include <map>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "core/cache_policy.h"

namespace expertflow::core {
namespace {

CacheOptions options(int layers, int experts, int slots, int top_k, BudgetMode budget,
                     EvictionPolicy policy) {
  CacheOptions o;
  o.num_layers = layers;
  o.num_experts = experts;
  o.num_slots = slots;
  o.top_k = top_k;
  o.budget = budget;
  o.policy = policy;
  return o;
}

// One layer step with instant copies: acquire, complete the loads, release. Returns the misses.
int step(CachePolicy& cache, int layer, std::vector<int32_t> experts) {
  std::vector<int32_t> slots(experts.size());
  std::vector<Load> loads;
  cache.acquire(layer, experts.data(), static_cast<int32_t>(experts.size()), slots.data(), loads);
  for (const Load& l : loads) cache.loaded(l.slot);
  cache.release(layer);
  return static_cast<int>(loads.size());
}

TEST(CachePolicy, RefusesABudgetBelowOneLayersTopK) {
  EXPECT_EQ(validate(options(4, 8, 8, 2, BudgetMode::kPerLayer, EvictionPolicy::kLru)), "");
  const std::string per_layer =
      validate(options(4, 8, 7, 2, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  EXPECT_NE(per_layer.find("num_slots must be at least 8"), std::string::npos) << per_layer;
  const std::string global =
      validate(options(4, 8, 1, 2, BudgetMode::kGlobal, EvictionPolicy::kLru));
  EXPECT_NE(global.find("at least 2"), std::string::npos) << global;
  EXPECT_NE(validate(options(4, 8, 8, 9, BudgetMode::kGlobal, EvictionPolicy::kLru)).find("top_k"),
            std::string::npos);
  EXPECT_THROW(CachePolicy(options(4, 8, 7, 2, BudgetMode::kPerLayer, EvictionPolicy::kLru)),
               std::invalid_argument);
}

TEST(CachePolicy, LruEvictsTheLeastRecentlyUsed) {
  CachePolicy cache(options(1, 8, 2, 1, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  EXPECT_EQ(step(cache, 0, {0}), 1);
  EXPECT_EQ(step(cache, 0, {1}), 1);
  EXPECT_EQ(step(cache, 0, {0}), 0);  // hit; 1 is now least recent
  EXPECT_EQ(step(cache, 0, {2}), 1);  // evicts 1
  EXPECT_GE(cache.slot_of(0, 0), 0);
  EXPECT_EQ(cache.slot_of(0, 1), -1);
  EXPECT_GE(cache.slot_of(0, 2), 0);
  EXPECT_EQ(cache.stats().hits, 1);
  EXPECT_EQ(cache.stats().misses, 3);
  EXPECT_EQ(cache.stats().evictions, 1);
}

TEST(CachePolicy, LfuKeepsTheFrequentlyUsed) {
  CachePolicy cache(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLfu));
  step(cache, 0, {0});
  step(cache, 0, {0});
  step(cache, 0, {1});
  step(cache, 0, {2});  // 1 used once, 0 twice: 1 goes although 0 is older
  EXPECT_GE(cache.slot_of(0, 0), 0);
  EXPECT_EQ(cache.slot_of(0, 1), -1);
}

TEST(CachePolicy, LfuCountsSinceLoadLfuHistoryOverTheWholeRun) {
  // 1 used 3 times, 0 twice; 2 pushes 0 out; 0 comes back (pushing 2 out); then 3 arrives.
  // Since its reload 0 was requested once (lfu: it goes), but 3 times over the run, as often
  // as 1, which was used longer ago (lfu_history: 1 goes).
  const std::vector<std::vector<int32_t>> requests = {{1}, {1}, {1}, {0}, {0}, {2}, {0}, {3}};
  CachePolicy in_cache(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLfu));
  CachePolicy history(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLfuHistory));
  for (const auto& experts : requests) {
    step(in_cache, 0, experts);
    step(history, 0, experts);
  }
  EXPECT_EQ(in_cache.slot_of(0, 0), -1);
  EXPECT_GE(in_cache.slot_of(0, 1), 0);
  EXPECT_GE(history.slot_of(0, 0), 0);
  EXPECT_EQ(history.slot_of(0, 1), -1);
  EXPECT_EQ(in_cache.stats().misses, history.stats().misses);  // 1, 0, 2, 0, 3
  EXPECT_EQ(parse_eviction_policy("lfu_history"), EvictionPolicy::kLfuHistory);
  const auto names = policy_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "lfu_history"), names.end());
}

TEST(CachePolicy, LrfuKeepsTheFrequentlyUsedUntilTheirUseDecays) {
  CacheOptions o = options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLrfu);
  o.frequency_decay = 0.5;  // a request halves in weight every token (one layer here)
  CachePolicy cache(o);
  step(cache, 0, {0});
  step(cache, 0, {0});
  step(cache, 0, {1});
  step(cache, 0, {2});  // 0 weighs 0.25 + 0.125, 1 weighs 0.5: 0 goes although used twice
  EXPECT_EQ(cache.slot_of(0, 0), -1);
  EXPECT_GE(cache.slot_of(0, 1), 0);

  CachePolicy slow(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLrfu));  // 0.99
  step(slow, 0, {0});
  step(slow, 0, {0});
  step(slow, 0, {1});
  step(slow, 0, {2});  // barely decayed, twice beats once: 1 goes although more recent
  EXPECT_GE(slow.slot_of(0, 0), 0);
  EXPECT_EQ(slow.slot_of(0, 1), -1);
  // The count outlives eviction: 1 comes back with its history, 2 (once, older) goes.
  step(slow, 0, {1});
  EXPECT_EQ(slow.slot_of(0, 2), -1);
}

TEST(CachePolicy, LrfuRejectsADecayOutsideZeroOne) {
  for (double decay : {0.0, 1.0, -0.5, 1.5}) {
    CacheOptions o = options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLrfu);
    o.frequency_decay = decay;
    EXPECT_NE(validate(o).find("frequency_decay must be in (0, 1)"), std::string::npos);
  }
}

TEST(CachePolicy, PinnedAndLoadingEntriesAreNeverEvicted) {
  CachePolicy cache(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kLru));
  std::vector<int32_t> slots(2);
  std::vector<Load> loads;
  const int32_t two[] = {0, 1};
  cache.acquire(0, two, 2, slots.data(), loads);  // both pinned, both loading
  ASSERT_EQ(loads.size(), 2u);
  const int32_t third[] = {2};
  int32_t slot = -1;
  EXPECT_THROW(cache.acquire(0, third, 1, &slot, loads), std::length_error);
  EXPECT_FALSE(cache.prefetch(0, 3).has_value());
  EXPECT_EQ(cache.slot_of(0, 0), slots[0]);  // the refused request changed nothing
  EXPECT_EQ(cache.slot_of(0, 1), slots[1]);
  for (const Load& l : loads) cache.loaded(l.slot);
  EXPECT_THROW(cache.acquire(0, third, 1, &slot, loads), std::length_error);  // still pinned
  cache.release(0);
  loads.clear();
  cache.acquire(0, third, 1, &slot, loads);
  EXPECT_EQ(loads.size(), 1u);
}

TEST(CachePolicy, PerLayerPoolsAreSeparateAndGlobalIsShared) {
  CachePolicy per_layer(options(2, 8, 4, 1, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  step(per_layer, 0, {0, 1});
  step(per_layer, 1, {0, 1});
  step(per_layer, 1, {2});  // layer 1 evicts its own expert, never layer 0's
  EXPECT_GE(per_layer.slot_of(0, 0), 0);
  EXPECT_GE(per_layer.slot_of(0, 1), 0);
  EXPECT_LT(per_layer.slot_of(0, 0), 2);  // layer 0 owns slots [0, 2)
  EXPECT_GE(per_layer.slot_of(1, 2), 2);

  CachePolicy global(options(2, 8, 4, 1, BudgetMode::kGlobal, EvictionPolicy::kLru));
  step(global, 0, {0, 1, 2});
  step(global, 1, {0, 1, 2});  // layer 1 takes the last slot and two of layer 0's
  EXPECT_EQ(global.slot_of(0, 0), -1);
  EXPECT_EQ(global.slot_of(0, 1), -1);
  EXPECT_GE(global.slot_of(0, 2), 0);
}

TEST(CachePolicy, ExpertFlowEvictsLowScoresAndRefusesWorsePrefetches) {
  CachePolicy cache(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow));
  std::vector<float> scores = {0.9f, 0.1f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  cache.set_scores(0, scores.data());
  step(cache, 0, {0});
  step(cache, 0, {1});
  // Full: a prefetch of expert 3 (score 0) may not displace expert 1 (score 0.1).
  EXPECT_FALSE(cache.prefetch(0, 3).has_value());
  // Expert 2 (0.5) may: it displaces the lowest score, 1, although 0 is older.
  const auto load = cache.prefetch(0, 2);
  ASSERT_TRUE(load.has_value());
  EXPECT_FALSE(load->urgent);
  EXPECT_EQ(cache.slot_of(0, 1), -1);
  EXPECT_GE(cache.slot_of(0, 0), 0);
}

TEST(CachePolicy, ExpertFlowWeighsPredictedScoresAgainstDecayedRequestCounts) {
  // Expert 0 is requested five times but scored 0.1 for the next step, expert 1 once and scored
  // 0.3: with the default weight (4) the long-run demand keeps 0 (4 x 0.1 + log 5 > 4 x 0.3 +
  // log 1); with a huge weight only the next-step score counts and 0 goes.
  for (const double weight : {4.0, 1e6}) {
    CacheOptions o = options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow);
    o.score_weight = weight;
    CachePolicy cache(o);
    std::vector<float> scores = {0.1f, 0.3f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    cache.set_scores(0, scores.data());
    for (int i = 0; i < 5; ++i) step(cache, 0, {0});
    step(cache, 0, {1});
    step(cache, 0, {2});
    EXPECT_EQ(cache.slot_of(0, weight < 10 ? 1 : 0), -1) << weight;
    EXPECT_GE(cache.slot_of(0, weight < 10 ? 0 : 1), 0) << weight;
  }
  CacheOptions bad = options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow);
  bad.score_weight = -1.0;
  EXPECT_EQ(validate(bad), "score_weight must be a finite number >= 0, got -1.000000");
}

TEST(CachePolicy, ReuseScoresTakeOverAtRelease) {
  // Two slots. Expert (1, 2) runs first, valued 0.5 throughout. Expert (0, 0) is predicted for
  // this step (0.9) but, by its reuse score, not needed after it (0.0): once layer 0 has
  // released it, it is the one to go when (0, 3) needs a slot. Without reuse scores it keeps
  // its 0.9 and (1, 2) goes instead.
  for (const bool with_reuse : {true, false}) {
    CacheOptions o = options(2, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow);
    o.score_weight = 1e6;  // scores alone
    CachePolicy cache(o);
    std::vector<float> now1(8, 0.0f), now0(8, 0.0f), reuse0(8, 0.0f);
    now1[2] = 0.5f;
    now0[0] = 0.9f;
    now0[3] = 0.6f;
    reuse0[3] = 0.6f;
    cache.set_scores(1, now1.data(), with_reuse ? now1.data() : nullptr);
    cache.set_scores(0, now0.data(), with_reuse ? reuse0.data() : nullptr);
    step(cache, 1, {2});
    step(cache, 0, {0});
    step(cache, 0, {3});
    EXPECT_EQ(cache.slot_of(0, 0) == -1, with_reuse) << with_reuse;
    EXPECT_EQ(cache.slot_of(1, 2) == -1, !with_reuse) << with_reuse;
  }
}

TEST(CachePolicy, UntilReleaseAnExpertIsValuedAtTheHigherOfItsScores) {
  // (0, 0) is scored 0.1 for this step but 0.7 by its reuse score; set again without reuse
  // scores (as gate lookahead does) before its layer runs, it keeps the 0.7 until release.
  CacheOptions o = options(2, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow);
  o.score_weight = 1e6;
  CachePolicy cache(o);
  std::vector<float> now0(8, 0.0f), reuse0(8, 0.0f), now1(8, 0.0f);
  now0[0] = 0.1f;
  reuse0[0] = 0.7f;
  now1[2] = 0.5f;
  cache.set_scores(0, now0.data(), reuse0.data());
  cache.set_scores(1, now1.data());
  step(cache, 1, {2});
  const auto load = cache.prefetch(0, 0);
  ASSERT_TRUE(load.has_value());
  cache.loaded(load->slot);
  cache.set_scores(0, now0.data());  // no reuse: the pending reuse scores still count
  step(cache, 1, {4});               // evicts (1, 2) at 0.5, not (0, 0) at max(0.1, 0.7)
  EXPECT_GE(cache.slot_of(0, 0), 0);
  EXPECT_EQ(cache.slot_of(1, 2), -1);
}

TEST(CachePolicy, ContradictedPrefetchesGoFirst) {
  CachePolicy cache(options(1, 8, 3, 1, BudgetMode::kGlobal, EvictionPolicy::kExpertFlow));
  std::vector<float> scores(8, 0.5f);
  cache.set_scores(0, scores.data());
  step(cache, 0, {0});
  step(cache, 0, {1});
  const auto load = cache.prefetch(0, 5);  // predicted, fills the last slot
  ASSERT_TRUE(load.has_value());
  cache.loaded(load->slot);
  step(cache, 0, {0});  // the router used 0, not 5: 5 is contradicted at release
  step(cache, 0, {6});  // evicts 5 first, not the least recently used (1)
  EXPECT_EQ(cache.slot_of(0, 5), -1);
  EXPECT_GE(cache.slot_of(0, 1), 0);
  EXPECT_EQ(cache.stats().prefetches, 1);
  EXPECT_EQ(cache.stats().wasted_prefetches, 1);
  EXPECT_EQ(cache.stats().prefetch_hits, 0);
}

TEST(CachePolicy, PrefetchHitsAreCounted) {
  CachePolicy cache(options(2, 8, 4, 1, BudgetMode::kPerLayer, EvictionPolicy::kExpertFlow));
  const auto load = cache.prefetch(1, 3);
  ASSERT_TRUE(load.has_value());
  EXPECT_EQ(step(cache, 1, {3}), 0);  // a hit even while loading: the caller waits on its event
  EXPECT_EQ(cache.stats().prefetch_hits, 1);
  EXPECT_EQ(cache.stats().hits, 1);
}

TEST(CachePolicy, BeladyEvictsTheFarthestNextUse) {
  CachePolicy cache(options(1, 8, 2, 1, BudgetMode::kGlobal, EvictionPolicy::kBelady));
  step(cache, 0, {0});
  step(cache, 0, {1});
  cache.set_next_use(0, 0, 10);
  cache.set_next_use(0, 1, 4);
  step(cache, 0, {2});  // 0 is needed later than 1: 0 goes
  EXPECT_EQ(cache.slot_of(0, 0), -1);
  EXPECT_GE(cache.slot_of(0, 1), 0);
  cache.set_next_use(0, 2, -1);  // never again: first to go
  step(cache, 0, {3});
  EXPECT_EQ(cache.slot_of(0, 2), -1);
}

TEST(CachePolicy, BadIdsAreRejected) {
  CachePolicy cache(options(2, 8, 4, 1, BudgetMode::kPerLayer, EvictionPolicy::kLru));
  int32_t slot;
  std::vector<Load> loads;
  const int32_t bad_expert[] = {8};
  EXPECT_THROW(cache.acquire(0, bad_expert, 1, &slot, loads), std::out_of_range);
  const int32_t ok[] = {1};
  EXPECT_THROW(cache.acquire(2, ok, 1, &slot, loads), std::out_of_range);
  EXPECT_THROW(cache.loaded(0), std::out_of_range);  // nothing in flight
  EXPECT_THROW(cache.prefetch(-1, 0), std::out_of_range);
}

// Replays a random trace with instant copies; checks invariants after every step and returns
// the misses. With `belady`, tells the policy each expert's next use from the future.
int64_t replay(EvictionPolicy policy, BudgetMode budget, int slots,
               const std::vector<std::vector<std::vector<int32_t>>>& trace) {
  const int layers = static_cast<int>(trace[0].size());
  const int top_k = static_cast<int>(trace[0][0].size());
  CachePolicy cache(options(layers, 16, slots, top_k, budget, policy));
  // next[t][l][j]: the step at which trace[t][l][j] is next requested after t (-1 = never).
  std::vector<std::map<std::pair<int, int>, int64_t>> next(trace.size());
  std::map<std::pair<int, int>, int64_t> upcoming;
  for (int64_t t = static_cast<int64_t>(trace.size()) - 1; t >= 0; --t) {
    for (int l = 0; l < layers; ++l) {
      for (int32_t e : trace[t][l]) {
        auto it = upcoming.find({l, e});
        next[t][{l, e}] = it == upcoming.end() ? -1 : it->second;
      }
    }
    for (int l = 0; l < layers; ++l) {
      for (int32_t e : trace[t][l]) upcoming[{l, e}] = t * layers + l + 1;
    }
  }
  for (size_t t = 0; t < trace.size(); ++t) {
    for (int l = 0; l < layers; ++l) {
      std::vector<int32_t> experts = trace[t][l];
      std::vector<int32_t> got(experts.size());
      std::vector<Load> loads;
      cache.acquire(l, experts.data(), static_cast<int32_t>(experts.size()), got.data(), loads);
      std::set<int32_t> distinct;
      for (size_t j = 0; j < experts.size(); ++j) {
        EXPECT_EQ(cache.slot_of(l, experts[j]), got[j]);
        EXPECT_GE(cache.pins(got[j]), 1);
        distinct.insert(got[j]);
      }
      EXPECT_EQ(distinct.size(), std::set<int32_t>(experts.begin(), experts.end()).size());
      for (const Load& ld : loads) cache.loaded(ld.slot);
      if (policy == EvictionPolicy::kBelady) {
        for (int32_t e : experts) cache.set_next_use(l, e, next[t].at({l, e}));
      }
      cache.release(l);
    }
  }
  EXPECT_EQ(cache.stats().hits + cache.stats().misses, [&] {
    int64_t n = 0;
    for (const auto& s : trace) {
      for (const auto& l : s) n += std::set<int32_t>(l.begin(), l.end()).size();
    }
    return n;
  }());
  return cache.stats().misses;
}

// A plain LRU over (layer, expert) with one global pool, for traces of one expert per layer
// step (so that no two entries are ever used at the same tick).
int64_t reference_lru_misses(int slots,
                             const std::vector<std::vector<std::vector<int32_t>>>& trace) {
  std::list<std::pair<int, int>> order;  // front = most recent
  int64_t misses = 0;
  for (const auto& s : trace) {
    for (int l = 0; l < static_cast<int>(s.size()); ++l) {
      const std::pair<int, int> key{l, s[l].at(0)};
      auto it = std::find(order.begin(), order.end(), key);
      if (it != order.end()) {
        order.splice(order.begin(), order, it);
        continue;
      }
      ++misses;
      if (static_cast<int>(order.size()) == slots) order.pop_back();
      order.push_front(key);
    }
  }
  return misses;
}

std::vector<std::vector<std::vector<int32_t>>> random_trace(std::mt19937& rng, int steps,
                                                            int layers, int top_k) {
  // Skewed expert popularity, as real routers have.
  std::discrete_distribution<int32_t> pick({8, 6, 5, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1});
  std::vector<std::vector<std::vector<int32_t>>> trace(steps);
  for (auto& s : trace) {
    s.resize(layers);
    for (auto& l : s) {
      while (static_cast<int>(l.size()) < top_k) {
        const int32_t e = pick(rng);
        if (std::find(l.begin(), l.end(), e) == l.end()) l.push_back(e);
      }
    }
  }
  return trace;
}

TEST(CachePolicy, RandomTracesKeepInvariantsAndBeladyIsOptimal) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 20; ++trial) {
    const int layers = 1 + trial % 4;
    const auto trace = random_trace(rng, 60, layers, 2);
    const int slots = layers * (2 + trial % 5);
    const int64_t lru = replay(EvictionPolicy::kLru, BudgetMode::kGlobal, slots, trace);
    const int64_t lfu = replay(EvictionPolicy::kLfu, BudgetMode::kGlobal, slots, trace);
    const int64_t lfu_history =
        replay(EvictionPolicy::kLfuHistory, BudgetMode::kGlobal, slots, trace);
    const int64_t flow = replay(EvictionPolicy::kExpertFlow, BudgetMode::kGlobal, slots, trace);
    const int64_t lrfu = replay(EvictionPolicy::kLrfu, BudgetMode::kGlobal, slots, trace);
    const int64_t belady = replay(EvictionPolicy::kBelady, BudgetMode::kGlobal, slots, trace);
    EXPECT_LE(belady, lrfu) << "trial " << trial;
    replay(EvictionPolicy::kLru, BudgetMode::kPerLayer, slots, trace);
    EXPECT_LE(belady, lru) << "trial " << trial;
    EXPECT_LE(belady, lfu) << "trial " << trial;
    EXPECT_LE(belady, lfu_history) << "trial " << trial;
    EXPECT_LE(belady, flow) << "trial " << trial;
  }
}

TEST(CachePolicy, LruMatchesAPlainLruSimulator) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const int layers = 1 + trial % 3;
    const auto trace = random_trace(rng, 80, layers, 1);
    const int slots = layers + trial % 6;
    EXPECT_EQ(replay(EvictionPolicy::kLru, BudgetMode::kGlobal, slots, trace),
              reference_lru_misses(slots, trace))
        << "trial " << trial;
  }
}

}  // namespace
}  // namespace expertflow::core
