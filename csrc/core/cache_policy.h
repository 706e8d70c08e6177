// Which expert lives in which GPU slot: the decision half of the expert cache, without any data.
//
// Entries are keyed by (layer, expert) and are absent, loading (a copy is in flight) or resident.
// Eviction never takes a pinned (in use by the current layer) or loading entry. Among the rest the
// policy decides; every decision is deterministic (ties go to the lowest slot). The runtime pairs
// this with a transfer engine that performs the loads it returns. No torch, CUDA or Python here.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace expertflow::core {

enum class EvictionPolicy {
  kLru,         // least recently used
  kLfu,         // fewest requests since the entry was loaded (in-cache LFU: an expert's count
                // restarts at each load), then least recently used
  kExpertFlow,  // contradicted prefetches first, then the lowest CacheOptions::score_weight x
                // predicted score + log(decayed request count, as kLrfu's), then LRU
  kBelady,      // farthest next use (needs the future: replay only), then LRU
  kLrfu,        // lowest decayed request count (each request adds 1, decaying by
                // CacheOptions::frequency_decay per token), then LRU
  kLfuHistory,  // fewest requests over the whole run, resident or not (classic "perfect" LFU:
                // an evicted expert keeps its count), then least recently used
};

// The policies as users name them (Python API, command line, replay), in the order they are
// listed: the single source of these names (parse_eviction_policy reads the same table).
std::vector<std::string_view> policy_names();

enum class BudgetMode {
  kPerLayer,  // num_slots / num_layers slots reserved to each layer
  kGlobal,    // one pool shared by all layers; slots follow demand
};

struct CacheOptions {
  int32_t num_layers = 0;
  int32_t num_experts = 0;  // routed experts per layer
  int32_t num_slots = 0;    // in total, over all layers
  int32_t top_k = 1;        // experts one token needs per layer: the least a pool must hold
  BudgetMode budget = BudgetMode::kPerLayer;
  EvictionPolicy policy = EvictionPolicy::kLru;
  // kLrfu: what a request weighs one token (num_layers acquires) later. Replayed on the demo
  // model's held-out routing, 0.97-0.99 moved the fewest bytes; 0.9 recalls too little.
  double frequency_decay = 0.99;
  // kExpertFlow: how much a predicted score (a probability of use in the next step) weighs
  // against the long-run demand. A score of 1 is worth e^4 ~ 55 times the decayed request
  // count. The next-step score alone (an infinite weight) evicts experts needed again two
  // tokens later: replayed on the demo model's held-out routing it moved 2-15x Belady's bytes
  // where 1-8 moved 1.5-2.3x; 4 kept the most hits among those (bench/bench_predictor.py).
  double score_weight = 4.0;
};

// Empty when the options are usable, else a message naming the field and the minimum.
std::string validate(const CacheOptions& options);

// One of policy_names() / "per_layer", "global"; anything else throws std::invalid_argument
// listing the accepted names.
EvictionPolicy parse_eviction_policy(const std::string& name);
BudgetMode parse_budget_mode(const std::string& name);

// A copy the runtime must perform: expert (layer, expert) into `slot`.
struct Load {
  int32_t slot;
  int32_t layer;
  int32_t expert;
  bool urgent;  // a miss the current layer waits for (high-priority stream), else a prefetch
};

struct CacheStats {
  int64_t hits = 0;               // requested and already resident or loading
  int64_t misses = 0;             // requested and absent: an urgent load
  int64_t prefetch_hits = 0;      // hits whose entry came in by prefetch and was not used before
  int64_t prefetches = 0;         // prefetch loads issued
  int64_t wasted_prefetches = 0;  // prefetched entries evicted without ever being used
  int64_t evictions = 0;
  int64_t loads() const { return misses + prefetches; }
};

class CachePolicy {
 public:
  // Throws std::invalid_argument (the validate() message) for unusable options.
  explicit CachePolicy(const CacheOptions& options);

  // Predicted demand of one layer's experts (higher = more likely needed soon).
  // scores: [num_experts]. Used by kExpertFlow for eviction and prefetch decisions.
  // With `reuse` [num_experts] (each expert's predicted demand in the tokens after this step,
  // a reuse head's score): until release(layer) an expert is valued at the higher of its
  // score and its reuse score (also for scores set again without `reuse`, as gate lookahead
  // does), and from release(layer) on at its reuse score alone, for the step no longer needs
  // the layer: its next use is a later token's, as Belady's next use would say.
  // Throws std::invalid_argument, changing nothing, if a score is not finite: an eviction order
  // over NaN is no order at all, and a NaN or infinite prediction is a broken predictor.
  void set_scores(int32_t layer, const float* scores, const float* reuse = nullptr);
  // The same over arrays that carry their length: each must hold num_experts scores (`reuse`
  // may be empty: none), else std::invalid_argument naming it.
  void set_scores(int32_t layer, std::span<const float> scores, std::span<const float> reuse);

