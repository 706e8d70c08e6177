#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "core/hybrid_policy.h"

namespace expertflow::core {
namespace {

// A Mixtral-sized expert in bf16: 176M weights, 352 MB.
constexpr int64_t kParams = 3LL * 4096 * 14336;
constexpr int64_t kBytes = 2 * kParams;

HybridRates rates(double link, double cpu, double gflops = 1000.0) {
  HybridRates r;
  r.link_gbps = link;
  r.cpu_gbps = cpu;
  r.cpu_gflops = gflops;
  return r;
}

ExpertMiss miss(int64_t tokens, double reuse = 0.0) {
  return ExpertMiss{tokens, kBytes, kParams, reuse};
}

TEST(HybridPolicy, CostsFollowBytesAndTokens) {
  const HybridPolicy p(rates(55.0, 100.0, 1000.0));
  EXPECT_NEAR(p.copy_ms(miss(1)), kBytes / 55e6, 1e-9);
  EXPECT_NEAR(p.cpu_ms(miss(1)), kBytes / 100e6, 1e-9);  // read-bound at one token
  // 2 * 176M * 64 flops at 1 TFLOP/s: 22.5 ms, above the 3.5 ms read.
  EXPECT_NEAR(p.cpu_ms(miss(64)), 2.0 * kParams * 64 / 1e9, 1e-9);
}

TEST(HybridPolicy, OneOffMissGoesWhereItIsFaster) {
  const HybridPolicy fast_cpu(rates(55.0, 100.0));
  EXPECT_EQ(fast_cpu.decide(miss(1)).placement, MissPlacement::kCpu);
  const HybridPolicy slow_cpu(rates(55.0, 10.0));
  EXPECT_EQ(slow_cpu.decide(miss(1)).placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, LikelyReuseTipsTowardsTheCopy) {
  // CPU 3.5 ms, copy 6.4 ms: a sure reuse saves 3.5 ms later, so the copy costs 2.9 ms net.
  const HybridPolicy p(rates(55.0, 100.0));
  EXPECT_EQ(p.decide(miss(1, 0.0)).placement, MissPlacement::kCpu);
  EXPECT_EQ(p.decide(miss(1, 1.0)).placement, MissPlacement::kCopy);
  EXPECT_EQ(p.decide(miss(1, 0.5)).placement, MissPlacement::kCpu);
}

TEST(HybridPolicy, PrefillWithManyTokensCopies) {
  const HybridPolicy p(rates(55.0, 100.0, 200.0));
  EXPECT_EQ(p.decide(miss(1)).placement, MissPlacement::kCpu);
  EXPECT_EQ(p.decide(miss(512)).placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, QueuesSpreadAStepsMisses) {
  const HybridPolicy p(rates(55.0, 100.0));
  const std::vector<ExpertMiss> step(8, miss(1));
  const auto plan = p.plan_misses(step);
  int cpu = 0;
  for (const auto& d : plan) cpu += d.placement == MissPlacement::kCpu;
  EXPECT_GT(cpu, 0);
  EXPECT_LT(cpu, 8);  // not all on the CPU: the link works at the same time
  EXPECT_EQ(plan[0].placement, MissPlacement::kCpu);
  // A busy CPU sends the next miss to the link.
  EXPECT_EQ(p.decide(miss(1), 0.0, 50.0).placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, TiesGoToTheCopy) {
  const HybridPolicy p(rates(50.0, 50.0));
  EXPECT_EQ(p.decide(miss(1)).placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, RejectsUnusableRatesNamingThem) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_NE(validate(rates(0.0, 10.0)).find("link_gbps"), std::string::npos);
  EXPECT_NE(validate(rates(10.0, nan)).find("cpu_gbps"), std::string::npos);
  EXPECT_NE(validate(rates(10.0, 10.0, inf)).find("cpu_gflops"), std::string::npos);
  HybridRates r = rates(10.0, 10.0);
  r.cpu_overhead_ms = -1.0;
  EXPECT_NE(validate(r).find("cpu_overhead_ms"), std::string::npos);
  EXPECT_THROW(HybridPolicy(rates(-1.0, 10.0)), std::invalid_argument);
  EXPECT_TRUE(validate(rates(10.0, 10.0)).empty());
}

TEST(HybridPolicy, RejectsBadMisses) {
  const HybridPolicy p(rates(55.0, 100.0));
  EXPECT_THROW(p.decide(miss(1, 1.5)), std::invalid_argument);
  EXPECT_THROW(p.decide(miss(-1)), std::invalid_argument);
  EXPECT_THROW(p.decide(miss(1), -1.0, 0.0), std::invalid_argument);
}

}  // namespace
}  // namespace expertflow::core
