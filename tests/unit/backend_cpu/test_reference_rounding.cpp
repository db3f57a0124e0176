#include <gtest/gtest.h>

#include <bit>
#include <cmath>

#include "backends/cpu/reference_rounding.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

// Rounds a block of `size` values where the first entries are given and the rest are zero.
std::vector<float> fp8_block(std::vector<float> head, int64_t size = 64) {
  head.resize(size, 0.0f);
  round_fp8_blocks_ue8m0(head.data(), size, 64);
  return head;
}

std::vector<float> fp4_block(std::vector<float> head, int64_t size = 32) {
  head.resize(size, 0.0f);
  round_fp4_blocks_ue8m0(head.data(), size, 32);
  return head;
}

TEST(Fp8BlockRounding, UnitScaleRoundsToNearestEven) {
  // amax 448 gives s = 2^ceil(log2(1)) = 1: plain e4m3 rounding.
  const auto r = fp8_block({448.0f, 1.0625f, 1.1875f, -3.3f, 300.0f, 304.0f, 0.0f, -0.0f});
  EXPECT_EQ(r[0], 448.0f);
  EXPECT_EQ(r[1], 1.0f) << "tie between 1 and 1.125 goes to the even mantissa";
  EXPECT_EQ(r[2], 1.25f) << "tie between 1.125 and 1.25 goes to the even mantissa";
  EXPECT_EQ(r[3], -3.25f);
  EXPECT_EQ(r[4], 288.0f);
  EXPECT_EQ(r[5], 320.0f) << "tie between 288 and 320";
  EXPECT_EQ(std::bit_cast<uint32_t>(r[7]), 0x80000000u) << "-0 keeps its sign";
}

TEST(Fp8BlockRounding, ScaleIsTheNextPowerOfTwo) {
  // amax 449 > 448 needs s = 2: 449/2 = 224.5 rounds to 224 (step 16), giving 448.
  EXPECT_EQ(fp8_block({449.0f})[0], 448.0f);
  // amax 1: s = 2^ceil(log2(1/448)) = 2^-8; 0.3·256 = 76.8 rounds to 80 (step 8) → 0.3125.
  const auto r = fp8_block({1.0f, 0.3f});
  EXPECT_EQ(r[0], 1.0f);
  EXPECT_EQ(r[1], 0.3125f);
}

TEST(Fp8BlockRounding, ExactPowerOfTwoRatioKeepsItsScale) {
  // amax = 56 = 448·2^-3 gives exactly s = 2^-3, so 2^-12 / s = 2^-9 is e4m3's smallest subnormal and survives.
  // One ulp more and s = 2^-2: 2^-12 / s = 2^-10 is half the smallest subnormal, a tie that rounds to 0.
  EXPECT_EQ(fp8_block({56.0f, 0x1p-12f})[1], 0x1p-12f);
  EXPECT_EQ(fp8_block({std::nextafter(56.0f, 100.0f), 0x1p-12f})[1], 0.0f);
  // With s = 2^-3, 3·2^-13 / s = 1.5·2^-9 ties between codes 1 and 2: even code 2 = 2^-8, so 2^-11.
  EXPECT_EQ(fp8_block({56.0f, 3 * 0x1p-13f})[1], 0x1p-11f);
}

TEST(Fp8BlockRounding, AmaxFloorForTinyBlocks) {
  // All below 1e-4: s = 2^ceil(log2(1e-4/448)) = 2^-22, so 2^-31 (= 2^-9·s) survives and 2^-32 (a tie) does not.
  const auto r = fp8_block({1e-5f, 0x1p-31f, 0x1p-32f});
  EXPECT_EQ(r[1], 0x1p-31f);
  EXPECT_EQ(r[2], 0.0f);
  EXPECT_EQ(fp8_block({0.0f})[0], 0.0f);
}

TEST(Fp8BlockRounding, BlocksAreIndependent) {
  std::vector<float> x(128, 0.0f);
  x[0] = 448.0f;  // block 0: s = 1
  x[1] = 1.0625f;
  x[64] = 1.0f;   // block 1: s = 2^-8
  x[65] = 0.3f;
  round_fp8_blocks_ue8m0(x.data(), 128, 64);
  EXPECT_EQ(x[1], 1.0f);
  EXPECT_EQ(x[65], 0.3125f);
}

