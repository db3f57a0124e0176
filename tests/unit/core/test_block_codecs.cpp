// Block codecs: the scales are the ones the real producers choose (checked against formulas written with log2 and
// ceil here), each element is within half a quantization step of its input, odd shapes (partial blocks, odd K,
// N = 1, 3, 129) work, and MXFP4 -> NVFP4 is exact wherever it can be and reports the blocks where it cannot.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/dequantize.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "support/expect_error.hpp"

namespace dsv4 {
namespace {

using testing::expect_error;

struct Shape {
  int64_t rows, cols;
};
const Shape kShapes[] = {{1, 1}, {1, 16}, {1, 300}, {3, 31}, {3, 33}, {3, 129}, {129, 130}, {129, 257}, {2, 1024}};

// Gaussian values whose magnitude varies per row and per 16-column stretch over 2^-12 .. 2^12, with some exact
// zeros and some all-zero stretches, so blocks see very different scales.
std::vector<float> random_values(Shape shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-12.0f, 12.0f);
  std::uniform_int_distribution<int> one_in_20(0, 19);
  std::vector<float> values(size_t(shape.rows * shape.cols));
  for (int64_t r = 0; r < shape.rows; ++r) {
    float stretch_scale = 1.0f;
    for (int64_t k = 0; k < shape.cols; ++k) {
      if (k % 16 == 0) stretch_scale = one_in_20(rng) == 0 ? 0.0f : std::exp2(log_scale(rng));
      values[r * shape.cols + k] = one_in_20(rng) == 0 ? 0.0f : normal(rng) * stretch_scale;
    }
  }
  return values;
}

float block_amax(const std::vector<float>& values, Shape shape, int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
  float amax = 0.0f;
  for (int64_t r = r0; r < std::min(r1, shape.rows); ++r)
    for (int64_t k = k0; k < std::min(k1, shape.cols); ++k)
      amax = std::max(amax, std::fabs(values[r * shape.cols + k]));
  return amax;
}

// Slack for the float roundings of scale arithmetic (a few ulps relative to the value).
constexpr double kFloatRounding = 0x1p-21;

// amax of each 128×128 block, [ceil(rows/128), ceil(cols/128)].
std::vector<float> fp8_block_amaxes(const std::vector<float>& values, Shape shape) {
  std::vector<float> amaxes;
  for (int64_t r0 = 0; r0 < shape.rows; r0 += 128)
    for (int64_t k0 = 0; k0 < shape.cols; k0 += 128)
      amaxes.push_back(block_amax(values, shape, r0, r0 + 128, k0, k0 + 128));
  return amaxes;
}

// Half the distance between neighbouring e2m1 values around y = |x| / factor (steps .5, 1, 2), or the distance
// to 6 when y saturates.
double e2m1_error_bound(double y) {
  if (y > 6.0) return y - 6.0;
  return y < 2.0 ? 0.25 : y < 4.0 ? 0.5 : 1.0;
}

// Half an e4m3 step around y = |x| / scale: 2^(exponent - 4) for normals, 2^-10 for subnormals.
double e4m3_error_bound(double y) {
  if (y < 0x1p-6) return 0x1p-10;
  return std::ldexp(1.0, std::ilogb(y) - 4);
}

std::string at(Shape shape, int64_t r, int64_t k) {
  return "[" + std::to_string(shape.rows) + ", " + std::to_string(shape.cols) + "] at (" + std::to_string(r) + ", " +
         std::to_string(k) + ")";
}

// Odd K leaves the high nibble of each row's last byte as padding: it must be written as 0.
void expect_fp4_padding_is_zero(const OwnedQuantizedMatrix& owned) {
  const QuantizedMatrix& m = owned.matrix;
  if (m.cols % 2 == 0) return;
  for (int64_t r = 0; r < m.rows; ++r) EXPECT_EQ(m.data[(r + 1) * m.data_row_bytes() - 1] >> 4, 0) << "row " << r;
}

TEST(Fp8Block128, E8m0ScalesAreDeepSeeksAndErrorsAreWithinHalfAStep) {
  uint32_t seed = 1;
  for (const Shape shape : kShapes) {
    const std::vector<float> values = random_values(shape, seed++);
    const OwnedQuantizedMatrix owned = quantize_fp8_block128(values.data(), shape.rows, shape.cols, ScaleType::E8M0);
    const QuantizedMatrix& w = owned.matrix;
    ASSERT_EQ(w.format, WeightFormat::FP8_BLOCK128);
    ASSERT_EQ(w.scale_type, ScaleType::E8M0);
    const std::vector<float> amaxes = fp8_block_amaxes(values, shape);
    const std::vector<float> decoded = dequantize(w);
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t k = 0; k < shape.cols; ++k) {
        const float amax = amaxes[(r / 128) * w.scales_per_row() + k / 128];
        const double scale = std::exp2(std::ceil(std::log2(std::max(double(amax), 1e-4) / 448.0)));
        ASSERT_EQ(double(e8m0_to_float(w.scales[(r / 128) * w.scales_per_row() + k / 128])), scale) << at(shape, r, k);
        const double x = values[r * shape.cols + k];
        ASSERT_LE(std::fabs(x) / scale, 448.0) << at(shape, r, k);
        ASSERT_LE(std::fabs(decoded[r * shape.cols + k] - x), e4m3_error_bound(std::fabs(x) / scale) * scale)
            << at(shape, r, k);
      }
    }
  }
}

