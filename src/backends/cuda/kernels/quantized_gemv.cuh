// Weight-streaming GEMV kernel behind run_quantized_gemv (quantized_gemv.hpp holds the contract).
//
// NOTES:
// - Memory bound at T = 1: each lane streams 16-byte vectors of packed weights (ld.global.nc, no L1 allocation),
//   ROWS_PER_WARP rows × UNROLL vectors in flight per lane before any arithmetic.
// - x is staged once per CTA in shared memory, permuted to [token][quad of the vector][vector][4] so that the 32 lanes
//   (consecutive vectors) read consecutive float4s: conflict-free, and each x value read serves ROWS_PER_WARP rows.
// - e4m3 → fp16 uses the hardware cvt (exact). e2m1 → fp16 is bit placement (sign → bit 15, exponent/mantissa →
//   bits 9..11), which yields the value × 2^-14 exactly (fp16 subnormals included); the 2^14 is applied once per
//   scale block together with the block scale.
// - Per scale block the products are summed in fp32, then scaled and added to an fp32 accumulator.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "core/e8m0.hpp"

namespace dsv4::cuda::gemv {

enum class GemvFormat { FP8_BLOCK128_E8M0, MXFP4, NVFP4 };

inline constexpr int kWarpSize = 32;
inline constexpr int kWarpsPerCta = 8;
inline constexpr int kRowsPerWarp = 2;
inline constexpr int kRowsPerCta = kWarpsPerCta * kRowsPerWarp;
inline constexpr int kUnroll = 2;  // 16-byte vectors per row in flight per lane
inline constexpr int kVectorBytes = 16;

template <GemvFormat F>
struct FormatTraits;

template <>
struct FormatTraits<GemvFormat::FP8_BLOCK128_E8M0> {
  static constexpr int kValuesPerVector = 16;
  static constexpr int kScaleGroupsPerVector = 1;  // a 16-value vector never straddles a 128 block
  static constexpr float kDecodeFixup = 1.0f;
};
template <>
struct FormatTraits<GemvFormat::MXFP4> {
  static constexpr int kValuesPerVector = 32;
  static constexpr int kScaleGroupsPerVector = 1;  // exactly one 32-value block
  static constexpr float kDecodeFixup = 16384.0f;  // 2^14, see NOTES
};
template <>
struct FormatTraits<GemvFormat::NVFP4> {
  static constexpr int kValuesPerVector = 32;
  static constexpr int kScaleGroupsPerVector = 2;  // two 16-value blocks
  static constexpr float kDecodeFixup = 16384.0f;
};

struct GemvKernelArgs {
  const uint8_t* data;
  const uint8_t* scales;
  int64_t rows, cols;
  int64_t data_row_bytes;
  int64_t scales_per_row;
  float global_scale;  // applied to the final sum (1 except NVFP4)
  const float* x;
  float* y;
  int64_t tile_k;
  bool accumulate;  // split-K: atomically add into a zeroed y
};

// PTX ISA "ld": read-only global load that does not allocate in L1 (each weight byte is read once).
__device__ __forceinline__ uint4 load_streaming_vector(const uint8_t* address) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(address));
  return v;
}

__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t pair) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(pair), __NV_E4M3);
  return __half22float2(__half2(raw));
}

__device__ __forceinline__ float2 bits_to_float2(uint32_t half2_bits) {
  __half2_raw raw;
  raw.x = uint16_t(half2_bits);
  raw.y = uint16_t(half2_bits >> 16);
  return __half22float2(__half2(raw));
}

// One 32-bit word of stored weights → its values in k order (4 for fp8, 8 for fp4; fp4 values are × 2^-14).
template <GemvFormat F>
__device__ __forceinline__ void decode_word(uint32_t word, float* out) {
  if constexpr (F == GemvFormat::FP8_BLOCK128_E8M0) {
    const float2 lo = e4m3x2_to_float2(uint16_t(word));
    const float2 hi = e4m3x2_to_float2(uint16_t(word >> 16));
    out[0] = lo.x, out[1] = lo.y, out[2] = hi.x, out[3] = hi.y;
  } else {
    // Nibble i (bits 4i..4i+3) holds k = i. Each half2 pairs nibbles i and i + 4 (16 bits apart), so one shift
    // and one mask place both: magnitude bits → 9..11 (and 25..27), sign → 15 (and 31).
    constexpr uint32_t kMagnitude = 0x0E000E00u, kSign = 0x80008000u;
    const uint32_t k0k4 = ((word << 9) & kMagnitude) | ((word << 12) & kSign);
    const uint32_t k1k5 = ((word << 5) & kMagnitude) | ((word << 8) & kSign);
    const uint32_t k2k6 = ((word << 1) & kMagnitude) | ((word << 4) & kSign);
    const uint32_t k3k7 = ((word >> 3) & kMagnitude) | (word & kSign);
    const float2 a = bits_to_float2(k0k4), b = bits_to_float2(k1k5), c = bits_to_float2(k2k6),
                 d = bits_to_float2(k3k7);
    out[0] = a.x, out[1] = b.x, out[2] = c.x, out[3] = d.x;
    out[4] = a.y, out[5] = b.y, out[6] = c.y, out[7] = d.y;
  }
}

