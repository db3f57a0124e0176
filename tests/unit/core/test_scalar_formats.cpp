// Scalar formats: every code round-trips, and encoding agrees with a brute-force nearest-value search (ties to the
// even code) on all halfway points, their float neighbours and random floats.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "core/bf16.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4 {
namespace {

// Nearest of `codes` (sorted by value, all non-negative, code parity = mantissa LSB) to |x|, ties to the even code,
// saturating at the largest; the sign is applied by the caller.
uint32_t nearest_code(double magnitude, const std::vector<std::pair<double, uint32_t>>& codes) {
  uint32_t best = codes.front().second;
  double best_distance = std::numeric_limits<double>::infinity();
  for (const auto& [value, code] : codes) {
    const double distance = std::fabs(value - magnitude);
    if (distance < best_distance || (distance == best_distance && (code & 1u) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return best;
}

// Values to probe around a sorted set of representable values: each value, each midpoint, and their neighbours.
std::vector<float> probes_around(const std::vector<float>& values, uint32_t seed) {
  std::vector<float> probes;
  for (size_t i = 0; i < values.size(); ++i) {
    std::vector<float> centres{values[i]};
    if (i + 1 < values.size()) centres.push_back(float((double(values[i]) + double(values[i + 1])) / 2));
    for (float c : centres) {
      probes.push_back(c);
      probes.push_back(std::nextafter(c, 0.0f));
      probes.push_back(std::nextafter(c, std::numeric_limits<float>::infinity()));
    }
  }
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(0.0f, values.back() * 1.25f);
  for (int i = 0; i < 20000; ++i) probes.push_back(uniform(rng));
  const size_t unsigned_count = probes.size();
  for (size_t i = 0; i < unsigned_count; ++i) probes.push_back(-probes[i]);
  return probes;
}

TEST(Bf16, EveryCodeRoundTrips) {
  for (uint32_t code = 0; code < 0x10000; ++code) {
    const float value = bf16_to_float(uint16_t(code));
    EXPECT_EQ(float_to_bits(value), code << 16);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(value)))) << code;
      EXPECT_EQ(float_to_bf16(value) & 0x8000u, code & 0x8000u) << code;
    } else {
      EXPECT_EQ(float_to_bf16(value), code) << code;
    }
  }
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3F80);          // tie, 1.0 is even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);      // tie, 1+2^-6 is even
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);  // just above the tie
  EXPECT_EQ(float_to_bf16(-1.0f - 0x1p-8f), 0xBF80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // overflows to +inf
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  // A NaN whose payload lives only in the truncated bits must stay NaN, not become inf.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7F800001u)))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0xFF800001u)))));
  EXPECT_FLOAT_EQ(round_to_bf16(3.14159265f), 3.140625f);
}

TEST(Bf16, MatchesNearestSearchOnRandomFloats) {
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = rng();
    const float x = bits_to_float(bits);
    if (!std::isfinite(x)) continue;
    const uint16_t truncated = uint16_t(bits >> 16);
    const uint16_t next = uint16_t(truncated + 1);
    // IEEE rounding treats the infinity above the largest finite value as 2^128.
    const bool next_is_inf = (next & 0x7FFFu) == 0x7F80u;
    const double lower = bf16_to_float(truncated);
    const double upper = next_is_inf ? std::copysign(std::ldexp(1.0, 128), x) : double(bf16_to_float(next));
    const double d_lower = std::fabs(double(x) - lower), d_upper = std::fabs(double(x) - upper);
    const uint16_t expected =
        d_lower < d_upper || (d_lower == d_upper && (truncated & 1u) == 0) ? truncated : uint16_t(truncated + 1);
    ASSERT_EQ(float_to_bf16(x), expected) << x;
  }
}

std::vector<std::pair<double, uint32_t>> e4m3_positive_codes() {
  std::vector<std::pair<double, uint32_t>> codes;
  for (uint32_t code = 0; code <= 0x7E; ++code) codes.emplace_back(e4m3_to_float(uint8_t(code)), code);
  return codes;
}

TEST(E4m3, EveryCodeDecodesToItsDefinitionAndRoundTrips) {
  for (uint32_t code = 0; code < 256; ++code) {
    const float value = e4m3_to_float(uint8_t(code));
    const uint32_t exponent = (code >> 3) & 0xF, mantissa = code & 7;
    const double magnitude = exponent == 0 ? std::ldexp(double(mantissa), -9)
                                           : std::ldexp(1.0 + mantissa / 8.0, int(exponent) - 7);
    if ((code & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(value)) << code;
      EXPECT_EQ(float_to_e4m3(value), 0x7F) << code;
      continue;
    }
    EXPECT_EQ(double(value), (code & 0x80) ? -magnitude : magnitude) << code;
    EXPECT_EQ(std::signbit(value), (code & 0x80) != 0) << code;  // 0x80 is -0
    EXPECT_EQ(float_to_e4m3(value), code) << code;
  }
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), 0x1p-9f);
}