TEST(Fp8Block128, F32ScalesAreAmaxOver448AndErrorsAreWithinHalfAStep) {
  uint32_t seed = 100;
  for (const Shape shape : kShapes) {
    const std::vector<float> values = random_values(shape, seed++);
    const OwnedQuantizedMatrix owned = quantize_fp8_block128(values.data(), shape.rows, shape.cols, ScaleType::F32);
    const QuantizedMatrix& w = owned.matrix;
    ASSERT_EQ(w.scale_type, ScaleType::F32);
    const std::vector<float> amaxes = fp8_block_amaxes(values, shape);
    const std::vector<float> decoded = dequantize(w);
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t k = 0; k < shape.cols; ++k) {
        const float amax = amaxes[(r / 128) * w.scales_per_row() + k / 128];
        float scale;
        std::memcpy(&scale, w.scales + 4 * ((r / 128) * w.scales_per_row() + k / 128), 4);
        ASSERT_EQ(scale, std::max(amax, 1e-4f) / 448.0f) << at(shape, r, k);
        const double x = values[r * shape.cols + k];
        // amax / scale can exceed 448 by the rounding of the division; the code then saturates to 448, and
        // 448 · scale is off from amax by the rounding of the division and the product.
        const double y = std::fabs(x) / scale;
        const double bound = y > 448.0 ? (y - 448.0) * scale : e4m3_error_bound(y) * scale;
        ASSERT_LE(std::fabs(decoded[r * shape.cols + k] - x), bound + kFloatRounding * std::fabs(x)) << at(shape, r, k);
      }
    }
  }
}

TEST(Mxfp4, ScalesAreDeepSeeksAndErrorsAreWithinHalfAStep) {
  uint32_t seed = 200;
  for (const Shape shape : kShapes) {
    const std::vector<float> values = random_values(shape, seed++);
    const OwnedQuantizedMatrix owned = quantize_mxfp4(values.data(), shape.rows, shape.cols);
    const QuantizedMatrix& w = owned.matrix;
    ASSERT_EQ(w.format, WeightFormat::MXFP4);
    expect_fp4_padding_is_zero(owned);
    const std::vector<float> decoded = dequantize(w);
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t k = 0; k < shape.cols; ++k) {
        const int64_t k0 = k / 32 * 32;
        const float amax = block_amax(values, shape, r, r + 1, k0, k0 + 32);
        const double scale = std::exp2(std::ceil(std::log2(std::max(double(amax), 6 * 0x1p-126) / 6.0)));
        ASSERT_EQ(double(e8m0_to_float(w.scales[r * w.scales_per_row() + k / 32])), scale) << at(shape, r, k);
        const double x = values[r * shape.cols + k];
        ASSERT_LE(std::fabs(x) / scale, 6.0) << at(shape, r, k);
        ASSERT_LE(std::fabs(decoded[r * shape.cols + k] - x), e2m1_error_bound(std::fabs(x) / scale) * scale)
            << at(shape, r, k);
      }
    }
  }
}

