// Device code behind indexer.hpp: the warp-level reference rounding of indexer vectors (also used by the
// compressor's epilogue for new indexer keys), the query preparation kernel, the score kernels (bf16 and fp8 keys,
// optionally selecting the top-k in their last CTA) and the fused scores + top-k's score source (ComputedScores).
//
// NOTES (scores):
// - The score kernel puts keys on the MMA's M side (16 keys per m-tile) and heads on N (8 per n-tile, padded with
//   zero heads), so the head sum Σ_h w_h·ReLU(·) is a sum along a fragment row: per thread over its 2 columns ×
//   n-tiles, then over the 4 lanes of a quad. A warp owns one 16-key tile at a time and all heads, and loads its next
//   tile into registers before multiplying the current one.
// - The dot product's reduction order over head_dim is free, so both operands use the same permutation of it: a
//   lane's 16-byte load of a key row (8 consecutive dims) is directly its A fragment for two k16 steps, and the query
//   fragments in shared memory use the identical map. Key rows therefore stream from global memory with coalesced
//   16-byte loads, all of a warp tile in flight before the first MMA, and no shared-memory staging of keys.
// - Query fragments sit in shared memory in fragment order ([query][n-tile][dim pair][lane] uint4): conflict-free.
// - The fp32 sum over head_dim runs in two chains (even and odd k16 steps) added at the end of each n-tile: the
//   MMAs of one chain are then never back to back.
// - fp8 keys (indexer_scores_kernel<…, kFp8 = true>, WarpKeyTile): the same structure on mma.m16n8k32 e4m3. A warp keeps two tiles ahead
//   in flight (the bf16 kernel's 128 bytes per lane; two 32-key tiles would spill); the per-key and per-head scales
//   are powers of two and positive, so they come out of the ReLU: the head's scale joins its weight, the key's scale
//   multiplies the finished sum.
// - Top-k in the launch (kSelect, IndexerTopKMethod::LastCta, ≤ 2048 keys): the CTA that takes a query group's last
//   ticket reads the group's finished score rows back through L2 and sorts them (select_top_k_in_last_cta); the
//   ticket lives in the top-k's zeroed workspace and is zeroed again by that CTA.
// - Warpgroup variant (indexer_scores_wgmma_kernel, IndexerScoresKernel::Warpgroup): mma.sync runs at about half
//   the tensor rate on Hopper, and the e4m3 m16n8k32 is no faster per product than bf16, so at 64 heads × 128 dims
//   per key its issue is a bound near the key bytes' (bf16 at 1M keys: 24 µs against a 16 µs byte floor; fp8 with
//   half the bytes no faster). The warpgroup MMA (m64n64, heads padded to 64 on
//   N) takes each warp's key rows straight from the registers the key loads fill (the A fragment is mma.sync's, so
//   the loads and their dim permutation are the warp kernel's) and the queries from shared memory: K-major in the
//   128-byte swizzle, with head_dim permuted exactly as the keys' fragments permute it. A warpgroup owns a 64-key
//   tile (16 rows per warp) and keeps the next tile's keys in flight while its MMAs run. Measured (H200, T = 1):
//   fp8 1.2-1.8× the mma.sync kernel (256K keys: 13.7 µs, 61 % of its byte floor), bf16 0.8-0.96× (its own key
//   bytes bind there, and mma.sync was not far from them). The SASS copies the fp8 tiles ahead down a queue at the
//   top of each iteration, a copy that waits for the loads it reads, so a warp has about one tile in flight, not
//   two. More in flight lost (session 19, H200, 256K keys): a ring of three tiles rotated by unrolling, the copies
//   into the MMA's register quads placed at the MMA, 14.6 µs; four tiles (heads in two m64n32 passes) 15.7; the
//   queue 13.5. Latency is not what binds it.
// - Streamed warpgroup variant (indexer_scores_streamed_kernel, IndexerScoresKernel::WarpgroupStreamed), bf16 keys
//   only: the register-fed kernel keeps only one bf16 tile ahead per warpgroup, the registers' limit. Here each
//   warpgroup streams its key tiles through a ring of shared-memory stages (cp.async, 16 bytes per copy, placed in the
//   128-byte swizzle so that wgmma reads A from shared memory), kStreamStages − 1 tiles in flight; both operands use
//   the natural dim order. One CTA per SM, 4 stages of 16 KB (H200, T = 1: 1M keys 21.4 µs = 75 % of the byte floor
//   against 24.7 for mma.sync and 25.3 register-fed; 64K keys 4.5 against 6.1 / 7.2). An fp8 variant lost at 1M
//   (16.2 against 13.7 µs register-fed: the per-tile epilogue of two warpgroups per SM binds where the tiles are half
//   the bytes) and was removed; fp8 keys use the register-fed kernel.
// - Staged fp8 variant (indexer_scores_staged_kernel, IndexerScoresKernel::WarpgroupStreamed with fp8 keys, of one
//   sequence or through sequence_slots): one thread per warpgroup brings each 64-key tile (8 KB) into a ring stage with
//   one TMA load in the 128B swizzle, completing on the stage's mbarrier, kStagedStages − 1 tiles ahead; the wgmma
//   reads both operands from shared memory (m64n64k32, the queries in the natural dim order), so a tile costs no key
//   loads, fragment copies or ldmatrix in the warps. Two CTAs per SM, as the register-fed kernel (the cp.async fp8
//   variant above had one). The key scales (one per stored row) are loaded a tile ahead. Through sequence_slots one
//   tensor map spans every slot's rows (IndexerScoresParams::slot_count). Measured (H200, session 20): 1M keys T = 1
//   12.27 µs = 69 % of the byte floor against 13.74 register-fed; 64K 3.72 against 4.78. Lost: deeper rings (again: one
//   tile ahead is best), each warpgroup on a contiguous run of tiles (1M 13.14 against 12.94 interleaved at 3 stages),
//   three CTAs per SM (13.03). In exact e4m3 numerics its per-step rounding may differ from the register-fed kernel's
//   (head_dim in another order); in reference numerics (exact sums) the two agree bit for bit. Session 21 (bench
//   --trace: each warpgroup's timeline, 1M T = 1): the prologue took 2.7 µs from the grid wait to the CTA barrier (a
//   load-then-store loop over the query operands: one L2 round trip per 8-byte unit), the first tile then landing 0.3
//   µs later, each next one 1.07 µs (its 8 KB, ~95 % of the copy rate over 528 warpgroups), the end 0.6 µs after the
//   last; with each query's units loaded before any is stored (load_query_operand_tiles): 1M 12.35 → 11.80 µs = 71 %
//   (the streamed bf16 kernel 21.19 → 20.24 = 79 %), 64K 3.56 → 3.06, 1M T = 8 56.40 → 52.54. Lost or level: the first
//   tiles asked of L2 before the grid wait from the positions as they stand (1M 11.97 against 11.80; two tiles 13.09),
//   the first load issued from that hint before this step's positions (11.81), an L2 prefetch one tile past each refill
//   (13.90 against 12.41). The tail: 8-tile warpgroups end 0.6 µs after 7-tile ones (4096 tiles over 528), SMs hold
//   28-32 tiles.
// - Every score kernel bounds its key loads, the first tiles' included, by the most keys its CTA's queries see
//   (cta_visible_keys), not by key_count: the model passes the buffer's capacity, and a short context in a 1M
//   buffer read about 12.7 MB of unseen keys per call before session 20.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "backends/cuda/kernels/indexer.hpp"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/kernels/top_k.cuh"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/mma.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "backends/cuda/ptx/warp_trace.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "core/activation_block_scale.hpp"
#include "core/bf16.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda::indexer {

inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();
inline constexpr int kFp4Block = 32;  // values per ue8m0 scale of the indexer's fp4 rounding

// Lane l holds x[kPerLane·l, kPerLane·(l+1)) of a 32·kPerLane vector. x ← H x / √n in Sylvester order, with the
// butterflies in the CPU's stage order (distance 1, 2, 4, ...), so the fp32 results are the CPU's bit for bit.
template <int kPerLane>
__device__ __forceinline__ void warp_hadamard(float (&v)[kPerLane], int lane) {
#pragma unroll
  for (int h = 1; h < kPerLane; h *= 2) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
#pragma unroll
  for (int m = 1; m < 32; m *= 2) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float partner = __shfl_xor_sync(kFullMask, v[i], m);
      v[i] = upper ? partner - v[i] : v[i] + partner;
    }
  }
  const float norm = 1.0f / sqrtf(static_cast<float>(32 * kPerLane));
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] *= norm;
}

// round_indexer_reference on a warp-held vector: Hadamard, bf16, then fp4 e2m1 with a ue8m0 scale per 32 values.
template <int kPerLane>
__device__ __forceinline__ void warp_round_indexer_reference(float (&v)[kPerLane], int lane) {
  warp_hadamard<kPerLane>(v, lane);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    v[i] = round_to_bf16(v[i]);
    amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int m = 1; m < kFp4Block / kPerLane; m *= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, m));
  const float scale = e8m0_to_float(e2m1_block_scale_code(amax));
  // scale is a power of two ≥ 2^-126: its reciprocal is exact, and x · (1/scale) is x / scale's correctly rounded
  // value (the same bits) without a division per value.
  const float inverse = 1.0f / scale;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = round_to_bf16(e2m1_to_float(float_to_e2m1(v[i] * inverse)) * scale);
}

