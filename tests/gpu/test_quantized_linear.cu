// The tensor-core decode linear layer (run_quantized_linear) against dsv4::cpu::linear / grouped_linear: every format ×
// T ∈ {1, 3, 8, 16, 17, 64} × V4-Flash and V4-Pro projection and expert shapes, the grouped wo_a, odd N and K, the tiny
// test models' shapes (rows that are not 16-byte aligned); fresh random weights and bf16-rounded activations per case
// (the CPU reference gets the same rounded x), y poisoned with NaN (row-stride gaps and a guard region included) before
// each run, every element checked. Also: every e2m1 / e4m3 code × scale dequantises exactly through the MMA path,
// split-K is bitwise deterministic and leaves its tickets zero, and unsupported calls are refused with a message naming
// the problem. Every comparison runs through every load path the layout and token count allow (generic; aligned;
// streamed through shared memory), and AUTO's own config where it is none of theirs (the cluster rules). The bf16
// output is the fp32 output rounded, bit for bit; run_linear (linear_dispatch) gives the CPU's results whichever kernel
// gemm_from_tokens picks (grouped, bf16 output included).
// The RMSNorm prologue equals run_rms_norm (bf16 output) followed by the op bit for bit, and the CPU's rms_norm +
// linear within rounding. The cluster split-K reduction gives the workspace reduction's results bit for bit. Every
// STREAMED config (ring slots 1-4 × K splits × reduction) of the decode shapes matches the CPU, and ring depth never
// changes a bit.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/linear.hpp"
#include "backends/cpu/rms_norm.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/linear_dispatch.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "support/expect_error.hpp"
#include "support/device_buffers.hpp"

namespace dsv4::cuda {
namespace {

enum class TestFormat { BF16, FP8_E8M0, FP8_F32, MXFP4, NVFP4 };
constexpr TestFormat kAllFormats[] = {TestFormat::BF16, TestFormat::FP8_E8M0, TestFormat::FP8_F32, TestFormat::MXFP4,
                                      TestFormat::NVFP4};
constexpr int kTokenCounts[] = {1, 3, 8, 16, 17, 64};

const char* name_of(TestFormat f) {
  switch (f) {
    case TestFormat::BF16: return "BF16";
    case TestFormat::FP8_E8M0: return "FP8_BLOCK128/e8m0";
    case TestFormat::FP8_F32: return "FP8_BLOCK128/f32";
    case TestFormat::MXFP4: return "MXFP4";
    case TestFormat::NVFP4: return "NVFP4";
  }
  return "?";
}

OwnedQuantizedMatrix quantize(TestFormat format, const std::vector<float>& values, int64_t rows, int64_t cols) {
  switch (format) {
    case TestFormat::BF16: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::BF16, rows, cols, ScaleType::NONE);
      auto* out = reinterpret_cast<uint16_t*>(m.storage->data.data());
      for (size_t i = 0; i < values.size(); ++i) out[i] = float_to_bf16(values[i]);
      return m;
    }
    case TestFormat::FP8_E8M0: return quantize_fp8_block128(values.data(), rows, cols, ScaleType::E8M0);
    case TestFormat::FP8_F32: return quantize_fp8_block128(values.data(), rows, cols, ScaleType::F32);
    case TestFormat::MXFP4: return quantize_mxfp4(values.data(), rows, cols);
    case TestFormat::NVFP4: return quantize_nvfp4(values.data(), rows, cols);
  }
  fail("test: unknown format");
}

struct LinearCase {
  TestFormat format;
  int64_t rows, cols;  // the matrix: N × K (K per group when grouped)
  int groups = 1;
  int x_pad = 0, y_pad = 0;  // extra elements per row of x and y (strided views)
};

std::string describe(const LinearCase& c, int tokens) {
  return std::string(name_of(c.format)) + " [" + std::to_string(c.rows) + ", " + std::to_string(c.cols) + "] G=" +
         std::to_string(c.groups) + " T=" + std::to_string(tokens);
}

// Device output of run_quantized_linear, y rows of y_stride floats (gaps and a guard region poisoned beforehand).
struct DeviceRun {
  std::vector<float> y;
  int64_t y_stride;
};


// AUTO runs the default config, the other values the config with that load path; `config`, when set, runs that one.
DeviceRun run_on_device(const DeviceMatrix& weight, const std::vector<uint16_t>& x_bf16, int64_t x_stride,
                        int64_t y_stride, int tokens, int groups, DeviceBuffer& workspace,
                        WeightLoadPath load_path = WeightLoadPath::AUTO,
                        const QuantizedLinearConfig* config = nullptr) {
  DeviceBuffer x(x_bf16.size() * 2, "x");
  x.upload(x_bf16.data(), x_bf16.size() * 2);
  const size_t y_floats = size_t(tokens) * size_t(y_stride);
  DeviceBuffer y((y_floats + kGuardFloats) * sizeof(float), "y");
  y.fill_bytes(0xFF);  // every float a NaN
  const QuantizedLinearParams params{.weight = weight.view(),
                                     .x = x.as<__nv_bfloat16>(),
                                     .x_row_stride = x_stride,
                                     .y = y.as<float>(),
                                     .y_row_stride = y_stride,
                                     .tokens = tokens,
                                     .groups = groups,
                                     .workspace = workspace.data(),
                                     .workspace_bytes = workspace.bytes(),
                                     .stream = nullptr};
  if (config != nullptr)
    run_quantized_linear(params, *config);
  else if (load_path == WeightLoadPath::AUTO)
    run_quantized_linear(params);
  else
    run_quantized_linear(params, choose_quantized_linear_config(weight.view(), tokens, groups,
                                                                list_devices().front().multiprocessors, load_path));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  DeviceRun run{std::vector<float>(y_floats + kGuardFloats), y_stride};
  y.download(run.y.data(), run.y.size() * sizeof(float));
  return run;
}

// The load paths this matrix can run through at this token count: GENERIC always, ALIGNED where rows and group
// tiles allow it, STREAMED where its conditions hold too.
std::vector<WeightLoadPath> load_paths_for(const DeviceMatrixView& weight, int groups, int tokens) {
  if (!tile::weight_rows_aligned(weight) || (weight.rows / groups) % tile::kTileRows != 0)
    return {WeightLoadPath::GENERIC};
  if (!streamed_load_path_applies(weight, tokens, groups)) return {WeightLoadPath::GENERIC, WeightLoadPath::ALIGNED};
  return {WeightLoadPath::GENERIC, WeightLoadPath::ALIGNED, WeightLoadPath::STREAMED};
}

const char* path_name(WeightLoadPath path) {
  return path == WeightLoadPath::ALIGNED    ? "aligned load path"
         : path == WeightLoadPath::STREAMED ? "streamed load path"
         : path == WeightLoadPath::GENERIC  ? "generic load path"
                                            : "default (AUTO) config";
}

// Every distinct STREAMED config of this call: ring slots 1-4 × K splits (the default's and 1, 2, 3, 5, 16 asked
// for) × both split-K reductions, as benchmarks sweep them. Empty where the path does not apply.
std::vector<QuantizedLinearConfig> every_streamed_config(const DeviceMatrixView& weight, int tokens, int groups) {
  std::vector<QuantizedLinearConfig> configs;
  if (!streamed_load_path_applies(weight, tokens, groups)) return configs;
  const int multiprocessors = list_devices().front().multiprocessors;
  for (int slots = 1; slots <= tile::stream::kMaxSlots; ++slots)
    for (const SplitKReduce reduce : {SplitKReduce::WORKSPACE, SplitKReduce::CLUSTER})
      for (const int k_splits : {0, 1, 2, 3, 5, 16}) {
        QuantizedLinearConfig c;
        try {
          c = choose_quantized_linear_config(weight, tokens, groups, multiprocessors, WeightLoadPath::STREAMED, slots,
                                             reduce, k_splits);
        } catch (const Error&) {
          continue;  // the rings do not fit one CTA (BF16 at 3-4 slots with many tokens)
        }
        if (std::none_of(configs.begin(), configs.end(), [&](const QuantizedLinearConfig& o) {
              return o.ring_slots == c.ring_slots && o.k_splits == c.k_splits && o.reduce == c.reduce;
            }))
          configs.push_back(c);
      }
  return configs;
}