TEST(Nvfp4, ScalesFollowModelOptAndErrorsAreWithinHalfAStep) {
  uint32_t seed = 300;
  for (const Shape shape : kShapes) {
    const std::vector<float> values = random_values(shape, seed++);
    const OwnedQuantizedMatrix owned = quantize_nvfp4(values.data(), shape.rows, shape.cols);
    const QuantizedMatrix& w = owned.matrix;
    ASSERT_EQ(w.format, WeightFormat::NVFP4);
    expect_fp4_padding_is_zero(owned);
    const float tensor_amax = block_amax(values, shape, 0, shape.rows, 0, shape.cols);
    ASSERT_EQ(w.global_scale, tensor_amax > 0 ? tensor_amax / 2688.0f : 1.0f);
    const std::vector<float> decoded = dequantize(w);
    for (int64_t r = 0; r < shape.rows; ++r) {
      for (int64_t k = 0; k < shape.cols; ++k) {
        const int64_t k0 = k / 16 * 16;
        const float amax = block_amax(values, shape, r, r + 1, k0, k0 + 16);
        const uint8_t scale_code = w.scales[r * w.scales_per_row() + k / 16];
        const double scale = e4m3_to_float(scale_code);
        if (amax == 0.0f) {
          ASSERT_EQ(scale, 1.0) << at(shape, r, k);
        } else {
          // e4m3 round-to-nearest of amax / (6 · global), never 0 for a non-zero block.
          const double ideal = double(amax) / (6.0 * w.global_scale);
          ASSERT_GT(scale, 0.0) << at(shape, r, k);
          ASSERT_LE(std::fabs(scale - std::min(ideal, 448.0)), std::max(e4m3_error_bound(ideal), 0x1p-9) * 1.0001)
              << at(shape, r, k);
        }
        const double factor = scale * w.global_scale;
        const double x = values[r * shape.cols + k];
        // The decoder multiplies by the float block factor, which carries one rounding.
        ASSERT_LE(std::fabs(decoded[r * shape.cols + k] - x),
                  e2m1_error_bound(std::fabs(x) / factor) * factor + kFloatRounding * std::fabs(x))
            << at(shape, r, k);
      }
    }
  }
}

TEST(Nvfp4, GivenGlobalIsKept) {
  const std::vector<float> values = random_values({3, 48}, 7);
  const OwnedQuantizedMatrix owned = quantize_nvfp4_with_global(values.data(), 3, 48, 0.25f);
  EXPECT_EQ(owned.matrix.global_scale, 0.25f);
  EXPECT_THROW(quantize_nvfp4_with_global(values.data(), 3, 48, 0.0f), Error);
  EXPECT_THROW(quantize_nvfp4_with_global(values.data(), 3, 48, INFINITY), Error);
}

// Quantizing dequantized values again gives the same values (the codes may differ where two encodings are equal).
TEST(BlockCodecs, RequantizingDequantizedValuesIsStable) {
  const Shape shape{129, 257};
  const std::vector<float> values = random_values(shape, 400);
  using Quantizer = std::function<OwnedQuantizedMatrix(const float*)>;
  const std::pair<std::string, Quantizer> quantizers[] = {
      {"fp8 e8m0", [&](const float* x) { return quantize_fp8_block128(x, shape.rows, shape.cols, ScaleType::E8M0); }},
      {"mxfp4", [&](const float* x) { return quantize_mxfp4(x, shape.rows, shape.cols); }},
      {"nvfp4 fixed global",
       [&](const float* x) { return quantize_nvfp4_with_global(x, shape.rows, shape.cols, 0x1p-8f); }}};
  for (const auto& [name, quantize] : quantizers) {
    const std::vector<float> once = dequantize(quantize(values.data()).matrix);
    const std::vector<float> twice = dequantize(quantize(once.data()).matrix);
    EXPECT_EQ(once, twice) << name;
  }
}