// The fp8 operand of a warp-held vector: its bf16-rounded values (the bf16 operand, unchanged in reference numerics)
// quantised with one power-of-two scale by DeepSeek's fp8 block rule s = 2^ceil(log2(max(amax, 1e-4) / 448)),
// code = e4m3(x / s). Fp4-rounded vectors (reference numerics) are then held exactly unless their 32-blocks' scales
// span more than 2^14. Returns s; codes[i] is the lane's value i.
template <int kPerLane>
__device__ __forceinline__ float warp_quantize_fp8(const float (&v)[kPerLane], uint8_t (&codes)[kPerLane]) {
  float rounded[kPerLane];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    rounded[i] = round_to_bf16(v[i]);
    amax = fmaxf(amax, fabsf(rounded[i]));
  }
#pragma unroll
  for (int m = 1; m < 32; m *= 2) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, m));
  const float scale = e8m0_to_float(e4m3_block_scale_code(amax));
  const float inverse = 1.0f / scale;  // a power of two ≥ 2^-22: exact, as x · inverse = x / scale
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) codes[i] = float_to_e4m3(rounded[i] * inverse);
  return scale;
}

// RoPE on the last rope_dim dims of a warp-held vector (lane l holds dims kPerLane·l ..), pairs (2j, 2j+1), with the
// factors of pair j from factors(j).
template <int kPerLane, class Factors>
__device__ __forceinline__ void warp_apply_rope(float (&v)[kPerLane], int lane, int head_dim, int rope_dim,
                                                Factors&& factors) {
  const int rope_begin = head_dim - rope_dim;
  float original[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) original[i] = v[i];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int dim = kPerLane * lane + i;
    // Pairs (2j, 2j+1) are in one lane when it holds ≥ 2 values; with one value per lane the partner is lane ^ 1.
    const float partner = kPerLane >= 2 ? original[i ^ 1] : __shfl_xor_sync(kFullMask, original[i], 1);
    if (dim >= rope_begin) {
      const bool even = (dim & 1) == 0;
      float x0 = even ? original[i] : partner, x1 = even ? partner : original[i];
      rope_rotate_pair(x0, x1, factors((dim - rope_begin) / 2), false);
      v[i] = even ? x0 : x1;
    }
  }
}

struct PrepareArgs {
  const float* input;
  int64_t input_row_stride;
  __nv_bfloat16* output;
  uint8_t* output_fp8;
  float* output_scales;
  int64_t rows;
  int64_t heads;
  const int64_t* positions;
  const float* rope_frequencies;
  const float2* rope_table;
  int rope_dim;
  bool reference_rounding;
};

inline constexpr int kPrepareWarps = 8;

// The kernel's view of IndexerPrepareParams (checked by check_indexer_prepare_params): also the compressor's, which
// can run the preparation in its own launch (run_compressors with an IndexerPrepareParams).
inline PrepareArgs prepare_args(const IndexerPrepareParams& p) {
  return PrepareArgs{.input = p.input,
                     .input_row_stride = p.input_row_stride > 0 ? p.input_row_stride : p.heads * p.head_dim,
                     .output = p.output,
                     .output_fp8 = p.output_fp8,
                     .output_scales = p.output_scales,
                     .rows = p.tokens * p.heads,
                     .heads = p.heads,
                     .positions = p.positions,
                     .rope_frequencies = p.rope_frequencies,
                     .rope_table = p.rope_table,
                     .rope_dim = int(p.rope_dim),
                     .reference_rounding = p.reference_rounding};
}

// One vector (row < rows) by one warp: RoPE on the last rope_dim dims (factors from the table, else by sincos), then
// the rounding, then bf16 (or fp8 + scale) out. Its input and positions are earlier kernels' outputs: call after
// wait_for_prior_grids.
template <int kHeadDim>
__device__ __forceinline__ void prepare_row(const PrepareArgs& args, int64_t row, int lane) {
  constexpr int kPerLane = kHeadDim / 32;
  const float* in =
      args.input + row / args.heads * args.input_row_stride + row % args.heads * kHeadDim + kPerLane * lane;
  float v[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = in[i];
  if (args.rope_table != nullptr) {
    const int64_t position = args.positions[row / args.heads];
    warp_apply_rope<kPerLane>(v, lane, kHeadDim, args.rope_dim, [&](int pair) {
      return rope_table_factors(args.rope_table, args.rope_dim / 2, position, pair);
    });
  } else if (args.rope_frequencies != nullptr) {
    const int64_t position = args.positions[row / args.heads];
    warp_apply_rope<kPerLane>(v, lane, kHeadDim, args.rope_dim,
                              [&](int pair) { return rope_factors(position, args.rope_frequencies[pair]); });
  }
  if (args.reference_rounding) warp_round_indexer_reference<kPerLane>(v, lane);
  if (args.output_fp8 != nullptr) {
    uint8_t codes[kPerLane];
    const float scale = warp_quantize_fp8<kPerLane>(v, codes);
    uint8_t* out = args.output_fp8 + row * kHeadDim + kPerLane * lane;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) out[i] = codes[i];
    if (lane == 0) args.output_scales[row] = scale;
    return;
  }
  __nv_bfloat16* out = args.output + row * kHeadDim + kPerLane * lane;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[i] = __float2bfloat16_rn(v[i]);
}

// One warp per vector. A programmatic dependent: its input and positions are earlier kernels' outputs, so it waits
// for them at entry.
template <int kHeadDim>
__global__ void __launch_bounds__(kPrepareWarps * 32) indexer_prepare_kernel(PrepareArgs args) {
  allow_dependents();
  wait_for_prior_grids();
  const int64_t row = int64_t(blockIdx.x) * kPrepareWarps + (threadIdx.x >> 5);
  if (row < args.rows) prepare_row<kHeadDim>(args, row, int(threadIdx.x & 31));
}

struct ScoresArgs {
  const __nv_bfloat16* q;     // prepared bf16 queries, or
  const uint8_t* q_fp8;       // prepared fp8 queries with q_scales, or
  const float* q_scales;
  const float* head_weights;
  int64_t head_weights_row_stride;
  const __nv_bfloat16* keys;  // bf16 keys, or
  const uint8_t* keys_fp8;    // fp8 keys with key_scales
  const float* key_scales;
  int64_t key_scales_slot_stride;
  int64_t key_count;
  const int32_t* sequence_slots;
  int64_t keys_slot_stride;
  const int64_t* positions;
  int64_t tokens;
  int heads;
  int64_t ratio;
  float* scores;
  int64_t score_stride;
  int queries_per_cta;
  float weight_scale;  // head_dim^-0.5 · heads^-0.5, as the CPU forms it
  // The top-k inside the launch (IndexerTopKMethod::LastCta; kernels instantiated with kSelect): run_top_k's outputs.
  int top_k;
  int32_t* selected;
  int32_t* counts;
  int32_t* nan_flag;
  topk::QueryWorkspace* tickets;  // the top-k's workspace: query group g's ticket is tickets[g].finished_ctas
};

// Queries sharing one CTA's key loads (of one sequence); the warpgroup kernels' shared memory holds this many.
inline constexpr int kMaxQueriesPerCta = 4;

