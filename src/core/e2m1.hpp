// fp4 e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; no inf or NaN.
// Stored two per byte along K, the even element in the low nibble. Shared by host code and CUDA kernels.
#pragma once

#include <cstdint>

#include "core/bf16.hpp"
#include "core/host_device.hpp"

namespace dsv4 {

inline constexpr float kE2m1Max = 6.0f;

// Branch-free, same trick as e4m3: the 3 magnitude bits at the top of a float's exponent and mantissa, times 2^126
// (exact), give the e2m1 value including its subnormal 0.5. Nibble 0x8 is -0.
DSV4_HD float e2m1_to_float(uint8_t nibble) {
  const uint32_t magnitude = nibble & 0x7u;
  const float value = bits_to_float(magnitude << 22) * 0x1p126f;
  return bits_to_float(float_to_bits(value) | (uint32_t(nibble & 0x8u) << 28));
}

// Round to nearest, ties to even (the tie points 0.25, 0.75, ... go to the code with mantissa bit 0); magnitudes
// beyond 6 saturate to ±6. The sum of threshold comparisons is the magnitude code, so no branch or table is needed.
// NaN has no e2m1 code and gives 0 (with its sign bit).
DSV4_HD uint8_t float_to_e2m1(float x) {
  const uint32_t bits = float_to_bits(x);
  const float a = bits_to_float(bits & 0x7FFFFFFFu);
  const uint32_t magnitude = uint32_t(a > 0.25f) + uint32_t(a >= 0.75f) + uint32_t(a > 1.25f) + uint32_t(a >= 1.75f) +
                             uint32_t(a > 2.5f) + uint32_t(a >= 3.5f) + uint32_t(a > 5.0f);
  return uint8_t(((bits >> 28) & 0x8u) | magnitude);
}

}  // namespace dsv4
