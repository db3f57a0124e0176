// y = x Wᵀ for any token count, choosing the kernel: the tensor-core decode kernel (quantized_linear) up to
// kLinearMaxTokens tokens, the wgmma prefill GEMM (quantized_gemm) beyond. Grouped projections (wo_a) run as one
// decode launch, or as one GEMM per group on the group's rows. When the GEMM cannot take a shape (its tile rules),
// the decode kernel covers the tokens in chunks of kLinearMaxTokens and a warning naming the matrix and the reason
// is logged once per matrix: correct, slower, never silent.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

struct LinearCall {
  DeviceMatrixView weight;           // [N, K] (grouped: G blocks of N/G rows)
  std::string_view what;             // names the matrix in errors and warnings ("layer 3 wq_b")
  const __nv_bfloat16* x = nullptr;  // device [tokens, groups·K]
  int64_t x_row_stride = 0;          // elements
  float* y = nullptr;                // device [tokens, N]
  int64_t y_row_stride = 0;          // elements
  int64_t tokens = 0;
  int groups = 1;
  void* workspace = nullptr;         // linear_workspace_bytes(weight, groups) bytes, its tickets zeroed once
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// Workspace that serves any token count for this weight (the decode kernel's split-K scratch at its largest).
size_t linear_workspace_bytes(const DeviceMatrixView& weight, int groups = 1);

void run_linear(const LinearCall& call);

// Rows [row0, row0 + rows) of a matrix as a view of their own (row0 a multiple of 128 for FP8_BLOCK128 row bands).
DeviceMatrixView row_slice(const DeviceMatrixView& weight, int64_t row0, int64_t rows);

}  // namespace dsv4::cuda
