// fp4 e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6; no inf or NaN.
// Stored two per byte along K, the even element in the low nibble. Shared by host code and CUDA kernels.
#pragma once

#include <cstdint>

#include "core/bf16.hpp"
#include "core/host_device.hpp"

namespace dsv4 {

inline constexpr float kE2m1Max = 6.0f;

// Branch-free and free of float subnormals, as e4m3_to_float: codes 2..7 are the float with the exponent
// re-biased from 1 to 127 by an integer add; codes 0 and 1 (0 and 0.5) come from 1.m - 1. Nibble 0x8 is -0.
DSV4_HD float e2m1_to_float(uint8_t nibble) {
  const uint32_t magnitude = nibble & 0x7u;
  const float normal = bits_to_float((magnitude << 22) + (126u << 23));
  const float subnormal = bits_to_float(0x3F800000u | ((magnitude & 0x1u) << 22)) - 1.0f;
  // Select with a mask rather than ?: , which the vectoriser does not always if-convert.
  const uint32_t subnormal_mask = 0u - uint32_t(magnitude < 0x2u);
  const uint32_t value_bits =
      (float_to_bits(subnormal) & subnormal_mask) | (float_to_bits(normal) & ~subnormal_mask);
  return bits_to_float(value_bits | (uint32_t(nibble & 0x8u) << 28));
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

// Decodes a packed row of `cols` values with one factor per kBlockSize values (factor_of_block(b) for block b).
// Two passes over the (cache-resident) row: one long decode loop, then one multiply loop of constant trip count
// per block; each vectorises on its own, where a fused loop of 8 or 16 bytes per block does not reliably.
template <int64_t kBlockSize, typename BlockFactor>
DSV4_HD void decode_e2m1_row(const uint8_t* packed, int64_t cols, BlockFactor factor_of_block, float* out) {
  static_assert(kBlockSize % 2 == 0, "fp4 blocks must cover whole bytes");
  decode_e2m1_scaled(packed, cols, 1.0f, out);
  const int64_t full_blocks = cols / kBlockSize;
  for (int64_t b = 0; b < full_blocks; ++b) {
    const float factor = factor_of_block(b);
    float* block_out = out + b * kBlockSize;
    for (int64_t i = 0; i < kBlockSize; ++i) block_out[i] *= factor;
  }
  const float tail_factor = full_blocks * kBlockSize < cols ? factor_of_block(full_blocks) : 1.0f;
  for (int64_t k = full_blocks * kBlockSize; k < cols; ++k) out[k] *= tail_factor;
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
