// Any QuantizedMatrix back to float. dequantize_rows is the inner loop of the CPU backend's GEMV: per-block scales
// are read once per block and the per-element decode is branch-free, so the loops vectorise.
#pragma once

#include <cstdint>
#include <vector>

#include "core/quantized_matrix.hpp"

namespace dsv4 {

// Writes rows [row_begin, row_end) of `w` as float to `out`, row-major, w.cols floats per row, for every
// WeightFormat. Throws (naming the format) on an inconsistent layout or a row range outside the matrix.
void dequantize_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out);

// The whole matrix, [rows, cols] row-major.
std::vector<float> dequantize(const QuantizedMatrix& w);

}  // namespace dsv4
