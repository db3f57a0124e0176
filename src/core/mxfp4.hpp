// MXFP4 as DeepSeek ships its routed experts: e2m1 packed two per byte along K (low nibble = even k), one e8m0
// scale per 32 consecutive k. value = e2m1 · 2^(scale - 127). A partial last block (K not a multiple of 32) gets
// the scale of the elements it holds.
#pragma once

#include <cstdint>

#include "core/activation_block_scale.hpp"
#include "core/e8m0.hpp"
#include "core/host_device.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4 {

// DeepSeek's e8m0 scale: s = 2^ceil(log2(max(amax, 6·2^-126) / 6)), the smallest power of two with amax / s <= 6.
DSV4_HD uint8_t mxfp4_scale_for_amax(float amax) {
  return float_to_e8m0_ceil((amax > kFp4AmaxFloor ? amax : kFp4AmaxFloor) / 6.0f);
}

// Quantizes float [rows, cols] (row-major): each element is e2m1(x / s), rounded to nearest even (no saturation
// is needed: |x| / s <= 6). Throws on a non-finite input, naming its position.
OwnedQuantizedMatrix quantize_mxfp4(const float* values, int64_t rows, int64_t cols);

// Rows [row_begin, row_end) as float, row-major, `cols` floats per row: e2m1_to_float(nibble) · e8m0_to_float(scale).
void dequantize_mxfp4_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out);

}  // namespace dsv4
