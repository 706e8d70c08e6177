// Expanding packed expert weights to fp32: the portable element-wise definition (weight_at,
// the formats of python/expertflow/formats) and the scalar tile decoder.
#include "core/expert_decode.h"

#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/expert_kernels.h"

namespace expertflow::core {

float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float half_to_float(uint16_t v) {
  const uint32_t exp = (v >> 10) & 0x1Fu;
  const uint32_t mant = v & 0x3FFu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    f = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    const uint32_t bits = ((exp + 112u) << 23) | (mant << 13);
    std::memcpy(&f, &bits, sizeof f);
  }
  return (v & 0x8000u) ? -f : f;
}

namespace {

float fp8_decode(uint8_t v) {
  const int exp = (v >> 3) & 0xF;
  const int mant = v & 7;
  float f;
  if ((v & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -9);
  } else {
    f = std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
  }
  return (v & 0x80) ? -f : f;
}

const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8_decode(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

constexpr float kFp4Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float e8m0_to_float(uint8_t e) {
  if (e == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(e) - 127);
}

int int4_code(uint8_t byte, int64_t k) {
  const int nib = (k & 1) ? (byte >> 4) : (byte & 0xF);
  return nib >= 8 ? nib - 16 : nib;
}

}  // namespace

float fp8_e4m3_to_float(uint8_t v) { return fp8_table()[v]; }

namespace detail {

float weight_at(const PackedWeight& w, int64_t r, int64_t k) {
  const int64_t flat = w.transposed ? k * w.out + r : r * w.in + k;
  switch (w.format) {
    case WeightFormat::kF32:
      return static_cast<const float*>(w.data)[flat];
    case WeightFormat::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(w.data)[flat]);
    case WeightFormat::kF16:
      return half_to_float(static_cast<const uint16_t*>(w.data)[flat]);
    case WeightFormat::kInt8:
      return static_cast<float>(static_cast<const int8_t*>(w.data)[flat]) *
             static_cast<const float*>(w.scale)[r];
    case WeightFormat::kInt4: {
      const uint8_t byte = static_cast<const uint8_t*>(w.data)[r * (w.in / 2) + k / 2];
      const float s = static_cast<const float*>(w.scale)[r * (w.in / w.group) + k / w.group];
      return static_cast<float>(int4_code(byte, k)) * s;
    }
    case WeightFormat::kFp8: {
      const int64_t tiles = (w.in + w.block_cols - 1) / w.block_cols;
      const float s =
          static_cast<const float*>(w.scale)[(r / w.block_rows) * tiles + k / w.block_cols];
      return fp8_e4m3_to_float(static_cast<const uint8_t*>(w.data)[flat]) * s;
    }
    case WeightFormat::kMxfp4: {
      const int64_t blocks = w.in / 32;
      const int64_t b = r * blocks + k / 32;
      const uint8_t byte = static_cast<const uint8_t*>(w.data)[b * 16 + (k % 32) / 2];
      const int nib = (k & 1) ? (byte >> 4) : (byte & 0xF);
      return kFp4Values[nib] * e8m0_to_float(static_cast<const uint8_t*>(w.scale)[b]);
    }
  }
  return 0.0f;
}

void decode_tile_scalar(const PackedWeight& w, int64_t r0, int64_t nr, int64_t k0, int64_t kc,
                        float* tile, int64_t ldt) {
  if (w.transposed) {  // k outer: contiguous reads along the stored rows
    for (int64_t j = 0; j < kc; ++j) {
      for (int64_t i = 0; i < nr; ++i) tile[i * ldt + j] = weight_at(w, r0 + i, k0 + j);
    }
    return;
  }
  for (int64_t i = 0; i < nr; ++i) {
    for (int64_t j = 0; j < kc; ++j) tile[i * ldt + j] = weight_at(w, r0 + i, k0 + j);
  }
}

}  // namespace detail
}  // namespace expertflow::core
