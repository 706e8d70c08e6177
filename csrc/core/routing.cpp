#include "routing.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "fast_math.h"

namespace expertflow::core {
namespace {

std::string join(std::initializer_list<std::string> parts) {
  std::string out;
  for (const auto& p : parts) out += p;
  return out;
}

// Best-first list of at most k (value, id). Candidates are offered in increasing id order, so
// an equal value never displaces an earlier (lower) id: that is the tie-break.
struct TopKList {
  int32_t k;
  float* vals;
  int32_t* ids;
  int32_t filled = 0;
  // A lower bound on the k-th best of everything that will be offered (NaN-free offers only):
  // while the list fills, only values >= floor are inserted. -inf = unknown.
  float floor = -std::numeric_limits<float>::infinity();

  // Full comparator: NaN-aware.
  void insert(float v, int32_t id) {
    int32_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && ranks_before(v, id, vals[pos - 1], ids[pos - 1])) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = v;
    ids[pos] = id;
  }

  // NaN-free: v goes after every kept value >= v (ids only grow, so earlier ids win ties).
  void insert_nan_free(float v, int32_t id) {
    int32_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = v;
    ids[pos] = id;
  }

  // Any values, NaN included: the full comparator on every candidate.
  void offer_range(const float* values, int32_t begin, int32_t end) {
    for (int32_t e = begin; e < end; ++e) {
      if (filled < k || ranks_before(values[e], e, vals[k - 1], ids[k - 1])) {
        insert(values[e], e);
      }
    }
  }

  // NaN-free values: once the list is full a candidate must beat the k-th value strictly;
  // blocks of 8 are screened with one vector compare, and for small k most are skipped.
  void offer_range_nan_free(const float* values, int32_t begin, int32_t end) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    if (filled == 0 && floor == -kInf) floor = kth_block_max(values, begin, end);
    int32_t e = begin;
    if (floor == -kInf) {
      for (; e < end && filled < k; ++e) insert_nan_free(values[e], e);
    }
    // While the list fills, only values >= floor qualify (at least k of them exist).
    const auto qualifies = [&](float v) { return filled < k ? v >= floor : v > vals[k - 1]; };
    for (; e + 8 <= end; e += 8) {
      const unsigned screened = filled < k ? greater_mask8<true>(values + e, floor)
                                           : greater_mask8(values + e, vals[k - 1]);
      for (unsigned mask = screened; mask; mask &= mask - 1) {
        const int32_t i = e + __builtin_ctz(mask);
        if (qualifies(values[i])) insert_nan_free(values[i], i);
      }
    }
    for (; e < end; ++e) {
      if (qualifies(values[e])) insert_nan_free(values[e], e);
    }
  }

  // A lower bound on the k-th best of values[begin, end), or -inf when not worth it: the k-th
  // best of the maxima of 8-blocks (those k maxima are k values at least that large). Starting
  // from it, only a few values are ever inserted, instead of every new running best.
  float kth_block_max(const float* values, int32_t begin, int32_t end) const {
    constexpr int32_t kMaxK = 32;
    const int32_t blocks = (end - begin) / 8;
    if (k < 4 || k > kMaxK || blocks < k) return -std::numeric_limits<float>::infinity();
    float best[kMaxK];
    int32_t count = 0;
    for (int32_t b = 0; b < blocks; ++b) {
      const float m = max8(values + begin + 8 * b);
      if (count == k && !(m > best[k - 1])) continue;
      int32_t pos = count < k ? count++ : k - 1;
      for (; pos > 0 && m > best[pos - 1]; --pos) best[pos] = best[pos - 1];
      best[pos] = m;
    }
    return best[k - 1];
  }

  void offer(const float* values, int32_t begin, int32_t end, bool nan_free) {
    nan_free ? offer_range_nan_free(values, begin, end) : offer_range(values, begin, end);
  }
};

