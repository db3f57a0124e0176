// The CUDA GEMM against dsv4::cpu::linear / grouped_linear: every weight format (BF16, FP8_BLOCK128 with e8m0 and
// f32 scales, MXFP4, NVFP4) × T ∈ {1, 9, 33, 64 (64-token tiles, split-K), 65, 128, 300, 4096} × V4-Flash shapes
// (wq_a, wkv, wq_b, wo_b, expert) and odd ones (N = 192, K = 192; N = 100), the grouped wo_a, bf16 output. Fresh
// random weights per shape and activations per case; the CPU op gets the same bf16-rounded x; the output is
// poisoned with NaN before each run and every element is checked (for T = 4096, the values of a subset of token
// rows, all columns, to keep the CPU reference affordable; every element of the other rows must be finite). Calls
// that split K run twice on one workspace and must agree bit for bit (fixed reduction order, tickets reset).
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/linear.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_gemm.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

struct WeightKind {
  WeightFormat format;
  ScaleType scale_type;
};

std::string kind_name(const WeightKind& kind) {
  return std::string(to_string(kind.format)) +
         (kind.format == WeightFormat::FP8_BLOCK128 ? "/" + std::string(to_string(kind.scale_type)) : "");
}

OwnedQuantizedMatrix make_weight(const WeightKind& kind, const std::vector<float>& values, int64_t rows,
                                 int64_t cols) {
  switch (kind.format) {
    case WeightFormat::BF16: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::BF16, rows, cols, ScaleType::NONE);
      auto* data = reinterpret_cast<uint16_t*>(m.storage->data.data());
      for (size_t i = 0; i < values.size(); ++i) data[i] = float_to_bf16(values[i]);
      return m;
    }
    case WeightFormat::FP8_BLOCK128: return quantize_fp8_block128(values.data(), rows, cols, kind.scale_type);
    case WeightFormat::MXFP4: return quantize_mxfp4(values.data(), rows, cols);
    case WeightFormat::NVFP4: return quantize_nvfp4(values.data(), rows, cols);
    default: fail("test: no weight maker for ", to_string(kind.format));
  }
}

// Random weights whose rows span magnitudes 2^-6 .. 2^6, so scale blocks differ.
std::vector<float> random_weights(int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(size_t(rows * cols));
  for (int64_t n = 0; n < rows; ++n) {
    const float row_scale = std::ldexp(1.0f, int(rng() % 13) - 6);
    for (int64_t k = 0; k < cols; ++k) w[size_t(n * cols + k)] = normal(rng) * row_scale;
  }
  return w;
}

struct TestWeight {
  OwnedQuantizedMatrix host;
  OwnedQuantizedMatrix magnitude;  // F32 |dequantized W| (NVFP4 global included), for the error bound
  DeviceMatrix device;
};

TestWeight prepare_weight(const WeightKind& kind, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  OwnedQuantizedMatrix host = make_weight(kind, random_weights(rows, cols, rng), rows, cols);
  OwnedQuantizedMatrix magnitude = allocate_quantized_matrix(WeightFormat::F32, rows, cols, ScaleType::NONE);
  const std::vector<float> dequantized = dequantize(host.matrix);
  auto* abs_w = reinterpret_cast<float*>(magnitude.storage->data.data());
  for (size_t i = 0; i < dequantized.size(); ++i) abs_w[i] = std::fabs(dequantized[i]);
  DeviceMatrix device(host.matrix, "gemm test weight");
  return {std::move(host), std::move(magnitude), std::move(device)};
}

struct Layout {
  int64_t x_row_stride_pad = 0;  // extra elements per row of x
  int64_t y_row_stride_pad = 0;  // extra elements per row of y (must stay poisoned)
  int groups = 1;                // grouped projection: x holds groups·K columns
  bool bf16_output = false;      // y_bf16 instead of y
};

