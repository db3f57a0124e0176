// GEMM kernel behind run_quantized_gemm (quantized_gemm.hpp holds the contract).
//
// One CTA computes y[tokens tile, 128 weight rows] over one split of K with three warpgroups:
// - warpgroup 0, the producer: one thread streams k-tiles of 64 through a ring of kStages shared-memory slots with
//   TMA (the activation tile, bf16 in the 128B swizzle, and the weight tile's stored bytes), each slot guarded by a
//   `full` mbarrier (TMA transaction bytes) and an `empty` mbarrier (one arrival per consumer warpgroup);
// - warpgroups 1 and 2, the consumers: each owns 64 weight rows and issues wgmma m64nTk16 with the weight on the M
//   side and the tokens on the N side (B = the activation tile in shared memory), accumulating in fp32 registers.
//   Quantized weights are dequantised straight into the wgmma A fragment in registers (the register-A form of
//   wgmma): no bf16 copy of the weight tile goes through shared memory, whose bandwidth the activation tile already
//   uses up. BF16 weights are the A operand as TMA loaded them.
//
// NOTES:
// - Overlap (quantized weights): within a warpgroup a k-tile's wgmma must complete before the next fragment is
//   written (ptxas serialises every wgmma of a kernel in which ordinary instructions write a wgmma input register
//   while an earlier wgmma is in flight, warning C7513). So the two consumer warpgroups ping-pong: one warpgroup of
//   m64n256 keeps all four tensor cores of the SM busy, and while consumer c's wgmma runs, the other dequantises
//   its next k-tile and then waits for its turn to issue (two named barriers hand the turn over when a k-tile's
//   wgmma is issued, so the next one queues behind it). BF16 weights (no fragment to write) keep one wgmma group
//   in flight while waiting for the next slot. Block scales are loaded one k-tile ahead.
// - A fragment (per warp, m16k16 like mma.sync): lane = 4g + q holds rows g and g+8 of the warp's 16 rows, at k pairs
//   16s + 2q and 16s + 8 + 2q for the k16 step s. In fp4 storage such a pair is one byte (byte 8s + q or 8s + 4 + q
//   of the row's 32), so a lane takes byte q of each of the row's eight words; in fp8 it is one halfword.
// - Exactness: e2m1 · e8m0 and e2m1 · e4m3 need at most 6 significant bits and e4m3 · e8m0 at most 4; bf16 has 8,
//   so those products are exact and the GEMM differs from an fp32 reference only in summation order. An f32 block
//   scale (FP8_BLOCK128 with F32 scales) makes the product inexact: it is rounded once to bf16.
// - e2m1 → bf16 uses two byte-permute lookups (the low and high bytes of the eight magnitudes' bf16 codes) and
//   moves the sign bits into place: no float arithmetic, no subnormal intermediate. Then one bf16x2 multiply by
//   the block scale.
// - Epilogue: the accumulator fragment of m64nN holds, per thread, rows lane/4 (+8) of its warp's 16 and token
//   pairs 2·(lane%4) + 8j; each store instruction of a warp writes four full 32-byte sectors.
// - Few tokens (batched decode, T <= 64): a 64-token tile (m64n64), and split-K where the row tiles alone leave SMs
//   idle: the weight is still read once per call, x once per 128 weight rows. Partial sums go to the workspace,
//   [split][token][row]; the CTA that draws the last ticket of its tile adds them in split order (the consumers
//   synchronise on a named barrier: the producer warpgroup has exited by then).
// - Programmatic dependent launch: the producer issues the weight halves of the first kStages stages before
//   griddepcontrol.wait (weights are never written by a kernel), the activation halves after it; the consumers wait
//   too before their first write.
// - Where the time goes (H200, 4096 tokens): BF16 runs at 86-97 % of cuBLAS, the fp4 formats at 75-82 %, FP8 at
//   59-69 %. Shared memory is the limit: per 512-cycle turn the wgmma reads 32 KB of activations (256 wavefronts of
//   128 bytes), TMA writes ~160 wavefronts, and the dequantiser's reads of the stored tile conflict (fp8: rows 2
//   apart share banks, 4 ways over 16 loads; fp4: 2 ways). Loading the stored tiles with TMA's 64B (fp8) / 32B
//   (fp4) swizzle and reading them with the matching XOR would make those reads conflict-free.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
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
inline constexpr int kSharedMemoryPerSm = 228 * 1024;  // of which the hardware reserves 1 KiB per resident CTA

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

