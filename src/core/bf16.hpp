// bfloat16: the top 16 bits of an IEEE float (8-bit exponent, 7-bit mantissa). Shared by host code and CUDA kernels.
// Also home of the float <-> bit-pattern helpers that the other scalar format headers build on.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/host_device.hpp"

namespace dsv4 {

// Bit pattern of a float and back. memcpy on the host (compiles to a register move); intrinsics on the device.
DSV4_HD uint32_t float_to_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

DSV4_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

DSV4_HD float bf16_to_float(uint16_t bits) { return bits_to_float(uint32_t(bits) << 16); }

// Round to nearest, ties to even. Overflow rounds to ±inf as IEEE requires; NaN stays NaN (made quiet, so that
// truncating the payload can never turn it into an infinity).
DSV4_HD uint16_t float_to_bf16(float x) {
  const uint32_t bits = float_to_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x0040u);
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding_bias) >> 16);
}

// x rounded to the nearest bf16 value, kept as float (what storing to bf16 and loading back gives).
DSV4_HD float round_to_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

}  // namespace dsv4
