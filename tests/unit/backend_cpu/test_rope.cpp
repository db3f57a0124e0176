#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "backends/cpu/rope.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

const YarnScaling kFlashYarn{.factor = 16.0, .original_max_position = 65536, .beta_fast = 32.0, .beta_slow = 1.0};

TEST(RopeTable, PlainFrequenciesFollowTheFormula) {
  const RopeTable table(10000.0, 64);
  ASSERT_EQ(table.frequencies().size(), 32u);
  for (int i = 0; i < 32; ++i)
    EXPECT_FLOAT_EQ(table.frequencies()[i], static_cast<float>(std::pow(10000.0, -2.0 * i / 64.0))) << i;
}

TEST(RopeTable, YarnBoundsForFlashAre15And25) {
  const auto [low, high] = RopeTable::yarn_ramp_bounds(160000.0, 64, kFlashYarn);
  EXPECT_EQ(low, 15);
  EXPECT_EQ(high, 25);
}

TEST(RopeTable, YarnFrequenciesAtAndBetweenTheBounds) {
  const RopeTable plain(160000.0, 64);
  const RopeTable yarn(160000.0, 64, kFlashYarn);
  for (int i = 0; i < 32; ++i) {
    const double f = plain.frequencies()[i];
    const double ramp = std::clamp((i - 15.0) / (25.0 - 15.0), 0.0, 1.0);
    const double expected = f * ramp / 16.0 + f * (1.0 - ramp);
    if (i <= 15) EXPECT_EQ(yarn.frequencies()[i], plain.frequencies()[i]) << "below low keeps f_i, i=" << i;
    if (i >= 25) EXPECT_FLOAT_EQ(yarn.frequencies()[i], static_cast<float>(f / 16.0)) << "above high is f_i/16, i=" << i;
    EXPECT_NEAR(yarn.frequencies()[i], expected, 1e-6 * f) << i;
  }
}

TEST(RopeTable, RotatesInterleavedPairs) {
  const RopeTable table(10000.0, 4);
  // Pair 0 has f = 1: at position 1 it turns by exactly 1 radian; pair 1 has f = 10000^-0.5.
  float x[4] = {1.0f, 0.0f, 0.0f, 2.0f};
  table.rotate(x, 1);
  EXPECT_NEAR(x[0], std::cos(1.0), 1e-7);
  EXPECT_NEAR(x[1], std::sin(1.0), 1e-7);
  const double a = 0.01;
  EXPECT_NEAR(x[2], -2.0 * std::sin(a), 1e-6);
  EXPECT_NEAR(x[3], 2.0 * std::cos(a), 1e-6);
  float y[4] = {0.3f, -0.7f, 1.1f, 0.2f};
  const float original[4] = {0.3f, -0.7f, 1.1f, 0.2f};
  table.rotate(y, 0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y[i], original[i]) << "position 0 is the identity";
}

TEST(RopeTable, InverseUndoesRotation) {
  const RopeTable table(160000.0, 64, kFlashYarn);
  for (int64_t position : {0, 1, 5, 127, 4096, 1000003}) {
    auto x = random_vector(64, 7 + position);
    const auto original = x;
    table.rotate(x.data(), position);
    table.rotate_inverse(x.data(), position);
    EXPECT_LT(testing::max_abs_diff(x.data(), original.data(), 64), 1e-6) << position;
  }
}

TEST(RopeTable, DotProductDependsOnlyOnDistance) {
  const RopeTable table(10000.0, 64);
  const auto q = random_vector(64, 11);
  const auto k = random_vector(64, 12);
  const auto rotated_dot = [&](int64_t pq, int64_t pk) {
    auto a = q, b = k;
    table.rotate(a.data(), pq);
    table.rotate(b.data(), pk);
    double s = 0;
    for (int i = 0; i < 64; ++i) s += double(a[i]) * b[i];
    return s;
  };
  EXPECT_NEAR(rotated_dot(10, 3), rotated_dot(107, 100), 1e-4);
}

TEST(ApplyRope, RotatesOnlyTheTrailingSliceOfEveryHead) {
  const RopeTable table(10000.0, 8);
  const int64_t T = 3, H = 2, D = 12;
  auto x = random_vector(T * H * D, 21);
  const auto original = x;
  const int64_t positions[T] = {0, 9, 300};
  apply_rope(table, x.data(), positions, {.tokens = T, .heads = H, .head_dim = D});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const float* got = x.data() + (t * H + h) * D;
      const float* in = original.data() + (t * H + h) * D;
      for (int i = 0; i < D - 8; ++i) EXPECT_EQ(got[i], in[i]) << "nope dims untouched";
      std::vector<float> expected(in + D - 8, in + D);
      table.rotate(expected.data(), positions[t]);
      for (int i = 0; i < 8; ++i) EXPECT_EQ(got[D - 8 + i], expected[i]);
    }
  apply_rope(table, x.data(), positions, {.tokens = T, .heads = H, .head_dim = D, .inverse = true});
  EXPECT_LT(testing::max_abs_diff(x.data(), original.data(), T * H * D), 1e-6);
}

TEST(RopeTable, RejectsBadArguments) {
  EXPECT_THROW(RopeTable(10000.0, 63), Error);
  EXPECT_THROW(RopeTable(10000.0, 0), Error);
  EXPECT_THROW(RopeTable(1.0, 64), Error);
  const RopeTable table(10000.0, 8);
  float x[4] = {};
  const int64_t position = 0;
  EXPECT_THROW(apply_rope(table, x, &position, {.tokens = 1, .heads = 1, .head_dim = 4}), Error);
  const int64_t negative = -1;
  float y[8] = {};
  EXPECT_THROW(apply_rope(table, y, &negative, {.tokens = 1, .heads = 1, .head_dim = 8}), Error);
}

}  // namespace
}  // namespace dsv4::cpu
