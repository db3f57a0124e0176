// Device code of the sparse MQA attention with sink (sparse_attention.hpp). Two kernels:
// - head_dim 512 with more than 32 heads (the DSV4 models): sparse_attention_d512_kernel below, warp-specialised,
//   bulk copies + wgmma (its own notes);
// - every other shape (the tests' tiny models, few heads): the mma.sync kernel described here.
//
// mma.sync kernel: one CTA = one query × one block of 16·kHeadTiles heads × one split of the query's slot list.
// Warp w owns the 16 heads of head tile (w % kHeadTiles) and the dims [ds·kWarpDims, (ds+1)·kWarpDims) of split
// ds = w / kHeadTiles (two dim halves for D = 512, so that the 16 × 256 fp32 output accumulator fits in 128
// registers per thread).
// Per tile of 32 entries:
//   1. the entries arrive by cp.async (8-byte chunks for fp8 entries, whose 584-byte stride is only 8-aligned;
//      16-byte chunks for bf16 entries), issued two tiles ahead into a 3-stage ring; an unused slot is zero-filled,
//      so that its (masked) weight 0 never meets a NaN;
//   2. fp8 entries are dequantised to a bf16 tile (e4m3 · 2^k is exact in bf16);
//   3. S = Q Kᵀ with mma.sync m16n8k16 (each warp over its dim range; the two halves' partial scores are summed
//      through shared memory in a fixed order, so both warps of a head tile hold identical scores);
//   4. online softmax in the log2 domain; P is rounded to bf16 once and the row sums add the rounded values, so the
//      weights the PV product applies are exactly the ones normalised;
//   5. O += P V with mma.sync (V = K read transposed by ldmatrix.trans).
// Physical entry numbers (index list → page table) are looked up 256 slots at a time, all threads in parallel, so
// the dependent index and page-table loads stall once per 8 tiles instead of once per tile.
// NOTES: row strides in shared memory are D + 8 bf16 (16 bytes of pad) so that the 8 rows an ldmatrix reads fall
// on distinct bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kernels/sparse_attention_math.cuh"
#include "backends/cuda/ptx/cluster.cuh"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/ldmatrix.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/mma.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "core/e8m0.hpp"

namespace dsv4::cuda::sparse_attention_detail {

inline constexpr int kTile = kSparseAttentionTileEntries;
inline constexpr int kStages = 3;
inline constexpr int kResolveSlots = 256;
// Online softmax: a row's reference max moves only when a tile's max exceeds it by more than this (log2 units), so
// the weights stay below 2^8 (fp32 sums and bf16 weights keep their relative precision) and, once the first tiles
// have set it, the accumulators are rarely rescaled (128 multiplications per thread and tile otherwise).
inline constexpr float kRescaleLog2 = 8.0f;

template <int kHeadDim, int kHeadTiles>
struct TileConfig {
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256 || kHeadDim == 512,
                "head_dim must be 64, 128, 256 or 512");
  static_assert(kHeadTiles == 1 || kHeadTiles == 2 || kHeadTiles == 4, "1, 2 or 4 tiles of 16 heads per CTA");
  static constexpr int kDimSplits = kHeadDim == 512 ? 2 : 1;
  static constexpr int kWarps = kHeadTiles * kDimSplits;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpDims = kHeadDim / kDimSplits;
  static constexpr int kHeadsPerCta = 16 * kHeadTiles;
  static constexpr int kRowStride = kHeadDim + 8;  // bf16 elements per shared-memory row
};

// Byte offsets of the dynamic shared memory; the same function sizes the launch.
struct SharedMemoryPlan {
  int q = 0;                // bf16 [heads per CTA][row stride]
  int tile = 0;             // bf16 [kTile][row stride], the dequantised fp8 tile (fp8 only)
  int raw = 0;              // kStages × raw_stage_bytes: entries as loaded
  int raw_stage_bytes = 0;
  int raw_stride = 0;       // bytes per entry in a raw stage
  int exchange = 0;         // fp32 [warps][16][32]: partial scores of the dim halves
  int phys = 0;             // int32 [kResolveSlots]: physical entry per slot, −1 = unused
  int valid = 0;            // int32 [kStages][kTile]
  int total = 0;
};

inline int align16(int x) { return (x + 15) / 16 * 16; }

inline SharedMemoryPlan make_shared_memory_plan(int head_dim, int head_tiles, const KvEntryLayout& layout) {
  const int dim_splits = head_dim == 512 ? 2 : 1;
  const int row_bytes = (head_dim + 8) * 2;
  const bool fp8 = layout.format == KvEntryFormat::Fp8Reference;
  SharedMemoryPlan plan;
  int offset = 0;
  plan.q = offset;
  offset += align16(16 * head_tiles * row_bytes);
  plan.tile = offset;
  offset += fp8 ? align16(kTile * row_bytes) : 0;
  plan.raw_stride = fp8 ? layout.entry_bytes : row_bytes;
  plan.raw_stage_bytes = align16(kTile * plan.raw_stride);
  plan.raw = offset;
  offset += kStages * plan.raw_stage_bytes;
  plan.exchange = offset;
  offset += dim_splits > 1 ? head_tiles * dim_splits * 16 * 32 * 4 : 0;
  plan.phys = offset;
  offset += kResolveSlots * 4;
  plan.valid = offset;
  offset += kStages * kTile * 4;
  plan.total = offset;
  return plan;
}

using ptx::cp_async_commit;
using ptx::cp_async_or_zero;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::shared_address;
using namespace sparse_attention_math;

// The same for a thread's two fragment rows, heads `head`.
__device__ __forceinline__ void inverse_softmax_denominators(const float (&sink_log2)[2], const float (&row_max)[2],
                                                             const float (&row_sum)[2],
                                                             float (&inverse_denominator)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
    inverse_denominator[r] = inverse_softmax_denominator(sink_log2[r], row_max[r], row_sum[r]);
}

// One tile's online-softmax step for a thread's mma score fragment: s[4n + e] is the score of entry 8n + 2c + e % 2
// for row g + 8 (e / 2) of the thread's 16-row block, in log2 units after scale_log2; entries whose `valid` flag is 0
// score −inf. Updates the row's reference max (kRescaleLog2) and sum, gives the factor that rescales the old
// accumulators of each row (exactly 1 while the reference stays), and P as the bf16 A fragments of the PV product. P is
// rounded to bf16 once and the row sums add the rounded weights, so PV applies exactly the weights that are normalised.
__device__ __forceinline__ void online_softmax_tile(float (&s)[kTile / 2], const int32_t* valid, int c,
                                                    float scale_log2, float (&row_max)[2], float (&row_sum)[2],
                                                    float (&alpha)[2], uint32_t (&p_frag)[kTile / 16][4]) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < kTile / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[4 * n + e] = valid[8 * n + 2 * c + (e % 2)] != 0 ? s[4 * n + e] * scale_log2 : -INFINITY;
      tile_max[e / 2] = fmaxf(tile_max[e / 2], s[4 * n + e]);
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xFFFFFFFFu, tile_max[r], 1));
    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xFFFFFFFFu, tile_max[r], 2));
    // −inf + kRescaleLog2 = −inf: the first valid entries always set the reference.
    const float new_max = tile_max[r] > row_max[r] + kRescaleLog2 ? tile_max[r] : row_max[r];
    // A row with no valid entry yet keeps max −inf; subtracting 0 then keeps exp2(−inf) = 0 and avoids NaN.
    const float reference = new_max == -INFINITY ? 0.0f : new_max;
    alpha[r] = fast_exp2(row_max[r] - reference);
    row_max[r] = new_max;
    row_sum[r] *= alpha[r];
  }
  const float reference[2] = {row_max[0] == -INFINITY ? 0.0f : row_max[0],
                               row_max[1] == -INFINITY ? 0.0f : row_max[1]};
#pragma unroll
  for (int n = 0; n < kTile / 8; ++n) {
    // Each row's pair rounded to bf16 by one pack; the sums add the packed values (a bf16 is the high half of its
    // float).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t w = pack_bf16x2(fast_exp2(s[4 * n + 2 * r] - reference[r]),
                                     fast_exp2(s[4 * n + 2 * r + 1] - reference[r]));
      row_sum[r] += __uint_as_float(w << 16);
      row_sum[r] += __uint_as_float(w & 0xFFFF0000u);
      p_frag[n / 2][(n % 2) * 2 + r] = w;
    }
  }
}

// Slots of query t: its window slots, then its first compressed_counts[t] compressed slots (all of them without
// counts; a count is clamped to [0, compressed_slots]).
__device__ __forceinline__ int64_t query_slot_count(const SparseAttentionParams& p, int64_t t) {
  int compressed = p.compressed_slots;
  if (p.compressed_counts != nullptr) compressed = min(max(p.compressed_counts[t], 0), p.compressed_slots);
  return int64_t(p.window_slots) + compressed;
}

// The slot range [begin, end) of split `split` of query t's slot list, in whole tiles; the splits share the query's
// own count evenly (a split past it gets no tiles and reports an empty partial).
struct SlotRange {
  int64_t begin = 0, end = 0;
  int tiles = 0;
};

__device__ __forceinline__ SlotRange split_slot_range(const SparseAttentionParams& p, int64_t t, int split) {
  const int64_t total_slots = query_slot_count(p, t);
  // 32-bit division (a 64-bit one is a subroutine call on the start-up path); tiles < 2^31.
  const int total_tiles = int((total_slots + kTile - 1) / kTile);
  const int tiles_per_split = (total_tiles + p.splits - 1) / p.splits;
  SlotRange range;
  range.begin = int64_t(split) * tiles_per_split * kTile;
  range.end = min(total_slots, range.begin + tiles_per_split * kTile);
  range.tiles = range.end > range.begin ? int((range.end - range.begin + kTile - 1) / kTile) : 0;
  return range;
}

// Logical row of slot `s` of query t: its window or compressed index entry (−1 = unused).
__device__ __forceinline__ int32_t slot_row(const SparseAttentionParams& p, int64_t t, int64_t s) {
  return s < p.window_slots ? p.window_index[t * p.window_slots + s]
                            : p.compressed_index[t * p.compressed_slots + (s - p.window_slots)];
}

// The (query, head block, split) of this CTA. Splits vary fastest, so that the splits of one (query, head block) are
// consecutive blocks: one cluster when they merge in a cluster.
struct CtaWork {
  int64_t t = 0;
  int head_block = 0, split = 0;
};

__device__ __forceinline__ CtaWork cta_work(const SparseAttentionParams& p, int head_blocks) {
  // 32-bit division: 64-bit ones are subroutine calls at the head of every CTA's critical path.
  unsigned flat = blockIdx.x;
  CtaWork work;
  work.split = int(flat % unsigned(p.splits));
  flat /= unsigned(p.splits);
  work.head_block = int(flat % unsigned(head_blocks));
  work.t = int64_t(flat / unsigned(head_blocks));
  return work;
}

// ---- the attention kernel ----

