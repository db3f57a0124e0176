// Decoding weight rows to fp32 for the linear op's tiles. The build targets baseline x86-64, where the generic
// dequantize_rows (core/dequantize.hpp) runs scalar or SSE2 and costs several times the tile's dot products; this
// adds AVX2 decoders for the formats the GEMV streams (FP8_BLOCK128, MXFP4, NVFP4, BF16) when the CPU has AVX2 and
// the shape is block-aligned (K a multiple of 128 for FP8, of the block size for fp4). Everything else falls back to
// dequantize_rows. Values equal dequantize_rows' bit for bit, except that an fp4 −0 may decode as +0.
#pragma once

#include <cstdint>

#include "core/quantized_matrix.hpp"

namespace dsv4::cpu {

// Rows [row_begin, row_end) of w into out ([rows, w.cols] row-major). The caller has validated w's layout
// (QuantizedMatrix::check_layout) and the row range.
void decode_weight_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out);

}  // namespace dsv4::cpu
