#include <gtest/gtest.h>

#include <cmath>

#include "backends/cpu/mhc.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

// A literal transcription of dsv4-model.md §2 in double precision.
void naive_sinkhorn(std::vector<double>& c, int n, int iters, double eps) {
  for (int j = 0; j < n; ++j) {
    double max = -1e300, sum = 0;
    for (int k = 0; k < n; ++k) max = std::max(max, c[j * n + k]);
    for (int k = 0; k < n; ++k) sum += std::exp(c[j * n + k] - max);
    for (int k = 0; k < n; ++k) c[j * n + k] = std::exp(c[j * n + k] - max) / sum + eps;
  }
  const auto cols = [&] {
    for (int k = 0; k < n; ++k) {
      double s = 0;
      for (int j = 0; j < n; ++j) s += c[j * n + k];
      for (int j = 0; j < n; ++j) c[j * n + k] /= s + eps;
    }
  };
  const auto rows = [&] {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += c[j * n + k];
      for (int k = 0; k < n; ++k) c[j * n + k] /= s + eps;
    }
  };
  cols();
  for (int i = 1; i < iters; ++i) {
    rows();
    cols();
  }
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

struct NaivePre {
  std::vector<double> y, post, comb;
};

NaivePre naive_hc_pre(const std::vector<float>& fn, const std::vector<float>& base, const std::vector<float>& scale,
                      const std::vector<float>& X, int64_t T, int64_t n, int64_t d, int iters, double eps) {
  NaivePre out{std::vector<double>(T * d), std::vector<double>(T * n), std::vector<double>(T * n * n)};
  const int64_t flat = n * d, rows = (2 + n) * n;
  for (int64_t t = 0; t < T; ++t) {
    const float* xf = X.data() + t * flat;
    double ss = 0;
    for (int64_t i = 0; i < flat; ++i) ss += double(xf[i]) * xf[i];
    const double r = 1.0 / std::sqrt(ss / flat + 1e-6);
    std::vector<double> m(rows);
    for (int64_t q = 0; q < rows; ++q) {
      double s = 0;
      for (int64_t i = 0; i < flat; ++i) s += double(fn[q * flat + i]) * xf[i];
      m[q] = s * r;
    }
    std::vector<double> pre(n), c(n * n);
    for (int64_t k = 0; k < n; ++k) {
      pre[k] = sigmoid(m[k] * scale[0] + base[k]) + eps;
      out.post[t * n + k] = 2 * sigmoid(m[n + k] * scale[1] + base[n + k]);
    }
    for (int64_t jk = 0; jk < n * n; ++jk) c[jk] = m[2 * n + jk] * scale[2] + base[2 * n + jk];
    naive_sinkhorn(c, n, iters, eps);
    std::copy(c.begin(), c.end(), out.comb.begin() + t * n * n);
    for (int64_t i = 0; i < d; ++i) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) s += pre[k] * xf[k * d + i];
      out.y[t * d + i] = s;
    }
  }
  return out;
}

TEST(Sinkhorn, DoublyStochasticAndMatchesTranscription) {
  for (int n : {2, 4, 5}) {
    for (uint32_t seed = 0; seed < 20; ++seed) {
      // Moderate logits, like the model's: 20 iterations leave rows of extreme ones (±4) off by ~2e-2.
      auto logits = random_vector(n * n, seed, -2.0f, 2.0f);
      std::vector<double> expected(logits.begin(), logits.end());
      sinkhorn(logits.data(), n, 20, 1e-6f);
      naive_sinkhorn(expected, n, 20, 1e-6);
      EXPECT_LT(testing::max_abs_diff(logits, expected), 1e-6);
      // The final step normalises columns exactly (up to eps); rows converge.
      for (int k = 0; k < n; ++k) {
        double col = 0;
        for (int j = 0; j < n; ++j) col += logits[j * n + k];
        EXPECT_NEAR(col, 1.0, 1e-5) << "column " << k;
      }
      for (int j = 0; j < n; ++j) {
        double row = 0;
        for (int k = 0; k < n; ++k) row += logits[j * n + k];
        EXPECT_NEAR(row, 1.0, 1e-3) << "row " << j;
      }
    }
  }
}

