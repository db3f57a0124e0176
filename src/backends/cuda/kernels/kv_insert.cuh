// Device code of the fused KV insert (kv_insert.hpp): the entry stores, shared with the compressor's epilogue (which
// writes its entries straight into the cache). The kernel (kv_insert.cu) runs one CTA per row; thread i owns the
// interleaved pair of dims (2i, 2i+1), so RoPE is thread-local and each 64-dim fp8 scale block is exactly one warp
// (32 pairs). A fused RMSNorm (kv_insert.hpp) runs rms_norm.cuh's body in the CTAs after the rows'.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/kv_insert.hpp"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda {

inline constexpr int kKvInsertMaxThreads = 512;

// The CTA's sum of its threads' values, thread i holding the value of pair i + j · blockDim.x in v[j]: a butterfly
// per warp and step, then the (step, warp) sums in pair order, so any kPairs adds the pairs' values in the order a
// pair per thread does (the same bits).
template <int kPairs>
__device__ __forceinline__ float kv_insert_block_sum(const float (&v)[kPairs], float* shared_partials) {
  const int warps = int(blockDim.x) / 32, warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    float sum = v[j];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0) shared_partials[j * warps + warp] = sum;
  }
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kPairs * warps; ++w) total += shared_partials[w];
  return total;
}

// Stores dims (dim, dim + 1) of one entry, final values x0, x1, in the cache's layout. Called by every lane of a
// warp whose 32 pairs are one 64-dim block (the fp8 scale is the block's amax, a warp reduction; rope lanes give 0,
// a partial last block is the nope lanes of its warp); `active`: the lane holds a pair of the entry.
__device__ __forceinline__ void kv_store_pair(const KvEntryLayout& layout, uint8_t* entry, int dim, bool active,
                                              float x0, float x1) {
  if (layout.format == KvEntryFormat::Bf16) {
    if (active) {
      const uint32_t packed = uint32_t(float_to_bf16(x0)) | (uint32_t(float_to_bf16(x1)) << 16);
      *reinterpret_cast<uint32_t*>(entry + 2 * dim) = packed;
    }
    return;
  }
  const bool nope = active && dim < layout.nope_dim;
  float amax = nope ? fmaxf(fabsf(x0), fabsf(x1)) : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  if (nope) {
    // round_kv_reference's rule: s = 2^ceil(log2(max(amax, 1e-4) / 448)), e4m3 of x / s (saturating).
    const uint8_t scale_code = float_to_e8m0_ceil(fmaxf(amax, 1e-4f) * (1.0f / kE4m3Max));
    const float scale = e8m0_to_float(scale_code);
    const uint16_t codes = uint16_t(float_to_e4m3(x0 / scale)) | uint16_t(uint16_t(float_to_e4m3(x1 / scale)) << 8);
    *reinterpret_cast<uint16_t*>(entry + dim) = codes;
    if (threadIdx.x % 32 == 0) entry[layout.scale_offset + dim / kKvFp8BlockSize] = scale_code;
  } else if (active) {
    const uint32_t packed = uint32_t(float_to_bf16(x0)) | (uint32_t(float_to_bf16(x1)) << 16);
    *reinterpret_cast<uint32_t*>(entry + layout.rope_offset + 2 * (dim - layout.nope_dim)) = packed;
  }
}

// The fp8 layout's pad bytes (written too, so an entry's bytes depend only on its values): byte `index` of them.
__device__ __forceinline__ void kv_store_pad(const KvEntryLayout& layout, uint8_t* entry, int index) {
  if (layout.format == KvEntryFormat::Bf16) return;
  const int pad_begin = layout.scale_offset + layout.scale_blocks;
  if (index < layout.entry_bytes - pad_begin) entry[pad_begin + index] = 0;
}

// The kv_norm weights of a thread's pairs: parameters, loaded before the wait.
template <int kPairs>
struct PairWeights {
  float w0[kPairs], w1[kPairs];
};

template <int kPairs>
__device__ __forceinline__ PairWeights<kPairs> load_pair_weights(const KvInsertParams& p) {
  PairWeights<kPairs> out;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int dim = 2 * (int(threadIdx.x) + j * int(blockDim.x));
    const bool loads = dim < p.cache.layout.head_dim && p.norm_weight != nullptr;
    out.w0[j] = loads ? __ldg(p.norm_weight + dim) : 1.0f;
    out.w1[j] = loads ? __ldg(p.norm_weight + dim + 1) : 1.0f;
  }
  return out;
}

__device__ __forceinline__ bool pair_rotates(const KvInsertParams& p, int pair) {
  return 2 * pair < p.cache.layout.head_dim && p.rope_table != nullptr && pair >= p.cache.layout.nope_dim / 2;
}

