// Kernels behind run_hc_pre / run_hc_head / run_hc_post (mhc.hpp holds the contract).
//
// NOTES:
// - hc_pre's cost is the projection m[T, R] = X[T, n·d] · fnᵀ (R = 24 rows, 4 for hc_head): 24 FMAs per X value,
//   so it is done on CUDA cores with register tiles (2 tokens × 6 rows per thread) and fp32 accumulation, the
//   precision of the reference. Each CTA owns one (token tile, d-slice) work item: it stages the slice of X (all 4
//   streams) in shared memory, reads the matching columns of fn through L1 (the 8 lanes of a row group share each
//   load), and publishes per-slice partial sums [Σx², m_0 … m_{R-1}] × tokens to the workspace.
// - The collapse y = Σ_k pre_k·X_k needs the whole token reduced first. Instead of a second launch (and a second
//   pass over X from HBM), every CTA of a tile waits on an arrival counter, sums the 5 partial rows it needs
//   (Σx² and the pre rows) over the slices in slice order — deterministic — and collapses its own slice straight
//   from shared memory. Post/comb (Sinkhorn) of the tile's tokens are dealt round-robin over its CTAs.
// - Work items come from an atomic ticket, not blockIdx, so a CTA only ever waits for items already handed out
//   to running CTAs or to be handed out next; with every slice CTA of a tile resident at once (checked by the
//   launcher) this cannot deadlock. The last CTA to leave resets the counters for the next launch.
// - xs rows are padded by 4 floats: the 8 token rows a warp reads at one column land 4 banks apart
//   (conflict-free float4 loads); lanes of the same token group read the same address (broadcast).
// - Sinkhorn on 4×4: lane = 4·j + k of lanes 0..15 holds comb[j][k]; row sums are xor-1/2 butterflies, column sums
//   xor-4/8. Divisions are IEEE (no fast math), like the CPU reference.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "core/bf16.hpp"

