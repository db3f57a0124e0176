#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "backends/cpu/attention.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

struct Problem {
  int64_t T = 3, H = 4, D = 32, window_rows = 20, compressed_rows = 9, window_slots = 6, compressed_slots = 5;
  std::vector<float> q, window_kv, compressed_kv, sink;
  std::vector<int32_t> window_index, compressed_index;
  std::vector<int64_t> positions;

  explicit Problem(uint32_t seed) {
    q = random_vector(T * H * D, seed, -1.0f, 1.0f);
    window_kv = random_vector(window_rows * D, seed + 1, -1.0f, 1.0f);
    compressed_kv = random_vector(compressed_rows * D, seed + 2, -1.0f, 1.0f);
    sink = random_vector(H, seed + 3, -1.0f, 2.0f);
    std::mt19937 rng(seed + 4);
    // Random index sets with −1 holes and repeats (nothing is de-duplicated).
    for (int64_t i = 0; i < T * window_slots; ++i)
      window_index.push_back(rng() % 4 == 0 ? -1 : int32_t(rng() % window_rows));
    for (int64_t i = 0; i < T * compressed_slots; ++i)
      compressed_index.push_back(rng() % 3 == 0 ? -1 : int32_t(rng() % compressed_rows));
    for (int64_t t = 0; t < T; ++t) positions.push_back(100 + 7 * t);
  }

  SparseAttentionInputs inputs(const RopeTable* rope, const float* sink_ptr) const {
    return {.q = q.data(),
            .attn_sink = sink_ptr,
            .window_kv = window_kv.data(),
            .window_rows = window_rows,
            .window_index = window_index.data(),
            .compressed_kv = compressed_kv.data(),
            .compressed_rows = compressed_rows,
            .compressed_index = compressed_index.data(),
            .positions = positions.data(),
            .rope = rope};
  }
  SparseAttentionParams params() const {
    return {.tokens = T,
            .heads = H,
            .head_dim = D,
            .softmax_scale = 1.0f / std::sqrt(float(D)),
            .window_slots = window_slots,
            .compressed_slots = compressed_slots};
  }

  // The naive double loop of dsv4-model.md §3.4, in double.
  std::vector<double> naive(const RopeTable* rope, const float* sink_ptr) const {
    std::vector<double> out(T * H * D, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        std::vector<const float*> kv;
        for (int64_t s = 0; s < window_slots; ++s)
          if (int32_t r = window_index[t * window_slots + s]; r >= 0) kv.push_back(window_kv.data() + r * D);
        for (int64_t s = 0; s < compressed_slots; ++s)
          if (int32_t r = compressed_index[t * compressed_slots + s]; r >= 0)
            kv.push_back(compressed_kv.data() + r * D);
        const float* qv = q.data() + (t * H + h) * D;
        std::vector<double> s(kv.size());
        double max = -1e300;
        for (size_t j = 0; j < kv.size(); ++j) {
          double dot = 0;
          for (int64_t i = 0; i < D; ++i) dot += double(qv[i]) * kv[j][i];
          s[j] = dot / std::sqrt(double(D));
          max = std::max(max, s[j]);
        }
        double den = sink_ptr ? std::exp(double(sink_ptr[h]) - max) : 0.0;
        for (double v : s) den += std::exp(v - max);
        double* o = out.data() + (t * H + h) * D;
        for (size_t j = 0; j < kv.size(); ++j)
          for (int64_t i = 0; i < D; ++i) o[i] += std::exp(s[j] - max) / den * kv[j][i];
        if (rope) {
          std::vector<float> tail(o + D - rope->rope_dim(), o + D);
          rope->rotate_inverse(tail.data(), positions[t]);
          std::copy(tail.begin(), tail.end(), o + D - rope->rope_dim());
        }
      }
    return out;
  }
};

TEST(SparseAttention, MatchesNaiveLoopWithRandomIndexSets) {
  const RopeTable rope(10000.0, 8);
  for (uint32_t seed : {1u, 2u, 3u, 4u}) {
    const Problem p(seed * 10);
    for (const RopeTable* r : {&rope, static_cast<const RopeTable*>(nullptr)}) {
      std::vector<float> out(p.T * p.H * p.D, std::numeric_limits<float>::quiet_NaN());
      sparse_attention(p.inputs(r, p.sink.data()), p.params(), out.data());
      EXPECT_LT(testing::max_abs_diff(out, p.naive(r, p.sink.data())), 2e-6) << seed;
    }
  }
}

TEST(SparseAttention, MinusInfinitySinkIsPlainSoftmax) {
  const Problem p(77);
  const std::vector<float> minus_inf(p.H, -std::numeric_limits<float>::infinity());
  std::vector<float> with_sink(p.T * p.H * p.D), without(p.T * p.H * p.D);
  sparse_attention(p.inputs(nullptr, minus_inf.data()), p.params(), with_sink.data());
  sparse_attention(p.inputs(nullptr, nullptr), p.params(), without.data());
  EXPECT_EQ(with_sink, without);
  EXPECT_LT(testing::max_abs_diff(without, p.naive(nullptr, nullptr)), 2e-6);
}

TEST(SparseAttention, SingleEntryWithSinkScalesTheValue) {
  // One entry: o = v · e^s / (e^s + e^sink).
  const int64_t D = 8;
  const auto q = random_vector(D, 1);
  const auto kv = random_vector(D, 2);
  const float sink = 0.5f;
  const int32_t index = 0;
  std::vector<float> out(D);
  sparse_attention({.q = q.data(), .attn_sink = &sink, .window_kv = kv.data(), .window_rows = 1,
                    .window_index = &index},
                   {.tokens = 1, .heads = 1, .head_dim = D, .softmax_scale = 0.25f, .window_slots = 1},
                   out.data());
  double dot = 0;
  for (int i = 0; i < D; ++i) dot += double(q[i]) * kv[i];
  const double s = 0.25 * dot;
  const double weight = std::exp(s) / (std::exp(s) + std::exp(double(sink)));
  for (int i = 0; i < D; ++i) EXPECT_NEAR(out[i], weight * kv[i], 1e-6);
}

TEST(SparseAttention, QueryWithoutEntriesGivesZeros) {
  const int64_t D = 4;
  const std::vector<float> q(D, 1.0f), kv(D, 1.0f);
  const int32_t none = -1;
  std::vector<float> out(D, 5.0f);
  sparse_attention({.q = q.data(), .window_kv = kv.data(), .window_rows = 1, .window_index = &none},
                   {.tokens = 1, .heads = 1, .head_dim = D, .softmax_scale = 0.5f, .window_slots = 1}, out.data());
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(SparseAttention, RejectsOutOfRangeIndices) {
  Problem p(5);
  p.compressed_index[4] = int32_t(p.compressed_rows);
  std::vector<float> out(p.T * p.H * p.D);
  EXPECT_THROW(sparse_attention(p.inputs(nullptr, nullptr), p.params(), out.data()), Error);
}

}  // namespace
}  // namespace dsv4::cpu
