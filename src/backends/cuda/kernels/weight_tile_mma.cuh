// The warp-level building block of the decode-path linear layers: one warp multiplies a 16-row tile of a stored
// weight (BF16, FP8_BLOCK128, MXFP4, NVFP4) with up to 64 tokens of bf16 activations on the tensor cores
// (mma.sync m16n8k16, the WEIGHT on the M side, tokens on N), dequantising the weight to bf16 in registers.
//
// Contract (for every user of this header: quantized_linear, the MoE expert GEMMs):
// - Weight: any DeviceMatrixView [rows, cols] in the host layout. One lane reads 16 contiguous stored bytes per row per
//   step. kAlignedTile = true is the fast path, for callers that guarantee weight_rows_aligned(w) (every DSV4 shape)
//   and row0 % 16 == 0: plain 16-byte loads and one FP8 block scale per tile. kAlignedTile = false takes any layout
//   (tiny test models: K = 24, 48, ...; tiles across 128-row bands): rows that are not 16-byte aligned are gathered
//   bytewise (a uniform branch), FP8 scales are read per row. FP8 scales may be e8m0 or fp32; MXFP4 scale codes must be
//   <= 128 (check_quantized_linear_scales in quantized_linear.hpp says why and refuses others at upload time).
// - A warp tile is rows [row0, row0 + 16) with 0 <= row0 < rows (any alignment); rows past the matrix re-read the
//   last row (their results are finite garbage and must not be stored).
// - The k range [k_begin, k_end): k_begin a multiple of kTileKAlignment (128: the FP8 block and the fp4 step),
//   k_end <= cols.
// - x tile in shared memory (16-byte aligned): bf16 [padded_tokens][row_stride], padded_tokens = 8·NT, row_stride =
//   x_tile_row_stride(k_end - k_begin) elements; column 0 is x[:, k_begin]. It must be filled by stage_x_tile<F>
//   (the same F) for exactly that k range: it stores each row PERMUTED (see NOTES) and zero-fills padding tokens
//   and the k tail up to the next multiple of 128 (the MMA reads them: they must be finite). Any number of warps
//   may read one staged tile (different row0) after a __syncthreads.
// - Accumulators: acc[nt][i] is the mma D fragment of token tile nt, with g = lane / 4, t = lane % 4:
//   acc[nt][0] = (row0 + g, token 8·nt + 2t), acc[nt][1] = (row0 + g, token 8·nt + 2t + 1),
//   acc[nt][2] = (row0 + g + 8, token 8·nt + 2t), acc[nt][3] = (row0 + g + 8, token 8·nt + 2t + 1).
//   weight_tile_mma ADDS to them (fp32), so a caller may run several k ranges into one accumulator. The result
//   still has to be multiplied by weight_tile_output_scale<F>(w) (NVFP4's global scale and a power of two, below).
//
// NOTES:
// - k order inside an MMA is free as long as A and B agree. Each lane streams 16 contiguous bytes of each of its two
//   rows (g, g + 8) per step; the four lanes of a group (t = 0..3) cover 4 × 16 contiguous bytes of a row. The
//   decode emits bf16 pairs in the order its shifts make cheapest, and stage_x_tile puts x in that same order, so
//   each lane's B fragments for two MMAs are one conflict-free 16-byte shared load.
// - Dequantisation is exact (no rounding): the e2m1 or e4m3 bits are placed into a bf16 (e2m1 value × 2^-126, the
//   0.5 code a bf16 subnormal; e4m3 value × 2^-120) and one bf16x2 multiply applies a power-of-two-exact factor:
//   MXFP4 2^(e-127) · 2^126 (a normal bf16 for codes <= 128); NVFP4 e4m3 scale · 2^118 (always normal, the missing
//   2^8 goes into the output scale); FP8 2^120, with the 128×128 block scale applied to fp32 partial sums per block.
//   e2m1 × e4m3 has at most 6 significant bits, e2m1 × 2^e and e4m3 at most 4: all exact in bf16's 8.
// - Stored x order: within every aligned chunk of 8 k, the chunk is permuted (fp4: 0 4 1 5 2 6 3 7, fp8:
//   0 2 1 3 4 6 5 7, bf16: identity); within every 4·kValuesPerLoad-wide step the chunks are transposed from
//   [lane t][chunk i of the lane] to [i][t], so the 4 lanes of a group read 64 contiguous bytes. The row stride is
//   64 bytes more than a multiple of 128, so the two token rows of a quarter-warp fall in different banks.
// - Latency: loads are issued a batch of S steps at a time (2·S × 16 bytes per lane, in registers), and the next batch
//   is in flight while the current one is decoded and multiplied. (A per-warp cp.async ring in shared memory instead
//   measured 20-50 % slower on an H200: a wait and a shared round trip per step. The streamed tiles at the end of this
//   file wait once per 4 KB stage filled by three TMA copies, and measured 1.1-1.7x faster at T <= 8.) With few token
//   tiles the MMAs rotate over 4 / NT independent accumulators (consecutive mma.sync into one accumulator serialise on
//   its latency).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/mma.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "core/e8m0.hpp"
#include "core/rms_norm_math.hpp"

