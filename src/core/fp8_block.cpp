#include "core/fp8_block.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4 {

namespace {

float block_scale(const QuantizedMatrix& w, int64_t band, int64_t block) {
  const int64_t index = band * w.scales_per_row() + block;
  if (w.scale_type == ScaleType::F32) {
    float scale;
    std::memcpy(&scale, w.scales + index * 4, 4);
    return scale;
  }
  return e8m0_to_float(w.scales[index]);
}

}  // namespace

OwnedQuantizedMatrix quantize_fp8_block128(const float* values, int64_t rows, int64_t cols, ScaleType scale_type) {
  constexpr std::string_view what = "quantize fp8_block128";
  check(scale_type == ScaleType::E8M0 || scale_type == ScaleType::F32, what, ": scale type must be e8m0 or f32, not ",
        to_string(scale_type));
  check_quantizer_input(values, rows, cols, what);
  OwnedQuantizedMatrix owned = allocate_quantized_matrix(WeightFormat::FP8_BLOCK128, rows, cols, scale_type);
  uint8_t* codes = owned.storage->data.data();
  uint8_t* scales = owned.storage->scales.data();
  const int64_t blocks_per_row = owned.matrix.scales_per_row();
  for (int64_t r0 = 0; r0 < rows; r0 += kFp8BlockSize) {
    const int64_t r1 = std::min(rows, r0 + kFp8BlockSize);
    for (int64_t k0 = 0; k0 < cols; k0 += kFp8BlockSize) {
      const int64_t k1 = std::min(cols, k0 + kFp8BlockSize);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(values[r * cols + k]));
      const int64_t scale_index = (r0 / kFp8BlockSize) * blocks_per_row + k0 / kFp8BlockSize;
      float scale;
      if (scale_type == ScaleType::E8M0) {
        scales[scale_index] = fp8_e8m0_scale_for_amax(amax);
        scale = e8m0_to_float(scales[scale_index]);
      } else {
        scale = fp8_f32_scale_for_amax(amax);
        std::memcpy(scales + scale_index * 4, &scale, 4);
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = k0; k < k1; ++k) codes[r * cols + k] = float_to_e4m3(values[r * cols + k] / scale);
    }
  }
  return owned;
}

void dequantize_fp8_block128_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  constexpr std::string_view what = "dequantize fp8_block128";
  w.check_layout(what);
  check(w.format == WeightFormat::FP8_BLOCK128, what, ": matrix is ", to_string(w.format));
  w.check_row_range(row_begin, row_end, out, what);
  const int64_t cols = w.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* codes = w.data + r * cols;
    float* row_out = out + (r - row_begin) * cols;
    for (int64_t k0 = 0; k0 < cols; k0 += kFp8BlockSize) {
      const float scale = block_scale(w, r / kFp8BlockSize, k0 / kFp8BlockSize);
      const int64_t count = std::min(kFp8BlockSize, cols - k0);
      // Branch-free decode (see e4m3_to_float): this loop vectorises.
      for (int64_t i = 0; i < count; ++i) row_out[k0 + i] = e4m3_to_float(codes[k0 + i]) * scale;
    }
  }
}

}  // namespace dsv4
