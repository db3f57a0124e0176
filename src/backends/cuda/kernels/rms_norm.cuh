// Kernel behind run_rms_norm (rms_norm.hpp holds the contract).
//
// NOTES:
// - A group of kGroupThreads threads owns a row: 32 (a warp, 8 rows per CTA) for widths up to 1024, 256 (the CTA)
//   beyond or with cta_rows. Thread g holds elements g, g + kGroupThreads, … in registers: consecutive lanes touch
//   consecutive floats (coalesced), every load of the row is issued before the reduction, and nothing is re-read.
// - The sum of squares is a butterfly within the warp, then (CTA groups) the 8 warp sums added in warp order by
//   every thread: deterministic.
// - Programmatic dependent launch: the weight is loaded into registers before the wait (a parameter, not a
//   predecessor's output), x only after it. Each group stages its row's RoPE factors (the RoPE table's row of its
//   position) in shared memory once x's loads are issued. The shared rows are the group's own: warp groups
//   synchronise with __syncwarp, so a warp never waits for the CTA's other rows.
// - Plain loads, not __ldg: ptxas keeps plain loads in program order but moved the read-only (.nc) ones, the weights
//   after the grid wait and the RoPE factors ahead of x's loads, so that every x load waited for the position's
//   round trip.
// - Every rms_norm_kernel of 16-value rows (any group, with or without RoPE; the queries' 512-wide heads in warps: a
//   b64 Flash step's 4096 heads in 512 CTAs) is compiled for 4 CTAs per SM (≤ 64 registers), so that grid runs in
//   one wave on a 132-SM GPU rather than two at 3 CTAs per SM.
// - rms_norm_rows is the whole body as a device function, so that kv_insert's fused launch runs the same code.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/rms_norm_math.hpp"

namespace dsv4::cuda::rms {

inline constexpr int kThreads = 256;
inline constexpr int kValuesPerThread = 32;
// Rows of at most kGroupThreads · kShortRowValues values (the queries' 512-wide heads in warps, 4096-wide rows in a
// CTA) run a variant holding half as many, rows of at most kGroupThreads · kTinyRowValues (512-wide heads in a CTA)
// one holding 2: fewer unrolled loads, sums and stores to issue. The same bits (a longer variant's extra values are
// zeros, whose squares add nothing).
inline constexpr int kShortRowValues = 16;
inline constexpr int kTinyRowValues = 2;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;

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
  const float2* rope_table;
  const int64_t* positions;
  int rope_dim;
  int64_t rows_per_position;
  int64_t x_group_stride;
};

// A checked call's kernel arguments and grid (rms_norm.cu): warp_rows picks kGroupThreads 32 (else kThreads), rope
// the RoPE epilogue, values the values per thread (kTinyRowValues, kShortRowValues or kValuesPerThread); ctas of
// kThreads threads.
struct RmsNormLaunch {
  RmsNormArgs args;
  bool warp_rows;
  bool rope;
  int values;
  int64_t ctas;
};
RmsNormLaunch rms_norm_launch(const RmsNormParams& params);

// Rows per CTA of kThreads threads.
template <int kGroupThreads>
inline constexpr int kRowsPerCta = kThreads / kGroupThreads;

// A barrier of the threads that own one row: the warp, or the CTA.
template <int kGroupThreads>
__device__ __forceinline__ void group_sync() {
  if constexpr (kGroupThreads == 32)
    __syncwarp();
  else
    __syncthreads();
}

