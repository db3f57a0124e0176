// Prefill GEMM kernel behind run_quantized_gemm (quantized_gemm.hpp holds the contract).
//
// One CTA computes y[tokens tile, 128 weight rows] with three warpgroups:
// - warpgroup 0, the producer: one thread streams k-tiles of 64 through a ring of kStages shared-memory slots with
//   TMA (the activation tile, bf16 in the 128B swizzle, and the weight tile's stored bytes), each slot guarded by a
//   `full` mbarrier (TMA transaction bytes) and an `empty` mbarrier (one arrival per consumer warpgroup);
// - warpgroups 1 and 2, the consumers: each owns 64 weight rows. It dequantises its rows of a k-tile into a bf16
//   tile in the 128B swizzle (the wgmma A operand; exact, see below), then issues wgmma m64nTk16 with the weight on
//   the M side and the tokens on the N side, accumulating in fp32 registers. BF16 weights skip the dequantisation:
//   TMA already wrote the A operand.
//
// NOTES:
// - Overlap: a consumer issues the wgmma of k-tile i, waits until only that group is in flight (so k-tile i-1's
//   slot and dequantised buffer are free), releases slot i-1 and dequantises k-tile i+1 into the other of its two
//   buffers while the tensor core works on i.
// - Exactness: e2m1 · e8m0 and e2m1 · e4m3 need at most 6 significant bits and e4m3 · e8m0 at most 4; bf16 has 8,
//   so those products are exact and the GEMM differs from an fp32 reference only in summation order. An f32 block
//   scale (FP8_BLOCK128 with F32 scales) makes the product inexact: it is rounded once to bf16.
// - e2m1 → bf16 uses two byte-permute lookups (the low and high bytes of the eight magnitudes' bf16 codes) and
//   moves the sign bits into place: no float arithmetic, no subnormal intermediate. Then one bf16x2 multiply by
//   the block scale.
// - The dequantiser thread owns half a row of the 64-wide k-tile (32 values) and writes four 16-byte chunks;
//   eight consecutive lanes cover four rows × both halves, so after the swizzle their chunks fall in eight
//   distinct bank groups.
// - Epilogue: the accumulator fragment of m64nN holds, per thread, rows lane/4 (+8) of its warp's 16 and token
//   pairs 2·(lane%4) + 8j; each store instruction of a warp writes four full 32-byte sectors.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "core/e8m0.hpp"

namespace dsv4::cuda::gemm {

enum class GemmWeight { BF16, FP8_E8M0, FP8_F32, MXFP4, NVFP4 };

inline constexpr int kBlockRows = 128;        // weight rows per CTA
inline constexpr int kWarpgroupRows = 64;     // weight rows per consumer warpgroup (the wgmma M)
inline constexpr int kBlockK = 64;            // one 128-byte row of bf16: the swizzle width
inline constexpr int kTileRowBytes = kBlockK * 2;
inline constexpr int kWarpgroupThreads = 128;
inline constexpr int kThreads = 3 * kWarpgroupThreads;
inline constexpr int kProducerRegisters = 40;
inline constexpr int kConsumerRegisters = 232;
inline constexpr int kSharedMemoryLimit = 227 * 1024;  // per-block opt-in maximum on sm_90
inline constexpr int kMaxStages = 8;

template <GemmWeight W>
struct WeightTraits;
template <>
struct WeightTraits<GemmWeight::BF16> {
  static constexpr int kStoredRowBytes = 128;  // bytes of one row's k-tile as stored
  static constexpr int kTmaCols = 64;          // the k-tile in the tensor map's elements (bf16)
  static constexpr bool kDequantise = false;
};
template <>
struct WeightTraits<GemmWeight::FP8_E8M0> {
  static constexpr int kStoredRowBytes = 64;
  static constexpr int kTmaCols = 64;
  static constexpr bool kDequantise = true;
};
template <>
struct WeightTraits<GemmWeight::FP8_F32> : WeightTraits<GemmWeight::FP8_E8M0> {};
template <>
struct WeightTraits<GemmWeight::MXFP4> {
  static constexpr int kStoredRowBytes = 32;
  static constexpr int kTmaCols = 32;
  static constexpr bool kDequantise = true;
};
template <>
struct WeightTraits<GemmWeight::NVFP4> : WeightTraits<GemmWeight::MXFP4> {};

// Shared memory of one CTA, every tile 1024-byte aligned (the swizzle atom).
template <GemmWeight W, int kBlockTokens>
struct SharedLayout {
  static constexpr int kXStageBytes = kBlockTokens * kTileRowBytes;
  static constexpr int kWStageBytes = kBlockRows * WeightTraits<W>::kStoredRowBytes;
  static constexpr int kStageBytes = kXStageBytes + kWStageBytes;
  static constexpr int kDequantTileBytes = kWarpgroupRows * kTileRowBytes;
  // Two buffers per consumer warpgroup (dequantise k-tile i+1 while the tensor core reads k-tile i).
  static constexpr int kDequantBytes = WeightTraits<W>::kDequantise ? 2 * 2 * kDequantTileBytes : 0;
  static constexpr int kAlignmentSlack = 1024;  // the dynamic shared memory base is rounded up to 1024
  static constexpr int kBarrierBytes = 2 * kMaxStages * 8;
  static constexpr int kStagesThatFit =
      (kSharedMemoryLimit - kAlignmentSlack - kBarrierBytes - kDequantBytes) / kStageBytes;
  static constexpr int kStages = kStagesThatFit < kMaxStages ? kStagesThatFit : kMaxStages;
  static_assert(kStages >= 2, "the ring needs two slots");
  static_assert(kWStageBytes % 1024 == 0 && kXStageBytes % 1024 == 0, "tiles must stay 1024-byte aligned");

