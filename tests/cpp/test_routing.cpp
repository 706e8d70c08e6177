#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/fast_math.h"
#include "core/routing.h"

namespace expertflow::core {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

RouterSpec softmax_spec(int experts, int k, bool renormalize) {
  RouterSpec s;
  s.num_experts = experts;
  s.top_k = k;
  s.renormalize = renormalize;
  return s;
}

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route(const RouterSpec& spec, const std::vector<float>& logits,
             const std::vector<float>* bias = nullptr) {
  RoutingWorkspace ws(spec);
  Routed r{std::vector<int32_t>(spec.top_k), std::vector<float>(spec.top_k)};
  route_token(spec, logits.data(), bias ? bias->data() : nullptr, ws, r.ids.data(),
              r.weights.data());
  return r;
}

// Plain double-precision softmax top-k, ids by stable sort on (-value, id).
Routed reference_softmax(const std::vector<float>& logits, int k, bool renormalize) {
  const int n = static_cast<int>(logits.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(l - m);
  Routed r;
  double chosen = 0;
  for (int j = 0; j < k; ++j) {
    r.ids.push_back(order[j]);
    chosen += std::exp(logits[order[j]] - m) / sum;
  }
  for (int j = 0; j < k; ++j) {
    const double p = std::exp(logits[order[j]] - m) / sum;
    r.weights.push_back(static_cast<float>(renormalize ? p / chosen : p));
  }
  return r;
}

TEST(RanksBefore, LargerFirstThenLowestIdNaNLast) {
  EXPECT_TRUE(ranks_before(2.0f, 5, 1.0f, 0));
  EXPECT_FALSE(ranks_before(1.0f, 0, 2.0f, 5));
  EXPECT_TRUE(ranks_before(1.0f, 3, 1.0f, 4));
  EXPECT_FALSE(ranks_before(1.0f, 4, 1.0f, 3));
  EXPECT_TRUE(ranks_before(-kInf, 9, kNaN, 0));
  EXPECT_FALSE(ranks_before(kNaN, 0, -kInf, 9));
  EXPECT_TRUE(ranks_before(kNaN, 1, kNaN, 2));
  EXPECT_FALSE(ranks_before(1.0f, 1, 1.0f, 1));
}

TEST(ExpNonpositive, WithinTwoUlpOfStdExp) {
  for (float x = -87.0f; x <= 0.0f; x += 0.00731f) {
    const float want = std::exp(x);
    const float got = exp_nonpositive(x);
    EXPECT_NEAR(got, want, 2.5f * std::numeric_limits<float>::epsilon() * want) << "x=" << x;
  }
  EXPECT_EQ(exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive(-kInf), 0.0f);
  EXPECT_EQ(exp_nonpositive(-100.0f), 0.0f);
  EXPECT_TRUE(std::isnan(exp_nonpositive(kNaN)));
}

TEST(RouteToken, SoftmaxMatchesDoubleReferenceOnRandomRows) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int experts : {1, 8, 60, 64, 256}) {
    for (int k : {1, 2, 6, 8, 64}) {
      if (k > experts) continue;
      for (bool renormalize : {false, true}) {
        for (int trial = 0; trial < 20; ++trial) {
          std::vector<float> logits(experts);
          for (float& l : logits) l = normal(rng);
          const Routed got = route(softmax_spec(experts, k, renormalize), logits);
          const Routed want = reference_softmax(logits, k, renormalize);
          ASSERT_EQ(got.ids, want.ids) << "E=" << experts << " k=" << k;
          for (int j = 0; j < k; ++j) {
            EXPECT_NEAR(got.weights[j], want.weights[j], 4e-7f * std::max(1.0f, want.weights[j]));
          }
        }
      }
    }
  }
}

TEST(RouteToken, TiesGoToLowestId) {
  const Routed r = route(softmax_spec(8, 3, true), {1, 5, 5, 0, 5, 5, 2, 5});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2, 4}));
  for (float w : r.weights) EXPECT_FLOAT_EQ(w, 1.0f / 3.0f);
  const Routed all_equal = route(softmax_spec(6, 6, false), std::vector<float>(6, 0.5f));
  EXPECT_EQ(all_equal.ids, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
}

TEST(RouteToken, NaNNeverChosenBeforeNumbersAndIdsStayInRange) {
  const Routed r = route(softmax_spec(6, 3, true), {kNaN, 1.0f, -kInf, kNaN, 0.5f, kNaN});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 4, 2}));
  for (float w : r.weights) EXPECT_TRUE(std::isnan(w));  // a NaN logit poisons the softmax

  const Routed all_nan = route(softmax_spec(4, 4, true), std::vector<float>(4, kNaN));
  EXPECT_EQ(all_nan.ids, (std::vector<int32_t>{0, 1, 2, 3}));

  const Routed minus_inf = route(softmax_spec(4, 2, false), {-kInf, 3.0f, -kInf, 1.0f});
  EXPECT_EQ(minus_inf.ids, (std::vector<int32_t>{1, 3}));
  EXPECT_FALSE(std::isnan(minus_inf.weights[0]));
  EXPECT_NEAR(minus_inf.weights[0] + minus_inf.weights[1], 1.0f, 1e-6f);
}