// Large enough for the config of every load path (and every STREAMED config).
DeviceBuffer zeroed_workspace(const DeviceMatrixView& weight, int tokens, int groups) {
  const int multiprocessors = list_devices().front().multiprocessors;
  size_t bytes = quantized_linear_workspace_bytes(weight, tokens, groups);
  for (const WeightLoadPath path : load_paths_for(weight, groups, tokens))
    bytes = std::max(bytes,
                     choose_quantized_linear_config(weight, tokens, groups, multiprocessors, path).workspace_bytes);
  for (const QuantizedLinearConfig& c : every_streamed_config(weight, tokens, groups))
    bytes = std::max(bytes, c.workspace_bytes);
  DeviceBuffer workspace(bytes, "linear workspace");
  workspace.fill_bytes(0);  // the tickets start at zero once, at allocation
  return workspace;
}

bool is_poison(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits == 0xFFFFFFFFu;
}

// Checks every case of one matrix for all token counts; the weights are quantized once. With
// `every_streamed`, also every STREAMED config (every_streamed_config), and that configs differing only in ring
// depth give the same bits (the depth changes when stages arrive, not the order of the sums).
void check_against_cpu(const LinearCase& c, const std::vector<int>& token_counts, uint32_t seed,
                       bool every_streamed = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(size_t(c.rows * c.cols));
  // Per-row magnitudes 2^-12 .. 2^-2 (weights of real layers are ~0.02): the scale blocks differ, and MXFP4 scale
  // codes stay within the supported range.
  for (int64_t n = 0; n < c.rows; ++n) {
    const float row_scale = std::ldexp(1.0f, -int(rng() % 11) - 2);
    for (int64_t k = 0; k < c.cols; ++k) values[size_t(n * c.cols + k)] = normal(rng) * row_scale;
  }
  const OwnedQuantizedMatrix host = quantize(c.format, values, c.rows, c.cols);
  check_quantized_linear_scales(host.matrix, "test weight");
  // |W| as an F32 matrix: Σ|w·x| per output bounds the rounding of any summation order.
  const std::vector<float> dequantized = dequantize(host.matrix);
  OwnedQuantizedMatrix magnitude_matrix = allocate_quantized_matrix(WeightFormat::F32, c.rows, c.cols, ScaleType::NONE);
  auto* magnitudes = reinterpret_cast<float*>(magnitude_matrix.storage->data.data());
  for (size_t i = 0; i < dequantized.size(); ++i) magnitudes[i] = std::fabs(dequantized[i]);
  const DeviceMatrix weight(host.matrix, "linear test weight");

  const int64_t x_cols = c.groups * c.cols, x_stride = x_cols + c.x_pad, y_stride = c.rows + c.y_pad;
  for (const int tokens : token_counts) {
    SCOPED_TRACE(describe(c, tokens));
    std::vector<uint16_t> x_bf16(size_t(tokens * x_stride), float_to_bf16(NAN));  // the stride gap is NaN
    std::vector<float> x(size_t(tokens * x_cols)), x_abs(x.size());
    for (int t = 0; t < tokens; ++t)
      for (int64_t k = 0; k < x_cols; ++k) {
        const uint16_t bits = float_to_bf16(normal(rng));
        x_bf16[size_t(t * x_stride + k)] = bits;
        x[size_t(t * x_cols + k)] = bf16_to_float(bits);  // the CPU sees the same rounded activations
        x_abs[size_t(t * x_cols + k)] = std::fabs(bf16_to_float(bits));
      }
    std::vector<float> reference(size_t(tokens * c.rows)), bound(reference.size());
    if (c.groups == 1) {
      cpu::linear(host.matrix, x.data(), tokens, reference.data());
      cpu::linear(magnitude_matrix.matrix, x_abs.data(), tokens, bound.data());
    } else {
      cpu::grouped_linear(host.matrix, c.groups, x.data(), tokens, reference.data());
      cpu::grouped_linear(magnitude_matrix.matrix, c.groups, x_abs.data(), tokens, bound.data());
    }

    DeviceBuffer workspace = zeroed_workspace(weight.view(), tokens, c.groups);
    struct Run {
      std::string label;
      WeightLoadPath path;
      std::optional<QuantizedLinearConfig> config;
    };
    std::vector<Run> runs;
    const int multiprocessors = list_devices().front().multiprocessors;
    const QuantizedLinearConfig automatic = choose_quantized_linear_config(weight.view(), tokens, c.groups,
                                                                           multiprocessors);
    bool automatic_covered = false;
    for (const WeightLoadPath path : load_paths_for(weight.view(), c.groups, tokens)) {
      runs.push_back({path_name(path), path, std::nullopt});
      const QuantizedLinearConfig explicit_path =
          choose_quantized_linear_config(weight.view(), tokens, c.groups, multiprocessors, path);
      automatic_covered |= explicit_path.load_path == automatic.load_path &&
                           explicit_path.ring_slots == automatic.ring_slots &&
                           explicit_path.k_splits == automatic.k_splits && explicit_path.reduce == automatic.reduce;
    }
    // AUTO's own choice where no path's default is it (the cluster rules).
    if (!automatic_covered) runs.push_back({path_name(WeightLoadPath::AUTO), WeightLoadPath::AUTO, std::nullopt});
    if (every_streamed)
      for (const QuantizedLinearConfig& config : every_streamed_config(weight.view(), tokens, c.groups))
        runs.push_back({"streamed, " + std::to_string(config.ring_slots) + " slots, " +
                            std::to_string(config.k_splits) + " splits, " +
                            (config.reduce == SplitKReduce::CLUSTER ? "cluster" : "workspace") + " reduction",
                        WeightLoadPath::STREAMED, config});
    // The first output of each (splits, reduction) among the STREAMED configs: deeper rings must match it bitwise.
    std::vector<std::pair<const QuantizedLinearConfig*, std::vector<float>>> by_split;
    for (const Run& r : runs) {
      SCOPED_TRACE(r.label);
      const WeightLoadPath path = r.path;
      const DeviceRun run = run_on_device(weight, x_bf16, x_stride, y_stride, tokens, c.groups, workspace, path,
                                          r.config ? &*r.config : nullptr);
      if (r.config) {
        const auto same = std::find_if(by_split.begin(), by_split.end(), [&](const auto& e) {
          return e.first->k_splits == r.config->k_splits && e.first->reduce == r.config->reduce;
        });
        if (same == by_split.end()) {
          by_split.emplace_back(&*r.config, run.y);
        } else {
          int differing = 0;
          for (size_t i = 0; i < run.y.size(); ++i)
            if (std::memcmp(&run.y[i], &same->second[i], sizeof(float)) != 0 && ++differing <= 4)
              ADD_FAILURE() << "float " << i << " of y is " << run.y[i] << " at " << r.config->ring_slots
                            << " slots but " << same->second[i] << " at " << same->first->ring_slots;
          EXPECT_EQ(differing, 0) << "ring depth changed the result";
        }
      }
      // The products are exact (bf16 × bf16 in fp32; the dequantised weights are exact in bf16), so only the order
      // of the fp32 sums differs: the tensor cores add each 16-product MMA sum into the accumulator with up to one
      // ulp of error, K/16 times in a row, plus split-K and the CPU's own rounding; NVFP4 adds the CPU's rounding of
      // e4m3 scale × global and FP8/f32 the per-element scale rounding (each 2^-24 relative).
      const double terms = double(c.cols) / 16.0 + 64.0;
      int failures = 0;
      double max_error_ratio = 0.0;
      for (int t = 0; t < tokens; ++t)
        for (int64_t n = 0; n < c.rows; ++n) {
          const size_t i = size_t(t * c.rows + n);
          const float got = run.y[size_t(t * y_stride + n)];
          const double tolerance = terms * 0x1p-22 * bound[i] + 1e-30;
          const double error = std::fabs(double(got) - reference[i]);
          const bool ok = std::isfinite(got) && error <= tolerance;
          if (std::isfinite(got)) max_error_ratio = std::max(max_error_ratio, error / tolerance);
          if (!ok && ++failures <= 8)
            ADD_FAILURE() << "y[t=" << t << ", n=" << n << "] = " << got << ", reference " << reference[i]
                          << ", tolerance " << tolerance;
        }
      EXPECT_EQ(failures, 0) << failures << " mismatching outputs";
      for (int t = 0; t < tokens; ++t)
        for (int64_t n = c.rows; n < y_stride; ++n)
          ASSERT_TRUE(is_poison(run.y[size_t(t * y_stride + n)]))
              << "write into the y stride gap at t=" << t << " n=" << n;
      for (size_t i = size_t(tokens) * size_t(y_stride); i < run.y.size(); ++i)
        ASSERT_TRUE(is_poison(run.y[i])) << "write past the end of y at float " << i;
      if (failures > 0) std::printf("  %s: max error / tolerance %.3g\n", describe(c, tokens).c_str(), max_error_ratio);
    }
  }
}

