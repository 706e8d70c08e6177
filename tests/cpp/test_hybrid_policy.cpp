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

TEST(HybridPolicy, UsingASlotCountsAgainstTheCopy) {
  // Copy 6.4 ms, CPU 7.0 ms (50 GB/s): without a device term the copy wins.
  HybridRates r = rates(55.0, 50.0);
  EXPECT_EQ(HybridPolicy(r).decide(miss(1)).placement, MissPlacement::kCopy);
  EXPECT_EQ(HybridPolicy(r).device_ms(miss(1)), 0.0);  // 0 GB/s: not modelled
  // A CPU "device" that expands and reads a slot at 100 GB/s adds 3.5 ms to every use.
  r.device_gbps = 100.0;
  const HybridPolicy p(r);
  const MissDecision d = p.decide(miss(1));
  EXPECT_NEAR(d.device_ms, kBytes / 100e6, 1e-9);
  EXPECT_EQ(d.placement, MissPlacement::kCpu);
  // A sure reuse saves only what the next use costs beyond the slot's own use:
  // min(9.9, 7.0) - 3.5 = 3.5 ms, so the copy (9.9 - 3.5 = 6.4 ms net) beats 7.0 ms...
  EXPECT_EQ(p.decide(miss(1, 1.0)).placement, MissPlacement::kCopy);
  // ...unless using the slot costs as much as the CPU kernel: caching then saves nothing.
  r.device_gbps = 50.0;
  EXPECT_EQ(HybridPolicy(r).decide(miss(1, 1.0)).placement, MissPlacement::kCpu);
  // A GPU's use of a slot is small: the copy decision is as without the term.
  r.device_gbps = 3000.0;
  EXPECT_EQ(HybridPolicy(r).decide(miss(1)).placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, HitsStayOnTheDeviceUnlessItIsSlowerThanTheCpu) {
  const ExpertMiss hit = miss(1);
  // Not modelled (device_gbps 0): a hit always uses its slot.
  const auto free_device = HybridPolicy(rates(55.0, 100.0)).plan_step({&hit, 1}, {});
  EXPECT_EQ(free_device[0].placement, MissPlacement::kCopy);
  // A CPU "device" expanding an int4 slot at 21 GB/s against the CPU kernel at 100 GB/s: the
  // hits go to the CPU until its queue makes the device as soon, and both then share them.
  HybridRates r = rates(55.0, 100.0);
  r.device_gbps = 21.0;  // 16.8 ms a use, 3.5 ms on the CPU
  const std::vector<ExpertMiss> hits(6, miss(1));
  const auto plan = HybridPolicy(r).plan_step(hits, {});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(plan[i].placement, MissPlacement::kCpu) << i;
  EXPECT_EQ(plan[4].placement, MissPlacement::kCopy);  // CPU: 14.1 + 3.5 > 16.8 on the device
  EXPECT_EQ(plan[5].placement, MissPlacement::kCpu);   // device: 16.8 + 16.8 > 17.6 + 3.5
  // Prefill: a hit with many tokens stays on the device (the CPU's token term).
  const ExpertMiss prompt = miss(512);
  EXPECT_EQ(HybridPolicy(r).plan_step({&prompt, 1}, {})[0].placement, MissPlacement::kCopy);
}

TEST(HybridPolicy, AHitWhosePrefetchIsStillOnItsWayMayRunOnTheCpu) {
  // CPU 3.5 ms a miss. A prefetched expert whose copy lands in 10 ms is computed on the CPU
  // (even with a free device); one landing in 1 ms waits for it. Not modelled device, as a GPU.
  const HybridPolicy p(rates(55.0, 100.0));
  ExpertMiss late = miss(1);
  late.wait_ms = 10.0;
  ExpertMiss soon = miss(1);
  soon.wait_ms = 1.0;
  const std::vector<ExpertMiss> hits = {late, soon};
  const auto plan = p.plan_step(hits, {});
  EXPECT_EQ(plan[0].placement, MissPlacement::kCpu);
  EXPECT_EQ(plan[1].placement, MissPlacement::kCopy);
  // A prompt's many tokens keep it on the device however late the copy.
  ExpertMiss prompt = miss(512);
  prompt.wait_ms = 10.0;
  EXPECT_EQ(p.plan_step({&prompt, 1}, {})[0].placement, MissPlacement::kCopy);
  ExpertMiss bad = miss(1);
  bad.wait_ms = -1.0;
  EXPECT_THROW(p.plan_step({&bad, 1}, {}), std::invalid_argument);
}

TEST(HybridPolicy, ACopyWaitsForTheDeviceBeforeItsUse) {
  // Link 6.4 ms, CPU 7.0 ms, device use 0.35 ms: alone, a miss is copied. Behind 20 ms of
  // device work (hits) the copy's use ends at 20.35 ms, the CPU's at 7.0: the CPU wins.
  HybridRates r = rates(55.0, 50.0);
  r.device_gbps = 1000.0;
  const HybridPolicy p(r);
  EXPECT_EQ(p.decide(miss(1)).placement, MissPlacement::kCopy);
  EXPECT_EQ(p.decide(miss(1), 0.0, 0.0, 20.0).placement, MissPlacement::kCpu);
  EXPECT_THROW(p.decide(miss(1), 0.0, 0.0, -1.0), std::invalid_argument);
  // plan_misses is plan_step without hits.
  const std::vector<ExpertMiss> step(4, miss(1));
  const auto a = p.plan_misses(step);
  const auto b = p.plan_step({}, step);
  for (size_t i = 0; i < step.size(); ++i) EXPECT_EQ(a[i].placement, b[i].placement) << i;
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
  r.cpu_overhead_ms = 0.0;
  r.device_gbps = nan;
  EXPECT_NE(validate(r).find("device_gbps"), std::string::npos);
  r.device_gbps = -1.0;
  EXPECT_NE(validate(r).find("device_gbps"), std::string::npos);
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
