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

// Nibble k of a packed row (two per byte, even k in the low nibble).
DSV4_HD uint8_t e2m1_nibble(const uint8_t* packed_row, int64_t k) {
  return uint8_t((packed_row[k >> 1] >> ((k & 1) * 4)) & 0xFu);
}

// Decodes `count` values of a packed row starting at an even k, each times `factor`, into out[0, count).
// The loop body is branch-free, so the compiler vectorises it.
DSV4_HD void decode_e2m1_scaled(const uint8_t* packed, int64_t count, float factor, float* out) {
  const int64_t pairs = count / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t byte = packed[j];
    out[2 * j] = e2m1_to_float(uint8_t(byte & 0xFu)) * factor;
    out[2 * j + 1] = e2m1_to_float(uint8_t(byte >> 4)) * factor;
  }
  if (count & 1) out[count - 1] = e2m1_to_float(uint8_t(packed[pairs] & 0xFu)) * factor;
}

// Decodes a packed row of `cols` values with one factor per kBlockSize values (factor_of_block(b) for block b):
// full blocks run a loop of constant trip count, which the compiler unrolls and vectorises; a partial last block
// goes through decode_e2m1_scaled.
template <int64_t kBlockSize, typename BlockFactor>
DSV4_HD void decode_e2m1_row(const uint8_t* packed, int64_t cols, BlockFactor factor_of_block, float* out) {
  static_assert(kBlockSize % 2 == 0, "fp4 blocks must cover whole bytes");
  const int64_t full_blocks = cols / kBlockSize;
  for (int64_t b = 0; b < full_blocks; ++b) {
    const float factor = factor_of_block(b);
    const uint8_t* block_bytes = packed + b * (kBlockSize / 2);
    float* block_out = out + b * kBlockSize;
    for (int64_t j = 0; j < kBlockSize / 2; ++j) {
      const uint8_t byte = block_bytes[j];
      block_out[2 * j] = e2m1_to_float(uint8_t(byte & 0xFu)) * factor;
      block_out[2 * j + 1] = e2m1_to_float(uint8_t(byte >> 4)) * factor;
    }
  }
  const int64_t tail = cols - full_blocks * kBlockSize;
  if (tail > 0) {
    decode_e2m1_scaled(packed + full_blocks * (kBlockSize / 2), tail, factor_of_block(full_blocks),
                       out + full_blocks * kBlockSize);
  }
}

// Encodes x[0, count) / divisor into the packed row starting at an even k; an odd count leaves the last high
// nibble 0 (the row padding of odd K).
DSV4_HD void encode_e2m1_block(const float* x, int64_t count, float divisor, uint8_t* packed) {
  for (int64_t i = 0; i < count; i += 2) {
    const uint8_t low = float_to_e2m1(x[i] / divisor);
    const uint8_t high = i + 1 < count ? float_to_e2m1(x[i + 1] / divisor) : uint8_t(0);
    packed[i / 2] = uint8_t(low | (high << 4));
  }
}

}  // namespace dsv4
