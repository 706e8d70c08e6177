#include "cache_policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace expertflow::core {

CachePolicy::CachePolicy(const CacheOptions& options) : options_(options) {
  const std::string problem = validate(options);
  if (!problem.empty()) throw std::invalid_argument("CachePolicy: " + problem);
  const bool per_layer = options.budget == BudgetMode::kPerLayer;
  num_pools_ = per_layer ? options.num_layers : 1;
  // Per layer, slots beyond a multiple of num_layers would belong to no layer: they stay unused.
  slots_per_pool_ = per_layer ? options.num_slots / options.num_layers : options.num_slots;
  const size_t keys = static_cast<size_t>(options.num_layers) * options.num_experts;
  slots_.resize(static_cast<size_t>(num_pools_) * slots_per_pool_);
  parked_.resize(slots_.size());
  slot_of_.assign(keys, -1);
  scores_.assign(keys, 0.0f);
  reuse_.assign(keys, 0.0f);
  reuse_pending_.assign(options.num_layers, 0);
  next_use_.assign(keys, -1);
  frequency_order_.assign(keys, -std::numeric_limits<double>::infinity());
  request_count_.assign(keys, 0);
  decay_rate_ = -std::log(options.frequency_decay) / options.num_layers;
  free_.resize(num_pools_);
  evictable_.resize(num_pools_);
  pinned_by_layer_.resize(options.num_layers);
  acquire_tick_.assign(options.num_layers, -1);
  prefetched_for_layer_.resize(options.num_layers);
  for (int32_t p = 0; p < num_pools_; ++p) {
    // A stack popped from the back: the lowest slot is handed out first.
    for (int32_t s = (p + 1) * slots_per_pool_ - 1; s >= p * slots_per_pool_; --s) {
      free_[p].push_back(s);
    }
  }
}

void CachePolicy::check_layer(int32_t layer, const char* what) const {
  if (layer < 0 || layer >= options_.num_layers) {
    throw std::out_of_range(std::string(what) + ": layer must be in [0, " +
                            std::to_string(options_.num_layers) + "), got " +
                            std::to_string(layer));
  }
}

void CachePolicy::check_expert(int32_t expert, const char* what) const {
  if (expert < 0 || expert >= options_.num_experts) {
    throw std::out_of_range(std::string(what) + ": expert must be in [0, " +
                            std::to_string(options_.num_experts) + "), got " +
                            std::to_string(expert));
  }
}

int32_t CachePolicy::pool_of(int32_t layer) const {
  return options_.budget == BudgetMode::kPerLayer ? layer : 0;
}

int32_t CachePolicy::pool_size(int32_t layer) const {
  check_layer(layer, "pool_size");
  return slots_per_pool_;
}

CachePolicy::EvictKey CachePolicy::evict_key(int32_t slot) const {
  const Slot& s = slots_[slot];
  const size_t key = static_cast<size_t>(s.layer) * options_.num_experts + s.expert;
  switch (options_.policy) {
    case EvictionPolicy::kLru:
      return {0, 0.0, s.last_use, slot};
    case EvictionPolicy::kLfu:
      return {0, static_cast<double>(s.uses), s.last_use, slot};
    case EvictionPolicy::kExpertFlow:
      return {s.contradicted ? 0 : 1, flow_value(key, s.last_use), s.last_use, slot};
    case EvictionPolicy::kLrfu:
      return {0, frequency_order_[key], s.last_use, slot};
    case EvictionPolicy::kLfuHistory:
      return {0, static_cast<double>(request_count_[key]), s.last_use, slot};
    case EvictionPolicy::kBelady: {
      const int64_t next = next_use_[key];
      const double order = next < 0 ? -std::numeric_limits<double>::infinity()
                                    : -static_cast<double>(next);  // farthest first
      return {0, order, s.last_use, slot};
    }
  }
  return {0, 0.0, s.last_use, slot};
}

double CachePolicy::flow_value(size_t key, int64_t tick) const {
  const double score = scores_[key];  // finite: set_scores refuses anything else
  // An entry prefetched but never requested counts as one request at `tick` (its prefetch),
  // not as log(0): a confident prediction must still protect it.
  const double order = std::isinf(frequency_order_[key]) ? decay_rate_ * static_cast<double>(tick)
                                                         : frequency_order_[key];
  return options_.score_weight * score + order;
}