  static constexpr int kXOffset = 0;
  static constexpr int kWOffset = kXOffset + kStages * kXStageBytes;
  static constexpr int kDequantOffset = kWOffset + kStages * kWStageBytes;
  static constexpr int kBarrierOffset = kDequantOffset + kDequantBytes;
  static constexpr int kTotalBytes = kBarrierOffset + kBarrierBytes + kAlignmentSlack;
};

struct GemmKernelArgs {
  const uint8_t* scales;   // null for BF16
  int64_t scales_per_row;  // per 128-row band for FP8
  int rows;                // N
  int tokens;              // T
  int k_tiles;             // K / 64
  float* y;
  int64_t y_row_stride;    // elements
  float output_scale;      // NVFP4 global scale, else 1
};

__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// (lo, hi) → bf16x2 bits, round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ uint32_t broadcast_bf16x2(float value) {
  return pack_bf16x2(value, value);
}

// Eight e2m1 codes (nibble i is k = i) → four bf16x2 words (k0k1, k2k3, k4k5, k6k7), exactly.
__device__ __forceinline__ void e2m1x8_to_bf16x8(uint32_t codes, uint32_t (&out)[4]) {
  // Byte c of (A, B) is the low / high byte of bf16(magnitude c): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
  constexpr uint32_t kLowBytesA = 0xC0800000u, kLowBytesB = 0xC0804000u;
  constexpr uint32_t kHighBytesA = 0x3F3F3F00u, kHighBytesB = 0x40404040u;
  const uint32_t magnitudes = codes & 0x77777777u;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t selectors = magnitudes >> (16 * half);
    const uint32_t four_codes = codes >> (16 * half);
    const uint32_t low = __byte_perm(kLowBytesA, kLowBytesB, selectors);
    uint32_t high = __byte_perm(kHighBytesA, kHighBytesB, selectors);
    // Byte j of `spread` holds the code byte whose nibble j%2 is code j: its sign (bit 3 or 7) → bit 7 of byte j.
    const uint32_t spread = __byte_perm(four_codes, 0, 0x1100);
    high |= ((spread << 4) & 0x00800080u) | (spread & 0x80008000u);
    out[2 * half] = __byte_perm(low, high, 0x5140);
    out[2 * half + 1] = __byte_perm(low, high, 0x7362);
  }
}

// Four e4m3 codes (byte i is k = i) times `scale` → two bf16x2 words.
__device__ __forceinline__ void e4m3x4_to_bf16x4(uint32_t codes, float scale, uint32_t& out01, uint32_t& out23) {
  const float2 lo = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes), __NV_E4M3)));
  const float2 hi =
      __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes >> 16), __NV_E4M3)));
  out01 = pack_bf16x2(lo.x * scale, lo.y * scale);
  out23 = pack_bf16x2(hi.x * scale, hi.y * scale);
}

__device__ __forceinline__ void store_chunk(uint8_t* tile, int row, int chunk, const uint32_t (&words)[4]) {
  *reinterpret_cast<uint4*>(tile + row * kTileRowBytes + ((chunk ^ (row & 7)) << 4)) =
      make_uint4(words[0], words[1], words[2], words[3]);
}