namespace dsv4::cuda::mhc {

inline constexpr int kStreams = 4;
inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kRowPad = 4;          // floats of padding per staged token row
inline constexpr int kCounterHeader = 2;   // ticket, finished; then (arrive, depart) per token tile
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <bool kHead>
inline constexpr int kProjectionRows = kHead ? kStreams : (2 + kStreams) * kStreams;

struct ProjectionArgs {
  const float* X;
  const float* fn;
  const float* base;
  const float* scale;
  int64_t tokens;
  int hidden;
  int slice_dims;       // DS: a multiple of 32
  int slices;           // CTAs per token tile
  int sinkhorn_iters;
  float hc_eps;
  float norm_eps;
  bool round_to_bf16;
  float* y;
  __nv_bfloat16* y_bf16;
  float* post;
  float* comb;
  unsigned* counters;   // [kCounterHeader + 2·tiles]
  float* partials;      // [tiles][slices][R + 1][token_tile]
};

// Shared-memory floats beyond the static arrays: the staged X slice and the cross-warp reduction buffer.
__host__ __device__ inline int projection_smem_floats(int token_tile, int slice_dims, int rows) {
  return token_tile * (kStreams * slice_dims + kRowPad) + kWarps * token_tile * rows;
}

__device__ inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ inline unsigned load_acquire(const unsigned* address) {
  unsigned value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

// Lanes per item when `items` partial sums are reduced over the slices by one CTA in one pass: the largest power
// of two up to a warp that fits (more lanes, fewer dependent L2 round trips per lane).
__device__ inline int slice_sum_group(int items) {
  int group = 32;
  while (group > 1 && group * items > kThreads) group >>= 1;
  return group;
}

// Σ over the slices of element `index` of each slice's partial block, by `group` aligned lanes: lane `part` adds
// slices part, part + group, … in order, then a butterfly. The partition depends only on (slices, group), so every
// CTA of a tile (and every run) gets the same bits. All lanes of the warp must call it (the butterfly shuffles);
// lanes with nothing to add pass slices = 0.
__device__ inline float sum_over_slices(const float* partials, int64_t stride, int slices, int index, int part,
                                        int group) {
  float sum = 0.0f;
#pragma unroll 8
  for (int s = part; s < slices; s += group) sum += __ldcg(partials + s * stride + index);
  for (int offset = group / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// Doubly stochastic 4×4 from logits held by lanes 0..15 (lane = 4·j + k); lanes 16..31 compute a copy on junk.
__device__ inline float sinkhorn_4x4(float logit, int iters, float eps) {
  float row_max = fmaxf(logit, __shfl_xor_sync(kFullMask, logit, 1));
  row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, 2));
  const float e = expf(logit - row_max);
  float sum = e + __shfl_xor_sync(kFullMask, e, 1);
  sum += __shfl_xor_sync(kFullMask, sum, 2);
  float v = e / sum + eps;
  float column = v + __shfl_xor_sync(kFullMask, v, 4);
  column += __shfl_xor_sync(kFullMask, column, 8);
  v = v / (column + eps);
  for (int it = 1; it < iters; ++it) {
    float row = v + __shfl_xor_sync(kFullMask, v, 1);
    row += __shfl_xor_sync(kFullMask, row, 2);
    v = v / (row + eps);
    column = v + __shfl_xor_sync(kFullMask, v, 4);
    column += __shfl_xor_sync(kFullMask, column, 8);
    v = v / (column + eps);
  }
  return v;
}

template <bool kHead, int kTokensPerThread>
__global__ void __launch_bounds__(kThreads, 3) hc_projection_kernel(const ProjectionArgs args) {
  constexpr int kRows = kProjectionRows<kHead>;
  constexpr int kRowsPerThread = kRows / 4;
  constexpr int kTile = 8 * kTokensPerThread;
  constexpr int kPartialRows = kRows + 1;  // row 0: Σx² of the slice; rows 1..R: the projections
  static_assert(kRows % 4 == 0, "rows are spread over 4 row groups of lanes");
  static_assert(kThreads % kTile == 0 && kThreads / kTile <= 32, "Σx² groups must fit a warp");

  extern __shared__ float4 dynamic_smem[];
  __shared__ float sum_squares_s[kTile];
  __shared__ float reduced_s[kStreams + 1][kTile];  // Σx² and the pre projections, summed over the slices
  __shared__ float pre_s[kTile][kStreams];
  __shared__ float inv_rms_s[kTile];
  __shared__ unsigned ticket_s;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) ticket_s = atomicAdd(&args.counters[0], 1u);
  __syncthreads();
  const int slices = args.slices;
  const int64_t tile = ticket_s / unsigned(slices);
  const int slice = int(ticket_s % unsigned(slices));
  const int64_t t0 = tile * kTile;
  const int valid_tokens = int(args.tokens - t0 < kTile ? args.tokens - t0 : kTile);
  const int d = args.hidden;
  const int64_t flat = int64_t(kStreams) * d;
  const int ds = args.slice_dims;
  const int i0 = slice * ds;
  const int width = min(ds, d - i0);
  const int ldx = kStreams * ds + kRowPad;
  float* xs = reinterpret_cast<float*>(dynamic_smem);  // [kTile][ldx]: column s·ds + i = stream s, dim i0 + i
  float* red = xs + kTile * ldx;                       // [kWarps][kTile][kRows]

  // Stage X[t0 + t][s][i0 .. i0 + width) for every stream; zeros past the tile's tokens and the slice's width.
  const int vectors_per_row = ds / 4;
  const int vectors = kTile * kStreams * vectors_per_row;
#pragma unroll 4
  for (int v = tid; v < vectors; v += kThreads) {
    const int t = v / (kStreams * vectors_per_row);
    const int rest = v - t * kStreams * vectors_per_row;
    const int s = rest / vectors_per_row;
    const int i = (rest - s * vectors_per_row) * 4;
    float4 value = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (t < valid_tokens && i < width)
      value = __ldg(reinterpret_cast<const float4*>(args.X + ((t0 + t) * kStreams + s) * d + i0 + i));
    *reinterpret_cast<float4*>(xs + t * ldx + s * ds + i) = value;
  }
  __syncthreads();

  {  // Σx² per token over the slice: kThreads / kTile consecutive threads per token.
    constexpr int kGroup = kThreads / kTile;
    const int t = tid / kGroup, part = tid % kGroup;
    float sum = 0.0f;
    for (int c = part; c < kStreams * ds; c += kGroup) sum = fmaf(xs[t * ldx + c], xs[t * ldx + c], sum);
#pragma unroll
    for (int offset = kGroup / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
    if (part == 0) sum_squares_s[t] = sum;
  }

  {  // Projection: warp w covers dims [(w & 1)·ds/2, +ds/2) of stream w / 2; lane = (token group, row group).
    const int token_group = lane >> 2, row_group = lane & 3;
    const int s = warp >> 1;
    const int i_begin = (warp & 1) * (ds / 2);
    const int i_end = min(i_begin + ds / 2, width);
    const float* fn_columns = args.fn + int64_t(s) * d + i0;
    float acc[kTokensPerThread][kRowsPerThread] = {};
#pragma unroll 2
    for (int i = i_begin; i < i_end; i += 4) {
      float4 x[kTokensPerThread];
#pragma unroll
      for (int j = 0; j < kTokensPerThread; ++j)
        x[j] = *reinterpret_cast<const float4*>(xs + (token_group + 8 * j) * ldx + s * ds + i);
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) {
        const float4 f = __ldg(reinterpret_cast<const float4*>(fn_columns + (row_group + 4 * q) * flat + i));
#pragma unroll
        for (int j = 0; j < kTokensPerThread; ++j) {
          acc[j][q] = fmaf(x[j].x, f.x, acc[j][q]);
          acc[j][q] = fmaf(x[j].y, f.y, acc[j][q]);
          acc[j][q] = fmaf(x[j].z, f.z, acc[j][q]);
          acc[j][q] = fmaf(x[j].w, f.w, acc[j][q]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j)
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q)
        red[(warp * kTile + token_group + 8 * j) * kRows + row_group + 4 * q] = acc[j][q];
  }
  __syncthreads();

  // Publish this slice's partial sums: [kPartialRows][kTile], warps summed in order.
  const int64_t partial_stride = int64_t(kPartialRows) * kTile;
  float* tile_partials = args.partials + tile * slices * partial_stride;
  for (int p = tid; p < kPartialRows * kTile; p += kThreads) {
    const int row = p / kTile, t = p % kTile;
    float value;
    if (row == 0) {
      value = sum_squares_s[t];
    } else {
      value = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) value += red[(w * kTile + t) * kRows + row - 1];
    }
    tile_partials[slice * partial_stride + p] = value;
  }
  __syncthreads();

  unsigned* arrive = args.counters + kCounterHeader + 2 * tile;
  unsigned* depart = arrive + 1;
  if (tid == 0) {
    // One fence after the barrier publishes the whole CTA's partials (fences are cumulative), as grid sync does.
    __threadfence();
    atomicAdd(arrive, 1u);
    while (load_acquire(arrive) < unsigned(slices)) __nanosleep(32);
  }
  __syncthreads();

  // Σx² and the pre rows (rows 0..n of the partial layout) of the tile's valid tokens, summed over the slices.
  {
    const int items = (kStreams + 1) * valid_tokens;
    const int group = slice_sum_group(items);
    const int item = tid / group, part = tid % group;
    const bool active = item < items;
    const int row = active ? item / valid_tokens : 0, t = active ? item % valid_tokens : 0;
    const float sum =
        sum_over_slices(tile_partials, partial_stride, active ? slices : 0, row * kTile + t, part, group);
    if (active && part == 0) reduced_s[row][t] = sum;
  }
  __syncthreads();
  if (tid < valid_tokens) inv_rms_s[tid] = 1.0f / sqrtf(reduced_s[0][tid] / float(flat) + args.norm_eps);
  __syncthreads();
  if (tid < valid_tokens * kStreams) {
    const int t = tid / kStreams, k = tid % kStreams;
    const float mix = reduced_s[1 + k][t] * inv_rms_s[t];
    pre_s[t][k] = sigmoid(mix * args.scale[0] + args.base[k]) + args.hc_eps;
  }

  if constexpr (!kHead) {
    // post and comb of the tile's tokens, dealt round-robin over its slices' CTAs: 8 threads per projection row
    // reduce the slices, then warp 0 applies the sigmoids and Sinkhorn.
    constexpr int kMixRows = kRows - kStreams;  // post rows, then comb rows
    constexpr int kMixGroup = 8;
    static_assert(kMixRows * kMixGroup <= kThreads, "one pass of the CTA reduces every post/comb row");
    __shared__ float mix_s[kMixRows];
    for (int t = slice; t < valid_tokens; t += slices) {
      const int item = tid / kMixGroup, part = tid % kMixGroup;
      const bool active = item < kMixRows;
      const float sum = sum_over_slices(tile_partials, partial_stride, active ? slices : 0,
                                        (1 + kStreams + (active ? item : 0)) * kTile + t, part, kMixGroup);
      if (active && part == 0) mix_s[item] = sum * inv_rms_s[t];
      __syncthreads();
      if (warp == 0) {
        if (lane < kStreams)
          args.post[(t0 + t) * kStreams + lane] =
              2.0f * sigmoid(mix_s[lane] * args.scale[1] + args.base[kStreams + lane]);
        // lane = 4·j + k of lanes 0..15 holds comb[j][k].
        const float logit = lane < kStreams * kStreams
                                ? mix_s[kStreams + lane] * args.scale[2] + args.base[2 * kStreams + lane]
                                : 0.0f;
        const float comb = sinkhorn_4x4(logit, args.sinkhorn_iters, args.hc_eps);
        if (lane < kStreams * kStreams) args.comb[(t0 + t) * kStreams * kStreams + lane] = comb;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  // Every read of the tile's partials is done: the last CTA out re-arms the tile's counters.
  if (tid == 0 && atomicAdd(depart, 1u) == unsigned(slices) - 1) {
    *arrive = 0;
    *depart = 0;
  }

  // Collapse this slice: y[t][i0 + i] = Σ_k pre_k·X_k[i0 + i], from shared memory.
  for (int p = tid; p < kTile * ds; p += kThreads) {
    const int t = p / ds, i = p % ds;
    if (t >= valid_tokens || i >= width) continue;
    const float* x = xs + t * ldx + i;
    float value = pre_s[t][0] * x[0];
#pragma unroll
    for (int k = 1; k < kStreams; ++k) value = fmaf(pre_s[t][k], x[k * ds], value);
    if (args.round_to_bf16) value = round_to_bf16(value);
    const int64_t offset = (t0 + t) * d + i0 + i;
    if (args.y != nullptr) args.y[offset] = value;
    if (args.y_bf16 != nullptr) args.y_bf16[offset] = __float2bfloat16_rn(value);
  }

  if (tid == 0 && atomicAdd(&args.counters[1], 1u) == gridDim.x - 1) {
    args.counters[0] = 0;
    args.counters[1] = 0;
  }
}

// X_out[t][k][i] = post[t][k]·out[t][i] + Σ_j comb[t][j][k]·X[t][j][i]; one thread per 4 consecutive i of a token.
// Every X value a thread reads is read before it writes, and no other thread touches those positions, so X_out
// may be X itself.
__global__ void __launch_bounds__(kThreads)
    hc_post_kernel(const float* out, const float* X, const float* post, const float* comb, int64_t tokens,
                   int hidden, bool round_output, float* X_out) {
  const int vectors_per_token = hidden / 4;
  const int64_t v = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (v >= tokens * vectors_per_token) return;
  const int64_t t = v / vectors_per_token;
  const int i = int(v - t * vectors_per_token) * 4;
  const float4 o = __ldg(reinterpret_cast<const float4*>(out + t * hidden + i));
  float4 x[kStreams];
#pragma unroll
  for (int j = 0; j < kStreams; ++j) x[j] = *reinterpret_cast<const float4*>(X + (t * kStreams + j) * hidden + i);
  const float4 p = __ldg(reinterpret_cast<const float4*>(post + t * kStreams));
  const float post_k[kStreams] = {p.x, p.y, p.z, p.w};
  float c[kStreams * kStreams];
#pragma unroll
  for (int j = 0; j < kStreams; ++j) {
    const float4 row = __ldg(reinterpret_cast<const float4*>(comb + (t * kStreams + j) * kStreams));
    c[j * kStreams + 0] = row.x;
    c[j * kStreams + 1] = row.y;
    c[j * kStreams + 2] = row.z;
    c[j * kStreams + 3] = row.w;
  }
  const auto finish = [round_output](float value) { return round_output ? round_to_bf16(value) : value; };
#pragma unroll
  for (int k = 0; k < kStreams; ++k) {
    float4 r = make_float4(post_k[k] * o.x, post_k[k] * o.y, post_k[k] * o.z, post_k[k] * o.w);
#pragma unroll
    for (int j = 0; j < kStreams; ++j) {
      const float w = c[j * kStreams + k];
      r.x = fmaf(w, x[j].x, r.x);
      r.y = fmaf(w, x[j].y, r.y);
      r.z = fmaf(w, x[j].z, r.z);
      r.w = fmaf(w, x[j].w, r.w);
    }
    *reinterpret_cast<float4*>(X_out + (t * kStreams + k) * hidden + i) =
        make_float4(finish(r.x), finish(r.y), finish(r.z), finish(r.w));
  }
}

}  // namespace dsv4::cuda::mhc