namespace dsv4::cuda::tile {

enum class TileFormat { BF16, FP8_BLOCK128, MXFP4, NVFP4 };

// How the e2m1 codes of fp4 weights lie in each little-endian 32-bit word of stored bytes (a 16-byte load is four
// words of eight codes each): STORED as in the checkpoint (code n at bits 4n..4n+3: sign, E1, E0, M from the top),
// or DEVICE, the MoE experts' layout on the GPU (moe_weights repacks each word once at upload: fp4_device_word): the
// same codes with their bits moved so that each bf16 pair of the decode is one rotation and one mask (see
// e2m1_device_pair_bits). Only the bits inside a word move: loads, scales and the MMA order are the same.
enum class Fp4Layout { STORED, DEVICE };

inline constexpr int kWarpSize = 32;
inline constexpr int kTileRows = 16;          // weight rows per warp tile (the MMA's M)
inline constexpr int kTokensPerMma = 8;       // tokens per token tile (the MMA's N)
inline constexpr int kMaxTokenTiles = 8;      // NT <= 8: up to 64 tokens
inline constexpr int64_t kTileKAlignment = 128;
inline constexpr int kXChunk = 8;             // bf16 values per 16-byte chunk of x

template <TileFormat F>
struct TileFormatTraits;
template <>
struct TileFormatTraits<TileFormat::BF16> {
  static constexpr int kValuesPerLoad = 8;
};
template <>
struct TileFormatTraits<TileFormat::FP8_BLOCK128> {
  static constexpr int kValuesPerLoad = 16;
};
template <>
struct TileFormatTraits<TileFormat::MXFP4> {
  static constexpr int kValuesPerLoad = 32;
};
template <>
struct TileFormatTraits<TileFormat::NVFP4> {
  static constexpr int kValuesPerLoad = 32;
};

// Shared-memory row stride (bf16 elements) of an x tile covering k_count inputs.
__host__ __device__ constexpr int x_tile_row_stride(int64_t k_count) {
  return int((k_count + kTileKAlignment - 1) / kTileKAlignment * kTileKAlignment) + 32;
}

// Whether the rows of `w` start 16-byte aligned (data pointer and row pitch), as weight_tile_mma's fast path needs.
__host__ __device__ inline bool weight_rows_aligned(const DeviceMatrixView& w) {
  return (reinterpret_cast<uintptr_t>(w.data) | w.data_row_bytes) % 16 == 0;
}

// Bytes of an x tile for 8·token_tiles tokens × k_count inputs.
__host__ __device__ constexpr size_t x_tile_bytes(int token_tiles, int64_t k_count) {
  return size_t(token_tiles) * kTokensPerMma * size_t(x_tile_row_stride(k_count)) * 2;
}

namespace detail {

// Chunk c of a row (8 k each) → its position in the staged row (the [t][i] → [i][t] transpose of NOTES).
template <TileFormat F>
__device__ __forceinline__ int staged_chunk_index(int c) {
  constexpr int kChunksPerLane = TileFormatTraits<F>::kValuesPerLoad / kXChunk;
  constexpr int kChunksPerStep = 4 * kChunksPerLane;
  const int step = c / kChunksPerStep, within = c % kChunksPerStep;
  return step * kChunksPerStep + (within % kChunksPerLane) * 4 + within / kChunksPerLane;
}

// The 8 bf16 of one chunk in the order the decode of that format emits them.
template <TileFormat F>
__device__ __forceinline__ uint4 permute_chunk(uint4 v) {
  if constexpr (F == TileFormat::MXFP4 || F == TileFormat::NVFP4) {
    // x0 x4 x1 x5 x2 x6 x3 x7: nibble pairs (j, j + 4) share a bf16x2.
    return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                      __byte_perm(v.y, v.w, 0x7632));
  } else if constexpr (F == TileFormat::FP8_BLOCK128) {
    // x0 x2 x1 x3 x4 x6 x5 x7: byte pairs (0, 2) and (1, 3) of a word share a bf16x2.
    return make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632), __byte_perm(v.z, v.w, 0x5410),
                      __byte_perm(v.z, v.w, 0x7632));
  } else {
    return v;
  }
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  const __nv_bfloat162 product =
      __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&product);
}

// Nibbles j and j + 4 of a word of e2m1 → bf16x2 (value × 2^-126): magnitude bits to 6..8, sign to 15.
template <int J>
__device__ __forceinline__ uint32_t e2m1_pair_bits(uint32_t word) {
  constexpr int kMagnitudeShift = 6 - 4 * J, kSignShift = 12 - 4 * J;
  const uint32_t magnitude = kMagnitudeShift >= 0 ? word << kMagnitudeShift : word >> -kMagnitudeShift;
  return (magnitude & 0x01C001C0u) | ((word << kSignShift) & 0x80008000u);
}

// The bits of an e2m1 pair in a bf16x2 (value × 2^-126): per half the sign at 15, the magnitude E1 E0 M at 8..6.
inline constexpr uint32_t kE2m1PairBits = 0x81C081C0u;

// One SHF.L.W on the device (0 < shift < 32).
__host__ __device__ constexpr uint32_t rotate_left(uint32_t word, int shift) {
  return word << shift | word >> (32 - shift);
}

// Pair J of a DEVICE-layout word → bf16x2 (value × 2^-126), the bits e2m1_pair_bits<J> takes from a STORED word
// (codes J and J + 4): pair 0 is the word's bits at kE2m1PairBits, pairs 1 and 2 those of the word rotated left by 13
// and 26, pair 3 those of (word & 0x001B001B) × (2^2 + 2^7 + 2^12), whose three shifted copies of the eight masked
// bits never overlap (no carries). These four bit sets partition the word; the checkpoint order needs ~3
// instructions per pair (shifts, masks, a multiply), this one 1, 2, 2 and 3.
template <int J>
__host__ __device__ constexpr uint32_t e2m1_device_pair_bits(uint32_t word) {
  static_assert(J >= 0 && J < 4, "four pairs per word");
  if constexpr (J == 0)
    return word & kE2m1PairBits;
  else if constexpr (J < 3)
    return rotate_left(word, 13 * J) & kE2m1PairBits;
  else
    return ((word & 0x001B001Bu) * 0x1084u) & kE2m1PairBits;
}

// The STORED bit that DEVICE bit `bit` carries: the decode above sends the bit to one pair bit, which
// e2m1_pair_bits<J> fills from the code bit (M, E0, E1, sign at 6, 7, 8, 15 of a half) of code J or J + 4.
__host__ __device__ constexpr int fp4_device_bit_source(int bit) {
  const uint32_t unit = 1u << bit;
  const uint32_t pairs[4] = {e2m1_device_pair_bits<0>(unit), e2m1_device_pair_bits<1>(unit),
                             e2m1_device_pair_bits<2>(unit), e2m1_device_pair_bits<3>(unit)};
  for (int j = 0; j < 4; ++j)
    for (int p = 0; p < 32; ++p)
      if (pairs[j] >> p & 1u) {
        const int in_half = p % 16, code_bit = in_half == 15 ? 3 : in_half - 6;
        return 4 * j + (p >= 16 ? 16 : 0) + code_bit;
      }
  return -1;
}

// The DEVICE word of a STORED word (the upload's repack): e2m1_device_pair_bits<J>(fp4_device_word(w)) ==
// e2m1_pair_bits<J>(w) for every J and w.
__host__ __device__ constexpr uint32_t fp4_device_word(uint32_t stored) {
  uint32_t device = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int bit = 0; bit < 32; ++bit) device |= (stored >> fp4_device_bit_source(bit) & 1u) << bit;
  return device;
}

// Every DEVICE bit reaches exactly one pair bit, and the 32 carry distinct STORED bits.
static_assert([] {
  uint32_t sources = 0;
  for (int bit = 0; bit < 32; ++bit) {
    const uint32_t unit = 1u << bit;
    const uint32_t all[4] = {e2m1_device_pair_bits<0>(unit), e2m1_device_pair_bits<1>(unit),
                             e2m1_device_pair_bits<2>(unit), e2m1_device_pair_bits<3>(unit)};
    int hits = 0;
    for (const uint32_t pair : all)
      for (int p = 0; p < 32; ++p) hits += int(pair >> p & 1u);
    const int source = fp4_device_bit_source(bit);
    if (hits != 1 || source < 0 || (sources >> source & 1u)) return false;
    sources |= 1u << source;
  }
  return sources == ~0u;
}(), "the DEVICE fp4 layout is a permutation of each word's bits");