// The output as floats: fp32 as written, bf16 widened (poison 0xFFFF stays a NaN with all mantissa bits set).
std::vector<float> download_output(const DeviceBuffer& y, size_t elements, bool bf16) {
  std::vector<float> out(elements);
  if (!bf16) {
    y.download(out.data(), elements * sizeof(float));
    return out;
  }
  std::vector<uint16_t> bits(elements);
  y.download(bits.data(), elements * sizeof(uint16_t));
  for (size_t i = 0; i < elements; ++i) {
    const uint32_t wide = uint32_t(bits[i]) << 16 | (bits[i] == 0xFFFF ? 0xFFFFu : 0u);
    std::memcpy(&out[i], &wide, sizeof wide);
  }
  return out;
}

// Runs the GEMM for `tokens` fresh random tokens and checks it; returns the largest |error| / Σ|w·x| seen.
double check_case(const WeightKind& kind, const TestWeight& weight, int64_t tokens, uint32_t seed,
                  Layout layout = {}) {
  const QuantizedMatrix& w = weight.host.matrix;
  const int64_t rows = w.rows, cols = w.cols;
  const int groups = layout.groups;
  const std::string name = kind_name(kind) + " [" + std::to_string(rows) + ", " + std::to_string(cols) + "] G=" +
                           std::to_string(groups) + (layout.bf16_output ? " bf16 out" : "") +
                           " T=" + std::to_string(tokens);
  SCOPED_TRACE(name);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t x_cols = groups * cols;
  const int64_t x_stride = x_cols + layout.x_row_stride_pad, y_stride = rows + layout.y_row_stride_pad;
  std::vector<uint16_t> x_bits(size_t(tokens * x_stride), 0);
  std::vector<float> x_rounded(size_t(tokens * x_cols));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < x_cols; ++k) {
      const uint16_t bits = float_to_bf16(normal(rng));
      x_bits[size_t(t * x_stride + k)] = bits;
      x_rounded[size_t(t * x_cols + k)] = bf16_to_float(bits);
    }

  // Token rows whose values are checked: all of them, or for long inputs the tile edges plus random rows.
  std::vector<int64_t> checked;
  if (tokens <= 512) {
    for (int64_t t = 0; t < tokens; ++t) checked.push_back(t);
  } else {
    for (const int64_t t : {int64_t(0), int64_t(1), int64_t(127), int64_t(128), int64_t(255), int64_t(256),
                            tokens / 2, tokens - 2, tokens - 1})
      checked.push_back(t);
    for (int i = 0; i < 23; ++i) checked.push_back(int64_t(rng() % uint32_t(tokens)));
    std::sort(checked.begin(), checked.end());
    checked.erase(std::unique(checked.begin(), checked.end()), checked.end());
  }
  const int64_t n_checked = int64_t(checked.size());
  std::vector<float> x_checked(size_t(n_checked * x_cols)), x_abs(size_t(n_checked * x_cols));
  for (int64_t i = 0; i < n_checked; ++i)
    for (int64_t k = 0; k < x_cols; ++k) {
      const float v = x_rounded[size_t(checked[size_t(i)] * x_cols + k)];
      x_checked[size_t(i * x_cols + k)] = v;
      x_abs[size_t(i * x_cols + k)] = std::fabs(v);
    }
  std::vector<float> reference(size_t(n_checked * rows)), magnitude(size_t(n_checked * rows));
  if (groups == 1) {
    cpu::linear(w, x_checked.data(), n_checked, reference.data());
    cpu::linear(weight.magnitude.matrix, x_abs.data(), n_checked, magnitude.data());
  } else {
    cpu::grouped_linear(w, groups, x_checked.data(), n_checked, reference.data());
    cpu::grouped_linear(weight.magnitude.matrix, groups, x_abs.data(), n_checked, magnitude.data());
  }

  DeviceBuffer device_x(x_bits.size() * 2, "x");
  device_x.upload(x_bits.data(), x_bits.size() * 2);
  const size_t y_elements = size_t(tokens * y_stride);
  DeviceBuffer device_y(y_elements * (layout.bf16_output ? 2 : 4), "y");
  const QuantizedGemmConfig config =
      choose_quantized_gemm_config(weight.device.view(), tokens, list_devices().front().multiprocessors);
  DeviceBuffer workspace(std::max<size_t>(quantized_gemm_workspace_bytes(weight.device.view(), tokens), 16),
                         "gemm workspace");
  workspace.fill_bytes(0);  // the tickets start at zero once, at allocation
  const auto run = [&] {
    device_y.fill_bytes(0xFF);  // every output a NaN
    run_quantized_gemm({.weight = weight.device.view(),
                        .x = device_x.as<__nv_bfloat16>(),
                        .x_row_stride = x_stride,
                        .y = layout.bf16_output ? nullptr : device_y.as<float>(),
                        .y_row_stride = y_stride,
                        .tokens = tokens,
                        .stream = nullptr,
                        .groups = groups,
                        .y_bf16 = layout.bf16_output ? device_y.as<__nv_bfloat16>() : nullptr,
                        .workspace = workspace.data(),
                        .workspace_bytes = workspace.bytes()});
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return download_output(device_y, y_elements, layout.bf16_output);
  };
  const std::vector<float> y = run();
  if (config.k_splits > 1) {
    const std::vector<float> again = run();
    EXPECT_EQ(std::memcmp(y.data(), again.data(), y.size() * sizeof(float)), 0)
        << "split-K (" << config.k_splits << " splits) is not deterministic, or left a ticket set";
  }

  // Summation order only: fp32 accumulation over K terms in another order (tensor-core k16 partial sums); seen up
  // to 1e-6 of Σ|w·x| at K = 8192. The f32-scaled FP8 weight is additionally rounded to bf16 once per element
  // (relative 2^-8 at most, double rounding included).
  const double relative = 1e-5 + (kind.format == WeightFormat::FP8_BLOCK128 && kind.scale_type == ScaleType::F32
                                      ? std::ldexp(1.0, -8)
                                      : 0.0);
  // bf16 output: the rounding of the (correct up to `relative`) sum to bf16, half a step at its magnitude.
  double worst = 0.0;
  int failures = 0;
  for (int64_t i = 0; i < n_checked; ++i) {
    const int64_t t = checked[size_t(i)];
    for (int64_t n = 0; n < rows; ++n) {
      const float got = y[size_t(t * y_stride + n)];
      const double expected = reference[size_t(i * rows + n)], bound = magnitude[size_t(i * rows + n)];
      const double error = std::fabs(double(got) - expected);
      const double tolerance =
          relative * bound + 1e-30 +
          (layout.bf16_output ? 0.5 * bf16_ulp(float(std::fabs(expected) + relative * bound)) : 0.0);
      if (bound > 0 && !layout.bf16_output) worst = std::max(worst, error / bound);
      if (!std::isfinite(got) || error > tolerance) {
        if (++failures <= 10)
          ADD_FAILURE() << "y[t=" << t << ", n=" << n << "] = " << got << ", reference " << expected
                        << ", tolerance " << tolerance;
      }
    }
  }
  EXPECT_EQ(failures, 0) << failures << " mismatching elements";
  int64_t unwritten = 0, padding_written = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t n = 0; n < y_stride; ++n) {
      const float v = y[size_t(t * y_stride + n)];
      if (n < rows && !std::isfinite(v)) ++unwritten;
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      if (n >= rows && bits != 0xFFFFFFFFu) ++padding_written;  // download_output widens bf16 poison to this
    }
  EXPECT_EQ(unwritten, 0) << "outputs left unwritten (still NaN) or not finite";
  EXPECT_EQ(padding_written, 0) << "elements between N and the row stride of y were written";
  std::printf("  %-40s %d split(s), max |error| / sum|w x| = %.3g\n", name.c_str(), config.k_splits, worst);
  return worst;
}

