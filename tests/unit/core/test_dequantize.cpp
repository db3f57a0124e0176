// dequantize_rows equals the per-element scalar decode of the stored bytes, bit for bit, for every WeightFormat,
// on random bytes (so every code occurs, NaN codes included) and odd shapes; it writes nothing outside its rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/quantized_matrix.hpp"
#include "support/expect_error.hpp"

namespace dsv4 {
namespace {

using testing::expect_error;

struct Shape {
  int64_t rows, cols;
};
const Shape kShapes[] = {{1, 1}, {1, 16}, {3, 31}, {2, 33}, {5, 100}, {129, 130}, {130, 257}, {4, 4096}};

// A matrix of random bytes in `format`; NVFP4 gets a random global scale.
OwnedQuantizedMatrix random_matrix(WeightFormat format, ScaleType scale_type, Shape shape, std::mt19937& rng) {
  std::uniform_real_distribution<float> global(0.01f, 100.0f);
  OwnedQuantizedMatrix owned = allocate_quantized_matrix(format, shape.rows, shape.cols, scale_type,
                                                         format == WeightFormat::NVFP4 ? global(rng) : 1.0f);
  for (uint8_t& byte : owned.storage->data) byte = uint8_t(rng());
  if (scale_type == ScaleType::F32) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < owned.storage->scales.size(); i += 4) {
      const float scale = normal(rng);
      std::memcpy(owned.storage->scales.data() + i, &scale, 4);
    }
  } else {
    for (uint8_t& byte : owned.storage->scales) byte = uint8_t(rng());
  }
  return owned;
}

// Bit-identical, except that any NaN matches any NaN: which operand's payload a NaN·NaN product carries is not
// specified, and vectorised code may order the operands differently.
bool same_value(uint32_t actual_bits, float expected) {
  const float actual = bits_to_float(actual_bits);
  if (std::isnan(expected)) return std::isnan(actual);
  return actual_bits == float_to_bits(expected);
}

// The definition of each format, element by element, straight from the stored bytes.
float reference_element(const QuantizedMatrix& w, int64_t r, int64_t k) {
  const uint8_t* row = w.data + r * w.data_row_bytes();
  switch (w.format) {
    case WeightFormat::F32: {
      float value;
      std::memcpy(&value, row + 4 * k, 4);
      return value;
    }
    case WeightFormat::BF16: {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * k, 2);
      return bf16_to_float(bits);
    }
    case WeightFormat::FP8_BLOCK128: {
      const int64_t index = (r / 128) * ((w.cols + 127) / 128) + k / 128;
      float scale;
      if (w.scale_type == ScaleType::F32)
        std::memcpy(&scale, w.scales + 4 * index, 4);
      else
        scale = e8m0_to_float(w.scales[index]);
      return e4m3_to_float(row[k]) * scale;
    }
    case WeightFormat::MXFP4:
      return e2m1_to_float(e2m1_nibble(row, k)) * e8m0_to_float(w.scales[r * ((w.cols + 31) / 32) + k / 32]);
    case WeightFormat::NVFP4:
      return e2m1_to_float(e2m1_nibble(row, k)) *
             (e4m3_to_float(w.scales[r * ((w.cols + 15) / 16) + k / 16]) * w.global_scale);
  }
  return 0.0f;
}

struct FormatCase {
  WeightFormat format;
  ScaleType scale_type;
};
const FormatCase kFormats[] = {
    {WeightFormat::F32, ScaleType::NONE},          {WeightFormat::BF16, ScaleType::NONE},
    {WeightFormat::FP8_BLOCK128, ScaleType::E8M0}, {WeightFormat::FP8_BLOCK128, ScaleType::F32},
    {WeightFormat::MXFP4, ScaleType::E8M0},        {WeightFormat::NVFP4, ScaleType::E4M3}};

std::string describe(const FormatCase& c, Shape shape) {
  return std::string(to_string(c.format)) + "/" + std::string(to_string(c.scale_type)) + " [" +
         std::to_string(shape.rows) + ", " + std::to_string(shape.cols) + "]";
}

TEST(Dequantize, RowsMatchTheScalarDecodeBitForBitAndStayInBounds) {
  std::mt19937 rng(101);
  constexpr int64_t kGuard = 37;
  constexpr uint32_t kSentinel = 0xDEADBEEFu;
  for (const FormatCase& format_case : kFormats) {
    for (const Shape shape : kShapes) {
      const OwnedQuantizedMatrix owned = random_matrix(format_case.format, format_case.scale_type, shape, rng);
      const QuantizedMatrix& w = owned.matrix;
      // Whole matrix, a single row, and a range that starts and ends inside 128-row FP8 bands.
      const std::pair<int64_t, int64_t> ranges[] = {
          {0, w.rows}, {w.rows - 1, w.rows}, {w.rows / 3, (2 * w.rows + 2) / 3}, {w.rows / 2, w.rows / 2}};
      for (const auto& [begin, end] : ranges) {
        const int64_t count = (end - begin) * w.cols;
        std::vector<uint32_t> buffer(size_t(count + 2 * kGuard), kSentinel);
        float* out = reinterpret_cast<float*>(buffer.data() + kGuard);
        dequantize_rows(w, begin, end, out);
        for (int64_t i = 0; i < kGuard; ++i) {
          ASSERT_EQ(buffer[i], kSentinel) << describe(format_case, shape) << " wrote before its output";
          ASSERT_EQ(buffer[kGuard + count + i], kSentinel) << describe(format_case, shape) << " wrote past its output";
        }
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t k = 0; k < w.cols; ++k) {
            const float expected = reference_element(w, r, k);
            const uint32_t actual = buffer[kGuard + (r - begin) * w.cols + k];
            ASSERT_TRUE(same_value(actual, expected))
                << std::hex << actual << " != " << float_to_bits(expected) << std::dec << " "
                << describe(format_case, shape) << " row " << r << " col " << k;
          }
        }
      }
      const std::vector<float> whole = dequantize(w);
      ASSERT_EQ(whole.size(), size_t(w.rows * w.cols));
      for (int64_t i = 0; i < w.rows * w.cols; ++i)
        ASSERT_TRUE(same_value(float_to_bits(whole[i]), reference_element(w, i / w.cols, i % w.cols)))
            << describe(format_case, shape) << " element " << i;
    }
  }
}