// e4m3 round-to-nearest-even by searching all finite codes (independent of core/fp8_e4m3.hpp), saturating at 448.
double e4m3_nearest_even(double v) {
  std::vector<double> grid;  // index = code of the magnitude
  for (int code = 0; code < 127; ++code) {
    const int e = code >> 3, m = code & 7;
    grid.push_back(e == 0 ? m * 0x1p-9 : (1 + m / 8.0) * std::exp2(e - 7));
  }
  const double a = std::min(std::fabs(v), 448.0);
  size_t best = 0;
  for (size_t c = 1; c < grid.size(); ++c) {
    const double d = std::fabs(grid[c] - a), best_d = std::fabs(grid[best] - a);
    if (d < best_d || (d == best_d && c % 2 == 0)) best = c;
  }
  return std::copysign(grid[best], v);
}

TEST(Fp8BlockRounding, RandomBlocksFollowTheRule) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    const float magnitude = std::ldexp(1.0f, int(seed % 40) - 25);
    auto x = random_vector(64, seed, -magnitude, magnitude);
    const auto original = x;
    round_fp8_blocks_ue8m0(x.data(), 64, 64);
    double amax = 0;
    for (float v : original) amax = std::max(amax, std::fabs(double(v)));
    const double scale = std::exp2(std::ceil(std::log2(std::max(amax, 1e-4) / 448)));
    for (int i = 0; i < 64; ++i)
      ASSERT_EQ(x[i], round_to_bf16(float(e4m3_nearest_even(original[i] / scale) * scale))) << seed << "," << i;
  }
}

TEST(Fp4BlockRounding, UnitScaleRoundsToNearestEven) {
  // amax 6 gives s = 1. The tie points go to the even code: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4.
  const auto r = fp4_block({6.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, -5.1f, 0.26f, -0.0f});
  const std::vector<float> expected = {6.0f, 0.0f, 1.0f, 1.0f, 2.0f, 2.0f, 4.0f, 4.0f, -6.0f, 0.5f};
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(r[i], expected[i]) << i;
  EXPECT_EQ(std::bit_cast<uint32_t>(r[10]), 0x80000000u);
}

TEST(Fp4BlockRounding, ScaleSelection) {
  // Just above 6: s = 2, 5/2 = 2.5 ties to 2, giving 4.
  EXPECT_EQ(fp4_block({6.0001f, 5.0f})[1], 4.0f);
  // amax 0.75: s = 2^ceil(log2(0.125)) = 2^-3; 0.3/s = 2.4 → 2 → 0.25.
  EXPECT_EQ(fp4_block({0.75f, 0.3f})[1], 0.25f);
}

TEST(Fp4BlockRounding, FloorIsSixTimesTwoToMinus126) {
  // amax 3·2^-126 is below the floor 6·2^-126, so s = 2^-126 and 3·2^-126 is exactly representable.
  EXPECT_EQ(fp4_block({3 * 0x1p-126f})[0], 3 * 0x1p-126f);
  // 2^-130 / 2^-126 = 1/16 rounds to 0.
  EXPECT_EQ(fp4_block({0x1p-130f})[0], 0.0f);
  EXPECT_EQ(fp4_block({0.0f})[0], 0.0f);
}

// e2m1 round-to-nearest-even by searching the grid (independent of core/e2m1.hpp): ties go to the even code.
double e2m1_nearest_even(double v) {
  const double grid[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  const double a = std::min(std::fabs(v), 6.0);
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double d = std::fabs(grid[c] - a), best_d = std::fabs(grid[best] - a);
    if (d < best_d || (d == best_d && c % 2 == 0)) best = c;
  }
  return std::copysign(grid[best], v);
}