// One consumer thread's share of a k-tile: half `half` (32 values) of row `row` of the warpgroup's 64 rows, read
// from the stored tile `stored` and written dequantised into `tile` (bf16, 128B swizzle).
template <GemmWeight W>
__device__ __forceinline__ void dequantise_half_row(const GemmKernelArgs& args, const uint8_t* stored, uint8_t* tile,
                                                    int row, int half, int global_row, int k_tile) {
  constexpr int kStored = WeightTraits<W>::kStoredRowBytes;
  // Rows past N are zero-filled by TMA; their scales are read from the last row, which exists.
  const int64_t scale_row = global_row < args.rows ? global_row : args.rows - 1;
  if constexpr (W == GemmWeight::MXFP4 || W == GemmWeight::NVFP4) {
    const uint4 packed = *reinterpret_cast<const uint4*>(stored + row * kStored + half * 16);
    uint32_t factors[2];
    if constexpr (W == GemmWeight::MXFP4) {
      const uint8_t code = __ldg(args.scales + scale_row * args.scales_per_row + k_tile * 2 + half);
      factors[0] = factors[1] = broadcast_bf16x2(e8m0_to_float(code));
    } else {
      const uint16_t codes = __ldg(reinterpret_cast<const uint16_t*>(args.scales + scale_row * args.scales_per_row +
                                                                     k_tile * 4 + half * 2));
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes), __NV_E4M3)));
      factors[0] = broadcast_bf16x2(f.x);
      factors[1] = broadcast_bf16x2(f.y);
    }
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t values[4];
      e2m1x8_to_bf16x8(words[i], values);
#pragma unroll
      for (int j = 0; j < 4; ++j) values[j] = mul_bf16x2(values[j], factors[i / 2]);
      store_chunk(tile, row, 4 * half + i, values);
    }
  } else {
    const int64_t band = int64_t(blockIdx.x) * kBlockRows / 128;
    const int64_t scale_index = band * args.scales_per_row + k_tile / 2;
    float scale;
    if constexpr (W == GemmWeight::FP8_E8M0)
      scale = e8m0_to_float(__ldg(args.scales + scale_index));
    else
      scale = __ldg(reinterpret_cast<const float*>(args.scales) + scale_index);
    // Rows 2r and 2r+1 read their two 16-byte pieces in opposite orders: conflict-free within eight lanes.
    const int first = (row >> 1) & 1;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int piece = p ^ first;
      const uint4 codes = *reinterpret_cast<const uint4*>(stored + row * kStored + half * 32 + piece * 16);
      uint32_t low[4], high[4];
      e4m3x4_to_bf16x4(codes.x, scale, low[0], low[1]);
      e4m3x4_to_bf16x4(codes.y, scale, low[2], low[3]);
      e4m3x4_to_bf16x4(codes.z, scale, high[0], high[1]);
      e4m3x4_to_bf16x4(codes.w, scale, high[2], high[3]);
      store_chunk(tile, row, 4 * half + 2 * piece, low);
      store_chunk(tile, row, 4 * half + 2 * piece + 1, high);
    }
  }
}

template <int kBlockTokens>
__device__ __forceinline__ void wgmma_k_tile(float (&acc)[kBlockTokens / 2], uint64_t a_desc, uint64_t b_desc) {
#pragma unroll
  for (int k = 0; k < kBlockK / 16; ++k) {
    const uint64_t a = sm90::advance_descriptor(a_desc, k * 32), b = sm90::advance_descriptor(b_desc, k * 32);
    if constexpr (kBlockTokens == 256)
      sm90::wgmma_m64n256k16_bf16(acc, a, b, 1);
    else
      sm90::wgmma_m64n128k16_bf16(acc, a, b, 1);
  }
}

