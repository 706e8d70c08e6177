// The few-token path of the CPU expert (AVX2): each row's packed weights are expanded in
// registers, 32 at a time, and multiplied by every token at once, with no tile in between. At
// one token an expert is a single pass over its bytes, so this path is what must keep up with
// memory; many tokens go through the tiles of expert_linear.cpp, which expand each weight once.
#include "core/expert_decode.h"

#if EXPERTFLOW_X86_KERNELS
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

namespace expertflow::core::detail {
namespace {

EXPERTFLOW_AVX2 inline __m256 bytes8_to_floats(__m128i b) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// 16 packed bytes (32 nibbles, low first) to 4 vectors of 8 floats, mapped by `lut`.
EXPERTFLOW_AVX2 inline void nibbles32(const uint8_t* p, __m128i lut, __m256 w[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m128i a = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
  const __m128i b = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
  w[0] = bytes8_to_floats(a);
  w[1] = bytes8_to_floats(_mm_unpackhi_epi64(a, a));
  w[2] = bytes8_to_floats(b);
  w[3] = bytes8_to_floats(_mm_unpackhi_epi64(b, b));
}

// 2^(e - 127) / 2 (mxfp4's scale with e2m1's doubled values), exactly.
inline float half_e8m0(uint8_t e) {
  if (e >= 2 && e != 0xFF) {
    const uint32_t bits = static_cast<uint32_t>(e - 1) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  return e == 0xFF ? std::numeric_limits<float>::quiet_NaN()
                   : std::ldexp(0.5f, static_cast<int>(e) - 127);
}

// Each decoder: set_row(r), then load(k, w) for k a multiple of 32 gives W[r, k .. k + 32)
// up to scales: block-scaled formats (kBlockScaled) have scale(i) for columns
// [i * cols_per_scale(), (i + 1) * cols_per_scale()), and every row's sums are multiplied by
// row_scale().
// Software prefetch this far ahead of the weights being read (past the row's end it reaches
// into the next rows, which are read next): keeps more lines in flight than the hardware
// prefetcher alone at one token.
constexpr int64_t kPrefetchBytes = 1536;

EXPERTFLOW_AVX2 inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

struct Bf16 {
  static constexpr bool kBlockScaled = false;
  const PackedWeight& w;
  const uint16_t* row = nullptr;
  void prefetch(int64_t k) const { prefetch_ahead(row + k); }
  void set_row(int64_t r) { row = static_cast<const uint16_t*>(w.data) + r * w.in; }
  float row_scale() const { return 1.0f; }
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    for (int i = 0; i < 4; ++i) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 8 * i));
      v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
};

struct F16 {
  static constexpr bool kBlockScaled = false;
  const PackedWeight& w;
  const uint16_t* row = nullptr;
  void prefetch(int64_t k) const { prefetch_ahead(row + k); }
  void set_row(int64_t r) { row = static_cast<const uint16_t*>(w.data) + r * w.in; }
  float row_scale() const { return 1.0f; }
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 8 * i)));
    }
  }
};

struct Int8 {
  static constexpr bool kBlockScaled = false;
  const PackedWeight& w;
  const int8_t* row = nullptr;
  float row_scale_ = 1.0f;
  void prefetch(int64_t k) const {
    if (k % 64 == 0) prefetch_ahead(row + k);
  }
  void set_row(int64_t r) {
    row = static_cast<const int8_t*>(w.data) + r * w.in;
    row_scale_ = static_cast<const float*>(w.scale)[r];
  }
  float row_scale() const { return row_scale_; }
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    for (int i = 0; i < 2; ++i) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16 * i));
      v[2 * i] = bytes8_to_floats(b);
      v[2 * i + 1] = bytes8_to_floats(_mm_unpackhi_epi64(b, b));
    }
  }
};

struct Int4 {
  static constexpr bool kBlockScaled = true;
  const PackedWeight& w;
  const uint8_t* row = nullptr;
  const float* scales = nullptr;
  void prefetch(int64_t k) const {
    if (k % 128 == 0) prefetch_ahead(row + k / 2);
  }
  void set_row(int64_t r) {
    row = static_cast<const uint8_t*>(w.data) + r * (w.in / 2);
    scales = static_cast<const float*>(w.scale) + r * (w.in / w.group);
  }
  float row_scale() const { return 1.0f; }
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    nibbles32(row + k / 2, lut, v);
  }
  int64_t cols_per_scale() const { return w.group; }
  float scale(int64_t i) const { return scales[i]; }
};