template <int kHeadDim, int kHeadTiles, bool kFp8>
__global__ void __launch_bounds__(TileConfig<kHeadDim, kHeadTiles>::kThreads, 1)
    sparse_attention_kernel(const __grid_constant__ SparseAttentionParams p, const SharedMemoryPlan plan,
                            const int head_blocks) {
  using Config = TileConfig<kHeadDim, kHeadTiles>;
  constexpr int kThreads = Config::kThreads;
  constexpr int kWarpDims = Config::kWarpDims;
  constexpr int kRowStride = Config::kRowStride;
  constexpr int kRowBytes = kRowStride * 2;
  extern __shared__ __align__(16) uint8_t smem[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(smem + plan.q);
  int32_t* phys_of_slot = reinterpret_cast<int32_t*>(smem + plan.phys);
  int32_t* slot_valid = reinterpret_cast<int32_t*>(smem + plan.valid);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int head_tile = warp % kHeadTiles, dim_split = warp / kHeadTiles;
  const int dim_begin = dim_split * kWarpDims;
  // Programmatic dependent launch: everything below may read what earlier kernels wrote.
  allow_dependents();
  wait_for_prior_grids();
  const CtaWork work = cta_work(p, head_blocks);
  const int split = work.split;
  const int64_t t = work.t;
  const int head_base = work.head_block * Config::kHeadsPerCta;
  const KvCacheView& cache = p.cache;
  const KvEntryLayout& layout = cache.layout;

  // This split's slots of the query's window ∪ compressed list.
  const SlotRange range = split_slot_range(p, t, split);
  const int64_t range_begin = range.begin, range_end = range.end;
  const int num_tiles = range.tiles;
  const int sequence_slot = p.sequence_slots[t];

  // Physical entries of the slots [range_begin + first, +kResolveSlots).
  const auto resolve_slots = [&](int64_t first) {
    for (int i = tid; i < kResolveSlots; i += kThreads) {
      const int64_t s = range_begin + first + i;
      int32_t phys = -1;
      if (s < range_end) {
        const int32_t row = slot_row(p, t, s);
        phys = slot_physical(cache, slot_page(p, sequence_slot, s, row), row);
      }
      phys_of_slot[i] = phys;
    }
  };

  // Starts the copies of tile j into its ring stage (one commit group per call, empty past the last tile).
  const auto issue_tile = [&](int j) {
    if (j < num_tiles) {
      const int stage = j % kStages;
      const int base = (j * kTile) % kResolveSlots;
      uint8_t* raw = smem + plan.raw + stage * plan.raw_stage_bytes;
      if (tid < kTile) slot_valid[stage * kTile + tid] = phys_of_slot[base + tid] >= 0;
      constexpr int kChunkBytes = kFp8 ? 8 : 16;
      const int chunks = (kFp8 ? layout.entry_bytes : kHeadDim * 2) / kChunkBytes;
      for (int c = tid; c < kTile * chunks; c += kThreads) {
        const int n = c / chunks, k = c - n * chunks;
        const int32_t phys = phys_of_slot[base + n];
        const uint8_t* src = phys >= 0 ? cache.entry_address(phys) + k * kChunkBytes : cache.pool;
        cp_async_or_zero<kChunkBytes>(shared_address(raw + n * plan.raw_stride + k * kChunkBytes), src, phys >= 0);
      }
    }
    cp_async_commit();
  };

  float o_acc[kWarpDims / 8][4];
#pragma unroll
  for (int j = 0; j < kWarpDims / 8; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, log2 domain
  float row_sum[2] = {0.0f, 0.0f};            // this thread's columns only until the end
  const float scale_log2 = p.softmax_scale * kLog2e;

  // ldmatrix lane addresses (see the fragment layouts of mma.m16n8k16).
  const int g = lane / 4, c = lane % 4;
  const uint32_t q_lane =
      shared_address(q_tile + (head_tile * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * kRowStride + 8 * (lane / 16));
  const int k_lane_offset = ((lane % 8) + 8 * (lane / 16)) * kRowBytes + 8 * ((lane / 8) % 2) * 2;
  const int v_lane_offset = ((lane % 8) + 8 * ((lane / 8) % 2)) * kRowBytes + 8 * (lane / 16) * 2;

  resolve_slots(0);
  __syncthreads();
  issue_tile(0);
  issue_tile(1);

  // Q of this head block, bf16 in shared memory (heads past H zero), loaded while the first tiles are in flight:
  // batches of independent 16-byte loads, all issued before any store, so their latencies overlap.
  {
    constexpr int kVectorsPerThread = Config::kHeadsPerCta * kHeadDim / 8 / kThreads;
    constexpr int kBatch = kVectorsPerThread < 4 ? kVectorsPerThread : 4;
    static_assert(kVectorsPerThread % kBatch == 0, "Q vectors split evenly over the threads");
#pragma unroll
    for (int first = 0; first < kVectorsPerThread; first += kBatch) {
      float4 lo[kBatch], hi[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int i = (first + b) * kThreads + tid;
        const int h = head_base + i / (kHeadDim / 8);
        const int64_t offset = (t * p.heads + h) * kHeadDim + (i % (kHeadDim / 8)) * 8;
        lo[b] = hi[b] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (h >= p.heads) continue;
        if (p.q_dtype == AttentionDtype::Bf16) {
          lo[b] = *reinterpret_cast<const float4*>(static_cast<const __nv_bfloat16*>(p.q) + offset);
        } else {
          lo[b] = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + offset);
          hi[b] = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + offset + 4);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int i = (first + b) * kThreads + tid;
        // Bf16 q: lo holds the 8 bf16 values as raw bits.
        const uint4 packed = p.q_dtype == AttentionDtype::Bf16
                                 ? *reinterpret_cast<const uint4*>(&lo[b])
                                 : make_uint4(pack_bf16x2(lo[b].x, lo[b].y), pack_bf16x2(lo[b].z, lo[b].w),
                                              pack_bf16x2(hi[b].x, hi[b].y), pack_bf16x2(hi[b].z, hi[b].w));
        *reinterpret_cast<uint4*>(q_tile + (i / (kHeadDim / 8)) * kRowStride + (i % (kHeadDim / 8)) * 8) = packed;
      }
    }
  }

  for (int i = 0; i < num_tiles; ++i) {
    const int stage = i % kStages;
    cp_async_wait<1>();
    const bool any_valid = __syncthreads_or(tid < kTile && slot_valid[stage * kTile + tid]) != 0;
    const int next = i + 2;
    if (next < num_tiles && (next * kTile) % kResolveSlots == 0) {
      resolve_slots(int64_t(next) * kTile);
      __syncthreads();
    }
    issue_tile(next);
    if (!any_valid) continue;

    uint8_t* raw = smem + plan.raw + stage * plan.raw_stage_bytes;
    const uint8_t* kv_tile = raw;
    if constexpr (kFp8) {
      __nv_bfloat16* tile = reinterpret_cast<__nv_bfloat16*>(smem + plan.tile);
      const int nope_groups = layout.nope_dim / 8, groups = nope_groups + layout.rope_dim / 4;
      for (int x = tid; x < kTile * groups; x += kThreads) {
        const int n = x / groups, group = x - n * groups;
        const uint8_t* entry = raw + n * layout.entry_bytes;
        __nv_bfloat16* row = tile + n * kRowStride;
        if (group < nope_groups) {
          const uint2 codes = *reinterpret_cast<const uint2*>(entry + 8 * group);
          const float scale = e8m0_to_float(entry[layout.scale_offset + 8 * group / kKvFp8BlockSize]);
          const uint4 values = make_uint4(e4m3x2_to_bf16x2(uint16_t(codes.x), scale),
                                          e4m3x2_to_bf16x2(uint16_t(codes.x >> 16), scale),
                                          e4m3x2_to_bf16x2(uint16_t(codes.y), scale),
                                          e4m3x2_to_bf16x2(uint16_t(codes.y >> 16), scale));
          *reinterpret_cast<uint4*>(row + 8 * group) = values;
        } else {
          const int r = group - nope_groups;
          *reinterpret_cast<uint2*>(row + layout.nope_dim + 4 * r) =
              *reinterpret_cast<const uint2*>(entry + layout.rope_offset + 8 * r);
        }
      }
      __syncthreads();
      kv_tile = reinterpret_cast<const uint8_t*>(tile);
    }
    const uint32_t kv_base = shared_address(kv_tile);

    // S = Q Kᵀ over this warp's dims.
    float s_acc[kTile / 8][4];
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) s_acc[j][0] = s_acc[j][1] = s_acc[j][2] = s_acc[j][3] = 0.0f;
#pragma unroll 4
    for (int kk = 0; kk < kWarpDims; kk += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, q_lane + (dim_begin + kk) * 2);
#pragma unroll
      for (int nb = 0; nb < kTile / 16; ++nb) {
        uint32_t b[4];
        ldmatrix_x4(b, kv_base + nb * 16 * kRowBytes + k_lane_offset + (dim_begin + kk) * 2);
        ptx::mma_m16n8k16_bf16_f32(s_acc[2 * nb], a, b[0], b[1]);
        ptx::mma_m16n8k16_bf16_f32(s_acc[2 * nb + 1], a, b[2], b[3]);
      }
    }
    if constexpr (Config::kDimSplits > 1) {
      float* exchange = reinterpret_cast<float*>(smem + plan.exchange);
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) exchange[(warp * 16 + j * 4 + e) * 32 + lane] = s_acc[j][e];
      __syncthreads();
      const float* half0 = exchange + (head_tile * 16) * 32;
      const float* half1 = exchange + ((kHeadTiles + head_tile) * 16) * 32;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_acc[j][e] = half0[(j * 4 + e) * 32 + lane] + half1[(j * 4 + e) * 32 + lane];
    }

    // Online softmax (log2 domain); unused slots score −inf.
    float alpha[2];
    uint32_t p_frag[kTile / 16][4];
    online_softmax_tile(reinterpret_cast<float(&)[kTile / 2]>(s_acc), slot_valid + stage * kTile, c, scale_log2,
                        row_max, row_sum, alpha, p_frag);
#pragma unroll
    for (int j = 0; j < kWarpDims / 8; ++j) {
      o_acc[j][0] *= alpha[0];
      o_acc[j][1] *= alpha[0];
      o_acc[j][2] *= alpha[1];
      o_acc[j][3] *= alpha[1];
    }

    // O += P V over this warp's dims.
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kWarpDims / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, kv_base + ks * 16 * kRowBytes + v_lane_offset + (dim_begin + np * 16) * 2);
        ptx::mma_m16n8k16_bf16_f32(o_acc[2 * np], p_frag[ks], b[0], b[1]);
        ptx::mma_m16n8k16_bf16_f32(o_acc[2 * np + 1], p_frag[ks], b[2], b[3]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 2);
  }
  const int head[2] = {head_base + head_tile * 16 + g, head_base + head_tile * 16 + g + 8};

  if (p.splits > 1) {
    // Unnormalised partial output and its (max, sum); sparse_attention_combine_kernel merges the splits.
    float* partial_out = static_cast<float*>(p.workspace);
    float2* partial_stats = reinterpret_cast<float2*>(partial_out + int64_t(p.splits) * p.tokens * p.heads * kHeadDim);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (head[r] >= p.heads) continue;
      const int64_t row = (int64_t(split) * p.tokens + t) * p.heads + head[r];
      if (dim_split == 0 && c == 0) partial_stats[row] = make_float2(row_max[r], row_sum[r]);
#pragma unroll
      for (int j = 0; j < kWarpDims / 8; ++j)
        *reinterpret_cast<float2*>(partial_out + row * kHeadDim + dim_begin + 8 * j + 2 * c) =
            make_float2(o_acc[j][2 * r], o_acc[j][2 * r + 1]);
    }
    return;
  }

  const float sink_log2[2] = {head_sink_log2(p, head[0]), head_sink_log2(p, head[1])};
  float inverse_denominator[2];
  inverse_softmax_denominators(sink_log2, row_max, row_sum, inverse_denominator);
  const int64_t position = p.rope_frequencies != nullptr ? p.positions[t] : 0;
#pragma unroll
  for (int j = 0; j < kWarpDims / 8; ++j) {
    const int dim = dim_begin + 8 * j + 2 * c;
    store_output_fragment(p, t, head, kHeadDim, dim, o_acc[j], inverse_denominator,
                          p.rope_frequencies != nullptr && dim >= layout.nope_dim, [&] {
                            return rope_factors(position, p.rope_frequencies[(dim - layout.nope_dim) / 2]);
                          });
  }
}

