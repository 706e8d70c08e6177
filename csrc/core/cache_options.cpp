// The cache's options: policy and budget names (the single table users' names come from) and the
// validation of CacheOptions. Declared in cache_policy.h.
#include <cmath>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "cache_policy.h"

namespace expertflow::core {

namespace {

struct NamedPolicy {
  std::string_view name;
  EvictionPolicy policy;
};
constexpr NamedPolicy kNamedPolicies[] = {{"lru", EvictionPolicy::kLru},
                                          {"lfu", EvictionPolicy::kLfu},
                                          {"lfu_history", EvictionPolicy::kLfuHistory},
                                          {"lrfu", EvictionPolicy::kLrfu},
                                          {"expertflow", EvictionPolicy::kExpertFlow},
                                          {"belady", EvictionPolicy::kBelady}};

}  // namespace

std::vector<std::string_view> policy_names() {
  std::vector<std::string_view> names;
  for (const auto& p : kNamedPolicies) names.push_back(p.name);
  return names;
}

std::string validate(const CacheOptions& o) {
  if (o.num_layers < 1) return "num_layers must be >= 1, got " + std::to_string(o.num_layers);
  if (o.num_experts < 1) return "num_experts must be >= 1, got " + std::to_string(o.num_experts);
  if (o.top_k < 1 || o.top_k > o.num_experts) {
    return "top_k must be in [1, num_experts=" + std::to_string(o.num_experts) + "], got " +
           std::to_string(o.top_k);
  }
  const int64_t minimum = o.budget == BudgetMode::kPerLayer
                              ? static_cast<int64_t>(o.num_layers) * o.top_k
                              : static_cast<int64_t>(o.top_k);
  if (o.num_slots < minimum) {
    return "num_slots must be at least " + std::to_string(minimum) +
           (o.budget == BudgetMode::kPerLayer ? " (num_layers * top_k, per-layer budget)"
                                              : " (top_k, global budget)") +
           " or a layer could never run, got " + std::to_string(o.num_slots);
  }
  if (!(o.frequency_decay > 0.0 && o.frequency_decay < 1.0)) {
    return "frequency_decay must be in (0, 1), got " + std::to_string(o.frequency_decay);
  }
  if (!(std::isfinite(o.score_weight) && o.score_weight >= 0.0)) {
    return "score_weight must be a finite number >= 0, got " + std::to_string(o.score_weight);
  }
  return {};
}

EvictionPolicy parse_eviction_policy(const std::string& name) {
  for (const auto& p : kNamedPolicies) {
    if (p.name == name) return p.policy;
  }
  std::string names;
  for (const auto& p : kNamedPolicies)
    names += (names.empty() ? "'" : ", '") + std::string(p.name) + "'";
  throw std::invalid_argument("policy must be one of " + names + ", got '" + name + "'");
}

BudgetMode parse_budget_mode(const std::string& name) {
  if (name == "per_layer") return BudgetMode::kPerLayer;
  if (name == "global") return BudgetMode::kGlobal;
  throw std::invalid_argument("budget must be 'per_layer' or 'global', got '" + name + "'");
}

}  // namespace expertflow::core