TEST(BlockCodecs, RejectBadInput) {
  std::vector<float> values(2 * 40, 1.0f);
  values[40 + 7] = NAN;
  expect_error([&] { quantize_mxfp4(values.data(), 2, 40); },
                          "quantize mxfp4: non-finite input nan at row 1, col 7");
  expect_error([&] { quantize_nvfp4(values.data(), 2, 40); }, "row 1, col 7");
  expect_error([&] { quantize_fp8_block128(values.data(), 2, 40, ScaleType::F32); }, "row 1, col 7");
  values[40 + 7] = -INFINITY;
  expect_error([&] { quantize_nvfp4(values.data(), 2, 40); }, "non-finite input -inf");
  expect_error([&] { quantize_fp8_block128(values.data(), 2, 40, ScaleType::E4M3); },
                          "scale type must be e8m0 or f32, not e4m3");
  expect_error([&] { quantize_mxfp4(nullptr, 2, 40); }, "null input");
  expect_error([&] { quantize_mxfp4(values.data(), -2, 40); }, "negative shape");
  const OwnedQuantizedMatrix nv = quantize_nvfp4(values.data(), 1, 40);
  expect_error([&] { mxfp4_to_nvfp4(nv.matrix); }, "mxfp4 -> nvfp4: matrix is nvfp4");
}

// ---- MXFP4 -> NVFP4 ----

// Brute force: the most non-zero 16-blocks any power-of-two global can carry over exactly (e4m3 holds 2^(c-127-G)).
int64_t best_exact_block_count(const QuantizedMatrix& mx) {
  int64_t best = 0;
  for (int g = -140; g <= 130; ++g) {
    int64_t exact = 0;
    for (int64_t r = 0; r < mx.rows; ++r) {
      for (int64_t k0 = 0; k0 < mx.cols; k0 += 16) {
        bool zero = true;
        for (int64_t k = k0; k < std::min(k0 + 16, mx.cols); ++k)
          zero = zero && (e2m1_nibble(mx.data + r * mx.data_row_bytes(), k) & 7) == 0;
        if (zero) continue;
        const int exponent = int(mx.scales[r * mx.scales_per_row() + k0 / 32]) - 127 - g;
        const double wanted = std::ldexp(1.0, exponent);
        exact += double(e4m3_to_float(float_to_e4m3(float(wanted)))) == wanted;
      }
    }
    best = std::max(best, exact);
  }
  return best;
}

int64_t nonzero_block_count(const QuantizedMatrix& mx) {
  int64_t count = 0;
  for (int64_t r = 0; r < mx.rows; ++r)
    for (int64_t k0 = 0; k0 < mx.cols; k0 += 16) {
      bool zero = true;
      for (int64_t k = k0; k < std::min(k0 + 16, mx.cols); ++k)
        zero = zero && (e2m1_nibble(mx.data + r * mx.data_row_bytes(), k) & 7) == 0;
      count += !zero;
    }
  return count;
}

