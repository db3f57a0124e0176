#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backends/cpu/compressor.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

constexpr int64_t kHeadDim = 8;  // c
constexpr int64_t kRopeDim = 4;
constexpr int64_t kHidden = 12;  // d

struct CompressorFixture {
  CompressorParams params;
  std::vector<float> ape, norm;
  RopeTable rope{160000.0, kRopeDim, YarnScaling{}};

  explicit CompressorFixture(int64_t ratio, bool round_pooled = false, bool overlapping = false)
      : params{.hidden = kHidden,
               .head_dim = kHeadDim,
               .ratio = ratio,
               .overlapping = overlapping,
               .round_pooled_to_bf16 = round_pooled} {
    ape = random_vector(ratio * params.projection_width(), 100 + ratio);
    norm = random_vector(kHeadDim, 200 + ratio, 0.5f, 1.5f);
  }
  CompressorWeights weights() const { return {.ape = ape.data(), .norm = norm.data()}; }

  // Feeds kv/gate of `total` tokens in chunks of the given sizes; returns all entries.
  std::vector<float> run(const std::vector<float>& kv, const std::vector<float>& gate,
                         const std::vector<int64_t>& chunks) const {
    CompressorState state(params.ratio, kHeadDim, params.overlapping);
    std::vector<float> entries;
    int64_t offset = 0;
    const int64_t width = params.projection_width();
    for (int64_t n : chunks) {
      const int64_t before = state.entries_emitted();
      const int64_t emitted = compressor_pool(params, weights(), rope, state, kv.data() + offset * width,
                                              gate.data() + offset * width, n, entries);
      EXPECT_EQ(state.entries_emitted(), before + emitted);
      offset += n;
    }
    EXPECT_EQ(state.tokens_seen(), offset);
    EXPECT_EQ(state.entries_emitted(), offset / params.ratio);
    return entries;
  }

  // dsv4-model.md §3.2 transcribed directly, in double, over the whole sequence.
  std::vector<double> naive(const std::vector<float>& kv, const std::vector<float>& gate, int64_t total) const {
    const int64_t m = params.ratio, c = kHeadDim, width = params.projection_width();
    const bool overlap = params.overlapping;
    std::vector<double> out;
    for (int64_t w = 0; w < total / m; ++w) {
      // (value, score) slots per channel: for CSA the A halves of window w−1 first, then this window's B halves.
      std::vector<double> entry(c);
      for (int64_t i = 0; i < c; ++i) {
        std::vector<std::pair<double, double>> slots;
        if (overlap && w > 0)
          for (int64_t s = 0; s < m; ++s) {
            const int64_t t = (w - 1) * m + s;
            slots.push_back({kv[t * width + i], double(gate[t * width + i]) + ape[s * width + i]});
          }
        const int64_t half = overlap ? c : 0;
        for (int64_t s = 0; s < m; ++s) {
          const int64_t t = w * m + s;
          slots.push_back({kv[t * width + half + i], double(gate[t * width + half + i]) + ape[s * width + half + i]});
        }
        double max = -1e300, den = 0, num = 0;
        for (auto& [v, z] : slots) max = std::max(max, z);
        for (auto& [v, z] : slots) {
          den += std::exp(z - max);
          num += std::exp(z - max) * v;
        }
        entry[i] = num / den;
        if (params.round_pooled_to_bf16) entry[i] = round_to_bf16(float(entry[i]));
      }
      double ss = 0;
      for (double v : entry) ss += v * v;
      const double inv = 1.0 / std::sqrt(ss / c + params.norm_eps);
      std::vector<float> normed(c);
      for (int64_t i = 0; i < c; ++i) normed[i] = float(entry[i] * inv * norm[i]);
      rope.rotate(normed.data() + c - kRopeDim, m * w);  // the window's FIRST token
      out.insert(out.end(), normed.begin(), normed.end());
    }
    return out;
  }
};

