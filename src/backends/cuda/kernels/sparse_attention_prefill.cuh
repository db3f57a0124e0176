// Device code of the sparse-attention prefill kernel (sparse_attention_prefill.hpp).
//
// One CTA = one query × one block of 64 heads; 384 threads: consumer warpgroups 0 and 1 (threads 0-255), the producer
// warpgroup 2. The query's slots are walked in blocks of 64 entries, two per step ("pair"): block 2i in KV buffer 0,
// block 2i + 1 in KV buffer 1. Each buffer holds 64 entries × 512 dims bf16 as eight 64-dim tiles in the 128B swizzle
// (K-major for QKᵀ, read N-major as V), loaded and released in halves (dims 0-255, 256-511) so that the producer can
// refill a half as soon as its last reader is done.
// Per pair, consumer w (FlashMLA's sparse prefill schedule):
//   1. S_w = Q K_wᵀ over all 512 dims (wgmma m64n64k16, both operands in shared memory; N = 64 entries keeps the
//      shared-memory bytes per MMA at the tensor cores' rate, which the N = 32 tiles of the decode kernel exceed);
//   2. the row maxima go round: consumer 0 folds its block into its running max and publishes it, consumer 1 folds its
//      block into that and publishes the pair's max, so both scale by one reference without exchanging scores;
//   3. O_w += P_w V_w[:, half w] from registers; P_w (rescaled to the pair's max) goes to shared memory for the other;
//   4. O_w += P_other V_other[:, half w] from shared memory.
// Consumer 0 issues the next pair's QKᵀ while its step 4 runs. The producer gathers entries by index (slot → logical
// row → page → physical entry; the index loads a pair ahead of the page-table loads): bf16 entries by 16-byte
// cp.async (zero-filled for unused slots), tile by tile, each 64-dim tile of a half arriving on its own mbarrier when
// it lands (QKᵀ runs on a half's first tiles while the rest is in flight); fp8 entries through registers, dequantised
// exactly to bf16 (e4m3 · 2^k), all tiles of a half at once. A consumer that waited on a tile's barrier fences the
// async proxy before its wgmma reads the cp.async data. After its copies the producer also writes the inverse RoPE
// factors, which only the consumers' epilogue reads. The epilogue stores fp32 output from the accumulator fragments;
// bf16 output: each consumer stages its 256 dims of every row in the buffer half only it read last ((0, 0) or (1, 1))
// and stores them with its own warpgroup, with the streaming (evict-first) policy.
// Numerics: q rounded to bf16; scores, softmax and accumulation fp32; P rounded to bf16 once (the row sums add the
// rounded weights), rounded again only where a later block raises the row's maximum.
// Where a CTA's time goes (bench_cuda_attention_prefill --trace; the cycle counts are in bench/NOTES.md): a pair's
// time is the chain of the consumers' softmax, max and weight hand-offs and their PVs, and the producer refills a
// released buffer shortly after its release.
// Session 22 (round s22-2): with no entry reads the kernel took 820 µs against 905 (KV traffic 9 %); stalls per
// issued instruction long scoreboard 2.3, wait 1.6, barrier 1.0 (L2 throughput 23 %, DRAM 9 %):
// the consumers' hand-offs, not the memory, set the pace. Lost (session 21, same runs): a persistent grid overlapping
// the next item's Q and entries with the current tail (907 → 1013 µs), 16-row release of the late halves (935), the
// first pair in consumer 0's order with the look-ahead after it (927 → 949), four staged chunks per global-store
// batch (918: level). Session 22 (rounds 1-2, same runs, Flash 8K / Pro 8K / Flash 64K): the consumers exchanging
// their blocks' maxima at once and both weighting against the pair's max (913.5 / 1790.1 / 944.4 against 915.2 /
// 1796.3 / 939.7: level), the first half's copies before the look-ahead prefetches (912.9 / 1799.6 / 938.6; decode
// Pro b64 39.9 → 41.0), consumer 1 releasing its own half before the P exchange (916.3 / 1804.8 / 935.9), one TMA bulk
// copy per output row (905.0 / 1772.5 / 925.4 against streaming stores 895.5 / 1757.6 / 917.8; with an L2
// evict-first hint 911.8 / 1789.7 / 937.1 against 905.2 / 1778.8 / 929.5). Session 23 (--trace's clock marks, cycles
// within a CTA, round 1): a pair took ≈ 8200 traced cycles, a chain of consumer 0's softmax (1350), consumer 1's
// (1780), the weight exchange (1150), the PVs queued on the tensor pipe (1600) and the next scores waiting for half
// (0, 1) (1400); the producer took 900-1200 cycles to issue a half's copies and ≈ 3000 to resolve a pair's pages.
// Kept: each consumer stores its own output half, the entries in registers, (0, 1) refilled first, the maxima handed
// on first (Flash 8K 878.9 → 829.9 µs over rounds 1-2). Lost (same runs): consumer 0 handing its weights over while its
// own PV runs and consumer 1 before it waits (883.2 / 1731.9 / 905.9 against 878.9 / 1729.0 / 897.8), consumer 1
// adding consumer 0's block first to release (0, 1) sooner (905.7 / 1773.0 / 930.3, other bits).
// Session 24 (numbers in bench/NOTES.md): kept a pair's page-table loads issued together, the next pair's page loads
// before the last copies, the next item's q prefetched late, Q by cp.async per tile and stmatrix-staged output rows.
// Lost: Q's copies issued only once the first pair was resolved, and consumer 1's PV on buffer 0's half 1 one
// 64-dim tile at a time: ptxas serialises every wgmma of a kernel that mixes m64n64 blocks of one accumulator with
// m64n256 on all of it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/kernels/sparse_attention_math.cuh"
#include "backends/cuda/kernels/sparse_attention_prefill.hpp"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/ldmatrix.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/mma.cuh"
#include "backends/cuda/ptx/warp_trace.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "core/e8m0.hpp"

