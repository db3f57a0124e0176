// Decode GEMV for quantized weights: y[T, N] = x[T, K] · Wᵀ for T = 1..8 tokens, W stored as FP8_BLOCK128 (e8m0
// scales), MXFP4 or NVFP4 on the device, dequantized in registers, fp32 accumulation.
//
// Dispatch contract:
// - Activations x are fp32 [T, K] row-major (the residual stream's type; exact against the CPU reference and only
//   T·K·4 bytes, negligible beside the weight), 16-byte aligned. y is fp32 [T, N] row-major and must not alias x.
// - K must be a multiple of 16 (FP8) or 32 (MXFP4, NVFP4): one 16-byte vector of stored weights. A partial FP8 scale
//   block (K % 128 != 0) is handled. Anything else is refused with an error naming the shape; there is no fallback.
// - When choose_quantized_gemv_config() splits K over CTAs, the launcher zeroes y on the stream and the CTAs add
//   their partial sums atomically, so the summation order (and the last bits of y) may differ between runs.
// - Asynchronous on `stream`; no allocation, no host synchronisation (graph-capturable).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

inline constexpr int kGemvMaxTokens = 8;

struct QuantizedGemvParams {
  DeviceMatrixView weight;      // [N, K] on the device
  const float* x = nullptr;     // device, fp32 [tokens, K], row stride K elements, 16-byte aligned
  float* y = nullptr;           // device, fp32 [tokens, N], row stride N elements
  int tokens = 1;               // T, 1..kGemvMaxTokens
  cudaStream_t stream = nullptr;
};

// How one launch covers the matrix: CTAs of `rows_per_cta` output rows × one K tile of `tile_k` inputs.
struct GemvLaunchConfig {
  int rows_per_cta = 0;
  int64_t tile_k = 0;      // inputs per CTA, a multiple of the format's 16-byte vector
  int k_splits = 0;        // CTAs along K (> 1: split-K with atomic accumulation)
  size_t smem_bytes = 0;   // dynamic shared memory: the x tile, T × tile_k fp32
};

// The tiling the launcher uses for this shape on a device with `multiprocessors` SMs (throws on unsupported shapes).
GemvLaunchConfig choose_quantized_gemv_config(WeightFormat format, int64_t rows, int64_t cols, int tokens,
                                              int multiprocessors);

// Throws (naming the format, shape, token count or pointer at fault) unless run_quantized_gemv supports the call.
void check_quantized_gemv_params(const QuantizedGemvParams& params);

void run_quantized_gemv(const QuantizedGemvParams& params);

}  // namespace dsv4::cuda