TEST(RouteToken, GroupLimitedGreedyKeepsBestGroups) {
  // DeepSeek-V2 style: 4 groups of 2; group keys are the best logit of each group.
  RouterSpec spec = softmax_spec(8, 2, false);
  spec.num_groups = 4;
  spec.topk_groups = 2;
  spec.routed_scaling_factor = 2.0f;
  // groups: {0,1}: max 3; {2,3}: max 9; {4,5}: max 8.5; {6,7}: max 8.9 -> groups 1 and 3.
  const std::vector<float> logits = {3, 1, 9, 0, 8.5, 8.4, 8.9, 8.8};
  const Routed r = route(spec, logits);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 6}));
  const Routed want = reference_softmax(logits, 8, false);  // full softmax probabilities
  auto prob = [&](int e) {
    for (int j = 0; j < 8; ++j)
      if (want.ids[j] == e) return want.weights[j];
    return -1.0f;
  };
  EXPECT_NEAR(r.weights[0], 2.0f * prob(2), 1e-6f);
  EXPECT_NEAR(r.weights[1], 2.0f * prob(6), 1e-6f);
}

TEST(RouteToken, SigmoidBiasGroupsUseTopTwoSumAndUnbiasedWeights) {
  // DeepSeek-V3 style: 2 groups of 4, one kept; selection on sigmoid + bias.
  RouterSpec spec;
  spec.num_experts = 8;
  spec.top_k = 2;
  spec.scoring = Scoring::kSigmoid;
  spec.has_bias = true;
  spec.num_groups = 2;
  spec.topk_groups = 1;
  spec.renormalize = true;
  spec.routed_scaling_factor = 2.5f;
  const std::vector<float> logits = {0, 0, 0, 0, 0, 0, 0, 0};
  // group 0 best two biased: 0.5+0.9, 0.5+0.0 -> 1.9; group 1: 0.5+0.6, 0.5+0.6 -> 2.2.
  const std::vector<float> bias = {0.9f, 0, 0, 0, 0.6f, 0.6f, 0, 0};
  const Routed r = route(spec, logits, &bias);
  EXPECT_EQ(r.ids, (std::vector<int32_t>{4, 5}));
  EXPECT_NEAR(r.weights[0], 1.25f, 1e-6f);  // 0.5 / (0.5 + 0.5) * 2.5
  EXPECT_NEAR(r.weights[1], 1.25f, 1e-6f);
}

TEST(RouteToken, SoftmaxAfterTopK) {
  RouterSpec spec = softmax_spec(5, 2, false);
  spec.softmax_after_topk = true;
  const Routed r = route(spec, {0.0f, 2.0f, -1.0f, 1.0f, -3.0f});
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3}));
  const float e1 = std::exp(1.0f);
  EXPECT_NEAR(r.weights[0], e1 / (e1 + 1.0f), 1e-7f);
  EXPECT_NEAR(r.weights[1], 1.0f / (e1 + 1.0f), 1e-7f);
}

TEST(SelectTopK, AgreesWithStableSortWithAndWithoutNaN) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(0, 5);  // many ties
  std::vector<float> values(300);
  for (float& v : values) v = static_cast<float>(small(rng));
  values[17] = kNaN;
  std::vector<int32_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::vector<int32_t> big(100), want(100);
  select_top_k(values.data(), 300, 100, big.data());
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return ranks_before(values[a], a, values[b], b); });
  std::copy(order.begin(), order.begin() + 100, want.begin());
  EXPECT_EQ(big, want);
  std::vector<int32_t> small_k(8);
  select_top_k(values.data(), 300, 8, small_k.data());
  EXPECT_TRUE(std::equal(small_k.begin(), small_k.end(), want.begin()));
  values[17] = 2.5f;  // NaN-free: the vectorised path must give the same order
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return ranks_before(values[a], a, values[b], b); });
  select_top_k(values.data(), 300, 100, big.data());
  EXPECT_TRUE(std::equal(big.begin(), big.end(), order.begin()));
  select_top_k(values.data(), 300, 8, small_k.data());
  EXPECT_TRUE(std::equal(small_k.begin(), small_k.end(), order.begin()));
}

TEST(Validate, NamesTheArgument) {
  EXPECT_EQ(validate(softmax_spec(8, 2, true)), "");
  EXPECT_NE(validate(softmax_spec(8, 0, true)).find("top_k"), std::string::npos);
  EXPECT_NE(validate(softmax_spec(8, 9, true)).find("top_k"), std::string::npos);
  RouterSpec groups = softmax_spec(8, 2, true);
  groups.num_groups = 3;
  EXPECT_NE(validate(groups).find("n_group=3 must divide"), std::string::npos);
  groups.num_groups = 4;
  groups.topk_groups = 5;
  EXPECT_NE(validate(groups).find("topk_group"), std::string::npos);
  groups.topk_groups = 1;
  groups.top_k = 3;  // only 2 experts in one group of 2
  EXPECT_NE(validate(groups).find("exceeds"), std::string::npos);
  RouterSpec after = softmax_spec(8, 2, true);
  after.softmax_after_topk = true;
  after.scoring = Scoring::kSigmoid;
  EXPECT_NE(validate(after).find("softmax_after_topk"), std::string::npos);
}

}  // namespace
}  // namespace expertflow::core