// ---- the head_dim 512 kernel: a producer warpgroup and two wgmma consumer warpgroups ----
//
// One CTA = one query × 64 heads × one split of the query's slot list, 384 threads:
// - warpgroup 0, the producer: all 128 threads resolve the physical entries of 128 slots (4 tiles) at a time, one
//   chunk ahead, the dependent index and page-table loads spread over three tiles so that no thread waits on them;
//   each warp fetches 8 of a tile's entries, one bulk copy each, into a ring of raw stages (completion on an mbarrier);
//   then all four warps expand a raw stage into a bf16 KV stage in the 128B-swizzled layout wgmma reads (fp8
//   entries dequantised exactly: e4m3 · 2^k needs ≤ 4 significant bits), zeros for unused slots so that their
//   weight 0 never meets a NaN;
// - warpgroups 1 and 2, the consumers: consumer c owns dims [256c, 256c + 256) of Q and of the output. Per tile:
//   S_c = Q_c K_cᵀ (wgmma m64n32k16, both operands in shared memory), each consumer adds the other's partial scores
//   (read from shared memory) to its own (fp32 addition commutes: both consumers hold identical S), online softmax in
//   registers, then O_c += P V_c with wgmma m64n256k16 (P from registers, V = the same KV stage read N-major).
// So every entry crosses the SM once, is dequantised once, and feeds all 64 heads per wgmma; the old kernel's
// per-head-tile re-reads of K and V through ldmatrix are gone.
// bf16 entries (session 19) skip the raw stages and the expansion pass: each producer thread copies its 16-byte chunks
// of an entry straight to their swizzled places by cp.async (d512_produce_bf16), four KV stages deep; a single
// split's epilogue stores from a rolled loop over accumulators staged in shared memory (d512_store_single_split).
//
// NOTES:
// - A 584-byte fp8 entry is only 8-byte aligned; the copy engine needs 16. Each entry is fetched as the 592-byte
//   16-aligned span that holds it (starting 8 bytes early for odd entry numbers, ending 8 bytes late for even ones).
//   Both neighbours lie on the same page when pages hold ≥ 2 entries (pages are page_rows-aligned runs of entries),
//   so the span never leaves allocated memory; run_sparse_attention takes the old kernel for 1-entry pages.
// - Swizzled layout (ptx/wgmma.cuh): a 64-dim block of R rows is R × 128 bytes; the 16-byte chunk c of row r sits at
//   chunk c ^ (r % 8). Q: 8 blocks of 64 heads; a KV stage: 8 blocks of 32 entries. For PV the same bytes are the
//   N-major B operand: K = entries (8-row groups 1024 bytes apart, the stride-dimension offset), N = dims (64-dim
//   blocks kKvBlockBytes apart, the leading-dimension offset).
// - KV stages: the producer fills ahead while the consumers use stage j % kKvStages (two stages for fp8 entries, four
//   for bf16). Exchange buffers alternate with the tile (j % 2), so one named barrier per tile orders the partial
//   scores. A consumer issues tile j's QKᵀ before it waits for tile j − 1's PV (the two run back to back on the tensor
//   cores), then releases tile j − 1's stage to the producer.
// - Measured on an H200 (session 11, ncu PC sampling on Flash CSA, batch 256): the producer set the pace at ≈ 4.5 µs
//   per 32-entry tile whether entries came from HBM or L2. Consumers spent a third of their samples waiting on
//   kv_full; the producer half its time in the expansion loop (a branchy, dependent shared-load → convert → store
//   chain per chunk: latency-bound with four warps), a fifth in the producer barrier while warp 0 alone issued the
//   32 bulk copies (each copy loops the issuing lane through uniform registers), and the per-tile warp-0 index →
//   page-table lookups before that. Hence the chunked resolve ahead, the copies spread over the four warps and the
//   branch-free expansion with each entry's loads ahead of its conversions. 8-byte cp.async copies by all producer
//   threads instead of bulk copies measured 10-20 % slower (prefill). With those and the consumer changes: ≈ 1.7 µs
//   per tile (consumer-bound: QKᵀ issue, the score exchange barrier and the softmax; the producer waits), plus a
//   fixed ≈ 20 µs per CTA (the pipeline's chain of dependent round trips) that sets batch ≤ 8 decode at ≈ 23 µs.
//   Next: 64-entry tiles with one warpgroup computing the scores over all 512 dims (no exchange), and a shorter
//   start-up chain.
// - Cluster merge (session 12): with 2-8 splits launched as one cluster per (query, head block), each CTA leaves its
//   unnormalised partial output (64 heads × 512 dims fp32, over the Q and KV stages, which are free by then) and its
//   (max, sum) per head in its own shared memory; after a cluster barrier CTA `split` reads slice `split` of every
//   peer's partial through distributed shared memory, merges, rotates and stores it; a second barrier keeps each
//   CTA's shared memory alive until its peers have read it. This replaces the combine kernel (≈ 6.5 µs under ncu at
//   batch 1, mostly its own start-up and dependent loads) and its workspace round trip. The partial's rows are
//   kMergeRowFloats = 520 floats apart: a warp's float2 stores (8 rows × 4 column pairs) then fall on distinct banks
//   in two wavefronts.
// - Programmatic dependent launch: before griddepcontrol.wait the CTA asks L2 for its first inputs
//   (d512_prefetch_inputs), initialises its barriers and the consumers load the sink and the rope frequencies
//   (weights); the query position is loaded right after it and the inverse-RoPE factors are evaluated while Q loads,
//   so that none of this sits on the epilogue's critical path.
// - Batch-1 start-up (ncu, session 12, Flash SWA, 4 splits of one tile): ≈ 25K active cycles per CTA at 1.49 GHz,
//   the same with a cold or a warm L2; ≈ 1.5K instructions per warp at ≈ 14 cycles each (long scoreboard 4.3, no
//   instruction 2.7, wait 1.6, LSU throttle 1.6, barrier 1.1 cycles per issue): a long serial chain of low-ILP phases
//   (index → page → bulk copy → expansion → QKᵀ → exchange → softmax → PV → epilogue), not one large stall. 64-bit
//   divisions (subroutine calls) were taken off its head.
// - Batch 1 (session 13, H200, bench_cuda_attention --sweep, L2 flushed): a CTA costs ≈ 13-16 µs fixed plus ≈ 2 µs per
//   tile (Flash SWA, 4 tiles: 21.4 µs in one CTA, 18.8 µs in a 4-CTA cluster; CSA, 20 tiles: 53.3 µs in one CTA,
//   20.9 µs in a 10-CTA cluster). ncu (7-CTA cluster, 3 tiles each): ≈ 3.6K instructions per consumer warp at ≈ 11
//   cycles each set the time: the Q load's per-chunk index arithmetic ≈ 900 (now ≈ 150), the cluster merge ≈ 1.1K
//   (16-wide unrolled loads with zero-fills for 7 peers; now unrolled to 8 or 16 as needed, no zero-fills), ≈ 470 per
//   tile. The producer warps spend the merge in the cluster barrier.
// - Session 14 (SASS counts, sm_90a): the 4-split merge executed ≈ 1250 instructions per consumer thread, most of them
//   rebuilding the distributed window address (S2R SR_SWINHI and moves) before each ld.shared::cluster and 8-wide
//   predicated loads for 4 peers; with generic mapped pointers, power-of-two unrolling and per-thread shared dims
//   ≈ 400. The tile loop 480 → 424 (ex2.approx.ftz without exp2f's denormal handling, P rounded by its pack).
//   Time unchanged (H200, bench, Flash SWA batch 1, 4-CTA cluster: 16.0 µs, fp8 and bf16 entries): ncu (bf16 entries,
//   20.9 µs at base clock) puts 43 % of the consumers' samples in the merge, most in its distributed shared-memory
//   loads (stall_lg: 128 KB of fp32 partials per CTA cross the SM-to-SM network), then instruction-cache misses and
//   the factors' barrier; the Q load 15 %, the tile 16 %, the start 14 %, waiting for the producer's first tile ≈ 10 %.
//   Hence cluster_merge_bf16_partials (half the bytes).
// - Session 15 (H200, bench, L2 flushed, bf16 q, fp8 entries): each consumer scoring all 512 dims itself (32 wgmma
//   k-steps, no exchange buffer or barrier per tile) was slower at every batch: Flash SWA batch 1 15.7 vs 15.5 µs,
//   CSA 64K batch 64 34.5 vs 31.8, batch 256 102.2 vs 92.8; dropped. Batch 1-8 now takes the head-split kernel below.
// - Session 20 (H200, bf16 entries): the consumers' tensor-core work alone (bench_cuda_attention --mma-rates, a CTA per
//   SM, both consumers) is 0.52 µs per tile (QKᵀ 0.24, PV 0.29; QKᵀ as m64n64k16 over 64 entries 0.155 per 32),
//   against ≈ 1.3-1.9 µs per tile in the kernel (Flash CSA 64K: batch 128, one wave of 20-tile CTAs, 43 µs; batch 64,
//   10 tiles, 30 µs). ncu (Flash CSA 4K batch 256): tensor pipe 32 % of its cycles, shared pipe 32 %, LSU data pipe
//   50 %, issue 25 %; stalls per issue: long scoreboard 2.2, wait 1.6, barrier 1.5, MIO throttle 1.0, gmma 0.07. So
//   the tiles wait on their entries' arrival (the producer's copies and the four stages' depth), not on the tensor
//   cores: issuing tile j's QKᵀ ahead of tile j − 1's PV, so that tile j's exchange and softmax ran beside that PV
//   (same bits; no wgmma in flight across a step, else ptxas serializes them all), was 3-5 % slower (the stage held
//   through the softmax: Flash CSA 64K batch 256 78.2 → 81.1 µs, Pro batch 128 75.8 → 79.4); removed.
// - Session 21 (H200, bf16 entries, bench_cuda_attention --trace: one cold call, medians per wave; Flash CSA 64K
//   batch 128, one wave of 20-tile CTAs, 47 µs by events): the grid wait returns at 2.5 µs (behind the bench's L2
//   flush), the first tile's copies are issued at 6.7 (index → page table → copies) and it arrives at 8.0; tiles then
//   arrive 1.44 µs apart; the middle tile from its arrival: QKᵀ done (behind the previous PV) 0.61 µs, scores
//   exchanged 0.22, softmax 0.39, PV issued 0.03, so the consumers' chain is ≈ 1.25 of the 1.44 µs and the tensor
//   cores idle through the exchange and softmax; the last tile arrives at 35.4, the loop ends at 36.9, the fp32 output
//   is stored by 41.4. With two splits (batch 64) the cluster merge takes 8-9 µs from its first barrier to the end
//   (Flash CSA 64K: loop end 22.1, barrier 23.4, end 31.5; Flash HCA 4K: 11.5, 12.7, 21.4): the largest fixed cost
//   at batch 64. Measured and removed: entries by TMA (see d512_produce_bf16), and each consumer step waiting for the
//   previous PV and releasing its stage before waiting for its tile (one more stage in flight; same bits): slower
//   everywhere (bench --route --bf16-kv, same process: Flash CSA 64K b64 30.5 → 30.9 µs, b128 43.3 → 43.9, b256 78.3
//   → 80.3, Flash HCA 4K b64 18.7 → 19.0, b256 38.4 → 39.0, Pro CSA 64K b64 41.1 → 41.9, b128 75.9 → 77.3): the
//   consumers, not the ring, set the pace.
// - Session 22 (H200, bench --route --bf16-kv, same process): tile j + 1's QKᵀ issued before tile j's softmax weights
//   and waited for after tile j's PV, tile j + 1's score exchange then running beside that PV (same bits; ptxas kept
//   the wgmma pipeline only with the softmax split into its reference part and its weights, the rescale after a
//   wait for every group, unconditional QKᵀ sites and the summed scores fenced) was level or slower: Flash CSA 64K
//   b64 31.3 → 30.9 µs, b256 78.6 → 78.5, Flash HCA 4K b64 18.8 → 19.6, Pro CSA 64K b64 41.5 → 41.8. Its trace
//   (Flash CSA 64K b64): tiles 1.458 → 1.525 µs apart, the middle tile's softmax phase waiting for the next tile;
//   the last tile's copies take 3.3 µs from issue to arrival (the first 1.5): the loop is paced by the entries'
//   arrival, not by the consumers' chain (session 21 read that chain as the pace; shortening it moved nothing).
//   The 2-split cluster merge (same trace): loop end 21.4 µs, partial written 22.0, first cluster barrier 22.6,
//   merge factors ready 26.3 (the first batch's remote loads in flight, the peers' stats), output stored 30.8.
//   Round s22-2: the two splits' halves handed over through L2 instead (each CTA wrote the 64 KB of accumulators
//   whose rows its peer merges to the workspace in fragment order, one release / acquire cluster barrier, the peer's
//   half staged into the free KV stages by cp.async and merged with the registers; same bits, test passed) was level:
//   Flash CSA 64K b64 30.4 → 30.5 µs, Flash HCA 4K b64 18.9 → 19.0 (round 1: 31.3 → 30.8, 18.8 → 18.8): the
//   bytes (64 KB a CTA each way, 8 MB of fp32 output at b64) cost as much through L2 as through the SM-to-SM
//   network. A warm-L2 trace (no flush; Flash CSA 64K b64) keeps the tile pace at 1.429 µs against 1.493 cold.
// - Session 23 (H200, bench --ab --bf16-kv, same process, off / on alternating, bytes compared; two rounds): level or
//   slower, all removed: the two-split merge by push (after one cluster barrier each consumer thread st.asyncs one of
//   its two fragment rows into the peer's free Q area, completing on an mbarrier there, and merges the other; same
//   bits): Flash CSA 64K b64 30.8 / 30.9 → 30.4 / 30.3 µs in round 1, 30.3 / 29.7 → 30.8 / 30.1 in round 2, HCA 4K
//   b64 18.8 / 18.7 → 18.4 / 18.9, 18.8 / 18.9 → 18.3 / 18.4, SWA b64 17.0 / 17.1 → 17.2 / 17.2; its trace: the rows
//   land 2.0 µs after the barrier (the loads' factors 2.7-2.9), then the stores take 6.0-7.4 µs (the loads' 5.0-5.1):
//   the merge's time is its output stores. The output rows staged in shared memory and stored in whole 16-byte row
//   segments (single split and push; unrolled: the rolled loop of session 24 is kept): slower (CSA b64 29.7 / 29.4 →
//   30.4 / 30.8, b256 77.4 / 78.0 → 80.5 / 80.7).
//   The query's page-table lines asked of L2 before the grid wait (sequence slot and position loaded at the start):
//   CSA b64 30.9 / 30.7 → 30.0 / 29.9 and b256 79.2 / 79.1 → 78.7 / 77.8 in round 1, level in round 2 (30.2 / 30.0 →
//   29.8 / 30.1, 79.0 / 78.8 → 79.3 / 78.6, HCA 18.3 / 18.4 → 18.2 / 18.3). The first two tiles' entries asked of L2
//   before the wait (through the index as it stands, as the head-split path's early entries): the producer's wait
//   1 µs later, nothing gained (30.7 / 30.9 → 30.5 / 30.5). The producer's code laid out after the prologue (the
//   default places it ≈ 260 KB past it, after the consumer's): level (31.2 / 30.9 → 30.9 / 30.9). Cold trace of the
//   start (CSA b64, new marks): grid wait 2.7-3.3 µs after the CTA's start, index rows +1.3-1.6, page entries +0.5,
//   first copies issued +0.8-1.0, the first tile +1.5-1.6.
// - Session 24 (numbers in bench/NOTES.md): the bench flushes L2 by a read sweep (a memset left dirty lines that each
//   call's misses wrote back). Kept: the merge factors formed by the idle producer warpgroup and the single-split
//   epilogue from staged accumulators in a rolled loop (code run once per CTA from cold instruction caches). Level and
//   removed: the own partial read through its local address, the two-split merge's peer rows by one cp.async.bulk.

inline constexpr int kD512HeadDim = 512;
inline constexpr int kD512Heads = 64;  // one wgmma M
inline constexpr int kWarpgroupThreads = 128;
inline constexpr int kD512Threads = 3 * kWarpgroupThreads;
inline constexpr int kD512ProducerRegisters = 72;
inline constexpr int kD512ConsumerRegisters = 216;
inline constexpr int kDimBlocks = 8;                         // 64-dim blocks (one 128-byte swizzle row each)
inline constexpr int kQBlockBytes = kD512Heads * 128;        // 8 KB
inline constexpr int kKvBlockBytes = kTile * 128;            // 4 KB
inline constexpr int kKvStageBytes = kDimBlocks * kKvBlockBytes;
inline constexpr int kFp8SpanBytes = 592;                    // a 584-byte entry as a 16-aligned span
inline constexpr int kFp8NopeDim = 448, kFp8RopeOffset = 448, kFp8ScaleOffset = 576, kFp8EntryBytes = 584;
inline constexpr int kIssueSlotsPerWarp = kTile / 4;         // bulk copies each producer warp issues per tile
inline constexpr int kD512ResolveSlots = kWarpgroupThreads;  // slots per resolved chunk (4 tiles), one per thread
// Named barriers: kQBarrier + consumer for each consumer's Q; kMergeFactorsBarrier: the producer's merge factors.
inline constexpr int kProducerBarrier = 1, kExchangeBarrier = 2, kQBarrier = 3, kMergeFactorsBarrier = 5;
inline constexpr int kMergeRowFloats = kD512HeadDim + 8;     // row stride of a CTA's partial output in a cluster merge
inline constexpr int kMergeRowBf16 = kD512HeadDim + 8;       // the same for bf16 partials (1040 bytes)
// Cluster merge: offsets in the exchange region (free after the loop) of the per-head (max, sum) pairs the peers
// read, this CTA's merge factors [head][split] (up to kSparseAttentionMaxClusterSplits per head) and its inverse-RoPE
// table.
inline constexpr int kMergeStatsOffset = 0, kMergeScaleOffset = 512, kMergeRopeOffset = 8192;
static_assert(kD512ProducerRegisters * kWarpgroupThreads + 2 * kD512ConsumerRegisters * kWarpgroupThreads <= 65536,
              "register budget of one SM");

// Traced launches (SparseAttentionParams::d512_trace): the calling thread stores %globaltimer (ns) in slot `mark` of
// its CTA's record (SparseAttentionTraceMark); at the start also the SM id.
__device__ __forceinline__ void d512_trace_mark(const SparseAttentionParams& p, int mark) {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  uint64_t* record = p.d512_trace + uint64_t(blockIdx.x) * kSparseAttentionTraceSlots;
  if (mark == kD512TraceStart) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    record[kD512TraceSm] = sm;
  }
  record[mark] = now;
}

// fp8 entries: bulk copies of their 592-byte spans into kRawStages raw stages, dequantised by the producer into two
// swizzled KV stages. bf16 entries: 16-byte cp.async copies straight into four swizzled KV stages (no raw stages, no
// expansion pass).
template <bool kFp8>
struct D512Layout {
  static constexpr bool kFp8Entries = kFp8;
  static constexpr int kKvStages = kFp8 ? 2 : 4;
  static constexpr int kRawStages = kFp8 ? 3 : 0;
  static constexpr int kRawEntryBytes = kFp8SpanBytes;
  static constexpr int kRawStageBytes = kTile * kRawEntryBytes;
  static constexpr int kExchangeFloats = 2 * kWarpgroupThreads * 16;  // per buffer: [consumer][4][thread][4]
  static constexpr int kQ = 0;
  static constexpr int kKv = kQ + kDimBlocks * kQBlockBytes;
  static constexpr int kRaw = kKv + kKvStages * kKvStageBytes;
  static constexpr int kExchange = kRaw + kRawStages * kRawStageBytes;
  static constexpr int kPhys = kExchange + 2 * kExchangeFloats * 4;  // int32 [kRawStages][kTile]
  static constexpr int kValid = kPhys + kRawStages * kTile * 4;      // int32 [kKvStages][kTile]
  static constexpr int kResolved = kValid + kKvStages * kTile * 4;   // int32 [2][kD512ResolveSlots]: the chunk ring
  static constexpr int kBarriers = kResolved + (kFp8 ? 2 * kD512ResolveSlots * 4 : 0);  // raw_full[R],
                                                                     // kv_full[kKvStages], kv_empty[kKvStages]
  static constexpr int kBytes = kBarriers + (kRawStages + 2 * kKvStages) * 8;
  static constexpr int kAllocationBytes = kBytes + 1024;             // room to align the base to 1024
  static_assert(kRawStageBytes % 16 == 0 && kBarriers % 8 == 0, "aligned regions");
  // Cluster merge: the partial output overlays Q, the KV stages and the raw stages; the merge's small tables live in
  // the exchange region.
  static constexpr int kMergePartial = 0;
  static_assert(kD512Heads * kMergeRowFloats * 4 <= kExchange, "the merge partial fits below the exchange region");
  static_assert(kMergeScaleOffset >= kD512Heads * 8 &&
                    kMergeRopeOffset >= kMergeScaleOffset + kSparseAttentionMaxClusterSplits * kD512Heads * 4 &&
                    kMergeRopeOffset + kD512HeadDim / 2 * 8 <= 2 * kExchangeFloats * 4,
                "the merge tables fit the exchange region");
};

