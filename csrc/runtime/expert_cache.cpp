#include "runtime/expert_cache.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace expertflow::runtime {
namespace {

core::CacheOptions cache_options(const HostExpertStore& store, int32_t num_slots, int32_t top_k,
                                 core::BudgetMode budget, core::EvictionPolicy policy) {
  core::CacheOptions o;
  o.num_layers = store.num_layers();
  o.num_experts = store.num_experts();
  o.num_slots = num_slots;
  o.top_k = top_k;
  o.budget = budget;
  o.policy = policy;
  const std::string problem = core::validate(o);
  TORCH_CHECK_VALUE(problem.empty(), "ExpertCache: ", problem);
  return o;
}

int32_t pool_slots(const core::CacheOptions& o) {
  return o.budget == core::BudgetMode::kPerLayer ? o.num_slots / o.num_layers * o.num_layers
                                                 : o.num_slots;
}

// `t` as a contiguous float32 CPU tensor whose values are all finite, or a ValueError naming
// `what` and the first bad entry: sorting or ranking evictions by NaN would be undefined.
at::Tensor finite_floats(const at::Tensor& t, const char* what) {
  at::Tensor f = t.to(at::kFloat).cpu().contiguous();
  const float* v = f.const_data_ptr<float>();
  for (int64_t i = 0; i < f.numel(); ++i) {
    if (std::isfinite(v[i])) continue;
    std::vector<int64_t> index(f.dim());
    for (int64_t d = f.dim() - 1, rest = i; d >= 0; rest /= f.size(d), --d) {
      index[d] = rest % f.size(d);
    }
    TORCH_CHECK_VALUE(false, "ExpertCache.", what, " must be finite, got ", v[i], " at ",
                      at::IntArrayRef(index));
  }
  return f;
}

}  // namespace

ExpertCache::ExpertCache(std::shared_ptr<const HostExpertStore> store, int32_t num_slots,
                         int32_t top_k, core::BudgetMode budget, core::EvictionPolicy policy,
                         const at::Device& device, const TransferEngineFactory& make_engine)
    : store_(std::move(store)),
      policy_(cache_options(*store_, num_slots, top_k, budget, policy)),
      device_(device),
      layer_slots_(store_->num_layers()) {
  const int32_t n = pool_slots(policy_.options());
  // One allocation for all slots, each the size of the largest expert.
  slots_ = at::empty({n, store_->max_expert_bytes()},
                     at::TensorOptions().dtype(at::kByte).device(device_));
  engine_ = make_engine ? make_engine(n) : make_transfer_engine(device_, n);
  in_flight_.reserve(n);  // a slot is in flight at most once: issue() never reallocates
}

void ExpertCache::check_layer(int32_t layer, const char* what) const {
  TORCH_CHECK_INDEX(layer >= 0 && layer < store_->num_layers(), "ExpertCache.", what,
                    ": layer must be in [0, ", store_->num_layers(), "), got ", layer);
}

void ExpertCache::check_experts(const std::vector<int32_t>& experts, const char* what) const {
  for (int32_t e : experts) {
    TORCH_CHECK_INDEX(e >= 0 && e < store_->num_experts(), "ExpertCache.", what,
                      ": expert must be in [0, ", store_->num_experts(), "), got ", e);
  }
  // Positions sorted by expert, ties by position: a duplicate sits next to its first position.
  std::vector<int32_t> by_expert(experts.size());
  std::iota(by_expert.begin(), by_expert.end(), 0);
  std::sort(by_expert.begin(), by_expert.end(), [&experts](int32_t a, int32_t b) {
    return experts[a] < experts[b] || (experts[a] == experts[b] && a < b);
  });
  for (size_t i = 1; i < by_expert.size(); ++i) {
    const int32_t first = by_expert[i - 1];
    const int32_t again = by_expert[i];
    TORCH_CHECK_VALUE(experts[first] != experts[again], "ExpertCache.", what,
                      ": experts must be distinct, got expert ", experts[first], " at positions ",
                      first, " and ", again, " (merge the ids first: each gets one slot)");
  }
}

void ExpertCache::check_slot(int32_t slot, const char* what) const {
  TORCH_CHECK_INDEX(slot >= 0 && slot < num_slots(), "ExpertCache.", what, ": slot must be in [0, ",
                    num_slots(), "), got ", slot);
}

void ExpertCache::check_held(int32_t slot, const char* what) const {
  TORCH_CHECK_INDEX(policy_.pins(slot) > 0, "ExpertCache.", what, ": slot ", slot,
                    " is not held by any acquire (only slots acquire() returned, until the "
                    "release() of their layer)");
}

