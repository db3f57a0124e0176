// Device code behind indexer.hpp: the warp-level reference rounding of indexer vectors (also used by the
// compressor's epilogue for new indexer keys), the query preparation kernel and the score kernel.
//
// NOTES (scores):
// - The score kernel puts keys on the MMA's M side (16 keys per m-tile) and heads on N (8 per n-tile, padded with
//   zero heads), so the head sum Σ_h w_h·ReLU(·) is a sum along a fragment row: per thread over its 2 columns ×
//   n-tiles, then over the 4 lanes of a quad. A warp owns one 16-key tile at a time and all heads, and loads its next
//   tile into registers before multiplying the current one.
// - The dot product's reduction order over head_dim is free, so both operands use the same permutation of it: a
//   lane's 16-byte load of a key row (8 consecutive dims) is directly its A fragment for two k16 steps, and the query
//   fragments in shared memory use the identical map. Key rows therefore stream from global memory with coalesced
//   16-byte loads, all of a warp tile in flight before the first MMA, and no shared-memory staging of keys.
// - Query fragments sit in shared memory in fragment order ([query][n-tile][dim pair][lane] uint4): conflict-free.
// - The fp32 sum over head_dim runs in two chains (even and odd k16 steps) added at the end of each n-tile: the
//   MMAs of one chain are then never back to back.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <limits>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"

namespace dsv4::cuda::indexer {

inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();
inline constexpr int kFp4Block = 32;  // values per ue8m0 scale of the indexer's fp4 rounding

// Lane l holds x[kPerLane·l, kPerLane·(l+1)) of a 32·kPerLane vector. x ← H x / √n in Sylvester order, with the
// butterflies in the CPU's stage order (distance 1, 2, 4, ...), so the fp32 results are the CPU's bit for bit.
template <int kPerLane>
__device__ __forceinline__ void warp_hadamard(float (&v)[kPerLane], int lane) {
#pragma unroll
  for (int h = 1; h < kPerLane; h *= 2) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
#pragma unroll
  for (int m = 1; m < 32; m *= 2) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float partner = __shfl_xor_sync(kFullMask, v[i], m);
      v[i] = upper ? partner - v[i] : v[i] + partner;
    }
  }
  const float norm = 1.0f / sqrtf(static_cast<float>(32 * kPerLane));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] *= norm;
}

// round_indexer_reference on one warp-held vector: Hadamard, bf16, then fp4 e2m1 with a ue8m0 scale per 32 values.
template <int kPerLane>
__device__ __forceinline__ void warp_round_indexer_reference(float (&v)[kPerLane], int lane) {
  warp_hadamard<kPerLane>(v, lane);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    v[i] = round_to_bf16(v[i]);
    amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int m = 1; m < kFp4Block / kPerLane; m *= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, m));
  const float scale = e8m0_to_float(float_to_e8m0_ceil(fmaxf(amax, 6.0f * 0x1p-126f) * (1.0f / kE2m1Max)));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = round_to_bf16(e2m1_to_float(float_to_e2m1(v[i] / scale)) * scale);
}

struct PrepareArgs {
  const float* input;
  __nv_bfloat16* output;
  int64_t rows;
  int64_t heads;
  const int64_t* positions;
  const float* rope_frequencies;
  int rope_dim;
  bool reference_rounding;
};

inline constexpr int kPrepareWarps = 8;

// One warp per vector: RoPE on the last rope_dim dims, then the rounding, then bf16 out. A programmatic dependent:
// its input and positions are earlier kernels' outputs, so it waits for them at entry.
template <int kHeadDim>
__global__ void __launch_bounds__(kPrepareWarps * 32) indexer_prepare_kernel(PrepareArgs args) {
  allow_dependents();
  wait_for_prior_grids();
  constexpr int kPerLane = kHeadDim / 32;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kPrepareWarps + (threadIdx.x >> 5);
  if (row >= args.rows) return;
  const float* in = args.input + row * kHeadDim + kPerLane * lane;
  float v[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = in[i];
  if (args.rope_frequencies != nullptr) {
    const int64_t position = args.positions[row / args.heads];
    const int rope_begin = kHeadDim - args.rope_dim;
    float original[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) original[i] = v[i];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int dim = kPerLane * lane + i;
      // Pairs (2j, 2j+1) are in one lane when it holds ≥ 2 values; with one value per lane the partner is lane ^ 1.
      const float partner = kPerLane >= 2 ? original[i ^ 1] : __shfl_xor_sync(kFullMask, original[i], 1);
      if (dim >= rope_begin) {
        const bool even = (dim & 1) == 0;
        float x0 = even ? original[i] : partner, x1 = even ? partner : original[i];
        rope_rotate_pair(x0, x1, rope_factors(position, args.rope_frequencies[(dim - rope_begin) / 2]), false);
        v[i] = even ? x0 : x1;
      }
    }
  }
  if (args.reference_rounding) warp_round_indexer_reference<kPerLane>(v, lane);
  __nv_bfloat16* out = args.output + row * kHeadDim + kPerLane * lane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[i] = __float2bfloat16_rn(v[i]);
}

