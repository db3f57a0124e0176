// GEMM for quantized weights on Hopper tensor cores (prefill and batched decode): y[T, N] = x[T, K] · Wᵀ, x bf16, y
// fp32, W stored as BF16, FP8_BLOCK128 (e8m0 or f32 scales), MXFP4 or NVFP4 on the device. W4A16 / W8A16: the weight is
// dequantised to bf16 in registers (the wgmma A fragment) and multiplied with bf16 wgmma, fp32 accumulation (TMA +
// mbarrier ring, one producer warp, two consumer warpgroups; quantized_gemm.cuh).
//
// Dispatch contract:
// - Correct for any T >= 1 and any N >= 1; tuned for 9 to thousands of tokens: T <= 64 runs 64-token tiles, more
//   runs 128- or 256-token tiles. K must be a positive multiple of 64 (the k-tile; it also gives TMA's 16-byte row
//   alignment). Anything else, F32 weights, or a device that is not compute capability 9.x (the kernels are sm_90a)
//   is refused with an error naming the shape or format; there is no fallback.
// - x: bf16 [T, groups·K] with a row stride (elements) >= groups·K and a multiple of 8, 16-byte aligned. Output:
//   exactly one of y (fp32) and y_bf16 (bf16, rounded to nearest even), [T, N] with a row stride >= N; elements
//   between N and the stride are not written. The output must not alias x or the workspace.
// - groups > 1 is the grouped output projection (wo_a): G blocks of N/G rows, N/G a multiple of 128, and
//   y[t, g·(N/G) + r] = Σ_k W[g·(N/G) + r, k] · x[t, g·K + k], in one launch.
// - Split-K: for T <= kGemmMaxSplitTokens, when the output tiles alone leave SMs idle, K is split (up to 4 ways) over
//   CTAs that write fp32 partial sums to the caller's workspace; the last CTA of each tile (an atomic ticket) adds them
//   in split order (deterministic) and resets its ticket. The workspace (quantized_gemm_workspace_bytes) must be
//   zero-filled ONCE when allocated and may then serve any number of launches on one stream (never two launches running
//   concurrently). Larger T never splits and needs no workspace.
// - Numerics: products e2m1·scale and e4m3·e8m0 are exact in bf16, so the result differs from an fp32 reference
//   fed the same (bf16) x only in summation order. FP8_BLOCK128 with F32 scales rounds each e4m3·scale to bf16
//   (relative error <= 2^-8 per weight). NVFP4's global scale is applied to the fp32 sum.
// - A programmatic dependent launch (ptx/dependent_launch.cuh): the first weight tiles stream while the previous
//   kernel in the stream drains; x is read, and the outputs and workspace written, only once it has completed.
// - TMA tensor maps are encoded on the host at every call (a host computation of about a microsecond, no
//   allocation) and passed by value. Asynchronous on `stream`, no synchronisation: capturable in a CUDA graph.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

inline constexpr int64_t kGemmMaxSplitTokens = 256;

struct QuantizedGemmParams {
  DeviceMatrixView weight;                // W [N, K] on the device (grouped: G blocks of N/G rows)
  const __nv_bfloat16* x = nullptr;       // device, [tokens, groups·K]
  int64_t x_row_stride = 0;               // elements between rows of x
  float* y = nullptr;                     // device, [tokens, N] fp32; null when y_bf16 is set
  int64_t y_row_stride = 0;               // elements between rows of the output (y or y_bf16)
  int64_t tokens = 0;                     // T
  cudaStream_t stream = nullptr;
  int groups = 1;                         // G: 1, or the block count of a grouped projection
  __nv_bfloat16* y_bf16 = nullptr;        // device, [tokens, N] bf16 instead of y
  void* workspace = nullptr;              // split-K partial sums + tickets; may be null when the size query says 0
  size_t workspace_bytes = 0;             // bytes available at `workspace`
};

// How a launch tiles the output: CTAs of 128 weight rows × `block_tokens` tokens × one of `k_splits` slices of K,
// a ring of `stages` k-tiles.
struct QuantizedGemmConfig {
  int block_tokens = 0;       // 64, 128 or 256
  int stages = 0;
  size_t shared_bytes = 0;    // dynamic shared memory per CTA
  int64_t ctas = 0;           // row tiles × token tiles × k_splits
  int k_splits = 1;           // > 1: split-K through the workspace
  int split_k_tiles = 0;      // 64-wide k-tiles per split
  size_t workspace_bytes = 0; // 0 without split-K
  size_t ticket_bytes = 0;    // the workspace's first ticket_bytes hold the tickets (zero between launches)
  int ctas_per_sm = 1;        // 2: the 64-token tile's two-CTA variant (shapes with at least as many tiles as SMs)
};

// The tiling run_quantized_gemm uses for this weight and token count on a device with `multiprocessors` SMs (throws
// on a weight format the GEMM does not take).
QuantizedGemmConfig choose_quantized_gemm_config(const DeviceMatrixView& weight, int64_t tokens, int multiprocessors);

// Workspace run_quantized_gemm needs for any call of 1..tokens tokens on the current device (0 when no call splits K;
// row tiles never span two groups, so the group count does not change it).
size_t quantized_gemm_workspace_bytes(const DeviceMatrixView& weight, int64_t tokens);

// Throws (naming the format, shape, stride or pointer at fault) unless run_quantized_gemm supports the call.
void check_quantized_gemm_params(const QuantizedGemmParams& params);

void run_quantized_gemm(const QuantizedGemmParams& params);

}  // namespace dsv4::cuda