inline constexpr int kScoreWarps = 8;
// The register budget of __launch_bounds__ below. The kernels that select the top-k (kSelect) run at ≤ 2048 keys,
// a few CTAs per query group, and take a CTA's whole register file instead (128 registers spilled there).
inline constexpr int kScoreCtasPerSm = 2;
inline constexpr int kKeysPerWarpTile = 16;  // one m16 tile

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// mma.m16n8k32 with e4m3 A and B (PTX ISA, sm_89+): a0/a2 = A[g][4t..4t+3] / A[g][16+4t..], a1/a3 the same of row
// g+8; b0/b1 = B[4t..4t+3][g] / B[16+4t..][g]; the lower k in the lower byte; c as in m16n8k16.
__device__ __forceinline__ void mma_e4m3_16832(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Heads padded to whole n-tiles of 8 (the padding heads have zero q and zero weight).
__host__ __device__ inline int padded_heads(int heads) { return (heads + 7) / 8 * 8; }

// Shared memory per CTA: query fragments (bf16: 2 bytes per dim, fp8: 1), the scaled head weights and each query's
// visible key count.
struct ScoresSmemLayout {
  size_t weights_offset, visible_offset, bytes;
};

__host__ __device__ inline ScoresSmemLayout scores_smem_layout(int queries_per_cta, int heads, int head_dim,
                                                               bool fp8) {
  const size_t padded = size_t(padded_heads(heads)), queries = size_t(queries_per_cta);
  ScoresSmemLayout layout{};
  layout.weights_offset = queries * padded * size_t(head_dim) * (fp8 ? 1 : 2);
  layout.visible_offset = layout.weights_offset + queries * padded * 4;
  layout.bytes = layout.visible_offset + queries * 8;
  return layout;
}

// Byte offset of dim d of head h (query `query`) in the query fragments.
// bf16, [query][n-tile][dim pair of 32][lane] uint4: lane (h % 8, quad) holds dims 32·pair + 8·quad .. +8.
// fp8, [query][n-tile][k32 step][lane] uint2 = (b0, b1) of that step: with W = min(64, head_dim) dims per key load,
// step t = u·(W/32) + s holds in b0 dims u·W + quad·(W/4) + 8·s + 0..3 and in b1 the next 4 — the same map as the
// keys' A fragments (load_fp8_key_tile), so both operands permute head_dim identically.
template <int kHeadDim, bool kFp8>
__device__ __forceinline__ size_t query_fragment_offset(int query, int n_tiles, int head, int dim) {
  const int n_tile = head >> 3, group = head & 7;
  if constexpr (kFp8) {
    constexpr int kW = kHeadDim < 64 ? kHeadDim : 64;
    const int unit = dim / kW, r = dim % kW, quad = r / (kW / 4), r2 = r % (kW / 4);
    const int step = unit * (kW / 32) + r2 / 8;
    const size_t fragment = (size_t(query * n_tiles + n_tile) * (kHeadDim / 32) + step) * 32 + group * 4 + quad;
    return fragment * 8 + size_t(r2 % 8);
  } else {
    const int pair = dim / 32, quad = (dim % 32) / 8;
    const size_t fragment = (size_t(query * n_tiles + n_tile) * (kHeadDim / 32) + pair) * 32 + group * 4 + quad;
    return fragment * 16 + size_t(dim % 8) * 2;
  }
}

// Stores a lane's kPerLane consecutive operand bytes (all within one 4-byte word of a fragment) in one access.
template <int kBytes>
__device__ __forceinline__ void store_fragment_bytes(unsigned char* address, const uint8_t (&bytes)[kBytes]) {
  if constexpr (kBytes == 8) {
    uint2 v;
    v.x = uint32_t(bytes[0]) | uint32_t(bytes[1]) << 8 | uint32_t(bytes[2]) << 16 | uint32_t(bytes[3]) << 24;
    v.y = uint32_t(bytes[4]) | uint32_t(bytes[5]) << 8 | uint32_t(bytes[6]) << 16 | uint32_t(bytes[7]) << 24;
    *reinterpret_cast<uint2*>(address) = v;
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<uint32_t*>(address) =
        uint32_t(bytes[0]) | uint32_t(bytes[1]) << 8 | uint32_t(bytes[2]) << 16 | uint32_t(bytes[3]) << 24;
  } else if constexpr (kBytes == 2) {
    *reinterpret_cast<uint16_t*>(address) = uint16_t(bytes[0] | bytes[1] << 8);
  } else {
    static_assert(kBytes == 1);
    *address = bytes[0];
  }
}

// Each query's head weights times the weight scale (fp8: times each head's q scale) for `heads` padded heads (zero
// past args.heads), query-major.
template <bool kFp8>
__device__ __forceinline__ void load_head_weights(const ScoresArgs& args, int64_t first_query, int queries, int heads,
                                                  float* weights) {
  for (int e = threadIdx.x; e < queries * heads; e += blockDim.x) {
    const int query = e / heads, head = e % heads;
    float weight = 0.0f;
    if (head < args.heads) {
      weight = args.head_weights[(first_query + query) * args.head_weights_row_stride + head] * args.weight_scale;
      if constexpr (kFp8) weight *= args.q_scales[(first_query + query) * args.heads + head];
    }
    weights[e] = weight;
  }
}

// The query operands of a CTA's queries in shared memory: fragments and the scaled head weights (fp8: times each
// head's q scale). 8 consecutive dims of a head row (16 bytes bf16, 8 fp8) are one whole fragment word pair at
// query_fragment_offset of their first dim; consecutive threads read consecutive chunks of the rows.
template <int kHeadDim, bool kFp8>
__device__ __forceinline__ void load_query_operands(const ScoresArgs& args, int64_t first_query, int queries,
                                                    unsigned char* q_frag, float* weights) {
  const int heads = padded_heads(args.heads), n_tiles = heads / 8;
  using Chunk = std::conditional_t<kFp8, uint2, uint4>;
  constexpr int kChunks = kHeadDim / 8;
  const unsigned char* source = kFp8 ? args.q_fp8 : reinterpret_cast<const unsigned char*>(args.q);
  constexpr int64_t kElementBytes = sizeof(Chunk) / 8;
  for (int e = threadIdx.x; e < queries * heads * kChunks; e += blockDim.x) {
    const int chunk = e % kChunks, head = e / kChunks % heads, query = e / kChunks / heads;
    Chunk value{};
    if (head < args.heads)
      value = *reinterpret_cast<const Chunk*>(
          source + (((first_query + query) * args.heads + head) * kHeadDim + 8 * chunk) * kElementBytes);
    *reinterpret_cast<Chunk*>(q_frag + query_fragment_offset<kHeadDim, kFp8>(query, n_tiles, head, 8 * chunk)) =
        value;
  }
  load_head_weights<kFp8>(args, first_query, queries, heads, weights);
}

// Rows key0 + half·8 + group of a 16-key tile, dims 32·pair + 8·quad .. +8: the lane's A fragments (see NOTES).
template <int kDimPairs>
__device__ __forceinline__ void load_key_tile(uint4 (&a)[2][kDimPairs], const __nv_bfloat16* keys, int64_t key0,
                                              int64_t rows, int group, int quad) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = key0 + 8 * half + group;
#pragma unroll
    for (int pair = 0; pair < kDimPairs; ++pair)
      a[half][pair] = row < rows ? __ldg(reinterpret_cast<const uint4*>(keys + row * (kDimPairs * 32) + 32 * pair +
                                                                         8 * quad))
                                 : make_uint4(0, 0, 0, 0);
  }
}

// An n-tile's part of the scores: the lane's two heads (weights w[0], w[1]) of the two accumulator chains' sum, after
// the ReLU, into sum[0] (row group) and sum[1] (row 8 + group).
__device__ __forceinline__ void add_weighted_relu(float (&sum)[2], const float (&acc)[2][4], const float* w) {
  const float w0 = w[0], w1 = w[1];
  sum[0] += w0 * fmaxf(acc[0][0] + acc[1][0], 0.0f) + w1 * fmaxf(acc[0][1] + acc[1][1], 0.0f);
  sum[1] += w0 * fmaxf(acc[0][2] + acc[1][2], 0.0f) + w1 * fmaxf(acc[0][3] + acc[1][3], 0.0f);
}

// The sums over the quad's heads: every lane of the quad ends with the row's whole score.
__device__ __forceinline__ void quad_reduce(float (&sum)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    sum[half] += __shfl_xor_sync(kFullMask, sum[half], 1);
    sum[half] += __shfl_xor_sync(kFullMask, sum[half], 2);
  }
}

// One query's scores of a bf16 key tile, quad-reduced: sum[0] for row group, sum[1] for row 8 + group. b_frag: the
// query's fragments + lane; w: its scaled head weights + 2·quad.
template <int kDimPairs>
__device__ __forceinline__ void bf16_tile_sums(float (&sum)[2], const uint4 (&a)[2][kDimPairs], const uint4* b_frag,
                                               const float* w, int n_tiles) {
  sum[0] = sum[1] = 0.0f;
  for (int n_tile = 0; n_tile < n_tiles; ++n_tile) {
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int pair = 0; pair < kDimPairs; ++pair) {
      const uint4 b = b_frag[(n_tile * kDimPairs + pair) * 32];
      // Two accumulator chains (one per k16 step) so consecutive MMAs are independent; summed below.
      mma_bf16_16816(acc[0], a[0][pair].x, a[1][pair].x, a[0][pair].y, a[1][pair].y, b.x, b.y);
      mma_bf16_16816(acc[1], a[0][pair].z, a[1][pair].z, a[0][pair].w, a[1][pair].w, b.z, b.w);
    }
    add_weighted_relu(sum, acc, w + 8 * n_tile);
  }
  quad_reduce(sum);
}

// The top-k in the scores launch (IndexerTopKMethod::LastCta): the CTA that finishes a query group's scores last
// (a ticket per group; none when one CTA spans the keys) selects each of the group's queries from its finished score
// row, which it reads back through L2: every visible key (≤ kIndexerLastCtaMaxKeys) as run_top_k's 64-bit key, one
// bitonic sort, the first k written. run_top_k sorts the same keys without a radix pass at these counts, so the
// selection, its order and the NaN flag are its own. sort_keys: kIndexerLastCtaMaxKeys keys of shared memory.
__device__ __forceinline__ void select_top_k_in_last_cta(const ScoresArgs& args, int64_t first_query, int queries,
                                                         const int64_t* visible, uint64_t* sort_keys) {
  __shared__ bool is_last;
  __threadfence();  // this thread's scores, before the ticket (or the reads below) of any thread
  __syncthreads();
  if (gridDim.x > 1) {
    if (threadIdx.x == 0) {
      uint32_t* ticket = &args.tickets[blockIdx.y].finished_ctas;
      is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
      if (is_last) *ticket = 0;  // every CTA of the group has taken its ticket: zero again for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
  }
  for (int query = 0; query < queries; ++query) {
    const int64_t t = first_query + query;
    const int n = int(visible[query]), k = args.top_k;
    if (k == 0) {
      if (threadIdx.x == 0) args.counts[t] = 0;
      continue;
    }
    int padded = 64;
    while (padded < n) padded *= 2;
    const float* row = args.scores + t * args.score_stride;
    bool saw_nan = false;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
      uint64_t key = 0;  // below every real key
      if (i < n) {
        const float x = __ldcg(row + i);  // other CTAs' stores: read through L2
        saw_nan |= isnan(x);
        key = topk::make_key(topk::ordered_score(x), i);
      }
      sort_keys[i] = key;
    }
    if (__syncthreads_or(saw_nan) && threadIdx.x == 0 && args.nan_flag != nullptr) atomicExch(args.nan_flag, 1);
    topk::bitonic_sort_descending<kScoreWarps * 32>(sort_keys, padded);
    const int count = min(k, n);
    int32_t* out = args.selected + t * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) out[i] = i < count ? int32_t(~uint32_t(sort_keys[i])) : -1;
    if (threadIdx.x == 0) args.counts[t] = count;
    __syncthreads();  // the sort buffer is the next query's
  }
}

// The sort buffer's offset after a kernel's other shared memory of `bytes`.
__host__ __device__ constexpr size_t selection_offset(size_t bytes) { return (bytes + 15) / 16 * 16; }
inline constexpr size_t kSelectionSmemBytes = size_t(kIndexerLastCtaMaxKeys) * sizeof(uint64_t);

