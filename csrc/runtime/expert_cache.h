// The expert cache: the core policy deciding which expert occupies which device slot, the host
// store holding every expert, the slot pool, and the transfer engine moving bytes between them.
//
// Thread-safe. Every public method that reads or changes mutable state (the policy, the copies
// in flight, the layers' slots, the counters) takes the cache's lock, views and wait included
// (they check that the slot is held). Those reading only what the constructor fixed take none:
// num_slots, slot_bytes and store. wait() and synchronize() block in the transfer engine,
// itself thread-safe, outside the lock, so copies keep landing and other threads keep
// acquiring meanwhile.
//
// Errors: arguments are refused with c10::ValueError (Python ValueError) and indices with
// c10::IndexError (IndexError), naming the argument, what was expected and what was given;
// a layer whose pool cannot hold a request throws std::length_error (ValueError).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
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

// Transfer counters kept by the cache (the policy keeps its own, core::CacheStats).
struct CacheCounters {
  int64_t bytes_copied = 0;
  double wait_seconds = 0.0;    // host time blocked in wait() (CPU engine; CUDA waits on device)
  int64_t late_waits = 0;       // wait() calls whose copy had not arrived yet (compute stalled)
  int64_t full_pool_waits = 0;  // acquires that had to let an in-flight copy land first
};

// Both kinds of counters, read together under the cache's lock: a consistent snapshot.
struct ExpertCacheStats {
  core::CacheStats policy;
  CacheCounters transfers;
};

// Makes the transfer engine for a pool of `num_slots` slots (tests inject failing engines).
using TransferEngineFactory = std::function<std::unique_ptr<TransferEngine>(int32_t num_slots)>;

class ExpertCache {
 public:
  // `make_engine` (default: make_transfer_engine for `device`) builds the transfer engine.
  ExpertCache(std::shared_ptr<const HostExpertStore> store, int32_t num_slots, int32_t top_k,
              core::BudgetMode budget, core::EvictionPolicy policy, const at::Device& device,
              const TransferEngineFactory& make_engine = nullptr);

