// Vectorised fp32 primitives the CPU ops share. The build targets baseline x86-64, so each kernel has an AVX2+FMA
// variant chosen at run time (when the CPU has it) and a portable one; both accumulate in fp32.
#pragma once

#include <cstdint>

namespace dsv4::cpu {

// Σ a[i]·b[i] over n elements.
float dot(const float* a, const float* b, int64_t n);

// y[i] += alpha·x[i] over n elements.
void axpy(float alpha, const float* x, float* y, int64_t n);

// A tile of y = x Wᵀ: y[t·y_stride + r] = Σ_k w[r·k_len + k] · x[t·x_stride + k]
// for r < rows (w is a dense [rows, k_len] tile) and t < tokens.
void matmul_tile(const float* w, int64_t rows, int64_t k_len, const float* x, int64_t x_stride, int64_t tokens,
                 float* y, int64_t y_stride);

// Whether the AVX2+FMA variants are in use (for benchmark labels).
bool vector_math_uses_avx2();

}  // namespace dsv4::cpu