// Shared memory of one CTA, every tile 1024-byte aligned (the swizzle atom), with the ring as deep as the CTA's share
// of the SM allows (at most kMaxStages).
// Resident CTAs per SM (kCtas): 1, the CTA takes the SM and moves registers to the consumers (setmaxnreg); 2 (the
// 64-token tile only: its consumers hold 32 accumulators), two CTAs share an SM within the launch bound's registers
// and half the shared memory each, and four consumer warpgroups hide each other's dequantise → wgmma → wait chain.
// Measured on an H200 at 64 tokens: 2 took V4-Flash wq_b (256 tiles) from 27 to 21 µs, but the split-K shapes of
// fewer tiles than SMs (wo_a, wo_b) from 36 to 52 µs (a shallower ring per CTA): the config picks per shape.
template <GemmWeight W, int kBlockTokens, int kCtas>
struct SharedLayout {
  static constexpr int kXStageBytes = kBlockTokens * kTileRowBytes;
  static constexpr int kWStageBytes = kBlockRows * WeightTraits<W>::kStoredRowBytes;
  static constexpr int kStageBytes = kXStageBytes + kWStageBytes;
  static constexpr int kAlignmentSlack = 1024;  // the dynamic shared memory base is rounded up to 1024
  static constexpr int kBarrierBytes = 2 * kMaxStages * 8;
  static constexpr int kBudget = kCtas == 1 ? kSharedMemoryLimit : kSharedMemoryPerSm / kCtas - 1024;
  static constexpr int kStagesThatFit = (kBudget - kAlignmentSlack - kBarrierBytes) / kStageBytes;
  static constexpr int kStages = kStagesThatFit < kMaxStages ? kStagesThatFit : kMaxStages;
  static_assert(kStages >= 2, "the ring needs two slots");
  static_assert(kWStageBytes % 1024 == 0 && kXStageBytes % 1024 == 0, "tiles must stay 1024-byte aligned");

  static constexpr int kXOffset = 0;
  static constexpr int kWOffset = kXOffset + kStages * kXStageBytes;
  static constexpr int kBarrierOffset = kWOffset + kStages * kWStageBytes;
  static constexpr int kTotalBytes = kBarrierOffset + kBarrierBytes + kAlignmentSlack;
};

struct GemmKernelArgs {
  CUtensorMap x_map;       // x as [T][groups·K] bf16, 64 × block_tokens boxes, 128B swizzle
  CUtensorMap w_map;       // the stored weight, one k-tile × 128 rows per box
  const uint8_t* scales;   // null for BF16
  int64_t scales_per_row;  // per 128-row band for FP8
  int rows;                // N
  int tokens;              // T
  int k_tiles;             // K / 64
  int rows_per_group;      // N / G (N when not grouped): x columns of row tile r start at (r·128 / this)·K
  int split_k_tiles;       // k-tiles per split (k_tiles without split-K)
  int k_splits;
  float* y;                // fp32 output, or null
  __nv_bfloat16* y_bf16;   // bf16 output, or null
  int64_t y_row_stride;    // elements
  float output_scale;      // NVFP4 global scale, else 1
  uint32_t* tickets;       // [row tiles × token tiles], split-K only
  float* partials;         // [k_splits][tokens][rows], split-K only
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

// Two e4m3 codes, the low bytes of the 16-bit lanes of `lanes`, → bf16x2 of their values × 2^-120, exactly: the
// exponent and mantissa bits move into bf16's (e4m3 subnormals become bf16 subnormals, which bf16 arithmetic keeps;
// it has no flush-to-zero). Integer work on the full-rate pipes, where the hardware e4m3 → f16 → f32 → bf16
// conversions queue on the slower conversion unit. The NaN code 0x7F (never written by the quantizer) decodes as
// a finite value.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2_times_2_pow_minus_120(uint32_t lanes) {
  return ((lanes & 0x007F007Fu) << 4) | ((lanes & 0x00800080u) << 8);
}