// Where a row goes and how the thread's pairs rotate: from the step's inputs (destination row, slot, position) and
// the two tables they index (the page table, the RoPE table). The two lookups are issued together, one round trip
// after the row's inputs: the destination is tested only when both are in flight (a row without one reads its slot's
// first page entry, which exists, and discards it). entry is null for a row without a destination (uniform over the
// CTA).
template <int kPairs>
struct RowTarget {
  uint8_t* entry = nullptr;
  RopeFactors rope[kPairs];
};

template <int kPairs>
__device__ __forceinline__ RowTarget<kPairs> load_row_target(const KvInsertParams& p, int64_t row) {
  const KvEntryLayout& layout = p.cache.layout;
  const int32_t dest_row = p.dest_rows[row];
  const int32_t slot = p.sequence_slots[row];
  const int64_t position = p.rope_table != nullptr ? p.positions[row] : 0;
  const int64_t logical_row = max(dest_row, 0);
  uint8_t* entry =
      p.cache.entry_address(p.cache.physical_entry(p.cache.pages_of(slot, p.layer, p.array), logical_row));
  RowTarget<kPairs> target;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int pair = int(threadIdx.x) + j * int(blockDim.x);
    target.rope[j] = pair_rotates(p, pair)
                         ? rope_table_factors(p.rope_table, layout.rope_dim / 2, position, pair - layout.nope_dim / 2)
                         : RopeFactors{1.0f, 0.0f};
  }
  target.entry = dest_row < 0 ? nullptr : entry;
  return target;
}

// One new KV entry per CTA: row `row` of p's rows (x_row_stride elements apart), normalised, rotated, rounded and
// stored. Thread i holds pairs i, i + blockDim.x, … (up to kPairs of them), so a warp's 32 pairs of one step are one
// 64-dim fp8 scale block; the entry's bits do not depend on kPairs. Called by every thread of the CTA (blockDim.x a
// multiple of 32, kPairs · blockDim.x pairs covering head_dim, kPairs · blockDim.x ≤ kKvInsertMaxThreads); reads
// the parameters, then waits for the prior grids, then reads x and the step's inputs.
template <int kPairs>
__device__ __forceinline__ void kv_insert_row(const KvInsertParams& p, int64_t x_row_stride, int64_t row) {
  __shared__ float partials[kKvInsertMaxThreads / 32];
  const KvEntryLayout& layout = p.cache.layout;
  const PairWeights<kPairs> weights = load_pair_weights<kPairs>(p);
  wait_for_prior_grids();  // x and the step's inputs come from earlier operations
  // x is loaded before the target's lookups, so that its load and the row's inputs' share one round trip.
  float x0[kPairs], x1[kPairs];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int dim = 2 * (int(threadIdx.x) + j * int(blockDim.x));
    const float2 x = dim < layout.head_dim ? *reinterpret_cast<const float2*>(p.x + row * x_row_stride + dim)
                                           : make_float2(0.0f, 0.0f);
    x0[j] = p.round_input_to_bf16 ? round_to_bf16(x.x) : x.x;
    x1[j] = p.round_input_to_bf16 ? round_to_bf16(x.y) : x.y;
  }
  const RowTarget<kPairs> target = load_row_target<kPairs>(p, row);
  // A row without a destination leaves (uniformly over the CTA) before any barrier, writing nothing.
  if (target.entry == nullptr) return;
  if (p.norm_weight != nullptr) {  // uniform over the grid, so the block sum's barrier is reached by all or none
    float squares[kPairs];
#pragma unroll
    for (int j = 0; j < kPairs; ++j) squares[j] = x0[j] * x0[j] + x1[j] * x1[j];
    const float mean_square = kv_insert_block_sum<kPairs>(squares, partials) / float(layout.head_dim);
    const float inv_rms = 1.0f / sqrtf(mean_square + p.eps);
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      x0[j] = x0[j] * inv_rms * weights.w0[j];
      x1[j] = x1[j] * inv_rms * weights.w1[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int pair = int(threadIdx.x) + j * int(blockDim.x);
    if (pair_rotates(p, pair)) rope_rotate_pair(x0[j], x1[j], target.rope[j], false);
    kv_store_pair(layout, target.entry, 2 * pair, 2 * pair < layout.head_dim, x0[j], x1[j]);
  }
  kv_store_pad(layout, target.entry, threadIdx.x);
}

// The queries' per-head norm at the end of the query projection's CTAs (QueryHeadNormParams). Called by every
// thread of a CTA (kKvInsertSideThreads) once it has stored rows [row0, row_end) of the projection for every token:
// each head among those rows counts them on its ticket, and the CTA that completes the head normalises the head's
// row of every token and resets the ticket. A row is normalised as run_rms_norm's CTA rows do it (cta_rows, the
// decode default): its threads stand in for that kernel's rms::kThreads, kQueryNormThreadsPerThread each, with the
// same values per thread, butterflies and warp order, so the sums, and the bits, are the same.
inline constexpr int kQueryNormGroupThreads = 256;  // rms::kThreads
inline constexpr int kQueryNormThreadsPerThread = kQueryNormGroupThreads / kKvInsertSideThreads;
inline constexpr int kQueryNormValues = kQueryHeadNormMaxHeadDim / kQueryNormGroupThreads;  // rms::kTinyRowValues

