// The arithmetic the CPU Sampler (runtime/sampler.cpp) and the CUDA sampling kernel (backends/cuda/kernels/
// sampling.cuh) share, written once so that both pick the same token for the same logits, parameters and draw.
//
// - Logit adjustments (logit_bias, repetition, frequency and presence penalties) and the tempered weights
//   exp((logit - max) * (1 / temperature)) are float operations that give the same bits on both sides: no fused
//   multiply-add (the device uses the _rn intrinsics, which the compiler never contracts), our own exp.
// - Probability masses are integers: mass = round(weight * 2^mass_shift(vocab)), chosen so that the masses of a whole
//   vocabulary sum to at most 2^63. Integer sums are exact in any order, so every filter threshold (top_p) and the
//   inverse-CDF draw give the same answer whether a CPU loop or a parallel reduction adds them up. A weight below
//   2^-(mass_shift + 1) (2^-47 for DeepSeek's 129,280 tokens: 32.6 * temperature below the top logit) has mass 0 and
//   is never drawn.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "core/bf16.hpp"
#include "core/host_device.hpp"

namespace dsv4::sampling {

// One token's adjustments of a sampling step, applied in the order bias, repetition, frequency, presence.
struct LogitAdjustment {
  int32_t token = 0;
  float bias = 0.0f;     // logit_bias (0 when the token has none)
  int32_t repeated = 0;  // 1: the token is in the prompt or the output and the repetition penalty is on
  int32_t count = 0;     // occurrences in the output when a frequency or presence penalty is on, else 0
};

// One row's sampling parameters (runtime/sampler.hpp documents them) and its random draw.
struct RowParams {
  float temperature = 1.0f;  // 0: greedy
  float top_p = 1.0f;        // 1: off
  int32_t top_k = 0;         // 0: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  int32_t adjustments_begin = 0;  // the row's LogitAdjustment entries: [begin, begin + count) of the step's array
  int32_t adjustments_count = 0;
  uint64_t draw = 0;  // 53 random bits (the sequence's xoshiro256** output >> 11); unused at temperature 0
};

// What a device needs to sample one sequence's next token (Sampler::device_step builds it): the row's parameters with
// its draw, and its adjustments (row.adjustments_begin = 0).
struct SamplingStep {
  RowParams row;
  std::span<const LogitAdjustment> adjustments;
};

// Float operations that are never fused into an FMA (host: x86-64 emits none without -march flags).
DSV4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DSV4_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DSV4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DSV4_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The logit after the token's adjustments (vLLM's formulas: CTRL repetition penalty, OpenAI frequency / presence).
DSV4_HD float adjust_logit(float logit, const LogitAdjustment& a, const RowParams& p) {
  logit = add_rn(logit, a.bias);
  if (a.repeated != 0) logit = logit > 0.0f ? div_rn(logit, p.repetition_penalty) : mul_rn(logit, p.repetition_penalty);
  if (a.count > 0) {
    logit = sub_rn(logit, mul_rn(p.frequency_penalty, float(a.count)));
    logit = sub_rn(logit, p.presence_penalty);
  }
  return logit;
}

// exp(x) for x <= 0 (including -inf), relative error < 1e-7. Results below e^-87 (near float's smallest normal) are 0.
// Range reduction: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for exactness), then Taylor to degree 7.
DSV4_HD float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f;  // few mantissa bits: n * kLn2High is exact
  constexpr float kLn2Low = 1.42860682030941723212e-6f;
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  constexpr float kUnderflow = -87.0f;
  const float shifted = add_rn(mul_rn(x, kLog2e), kRoundingShift);
  const float n = sub_rn(shifted, kRoundingShift);
  const float r = sub_rn(sub_rn(x, mul_rn(n, kLn2High)), mul_rn(n, kLn2Low));
  float poly = 1.0f / 5040.0f;
  poly = add_rn(mul_rn(poly, r), 1.0f / 720.0f);
  poly = add_rn(mul_rn(poly, r), 1.0f / 120.0f);
  poly = add_rn(mul_rn(poly, r), 1.0f / 24.0f);
  poly = add_rn(mul_rn(poly, r), 1.0f / 6.0f);
  poly = add_rn(mul_rn(poly, r), 0.5f);
  poly = add_rn(mul_rn(poly, r), 1.0f);
  poly = add_rn(mul_rn(poly, r), 1.0f);
  // 2^n from the integer in shifted's mantissa; garbage for x < kUnderflow (or -inf), which the mask zeroes.
  const uint32_t two_to_n = (float_to_bits(shifted) - float_to_bits(kRoundingShift) + 127u) << 23;
  const uint32_t keep_mask = x >= kUnderflow ? 0xFFFFFFFFu : 0u;
  return bits_to_float(float_to_bits(mul_rn(poly, bits_to_float(two_to_n))) & keep_mask);
}