inline constexpr uint32_t kBf16x2TwoPow120 = 0x7B807B80u;  // bf16 2^120 in both halves

// (values × 2^-120) · 2^120 · scale → bf16x2. An e8m0 scale multiplies exactly in bf16; an f32 scale goes through
// fp32 so that the product is rounded once.
template <GemmWeight W>
__device__ __forceinline__ uint32_t scale_e4m3_pair(uint32_t scaled_bits, uint32_t scale_bf16x2, float scale) {
  if constexpr (W == GemmWeight::FP8_E8M0) {
    return mul_bf16x2(mul_bf16x2(scaled_bits, kBf16x2TwoPow120), scale_bf16x2);
  } else {
    constexpr float kTwoPow120 = 1.329227995784916e36f;
    const float lo = __uint_as_float(scaled_bits << 16) * kTwoPow120;
    const float hi = __uint_as_float(scaled_bits & 0xFFFF0000u) * kTwoPow120;
    return pack_bf16x2(lo * scale, hi * scale);
  }
}

// Byte q of each of four words, in word order.
__device__ __forceinline__ uint32_t gather_byte(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                               uint32_t pair_selector) {
  return __byte_perm(__byte_perm(w0, w1, pair_selector), __byte_perm(w2, w3, pair_selector), 0x5410);
}

// Where this lane's A fragment comes from: rows g and g+8 of its warp's 16 (g = lane / 4), k pairs at q = lane % 4.
struct FragmentSite {
  int local_row;        // row g within the warpgroup's 64
  int64_t scale_rows[2];  // global rows g and g+8, clamped to N - 1 (rows past N are zero-filled by TMA)
  int q;
};

// The block-scale bits one k-tile of this lane's two rows needs (loaded a k-tile ahead of their use).
template <GemmWeight W>
__device__ __forceinline__ void load_scale_bits(const GemmKernelArgs& args, const FragmentSite& site, int k_tile,
                                                uint32_t (&bits)[2]) {
  if constexpr (W == GemmWeight::MXFP4) {  // two e8m0 codes: k 0-31 and 32-63
#pragma unroll
    for (int r = 0; r < 2; ++r)
      bits[r] = __ldg(reinterpret_cast<const uint16_t*>(args.scales + site.scale_rows[r] * args.scales_per_row +
                                                        k_tile * 2));
  } else if constexpr (W == GemmWeight::NVFP4) {  // four e4m3 codes, one per k16 step
#pragma unroll
    for (int r = 0; r < 2; ++r)
      bits[r] = __ldg(reinterpret_cast<const uint32_t*>(args.scales + site.scale_rows[r] * args.scales_per_row +
                                                        k_tile * 4));
  } else {  // one scale for the CTA's 128-row band and this k-tile's 128-wide block
    const int64_t index = int64_t(blockIdx.x) * kBlockRows / 128 * args.scales_per_row + k_tile / 2;
    if constexpr (W == GemmWeight::FP8_E8M0)
      bits[0] = __ldg(args.scales + index);
    else
      bits[0] = __ldg(reinterpret_cast<const uint32_t*>(args.scales) + index);
    bits[1] = bits[0];
  }
}

