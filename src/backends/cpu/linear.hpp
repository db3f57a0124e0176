// Quantized linear layers: y = x Wᵀ for a weight in any stored format (F32, BF16, FP8_BLOCK128, MXFP4, NVFP4).
// Dispatch contract: the weight is dequantized one tile of rows at a time into a per-thread fp32 scratch buffer
// (weight_decode.hpp: AVX2 decoders, else core/dequantize.hpp) and multiplied with all T tokens before the next
// tile, so each call reads the weight once; tiles are spread over the thread pool. Accumulation is fp32. The reference also quantizes activations to fp8 per
// 1×128 block before its linear layers; that is a kernel choice (dsv4-model.md §3.5) and is not done here.
#pragma once

#include <cstdint>

#include "core/quantized_matrix.hpp"

namespace dsv4::cpu {

// x: [T, K] → y: [T, N] with w logically [N, K]. y must not alias x.
void linear(const QuantizedMatrix& w, const float* x, int64_t T, float* y);

// Grouped (block-diagonal) projection, the attention's wo_a (dsv4-model.md §3.4): w is [G·R, K] viewed as
// [G, R, K]; x: [T, G, K] → y: [T, G, R] with y[t, g] = w[g] @ x[t, g]. y must not alias x.
void grouped_linear(const QuantizedMatrix& w, int64_t groups, const float* x, int64_t T, float* y);

}  // namespace dsv4::cpu