// Bytes (0, 2) (H = 0) or (1, 3) (H = 1) of a word of e4m3 → bf16x2 (value × 2^-120): magnitude to 4..10, sign
// to 15.
template <int H>
__device__ __forceinline__ uint32_t e4m3_pair_bits(uint32_t word) {
  if constexpr (H == 0)
    return ((word << 4) & 0x07F007F0u) | ((word << 8) & 0x80008000u);
  else
    return ((word >> 4) & 0x07F007F0u) | (word & 0x80008000u);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// bf16x2 factor (f, f) for an MXFP4 e8m0 code: 2^(code - 127) · 2^126 has exponent field code + 126.
__device__ __forceinline__ uint32_t mxfp4_factor(uint32_t code) { return ((code + 126u) << 7) * 0x00010001u; }

// bf16x2 factors for two NVFP4 e4m3 scale codes: e4m3 · 2^118 (exact, normal for every finite code).
__device__ __forceinline__ void nvfp4_factors(uint16_t codes, uint32_t& factor0, uint32_t& factor1) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes), __NV_E4M3);
  const float2 scale = __half22float2(__half2(raw));
  const __nv_bfloat162 f0 = __float2bfloat162_rn(scale.x * 0x1p118f);
  const __nv_bfloat162 f1 = __float2bfloat162_rn(scale.y * 0x1p118f);
  factor0 = *reinterpret_cast<const uint32_t*>(&f0);
  factor1 = *reinterpret_cast<const uint32_t*>(&f1);
}

// Pair J of a word in layout L → bf16x2 (value × 2^-126).
template <Fp4Layout L, int J>
__device__ __forceinline__ uint32_t e2m1_word_pair(uint32_t word) {
  if constexpr (L == Fp4Layout::DEVICE)
    return e2m1_device_pair_bits<J>(word);
  else
    return e2m1_pair_bits<J>(word);
}

// One lane's 16 stored fp4 bytes of one row → the bf16 pairs' bits (value × 2^-126, no scale) in MMA order:
// bits[4i + J] is pair J of word i (codes 8i + J and 8i + J + 4 of the checkpoint order).
template <Fp4Layout L>
__device__ __forceinline__ void e2m1_row_bits(const uint4& raw, uint32_t (&bits)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t word = word_of(raw, i);
    bits[4 * i + 0] = e2m1_word_pair<L, 0>(word), bits[4 * i + 1] = e2m1_word_pair<L, 1>(word);
    bits[4 * i + 2] = e2m1_word_pair<L, 2>(word), bits[4 * i + 3] = e2m1_word_pair<L, 3>(word);
  }
}

// One lane's 16 stored bytes of one row → bf16 pairs in MMA order: pairs[2m] is a0 (or a1) of MMA m of the step,
// pairs[2m + 1] is a2 (or a3). `factors` are the bf16x2 scale factors (fp4: MXFP4 one, NVFP4 one per 16 values).
template <TileFormat F, Fp4Layout L = Fp4Layout::STORED>
__device__ __forceinline__ void decode_row_bytes(const uint4& raw, uint32_t factor0, uint32_t factor1,
                                                 uint32_t (&pairs)[TileFormatTraits<F>::kValuesPerLoad / 2]) {
  if constexpr (F == TileFormat::BF16) {
    pairs[0] = raw.x, pairs[1] = raw.y, pairs[2] = raw.z, pairs[3] = raw.w;
  } else if constexpr (F == TileFormat::FP8_BLOCK128) {
    constexpr uint32_t kTwoPow120 = 0x7B807B80u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = word_of(raw, i);
      pairs[2 * i] = bf16x2_mul(e4m3_pair_bits<0>(word), kTwoPow120);
      pairs[2 * i + 1] = bf16x2_mul(e4m3_pair_bits<1>(word), kTwoPow120);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t word = word_of(raw, i);
      const uint32_t factor = (F == TileFormat::NVFP4 && i >= 2) ? factor1 : factor0;
      pairs[4 * i + 0] = bf16x2_mul(e2m1_word_pair<L, 0>(word), factor);
      pairs[4 * i + 1] = bf16x2_mul(e2m1_word_pair<L, 1>(word), factor);
      pairs[4 * i + 2] = bf16x2_mul(e2m1_word_pair<L, 2>(word), factor);
      pairs[4 * i + 3] = bf16x2_mul(e2m1_word_pair<L, 3>(word), factor);
    }
  }
}

}  // namespace detail

// Fills the tile for k_count inputs of `tokens` tokens (layout in the contract), zero-filling tokens
// [tokens, padded_tokens) and k [k_count, round_up(k_count, 128)): chunk_of(t, k) returns the 8 bf16 of token t at
// tile inputs k .. k + 7 (k < k_count; zero past k_count), in input order. Called by `thread_count` threads of the
// CTA with distinct thread_idx; the caller synchronises before and after.
template <TileFormat F, class ChunkOf>
__device__ __forceinline__ void stage_x_chunks(ChunkOf chunk_of, int tokens, int padded_tokens, int64_t k_count,
                                               __nv_bfloat16* tile, int thread_idx, int thread_count) {
  const int row_stride = x_tile_row_stride(k_count);
  const int chunks_per_row = (row_stride - 32) / kXChunk;
  for (int i = thread_idx; i < padded_tokens * chunks_per_row; i += thread_count) {
    const int t = i / chunks_per_row, c = i % chunks_per_row;
    const int64_t k = int64_t(c) * kXChunk;
    const uint4 v = t < tokens && k < k_count ? chunk_of(t, k) : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(tile + size_t(t) * row_stride + detail::staged_chunk_index<F>(c) * kXChunk) =
        detail::permute_chunk<F>(v);
  }
}

namespace detail {

// The 8 bf16 of x at source[0 .. 7], zero from index `valid` on: one 16-byte load where the address is aligned and
// the chunk whole, else element by element; through the read-only path, or kCoherent through L2 (stage_x_tile).
template <bool kCoherent = false>
__device__ __forceinline__ uint4 load_x_chunk(const __nv_bfloat16* source, int64_t valid) {
  auto load = [](const auto* address) { return kCoherent ? __ldcg(address) : __ldg(address); };
  if (valid >= kXChunk && reinterpret_cast<uintptr_t>(source) % 16 == 0)
    return load(reinterpret_cast<const uint4*>(source));
  uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < kXChunk; ++e)
    if (e < valid)
      words[e / 2] |= uint32_t(load(reinterpret_cast<const unsigned short*>(source) + e)) << (16 * (e % 2));
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// bf16(source[e] · inv_rms · weight[e]) for e in [0, 8), zero from index `valid` on: the same two fp32 products and
// rounding as run_rms_norm's bf16 output.
__device__ __forceinline__ uint4 load_normed_x_chunk(const float* source, const float* weight, float inv_rms,
                                                     int64_t valid) {
  uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < kXChunk; ++e)
    if (e < valid) {
      float value = __ldg(source + e) * inv_rms;
      value *= __ldg(weight + e);
      words[e / 2] |= uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(value))) << (16 * (e % 2));
    }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

}  // namespace detail