void ExpertCache::reap_arrivals() {
  auto arrived = [this](int32_t slot) {
    if (!engine_->arrived(slot)) return false;
    policy_.loaded(slot);
    return true;
  };
  in_flight_.erase(std::remove_if(in_flight_.begin(), in_flight_.end(), arrived), in_flight_.end());
}

void ExpertCache::issue(const core::Load& load) {
  try {
    const at::Tensor src = store_->expert_bytes(load.layer, load.expert);
    engine_->copy(load.slot, src, slots_[load.slot].narrow(0, 0, src.numel()), load.urgent);
    counters_.bytes_copied += src.numel();
  } catch (...) {
    policy_.cancel_load(load.slot);  // else the slot would stay "loading" forever
    throw;
  }
  in_flight_.push_back(load.slot);
}

void ExpertCache::issue_all(const std::vector<core::Load>& loads) {
  for (size_t i = 0; i < loads.size(); ++i) {
    try {
      issue(loads[i]);
    } catch (...) {
      for (size_t j = i + 1; j < loads.size(); ++j) policy_.cancel_load(loads[j].slot);
      throw;
    }
  }
}

void ExpertCache::plan(const at::Tensor& layer_scores, int32_t per_layer, int32_t first_layer,
                       float min_score, const std::optional<at::Tensor>& reuse_scores) {
  const core::CacheOptions& o = policy_.options();
  TORCH_CHECK_VALUE(layer_scores.dim() == 2 && layer_scores.size(0) == o.num_layers &&
                        layer_scores.size(1) == o.num_experts,
                    "ExpertCache.plan: layer_scores must be [num_layers=", o.num_layers,
                    ", num_experts=", o.num_experts, "], got ", layer_scores.sizes());
  TORCH_CHECK_VALUE(per_layer >= 0, "ExpertCache.plan: per_layer must be >= 0, got ", per_layer);
  TORCH_CHECK_VALUE(first_layer >= 0 && first_layer <= o.num_layers,
                    "ExpertCache.plan: first_layer must be in [0, ", o.num_layers, "], got ",
                    first_layer);
  TORCH_CHECK_VALUE(std::isfinite(min_score) && min_score >= 0.0f,
                    "ExpertCache.plan: min_score must be a finite number >= 0, got ", min_score);
  at::Tensor reuse;
  if (reuse_scores.has_value()) {
    TORCH_CHECK_VALUE(reuse_scores->sizes() == layer_scores.sizes(),
                      "ExpertCache.plan: reuse_scores must be [num_layers=", o.num_layers,
                      ", num_experts=", o.num_experts, "] as layer_scores, got ",
                      reuse_scores->sizes());
    reuse = finite_floats(*reuse_scores, "plan: reuse_scores");
  }
  const at::Tensor scores = finite_floats(layer_scores, "plan: layer_scores");
  const float* s = scores.const_data_ptr<float>();
  const float* r = reuse.defined() ? reuse.const_data_ptr<float>() : nullptr;
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  for (int32_t l = 0; l < o.num_layers; ++l) {
    const int64_t at = static_cast<int64_t>(l) * o.num_experts;
    if (r == nullptr) {
      policy_.set_scores(l, s + at);
    } else {
      policy_.set_scores(l, l < first_layer ? r + at : s + at, r + at);
    }
  }
  std::vector<int32_t> order(o.num_experts);
  for (int32_t l = first_layer; l < o.num_layers; ++l) {
    const float* row = s + l * o.num_experts;
    std::iota(order.begin(), order.end(), 0);
    const int32_t take = std::min(per_layer, o.num_experts);
    // A strict weak order because every score is finite (checked above).
    std::partial_sort(
        order.begin(), order.begin() + take, order.end(),
        [row](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    for (int32_t i = 0; i < take && row[order[i]] > 0.0f && row[order[i]] >= min_score; ++i) {
      if (const auto load = policy_.prefetch(l, order[i])) issue(*load);
    }
  }
}

int32_t ExpertCache::prefetch(int32_t layer, const std::vector<int32_t>& experts,
                              const std::optional<at::Tensor>& scores) {
  const int32_t num_experts = policy_.options().num_experts;
  check_layer(layer, "prefetch");
  check_experts(experts, "prefetch");
  at::Tensor row;
  if (scores.has_value()) {
    TORCH_CHECK_VALUE(scores->dim() == 1 && scores->size(0) == num_experts,
                      "ExpertCache.prefetch: scores must be [num_experts=", num_experts, "], got ",
                      scores->sizes());
    row = finite_floats(*scores, "prefetch: scores");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  if (row.defined()) policy_.set_scores(layer, row.const_data_ptr<float>());
  int32_t issued = 0;
  for (int32_t expert : experts) {
    if (const auto load = policy_.prefetch(layer, expert)) issue(*load), ++issued;
  }
  return issued;
}

void ExpertCache::acquire_policy(int32_t layer, const std::vector<int32_t>& experts, int32_t* slots,
                                 std::vector<core::Load>& loads) {
  const auto n = static_cast<int32_t>(experts.size());
  for (;;) {
    try {
      policy_.acquire(layer, experts.data(), n, slots, loads);
      return;
    } catch (const std::length_error&) {
      // Slots held by copies in flight cannot be evicted: let the oldest land, one at a time,
      // until enough are free (a failed acquire changes no policy state).
      if (in_flight_.empty()) throw;
    }
    counters_.wait_seconds += engine_->block_until_arrived(in_flight_.front());
    ++counters_.full_pool_waits;
    reap_arrivals();
  }
}

AcquireResult ExpertCache::acquire(int32_t layer, const std::vector<int32_t>& experts) {
  check_layer(layer, "acquire");
  check_experts(experts, "acquire");
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  AcquireResult result;
  result.slots.resize(experts.size());
  std::vector<core::Load> loads;
  acquire_policy(layer, experts, result.slots.data(), loads);
  std::vector<int32_t>& held = layer_slots_[layer];
  held.insert(held.end(), result.slots.begin(), result.slots.end());
  try {
    issue_all(loads);
  } catch (...) {
    // The misses not issued went back to the policy, unpinned: the layer no longer holds them
    // (views and wait refuse them), while every slot still pinned stays held.
    std::erase_if(held, [this](int32_t slot) { return policy_.pins(slot) == 0; });
    throw;
  }

  // Hits that have arrived run first, then those still in flight, then the misses.
  std::vector<int> rank(experts.size());
  for (size_t i = 0; i < experts.size(); ++i) {
    const int32_t slot = result.slots[i];
    const bool urgent = std::any_of(loads.begin(), loads.end(),
                                    [slot](const core::Load& l) { return l.slot == slot; });
    const bool landed = std::find(in_flight_.begin(), in_flight_.end(), slot) == in_flight_.end();
    rank[i] = urgent ? 2 : (landed ? 0 : 1);
  }
  result.ready_order.resize(experts.size());
  std::iota(result.ready_order.begin(), result.ready_order.end(), 0);
  std::stable_sort(result.ready_order.begin(), result.ready_order.end(),
                   [&rank](int32_t a, int32_t b) { return rank[a] < rank[b]; });
  return result;
}

void ExpertCache::wait(int32_t slot) {
  check_slot(slot, "wait");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    check_held(slot, "wait");
  }
  const bool late = !engine_->arrived(slot);
  const double blocked = engine_->wait(slot);  // outside the lock: copies keep landing
  std::lock_guard<std::mutex> lock(mutex_);
  counters_.wait_seconds += blocked;
  counters_.late_waits += late;
}

std::vector<at::Tensor> ExpertCache::views(int32_t slot, int32_t layer) const {
  check_slot(slot, "views");
  check_layer(layer, "views");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::vector<int32_t>& held = layer_slots_[layer];
    TORCH_CHECK_INDEX(std::find(held.begin(), held.end(), slot) != held.end(),
                      "ExpertCache.views: slot ", slot, " is not held by layer ", layer,
                      " (only slots acquire(", layer, ", ...) returned, until release(", layer,
                      "))");
  }
  return view_as_layout(slots_[slot], store_->layout(layer));
}

void ExpertCache::release(int32_t layer) {
  check_layer(layer, "release");
  std::lock_guard<std::mutex> lock(mutex_);
  policy_.release(layer);
  for (int32_t slot : layer_slots_[layer]) engine_->release(slot);
  layer_slots_[layer].clear();
}

void ExpertCache::synchronize() {
  engine_->synchronize();
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
}

std::vector<bool> ExpertCache::cached(int32_t layer, const std::vector<int32_t>& experts) const {
  check_layer(layer, "cached");
  check_experts(experts, "cached");
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<bool> out;
  out.reserve(experts.size());
  for (const int32_t e : experts) out.push_back(policy_.slot_of(layer, e) >= 0);
  return out;
}

std::vector<int32_t> ExpertCache::copies_ahead(int32_t layer, const std::vector<int32_t>& experts) {
  check_layer(layer, "copies_ahead");
  check_experts(experts, "copies_ahead");
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  std::vector<int32_t> out;
  out.reserve(experts.size());
  for (const int32_t e : experts) {
    const int32_t slot = policy_.slot_of(layer, e);
    const auto it = std::find(in_flight_.begin(), in_flight_.end(), slot);
    if (slot < 0) {
      out.push_back(-1);
    } else {
      out.push_back(it == in_flight_.end() ? 0 : static_cast<int32_t>(it - in_flight_.begin()) + 1);
    }
  }
  return out;
}

ExpertCacheStats ExpertCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {policy_.stats(), counters_};
}

}  // namespace expertflow::runtime