namespace dsv4::cuda::sparse_attention_prefill_detail {

using sm90::shared_address;
using namespace sparse_attention_math;

// Slots of query t: its window slots, then its first clamp(compressed_counts[t], 0, compressed_slots) compressed ones.
__device__ __forceinline__ int64_t query_slot_count(const SparseAttentionParams& p, int64_t t) {
  int compressed = p.compressed_slots;
  if (p.compressed_counts != nullptr) compressed = min(max(p.compressed_counts[t], 0), p.compressed_slots);
  return int64_t(p.window_slots) + compressed;
}

// Index entry of slot s of query t: its logical row (−1 = unused).
__device__ __forceinline__ const int32_t& slot_row_ref(const SparseAttentionParams& p, int64_t t, int64_t s) {
  return s < p.window_slots ? p.window_index[t * p.window_slots + s]
                            : p.compressed_index[t * p.compressed_slots + (s - p.window_slots)];
}

__device__ __forceinline__ int32_t slot_row(const SparseAttentionParams& p, int64_t t, int64_t s) {
  return slot_row_ref(p, t, s);
}

inline constexpr int kHeadDim = 512;
inline constexpr int kHeads = 64;          // heads per CTA: one wgmma M
inline constexpr int kBlock = 64;          // entries per KV block
inline constexpr int kWarpgroup = 128;
inline constexpr int kThreads = 3 * kWarpgroup;
inline constexpr int kProducerRegisters = 72, kConsumerRegisters = 216;
// Within the launch's allocation per warpgroup (65536 / kThreads, rounded down to 8): a setmaxnreg.inc past it never
// completes (session 21's hang on the persistent grid).
inline constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
static_assert(kProducerRegisters + 2 * kConsumerRegisters <= 3 * kLaunchRegisters, "the launch's register allocation");
inline constexpr int kTileBytes = 64 * 128;  // 64 rows × 64 bf16: one 128B-swizzled tile (Q, KV or P)
inline constexpr int kDimTiles = kHeadDim / 64;
inline constexpr int kHalfTiles = kDimTiles / 2;
inline constexpr int kBufferBytes = kDimTiles * kTileBytes;  // one KV block
inline constexpr int kMaxRopePairs = kHeadDim / 2;
// DeepSeek's fp8 entry: 448 e4m3 dims, 64 bf16 rope dims at byte 448, seven e8m0 scales at byte 576, 584 bytes.
inline constexpr int kFp8NopeDim = 448, kFp8RopeOffset = 448, kFp8ScaleOffset = 576, kFp8EntryBytes = 584;

// Shared-memory byte offsets (from a 1024-aligned base).
inline constexpr int kQ = 0;                                 // Q: 8 tiles of [64 heads][64 dims]
inline constexpr int kKv = kQ + kBufferBytes;                // 2 KV buffers of 8 tiles of [64 entries][64 dims]
inline constexpr int kP = kKv + 2 * kBufferBytes;            // P of consumer w: [64 heads][64 entries]
inline constexpr int kValid = kP + 2 * kTileBytes;           // int32 [2][kBlock]: the buffers' used slots
inline constexpr int kMax = kValid + 2 * kBlock * 4;         // float2 [32]: the row maxima handed round
inline constexpr int kSum = kMax + 32 * 8;                   // float2 [64]: the consumers' row sums
inline constexpr int kRope = kSum + 64 * 8;                  // RopeFactors [kMaxRopePairs]
inline constexpr int kPhysical = kRope + kMaxRopePairs * 8;  // int32 [2 × 4][producer thread]: its slots' entries
// full[2][2], empty[2][2], valid[2], rope, tile_full[2][2][3], q_full[8]
inline constexpr int kBarriers = kPhysical + 2 * 4 * kWarpgroup * 4;
inline constexpr int kBarrierCount = 11, kTileBarrierCount = 12, kQBarrierCount = 8;
static_assert(kTileBarrierCount == 2 * 2 * (kHalfTiles - 1), "a barrier per (buffer, half, tile but the last)");
inline constexpr int kBytes = kBarriers + (kBarrierCount + kTileBarrierCount + kQBarrierCount) * 8;
inline constexpr int kAllocationBytes = kBytes + 1024;       // room to align the base to 1024
static_assert(kAllocationBytes <= 227 * 1024, "one SM's shared memory");

// Named barriers of the consumers (0 is __syncthreads); Sum0 + w: consumer w's row sums published, Staged0 + w:
// consumer w's output rows staged.
inline constexpr int kBarrierMax0 = 1, kBarrierMax1 = 2, kBarrierP0 = 3, kBarrierP1 = 4, kBarrierConsumers = 5,
                     kBarrierSum0 = 6, kBarrierStaged0 = 8;

// Named barrier kBase + consumer over kCount threads (bar.arrive if kArrive, else bar.sync), its ID a constant in each
// branch: with an ID computed at run time ptxas reserves all 16 hardware barriers.
template <int kCount, int kBase, bool kArrive>
__device__ __forceinline__ void consumer_named_barrier(int consumer) {
  const auto barrier = [](auto id) {
    if constexpr (kArrive)
      sm90::named_barrier_arrive<kCount>(decltype(id)::value);
    else
      sm90::named_barrier_sync<kCount>(decltype(id)::value);
  };
  if (consumer == 0)
    barrier(std::integral_constant<int, kBase>{});
  else
    barrier(std::integral_constant<int, kBase + 1>{});
}

// The CTA's mbarriers: full and empty per (buffer, half), valid per buffer, tile_full per (buffer, half, tile) for
// every tile of a half but its last (whose arrival is full's; bf16 entries only).
struct Barriers {
  uint64_t* base;
  __device__ __forceinline__ uint64_t* full(int buffer, int half) const { return base + buffer * 2 + half; }
  __device__ __forceinline__ uint64_t* empty(int buffer, int half) const { return base + 4 + buffer * 2 + half; }
  __device__ __forceinline__ uint64_t* valid(int buffer) const { return base + 8 + buffer; }
  // The producer's inverse RoPE factors are in place.
  __device__ __forceinline__ uint64_t* rope_ready() const { return base + 10; }
  // The half's 64-dim tiles 0..tile landed (tile < 3; tile 3 is full()).
  __device__ __forceinline__ uint64_t* tile_full(int buffer, int half, int tile) const {
    return tile < kHalfTiles - 1 ? base + kBarrierCount + (buffer * 2 + half) * (kHalfTiles - 1) + tile
                                 : full(buffer, half);
  }
  // q_tiles (bf16 q, bf16 entries): Q's 64-dim tile `tile` landed (every consumer thread's cp.async arrival).
  __device__ __forceinline__ uint64_t* q_full(int tile) const {
    return base + kBarrierCount + kTileBarrierCount + tile;
  }
  // Where a half's tile `tile` arrives: bf16 entries tile by tile, fp8 entries (stored through registers) all on full.
  template <bool kFp8>
  __device__ __forceinline__ uint64_t* arrival(int buffer, int half, int tile) const {
    return kFp8 ? full(buffer, half) : tile_full(buffer, half, tile);
  }
};

// Traced launches (SparseAttentionPrefillOptions::trace): lane 0 of warp 0 of each warpgroup (consumer 0, consumer 1,
// producer) stores %globaltimer at its marks (the prefill_trace constants) in its record of kPrefillTraceSlots words;
// the SM id in prefill_trace::kSm.
static_assert(kPrefillTraceWarps == kThreads / 32, "one trace record per warp");
template <bool kTrace>
__device__ __forceinline__ void trace_point(uint64_t* trace, int slot) {
  if constexpr (kTrace)
    if (threadIdx.x % kWarpgroup < 32) {
      sm90::record_warp_trace_point(trace, kPrefillTraceWarps, kPrefillTraceSlots, slot, prefill_trace::kStart,
                                    prefill_trace::kSm);
      if (threadIdx.x % 32 == 0)
        trace[(uint64_t(blockIdx.x) * kPrefillTraceWarps + threadIdx.x / 32) * kPrefillTraceSlots +
              prefill_trace::kClocks + slot] = clock64();
    }
}

// Lane 0 of each warpgroup's first warp: %clock64 at event `event` of pair `pair` (kept for pair < kClockPairs).
// Diagnostic only: the traced instances spill with these marks (16 / 52 bytes; the untraced kernels do not).
template <bool kTrace>
__device__ __forceinline__ void pair_point(uint64_t* trace, int pair, int event) {
  if constexpr (kTrace)
    if (threadIdx.x % kWarpgroup == 0 && pair < prefill_trace::kClockPairs)
      trace[(uint64_t(blockIdx.x) * kPrefillTraceWarps + threadIdx.x / 32) * kPrefillTraceSlots +
            prefill_trace::kPairClocks + pair * prefill_trace::kPairEvents + event] = clock64();
}

// Pairs of 64-entry blocks that cover query t's slots.
__device__ __forceinline__ int query_pairs(const SparseAttentionParams& p, int64_t t) {
  return int((query_slot_count(p, t) + 2 * kBlock - 1) / (2 * kBlock));
}

// Byte offset of the 16-byte chunk `chunk` of row `row` in a 128B-swizzled tile.
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// ---- producer ----

// A 16-byte store to a 32-bit shared-memory address (a generic pointer would hold two registers per address).
__device__ __forceinline__ void store_shared(uint32_t address, uint4 value) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(value.x), "r"(value.y), "r"(value.z),
               "r"(value.w)
               : "memory");
}