// Stages x[t][k_begin, k_begin + k_count) for t < tokens into the tile (stage_x_chunks). row_of(t) returns
// &x[t][k_begin], so callers can gather rows (MoE token lists). Rows whose address is 16-byte aligned are copied 16
// bytes at a time, others (and a k_count that is not a multiple of 8) element by element. padded_tokens is 8·NT for
// weight_tile_mma (its MMAs read every row), or just `tokens` for readers that skip absent tokens (the streamed
// tiles below). kCoherent: x is read through L2 (rows that other CTAs of the running grid write).
template <TileFormat F, bool kCoherent = false, class RowOf>
__device__ __forceinline__ void stage_x_tile(RowOf row_of, int tokens, int padded_tokens, int64_t k_count,
                                             __nv_bfloat16* tile, int thread_idx, int thread_count) {
  stage_x_chunks<F>([&](int t, int64_t k) { return detail::load_x_chunk<kCoherent>(row_of(t) + k, k_count - k); },
                    tokens, padded_tokens, k_count, tile, thread_idx, thread_count);
}

// Stages the RMS-normalised fp32 rows: tile value = bf16(x[t][k] · inv_rms[t] · weight[k]) for k in
// [k_begin, k_begin + k_count), the same two fp32 products and rounding as run_rms_norm's bf16 output. row_of(t)
// returns &x[t][k_begin], weight points at weight[k_begin], inv_rms[t] (shared memory) comes from
// rms_norm_inverse_rms.
template <TileFormat F, class RowOf>
__device__ __forceinline__ void stage_normed_x_tile(RowOf row_of, const float* weight, const float* inv_rms,
                                                    int tokens, int padded_tokens, int64_t k_count,
                                                    __nv_bfloat16* tile, int thread_idx, int thread_count) {
  stage_x_chunks<F>(
      [&](int t, int64_t k) {
        return detail::load_normed_x_chunk(row_of(t) + k, weight + k, inv_rms[t], k_count - k);
      },
      tokens, padded_tokens, k_count, tile, thread_idx, thread_count);
}

namespace detail {

// One batch of rms_norm_inverse_rms: the calling warp's sums of squares for the (token, owner warp) pairs
// p0 .. p0 + kPairs - 1, each lane's values of a pair loaded kSpan at a time with every load of the batch in flight
// together (a row of up to kSpan values per lane is one L2 round trip), added in element order with fmaf and
// reduced by a butterfly.
template <int kSpan, int kPairs>
__device__ __forceinline__ void sum_squares_batch(const float* x, int64_t row_stride, int width, int owner_threads,
                                                  int owner_warps, int per_lane, int pairs, int p0, float* warp_sums) {
  const int lane = int(threadIdx.x) % kWarpSize;
  float sums[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) sums[q] = 0.0f;
  for (int j0 = 0; j0 < per_lane; j0 += kSpan) {
    float values[kPairs][kSpan];
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      const int p = p0 + q, t = p / owner_warps, v = p % owner_warps;
      const float* row = x + t * row_stride;
#pragma unroll
      for (int j = 0; j < kSpan; ++j) {
        const int i = v * kWarpSize + lane + (j0 + j) * owner_threads;
        values[q][j] = p < pairs && i < width ? row[i] : 0.0f;
      }
    }
    // The zeros past the row add nothing (fmaf(0, 0, sum) = sum, as run_rms_norm's padding).
#pragma unroll
    for (int q = 0; q < kPairs; ++q)
#pragma unroll
      for (int j = 0; j < kSpan; ++j) sums[q] = fmaf(values[q][j], values[q][j], sums[q]);
  }
#pragma unroll
  for (int q = 0; q < kPairs; ++q) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sums[q] += __shfl_xor_sync(0xFFFFFFFFu, sums[q], offset);
    if (lane == 0 && p0 + q < pairs) warp_sums[p0 + q] = sums[q];
  }
}

template <int kSpan, int kPairs>
__device__ __forceinline__ void sum_squares(const float* x, int64_t row_stride, int width, int owner_threads,
                                            int owner_warps, int per_lane, int pairs, float* warp_sums) {
  const int warp = int(threadIdx.x) / kWarpSize, warps = int(blockDim.x) / kWarpSize;
  for (int p0 = warp * kPairs; p0 < pairs; p0 += warps * kPairs)
    sum_squares_batch<kSpan, kPairs>(x, row_stride, width, owner_threads, owner_warps, per_lane, pairs, p0,
                                     warp_sums);
}

}  // namespace detail

// inv_rms[t] = 1 / sqrt(mean(x[t]²) + eps) for t < tokens, x rows of `width` floats row_stride apart, with
// run_rms_norm's summation order (bit-identical): its row owner is a warp (width <= 1024) or a CTA of 256 threads
// (width <= 8192), thread m adding x[m + G·j]² for j = 0, 1, ... with fmaf, then a butterfly within each warp, then
// (CTA owner) the 8 warp sums in warp order. Here each warp of the caller plays those warps in turn, a batch of
// pairs (token, owner warp) at a time with kLoads loads per lane in flight (registers): 32 make a 1024-wide row one
// L2 round trip instead of four; kernels short of registers take 8. warp_sums holds tokens · 8 floats of shared
// memory. Called by the whole CTA (it synchronises); inv_rms is valid after the call.
template <int kLoads>
__device__ __forceinline__ void rms_norm_inverse_rms(const float* x, int64_t row_stride, int width, float eps,
                                                     int tokens, float* warp_sums, float* inv_rms) {
  static_assert(kLoads == 8 || kLoads == 32, "8 or 32 loads in flight per lane");
  constexpr int kRmsWarpRowMaxWidth = 1024;  // rms_norm.cu: a warp owns rows up to this width, a CTA beyond
  constexpr int kRmsCtaThreads = 256;
  const int owner_threads = width <= kRmsWarpRowMaxWidth ? kWarpSize : kRmsCtaThreads;
  const int owner_warps = owner_threads / kWarpSize;
  const int per_lane = (width + owner_threads - 1) / owner_threads;
  const int pairs = tokens * owner_warps;
  if (kLoads == 8 || per_lane <= 8)
    detail::sum_squares<8, kLoads / 8>(x, row_stride, width, owner_threads, owner_warps, per_lane, pairs, warp_sums);
  else if (per_lane <= 16)
    detail::sum_squares<16, 2>(x, row_stride, width, owner_threads, owner_warps, per_lane, pairs, warp_sums);
  else
    detail::sum_squares<32, 1>(x, row_stride, width, owner_threads, owner_warps, per_lane, pairs, warp_sums);
  __syncthreads();
  for (int t = int(threadIdx.x); t < tokens; t += int(blockDim.x)) {
    float sum = 0.0f;
    for (int v = 0; v < owner_warps; ++v) sum += warp_sums[t * owner_warps + v];
    inv_rms[t] = inverse_rms(sum, float(width), eps);
  }
  __syncthreads();
}

