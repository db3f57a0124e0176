#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "backends/cpu/indexer.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

TEST(IndexerScores, MatchFormulaAndMaskInvisibleKeys) {
  const int64_t T = 4, H = 6, D = 16, keys = 70;  // more than one 64-key block
  const IndexerParams params{.tokens = T, .heads = H, .head_dim = D, .ratio = 4, .top_k = 8};
  const auto q = random_vector(T * H * D, 1);
  const auto w = random_vector(T * H, 2);
  const auto k = random_vector(keys * D, 3);
  const std::vector<int64_t> positions = {2, 3, 150, 400};  // 0, 1, 37 and all 70 keys visible
  std::vector<float> scores(T * keys);
  indexer_scores({q.data(), w.data(), k.data(), keys, positions.data()}, params, scores.data());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t visible = std::min<int64_t>(keys, (positions[t] + 1) / 4);
    EXPECT_EQ(visible_key_count(positions[t], 4, keys), visible);
    for (int64_t j = 0; j < keys; ++j) {
      if (j >= visible) {
        EXPECT_EQ(scores[t * keys + j], -std::numeric_limits<float>::infinity());
        continue;
      }
      double expected = 0;
      for (int64_t h = 0; h < H; ++h) {
        double dot = 0;
        for (int64_t i = 0; i < D; ++i) dot += double(q[(t * H + h) * D + i]) * k[j * D + i];
        expected += double(w[t * H + h]) / std::sqrt(double(D)) / std::sqrt(double(H)) * std::max(dot, 0.0);
      }
      EXPECT_NEAR(scores[t * keys + j], expected, 1e-5) << t << "," << j;
    }
  }
}

TEST(SelectTopK, PicksLargestTiesToLowerIndex) {
  const std::vector<float> scores = {0.5f, 2.0f, -1.0f, 2.0f, 7.0f, 0.5f};
  int32_t out[6];
  ASSERT_EQ(select_top_k(scores.data(), 6, 4, out), 4);
  EXPECT_EQ(std::vector<int32_t>(out, out + 4), (std::vector<int32_t>{4, 1, 3, 0}));
}

TEST(SelectTopK, FewerVisibleThanK) {
  const auto scores = random_vector(10, 4);
  int32_t out[8];
  ASSERT_EQ(select_top_k(scores.data(), 3, 8, out), 3);
  EXPECT_EQ(std::set<int32_t>(out, out + 3), (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(select_top_k(scores.data(), 0, 8, out), 0);
}

TEST(SelectTopK, RejectsNan) {
  const std::vector<float> scores = {1.0f, std::nanf("")};
  int32_t out[2];
  EXPECT_THROW(select_top_k(scores.data(), 2, 1, out), Error);
}

TEST(IndexerSelect, OnlyVisibleEntriesPaddedWithMinusOne) {
  const int64_t T = 3, H = 2, D = 8, keys = 40, k = 5;
  const IndexerParams params{.tokens = T, .heads = H, .head_dim = D, .ratio = 4, .top_k = k};
  const auto q = random_vector(T * H * D, 5);
  const auto w = random_vector(T * H, 6, 0.1f, 1.0f);
  const auto keys_data = random_vector(keys * D, 7);
  const std::vector<int64_t> positions = {6, 2, 100};  // 1, 0 and 25 visible
  std::vector<int32_t> selected(T * k);
  std::vector<int32_t> counts(T);
  indexer_select({q.data(), w.data(), keys_data.data(), keys, positions.data()}, params, selected.data(),
                 counts.data());
  EXPECT_EQ(counts, (std::vector<int32_t>{1, 0, 5}));
  EXPECT_EQ(selected[0], 0);
  for (int i = 1; i < k; ++i) EXPECT_EQ(selected[i], -1);
  for (int i = 0; i < k; ++i) EXPECT_EQ(selected[k + i], -1);
  // The third query's picks are the 5 best of its 25 visible scores.
  std::vector<float> scores(T * keys);
  indexer_scores({q.data(), w.data(), keys_data.data(), keys, positions.data()}, params, scores.data());
  std::vector<int32_t> expected(k);
  select_top_k(scores.data() + 2 * keys, 25, k, expected.data());
  EXPECT_EQ(std::vector<int32_t>(selected.begin() + 2 * k, selected.end()), expected);
  for (int32_t j : expected) EXPECT_LT(j, 25);
}

}  // namespace
}  // namespace dsv4::cpu