void expect_split_invariant(int64_t ratio, int64_t total, bool overlapping) {
  const CompressorFixture setup(ratio, false, overlapping);
  const int64_t width = setup.params.projection_width();
  const auto kv = random_vector(total * width, 1 + ratio, -2.0f, 2.0f);
  const auto gate = random_vector(total * width, 2 + ratio, -3.0f, 3.0f);
  const std::vector<float> one_pass = setup.run(kv, gate, {total});
  ASSERT_EQ(static_cast<int64_t>(one_pass.size()), total / ratio * kHeadDim);
  EXPECT_LT(testing::max_abs_diff(one_pass, setup.naive(kv, gate, total)), 2e-5) << "ratio " << ratio;
  for (int64_t split = 0; split <= total; ++split)
    EXPECT_EQ(setup.run(kv, gate, {split, total - split}), one_pass) << "ratio " << ratio << " split " << split;
  EXPECT_EQ(setup.run(kv, gate, std::vector<int64_t>(total, 1)), one_pass) << "token by token";
  std::mt19937 rng(ratio);
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<int64_t> chunks;
    for (int64_t left = total; left > 0;) {
      const int64_t n = std::min<int64_t>(left, rng() % (2 * ratio + 3));
      chunks.push_back(n);
      left -= n;
    }
    EXPECT_EQ(setup.run(kv, gate, chunks), one_pass) << "ratio " << ratio << " trial " << trial;
  }
}

TEST(Compressor, OverlappingRatio4AnySplitEqualsOnePass) { expect_split_invariant(4, 23, true); }
TEST(Compressor, Ratio128AnySplitEqualsOnePass) { expect_split_invariant(128, 2 * 128 + 5, false); }
TEST(Compressor, SmallRatiosAnySplitEqualsOnePass) {
  expect_split_invariant(8, 37, false);
  expect_split_invariant(2, 11, false);
  expect_split_invariant(4, 19, false);  // an HCA layer may use ratio 4 too
}
// transformers' compress_rates may give CSA layers another rate: they still pool overlapping windows.
TEST(Compressor, OverlappingOtherRatiosAnySplitEqualsOnePass) {
  expect_split_invariant(8, 37, true);
  expect_split_invariant(2, 11, true);
}

TEST(Compressor, RoundsThePooledEntryToBf16BeforeTheNorm) {
  // Every slot holds the same value per channel, so the pooled value is that value whatever the weights are.
  for (bool round : {false, true}) {
    const CompressorFixture setup(4, round, true);
    const int64_t width = setup.params.projection_width();
    const auto channel_values = random_vector(width, 9);
    std::vector<float> kv;
    for (int t = 0; t < 8; ++t) kv.insert(kv.end(), channel_values.begin(), channel_values.end());
    const auto gate = random_vector(8 * width, 10);
    const auto entries = setup.run(kv, gate, {8});
    const auto expected = setup.naive(kv, gate, 8);
    EXPECT_LT(testing::max_abs_diff(entries, expected), 2e-6) << round;
  }
}

TEST(Compressor, StepProjectsWithLinear) {
  const CompressorFixture setup(4, false, true);
  const int64_t width = setup.params.projection_width(), T = 9;
  const auto wkv_values = random_vector(width * kHidden, 31);
  const auto wgate_values = random_vector(width * kHidden, 32);
  const auto wkv = testing::f32_matrix(wkv_values, width, kHidden);
  const auto wgate = testing::f32_matrix(wgate_values, width, kHidden);
  const auto x = random_vector(T * kHidden, 33);
  std::vector<float> kv(T * width), gate(T * width);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < width; ++r) {
      double a = 0, z = 0;
      for (int64_t i = 0; i < kHidden; ++i) {
        a += double(wkv_values[r * kHidden + i]) * x[t * kHidden + i];
        z += double(wgate_values[r * kHidden + i]) * x[t * kHidden + i];
      }
      kv[t * width + r] = float(a);
      gate[t * width + r] = float(z);
    }
  CompressorWeights weights = setup.weights();
  weights.wkv = &wkv.matrix;
  weights.wgate = &wgate.matrix;
  CompressorState state(4, kHeadDim, true);
  std::vector<float> entries;
  EXPECT_EQ(compressor_step(setup.params, weights, setup.rope, state, x.data(), T, entries), 2);
  EXPECT_LT(testing::max_abs_diff(entries, setup.naive(kv, gate, T)), 1e-5);
}

TEST(Compressor, RejectsMismatchedState) {
  const CompressorFixture setup(4, false, true);
  CompressorState state(128, kHeadDim, false);
  std::vector<float> entries;
  const std::vector<float> kv(2 * kHeadDim), gate(2 * kHeadDim);
  EXPECT_THROW(compressor_pool(setup.params, setup.weights(), setup.rope, state, kv.data(), gate.data(), 1, entries),
               Error);
}

}  // namespace
}  // namespace dsv4::cpu