void CachePolicy::count_request(size_t key) {
  ++request_count_[key];  // kLfuHistory's count; LRFU's decayed one below
  // count(t) = count(t0) * exp(-rate (t - t0)) + 1, kept as log(count) + rate * t.
  const double now = decay_rate_ * static_cast<double>(tick_);
  const double previous = frequency_order_[key];
  const double decayed = std::isinf(previous) ? 0.0 : std::exp(previous - now);
  frequency_order_[key] = std::log(decayed + 1.0) + now;
}

bool CachePolicy::evictable(int32_t slot) const {
  return slots_[slot].state == State::kResident && slots_[slot].pins == 0;
}

template <typename Change>
void CachePolicy::update(int32_t slot, Change change) {
  // Set nodes are recycled (extract/insert of node handles, one parked per slot while the entry
  // is pinned or loading): re-filing an entry never allocates.
  std::set<EvictKey>& pool = evictable_[pool_of(slots_[slot].layer)];
  std::set<EvictKey>::node_type node;
  if (evictable(slot)) node = pool.extract(evict_key(slot));
  change(slots_[slot]);
  if (!evictable(slot)) {
    if (!node.empty()) parked_[slot] = std::move(node);
    return;
  }
  if (node.empty()) node = std::move(parked_[slot]);
  if (node.empty()) {
    pool.insert(evict_key(slot));
  } else {
    node.value() = evict_key(slot);
    pool.insert(std::move(node));
  }
}

void CachePolicy::evict(int32_t slot) {
  Slot& s = slots_[slot];
  parked_[slot] = evictable_[pool_of(s.layer)].extract(evict_key(slot));
  if (s.prefetched_unused) ++stats_.wasted_prefetches;
  ++stats_.evictions;
  slot_of_[static_cast<size_t>(s.layer) * options_.num_experts + s.expert] = -1;
  s = Slot{};
}

int32_t CachePolicy::take_slot(int32_t pool) {
  if (!free_[pool].empty()) {
    const int32_t slot = free_[pool].back();
    free_[pool].pop_back();
    return slot;
  }
  if (evictable_[pool].empty()) return -1;
  const int32_t victim = std::get<3>(*evictable_[pool].begin());
  evict(victim);
  return victim;
}

namespace {

// Throws std::invalid_argument naming the first non-finite score of `values` [n].
void check_finite(const float* values, int32_t n, const char* name) {
  for (int32_t e = 0; e < n; ++e) {
    if (!std::isfinite(values[e])) {
      throw std::invalid_argument(std::string("set_scores: ") + name + " must be finite, got " +
                                  std::to_string(values[e]) + " for expert " + std::to_string(e));
    }
  }
}

void check_length(std::span<const float> values, int32_t n, const char* name) {
  if (values.size() != static_cast<size_t>(n)) {
    throw std::invalid_argument(std::string("set_scores: ") + name +
                                " must have num_experts=" + std::to_string(n) + " entries, got " +
                                std::to_string(values.size()));
  }
}

}  // namespace

void CachePolicy::set_scores(int32_t layer, std::span<const float> scores,
                             std::span<const float> reuse) {
  check_length(scores, options_.num_experts, "scores");
  if (!reuse.empty()) check_length(reuse, options_.num_experts, "reuse");
  set_scores(layer, scores.data(), reuse.empty() ? nullptr : reuse.data());
}

void CachePolicy::set_scores(int32_t layer, const float* scores, const float* reuse) {
  check_layer(layer, "set_scores");
  const int32_t n = options_.num_experts;
  check_finite(scores, n, "scores");
  if (reuse != nullptr) check_finite(reuse, n, "reuse");
  float* saved = &reuse_[static_cast<size_t>(layer) * n];
  if (reuse != nullptr) {
    std::copy(reuse, reuse + n, saved);
    reuse_pending_[layer] = 1;
  }
  if (!reuse_pending_[layer]) {
    assign_scores(layer, scores);
    return;
  }
  std::vector<float> until_release(n);
  for (int32_t e = 0; e < n; ++e) until_release[e] = std::max(scores[e], saved[e]);
  assign_scores(layer, until_release.data());
}