// This lane's A fragment of a k-tile: a[4s + r] = (row g + 8r, k pair 16s + 2q), a[4s + 2 + r] = (row g + 8r,
// k pair 16s + 8 + 2q), dequantised from the warpgroup's stored rows.
template <GemmWeight W>
__device__ __forceinline__ void dequantise_fragment(const uint8_t* stored, const FragmentSite& site,
                                                    const uint32_t (&scale_bits)[2], uint32_t (&a)[16]) {
  constexpr int kStored = WeightTraits<W>::kStoredRowBytes;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint8_t* row = stored + (site.local_row + 8 * r) * kStored;
    if constexpr (W == GemmWeight::MXFP4 || W == GemmWeight::NVFP4) {
      const uint4 lo = *reinterpret_cast<const uint4*>(row);
      const uint4 hi = *reinterpret_cast<const uint4*>(row + 16);
      const uint32_t pair_selector = uint32_t(site.q) | (uint32_t(site.q + 4) << 4);
      // Byte j of codes[h] holds the k pair of step 2h + j/2, at +8 when j is odd.
      const uint32_t codes[2] = {gather_byte(lo.x, lo.y, lo.z, lo.w, pair_selector),
                                 gather_byte(hi.x, hi.y, hi.z, hi.w, pair_selector)};
      uint32_t factors[4];
      if constexpr (W == GemmWeight::MXFP4) {
        factors[0] = factors[1] = broadcast_bf16x2(e8m0_to_float(uint8_t(scale_bits[r])));
        factors[2] = factors[3] = broadcast_bf16x2(e8m0_to_float(uint8_t(scale_bits[r] >> 8)));
      } else {
        const float2 f01 =
            __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(scale_bits[r]), __NV_E4M3)));
        const float2 f23 = __half22float2(
            __half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(scale_bits[r] >> 16), __NV_E4M3)));
        factors[0] = broadcast_bf16x2(f01.x);
        factors[1] = broadcast_bf16x2(f01.y);
        factors[2] = broadcast_bf16x2(f23.x);
        factors[3] = broadcast_bf16x2(f23.y);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t values[4];
        e2m1x8_to_bf16x8(codes[h], values);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int step = 2 * h + j / 2;
          a[4 * step + 2 * (j % 2) + r] = mul_bf16x2(values[j], factors[step]);
        }
      }
    } else {
      const float scale = W == GemmWeight::FP8_E8M0 ? e8m0_to_float(uint8_t(scale_bits[r]))
                                                    : __uint_as_float(scale_bits[r]);
      const uint32_t scale_bf16x2 = W == GemmWeight::FP8_E8M0 ? broadcast_bf16x2(scale) : 0u;
      // The pair at byte 16s + 2q is halfword q%2 of word 4s + q/2; its partner at +8 bytes is in word 4s + 2 + q/2.
      // The selector spreads the pair's two bytes into the low bytes of two 16-bit lanes.
      const auto* words = reinterpret_cast<const uint32_t*>(row) + site.q / 2;
      const uint32_t lane_selector = site.q % 2 == 0 ? 0x4140u : 0x4342u;
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        const uint32_t low_k = __byte_perm(words[4 * step], 0, lane_selector);
        const uint32_t high_k = __byte_perm(words[4 * step + 2], 0, lane_selector);
        a[4 * step + r] = scale_e4m3_pair<W>(e4m3x2_to_bf16x2_times_2_pow_minus_120(low_k), scale_bf16x2, scale);
        a[4 * step + 2 + r] =
            scale_e4m3_pair<W>(e4m3x2_to_bf16x2_times_2_pow_minus_120(high_k), scale_bf16x2, scale);
      }
    }
  }
}

// D[64 × 64] += A[64 × 16] · B[64 × 16]ᵀ, bf16 × bf16 → fp32, both operands K-major in shared memory (the 64-token
// tile; ptx/wgmma.cuh holds the wider shapes).
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float (&d)[32], uint64_t a_desc, uint64_t b_desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "%32, %33, 1, 1, 1, 0, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "l"(a_desc), "l"(b_desc));
#else
  __trap();
#endif
}

// The same with A from registers (each warp's m16k16 fragment a0..a3, read asynchronously: they must keep their
// values until a wait_group covers this wgmma).
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint64_t b_desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "{%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc));
#else
  __trap();
