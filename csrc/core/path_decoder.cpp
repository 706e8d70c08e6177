#include "core/path_decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "core/fast_math.h"

// The matrix loops get an AVX2 + FMA clone, picked at load time where the CPU has them
// (x86-64-v3, which GCC dispatches on ISA features; "arch=haswell" would test the CPU model
// and miss every later one); the build itself targets baseline x86-64 so the wheel runs
// anywhere. The baseline clone keeps the same tiles in SSE registers: correct, slower.
// Not under ThreadSanitizer: it instruments the clones' resolver, which the loader runs before
// the sanitizer's runtime is initialised, and the program crashes while loading.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(__SANITIZE_THREAD__)
#define EXPERTFLOW_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EXPERTFLOW_VECTOR_CLONES
#endif

namespace expertflow::core {

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

const float* take(const std::map<std::string, WeightView>& weights, const std::string& name,
                  const std::vector<int64_t>& expected) {
  const auto it = weights.find(name);
  if (it == weights.end()) {
    throw std::invalid_argument("PathDecoder: weight '" + name + "' is missing");
  }
  if (it->second.shape != expected || it->second.data == nullptr) {
    throw std::invalid_argument("PathDecoder: weight '" + name + "' must be " +
                                shape_text(expected) + ", got " + shape_text(it->second.shape));
  }
  return it->second.data;
}

// Round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN).
uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

std::vector<float> copy_of(const float* data, int64_t count) {
  return std::vector<float>(data, data + count);
}

// 8 floats: one AVX register in the AVX2 clone, two SSE registers in the baseline one.
using Floats8 = float __attribute__((vector_size(32)));
using Bf16x8 = uint16_t __attribute__((vector_size(16)));
using Words8 = uint32_t __attribute__((vector_size(32)));

// 8 bfloat16 weights widened to floats: the high half of each float's bits. (An out
// parameter: returning a 32-byte vector from a function built without AVX changes the ABI.)
[[gnu::always_inline]] inline void load_bf16x8(const uint16_t* p, Floats8& out) {
  Bf16x8 h;
  std::memcpy(&h, p, sizeof(h));
  out = reinterpret_cast<Floats8>(__builtin_convertvector(h, Words8) << 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// y[R rows, 8 V outputs from o0] = bias + x . W for W stored transposed [in, out]: R x V
// accumulators stay in registers over the whole input loop, each weight vector loaded once for
// all R rows. R x V is chosen so that enough independent multiply-adds are in flight.
template <int R, int V>
[[gnu::always_inline]] inline void matmul_tile(const uint16_t* weight_t, const float* bias,
                                               const float* x, int32_t in, int32_t out, int32_t o0,
                                               float* y) {
  Floats8 acc[R][V];
  for (int v = 0; v < V; ++v) {
    Floats8 b;
    std::memcpy(&b, bias + o0 + 8 * v, sizeof(b));
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int32_t i = 0; i < in; ++i) {
    const uint16_t* w = weight_t + static_cast<int64_t>(i) * out + o0;
    float xi[R];
    for (int r = 0; r < R; ++r) xi[r] = x[static_cast<int64_t>(r) * in + i];
    for (int v = 0; v < V; ++v) {
      Floats8 wv;
      load_bf16x8(w + 8 * v, wv);
      for (int r = 0; r < R; ++r) acc[r][v] += xi[r] * wv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      std::memcpy(y + static_cast<int64_t>(r) * out + o0 + 8 * v, &acc[r][v], sizeof(Floats8));
    }
  }
}

// R rows of y = bias + x . W: wide tiles, then 8-wide ones, then single outputs.
template <int R, int V>
[[gnu::always_inline]] inline void matmul_rows(const uint16_t* weight_t, const float* bias,
                                               const float* x, int32_t in, int32_t out, float* y) {
  int32_t o = 0;
  for (; o + 8 * V <= out; o += 8 * V) matmul_tile<R, V>(weight_t, bias, x, in, out, o, y);
  for (; o + 8 <= out; o += 8) matmul_tile<R, 1>(weight_t, bias, x, in, out, o, y);
  for (; o < out; ++o) {
    for (int r = 0; r < R; ++r) {
      float sum = bias[o];
      for (int32_t i = 0; i < in; ++i) {
        sum += x[static_cast<int64_t>(r) * in + i] *
               bf16_to_float(weight_t[static_cast<int64_t>(i) * out + o]);
      }
      y[static_cast<int64_t>(r) * out + o] = sum;
    }
  }
}

// y[rows, out] = bias + x[rows, in] . W, W stored transposed [in, out].
EXPERTFLOW_VECTOR_CLONES
void matmul_transposed(const uint16_t* weight_t, const float* bias, const float* x, int32_t rows,
                       int32_t in, int32_t out, float* y) {
  int32_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    matmul_rows<4, 2>(weight_t, bias, x + static_cast<int64_t>(r) * in, in, out,
                      y + static_cast<int64_t>(r) * out);
  }
  const float* xr = x + static_cast<int64_t>(r) * in;
  float* yr = y + static_cast<int64_t>(r) * out;
  switch (rows - r) {
    case 3:
      matmul_rows<3, 2>(weight_t, bias, xr, in, out, yr);
      break;
    case 2:
      matmul_rows<2, 4>(weight_t, bias, xr, in, out, yr);
      break;
    case 1:
      matmul_rows<1, 8>(weight_t, bias, xr, in, out, yr);
      break;
    default:
      break;
  }
}

// a . b over n floats: 8 partial sums (a float reduction does not vectorise by itself).
float dot(const float* a, const float* b, int32_t n) {
  Floats8 acc = {};
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    Floats8 x, y;
    std::memcpy(&x, a + i, sizeof(x));
    std::memcpy(&y, b + i, sizeof(y));
    acc += x * y;
  }
  float sum = 0.0f;
  for (int k = 0; k < 8; ++k) sum += acc[k];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

}  // namespace

void PathDecoder::Linear::apply(const float* x, float* y, int32_t rows) const {
  matmul_transposed(weight_t.data(), bias.data(), x, rows, in, out, y);
}

PathDecoder::PathDecoder(const PathNetShape& shape,
                         const std::map<std::string, WeightView>& weights)
    : shape_(shape) {
  const auto& s = shape_;
  if (s.vocab_size < 1 || s.context < 1 || s.d_model < 1 || s.depth < 1 || s.heads < 1 ||
      s.ffn < 1 || s.outputs < 1 || s.d_model % s.heads != 0 || !(s.norm_eps > 0.0f) ||
      s.reuse_hidden < 0 || s.reuse_horizons < 0 ||
      (s.reuse_hidden > 0) != (s.reuse_horizons > 0)) {
    throw std::invalid_argument(
        "PathDecoder: sizes must be >= 1 with d_model divisible by heads and norm_eps > 0, got "
        "vocab_size " +
        std::to_string(s.vocab_size) + ", context " + std::to_string(s.context) + ", d_model " +
        std::to_string(s.d_model) + ", depth " + std::to_string(s.depth) + ", heads " +
        std::to_string(s.heads) + ", ffn " + std::to_string(s.ffn) + ", outputs " +
        std::to_string(s.outputs) + ", reuse_hidden " + std::to_string(s.reuse_hidden) +
        ", reuse_horizons " + std::to_string(s.reuse_horizons) +
        " (the reuse head needs both or neither)");
  }
  const int64_t d = s.d_model;
  const auto linear = [&](const std::string& weight, const std::string& bias, int32_t in,
                          int32_t out) {
    Linear l;
    l.in = in;
    l.out = out;
    const float* w = take(weights, weight, {out, in});
    l.weight_t.resize(static_cast<size_t>(in) * out);
    for (int32_t o = 0; o < out; ++o) {
      for (int32_t i = 0; i < in; ++i) {
        l.weight_t[static_cast<size_t>(i) * out + o] = float_to_bf16(w[o * in + i]);
      }
    }
    l.bias = copy_of(take(weights, bias, {out}), out);
    return l;
  };
  const auto norm = [&](const std::string& prefix) {
    return Norm{copy_of(take(weights, prefix + ".weight", {d}), d),
                copy_of(take(weights, prefix + ".bias", {d}), d)};
  };
  embed_ = copy_of(take(weights, "embed.weight", {s.vocab_size, d}), s.vocab_size * d);
  position_ = copy_of(take(weights, "position.weight", {s.context, d}), s.context * d);
  for (int32_t i = 0; i < s.depth; ++i) {
    const std::string p = "stack.layers." + std::to_string(i) + ".";
    Block b;
    b.norm1 = norm(p + "norm1");
    b.norm2 = norm(p + "norm2");
    b.qkv = linear(p + "self_attn.in_proj_weight", p + "self_attn.in_proj_bias", s.d_model,
                   3 * s.d_model);
    b.out = linear(p + "self_attn.out_proj.weight", p + "self_attn.out_proj.bias", s.d_model,
                   s.d_model);
    b.up = linear(p + "linear1.weight", p + "linear1.bias", s.d_model, s.ffn);
    b.down = linear(p + "linear2.weight", p + "linear2.bias", s.ffn, s.d_model);
    blocks_.push_back(std::move(b));
  }
  final_norm_ = norm("norm");
  if (s.use_previous) {
    previous_ = linear("previous.weight", "previous.bias", s.outputs, s.d_model);
    fuse_up_ = linear("fuse.0.weight", "fuse.0.bias", s.d_model, 2 * s.d_model);
    fuse_down_ = linear("fuse.2.weight", "fuse.2.bias", 2 * s.d_model, s.d_model);
  }
  head_ = linear("head.weight", "head.bias", s.d_model, s.outputs);
  if (has_reuse()) {
    reuse_up_ = linear("reuse.0.weight", "reuse.0.bias", s.d_model, s.reuse_hidden);
    reuse_down_ =
        linear("reuse.2.weight", "reuse.2.bias", s.reuse_hidden, s.reuse_horizons * s.outputs);
  }
}

void PathDecoder::layer_norm(const Norm& n, const float* x, float* y) const {
  const int32_t d = shape_.d_model;
  double mean = 0.0, var = 0.0;
  for (int32_t i = 0; i < d; ++i) mean += x[i];
  mean /= d;
  for (int32_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(var / d + shape_.norm_eps));
  for (int32_t i = 0; i < d; ++i) {
    y[i] = (x[i] - static_cast<float>(mean)) * inv * n.weight[i] + n.bias[i];
  }
}

// Multi-head attention of one new token's query over its window's tokens [0, position] of
// one layer. scratch: [position + 1] floats. out: [d_model], heads concatenated.
void PathDecoder::attend(int32_t layer, const NewToken& token, const float* q, float* scratch,
                         float* out) const {
  const int32_t d = shape_.d_model, dh = d / shape_.heads;
  const int64_t stride = kv_floats_per_token();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const float* keys = token.kv + static_cast<int64_t>(layer) * 2 * d;
  const float* values = keys + d;
  for (int32_t h = 0; h < shape_.heads; ++h) {
    const float* qh = q + h * dh;
    float top = -INFINITY;
    for (int32_t t = 0; t <= token.position; ++t) {
      const float* k = keys + t * stride + h * dh;
      scratch[t] = dot(qh, k, dh) * scale;
      top = std::max(top, scratch[t]);
    }
    float total = 0.0f;
    for (int32_t t = 0; t <= token.position; ++t) {
      total += scratch[t] = exp_nonpositive(scratch[t] - top);
    }
    float* oh = out + h * dh;
    std::fill(oh, oh + dh, 0.0f);
    for (int32_t t = 0; t <= token.position; ++t) {
      const float p = scratch[t] / total;
      const float* v = values + t * stride + h * dh;
      for (int32_t i = 0; i < dh; ++i) oh[i] += p * v[i];
    }
  }
}

void PathDecoder::extend(const std::vector<NewToken>& tokens, float* features) const {
  const auto& s = shape_;
  for (const NewToken& t : tokens) {
    if (t.id < 0 || t.id >= s.vocab_size) {
      throw std::invalid_argument("PathDecoder.extend: token id " + std::to_string(t.id) +
                                  " is outside the vocabulary [0, " + std::to_string(s.vocab_size) +
                                  ")");
    }
    if (t.position < 0 || t.position >= s.context || t.kv == nullptr) {
      throw std::invalid_argument("PathDecoder.extend: position " + std::to_string(t.position) +
                                  " is outside the context [0, " + std::to_string(s.context) +
                                  ") or has no keys/values buffer");
    }
  }
  // Blocks of tokens small enough that their activations stay in cache while every weight
  // row passes over them.
  constexpr int32_t kBlock = 16;
  const auto n = static_cast<int32_t>(tokens.size());
  for (int32_t first = 0; first < n; first += kBlock) {
    extend_block(tokens.data() + first, std::min(kBlock, n - first),
                 features + static_cast<int64_t>(first) * s.d_model);
  }
}

// Tokens of one window within a block come in position order, and each layer writes every
// token's keys/values before any of them attends: a token sees its predecessors' rows.
void PathDecoder::extend_block(const NewToken* tokens, int32_t count, float* features) const {
  const auto& s = shape_;
  const int32_t d = s.d_model;
  const int64_t stride = kv_floats_per_token();
  std::vector<float> x(count * d), h(count * d), qkv(count * 3 * d), attn(count * d),
      ffn(static_cast<int64_t>(count) * s.ffn), scores(s.context);
  for (int32_t j = 0; j < count; ++j) {
    const float* e = embed_.data() + tokens[j].id * d;
    const float* p = position_.data() + static_cast<int64_t>(tokens[j].position) * d;
    for (int32_t i = 0; i < d; ++i) x[j * d + i] = e[i] + p[i];
  }
  for (int32_t l = 0; l < s.depth; ++l) {
    const Block& b = blocks_[l];
    for (int32_t j = 0; j < count; ++j) layer_norm(b.norm1, &x[j * d], &h[j * d]);
    b.qkv.apply(h.data(), qkv.data(), count);
    for (int32_t j = 0; j < count; ++j) {
      float* row = tokens[j].kv + tokens[j].position * stride + static_cast<int64_t>(l) * 2 * d;
      std::copy(&qkv[j * 3 * d + d], &qkv[j * 3 * d + 3 * d], row);  // this layer's k, v
    }
    for (int32_t j = 0; j < count; ++j) {
      attend(l, tokens[j], &qkv[j * 3 * d], scores.data(), &attn[j * d]);
    }
    b.out.apply(attn.data(), h.data(), count);
    for (int32_t i = 0; i < count * d; ++i) x[i] += h[i];
    for (int32_t j = 0; j < count; ++j) layer_norm(b.norm2, &x[j * d], &h[j * d]);
    b.up.apply(h.data(), ffn.data(), count);
    for (float& v : ffn) v = std::max(v, 0.0f);  // ReLU, nn.TransformerEncoderLayer's default
    b.down.apply(ffn.data(), h.data(), count);
    for (int32_t i = 0; i < count * d; ++i) x[i] += h[i];
  }
  for (int32_t j = 0; j < count; ++j) layer_norm(final_norm_, &x[j * d], features + j * d);
}

void PathDecoder::scores(const float* features, const float* previous, int32_t rows, float* out,
                         float* reuse) const {
  if (reuse != nullptr && !has_reuse()) {
    throw std::invalid_argument(
        "PathDecoder: reuse scores asked of a decoder without a reuse head");
  }
  const int64_t d = shape_.d_model, n = rows * d;
  std::vector<float> x(features, features + n);
  if (shape_.use_previous) {
    std::vector<float> zeros, h(n), wide(2 * n);
    if (previous == nullptr) {
      zeros.assign(static_cast<size_t>(rows) * shape_.outputs, 0.0f);
      previous = zeros.data();
    }
    previous_.apply(previous, h.data(), rows);
    for (int64_t i = 0; i < n; ++i) x[i] += h[i];
    fuse_up_.apply(x.data(), wide.data(), rows);
    for (float& v : wide) v = gelu(v);
    fuse_down_.apply(wide.data(), h.data(), rows);
    for (int64_t i = 0; i < n; ++i) x[i] += h[i];
  }
  head_.apply(x.data(), out, rows);
  const int64_t outputs = shape_.outputs;
  for (int64_t o = 0; o < rows * outputs; ++o) out[o] = 1.0f / (1.0f + std::exp(-out[o]));
  if (reuse == nullptr) return;
  const int64_t horizons = shape_.reuse_horizons;
  std::vector<float> hidden(static_cast<size_t>(rows) * shape_.reuse_hidden),
      logits(static_cast<size_t>(rows * horizons * outputs));
  reuse_up_.apply(x.data(), hidden.data(), rows);
  for (float& v : hidden) v = gelu(v);
  reuse_down_.apply(hidden.data(), logits.data(), rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = &logits[r * horizons * outputs];
    for (int64_t o = 0; o < outputs; ++o) {
      float sum = 0.0f;
      for (int64_t h = 0; h < horizons; ++h) sum += 1.0f / (1.0f + std::exp(-row[h * outputs + o]));
      reuse[r * outputs + o] = sum / static_cast<float>(horizons);
    }
  }
}

}  // namespace expertflow::core