const WeightKind kKinds[] = {{WeightFormat::BF16, ScaleType::NONE},
                             {WeightFormat::FP8_BLOCK128, ScaleType::E8M0},
                             {WeightFormat::FP8_BLOCK128, ScaleType::F32},
                             {WeightFormat::MXFP4, ScaleType::E8M0},
                             {WeightFormat::NVFP4, ScaleType::E4M3}};

TEST(QuantizedGemm, OneTileOfBf16IntegersIsExact) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // Small integers: every product and sum is exact, so any layout mistake (swizzle, descriptor, fragment order)
  // shows as a wrong value at a telling position.
  constexpr int64_t kRows = 128, kCols = 64, kTokens = 128;
  std::vector<float> w(kRows * kCols), x(kTokens * kCols);
  for (int64_t n = 0; n < kRows; ++n)
    for (int64_t k = 0; k < kCols; ++k) w[size_t(n * kCols + k)] = float((n * 3 + k * 5) % 7 - 3);
  std::vector<uint16_t> x_bits(x.size());
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t k = 0; k < kCols; ++k) {
      x[size_t(t * kCols + k)] = float((t + 2 * k) % 5 - 2);
      x_bits[size_t(t * kCols + k)] = float_to_bf16(x[size_t(t * kCols + k)]);
    }
  const OwnedQuantizedMatrix host = make_weight({WeightFormat::BF16, ScaleType::NONE}, w, kRows, kCols);
  const DeviceMatrix device_w(host.matrix, "integer weight");
  DeviceBuffer device_x(x_bits.size() * 2, "x"), device_y(size_t(kTokens * kRows) * 4, "y");
  device_x.upload(x_bits.data(), x_bits.size() * 2);
  device_y.fill_bytes(0xFF);
  run_quantized_gemm({.weight = device_w.view(), .x = device_x.as<__nv_bfloat16>(), .x_row_stride = kCols,
                      .y = device_y.as<float>(), .y_row_stride = kRows, .tokens = kTokens});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> y(size_t(kTokens * kRows));
  device_y.download(y.data(), y.size() * 4);
  int failures = 0;
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t n = 0; n < kRows; ++n) {
      double expected = 0;
      for (int64_t k = 0; k < kCols; ++k) expected += double(w[size_t(n * kCols + k)]) * x[size_t(t * kCols + k)];
      const float got = y[size_t(t * kRows + n)];
      if (!(double(got) == expected) && ++failures <= 16)
        ADD_FAILURE() << "y[t=" << t << ", n=" << n << "] = " << got << ", expected " << expected;
    }
  EXPECT_EQ(failures, 0) << failures << " of " << y.size() << " elements wrong";
}

