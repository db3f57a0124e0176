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
    const uint8_t scale_code = e4m3_block_scale_code(amax);
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

}  // namespace dsv4::cuda