// The producer of fp8 entries (D512Layout<true>).
__device__ __forceinline__ void d512_produce_fp8(const SparseAttentionParams& p, uint8_t* smem, int64_t t,
                                                 const SlotRange& range) {
  using L = D512Layout<true>;
  constexpr int R = L::kRawStages;
  constexpr int kChunkTiles = kD512ResolveSlots / kTile;
  constexpr int kSlotsPerThread = kD512ResolveSlots / kWarpgroupThreads;
  static_assert(kChunkTiles >= 3, "the three resolve phases of a chunk run during its predecessor's issues");
  const int thread = threadIdx.x % kWarpgroupThreads, warp = thread / 32, lane = thread % 32;
  uint64_t* raw_full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* kv_full = raw_full + R;
  uint64_t* kv_empty = kv_full + L::kKvStages;
  int32_t* raw_phys = reinterpret_cast<int32_t*>(smem + L::kPhys);
  int32_t* tile_valid = reinterpret_cast<int32_t*>(smem + L::kValid);
  int32_t* resolved = reinterpret_cast<int32_t*>(smem + L::kResolved);

  // Physical entries of a chunk of kChunkTiles tiles, resolved by all 128 threads (slot thread + 128 i) in three
  // phases, each of whose loads completes while other work runs: rows, then their page-table entries, then the
  // entries stored into the chunk's half of the `resolved` ring.
  const int sequence_slot = p.sequence_slots[t];  // unconditional: it loads alongside the count that sets the range
  int32_t rows[kSlotsPerThread], pages[kSlotsPerThread];
  const auto slot_of = [&](int chunk, int i) { return range.begin + int64_t(chunk) * kD512ResolveSlots + thread +
                                                      i * kWarpgroupThreads; };
  const auto load_rows = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < kSlotsPerThread; ++i) {
      const int64_t s = slot_of(chunk, i);
      rows[i] = s < range.end ? slot_row(p, t, s) : -1;
    }
  };
  const auto load_pages = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < kSlotsPerThread; ++i) pages[i] = slot_page(p, sequence_slot, slot_of(chunk, i), rows[i]);
  };
  const auto store_resolved = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < kSlotsPerThread; ++i)
      resolved[(chunk % 2) * kD512ResolveSlots + thread + i * kWarpgroupThreads] =
          slot_physical(p.cache, pages[i], rows[i]);
  };
  const int chunks = (range.tiles + kChunkTiles - 1) / kChunkTiles;

  // Tile j into raw stage j % R: warp w fetches slots [8w, 8w + 8), lanes 0-7 one bulk copy each, so the four warps'
  // copy loops (each copy takes the issuing lane through uniform registers, one lane at a time) run side by side.
  const auto issue = [&](int j) {
    const int r = j % R;
    const int slot = warp * kIssueSlotsPerWarp + lane;
    const int32_t phys = lane < kIssueSlotsPerWarp
                             ? resolved[((j / kChunkTiles) % 2) * kD512ResolveSlots + (j % kChunkTiles) * kTile + slot]
                             : -1;
    if (lane < kIssueSlotsPerWarp) raw_phys[r * kTile + slot] = phys;
    const unsigned valid = __ballot_sync(0xFFFFFFFFu, phys >= 0);
    __syncwarp();
    if (lane == 0) sm90::mbarrier_arrive_expect_tx(&raw_full[r], uint32_t(__popc(valid)) * L::kRawEntryBytes);
    if (phys >= 0) {
      const uint8_t* src = p.cache.entry_address(phys) - (phys & 1) * 8;
      ptx::cp_async_bulk_global_to_shared(
          shared_address(smem + L::kRaw + r * L::kRawStageBytes + slot * L::kRawEntryBytes), src, L::kRawEntryBytes,
          shared_address(&raw_full[r]));
    }
  };

  // The first two chunks before any copy: both chunks' index loads, then both chunks' page-table loads, so that a
  // split of more than one chunk pays the two dependent round trips once. Then the first R tiles.
  {
    int32_t first_rows[2][kSlotsPerThread], first_pages[2][kSlotsPerThread];
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk)
#pragma unroll
      for (int i = 0; i < kSlotsPerThread; ++i) {
        const int64_t s = slot_of(chunk, i);  // past the split's last chunk, s ≥ range.end
        first_rows[chunk][i] = s < range.end ? slot_row(p, t, s) : -1;
      }
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk)
#pragma unroll
      for (int i = 0; i < kSlotsPerThread; ++i)
        first_pages[chunk][i] = slot_page(p, sequence_slot, slot_of(chunk, i), first_rows[chunk][i]);
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk)
#pragma unroll
      for (int i = 0; i < kSlotsPerThread; ++i)
        resolved[chunk * kD512ResolveSlots + thread + i * kWarpgroupThreads] =
            slot_physical(p.cache, first_pages[chunk][i], first_rows[chunk][i]);
  }
  sm90::named_barrier_sync<kWarpgroupThreads>(kProducerBarrier);
  for (int j = 0; j < R && j < range.tiles; ++j) issue(j);

  for (int j = 0; j < range.tiles; ++j) {
    const int r = j % R, stage = j % 2;
    sm90::mbarrier_wait(&raw_full[r], (j / R) & 1);
    sm90::mbarrier_wait(&kv_empty[stage], ((j / 2) & 1) ^ 1);
    const uint8_t* raw = smem + L::kRaw + r * L::kRawStageBytes;
    uint8_t* kv = smem + L::kKv + stage * kKvStageBytes;
    if (thread < kTile) tile_valid[stage * kTile + thread] = raw_phys[r * kTile + thread] >= 0;
    // Thread (warp, lane) expands the 16-byte chunk `lane % 8` (8 dims) of all eight 64-dim blocks of entries n0 and
    // n0 + 16; a warp's store writes four whole 128-byte rows. Branch-free, each entry's loads issued before its
    // conversions (the loop is latency-bound otherwise); an unused slot's stale bytes are replaced by zeros.
    const int chunk = lane % 8, n0 = warp * 4 + lane / 8;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = n0 + 16 * e;
      const int32_t phys = raw_phys[r * kTile + n];
      uint4 out[kDimBlocks];
      const uint8_t* entry = raw + n * kFp8SpanBytes + (phys & 1) * 8;
      uint2 codes[kFp8NopeDim / 64];
#pragma unroll
      for (int b = 0; b < kFp8NopeDim / 64; ++b) codes[b] = *reinterpret_cast<const uint2*>(entry + 64 * b + 8 * chunk);
      // The bf16 rope dims are only 8-byte aligned in the span.
      const uint2 rope_lo = *reinterpret_cast<const uint2*>(entry + kFp8RopeOffset + 16 * chunk);
      const uint2 rope_hi = *reinterpret_cast<const uint2*>(entry + kFp8RopeOffset + 16 * chunk + 8);
      const uint2 scales = *reinterpret_cast<const uint2*>(entry + kFp8ScaleOffset);
#pragma unroll
      for (int b = 0; b < kFp8NopeDim / 64; ++b) {
        const float scale = e8m0_to_float(uint8_t((b < 4 ? scales.x >> (8 * b) : scales.y >> (8 * (b - 4))) & 0xFF));
        out[b] = make_uint4(e4m3x2_to_bf16x2(uint16_t(codes[b].x), scale),
                            e4m3x2_to_bf16x2(uint16_t(codes[b].x >> 16), scale),
                            e4m3x2_to_bf16x2(uint16_t(codes[b].y), scale),
                            e4m3x2_to_bf16x2(uint16_t(codes[b].y >> 16), scale));
      }
      out[kDimBlocks - 1] = make_uint4(rope_lo.x, rope_lo.y, rope_hi.x, rope_hi.y);
      // Unused slots are rare: a warp whose entries are all used skips the 32 selects.
      if (!__all_sync(0xFFFFFFFFu, phys >= 0) && phys < 0) {
#pragma unroll
        for (int b = 0; b < kDimBlocks; ++b) out[b] = make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int b = 0; b < kDimBlocks; ++b)
        *reinterpret_cast<uint4*>(kv + b * kKvBlockBytes + n * 128 + ((chunk ^ (n % 8)) * 16)) = out[b];
    }
    sm90::fence_proxy_async_shared();  // the consumers' wgmma reads these generic stores
    sm90::mbarrier_arrive(&kv_full[stage]);
    // Raw stage r is read; refill it with tile n = j + R. While chunk n / kChunkTiles is being issued, the next one
    // is resolved into the ring half its predecessor (all issued) used; the producer barriers of the tiles between
    // publish it to warp 0.
    sm90::named_barrier_sync<kWarpgroupThreads>(kProducerBarrier);
    const int n = j + R;
    if (n < range.tiles) {
      const int next_chunk = n / kChunkTiles + 1;
      if (n >= kChunkTiles && next_chunk < chunks) {
        if (n % kChunkTiles == 0) load_rows(next_chunk);
        if (n % kChunkTiles == 1) load_pages(next_chunk);
        if (n % kChunkTiles == 2) store_resolved(next_chunk);
      }
      issue(n);
    }
  }
}

// The producer of bf16 entries (D512Layout<false>): thread (row0, chunk) = (thread / 8, thread % 8) copies the 16-byte
// chunk `chunk` of all eight 64-dim blocks of entries row0 and row0 + 16 of every tile straight to its swizzled place
// in the tile's KV stage (an unused slot zero-filled, its source never read); the copies arrive on the stage's
// kv_full as they land, the valid flags by a plain arrive after their stores. Lane l of
// warp w resolves (index → page table → entry) the one slot of each 4-tile chunk whose entry lanes of its own warp
// copy: tile l / 8, entry 4w + l % 4 + 16 · ((l / 4) % 2), handed to them by a shuffle; chunk c + 2's resolve runs
// during chunk c's copies (index load at its start, page-table load after its last tile, whose copies thus never wait
// for the index load; at a CTA's start its first four tiles are issued back to back). Session 21 (round 1, H200,
// bench --route --bf16-kv): the copies as TMA boxes instead (the pool as a [entries, 512] bf16 tensor map, eight
// 128-byte boxes per entry in the 128B swizzle, 256 copy instructions per tile instead of 2048; same bits) were
// slower everywhere: Flash CSA 64K b256 78.7 → 110.8 µs, b64 30.5 → 35.5, Pro b64 41.2 → 57.8; the trace: 2.15 µs
// per tile against 1.43 (the TMA unit's rate for 128-byte boxes, ≈ 15 cycles each per SM). kTrace: thread 0 marks the
// first and the last tile's copies issued.
template <bool kTrace>
__device__ __forceinline__ void d512_produce_bf16(const SparseAttentionParams& p, uint8_t* smem, int64_t t,
                                                  const SlotRange& range) {
  using L = D512Layout<false>;
  constexpr int S = L::kKvStages;
  constexpr int kChunkTiles = kD512ResolveSlots / kTile;
  static_assert(kChunkTiles * kTile == kWarpgroupThreads && kTile == 32, "a lane per slot of a chunk, per warp");
  const int thread = threadIdx.x % kWarpgroupThreads, warp = thread / 32, lane = thread % 32;
  const int chunk = thread % 8, row0 = thread / 8;
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* kv_empty = kv_full + S;
  int32_t* tile_valid = reinterpret_cast<int32_t*>(smem + L::kValid);
  const int sequence_slot = p.sequence_slots[t];
  const int tiles = range.tiles, chunks = (tiles + kChunkTiles - 1) / kChunkTiles;
  const int64_t resolve_offset = int64_t(lane / 8) * kTile + 4 * warp + lane % 4 + 16 * ((lane / 4) % 2);
  const auto slot_of = [&](int c) { return range.begin + int64_t(c) * kD512ResolveSlots + resolve_offset; };
  const auto load_row = [&](int c) {
    const int64_t s = slot_of(c);
    return c < chunks && s < range.end ? slot_row(p, t, s) : -1;
  };
  const auto load_page = [&](int c, int32_t row) { return slot_page(p, sequence_slot, slot_of(c), row); };

  // Chunks 0 and 1 before any copy: both index loads, then both page-table loads (two dependent round trips once).
  int32_t current, next;
  {
    const int32_t rows[2] = {load_row(0), load_row(1)};
    // Marks after the loaded values (the test makes them wait for the loads).
    if (kTrace && thread == 0 && (rows[0] & rows[1]) != INT32_MIN) d512_trace_mark(p, kD512TraceRowsLoaded);
    const int32_t pages[2] = {load_page(0, rows[0]), load_page(1, rows[1])};
    if (kTrace && thread == 0 && (pages[0] & pages[1]) != INT32_MIN) d512_trace_mark(p, kD512TracePagesLoaded);
    current = slot_physical(p.cache, pages[0], rows[0]);
    next = slot_physical(p.cache, pages[1], rows[1]);
  }
  const uint32_t kv_base = shared_address(smem + L::kKv);
  for (int c = 0; c < chunks; ++c) {
    const int32_t ahead_row = load_row(c + 2);
    int32_t ahead_page = -1;
#pragma unroll
    for (int i = 0; i < kChunkTiles; ++i) {
      const int j = c * kChunkTiles + i;
      if (j >= tiles) break;
      const int stage = j % S;
      int32_t phys[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) phys[k] = __shfl_sync(0xFFFFFFFFu, current, 8 * i + 4 * k + row0 % 4);
      sm90::mbarrier_wait(&kv_empty[stage], ((j / S) & 1) ^ 1);
      if (chunk == 0) {
        tile_valid[stage * kTile + row0] = phys[0] >= 0;
        tile_valid[stage * kTile + row0 + 16] = phys[1] >= 0;
      }
      const uint32_t stage_base = kv_base + uint32_t(stage * kKvStageBytes);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int n = row0 + 16 * k;
        const uint32_t destination = stage_base + uint32_t(n * 128 + ((chunk ^ (n % 8)) * 16));
        const uint8_t* source = phys[k] >= 0 ? p.cache.entry_address(phys[k]) + chunk * 16 : p.cache.pool;
#pragma unroll
        for (int b = 0; b < kDimBlocks; ++b)
          ptx::cp_async_or_zero<16>(destination + uint32_t(b * kKvBlockBytes), source + b * 128, phys[k] >= 0);
      }
      ptx::cp_async_mbarrier_arrive_noinc(shared_address(&kv_full[stage]));
      sm90::mbarrier_arrive(&kv_full[stage]);
      if (kTrace && thread == 0 && (j == 0 || j + 1 == tiles))
        d512_trace_mark(p, j == 0 ? kD512TraceFirstIssued : kD512TraceLastIssued);
      if (i == kChunkTiles - 1 || j + 1 == tiles) ahead_page = load_page(c + 2, ahead_row);
    }
    current = next;
    next = slot_physical(p.cache, ahead_page, ahead_row);
  }
  ptx::cp_async_wait_all();
}

// Merge factors of entry `index` of each cluster CTA's stats (max, sum) array (merge_factors; splits past `splits`
// contribute nothing).
template <int kMaxSplits>
__device__ __forceinline__ void cluster_merge_factors(const float2* stats, int index, int splits, float sink_log2,
                                                      float (&factor)[kMaxSplits]) {
  float2 split_stats[kMaxSplits];
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s)
    split_stats[s] = s < splits ? sm90::cluster_peer(stats, s)[index] : make_float2(-INFINITY, 0.0f);
  merge_factors(split_stats, sink_log2, factor);
}

// The inverse-RoPE setup of output dims [dim, dim + 2 kPairs): per pair whether it rotates back (`rope` and a rope
// dim) and its factors from `rope_table` (identity otherwise).
template <int kPairs>
__device__ __forceinline__ void inverse_rope_pairs(const KvEntryLayout& layout, bool rope, int dim,
                                                   const RopeFactors* rope_table, bool (&rotate)[kPairs],
                                                   RopeFactors (&factors)[kPairs]) {
#pragma unroll
  for (int pair = 0; pair < kPairs; ++pair) {
    rotate[pair] = rope && dim + 2 * pair >= layout.nope_dim;
    factors[pair] = rotate[pair] ? rope_table[(dim + 2 * pair - layout.nope_dim) / 2] : RopeFactors{1.0f, 0.0f};
  }
}

// The merge factors' vectors in the merge table [head][kMaxSplits] (one 8- or 16-byte load per vector).
template <int kMaxSplits>
using MergeScaleVector = std::conditional_t<kMaxSplits == 2, float2, float4>;

// The cluster merge's factors, formed by the producer warpgroup (idle by then) while the consumers' first batch of
// partials is in flight (d512_cluster_merge): thread h < 64 loads head h's (max, sum) from every CTA of the cluster
// and stores the head's weight 2^(m_s − M) / denominator for each split s (the sink once in the denominator) in the
// merge table; every producer thread then arrives on kMergeFactorsBarrier, where the consumers wait. Formed by the
// consumers, each factor thread's stats loads sat behind its own batch of partials (a thread's distributed
// shared-memory loads return in order).
template <class L, int kMaxSplits>
__device__ __forceinline__ void d512_merge_factors(const SparseAttentionParams& p, uint8_t* smem, float sink_log2) {
  using ScaleVector = MergeScaleVector<kMaxSplits>;
  constexpr int kScaleLanes = int(sizeof(ScaleVector) / sizeof(float)), kScaleVectors = kMaxSplits / kScaleLanes;
  const int thread = threadIdx.x % kWarpgroupThreads, splits = p.splits;
  if (thread < kD512Heads) {
    float factor[kMaxSplits];
    cluster_merge_factors(reinterpret_cast<const float2*>(smem + L::kExchange + kMergeStatsOffset), thread, splits,
                          sink_log2, factor);
    ScaleVector* row =
        reinterpret_cast<ScaleVector*>(smem + L::kExchange + kMergeScaleOffset) + thread * kScaleVectors;
#pragma unroll
    for (int v = 0; v < kScaleVectors; ++v) {
      float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int e = 0; e < kScaleLanes; ++e) f[e] = factor[v * kScaleLanes + e];
      if constexpr (kMaxSplits == 2)
        row[v] = make_float2(f[0], f[1]);
      else
        row[v] = make_float4(f[0], f[1], f[2], f[3]);
    }
  }
  sm90::named_barrier_arrive<3 * kWarpgroupThreads>(kMergeFactorsBarrier);
}

