// NVFP4 in NVIDIA ModelOpt's convention: e2m1 packed two per byte along K (low nibble = even k), one e4m3 scale per
// 16 consecutive k, one fp32 global scale per tensor (weight_scale_2). value = e2m1 · (e4m3 scale · global), the
// block factor in parentheses computed once in float (that is what kernels do, and dequantize matches it
// bit for bit). A partial last block (K not a multiple of 16) gets the scale of the elements it holds.
#pragma once

#include <cstdint>
#include <vector>

#include "core/e2m1.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/host_device.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4 {

// ModelOpt's global scale amax_tensor / (6 · 448), so the largest block scale lands at e4m3's 448. An all-zero
// tensor (or one whose amax underflows the division) gets 1.
DSV4_HD float nvfp4_global_scale_for_amax(float tensor_amax) {
  const float global = tensor_amax / (kE2m1Max * kE4m3Max);
  return global > 0.0f ? global : 1.0f;
}

// ModelOpt's block scale e4m3(amax_block / (6 · global)), saturating at 448; an all-zero block gets 1.0. Where
// ModelOpt would round a non-zero block's scale to 0 (and then divide by it) this returns the smallest subnormal
// 2^-9 instead, so every non-zero block keeps what precision the global allows.
DSV4_HD uint8_t nvfp4_scale_for_amax(float block_amax, float global) {
  if (block_amax == 0.0f) return float_to_e4m3(1.0f);
  const uint8_t code = float_to_e4m3(block_amax / (kE2m1Max * global));
  return code == 0 ? uint8_t(0x01) : code;
}

// The factor every e2m1 value of a block is multiplied by.
DSV4_HD float nvfp4_block_factor(uint8_t scale_code, float global) { return e4m3_to_float(scale_code) * global; }

// Quantizes float [rows, cols] (row-major) with the ModelOpt global of the whole input, or with a given global
// (ModelOpt shares one between fused projections). Each element is e2m1(x / factor), rounded to nearest even and
// saturated at ±6. Throws on a non-finite input, naming its position, and on a global that is not positive finite.
OwnedQuantizedMatrix quantize_nvfp4(const float* values, int64_t rows, int64_t cols);
OwnedQuantizedMatrix quantize_nvfp4_with_global(const float* values, int64_t rows, int64_t cols, float global_scale);

// Rows [row_begin, row_end) as float, row-major, `cols` floats per row: e2m1_to_float(nibble) · block factor.
void dequantize_nvfp4_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out);

// An NVFP4 block (16 wide) that the MXFP4 -> NVFP4 rewrite could not carry over exactly.
struct InexactNvfp4Block {
  int64_t row = 0;
  int64_t block = 0;            // index of the 16-wide NVFP4 block along K (its k range is [16·block, 16·block+16))
  float max_abs_error = 0.0f;   // largest |re-quantized − original| over the block's elements
};

struct Mxfp4ToNvfp4Result {
  OwnedQuantizedMatrix nvfp4;
  std::vector<InexactNvfp4Block> inexact_blocks;  // in row-major order; empty when the rewrite is lossless
};

// Re-encodes MXFP4 as NVFP4 keeping the e2m1 payload and rewriting only the scales: each 32-block's 2^e becomes
// two 16-block e4m3 scales 2^(e - G) under a global 2^G. That is exact when e - G is within e4m3's powers of two
// 2^-9 .. 2^8 (or when the 16 values are all zero). G is chosen so that the most non-zero blocks fit; among equally
// good choices, the highest, so blocks that miss are the smallest-scaled ones (whose re-quantization loses least)
// rather than the largest (which would saturate). Blocks that miss are re-quantized from their dequantized values
// with the ModelOpt block rule under that global, and listed. Throws on a NaN (0xFF) scale, naming row and block.
Mxfp4ToNvfp4Result mxfp4_to_nvfp4(const QuantizedMatrix& mx);

}  // namespace dsv4