// One TEST per weight kind: the V4-Flash shapes and the odd ones, each at T ∈ {1, 9, 33, 64, 65, 128, 300, 4096}
// (the small ones through 64-token tiles and split-K), plus wq_a and wkv (the most splits) at T ≤ 64.
void check_kind(const WeightKind& kind, uint32_t seed) {
  const std::pair<int64_t, int64_t> shapes[] = {{32768, 1024}, {4096, 8192}, {2048, 4096}, {192, 192}, {100, 128}};
  for (const auto& [rows, cols] : shapes) {
    const TestWeight weight = prepare_weight(kind, rows, cols, seed++);
    for (const int64_t tokens : {1, 9, 33, 64, 65, 128, 300, 4096}) check_case(kind, weight, tokens, seed++);
  }
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1024, 4096}, {512, 4096}}) {
    const TestWeight weight = prepare_weight(kind, rows, cols, seed++);
    for (const int64_t tokens : {1, 16, 64}) check_case(kind, weight, tokens, seed++);
  }
}

TEST(QuantizedGemm, Bf16MatchesCpuLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_kind(kKinds[0], 100);
}
TEST(QuantizedGemm, Fp8E8m0MatchesCpuLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_kind(kKinds[1], 200);
}
TEST(QuantizedGemm, Fp8F32MatchesCpuLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_kind(kKinds[2], 300);
}
TEST(QuantizedGemm, Mxfp4MatchesCpuLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_kind(kKinds[3], 400);
}
TEST(QuantizedGemm, Nvfp4MatchesCpuLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_kind(kKinds[4], 500);
}

TEST(QuantizedGemm, PaddedRowStridesOfXAndY) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 600;
  for (const WeightKind& kind : kKinds) {
    const TestWeight weight = prepare_weight(kind, 320, 512, seed++);
    check_case(kind, weight, 257, seed++, {.x_row_stride_pad = 72, .y_row_stride_pad = 5});
  }
}

