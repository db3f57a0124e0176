// FP8 block-128: e4m3 values with one scale per 128×128 block, as DeepSeek ships its dense weights (e8m0 scales in
// the release, f32 scales in -Base checkpoints). value = e4m3 · scale. Partial edge blocks (N or K not a multiple of
// 128) get a scale computed from the elements they hold.
#pragma once

#include <cstdint>

#include "core/activation_block_scale.hpp"
#include "core/e8m0.hpp"
#include "core/host_device.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4 {

// e8m0 scale for a block with this amax: s = 2^ceil(log2(max(amax, 1e-4) / 448)), so that amax / s <= 448.
DSV4_HD uint8_t fp8_e8m0_scale_for_amax(float amax) {
  return float_to_e8m0_ceil((amax > kFp8AmaxFloor ? amax : kFp8AmaxFloor) / 448.0f);
}

// f32 scale for a block with this amax: exactly max(amax, 1e-4) / 448.
DSV4_HD float fp8_f32_scale_for_amax(float amax) { return (amax > kFp8AmaxFloor ? amax : kFp8AmaxFloor) / 448.0f; }

// Quantizes float [rows, cols] (row-major) with scale_type E8M0 or F32. Elements are e4m3(x / s), rounded to
// nearest even and saturated at ±448. Throws on a non-finite input, naming its position.
OwnedQuantizedMatrix quantize_fp8_block128(const float* values, int64_t rows, int64_t cols, ScaleType scale_type);

// Rows [row_begin, row_end) as float, row-major, `cols` floats per row: e4m3_to_float(code) · scale.
void dequantize_fp8_block128_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out);

}  // namespace dsv4