// Thread (row0, chunk) of the producer warpgroup moves the 16-byte chunk `chunk` (8 dims) of every 64-dim tile of
// entries row0 + 16k, k < 4, of each block: a group of eight threads covers an entry's 128-byte tile row.
template <bool kFp8, bool kTrace>
__device__ __forceinline__ void produce(const SparseAttentionParams& p, uint8_t* smem, int64_t t, int pairs,
                                        bool prefetch_resolved, const Barriers& barriers, int64_t ahead_t,
                                        int ahead_head_base, uint64_t* trace) {
  const int thread = int(threadIdx.x) - 2 * kWarpgroup;
  const int chunk = thread % 8, row0 = thread / 8;
  const int64_t slots = query_slot_count(p, t);
  const int sequence_slot = p.sequence_slots[t];
  int32_t* valid = reinterpret_cast<int32_t*>(smem + kValid);
  // The physical entries of this thread's slots of the current pair, [buffer][k]: bf16 entries in registers (no
  // shared-memory round trip before a half's copies; round s23-2, same runs, bf16 q: Flash 8K 866.3 → 840.3 µs, Pro
  // 8K 1695.9 → 1648.0, Flash 64K 885.1 → 873.9), fp8 entries in shared memory (thread-major columns,
  // conflict-free): in registers they pushed the fp8 path's loads past the producer's register budget.
  constexpr bool kEntryRegisters = !kFp8;
  int32_t* physical_entries = reinterpret_cast<int32_t*>(smem + kPhysical) + thread;
  int32_t entries[2][4] = {};
  const auto physical = [&](int buffer, int k) {
    if constexpr (kEntryRegisters)
      return entries[buffer][k];
    else
      return physical_entries[(buffer * 4 + k) * kWarpgroup];
  };
  // Slot → logical row → page → physical entry for both blocks of a pair: load_rows(pair) issues the index loads
  // into `rows` (all before any use), load_pages(pair) and resolve_entries(pair) turn them into physical entries.
  // A pair's rows are loaded once the pair before it is resolved, a pair ahead, so that each later pair waits for its
  // page-table loads only (H200, 4096 × 640 Flash prefill, fp32 q: 1220 → 1182 µs; Pro decode batch 64 39.4 → 38.4).
  // prefetch_resolved: each entry is then asked of L2 (this thread's line of it: chunk c takes line c of a bf16 entry,
  // lines c < 5 and the last byte's of an fp8 one), so that the pair's later halves, copied only once their buffers
  // are released, wait for L2 rather than DRAM (decode reads entries cold).
  const int line_offset = !kFp8 || chunk < 5 ? chunk * 128 : kFp8EntryBytes - 1;
  const bool prefetches_line = prefetch_resolved && (!kFp8 || chunk < 6);
  int32_t rows[2][4];
  const auto load_rows = [&](int pair) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t s = int64_t(2 * pair + b) * kBlock + row0 + 16 * k;
        rows[b][k] = s < slots ? slot_row(p, t, s) : -1;
      }
  };
  // Every page-table load of the pair is issued before any is used: one round trip, not eight in a row.
  // load_pages(pair) issues them into `pages`, resolve_entries(pair) forms the entries; a later pair's page-table
  // loads go out before the last half's copies of the pair before it, not behind them in the memory pipeline.
  int32_t pages[2][4];
  const auto load_pages = [&](int pair) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t s = int64_t(2 * pair + b) * kBlock + row0 + 16 * k;
        const int32_t* page = slot_page_word(p, sequence_slot, s, rows[b][k]);
        pages[b][k] = page != nullptr ? *page : -1;
      }
  };
  const auto resolve_entries = [&](int pair) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int32_t entry = slot_physical(p.cache, pages[b][k], rows[b][k]);
        if constexpr (kEntryRegisters)
          entries[b][k] = entry;
        else
          physical_entries[(b * 4 + k) * kWarpgroup] = entry;
        if (prefetches_line && entry >= 0) ptx::prefetch_l2(p.cache.entry_address(entry) + line_offset);
      }
  };
  const auto load_half = [&](int buffer, int half) {
    uint8_t* tiles = smem + kKv + buffer * kBufferBytes;
    if constexpr (!kFp8) {
      // Tile by tile over the four entries, each tile's barrier arriving once this thread's copies up to it landed:
      // QKᵀ starts on a half's first tile while the rest is in flight (round s22-2, same runs: Flash 8K 905.2 →
      // 883.4 µs, Pro 8K 1778.8 → 1734.0, Flash 64K 929.5 → 907.1). An unused slot is zero-filled (its weight 0 must
      // not meet a NaN); the source is then never read.
      const uint8_t* sources[4];
      uint32_t destinations[4];
      bool used[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int32_t entry_index = physical(buffer, k);
        used[k] = entry_index >= 0;
        sources[k] = used[k] ? p.cache.entry_address(entry_index) + chunk * 16 : p.cache.pool;
        destinations[k] = shared_address(tiles + swizzled(row0 + 16 * k, chunk));
      }
#pragma unroll
      for (int i = 0; i < kHalfTiles; ++i) {
        const int tile = half * kHalfTiles + i;
#pragma unroll
        for (int k = 0; k < 4; ++k)
          ptx::cp_async_or_zero<16>(destinations[k] + uint32_t(tile * kTileBytes), sources[k] + tile * 128, used[k]);
        if (i < kHalfTiles - 1)
          ptx::cp_async_mbarrier_arrive_noinc(shared_address(barriers.tile_full(buffer, half, i)));
      }
    } else {
      // The four entries' loads first, branch-free (an unused slot reads the pool's first entry and stores zeros), so
      // that their round trips overlap: one entry after another they set the producer's pace. raw[k][i]: tile i's
      // eight e4m3 codes, or for the rope tile the first half of its 16 bf16 bytes (the second in raw[k][kHalfTiles];
      // the rope dims are only 8-byte aligned in the 584-byte entry); scales[k]: the e8m0 scales of the half's four
      // tiles (bytes 576 + 4·half, +4).
      uint2 raw[4][kHalfTiles + 1];
      uint32_t scales[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint8_t* entry = p.cache.entry_address(max(physical(buffer, k), 0));
        scales[k] = *reinterpret_cast<const uint32_t*>(entry + kFp8ScaleOffset + 4 * half);
#pragma unroll
        for (int i = 0; i < kHalfTiles; ++i) {
          const int tile = half * kHalfTiles + i;
          if (tile * 64 < kFp8NopeDim) {
            raw[k][i] = *reinterpret_cast<const uint2*>(entry + tile * 64 + chunk * 8);
          } else {
            const uint8_t* rope = entry + kFp8RopeOffset + (tile * 64 - kFp8NopeDim) * 2 + chunk * 16;
            raw[k][i] = *reinterpret_cast<const uint2*>(rope);
            raw[k][kHalfTiles] = *reinterpret_cast<const uint2*>(rope + 8);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t destination = shared_address(tiles) + uint32_t(swizzled(row0 + 16 * k, chunk));
        const bool used = physical(buffer, k) >= 0;
#pragma unroll
        for (int i = 0; i < kHalfTiles; ++i) {
          const int tile = half * kHalfTiles + i;
          uint4 out;
          if (tile * 64 < kFp8NopeDim) {
            const float scale = e8m0_to_float(uint8_t((scales[k] >> (8 * i)) & 0xFF));
            const uint2 codes = raw[k][i];
            out = make_uint4(e4m3x2_to_bf16x2(uint16_t(codes.x), scale),
                             e4m3x2_to_bf16x2(uint16_t(codes.x >> 16), scale),
                             e4m3x2_to_bf16x2(uint16_t(codes.y), scale),
                             e4m3x2_to_bf16x2(uint16_t(codes.y >> 16), scale));
          } else {
            out = make_uint4(raw[k][i].x, raw[k][i].y, raw[k][kHalfTiles].x, raw[k][kHalfTiles].y);
          }
          if (!used) out = make_uint4(0, 0, 0, 0);
          store_shared(destination + uint32_t(tile * kTileBytes), out);
        }
      }
    }
  };
  const auto publish_half = [&](int buffer, int half) {
    if constexpr (kFp8) {
      sm90::fence_proxy_async_shared();  // the consumers' wgmma reads these generic stores
      sm90::mbarrier_arrive(barriers.full(buffer, half));  // all tiles at once (Barriers::arrival)
    } else {
      ptx::cp_async_mbarrier_arrive_noinc(shared_address(barriers.full(buffer, half)));
    }
  };
  const auto publish_valid = [&](int buffer) {
    if (chunk == 0)
#pragma unroll
      for (int k = 0; k < 4; ++k) valid[buffer * kBlock + row0 + 16 * k] = physical(buffer, k) >= 0;
    sm90::mbarrier_arrive(barriers.valid(buffer));
  };

  // The index lines of `count` slots of `query` into L2, one 128-byte line (32 slots) per thread and step.
  const auto prefetch_index_lines = [&](int64_t query, int64_t count) {
    for (int64_t s = int64_t(thread) * 32; s < count; s += int64_t(kWarpgroup) * 32)
      ptx::prefetch_l2(&slot_row_ref(p, query, s));
  };
  // This query's first: each later pair's resolve then waits for L2 only, not for DRAM, before its page-table loads.
  prefetch_index_lines(t, slots);
  if (pairs > 0) {
    load_rows(0);
    load_pages(0);
    resolve_entries(0);
    if (pairs > 1) load_rows(1);
    trace_point<kTrace>(trace, prefill_trace::kResolved);
  }
  for (int i = 0; i < pairs; ++i) {
    // A buffer half is refilled once its readers of the previous pair released it; a buffer's valid flags once its
    // block's consumer has masked its scores (it releases half 0 of buffer 0, half 1 of buffer 1 after that).
    const uint32_t parity = (i & 1) ^ 1;
    sm90::mbarrier_wait(barriers.empty(0, 0), parity);
    pair_point<kTrace>(trace, i, prefill_trace::kEmpty00);
    publish_valid(0);
    load_half(0, 0);
    publish_half(0, 0);
    if (i == 0) trace_point<kTrace>(trace, prefill_trace::kFirstIssued);
    // Buffer 0's half 1 (consumer 0's next scores wait for it) before buffer 1's half 1, although that is released
    // first (round s23-1's trace: the producer reached (0, 1) 765 cycles after its release, still issuing (1, 1);
    // round s23-2 with the entries in registers: Flash 8K 840.3 → 835.7 µs, Pro 8K 1648.0 → 1631.1, Flash 64K 873.9
    // → 865.9; alone level).
    sm90::mbarrier_wait(barriers.empty(0, 1), parity);
    pair_point<kTrace>(trace, i, prefill_trace::kEmpty01);
    load_half(0, 1);
    publish_half(0, 1);
    sm90::mbarrier_wait(barriers.empty(1, 1), parity);
    pair_point<kTrace>(trace, i, prefill_trace::kEmpty11);
    publish_valid(1);
    load_half(1, 1);
    publish_half(1, 1);
    sm90::mbarrier_wait(barriers.empty(1, 0), parity);
    pair_point<kTrace>(trace, i, prefill_trace::kEmpty10);
    if (i < prefill_trace::kPairs) trace_point<kTrace>(trace, prefill_trace::kLastHalfReleased + i);
    if (i + 1 < pairs) load_pages(i + 1);
    load_half(1, 0);
    publish_half(1, 0);
    pair_point<kTrace>(trace, i, prefill_trace::kLastIssued);
    if (i + 1 < pairs) {
      resolve_entries(i + 1);
      if (i + 2 < pairs) load_rows(i + 2);
      pair_point<kTrace>(trace, i, prefill_trace::kNextResolved);
    }
  }
  // The inverse RoPE's factors (a double-precision sincos each) once every copy is issued, off the consumers' path to
  // their first scores; only their epilogue waits for them.
  if (p.rope_frequencies != nullptr) {
    RopeFactors* rope_table = reinterpret_cast<RopeFactors*>(smem + kRope);
    const int64_t position = p.positions[t];
    for (int pair = thread; pair < p.cache.layout.rope_dim / 2; pair += kWarpgroup)
      rope_table[pair] = rope_factors(position, p.rope_frequencies[pair]);
    sm90::mbarrier_arrive(barriers.rope_ready());
  }
  // The item about one wave later (ahead_t ≥ 0): its q rows and index lines into L2 (64 heads of fp32 q are 128 KB,
  // loaded before its first scores), once this CTA's copies and rope factors are issued: shortly before that item
  // starts rather than from its CTA's start, and off this CTA's own start.
  if (ahead_t >= 0) {
    const int64_t element_bytes = p.q_dtype == AttentionDtype::F32 ? 4 : 2;
    const int64_t bytes = int64_t(min(kHeads, p.heads - ahead_head_base)) * kHeadDim * element_bytes;
    const uint8_t* q =
        static_cast<const uint8_t*>(p.q) + (ahead_t * p.heads + ahead_head_base) * kHeadDim * element_bytes;
    for (int64_t offset = int64_t(thread) * 128; offset < bytes; offset += int64_t(kWarpgroup) * 128)
      ptx::prefetch_l2(q + offset);
    prefetch_index_lines(ahead_t, query_slot_count(p, ahead_t));
  }
  if constexpr (!kFp8) ptx::cp_async_wait_all();
  trace_point<kTrace>(trace, prefill_trace::kEnd);
}

// ---- consumers ----

// exp2(old − new) for a row's reference moving from `old` to `new` (≥ old); 1 while it stays (also −inf to −inf).
__device__ __forceinline__ float rescale_factor(float old_max, float new_max) {
  return old_max == new_max ? 1.0f : fast_exp2(old_max - new_max);
}

// Waits for a buffer half (or one tile of it, on tile_full); for cp.async data (bf16 entries) also orders the
// producer's writes before this thread's wgmma reads of them (the fp8 producer's own stores are fenced before it
// arrives).
template <bool kFp8>
__device__ __forceinline__ void wait_full(uint64_t* barrier, uint32_t parity) {
  sm90::mbarrier_wait(barrier, parity);
  if constexpr (!kFp8) sm90::fence_proxy_async_shared();
}

// s (+)= Q K_bufferᵀ over the four 64-dim tiles of `half`, each once it landed (its barrier's phase `parity`; fp8
// entries land together: one wait).
// wait_q (q_tiles, a consumer's first scores): each Q tile is waited for too.
template <bool kFp8>
__device__ __forceinline__ void qk_half(float (&s)[32], const uint8_t* smem, int buffer, int half, bool first,
                                        const Barriers& barriers, uint32_t parity, bool wait_q = false) {
  const uint64_t q = sm90::make_sw128_k_major_descriptor(smem + kQ);
  const uint64_t k = sm90::make_sw128_k_major_descriptor(smem + kKv + buffer * kBufferBytes);
#pragma unroll
  for (int i = 0; i < kHalfTiles; ++i) {
    // No proxy fence of its own: Q by tiles only with bf16 entries, whose wait_full<false> just below fences both.
    if (wait_q) sm90::mbarrier_wait(barriers.q_full(half * kHalfTiles + i), 0);
    if (!kFp8 || i == 0) wait_full<kFp8>(barriers.arrival<kFp8>(buffer, half, i), parity);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t offset = uint32_t((half * kHalfTiles + i) * kTileBytes + kk * 32);
      sm90::wgmma_m64n64k16_bf16_ss(s, sm90::advance_descriptor(q, offset), sm90::advance_descriptor(k, offset),
                                    first && i == 0 && kk == 0 ? 0 : 1);
    }
  }
}