// d512_merge_factors for p.splits (the next power of two, as d512_cluster_merge_for); `sink_log2`: the sink of the
// thread's head (threads below kD512Heads).
template <class L>
__device__ __forceinline__ void d512_merge_factors_for(const SparseAttentionParams& p, uint8_t* smem, float sink_log2) {
  if (p.splits <= 2)
    d512_merge_factors<L, 2>(p, smem, sink_log2);
  else if (p.splits <= 4)
    d512_merge_factors<L, 4>(p, smem, sink_log2);
  else if (p.splits <= 8)
    d512_merge_factors<L, 8>(p, smem, sink_log2);
  else
    d512_merge_factors<L, 16>(p, smem, sink_log2);
}

// The cluster merge of the consumers (256 threads; see the notes above): this CTA's slice of the (query, head block)
// output from the partials and (max, sum) pairs of all `p.splits` CTAs of the cluster, normalised with the sink,
// rotated back and stored, with the merge factors the producer warpgroup forms meanwhile (d512_merge_factors). The
// peers' loads are unrolled over kMaxSplits ≥ p.splits, the next power of two (2, 4, 8 or 16): predicated-off loads and
// multiply-adds still issue, and this code is the tail of the batch-1 critical path. kBf16Partials: the partials
// are bf16 (rows kMergeRowBf16 apart; p.cluster_merge_bf16_partials), fp32 otherwise (rows kMergeRowFloats apart).
template <class L, int kMaxSplits, bool kBf16Partials>
__device__ __forceinline__ void d512_cluster_merge(const SparseAttentionParams& p, uint8_t* smem, int64_t t, int split,
                                                   int head_base, int thread256, bool tracer) {
  static_assert(kMaxSplits == 2 || kMaxSplits == 4 || kMaxSplits == 8 || kMaxSplits == 16, "a power of two ≥ 2");
  static_assert(kMaxSplits <= kSparseAttentionMaxClusterSplits, "the merge tables hold that many splits");
  using ScaleVector = MergeScaleVector<kMaxSplits>;
  constexpr int kScaleLanes = int(sizeof(ScaleVector) / sizeof(float)), kScaleVectors = kMaxSplits / kScaleLanes;
  const int splits = p.splits;
  // [head][kMaxSplits]: a vector's factors in kScaleVectors vector loads.
  const float* merge_scale = reinterpret_cast<float*>(smem + L::kExchange + kMergeScaleOffset);
  const RopeFactors* rope_table = reinterpret_cast<const RopeFactors*>(smem + L::kExchange + kMergeRopeOffset);
  const uint4* partial = reinterpret_cast<const uint4*>(smem + L::kMergePartial);

  const uint4* peer_partial[kMaxSplits];
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) peer_partial[s] = sm90::cluster_peer(partial, s < splits ? s : 0);
  // This CTA's slice of the output's 16-byte vectors of partials (kVectorDims dims: 4 fp32 or 8 bf16);
  // consecutive threads read consecutive vectors of a row. A thread's vectors are kStride apart, a whole number of
  // rows: they share their dims (and inverse-RoPE factors) and step kHeadStep heads, so their addresses are immediate
  // offsets from one base. A thread loads kBatch vectors from every peer before it uses any, so that each batch
  // costs one round trip (kBatch · kMaxSplits uint4 registers); with a power-of-two split count a thread's vectors
  // are one batch.
  constexpr int kVectorDims = kBf16Partials ? 8 : 4, kRowVectors = kD512HeadDim / kVectorDims;
  constexpr int kPaddedRowVectors = (kBf16Partials ? kMergeRowBf16 * 2 : kMergeRowFloats * 4) / 16;
  constexpr int kVectors = kD512Heads * kRowVectors, kBatch = (kBf16Partials ? 16 : 32) / kMaxSplits;
  constexpr int kStride = 2 * kWarpgroupThreads, kHeadStep = kStride / kRowVectors;
  static_assert(kStride % kRowVectors == 0 && kBatch >= 1, "a thread's vectors share their dims");
  const int per_cta = (kVectors + splits - 1) / splits;
  const int begin = split * per_cta + thread256, end = min(kVectors, (split + 1) * per_cta);
  const int dim = kVectorDims * (begin % kRowVectors), first_head = begin / kRowVectors;
  // Heads past this CTA's slice or past H are not merged.
  const int live_heads = min((end - begin + kStride - 1) / kStride * kHeadStep, p.heads - head_base - first_head);
  uint4 o[kBatch][kMaxSplits];
  const auto load_batch = [&](int batch_head) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int h = batch_head + k * kHeadStep;
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s)  // the rest is never read: no zeroing on the critical path
        if (h < live_heads && s < splits)
          o[k][s] = peer_partial[s][(first_head + h) * kPaddedRowVectors + dim / kVectorDims];
    }
  };
  load_batch(0);
  // The producer warpgroup's merge factors (d512_merge_factors), formed while this batch is in flight.
  sm90::named_barrier_sync<3 * kWarpgroupThreads>(kMergeFactorsBarrier);
  if (tracer) d512_trace_mark(p, kD512TraceMergeFactors);

  const KvEntryLayout& layout = p.cache.layout;
  constexpr int kPairs = kVectorDims / 2;
  bool rotate[kPairs];
  RopeFactors factors[kPairs];
  inverse_rope_pairs(layout, p.rope_frequencies != nullptr, dim, rope_table, rotate, factors);
  for (int batch_head = 0; batch_head < live_heads; batch_head += kBatch * kHeadStep) {
    if (batch_head != 0) load_batch(batch_head);
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int h = first_head + batch_head + k * kHeadStep;  // of the head block
      if (batch_head + k * kHeadStep >= live_heads) continue;
      float scale[kMaxSplits];
      const ScaleVector* scale_row = reinterpret_cast<const ScaleVector*>(merge_scale + h * kMaxSplits);
#pragma unroll
      for (int v = 0; v < kScaleVectors; ++v)
        *reinterpret_cast<ScaleVector*>(scale + v * kScaleLanes) = scale_row[v];
      float x[kVectorDims] = {};
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) {
        if (s >= splits) break;
        const uint32_t words[4] = {o[k][s].x, o[k][s].y, o[k][s].z, o[k][s].w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          if constexpr (kBf16Partials) {  // a bf16 is the high half of its float
            x[2 * w] += scale[s] * __uint_as_float(words[w] << 16);
            x[2 * w + 1] += scale[s] * __uint_as_float(words[w] & 0xFFFF0000u);
          } else {
            x[w] += scale[s] * __uint_as_float(words[w]);
          }
        }
      }
#pragma unroll
      for (int pair = 0; pair < kPairs; ++pair)
        if (rotate[pair]) rope_rotate_pair(x[2 * pair], x[2 * pair + 1], factors[pair], true);
      const int64_t out_row = (t * p.heads + head_base + h) * kD512HeadDim;
#pragma unroll
      for (int q = 0; q < kVectorDims / 4; ++q) {
        const float quad[4] = {x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]};
        store_output_quad(p, out_row, dim + 4 * q, quad);
      }
    }
  }
  if (tracer) d512_trace_mark(p, kD512TraceMergeStored);
}

// The merge's instantiation for p.splits (the next power of two) and the partials' type.
template <class L, bool kBf16Partials>
__device__ __forceinline__ void d512_cluster_merge_for(const SparseAttentionParams& p, uint8_t* smem, int64_t t,
                                                       int split, int head_base, int thread256, bool tracer) {
  if (p.splits <= 2)
    d512_cluster_merge<L, 2, kBf16Partials>(p, smem, t, split, head_base, thread256, tracer);
  else if (p.splits <= 4)
    d512_cluster_merge<L, 4, kBf16Partials>(p, smem, t, split, head_base, thread256, tracer);
  else if (p.splits <= 8)
    d512_cluster_merge<L, 8, kBf16Partials>(p, smem, t, split, head_base, thread256, tracer);
  else
    d512_cluster_merge<L, 16, kBf16Partials>(p, smem, t, split, head_base, thread256, tracer);
}

// The single-split epilogue of the consumers (256 threads): they stage their raw accumulators (rows kMergeRowFloats
// apart, as a cluster merge's partial) and each row's 1 / denominator in the free Q and KV stages, then each thread
// normalises, rotates back and stores 16-byte vectors of rows (consecutive threads along a row) from a rolled loop of
// a few dozen instructions. This code runs once per CTA from cold instruction caches, where unrolled fragment stores
// took about twice as long in the first wave as in the second.
template <class L>
__device__ __forceinline__ void d512_store_single_split(const SparseAttentionParams& p, uint8_t* smem, int64_t t,
                                                        int head_base, int warp, int g, int c, int consumer,
                                                        int dim_base, int thread256, const float (&o_acc)[128],
                                                        const float (&inverse_denominator)[2], RopeFactors rope_pair) {
  const KvEntryLayout& layout = p.cache.layout;
  const bool rope = p.rope_frequencies != nullptr;
  float* staged = reinterpret_cast<float*>(smem + L::kMergePartial);
  float* inverse = reinterpret_cast<float*>(smem + L::kExchange + kMergeScaleOffset);
  RopeFactors* rope_table = reinterpret_cast<RopeFactors*>(smem + L::kExchange + kMergeRopeOffset);
  // Both consumers are done with Q, the KV stages and the exchange buffers.
  sm90::named_barrier_sync<2 * kWarpgroupThreads>(kExchangeBarrier);
  if (rope && thread256 < layout.rope_dim / 2) rope_table[thread256] = rope_pair;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    float* staged_row = staged + row * kMergeRowFloats;
#pragma unroll
    for (int n = 0; n < 32; ++n)
      *reinterpret_cast<float2*>(staged_row + dim_base + 8 * n + 2 * c) =
          make_float2(o_acc[4 * n + 2 * r], o_acc[4 * n + 2 * r + 1]);
    if (consumer == 0 && c == 0) inverse[row] = inverse_denominator[r];
  }
  sm90::named_barrier_sync<2 * kWarpgroupThreads>(kExchangeBarrier);
  constexpr int kRowQuads = kD512HeadDim / 4, kStep = 2 * kWarpgroupThreads;
  const int dim = 4 * (thread256 % kRowQuads);
  bool rotate[2];
  RopeFactors factors[2];
  inverse_rope_pairs(layout, rope, dim, rope_table, rotate, factors);
#pragma unroll 1
  for (int v = thread256; v < kD512Heads * kRowQuads; v += kStep) {
    const int row = v / kRowQuads;
    if (head_base + row >= p.heads) continue;
    const float4 quad = *reinterpret_cast<const float4*>(staged + row * kMergeRowFloats + dim);
    const float scale = inverse[row];
    float x[4] = {quad.x * scale, quad.y * scale, quad.z * scale, quad.w * scale};
#pragma unroll
    for (int pair = 0; pair < 2; ++pair)
      if (rotate[pair]) rope_rotate_pair(x[2 * pair], x[2 * pair + 1], factors[pair], true);
    store_output_quad(p, (t * p.heads + head_base + row) * kD512HeadDim, dim, x);
  }
}

// L: the CTA's D512Layout (its entry format); kTrace: consumer 0's thread 0 marks its phases
// (SparseAttentionTraceMark).
template <class L, bool kTrace>
__device__ __forceinline__ void d512_consume(const SparseAttentionParams& p, uint8_t* smem, const CtaWork& work,
                                             bool cluster_merge) {
  // Read through a shuffle so the compiler knows it is warp-uniform: the wgmma descriptors derived from it then stay
  // in uniform registers instead of being rebuilt and moved there before every wgmma.
  const int consumer = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / kWarpgroupThreads, 0) - 1;
  const int thread = threadIdx.x % kWarpgroupThreads, warp = thread / 32, lane = thread % 32;
  const int g = lane / 4, c = lane % 4;
  const int thread256 = consumer * kWarpgroupThreads + thread;
  const int64_t t = work.t;
  const int split = work.split, head_base = work.head_block * kD512Heads;
  const KvEntryLayout& layout = p.cache.layout;

  // Weights first (nothing an earlier kernel writes): this thread's rope frequency (pair thread256), the sinks of its
  // fragment rows.
  const bool rope = p.rope_frequencies != nullptr;
  const float frequency = rope && thread256 < layout.rope_dim / 2 ? p.rope_frequencies[thread256] : 0.0f;
  const int head[2] = {head_base + warp * 16 + g, head_base + warp * 16 + g + 8};
  const float sink_log2[2] = {head_sink_log2(p, head[0]), head_sink_log2(p, head[1])};
  wait_for_prior_grids();
  const bool tracer = kTrace && thread256 == 0;
  if (tracer) d512_trace_mark(p, kD512TraceConsumerWaited);
  const int64_t position = rope ? p.positions[t] : 0;
  const SlotRange range = split_slot_range(p, t, split);
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + L::kBarriers) + L::kRawStages;
  uint64_t* kv_empty = kv_full + L::kKvStages;
  const int32_t* tile_valid = reinterpret_cast<const int32_t*>(smem + L::kValid);
  uint8_t* q_tile = smem + L::kQ;
  const int dim_base = consumer * (kD512HeadDim / 2);

  // Q: this consumer's 64 heads × 256 dims as bf16, swizzled (heads past H zero), all loads in flight at once (o_acc
  // is not live yet, so the registers are there). Thread (warp, lane) holds dims [dim_base + 8·lane, +8) of heads
  // 4i + warp, i < 16: its global chunks lie a fixed stride apart and its swizzled slots follow two patterns (h % 8 is
  // warp or warp + 4), so each chunk costs its loads, conversion and one store (the generic per-chunk index arithmetic
  // was 900 instructions per warp, a quarter of a batch-1 CTA's consumer path). This thread's inverse-RoPE factors
  // (pair thread256) are evaluated while the loads are in flight, not in the epilogue.
  RopeFactors rope_pair{1.0f, 0.0f};
  {
    constexpr int kHeadsPerPass = kWarpgroupThreads / 32, kChunks = kD512Heads / kHeadsPerPass;
    const int dim = dim_base + 8 * lane, chunk = (dim % 64) / 8;
    const int live_heads = p.heads - head_base - warp;  // chunk i is live while kHeadsPerPass · i < live_heads
    const int64_t element = (t * p.heads + head_base + warp) * kD512HeadDim + dim;
    constexpr int64_t kStride = int64_t(kHeadsPerPass) * kD512HeadDim;
    uint4 packed[kChunks];
    // A full head block (every DSV4 shape) loads without predicates or zero fills, which were 40 % of this code.
    const auto load_q = [&](auto full_block) {
      constexpr bool kFull = decltype(full_block)::value;
      if (p.q_dtype == AttentionDtype::Bf16) {
        const __nv_bfloat16* q = static_cast<const __nv_bfloat16*>(p.q) + element;
#pragma unroll
        for (int i = 0; i < kChunks; ++i)
          packed[i] = kFull || kHeadsPerPass * i < live_heads ? *reinterpret_cast<const uint4*>(q + i * kStride)
                                                              : make_uint4(0, 0, 0, 0);
      } else {
        const float* q = static_cast<const float*>(p.q) + element;
        float4 lo[kChunks], hi[kChunks];
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
          const bool live = kFull || kHeadsPerPass * i < live_heads;
          constexpr float4 kZero{0.0f, 0.0f, 0.0f, 0.0f};
          lo[i] = live ? *reinterpret_cast<const float4*>(q + i * kStride) : kZero;
          hi[i] = live ? *reinterpret_cast<const float4*>(q + i * kStride + 4) : kZero;
        }
#pragma unroll
        for (int i = 0; i < kChunks; ++i)
          packed[i] = make_uint4(pack_bf16x2(lo[i].x, lo[i].y), pack_bf16x2(lo[i].z, lo[i].w),
                                 pack_bf16x2(hi[i].x, hi[i].y), pack_bf16x2(hi[i].z, hi[i].w));
      }
    };
    if (p.heads - head_base >= kD512Heads)
      load_q(std::true_type{});
    else
      load_q(std::false_type{});
    if (rope && thread256 < layout.rope_dim / 2) rope_pair = rope_factors(position, frequency);
    uint8_t* slot = q_tile + (dim / 64) * kQBlockBytes + warp * 128;
    const int swizzled[2] = {(chunk ^ warp) * 16, (chunk ^ (warp + kHeadsPerPass)) * 16};