// sigmoid through exp of a non-positive argument only, so it vectorises and never overflows.
float sigmoid(float x) {
  const float z = exp_nonpositive(-std::fabs(x));
  const float numerator = x >= 0.0f ? 1.0f : z;  // a select, not a branch: it vectorises
  return numerator / (1.0f + z);
}

// Fills ws.keys (and ws.scores on the bias path). Without a bias the logits themselves are the
// key: softmax and sigmoid are monotonic, so the chosen ids are the same and no ulp-level
// rounding of exp can create or break ties.
const float* compute_keys(const RouterSpec& spec, const float* logits, const float* bias,
                          const RowFacts& facts, RoutingWorkspace& ws) {
  if (!spec.has_bias || spec.softmax_after_topk) return logits;
  const int32_t n = spec.num_experts;
  if (spec.scoring == Scoring::kSigmoid) {
    for (int32_t e = 0; e < n; ++e) ws.scores[e] = sigmoid(logits[e]);
  } else {
    // As torch's softmax: a NaN anywhere makes the row NaN (and +inf gives inf - inf = NaN).
    const float m = facts.has_nan ? std::numeric_limits<float>::quiet_NaN() : facts.max;
    float sum = 0.0f;
    for (int32_t e = 0; e < n; ++e) sum += (ws.scores[e] = exp_nonpositive(logits[e] - m));
    const float inv = 1.0f / sum;
    for (int32_t e = 0; e < n; ++e) ws.scores[e] *= inv;
  }
  for (int32_t e = 0; e < n; ++e) ws.keys[e] = ws.scores[e] + bias[e];
  return ws.keys.data();
}

// Group-limited routing: fills ws.range_starts with the first expert of each eligible group
// (ascending) and returns how many; without groups one range covers every expert. `floor`
// receives a lower bound on the k-th best eligible key when the groups' best keys give one.
int32_t eligible_groups(const RouterSpec& spec, const float* keys, bool nan_free,
                        RoutingWorkspace& ws, float& floor) {
  floor = -std::numeric_limits<float>::infinity();
  if (spec.num_groups <= 1) {
    ws.range_starts[0] = 0;
    return 1;
  }
  const int32_t group_size = spec.num_experts / spec.num_groups;
  const int32_t best_of = (spec.has_bias && group_size >= 2) ? 2 : 1;
  float best[2];
  int32_t best_ids[2];
  for (int32_t g = 0; g < spec.num_groups; ++g) {
    if (nan_free) {
      // A group's key needs only the values of its two best, not their order or ids.
      best[0] = best[1] = -std::numeric_limits<float>::infinity();
      for (int32_t e = g * group_size; e < (g + 1) * group_size; ++e) {
        const float v = keys[e];
        if (v > best[0]) {
          best[1] = best[0];
          best[0] = v;
        } else if (v > best[1]) {
          best[1] = v;
        }
      }
    } else {
      TopKList top{best_of, best, best_ids};
      top.offer(keys, g * group_size, (g + 1) * group_size, nan_free);
    }
    ws.group_keys[g] = best_of == 2 ? best[0] + best[1] : best[0];
    ws.group_best[2 * g] = best[0];
    ws.group_best[2 * g + 1] = best_of == 2 ? best[1] : best[0];
  }
  TopKList groups{spec.topk_groups, ws.top_values.data(), ws.group_ids.data()};
  groups.offer(ws.group_keys.data(), 0, spec.num_groups,
               !scan_row(ws.group_keys.data(), spec.num_groups).has_nan);
  // Ascending group order keeps expert ids increasing across ranges (the tie-break needs it).
  std::sort(ws.group_ids.begin(), ws.group_ids.end());
  for (int32_t i = 0; i < spec.topk_groups; ++i) ws.range_starts[i] = ws.group_ids[i] * group_size;
  // The kept groups' best keys are distinct eligible experts: the k-th best of them bounds the
  // k-th best eligible key from below.
  if (nan_free && spec.topk_groups * best_of >= spec.top_k) {
    std::vector<float>& known = ws.floor_scratch;
    known.clear();
    for (int32_t g : ws.group_ids) {
      for (int32_t j = 0; j < best_of; ++j) known.push_back(ws.group_best[2 * g + j]);
    }
    std::nth_element(known.begin(), known.begin() + (spec.top_k - 1), known.end(),
                     std::greater<float>());
    floor = known[spec.top_k - 1];
  }
  return spec.topk_groups;
}

