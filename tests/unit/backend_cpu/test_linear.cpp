#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "backends/cpu/linear.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

OwnedQuantizedMatrix make_matrix(WeightFormat format, ScaleType scale_type, const std::vector<float>& values,
                                 int64_t rows, int64_t cols) {
  switch (format) {
    case WeightFormat::F32: return testing::f32_matrix(values, rows, cols);
    case WeightFormat::BF16: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::BF16, rows, cols, ScaleType::NONE);
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits = float_to_bf16(values[i]);
        std::memcpy(m.storage->data.data() + 2 * i, &bits, 2);
      }
      return m;
    }
    case WeightFormat::FP8_BLOCK128: return quantize_fp8_block128(values.data(), rows, cols, scale_type);
    case WeightFormat::MXFP4: return quantize_mxfp4(values.data(), rows, cols);
    case WeightFormat::NVFP4: return quantize_nvfp4(values.data(), rows, cols);
  }
  return {};
}

// y = x · dequantize(w)ᵀ in double.
std::vector<double> reference_matmul(const QuantizedMatrix& w, const std::vector<float>& x, int64_t T) {
  const std::vector<float> dense = dequantize(w);
  std::vector<double> y(T * w.rows);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < w.rows; ++n) {
      double s = 0;
      for (int64_t k = 0; k < w.cols; ++k) s += double(dense[n * w.cols + k]) * x[t * w.cols + k];
      y[t * w.rows + n] = s;
    }
  return y;
}

struct FormatCase {
  WeightFormat format;
  ScaleType scale_type;
};

class LinearFormats : public ::testing::TestWithParam<FormatCase> {};

TEST_P(LinearFormats, MatchesDequantizeThenNaiveMatmul) {
  const auto [format, scale_type] = GetParam();
  // Shapes with partial scale blocks, odd K, a single row, and a K long enough for one-row tiles.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{200, 300}, {1, 64}, {37, 129}, {5, 70001}, {130, 256}};
  uint32_t seed = 1;
  for (const auto& [N, K] : shapes) {
    const auto values = random_vector(N * K, seed++, -2.0f, 2.0f);
    const OwnedQuantizedMatrix w = make_matrix(format, scale_type, values, N, K);
    for (int64_t T : {0, 1, 2, 3, 7}) {
      const auto x = random_vector(T * K, seed++);
      std::vector<float> y(T * N, std::nanf(""));
      linear(w.matrix, x.data(), T, y.data());
      const auto expected = reference_matmul(w.matrix, x, T);
      // fp32 accumulation over K terms of size ~1: error grows like sqrt(K)·eps.
      const double tolerance = 1e-6 * std::sqrt(double(K)) * 8;
      EXPECT_LT(testing::max_abs_diff(y, expected), tolerance)
          << to_string(format) << " N=" << N << " K=" << K << " T=" << T;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, LinearFormats,
                         ::testing::Values(FormatCase{WeightFormat::F32, ScaleType::NONE},
                                           FormatCase{WeightFormat::BF16, ScaleType::NONE},
                                           FormatCase{WeightFormat::FP8_BLOCK128, ScaleType::E8M0},
                                           FormatCase{WeightFormat::FP8_BLOCK128, ScaleType::F32},
                                           FormatCase{WeightFormat::MXFP4, ScaleType::E8M0},
                                           FormatCase{WeightFormat::NVFP4, ScaleType::E4M3}),
                         [](const auto& info) {
                           return std::string(to_string(info.param.format)) + "_" +
                                  std::string(to_string(info.param.scale_type));
                         });

TEST(GroupedLinear, EachGroupReadsItsOwnSlice) {
  const int64_t G = 3, R = 5, K = 17, T = 4;
  const auto values = random_vector(G * R * K, 41);
  const auto w = testing::f32_matrix(values, G * R, K);
  const auto x = random_vector(T * G * K, 42);
  std::vector<float> y(T * G * R);
  grouped_linear(w.matrix, G, x.data(), T, y.data());
  std::vector<double> expected(T * G * R);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < R; ++r) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(values[(g * R + r) * K + k]) * x[(t * G + g) * K + k];
        expected[(t * G + g) * R + r] = s;
      }
  EXPECT_LT(testing::max_abs_diff(y, expected), 1e-5);
}

TEST(Linear, RejectsBadArguments) {
  const auto w = testing::f32_matrix(random_vector(6, 1), 3, 2);
  std::vector<float> x(4), y(6);
  EXPECT_THROW(grouped_linear(w.matrix, 2, x.data(), 1, y.data()), Error);
  EXPECT_THROW(linear(w.matrix, x.data(), -1, y.data()), Error);
  QuantizedMatrix empty;
  EXPECT_THROW(linear(empty, x.data(), 1, y.data()), Error);
}

}  // namespace
}  // namespace dsv4::cpu