void CachePolicy::assign_scores(int32_t layer, const float* scores) {
  for (int32_t e = 0; e < options_.num_experts; ++e) {
    const float score = scores[e];
    const size_t key = static_cast<size_t>(layer) * options_.num_experts + e;
    const int32_t slot = slot_of_[key];
    if (slot < 0) {
      scores_[key] = score;
    } else {
      update(slot, [&](Slot&) { scores_[key] = score; });
    }
  }
}

void CachePolicy::set_next_use(int32_t layer, int32_t expert, int64_t tick) {
  check_layer(layer, "set_next_use");
  check_expert(expert, "set_next_use");
  const size_t key = static_cast<size_t>(layer) * options_.num_experts + expert;
  const int32_t slot = slot_of_[key];
  if (slot < 0) {
    next_use_[key] = tick;
  } else {
    update(slot, [&](Slot&) { next_use_[key] = tick; });
  }
}

std::optional<Load> CachePolicy::prefetch(int32_t layer, int32_t expert) {
  check_layer(layer, "prefetch");
  check_expert(expert, "prefetch");
  const size_t key = static_cast<size_t>(layer) * options_.num_experts + expert;
  if (slot_of_[key] >= 0) return std::nullopt;
  const int32_t pool = pool_of(layer);
  if (free_[pool].empty()) {
    if (evictable_[pool].empty()) return std::nullopt;
    if (options_.policy == EvictionPolicy::kExpertFlow) {
      // Never trade a cached expert for one valued no higher.
      const EvictKey& victim = *evictable_[pool].begin();
      if (std::get<0>(victim) != 0 && !(std::get<1>(victim) < flow_value(key, tick_))) {
        return std::nullopt;
      }
    }
  }
  const int32_t slot = take_slot(pool);
  Slot& s = slots_[slot];
  s.layer = layer;
  s.expert = expert;
  s.state = State::kLoading;
  s.last_use = tick_;
  s.prefetched_unused = true;
  slot_of_[key] = slot;
  prefetched_for_layer_[layer].push_back(slot);
  ++stats_.prefetches;
  return Load{slot, layer, expert, false};
}

void CachePolicy::acquire(int32_t layer, const int32_t* experts, int32_t n, int32_t* slots,
                          std::vector<Load>& loads) {
  check_layer(layer, "acquire");
  const int32_t pool = pool_of(layer);
  // Check the whole request before changing anything: misses need free or evictable slots that
  // are not themselves being requested.
  int64_t misses = 0;
  int64_t evictable_hits = 0;
  for (int32_t i = 0; i < n; ++i) {
    check_expert(experts[i], "acquire");
    if (std::find(experts, experts + i, experts[i]) != experts + i) continue;
    const int32_t slot = slot_of_[static_cast<size_t>(layer) * options_.num_experts + experts[i]];
    if (slot < 0) {
      ++misses;
    } else if (evictable(slot)) {
      ++evictable_hits;
    }
  }
  const int64_t available =
      static_cast<int64_t>(free_[pool].size()) + evictable_[pool].size() - evictable_hits;
  if (misses > available) {
    throw std::length_error(
        "acquire: layer " + std::to_string(layer) + " needs " + std::to_string(misses) +
        " more slots but only " + std::to_string(available) + " of its pool of " +
        std::to_string(slots_per_pool_) + " can be freed (the rest are pinned or loading)");
  }

  acquire_tick_[layer] = ++tick_;
  std::vector<int32_t>& pinned = pinned_by_layer_[layer];
  // Pin the hits first, so that no miss evicts an expert requested alongside it.
  for (int pass = 0; pass < 2; ++pass) {
    for (int32_t i = 0; i < n; ++i) {
      const int32_t* first = std::find(experts, experts + i, experts[i]);
      const size_t key = static_cast<size_t>(layer) * options_.num_experts + experts[i];
      const int32_t slot = slot_of_[key];
      const bool hit_pass = pass == 0;
      if (first != experts + i) continue;  // duplicate: filled in below
      if ((slot >= 0) != hit_pass) continue;
      if (hit_pass) {
        ++stats_.hits;
        if (slots_[slot].prefetched_unused) ++stats_.prefetch_hits;
        update(slot, [&](Slot& s) {
          count_request(key);  // inside: the entry's eviction key changes with it
          ++s.pins;
          s.last_use = tick_;
          ++s.uses;
          s.prefetched_unused = false;
          s.contradicted = false;
        });
        slots[i] = slot;
      } else {
        ++stats_.misses;
        const int32_t fresh = take_slot(pool);
        count_request(key);
        Slot& s = slots_[fresh];
        s.layer = layer;
        s.expert = experts[i];
        s.state = State::kLoading;
        s.pins = 1;
        s.last_use = tick_;
        s.uses = 1;
        slot_of_[key] = fresh;
        loads.push_back(Load{fresh, layer, experts[i], true});
        slots[i] = fresh;
      }
      pinned.push_back(slots[i]);
    }
  }
  for (int32_t i = 0; i < n; ++i) {
    slots[i] = slot_of_[static_cast<size_t>(layer) * options_.num_experts + experts[i]];
  }
}

