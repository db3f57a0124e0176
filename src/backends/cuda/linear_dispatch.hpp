// y = x Wᵀ for any token count, choosing the kernel: the tensor-core decode kernel (quantized_linear) below
// gemm_from_tokens tokens, the wgmma GEMM (quantized_gemm) from there on. Grouped
// projections (wo_a) run as one launch of either kernel, or, where the groups are not whole 128-row tiles, as one
// GEMM per group on the group's rows. When the GEMM cannot take a shape (its tile rules), the decode kernel covers
// the tokens in chunks of kLinearMaxTokens and a warning naming the matrix and the reason is logged once per
// matrix: correct, slower, never silent. A call with the RMSNorm prologue (norm_x instead of x) always runs the
// decode kernel (quantized_linear.hpp), up to kLinearMaxTokens tokens.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"

namespace dsv4::cuda {

// Default of LinearCall::gemm_from_tokens. Measured on an H200 (bench_cuda_linear, V4-Flash FP8/fp4/BF16): at 16
// tokens the decode kernel and the GEMM were within 10 %; from 17 the decode kernel runs 32-token tiles, level with
// the GEMM at 32 tokens, and at 64 the GEMM took 0.3-0.7x its time (wq_b 69 → 21 µs, wo_a / wo_b 85 → 36, wkv 55 →
// 27 in FP8).
inline constexpr int64_t kLinearGemmFromTokens = 17;

struct LinearCall {
  DeviceMatrixView weight;           // [N, K] (grouped: G blocks of N/G rows)
  std::string_view what;             // names the matrix in errors and warnings ("layer 3 wq_b")
  const __nv_bfloat16* x = nullptr;  // device [tokens, groups·K]
  int64_t x_row_stride = 0;          // elements
  float* y = nullptr;                // device [tokens, N] fp32; null when y_bf16 is set
  int64_t y_row_stride = 0;          // elements (of whichever output is set)
  int64_t tokens = 0;
  int groups = 1;
  void* workspace = nullptr;         // linear_workspace_bytes(weight, groups) bytes, its tickets zeroed once
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
  __nv_bfloat16* y_bf16 = nullptr;   // device [tokens, N] bf16 instead of y
  // The token count from which the GEMM takes the call instead of the decode kernel (1..kLinearMaxTokens + 1).
  int64_t gemm_from_tokens = kLinearGemmFromTokens;
  // RMSNorm prologue (groups = 1): fp32 [tokens, K] rows (x_row_stride apart) normalised with norm_weight [K] and
  // norm_eps and rounded to bf16 exactly as run_rms_norm's y_bf16, instead of x (which must then be null).
  const float* norm_x = nullptr;
  const float* norm_weight = nullptr;
  float norm_eps = 0.0f;
};

// Workspace that serves any token count for this weight and either kernel (the larger split-K scratch).
size_t linear_workspace_bytes(const DeviceMatrixView& weight, int groups = 1);

void run_linear(const LinearCall& call);

// Rows [row0, row0 + rows) of a matrix as a view of their own (row0 a multiple of 128 for FP8_BLOCK128 row bands).
DeviceMatrixView row_slice(const DeviceMatrixView& weight, int64_t row0, int64_t rows);

}  // namespace dsv4::cuda
