#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "backends/cpu/weight_decode.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

// Equal values (bit patterns, but +0 and −0 count as equal); NaN equals NaN.
void expect_same_values(const std::vector<float>& got, const std::vector<float>& expected, const char* what) {
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(expected[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << what << " element " << i;
    } else {
      ASSERT_EQ(got[i], expected[i]) << what << " element " << i;
    }
  }
}

void expect_matches_dequantize(const QuantizedMatrix& w, const char* what) {
  for (const auto& [begin, end] : std::vector<std::pair<int64_t, int64_t>>{{0, w.rows}, {1, 2}, {std::max<int64_t>(0, w.rows - 3), w.rows}}) {
    std::vector<float> got((end - begin) * w.cols), expected((end - begin) * w.cols);
    decode_weight_rows(w, begin, end, got.data());
    dequantize_rows(w, begin, end, expected.data());
    expect_same_values(got, expected, what);
  }
}

TEST(WeightDecode, MatchesDequantizeForEveryFormat) {
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{130, 256}, {7, 384}, {5, 100}, {4, 33}}) {
    // Values spanning many binades, so scales, subnormal codes and zeros all occur.
    auto values = random_vector(rows * cols, uint32_t(rows * cols), -1.0f, 1.0f);
    for (size_t i = 0; i < values.size(); ++i) values[i] = std::ldexp(values[i], int(i % 23) - 14);
    values[3] = 0.0f;
    expect_matches_dequantize(quantize_fp8_block128(values.data(), rows, cols, ScaleType::E8M0).matrix, "fp8 e8m0");
    expect_matches_dequantize(quantize_fp8_block128(values.data(), rows, cols, ScaleType::F32).matrix, "fp8 f32");
    expect_matches_dequantize(quantize_mxfp4(values.data(), rows, cols).matrix, "mxfp4");
    expect_matches_dequantize(quantize_nvfp4(values.data(), rows, cols).matrix, "nvfp4");
    OwnedQuantizedMatrix bf16 = allocate_quantized_matrix(WeightFormat::BF16, rows, cols, ScaleType::NONE);
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t bits = float_to_bf16(values[i]);
      std::memcpy(bf16.storage->data.data() + 2 * i, &bits, 2);
    }
    expect_matches_dequantize(bf16.matrix, "bf16");
    expect_matches_dequantize(testing::f32_matrix(values, rows, cols).matrix, "f32");
  }
}

TEST(WeightDecode, EveryFp8AndFp4CodeDecodesAsDequantizeDoes) {
  // FP8: one 128-wide row holding every byte value (NaN codes included) under a non-trivial scale.
  OwnedQuantizedMatrix fp8 = allocate_quantized_matrix(WeightFormat::FP8_BLOCK128, 2, 128, ScaleType::E8M0);
  for (int i = 0; i < 256; ++i) fp8.storage->data[i] = uint8_t(i);
  fp8.storage->scales[0] = 120;
  expect_matches_dequantize(fp8.matrix, "fp8 all codes");
  // MXFP4 and NVFP4: every byte value (so every nibble pair) in 256 values per row.
  OwnedQuantizedMatrix mx = allocate_quantized_matrix(WeightFormat::MXFP4, 2, 512, ScaleType::E8M0);
  for (size_t i = 0; i < mx.storage->data.size(); ++i) mx.storage->data[i] = uint8_t(i);
  for (size_t i = 0; i < mx.storage->scales.size(); ++i) mx.storage->scales[i] = uint8_t(100 + 3 * i);
  expect_matches_dequantize(mx.matrix, "mxfp4 all codes");
  OwnedQuantizedMatrix nv = allocate_quantized_matrix(WeightFormat::NVFP4, 2, 512, ScaleType::E4M3, 0.37f);
  for (size_t i = 0; i < nv.storage->data.size(); ++i) nv.storage->data[i] = uint8_t(i);
  for (size_t i = 0; i < nv.storage->scales.size(); ++i) nv.storage->scales[i] = uint8_t(1 + 2 * i);
  expect_matches_dequantize(nv.matrix, "nvfp4 all codes");
}

}  // namespace
}  // namespace dsv4::cpu
