// Where a missed expert runs: copied to a device slot, or computed on the CPU from the host
// store (DESIGN.md section 8). No torch, CUDA or Python here.
//
//   copy: packed bytes / link GB/s; the expert then stays cached, so a copy is worth more the
//         likelier the expert is needed again soon (its predicted reuse score in [0, 1]): the
//         next miss it saves would have cost min(copy, cpu) again.
//   cpu:  max(packed bytes / CPU GB/s, 2 * params * tokens / CPU GFLOP/s) + a fixed overhead;
//         only activations cross the link, nothing is cached.
//   device use: a copied expert is then run from its slot, packed bytes / device GB/s (expand
//         a packed slot, read it). Negligible on a GPU (device_gbps 0 leaves it out); on a CPU
//         "device" it can cost more than the CPU kernel, and it is paid again at every later
//         use, so it counts against the copy and against what caching saves.
//
// The link and the CPU work at the same time: a decision may account for the work already
// queued on each (plan_misses does, miss after miss), so a step's misses are spread between
// them instead of all going to the one that is faster for a single miss.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace expertflow::core {

struct HybridRates {
  double link_gbps = 0.0;        // host -> device copy rate, GB/s of packed bytes
  double cpu_gbps = 0.0;         // CPU expert rate at one token, GB/s of packed weight bytes
  double cpu_gflops = 0.0;       // CPU expert rate at many tokens (2 flops per weight per token)
  double cpu_overhead_ms = 0.0;  // fixed cost of one CPU expert (launch, activations' transfer)
  double device_gbps = 0.0;      // device rate using a cached expert at one token, GB/s of
                                 // packed bytes; 0: not modelled (free)
};

// Empty when the rates are usable, else a message naming the field: every rate a positive
// finite number, the overhead and device_gbps finite numbers >= 0.
std::string validate(const HybridRates& rates);

struct ExpertMiss {
  int64_t tokens = 1;        // tokens routed to the expert in this step
  int64_t packed_bytes = 0;  // the expert's bytes in the host store (all its tensors)
  int64_t params = 0;        // its weights (2 * params * tokens flops on the CPU)
  double reuse = 0.0;        // predicted chance it is needed again while it would stay cached
  double wait_ms = 0.0;      // a cached expert (plan_step's hits): until its copy lands
};

enum class MissPlacement : int8_t { kCopy, kCpu };

struct MissDecision {
  MissPlacement placement = MissPlacement::kCopy;
  double copy_ms = 0.0;    // link time of the copy
  double cpu_ms = 0.0;     // CPU time of computing it in place
  double device_ms = 0.0;  // device time of using it from a slot (0 when not modelled)
};

class HybridPolicy {
 public:
  // Throws std::invalid_argument (naming the field) for unusable rates.
  explicit HybridPolicy(const HybridRates& rates);

  const HybridRates& rates() const { return rates_; }
  double copy_ms(const ExpertMiss& miss) const;
  double cpu_ms(const ExpertMiss& miss) const;
  double device_ms(const ExpertMiss& miss) const;

  // One miss, given the work already queued on the link, the CPU and the device (ms): CPU
  // when it finishes the expert before the copy would (copied, then used once the device is
  // free), counting the copy's saving of a later miss. Ties go to the copy (the expert is then
  // cached). Throws std::invalid_argument for a miss with negative sizes, a reuse outside
  // [0, 1] or negative queues.
  MissDecision decide(const ExpertMiss& miss, double link_busy_ms = 0.0, double cpu_busy_ms = 0.0,
                      double device_busy_ms = 0.0) const;

  // A step's misses in order, each decided with the queues the earlier ones left.
  std::vector<MissDecision> plan_misses(std::span<const ExpertMiss> misses) const;

  // A step's cached experts (`hits`: placement kCopy means "use the slot") and then its
  // misses, each decided with the queues the earlier ones left. A hit runs on the CPU only
  // when that finishes before the device would, after its copy lands (wait_ms) and the
  // device's queue: a prefetch still on its way, or a device slower than the CPU kernel. Its
  // slot stays either way. Throws std::invalid_argument for a hit whose wait_ms is negative.
  std::vector<MissDecision> plan_step(std::span<const ExpertMiss> hits,
                                      std::span<const ExpertMiss> misses) const;

 private:
  HybridRates rates_;
};

}  // namespace expertflow::core
