#include "core/hybrid_policy.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace expertflow::core {
namespace {

bool positive_finite(double v) { return std::isfinite(v) && v > 0.0; }

void check_miss(const ExpertMiss& m, double link_busy_ms, double cpu_busy_ms,
                double device_busy_ms) {
  if (m.tokens < 0 || m.packed_bytes < 0 || m.params < 0) {
    throw std::invalid_argument("hybrid policy: a miss needs tokens, packed_bytes and params >= 0");
  }
  if (!(m.reuse >= 0.0 && m.reuse <= 1.0)) {
    throw std::invalid_argument("hybrid policy: reuse must be a probability in [0, 1], got " +
                                std::to_string(m.reuse));
  }
  for (const double busy : {link_busy_ms, cpu_busy_ms, device_busy_ms}) {
    if (!(std::isfinite(busy) && busy >= 0.0)) {
      throw std::invalid_argument(
          "hybrid policy: link_busy_ms, cpu_busy_ms and device_busy_ms must be finite and >= 0");
    }
  }
}

}  // namespace

std::string validate(const HybridRates& r) {
  if (!positive_finite(r.link_gbps)) {
    return "link_gbps must be a positive finite number, got " + std::to_string(r.link_gbps);
  }
  if (!positive_finite(r.cpu_gbps)) {
    return "cpu_gbps must be a positive finite number, got " + std::to_string(r.cpu_gbps);
  }
  if (!positive_finite(r.cpu_gflops)) {
    return "cpu_gflops must be a positive finite number, got " + std::to_string(r.cpu_gflops);
  }
  if (!(std::isfinite(r.cpu_overhead_ms) && r.cpu_overhead_ms >= 0.0)) {
    return "cpu_overhead_ms must be a finite number >= 0, got " + std::to_string(r.cpu_overhead_ms);
  }
  if (!(std::isfinite(r.device_gbps) && r.device_gbps >= 0.0)) {
    return "device_gbps must be a finite number >= 0 (0: not modelled), got " +
           std::to_string(r.device_gbps);
  }
  return {};
}

HybridPolicy::HybridPolicy(const HybridRates& rates) : rates_(rates) {
  const std::string problem = validate(rates);
  if (!problem.empty()) throw std::invalid_argument("hybrid policy: " + problem);
}

double HybridPolicy::copy_ms(const ExpertMiss& m) const {
  return static_cast<double>(m.packed_bytes) / (rates_.link_gbps * 1e6);
}

double HybridPolicy::cpu_ms(const ExpertMiss& m) const {
  const double read = static_cast<double>(m.packed_bytes) / (rates_.cpu_gbps * 1e6);
  const double compute = 2.0 * static_cast<double>(m.params) * static_cast<double>(m.tokens) /
                         (rates_.cpu_gflops * 1e6);
  return std::max(read, compute) + rates_.cpu_overhead_ms;
}

double HybridPolicy::device_ms(const ExpertMiss& m) const {
  if (rates_.device_gbps == 0.0) return 0.0;
  return static_cast<double>(m.packed_bytes) / (rates_.device_gbps * 1e6);
}

MissDecision HybridPolicy::decide(const ExpertMiss& miss, double link_busy_ms, double cpu_busy_ms,
                                  double device_busy_ms) const {
  check_miss(miss, link_busy_ms, cpu_busy_ms, device_busy_ms);
  MissDecision d;
  d.copy_ms = copy_ms(miss);
  d.cpu_ms = cpu_ms(miss);
  d.device_ms = device_ms(miss);
  // A cached copy turns the next miss of this expert, which would cost the cheaper way again,
  // into a use from its slot.
  const double copied = d.copy_ms + d.device_ms;
  const double saving = miss.reuse * std::max(0.0, std::min(copied, d.cpu_ms) - d.device_ms);
  const double copy_done =
      std::max(link_busy_ms + d.copy_ms, device_busy_ms) + d.device_ms - saving;
  const double cpu_done = cpu_busy_ms + d.cpu_ms;
  d.placement = cpu_done < copy_done ? MissPlacement::kCpu : MissPlacement::kCopy;
  return d;
}

std::vector<MissDecision> HybridPolicy::plan_misses(std::span<const ExpertMiss> misses) const {
  return plan_step({}, misses);
}

std::vector<MissDecision> HybridPolicy::plan_step(std::span<const ExpertMiss> hits,
                                                  std::span<const ExpertMiss> misses) const {
  std::vector<MissDecision> out;
  out.reserve(hits.size() + misses.size());
  double link = 0.0;
  double cpu = 0.0;
  double device = 0.0;
  for (const ExpertMiss& h : hits) {
    check_miss(h, 0.0, 0.0, 0.0);
    if (!(std::isfinite(h.wait_ms) && h.wait_ms >= 0.0)) {
      throw std::invalid_argument("hybrid policy: a hit's wait_ms must be finite and >= 0, got " +
                                  std::to_string(h.wait_ms));
    }
    MissDecision d;
    d.cpu_ms = cpu_ms(h);
    d.device_ms = device_ms(h);
    const double device_done = std::max(device, h.wait_ms) + d.device_ms;
    const bool on_cpu = cpu + d.cpu_ms < device_done;
    d.placement = on_cpu ? MissPlacement::kCpu : MissPlacement::kCopy;
    if (on_cpu) {
      cpu += d.cpu_ms;
    } else {
      device = device_done;
    }
    out.push_back(d);
  }
  for (const ExpertMiss& m : misses) {
    const MissDecision d = decide(m, link, cpu, device);
    if (d.placement == MissPlacement::kCpu) {
      cpu += d.cpu_ms;
    } else {
      link += d.copy_ms;
      device = std::max(link, device) + d.device_ms;
    }
    out.push_back(d);
  }
  return out;
}

}  // namespace expertflow::core