// Scale factor of each scale group of the vector that starts at input k of `row`.
template <GemvFormat F>
__device__ __forceinline__ void load_scale_factors(const GemvKernelArgs& args, int64_t row, int64_t k,
                                                   float* factors) {
  if constexpr (F == GemvFormat::FP8_BLOCK128_E8M0) {
    factors[0] = e8m0_to_float(__ldg(args.scales + (row / 128) * args.scales_per_row + k / 128));
  } else if constexpr (F == GemvFormat::MXFP4) {
    factors[0] = e8m0_to_float(__ldg(args.scales + row * args.scales_per_row + k / 32));
  } else {
    // Two e4m3 codes, 2-byte aligned because k is a multiple of 32.
    const auto pair = __ldg(reinterpret_cast<const uint16_t*>(args.scales + row * args.scales_per_row + k / 16));
    const float2 f = e4m3x2_to_float2(pair);
    factors[0] = f.x, factors[1] = f.y;
  }
}

// T = 1 is the bandwidth case: cap registers at 64 so four CTAs (32 warps of loads in flight) fit an SM. Larger T
// is arithmetic bound and gets the registers it needs for its T × kRowsPerWarp accumulators without spilling.
template <int T>
inline constexpr int kMinCtasPerSm = T == 1 ? 4 : 1;

template <GemvFormat F, int T>
__global__ void __launch_bounds__(kWarpsPerCta * kWarpSize, kMinCtasPerSm<T>) quantized_gemv_kernel(const GemvKernelArgs args) {
  using Traits = FormatTraits<F>;
  constexpr int kValues = Traits::kValuesPerVector;
  constexpr int kQuadsPerVector = kValues / 4;
  constexpr int kWords = kVectorBytes / 4;
  constexpr int kValuesPerWord = kValues / kWords;
  constexpr int kWordsPerGroup = kWords / Traits::kScaleGroupsPerVector;
  static_assert(kValues % kWords == 0 && kValuesPerWord % 4 == 0, "a word must cover whole float4 quads of x");

  extern __shared__ float4 x_tile[];  // [T][kQuadsPerVector][vectors_in_tile]

  const int64_t k_begin = int64_t(blockIdx.y) * args.tile_k;
  const int64_t k_end = min(args.cols, k_begin + args.tile_k);
  const int vectors = int((k_end - k_begin) / kValues);

  // Stage x[:, k_begin:k_end) permuted (see NOTES).
  const int quads_per_token = vectors * kQuadsPerVector;
  for (int i = threadIdx.x; i < T * quads_per_token; i += blockDim.x) {
    const int t = i / quads_per_token, quad = i % quads_per_token;
    const int vector_idx = quad / kQuadsPerVector, quad_in_vector = quad % kQuadsPerVector;
    const float4 value = __ldg(reinterpret_cast<const float4*>(args.x + t * args.cols + k_begin) + quad);
    x_tile[(t * kQuadsPerVector + quad_in_vector) * vectors + vector_idx] = value;
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize, warp_idx = threadIdx.x / kWarpSize;
  const int64_t row_base = int64_t(blockIdx.x) * kRowsPerCta + warp_idx * kRowsPerWarp;
  if (row_base >= args.rows) return;  // no __syncthreads below
  // Rows past N re-read the last row (always in bounds) and are never stored.
  int64_t rows[kRowsPerWarp];
  const uint8_t* row_data[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    rows[r] = min(row_base + r, args.rows - 1);
    row_data[r] = args.data + rows[r] * args.data_row_bytes + k_begin / kValues * kVectorBytes;
  }

  float acc[kRowsPerWarp][T] = {};
  for (int v0 = lane; v0 < vectors; v0 += kWarpSize * kUnroll) {
    uint4 raw[kUnroll][kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vector_idx = v0 + u * kWarpSize;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        raw[u][r] = vector_idx < vectors ? load_streaming_vector(row_data[r] + vector_idx * kVectorBytes)
                                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vector_idx = v0 + u * kWarpSize;
      if (vector_idx >= vectors) break;
      const int64_t k = k_begin + int64_t(vector_idx) * kValues;
      float factors[kRowsPerWarp][Traits::kScaleGroupsPerVector];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) load_scale_factors<F>(args, rows[r], k, factors[r]);

      float block_sum[kRowsPerWarp][T] = {};
#pragma unroll
      for (int word_idx = 0; word_idx < kWords; ++word_idx) {
        float w[kRowsPerWarp][kValuesPerWord];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const uint4& v = raw[u][r];
          const uint32_t word = word_idx == 0 ? v.x : word_idx == 1 ? v.y : word_idx == 2 ? v.z : v.w;
          decode_word<F>(word, w[r]);
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
#pragma unroll
          for (int q = 0; q < kValuesPerWord / 4; ++q) {
            const float4 xq =
                x_tile[(t * kQuadsPerVector + word_idx * (kValuesPerWord / 4) + q) * vectors + vector_idx];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              block_sum[r][t] = fmaf(w[r][4 * q + 0], xq.x, block_sum[r][t]);
              block_sum[r][t] = fmaf(w[r][4 * q + 1], xq.y, block_sum[r][t]);
              block_sum[r][t] = fmaf(w[r][4 * q + 2], xq.z, block_sum[r][t]);
              block_sum[r][t] = fmaf(w[r][4 * q + 3], xq.w, block_sum[r][t]);
            }
          }
        }
        if ((word_idx + 1) % kWordsPerGroup == 0) {
          const int group = word_idx / kWordsPerGroup;
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) {
              acc[r][t] = fmaf(block_sum[r][t] * Traits::kDecodeFixup, factors[r][group], acc[r][t]);
              block_sum[r][t] = 0.0f;
            }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float sum = acc[r][t];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
      // Spread the stores over lanes instead of serialising them on lane 0.
      if (lane == (r * T + t) % kWarpSize && row_base + r < args.rows) {
        float* out = args.y + t * args.rows + row_base + r;
        if (args.accumulate)
          atomicAdd(out, sum * args.global_scale);
        else
          *out = sum * args.global_scale;
      }
    }
}

}  // namespace dsv4::cuda::gemv