void fill_nan(float* weights, int32_t k) {
  std::fill(weights, weights + k, std::numeric_limits<float>::quiet_NaN());
}

// chosen: [k] logits of the chosen experts, best first (contiguous, so the exps vectorise).
void softmax_weights(const RouterSpec& spec, const float* logits, const RowFacts& facts,
                     const float* chosen, float* weights) {
  const int32_t n = spec.num_experts;
  const int32_t k = spec.top_k;
  // A NaN or +inf logit poisons torch's softmax row; so does a row of -inf.
  if (facts.has_nan || facts.has_pos_inf || !std::isfinite(facts.max)) return fill_nan(weights, k);
  if (spec.renormalize) {
    // The softmax denominator cancels in the renormalisation: only the k chosen exps are needed,
    // shifted by the largest chosen logit. The caller divides by their sum.
    const float m = chosen[0];
    if (!std::isfinite(m)) return fill_nan(weights, k);
    for (int32_t j = 0; j < k; ++j) weights[j] = exp_nonpositive(chosen[j] - m);
    return;
  }
  const float m = facts.max;
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
  for (int32_t j = 0; j < k; ++j) weights[j] = exp_nonpositive(chosen[j] - m) * inv;
}

void softmax_over_selected(const RouterSpec& spec, const float* chosen, float* weights) {
  const int32_t k = spec.top_k;
  for (int32_t j = 0; j < k; ++j) {
    if (!(chosen[j] < std::numeric_limits<float>::infinity())) return fill_nan(weights, k);
  }
  const float m = chosen[0];
  if (!std::isfinite(m)) return fill_nan(weights, k);
  float sum = 0.0f;
  for (int32_t j = 0; j < k; ++j) sum += (weights[j] = exp_nonpositive(chosen[j] - m));
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
      group_best(2 * spec.num_groups),
      group_ids(spec.topk_groups),
      range_starts(std::max(spec.topk_groups, 1)),
      top_values(std::max(spec.top_k, spec.topk_groups)) {}

void select_top_k(const float* values, int32_t num_values, int32_t k, int32_t* out_ids) {
  std::vector<float> vals(k);
  TopKList top{k, vals.data(), out_ids};
  top.offer(values, 0, num_values, !scan_row(values, num_values).has_nan);
}

void route_token(const RouterSpec& spec, const float* logits, const float* bias,
                 RoutingWorkspace& ws, int32_t* ids, float* weights) {
  const RowFacts facts = scan_row(logits, spec.num_experts);
  const float* keys = compute_keys(spec, logits, bias, facts, ws);
  const bool nan_free = keys == logits ? !facts.has_nan : !scan_row(keys, spec.num_experts).has_nan;
  float floor;
  const int32_t num_ranges = eligible_groups(spec, keys, nan_free, ws, floor);
  const int32_t range_size = spec.num_experts / spec.num_groups;
  TopKList top{spec.top_k, ws.top_values.data(), ids};
  top.floor = floor;
  for (int32_t r = 0; r < num_ranges; ++r) {
    top.offer(keys, ws.range_starts[r], ws.range_starts[r] + range_size, nan_free);
  }

  if (spec.softmax_after_topk) {
    softmax_over_selected(spec, ws.top_values.data(), weights);  // keys are the logits
  } else if (spec.has_bias) {
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] = ws.scores[ids[j]];
  } else if (spec.scoring == Scoring::kSigmoid) {
    for (int32_t j = 0; j < spec.top_k; ++j) weights[j] = sigmoid(logits[ids[j]]);
  } else {
    softmax_weights(spec, logits, facts, ws.top_values.data(), weights);
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