std::vector<int> all_token_counts() { return {std::begin(kTokenCounts), std::end(kTokenCounts)}; }

TEST(QuantizedLinear, OddShapesEveryFormatAndTokenCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const TestFormat format : kAllFormats) {
    // N = 1, 17, 300 (not multiples of the 16-row warp tile or 64-row CTA), K a multiple of the format's load but
    // not of the 128-wide tile or FP8 block, long K with few rows (split-K), and strided x / y.
    // K % 32 = 16 and K % 16 = 8 (16-byte rows only for some formats: the bytewise path for the others), x rows
    // that are not 16-byte aligned (x_pad 3, 1).
    const std::vector<LinearCase> cases = {
        {format, 1, 128},    {format, 17, 416},          {format, 300, 4096}, {format, 17, 4096, 1, 8, 3},
        {format, 1, 4096},   {format, 300, 416, 1, 16, 1}, {format, 129, 8192}, {format, 130, 4112},
        {format, 65, 200},   {format, 40, 4096, 1, 3, 0}, {format, 33, 136, 1, 1, 2},
        // Streamed path: one 64-row CTA with a partial last warp set, unaligned x rows, a small grouped case.
        {format, 48, 1536, 1, 3, 5}, {format, 4 * 32, 1024, 4, 8, 2}};
    for (const LinearCase& c : cases) check_against_cpu(c, all_token_counts(), seed++);
  }
}

TEST(QuantizedLinear, TinyModelShapes) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // The golden fixtures and the tiny trained model (d 64/96/128, q_lora 32/48/96, o_lora 16/24/64, G 1/2/4, I 32/64,
  // head_dim 64): rows of 12 to 48 bytes (not 16-byte aligned for most formats), K below one load (1, 7, 24), groups
  // of 16 and 24 rows, and unaligned x rows.
  // {N, K, G, x_pad}: the format is filled in below.
  const LinearCase shapes[] = {
      {TestFormat::BF16, 32, 64},          {TestFormat::BF16, 48, 96},     {TestFormat::BF16, 256, 32},
      {TestFormat::BF16, 64, 24},          {TestFormat::BF16, 32, 128, 2}, {TestFormat::BF16, 96, 64, 4},
      {TestFormat::BF16, 96, 48, 2, 1, 0}, {TestFormat::BF16, 5, 1},       {TestFormat::BF16, 9, 7, 1, 1, 1},
      {TestFormat::BF16, 128, 256, 2},     {TestFormat::BF16, 64, 128},    {TestFormat::BF16, 128, 64}};
  uint32_t seed = 600;
  for (const TestFormat format : kAllFormats)
    for (LinearCase c : shapes) {
      c.format = format;
      check_against_cpu(c, {1, 3, 17}, seed++);
    }
}

TEST(QuantizedLinear, EveryTokenCountFromOneToSixtyFour) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<int> tokens(64);
  for (int t = 1; t <= 64; ++t) tokens[size_t(t - 1)] = t;
  check_against_cpu({TestFormat::NVFP4, 80, 1024}, tokens, 500);
  check_against_cpu({TestFormat::FP8_E8M0, 80, 1024}, tokens, 501);
}

TEST(QuantizedLinear, FlashShapes) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // wq_a, wq_b, wkv, wo_b, expert w1/w3 and w2 of V4-Flash (d 4096, q_lora 1024, H·D 32768, G·o_lora 8192, I 2048).
  const std::pair<int64_t, int64_t> shapes[] = {{1024, 4096}, {32768, 1024}, {512, 4096},
                                                {4096, 8192}, {2048, 4096},  {4096, 2048}};
  uint32_t seed = 100;
  for (const TestFormat format : kAllFormats)
    for (const auto& [rows, cols] : shapes) check_against_cpu({format, rows, cols}, all_token_counts(), seed++);
}

TEST(QuantizedLinear, ProShapes) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // V4-Pro (d 7168, q_lora 1536, H·D 65536, G·o_lora 16384, I 3072) in the release formats (fp8 attention, fp4
  // experts; the host-side reference of these shapes is the slow part) at the token counts that change the tiling.
  const std::vector<int> tokens = {1, 16, 17, 64};
  uint32_t seed = 200;
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1536, 7168}, {65536, 1536}, {512, 7168}, {7168, 16384}})
    check_against_cpu({TestFormat::FP8_E8M0, rows, cols}, tokens, seed++);
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{3072, 7168}, {7168, 3072}}) {
    check_against_cpu({TestFormat::MXFP4, rows, cols}, tokens, seed++);
    check_against_cpu({TestFormat::NVFP4, rows, cols}, tokens, seed++);
  }
}

TEST(QuantizedLinear, ModelCallsAtOneToken) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // V4-Flash calls at T = 1 through AUTO's own config: the CSA and HCA compressor stacks (BF16, the CSA one with
  // weights_proj), the indexer's wq_b and the grouped wo_a (FP8), and [wq_a; wkv] (also at T = 16, in clusters).
  uint32_t seed = 1500;
  check_against_cpu({TestFormat::BF16, 2624, 4096}, {1}, seed++);
  check_against_cpu({TestFormat::BF16, 1024, 4096}, {1}, seed++);
  check_against_cpu({TestFormat::FP8_E8M0, 8192, 1024}, {1}, seed++);
  check_against_cpu({TestFormat::FP8_E8M0, 8 * 1024, 4096, 8}, {1}, seed++);
  check_against_cpu({TestFormat::FP8_E8M0, 1536, 4096}, {1, 16}, seed++);
}

TEST(QuantizedLinear, GroupedOutputProjection) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  // Flash wo_a: [8 · 1024, 4096] in G = 8 groups, x = [T, 8 · 4096]; every format.
  for (const TestFormat format : kAllFormats)
    check_against_cpu({format, 8 * 1024, 4096, 8}, all_token_counts(), seed++);
  // Pro wo_a: G = 16; and a small grouped case with strided x and y.
  check_against_cpu({TestFormat::FP8_E8M0, 16 * 1024, 4096, 16}, {1, 16, 64}, seed++);
  check_against_cpu({TestFormat::MXFP4, 3 * 64, 416, 3, 24, 5}, all_token_counts(), seed++);
}

TEST(QuantizedLinear, StreamedRingDepthsAndSplitCounts) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // Every STREAMED config (ring slots 1-4 × K splits × reduction) of the shapes whose defaults they may become:
  // V4-Flash [wq_a; wkv], wq_b's band, wo_b, grouped wo_a (G = 8), an fp4 expert, a BF16 matrix; strided x and y.
  uint32_t seed = 1300;
  const std::vector<int> tokens = {1, 5, 16};
  check_against_cpu({TestFormat::FP8_E8M0, 1536, 4096}, tokens, seed++, true);
  check_against_cpu({TestFormat::FP8_F32, 2048, 1024, 1, 8, 3}, tokens, seed++, true);
  check_against_cpu({TestFormat::FP8_E8M0, 1024, 8192}, tokens, seed++, true);
  check_against_cpu({TestFormat::FP8_E8M0, 8 * 256, 4096, 8}, tokens, seed++, true);
  check_against_cpu({TestFormat::NVFP4, 2048, 4096}, tokens, seed++, true);
  check_against_cpu({TestFormat::MXFP4, 512, 7168}, tokens, seed++, true);
  check_against_cpu({TestFormat::BF16, 256, 2048}, tokens, seed++, true);
}

