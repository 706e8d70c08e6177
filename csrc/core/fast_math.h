// Branch-free float math that compilers vectorise; accurate to about 1 ulp.
#pragma once

#include <cstdint>
#include <cstring>

namespace expertflow::core {

// exp(x) for x <= 0 (a softmax shifted by its max). Cephes-style: x = n ln2 + r,
// exp(r) by a degree-6 polynomial, 2^n by building the exponent bits. Inputs below the
// float range (including -inf) give 0; NaN gives NaN.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -87.33654f;
  const bool underflow = x < kMin;
  const bool nan = x != x;
  const float input = x;
  x = (underflow || nan) ? 0.0f : x;  // keeps the float->int conversion below in range
  const float n = static_cast<float>(static_cast<int32_t>(x * kLog2e - 0.5f));
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return nan ? input : (underflow ? 0.0f : p * scale);
}

}  // namespace expertflow::core

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace expertflow::core {

// Bit l (l < 8) set when v[l] > threshold, or v[l] >= threshold with kOrEqual. NaN never.
template <bool kOrEqual = false>
inline unsigned greater_mask8(const float* v, float threshold) {
#if defined(__SSE2__)
  const __m128 t = _mm_set1_ps(threshold);
  const auto cmp = [&t](__m128 x) { return kOrEqual ? _mm_cmpge_ps(x, t) : _mm_cmpgt_ps(x, t); };
  const unsigned lo = static_cast<unsigned>(_mm_movemask_ps(cmp(_mm_loadu_ps(v))));
  const unsigned hi = static_cast<unsigned>(_mm_movemask_ps(cmp(_mm_loadu_ps(v + 4))));
  return lo | (hi << 4);
#else
  unsigned mask = 0;
  for (int l = 0; l < 8; ++l) {
    mask |= static_cast<unsigned>(kOrEqual ? v[l] >= threshold : v[l] > threshold) << l;
  }
  return mask;
#endif
}

// Largest of v[0..8), for NaN-free input.
inline float max8(const float* v) {
#if defined(__SSE2__)
  __m128 m = _mm_max_ps(_mm_loadu_ps(v), _mm_loadu_ps(v + 4));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(m);
#else
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}

// One pass over a row: its maximum over the non-NaN values (-inf when there are none), and
// whether it holds a NaN or a +inf.
struct RowFacts {
  float max;
  bool has_nan;
  bool has_pos_inf;
};

inline RowFacts scan_row(const float* v, int32_t n) {
  constexpr float kInf = __builtin_inff();
  int32_t e = 0;
  RowFacts facts{-kInf, false, false};
#if defined(__SSE2__)
  __m128 mx = _mm_set1_ps(-kInf);
  __m128 nan = _mm_setzero_ps();
  __m128 inf = _mm_setzero_ps();
  const __m128 pos_inf = _mm_set1_ps(kInf);
  for (; e + 4 <= n; e += 4) {
    const __m128 x = _mm_loadu_ps(v + e);
    nan = _mm_or_ps(nan, _mm_cmpunord_ps(x, x));
    inf = _mm_or_ps(inf, _mm_cmpeq_ps(x, pos_inf));
    mx = _mm_max_ps(x, mx);  // a NaN in x yields mx: NaN lanes are ignored
  }
  float lanes[4];
  _mm_storeu_ps(lanes, mx);
  for (float l : lanes) facts.max = l > facts.max ? l : facts.max;
  facts.has_nan = _mm_movemask_ps(nan) != 0;
  facts.has_pos_inf = _mm_movemask_ps(inf) != 0;
#endif
  for (; e < n; ++e) {
    facts.has_nan |= v[e] != v[e];
    facts.has_pos_inf |= v[e] == kInf;
    facts.max = v[e] > facts.max ? v[e] : facts.max;
  }
  return facts;
}

}  // namespace expertflow::core
