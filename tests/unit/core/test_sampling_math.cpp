// The arithmetic the CPU and device samplers share (core/sampling_math.hpp): the exp against std::exp, the masses
// against nearbyint and their scale's bound, and the exact integer helpers (nucleus mass, draw target) against 128-bit references on random and
// boundary inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "core/sampling_math.hpp"

namespace dsv4::sampling {
namespace {

TEST(SamplingMath, ExpMatchesStdExpAndUnderflowsBelowMinus87) {
  EXPECT_EQ(exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(exp_nonpositive(-87.5f), 0.0f);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> x_of(-87.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = i < 1000 ? -float(i) * 0.087f : x_of(rng);
    const double want = std::exp(double(x));
    ASSERT_NEAR(exp_nonpositive(x), want, want * 2e-7) << "x = " << x;
  }
}

TEST(SamplingMath, TemperedWeightIsOneAtTheMaximum) {
  for (const float t : {0.1f, 0.7f, 1.0f, 3.0f}) {
    EXPECT_EQ(tempered_weight(12.5f, 12.5f, 1.0f / t), 1.0f);
    EXPECT_LT(tempered_weight(12.0f, 12.5f, 1.0f / t), 1.0f);
  }
}

TEST(SamplingMath, MassesOfAWholeVocabularyStayBelow2To63) {
  for (const int64_t vocab : {int64_t(1), int64_t(2), int64_t(3), int64_t(1000), int64_t(129280), int64_t(131072),
                              int64_t(131073), int64_t(1) << 30}) {
    const int shift = mass_shift(vocab);
    const unsigned __int128 total = static_cast<unsigned __int128>(vocab) * weight_mass(1.0f, shift);
    EXPECT_LE(total, static_cast<unsigned __int128>(1) << 63) << "vocab " << vocab;
    if (shift < 52) EXPECT_GT(total * 2, static_cast<unsigned __int128>(1) << 63) << "vocab " << vocab << ": could double";
  }
  EXPECT_EQ(mass_shift(129280), 46);
  EXPECT_EQ(weight_mass(0.5f, 46), uint64_t(1) << 45);
  EXPECT_EQ(weight_mass(0.0f, 46), 0u);
  EXPECT_EQ(weight_mass(0x1.0p-47f, 46), 0u);  // half the unit rounds to even: never drawn
  EXPECT_EQ(weight_mass(0x1.8p-47f, 46), 1u);
  EXPECT_EQ(weight_mass(1.0f, 52), uint64_t(1) << 52);
  EXPECT_EQ(mass_shift(2), 52);
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> weight_of(0.0f, 1.0f);
  for (int i = 0; i < 100000; ++i) {
    const float w = i % 2 ? weight_of(rng) : std::ldexp(weight_of(rng), -int(rng() % 60));
    ASSERT_EQ(weight_mass(w, 46), uint64_t(std::nearbyint(std::ldexp(double(w), 46)))) << w;
  }
}

TEST(SamplingMath, NucleusMassIsTheExactCeiling) {
  // N = ceil(top_p * mass) exactly when (N - 1) * 2^s < top_p * 2^s * mass <= N * 2^s, with top_p * 2^s an integer
  // (s = 23 - exponent, at most 43 for top_p >= 1e-6, so every product fits 128 bits).
  const auto is_ceiling = [](uint64_t n, float top_p, uint64_t mass) {
    const int s = 23 - std::ilogb(top_p);
    const auto scaled = static_cast<unsigned __int128>(std::ldexp(double(top_p), s));
    const unsigned __int128 product = scaled * mass, unit = static_cast<unsigned __int128>(1) << s;
    return (n == 0 || (n - 1) * unit < product) && product <= n * unit;
  };
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<float> p_of(1e-6f, 1.0f);
  for (int i = 0; i < 100000; ++i) {
    const float top_p = i == 0 ? 1.0f : p_of(rng);
    const uint64_t mass = rng() >> (rng() % 60 + 1);
    ASSERT_TRUE(is_ceiling(nucleus_mass(top_p, mass), top_p, mass)) << top_p << " * " << mass;
  }
  EXPECT_EQ(nucleus_mass(0.5f, 4), 2u);  // exactly half: no rounding up
  EXPECT_EQ(nucleus_mass(0.5f, 5), 3u);
  EXPECT_EQ(nucleus_mass(1.0f, 12345), 12345u);
  EXPECT_EQ(nucleus_mass(1.0f, uint64_t(1) << 63), uint64_t(1) << 63);
  // Tiny top_p: any positive mass keeps exactly the top token's share.
  for (const float tiny : {1e-30f, std::numeric_limits<float>::denorm_min()}) {
    EXPECT_EQ(nucleus_mass(tiny, 1), 1u);
    EXPECT_EQ(nucleus_mass(tiny, uint64_t(1) << 63), 1u);
    EXPECT_EQ(nucleus_mass(tiny, 0), 0u);
  }
}

TEST(SamplingMath, DrawTargetIsBelowTheTotalAndProportional) {
  const uint64_t largest_draw = (uint64_t(1) << 53) - 1;
  for (const uint64_t total : {uint64_t(1), uint64_t(7), uint64_t(1) << 46, uint64_t(1) << 63}) {
    EXPECT_EQ(draw_target(0, total), 0u);
    EXPECT_LT(draw_target(largest_draw, total), total);
    EXPECT_EQ(draw_target(uint64_t(1) << 52, total), total / 2);  // u = 0.5
  }
  std::mt19937_64 rng(3);
  for (int i = 0; i < 100000; ++i) {
    const uint64_t draw = rng() >> 11, total = rng() >> 1;
    const unsigned __int128 want = (static_cast<unsigned __int128>(draw) * total) >> 53;
    ASSERT_EQ(draw_target(draw, total), uint64_t(want));
  }
}

TEST(SamplingMath, AdjustmentsFollowTheDocumentedOrder) {
  RowParams p;
  p.repetition_penalty = 2.0f, p.frequency_penalty = 0.5f, p.presence_penalty = 0.25f;
  EXPECT_EQ(adjust_logit(3.0f, {0, 1.0f, 1, 2}, p), (3.0f + 1.0f) / 2.0f - 0.5f * 2 - 0.25f);
  EXPECT_EQ(adjust_logit(-3.0f, {0, 1.0f, 1, 0}, p), (-3.0f + 1.0f) * 2.0f);
  EXPECT_EQ(adjust_logit(-3.0f, {0, 0.0f, 0, 3}, p), -3.0f - 1.5f - 0.25f);
  EXPECT_EQ(adjust_logit(-std::numeric_limits<float>::infinity(), {0, 5.0f, 1, 1}, p),
            -std::numeric_limits<float>::infinity());
}

}  // namespace
}  // namespace dsv4::sampling
