// Device helpers shared by the sparse-attention kernels (sparse_attention.cuh, sparse_attention_prefill.cuh): bf16
// packing, the exact fp8 entry dequantisation, and the softmax's sink, exponent and denominator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

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

}  // namespace dsv4::cuda::sparse_attention_math