struct Mxfp4 {
  static constexpr bool kBlockScaled = true;
  const PackedWeight& w;
  const uint8_t* row = nullptr;
  const uint8_t* scales = nullptr;
  void prefetch(int64_t k) const {
    if (k % 128 == 0) prefetch_ahead(row + k / 2);
  }
  void set_row(int64_t r) {
    row = static_cast<const uint8_t*>(w.data) + r * (w.in / 2);
    scales = static_cast<const uint8_t*>(w.scale) + r * (w.in / 32);
  }
  float row_scale() const { return 1.0f; }
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    nibbles32(row + k / 2, lut, v);
  }
  int64_t cols_per_scale() const { return 32; }
  float scale(int64_t i) const { return half_e8m0(scales[i]); }
};

struct Fp8 {
  static constexpr bool kBlockScaled = true;
  const PackedWeight& w;
  const uint8_t* row = nullptr;
  const float* scales = nullptr;
  void prefetch(int64_t k) const {
    if (k % 64 == 0) prefetch_ahead(row + k);
  }
  void set_row(int64_t r) {
    row = static_cast<const uint8_t*>(w.data) + r * w.in;
    const int64_t tiles = (w.in + w.block_cols - 1) / w.block_cols;
    scales = static_cast<const float*>(w.scale) + (r / w.block_rows) * tiles;
  }
  float row_scale() const { return 1.0f; }
  // e4m3fn bits to fp16 bits: sign to bit 15, exponent and mantissa shifted up by 7 (the
  // exponent bias 7 -> 15 is a factor 2^-8, folded into the scale); fp16 keeps e4m3's
  // subnormals exact. NaN codes (S.1111.111) are patched where a block has any.
  EXPERTFLOW_AVX2 void load(int64_t k, __m256 v[4]) const {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    for (int i = 0; i < 2; ++i) {
      const __m256i b = _mm256_cvtepu8_epi16(i == 0 ? _mm256_castsi256_si128(bytes)
                                                    : _mm256_extracti128_si256(bytes, 1));
      const __m256i h =
          _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16(-32768)),
                          _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3F80)));
      v[2 * i] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      v[2 * i + 1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    }
    const __m256i mag = _mm256_and_si256(bytes, _mm256_set1_epi8(0x7F));
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(mag, _mm256_set1_epi8(0x7F)))) {
      for (int i = 0; i < 32; ++i) {
        if ((row[k + i] & 0x7F) == 0x7F) {
          alignas(32) float f[8];
          _mm256_store_ps(f, v[i / 8]);
          f[i % 8] = std::numeric_limits<float>::quiet_NaN();
          v[i / 8] = _mm256_load_ps(f);
        }
      }
    }
  }
  int64_t cols_per_scale() const { return w.block_cols; }
  float scale(int64_t i) const { return scales[i] * 256.0f; }
};

template <int R, typename Decoder>
std::array<Decoder, R> replicate(const Decoder& d) {
  if constexpr (R == 1) {
    return {d};
  } else {
    return {d, d};
  }
}