// Σ_s partials[s · split_stride] for s = 0 .. splits - 1, added in split order from 0 (the split-K reductions of
// quantized_gemm and of quantized_linear's streamed kernel: deterministic; its register-path kernels add
// the same sums one split at a time), with the loads of up to 8 splits in flight at once (a reduction is a chain of
// L2 round trips otherwise).
__device__ __forceinline__ float sum_splits_in_order(const float* partials, int64_t split_stride, int splits) {
  constexpr int kInFlight = 8;
  float sum = 0.0f;
  for (int s0 = 0; s0 < splits; s0 += kInFlight) {
    float values[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j)
      values[j] = s0 + j < splits ? __ldcg(partials + (s0 + j) * split_stride) : 0.0f;
#pragma unroll
    for (int j = 0; j < kInFlight; ++j)
      if (s0 + j < splits) sum += values[j];
  }
  return sum;
}

// Factor the accumulators still need (see NOTES): NVFP4 global scale · 2^8, 1 otherwise.
template <TileFormat F>
__device__ __forceinline__ float weight_tile_output_scale(const DeviceMatrixView& w) {
  if constexpr (F == TileFormat::NVFP4)
    return w.global_scale * 256.0f;
  else
    return 1.0f;
}

namespace detail {

// One lane's loads for S steps: 16 bytes of each of its two rows per step, plus the scales they need.
template <TileFormat F, int S>
struct WeightBatch {
  uint4 raw[S][2];
  uint32_t scale_codes[S][2];  // fp4, per row: the e8m0 code (MXFP4) or two e4m3 codes (NVFP4)
  float block_scale[S][2];     // FP8: the 128×128 block scale of each step, per row
};

// Where one lane's loads of a warp tile come from.
struct LaneRows {
  const uint8_t* data[2];  // rows g and g + 8 (clamped to the matrix)
  int64_t rows[2];
  const uint8_t* fp8_scales[2];  // FP8: the scale row of each row's 128-row band
  bool fp32_scales;
  bool aligned;            // 16-byte loads possible (uniform over the matrix)
  int64_t row_data_bytes;  // stored bytes of a row holding values (the bytewise path reads no further)
};

template <TileFormat F>
__device__ __forceinline__ LaneRows lane_rows(const DeviceMatrixView& w, int64_t row0) {
  const int g = (threadIdx.x % kWarpSize) / 4;
  LaneRows lane;
  lane.fp32_scales = F == TileFormat::FP8_BLOCK128 && w.scale_type == ScaleType::F32;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lane.rows[r] = min(row0 + g + 8 * r, w.rows - 1);
    lane.data[r] = w.data + lane.rows[r] * int64_t(w.data_row_bytes);
    lane.fp8_scales[r] = F == TileFormat::FP8_BLOCK128
                             ? w.scales + (lane.rows[r] / 128) * w.scales_per_row * (lane.fp32_scales ? 4 : 1)
                             : nullptr;
  }
  lane.aligned = tile::weight_rows_aligned(w);
  lane.row_data_bytes = (w.cols * 16 + TileFormatTraits<F>::kValuesPerLoad - 1) / TileFormatTraits<F>::kValuesPerLoad;
  return lane;
}

// The 16 stored bytes at `offset` of a row, zero past its data: one vector load when aligned, else bytewise.
template <bool kAlignedTile>
__device__ __forceinline__ uint4 load_row_bytes(const uint8_t* row, int64_t offset, const LaneRows& lane) {
  if (kAlignedTile || lane.aligned) return ptx::load_streaming_16B(row + offset);
  uint32_t words[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (offset + i < lane.row_data_bytes) words[i / 4] |= uint32_t(__ldg(row + offset + i)) << (8 * (i % 4));
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Issues the loads of the batch whose first step starts at k0 (steps past k_end load nothing).
template <TileFormat F, int S, bool kAlignedTile>
__device__ __forceinline__ void load_batch(const DeviceMatrixView& w, const LaneRows& lane, int64_t k0, int64_t k_end,
                                           WeightBatch<F, S>& batch) {
  constexpr int kValues = TileFormatTraits<F>::kValuesPerLoad;
  constexpr int kStepK = 4 * kValues;
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int u = 0; u < S; ++u) {
    const int64_t k = k0 + u * kStepK + t * kValues;  // this lane's first k of step u
    const bool valid = k < k_end;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      batch.raw[u][r] =
          valid ? load_row_bytes<kAlignedTile>(lane.data[r], k * 16 / kValues, lane) : make_uint4(0, 0, 0, 0);
      // Codes of steps past k_end stay 0: finite factors for the zero weights there.
      batch.scale_codes[u][r] = 0;
      const uint8_t* row_scales = w.scales + lane.rows[r] * w.scales_per_row;
      if constexpr (F == TileFormat::MXFP4) {
        if (valid) batch.scale_codes[u][r] = __ldg(row_scales + k / 32);
      } else if constexpr (F == TileFormat::NVFP4) {
        // The lane's two 16-value blocks; the second may lie past the row's last block (its values are zero).
        if (valid)
          batch.scale_codes[u][r] =
              kAlignedTile || (lane.aligned && w.scales_per_row % 2 == 0)
                  ? __ldg(reinterpret_cast<const uint16_t*>(row_scales + k / 16))
                  : uint32_t(__ldg(row_scales + k / 16)) |
                        (k / 16 + 1 < w.scales_per_row ? uint32_t(__ldg(row_scales + k / 16 + 1)) << 8 : 0u);
      }
      // FP8: an aligned tile lies in one 128-row band, whose scale serves both rows.
      if constexpr (F == TileFormat::FP8_BLOCK128) {
        if (!kAlignedTile || r == 0) {
          const int64_t block = min(k0 + u * kStepK, k_end - 1) / 128;
          batch.block_scale[u][r] = lane.fp32_scales
                                        ? __ldg(reinterpret_cast<const float*>(lane.fp8_scales[r]) + block)
                                        : e8m0_to_float(__ldg(lane.fp8_scales[r] + block));
        } else {
          batch.block_scale[u][1] = batch.block_scale[u][0];
        }
      }
    }
  }
}

}  // namespace detail