#endif
}

template <int kBlockTokens>
__device__ __forceinline__ void wgmma_k_tile(float (&acc)[kBlockTokens / 2], uint64_t a_desc, uint64_t b_desc) {
#pragma unroll
  for (int k = 0; k < kBlockK / 16; ++k) {
    const uint64_t a = sm90::advance_descriptor(a_desc, k * 32), b = sm90::advance_descriptor(b_desc, k * 32);
    if constexpr (kBlockTokens == 256)
      sm90::wgmma_m64n256k16_bf16(acc, a, b, 1);
    else if constexpr (kBlockTokens == 128)
      sm90::wgmma_m64n128k16_bf16(acc, a, b, 1);
    else
      wgmma_m64n64k16_bf16(acc, a, b);
  }
}

template <int kBlockTokens>
__device__ __forceinline__ void wgmma_k_tile_rs(float (&acc)[kBlockTokens / 2], const uint32_t (&a)[16],
                                                uint64_t b_desc) {
#pragma unroll
  for (int k = 0; k < kBlockK / 16; ++k) {
    const uint64_t b = sm90::advance_descriptor(b_desc, k * 32);
    if constexpr (kBlockTokens == 256)
      sm90::wgmma_m64n256k16_bf16_rs(acc, a[4 * k], a[4 * k + 1], a[4 * k + 2], a[4 * k + 3], b, 1);
    else if constexpr (kBlockTokens == 128)
      sm90::wgmma_m64n128k16_bf16_rs(acc, a[4 * k], a[4 * k + 1], a[4 * k + 2], a[4 * k + 3], b, 1);
    else
      wgmma_m64n64k16_bf16_rs(acc, a[4 * k], a[4 * k + 1], a[4 * k + 2], a[4 * k + 3], b);
  }
}

// Writes the consumer's accumulators: straight to the output, or as this split's partial sums, the CTA that draws
// the last ticket of its tile then adding every split in split order. Called by both consumer warpgroups (they
// synchronise on named barrier kEpilogueBarrier).
template <int kBlockTokens>
__device__ __forceinline__ void write_output(const GemmKernelArgs& args, const float (&acc)[kBlockTokens / 2],
                                             int consumer, int thread, int cta_row, int cta_token, int split,
                                             bool* is_last_split) {
  constexpr int kEpilogueBarrier = 3;  // 1 and 2 are the consumers' turn barriers
  constexpr int kConsumerThreads = 2 * kWarpgroupThreads;
  auto store = [&](int64_t offset, float value) {
    if (args.y != nullptr)
      args.y[offset] = value;
    else
      args.y_bf16[offset] = __float2bfloat16_rn(value);
  };
  const int warp = thread / 32, lane = thread % 32;
  const int row_base = cta_row + consumer * kWarpgroupRows + warp * 16 + lane / 4;
  const int token_base = cta_token + 2 * (lane % 4);
  auto for_each_element = [&](auto&& body) {
#pragma unroll
    for (int j = 0; j < kBlockTokens / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = row_base + 8 * h, token = token_base + 8 * j + e;
          if (row < args.rows && token < args.tokens) body(row, token, acc[4 * j + 2 * h + e]);
        }
  };
  if (args.k_splits == 1) {
    for_each_element([&](int row, int token, float value) {
      store(int64_t(token) * args.y_row_stride + row, value * args.output_scale);
    });
    return;
  }

  float* partial = args.partials + int64_t(split) * args.tokens * args.rows;
  for_each_element(
      [&](int row, int token, float value) { partial[int64_t(token) * args.rows + row] = value; });
  __threadfence();  // partials visible device-wide before the ticket says so
  sm90::named_barrier_sync<kConsumerThreads>(kEpilogueBarrier);
  uint32_t* ticket = args.tickets + blockIdx.y * gridDim.x + blockIdx.x;
  if (consumer == 0 && thread == 0) *is_last_split = atomicAdd(ticket, 1u) == uint32_t(args.k_splits - 1);
  sm90::named_barrier_sync<kConsumerThreads>(kEpilogueBarrier);
  if (!*is_last_split) return;
  __threadfence();
  const int tile_rows = min(kBlockRows, args.rows - cta_row), tile_tokens = min(kBlockTokens, args.tokens - cta_token);
  const int64_t split_stride = int64_t(args.tokens) * args.rows;
  for (int i = consumer * kWarpgroupThreads + thread; i < tile_rows * tile_tokens; i += kConsumerThreads) {
    const int row = cta_row + i % tile_rows, token = cta_token + i / tile_rows;
    const float* column = args.partials + int64_t(token) * args.rows + row;
    const float sum = tile::sum_splits_in_order(column, split_stride, args.k_splits);
    store(int64_t(token) * args.y_row_stride + row, sum * args.output_scale);
  }
  if (consumer == 0 && thread == 0) *ticket = 0;  // every split has arrived: ready for the next launch
}