// Each CTA's queries are of one sequence: the keys (and fp8 scales) of sequence_slots[first_query], or the only ones.
__device__ __forceinline__ int64_t key_slot_of(const ScoresArgs& args, int64_t first_query) {
  return args.sequence_slots != nullptr ? args.sequence_slots[first_query] : 0;
}

// The most keys any of a CTA's queries sees (each query's min(key_count, (position + 1) div ratio), kept in
// `visible` by the first threads of warp 0): the bound of the CTA's key loads, its first tiles' included, so a short
// context in a large key buffer reads only what its queries see. Each warp reduces it alone (no barrier), every
// lane ending with the same value.
__device__ __forceinline__ int cta_visible_keys(const ScoresArgs& args, int64_t first_query, int queries,
                                                int64_t* visible) {
  const int lane = threadIdx.x & 31;
  int64_t count = 0;
  if (lane < queries) {
    count = min(args.key_count, (args.positions[first_query + lane] + 1) / args.ratio);
    if (threadIdx.x < 32) visible[lane] = count;
  }
  return __reduce_max_sync(kFullMask, int(count));  // < 2^30: the launcher's bound on key_count
}

// fp8 keys: the 16 rows key0 + 8·half + group of an m-tile; per row the lane holds kHeadDim/4 bytes, loaded W/4 at a
// time at dims u·W + quad·(W/4) (W = min(64, head_dim)), as words: step t's A registers are words 2t and 2t + 1.
// Also the scale of the row the lane stores after the quad reduction, key0 + 8·(quad % 2) + group.
template <int kHeadDim>
struct Fp8KeyTile {
  uint32_t words[2][kHeadDim / 16];  // [half]
  float scale;
};

template <int kHeadDim>
__device__ __forceinline__ void load_fp8_key_tile(Fp8KeyTile<kHeadDim>& tile, const uint8_t* keys, const float* scales,
                                                  int key0, int rows, int group, int quad) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = key0 + 8 * half + group;
    if constexpr (kHeadDim >= 64) {
#pragma unroll
      for (int unit = 0; unit < kHeadDim / 64; ++unit) {
        const uint4 v = row < rows ? ptx::load_streaming_16B(keys + size_t(row) * kHeadDim + 64 * unit + 16 * quad)
                                   : make_uint4(0, 0, 0, 0);
        tile.words[half][4 * unit] = v.x, tile.words[half][4 * unit + 1] = v.y;
        tile.words[half][4 * unit + 2] = v.z, tile.words[half][4 * unit + 3] = v.w;
      }
    } else {
      const uint2 v =
          row < rows ? __ldg(reinterpret_cast<const uint2*>(keys + size_t(row) * kHeadDim + 8 * quad))
                     : make_uint2(0, 0);
      tile.words[half][0] = v.x, tile.words[half][1] = v.y;
    }
  }
  const int out_row = key0 + 8 * (quad & 1) + group;
  tile.scale = out_row < rows ? __ldg(scales + out_row) : 0.0f;
}

// The same for an fp8 key tile, before the key's scale: sum[0] for row group, sum[1] for row 8 + group.
template <int kHeadDim>
__device__ __forceinline__ void fp8_tile_sums(float (&sum)[2], const Fp8KeyTile<kHeadDim>& tile, const uint2* b_frag,
                                              const float* w, int n_tiles) {
  constexpr int kSteps = kHeadDim / 32;
  sum[0] = sum[1] = 0.0f;
#pragma unroll 2
  for (int n_tile = 0; n_tile < n_tiles; ++n_tile) {
    // Two accumulator chains (even and odd k32 steps) so consecutive MMAs are independent; summed below.
    float acc[2][4] = {};
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      const uint2 b = b_frag[(n_tile * kSteps + t) * 32];
      mma_e4m3_16832(acc[t & 1], tile.words[0][2 * t], tile.words[1][2 * t], tile.words[0][2 * t + 1],
                     tile.words[1][2 * t + 1], b.x, b.y);
    }
    add_weighted_relu(sum, acc, w + 8 * n_tile);
  }
  quad_reduce(sum);
}

// A warp's m16 key tile for the mma.sync kernels: bf16 keys as load_key_tile's A fragments, or fp8 keys with the
// scale of the row the lane stores (Fp8KeyTile).
template <int kHeadDim>
struct Bf16KeyTile {
  uint4 a[2][kHeadDim / 32];
};

template <int kHeadDim, bool kFp8>
struct WarpKeyTile {
  std::conditional_t<kFp8, Fp8KeyTile<kHeadDim>, Bf16KeyTile<kHeadDim>> tile;

  // Rows key0 .. key0 + 15 of `keys` (bf16, or fp8 with their `scales`), those from `rows` on zero.
  __device__ __forceinline__ void load(const void* keys, const float* scales, int key0, int rows, int group,
                                       int quad) {
    if constexpr (kFp8)
      load_fp8_key_tile<kHeadDim>(tile, static_cast<const uint8_t*>(keys), scales, key0, rows, group, quad);
    else
      load_key_tile<kHeadDim / 32>(tile.a, static_cast<const __nv_bfloat16*>(keys), key0, rows, group, quad);
  }

  // Query `query`'s score of the row the lane stores (key0 + 8·(quad % 2) + group), quad-reduced; q_frag: the query
  // fragments (query_fragment_offset's layout), w: the query's scaled head weights + 2·quad.
  __device__ __forceinline__ float score(const unsigned char* q_frag, int query, const float* w, int n_tiles, int lane,
                                         int quad) const {
    const size_t fragment = size_t(query) * n_tiles * (kHeadDim / 32) * 32 + lane;
    float sum[2];
    if constexpr (kFp8) {
      fp8_tile_sums<kHeadDim>(sum, tile, reinterpret_cast<const uint2*>(q_frag) + fragment, w, n_tiles);
      return tile.scale * ((quad & 1) ? sum[1] : sum[0]);
    } else {
      bf16_tile_sums<kHeadDim / 32>(sum, tile.a, reinterpret_cast<const uint4*>(q_frag) + fragment, w, n_tiles);
      return (quad & 1) ? sum[1] : sum[0];
    }
  }
};

// The mma.sync score kernels (see NOTES), bf16 or fp8 keys. fp8: q·K on e4m3 tensor cores with the scales factored
// out of the ReLU (both positive): score_j = s_j · Σ_h (w_h · s_h) · ReLU(q8_h · K8_j), the dot products accumulated
// in fp32 by the tensor core; its m16 key tile is half the bf16 one's bytes, so a warp keeps two tiles ahead in flight
// instead of one (the same 128 bytes per lane). A programmatic dependent: q, the head weights and the newest key are
// this step's outputs, so it waits at entry.
template <int kHeadDim, bool kFp8, bool kSelect>
__global__ void __launch_bounds__(kScoreWarps * 32, kSelect ? 1 : kScoreCtasPerSm)
    indexer_scores_kernel(ScoresArgs args) {
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "head_dim must be 32, 64 or 128");
  allow_dependents();
  wait_for_prior_grids();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int heads = padded_heads(args.heads);
  const int n_tiles = heads / 8;
  const int group_size = args.queries_per_cta;
  const ScoresSmemLayout layout = scores_smem_layout(group_size, args.heads, kHeadDim, kFp8);
  float* weights = reinterpret_cast<float*>(smem_raw + layout.weights_offset);
  int64_t* visible = reinterpret_cast<int64_t*>(smem_raw + layout.visible_offset);

  const int64_t first_query = int64_t(blockIdx.y) * group_size;
  const int queries = int(min(int64_t(group_size), args.tokens - first_query));
  const int64_t slot = key_slot_of(args, first_query);
  const void* keys = kFp8 ? static_cast<const void*>(args.keys_fp8 + slot * args.keys_slot_stride)
                          : static_cast<const void*>(args.keys + slot * args.keys_slot_stride);
  const float* key_scales = kFp8 ? args.key_scales + slot * args.key_scales_slot_stride : nullptr;
  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
  // 32-bit key arithmetic (key_count < 2^30, checked by the launcher): fewer registers in the main loop.
  const int key_count = int(args.key_count);
  const int step = int(gridDim.x) * kScoreWarps;
  int tile = int(blockIdx.x) * kScoreWarps + (threadIdx.x >> 5);
  // The first tiles' keys are in flight while the query operands are stored (rows up to the most any query sees: a
  // row past one query's visible keys only feeds outputs that are never written).
  const int max_visible = cta_visible_keys(args, first_query, queries, visible);
  constexpr int kAhead = kFp8 ? 2 : 1;
  WarpKeyTile<kHeadDim, kFp8> tiles[kAhead + 1];
#pragma unroll
  for (int i = 0; i < kAhead; ++i)
    tiles[i].load(keys, key_scales, (tile + i * step) * kKeysPerWarpTile, max_visible, group, quad);

  load_query_operands<kHeadDim, kFp8>(args, first_query, queries, smem_raw, weights);
  __syncthreads();

  // Tiles past every query's visible keys hold nothing to write (the contract leaves those columns unwritten).
  const int tile_count = (max_visible + kKeysPerWarpTile - 1) / kKeysPerWarpTile;
  // Software pipeline: the tiles ahead are in flight while the current one is multiplied.
  for (; tile < tile_count; tile += step) {
    const int key0 = tile * kKeysPerWarpTile;
    tiles[kAhead].load(keys, key_scales, (tile + kAhead * step) * kKeysPerWarpTile, max_visible, group, quad);
    // Quad lanes 0 and 1 store rows key0 + group and key0 + 8 + group after the quad reduction.
    const int out_row = key0 + 8 * (quad & 1) + group;
    for (int query = 0; query < queries; ++query) {
      float* out = args.scores + (first_query + query) * args.score_stride;
      const int query_visible = int(visible[query]);
      float result = -std::numeric_limits<float>::infinity();
      if (key0 < query_visible) {
        const float score = tiles[0].score(smem_raw, query, weights + query * heads + 2 * quad, n_tiles, lane, quad);
        if (out_row < query_visible) result = score;
      }
      if (quad < 2 && out_row < key_count) out[out_row] = result;
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) tiles[i] = tiles[i + 1];
  }
  if constexpr (kSelect)
    select_top_k_in_last_cta(args, first_query, queries, visible,
                             reinterpret_cast<uint64_t*>(smem_raw + selection_offset(layout.bytes)));
}