// V of `buffer`, dims [256·half, +256), k16 step ks: rows are entries (K), each a 128-byte row of 64 dims (N) per tile.
__device__ __forceinline__ uint64_t v_descriptor(const uint8_t* smem, int buffer, int half, int ks) {
  return sm90::make_sw128_n_major_descriptor(smem + kKv + buffer * kBufferBytes + half * kHalfTiles * kTileBytes +
                                                 ks * 16 * 128,
                                             kTileBytes);
}

// o += P V_buffer[:, half] with P from registers (this consumer's own block).
__device__ __forceinline__ void pv_registers(float (&o)[128], const uint32_t (&pf)[4][4], const uint8_t* smem,
                                             int buffer, int half) {
  sm90::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks)
    sm90::wgmma_m64n256k16_bf16_rs_n_major_b(o, pf[ks], v_descriptor(smem, buffer, half, ks), 1);
  sm90::wgmma_commit_group();
}

// o += P V_buffer[:, half] with P from the other consumer's shared tile.
__device__ __forceinline__ void pv_shared(float (&o)[128], const uint8_t* p_tile, const uint8_t* smem, int buffer,
                                          int half) {
  const uint64_t a = sm90::make_sw128_k_major_descriptor(p_tile);
  sm90::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kBlock / 16; ++ks)
    sm90::wgmma_m64n256k16_bf16_n_major_b(o, sm90::advance_descriptor(a, uint32_t(ks * 32)),
                                          v_descriptor(smem, buffer, half, ks), 1);
  sm90::wgmma_commit_group();
}

