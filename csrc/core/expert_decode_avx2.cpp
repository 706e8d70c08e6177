// AVX2 + F16C decoders of packed expert weights to fp32 tiles. Compiled with target
// attributes, called only where the CPU has the instructions (expert_kernels_use_avx2).
#include "core/expert_decode.h"

#if EXPERTFLOW_X86_KERNELS
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace expertflow::core::detail {
namespace {

EXPERTFLOW_AVX2 inline __m128i load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm_cvtsi32_si128(v);
}

// 16 packed bytes to 32 signed bytes in element order (low nibble first), mapped by `lut`.
EXPERTFLOW_AVX2 inline void nibbles_to_bytes(__m128i v, __m128i lut, __m128i* first,
                                             __m128i* second) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  *first = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
  *second = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
}

// 16 signed bytes times `scale` to 16 floats.
EXPERTFLOW_AVX2 inline void bytes_to_floats(__m128i b, __m256 scale, float* dst) {
  const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  _mm256_storeu_ps(dst, _mm256_mul_ps(a, scale));
  _mm256_storeu_ps(dst + 8, _mm256_mul_ps(c, scale));
}

EXPERTFLOW_AVX2 int64_t row_bf16(const uint16_t* src, int64_t kc, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= kc; j += 8) {
    const __m256i v =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  return j;
}

EXPERTFLOW_AVX2 int64_t row_f16(const uint16_t* src, int64_t kc, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= kc; j += 8) {
    _mm256_storeu_ps(dst + j,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  return j;
}

EXPERTFLOW_AVX2 int64_t row_int8(const int8_t* src, float scale, int64_t kc, float* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= kc; j += 16) {
    bytes_to_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)), s, dst + j);
  }
  return j;
}

// int4 codes from column k0 (even) of a row; scales of groups of `group` columns (a multiple
// of 8). Returns how many columns it decoded.
EXPERTFLOW_AVX2 int64_t row_int4(const uint8_t* row, const float* scales, int64_t group, int64_t k0,
                                 int64_t kc, float* dst) {
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  int64_t j = 0;
  if (group % 32 == 0) {
    for (; j + 32 <= kc; j += 32) {
      const int64_t k = k0 + j;
      const __m256 s = _mm256_set1_ps(scales[k / group]);
      __m128i a, b;
      nibbles_to_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)), lut, &a, &b);
      bytes_to_floats(a, s, dst + j);
      bytes_to_floats(b, s, dst + j + 16);
    }
  }
  if (group % 8 != 0) return j;
  for (; j + 8 <= kc; j += 8) {
    const int64_t k = k0 + j;
    __m128i a, b;
    nibbles_to_bytes(load4(row + k / 2), lut, &a, &b);
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(v, _mm256_set1_ps(scales[k / group])));
  }
  return j;
}

// e4m3fn to fp16 bits (exponent bias 7 -> 15 is a factor 2^-8, folded into the scale);
// NaN codes (S.1111.111) are patched afterwards.
EXPERTFLOW_AVX2 int64_t row_fp8(const uint8_t* row, const float* scales, int64_t block_cols,
                                int64_t k0, int64_t kc, float* dst) {
  if (block_cols % 8 != 0) return 0;
  const __m128i mag_mask = _mm_set1_epi16(0x7F);
  const __m128i sign_mask = _mm_set1_epi16(0x80);
  int64_t j = 0;
  for (; j + 8 <= kc; j += 8) {
    const int64_t k = k0 + j;
    const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
    const __m128i mag = _mm_and_si128(v, mag_mask);
    const __m128i h =
        _mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, sign_mask), 8), _mm_slli_epi16(mag, 7));
    const __m256 s = _mm256_set1_ps(scales[k / block_cols] * 256.0f);
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtph_ps(h), s));
    if (_mm_movemask_epi8(_mm_cmpeq_epi16(mag, mag_mask))) {
      for (int i = 0; i < 8; ++i) {
        if ((row[k + i] & 0x7F) == 0x7F) dst[j + i] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
  return j;
}

EXPERTFLOW_AVX2 int64_t row_mxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t k0,
                                  int64_t kc, float* dst) {
  // e2m1 values times 2 (0, 0.5, 1, 1.5, 2, 3, 4, 6): the scale carries the 1/2.
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  int64_t j = 0;
  for (; j + 32 <= kc; j += 32) {
    const int64_t b = (k0 + j) / 32;
    const uint8_t e = scales[b];
    const float scale = e == 0xFF ? std::numeric_limits<float>::quiet_NaN()
                                  : std::ldexp(0.5f, static_cast<int>(e) - 127);
    const __m256 s = _mm256_set1_ps(scale);
    __m128i a, c;
    nibbles_to_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + b * 16)), lut, &a,
                     &c);
    bytes_to_floats(a, s, dst + j);
    bytes_to_floats(c, s, dst + j + 16);
  }
  return j;
}