// R rows at once (R > 1 keeps several streams of weights in flight at one or two tokens).
template <int R, int T, typename Decoder>
EXPERTFLOW_AVX2 void rows_direct(const Decoder& proto, const float* x, int64_t ldx, int64_t r,
                                 float* y, int64_t ldy) {
  constexpr int kAcc = R * T == 1 ? 4 : 2;  // independent sums per row and token
  const int64_t in = proto.w.in;
  static_assert(R == 1 || R == 2);
  std::array<Decoder, R> dec = replicate<R>(proto);
  for (int i = 0; i < R; ++i) dec[i].set_row(r + i);
  __m256 acc[R][T][kAcc];
  for (int i = 0; i < R; ++i) {
    for (int t = 0; t < T; ++t) {
      for (int a = 0; a < kAcc; ++a) acc[i][t][a] = _mm256_setzero_ps();
    }
  }
  // Block-scaled formats: one scale per `per` columns (a multiple of 32), applied to the
  // expanded weights once whatever the number of tokens.
  int64_t per = in;
  if constexpr (Decoder::kBlockScaled) per = dec[0].cols_per_scale();
  for (int64_t k0 = 0, si = 0; k0 < in; k0 += per, ++si) {
    __m256 scale[R];
    for (int i = 0; i < R; ++i) {
      float block_scale = 1.0f;
      if constexpr (Decoder::kBlockScaled) block_scale = dec[i].scale(si);
      scale[i] = _mm256_set1_ps(block_scale);
    }
    const int64_t k1 = std::min(k0 + per, in);
    for (int64_t k = k0; k < k1; k += 32) {
      for (int i = 0; i < R; ++i) {
        __m256 wv[4];
        dec[i].prefetch(k);
        dec[i].load(k, wv);
        if constexpr (Decoder::kBlockScaled) {
          for (int j = 0; j < 4; ++j) wv[j] = _mm256_mul_ps(wv[j], scale[i]);
        }
        for (int t = 0; t < T; ++t) {
          const float* xt = x + t * ldx + k;
          for (int j = 0; j < 4; ++j) {
            acc[i][t][j % kAcc] =
                _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xt + 8 * j), acc[i][t][j % kAcc]);
          }
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    const float s = dec[i].row_scale();
    for (int t = 0; t < T; ++t) {
      __m256 sum = acc[i][t][0];
      for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[i][t][a]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[t * ldy + r + i] = _mm_cvtss_f32(h) * s;
    }
  }
}

template <int T, typename Decoder>
EXPERTFLOW_AVX2 void rows_range(const Decoder& dec, const float* x, int64_t ldx, int64_t r0,
                                int64_t r1, float* y, int64_t ldy) {
  constexpr int kRows = T <= 2 ? 2 : 1;
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_direct<kRows, T>(dec, x, ldx, r, y, ldy);
  for (; r < r1; ++r) rows_direct<1, T>(dec, x, ldx, r, y, ldy);
}

template <typename Decoder>
EXPERTFLOW_AVX2 void dispatch_tokens(Decoder dec, const float* x, int64_t ldx, int64_t tokens,
                                     int64_t r0, int64_t r1, float* y, int64_t ldy) {
  switch (tokens) {
    case 1:
      return rows_range<1>(dec, x, ldx, r0, r1, y, ldy);
    case 2:
      return rows_range<2>(dec, x, ldx, r0, r1, y, ldy);
    case 3:
      return rows_range<3>(dec, x, ldx, r0, r1, y, ldy);
    default:
      return rows_range<4>(dec, x, ldx, r0, r1, y, ldy);
  }
}

}  // namespace

bool direct_path_fits(const PackedWeight& w, int64_t tokens) {
  if (w.transposed || w.in % 32 != 0 || tokens < 1 || tokens > kDirectMaxTokens) return false;
  switch (w.format) {
    case WeightFormat::kBF16:
    case WeightFormat::kF16:
    case WeightFormat::kInt8:
    case WeightFormat::kMxfp4:
      return true;
    case WeightFormat::kInt4:
      return w.group % 32 == 0;
    case WeightFormat::kFp8:
      return w.block_cols % 32 == 0;
    case WeightFormat::kF32:
      return false;  // read in place by the tile path already
  }
  return false;
}

EXPERTFLOW_AVX2 void linear_rows_direct_avx2(const PackedWeight& w, const float* x, int64_t ldx,
                                             int64_t tokens, int64_t r0, int64_t r1, float* y,
                                             int64_t ldy) {
  switch (w.format) {
    case WeightFormat::kBF16:
      return dispatch_tokens(Bf16{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kF16:
      return dispatch_tokens(F16{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kInt8:
      return dispatch_tokens(Int8{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kInt4:
      return dispatch_tokens(Int4{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kMxfp4:
      return dispatch_tokens(Mxfp4{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kFp8:
      return dispatch_tokens(Fp8{w}, x, ldx, tokens, r0, r1, y, ldy);
    case WeightFormat::kF32:
      return;
  }
}

}  // namespace expertflow::core::detail
#endif
