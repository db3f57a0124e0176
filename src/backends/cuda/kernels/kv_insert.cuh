// Device code of the fused KV insert (kv_insert.hpp): the entry stores, shared with the compressor's epilogue (which
// writes its entries straight into the cache). The kernel (kv_insert.cu) runs one CTA per row; thread i owns the
// interleaved pair of dims (2i, 2i+1), so RoPE is thread-local and each 64-dim fp8 scale block is exactly one warp
// (32 pairs). A fused RMSNorm (kv_insert.hpp) runs rms_norm.cuh's body in the CTAs after the rows'.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/kv_insert.hpp"
#include "backends/cuda/kernels/rope.cuh"
#include "core/activation_block_scale.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda {

inline constexpr int kKvInsertMaxThreads = 512;

__device__ __forceinline__ float kv_insert_block_sum(float v, float* shared_partials) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared_partials[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared_partials[w];
  return total;
}

// e4m3 codes of x0 (low byte) and x1 by the hardware conversion: round to nearest even, saturating at ±448, as
// float_to_e4m3 does (two instructions instead of ≈ 40 each).
__device__ __forceinline__ uint16_t e4m3x2_codes(float x0, float x1) {
  uint16_t codes;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(codes) : "f"(x1), "f"(x0));
  return codes;
}

// Stores dims dim .. dim + kPerLane − 1 of one entry, final values x, in the cache's layout. Called by every lane of
// a warp whose lanes hold whole 64-dim blocks, 64 / kPerLane consecutive lanes each (the fp8 scale is the block's
// amax, a reduction over those lanes; rope lanes give 0, a partial last block is the nope lanes of its lanes; the
// fp8 and rope parts never share a lane: rope_dim is a multiple of kPerLane); `active`: the lane holds dims of the
// entry.
template <int kPerLane>
__device__ __forceinline__ void kv_store_dims(const KvEntryLayout& layout, uint8_t* entry, int dim, bool active,
                                              const float (&x)[kPerLane]) {
  static_assert(kPerLane == 2 || kPerLane == 4, "a lane stores one or two bf16 pairs");
  const auto store_bf16 = [&](uint8_t* to) {
    uint32_t packed[kPerLane / 2];
#pragma unroll
    for (int j = 0; j < kPerLane / 2; ++j)
      packed[j] = uint32_t(float_to_bf16(x[2 * j])) | (uint32_t(float_to_bf16(x[2 * j + 1])) << 16);
    if constexpr (kPerLane == 2)
      *reinterpret_cast<uint32_t*>(to) = packed[0];
    else
      *reinterpret_cast<uint2*>(to) = make_uint2(packed[0], packed[1]);
  };
  if (layout.format == KvEntryFormat::Bf16) {
    if (active) store_bf16(entry + 2 * dim);
    return;
  }
  const bool nope = active && dim < layout.nope_dim;
  float amax = !nope             ? 0.0f
               : kPerLane == 2 ? fmaxf(fabsf(x[0]), fabsf(x[1]))
                               : fmaxf(fmaxf(fabsf(x[0]), fabsf(x[1])),
                                       fmaxf(fabsf(x[kPerLane / 2]), fabsf(x[kPerLane - 1])));
#pragma unroll
  for (int offset = 32 / kPerLane; offset > 0; offset >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
  if (nope) {
    // round_kv_reference's rule: s = 2^ceil(log2(max(amax, 1e-4) / 448)), e4m3 of x / s (saturating). s is a power
    // of two ≥ 2^-22, so x · (1/s) is x / s exactly.
    const uint8_t scale_code = e4m3_block_scale_code(amax);
    const float inverse = 1.0f / e8m0_to_float(scale_code);
    uint16_t codes[kPerLane / 2];
#pragma unroll
    for (int j = 0; j < kPerLane / 2; ++j) codes[j] = e4m3x2_codes(x[2 * j] * inverse, x[2 * j + 1] * inverse);
    if constexpr (kPerLane == 2)
      *reinterpret_cast<uint16_t*>(entry + dim) = codes[0];
    else
      *reinterpret_cast<uint32_t*>(entry + dim) = uint32_t(codes[0]) | (uint32_t(codes[1]) << 16);
    if (dim % kKvFp8BlockSize == 0) entry[layout.scale_offset + dim / kKvFp8BlockSize] = scale_code;
  } else if (active) {
    store_bf16(entry + layout.rope_offset + 2 * (dim - layout.nope_dim));
  }
}

// The fp8 layout's pad bytes (written too, so an entry's bytes depend only on its values): byte `index` of them.
__device__ __forceinline__ void kv_store_pad(const KvEntryLayout& layout, uint8_t* entry, int index) {
  if (layout.format == KvEntryFormat::Bf16) return;
  const int pad_begin = layout.scale_offset + layout.scale_blocks;
  if (index < layout.entry_bytes - pad_begin) entry[pad_begin + index] = 0;
}

}  // namespace dsv4::cuda