__device__ __forceinline__ void fence_fragments(uint32_t (&pf)[4][4]) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) sm90::fence_operand(pf[ks]);
}

__device__ __forceinline__ void scale_rows(float (&o)[128], const float (&factor)[2]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] *= factor[(i % 4) / 2];
}

// One block's online softmax for a thread's fragment (s[4n + e]: row g + 8(e / 2), entry 8n + 2c + e % 2): unused
// entries score −inf; the rows' reference becomes max(base_max, the block's maxima) (log2 units), o and row_sum are
// rescaled from row_max to it; s becomes the fp32 weights and pf their bf16 A fragments (PV's k16 steps); row_sum adds
// the rounded weights.
// In two steps: block_reference (the masked scores, the new maxima, row_sum rescaled; returns the rescale of o and
// the exponent reference) and block_weights (the weights and o's rescale).
struct BlockReference {
  float alpha[2], reference[2];
};

__device__ __forceinline__ BlockReference block_reference(float (&s)[32], const int32_t* valid, int c,
                                                          float scale_log2, const float (&base_max)[2],
                                                          float (&row_max)[2], float (&row_sum)[2]) {
  float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[4 * n + e] = valid[8 * n + 2 * c + (e % 2)] != 0 ? s[4 * n + e] * scale_log2 : -INFINITY;
      block_max[e / 2] = fmaxf(block_max[e / 2], s[4 * n + e]);
    }
  BlockReference b;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xFFFFFFFFu, block_max[r], 1));
    block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xFFFFFFFFu, block_max[r], 2));
    const float new_max = fmaxf(base_max[r], block_max[r]);
    b.alpha[r] = rescale_factor(row_max[r], new_max);
    row_max[r] = new_max;
    row_sum[r] *= b.alpha[r];
    // A row without a used entry yet keeps −inf; subtracting 0 keeps exp2(−inf) = 0 instead of NaN.
    b.reference[r] = new_max == -INFINITY ? 0.0f : new_max;
  }
  return b;
}

__device__ __forceinline__ void block_weights(float (&s)[32], const BlockReference& b, float (&row_sum)[2],
                                              float (&o)[128], uint32_t (&pf)[4][4]) {
  const float(&reference)[2] = b.reference;
  if (__any_sync(0xFFFFFFFFu, b.alpha[0] != 1.0f || b.alpha[1] != 1.0f)) scale_rows(o, b.alpha);
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float w0 = fast_exp2(s[4 * n + 2 * r] - reference[r]), w1 = fast_exp2(s[4 * n + 2 * r + 1] - reference[r]);
      s[4 * n + 2 * r] = w0;
      s[4 * n + 2 * r + 1] = w1;
      const uint32_t packed = pack_bf16x2(w0, w1);
      row_sum[r] += __uint_as_float(packed << 16) + __uint_as_float(packed & 0xFFFF0000u);
      pf[n / 2][(n % 2) * 2 + r] = packed;
    }
}

// Consumer 0's weights, computed against its own running max, rescaled to the pair's max: rounded to bf16 again.
__device__ __forceinline__ void rescale_weights(float (&s)[32], const float (&factor)[2], uint32_t (&pf)[4][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      s[4 * n + 2 * r] *= factor[r];
      s[4 * n + 2 * r + 1] *= factor[r];
      pf[n / 2][(n % 2) * 2 + r] = pack_bf16x2(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]);
    }
}

// The bf16 weights into a 64 × 64 K-major 128B-swizzled tile (heads = rows), the A operand of the other consumer.
__device__ __forceinline__ void store_weights(uint8_t* tile, const uint32_t (&pf)[4][4], int warp, int g, int c) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(tile + swizzled(16 * warp + g + 8 * r, n) + 4 * c) = pf[n / 2][(n % 2) * 2 + r];
}