// ---- Warpgroup MMA scores (head_dim 128, up to 64 heads) ----

inline constexpr int kWgmmaHeadDim = 128;
inline constexpr int kWgmmaHeads = 64;        // N: heads padded to 64
inline constexpr int kWgmmaKeysPerTile = 64;  // M: a warpgroup's key tile, 16 rows per warp
inline constexpr int kWgmmaWarpgroups = kScoreWarps / 4;

// Shared memory per CTA of the warpgroup kernels (from a 1024-byte aligned base): each query's B tile
// (wgmma_query_tile_bytes), the two warpgroups' rings of key tiles (streamed and staged kernels), their stages' full
// barriers (staged), the scaled head weights [query][64], the visible key counts, and with the top-k in the launch its
// sort buffer. bytes: the allocation, the alignment's slack included.
struct WarpgroupSmemLayout {
  size_t ring_offset, barrier_offset, weights_offset, visible_offset, selection_offset, bytes;
};

// bf16: two 8 KB swizzle tiles for dims 0-63 and 64-127; fp8: one 8 KB tile.
__host__ __device__ constexpr size_t wgmma_query_tile_bytes(bool fp8) {
  return size_t(kWgmmaHeads) * kWgmmaHeadDim * (fp8 ? 1 : 2);
}
__host__ __device__ constexpr WarpgroupSmemLayout warpgroup_smem_layout(int queries, bool fp8, size_t ring_bytes,
                                                                         size_t barrier_bytes, bool select) {
  WarpgroupSmemLayout layout{};
  layout.ring_offset = size_t(queries) * wgmma_query_tile_bytes(fp8);
  layout.barrier_offset = layout.ring_offset + ring_bytes;
  layout.weights_offset = layout.barrier_offset + barrier_bytes;
  layout.visible_offset = layout.weights_offset + size_t(queries) * kWgmmaHeads * 4;
  layout.selection_offset = selection_offset(layout.visible_offset + size_t(queries) * 8);
  layout.bytes = 1024 + layout.selection_offset + (select ? kSelectionSmemBytes : 0);
  return layout;
}
// The register-fed kernel's: query tiles in fragment order, no ring.
__host__ __device__ constexpr WarpgroupSmemLayout wgmma_smem_layout(int queries, bool fp8, bool select) {
  return warpgroup_smem_layout(queries, fp8, 0, 0, select);
}

// A warpgroup kernel's CTA: its shared memory from the 1024-byte aligned base (query tiles first, then the layout's
// regions) and its group of queries.
struct WarpgroupCta {
  unsigned char* smem;
  float* weights;
  int64_t* visible;
  int64_t first_query;
  int queries;
};

__device__ __forceinline__ WarpgroupCta warpgroup_cta(const ScoresArgs& args, const WarpgroupSmemLayout& layout) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - sm90::shared_address(smem_raw) % 1024) % 1024);
  float* weights = reinterpret_cast<float*>(smem + layout.weights_offset);
  int64_t* visible = reinterpret_cast<int64_t*>(smem + layout.visible_offset);
  const int64_t first_query = int64_t(blockIdx.y) * args.queries_per_cta;
  const int queries = int(min(int64_t(args.queries_per_cta), args.tokens - first_query));
  return WarpgroupCta{
      .smem = smem, .weights = weights, .visible = visible, .first_query = first_query, .queries = queries};
}

// Where dim `dim` of head `head` sits in the query's B tile: logical k is the position the keys' A fragments give
// that dim (load_key_tile / load_fp8_key_tile), then the K-major 128B swizzle (16-byte chunk c of row r at c ^ r % 8,
// 8-row groups 1024 bytes apart). Pairs (bf16) or quads (fp8) of consecutive dims stay adjacent.
template <bool kFp8>
__device__ __forceinline__ uint32_t wgmma_query_offset(int head, int dim) {
  int k, tile_bytes_before;
  if constexpr (kFp8) {
    // Key lane quad holds dims 64u + 16·quad + 8s + (0..3 for k 4·quad.., 4..7 for k 16 + 4·quad..) of k32 step 2u + s.
    const int u = dim >> 6, r = dim & 63, quad = r >> 4, s = (r >> 3) & 1, high = (r >> 2) & 1, e = r & 3;
    k = 32 * (2 * u + s) + 16 * high + 4 * quad + e;
    tile_bytes_before = 0;
  } else {
    // Key lane quad holds dims 32·pair + 8·quad + 4·sub + (0,1 for k 2·quad.., 2,3 for k 8 + 2·quad..) of k16 step
    // 2·pair + sub.
    const int pair = dim >> 5, r = dim & 31, quad = r >> 3, sub = (r >> 2) & 1, high = (r >> 1) & 1, e = r & 1;
    k = 16 * (2 * pair + sub) + 8 * high + 2 * quad + e;
    tile_bytes_before = (k >> 6) * kWgmmaHeads * 128;
    k &= 63;
  }
  const int byte = kFp8 ? k : 2 * k;
  return uint32_t(tile_bytes_before + (head >> 3) * 1024 + (head & 7) * 128 + (((byte >> 4) ^ (head & 7)) << 4) +
                  (byte & 15));
}

// Σ_h w_h·ReLU(D[row, h]) of a warpgroup tile's D[64 keys × 64 heads] (w: a query's 64 scaled head weights) for the
// lane's two rows of the warp's 16, quad-reduced: sum[0] row group, sum[1] row 8 + group. D's n-tile j: d[4j],
// d[4j + 1] at row group, heads 8j + 2·quad, +1; d[4j + 2], d[4j + 3] at row 8 + group.
__device__ __forceinline__ void weighted_relu_rows(float (&sum)[2], const float (&d)[32], const float* weights,
                                                   int quad) {
  const float* w = weights + 2 * quad;
  sum[0] = sum[1] = 0.0f;
#pragma unroll
  for (int j = 0; j < kWgmmaHeads / 8; ++j) {
    const float2 wj = *reinterpret_cast<const float2*>(w + 8 * j);
    sum[0] += wj.x * fmaxf(d[4 * j], 0.0f) + wj.y * fmaxf(d[4 * j + 1], 0.0f);
    sum[1] += wj.x * fmaxf(d[4 * j + 2], 0.0f) + wj.y * fmaxf(d[4 * j + 3], 0.0f);
  }
  quad_reduce(sum);
}

// A warp's key rows as wgmma A fragments: bf16 as load_key_tile's uint4s, fp8 as load_fp8_key_tile's words.
template <bool kFp8>
struct WgmmaKeyTile {
  uint32_t words[2][kFp8 ? kWgmmaHeadDim / 16 : kWgmmaHeadDim / 8];  // [half][...]: 32 (fp8) or 64 bytes per row
  float scale;                                                       // fp8: the stored row's key scale
};

template <bool kFp8>
__device__ __forceinline__ void load_wgmma_key_tile(WgmmaKeyTile<kFp8>& tile, const void* keys, const float* scales,
                                                    int key0, int rows, int group, int quad) {
  if constexpr (kFp8) {
    Fp8KeyTile<kWgmmaHeadDim> t;
    load_fp8_key_tile<kWgmmaHeadDim>(t, static_cast<const uint8_t*>(keys), scales, key0, rows, group, quad);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int i = 0; i < kWgmmaHeadDim / 16; ++i) tile.words[half][i] = t.words[half][i];
    tile.scale = t.scale;
  } else {
    uint4 a[2][kWgmmaHeadDim / 32];
    load_key_tile<kWgmmaHeadDim / 32>(a, static_cast<const __nv_bfloat16*>(keys), key0, rows, group, quad);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int pair = 0; pair < kWgmmaHeadDim / 32; ++pair) {
        tile.words[half][4 * pair] = a[half][pair].x, tile.words[half][4 * pair + 1] = a[half][pair].y;
        tile.words[half][4 * pair + 2] = a[half][pair].z, tile.words[half][4 * pair + 3] = a[half][pair].w;
      }
    tile.scale = 1.0f;
  }
}

// The tile's registers belong to the tensor core until the wait: keeps the compiler from touching them earlier.
template <bool kFp8>
__device__ __forceinline__ void fence_key_tile(WgmmaKeyTile<kFp8>& tile) {
  sm90::fence_operand(tile.words[0]);
  sm90::fence_operand(tile.words[1]);
}