#pragma unroll
    for (int i = 0; i < kChunks; ++i)
      *reinterpret_cast<uint4*>(slot + i * kHeadsPerPass * 128 + swizzled[i % 2]) = packed[i];
    sm90::fence_proxy_async_shared();
    sm90::named_barrier_sync<kWarpgroupThreads>(kQBarrier + consumer);
    if (tracer) d512_trace_mark(p, kD512TraceQReady);
  }
  const uint64_t q_descriptor = sm90::make_sw128_k_major_descriptor(q_tile + (dim_base / 64) * kQBlockBytes);

  float o_acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o_acc[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp's 16 heads, log2 domain
  float row_sum[2] = {0.0f, 0.0f};            // this thread's columns only until the end
  const float scale_log2 = p.softmax_scale * kLog2e;
  uint32_t p_frag[kTile / 16][4];             // PV's A operand: read by the tensor cores until the next tile's wait
  constexpr int S = L::kKvStages;

  for (int j = 0; j < range.tiles; ++j) {
    const int stage = j % S;
    sm90::mbarrier_wait(&kv_full[stage], (j / S) & 1);
    if (tracer && (j <= 1 || j + 1 == range.tiles))
      d512_trace_mark(p, j + 1 == range.tiles ? kD512TraceLastTile : j == 0 ? kD512TraceTile0 : kD512TraceTile1);
    const bool mid = tracer && j == range.tiles / 2;
    if (mid) d512_trace_mark(p, kD512TraceMidTile);
    if constexpr (!L::kFp8Entries) sm90::fence_proxy_async_shared();  // cp.async data, then wgmma reads it
    uint8_t* kv = smem + L::kKv + stage * kKvStageBytes + (dim_base / 64) * kKvBlockBytes;

    // S_c = Q_c K_cᵀ over this consumer's 256 dims: 4 blocks × 4 k16 steps.
    float s_acc[16];
    const uint64_t k_descriptor = sm90::make_sw128_k_major_descriptor(kv);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 16; ++kk)
      sm90::wgmma_m64n32k16_bf16_ss(s_acc,
                                    sm90::advance_descriptor(q_descriptor, (kk / 4) * kQBlockBytes + (kk % 4) * 32),
                                    sm90::advance_descriptor(k_descriptor, (kk / 4) * kKvBlockBytes + (kk % 4) * 32),
                                    kk > 0);
    sm90::wgmma_commit_group();
    // The previous tile's PV ran on the tensor cores behind this QKᵀ; its stage goes back to the producer now.
    if (j > 0) {
      sm90::wgmma_wait_group<1>();
      sm90::fence_operand(o_acc);
      if (thread == 0) sm90::mbarrier_arrive(&kv_empty[(j - 1) % S]);
    }
    sm90::wgmma_wait_group<0>();
    sm90::fence_operand(s_acc);
    if (mid) d512_trace_mark(p, kD512TraceMidScored);

    // Sum the two consumers' partial scores: each adds the other's to its own (one fp32 addition, commutative, so
    // both warpgroups hold identical S).
    float* exchange = reinterpret_cast<float*>(smem + L::kExchange) + (j % 2) * L::kExchangeFloats;
    float4* mine = reinterpret_cast<float4*>(exchange + consumer * (L::kExchangeFloats / 2));
    const float4* other = reinterpret_cast<const float4*>(exchange + (1 - consumer) * (L::kExchangeFloats / 2));
#pragma unroll
    for (int e = 0; e < 4; ++e)
      mine[e * kWarpgroupThreads + thread] =
          make_float4(s_acc[4 * e], s_acc[4 * e + 1], s_acc[4 * e + 2], s_acc[4 * e + 3]);
    sm90::named_barrier_sync<2 * kWarpgroupThreads>(kExchangeBarrier);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float4 b = other[e * kWarpgroupThreads + thread];
      s_acc[4 * e] += b.x;
      s_acc[4 * e + 1] += b.y;
      s_acc[4 * e + 2] += b.z;
      s_acc[4 * e + 3] += b.w;
    }
    if (mid) d512_trace_mark(p, kD512TraceMidExchanged);

    // Online softmax (log2 domain); unused slots score −inf. s_acc[4n + e]: row g + 8(e / 2), entry 8n + 2c + e % 2.
    float alpha[2];
    online_softmax_tile(s_acc, tile_valid + stage * kTile, c, scale_log2, row_max, row_sum, alpha, p_frag);
    // Once the running maxima settle the factors are exactly 1; a warp skips the 128 multiplications then.
    // On the first tile the accumulators are still zero.
    if (j > 0 && __any_sync(0xFFFFFFFFu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < 128; ++i) o_acc[i] *= alpha[(i % 4) / 2];
    }
    if (mid) d512_trace_mark(p, kD512TraceMidWeighted);

    // O_c += P V_c: V is the stage read N-major (entries = K, this consumer's 256 dims = N).
    sm90::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks)
      sm90::wgmma_m64n256k16_bf16_rs_n_major_b(o_acc, p_frag[ks],
                                               sm90::make_sw128_n_major_descriptor(kv + ks * 16 * 128, kKvBlockBytes),
                                               1);
    sm90::wgmma_commit_group();
    if (mid) d512_trace_mark(p, kD512TraceMidMultiplied);
  }
  sm90::wgmma_wait_group<0>();
  sm90::fence_operand(o_acc);
  if (tracer) d512_trace_mark(p, kD512TraceLoopEnd);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 2);
  }

  if (cluster_merge) {
    // Both consumers are done with Q, the KV stages and the exchange buffers: the partial and the tables overlay them.
    sm90::named_barrier_sync<2 * kWarpgroupThreads>(kExchangeBarrier);
    if (rope && thread256 < layout.rope_dim / 2)
      reinterpret_cast<RopeFactors*>(smem + L::kExchange + kMergeRopeOffset)[thread256] = rope_pair;
    const bool bf16_partials = p.cluster_merge_bf16_partials;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      if (bf16_partials) {
        uint32_t* partial = reinterpret_cast<uint32_t*>(smem + L::kMergePartial) + row * (kMergeRowBf16 / 2);
#pragma unroll
        for (int n = 0; n < 32; ++n)
          partial[(dim_base + 8 * n + 2 * c) / 2] = pack_bf16x2(o_acc[4 * n + 2 * r], o_acc[4 * n + 2 * r + 1]);
      } else {
        float* partial = reinterpret_cast<float*>(smem + L::kMergePartial) + row * kMergeRowFloats;
#pragma unroll
        for (int n = 0; n < 32; ++n)
          *reinterpret_cast<float2*>(partial + dim_base + 8 * n + 2 * c) =
              make_float2(o_acc[4 * n + 2 * r], o_acc[4 * n + 2 * r + 1]);
      }
      if (consumer == 0 && c == 0)
        reinterpret_cast<float2*>(smem + L::kExchange + kMergeStatsOffset)[row] = make_float2(row_max[r], row_sum[r]);
    }
    if (tracer) d512_trace_mark(p, kD512TraceMergeWritten);
    sm90::cluster_sync();
    if (tracer) d512_trace_mark(p, kD512TraceMergeSynced);
    if (bf16_partials)
      d512_cluster_merge_for<L, true>(p, smem, t, split, head_base, thread256, tracer);
    else
      d512_cluster_merge_for<L, false>(p, smem, t, split, head_base, thread256, tracer);
    sm90::cluster_sync_relaxed();  // the peers have read this CTA's partial (their loads returned before their arrive)
    if (tracer) d512_trace_mark(p, kD512TraceEnd);
    return;
  }

  if (p.splits > 1) {
    // Unnormalised partial output and its (max, sum); sparse_attention_combine_kernel merges the splits.
    float* partial_out = static_cast<float*>(p.workspace);
    float2* partial_stats =
        reinterpret_cast<float2*>(partial_out + int64_t(p.splits) * p.tokens * p.heads * kD512HeadDim);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (head[r] >= p.heads) continue;
      const int64_t row = (int64_t(split) * p.tokens + t) * p.heads + head[r];
      if (consumer == 0 && c == 0) partial_stats[row] = make_float2(row_max[r], row_sum[r]);
#pragma unroll
      for (int n = 0; n < 32; ++n)
        *reinterpret_cast<float2*>(partial_out + row * kD512HeadDim + dim_base + 8 * n + 2 * c) =
            make_float2(o_acc[4 * n + 2 * r], o_acc[4 * n + 2 * r + 1]);
    }
    return;
  }

  float inverse_denominator[2];
  inverse_softmax_denominators(sink_log2, row_max, row_sum, inverse_denominator);
  d512_store_single_split<L>(p, smem, t, head_base, warp, g, c, consumer, dim_base, thread256, o_acc,
                             inverse_denominator, rope_pair);
  if (tracer) d512_trace_mark(p, kD512TraceEnd);
}

// Before griddepcontrol.wait: asks L2 for the lines this CTA reads first (its query's sequence slot, position and
// compressed count, the index lines of its split's slots, bounded without the counts, and its Q rows), so that their
// DRAM and TLB misses overlap the kernels still draining instead of lengthening this CTA's chain of dependent loads.
// L2 is the point of coherence, so a line fetched before an earlier kernel writes it still reads the written data.
__device__ __forceinline__ void d512_prefetch_inputs(const SparseAttentionParams& p, const CtaWork& work) {
  constexpr int kLineBytes = 128, kLineSlots = kLineBytes / 4;
  const int thread = threadIdx.x;
  const int64_t t = work.t;
  if (thread < kWarpgroupThreads) {
    if (thread == 0) {
      ptx::prefetch_l2(p.sequence_slots + t);
      if (p.positions != nullptr) ptx::prefetch_l2(p.positions + t);
      if (p.compressed_counts != nullptr) ptx::prefetch_l2(p.compressed_counts + t);
    }
    const int64_t total = int64_t(p.window_slots) + p.compressed_slots;
    const int tiles_per_split = (int((total + kTile - 1) / kTile) + p.splits - 1) / p.splits;
    const int64_t begin = int64_t(work.split) * tiles_per_split * kTile;
    const int64_t end = min(total, begin + int64_t(tiles_per_split) * kTile);
    for (int64_t s = begin + int64_t(thread) * kLineSlots; s < end; s += int64_t(kLineSlots) * kWarpgroupThreads)
      ptx::prefetch_l2(s < p.window_slots ? p.window_index + t * p.window_slots + s
                                          : p.compressed_index + t * p.compressed_slots + (s - p.window_slots));
  } else {
    const int head_base = work.head_block * kD512Heads;
    const int64_t element_bytes = p.q_dtype == AttentionDtype::F32 ? 4 : 2;
    const int64_t bytes = int64_t(min(kD512Heads, p.heads - head_base)) * kD512HeadDim * element_bytes;
    const uint8_t* q = static_cast<const uint8_t*>(p.q) + (t * p.heads + head_base) * kD512HeadDim * element_bytes;
    for (int64_t offset = int64_t(thread - kWarpgroupThreads) * kLineBytes; offset < bytes;
         offset += int64_t(kLineBytes) * 2 * kWarpgroupThreads)
      ptx::prefetch_l2(q + offset);
  }
}

// kTrace (bf16 entries only): the CTA's phases marked in p.d512_trace.
template <bool kFp8, bool kTrace>
__global__ void __launch_bounds__(kD512Threads, 1)
    sparse_attention_d512_kernel(const __grid_constant__ SparseAttentionParams p, const int head_blocks,
                                 const bool cluster_merge) {
  static_assert(!(kFp8 && kTrace), "traces are bf16 entries'");
  using L = D512Layout<kFp8>;
  if (kTrace && threadIdx.x == 0) d512_trace_mark(p, kD512TraceStart);
  allow_dependents();
  extern __shared__ uint8_t smem_unaligned[];
  // wgmma's swizzled tiles and the descriptors' zero base offset need 1024-byte aligned stages; the offset is the
  // same in every CTA of a cluster (same kernel, same static shared memory), so peers' partials sit at the same place.
  uint8_t* smem = smem_unaligned + ((1024 - shared_address(smem_unaligned) % 1024) % 1024);
  const CtaWork work = cta_work(p, head_blocks);
  d512_prefetch_inputs(p, work);

  if (threadIdx.x == 0) {
    uint64_t* barriers = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
    for (int r = 0; r < L::kRawStages; ++r) sm90::mbarrier_init(&barriers[r], 4);  // raw_full: one per warp
    for (int s = 0; s < L::kKvStages; ++s) {
      // kv_full: every producer thread (bf16: also its copies' arrival); kv_empty: one per consumer.
      sm90::mbarrier_init(&barriers[L::kRawStages + s], (kFp8 ? 1 : 2) * kWarpgroupThreads);
      sm90::mbarrier_init(&barriers[L::kRawStages + L::kKvStages + s], 2);
    }
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x < kWarpgroupThreads) {
    sm90::setmaxnreg_decrease<kD512ProducerRegisters>();
    // The cluster merge's factors need head threadIdx.x's sink (a weight: loaded before the grid wait).
    const float merge_sink_log2 = cluster_merge && threadIdx.x < kD512Heads
                                      ? head_sink_log2(p, work.head_block * kD512Heads + threadIdx.x)
                                      : -INFINITY;
    wait_for_prior_grids();
    if (kTrace && threadIdx.x == 0) d512_trace_mark(p, kD512TraceProducerWaited);
    if constexpr (kFp8)
      d512_produce_fp8(p, smem, work.t, split_slot_range(p, work.t, work.split));
    else
      d512_produce_bf16<kTrace>(p, smem, work.t, split_slot_range(p, work.t, work.split));
    if (cluster_merge) {  // the producer warps take part in the consumers' two cluster barriers, and form the factors
      sm90::cluster_sync();
      d512_merge_factors_for<L>(p, smem, merge_sink_log2);
      sm90::cluster_sync_relaxed();
    }
  } else {
    sm90::setmaxnreg_increase<kD512ConsumerRegisters>();
    d512_consume<L, kTrace>(p, smem, work, cluster_merge);
  }
}

