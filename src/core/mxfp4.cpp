#include "core/mxfp4.hpp"

#include <algorithm>
#include <cmath>

#include "core/e2m1.hpp"
#include "core/error.hpp"

namespace dsv4 {

OwnedQuantizedMatrix quantize_mxfp4(const float* values, int64_t rows, int64_t cols) {
  check_quantizer_input(values, rows, cols, "quantize mxfp4");
  OwnedQuantizedMatrix owned = allocate_quantized_matrix(WeightFormat::MXFP4, rows, cols, ScaleType::E8M0);
  const size_t row_bytes = owned.matrix.data_row_bytes();
  const int64_t blocks_per_row = owned.matrix.scales_per_row();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = values + r * cols;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const int64_t k0 = b * kMxfp4BlockSize;
      const int64_t count = std::min(kMxfp4BlockSize, cols - k0);
      float amax = 0.0f;
      for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(row[k0 + i]));
      const uint8_t scale = mxfp4_scale_for_amax(amax);
      owned.storage->scales[r * blocks_per_row + b] = scale;
      encode_e2m1_block(row + k0, count, e8m0_to_float(scale), owned.storage->data.data() + r * row_bytes + k0 / 2);
    }
  }
  return owned;
}

void dequantize_mxfp4_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  constexpr std::string_view what = "dequantize mxfp4";
  w.check_layout(what);
  check(w.format == WeightFormat::MXFP4, what, ": matrix is ", to_string(w.format));
  w.check_row_range(row_begin, row_end, out, what);
  const size_t row_bytes = w.data_row_bytes();
  const int64_t blocks_per_row = w.scales_per_row();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* packed = w.data + r * row_bytes;
    const uint8_t* scales = w.scales + r * blocks_per_row;
    const auto block_factor = [scales](int64_t b) { return e8m0_to_float(scales[b]); };
    decode_e2m1_row<kMxfp4BlockSize>(packed, w.cols, block_factor, out + (r - row_begin) * w.cols);
  }
}

}  // namespace dsv4