TEST(E4m3, RoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(float_to_e4m3(1.0f + 1.0f / 16), 0x38);       // tie between 1 and 1.125 -> 1 (even)
  EXPECT_EQ(float_to_e4m3(1.0f + 3.0f / 16), 0x3A);       // tie between 1.125 and 1.25 -> 1.25 (even)
  EXPECT_EQ(float_to_e4m3(0x1p-10f), 0x00);               // tie between 0 and 2^-9 -> 0
  EXPECT_EQ(float_to_e4m3(3 * 0x1p-10f), 0x02);           // tie between 2^-9 and 2^-8 -> 2^-8
  EXPECT_EQ(float_to_e4m3(15 * 0x1p-10f), 0x08);          // tie between 7·2^-9 and 2^-6 -> 2^-6
  EXPECT_EQ(float_to_e4m3(-0x1p-11f), 0x80);              // rounds to -0
  EXPECT_EQ(float_to_e4m3(440.0f), 0x7E);                 // tie between 416 and 448 -> 448 (even)
  EXPECT_EQ(float_to_e4m3(460.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(1e30f), 0x7E);
  EXPECT_EQ(float_to_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
}

TEST(E4m3, MatchesNearestSearch) {
  const auto codes = e4m3_positive_codes();
  std::vector<float> values;
  for (const auto& [value, code] : codes) values.push_back(float(value));
  for (float x : probes_around(values, 11)) {
    const uint32_t expected = nearest_code(std::fabs(double(x)), codes) | (std::signbit(x) ? 0x80u : 0u);
    ASSERT_EQ(float_to_e4m3(x), expected) << x;
  }
}

TEST(E2m1, EveryCodeDecodesToItsValueAndRoundTrips) {
  const float magnitudes[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (uint32_t nibble = 0; nibble < 16; ++nibble) {
    const float value = e2m1_to_float(uint8_t(nibble));
    EXPECT_EQ(value, (nibble & 8) ? -magnitudes[nibble & 7] : magnitudes[nibble & 7]) << nibble;
    EXPECT_EQ(std::signbit(value), (nibble & 8) != 0) << nibble;  // 0x8 is -0
    EXPECT_EQ(float_to_e2m1(value), nibble) << nibble;
  }
}

TEST(E2m1, RoundsToNearestEvenAndSaturates) {
  const std::pair<float, uint8_t> cases[] = {{0.25f, 0}, {0.75f, 2}, {1.25f, 2}, {1.75f, 4}, {2.5f, 4},
                                             {3.5f, 6},  {5.0f, 6},  {5.01f, 7}, {7.0f, 7},  {1e30f, 7},
                                             {-0.25f, 8}, {-5.0f, 14}, {-100.0f, 15}};
  for (const auto& [x, code] : cases) EXPECT_EQ(float_to_e2m1(x), code) << x;
  EXPECT_EQ(float_to_e2m1(std::numeric_limits<float>::infinity()), 7);
}

TEST(E2m1, MatchesNearestSearch) {
  std::vector<std::pair<double, uint32_t>> codes;
  std::vector<float> values;
  for (uint32_t nibble = 0; nibble < 8; ++nibble) {
    codes.emplace_back(e2m1_to_float(uint8_t(nibble)), nibble);
    values.push_back(e2m1_to_float(uint8_t(nibble)));
  }
  for (float x : probes_around(values, 13)) {
    const uint32_t expected = nearest_code(std::fabs(double(x)), codes) | (std::signbit(x) ? 8u : 0u);
    ASSERT_EQ(float_to_e2m1(x), expected) << x;
  }
}

TEST(E8m0, EveryCodeDecodesToItsPowerAndRoundTrips) {
  for (uint32_t code = 0; code < 255; ++code) {
    const float value = e8m0_to_float(uint8_t(code));
    EXPECT_EQ(double(value), std::ldexp(1.0, int(code) - 127)) << code;
    EXPECT_EQ(float_to_e8m0_ceil(value), code) << code;
  }
  EXPECT_TRUE(std::isnan(e8m0_to_float(kE8m0Nan)));
  EXPECT_EQ(float_to_e8m0_ceil(std::numeric_limits<float>::quiet_NaN()), kE8m0Nan);
}

TEST(E8m0, CeilIsTheSmallestPowerAtLeastX) {
  std::mt19937 rng(17);
  std::vector<float> probes;
  for (uint32_t code = 0; code < 255; ++code) {
    const float power = e8m0_to_float(uint8_t(code));
    const float above = std::nextafter(power, std::numeric_limits<float>::infinity());
    probes.insert(probes.end(), {power, std::nextafter(power, 0.0f), above, power * 1.5f});
  }
  for (int i = 0; i < 50000; ++i) {
    const float x = bits_to_float(rng() & 0x7FFFFFFFu);
    if (std::isfinite(x)) probes.push_back(x);
  }
  for (float x : probes) {
    if (!(x > 0.0f) || !std::isfinite(x)) continue;
    uint32_t expected = 0;
    while (expected < 254 && double(e8m0_to_float(uint8_t(expected))) < double(x)) ++expected;
    ASSERT_EQ(float_to_e8m0_ceil(x), expected) << x;
  }
  EXPECT_EQ(float_to_e8m0_ceil(0.0f), 0);
  EXPECT_EQ(float_to_e8m0_ceil(-1.0f), 0);
  EXPECT_EQ(float_to_e8m0_ceil(std::numeric_limits<float>::infinity()), 254);
  EXPECT_EQ(float_to_e8m0_ceil(0.75f), 127);
  EXPECT_EQ(float_to_e8m0_ceil(448.0f / 448.0f), 127);
}

}  // namespace
}  // namespace dsv4