TEST(QuantizedGemm, GroupedOutputProjectionInOneLaunch) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // V4-Flash wo_a (8 groups of 1024 rows, K = 4096 per group) and a small grouped shape, with and without split-K.
  uint32_t seed = 700;
  for (const WeightKind& kind : kKinds) {
    const TestWeight flash = prepare_weight(kind, 8192, 4096, seed++);
    for (const int64_t tokens : {1, 64, 200}) check_case(kind, flash, tokens, seed++, {.groups = 8});
    const TestWeight small = prepare_weight(kind, 3 * 128, 192, seed++);
    for (const int64_t tokens : {7, 130}) check_case(kind, small, tokens, seed++, {.x_row_stride_pad = 8, .groups = 3});
  }
}

TEST(QuantizedGemm, Bf16Output) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 800;
  for (const WeightKind& kind : kKinds) {
    const TestWeight weight = prepare_weight(kind, 4096, 8192, seed++);
    for (const int64_t tokens : {3, 64, 300})
      check_case(kind, weight, tokens, seed++, {.y_row_stride_pad = 6, .bf16_output = true});
  }
  const TestWeight wo_a = prepare_weight(kKinds[1], 8192, 4096, seed++);
  check_case(kKinds[1], wo_a, 64, seed++, {.groups = 8, .bf16_output = true});
}

void expect_error_containing(const QuantizedGemmParams& params, const std::string& needle) {
  testing::expect_error([&] { run_quantized_gemm(params); }, needle);
}

TEST(QuantizedGemm, RefusesUnsupportedCallsNamingTheProblem) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<float> values(128 * 256, 0.5f);
  const OwnedQuantizedMatrix mx = quantize_mxfp4(values.data(), 128, 256);
  OwnedQuantizedMatrix f32 = allocate_quantized_matrix(WeightFormat::F32, 128, 256, ScaleType::NONE);
  const DeviceMatrix mx_device(mx.matrix, "mxfp4"), f32_device(f32.matrix, "f32");
  DeviceBuffer x(size_t(300 * 256) * 2, "x"), y(size_t(300 * 128) * 4, "y");
  const QuantizedGemmParams good{.weight = mx_device.view(), .x = x.as<__nv_bfloat16>(), .x_row_stride = 256,
                                 .y = y.as<float>(), .y_row_stride = 128, .tokens = 300};

  QuantizedGemmParams p = good;
  p.weight = f32_device.view();
  expect_error_containing(p, "format is not supported");
  p = good;
  p.weight.cols = 224;
  expect_error_containing(p, "K = 224 must be a positive multiple of 64");
  p = good;
  p.tokens = 0;
  expect_error_containing(p, "0 tokens");
  p = good;
  p.x_row_stride = 200;
  expect_error_containing(p, "x row stride 200");
  p = good;
  p.x_row_stride = 260;
  expect_error_containing(p, "multiple of 8");
  p = good;
  p.y_row_stride = 100;
  expect_error_containing(p, "y row stride 100");
  p = good;
  p.x = p.x + 1;
  expect_error_containing(p, "16-byte aligned");
  p = good;
  p.y = reinterpret_cast<float*>(const_cast<__nv_bfloat16*>(p.x)) + 64;
  expect_error_containing(p, "alias");
  p = good;
  p.weight.scales = nullptr;
  expect_error_containing(p, "no device scales");
  p = good;
  p.groups = 2;  // 64-row groups: not whole 128-row tiles
  p.x_row_stride = 512;
  expect_error_containing(p, "whole 128-row tiles");
  p = good;
  p.y_bf16 = reinterpret_cast<__nv_bfloat16*>(p.y);
  expect_error_containing(p, "exactly one of y (fp32) and y_bf16");
  p = good;
  p.tokens = 16;  // 128 rows in one tile at 16 tokens: K splits, and there is no workspace
  expect_error_containing(p, "needs a workspace");
}

}  // namespace
}  // namespace dsv4::cuda