// ---- the head-split decode kernel (head_dim 512, small batch) ----
//
// One CTA = one query × 16 heads × one split of at most kHeadSplitMaxTiles tiles (128 entries) of the query's slot
// list, 256 threads; the splits of a (query, head group) form one thread-block cluster merged through distributed
// shared memory. At batch 1 the 64-head-block kernel above is a chain of dependent latencies (index → page → copy →
// expansion → QKᵀ → exchange → softmax → PV, then a merge whose partials are 64 heads × 512 dims per CTA): it needs
// 4-16 entry splits to shorten the chain, and their merge moved 128 KB per CTA through the SM-to-SM network (43 % of
// the consumers' time in session 14's ncu). Splitting the 64 heads into groups of 16 instead gives the same CTA count
// with 4× fewer entry splits, the SWA call (128 entries) none at all, and a quarter of the merge bytes; the shared
// entries are read once per head group, from L2 after the first (75-370 KB per group at batch 1).
// Per CTA, with every entry resident (no ring, no producer):
//   1. warp w resolves slots [16w, 16w + 16) of its split (lanes 0-15: index → page table → physical entry) and each
//      lane issues one bulk copy of its entry into row 16w + lane (fp8: the 592-byte 16-aligned span, as the kernel
//      above), completing on warp w's mbarrier; Q (16 heads × 512 dims) is loaded meanwhile;
//   2. warp w waits for its own 16 entries only, expands fp8 entries to bf16 in place (each entry read whole into
//      registers before its row is overwritten; exact, as above) or zeroes unused rows, and computes the scores of
//      its entries for the 16 heads over all 512 dims (mma.sync m16n8k16, no exchange between warps);
//   3. one softmax over the CTA's entries per head (16 threads per head): P rounded to bf16 once, the row sums add the
//      rounded weights;
//   4. O = P V: warp w owns dims [64w, 64w + 64) over all the CTA's entries (ldmatrix.trans on the same rows);
//   5. one split: normalise with the sink, rotate back, store. Several: each CTA leaves its unnormalised partial
//      (16 × 512 fp32) and per-head (max, sum) in shared memory; after a cluster barrier CTA `split` merges slice
//      `split` of all the peers' partials (32 KB read per CTA whatever the split count), rotates and stores it.
// Scores, softmax and PV accumulate in fp32 as the kernels above; the softmax takes each CTA's exact maximum.
// Measured (session 15, H200, bench_cuda_attention, L2 flushed, bf16 q; against the 64-head cluster kernel): bf16
// entries (the engine's format) Flash SWA batch 1 10.7 vs 14.7 µs, CSA 12.4 vs 17.7, Pro CSA 12.5 vs 17.7; fp8
// entries 11.7 vs 15.5, 13.7 vs 18.4, 14.5 vs 18.4, Flash SWA batch 8 12.8 vs 15.5. The time hardly depends on the
// entries per CTA (Flash SWA batch 1 at 1-4 tiles per CTA: 12.0-12.8 µs): the serial chain (index → page → copy,
// then a warp's 16 entries, two CTA barriers, the merge) sets it, not the work. Session 16 (H200, same run): all 8
// warps of a CTA sharing its QKᵀ (n8 tiles × parts of the dims) with the merge's weights per thread was slower
// everywhere (Flash SWA batch 1 12.7 vs 10.7 µs, CSA 13.4 vs 12.1, Pro CSA 15.4 vs 12.0), and so was the kv_insert +
// per-head q norm done in this kernel's prologue in the model (8 layers, batch 1: 696.9 vs 729.1 t/s): both removed.
// An empty kernel on the SWA batch-1 grid (16 CTAs, clusters of 4) takes 2.9 µs in the same measurement.

inline constexpr int kHeadSplitHeads = 16;  // one mma M
inline constexpr int kHeadSplitWarps = 8, kHeadSplitThreads = kHeadSplitWarps * 32;
inline constexpr int kHeadSplitMaxTiles = kSparseAttentionHeadSplitMaxTiles;
inline constexpr int kHeadSplitMaxEntries = kHeadSplitMaxTiles * kTile;
inline constexpr int kHeadSplitWarpEntries = kHeadSplitMaxEntries / kHeadSplitWarps;  // 16: two mma N tiles
inline constexpr int kHeadSplitRowBytes = (kD512HeadDim + 8) * 2;  // 1040: 65 16-byte chunks, so ldmatrix rows
                                                                    // fall on distinct bank groups
inline constexpr int kHeadSplitScoreStride = kHeadSplitMaxEntries + 4;  // fp32 per score row
inline constexpr int kHeadSplitPStride = kHeadSplitMaxEntries + 8;      // bf16 per weight row (272 bytes)
inline constexpr int kHeadSplitPartialStride = kD512HeadDim + 8;        // fp32 per partial row (130 16-byte vectors)
static_assert(kHeadSplitWarpEntries == 16, "a warp's entries are one k16 step of PV and two n8 tiles of QKᵀ");
static_assert(kD512HeadDim / kHeadSplitWarps == 64, "a warp's PV dims are eight n8 tiles");

struct HeadSplitLayout {
  static constexpr int kQ = 0;                                                 // bf16 [16][520]
  static constexpr int kKv = kQ + kHeadSplitHeads * kHeadSplitRowBytes;        // bf16 [128][520]
  static constexpr int kScores = kKv + kHeadSplitMaxEntries * kHeadSplitRowBytes;  // fp32 [16][132]
  static constexpr int kP = kScores + kHeadSplitHeads * kHeadSplitScoreStride * 4;  // bf16 [16][136]
  static constexpr int kPartial = kP + kHeadSplitHeads * kHeadSplitPStride * 2;     // fp32 [16][520]
  static constexpr int kStats = kPartial + kHeadSplitHeads * kHeadSplitPartialStride * 4;  // float2 [16]
  static constexpr int kScale = kStats + kHeadSplitHeads * 8;  // fp32 [16][kSparseAttentionMaxClusterSplits]
  static constexpr int kRope = kScale + kHeadSplitHeads * kSparseAttentionMaxClusterSplits * 4;  // RopeFactors [256]
  static constexpr int kValid = kRope + kD512HeadDim / 2 * 8;                  // int32 [128]
  static constexpr int kBarriers = kValid + kHeadSplitMaxEntries * 4;          // uint64 [8]: a warp's entries landed
  static constexpr int kBytes = kBarriers + kHeadSplitWarps * 8;
  static_assert(kKv % 16 == 0 && kScores % 16 == 0 && kP % 16 == 0 && kPartial % 16 == 0 && kValid % 16 == 0 &&
                    kBarriers % 8 == 0,
                "aligned regions");
  static_assert(kFp8SpanBytes <= kHeadSplitRowBytes, "an fp8 span lands in its bf16 row");
};

// Expands warp-owned fp8 entries n0 and n0 + 1 (spans at their rows' starts, entry at (phys & 1) · 8 in the span) to
// bf16 in place, zeros for an unused slot: every lane reads both entries whole before any lane writes.
__device__ __forceinline__ void head_split_expand_fp8_pair(uint8_t* kv, int n0, const int32_t (&phys)[2], int lane) {
  uint2 codes[2][2], rope[2][2], scales[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const uint8_t* entry = kv + (n0 + e) * kHeadSplitRowBytes + (phys[e] & 1) * 8;
    codes[e][0] = *reinterpret_cast<const uint2*>(entry + 8 * lane);
    // Chunk lane + 32: fp8 codes for lanes below 24 (dims 256-447), bf16 rope dims for the rest (only 8-aligned).
    codes[e][1] = *reinterpret_cast<const uint2*>(entry + 8 * (lane + 32));
    rope[e][0] = *reinterpret_cast<const uint2*>(entry + kFp8RopeOffset + 16 * (lane % 8));
    rope[e][1] = *reinterpret_cast<const uint2*>(entry + kFp8RopeOffset + 16 * (lane % 8) + 8);
    scales[e] = *reinterpret_cast<const uint2*>(entry + kFp8ScaleOffset);
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    uint4* row = reinterpret_cast<uint4*>(kv + (n0 + e) * kHeadSplitRowBytes);
    uint4 out[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int chunk = lane + 32 * half, block = chunk / 8;  // 64-dim scale block
      const float scale =
          e8m0_to_float(uint8_t((block < 4 ? scales[e].x >> (8 * block) : scales[e].y >> (8 * (block - 4))) & 0xFF));
      const uint2 c = codes[e][half];
      out[half] = make_uint4(e4m3x2_to_bf16x2(uint16_t(c.x), scale), e4m3x2_to_bf16x2(uint16_t(c.x >> 16), scale),
                             e4m3x2_to_bf16x2(uint16_t(c.y), scale), e4m3x2_to_bf16x2(uint16_t(c.y >> 16), scale));
    }
    if (lane >= kFp8NopeDim / 8 - 32) out[1] = make_uint4(rope[e][0].x, rope[e][0].y, rope[e][1].x, rope[e][1].y);
    if (phys[e] < 0) out[0] = out[1] = make_uint4(0, 0, 0, 0);
    row[lane] = out[0];
    row[lane + 32] = out[1];
  }
}

// The cluster merge of the head-split kernel (all 256 threads; see the notes above): this CTA's slice of the
// (query, head group) output. kMaxSplits ≥ p.splits (the next power of two) bounds the peers' unrolled loads; a
// thread's vectors (4 dims each) are loaded from every peer before any is used, so the slice costs one round trip.
template <int kMaxSplits>
__device__ __forceinline__ void head_split_cluster_merge(const SparseAttentionParams& p, uint8_t* smem, int64_t t,
                                                         int split, int head_base, float merge_sink_log2) {
  using L = HeadSplitLayout;
  constexpr int kRowVectors = kD512HeadDim / 4, kVectors = kHeadSplitHeads * kRowVectors;
  constexpr int kPaddedRowVectors = kHeadSplitPartialStride / 4;
  // The most vectors a thread merges: the fewest splits of this unrolling give the largest slices.
  constexpr int kMinSplits = kMaxSplits / 2 + 1;
  constexpr int kThreadVectors = ((kVectors + kMinSplits - 1) / kMinSplits + kHeadSplitThreads - 1) / kHeadSplitThreads;
  const int splits = p.splits, tid = threadIdx.x;
  const int per_cta = (kVectors + splits - 1) / splits;
  const int begin = split * per_cta + tid, end = min(kVectors, (split + 1) * per_cta);
  const float4* partial = reinterpret_cast<const float4*>(smem + L::kPartial);
  const float4* peer[kMaxSplits];
#pragma unroll
  for (int s = 0; s < kMaxSplits; ++s) peer[s] = sm90::cluster_peer(partial, s < splits ? s : 0);
  float4 o[kThreadVectors][kMaxSplits];
#pragma unroll
  for (int k = 0; k < kThreadVectors; ++k) {
    const int v = begin + k * kHeadSplitThreads;
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s)
      if (v < end && s < splits) o[k][s] = peer[s][(v / kRowVectors) * kPaddedRowVectors + v % kRowVectors];
  }
  // Per head: weight 2^(m_s − M) / denominator for each split s, the sink once in the denominator.
  float* merge_scale = reinterpret_cast<float*>(smem + L::kScale);
  if (tid < kHeadSplitHeads) {
    float factor[kMaxSplits];
    cluster_merge_factors(reinterpret_cast<const float2*>(smem + L::kStats), tid, splits, merge_sink_log2, factor);
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) merge_scale[tid * kSparseAttentionMaxClusterSplits + s] = factor[s];
  }
  __syncthreads();

  const KvEntryLayout& layout = p.cache.layout;
  const RopeFactors* rope_table = reinterpret_cast<const RopeFactors*>(smem + L::kRope);
#pragma unroll
  for (int k = 0; k < kThreadVectors; ++k) {
    const int v = begin + k * kHeadSplitThreads;
    const int h = v / kRowVectors, dim = 4 * (v % kRowVectors);
    if (v >= end || head_base + h >= p.heads) continue;
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      if (s >= splits) break;
      const float scale = merge_scale[h * kSparseAttentionMaxClusterSplits + s];
      x[0] += scale * o[k][s].x;
      x[1] += scale * o[k][s].y;
      x[2] += scale * o[k][s].z;
      x[3] += scale * o[k][s].w;
    }
    if (p.rope_frequencies != nullptr) {
#pragma unroll
      for (int pair = 0; pair < 2; ++pair)
        if (dim + 2 * pair >= layout.nope_dim)
          rope_rotate_pair(x[2 * pair], x[2 * pair + 1], rope_table[(dim + 2 * pair - layout.nope_dim) / 2], true);
    }
    store_output_quad(p, (t * p.heads + head_base + h) * kD512HeadDim, dim, x);
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kHeadSplitThreads, 1)
    sparse_attention_head_split_kernel(const __grid_constant__ SparseAttentionParams p, const int head_groups) {
  using L = HeadSplitLayout;
  extern __shared__ __align__(16) uint8_t smem[];
  allow_dependents();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const CtaWork work = cta_work(p, head_groups);
  const int64_t t = work.t;
  const int split = work.split, head_base = work.head_block * kHeadSplitHeads;
  const KvCacheView& cache = p.cache;
  const KvEntryLayout& layout = cache.layout;
  uint64_t* entries_landed = reinterpret_cast<uint64_t*>(smem + L::kBarriers) + warp;
  int32_t* slot_valid = reinterpret_cast<int32_t*>(smem + L::kValid);
  RopeFactors* rope_table = reinterpret_cast<RopeFactors*>(smem + L::kRope);
  if (lane == 0) {
    sm90::mbarrier_init(entries_landed, 1);
    sm90::fence_mbarrier_init();
  }
  __syncwarp();

  // Weights and parameters before griddepcontrol.wait (nothing an earlier kernel writes), and L2 requests for the
  // first inputs: Q rows, the split's index lines (bounded without the counts), the query's slot and position.
  const bool rope = p.rope_frequencies != nullptr;
  const int rope_pairs = rope ? layout.rope_dim / 2 : 0;
  const float frequency = tid < rope_pairs ? p.rope_frequencies[tid] : 0.0f;
  const float sink_log2[2] = {head_sink_log2(p, head_base + g), head_sink_log2(p, head_base + g + 8)};
  const float merge_sink_log2 = tid < kHeadSplitHeads ? head_sink_log2(p, head_base + tid) : -INFINITY;
  const int64_t q_element_bytes = p.q_dtype == AttentionDtype::F32 ? 4 : 2;
  const int live_heads = min(kHeadSplitHeads, p.heads - head_base);
  {
    constexpr int kLineBytes = 128;
    const uint8_t* q_rows =
        static_cast<const uint8_t*>(p.q) + (t * p.heads + head_base) * kD512HeadDim * q_element_bytes;
    const int64_t q_bytes = int64_t(live_heads) * kD512HeadDim * q_element_bytes;
    for (int64_t offset = int64_t(tid) * kLineBytes; offset < q_bytes; offset += kLineBytes * kHeadSplitThreads)
      ptx::prefetch_l2(q_rows + offset);
    if (tid == 0) {
      ptx::prefetch_l2(p.sequence_slots + t);
      if (rope) ptx::prefetch_l2(p.positions + t);
      if (p.compressed_counts != nullptr) ptx::prefetch_l2(p.compressed_counts + t);
    }
    const int64_t total = int64_t(p.window_slots) + p.compressed_slots;
    const int tiles_per_split = (int((total + kTile - 1) / kTile) + p.splits - 1) / p.splits;
    const int64_t split_begin = int64_t(split) * tiles_per_split * kTile,
                  split_end = min(total, int64_t(split + 1) * tiles_per_split * kTile);
    const int64_t s = split_begin + 32 * (tid - 32);  // warp 1: a line per lane
    if (warp == 1 && s < split_end)
      ptx::prefetch_l2(s < p.window_slots ? p.window_index + t * p.window_slots + s
                                          : p.compressed_index + t * p.compressed_slots + (s - p.window_slots));
    // head_split_early_entries: the split's entries asked of L2 too, from the index as it stands before this step's
    // writers are done (a decode step's lists mostly repeat the previous step's rows) through the page table and
    // sequence slots (host-copied step inputs, complete before the step): a hint whose rows need not be this step's.
    // The index is read past L1 (ld.global.cg), so that the reads after the wait cannot meet a stale L1 line.
    const int64_t early = split_begin + warp * kHeadSplitWarpEntries + lane % kHeadSplitWarpEntries;
    if (p.head_split_early_entries && early < split_end) {
      const int32_t row = __ldcg(early < p.window_slots
                                     ? p.window_index + t * p.window_slots + early
                                     : p.compressed_index + t * p.compressed_slots + (early - p.window_slots));
      const int32_t phys = slot_physical(cache, slot_page(p, p.sequence_slots[t], early, row), row);
      // Lanes 0-15 take the entry's first half of lines, lanes 16-31 the rest: a bf16 entry's 8 lines, an fp8 one's
      // 584 bytes (8-aligned) over at most 6, its last byte's line the sixth.
      constexpr int kEntryBytes = kFp8 ? kFp8EntryBytes : kD512HeadDim * 2;
      constexpr int kHalfLines = kFp8 ? 3 : 4;
      if (phys >= 0) {
        const uint8_t* entry_bytes = cache.entry_address(phys);
        const int first_line = lane < kHeadSplitWarpEntries ? 0 : kHalfLines;
#pragma unroll
        for (int i = 0; i < kHalfLines; ++i)
          ptx::prefetch_l2(entry_bytes + min((first_line + i) * kLineBytes, kEntryBytes - 1));
      }
    }
  }
  wait_for_prior_grids();

  // 1. Slots → physical entries → one bulk copy per entry; Q loads in flight meanwhile.
  const SlotRange range = split_slot_range(p, t, split);
  // ≤ kHeadSplitMaxEntries (the launcher's split bound); 0 for a split past the query's count.
  const int entries = int(max(range.end - range.begin, int64_t(0)));
  const int entry = warp * kHeadSplitWarpEntries + lane % kHeadSplitWarpEntries;
  const int sequence_slot = p.sequence_slots[t];
  const int64_t slot = range.begin + entry;
  const bool in_range = lane < kHeadSplitWarpEntries && entry < entries;
  const int32_t row = in_range ? slot_row(p, t, slot) : -1;

  // Q: thread tid holds 16-byte chunk tid % 64 of heads tid / 64 + 4i (bf16; two float4 of fp32 q).
  constexpr int kQChunks = kHeadSplitHeads * kD512HeadDim / 8 / kHeadSplitThreads;  // 4
  constexpr int kHeadsPerPass = kHeadSplitThreads / (kD512HeadDim / 8);              // 4
  const int q_chunk = tid % (kD512HeadDim / 8), q_head = tid / (kD512HeadDim / 8);
  uint4 q_packed[kQChunks];
  float4 q_lo[kQChunks], q_hi[kQChunks];
#pragma unroll
  for (int i = 0; i < kQChunks; ++i) {
    const int h = q_head + kHeadsPerPass * i;
    const int64_t element = (t * p.heads + head_base + h) * kD512HeadDim + 8 * q_chunk;
    const bool live = h < live_heads;
    q_packed[i] = make_uint4(0, 0, 0, 0);
    q_lo[i] = q_hi[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (p.q_dtype == AttentionDtype::Bf16) {
      if (live) q_packed[i] = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + element);
    } else if (live) {
      q_lo[i] = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + element);
      q_hi[i] = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + element + 4);
    }
  }

  const int32_t phys = slot_physical(cache, slot_page(p, sequence_slot, slot, row), row);
  if (lane < kHeadSplitWarpEntries) slot_valid[entry] = phys >= 0;
  {
    constexpr uint32_t kCopyBytes = kFp8 ? kFp8SpanBytes : kD512HeadDim * 2;
    const unsigned copies = __ballot_sync(0xFFFFFFFFu, phys >= 0);
    if (lane == 0) sm90::mbarrier_arrive_expect_tx(entries_landed, uint32_t(__popc(copies)) * kCopyBytes);
    if (phys >= 0) {
      const uint8_t* src = cache.entry_address(phys) - (kFp8 ? (phys & 1) * 8 : 0);
      ptx::cp_async_bulk_global_to_shared(shared_address(smem + L::kKv + entry * kHeadSplitRowBytes), src, kCopyBytes,
                                          shared_address(entries_landed));
    }
  }

  const int64_t position = rope ? p.positions[t] : 0;