// One query's D[64 keys × 64 heads] for the warpgroup's key tile: all k steps, committed (not waited for).
template <bool kFp8>
__device__ __forceinline__ void issue_wgmma_scores(float (&d)[32], const WgmmaKeyTile<kFp8>& tile,
                                                   const unsigned char* query_tile) {
  if constexpr (kFp8) {
    const uint64_t descriptor = sm90::make_sw128_k_major_descriptor(query_tile);
#pragma unroll
    for (int t = 0; t < kWgmmaHeadDim / 32; ++t)
      sm90::wgmma_m64n64k32_e4m3_rs(d, tile.words[0][2 * t], tile.words[1][2 * t], tile.words[0][2 * t + 1],
                                    tile.words[1][2 * t + 1], sm90::advance_descriptor(descriptor, 32 * t), t > 0);
  } else {
#pragma unroll
    for (int s = 0; s < kWgmmaHeadDim / 16; ++s) {
      // Step s = 2·pair + sub: words 4·pair + 2·sub (dims .. +1, k 2·quad) and + 1 (dims +2, +3, k 8 + 2·quad).
      const int pair = s >> 1, sub = s & 1;
      const uint64_t descriptor =
          sm90::make_sw128_k_major_descriptor(query_tile + (s >> 2) * (kWgmmaHeads * 128));
      sm90::wgmma_m64n64k16_bf16_rs(d, tile.words[0][4 * pair + 2 * sub], tile.words[1][4 * pair + 2 * sub],
                                    tile.words[0][4 * pair + 2 * sub + 1], tile.words[1][4 * pair + 2 * sub + 1],
                                    sm90::advance_descriptor(descriptor, 32 * (s & 3)), s > 0);
    }
  }
  sm90::wgmma_commit_group();
}

// The query operands of the warpgroup kernels: prepared bf16 or fp8 rows (heads past args.heads zero) into each
// query's operand tile, `Unit`s at a time (a unit never straddles a 16-byte chunk of the tile's layout), unit u of
// a head's row at unit_offset(head, u) in the tile; and the scaled head weights (fp8: times each head's q scale).
// kBatched: a query's units are all loaded before the first is stored, and each thread's head weight before them:
// one round trip to L2 per query (a loop of load-then-store waits for every load before its store: round s21-1's
// trace, 2.7 µs from the grid-dependency wait to the CTA barrier at 1M keys). The register-fed kernel keeps the loop:
// its first key tiles hold the registers the batch would need (it spills).
template <bool kFp8, class Unit, bool kBatched, class UnitOffset>
__device__ __forceinline__ void load_query_operand_tiles(const ScoresArgs& args, int64_t first_query, int queries,
                                                         unsigned char* tiles, float* weights, UnitOffset unit_offset) {
  constexpr int kThreads = kScoreWarps * 32;
  constexpr int kUnits = kWgmmaHeadDim * (kFp8 ? 1 : 2) / int(sizeof(Unit));
  constexpr int kPerThread = kWgmmaHeads * kUnits / kThreads;  // a query's units per thread
  static_assert(kWgmmaHeads * kUnits % kThreads == 0 && kMaxQueriesPerCta * kWgmmaHeads <= kThreads,
                "a query's units spread evenly over the threads, at most one head weight each");
  const auto* source = reinterpret_cast<const Unit*>(kFp8 ? static_cast<const void*>(args.q_fp8) : args.q);
  if constexpr (!kBatched) {
    for (int e = threadIdx.x; e < queries * kWgmmaHeads * kUnits; e += blockDim.x) {
      const int unit = e % kUnits, head = e / kUnits % kWgmmaHeads, query = e / kUnits / kWgmmaHeads;
      const Unit value = head < args.heads ? source[((first_query + query) * args.heads + head) * kUnits + unit]
                                           : Unit{};
      *reinterpret_cast<Unit*>(tiles + query * wgmma_query_tile_bytes(kFp8) + unit_offset(head, unit)) = value;
    }
    load_head_weights<kFp8>(args, first_query, queries, kWgmmaHeads, weights);
  } else {
    // weights[query][head], query · 64 + head = the thread (zero past args.heads).
    const int weight_query = int(threadIdx.x) / kWgmmaHeads, weight_head = int(threadIdx.x) % kWgmmaHeads;
    float weight = 0.0f;
    if (weight_query < queries && weight_head < args.heads) {
      const int64_t t = first_query + weight_query;
      weight = args.head_weights[t * args.head_weights_row_stride + weight_head] * args.weight_scale;
      if constexpr (kFp8) weight *= args.q_scales[t * args.heads + weight_head];
    }
    for (int query = 0; query < queries; ++query) {
      Unit values[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = int(threadIdx.x) + i * kThreads, unit = e % kUnits, head = e / kUnits;
        values[i] = head < args.heads ? source[((first_query + query) * args.heads + head) * kUnits + unit] : Unit{};
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = int(threadIdx.x) + i * kThreads, unit = e % kUnits, head = e / kUnits;
        *reinterpret_cast<Unit*>(tiles + query * wgmma_query_tile_bytes(kFp8) + unit_offset(head, unit)) = values[i];
      }
    }
    if (weight_query < queries) weights[threadIdx.x] = weight;
  }
  sm90::fence_proxy_async_shared();  // the tiles are read next by wgmma (the async proxy)
}

// The register-fed warpgroup kernel's query tiles: 4-byte units (two bf16 dims or four fp8 dims, adjacent in the
// tile) at wgmma_query_offset.
template <bool kFp8>
__device__ __forceinline__ void load_wgmma_query_operands(const ScoresArgs& args, int64_t first_query, int queries,
                                                          unsigned char* tiles, float* weights) {
  load_query_operand_tiles<kFp8, uint32_t, false>(args, first_query, queries, tiles, weights, [](int head, int unit) {
    return wgmma_query_offset<kFp8>(head, (kFp8 ? 4 : 2) * unit);
  });
}

// Scores on warpgroup MMAs (see NOTES). A programmatic dependent, as the warp kernels.
template <bool kFp8, bool kSelect>
__global__ void __launch_bounds__(kScoreWarps * 32, kSelect ? 1 : kScoreCtasPerSm)
    indexer_scores_wgmma_kernel(ScoresArgs args) {
  allow_dependents();
  wait_for_prior_grids();
  const WarpgroupSmemLayout layout = wgmma_smem_layout(args.queries_per_cta, kFp8, kSelect);
  const auto [smem, weights, visible, first_query, queries] = warpgroup_cta(args, layout);
  unsigned char* query_tiles = smem;
  const int64_t slot = key_slot_of(args, first_query);
  const void* keys = kFp8 ? static_cast<const void*>(args.keys_fp8 + slot * args.keys_slot_stride)
                          : static_cast<const void*>(args.keys + slot * args.keys_slot_stride);
  const float* key_scales = kFp8 ? args.key_scales + slot * args.key_scales_slot_stride : nullptr;
  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3, warp = threadIdx.x >> 5;
  const int row_in_tile = 16 * (warp & 3);
  // 32-bit key arithmetic (key_count < 2^30, checked by the launcher).
  const int key_count = int(args.key_count);
  const int step = int(gridDim.x) * kWgmmaWarpgroups;
  int tile = int(blockIdx.x) * kWgmmaWarpgroups + (warp >> 2);
  // The first tiles' keys are in flight while the query operands are stored. A warp keeps one bf16 tile (64 bytes
  // per lane) or two fp8 tiles ahead of the one multiplied.
  const int max_visible = cta_visible_keys(args, first_query, queries, visible);
  WgmmaKeyTile<kFp8> current, ahead, after;
  load_wgmma_key_tile<kFp8>(current, keys, key_scales, tile * kWgmmaKeysPerTile + row_in_tile, max_visible, group,
                            quad);
  if constexpr (kFp8)
    load_wgmma_key_tile<kFp8>(ahead, keys, key_scales, (tile + step) * kWgmmaKeysPerTile + row_in_tile, max_visible,
                              group, quad);
  load_wgmma_query_operands<kFp8>(args, first_query, queries, query_tiles, weights);
  __syncthreads();

  const int tiles = (max_visible + kWgmmaKeysPerTile - 1) / kWgmmaKeysPerTile;
  for (; tile < tiles; tile += step) {  // warpgroup-uniform: every wgmma below has all 128 threads
    const int tile_key0 = tile * kWgmmaKeysPerTile, key0 = tile_key0 + row_in_tile;
    const int distance = kFp8 ? 2 : 1;
    load_wgmma_key_tile<kFp8>(kFp8 ? after : ahead, keys, key_scales,
                              (tile + distance * step) * kWgmmaKeysPerTile + row_in_tile, max_visible, group, quad);
    // Quad lanes 0 and 1 store rows key0 + group and key0 + 8 + group after the quad reduction.
    const int out_row = key0 + 8 * (quad & 1) + group;
    for (int query = 0; query < queries; ++query) {
      float* out = args.scores + (first_query + query) * args.score_stride;
      const int query_visible = int(visible[query]);
      float result = -std::numeric_limits<float>::infinity();
      if (tile_key0 < query_visible) {  // warpgroup-uniform
        float d[32];
        sm90::wgmma_fence();
        issue_wgmma_scores<kFp8>(d, current, query_tiles + query * wgmma_query_tile_bytes(kFp8));
        sm90::wgmma_wait_group<0>();
        sm90::fence_operand(d);
        fence_key_tile<kFp8>(current);
        float sum[2];
        weighted_relu_rows(sum, d, weights + query * kWgmmaHeads, quad);
        if (out_row < query_visible) result = current.scale * ((quad & 1) ? sum[1] : sum[0]);
      }
      if (quad < 2 && out_row < key_count) out[out_row] = result;
    }
    current = ahead;
    if constexpr (kFp8) ahead = after;
  }
  if constexpr (kSelect)
    select_top_k_in_last_cta(args, first_query, queries, visible,
                             reinterpret_cast<uint64_t*>(smem + layout.selection_offset));
}

// ---- Streamed warpgroup scores (head_dim 128, up to 64 heads; see NOTES) ----

// Ring stages per warpgroup and CTAs per SM: the bf16 tiles are 16 KB, so one CTA's two rings and up to four query
// tiles fill an SM's shared memory.
inline constexpr int kStreamStages = 4;
inline constexpr int kStreamCtasPerSm = 1;