// Checks a conversion against its source: blocks not reported decode bit-identically; reported blocks carry their
// true max error; the payload of unreported blocks is untouched.
void expect_faithful_conversion(const QuantizedMatrix& mx, const Mxfp4ToNvfp4Result& result) {
  const QuantizedMatrix& nv = result.nvfp4.matrix;
  ASSERT_EQ(nv.format, WeightFormat::NVFP4);
  ASSERT_EQ(nv.rows, mx.rows);
  ASSERT_EQ(nv.cols, mx.cols);
  const float log2_global = std::log2(nv.global_scale);
  ASSERT_EQ(log2_global, std::round(log2_global)) << "global must be a power of two";
  const std::vector<float> original = dequantize(mx), converted = dequantize(nv);
  size_t next_reported = 0;
  for (int64_t r = 0; r < mx.rows; ++r) {
    for (int64_t b = 0; b * 16 < mx.cols; ++b) {
      const bool reported = next_reported < result.inexact_blocks.size() &&
                            result.inexact_blocks[next_reported].row == r &&
                            result.inexact_blocks[next_reported].block == b;
      float max_error = 0.0f;
      for (int64_t k = b * 16; k < std::min((b + 1) * 16, mx.cols); ++k) {
        const size_t i = size_t(r * mx.cols + k);
        max_error = std::max(max_error, std::fabs(converted[i] - original[i]));
        if (!reported) {
          ASSERT_EQ(converted[i], original[i]) << "row " << r << " col " << k;
          ASSERT_EQ(e2m1_nibble(nv.data + r * nv.data_row_bytes(), k),
                    e2m1_nibble(mx.data + r * mx.data_row_bytes(), k));
        }
      }
      if (reported) {
        EXPECT_EQ(result.inexact_blocks[next_reported].max_abs_error, max_error) << "row " << r << " block " << b;
        ++next_reported;
      }
    }
  }
  EXPECT_EQ(next_reported, result.inexact_blocks.size()) << "reported blocks out of order or out of range";
}

TEST(Mxfp4ToNvfp4, TypicalWeightsConvertExactly) {
  // Real expert weights: per-block scales within a few binades of each other.
  for (const Shape shape : {Shape{1, 32}, Shape{3, 40}, Shape{129, 257}, Shape{64, 2048}, Shape{5, 37}}) {
    std::mt19937 rng(uint32_t(shape.rows * 1000 + shape.cols));
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<float> values(size_t(shape.rows * shape.cols));
    for (float& v : values) v = normal(rng);
    const OwnedQuantizedMatrix mx = quantize_mxfp4(values.data(), shape.rows, shape.cols);
    const Mxfp4ToNvfp4Result result = mxfp4_to_nvfp4(mx.matrix);
    EXPECT_TRUE(result.inexact_blocks.empty()) << result.inexact_blocks.size() << " inexact blocks";
    expect_faithful_conversion(mx.matrix, result);
    EXPECT_EQ(std::memcmp(result.nvfp4.matrix.data, mx.matrix.data, mx.matrix.data_bytes()), 0) << "payload changed";
    expect_fp4_padding_is_zero(result.nvfp4);
  }
}

// An MXFP4 matrix built directly from codes: random payload (some all-zero blocks) and scales drawn from `codes`.
OwnedQuantizedMatrix constructed_mxfp4(Shape shape, const std::vector<uint8_t>& codes, uint32_t seed) {
  std::mt19937 rng(seed);
  OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, shape.rows, shape.cols, ScaleType::E8M0);
  for (uint8_t& byte : mx.storage->data) byte = uint8_t(rng());
  for (int64_t r = 0; r < shape.rows; ++r) {
    uint8_t* row = mx.storage->data.data() + r * mx.matrix.data_row_bytes();
    if (shape.cols % 2) row[shape.cols / 2] &= 0x0F;
    if (rng() % 4 == 0) std::fill(row, row + std::min<int64_t>(8, mx.matrix.data_row_bytes()), uint8_t(0x88));
  }
  for (uint8_t& code : mx.storage->scales) code = codes[rng() % codes.size()];
  return mx;
}

TEST(Mxfp4ToNvfp4, WideScaleRangesReportExactlyTheBlocksThatCannotFit) {
  // 40 binades of scales: no global can hold them all in e4m3's 18 powers of two.
  std::vector<uint8_t> codes;
  for (int c = 100; c < 140; ++c) codes.push_back(uint8_t(c));
  for (const Shape shape : {Shape{7, 64}, Shape{33, 100}, Shape{3, 37}}) {
    const OwnedQuantizedMatrix mx = constructed_mxfp4(shape, codes, uint32_t(shape.cols));
    const Mxfp4ToNvfp4Result result = mxfp4_to_nvfp4(mx.matrix);
    const int64_t best = best_exact_block_count(mx.matrix);
    EXPECT_EQ(nonzero_block_count(mx.matrix) - best, int64_t(result.inexact_blocks.size()));
    EXPECT_FALSE(result.inexact_blocks.empty());
    expect_faithful_conversion(mx.matrix, result);
  }
}

