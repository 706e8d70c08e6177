#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "core/grouping.h"

namespace expertflow::core {
namespace {

struct Grouped {
  std::vector<int32_t> order, counts, offsets, inverse;
};

Grouped group(const std::vector<int32_t>& ids, int32_t experts) {
  Grouped g{std::vector<int32_t>(ids.size()), std::vector<int32_t>(experts),
            std::vector<int32_t>(experts + 1), std::vector<int32_t>(ids.size())};
  group_by_expert(ids.data(), static_cast<int64_t>(ids.size()), experts, g.order.data(),
                  g.counts.data(), g.offsets.data(), g.inverse.data());
  return g;
}

TEST(GroupByExpert, MatchesStableSortOnRandomIds) {
  std::mt19937 rng(42);
  for (int32_t experts : {1, 8, 60, 256}) {
    std::uniform_int_distribution<int32_t> pick(0, experts - 1);
    std::vector<int32_t> ids(1000);
    for (int32_t& e : ids) e = pick(rng);
    const Grouped g = group(ids, experts);
    std::vector<int32_t> want(ids.size());
    std::iota(want.begin(), want.end(), 0);
    std::stable_sort(want.begin(), want.end(), [&](int a, int b) { return ids[a] < ids[b]; });
    EXPECT_EQ(g.order, want);
    for (int32_t e = 0; e < experts; ++e) {
      EXPECT_EQ(g.counts[e], std::count(ids.begin(), ids.end(), e));
      EXPECT_EQ(g.offsets[e + 1] - g.offsets[e], g.counts[e]);
    }
    EXPECT_EQ(g.offsets[0], 0);
    EXPECT_EQ(g.offsets[experts], 1000);
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(g.inverse[g.order[i]], int32_t(i));
  }
}

TEST(GroupByExpert, UnroutedIdsGoLastWithInverseMinusOne) {
  const Grouped g = group({2, -1, 0, 7, 2, 3}, 4);  // -1 and 7 are not routed
  EXPECT_EQ(g.order, (std::vector<int32_t>{2, 0, 4, 5, 1, 3}));
  EXPECT_EQ(g.counts, (std::vector<int32_t>{1, 0, 2, 1}));
  EXPECT_EQ(g.offsets, (std::vector<int32_t>{0, 1, 1, 3, 4}));
  EXPECT_EQ(g.inverse, (std::vector<int32_t>{1, -1, 0, -1, 2, 3}));
}

TEST(GroupByExpert, EmptyInput) {
  const Grouped g = group({}, 3);
  EXPECT_TRUE(g.order.empty());
  EXPECT_EQ(g.counts, (std::vector<int32_t>{0, 0, 0}));
  EXPECT_EQ(g.offsets, (std::vector<int32_t>{0, 0, 0, 0}));
}

}  // namespace
}  // namespace expertflow::core
