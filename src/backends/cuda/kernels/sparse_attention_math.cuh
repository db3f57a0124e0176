// Device helpers shared by the sparse-attention kernels (sparse_attention.cuh, sparse_attention_prefill.cuh): bf16
// packing, the exact fp8 entry dequantisation, the softmax's sink, exponent and denominator, the split merge's
// weights, and the output stores (normalise, rotate back, fp32 or bf16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/kernels/sparse_attention.hpp"

namespace dsv4::cuda::sparse_attention_math {

inline constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two e4m3 codes → two bf16 values times a power-of-two scale (exact: ≤ 4 significant bits).
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint16_t codes, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));
  return pack_bf16x2(f.x * scale, f.y * scale);
}

// The sink of `head` in log2 units; −inf for no sink or a head past the last.
__device__ __forceinline__ float head_sink_log2(const SparseAttentionParams& p, int head) {
  return p.attn_sink != nullptr && head < p.heads ? p.attn_sink[head] * kLog2e : -INFINITY;
}

// 1 / the softmax denominator of reference max `row_max` (log2 units) and sum `row_sum` with the sink `sink_log2`
// (head_sink_log2): the attention sink adds exp(sink − max) to the denominator only.
__device__ __forceinline__ float inverse_softmax_denominator(float sink_log2, float row_max, float row_sum) {
  float denominator = row_sum;
  if (sink_log2 != -INFINITY && row_max != -INFINITY) denominator += exp2f(sink_log2 - row_max);
  // A query with no entries gets a zero output whatever its sink.
  return row_sum > 0.0f ? 1.0f / denominator : 0.0f;
}

// 2^x by the MUFU unit alone (ex2.approx.ftz): exp2f adds a range test and two multiplications per call for denormal
// results, ≈ 50 instructions per tile and thread on the softmax's critical path. The only difference: a weight below
// 2^-126 of its row's reference (or a rescale factor below it) becomes 0, where it could not change any sum anyway.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The split merge's factor of each split s < kMaxSplits from the splits' (max, sum) pairs (log2 units; a split past
// the count or without entries has max −inf): 2^(m_s − M) / denominator, the sink once in the denominator.
template <int kMaxSplits>
__device__ __forceinline__ void merge_factors(const float2 (&split_stats)[kMaxSplits], float sink_log2,
                                              float (&factor)[kMaxSplits]) {
  float m = -INFINITY;
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) m = fmaxf(m, split_stats[s].x);
  float sum = 0.0f;
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) {
    factor[s] = split_stats[s].x == -INFINITY ? 0.0f : exp2f(split_stats[s].x - m);
    sum += split_stats[s].y * factor[s];
  }
  const float inverse_denominator = inverse_softmax_denominator(sink_log2, m, sum);
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) factor[s] *= inverse_denominator;
}

// Output dims [dim, dim + 4) of the row starting at `row` of p.out (fp32: two 8-byte stores, out being only 8-byte
// aligned; bf16: one).
__device__ __forceinline__ void store_output_quad(const SparseAttentionParams& p, int64_t row, int dim,
                                                  const float (&x)[4]) {
  if (p.out_dtype == AttentionDtype::F32) {
    float2* out = reinterpret_cast<float2*>(static_cast<float*>(p.out) + row + dim);
    out[0] = make_float2(x[0], x[1]);
    out[1] = make_float2(x[2], x[3]);
  } else {
    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p.out) + row + dim) =
        make_uint2(pack_bf16x2(x[0], x[1]), pack_bf16x2(x[2], x[3]));
  }
}

// The epilogue of one mma accumulator fragment (C layout: acc[e] is row e / 2 of the thread's rows, heads head[0] and
// head[1] of query t, dims dim + e % 2): times its row's 1 / denominator, rotated back by −θ where `rotate` (both
// rows by factors(), the pair's RoPE factors, evaluated only then), stored to p.out (fp32 or bf16) for the heads
// below p.heads.
template <class PairFactors>
__device__ __forceinline__ void store_output_fragment(const SparseAttentionParams& p, int64_t t, const int (&head)[2],
                                                      int head_dim, int dim, const float (&acc)[4],
                                                      const float (&inverse_denominator)[2], bool rotate,
                                                      PairFactors&& factors) {
  float v[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = acc[e] * inverse_denominator[e / 2];
  if (rotate) {
    const RopeFactors f = factors();
    rope_rotate_pair(v[0], v[1], f, true);
    rope_rotate_pair(v[2], v[3], f, true);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (head[r] >= p.heads) continue;
    const int64_t offset = (t * p.heads + head[r]) * head_dim + dim;
    if (p.out_dtype == AttentionDtype::F32)
      *reinterpret_cast<float2*>(static_cast<float*>(p.out) + offset) = make_float2(v[2 * r], v[2 * r + 1]);
    else
      *reinterpret_cast<uint32_t*>(static_cast<__nv_bfloat16*>(p.out) + offset) = pack_bf16x2(v[2 * r], v[2 * r + 1]);
  }
}

// Page-table entry of `row` of slot `s`'s array (−1: unused row, a row outside the array's pages, or a free page).
__device__ __forceinline__ int32_t slot_page(const SparseAttentionParams& p, int sequence_slot, int64_t s,
                                             int32_t row) {
  const KvCacheView& cache = p.cache;
  if (row < 0 || (row >> cache.page_shift) >= cache.max_pages_per_array) return -1;
  return cache.pages_of(sequence_slot, p.layer, s < p.window_slots ? KvArray::Window : KvArray::Compressed)
      [row >> cache.page_shift];
}

// The page-table word of logical row `row` of slot s's array (sequence slot `sequence_slot`), or nullptr for an unused
// slot or a row outside its array's pages: slot_page with its load left to the caller (the prefill kernel issues a
// pair's loads together).
__device__ __forceinline__ const int32_t* slot_page_word(const SparseAttentionParams& p, int sequence_slot, int64_t s,
                                                         int32_t row) {
  const KvCacheView& cache = p.cache;
  if (row < 0 || (row >> cache.page_shift) >= cache.max_pages_per_array) return nullptr;
  const bool window = s < p.window_slots;
  return cache.pages_of(sequence_slot, p.layer, window ? KvArray::Window : KvArray::Compressed) +
         (row >> cache.page_shift);
}

// Physical entry of a row on a page (−1 when the page is −1).
__device__ __forceinline__ int32_t slot_physical(const KvCacheView& cache, int32_t page, int32_t row) {
  return page >= 0 ? (page << cache.page_shift) + (row & ((1 << cache.page_shift) - 1)) : -1;
}

}  // namespace dsv4::cuda::sparse_attention_math
