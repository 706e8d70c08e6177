// Decoding of one stored code to the float32 it means, shared by the CPU loops and the CUDA
// kernels so both devices compute the very same float32 products. Branch-free selects on the
// integer code, so the CPU loops vectorise. fp8 subnormals come from an exact int-to-float
// multiply rather than a subnormal bit pattern, which a denormals-are-zero mode would misread.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <bit>
#endif

namespace expertflow::ops {

C10_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return std::bit_cast<float>(bits);
#endif
}

C10_HOST_DEVICE inline uint32_t bits_from_float(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  return std::bit_cast<uint32_t>(value);
#endif
}

inline constexpr uint32_t kFloatQuietNan = 0x7FC00000u;

// Two's-complement int4 codes of a packed byte: element 2k is the low nibble, 2k + 1 the high.
C10_HOST_DEVICE inline float int4_low(uint8_t byte) {
  return static_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(byte) << 28) >> 28);
}
C10_HOST_DEVICE inline float int4_high(uint8_t byte) {
  return static_cast<float>(static_cast<int32_t>(static_cast<int8_t>(byte)) >> 4);
}

// fp8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, no inf; 0x7F/0xFF are NaN.
C10_HOST_DEVICE inline float fp8_e4m3(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  // Normal: the exponent field moves from bias 7 to float32's 127 (add 120 << 23).
  const uint32_t normal = (mag << 20) + (120u << 23);
  // Subnormal (exponent field 0): mantissa * 2^-9, exact in float32.
  const uint32_t subnormal = bits_from_float(static_cast<float>(mag) * 0x1p-9f);
  uint32_t bits = mag < 8 ? subnormal : normal;
  bits = mag == 0x7Fu ? kFloatQuietNan : bits;
  return float_from_bits(bits | (static_cast<uint32_t>(code & 0x80u) << 24));
}

// e2m1 (a 4-bit code): sign, 2 exponent bits (bias 1), 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
C10_HOST_DEVICE inline float e2m1(uint32_t code) {
  const uint32_t mag = code & 7u;
  // Codes >= 2 are normal: exponent field (mag >> 1) moves from bias 1 to 127; code 1 is 0.5.
  uint32_t bits = (mag << 22) + (126u << 23);
  bits = mag < 2 ? (mag == 1 ? 0x3F000000u : 0u) : bits;
  return float_from_bits(bits | ((code & 8u) << 28));
}

// e8m0 scale: 2^(e - 127); 0 is 2^-127 (a float32 subnormal, as torch.pow(2, -127) gives), 0xFF
// is NaN.
C10_HOST_DEVICE inline float e8m0(uint8_t e) {
  const uint32_t bits = e == 0 ? (1u << 22) : static_cast<uint32_t>(e) << 23;
  return float_from_bits(e == 0xFF ? kFloatQuietNan : bits);
}

}  // namespace expertflow::ops
