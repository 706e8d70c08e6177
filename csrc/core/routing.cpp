#include "routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "fast_math.h"

namespace expertflow::core {
namespace {

std::string join(std::initializer_list<std::string> parts) {
  std::string out;
  for (const auto& p : parts) out += p;
  return out;
}

// Insertion into a best-first list: cheap for the small k of real routers (one comparison per
// rejected candidate).
void insertion_top_k(const float* values, const int32_t* candidates, int32_t n, int32_t k,
                     int32_t* out) {
  int32_t filled = 0;
  for (int32_t c = 0; c < n; ++c) {
    const int32_t id = candidates[c];
    const float v = values[id];
    if (filled == k && !ranks_before(v, id, values[out[k - 1]], out[k - 1])) continue;
    int32_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && ranks_before(v, id, values[out[pos - 1]], out[pos - 1])) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = id;
  }
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Fills ws.keys (and ws.scores on the bias path). Without a bias the logits themselves are the
// key: softmax and sigmoid are monotonic, so the chosen ids are the same and no ulp-level
// rounding of exp can create or break ties.
const float* compute_keys(const RouterSpec& spec, const float* logits, const float* bias,
                          RoutingWorkspace& ws) {
  if (!spec.has_bias || spec.softmax_after_topk) return logits;
  const int32_t n = spec.num_experts;
  if (spec.scoring == Scoring::kSigmoid) {
    for (int32_t e = 0; e < n; ++e) ws.scores[e] = sigmoid(logits[e]);
  } else {
    float m = -std::numeric_limits<float>::infinity();
    for (int32_t e = 0; e < n; ++e) m = (logits[e] > m || logits[e] != logits[e]) ? logits[e] : m;
    float sum = 0.0f;
    for (int32_t e = 0; e < n; ++e) sum += (ws.scores[e] = std::exp(logits[e] - m));
    for (int32_t e = 0; e < n; ++e) ws.scores[e] /= sum;
  }
  for (int32_t e = 0; e < n; ++e) ws.keys[e] = ws.scores[e] + bias[e];
  return ws.keys.data();
}

// Group-limited routing: writes the eligible experts into ws.candidates, returns their count.
int32_t eligible_experts(const RouterSpec& spec, const float* keys, RoutingWorkspace& ws) {
  const int32_t n = spec.num_experts;
  if (spec.num_groups <= 1) {
    std::iota(ws.candidates.begin(), ws.candidates.end(), 0);
    return n;
  }
  const int32_t group_size = n / spec.num_groups;
  const int32_t best_of = (spec.has_bias && group_size >= 2) ? 2 : 1;
  int32_t best[2];
  for (int32_t g = 0; g < spec.num_groups; ++g) {
    std::iota(ws.candidates.begin(), ws.candidates.begin() + group_size, g * group_size);
    insertion_top_k(keys, ws.candidates.data(), group_size, best_of, best);
    ws.group_keys[g] = best_of == 2 ? keys[best[0]] + keys[best[1]] : keys[best[0]];
  }
  std::vector<int32_t>& groups = ws.group_ids;
  std::iota(ws.candidates.begin(), ws.candidates.begin() + spec.num_groups, 0);
  insertion_top_k(ws.group_keys.data(), ws.candidates.data(), spec.num_groups, spec.topk_groups,
                  groups.data());
  // Ascending group order keeps the candidate list in expert order (cache friendly).
  std::sort(groups.begin(), groups.end());
  int32_t count = 0;
  for (int32_t g : groups) {
    for (int32_t e = g * group_size; e < (g + 1) * group_size; ++e) ws.candidates[count++] = e;
  }
  return count;
}

// True when the row holds a NaN or +inf: torch's softmax then gives a NaN row.
bool poisons_softmax(const float* logits, int32_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  bool bad = false;
  for (int32_t e = 0; e < n; ++e) bad |= !(logits[e] < kInf);
  return bad;
}

float row_max(const float* logits, int32_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int32_t e = 0; e < n; ++e) m = logits[e] > m ? logits[e] : m;
  return m;
}

void fill_nan(float* weights, int32_t k) {
  std::fill(weights, weights + k, std::numeric_limits<float>::quiet_NaN());
}

void softmax_weights(const RouterSpec& spec, const float* logits, const int32_t* ids,
                     float* weights) {
  const int32_t n = spec.num_experts;
  const int32_t k = spec.top_k;
  if (poisons_softmax(logits, n)) return fill_nan(weights, k);
  if (spec.renormalize) {
    // The softmax denominator cancels in the renormalisation: only the k chosen exps are needed,
    // shifted by the largest chosen logit. The caller divides by their sum.
    const float m = logits[ids[0]];
    if (!std::isfinite(m)) return fill_nan(weights, k);
    for (int32_t j = 0; j < k; ++j) weights[j] = exp_nonpositive(logits[ids[j]] - m);
    return;
  }
  const float m = row_max(logits, n);
  if (!std::isfinite(m)) return fill_nan(weights, k);
  constexpr int kLanes = 8;
  float partial[kLanes] = {};
  int32_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] += exp_nonpositive(logits[e + l] - m);
  }
  for (; e < n; ++e) partial[0] += exp_nonpositive(logits[e] - m);
  float sum = 0.0f;
  for (float p : partial) sum += p;
  const float inv = 1.0f / sum;
  for (int32_t j = 0; j < k; ++j) weights[j] = exp_nonpositive(logits[ids[j]] - m) * inv;
}

