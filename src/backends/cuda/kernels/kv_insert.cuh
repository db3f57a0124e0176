// Device code of the fused KV insert (kv_insert.hpp). One CTA per row; thread i owns the interleaved pair of dims
// (2i, 2i+1), so RoPE is thread-local and each 64-dim fp8 scale block is exactly one warp (32 pairs).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/kv_insert.hpp"
#include "backends/cuda/kernels/rope.cuh"
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

__global__ void __launch_bounds__(kKvInsertMaxThreads) kv_insert_kernel(const __grid_constant__ KvInsertParams p) {
  __shared__ float partials[kKvInsertMaxThreads / 32];
  const KvEntryLayout& layout = p.cache.layout;
  const int64_t row = blockIdx.x;
  const int32_t dest_row = p.dest_rows[row];
  if (dest_row < 0) return;  // uniform over the CTA: no barrier is skipped by part of it
  const int pair = threadIdx.x;
  const int dim = 2 * pair;
  const bool active = dim < layout.head_dim;

  float x0 = 0.0f, x1 = 0.0f;
  if (active) {
    const float2 v = *reinterpret_cast<const float2*>(p.x + row * layout.head_dim + dim);
    x0 = v.x;
    x1 = v.y;
    if (p.round_input_to_bf16) {
      x0 = round_to_bf16(x0);
      x1 = round_to_bf16(x1);
    }
  }
  if (p.norm_weight != nullptr) {  // uniform over the grid, so the block sum's barrier is reached by all or none
    const float mean_square = kv_insert_block_sum(x0 * x0 + x1 * x1, partials) / float(layout.head_dim);
    const float inv_rms = 1.0f / sqrtf(mean_square + p.eps);
    if (active) {
      x0 = x0 * inv_rms * p.norm_weight[dim];
      x1 = x1 * inv_rms * p.norm_weight[dim + 1];
    }
  }
  const int rope_pair = pair - layout.nope_dim / 2;
  if (active && p.rope_frequencies != nullptr && rope_pair >= 0)
    rope_rotate_pair(x0, x1, rope_factors(p.positions[row], p.rope_frequencies[rope_pair]), false);

  const int32_t* pages = p.cache.pages_of(p.sequence_slots[row], p.layer, p.array);
  uint8_t* entry = p.cache.entry_address(p.cache.physical_entry(pages, dest_row));
  if (layout.format == KvEntryFormat::Bf16) {
    if (active) {
      const uint32_t packed = uint32_t(float_to_bf16(x0)) | (uint32_t(float_to_bf16(x1)) << 16);
      *reinterpret_cast<uint32_t*>(entry + 2 * dim) = packed;
    }
    return;
  }
  // Fp8Reference: the amax of this warp's 64-dim block (rope lanes contribute 0; a partial last block is the
  // nope lanes of its warp).
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
  // The pad bytes are written too, so an entry's bytes depend only on its values.
  const int pad_begin = layout.scale_offset + layout.scale_blocks;
  if (threadIdx.x < layout.entry_bytes - pad_begin) entry[pad_begin + threadIdx.x] = 0;
}

}  // namespace dsv4::cuda