#pragma unroll
  for (int i = 0; i < kQChunks; ++i) {
    const uint4 packed = p.q_dtype == AttentionDtype::Bf16
                             ? q_packed[i]
                             : make_uint4(pack_bf16x2(q_lo[i].x, q_lo[i].y), pack_bf16x2(q_lo[i].z, q_lo[i].w),
                                          pack_bf16x2(q_hi[i].x, q_hi[i].y), pack_bf16x2(q_hi[i].z, q_hi[i].w));
    *reinterpret_cast<uint4*>(smem + L::kQ + (q_head + kHeadsPerPass * i) * kHeadSplitRowBytes + 16 * q_chunk) =
        packed;
  }
  if (tid < rope_pairs) rope_table[tid] = rope_factors(position, frequency);
  __syncthreads();  // Q, the valid flags and the inverse-RoPE factors

  // 2. This warp's entries: expanded (fp8) or unused rows zeroed, then their scores over all 512 dims.
  const int warp_first = warp * kHeadSplitWarpEntries;
  uint8_t* kv = smem + L::kKv;
  if (warp_first < entries) {
    sm90::mbarrier_wait(entries_landed, 0);
    if constexpr (kFp8) {
#pragma unroll 2
      for (int e = 0; e < kHeadSplitWarpEntries; e += 2) {
        const int32_t pair[2] = {__shfl_sync(0xFFFFFFFFu, phys, e), __shfl_sync(0xFFFFFFFFu, phys, e + 1)};
        head_split_expand_fp8_pair(kv, warp_first + e, pair, lane);
      }
    } else {
      // Unused slots (rare: a short window, a split's tail) hold stale bytes; their weight 0 must not meet a NaN.
      unsigned unused = __ballot_sync(0xFFFFFFFFu, lane < kHeadSplitWarpEntries && phys < 0);
      while (unused != 0) {
        const int e = __ffs(unused) - 1;
        unused &= unused - 1;
        uint4* zero_row = reinterpret_cast<uint4*>(kv + (warp_first + e) * kHeadSplitRowBytes);
        zero_row[lane] = zero_row[lane + 32] = make_uint4(0, 0, 0, 0);
      }
    }
    __syncwarp();

    // S = Q Kᵀ: two n8 tiles of entries, the 32 k16 steps as two independent halves (four accumulator chains).
    float s_acc[2][2][4] = {};
    const uint32_t q_lane = shared_address(smem + L::kQ) +
                            ((lane % 8) + 8 * ((lane / 8) % 2)) * kHeadSplitRowBytes + 16 * (lane / 16);
    const uint32_t k_lane = shared_address(kv) + (warp_first + (lane % 8) + 8 * (lane / 16)) * kHeadSplitRowBytes +
                            16 * ((lane / 8) % 2);
#pragma unroll 4
    for (int kk = 0; kk < kD512HeadDim / 32; ++kk) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int dim_bytes = (half * kD512HeadDim / 2 + 16 * kk) * 2;
        uint32_t a[4], b[4];
        ldmatrix_x4(a, q_lane + dim_bytes);
        ldmatrix_x4(b, k_lane + dim_bytes);
        ptx::mma_m16n8k16_bf16_f32(s_acc[half][0], a, b[0], b[1]);
        ptx::mma_m16n8k16_bf16_f32(s_acc[half][1], a, b[2], b[3]);
      }
    }
    float* scores = reinterpret_cast<float*>(smem + L::kScores);
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(scores + (g + 8 * r) * kHeadSplitScoreStride + warp_first + 8 * n + 2 * c) =
            make_float2(s_acc[0][n][2 * r] + s_acc[1][n][2 * r], s_acc[0][n][2 * r + 1] + s_acc[1][n][2 * r + 1]);
  }
  __syncthreads();

  // 3. Softmax per head over the CTA's entries (log2 domain): 16 threads per head, 8 consecutive entries each.
  {
    const int h = tid / 16, first = 8 * (tid % 16);
    const float scale_log2 = p.softmax_scale * kLog2e;
    const float* score_row = reinterpret_cast<const float*>(smem + L::kScores) + h * kHeadSplitScoreStride + first;
    float x[8];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      // An entry past the split or unused scores −inf whatever its (unwritten) score holds.
      x[i] = first + i < entries && slot_valid[first + i] != 0 ? score_row[i] * scale_log2 : -INFINITY;
      m = fmaxf(m, x[i]);
    }
#pragma unroll
    for (int offset = 1; offset < 16; offset *= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
    const float reference = m == -INFINITY ? 0.0f : m;  // no entry: every weight exp2(−inf) = 0, no NaN
    uint32_t w[4];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = pack_bf16x2(fast_exp2(x[2 * i] - reference), fast_exp2(x[2 * i + 1] - reference));
      sum += __uint_as_float(w[i] << 16);
      sum += __uint_as_float(w[i] & 0xFFFF0000u);
    }
    *reinterpret_cast<uint4*>(smem + L::kP + (h * kHeadSplitPStride + first) * 2) = make_uint4(w[0], w[1], w[2], w[3]);
#pragma unroll
    for (int offset = 1; offset < 16; offset *= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (tid % 16 == 0) reinterpret_cast<float2*>(smem + L::kStats)[h] = make_float2(m, sum);
  }
  __syncthreads();

  // 4. O = P V over this warp's 64 dims and all the CTA's entries.
  const int dim_base = warp * (kD512HeadDim / kHeadSplitWarps);
  float o_acc[8][4] = {};
  {
    const uint32_t p_lane = shared_address(smem + L::kP) +
                            ((lane % 8) + 8 * ((lane / 8) % 2)) * kHeadSplitPStride * 2 + 16 * (lane / 16);
    const uint32_t v_lane = shared_address(kv) + ((lane % 8) + 8 * ((lane / 8) % 2)) * kHeadSplitRowBytes +
                            16 * (lane / 16) + dim_base * 2;
    const int groups = (entries + kHeadSplitWarpEntries - 1) / kHeadSplitWarpEntries;
#pragma unroll 2
    for (int k = 0; k < groups; ++k) {
      uint32_t a[4];
      ldmatrix_x4(a, p_lane + k * kHeadSplitWarpEntries * 2);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_lane + k * kHeadSplitWarpEntries * kHeadSplitRowBytes + np * 32);
        ptx::mma_m16n8k16_bf16_f32(o_acc[2 * np], a, b[0], b[1]);
        ptx::mma_m16n8k16_bf16_f32(o_acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }

  // 5. One split: normalise, rotate back, store. Several: the cluster merge.
  if (p.splits > 1) {
    float* partial = reinterpret_cast<float*>(smem + L::kPartial);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(partial + (g + 8 * r) * kHeadSplitPartialStride + dim_base + 8 * j + 2 * c) =
            make_float2(o_acc[j][2 * r], o_acc[j][2 * r + 1]);
    sm90::cluster_sync();
    if (p.splits <= 2)
      head_split_cluster_merge<2>(p, smem, t, split, head_base, merge_sink_log2);
    else if (p.splits <= 4)
      head_split_cluster_merge<4>(p, smem, t, split, head_base, merge_sink_log2);
    else if (p.splits <= 8)
      head_split_cluster_merge<8>(p, smem, t, split, head_base, merge_sink_log2);
    else
      head_split_cluster_merge<16>(p, smem, t, split, head_base, merge_sink_log2);
    sm90::cluster_sync_relaxed();  // the peers have read this CTA's partial and statistics
    return;
  }
  float inverse_denominator[2];
  {
    const float2* stats = reinterpret_cast<const float2*>(smem + L::kStats);
    const float row_max[2] = {stats[g].x, stats[g + 8].x}, row_sum[2] = {stats[g].y, stats[g + 8].y};
    inverse_softmax_denominators(sink_log2, row_max, row_sum, inverse_denominator);
  }
  const int head[2] = {head_base + g, head_base + g + 8};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int dim = dim_base + 8 * j + 2 * c;
    store_output_fragment(p, t, head, kD512HeadDim, dim, o_acc[j], inverse_denominator,
                          rope && dim >= layout.nope_dim, [&] { return rope_table[(dim - layout.nope_dim) / 2]; });
  }
}

// ---- the split merge ----

inline constexpr int kCombineThreads = 128;

// One CTA per (query, head): weights 2^(m_s − M) per split, the sink once in the denominator, inverse RoPE, store.
// The splits' statistics are read by one thread each and reduced across the block, and each output pair's partials
// are loaded eight splits at a time: this kernel sits on the critical path of small-batch decode, where a serial
// walk over the splits' loads cost several microseconds.
__global__ void __launch_bounds__(kCombineThreads)
    sparse_attention_combine_kernel(const __grid_constant__ SparseAttentionParams p, const int head_dim,
                                    const int nope_dim) {
  static_assert(kCombineThreads >= kSparseAttentionMaxSplits && kCombineThreads % 32 == 0, "a thread per split");
  constexpr int kWarps = kCombineThreads / 32, kBatch = 8;
  __shared__ float split_weight[kSparseAttentionMaxSplits];
  __shared__ float warp_partial[kWarps];
  allow_dependents();
  wait_for_prior_grids();
  const int64_t th = blockIdx.x;
  const int64_t t = th / p.heads;
  const int h = int(th % p.heads);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* partial_out = static_cast<const float*>(p.workspace);
  const float2* partial_stats =
      reinterpret_cast<const float2*>(partial_out + int64_t(p.splits) * p.tokens * p.heads * head_dim);
  const int64_t split_stride = p.tokens * p.heads;

  const float2 stats = threadIdx.x < p.splits ? partial_stats[threadIdx.x * split_stride + th]
                                              : make_float2(-INFINITY, 0.0f);
  float m = stats.x;
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  if (lane == 0) warp_partial[warp] = m;
  __syncthreads();
  m = warp_partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_partial[w]);
  const float weight = stats.x == -INFINITY ? 0.0f : exp2f(stats.x - m);
  if (threadIdx.x < p.splits) split_weight[threadIdx.x] = weight;
  float sum = stats.y * weight;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
  __syncthreads();  // every thread has read warp_partial's maxima
  if (lane == 0) warp_partial[warp] = sum;
  __syncthreads();
  sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += warp_partial[w];
  const float inverse_denominator = inverse_softmax_denominator(head_sink_log2(p, h), m, sum);

  const int64_t position = p.rope_frequencies != nullptr ? p.positions[t] : 0;
  for (int pair = threadIdx.x; pair < head_dim / 2; pair += kCombineThreads) {
    const int dim = 2 * pair;
    float x0 = 0.0f, x1 = 0.0f;
    for (int first = 0; first < p.splits; first += kBatch) {
      float2 o[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        o[k] = first + k < p.splits
                   ? *reinterpret_cast<const float2*>(partial_out + ((first + k) * split_stride + th) * head_dim + dim)
                   : make_float2(0.0f, 0.0f);
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        if (first + k >= p.splits) break;
        x0 += split_weight[first + k] * o[k].x;
        x1 += split_weight[first + k] * o[k].y;
      }
    }
    x0 *= inverse_denominator;
    x1 *= inverse_denominator;
    if (p.rope_frequencies != nullptr && dim >= nope_dim)
      rope_rotate_pair(x0, x1, rope_factors(position, p.rope_frequencies[(dim - nope_dim) / 2]), true);
    const int64_t offset = th * head_dim + dim;
    if (p.out_dtype == AttentionDtype::F32)
      *reinterpret_cast<float2*>(static_cast<float*>(p.out) + offset) = make_float2(x0, x1);
    else
      *reinterpret_cast<uint32_t*>(static_cast<__nv_bfloat16*>(p.out) + offset) = pack_bf16x2(x0, x1);
  }
}

}  // namespace dsv4::cuda::sparse_attention_detail