// One-hot activations: token t of pass p is e_(64p + t), so y[t, n] = W[n, 64p + t] exactly: W as the kernel sees
// it is compared with `expected` ([rows, cols] row-major) element by element, exactly (NaN never passes).
// `tolerance(n, k)` > 0 relaxes an element to an absolute bound (fp32 subnormal products may flush).
template <class Tolerance>
void expect_dequantised_exactly(const QuantizedMatrix& host, const std::vector<float>& expected, Tolerance tolerance) {
  const DeviceMatrix weight(host, "exactness weight");
  const int64_t rows = host.rows, cols = host.cols;
  int failures = 0;
  // 64 tokens per pass through the paths that take them, 16 through the streamed path (it takes at most 16).
  std::vector<std::pair<WeightLoadPath, int>> runs;
  for (const WeightLoadPath path : load_paths_for(weight.view(), 1, 64)) runs.emplace_back(path, 64);
  if (streamed_load_path_applies(weight.view(), kLinearMaxStreamedTokens, 1))
    runs.emplace_back(WeightLoadPath::STREAMED, kLinearMaxStreamedTokens);
  for (const auto& [path, kTokens] : runs) {
    SCOPED_TRACE(path_name(path));
    DeviceBuffer workspace = zeroed_workspace(weight.view(), kTokens, 1);
    for (int64_t pass = 0; pass * kTokens < cols; ++pass) {
      std::vector<uint16_t> x(size_t(kTokens * cols), 0);
      for (int t = 0; t < kTokens && pass * kTokens + t < cols; ++t) x[size_t(t * cols + pass * kTokens + t)] = 0x3F80;
      const DeviceRun run = run_on_device(weight, x, cols, rows, kTokens, 1, workspace, path);
      for (int t = 0; t < kTokens && pass * kTokens + t < cols; ++t)
        for (int64_t n = 0; n < rows; ++n) {
          const int64_t k = pass * kTokens + t;
          const float want = expected[size_t(n * cols + k)], got = run.y[size_t(t * rows + n)];
          const double slack = tolerance(n, k);
          // == also accepts ±0 for ±0: a sum of zero products has no defined sign.
          const bool ok = slack > 0 ? std::fabs(double(got) - want) <= slack : got == want;
          if (!ok && ++failures <= 8)
            ADD_FAILURE() << "W[" << n << ", " << k << "] came out as " << got << ", expected " << want;
        }
    }
  }
  EXPECT_EQ(failures, 0) << failures << " inexact weights";
}

TEST(QuantizedLinear, DequantisesEveryCodeAndScaleExactly) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  {
    SCOPED_TRACE("MXFP4: every e2m1 code × every e8m0 scale code 0..128 at every position of a 128-wide step");
    constexpr int64_t kRows = 129, kCols = 128;
    OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::MXFP4, kRows, kCols, ScaleType::E8M0);
    std::vector<float> expected(size_t(kRows * kCols));
    for (int64_t n = 0; n < kRows; ++n) {
      for (int64_t b = 0; b < kCols / 32; ++b) m.storage->scales[size_t(n * (kCols / 32) + b)] = uint8_t(n);
      for (int64_t k = 0; k < kCols; ++k) {
        const uint8_t code = uint8_t((k + n + k / 16) % 16);
        m.storage->data[size_t(n * (kCols / 2) + k / 2)] |= uint8_t(code << (4 * (k % 2)));
        expected[size_t(n * kCols + k)] = e2m1_to_float(code) * e8m0_to_float(uint8_t(n));
      }
    }
    check_quantized_linear_scales(m.matrix, "mxfp4 exactness");
    // Codes 0 and 1 (scales 2^-127, 2^-126) make bf16 subnormal weights whose fp32 products the tensor cores may
    // flush; every larger code is exact.
    expect_dequantised_exactly(m.matrix, expected, [](int64_t n, int64_t) { return n < 2 ? 0x1p-125 : 0.0; });
  }
  for (const float global : {1.0f, 0.5f}) {
    SCOPED_TRACE("NVFP4: every e2m1 code × every finite non-negative e4m3 scale, global " + std::to_string(global));
    constexpr int64_t kRows = 127, kCols = 256;
    OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::NVFP4, kRows, kCols, ScaleType::E4M3, global);
    std::vector<float> expected(size_t(kRows * kCols));
    for (int64_t n = 0; n < kRows; ++n) {
      for (int64_t b = 0; b < kCols / 16; ++b) m.storage->scales[size_t(n * (kCols / 16) + b)] = uint8_t(n);
      for (int64_t k = 0; k < kCols; ++k) {
        const uint8_t code = uint8_t((k * 7 + n) % 16);
        m.storage->data[size_t(n * (kCols / 2) + k / 2)] |= uint8_t(code << (4 * (k % 2)));
        expected[size_t(n * kCols + k)] = e2m1_to_float(code) * (e4m3_to_float(uint8_t(n)) * global);
      }
    }
    expect_dequantised_exactly(m.matrix, expected, [](int64_t, int64_t) { return 0.0; });
  }
  {
    SCOPED_TRACE("FP8_BLOCK128: every e4m3 code × every e8m0 scale code 0..254");
    // 2 row bands × 128 k blocks = 256 scale entries; every 128 × 128 block holds every finite e4m3 code.
    constexpr int64_t kRows = 256, kCols = 128 * 128;
    OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::FP8_BLOCK128, kRows, kCols, ScaleType::E8M0);
    std::vector<float> expected(size_t(kRows * kCols));
    for (int64_t band = 0; band < 2; ++band)
      for (int64_t b = 0; b < 128; ++b)
        m.storage->scales[size_t(band * 128 + b)] = uint8_t(std::min<int64_t>(band * 128 + b, 254));
    for (int64_t n = 0; n < kRows; ++n)
      for (int64_t k = 0; k < kCols; ++k) {
        uint8_t code = uint8_t((n * 131 + k) % 256);
        if ((code & 0x7F) == 0x7F) code = 0;  // e4m3 NaN codes are not weights
        m.storage->data[size_t(n * kCols + k)] = code;
        expected[size_t(n * kCols + k)] =
            e4m3_to_float(code) * e8m0_to_float(m.storage->scales[size_t((n / 128) * 128 + k / 128)]);
      }
    expect_dequantised_exactly(m.matrix, expected, [](int64_t, int64_t) { return 0.0; });
  }
  {
    SCOPED_TRACE("FP8_BLOCK128 with f32 scales");
    constexpr int64_t kRows = 128, kCols = 512;
    OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::FP8_BLOCK128, kRows, kCols, ScaleType::F32);
    const float scales[] = {1.0f / 448.0f, 3.3e-5f, 0.0123f, 7.5f};
    std::memcpy(m.storage->scales.data(), scales, sizeof scales);
    std::vector<float> expected(size_t(kRows * kCols));
    for (int64_t n = 0; n < kRows; ++n)
      for (int64_t k = 0; k < kCols; ++k) {
        uint8_t code = uint8_t((n * 37 + k) % 256);
        if ((code & 0x7F) == 0x7F) code = 0;
        m.storage->data[size_t(n * kCols + k)] = code;
        expected[size_t(n * kCols + k)] = e4m3_to_float(code) * scales[k / 128];
      }
    expect_dequantised_exactly(m.matrix, expected, [](int64_t, int64_t) { return 0.0; });
  }
  {
    SCOPED_TRACE("BF16: finite bit patterns pass through");
    constexpr int64_t kRows = 64, kCols = 128;
    OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::BF16, kRows, kCols, ScaleType::NONE);
    auto* bits = reinterpret_cast<uint16_t*>(m.storage->data.data());
    std::vector<float> expected(size_t(kRows * kCols));
    std::mt19937 rng(7);
    for (size_t i = 0; i < expected.size(); ++i) {
      uint16_t b = uint16_t(rng());
      if ((b & 0x7F80) == 0x7F80 || (b & 0x7F80) == 0) b &= 0xBFFF;  // no inf/NaN, no subnormals
      if ((b & 0x7F80) == 0) b |= 0x0080;
      bits[i] = b;
      expected[i] = bf16_to_float(b);
    }
    expect_dequantised_exactly(m.matrix, expected, [](int64_t, int64_t) { return 0.0; });
  }
}