template <GemmWeight W, int kBlockTokens, int kCtas>
__global__ void __launch_bounds__(kThreads, kCtas) quantized_gemm_kernel(const __grid_constant__ GemmKernelArgs args) {
  using Layout = SharedLayout<W, kBlockTokens, kCtas>;
  static_assert(kCtas == 1 || kBlockTokens == 64, "two CTAs per SM only fit the 64-token tile's registers");
  using Traits = WeightTraits<W>;
  constexpr int kStages = Layout::kStages;
  static_assert(kBlockTokens == 64 || kBlockTokens == 128 || kBlockTokens == 256, "token tiles of 64, 128 or 256");

  extern __shared__ uint8_t shared_raw[];
  __shared__ bool is_last_split;
  uint8_t* shared = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(shared_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* x_tiles = shared + Layout::kXOffset;
  uint8_t* w_tiles = shared + Layout::kWOffset;
  auto* full = reinterpret_cast<uint64_t*>(shared + Layout::kBarrierOffset);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int cta_row = blockIdx.x * kBlockRows;
  const int cta_token = blockIdx.y * kBlockTokens;
  const int split = blockIdx.z;
  const int k_begin = split * args.split_k_tiles;
  const int k_count = min(args.split_k_tiles, args.k_tiles - k_begin);
  allow_dependents();  // the next kernel's CTAs may start; its own wait still covers all of this grid

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], 1);
      sm90::mbarrier_init(&empty[s], 2);
    }
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {
    if constexpr (kCtas == 1) sm90::setmaxnreg_decrease<kProducerRegisters>();
    if (threadIdx.x == 0) {
      sm90::prefetch_tensor_map(&args.x_map);
      sm90::prefetch_tensor_map(&args.w_map);
      // x column (in k-tiles) of this CTA's group.
      const int x_k_tile0 = (cta_row / args.rows_per_group) * args.k_tiles + k_begin;
      auto load_weight = [&](int i) {
        const int slot = i % kStages;
        sm90::mbarrier_arrive_expect_tx(&full[slot], Layout::kStageBytes);
        sm90::tma_load_2d(w_tiles + slot * Layout::kWStageBytes, &args.w_map, &full[slot],
                          (k_begin + i) * Traits::kTmaCols, cta_row);
      };
      // The first ring's weights before the previous kernel has finished (see NOTES), x only after.
      const int prologue = min(kStages, k_count);
      for (int i = 0; i < prologue; ++i) load_weight(i);
      wait_for_prior_grids();
      for (int i = 0; i < k_count; ++i) {
        const int slot = i % kStages;
        if (i >= prologue) {
          sm90::mbarrier_wait(&empty[slot], ((i / kStages) & 1) ^ 1);
          load_weight(i);
        }
        sm90::tma_load_2d(x_tiles + slot * Layout::kXStageBytes, &args.x_map, &full[slot], (x_k_tile0 + i) * kBlockK,
                          cta_token);
      }
    }
    return;
  }

  if constexpr (kCtas == 1) sm90::setmaxnreg_increase<kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int thread = threadIdx.x % kWarpgroupThreads;
  float acc[kBlockTokens / 2];