// Optional: asks L2 to fetch the first bytes weight_tile_mma will stream for this warp tile and k range, so a caller
// can overlap that latency with staging x (call it before stage_x_tile; it changes no state a result depends on).
template <TileFormat F>
__device__ __forceinline__ void prefetch_weight_tile(const DeviceMatrixView& w, int64_t row0, int64_t k_begin,
                                                     int64_t k_end) {
  constexpr int kValues = TileFormatTraits<F>::kValuesPerLoad;
  constexpr int kStepK = 4 * kValues;
  constexpr int kPrefetchSteps = 8;  // what the first load batches of weight_tile_mma read
  const detail::LaneRows lane = detail::lane_rows<F>(w, row0);
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int u = 0; u < kPrefetchSteps; ++u) {
    const int64_t k = k_begin + u * kStepK + t * kValues;
    if (k < k_end) {
      ptx::prefetch_l2(lane.data[0] + k * 16 / kValues);
      ptx::prefetch_l2(lane.data[1] + k * 16 / kValues);
    }
  }
}

namespace detail {

// Independent accumulator chains: back-to-back MMAs into one accumulator wait for each other, so few token tiles
// rotate over several partial sums (added at the end).
template <int NT>
inline constexpr int kChains = NT >= 4 ? 1 : 4 / NT;

// One step of a warp tile: decodes the lane's 16 bytes of each row (with their scale codes) and runs the MMAs
// against the staged x of that step. FP8 sums go to the block's partial sums, which are scaled into acc when
// `ends_block`; other formats accumulate in `sums` (added to acc by finish_tile). The lane reads x only for its
// first lane_tiles token tiles (token 8·nt + g exists) and feeds zeros for the others, so a tile staged without
// padding rows is never read past its tokens.
template <TileFormat F, int NT, int C, Fp4Layout L = Fp4Layout::STORED>
__device__ __forceinline__ void multiply_step(const uint4 (&raw)[2], const uint32_t (&scale_codes)[2],
                                              const float (&block_scale)[2], bool ends_block,
                                              const __nv_bfloat16* x_step, int row_stride, int lane_tiles,
                                              float (&sums)[C][NT][4], float (&acc)[NT][4]) {
  constexpr int kValues = TileFormatTraits<F>::kValuesPerLoad;
  constexpr int kMmasPerStep = kValues / 4;  // 4 values per lane per row per MMA
  uint32_t pairs[2][kValues / 2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    uint32_t factor0 = 0, factor1 = 0;
    if constexpr (F == TileFormat::MXFP4) factor0 = mxfp4_factor(scale_codes[r]);
    if constexpr (F == TileFormat::NVFP4) nvfp4_factors(uint16_t(scale_codes[r]), factor0, factor1);
    decode_row_bytes<F, L>(raw[r], factor0, factor1, pairs[r]);
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int chunk = 0; chunk < kMmasPerStep / 2; ++chunk) {
      // Two MMAs' B fragments: chunk `chunk` of this lane, transposed order (4 lanes × 8 values apart).
      const uint4 b = nt < lane_tiles
                          ? *reinterpret_cast<const uint4*>(x_step + nt * kTokensPerMma * row_stride + chunk * 32)
                          : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = 2 * chunk + half;
        const uint32_t a[4] = {pairs[0][2 * m], pairs[1][2 * m], pairs[0][2 * m + 1], pairs[1][2 * m + 1]};
        ptx::mma_m16n8k16_bf16_f32(sums[m % C][nt], a, half == 0 ? b.x : b.z, half == 0 ? b.y : b.w);
      }
    }
  }
  if constexpr (F == TileFormat::FP8_BLOCK128) {
    if (ends_block) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float block_sum = 0.0f;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            block_sum += sums[c][nt][i];
            sums[c][nt][i] = 0.0f;
          }
          acc[nt][i] = fmaf(block_sum, block_scale[i / 2], acc[nt][i]);  // i / 2: row g or g + 8
        }
    }
  }
}

template <int NT, int C>
__device__ __forceinline__ void clear_sums(float (&sums)[C][NT][4]) {
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) sums[c][nt][0] = sums[c][nt][1] = sums[c][nt][2] = sums[c][nt][3] = 0.0f;
}

template <TileFormat F, int NT, int C>
__device__ __forceinline__ void finish_tile(const float (&sums)[C][NT][4], float (&acc)[NT][4]) {
  if constexpr (F != TileFormat::FP8_BLOCK128) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < C; ++c) acc[nt][i] += sums[c][nt][i];
  }
}

// Whether the step starting at step_k closes an FP8 scale block (or the range).
template <TileFormat F>
__device__ __forceinline__ bool step_ends_block(int64_t step_k, int64_t k_end) {
  constexpr int kStepK = 4 * TileFormatTraits<F>::kValuesPerLoad;
  return (step_k + kStepK) % 128 == 0 || step_k + kStepK >= k_end;
}

}  // namespace detail

// acc += W[row0 .. row0 + 16, k_begin .. k_end) · x_tile (k_end - k_begin) × (8·NT tokens); see the contract.
// The calling warp must be converged (mma.sync). S = steps per load batch (2 or 4): each lane has S to 2·S steps
// of 2 × 16 bytes in flight, in registers; 4 needs ~40 more registers per thread than 2. kAlignedTile: see the
// contract (the caller's promise of aligned rows and row0 % 16 == 0). C = independent accumulator chains: the
// default hides the MMA latency at few token tiles; C = 1 saves 4·NT·(default - 1) registers for callers that are
// register bound (e.g. two products per warp). L: the fp4 words' layout (Fp4Layout::DEVICE where the caller's
// upload repacked them, as the MoE experts').
template <TileFormat F, int NT, int S = 2, bool kAlignedTile = false, int C = detail::kChains<NT>,
          Fp4Layout L = Fp4Layout::STORED>