TEST(Mxfp4ToNvfp4, PicksTheGlobalThatFitsTheMajority) {
  // Two populations 30 binades apart: 6 blocks at 2^-20, 2 blocks at 2^10. The global must serve the 6.
  OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, 4, 64, ScaleType::E8M0);
  std::fill(mx.storage->data.begin(), mx.storage->data.end(), uint8_t(0x21));  // values 0.5, 1
  const uint8_t scales[8] = {107, 107, 107, 137, 107, 107, 107, 137};
  std::copy(scales, scales + 8, mx.storage->scales.begin());
  const Mxfp4ToNvfp4Result result = mxfp4_to_nvfp4(mx.matrix);
  ASSERT_EQ(result.inexact_blocks.size(), 4u);  // two 32-blocks = four 16-blocks
  EXPECT_EQ(result.inexact_blocks[0].row, 1);
  EXPECT_EQ(result.inexact_blocks[0].block, 2);
  EXPECT_EQ(result.inexact_blocks[2].row, 3);
  EXPECT_EQ(result.inexact_blocks[2].block, 2);
  // The large blocks saturate at 448 × global: far from their 2^10-scaled values, and reported as such.
  EXPECT_GT(result.inexact_blocks[0].max_abs_error, 100.0f);
  expect_faithful_conversion(mx.matrix, result);
}

TEST(Mxfp4ToNvfp4, ZeroBlocksNeverCountAsInexact) {
  // Scale codes far apart, but the blocks at the outlying scales hold only ±0: everything converts exactly.
  OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, 2, 96, ScaleType::E8M0);
  uint8_t* data = mx.storage->data.data();
  std::fill(data, data + mx.storage->data.size(), uint8_t(0x73));
  std::fill(data + 16, data + 32, uint8_t(0x88));      // row 0, block 1: -0
  std::fill(data + 48 + 32, data + 96, uint8_t(0x00));  // row 1, block 2: +0
  const uint8_t scales[6] = {120, 2, 121, 122, 123, 254};
  std::copy(scales, scales + 6, mx.storage->scales.begin());
  const Mxfp4ToNvfp4Result result = mxfp4_to_nvfp4(mx.matrix);
  EXPECT_TRUE(result.inexact_blocks.empty());
  expect_faithful_conversion(mx.matrix, result);
}

TEST(Mxfp4ToNvfp4, AllZeroAndEmptyMatrices) {
  const OwnedQuantizedMatrix zeros = allocate_quantized_matrix(WeightFormat::MXFP4, 3, 50, ScaleType::E8M0);
  const Mxfp4ToNvfp4Result result = mxfp4_to_nvfp4(zeros.matrix);
  EXPECT_TRUE(result.inexact_blocks.empty());
  EXPECT_EQ(result.nvfp4.matrix.global_scale, 1.0f);
  expect_faithful_conversion(zeros.matrix, result);
  const OwnedQuantizedMatrix empty = allocate_quantized_matrix(WeightFormat::MXFP4, 0, 0, ScaleType::E8M0);
  EXPECT_EQ(mxfp4_to_nvfp4(empty.matrix).nvfp4.matrix.rows, 0);
}

TEST(Mxfp4ToNvfp4, NanScaleIsAnError) {
  OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, 2, 64, ScaleType::E8M0);
  std::fill(mx.storage->scales.begin(), mx.storage->scales.end(), uint8_t(127));
  mx.storage->scales[3] = kE8m0Nan;
  expect_error([&] { mxfp4_to_nvfp4(mx.matrix); }, "NaN e8m0 scale at row 1, mxfp4 block 1");
}

}  // namespace
}  // namespace dsv4
