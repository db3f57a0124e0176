// The CUDA decode GEMV against dsv4::cpu::linear: every format × T ∈ {1, 3, 8} × shapes including odd row counts,
// split-K shapes and K that is not a multiple of the FP8 block. Fresh random weights and activations per case, the
// output poisoned with NaN (plus a guard region past its end) before each run, every element checked.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/linear.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_gemv.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"

namespace dsv4::cuda {
namespace {

bool has_device() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

OwnedQuantizedMatrix quantize(WeightFormat format, const std::vector<float>& values, int64_t rows, int64_t cols) {
  switch (format) {
    case WeightFormat::FP8_BLOCK128: return quantize_fp8_block128(values.data(), rows, cols, ScaleType::E8M0);
    case WeightFormat::MXFP4: return quantize_mxfp4(values.data(), rows, cols);
    case WeightFormat::NVFP4: return quantize_nvfp4(values.data(), rows, cols);
    default: fail("test: no quantizer for ", to_string(format));
  }
}

struct GemvCase {
  WeightFormat format;
  int64_t rows, cols;
  int tokens;
};

std::string case_name(const GemvCase& c) {
  return std::string(to_string(c.format)) + " [" + std::to_string(c.rows) + ", " + std::to_string(c.cols) +
         "] T=" + std::to_string(c.tokens);
}

void check_against_cpu(const GemvCase& c, uint32_t seed) {
  SCOPED_TRACE(case_name(c));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> weights(size_t(c.rows * c.cols)), x(size_t(c.tokens * c.cols));
  // Per-row magnitudes spread over 2^±6 so the scale blocks differ.
  for (int64_t n = 0; n < c.rows; ++n) {
    const float row_scale = std::ldexp(1.0f, int(rng() % 13) - 6);
    for (int64_t k = 0; k < c.cols; ++k) weights[size_t(n * c.cols + k)] = normal(rng) * row_scale;
  }
  for (float& v : x) v = normal(rng);
  const OwnedQuantizedMatrix host = quantize(c.format, weights, c.rows, c.cols);

  std::vector<float> reference(size_t(c.tokens * c.rows));
  cpu::linear(host.matrix, x.data(), c.tokens, reference.data());
  // Bound for fp32 accumulation in another order: a multiple of eps × Σ|w·x| per output.
  const std::vector<float> dequantized = dequantize(host.matrix);
  std::vector<double> magnitude(reference.size(), 0.0);
  for (int t = 0; t < c.tokens; ++t)
    for (int64_t n = 0; n < c.rows; ++n) {
      double sum = 0.0;
      for (int64_t k = 0; k < c.cols; ++k)
        sum += std::fabs(double(dequantized[size_t(n * c.cols + k)]) * x[size_t(t * c.cols + k)]);
      magnitude[size_t(t * c.rows + n)] = sum;
    }

  const DeviceMatrix device_weight(host.matrix, "gemv test weight");
  DeviceBuffer device_x(x.size() * sizeof(float), "x");
  device_x.upload(x.data(), x.size() * sizeof(float));
  constexpr size_t kGuardFloats = 64;
  const size_t y_floats = reference.size();
  DeviceBuffer device_y((y_floats + kGuardFloats) * sizeof(float), "y");
  device_y.fill_bytes(0xFF);  // every float a NaN

  run_quantized_gemv({.weight = device_weight.view(),
                      .x = device_x.as<float>(),
                      .y = device_y.as<float>(),
                      .tokens = c.tokens,
                      .stream = nullptr});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> y(y_floats + kGuardFloats);
  device_y.download(y.data(), y.size() * sizeof(float));

  int failures = 0;
  for (size_t i = 0; i < y_floats && failures < 10; ++i) {
    const double tolerance = 1e-5 * magnitude[i] + 1e-30;
    const bool ok = std::isfinite(y[i]) && std::fabs(double(y[i]) - reference[i]) <= tolerance;
    if (!ok) {
      ++failures;
      ADD_FAILURE() << "y[t=" << i / size_t(c.rows) << ", n=" << i % size_t(c.rows) << "] = " << y[i]
                    << ", reference " << reference[i] << ", tolerance " << tolerance;
    }
  }
  for (size_t i = y_floats; i < y.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &y[i], sizeof bits);
    ASSERT_EQ(bits, 0xFFFFFFFFu) << "write past the end of y at float " << i;
  }
}

TEST(QuantizedGemv, MatchesCpuLinearForEveryFormatTokenCountAndShape) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const WeightFormat formats[] = {WeightFormat::FP8_BLOCK128, WeightFormat::MXFP4, WeightFormat::NVFP4};
  // (N, K): single row, odd N, N not a multiple of the 16-row CTA, split-K (few rows, long K), V4-Flash-like.
  const std::pair<int64_t, int64_t> shapes[] = {{1, 128}, {17, 128}, {300, 4096}, {17, 4096}, {1, 4096},
                                                {300, 416}, {4096, 2048}, {2048, 4096}, {129, 8192}};
  uint32_t seed = 1;
  for (const WeightFormat format : formats)
    for (const auto& [rows, cols] : shapes)
      for (const int tokens : {1, 3, 8}) check_against_cpu({format, rows, cols, tokens}, seed++);
}

TEST(QuantizedGemv, EveryTokenCountFromOneToEight) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1000;
  for (const WeightFormat format : {WeightFormat::FP8_BLOCK128, WeightFormat::MXFP4, WeightFormat::NVFP4})
    for (int tokens = 1; tokens <= kGemvMaxTokens; ++tokens) check_against_cpu({format, 33, 1024, tokens}, seed++);
}

TEST(QuantizedGemv, FpEightWithPartialScaleBlockAlongK) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // K = 400 and 4112: the last 128-wide scale block holds 16 columns.
  check_against_cpu({WeightFormat::FP8_BLOCK128, 130, 400, 3}, 77);
  check_against_cpu({WeightFormat::FP8_BLOCK128, 257, 4112, 1}, 78);
}

void expect_error_containing(const QuantizedGemvParams& params, const std::string& needle) {
  try {
    run_quantized_gemv(params);
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(QuantizedGemv, RefusesUnsupportedCallsNamingTheProblem) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<float> values(64 * 256, 0.5f);
  const OwnedQuantizedMatrix fp8_f32 = quantize_fp8_block128(values.data(), 64, 256, ScaleType::F32);
  const OwnedQuantizedMatrix mx = quantize_mxfp4(values.data(), 64, 256);
  const DeviceMatrix fp8_f32_device(fp8_f32.matrix, "fp8 f32-scaled");
  const DeviceMatrix mx_device(mx.matrix, "mxfp4");
  DeviceBuffer x(9 * 256 * sizeof(float), "x"), y(9 * 64 * sizeof(float), "y");
  const QuantizedGemvParams good{.weight = mx_device.view(), .x = x.as<float>(), .y = y.as<float>(), .tokens = 1};

  QuantizedGemvParams p = good;
  p.tokens = 9;
  expect_error_containing(p, "9 tokens");
  p = good;
  p.weight = fp8_f32_device.view();
  expect_error_containing(p, "f32 scales");
  p = good;
  p.weight.cols = 240;  // a view whose K is not a whole number of 16-byte fp4 vectors
  expect_error_containing(p, "K = 240 of weight [64, 240]");
  p = good;
  p.y = const_cast<float*>(p.x) + 8;
  expect_error_containing(p, "alias");
  p = good;
  p.x = p.x + 1;
  expect_error_containing(p, "16-byte aligned");
}

}  // namespace
}  // namespace dsv4::cuda