TEST(Sinkhorn, OneIterationIsSoftmaxThenColumns) {
  const int n = 3;
  auto logits = random_vector(n * n, 5, -2.0f, 2.0f);
  std::vector<double> expected(logits.begin(), logits.end());
  sinkhorn(logits.data(), n, 1, 1e-6f);
  naive_sinkhorn(expected, n, 1, 1e-6);
  EXPECT_LT(testing::max_abs_diff(logits, expected), 1e-7);
}

class MhcTest : public ::testing::Test {
 protected:
  static constexpr int64_t T = 3, n = 4, d = 40, flat = n * d, rows = (2 + n) * n;
  std::vector<float> fn = random_vector(rows * flat, 1, -0.3f, 0.3f);
  std::vector<float> base = random_vector(rows, 2);
  std::vector<float> scale = random_vector(3, 3, 0.5f, 2.0f);
  std::vector<float> X = random_vector(T * flat, 4, -2.0f, 2.0f);
  MhcParams params{.tokens = T, .hidden = d, .streams = n};
};

TEST_F(MhcTest, PreMatchesFormula) {
  std::vector<float> y(T * d), post(T * n), comb(T * n * n);
  hc_pre({fn.data(), base.data(), scale.data()}, X.data(), params, y.data(), post.data(), comb.data());
  const NaivePre expected = naive_hc_pre(fn, base, scale, X, T, n, d, 20, 1e-6);
  EXPECT_LT(testing::max_abs_diff(y, expected.y), 1e-5);
  EXPECT_LT(testing::max_abs_diff(post, expected.post), 1e-6);
  EXPECT_LT(testing::max_abs_diff(comb, expected.comb), 1e-6);
  for (float p : post) EXPECT_TRUE(p > 0.0f && p < 2.0f);
}

TEST_F(MhcTest, PostSumsOverTheFirstIndexAndMayWorkInPlace) {
  const auto out = random_vector(T * d, 8);
  const auto post = random_vector(T * n, 9, 0.0f, 2.0f);
  const auto comb = random_vector(T * n * n, 10, 0.0f, 1.0f);  // deliberately not symmetric
  std::vector<double> expected(T * flat);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < n; ++k)
      for (int64_t i = 0; i < d; ++i) {
        double s = double(post[t * n + k]) * out[t * d + i];
        for (int64_t j = 0; j < n; ++j) s += double(comb[(t * n + j) * n + k]) * X[(t * n + j) * d + i];
        expected[(t * n + k) * d + i] = s;
      }
  std::vector<float> fresh(T * flat);
  hc_post(out.data(), X.data(), post.data(), comb.data(), params, fresh.data());
  EXPECT_LT(testing::max_abs_diff(fresh, expected), 1e-5);
  auto in_place = X;
  hc_post(out.data(), in_place.data(), post.data(), comb.data(), params, in_place.data());
  EXPECT_EQ(in_place, fresh);
}

TEST_F(MhcTest, HeadMatchesFormula) {
  const auto head_fn = random_vector(n * flat, 11, -0.3f, 0.3f);
  const auto head_base = random_vector(n, 12);
  const float head_scale = 1.3f;
  std::vector<float> h(T * d);
  hc_head({head_fn.data(), head_base.data(), &head_scale}, X.data(), params, h.data());
  std::vector<double> expected(T * d);
  for (int64_t t = 0; t < T; ++t) {
    const float* xf = X.data() + t * flat;
    double ss = 0;
    for (int64_t i = 0; i < flat; ++i) ss += double(xf[i]) * xf[i];
    const double r = 1.0 / std::sqrt(ss / flat + 1e-6);
    for (int64_t k = 0; k < n; ++k) {
      double m = 0;
      for (int64_t i = 0; i < flat; ++i) m += double(head_fn[k * flat + i]) * xf[i];
      const double p = sigmoid(m * r * head_scale + head_base[k]) + 1e-6;
      for (int64_t i = 0; i < d; ++i) expected[t * d + i] += p * xf[k * d + i];
    }
  }
  EXPECT_LT(testing::max_abs_diff(h, expected), 1e-5);
}

}  // namespace
}  // namespace dsv4::cpu