TEST(QuantizedLinear, SplitKIsDeterministicAndLeavesTicketsZero) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int multiprocessors = list_devices().front().multiprocessors;
  for (const TestFormat format : {TestFormat::MXFP4, TestFormat::FP8_E8M0}) {
    constexpr int64_t kRows = 2048, kCols = 4096;
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    std::vector<float> values(size_t(kRows * kCols));
    for (float& v : values) v = normal(rng);
    const OwnedQuantizedMatrix host = quantize(format, values, kRows, kCols);
    const DeviceMatrix weight(host.matrix, "split-K weight");
    for (const int tokens : {1, 8, 16, 17}) {  // streamed (1 and 2 token tiles) and aligned; AUTO's choice too
      std::vector<WeightLoadPath> paths = load_paths_for(weight.view(), 1, tokens);
      paths.push_back(WeightLoadPath::AUTO);
      for (const WeightLoadPath path : paths) {
        SCOPED_TRACE(std::string(name_of(format)) + " T=" + std::to_string(tokens) + " " + path_name(path));
        const QuantizedLinearConfig config =
            choose_quantized_linear_config(weight.view(), tokens, 1, multiprocessors, path);
        ASSERT_GT(config.k_splits, 1) << "the case must exercise split-K";
        std::vector<uint16_t> x(size_t(tokens * kCols));
        for (uint16_t& v : x) v = float_to_bf16(normal(rng) * 20.0f);
        DeviceBuffer workspace = zeroed_workspace(weight.view(), tokens, 1);
        const DeviceRun first = run_on_device(weight, x, kCols, kRows, tokens, 1, workspace, path);
        const DeviceRun second = run_on_device(weight, x, kCols, kRows, tokens, 1, workspace, path);
        ASSERT_EQ(std::memcmp(first.y.data(), second.y.data(), first.y.size() * sizeof(float)), 0)
            << "split-K results differ between two runs";
        std::vector<uint32_t> tickets(config.ticket_bytes / sizeof(uint32_t));
        workspace.download(tickets.data(), config.ticket_bytes);
        for (size_t i = 0; i < tickets.size(); ++i) ASSERT_EQ(tickets[i], 0u) << "ticket " << i << " left non-zero";
      }
    }
  }
}

TEST(QuantizedLinear, WorkspaceSizedForSixtyFourTokensServesEveryTokenCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // Callers size the workspace once for up to 64 tokens (linear_workspace_bytes); the streamed path at few tokens
  // may split K more ways than the T = 64 tiling (V4-Pro wo_a: 256 row blocks, none at T = 64). The sizes are host
  // computations on the view, so the views need no device storage (aligned placeholder addresses).
  const int multiprocessors = list_devices().front().multiprocessors;
  struct Case {
    WeightFormat format;
    int64_t rows, cols;
    int groups;
  };
  for (const Case& c : {Case{WeightFormat::FP8_BLOCK128, 16384, 4096, 16}, Case{WeightFormat::MXFP4, 16384, 4096, 16},
                        Case{WeightFormat::NVFP4, 8192, 4096, 8}, Case{WeightFormat::BF16, 512, 4096, 1},
                        Case{WeightFormat::MXFP4, 65536, 1536, 1}, Case{WeightFormat::FP8_BLOCK128, 1536, 7168, 1}}) {
    DeviceMatrixView w;
    w.format = c.format;
    w.rows = c.rows;
    w.cols = c.cols;
    const int values_per_byte = c.format == WeightFormat::BF16 ? 0 : c.format == WeightFormat::FP8_BLOCK128 ? 1 : 2;
    w.data_row_bytes = size_t(values_per_byte == 0 ? c.cols * 2 : c.cols / values_per_byte);
    w.scale_type = c.format == WeightFormat::NVFP4 ? ScaleType::E4M3
                   : c.format == WeightFormat::BF16 ? ScaleType::NONE
                                                    : ScaleType::E8M0;
    w.scales_per_row = c.format == WeightFormat::MXFP4 ? c.cols / 32 : c.format == WeightFormat::NVFP4 ? c.cols / 16
                                                                                                        : c.cols / 128;
    w.data = reinterpret_cast<const uint8_t*>(uintptr_t(1) << 30);
    w.scales = c.format == WeightFormat::BF16 ? nullptr : reinterpret_cast<const uint8_t*>(uintptr_t(1) << 31);
    const size_t sized = quantized_linear_workspace_bytes(w, kLinearMaxTokens, c.groups);
    for (int tokens = 1; tokens <= kLinearMaxTokens; ++tokens)
      ASSERT_GE(sized, choose_quantized_linear_config(w, tokens, c.groups, multiprocessors).workspace_bytes)
          << to_string(c.format) << " [" << c.rows << ", " << c.cols << "] G=" << c.groups << " T=" << tokens;
  }
}

// Random weights of `format` with per-row magnitudes 2^-12 .. 2^-2, and `tokens` rows of bf16 activations.
struct RandomOperands {
  OwnedQuantizedMatrix host;
  std::vector<uint16_t> x_bf16;
  std::vector<float> x, x_abs;  // the bf16 values widened, and their magnitudes
};

RandomOperands random_operands(TestFormat format, int64_t rows, int64_t cols, int64_t x_cols, int tokens,
                               uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(size_t(rows * cols));
  for (int64_t n = 0; n < rows; ++n) {
    const float row_scale = std::ldexp(1.0f, -int(rng() % 11) - 2);
    for (int64_t k = 0; k < cols; ++k) values[size_t(n * cols + k)] = normal(rng) * row_scale;
  }
  RandomOperands o{quantize(format, values, rows, cols), {}, {}, {}};
  for (int64_t i = 0; i < tokens * x_cols; ++i) {
    const uint16_t bits = float_to_bf16(normal(rng));
    o.x_bf16.push_back(bits);
    o.x.push_back(bf16_to_float(bits));
    o.x_abs.push_back(std::fabs(bf16_to_float(bits)));
  }
  return o;
}

TEST(QuantizedLinear, Bf16OutputIsTheFp32OutputRounded) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // The same kernel and summation with only the store changed: the bf16 output must be exactly
  // round-to-nearest-even of the fp32 one, on every load path, with and without split-K, grouped and not.
  const int multiprocessors = list_devices().front().multiprocessors;
  const LinearCase cases[] = {{TestFormat::FP8_E8M0, 8192, 512, 8}, {TestFormat::NVFP4, 1024, 4096, 1},
                              {TestFormat::MXFP4, 512, 4096, 1},    {TestFormat::BF16, 320, 192, 1},
                              {TestFormat::FP8_F32, 100, 200, 1}};
  uint32_t seed = 900;
  for (const LinearCase& c : cases)
    for (const int tokens : {1, 9, 64}) {
      const int64_t x_cols = c.groups * c.cols, y_stride = c.rows + 3;
      const RandomOperands o = random_operands(c.format, c.rows, c.cols, x_cols, tokens, seed++);
      const DeviceMatrix weight(o.host.matrix, "bf16 output weight");
      const DeviceBuffer x = to_device(o.x_bf16, "x");
      DeviceBuffer workspace = zeroed_workspace(weight.view(), tokens, c.groups);
      const size_t outputs = size_t(tokens) * size_t(y_stride);
      for (const WeightLoadPath path : load_paths_for(weight.view(), c.groups, tokens)) {
        SCOPED_TRACE(describe(c, tokens) + " " + path_name(path));
        const QuantizedLinearConfig config =
            choose_quantized_linear_config(weight.view(), tokens, c.groups, multiprocessors, path);
        DeviceBuffer y32 = poisoned(outputs, "y fp32"), y16 = poisoned(outputs / 2 + 1, "y bf16");
        QuantizedLinearParams p{.weight = weight.view(),
                                .x = x.as<__nv_bfloat16>(),
                                .x_row_stride = x_cols,
                                .y = y32.as<float>(),
                                .y_row_stride = y_stride,
                                .tokens = tokens,
                                .groups = c.groups,
                                .workspace = workspace.data(),
                                .workspace_bytes = workspace.bytes()};
        run_quantized_linear(p, config);
        p.y = nullptr;
        p.y_bf16 = y16.as<__nv_bfloat16>();
        run_quantized_linear(p, config);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> fp32 = download(y32, outputs);
        std::vector<uint16_t> bf16((outputs / 2 + 1 + kGuardFloats) * 2);
        y16.download(bf16.data(), bf16.size() * 2);
        int failures = 0;
        for (int t = 0; t < tokens; ++t)
          for (int64_t n = 0; n < y_stride; ++n) {
            const size_t i = size_t(t * y_stride + n);
            const uint16_t expected = n < c.rows ? float_to_bf16(fp32[i]) : uint16_t(0xFFFF);
            if (bf16[i] != expected && ++failures <= 8)
              ADD_FAILURE() << "y_bf16[t=" << t << ", n=" << n << "] = 0x" << std::hex << bf16[i] << ", expected 0x"
                            << expected << std::dec << " (fp32 " << fp32[i] << ")";
          }
        for (size_t i = outputs; i < bf16.size(); ++i)
          ASSERT_EQ(bf16[i], 0xFFFF) << "write past the end of y_bf16 at element " << i;
        EXPECT_EQ(failures, 0) << failures << " bf16 outputs differ from the rounded fp32 ones";
      }
    }
}