__device__ __forceinline__ void weight_tile_mma(const DeviceMatrixView& w, int64_t row0, int64_t k_begin,
                                                int64_t k_end, const __nv_bfloat16* x_tile, float (&acc)[NT][4]) {
  static_assert(NT >= 1 && NT <= kMaxTokenTiles, "8 to 64 tokens per warp tile");
  static_assert(S == 2 || S == 4, "2 or 4 steps per load batch");
  constexpr int kStepK = 4 * TileFormatTraits<F>::kValuesPerLoad;  // k per step: 4 lanes × 16 bytes of a row
  constexpr int kBatchK = S * kStepK;

  const int lane_idx = threadIdx.x % kWarpSize, g = lane_idx / 4, t = lane_idx % 4;
  const int row_stride = x_tile_row_stride(k_end - k_begin);
  const detail::LaneRows lane = detail::lane_rows<F>(w, row0);
  // Lane (g, t) reads token g of each token tile, chunk t of each group of four (the transposed order).
  const __nv_bfloat16* x_lane = x_tile + g * row_stride + t * kXChunk;
  static_assert(C >= 1, "at least one accumulator chain");
  float sums[C][NT][4];  // FP8: sums of the current 128-wide scale block; else partial sums
  detail::clear_sums<NT, C>(sums);

  // Software pipeline: the next batch's loads are in flight while this one is decoded and multiplied.
  detail::WeightBatch<F, S> batch;
  detail::load_batch<F, S, kAlignedTile>(w, lane, k_begin, k_end, batch);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBatchK) {
    detail::WeightBatch<F, S> next;
    if (k0 + kBatchK < k_end) detail::load_batch<F, S, kAlignedTile>(w, lane, k0 + kBatchK, k_end, next);
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int64_t step_k = k0 + u * kStepK;
      if (step_k >= k_end) break;
      detail::multiply_step<F, NT, C, L>(batch.raw[u], batch.scale_codes[u], batch.block_scale[u],
                                   detail::step_ends_block<F>(step_k, k_end), x_lane + (step_k - k_begin), row_stride,
                                   NT, sums, acc);
    }
    batch = next;
  }
  detail::finish_tile<F, NT, C>(sums, acc);
}

// ---------------------------------------------------------------------------------------------------------------
// Streamed warp tiles: the same product with the weight brought into shared memory by the tensor copy engine (TMA).
//
// Contract (in addition to the one above): the warp tile lies wholly inside the matrix (row0 + 16 <= rows), and
// streamed_tile_applies(w) holds (16-byte aligned rows and scales, K a multiple of stage_k(F), fp4 scale rows
// whose stage slices are 16-byte aligned); k ranges start and end on multiples of stage_k(F). The x tile may hold
// only the real tokens (stage_x_tile with padded_tokens = tokens): rows of absent tokens are never read. The
// matrix's tensor maps come from encode_stream_maps (by value in kernel parameters, or in global memory).
//
// NOTES:
// - Each warp owns a ring of `slots` stages in shared memory. A stage is 256 stored bytes of each of the warp's 16
//   rows (stage_k(F) inputs: 512 fp4, 256 FP8, 128 BF16) plus their fp4 scales: two 128-byte-wide boxes of the
//   data map (128-byte swizzle) and one box of the scale map, three TMA instructions from one lane, completing on
//   the slot's mbarrier. The copy engine keeps up to `slots` stages per warp in flight without registers, and the
//   warp spends a handful of instructions per 4 KB stage on it (one bulk copy per row cost ~300: the copy takes
//   warp-uniform operands, so per-lane addresses become a loop).
// - Bank conflicts: a quarter-warp reads 4 consecutive 16-byte chunks of two rows. The 128-byte swizzle XORs the
//   chunk index with the row's low 3 bits, so MMA row g is mapped to tile row stream_row(g), which puts the two rows
//   of a quarter-warp 4 apart (chunk sets XOR 4: disjoint banks). The outputs follow the same mapping.
// - Equal stage bytes for every format let one ring serve experts of different formats.
// - The warp is both producer and consumer of its ring: __syncwarp after the last read of a slot orders those reads
//   before the copy that refills it, so no "empty" barrier is needed and warps never wait for each other.
namespace stream {

inline constexpr int kRowBytes = 256;  // stored bytes of one row per stage
inline constexpr int kBoxBytes = 128;  // the 128-byte swizzle's box width
inline constexpr int kHalfBytes = kTileRows * kBoxBytes;
inline constexpr int kMaxSlots = 4;
inline constexpr int kMaxBlocksPerStage = 2;  // FP8: 128-wide scale blocks per stage
inline constexpr int kSlotBytes = 5 * 1024;   // 4 KB of data, up to 512 bytes of scales; 1 KB multiple (swizzle)
inline constexpr int kSlotAlignment = 1024;

__host__ __device__ constexpr int values_per_load(TileFormat f) {
  return f == TileFormat::BF16 ? 8 : f == TileFormat::FP8_BLOCK128 ? 16 : 32;
}
// Inputs per stage, and scale bytes of one row per stage (fp4: 16 or 32, so the slices stay 16-byte aligned).
__host__ __device__ constexpr int64_t stage_k(TileFormat f) { return int64_t(kRowBytes) * values_per_load(f) / 16; }
__host__ __device__ constexpr int stage_scale_bytes(TileFormat f) {
  return f == TileFormat::MXFP4 ? int(stage_k(f) / 32) : f == TileFormat::NVFP4 ? int(stage_k(f) / 16) : 0;
}
// The slot one format needs: 4 KB of data, plus 1 KB for fp4 scales (a 1 KB multiple keeps the swizzled boxes
// aligned). kSlotBytes serves every format (rings shared across formats); a single-format ring may pack tighter.
__host__ __device__ constexpr int slot_bytes(TileFormat f) {
  return stage_scale_bytes(f) > 0 ? kSlotBytes : kRowBytes * kTileRows;
}

// Whether the streamed tiles can read `w` (16-byte aligned rows and scale slices; see the contract).
__host__ __device__ inline bool streamed_tile_applies(const DeviceMatrixView& w, TileFormat f) {
  if (!weight_rows_aligned(w) || w.cols % stage_k(f) != 0 || w.rows % kTileRows != 0) return false;
  if (f == TileFormat::MXFP4 || f == TileFormat::NVFP4)
    return reinterpret_cast<uintptr_t>(w.scales) % 16 == 0 && w.scales_per_row % 16 == 0;
  return true;
}

// The tile row (0..15) that MMA row r (g or g + 8) reads and writes: see NOTES (bank conflicts).
__host__ __device__ constexpr int stream_row(int r) { return (r & 8) | ((r >> 1) & 3) | ((r & 1) << 2); }

// One matrix's tensor maps: the data as [rows][stored bytes] in 128 × 16 boxes with the 128-byte swizzle, the fp4
// scales as [rows][scales_per_row] in boxes of one stage's scales × 16 rows.
struct StreamMaps {
  CUtensorMap data;
  CUtensorMap scales;
};

inline StreamMaps encode_stream_maps(const DeviceMatrixView& w, TileFormat f, std::string_view what) {
  StreamMaps maps;
  maps.data = sm90::encode_tensor_map_2d({.type = CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                          .base = w.data,
                                          .cols = uint64_t(w.cols * 16 / values_per_load(f)),
                                          .rows = uint64_t(w.rows),
                                          .row_stride_bytes = uint64_t(w.data_row_bytes),
                                          .box_cols = kBoxBytes,
                                          .box_rows = kTileRows,
                                          .swizzle = CU_TENSOR_MAP_SWIZZLE_128B},
                                         what);
  maps.scales = maps.data;  // unused without per-row scales
  if (stage_scale_bytes(f) > 0)
    maps.scales = sm90::encode_tensor_map_2d({.type = CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                              .base = w.scales,
                                              .cols = uint64_t(w.scales_per_row),
                                              .rows = uint64_t(w.rows),
                                              .row_stride_bytes = uint64_t(w.scales_per_row),
                                              .box_cols = uint32_t(stage_scale_bytes(f)),
                                              .box_rows = kTileRows,
                                              .swizzle = CU_TENSOR_MAP_SWIZZLE_NONE},
                                             what);
  return maps;
}

// The first 1 KB-aligned address at or after `smem` (the swizzled boxes need it); kernels reserve kSlotAlignment
// extra bytes of dynamic shared memory for it.
__device__ __forceinline__ uint8_t* align_slots(uint8_t* smem) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return smem + ((kSlotAlignment - address % kSlotAlignment) % kSlotAlignment);
}