TEST(Fp4BlockRounding, RandomBlocksFollowTheRule) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    const float magnitude = std::ldexp(1.0f, int(seed % 40) - 20);
    auto x = random_vector(32, seed, -magnitude, magnitude);
    const auto original = x;
    round_fp4_blocks_ue8m0(x.data(), 32, 32);
    double amax = 0;
    for (float v : original) amax = std::max(amax, std::fabs(double(v)));
    const double scale = std::exp2(std::ceil(std::log2(std::max(amax, 6 * 0x1p-126) / 6)));
    for (int i = 0; i < 32; ++i)
      ASSERT_EQ(x[i], round_to_bf16(float(e2m1_nearest_even(original[i] / scale) * scale))) << seed << "," << i;
  }
}

TEST(Hadamard128, RowsFollowSylvesterOrder) {
  const double norm = 1.0 / std::sqrt(128.0);
  for (int j = 0; j < 128; ++j) {
    std::vector<float> e(128, 0.0f);
    e[j] = 1.0f;
    hadamard_transform(e.data(), 128);
    for (int i = 0; i < 128; ++i) {
      const double expected = (std::popcount(unsigned(i & j)) % 2 == 0 ? 1.0 : -1.0) * norm;
      ASSERT_NEAR(e[i], expected, 1e-7) << "H[" << i << "][" << j << "]";
    }
  }
}

TEST(Hadamard128, OrthogonalAndSelfInverse) {
  auto x = random_vector(128, 3);
  const auto original = x;
  hadamard_transform(x.data(), 128);
  double before = 0, after = 0;
  for (int i = 0; i < 128; ++i) {
    before += double(original[i]) * original[i];
    after += double(x[i]) * x[i];
  }
  EXPECT_NEAR(after, before, 1e-5 * before);
  hadamard_transform(x.data(), 128);
  EXPECT_LT(testing::max_abs_diff(x.data(), original.data(), 128), 1e-6);
}

// The tiny test models' indexer heads are smaller: the rotation is the Hadamard of their length.
TEST(Hadamard, OtherPowersOfTwo) {
  for (int n : {1, 2, 32, 64}) {
    for (int j = 0; j < n; ++j) {
      std::vector<float> e(n, 0.0f);
      e[j] = 1.0f;
      hadamard_transform(e.data(), n);
      for (int i = 0; i < n; ++i)
        ASSERT_NEAR(e[i], (std::popcount(unsigned(i & j)) % 2 == 0 ? 1.0 : -1.0) / std::sqrt(double(n)), 1e-7);
    }
  }
  float x[48] = {};
  EXPECT_THROW(hadamard_transform(x, 48), Error);
  EXPECT_THROW(hadamard_transform(x, 0), Error);
}

TEST(ReferenceRounding, KvVectorLayout) {
  const int64_t D = 512, R = 64, rows = 2;
  auto kv = random_vector(rows * D, 4, -3.0f, 3.0f);
  auto expected = kv;
  round_kv_reference(kv.data(), rows, D, R);
  for (int64_t r = 0; r < rows; ++r) {
    float* e = expected.data() + r * D;
    round_fp8_blocks_ue8m0(e, D - R, 64);
    for (int64_t i = D - R; i < D; ++i) e[i] = round_to_bf16(e[i]);
  }
  EXPECT_EQ(kv, expected);
}

TEST(ReferenceRounding, IndexerVectorIsHadamardThenBf16ThenFp4) {
  auto x = random_vector(2 * 128, 5, -2.0f, 2.0f);
  auto expected = x;
  round_indexer_reference(x.data(), 2, 128);
  for (int r = 0; r < 2; ++r) {
    float* e = expected.data() + r * 128;
    hadamard_transform(e, 128);
    for (int i = 0; i < 128; ++i) e[i] = round_to_bf16(e[i]);
    round_fp4_blocks_ue8m0(e, 128, 32);
  }
  EXPECT_EQ(x, expected);
}

TEST(ReferenceRounding, RejectsBadArguments) {
  float x[4] = {};
  EXPECT_THROW(round_fp8_blocks_ue8m0(x, 4, 0), Error);
  EXPECT_THROW(round_fp4_blocks_ue8m0(x, -1, 32), Error);
  EXPECT_THROW(round_kv_reference(x, 1, 4, 8), Error);
}

}  // namespace
}  // namespace dsv4::cpu