void CachePolicy::check_loading(int32_t slot, const char* what) const {
  if (slot < 0 || slot >= static_cast<int32_t>(slots_.size()) ||
      slots_[slot].state != State::kLoading) {
    throw std::out_of_range(std::string(what) + ": slot " + std::to_string(slot) +
                            " has no copy in flight");
  }
}

void CachePolicy::loaded(int32_t slot) {
  check_loading(slot, "loaded");
  update(slot, [](Slot& s) { s.state = State::kResident; });
}

void CachePolicy::cancel_load(int32_t slot) {
  check_loading(slot, "cancel_load");
  Slot& s = slots_[slot];
  // Whoever pinned or prefetched it must not find it again: the slot may soon hold another
  // expert. Only acquires of its own layer pin an entry, and only prefetches for it list it.
  std::erase(pinned_by_layer_[s.layer], slot);
  std::erase(prefetched_for_layer_[s.layer], slot);
  if (s.prefetched_unused) --stats_.prefetches;  // never loaded
  slot_of_[static_cast<size_t>(s.layer) * options_.num_experts + s.expert] = -1;
  free_[pool_of(s.layer)].push_back(slot);
  s = Slot{};
}

void CachePolicy::release(int32_t layer) {
  check_layer(layer, "release");
  for (int32_t slot : pinned_by_layer_[layer]) update(slot, [](Slot& s) { --s.pins; });
  pinned_by_layer_[layer].clear();
  if (reuse_pending_[layer]) {
    reuse_pending_[layer] = 0;
    assign_scores(layer, &reuse_[static_cast<size_t>(layer) * options_.num_experts]);
  }
  // Real-time correction: the router of this layer has spoken; prefetches made for this step
  // (issued before its acquire; later ones are for the next step) that it did not use were
  // mispredicted and become the first to go.
  std::vector<int32_t>& pending = prefetched_for_layer_[layer];
  size_t kept = 0;
  for (int32_t slot : pending) {
    const Slot& s = slots_[slot];
    if (s.layer != layer || !s.prefetched_unused) continue;  // used, or evicted and reused
    if (s.last_use >= acquire_tick_[layer]) {
      pending[kept++] = slot;  // for a later step: judged at a later release
      continue;
    }
    update(slot, [](Slot& x) { x.contradicted = true; });
  }
  pending.resize(kept);
}

int32_t CachePolicy::slot_of(int32_t layer, int32_t expert) const {
  check_layer(layer, "slot_of");
  check_expert(expert, "slot_of");
  return slot_of_[static_cast<size_t>(layer) * options_.num_experts + expert];
}

bool CachePolicy::is_resident(int32_t slot) const {
  return slots_.at(slot).state == State::kResident;
}

int32_t CachePolicy::pins(int32_t slot) const { return slots_.at(slot).pins; }

}  // namespace expertflow::core