void softmax_over_selected(const RouterSpec& spec, const float* logits, const int32_t* ids,
                           float* weights) {
  const int32_t k = spec.top_k;
  for (int32_t j = 0; j < k; ++j) {
    if (!(logits[ids[j]] < std::numeric_limits<float>::infinity())) return fill_nan(weights, k);
  }
  const float m = logits[ids[0]];
  if (!std::isfinite(m)) return fill_nan(weights, k);
  float sum = 0.0f;
  for (int32_t j = 0; j < k; ++j) sum += (weights[j] = exp_nonpositive(logits[ids[j]] - m));
  for (int32_t j = 0; j < k; ++j) weights[j] /= sum;
}

}  // namespace

std::string validate(const RouterSpec& spec) {
  const std::string e = std::to_string(spec.num_experts);
  if (spec.num_experts <= 0) return "num_experts must be >= 1, got " + e;
  if (spec.top_k <= 0 || spec.top_k > spec.num_experts) {
    return join({"top_k must be in [1, num_experts=", e, "], got ", std::to_string(spec.top_k)});
  }
  if (spec.softmax_after_topk && spec.scoring != Scoring::kSoftmax) {
    return "softmax_after_topk requires scoring='softmax'";
  }
  if (spec.softmax_after_topk && spec.has_bias) {
    return "softmax_after_topk does not take a correction_bias (add it to the logits instead)";
  }
  if (spec.num_groups < 1) return "n_group must be >= 1, got " + std::to_string(spec.num_groups);
  if (spec.num_experts % spec.num_groups != 0) {
    return join({"n_group=", std::to_string(spec.num_groups), " must divide num_experts=", e});
  }
  if (spec.topk_groups < 1 || spec.topk_groups > spec.num_groups) {
    return join({"topk_group must be in [1, n_group=", std::to_string(spec.num_groups), "], got ",
                 std::to_string(spec.topk_groups)});
  }
  const int64_t eligible =
      static_cast<int64_t>(spec.topk_groups) * (spec.num_experts / spec.num_groups);
  if (spec.top_k > eligible) {
    return join({"top_k=", std::to_string(spec.top_k), " exceeds the ", std::to_string(eligible),
                 " experts in topk_group=", std::to_string(spec.topk_groups), " groups"});
  }
  return {};
}

RoutingWorkspace::RoutingWorkspace(const RouterSpec& spec)
    : keys(spec.num_experts),
      scores(spec.num_experts),
      group_keys(spec.num_groups),
      group_ids(spec.topk_groups),
      candidates(spec.num_experts) {}

void select_top_k(const float* values, const int32_t* candidates, int32_t num_candidates,
                  int32_t k, int32_t* out_ids) {
  constexpr int32_t kInsertionLimit = 32;
  if (k <= kInsertionLimit) {
    insertion_top_k(values, candidates, num_candidates, k, out_ids);
    return;
  }
  std::vector<int32_t> order(candidates, candidates + num_candidates);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [values](int32_t a, int32_t b) {
    return ranks_before(values[a], a, values[b], b);
  });
  std::copy(order.begin(), order.begin() + k, out_ids);
}

void route_token(const RouterSpec& spec, const float* logits, const float* bias,
                 RoutingWorkspace& ws, int32_t* ids, float* weights) {
  const float* keys = compute_keys(spec, logits, bias, ws);
  const int32_t num_candidates = eligible_experts(spec, keys, ws);
  select_top_k(keys, ws.candidates.data(), num_candidates, spec.top_k, ids);

  if (spec.softmax_after_topk) {
    softmax_over_selected(spec, logits, ids, weights);
  } else if (spec.has_bias) {
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] = ws.scores[ids[j]];
  } else if (spec.scoring == Scoring::kSigmoid) {
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] = sigmoid(logits[ids[j]]);
  } else {
    softmax_weights(spec, logits, ids, weights);
  }

  if (spec.renormalize && !spec.softmax_after_topk) {
    float sum = 0.0f;
    for (int32_t j = 0; j < spec.top_k; ++j) sum += weights[j];
    const float denom = sum + 1e-20f;
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] /= denom;
  }
  if (spec.routed_scaling_factor != 1.0f) {
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] *= spec.routed_scaling_factor;
  }
}

}  // namespace expertflow::core
