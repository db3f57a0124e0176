// e8m0 (OCP MX "UE8M0"): an unsigned power-of-two scale, byte b means 2^(b-127); 0xFF is NaN. Used by MXFP4 blocks
// and DeepSeek's fp8 block scales. Shared by host code and CUDA kernels.
#pragma once

#include <cstdint>

#include "core/bf16.hpp"
#include "core/host_device.hpp"

namespace dsv4 {

inline constexpr uint8_t kE8m0Nan = 0xFF;

// The byte is the float's biased exponent (both biases are 127); code 0 is the float subnormal 2^-127.
DSV4_HD float e8m0_to_float(uint8_t code) {
  const uint32_t bits = code == 0 ? 0x00400000u : code == kE8m0Nan ? 0x7FC00000u : uint32_t(code) << 23;
  return bits_to_float(bits);
}

// Smallest power of two >= x, for x > 0, clamped to the finite codes [2^-127, 2^127]; x <= 0 gives code 0 and NaN
// gives the NaN code. This is DeepSeek's s = 2^ceil(log2(x)) without the log.
DSV4_HD uint8_t float_to_e8m0_ceil(float x) {
  const uint32_t bits = float_to_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return kE8m0Nan;
  if ((bits >> 31) != 0 || bits == 0) return 0;
  const uint32_t exponent = bits >> 23;
  const uint32_t mantissa = bits & 0x7FFFFFu;
  if (exponent == 0) return mantissa > 0x400000u ? 1 : 0;  // float subnormal: 2^-127 or 2^-126 covers it
  const uint32_t code = exponent + (mantissa != 0 ? 1u : 0u);
  return uint8_t(code > 254u ? 254u : code);
}

}  // namespace dsv4
