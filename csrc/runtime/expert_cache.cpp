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

}  // namespace

ExpertCache::ExpertCache(std::shared_ptr<const HostExpertStore> store, int32_t num_slots,
                         int32_t top_k, core::BudgetMode budget, core::EvictionPolicy policy,
                         const at::Device& device)
    : store_(std::move(store)),
      policy_(cache_options(*store_, num_slots, top_k, budget, policy)),
      device_(device),
      layer_slots_(store_->num_layers()) {
  const int32_t n = pool_slots(policy_.options());
  // One allocation for all slots, each the size of the largest expert.
  slots_ = at::empty({n, store_->max_expert_bytes()},
                     at::TensorOptions().dtype(at::kByte).device(device_));
  engine_ = make_transfer_engine(device_, n);
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
  const at::Tensor src = store_->expert_bytes(load.layer, load.expert);
  engine_->copy(load.slot, src, slots_[load.slot].narrow(0, 0, src.numel()), load.urgent);
  in_flight_.push_back(load.slot);
  counters_.bytes_copied += src.numel();
}

void ExpertCache::plan(const at::Tensor& layer_scores, int32_t per_layer, int32_t first_layer,
                       float min_score, const std::optional<at::Tensor>& reuse_scores) {
  const core::CacheOptions& o = policy_.options();
  TORCH_CHECK(layer_scores.dim() == 2 && layer_scores.size(0) == o.num_layers &&
                  layer_scores.size(1) == o.num_experts,
              "ExpertCache.plan: layer_scores must be [num_layers=", o.num_layers,
              ", num_experts=", o.num_experts, "], got ", layer_scores.sizes());
  TORCH_CHECK(per_layer >= 0, "ExpertCache.plan: per_layer must be >= 0, got ", per_layer);
  TORCH_CHECK(first_layer >= 0 && first_layer <= o.num_layers,
              "ExpertCache.plan: first_layer must be in [0, ", o.num_layers, "], got ",
              first_layer);
  TORCH_CHECK(std::isfinite(min_score) && min_score >= 0.0f,
              "ExpertCache.plan: min_score must be a finite number >= 0, got ", min_score);
  at::Tensor reuse;
  if (reuse_scores.has_value()) {
    TORCH_CHECK(reuse_scores->sizes() == layer_scores.sizes(),
                "ExpertCache.plan: reuse_scores must be [num_layers=", o.num_layers,
                ", num_experts=", o.num_experts, "] as layer_scores, got ", reuse_scores->sizes());
    reuse = reuse_scores->to(at::kFloat).cpu().contiguous();
  }
  const at::Tensor scores = layer_scores.to(at::kFloat).cpu().contiguous();
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
  at::Tensor row;
  if (scores.has_value()) {
    TORCH_CHECK(scores->dim() == 1 && scores->size(0) == num_experts,
                "ExpertCache.prefetch: scores must be [num_experts=", num_experts, "], got ",
                scores->sizes());
    row = scores->to(at::kFloat).cpu().contiguous();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  int32_t issued = 0;
  try {
    if (row.defined()) policy_.set_scores(layer, row.const_data_ptr<float>());
    for (int32_t expert : experts) {
      if (const auto load = policy_.prefetch(layer, expert)) issue(*load), ++issued;
    }
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_INDEX(false, "ExpertCache.", e.what());
  }
  return issued;
}

AcquireResult ExpertCache::acquire(int32_t layer, const std::vector<int32_t>& experts) {
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
  AcquireResult result;
  result.slots.resize(experts.size());
  std::vector<core::Load> loads;
  try {
    policy_.acquire(layer, experts.data(), static_cast<int32_t>(experts.size()),
                    result.slots.data(), loads);
  } catch (const std::length_error&) {
    // Slots held by copies in flight cannot be evicted: let the oldest land, one at a time,
    // until enough are free (a failed acquire changes no policy state).
    for (;;) {
      if (in_flight_.empty()) throw;
      counters_.wait_seconds += engine_->block_until_arrived(in_flight_.front());
      ++counters_.full_pool_waits;
      reap_arrivals();
      try {
        policy_.acquire(layer, experts.data(), static_cast<int32_t>(experts.size()),
                        result.slots.data(), loads);
        break;
      } catch (const std::length_error&) {
      }
    }
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_INDEX(false, "ExpertCache.", e.what());
  }
  for (const core::Load& load : loads) issue(load);
  std::vector<int32_t>& held = layer_slots_[layer];
  held.insert(held.end(), result.slots.begin(), result.slots.end());

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
  TORCH_CHECK_INDEX(slot >= 0 && slot < num_slots(), "ExpertCache.wait: slot must be in [0, ",
                    num_slots(), "), got ", slot);
  const bool late = !engine_->arrived(slot);
  const double blocked = engine_->wait(slot);  // outside the lock: copies keep landing
  std::lock_guard<std::mutex> lock(mutex_);
  counters_.wait_seconds += blocked;
  counters_.late_waits += late;
}

std::vector<at::Tensor> ExpertCache::views(int32_t slot, int32_t layer) const {
  TORCH_CHECK_INDEX(slot >= 0 && slot < num_slots(), "ExpertCache.views: slot must be in [0, ",
                    num_slots(), "), got ", slot);
  return view_as_layout(slots_[slot], store_->layout(layer));
}

void ExpertCache::release(int32_t layer) {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    policy_.release(layer);
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_INDEX(false, "ExpertCache.", e.what());
  }
  for (int32_t slot : layer_slots_[layer]) engine_->release(slot);
  layer_slots_[layer].clear();
}

void ExpertCache::synchronize() {
  engine_->synchronize();
  std::lock_guard<std::mutex> lock(mutex_);
  reap_arrivals();
}

CacheCounters ExpertCache::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

}  // namespace expertflow::runtime