inline constexpr size_t kStreamedKeyTileBytes = size_t(kWgmmaKeysPerTile) * kWgmmaHeadDim * 2;

// The streamed kernel's shared memory: bf16 query tiles, the two warpgroups' rings of key tiles.
__host__ __device__ constexpr WarpgroupSmemLayout streamed_smem_layout(int queries, bool select) {
  return warpgroup_smem_layout(queries, false, kWgmmaWarpgroups * size_t(kStreamStages) * kStreamedKeyTileBytes, 0,
                               select);
}

// Byte offset of `byte` (2·dim of a 128-dim bf16 row) of row `row` in a K-major 128B-swizzled operand of 64 rows:
// the rows span two 8 KB tiles (dims 0-63, 64-127).
__device__ __forceinline__ uint32_t streamed_operand_offset(int row, int byte) {
  return uint32_t((byte >> 7) * (kWgmmaKeysPerTile * 128) + row * 128 + ((((byte >> 4) & 7) ^ (row & 7)) << 4) +
                  (byte & 15));
}

// A warpgroup's copies of key tile rows [key0, key0 + 64) into a ring stage (rows ≥ `rows` zero-filled), thread t of
// the warpgroup taking 16-byte chunks t, t + 128, …: consecutive threads read consecutive chunks of a row.
__device__ __forceinline__ void issue_streamed_key_tile(unsigned char* stage, const __nv_bfloat16* keys, int key0,
                                                        int rows, int t) {
  constexpr int kRowBytes = kWgmmaHeadDim * 2;
  constexpr int kRowChunks = kRowBytes / 16;
  const uint32_t base = sm90::shared_address(stage);
#pragma unroll
  for (int i = 0; i < kWgmmaKeysPerTile * kRowChunks / 128; ++i) {
    const int chunk = t + 128 * i, row = chunk / kRowChunks, byte = 16 * (chunk % kRowChunks);
    const int key = key0 + row;
    const auto* source =
        reinterpret_cast<const unsigned char*>(keys) + int64_t(key < rows ? key : 0) * kRowBytes + byte;
    ptx::cp_async_or_zero<16>(base + streamed_operand_offset(row, byte), source, key < rows);
  }
}

// One query's D[64 keys × 64 heads] of a ring stage: all k steps, committed (not waited for).
__device__ __forceinline__ void issue_streamed_scores(float (&d)[32], const unsigned char* stage,
                                                      const unsigned char* query_tile) {
  constexpr int kSteps = kWgmmaHeadDim / 16;  // 32 bytes of each row per step
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const uint32_t tile = uint32_t(s >> 2) * (kWgmmaKeysPerTile * 128), advance = 32 * uint32_t(s & 3);
    const uint64_t a = sm90::advance_descriptor(sm90::make_sw128_k_major_descriptor(stage + tile), advance);
    const uint64_t b = sm90::advance_descriptor(sm90::make_sw128_k_major_descriptor(query_tile + tile), advance);
    sm90::wgmma_m64n64k16_bf16_ss(d, a, b, s > 0);
  }
  sm90::wgmma_commit_group();
}

// Scores on warpgroup MMAs with bf16 keys streamed through shared memory (see NOTES). A programmatic dependent, as
// the other score kernels.
template <bool kSelect>
__global__ void __launch_bounds__(kScoreWarps * 32, kStreamCtasPerSm)
    indexer_scores_streamed_kernel(ScoresArgs args) {
  constexpr int kStages = kStreamStages;
  constexpr size_t kTileBytes = kStreamedKeyTileBytes;
  allow_dependents();
  wait_for_prior_grids();
  const WarpgroupSmemLayout layout = streamed_smem_layout(args.queries_per_cta, kSelect);
  const auto [smem, weights, visible, first_query, queries] = warpgroup_cta(args, layout);
  unsigned char* query_tiles = smem;
  const int64_t slot = key_slot_of(args, first_query);
  const __nv_bfloat16* keys = args.keys + slot * args.keys_slot_stride;
  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3, warp = threadIdx.x >> 5;
  const int warpgroup = warp >> 2, t = threadIdx.x & 127;
  const int row_in_tile = 16 * (warp & 3);
  unsigned char* ring = smem + layout.ring_offset + warpgroup * kStages * kTileBytes;
  // 32-bit key arithmetic (key_count < 2^30, checked by the launcher).
  const int key_count = int(args.key_count);
  const int step = int(gridDim.x) * kWgmmaWarpgroups;
  const int first_tile = int(blockIdx.x) * kWgmmaWarpgroups + warpgroup;
  // The first kStages − 1 tiles are in flight while the query operands are stored (rows up to the most any query
  // sees: a row past one query's visible keys only feeds outputs that are never written).
  const int max_visible = cta_visible_keys(args, first_query, queries, visible);
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue_streamed_key_tile(ring + i * kTileBytes, keys, (first_tile + i * step) * kWgmmaKeysPerTile, max_visible, t);
    ptx::cp_async_commit();
  }
  load_query_operand_tiles<false, uint4, true>(args, first_query, queries, query_tiles, weights,
                                               [](int head, int unit) {
                                                 // natural dim order, 16-byte units
                                                 return streamed_operand_offset(head, int(sizeof(uint4)) * unit);
                                               });
  __syncthreads();

  const int tiles = (max_visible + kWgmmaKeysPerTile - 1) / kWgmmaKeysPerTile;
  int stage = 0;
  for (int tile = first_tile; tile < tiles; tile += step) {  // warpgroup-uniform: every wgmma has all 128 threads
    // This thread's copies of the tile have landed; the fence and the warpgroup's barrier publish everyone's to the
    // tensor core, and every thread has finished the previous tile's MMAs (its stage is refilled next).
    ptx::cp_async_wait<kStages - 2>();
    sm90::fence_proxy_async_shared();
    sm90::named_barrier_sync<128>(1 + warpgroup);
    const int refill = stage == 0 ? kStages - 1 : stage - 1;
    issue_streamed_key_tile(ring + refill * kTileBytes, keys, (tile + (kStages - 1) * step) * kWgmmaKeysPerTile,
                            max_visible, t);
    ptx::cp_async_commit();
    const unsigned char* current = ring + stage * kTileBytes;
    const int tile_key0 = tile * kWgmmaKeysPerTile;
    // Quad lanes 0 and 1 store the warp's rows group and 8 + group after the quad reduction.
    const int stored_row = row_in_tile + 8 * (quad & 1) + group, out_row = tile_key0 + stored_row;
    for (int query = 0; query < queries; ++query) {
      float* out = args.scores + (first_query + query) * args.score_stride;
      const int query_visible = int(visible[query]);
      float result = -std::numeric_limits<float>::infinity();
      if (tile_key0 < query_visible) {  // warpgroup-uniform
        float d[32];
        sm90::wgmma_fence();
        issue_streamed_scores(d, current, query_tiles + query * wgmma_query_tile_bytes(false));
        sm90::wgmma_wait_group<0>();
        sm90::fence_operand(d);
        float sum[2];
        weighted_relu_rows(sum, d, weights + query * kWgmmaHeads, quad);
        if (out_row < query_visible) result = (quad & 1) ? sum[1] : sum[0];
      }
      if (quad < 2 && out_row < key_count) out[out_row] = result;
    }
    stage = stage == kStages - 1 ? 0 : stage + 1;
  }
  ptx::cp_async_wait<0>();  // no copy may land in shared memory after the CTA's exit
  if constexpr (kSelect)
    select_top_k_in_last_cta(args, first_query, queries, visible,
                             reinterpret_cast<uint64_t*>(smem + layout.selection_offset));
}

// ---- Staged fp8 warpgroup scores (head_dim 128, up to 64 heads, one sequence or slots; see NOTES) ----

// Ring stages per warpgroup: a stage is one 64-key fp8 tile (8 KB); one tile ahead of the one multiplied. Deeper
// rings were slower (H200, session 20, 1M context T = 1: round 2 2 stages 12.27 µs, 3 12.94, 4 13.55; round 1 6
// 15.09, 8 17.33; 64K 3.72 / 3.78 / 3.76; 1M T = 8 56.56 / 57.19 / 57.16).
inline constexpr int kStagedStages = 2;
inline constexpr size_t kStagedKeyTileBytes = size_t(kWgmmaKeysPerTile) * kWgmmaHeadDim;

// The staged kernel's shared memory: fp8 query tiles (natural dim order), the two warpgroups' rings of key tiles and
// their stages' full barriers.
__host__ __device__ constexpr WarpgroupSmemLayout staged_smem_layout(int queries, bool select) {
  constexpr size_t kStages = size_t(kWgmmaWarpgroups) * kStagedStages;
  return warpgroup_smem_layout(queries, true, kStages * kStagedKeyTileBytes, kStages * sizeof(uint64_t), select);
}

// The staged kernel's parameters: the fp8 keys' tensor map (rows of 128 bytes, boxes of one 64-key tile in the 128B
// swizzle; rows past the map read as zero): one sequence's key_count rows, or with sequence_slots every slot's rows,
// slot s's key j at row s · slot_rows + j (rows past a slot's key_count are the next slot's: no query sees them).
struct StagedScoresArgs {
  CUtensorMap keys;
  ScoresArgs scores;
  int slot_rows;       // map rows from one slot's first key to the next (0: one sequence)
  uint64_t* trace;     // kTrace: IndexerScoresParams::trace
};