  // layer_scores: float [num_layers, num_experts] predicted demand. Sets every layer's eviction
  // scores and prefetches, in layer order from `first_layer`, each layer's best `per_layer`
  // experts whose score is positive and at least `min_score`: a low-confidence guess then costs
  // no copy but still ranks evictions. `reuse_scores` (optional, float [num_layers,
  // num_experts], a reuse head's) take over each layer's eviction scores when the layer is
  // released (core::CachePolicy::set_scores); layers before `first_layer` have already run
  // this step and get them at once. Non-finite scores are refused (ValueError naming the
  // argument) before anything changes.
  void plan(const at::Tensor& layer_scores, int32_t per_layer, int32_t first_layer = 0,
            float min_score = 0.0f, const std::optional<at::Tensor>& reuse_scores = std::nullopt);
  // Prefetches these experts of one layer (e.g. the next layer's router applied one layer
  // early). `scores` (float [num_experts], optional, finite) first replace that layer's eviction
  // scores. Returns how many copies were issued. `experts` must be distinct and in range, as
  // acquire's (ValueError / IndexError naming them, before anything changes).
  int32_t prefetch(int32_t layer, const std::vector<int32_t>& experts,
                   const std::optional<at::Tensor>& scores);
  // Pins the experts of `layer` and issues urgent copies for the misses. If a copy cannot be
  // issued (the engine throws), that miss and those not issued yet are given back to the policy
  // (free slots, not "loading" forever) and the error propagates; the experts already pinned
  // stay pinned until release(layer), as after a successful acquire.
  // `experts` must be distinct: a duplicate is refused (ValueError naming `experts`, the expert
  // and both positions) before anything changes. The policy would give both positions one
  // slot and count one request, so a caller that passed the top-k ids of several tokens
  // unmerged would run the expert twice over the same tokens and read a hit ratio from fewer
  // requests than it made; callers merge the ids first (sorted(set(ids))) and pair the slots
  // with their own token lists.
  AcquireResult acquire(int32_t layer, const std::vector<int32_t>& experts);
  // Which of `experts` of `layer` the cache holds (resident or on their way), pinning and
  // copying nothing: where a miss should run is decided from it (hybrid execution), then the
  // hits and the misses to copy are acquired. A hint, not a promise: another thread's prefetch
  // may evict an expert before acquire pins it, which acquire then copies again. `experts` is
  // checked as acquire's.
  std::vector<bool> cached(int32_t layer, const std::vector<int32_t>& experts) const;
  // The same with where each copy is: -1 not held, 0 held and arrived, n >= 1 still on its way
  // as the n-th of the copies now in flight, in the order they were issued (they share the
  // link, so the n-th lands after about n copies' time). Pins and copies nothing.
  std::vector<int32_t> copies_ahead(int32_t layer, const std::vector<int32_t>& experts);
  // Makes compute wait until `slot`'s bytes have arrived (see TransferEngine::wait). The slot
  // must be held by an acquire not yet released (IndexError naming it otherwise): any other
  // slot may be evicted and refilled at any time, so waiting for it promises nothing.
  void wait(int32_t slot);
  // The expert in `slot` as device tensors viewing the slot: no copy. The slot must be one that
  // acquire(layer) returned and release(layer) has not yet given back (IndexError naming slot
  // and layer otherwise): another layer's slot holds bytes of another layout, and a slot not
  // held can be refilled with another expert while the views are read.
  std::vector<at::Tensor> views(int32_t slot, int32_t layer) const;
  // Unpins every expert acquire(layer) pinned, whichever thread acquired it: two threads that
  // run the same layer must release it once, after both have finished reading their views.
  void release(int32_t layer);
  void synchronize();

  ExpertCacheStats stats() const;  // a snapshot, taken under the lock
  int32_t num_slots() const { return static_cast<int32_t>(slots_.size(0)); }
  int64_t slot_bytes() const { return slots_.size(1); }
  const HostExpertStore& store() const { return *store_; }

 private:
  void check_layer(int32_t layer, const char* what) const;  // IndexError naming `what`
  // IndexError for an expert out of range, then ValueError for a duplicate.
  void check_experts(const std::vector<int32_t>& experts, const char* what) const;
  void check_slot(int32_t slot, const char* what) const;
  void check_held(int32_t slot, const char* what) const;  // IndexError unless pinned (lock held)
  void reap_arrivals();  // loading entries whose copy arrived become resident (lock held)
  // Starts the copy of one load; if that throws, the policy gets the slot back (lock held).
  void issue(const core::Load& load);
  void issue_all(const std::vector<core::Load>& loads);  // the same, all or the rest cancelled
  void acquire_policy(int32_t layer, const std::vector<int32_t>& experts, int32_t* slots,
                      std::vector<core::Load>& loads);  // lock held; may let copies land

  // Declaration order is destruction order reversed, and it matters: engine_ is destroyed
  // first, and its destructor waits for the copies in flight, which read store_'s host bytes
  // and write slots_' device bytes through raw pointers (CUDA). Declared before them, engine_
  // would be destroyed after them: a copy could still land in freed memory.
  std::shared_ptr<const HostExpertStore> store_;
  core::CachePolicy policy_;
  at::Device device_;
  at::Tensor slots_;  // uint8 [num_slots, slot_bytes] on device_: the whole slot pool
  std::unique_ptr<TransferEngine> engine_;         // after store_ and slots_: see above
  std::vector<int32_t> in_flight_;                 // slots whose copy has not been seen to arrive
  std::vector<std::vector<int32_t>> layer_slots_;  // slots acquire(layer) handed out
  CacheCounters counters_;
  mutable std::mutex mutex_;
};

}  // namespace expertflow::runtime
