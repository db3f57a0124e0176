// fp8 e4m3fn (OCP "FN" variant): 1 sign, 4 exponent (bias 7), 3 mantissa bits. No infinities; S.1111.111 is NaN;
// largest finite 448 = 1.75·2^8; smallest subnormal 2^-9. Shared by host code and CUDA kernels.
#pragma once

#include <cstdint>

#include "core/bf16.hpp"
#include "core/host_device.hpp"

namespace dsv4 {

inline constexpr float kE4m3Max = 448.0f;

// Branch-free (both cases computed, one selected) so that loops over it vectorise, and free of float subnormals,
// which cost CPUs a microcode assist per operation: normal codes are the float with the exponent re-biased from
// 7 to 127 by an integer add; subnormal codes m·2^-9 come from (1.m - 1)·2^-6.
DSV4_HD float e4m3_to_float(uint8_t code) {
  const uint32_t magnitude = code & 0x7Fu;
  const float normal = bits_to_float((magnitude << 20) + (120u << 23));
  const float subnormal = (bits_to_float(0x3F800000u | ((magnitude & 0x7u) << 20)) - 1.0f) * 0x1p-6f;
  // Select with a mask rather than ?: , which the vectoriser does not always if-convert.
  const uint32_t subnormal_mask = 0u - uint32_t(magnitude < 0x8u);
  const uint32_t value_bits =
      (float_to_bits(subnormal) & subnormal_mask) | (float_to_bits(normal) & ~subnormal_mask);
  // S.1111.111 is NaN: OR-ing a quiet NaN's exponent and top mantissa bit in keeps the body a straight line.
  const uint32_t nan_bits = (0u - uint32_t(magnitude == 0x7Fu)) & 0x7FC00000u;
  return bits_to_float(value_bits | nan_bits | (uint32_t(code & 0x80u) << 24));
}

// Round to nearest, ties to even; magnitudes beyond 448 (and ±inf) saturate to ±448; NaN -> 0x7F. -0 keeps its sign.
DSV4_HD uint8_t float_to_e4m3(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint8_t sign = uint8_t((bits >> 24) & 0x80u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return 0x7F;
  const float magnitude = bits_to_float(abs_bits);
  if (magnitude >= kE4m3Max) return uint8_t(sign | 0x7E);
  if (magnitude < 0x1p-6f) {
    // Subnormal range, step 2^-9: adding 2^14 (whose ulp is 2^-9) rounds to nearest even in the float adder, and
    // the low mantissa bits of the sum are then the code (8 = 2^-6 is the smallest normal's code, as it should be).
    const float sum = magnitude + 0x1p14f;
    return uint8_t(sign | (float_to_bits(sum) - float_to_bits(0x1p14f)));
  }
  // Normal range: keep 3 of the 23 mantissa bits, rounding half to even; a carry into the exponent is correct.
  const uint32_t rounded = abs_bits + 0x7FFFFu + ((abs_bits >> 20) & 1u);
  return uint8_t(sign | ((rounded >> 20) - (120u << 3)));
}

}  // namespace dsv4