TEST(Dequantize, EmptyMatricesGiveNothing) {
  for (const FormatCase& format_case : kFormats) {
    const OwnedQuantizedMatrix owned = allocate_quantized_matrix(format_case.format, 0, 64, format_case.scale_type);
    EXPECT_TRUE(dequantize(owned.matrix).empty());
    const OwnedQuantizedMatrix no_cols = allocate_quantized_matrix(format_case.format, 3, 0, format_case.scale_type);
    EXPECT_TRUE(dequantize(no_cols.matrix).empty());
  }
}

TEST(Dequantize, RejectsInconsistentInput) {
  std::mt19937 rng(5);
  const OwnedQuantizedMatrix owned = random_matrix(WeightFormat::MXFP4, ScaleType::E8M0, {4, 64}, rng);
  std::vector<float> out(4 * 64);
  expect_error([&] { dequantize_rows(owned.matrix, 2, 5, out.data()); }, "row range [2, 5)");
  expect_error([&] { dequantize_rows(owned.matrix, 3, 2, out.data()); }, "row range [3, 2)");
  expect_error([&] { dequantize_rows(owned.matrix, -1, 2, out.data()); }, "row range [-1, 2)");
  expect_error([&] { dequantize_rows(owned.matrix, 0, 1, nullptr); }, "null output");

  QuantizedMatrix no_scales = owned.matrix;
  no_scales.scales = nullptr;
  expect_error([&] { dequantize(no_scales); }, "mxfp4 matrix [4, 64] has no scales");
  QuantizedMatrix no_data = owned.matrix;
  no_data.data = nullptr;
  expect_error([&] { dequantize(no_data); }, "has no data");
  QuantizedMatrix wrong_scale_type = owned.matrix;
  wrong_scale_type.scale_type = ScaleType::E4M3;
  expect_error([&] { dequantize(wrong_scale_type); }, "mxfp4 matrix cannot have e4m3 scales");
  QuantizedMatrix negative = owned.matrix;
  negative.rows = -4;
  expect_error([&] { dequantize(negative); }, "negative shape");

  const OwnedQuantizedMatrix nvfp4 = random_matrix(WeightFormat::NVFP4, ScaleType::E4M3, {2, 32}, rng);
  QuantizedMatrix bad_global = nvfp4.matrix;
  bad_global.global_scale = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { dequantize(bad_global); }, "nvfp4 global scale");
  bad_global.global_scale = 0.0f;
  expect_error([&] { dequantize(bad_global); }, "nvfp4 global scale");
  QuantizedMatrix bad_format = nvfp4.matrix;
  bad_format.format = WeightFormat(42);
  expect_error([&] { dequantize(bad_format); }, "unknown weight format 42");
}

TEST(QuantizedMatrixLayout, SizesFollowTheFormats) {
  const OwnedQuantizedMatrix fp8 = allocate_quantized_matrix(WeightFormat::FP8_BLOCK128, 129, 257, ScaleType::F32);
  EXPECT_EQ(fp8.matrix.data_bytes(), 129u * 257u);
  EXPECT_EQ(fp8.matrix.scales_per_row(), 3);
  EXPECT_EQ(fp8.matrix.scale_bytes(), 2u * 3u * 4u);
  const OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, 3, 33, ScaleType::E8M0);
  EXPECT_EQ(mx.matrix.data_row_bytes(), 17u);
  EXPECT_EQ(mx.matrix.scale_bytes(), 3u * 2u);
  const OwnedQuantizedMatrix nv = allocate_quantized_matrix(WeightFormat::NVFP4, 3, 33, ScaleType::E4M3, 0.5f);
  EXPECT_EQ(nv.matrix.scale_bytes(), 3u * 3u);
  EXPECT_EQ(nv.matrix.global_scale, 0.5f);
  EXPECT_EQ(nv.matrix.keepalive.get(), nv.storage.get());
  EXPECT_THROW(allocate_quantized_matrix(WeightFormat::NVFP4, 3, 33, ScaleType::E8M0), Error);
  EXPECT_THROW(allocate_quantized_matrix(WeightFormat::BF16, -1, 3, ScaleType::NONE), Error);
}

}  // namespace
}  // namespace dsv4