TEST(QuantizedLinear, DispatchMatchesCpuWhicheverKernelRuns) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // wq_b-like, wkv-like (the GEMM splits K most) and a grouped wo_a-like matrix.
  const LinearCase cases[] = {{TestFormat::FP8_E8M0, 4096, 1024, 1}, {TestFormat::NVFP4, 512, 4096, 1},
                              {TestFormat::FP8_E8M0, 8 * 256, 512, 8}, {TestFormat::BF16, 1024, 256, 1}};
  uint32_t seed = 950;
  for (const LinearCase& c : cases)
    for (const int tokens : {1, 9, 16, 64, 100}) {
      const int64_t x_cols = c.groups * c.cols;
      const RandomOperands o = random_operands(c.format, c.rows, c.cols, x_cols, tokens, seed++);
      std::vector<float> reference(size_t(tokens * c.rows)), bound(reference.size());
      const std::vector<float> dequantized = dequantize(o.host.matrix);
      OwnedQuantizedMatrix magnitude = allocate_quantized_matrix(WeightFormat::F32, c.rows, c.cols, ScaleType::NONE);
      auto* magnitudes = reinterpret_cast<float*>(magnitude.storage->data.data());
      for (size_t i = 0; i < dequantized.size(); ++i) magnitudes[i] = std::fabs(dequantized[i]);
      cpu::grouped_linear(o.host.matrix, c.groups, o.x.data(), tokens, reference.data());
      cpu::grouped_linear(magnitude.matrix, c.groups, o.x_abs.data(), tokens, bound.data());

      const DeviceMatrix weight(o.host.matrix, "dispatch weight");
      const DeviceBuffer x = to_device(o.x_bf16, "x");
      const size_t workspace_bytes = linear_workspace_bytes(weight.view(), c.groups);
      DeviceBuffer workspace(std::max<size_t>(workspace_bytes, 16), "linear workspace");
      workspace.fill_bytes(0);
      for (const int64_t gemm_from : {kLinearGemmFromTokens, int64_t(9)})
        for (const bool bf16_output : {false, true}) {
          SCOPED_TRACE(describe(c, tokens) + " gemm_from_tokens " + std::to_string(gemm_from) +
                       (bf16_output ? " bf16 output" : ""));
          const size_t outputs = size_t(tokens) * size_t(c.rows);
          DeviceBuffer y = poisoned(outputs, "y");
          LinearCall call;
          call.weight = weight.view();
          call.what = "dispatch test";
          call.x = x.as<__nv_bfloat16>();
          call.x_row_stride = x_cols;
          call.y = bf16_output ? nullptr : y.as<float>();
          call.y_bf16 = bf16_output ? y.as<__nv_bfloat16>() : nullptr;
          call.y_row_stride = c.rows;
          call.tokens = tokens;
          call.groups = c.groups;
          call.workspace = workspace.data();
          call.workspace_bytes = workspace.bytes();
          call.gemm_from_tokens = gemm_from;
          run_linear(call);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          std::vector<float> got(outputs);
          if (bf16_output) {
            std::vector<uint16_t> bits(outputs);
            y.download(bits.data(), outputs * 2);
            for (size_t i = 0; i < outputs; ++i) got[i] = bits[i] == 0xFFFF ? NAN : bf16_to_float(bits[i]);
          } else {
            got = download(y, outputs);
          }
          // As check_against_cpu (fp32 summation order), plus half a bf16 step for the rounded output.
          const double terms = double(c.cols) / 16.0 + 64.0;
          int failures = 0;
          for (size_t i = 0; i < outputs; ++i) {
            const double tolerance = terms * 0x1p-22 * bound[i] + 1e-30 +
                                     (bf16_output ? 0.5 * bf16_ulp(std::fabs(reference[i]) * 1.001f) : 0.0);
            if (!(std::fabs(double(got[i]) - reference[i]) <= tolerance) && ++failures <= 8)
              ADD_FAILURE() << "y[" << i / size_t(c.rows) << ", " << i % size_t(c.rows) << "] = " << got[i]
                            << ", reference " << reference[i] << ", tolerance " << tolerance;
          }
          EXPECT_EQ(failures, 0) << failures << " mismatching outputs";
        }
    }
}

TEST(QuantizedLinear, ClusterReductionEqualsWorkspaceReduction) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int multiprocessors = list_devices().front().multiprocessors;
  // Splits of 16 (V4-Flash wq_a, wkv), 8, 14 (V4-Pro wkv: a non-portable cluster size), a BF16 matrix and a grid of
  // 4 CTAs per SM (64 clusters of 8 on 132 SMs).
  const LinearCase cases[] = {{TestFormat::FP8_E8M0, 1024, 4096}, {TestFormat::FP8_F32, 512, 4096},
                              {TestFormat::NVFP4, 512, 4096},     {TestFormat::MXFP4, 512, 7168},
                              {TestFormat::BF16, 256, 2048},      {TestFormat::FP8_E8M0, 4096, 2048}};
  uint32_t seed = 1100;
  for (const LinearCase& c : cases)
    for (const int tokens : {1, 5, 16}) {
      SCOPED_TRACE(describe(c, tokens));
      const RandomOperands o = random_operands(c.format, c.rows, c.cols, c.cols, tokens, seed++);
      const DeviceMatrix weight(o.host.matrix, "cluster weight");
      const DeviceBuffer x = to_device(o.x_bf16, "x");
      // The cluster config first: its receive area may leave fewer CTAs per SM, hence fewer splits; the workspace
      // config is then asked for the same split count.
      const QuantizedLinearConfig cluster = choose_quantized_linear_config(
          weight.view(), tokens, 1, multiprocessors, WeightLoadPath::STREAMED, 0, SplitKReduce::CLUSTER);
      const QuantizedLinearConfig tickets =
          choose_quantized_linear_config(weight.view(), tokens, 1, multiprocessors, WeightLoadPath::STREAMED, 0,
                                         SplitKReduce::WORKSPACE, cluster.k_splits);
      ASSERT_EQ(cluster.reduce, SplitKReduce::CLUSTER) << "the case must exercise the cluster reduction";
      // The CTAs per SM the split count assumed fit the SM's shared memory as the device reports it, receive area
      // included (with the hardware's reserve per CTA and up to 512 bytes of the kernel's static barriers).
      int per_sm = 0, reserved = 0;
      ASSERT_EQ(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0), cudaSuccess);
      ASSERT_EQ(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, 0), cudaSuccess);
      EXPECT_LE(size_t(cluster.ctas_per_sm) * (cluster.smem_bytes + size_t(reserved) + 512), size_t(per_sm))
          << cluster.ctas_per_sm << " CTAs of " << cluster.smem_bytes << " bytes";
      ASSERT_EQ(cluster.k_splits, tickets.k_splits) << "the case must split K the same way on both reductions";
      ASSERT_EQ(cluster.workspace_bytes, 0u);
      DeviceBuffer workspace(tickets.workspace_bytes, "linear workspace");
      workspace.fill_bytes(0);
      const size_t outputs = size_t(tokens) * size_t(c.rows);
      DeviceBuffer y_tickets = poisoned(outputs, "y workspace"), y_cluster = poisoned(outputs, "y cluster");
      DeviceBuffer y_cluster_bf16 = poisoned(outputs / 2 + 1, "y cluster bf16");
      QuantizedLinearParams p{.weight = weight.view(),
                              .x = x.as<__nv_bfloat16>(),
                              .x_row_stride = c.cols,
                              .y = y_tickets.as<float>(),
                              .y_row_stride = c.rows,
                              .tokens = tokens,
                              .workspace = workspace.data(),
                              .workspace_bytes = workspace.bytes()};
      run_quantized_linear(p, tickets);
      p.y = y_cluster.as<float>(), p.workspace = nullptr, p.workspace_bytes = 0;
      run_quantized_linear(p, cluster);
      p.y = nullptr, p.y_bf16 = y_cluster_bf16.as<__nv_bfloat16>();
      run_quantized_linear(p, cluster);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> expected = download(y_tickets, outputs), got = download(y_cluster, outputs);
      std::vector<uint16_t> got_bf16(outputs);
      y_cluster_bf16.download(got_bf16.data(), outputs * 2);
      int failures = 0;
      for (size_t i = 0; i < outputs; ++i) {
        const bool same = std::memcmp(&expected[i], &got[i], sizeof(float)) == 0 && std::isfinite(got[i]) &&
                          got_bf16[i] == float_to_bf16(expected[i]);
        if (!same && ++failures <= 8)
          ADD_FAILURE() << "y[" << i / size_t(c.rows) << ", " << i % size_t(c.rows) << "]: cluster " << got[i]
                        << " (bf16 " << bf16_to_float(got_bf16[i]) << "), workspace " << expected[i];
      }
      EXPECT_EQ(failures, 0) << failures << " outputs differ (" << cluster.k_splits << " splits)";
    }
}