template <GemmWeight W, int kBlockTokens>
__global__ void __launch_bounds__(kThreads, 1)
    quantized_gemm_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                          const GemmKernelArgs args) {
  using Layout = SharedLayout<W, kBlockTokens>;
  using Traits = WeightTraits<W>;
  constexpr int kStages = Layout::kStages;
  static_assert(kBlockTokens == 128 || kBlockTokens == 256, "token tiles of 128 or 256");

  extern __shared__ uint8_t shared_raw[];
  uint8_t* shared = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* x_tiles = shared + Layout::kXOffset;
  uint8_t* w_tiles = shared + Layout::kWOffset;
  auto* full = reinterpret_cast<uint64_t*>(shared + Layout::kBarrierOffset);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int cta_row = blockIdx.x * kBlockRows;
  const int cta_token = blockIdx.y * kBlockTokens;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], 2);
    }
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    sm90::setmaxnreg_decrease<kProducerRegisters>();
    if (threadIdx.x == 0) {
      sm90::prefetch_tensor_map(&x_map);
      sm90::prefetch_tensor_map(&w_map);
      for (int k_tile = 0; k_tile < args.k_tiles; ++k_tile) {
        const int slot = k_tile % kStages;
        sm90::mbarrier_wait(&empty[slot], ((k_tile / kStages) & 1) ^ 1);
        sm90::mbarrier_arrive_expect_tx(&full[slot], Layout::kStageBytes);
        sm90::tma_load_2d(x_tiles + slot * Layout::kXStageBytes, &x_map, &full[slot], k_tile * kBlockK, cta_token);
        sm90::tma_load_2d(w_tiles + slot * Layout::kWStageBytes, &w_map, &full[slot], k_tile * Traits::kTmaCols,
                          cta_row);
      }
    }
    return;
  }

  sm90::setmaxnreg_increase<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int thread = threadIdx.x % kWarpgroupThreads;
  float acc[kBlockTokens / 2];
#pragma unroll
  for (int i = 0; i < kBlockTokens / 2; ++i) acc[i] = 0.0f;

  auto x_descriptor = [&](int slot) { return sm90::make_sw128_k_major_descriptor(x_tiles + slot * Layout::kXStageBytes); };
  auto release = [&](int slot) {
    if (thread == 0) sm90::mbarrier_arrive(&empty[slot]);
  };

  if constexpr (!Traits::kDequantise) {
    for (int k_tile = 0; k_tile < args.k_tiles; ++k_tile) {
      const int slot = k_tile % kStages;
      sm90::mbarrier_wait(&full[slot], (k_tile / kStages) & 1);
      const uint64_t a_desc = sm90::make_sw128_k_major_descriptor(w_tiles + slot * Layout::kWStageBytes +
                                                                  consumer * kWarpgroupRows * kTileRowBytes);
      sm90::fence_operand(acc);
      sm90::wgmma_fence();
      wgmma_k_tile<kBlockTokens>(acc, a_desc, x_descriptor(slot));
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<1>();
      sm90::fence_operand(acc);
      if (k_tile > 0) release((k_tile - 1) % kStages);
    }
  } else {
    uint8_t* dequant_tiles = shared + Layout::kDequantOffset + consumer * 2 * Layout::kDequantTileBytes;
    const int row = thread / 2, half = thread % 2;
    const int global_row = cta_row + consumer * kWarpgroupRows + row;
    auto dequantise = [&](int k_tile) {
      const int slot = k_tile % kStages;
      sm90::mbarrier_wait(&full[slot], (k_tile / kStages) & 1);
      const uint8_t* stored = w_tiles + slot * Layout::kWStageBytes +
                              consumer * kWarpgroupRows * Traits::kStoredRowBytes;
      dequantise_half_row<W>(args, stored, dequant_tiles + (k_tile % 2) * Layout::kDequantTileBytes, row, half,
                             global_row, k_tile);
      sm90::fence_proxy_async_shared();
      sm90::named_barrier_sync<kWarpgroupThreads>(1 + consumer);
    };
    dequantise(0);
    for (int k_tile = 0; k_tile < args.k_tiles; ++k_tile) {
      const int slot = k_tile % kStages;
      const uint64_t a_desc =
          sm90::make_sw128_k_major_descriptor(dequant_tiles + (k_tile % 2) * Layout::kDequantTileBytes);
      sm90::fence_operand(acc);
      sm90::wgmma_fence();
      wgmma_k_tile<kBlockTokens>(acc, a_desc, x_descriptor(slot));
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<1>();
      sm90::fence_operand(acc);
      if (k_tile > 0) release((k_tile - 1) % kStages);
      if (k_tile + 1 < args.k_tiles) dequantise(k_tile + 1);
    }
  }
  sm90::wgmma_wait_group<0>();
  sm90::fence_operand(acc);

  const int warp = thread / 32, lane = thread % 32;
  const int row_base = cta_row + consumer * kWarpgroupRows + warp * 16 + lane / 4;
  const int token_base = cta_token + 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < kBlockTokens / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = row_base + 8 * h, token = token_base + 8 * j + e;
        if (row < args.rows && token < args.tokens)
          args.y[int64_t(token) * args.y_row_stride + row] = acc[4 * j + 2 * h + e] * args.output_scale;
      }
}

}  // namespace dsv4::cuda::gemm