// One lane initialises the warp's slot barriers (one arrival each: the lane that posts the byte count).
__device__ __forceinline__ void init_ring(uint64_t* full, int slots) {
  if (threadIdx.x % kWarpSize == 0) {
    for (int s = 0; s < slots; ++s) sm90::mbarrier_init(full + s, 1);
    sm90::fence_mbarrier_init();
  }
}

// Starts the copies of the stage at k0 (stage_k(F) inputs of rows row0..row0 + 15) into `slot`; called by the
// whole warp (lane 0 issues).
template <TileFormat F>
__device__ __forceinline__ void issue_stage(const StreamMaps* maps, int64_t row0, int64_t k0, uint8_t* slot,
                                            uint64_t* full) {
  constexpr int kScaleBytes = stage_scale_bytes(F);
  if (threadIdx.x % kWarpSize != 0) return;
  sm90::mbarrier_arrive_expect_tx(full, kTileRows * (kRowBytes + kScaleBytes));
  const int32_t byte0 = int32_t(k0 * 16 / values_per_load(F)), row = int32_t(row0);
  sm90::tma_load_2d(slot, &maps->data, full, byte0, row);
  sm90::tma_load_2d(slot + kHalfBytes, &maps->data, full, byte0 + kBoxBytes, row);
  if constexpr (kScaleBytes > 0)
    sm90::tma_load_2d(slot + 2 * kHalfBytes, &maps->scales, full, int32_t(k0 / (stage_k(F) / kScaleBytes)), row);
}

// FP8: the stored words of the stage at k0's block scales (the 128-wide blocks of the tile's 128-row band: fp32 bits
// or e8m0 codes), and their values. Apart so that a caller may issue the loads early and convert them later, where its
// warp would otherwise stall on them (the linear's stage 0, quantized_linear.cuh: round s19-1, H200 trace, wq_b x
// staged to stage 0's data 0.80 -> 0.42 us).
struct StageScaleWords {
  uint32_t words[kMaxBlocksPerStage];
};
template <TileFormat F>
__device__ __forceinline__ StageScaleWords load_stage_scale_words(const DeviceMatrixView& w, int64_t row0, int64_t k0) {
  StageScaleWords s{};
  if constexpr (F == TileFormat::FP8_BLOCK128) {
    const int64_t offset = (row0 / 128) * w.scales_per_row + k0 / 128;
#pragma unroll
    for (int b = 0; b < kMaxBlocksPerStage; ++b)
      s.words[b] = w.scale_type == ScaleType::F32 ? __ldg(reinterpret_cast<const uint32_t*>(w.scales) + offset + b)
                                                  : uint32_t(__ldg(w.scales + offset + b));
  }
  return s;
}
template <TileFormat F>
__device__ __forceinline__ void stage_scale_values(const DeviceMatrixView& w, const StageScaleWords& s,
                                                   float (&scales)[kMaxBlocksPerStage]) {
  if constexpr (F == TileFormat::FP8_BLOCK128) {
#pragma unroll
    for (int b = 0; b < kMaxBlocksPerStage; ++b)
      scales[b] = w.scale_type == ScaleType::F32 ? __uint_as_float(s.words[b]) : e8m0_to_float(uint8_t(s.words[b]));
  }
}

// The FP8 block scales of the stage at k0, read before waiting for the stage so their latency overlaps the wait.
template <TileFormat F>
__device__ __forceinline__ void load_stage_block_scales(const DeviceMatrixView& w, int64_t row0, int64_t k0,
                                                        float (&scales)[kMaxBlocksPerStage]) {
  stage_scale_values<F>(w, load_stage_scale_words<F>(w, row0, k0), scales);
}

// acc/sums += the stage in `slot` × x (x_stage: the lane's x at the stage's first input, as weight_tile_mma's x_lane).
// Accumulator rows follow stream_row (see NOTES); L as for weight_tile_mma.
template <TileFormat F, int NT, int C, Fp4Layout L = Fp4Layout::STORED>
__device__ __forceinline__ void multiply_stage(const uint8_t* slot, const __nv_bfloat16* x_stage, int row_stride,
                                               int lane_tiles, const float (&block_scales)[kMaxBlocksPerStage],
                                               float (&sums)[C][NT][4], float (&acc)[NT][4]) {
  constexpr int kValues = values_per_load(F), kStepK = 4 * kValues, kSteps = kRowBytes / 64;
  constexpr int kScaleBytes = stage_scale_bytes(F);
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int rows[2] = {stream_row(g), stream_row(g + 8)};
  const uint8_t* scales = slot + 2 * kHalfBytes;
#pragma unroll
  for (int u = 0; u < kSteps; ++u) {
    // Step u is 64 bytes of each row: half u / 2 of the stage, chunks 4·(u % 2) + t, swizzled by the row.
    const int chunk = ((u & 1) << 2) | t;
    uint4 raw[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
      raw[r] = *reinterpret_cast<const uint4*>(slot + (u >> 1) * kHalfBytes + rows[r] * kBoxBytes +
                                               ((chunk ^ (rows[r] & 7)) << 4));
    uint32_t codes[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The lane's 32 values of step u start at input u·kStepK + 32t of the stage: one MXFP4 block, two NVFP4 ones.
      if constexpr (F == TileFormat::MXFP4) codes[r] = scales[rows[r] * kScaleBytes + 4 * u + t];
      if constexpr (F == TileFormat::NVFP4)
        codes[r] = *reinterpret_cast<const uint16_t*>(scales + rows[r] * kScaleBytes + 2 * (4 * u + t));
    }
    const float block = F == TileFormat::FP8_BLOCK128 ? block_scales[(u * kStepK) / 128] : 1.0f;
    const float block_scale[2] = {block, block};
    detail::multiply_step<F, NT, C, L>(raw, codes, block_scale, (u + 1) * kStepK % 128 == 0, x_stage + u * kStepK,
                                    row_stride, lane_tiles, sums, acc);
  }
}

}  // namespace stream

}  // namespace dsv4::cuda::tile