// One query's D[64 keys × 64 heads] of a staged fp8 key tile: four k32 steps of 32 bytes, committed (not waited for).
__device__ __forceinline__ void issue_staged_scores(float (&d)[32], const unsigned char* stage,
                                                    const unsigned char* query_tile) {
  const uint64_t a = sm90::make_sw128_k_major_descriptor(stage), b = sm90::make_sw128_k_major_descriptor(query_tile);
#pragma unroll
  for (int s = 0; s < kWgmmaHeadDim / 32; ++s)
    sm90::wgmma_m64n64k32_e4m3_ss(d, sm90::advance_descriptor(a, 32 * s), sm90::advance_descriptor(b, 32 * s),
                                  s > 0);
  sm90::wgmma_commit_group();
}

// Scores of fp8 keys on warpgroup MMAs with A in shared memory, the key tiles staged by TMA (see NOTES). A
// programmatic dependent, as the other score kernels.
template <bool kSelect, bool kTrace = false>
__global__ void __launch_bounds__(kScoreWarps * 32, kSelect ? 1 : kScoreCtasPerSm)
    indexer_scores_staged_kernel(const __grid_constant__ StagedScoresArgs staged) {
  constexpr int kStages = kStagedStages;
  constexpr uint32_t kTileBytes = uint32_t(kStagedKeyTileBytes);
  const ScoresArgs& args = staged.scores;
  // kTrace: thread 0 of each warpgroup marks its timeline (IndexerTracePoint).
  const auto mark = [&](int point) {
    if constexpr (kTrace)
      if ((threadIdx.x & 127) == 0)
        sm90::record_warp_trace_point(staged.trace, kScoreWarps, kIndexerTracePoints, point, kIndexerTraceStart,
                                      kIndexerTraceSm);
  };
  mark(kIndexerTraceStart);
  allow_dependents();
  if (threadIdx.x == 0) sm90::prefetch_tensor_map(&staged.keys);
  wait_for_prior_grids();
  mark(kIndexerTraceWaited);
  const WarpgroupSmemLayout layout = staged_smem_layout(args.queries_per_cta, kSelect);
  const auto [smem, weights, visible, first_query, queries] = warpgroup_cta(args, layout);
  unsigned char* query_tiles = smem;
  const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3, warp = threadIdx.x >> 5;
  const int warpgroup = warp >> 2, t = threadIdx.x & 127;
  unsigned char* ring = smem + layout.ring_offset + warpgroup * kStages * kTileBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barrier_offset) + warpgroup * kStages;
  const int step = int(gridDim.x) * kWgmmaWarpgroups;
  const int first_tile = int(blockIdx.x) * kWgmmaWarpgroups + warpgroup;
  const int64_t slot = key_slot_of(args, first_query);
  const int slot_row0 = int(slot) * staged.slot_rows;
  const float* key_scales = args.key_scales + slot * args.key_scales_slot_stride;
  const int max_visible = cta_visible_keys(args, first_query, queries, visible);
  const int tiles = (max_visible + kWgmmaKeysPerTile - 1) / kWgmmaKeysPerTile;
  // The warpgroup's first kStages − 1 tiles are in flight while the query operands are stored.
  if (t == 0) {
    for (int i = 0; i < kStages; ++i) sm90::mbarrier_init(&full[i], 1);
    sm90::fence_mbarrier_init();
    for (int i = 0; i < kStages - 1 && first_tile + i * step < tiles; ++i) {
      sm90::mbarrier_arrive_expect_tx(&full[i], kTileBytes);
      sm90::tma_load_2d(ring + i * kTileBytes, &staged.keys, &full[i], 0,
                        slot_row0 + (first_tile + i * step) * kWgmmaKeysPerTile);
    }
  }
  mark(kIndexerTraceVisible);
  // The scale of the row the lane stores after the quad reduction, one tile ahead of its use.
  const int stored_row = 16 * (warp & 3) + 8 * (quad & 1) + group;
  const auto key_scale = [&](int tile) {
    const int key = tile * kWgmmaKeysPerTile + stored_row;
    return key < max_visible ? __ldg(key_scales + key) : 0.0f;
  };
  float scale = key_scale(first_tile);
  load_query_operand_tiles<true, uint2, true>(args, first_query, queries, query_tiles, weights, [](int head, int unit) {
    return streamed_operand_offset(head, int(sizeof(uint2)) * unit);  // natural dim order, 8-byte units (q_fp8)
  });
  __syncthreads();  // the query operands, the visible counts and the barriers' initialisation
  mark(kIndexerTraceReady);

  int stage = 0;
  uint32_t parity = 0;
  for (int tile = first_tile; tile < tiles; tile += step) {  // warpgroup-uniform: every wgmma has all 128 threads
    // Every thread has finished the previous tile's MMAs: its stage takes the tile kStages − 1 ahead.
    sm90::named_barrier_sync<128>(1 + warpgroup);
    const int ahead = tile + (kStages - 1) * step;
    if (t == 0 && ahead < tiles) {
      const int refill = stage == 0 ? kStages - 1 : stage - 1;
      sm90::mbarrier_arrive_expect_tx(&full[refill], kTileBytes);
      sm90::tma_load_2d(ring + refill * kTileBytes, &staged.keys, &full[refill], 0,
                        slot_row0 + ahead * kWgmmaKeysPerTile);
    }
    const float next_scale = key_scale(tile + step);
    sm90::mbarrier_wait(&full[stage], parity);
    if constexpr (kTrace) {
      if (tile == first_tile) mark(kIndexerTraceFirst);
      if (tile + step >= tiles) mark(kIndexerTraceLast);
    }
    const unsigned char* current = ring + stage * kTileBytes;
    const int out_row = tile * kWgmmaKeysPerTile + stored_row;
    for (int query = 0; query < queries; ++query) {
      float* out = args.scores + (first_query + query) * args.score_stride;
      const int query_visible = int(visible[query]);
      float result = -std::numeric_limits<float>::infinity();
      if (tile * kWgmmaKeysPerTile < query_visible) {  // warpgroup-uniform
        float d[32];
        sm90::wgmma_fence();
        issue_staged_scores(d, current, query_tiles + query * wgmma_query_tile_bytes(true));
        sm90::wgmma_wait_group<0>();
        sm90::fence_operand(d);
        float sum[2];
        weighted_relu_rows(sum, d, weights + query * kWgmmaHeads, quad);
        if (out_row < query_visible) result = scale * ((quad & 1) ? sum[1] : sum[0]);
      }
      if (quad < 2 && out_row < int(args.key_count)) out[out_row] = result;
    }
    scale = next_scale;
    if (++stage == kStages) stage = 0, parity ^= 1;
  }
  if constexpr (kTrace) {
    mark(kIndexerTraceEnd);
    if (t == 0) {
      const uint64_t warp = (uint64_t(blockIdx.y) * gridDim.x + blockIdx.x) * kScoreWarps + (threadIdx.x >> 5);
      staged.trace[warp * kIndexerTracePoints + kIndexerTraceTiles] =
          first_tile < tiles ? uint64_t((tiles - 1 - first_tile) / step + 1) : 0;
    }
  }
  if constexpr (kSelect)
    select_top_k_in_last_cta(args, first_query, queries, visible,
                             reinterpret_cast<uint64_t*>(smem + layout.selection_offset));
}

// The fused scores + top-k (run_indexer_scores_top_k): topk::top_k_kernel with this score source. Each top-k CTA
// scores its own range [begin, begin + n) of one query's visible keys with the score kernels' tile code (the same
// bits), straight into its shared-memory cache (or the global scores row past the cache), so the scores never make
// a round trip and the second launch disappears. The query operands sit in the top-k's sort buffer until the collect.
template <int kHeadDim, bool kFp8>
struct ComputedScores {
  static constexpr int kMinCtasPerSm = 1;  // the score loop's registers: 512 threads × up to 128
  ScoresArgs scores;                       // queries_per_cta 1

  __device__ __forceinline__ void fill(const float* /*row*/, int64_t query, int64_t begin, int64_t n, bool cached,
                                       uint32_t* cache, unsigned char* scratch) const {
    const ScoresSmemLayout layout = scores_smem_layout(1, scores.heads, kHeadDim, kFp8);
    float* weights = reinterpret_cast<float*>(scratch + layout.weights_offset);
    load_query_operands<kHeadDim, kFp8>(scores, query, 1, scratch, weights);
    __syncthreads();
    const int n_tiles = padded_heads(scores.heads) / 8;
    const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int first = int(begin), end = int(begin + n);
    const int64_t slot = key_slot_of(scores, query);
    const void* keys = kFp8 ? static_cast<const void*>(scores.keys_fp8 + slot * scores.keys_slot_stride)
                            : static_cast<const void*>(scores.keys + slot * scores.keys_slot_stride);
    const float* key_scales = kFp8 ? scores.key_scales + slot * scores.key_scales_slot_stride : nullptr;
    float* out = scores.scores + query * scores.score_stride;
    // No tile ahead: the top-k's state shares the register budget (a tile ahead spills here). Quad lanes 0 and 1
    // hold rows key0 + group and key0 + 8 + group after the quad reduction.
    for (int tile = warp; first + tile * kKeysPerWarpTile < end; tile += warps) {
      const int key0 = first + tile * kKeysPerWarpTile;
      WarpKeyTile<kHeadDim, kFp8> current;
      current.load(keys, key_scales, key0, end, group, quad);
      const float value = current.score(scratch, 0, weights + 2 * quad, n_tiles, lane, quad);
      const int row = key0 + 8 * (quad & 1) + group;
      if (quad >= 2 || row >= end) continue;
      if (cached)
        cache[row - first] = topk::ordered_score(value);
      else
        out[row] = value;
    }
  }
};

}  // namespace dsv4::cuda::indexer
