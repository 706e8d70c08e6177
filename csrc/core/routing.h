// Router scoring and top-k selection for one token, on plain float arrays.
//
// This is the reference semantics of expertflow::topk_gating; the CPU op calls it per token and
// the CUDA kernel reproduces it. No torch, CUDA or Python headers here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// Lets the CUDA kernels share the selection order below; core includes no CUDA header.
#if defined(__CUDACC__)
#define EXPERTFLOW_HOST_DEVICE __host__ __device__
#else
#define EXPERTFLOW_HOST_DEVICE
#endif

namespace expertflow::core {

enum class Scoring { kSoftmax, kSigmoid };

// What a model family's router does, as parameters.
struct RouterSpec {
  int32_t num_experts = 0;
  int32_t top_k = 0;
  Scoring scoring = Scoring::kSoftmax;
  bool renormalize = true;  // divide the k weights by their sum
  bool has_bias = false;    // a correction bias is added to scores for selection only
  int32_t num_groups = 1;   // 1 = no group-limited routing
  int32_t topk_groups = 1;  // groups kept when num_groups > 1
  float routed_scaling_factor = 1.0f;
  bool softmax_after_topk = false;  // GPT-OSS: top-k on logits, softmax over the k
};

// Empty when the spec is valid, else a message naming the offending argument.
std::string validate(const RouterSpec& spec);

// Per-thread scratch space, reused across tokens.
struct RoutingWorkspace {
  explicit RoutingWorkspace(const RouterSpec& spec);
  std::vector<float> keys;            // [E] selection key of each expert
  std::vector<float> scores;          // [E] unbiased scores (bias path only)
  std::vector<float> group_keys;      // [G]
  std::vector<float> group_best;      // [2G] each group's two best keys
  std::vector<float> floor_scratch;   // [<= 2 * topk_groups]
  std::vector<int32_t> group_ids;     // [topk_groups]
  std::vector<int32_t> range_starts;  // [topk_groups] first expert of each eligible group
  std::vector<float> top_values;      // [max(k, topk_groups)] keys of the list being selected
};

// True when (a, id_a) is selected before (b, id_b): larger value first, NaN after everything
// (including -inf), equal values by lowest id. A total order, so selection is deterministic.
EXPERTFLOW_HOST_DEVICE inline bool ranks_before(float a, int32_t id_a, float b, int32_t id_b) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return id_a < id_b;
}

// Writes the indices of the `k` best of `values[0, num_values)` (ranks_before order) into
// `out_ids`, best first. Requires k <= num_values.
void select_top_k(const float* values, int32_t num_values, int32_t k, int32_t* out_ids);

// Routes one token. logits: [E]; bias: [E] or nullptr (must match spec.has_bias);
// ids: [k] output, best first; weights: [k] output. The spec must be valid.
//
// Semantics (see README "topk_gating"):
//   score    = softmax(logits) or sigmoid(logits), in fp32
//   key      = score + bias (with bias) else score; selection runs on key
//   groups   = experts split into num_groups equal groups; a group's key is its best key
//              (no bias, DeepSeek-V2) or the sum of its two best keys (with bias, DeepSeek-V3);
//              only experts in the topk_groups best groups are eligible
//   weights  = unbiased scores of the chosen experts, optionally renormalised
//              (sum + 1e-20), then multiplied by routed_scaling_factor
//   softmax_after_topk: select on raw logits, weights = softmax over the k chosen logits
// NaN/Inf: ids are always k distinct experts in [0, E); NaN keys are chosen last. Weights follow
// IEEE arithmetic like the eager torch computation (a NaN or +inf logit in a softmax row, or an
// all -inf row, gives NaN weights).
void route_token(const RouterSpec& spec, const float* logits, const float* bias,
                 RoutingWorkspace& ws, int32_t* ids, float* weights);

}  // namespace expertflow::core
