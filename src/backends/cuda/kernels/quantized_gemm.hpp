// Prefill GEMM for quantized weights on Hopper tensor cores: y[T, N] = x[T, K] · Wᵀ, x bf16, y fp32, W stored as
// BF16, FP8_BLOCK128 (e8m0 or f32 scales), MXFP4 or NVFP4 on the device. W4A16 / W8A16: the weight is dequantised to
// bf16 in registers (the wgmma A fragment) and multiplied with bf16 wgmma, fp32 accumulation (TMA + mbarrier ring,
// one producer warp, two consumer warpgroups; quantized_gemm.cuh).
//
// Dispatch contract:
// - Meant for prefill (T ≥ 65; tuned for hundreds to thousands of tokens) but correct for any T ≥ 1. Any N ≥ 1.
//   K must be a positive multiple of 64 (the k-tile; it also gives TMA's 16-byte row alignment). Anything else,
//   F32 weights, or a device that is not compute capability 9.x (the kernels are sm_90a) is refused with an error
//   naming the shape or format; there is no fallback.
// - x: bf16 [T, K] with a row stride (elements) ≥ K and a multiple of 8, 16-byte aligned. y: fp32 [T, N] with a row
//   stride ≥ N; elements between N and the stride are not written. y must not alias x.
// - Numerics: products e2m1·scale and e4m3·e8m0 are exact in bf16, so the result differs from an fp32 reference
//   fed the same (bf16) x only in summation order. FP8_BLOCK128 with F32 scales rounds each e4m3·scale to bf16
//   (relative error ≤ 2^-8 per weight). NVFP4's global scale is applied to the fp32 sum.
// - TMA tensor maps are encoded on the host at every call (a host computation of about a microsecond, no
//   allocation) and passed by value; no workspace. Asynchronous on `stream`, no synchronisation: capturable in a
//   CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

struct QuantizedGemmParams {
  DeviceMatrixView weight;                // W [N, K] on the device
  const __nv_bfloat16* x = nullptr;       // device, [tokens, K]
  int64_t x_row_stride = 0;               // elements between rows of x
  float* y = nullptr;                     // device, [tokens, N]
  int64_t y_row_stride = 0;               // elements between rows of y
  int64_t tokens = 0;                     // T
  cudaStream_t stream = nullptr;
};

// How a launch tiles the output: CTAs of 128 weight rows × `block_tokens` tokens, a ring of `stages` k-tiles.
struct QuantizedGemmConfig {
  int block_tokens = 0;       // 128 or 256
  int stages = 0;
  size_t shared_bytes = 0;    // dynamic shared memory per CTA
  int64_t ctas = 0;
};

// The tiling run_quantized_gemm uses for this weight and token count on a device with `multiprocessors` SMs.
QuantizedGemmConfig choose_quantized_gemm_config(const DeviceMatrixView& weight, int64_t tokens, int multiprocessors);

// Throws (naming the format, shape, stride or pointer at fault) unless run_quantized_gemm supports the call.
void check_quantized_gemm_params(const QuantizedGemmParams& params);

void run_quantized_gemm(const QuantizedGemmParams& params);

}  // namespace dsv4::cuda
