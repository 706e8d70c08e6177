// Branch-free float math that compilers vectorise; accurate to about 1 ulp.
#pragma once

#include <cstdint>
#include <cstring>

namespace expertflow::core {

// exp(x) for x <= 0 (a softmax shifted by its max). Cephes-style: x = n ln2 + r,
// exp(r) by a degree-6 polynomial, 2^n by building the exponent bits. Inputs below the
// float range (including -inf) give 0. NaN inputs are the caller's business.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -87.33654f;
  const bool underflow = x < kMin;
  x = underflow ? 0.0f : x;
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
  return underflow ? 0.0f : p * scale;
}

}  // namespace expertflow::core
