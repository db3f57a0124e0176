// Kernel behind run_rms_norm (rms_norm.hpp holds the contract).
//
// NOTES:
// - A group of kGroupThreads threads owns a row: 32 (a warp, 8 rows per CTA) for widths up to 1024, 256 (the CTA)
//   beyond. Thread g holds elements g, g + kGroupThreads, … in registers: consecutive lanes touch consecutive
//   floats (coalesced), every load of the row is issued before the reduction, and nothing is re-read.
// - The sum of squares is a butterfly within the warp, then (CTA groups) the 8 warp sums added in warp order by
//   every thread: deterministic.
// - Programmatic dependent launch: the weight is loaded into registers and the RoPE frequencies into shared memory
//   before the wait (parameters, not a predecessor's output), x and the positions (together) only after it.
// - rms_norm_rows is the whole body as a device function, so that kv_insert's fused launch runs the same code.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"

namespace dsv4::cuda::rms {

inline constexpr int kThreads = 256;
inline constexpr int kValuesPerThread = 32;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
// RoPE frequencies up to this many (rope_dim / 2) are staged in shared memory before the grid-dependency wait.
inline constexpr int kStagedFrequencies = 128;

struct RmsNormArgs {
  const float* x;
  int64_t x_row_stride;
  const float* weight;
  int64_t rows;
  int width;
  float eps;
  bool round_to_bf16;
  float* y;
  __nv_bfloat16* y_bf16;
  const float* rope_frequencies;
  const int64_t* positions;
  int rope_dim;
  int64_t rows_per_position;
  int64_t x_group_stride;
};

// A checked call's kernel arguments and grid (rms_norm.cu): warp_rows picks kGroupThreads 32 (else kThreads), rope
// the RoPE epilogue; ctas of kThreads threads.
struct RmsNormLaunch {
  RmsNormArgs args;
  bool warp_rows;
  bool rope;
  int64_t ctas;
};
RmsNormLaunch rms_norm_launch(const RmsNormParams& params);

// Rows per CTA of kThreads threads.
template <int kGroupThreads>
inline constexpr int kRowsPerCta = kThreads / kGroupThreads;

// The rows of CTA `cta` (of kThreads threads, all of which call this). Waits for the prior grids itself.
// kRope: the RoPE epilogue (its double-precision sincos costs registers the plain norms should not pay).
template <int kGroupThreads, bool kRope>
__device__ __forceinline__ void rms_norm_rows(const RmsNormArgs& args, int64_t cta) {
  static_assert(kGroupThreads == 32 || kGroupThreads == kThreads, "a row is owned by a warp or by the CTA");
  __shared__ float warp_sums[kThreads / 32];
  const int group = threadIdx.x / kGroupThreads, member = threadIdx.x % kGroupThreads;
  const int64_t row = cta * kRowsPerCta<kGroupThreads> + group;
  // Rows past the end still take part in the reduction's shuffles (warp groups never span two rows).
  const bool active = row < args.rows;
  float weights[kValuesPerThread];
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const int i = member + j * kGroupThreads;
    weights[j] = args.weight != nullptr && i < args.width ? __ldg(args.weight + i) : 1.0f;
  }
  // The RoPE frequencies are parameters: staged before the wait, they are not a dependent load after the reduction.
  __shared__ float staged_frequencies[kRope ? kStagedFrequencies : 1];
  const bool staged = kRope && args.rope_dim / 2 <= kStagedFrequencies;
  if constexpr (kRope) {
    if (staged) {  // uniform over the CTA
      for (int k = threadIdx.x; k < args.rope_dim / 2; k += kThreads)
        staged_frequencies[k] = __ldg(args.rope_frequencies + k);
      __syncthreads();
    }
  }
  wait_for_prior_grids();
  // The position is loaded with x, not after the reduction: one dependent load less in a decode step's chain.
  const int64_t position = kRope && active ? args.positions[row / args.rows_per_position] : 0;
  const float* x = args.x + (row / args.rows_per_position) * args.x_group_stride +
                   (row % args.rows_per_position) * args.x_row_stride;
  float values[kValuesPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const int i = member + j * kGroupThreads;
    values[j] = active && i < args.width ? x[i] : 0.0f;
    sum = fmaf(values[j], values[j], sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if constexpr (kGroupThreads == kThreads) {
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
  }
  if (!active) return;
  const float inv_rms = 1.0f / sqrtf(sum / float(args.width) + args.eps);
  const int rope_begin = args.width - args.rope_dim;
#pragma unroll
  for (int j = 0; j < kValuesPerThread; ++j) {
    const int i = member + j * kGroupThreads;
    // With RoPE, leave the loop uniformly over the group (its first member's element), so the partner shuffle
    // below stays convergent.
    if (kRope ? j * kGroupThreads >= args.width : i >= args.width) break;
    float value = values[j] * inv_rms;
    if (args.weight != nullptr && (!kRope || i < args.width)) value *= weights[j];
    if (args.round_to_bf16) value = round_to_bf16(value);
    if constexpr (kRope) {
      // Pair (2k, 2k+1) sits in lanes (2m, 2m+1) of one iteration: each lane rotates the pair, keeps its half.
      const float partner = __shfl_xor_sync(kFullMask, value, 1);
      if (i < args.width && i >= rope_begin) {
        const bool even = (i & 1) == 0;
        float x0 = even ? value : partner, x1 = even ? partner : value;
        const int k = (i - rope_begin) / 2;
        const float frequency = staged ? staged_frequencies[k] : __ldg(args.rope_frequencies + k);
        rope_rotate_pair(x0, x1, rope_factors(position, frequency), false);
        value = even ? x0 : x1;
      }
    }
    if (kRope && i >= args.width) continue;  // the last iteration: no later shuffle is left to miss
    const int64_t offset = row * args.width + i;
    if (args.y != nullptr) args.y[offset] = value;
    if (args.y_bf16 != nullptr) args.y_bf16[offset] = __float2bfloat16_rn(value);
  }
}

template <int kGroupThreads, bool kRope>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormArgs args) {
  allow_dependents();  // the dependent's own wait still orders it after this grid's completion
  rms_norm_rows<kGroupThreads, kRope>(args, blockIdx.x);
}

}  // namespace dsv4::cuda::rms