  // Belady only: the tick (acquire count) at which (layer, expert) is next requested; a
  // negative tick means never again.
  void set_next_use(int32_t layer, int32_t expert, int64_t tick);

  // Starts loading (layer, expert) ahead of need if it is absent and a slot can be had without
  // evicting anything the policy values more (kExpertFlow: a higher or equal score).
  std::optional<Load> prefetch(int32_t layer, int32_t expert);

  // The experts one layer is about to run: writes each one's slot into slots [n] and appends an
  // urgent load for every miss. All of them stay pinned until release(layer). Duplicates share
  // one slot. Throws std::length_error if the layer's pool cannot hold them all at once.
  void acquire(int32_t layer, const int32_t* experts, int32_t n, int32_t* slots,
               std::vector<Load>& loads);

  // The copy into `slot` has completed: loading -> resident.
  void loaded(int32_t slot);

  // The copy into `slot` could not be started: the entry is dropped (loading -> free, unpinned,
  // its layer's release() no longer sees it), as if it had never been requested or prefetched,
  // except that a miss still counts as a miss. A failed copy then costs a slot nothing.
  void cancel_load(int32_t slot);

  // The layer is done: unpins its experts. Under kExpertFlow, the layer's prefetched entries the
  // router did not ask for are marked contradicted and go first.
  void release(int32_t layer);

  // Slot holding (layer, expert), or -1.
  int32_t slot_of(int32_t layer, int32_t expert) const;
  bool is_resident(int32_t slot) const;
  int32_t pins(int32_t slot) const;
  const CacheStats& stats() const { return stats_; }
  const CacheOptions& options() const { return options_; }
  int32_t pool_size(int32_t layer) const;

 private:
  enum class State : uint8_t { kFree, kLoading, kResident };
  struct Slot {
    int32_t layer = -1;
    int32_t expert = -1;
    State state = State::kFree;
    int32_t pins = 0;
    int64_t last_use = -1;
    int64_t uses = 0;
    bool prefetched_unused = false;  // came in by prefetch and has not been requested yet
    bool contradicted = false;       // prefetched for a layer that then did not use it
  };
  // Eviction order within a pool: smallest first. (class, primary, secondary, slot).
  using EvictKey = std::tuple<int64_t, double, int64_t, int32_t>;

  int32_t pool_of(int32_t layer) const;
  EvictKey evict_key(int32_t slot) const;
  // kExpertFlow's eviction value of (layer, expert) `key` (lowest goes first): see
  // CacheOptions::score_weight. `tick` stands in for the request of an entry never requested.
  double flow_value(size_t key, int64_t tick) const;
  bool evictable(int32_t slot) const;
  // scores_ of one layer's experts, each resident one re-filed.
  void assign_scores(int32_t layer, const float* scores);
  // Re-files `slot` in its pool's eviction set after `change` mutates it.
  template <typename Change>
  void update(int32_t slot, Change change);
  // A free slot of the pool, or the policy's victim (evicted), or -1 if every slot is busy.
  int32_t take_slot(int32_t pool);
  void evict(int32_t slot);
  void check_layer(int32_t layer, const char* what) const;
  void check_expert(int32_t expert, const char* what) const;
  void check_loading(int32_t slot, const char* what) const;

  CacheOptions options_;
  int32_t num_pools_;
  int32_t slots_per_pool_;
  std::vector<Slot> slots_;
  std::vector<int32_t> slot_of_;        // [num_layers * num_experts]
  std::vector<float> scores_;           // [num_layers * num_experts]
  std::vector<float> reuse_;            // [num_layers * num_experts] scores from release(layer) on
  std::vector<uint8_t> reuse_pending_;  // [num_layers]: reuse_ takes over at release(layer)
  std::vector<int64_t> next_use_;       // [num_layers * num_experts]
  // kLrfu, per (layer, expert), whether resident or not: the decayed request count as
  // log(count at its last request) + decay_rate_ * that tick, which orders entries by their
  // current decayed count without ever being recomputed as time passes.
  std::vector<double> frequency_order_;  // [num_layers * num_experts]
  double decay_rate_ = 0.0;              // -ln(frequency_decay) per tick (one acquire)
  // kLfuHistory, per (layer, expert): requests over the whole run, kept across evictions.
  std::vector<int64_t> request_count_;  // [num_layers * num_experts]
  void count_request(size_t key);
  std::vector<std::vector<int32_t>> free_;                  // per pool, a stack of free slots
  std::vector<std::set<EvictKey>> evictable_;               // per pool
  std::vector<std::set<EvictKey>::node_type> parked_;       // per slot: a set node to reuse
  std::vector<std::vector<int32_t>> pinned_by_layer_;       // slots acquire(layer) pinned
  std::vector<int64_t> acquire_tick_;                       // [num_layers] tick of its last acquire
  std::vector<std::vector<int32_t>> prefetched_for_layer_;  // slots prefetched, not yet judged
  int64_t tick_ = 0;
  CacheStats stats_;
};

}  // namespace expertflow::core