#pragma unroll
  for (int i = 0; i < kBlockTokens / 2; ++i) acc[i] = 0.0f;

  auto x_descriptor = [&](int slot) {
    return sm90::make_sw128_k_major_descriptor(x_tiles + slot * Layout::kXStageBytes);
  };
  auto release = [&](int slot) {
    if (thread == 0) sm90::mbarrier_arrive(&empty[slot]);
  };

  if constexpr (!Traits::kDequantise) {
    for (int i = 0; i < k_count; ++i) {
      const int slot = i % kStages;
      sm90::mbarrier_wait(&full[slot], (i / kStages) & 1);
      const uint64_t a_desc = sm90::make_sw128_k_major_descriptor(w_tiles + slot * Layout::kWStageBytes +
                                                                  consumer * kWarpgroupRows * kTileRowBytes);
      sm90::fence_operand(acc);
      sm90::wgmma_fence();
      wgmma_k_tile<kBlockTokens>(acc, a_desc, x_descriptor(slot));
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<1>();
      sm90::fence_operand(acc);
      if (i > 0) release((i - 1) % kStages);
    }
  } else {
    const int warp = thread / 32, lane = thread % 32;
    FragmentSite site;
    site.local_row = warp * 16 + lane / 4;
    site.q = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = int64_t(cta_row) + consumer * kWarpgroupRows + site.local_row + 8 * r;
      site.scale_rows[r] = row < args.rows ? row : args.rows - 1;
    }
    uint32_t fragment[16];
    uint32_t scale_bits[2];
    load_scale_bits<W>(args, site, k_begin, scale_bits);
    // Ping-pong (see NOTES): consumer c waits at barrier kTurn + c for its turn on the tensor cores and hands the
    // turn over once its k-tile is issued. Consumer 1 starts by handing consumer 0 the first turn.
    constexpr int kTurn = 1;
    if (consumer == 1) sm90::named_barrier_arrive<2 * kWarpgroupThreads>(kTurn + 0);
    for (int i = 0; i < k_count; ++i) {
      const int slot = i % kStages;
      sm90::mbarrier_wait(&full[slot], (i / kStages) & 1);
      const uint8_t* stored =
          w_tiles + slot * Layout::kWStageBytes + consumer * kWarpgroupRows * Traits::kStoredRowBytes;
      dequantise_fragment<W>(stored, site, scale_bits, fragment);
      if (i + 1 < k_count) load_scale_bits<W>(args, site, k_begin + i + 1, scale_bits);
      sm90::named_barrier_sync<2 * kWarpgroupThreads>(kTurn + consumer);
      sm90::fence_operand(acc);
      sm90::wgmma_fence();
      wgmma_k_tile_rs<kBlockTokens>(acc, fragment, x_descriptor(slot));
      sm90::wgmma_commit_group();
      // Hand the turn over as soon as this k-tile is issued: the other warpgroup's wgmma queues behind it and the
      // tensor cores never drain between turns. Consumer 0's last hand-over meets consumer 1's last turn;
      // consumer 1's would be left dangling.
      if (consumer == 0 || i + 1 < k_count)
        sm90::named_barrier_arrive<2 * kWarpgroupThreads>(kTurn + 1 - consumer);
      // The fragment registers are rewritten next: wait for the whole group (see NOTES).
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(acc);
      sm90::fence_operand(fragment);
      release(slot);
    }
  }
  sm90::wgmma_wait_group<0>();
  sm90::fence_operand(acc);
  wait_for_prior_grids();  // already passed (x came after it); orders this thread's writes formally
  write_output<kBlockTokens>(args, acc, consumer, thread, cta_row, cta_token, split, &is_last_split);
}

}  // namespace dsv4::cuda::gemm