// One row's columns [k0, k0 + kc) of a row-major weight; returns how many it decoded.
EXPERTFLOW_AVX2 int64_t decode_row(const PackedWeight& w, int64_t r, int64_t k0, int64_t kc,
                                   float* dst) {
  switch (w.format) {
    case WeightFormat::kF32:
      std::memcpy(dst, static_cast<const float*>(w.data) + r * w.in + k0, kc * sizeof(float));
      return kc;
    case WeightFormat::kBF16:
      return row_bf16(static_cast<const uint16_t*>(w.data) + r * w.in + k0, kc, dst);
    case WeightFormat::kF16:
      return row_f16(static_cast<const uint16_t*>(w.data) + r * w.in + k0, kc, dst);
    case WeightFormat::kInt8:
      return row_int8(static_cast<const int8_t*>(w.data) + r * w.in + k0,
                      static_cast<const float*>(w.scale)[r], kc, dst);
    case WeightFormat::kInt4:
      return row_int4(static_cast<const uint8_t*>(w.data) + r * (w.in / 2),
                      static_cast<const float*>(w.scale) + r * (w.in / w.group), w.group, k0, kc,
                      dst);
    case WeightFormat::kFp8: {
      const int64_t tiles = (w.in + w.block_cols - 1) / w.block_cols;
      return row_fp8(static_cast<const uint8_t*>(w.data) + r * w.in,
                     static_cast<const float*>(w.scale) + (r / w.block_rows) * tiles, w.block_cols,
                     k0, kc, dst);
    }
    case WeightFormat::kMxfp4:
      return row_mxfp4(static_cast<const uint8_t*>(w.data) + r * (w.in / 2),
                       static_cast<const uint8_t*>(w.scale) + r * (w.in / 32), k0, kc, dst);
  }
  return 0;
}

// A transposed float weight: stored rows are the logical columns.
template <typename Convert>
void decode_transposed(const PackedWeight& w, int64_t r0, int64_t nr, int64_t k0, int64_t kc,
                       float* tile, int64_t ldt, Convert convert) {
  for (int64_t j = 0; j < kc; ++j) {
    const int64_t base = (k0 + j) * w.out + r0;
    for (int64_t i = 0; i < nr; ++i) tile[i * ldt + j] = convert(base + i);
  }
}

}  // namespace

EXPERTFLOW_AVX2 void decode_tile_avx2(const PackedWeight& w, int64_t r0, int64_t nr, int64_t k0,
                                      int64_t kc, float* tile, int64_t ldt) {
  if (w.transposed) {
    const auto* f32 = static_cast<const float*>(w.data);
    const auto* u16 = static_cast<const uint16_t*>(w.data);
    if (w.format == WeightFormat::kF32) {
      decode_transposed(w, r0, nr, k0, kc, tile, ldt, [&](int64_t i) { return f32[i]; });
    } else if (w.format == WeightFormat::kBF16) {
      decode_transposed(w, r0, nr, k0, kc, tile, ldt,
                        [&](int64_t i) { return bf16_to_float(u16[i]); });
    } else {
      decode_tile_scalar(w, r0, nr, k0, kc, tile, ldt);
    }
    return;
  }
  for (int64_t i = 0; i < nr; ++i) {
    float* dst = tile + i * ldt;
    const int64_t done = decode_row(w, r0 + i, k0, kc, dst);
    for (int64_t j = done; j < kc; ++j) dst[j] = weight_at(w, r0 + i, k0 + j);
  }
}

}  // namespace expertflow::core::detail
#endif