struct ScoresArgs {
  const __nv_bfloat16* q;
  const float* head_weights;
  const __nv_bfloat16* keys;
  int64_t key_count;
  const int32_t* sequence_slots;
  int64_t keys_slot_stride;
  const int64_t* positions;
  int64_t tokens;
  int heads;
  int64_t ratio;
  float* scores;
  int64_t score_stride;
  int queries_per_cta;
  float weight_scale;  // head_dim^-0.5 · heads^-0.5, as the CPU forms it
};

inline constexpr int kScoreWarps = 8;
inline constexpr int kScoreCtasPerSm = 2;  // the register budget of __launch_bounds__ below
inline constexpr int kKeysPerWarpTile = 16;  // one m16 tile

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Heads padded to whole n-tiles of 8 (the padding heads have zero q and zero weight).
__host__ __device__ inline int padded_heads(int heads) { return (heads + 7) / 8 * 8; }

// Shared memory: query fragments, then the scaled head weights, then each query's visible key count.
inline size_t scores_smem_bytes(int queries_per_cta, int heads, int head_dim) {
  const size_t padded = size_t(padded_heads(heads));
  return size_t(queries_per_cta) * (padded * size_t(head_dim) * 2 + padded * 4 + 8);
}

// Rows key0 + half·8 + group of a 16-key tile, dims 32·pair + 8·quad .. +8: the lane's A fragments (see NOTES).
template <int kDimPairs>
__device__ __forceinline__ void load_key_tile(uint4 (&a)[2][kDimPairs], const __nv_bfloat16* keys, int64_t key0,
                                              int64_t rows, int group, int quad) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = key0 + 8 * half + group;
#pragma unroll
    for (int pair = 0; pair < kDimPairs; ++pair)
      a[half][pair] = row < rows ? __ldg(reinterpret_cast<const uint4*>(keys + row * (kDimPairs * 32) + 32 * pair +
                                                                         8 * quad))
                                 : make_uint4(0, 0, 0, 0);
  }
}

