#include <gtest/gtest.h>

#include <cmath>

#include "backends/cpu/rms_norm.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

std::vector<double> naive_rms_norm(const std::vector<float>& x, const float* w, int64_t rows, int64_t dim, double eps) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t i = 0; i < dim; ++i) sum += double(x[r * dim + i]) * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(sum / dim + eps);
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * (w ? w[i] : 1.0);
  }
  return y;
}

TEST(RmsNorm, MatchesFormulaWithAndWithoutWeight) {
  for (int64_t dim : {1, 7, 64, 513}) {
    const int64_t rows = 5;
    const auto x = random_vector(rows * dim, 1 + dim, -3.0f, 3.0f);
    const auto w = random_vector(dim, 2 + dim, 0.5f, 1.5f);
    for (const float* weight : {w.data(), static_cast<const float*>(nullptr)}) {
      std::vector<float> y(x.size());
      rms_norm(x.data(), weight, y.data(), {.rows = rows, .dim = dim, .eps = 1e-6f});
      EXPECT_LT(testing::max_abs_diff(y, naive_rms_norm(x, weight, rows, dim, 1e-6)), 2e-6) << dim;
    }
  }
}

TEST(RmsNorm, InPlaceAndEpsilonOnZeroInput) {
  std::vector<float> x = random_vector(3 * 16, 9);
  const auto expected = naive_rms_norm(x, nullptr, 3, 16, 1e-6);
  rms_norm(x.data(), nullptr, x.data(), {.rows = 3, .dim = 16, .eps = 1e-6f});
  EXPECT_LT(testing::max_abs_diff(x, expected), 2e-6);
  std::vector<float> zeros(8, 0.0f);
  rms_norm(zeros.data(), nullptr, zeros.data(), {.rows = 1, .dim = 8, .eps = 1e-6f});
  for (float v : zeros) EXPECT_EQ(v, 0.0f);
}

TEST(RmsNorm, RejectsBadShape) {
  float x = 1;
  EXPECT_THROW(rms_norm(&x, nullptr, &x, {.rows = 1, .dim = 0}), Error);
}

}  // namespace
}  // namespace dsv4::cpu
