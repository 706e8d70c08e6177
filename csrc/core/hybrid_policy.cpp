#include "core/hybrid_policy.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace expertflow::core {
namespace {

bool positive_finite(double v) { return std::isfinite(v) && v > 0.0; }

void check_miss(const ExpertMiss& m, double link_busy_ms, double cpu_busy_ms) {
  if (m.tokens < 0 || m.packed_bytes < 0 || m.params < 0) {
    throw std::invalid_argument("hybrid policy: a miss needs tokens, packed_bytes and params >= 0");
  }
  if (!(m.reuse >= 0.0 && m.reuse <= 1.0)) {
    throw std::invalid_argument("hybrid policy: reuse must be a probability in [0, 1], got " +
                                std::to_string(m.reuse));
  }
  if (!(link_busy_ms >= 0.0 && cpu_busy_ms >= 0.0) || !std::isfinite(link_busy_ms) ||
      !std::isfinite(cpu_busy_ms)) {
    throw std::invalid_argument(
        "hybrid policy: link_busy_ms and cpu_busy_ms must be finite and "
        ">= 0");
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

MissDecision HybridPolicy::decide(const ExpertMiss& miss, double link_busy_ms,
                                  double cpu_busy_ms) const {
  check_miss(miss, link_busy_ms, cpu_busy_ms);
  MissDecision d;
  d.copy_ms = copy_ms(miss);
  d.cpu_ms = cpu_ms(miss);
  // A cached copy saves the next miss of this expert, which would cost the cheaper way again.
  const double saving = miss.reuse * std::min(d.copy_ms, d.cpu_ms);
  const double copy_done = link_busy_ms + d.copy_ms - saving;
  const double cpu_done = cpu_busy_ms + d.cpu_ms;
  d.placement = cpu_done < copy_done ? MissPlacement::kCpu : MissPlacement::kCopy;
  return d;
}

std::vector<MissDecision> HybridPolicy::plan_misses(std::span<const ExpertMiss> misses) const {
  std::vector<MissDecision> out;
  out.reserve(misses.size());
  double link = 0.0;
  double cpu = 0.0;
  for (const ExpertMiss& m : misses) {
    const MissDecision d = decide(m, link, cpu);
    (d.placement == MissPlacement::kCpu ? cpu : link) +=
        d.placement == MissPlacement::kCpu ? d.cpu_ms : d.copy_ms;
    out.push_back(d);
  }
  return out;
}

}  // namespace expertflow::core