TEST(QuantizedLinear, NormPrologueEqualsRmsNormThenLinear) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int multiprocessors = list_devices().front().multiprocessors;
  // cols ≤ 1024: run_rms_norm's warp rows; beyond: its CTA rows.
  const LinearCase cases[] = {{TestFormat::FP8_E8M0, 1024, 4096}, {TestFormat::NVFP4, 512, 4096},
                              {TestFormat::FP8_E8M0, 4096, 1024}, {TestFormat::MXFP4, 256, 7168},
                              {TestFormat::BF16, 320, 192},       {TestFormat::FP8_F32, 100, 200}};
  constexpr float kEps = 1e-6f;
  uint32_t seed = 1000;
  for (const LinearCase& c : cases)
    for (const int tokens : {1, 3, 16, 64}) {
      std::mt19937 rng(seed++);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      RandomOperands o = random_operands(c.format, c.rows, c.cols, c.cols, 1, seed++);
      std::vector<float> x(size_t(tokens * c.cols)), norm_weight(size_t(c.cols));
      for (int t = 0; t < tokens; ++t) {
        const float row_scale = std::ldexp(1.0f, int(rng() % 9) - 4);  // rows of different RMS
        for (int64_t k = 0; k < c.cols; ++k) x[size_t(t * c.cols + k)] = normal(rng) * row_scale;
      }
      for (float& v : norm_weight) v = 1.0f + 0.5f * normal(rng);
      // Odd token counts read rows of a wider buffer (the model's [q_a | kv] rows): the gaps hold values that
      // would wreck the sums if read.
      const int64_t x_stride = tokens % 2 == 1 ? c.cols + 512 : c.cols;
      std::vector<float> x_strided(size_t(tokens * x_stride), 1e30f);
      for (int t = 0; t < tokens; ++t)
        std::copy_n(x.begin() + t * c.cols, c.cols, x_strided.begin() + t * x_stride);
      const DeviceMatrix weight(o.host.matrix, "norm prologue weight");
      const DeviceBuffer x_device = to_device(x_strided, "x fp32");
      const DeviceBuffer weight_device = to_device(norm_weight, "norm weight");
      DeviceBuffer normed(size_t(tokens * c.cols) * 2, "x normed bf16");
      DeviceBuffer workspace = zeroed_workspace(weight.view(), tokens, 1);
      RmsNormParams norm;
      norm.x = x_device.as<float>(), norm.weight = weight_device.as<float>(), norm.rows = tokens;
      norm.x_row_stride = x_stride, norm.width = c.cols, norm.eps = kEps, norm.y_bf16 = normed.as<__nv_bfloat16>();
      run_rms_norm(norm);

      // CPU: rms_norm, bf16 rounding, linear; the bound allows one bf16 step of every input (the CPU's sum of
      // squares runs in another order, which may move a rounding) on top of the summation order.
      std::vector<float> normed_cpu(x.size()), normed_abs(x.size());
      cpu::rms_norm(x.data(), norm_weight.data(), normed_cpu.data(), {.rows = tokens, .dim = c.cols, .eps = kEps});
      for (size_t i = 0; i < x.size(); ++i) {
        normed_cpu[i] = bf16_to_float(float_to_bf16(normed_cpu[i]));
        normed_abs[i] = std::fabs(normed_cpu[i]);
      }
      const std::vector<float> dequantized = dequantize(o.host.matrix);
      OwnedQuantizedMatrix magnitude = allocate_quantized_matrix(WeightFormat::F32, c.rows, c.cols, ScaleType::NONE);
      auto* magnitudes = reinterpret_cast<float*>(magnitude.storage->data.data());
      for (size_t i = 0; i < dequantized.size(); ++i) magnitudes[i] = std::fabs(dequantized[i]);
      std::vector<float> reference(size_t(tokens * c.rows)), bound(reference.size());
      cpu::linear(o.host.matrix, normed_cpu.data(), tokens, reference.data());
      cpu::linear(magnitude.matrix, normed_abs.data(), tokens, bound.data());

      for (const WeightLoadPath path : load_paths_for(weight.view(), 1, tokens)) {
        SCOPED_TRACE(describe(c, tokens) + " " + path_name(path));
        const QuantizedLinearConfig config =
            choose_quantized_linear_config(weight.view(), tokens, 1, multiprocessors, path);
        const size_t outputs = size_t(tokens) * size_t(c.rows);
        DeviceBuffer two_launches = poisoned(outputs, "y rms_norm then linear"), fused = poisoned(outputs, "y fused");
        QuantizedLinearParams p{.weight = weight.view(),
                                .x = normed.as<__nv_bfloat16>(),
                                .x_row_stride = c.cols,
                                .y = two_launches.as<float>(),
                                .y_row_stride = c.rows,
                                .tokens = tokens,
                                .workspace = workspace.data(),
                                .workspace_bytes = workspace.bytes()};
        run_quantized_linear(p, config);
        p.x = nullptr, p.x_row_stride = x_stride;
        p.norm_x = x_device.as<float>(), p.norm_weight = weight_device.as<float>(), p.norm_eps = kEps;
        p.y = fused.as<float>();
        run_quantized_linear(p, config);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> expected = download(two_launches, outputs), got = download(fused, outputs);
        int failures = 0;
        for (size_t i = 0; i < outputs; ++i) {
          const bool same = std::memcmp(&expected[i], &got[i], sizeof(float)) == 0 && std::isfinite(got[i]);
          const double tolerance = (double(c.cols) / 16.0 + 64.0) * 0x1p-22 * bound[i] + 0x1p-8 * bound[i] + 1e-30;
          const bool near_cpu = std::fabs(double(got[i]) - reference[i]) <= tolerance;
          if ((!same || !near_cpu) && ++failures <= 8)
            ADD_FAILURE() << "y[" << i / size_t(c.rows) << ", " << i % size_t(c.rows) << "] = " << got[i]
                          << "; rms_norm then linear " << expected[i] << "; CPU " << reference[i] << " ± "
                          << tolerance;
        }
        EXPECT_EQ(failures, 0) << failures << " outputs differ";
      }
    }
}

