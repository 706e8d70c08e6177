// The experts' activations in fp32, as transformers' families apply them between the up and
// the down projection (gated: the first half of the up outputs is the gate, the second half
// the up; GPT-OSS: gate and up interleaved, even columns the gate).
#include <algorithm>
#include <cmath>

#include "core/expert_kernels.h"

namespace expertflow::core {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * kSqrtHalf)); }
inline float gelu_tanh(float v) {
  return 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
}
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }  // NaN stays NaN, as in torch

template <typename Fn>
void gated(const float* pre, int64_t ld_pre, int64_t tokens, int64_t inter, float* h, Fn act) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* g = pre + t * ld_pre;
    const float* u = g + inter;
    float* out = h + t * inter;
    for (int64_t i = 0; i < inter; ++i) out[i] = act(g[i]) * u[i];
  }
}

template <typename Fn>
void ungated(const float* pre, int64_t ld_pre, int64_t tokens, int64_t inter, float* h, Fn act) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* u = pre + t * ld_pre;
    float* out = h + t * inter;
    for (int64_t i = 0; i < inter; ++i) out[i] = act(u[i]);
  }
}

// GPT-OSS: gate = min(gate, limit), up = clamp(up, -limit, limit),
// out = (up + 1) * gate * sigmoid(alpha * gate).
void gpt_oss(const float* pre, int64_t ld_pre, int64_t tokens, int64_t inter, float alpha,
             float limit, float* h) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* p = pre + t * ld_pre;
    float* out = h + t * inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float g = std::min(p[2 * i], limit);
      const float u = std::clamp(p[2 * i + 1], -limit, limit);
      const float glu = g / (1.0f + std::exp(-g * alpha));
      out[i] = (u + 1.0f) * glu;
    }
  }
}

}  // namespace

bool activation_is_gated(Activation act) {
  return act == Activation::kSiluGated || act == Activation::kGeluGated ||
         act == Activation::kGeluTanhGated || act == Activation::kGptOss;
}

void apply_activation(Activation act, const float* pre, int64_t ld_pre, int64_t tokens,
                      int64_t inter, float alpha, float limit, float* h) {
  switch (act) {
    case Activation::kSiluGated:
      return gated(pre, ld_pre, tokens, inter, h, silu);
    case Activation::kGeluGated:
      return gated(pre, ld_pre, tokens, inter, h, gelu);
    case Activation::kGeluTanhGated:
      return gated(pre, ld_pre, tokens, inter, h, gelu_tanh);
    case Activation::kGptOss:
      return gpt_oss(pre, ld_pre, tokens, inter, alpha, limit, h);
    case Activation::kSilu:
      return ungated(pre, ld_pre, tokens, inter, h, silu);
    case Activation::kGelu:
      return ungated(pre, ld_pre, tokens, inter, h, gelu);
    case Activation::kGeluTanh:
      return ungated(pre, ld_pre, tokens, inter, h, gelu_tanh);
    case Activation::kRelu:
      return ungated(pre, ld_pre, tokens, inter, h, relu);
    case Activation::kRelu2:
      return ungated(pre, ld_pre, tokens, inter, h, [](float v) {
        const float r = relu(v);
        return r * r;
      });
  }
}

}  // namespace expertflow::core