__device__ __forceinline__ void query_head_norm_rows_stored(const QueryHeadNormParams& a, int64_t row0,
                                                            int64_t row_end) {
  constexpr int kStand = kQueryNormThreadsPerThread, kValues = kQueryNormValues;
  __shared__ bool completes;
  __shared__ float warp_sums[kQueryNormGroupThreads / 32];
  __shared__ float rope_values[2 * kRmsNormMaxRopePairs];
  const int D = a.head_dim;
  const int64_t first_head = row0 / D, last_head = min((row_end - 1) / D, int64_t(a.heads) - 1);
  __threadfence();  // this thread's stores of the rows visible device-wide before the ticket says so
  for (int64_t h = first_head; h <= last_head; ++h) {
    __syncthreads();  // every thread's fence is done (and `completes` free again)
    if (threadIdx.x == 0) {
      const uint32_t rows = uint32_t(min(row_end, (h + 1) * D) - max(row0, h * D));
      completes = atomicAdd(a.head_tickets + h, rows) + rows == uint32_t(D);
      if (completes) a.head_tickets[h] = 0;  // every row of the head has arrived: ready for the next launch
    }
    __syncthreads();
    if (!completes) continue;
    __threadfence();
    const int rope_begin = a.rope_table != nullptr ? D - a.rope_dim : D, pairs = a.rope_dim / 2;
    const int pair = int(threadIdx.x);  // a thread per rotated pair (pairs ≤ kRmsNormMaxRopePairs < the threads)
    for (int t = 0; t < a.tokens; ++t) {
      RopeFactors factors{1.0f, 0.0f};
      if (a.rope_table != nullptr && pair < pairs)
        factors = rope_table_factors(a.rope_table, pairs, a.positions[t], pair);
      const float* x = a.q + t * a.q_row_stride + h * D;
      float values[kStand][kValues];
#pragma unroll
      for (int s = 0; s < kStand; ++s) {
        const int member = int(threadIdx.x) + s * kKvInsertSideThreads;  // the stood-in thread
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kValues; ++j) {
          const int i = member + j * kQueryNormGroupThreads;
          values[s][j] = i < D ? __ldcg(x + i) : 0.0f;  // other CTAs' rows: from L2
          sum = fmaf(values[s][j], values[s][j], sum);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
        if (threadIdx.x % 32 == 0) warp_sums[member / 32] = sum;
      }
      __syncthreads();
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kQueryNormGroupThreads / 32; ++w) sum += warp_sums[w];
      const float inv_rms = 1.0f / sqrtf(sum / float(D) + a.eps);
      __nv_bfloat16* y = a.q_bf16 + (int64_t(t) * a.heads + h) * D;
#pragma unroll
      for (int s = 0; s < kStand; ++s)
#pragma unroll
        for (int j = 0; j < kValues; ++j) {
          const int i = int(threadIdx.x) + s * kKvInsertSideThreads + j * kQueryNormGroupThreads;
          const float value = values[s][j] * inv_rms;
          if (i >= D) continue;
          if (i >= rope_begin)
            rope_values[i - rope_begin] = value;  // a pair's two values sit in two threads
          else
            y[i] = __float2bfloat16_rn(value);
        }
      __syncthreads();
      if (pair < pairs && a.rope_table != nullptr) {
        float x0 = rope_values[2 * pair], x1 = rope_values[2 * pair + 1];
        rope_rotate_pair(x0, x1, factors, false);
        y[rope_begin + 2 * pair] = __float2bfloat16_rn(x0);
        y[rope_begin + 2 * pair + 1] = __float2bfloat16_rn(x1);
      }
      __syncthreads();  // warp_sums and rope_values are free for the next row
    }
  }
}

// quantized_linear's side task for the query projection (wq_b) of a decode step (run_linear_with_kv_insert): its
// extra CTAs insert the step's new KV entries (one per row; their inputs come from [wq_a; wkv] like wq_b's own), and
// the CTAs that complete a query head normalise it.
struct KvInsertLinearSide {
  static constexpr int kPairs = kKvInsertSideMaxHeadDim / 2 / kKvInsertSideThreads;
  struct Args {
    KvInsertParams insert;
    int64_t x_row_stride;
    QueryHeadNormParams q_norm;
  };
  static __device__ __forceinline__ void extra_cta(const Args& a, int64_t cta) {
    kv_insert_row<kPairs>(a.insert, a.x_row_stride, cta);
  }
  static __device__ __forceinline__ void rows_stored(const Args& a, int64_t row0, int64_t row_end) {
    query_head_norm_rows_stored(a.q_norm, row0, row_end);
  }
};

}  // namespace dsv4::cuda
