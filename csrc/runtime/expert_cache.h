// The expert cache: the core policy deciding which expert occupies which device slot, the host
// store holding every expert, the slot pool, and the transfer engine moving bytes between them.
// Thread-safe: every public method takes the cache's lock, except the blocking part of wait().
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "core/cache_policy.h"
#include "runtime/host_store.h"
#include "runtime/transfer_engine.h"

namespace expertflow::runtime {

struct AcquireResult {
  std::vector<int32_t> slots;        // [n] slot of each requested expert
  std::vector<int32_t> ready_order;  // [n] request positions: arrived first, then in flight,
                                     // then the misses just issued
};

struct CacheCounters {
  int64_t bytes_copied = 0;
  double wait_seconds = 0.0;    // host time blocked in wait() (CPU engine; CUDA waits on device)
  int64_t late_waits = 0;       // wait() calls whose copy had not arrived yet (compute stalled)
  int64_t full_pool_waits = 0;  // acquires that had to let an in-flight copy land first
};

class ExpertCache {
 public:
  ExpertCache(std::shared_ptr<const HostExpertStore> store, int32_t num_slots, int32_t top_k,
              core::BudgetMode budget, core::EvictionPolicy policy, const at::Device& device);

  // layer_scores: float [num_layers, num_experts] predicted demand. Sets every layer's eviction
  // scores and prefetches, in layer order from `first_layer`, each layer's best `per_layer`
  // experts whose score is positive and at least `min_score`: a low-confidence guess then costs
  // no copy but still ranks evictions. `reuse_scores` (optional, float [num_layers,
  // num_experts], a reuse head's) take over each layer's eviction scores when the layer is
  // released (core::CachePolicy::set_scores); layers before `first_layer` have already run
  // this step and get them at once.
  void plan(const at::Tensor& layer_scores, int32_t per_layer, int32_t first_layer = 0,
            float min_score = 0.0f, const std::optional<at::Tensor>& reuse_scores = std::nullopt);
  // Prefetches these experts of one layer (e.g. the next layer's router applied one layer
  // early). `scores` (float [num_experts], optional) first replace that layer's eviction scores.
  // Returns how many copies were issued.
  int32_t prefetch(int32_t layer, const std::vector<int32_t>& experts,
                   const std::optional<at::Tensor>& scores);
  AcquireResult acquire(int32_t layer, const std::vector<int32_t>& experts);
  // Makes compute wait until `slot`'s bytes have arrived (see TransferEngine::wait).
  void wait(int32_t slot);
  // The expert in `slot` (acquired for `layer`) as device tensors viewing the slot: no copy.
  std::vector<at::Tensor> views(int32_t slot, int32_t layer) const;
  void release(int32_t layer);
  void synchronize();

  const core::CacheStats& stats() const { return policy_.stats(); }
  CacheCounters counters() const;
  int32_t num_slots() const { return static_cast<int32_t>(slots_.size(0)); }
  int64_t slot_bytes() const { return slots_.size(1); }
  const HostExpertStore& store() const { return *store_; }

 private:
  void reap_arrivals();  // loading entries whose copy arrived become resident (lock held)
  void issue(const core::Load& load);

  std::shared_ptr<const HostExpertStore> store_;
  core::CachePolicy policy_;
  at::Device device_;
  at::Tensor slots_;  // uint8 [num_slots, slot_bytes] on device_: the whole slot pool
  std::unique_ptr<TransferEngine> engine_;
  std::vector<int32_t> in_flight_;                 // slots whose copy has not been seen to arrive
  std::vector<std::vector<int32_t>> layer_slots_;  // slots acquire(layer) handed out
  CacheCounters counters_;
  mutable std::mutex mutex_;
};

}  // namespace expertflow::runtime