// A programmatic dependent: q, the head weights and the newest key are this step's outputs, so it waits at entry.
template <int kHeadDim>
__global__ void __launch_bounds__(kScoreWarps * 32, kScoreCtasPerSm) indexer_scores_kernel(ScoresArgs args) {
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "head_dim must be 32, 64 or 128");
  allow_dependents();
  wait_for_prior_grids();
  constexpr int kDimPairs = kHeadDim / 32;  // 32 dims = two k16 steps = one 16-byte load per fragment row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int heads = padded_heads(args.heads);
  const int n_tiles = heads / 8;
  const int group_size = args.queries_per_cta;
  uint4* q_frag = reinterpret_cast<uint4*>(smem_raw);
  float* weights = reinterpret_cast<float*>(q_frag + size_t(group_size) * n_tiles * kDimPairs * 32);
  int64_t* visible = reinterpret_cast<int64_t*>(weights + group_size * heads);

  const int64_t first_query = int64_t(blockIdx.y) * group_size;
  const int queries = int(min(int64_t(group_size), args.tokens - first_query));
  const int fragments = queries * n_tiles * kDimPairs * 32;
  for (int e = threadIdx.x; e < fragments; e += blockDim.x) {
    const int lane = e & 31, pair = (e >> 5) % kDimPairs, n_tile = (e >> 5) / kDimPairs % n_tiles;
    const int query = (e >> 5) / kDimPairs / n_tiles;
    const int head = 8 * n_tile + (lane >> 2);
    q_frag[e] = head < args.heads
                    ? *reinterpret_cast<const uint4*>(args.q + ((first_query + query) * args.heads + head) * kHeadDim +
                                                      32 * pair + 8 * (lane & 3))
                    : make_uint4(0, 0, 0, 0);
  }
  for (int e = threadIdx.x; e < queries * heads; e += blockDim.x) {
    const int query = e / heads, head = e % heads;
    weights[e] = head < args.heads
                     ? args.head_weights[(first_query + query) * args.heads + head] * args.weight_scale
                     : 0.0f;
  }
  if (threadIdx.x < queries)
    visible[threadIdx.x] = min(args.key_count, (args.positions[first_query + threadIdx.x] + 1) / args.ratio);
  __syncthreads();
  int64_t max_visible = 0;
  for (int query = 0; query < queries; ++query) max_visible = max(max_visible, visible[query]);
  // A CTA's queries are of one sequence (one query per CTA when sequences differ).
  const __nv_bfloat16* keys =
      args.sequence_slots != nullptr ? args.keys + args.sequence_slots[first_query] * args.keys_slot_stride : args.keys;

  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
  // Tiles past every query's visible keys hold nothing to write (the contract leaves those columns unwritten).
  const int64_t tiles = (max_visible + kKeysPerWarpTile - 1) / kKeysPerWarpTile;
  const int64_t step = int64_t(gridDim.x) * kScoreWarps;
  // Software pipeline: the next tile's keys are in flight while the current one is multiplied.
  uint4 a[2][kDimPairs], next[2][kDimPairs];
  int64_t tile = int64_t(blockIdx.x) * kScoreWarps + (threadIdx.x >> 5);
  load_key_tile<kDimPairs>(a, keys, tile * kKeysPerWarpTile, max_visible, group, quad);
  for (; tile < tiles; tile += step) {
    const int64_t key0 = tile * kKeysPerWarpTile;
    load_key_tile<kDimPairs>(next, keys, (tile + step) * kKeysPerWarpTile, max_visible, group, quad);
    // Quad lanes 0 and 1 store rows key0 + group and key0 + 8 + group after the quad reduction.
    const int64_t out_row = key0 + 8 * (quad & 1) + group;
    for (int query = 0; query < queries; ++query) {
      float* out = args.scores + (first_query + query) * args.score_stride;
      const int64_t query_visible = visible[query];
      float result = -std::numeric_limits<float>::infinity();
      if (key0 < query_visible) {
        float sum[2] = {0.0f, 0.0f};
        const uint4* b_frag = q_frag + size_t(query) * n_tiles * kDimPairs * 32 + lane;
        const float* w = weights + query * heads + 2 * quad;
        for (int n_tile = 0; n_tile < n_tiles; ++n_tile) {
          float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
          for (int pair = 0; pair < kDimPairs; ++pair) {
            const uint4 b = b_frag[(n_tile * kDimPairs + pair) * 32];
            // Two accumulator chains (one per k16 step) so consecutive MMAs are independent; summed below.
            mma_bf16_16816(acc[0], a[0][pair].x, a[1][pair].x, a[0][pair].y, a[1][pair].y, b.x, b.y);
            mma_bf16_16816(acc[1], a[0][pair].z, a[1][pair].z, a[0][pair].w, a[1][pair].w, b.z, b.w);
          }
          const float w0 = w[8 * n_tile], w1 = w[8 * n_tile + 1];
          sum[0] += w0 * fmaxf(acc[0][0] + acc[1][0], 0.0f) + w1 * fmaxf(acc[0][1] + acc[1][1], 0.0f);
          sum[1] += w0 * fmaxf(acc[0][2] + acc[1][2], 0.0f) + w1 * fmaxf(acc[0][3] + acc[1][3], 0.0f);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          sum[half] += __shfl_xor_sync(kFullMask, sum[half], 1);
          sum[half] += __shfl_xor_sync(kFullMask, sum[half], 2);
        }
        if (out_row < query_visible) result = (quad & 1) ? sum[1] : sum[0];
      }
      if (quad < 2 && out_row < args.key_count) out[out_row] = result;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int pair = 0; pair < kDimPairs; ++pair) a[half][pair] = next[half][pair];
  }
}

}  // namespace dsv4::cuda::indexer