// exp((logit - max_logit) * inverse_temperature) in (0, 1], 0 for -inf logits; exactly 1 for the maximum. Both
// samplers pass inverse_temperature = 1.0f / temperature (one division per row, not one per token).
DSV4_HD float tempered_weight(float logit, float max_logit, float inverse_temperature) {
  return exp_nonpositive(mul_rn(sub_rn(logit, max_logit), inverse_temperature));
}

// Fixed-point bits of a mass: the largest shift with vocab * 2^shift <= 2^63 (exact sums), at most 52 (weight_mass's
// rounding trick).
DSV4_HD int mass_shift(int64_t vocab) {
  int ceil_log2 = 0;
  while ((int64_t(1) << ceil_log2) < vocab) ++ceil_log2;
  return 63 - ceil_log2 < 52 ? 63 - ceil_log2 : 52;
}

// round(weight * 2^shift) (to nearest, ties to even) for a weight in [0, 1]: the product is exact in double and below
// 2^53, and adding 2^52 leaves the rounded integer in the mantissa bits. Plain double arithmetic, so the CPU's loops
// vectorise.
DSV4_HD uint64_t weight_mass(float weight, int shift) {
  constexpr double kTwoTo52 = 4503599627370496.0;
#if defined(__CUDA_ARCH__)
  const double scaled = __dadd_rn(__dmul_rn(double(weight), __longlong_as_double((1023ll + shift) << 52)), kTwoTo52);
  return uint64_t(__double_as_longlong(scaled)) - uint64_t(__double_as_longlong(kTwoTo52));
#else
  const uint64_t scale_bits = uint64_t(1023 + shift) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  const double scaled = double(weight) * scale + kTwoTo52;
  uint64_t scaled_bits, offset_bits;
  std::memcpy(&scaled_bits, &scaled, sizeof scaled_bits);
  std::memcpy(&offset_bits, &kTwoTo52, sizeof offset_bits);
  return scaled_bits - offset_bits;
#endif
}

// The inverse-CDF target for `draw` (53 random bits) over a positive total mass: floor(draw * 2^-53 * total), exact,
// always < total. The token drawn is the first survivor whose inclusive running mass exceeds it.
DSV4_HD uint64_t draw_target(uint64_t draw, uint64_t total) {
  const unsigned __int128 product = static_cast<unsigned __int128>(draw) * total;
  return static_cast<uint64_t>(product >> 53);
}

// ceil(top_p * mass), exact, for top_p in (0, 1]: a token survives top_p when the mass ranked above it is below this.
DSV4_HD uint64_t nucleus_mass(float top_p, uint64_t mass) {
  const uint32_t bits = float_to_bits(top_p);
  const uint32_t biased_exponent = bits >> 23;
  // top_p = mantissa * 2^-scale exactly (subnormals included).
  const uint64_t mantissa = biased_exponent == 0 ? (bits & 0x7FFFFFu) : ((bits & 0x7FFFFFu) | 0x800000u);
  const int scale = biased_exponent == 0 ? 149 : 150 - int(biased_exponent);
  const unsigned __int128 product = static_cast<unsigned __int128>(mantissa) * mass;  // < 2^24 * 2^63
  if (scale >= 88) return product != 0 ? 1 : 0;  // the product is below 2^87, so the quotient is in (0, 1)
  const unsigned __int128 unit = static_cast<unsigned __int128>(1) << scale;
  return static_cast<uint64_t>((product + unit - 1) >> scale);
}

// The error both samplers give for a NaN or +inf logit (host only).
inline std::string bad_logit_message(int64_t token, bool is_nan) {
  return "sampler: the logit of token " + std::to_string(token) + " is " + (is_nan ? "NaN" : "+inf");
}

}  // namespace dsv4::sampling