TEST(QuantizedLinear, RefusesUnsupportedCallsNamingTheProblem) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<float> values(64 * 256, 0.5f);
  const OwnedQuantizedMatrix mx = quantize_mxfp4(values.data(), 64, 256);
  const DeviceMatrix mx_device(mx.matrix, "mxfp4");
  const OwnedQuantizedMatrix f32 = allocate_quantized_matrix(WeightFormat::F32, 64, 256, ScaleType::NONE);
  const DeviceMatrix f32_device(f32.matrix, "f32");
  DeviceBuffer x(65 * 256 * 2, "x"), y(65 * 64 * sizeof(float), "y");
  const QuantizedLinearParams good{.weight = mx_device.view(),
                                   .x = x.as<__nv_bfloat16>(),
                                   .x_row_stride = 256,
                                   .y = y.as<float>(),
                                   .y_row_stride = 64,
                                   .tokens = 1};
  using testing::expect_error;
  auto run_with = [](QuantizedLinearParams p) { return [p] { run_quantized_linear(p); }; };
  QuantizedLinearParams p = good;
  p.tokens = 65;
  expect_error(run_with(p), "65 tokens");
  p = good;
  p.y_bf16 = reinterpret_cast<__nv_bfloat16*>(p.y);
  expect_error(run_with(p), "exactly one of y (fp32) and y_bf16");
  p = good;
  p.norm_x = reinterpret_cast<const float*>(p.x);
  expect_error(run_with(p), "exactly one of x (bf16) and norm_x");
  p.x = nullptr;
  expect_error(run_with(p), "needs norm_weight");
  p.norm_weight = p.norm_x;
  p.groups = 2;
  expect_error(run_with(p), "groups must be 1");
  p = good;
  p.weight = f32_device.view();
  expect_error(run_with(p), {"is f32", "supported formats"});
  p = good;
  p.y = reinterpret_cast<float*>(const_cast<__nv_bfloat16*>(p.x) + 8);
  expect_error(run_with(p), "overlap x");
  p = good;
  p.x = reinterpret_cast<const __nv_bfloat16*>(reinterpret_cast<const char*>(p.x) + 1);
  expect_error(run_with(p), "2-byte");
  p = good;
  p.x_row_stride = 200;
  expect_error(run_with(p), "x row stride 200 is below 256");
  p = good;
  p.y_row_stride = 63;
  expect_error(run_with(p), "y row stride 63");
  p = good;
  p.groups = 3;
  expect_error(run_with(p), "does not split into 3 groups");
  p = good;
  p.tokens = 64;
  p.x_row_stride = 4096;
  p.weight.cols = 4096;  // few row blocks, long K: split-K, which needs a workspace
  p.weight.data_row_bytes = 2048;
  expect_error(run_with(p), "needs a workspace");

  OwnedQuantizedMatrix big_scale = quantize_mxfp4(values.data(), 64, 256);
  big_scale.storage->scales[3 * 8 + 5] = 129;
  expect_error([&] { check_quantized_linear_scales(big_scale.matrix, "layer 3 expert 7 w1"); },
               {"layer 3 expert 7 w1", "scale code 129", "row 3, block 5"});

  QuantizedLinearConfig other = choose_quantized_linear_config(
      good.weight, 1, 1, list_devices().front().multiprocessors, WeightLoadPath::GENERIC);
  other.chunk_k += 128;
  expect_error([&] { run_quantized_linear(good, other); }, "is not the one choose_quantized_linear_config gives");
  DeviceMatrixView unaligned = good.weight;
  unaligned.cols = 200;  // rows of 100 bytes
  unaligned.data_row_bytes = 100;
  expect_error([&] { (void)choose_quantized_linear_config(unaligned, 1, 1, 132, WeightLoadPath::ALIGNED); },
               "not 16-byte aligned");
  expect_error([&] { (void)choose_quantized_linear_config(good.weight, 1, 8, 132, WeightLoadPath::ALIGNED); },
               "not whole 16-row tiles");  // 8 groups of 8 rows
  expect_error([&] { (void)choose_quantized_linear_config(unaligned, 1, 1, 132, WeightLoadPath::STREAMED); },
               {"streamed load path", "K a multiple of 512"});
  expect_error([&] { (void)choose_quantized_linear_config(good.weight, 17, 1, 132, WeightLoadPath::STREAMED); },
               "at most 16 tokens");
}

// One workspace shared by calls of different shapes (the engine's): a split call with few row blocks, or the GEMM,
// leaves partial sums where a later call with more row blocks would look for its tickets unless every call keeps
// its tickets in the ticket area (kLinearTicketAreaBytes). The later call must give what it gives on a fresh
// workspace, bit for bit.
TEST(QuantizedLinear, WorkspaceSharedByCallsOfDifferentShapes) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  struct Call {
    int64_t rows, cols;
    int groups, tokens;
  };
  // [wq_a; wkv] (24 row blocks, 16 splits through the workspace at T = 9; T <= 8 reduces in clusters), the GEMM's
  // split-K at 17 tokens, then wo_a (128 row blocks).
  const Call earlier[] = {{1536, 4096, 1, 9}, {1536, 4096, 1, 17}};
  const Call later{8192, 4096, 8, 1};
  const RandomOperands a = random_operands(TestFormat::FP8_E8M0, 1536, 4096, 4096, 17, 1500);
  const RandomOperands b = random_operands(TestFormat::FP8_E8M0, later.rows, later.cols, later.groups * later.cols,
                                           later.tokens, 1501);
  const DeviceMatrix wa(a.host.matrix, "earlier weight"), wb(b.host.matrix, "later weight");
  const DeviceBuffer xa = to_device(a.x_bf16, "x earlier"), xb = to_device(b.x_bf16, "x later");
  const size_t bytes = std::max(linear_workspace_bytes(wa.view()), linear_workspace_bytes(wb.view(), later.groups));
  DeviceBuffer ya(17 * 1536 * 4, "y earlier");
  const auto later_call = [&](DeviceBuffer& workspace, DeviceBuffer& y) {
    run_linear({.weight = wb.view(), .what = "later", .x = xb.as<__nv_bfloat16>(),
                .x_row_stride = later.groups * later.cols, .y = y.as<float>(), .y_row_stride = later.rows,
                .tokens = later.tokens, .groups = later.groups, .workspace = workspace.data(),
                .workspace_bytes = workspace.bytes()});
  };
  DeviceBuffer fresh(bytes, "fresh workspace");
  fresh.fill_bytes(0);
  DeviceBuffer y_fresh = poisoned(size_t(later.rows), "y fresh");
  later_call(fresh, y_fresh);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> expected = download(y_fresh, size_t(later.rows));
  // A call that wrote nothing would leave both outputs poisoned, equal bit for bit.
  ASSERT_TRUE(std::all_of(expected.begin(), expected.end(), [](float v) { return std::isfinite(v); }))
      << "the later call on a fresh workspace left non-finite outputs";
  for (const Call& e : earlier) {
    SCOPED_TRACE("after a [" + std::to_string(e.rows) + ", " + std::to_string(e.cols) + "] call at T=" +
                 std::to_string(e.tokens));
    DeviceBuffer shared(bytes, "shared workspace");
    shared.fill_bytes(0);
    run_linear({.weight = wa.view(), .what = "earlier", .x = xa.as<__nv_bfloat16>(), .x_row_stride = e.cols,
                .y = ya.as<float>(), .y_row_stride = e.rows, .tokens = e.tokens, .workspace = shared.data(),
                .workspace_bytes = shared.bytes()});
    DeviceBuffer y = poisoned(size_t(later.rows), "y shared");
    later_call(shared, y);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got = download(y, size_t(later.rows));
    int failures = 0;
    for (size_t i = 0; i < size_t(later.rows); ++i)
      if (std::memcmp(&got[i], &expected[i], sizeof(float)) != 0 && ++failures <= 8)
        ADD_FAILURE() << "y[" << i << "] = " << got[i] << " on the shared workspace, " << expected[i]
                      << " on a fresh one";
    EXPECT_EQ(failures, 0);
  }
}

}  // namespace
}  // namespace dsv4::cuda