// The rows of CTA `cta` (of kThreads threads, all of which call this). Waits for the prior grids itself.
// kRope: the RoPE epilogue; kValues: values per thread (width ≤ kGroupThreads · kValues).
template <int kGroupThreads, bool kRope, int kValues>
__device__ __forceinline__ void rms_norm_rows(const RmsNormArgs& args, int64_t cta) {
  static_assert(kGroupThreads == 32 || kGroupThreads == kThreads, "a row is owned by a warp or by the CTA");
  static_assert(kValues == kValuesPerThread || kValues == kShortRowValues || kValues == kTinyRowValues);
  __shared__ float warp_sums[kThreads / 32];
  const int group = threadIdx.x / kGroupThreads, member = threadIdx.x % kGroupThreads;
  const int64_t row = cta * kRowsPerCta<kGroupThreads> + group;
  // Rows past the end still take part in the reduction's shuffles (warp groups never span two rows).
  const bool active = row < args.rows;
  float weights[kValues];
#pragma unroll
  for (int j = 0; j < kValues; ++j) {
    const int i = member + j * kGroupThreads;
    weights[j] = args.weight != nullptr && i < args.width ? args.weight[i] : 1.0f;
  }
  // The group's row of RoPE factors (rope_dim / 2 ≤ kRmsNormMaxRopePairs pairs), staged by the group's threads; the
  // barrier after it is reached by every thread of the group (kRope is uniform). The position is loaded before x and
  // its factors once x's loads are issued: one round trip after x's.
  __shared__ float2 staged_rope[kRope ? kRowsPerCta<kGroupThreads> : 1][kRope ? kRmsNormMaxRopePairs : 1];
  // The row's position group (a token's heads) in 32 bits: rms_norm_launch checks that the rows fit.
  const uint32_t position_group = uint32_t(row) / uint32_t(args.rows_per_position);
  const uint32_t row_in_group = uint32_t(row) - position_group * uint32_t(args.rows_per_position);
  const auto load_position = [&] { return kRope && active ? args.positions[position_group] : int64_t(0); };
  // A group's threads cover the pairs in kRopeSteps steps (a fixed trip count: no remainder loops).
  constexpr int kRopeSteps = (kRmsNormMaxRopePairs + kGroupThreads - 1) / kGroupThreads;
  const int pairs = args.rope_dim / 2;
  const auto stage_rope = [&](int64_t position) {
    if constexpr (kRope) {
#pragma unroll
      for (int step = 0; step < kRopeSteps; ++step) {
        const int k = member + step * kGroupThreads;
        if (active && k < pairs) staged_rope[group][k] = args.rope_table[position * pairs + k];
      }
      group_sync<kGroupThreads>();
    }
  };
  wait_for_prior_grids();
  const int64_t position = load_position();
  const float* x = args.x + int64_t(position_group) * args.x_group_stride + int64_t(row_in_group) * args.x_row_stride;
  float values[kValues];
#pragma unroll
  for (int j = 0; j < kValues; ++j) {
    const int i = member + j * kGroupThreads;
    values[j] = active && i < args.width ? x[i] : 0.0f;
  }
  // x's loads are all issued before the RoPE factors' loads, which wait for the position.
  stage_rope(position);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kValues; ++j) sum = fmaf(values[j], values[j], sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if constexpr (kGroupThreads == kThreads) {
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
  }
  const float inv_rms = inverse_rms(sum, float(args.width), args.eps);
  // With RoPE the row's last rope_dim values go through shared memory to the pair loop below (a pair's two values
  // sit in two threads of the group): the unrolled loop stays free of the rotation.
  const int rope_begin = kRope ? args.width - args.rope_dim : args.width;
  __shared__ float rope_values[kRope ? kRowsPerCta<kGroupThreads> : 1][kRope ? 2 * kRmsNormMaxRopePairs : 1];
  const auto store = [&](int i, float value) {
    const int64_t offset = row * args.width + i;
    if (args.y != nullptr) args.y[offset] = value;
    if (args.y_bf16 != nullptr) args.y_bf16[offset] = __float2bfloat16_rn(value);
  };
#pragma unroll
  for (int j = 0; j < kValues; ++j) {
    const int i = member + j * kGroupThreads;
    if (!active || i >= args.width) break;
    float value = values[j] * inv_rms;
    if (args.weight != nullptr) value *= weights[j];
    if (args.round_to_bf16) value = round_to_bf16(value);
    if (kRope && i >= rope_begin)
      rope_values[group][i - rope_begin] = value;
    else
      store(i, value);
  }
  if constexpr (kRope) {
    group_sync<kGroupThreads>();  // reached by every thread of the group: inactive rows only skip the work
    if (!active) return;
#pragma unroll
    for (int step = 0; step < kRopeSteps; ++step) {
      const int k = member + step * kGroupThreads;
      if (k >= pairs) break;
      float x0 = rope_values[group][2 * k], x1 = rope_values[group][2 * k + 1];
      const float2 f = staged_rope[group][k];
      rope_rotate_pair(x0, x1, RopeFactors{f.x, f.y}, false);
      store(rope_begin + 2 * k, x0);
      store(rope_begin + 2 * k + 1, x1);
    }
  }
}

template <int kGroupThreads, bool kRope, int kValues>
__global__ void __launch_bounds__(kThreads, kValues == kShortRowValues ? 4 : 1)
    rms_norm_kernel(const RmsNormArgs args) {
  allow_dependents();  // the dependent's own wait still orders it after this grid's completion
  rms_norm_rows<kGroupThreads, kRope, kValues>(args, blockIdx.x);
}

}  // namespace dsv4::cuda::rms