// Byte `byte` of output row `row` in the staging rows: 16-byte chunks swizzled by the row's low bits, so that the eight
// rows a warp's fragment writes at once fall in different banks.
__device__ __forceinline__ int staged_offset(int row, int row_bytes, int byte) {
  return row * row_bytes + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
}

template <bool kFp8, bool kTrace>
__device__ __forceinline__ void consume(const SparseAttentionParams& p, uint8_t* smem, int64_t t, int head_base,
                                        const Barriers& barriers, uint64_t* trace) {
  // Read through a shuffle so the compiler knows it is warp-uniform (the descriptors stay in uniform registers).
  const int consumer = __shfl_sync(0xFFFFFFFFu, int(threadIdx.x) / kWarpgroup, 0);
  const int thread256 = int(threadIdx.x);
  const int thread = thread256 % kWarpgroup, warp = thread / 32, lane = thread % 32, g = lane / 4, c = lane % 4;
  const KvEntryLayout& layout = p.cache.layout;
  const int nope_dim = layout.head_dim - layout.rope_dim;
  const bool rope = p.rope_frequencies != nullptr;
  // Weights first (nothing an earlier kernel writes).
  const int head[2] = {head_base + 16 * warp + g, head_base + 16 * warp + g + 8};
  const float sink_log2[2] = {head_sink_log2(p, head[0]), head_sink_log2(p, head[1])};
  wait_for_prior_grids();
  const int pairs = query_pairs(p, t);

  // Q (64 heads × 512 dims as bf16, swizzled; heads past H zero), by both consumers. bf16 q with bf16 entries
  // (q_tiles): by cp.async, tile by tile (two 16-byte chunks per thread and tile), each tile on its own mbarrier, so
  // that the first scores start on Q's first tiles while the rest lands; fp32 q (converted) and fp8 entries through
  // registers behind a named barrier.
  const RopeFactors* rope_table = reinterpret_cast<const RopeFactors*>(smem + kRope);
  const bool q_tiles = !kFp8 && p.q_dtype == AttentionDtype::Bf16;
  if (q_tiles) {
#pragma unroll
    for (int tile = 0; tile < kDimTiles; ++tile) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int index = thread256 + 2 * kWarpgroup * r, h = index / 8, chunk = index % 8;
        const bool used = head_base + h < p.heads;
        const __nv_bfloat16* source = static_cast<const __nv_bfloat16*>(p.q) +
                                      (used ? (t * p.heads + head_base + h) * kHeadDim + tile * 64 + chunk * 8 : 0);
        ptx::cp_async_or_zero<16>(shared_address(smem + kQ + tile * kTileBytes + swizzled(h, chunk)), source, used);
      }
      ptx::cp_async_mbarrier_arrive_noinc(shared_address(barriers.q_full(tile)));
    }
    trace_point<kTrace>(trace, prefill_trace::kQStaged);  // here: Q's copies issued
  } else {
    constexpr int kChunks = kHeads * kHeadDim / 8 / (2 * kWarpgroup);
    uint4 packed[kChunks];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int index = thread256 + 2 * kWarpgroup * i, h = index / 64, dim = (index % 64) * 8;
      const int64_t element = (t * p.heads + head_base + h) * kHeadDim + dim;
      packed[i] = make_uint4(0, 0, 0, 0);
      if (head_base + h < p.heads) {
        if (p.q_dtype == AttentionDtype::Bf16) {
          packed[i] = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + element);
        } else {
          const float4 lo = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + element);
          const float4 hi = *reinterpret_cast<const float4*>(static_cast<const float*>(p.q) + element + 4);
          packed[i] = make_uint4(pack_bf16x2(lo.x, lo.y), pack_bf16x2(lo.z, lo.w), pack_bf16x2(hi.x, hi.y),
                                 pack_bf16x2(hi.z, hi.w));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int index = thread256 + 2 * kWarpgroup * i, h = index / 64, dim = (index % 64) * 8;
      *reinterpret_cast<uint4*>(smem + kQ + (dim / 64) * kTileBytes + swizzled(h, (dim % 64) / 8)) = packed[i];
    }
    sm90::fence_proxy_async_shared();
    sm90::named_barrier_sync<2 * kWarpgroup>(kBarrierConsumers);
    trace_point<kTrace>(trace, prefill_trace::kQStaged);
  }

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;
  float s[32];
  uint32_t pf[4][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const float scale_log2 = p.softmax_scale * kLog2e;
  float2* shared_max = reinterpret_cast<float2*>(smem + kMax) + warp * 8 + g;
  const int32_t* valid = reinterpret_cast<const int32_t*>(smem + kValid) + consumer * kBlock;
  uint8_t* own_p = smem + kP + consumer * kTileBytes;
  const uint8_t* other_p = smem + kP + (consumer ^ 1) * kTileBytes;
  // This consumer's row sums (each over its own blocks, against the last pair's max), summed over the row's quad and
  // published for the other: both consumers' sums add up.
  float2* shared_sum = reinterpret_cast<float2*>(smem + kSum);
  const auto publish_row_sums = [&] {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(0xFFFFFFFFu, row_sum[r], 2);
    }
    if (c == 0) shared_sum[consumer * 32 + warp * 8 + g] = make_float2(row_sum[0], row_sum[1]);
  };
  // Each consumer's row sums are final at its last pair's max (consumer 0 after the pair's max arrives, consumer 1
  // after its softmax) and go to the other at once, so that neither waits for the other's last PV (round s23-1, same
  // runs, bf16 q: Flash 8K 878.9 → 862.9 µs, Pro 8K 1729.0 → 1695.2, Flash 64K 897.8 → 885.4, with the own-half
  // stores below).
  const auto publish_final_row_sums = [&] {
    publish_row_sums();
    consumer_named_barrier<2 * kWarpgroup, kBarrierSum0, true>(consumer);
  };

  if (consumer == 0) {
    if (pairs > 0) {
      if constexpr (kTrace) {
        wait_full<kFp8>(barriers.arrival<kFp8>(0, 0, 0), 0);
        trace_point<kTrace>(trace, prefill_trace::kFirstData);
      }
      sm90::wgmma_fence();
      qk_half<kFp8>(s, smem, 0, 0, true, barriers, 0, q_tiles);
      qk_half<kFp8>(s, smem, 0, 1, false, barriers, 0, q_tiles);
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(s);
      trace_point<kTrace>(trace, prefill_trace::kFirstScores);
    }
    for (int i = 0; i < pairs; ++i) {
      const uint32_t parity = i & 1;
      sm90::mbarrier_wait(barriers.valid(0), parity);
      pair_point<kTrace>(trace, i, prefill_trace::kC0Valid);
      const BlockReference reference = block_reference(s, valid, c, scale_log2, row_max, row_max, row_sum);
      // The running max goes to consumer 1 before this block's weights are computed (round s23-1's trace: the two
      // softmaxes ran one after the other, 1350 + 1780 cycles of an 8200-cycle pair; round s23-2 with the two producer
      // changes above: Flash 8K 835.7 → 829.9 µs, Pro 8K 1631.1 → 1624.5, Flash 64K 865.9 → 863.9; alone 866.3 →
      // 858.3, 1695.9 → 1691.3, 885.1 → 883.5).
      if (c == 0) *shared_max = make_float2(row_max[0], row_max[1]);
      sm90::named_barrier_arrive<2 * kWarpgroup>(kBarrierMax0);
      pair_point<kTrace>(trace, i, prefill_trace::kC0MaxSent);
      block_weights(s, reference, row_sum, o, pf);
      pv_registers(o, pf, smem, 0, 0);
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(o);
      fence_fragments(pf);
      sm90::mbarrier_arrive(barriers.empty(0, 0));
      pair_point<kTrace>(trace, i, prefill_trace::kC0OwnPv);
      // The pair's max from consumer 1; this block's weights and everything accumulated so far move to it.
      sm90::named_barrier_sync<2 * kWarpgroup>(kBarrierMax1);
      pair_point<kTrace>(trace, i, prefill_trace::kC0PairMax);
      const float2 pair_max = *shared_max;
      const float factor[2] = {rescale_factor(row_max[0], pair_max.x), rescale_factor(row_max[1], pair_max.y)};
      row_max[0] = pair_max.x;
      row_max[1] = pair_max.y;
      row_sum[0] *= factor[0];
      row_sum[1] *= factor[1];
      if (i + 1 == pairs) publish_final_row_sums();
      const bool rescale = __any_sync(0xFFFFFFFFu, factor[0] != 1.0f || factor[1] != 1.0f);
      if (rescale) rescale_weights(s, factor, pf);
      store_weights(own_p, pf, warp, g, c);
      sm90::fence_proxy_async_shared();
      sm90::named_barrier_arrive<2 * kWarpgroup>(kBarrierP0);
      sm90::named_barrier_sync<2 * kWarpgroup>(kBarrierP1);
      pair_point<kTrace>(trace, i, prefill_trace::kC0OtherP);
      if (rescale) scale_rows(o, factor);
      wait_full<kFp8>(barriers.full(1, 0), parity);  // consumer 1 waited for it too; this orders the data for our reads
      pair_point<kTrace>(trace, i, prefill_trace::kC0LateHalf);
      pv_shared(o, other_p, smem, 1, 0);
      if (i + 1 < pairs) {
        // The next pair's scores run on the tensor cores behind this PV.
        sm90::wgmma_fence();
        qk_half<kFp8>(s, smem, 0, 0, true, barriers, parity ^ 1);
        sm90::wgmma_commit_group();
        sm90::wgmma_wait_group<1>();
        sm90::fence_operand(o);
        sm90::mbarrier_arrive(barriers.empty(1, 0));
        pair_point<kTrace>(trace, i, prefill_trace::kC0OtherPv);
        sm90::wgmma_fence();
        qk_half<kFp8>(s, smem, 0, 1, false, barriers, parity ^ 1);
        sm90::wgmma_commit_group();
        sm90::wgmma_wait_group<0>();
        sm90::fence_operand(s);
        sm90::fence_operand(o);
        pair_point<kTrace>(trace, i, prefill_trace::kC0NextScores);
      } else {
        sm90::wgmma_wait_group<0>();
        sm90::fence_operand(o);
        sm90::mbarrier_arrive(barriers.empty(1, 0));
        pair_point<kTrace>(trace, i, prefill_trace::kC0OtherPv);
      }
      if (i < prefill_trace::kPairs) trace_point<kTrace>(trace, prefill_trace::kPairEnd + i);
    }
  } else {
    for (int i = 0; i < pairs; ++i) {
      const uint32_t parity = i & 1;
      pair_point<kTrace>(trace, i, prefill_trace::kC1Issued);
      sm90::wgmma_fence();
      qk_half<kFp8>(s, smem, 1, 1, true, barriers, parity, q_tiles && i == 0);
      if (kTrace) {
        wait_full<kFp8>(barriers.arrival<kFp8>(1, 0, 0), parity);
        if (i < prefill_trace::kConsumer1Pairs) trace_point<kTrace>(trace, prefill_trace::kLastHalfArrived + i);
        pair_point<kTrace>(trace, i, prefill_trace::kC1LateTile);
      }
      qk_half<kFp8>(s, smem, 1, 0, false, barriers, parity, q_tiles && i == 0);
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(s);
      pair_point<kTrace>(trace, i, prefill_trace::kC1Scores);
      sm90::mbarrier_wait(barriers.valid(1), parity);
      // Consumer 0's running max, folded with this block's: the pair's max, handed back.
      sm90::named_barrier_sync<2 * kWarpgroup>(kBarrierMax0);
      if (i < prefill_trace::kConsumer1Pairs) trace_point<kTrace>(trace, prefill_trace::kMaxReceived + i);
      pair_point<kTrace>(trace, i, prefill_trace::kC1MaxReceived);
      const float2 base = *shared_max;
      const float base_max[2] = {base.x, base.y};
      __syncwarp();  // every lane of the row's quad has read it before lane c = 0 overwrites it
      const BlockReference reference = block_reference(s, valid, c, scale_log2, base_max, row_max, row_sum);
      // The pair's max goes back before this block's weights are computed.
      if (c == 0) *shared_max = make_float2(row_max[0], row_max[1]);
      sm90::named_barrier_arrive<2 * kWarpgroup>(kBarrierMax1);
      pair_point<kTrace>(trace, i, prefill_trace::kC1MaxSent);
      block_weights(s, reference, row_sum, o, pf);
      if (i + 1 == pairs) publish_final_row_sums();
      pv_registers(o, pf, smem, 1, 1);
      store_weights(own_p, pf, warp, g, c);
      sm90::fence_proxy_async_shared();
      sm90::named_barrier_sync<2 * kWarpgroup>(kBarrierP0);
      pair_point<kTrace>(trace, i, prefill_trace::kC1OtherP);
      wait_full<kFp8>(barriers.full(0, 1), parity);
      pair_point<kTrace>(trace, i, prefill_trace::kC1Half);
      pv_shared(o, other_p, smem, 0, 1);
      sm90::named_barrier_arrive<2 * kWarpgroup>(kBarrierP1);
      sm90::wgmma_wait_group<1>();
      sm90::fence_operand(o);
      fence_fragments(pf);
      sm90::mbarrier_arrive(barriers.empty(1, 1));
      pair_point<kTrace>(trace, i, prefill_trace::kC1OwnPv);
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(o);
      sm90::mbarrier_arrive(barriers.empty(0, 1));
      pair_point<kTrace>(trace, i, prefill_trace::kC1OtherPv);
    }
  }

  // q_tiles: this thread's Q copies are complete before the CTA can end (a query without pairs never waited on them).
  if (q_tiles) ptx::cp_async_wait_all();
  // Both consumers end on the last pair's max; their row sums add up.
  if (pairs == 0) publish_final_row_sums();
  consumer_named_barrier<2 * kWarpgroup, kBarrierSum0, false>(consumer ^ 1);
  const float2 peer = shared_sum[(consumer ^ 1) * 32 + warp * 8 + g];
  row_sum[0] += peer.x;
  row_sum[1] += peer.y;
  float inverse_denominator[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    inverse_denominator[r] = inverse_softmax_denominator(sink_log2[r], row_max[r], row_sum[r]);
  if (rope) sm90::mbarrier_wait(barriers.rope_ready(), 0);
  trace_point<kTrace>(trace, prefill_trace::kEpilogue);

  const int dim_base = consumer * (kHeadDim / 2);
  if (p.out_dtype == AttentionDtype::F32) {
    // fp32 rows straight from the fragments: a quad's four 8-byte stores fill a 32-byte sector.
#pragma unroll
    for (int n = 0; n < 32; ++n) {
      const int dim = dim_base + 8 * n + 2 * c;
      const float acc[4] = {o[4 * n], o[4 * n + 1], o[4 * n + 2], o[4 * n + 3]};
      store_output_fragment(p, t, head, kHeadDim, dim, acc, inverse_denominator, rope && dim >= nope_dim,
                            [&] { return rope_table[(dim - nope_dim) / 2]; });
    }
    trace_point<kTrace>(trace, prefill_trace::kEnd);
    return;
  }
  // bf16 rows staged (a quad's 4-byte fragment stores would fill half a sector): each consumer's 64 heads × 256 dims
  // in the buffer half that only it read last ((0, 0) for consumer 0, (1, 1) for consumer 1; no wgmma reads it after
  // its last wait) and stored by its own warpgroup without waiting for the other (round s23-1, with the early row-sum
  // exchange above), in 16-byte chunks, consecutive threads on consecutive chunks of a row (H200, 4096 × 640 Flash
  // prefill, bf16 q and out: 976 → 935 µs; staging fp32 rows was slower on decode batches, 84.0 → 86.1 µs), with
  // the streaming (evict-first) policy: the 64 KB a CTA writes then leaves the entries and q rows that later CTAs
  // read in L2 (round s22-1, same runs: Flash 8K 915.2 → 895.5 µs, Pro 8K 1796.3 → 1757.6, Flash 64K 939.7 →
  // 917.8; one TMA bulk copy per row instead: 905.0 / 1772.5 / 925.4, in round s22-2 with an L2 evict-first hint
  // against the streaming stores: 911.8 / 1789.7 / 937.1 vs 905.2 / 1778.8 / 929.5).
  uint8_t* staging = smem + kKv + consumer * (kBufferBytes + kHalfTiles * kTileBytes);
  static_assert(kHeads * kHeadDim <= kHalfTiles * kTileBytes, "a consumer's bf16 output rows fit a buffer half");
  constexpr int row_bytes = kHeadDim * 2;
  constexpr int staged_row_bytes = row_bytes / 2, row_chunks = staged_row_bytes / 16;
  // The fragment's 8-dim block n normalised and rotated back, as bf16x2 of its rows g (packed[0]) and g + 8.
  const auto output_pair = [&](int n, uint32_t (&packed)[2]) {
    const int dim = dim_base + 8 * n + 2 * c;
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = o[4 * n + e] * inverse_denominator[e / 2];
    if (rope && dim >= nope_dim) {
      const RopeFactors f = rope_table[(dim - nope_dim) / 2];
      rope_rotate_pair(v[0], v[1], f, true);
      rope_rotate_pair(v[2], v[3], f, true);
    }
    packed[0] = pack_bf16x2(v[0], v[1]);
    packed[1] = pack_bf16x2(v[2], v[3]);
  };
  {
    // Blocks n and n + 1 of every warp's 16 rows by one stmatrix.x4 (matrix m: rows 8 (m % 2).., block n + m / 2):
    // a quarter of the 4-byte stores.
    const int matrix = lane / 8, row = 16 * warp + lane % 8 + 8 * (matrix % 2);
    const uint32_t row_address = shared_address(staging) + uint32_t(row * staged_row_bytes);
#pragma unroll
    for (int n = 0; n < 32; n += 2) {
      uint32_t low[2], high[2];
      output_pair(n, low);
      output_pair(n + 1, high);
      ptx::stmatrix_x4(row_address + uint32_t(((n + matrix / 2) ^ (row & 7)) << 4), low[0], low[1], high[0], high[1]);
    }
  }
  consumer_named_barrier<kWarpgroup, kBarrierStaged0, false>(consumer);
  trace_point<kTrace>(trace, prefill_trace::kStaged);
  uint8_t* out = static_cast<uint8_t*>(p.out) + (t * p.heads + head_base) * int64_t(row_bytes) + dim_base * 2;
  const bool aligned16 = (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;
  const int rows = min(kHeads, p.heads - head_base);
  for (int i = thread; i < rows * row_chunks; i += kWarpgroup) {
    const int row = i / row_chunks, byte = (i % row_chunks) * 16;
    const uint4 value = *reinterpret_cast<const uint4*>(staging + staged_offset(row, staged_row_bytes, byte));
    uint8_t* destination = out + int64_t(row) * row_bytes + byte;
    if (aligned16) {
      __stcs(reinterpret_cast<uint4*>(destination), value);
    } else {  // out is at least 8-byte aligned (the call's contract)
      __stcs(reinterpret_cast<uint2*>(destination), make_uint2(value.x, value.y));
      __stcs(reinterpret_cast<uint2*>(destination) + 1, make_uint2(value.z, value.w));
    }
  }
  trace_point<kTrace>(trace, prefill_trace::kEnd);
}

template <bool kFp8, bool kTrace>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_attention_prefill_kernel(const __grid_constant__ SparseAttentionParams p, const int head_blocks,
                                    const int resident_ctas, const bool prefetch_resolved, uint64_t* trace) {
  allow_dependents();
  extern __shared__ uint8_t smem_unaligned[];
  // The swizzled tiles and the descriptors' zero base offset need a 1024-byte aligned base.
  uint8_t* smem = smem_unaligned + ((1024 - shared_address(smem_unaligned) % 1024) % 1024);
  const int head_block = int(blockIdx.x % unsigned(head_blocks));
  const int64_t t = int64_t(blockIdx.x / unsigned(head_blocks));
  const Barriers barriers{reinterpret_cast<uint64_t*>(smem + kBarriers)};
  if (threadIdx.x == 0) {
    // full: every producer thread (its cp.async arrival or its stores); tile_full (bf16 entries only, so initialised
    // only there): every producer thread's cp.async arrival; empty: the releasing consumer's threads; valid,
    // rope_ready: every producer thread.
    for (int i = 0; i < kBarrierCount + (kFp8 ? 0 : kTileBarrierCount); ++i)
      sm90::mbarrier_init(barriers.base + i, kWarpgroup);
    if constexpr (!kFp8) {  // q_tiles' barriers (bf16 entries)
      for (int tile = 0; tile < kDimTiles; ++tile) sm90::mbarrier_init(barriers.q_full(tile), 2 * kWarpgroup);
    }
    sm90::fence_mbarrier_init();
  }
  __syncthreads();
  trace_point<kTrace>(trace, prefill_trace::kStart);
  if (threadIdx.x >= 2 * kWarpgroup) {
    sm90::setmaxnreg_decrease<kProducerRegisters>();
    wait_for_prior_grids();
    // The CTA that starts about when this one ends: one per SM is resident (resident_ctas), launched in order.
    const int64_t ahead = int64_t(blockIdx.x) + resident_ctas;
    const bool ahead_exists = ahead < p.tokens * head_blocks;
    produce<kFp8, kTrace>(p, smem, t, query_pairs(p, t), prefetch_resolved, barriers,
                          ahead_exists ? ahead / head_blocks : -1, int(ahead % head_blocks) * kHeads, trace);
  } else {
    sm90::setmaxnreg_increase<kConsumerRegisters>();
    consume<kFp8, kTrace>(p, smem, t, head_block * kHeads, barriers, trace);
  }
}

}  // namespace dsv4::cuda::sparse_attention_prefill_detail
