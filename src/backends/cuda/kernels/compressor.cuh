// Device code behind compressor.hpp (the contract is there).
//
// NOTES:
// - A CTA pools one entry: thread (group, pair) owns channels 2·pair, 2·pair + 1 (the RoPE pair) and a strided share
//   of the window's slots; each keeps an online softmax (max, denominator, numerator) per channel, and group 0 merges
//   the groups' partials through shared memory. Several slot groups per channel keep enough loads in flight when
//   the window is long (HCA: 128 slots) and entries are few.
// - Each slot's source follows from its position q: the chunk (q ≥ start), the state's incomplete window
//   (q ≥ ratio·(start div ratio)), or for CSA's first halves of the window before the chunk's first, the state's
//   previous halves. The source address is selected without branches and a thread issues the loads of kSlotBatch
//   slots before it uses any, so a thread has several round trips in flight instead of one per slot.
// - State update. A run of at most `ratio` tokens (every decode step; entries_per_run = 1) is pooled by one CTA per
//   channel slice, and each slice's reads and writes of the state touch only its own channels: that CTA updates its
//   slice after its own reads, with no inter-CTA ordering. Longer runs (prefill chunks) have several entries whose
//   CTAs read the old state while it must be replaced, so the run's CTA that finishes last (ticket in the state,
//   after a fence) writes all of it. Either way CSA's previous halves first (they may come from the old window
//   slots), a barrier, then the new incomplete window's slots.
// - Few entries (decode, HCA) would leave most SMs idle and one SM streaming a whole 128-slot window, so an entry's
//   channels are split over CTAs of a cluster (slices of whole 64-channel fp8 blocks); the RMSNorm's sum of squares
//   is then added over those CTAs through distributed shared memory, in rank order (the same sum in every CTA).
// - Up to two compressors (a CSA layer's main and indexer compressors, "pools") share one launch: the pools' CTA
//   ranges follow each other (a lean launch's second pool first), each a whole number of hardware clusters. The
//   launch's cluster is the largest split of its pools; a pool that splits its entries over fewer CTAs packs several
//   entries into one hardware cluster (and pads its last one), and every CTA of a cluster takes part in the cluster
//   barriers (which one entry's cluster skips together when the step completes no entry).
// - Pairs are padded to whole warps so that an fp8 block of 64 channels is exactly one warp of group 0.
// - A prefill chunk's entries whose window lies wholly in the run ("in-run entries": all but the first one or two)
//   read nothing of the state, so their CTAs take no ticket (no fence, no contended atomic): the run's state is
//   updated by the last of its other CTAs (the run's last entry row is always one of them). Those come first in the
//   launch (entry_row_at), so that the update overlaps the in-run CTAs.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kernels/indexer.cuh"
#include "backends/cuda/kernels/kv_insert.cuh"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/warp_trace.cuh"
#include "core/activation_block_scale.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/rms_norm_math.hpp"

namespace dsv4::cuda::compressor {

inline constexpr int kMaxThreads = 512;
inline constexpr int kMaxPools = 2;
inline constexpr int kMaxClusterCtas = 8;  // CTAs per entry at most (the portable cluster size)
inline constexpr int kSlotBatch = 4;    // slots whose loads a thread issues before using any
inline constexpr int kUpdateBatch = 4;  // state values a thread loads before storing any
// Staged slot loads (CompressorSlotLoads::Staged): CTAs of at most kStagedThreads threads, each thread's
// slots copied by cp.async into a ring of kStages batches in shared memory (value, score and ape pairs).
inline constexpr int kStagedThreads = 256;
inline constexpr int kStages = 2;
inline constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();

// x div d and x mod d for 0 ≤ x < 2^31 by a multiply-high, an add and a shift (Granlund and Montgomery's round-up
// method), the magic number made once by the launcher: a divide by a run-time value is a chain of ~20 dependent
// instructions, and the decode step's path from the runs' load to its loads and stores held a dozen of them.
struct FastDivisor {
  uint32_t divisor = 1, multiplier = 1, shift = 0;

  // d ≥ 1. M = 2^32 + multiplier = floor(2^(32+shift) / d) + 1 with 2^shift ≥ d: q = floor(x·M / 2^(32+shift)) is
  // exact for x < 2^32, and high + x below cannot overflow for x < 2^31.
  static FastDivisor of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    return {d, uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1), shift};
  }
  DSV4_HD uint32_t div(uint32_t x) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(x, multiplier);
#else
    const uint32_t high = uint32_t((uint64_t(x) * multiplier) >> 32);
#endif
    return (high + x) >> shift;
  }
  DSV4_HD uint32_t mod(uint32_t x) const { return x - div(x) * divisor; }
};

// One compressor of a launch (launch-wide fields; a CTA's run is a RunView).
struct PoolArgs {
  int c;
  int64_t ratio;
  int ratio_log2;         // log2(ratio) when it is a power of two (DSV4's 4 and 128), else −1
  bool runs_before_wait;  // CompressorParams::runs_ready_at_launch
  bool overlapping;
  float norm_eps;
  bool round_pooled_to_bf16;
  CompressorStoredRounding stored_rounding;
  const float* kv;        // the launch's rows
  const float* gate;
  int64_t row_stride;     // elements from one token's kv / gate row to the next
  const CompressorRun* runs;
  const float* ape;
  const float* norm_weight;
  const float* rope_frequencies;
  const float2* rope_table;  // or null
  int rope_dim;
  CompressorStateView state;  // every slot's
  float* entries;
  int32_t* entry_rows;
  int32_t* entry_slots;
  __nv_bfloat16* slot_entries_bf16;
  int64_t slot_entry_stride;
  int64_t slot_entry_capacity;
  uint8_t* slot_entries_fp8;
  float* slot_entry_scales;
  int64_t slot_scale_stride;
  KvCacheView cache;
  int cache_layer;
  int64_t entries_per_run;
  int64_t first_cta;     // the pool's first CTA in the launch (a multiple of the hardware cluster)
  int64_t ctas;          // run_count · entries_per_run · cluster_ctas; the pool's range pads this to whole clusters
  int cluster_ctas;      // CTAs per entry, each pooling channels_per_cta channels
  int channels_per_cta;
  int pairs_padded;      // threads per slot group (channels_per_cta / 2 rounded up to 32)
  int groups;            // slot groups
  // Divisors of the CTA and state-item arithmetic: cluster_ctas, entries_per_run, pairs_padded; the state's pairs and
  // rows of pairs (halves · pairs) for a channel slice (channels_per_cta) and for the whole entry (c).
  FastDivisor cluster_div, entries_div, pairs_padded_div, slice_pairs_div, slice_row_div, whole_pairs_div,
      whole_row_div;
  // Lean slot loads (CompressorSlotLoads::Lean): entries per CTA (one team of c / 4 threads each), the entry rows
  // (run_count · entries_per_run) and the team size's divisor.
  int lean_teams;
  int64_t rows;
  FastDivisor team_div;
  // Lean CSA windows of ratio 4 wholly in the run take straight-line loads (load_csa_window).
  bool lean_csa_windows;
};

struct LaunchArgs {
  PoolArgs pools[kMaxPools];
  int pool_count;
  int hardware_cluster;  // CTAs per launched cluster: the largest cluster_ctas of the pools
  // The indexer's query preparation in the same launch (prepare_head_dim 0: none), one warp per vector on the CTAs
  // from prepare_first_cta (after the pools' clusters).
  indexer::PrepareArgs prepare;
  int prepare_head_dim;
  int64_t prepare_first_cta;
  int prepare_rows_per_cta;  // warps of a preparation CTA that take a vector (the others exit)
  uint64_t* trace;  // CompressorParams::trace (traced kernels only)
};

// Records CompressorTracePoint `point` of the calling CTA (thread 0 stores) when kTrace; nothing otherwise: the
// per-warp records of ptx/warp_trace.cuh with one record per CTA, warp 0's. The time is read behind a test of
// `dependency`, so a point given a loaded value is not reached before the value arrives (a warp issues in order).
template <bool kTrace>
__device__ __forceinline__ void trace_point(uint64_t* trace, int point, uint32_t dependency = 0) {
  if constexpr (kTrace) {
    if (threadIdx.x == 0 && dependency != 0xFFFFFFFFu)
      sm90::record_warp_trace_point(trace, 1, kCompressorTracePoints, point, COMPRESSOR_TRACE_START,
                                    COMPRESSOR_TRACE_SM);
  }
}

// Shared memory: per group and channel the partial (max, denominator, numerator), then the CTA's channels of one entry.
inline size_t pool_smem_bytes(int channels, int groups) {
  return (size_t(3) * groups * channels + channels) * sizeof(float);
}

// The staged slot loads' ring after a pool's partials: [stage][batch slot][value, score, ape][thread] float2.
inline size_t staging_smem_bytes(int threads) { return size_t(kStages) * kSlotBatch * 3 * threads * sizeof(float2); }

// One run as a CTA sees it: its rows, positions and state slot.
struct RunView {
  const float* kv;  // the run's first row
  const float* gate;
  int64_t start;
  int64_t tokens;
  CompressorStateView state;  // the run's slot
};

struct SlotValue {
  float2 value;
  float2 score;
};

__device__ __forceinline__ float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }

__device__ __forceinline__ int64_t width_of(const PoolArgs& a) { return a.overlapping ? 2 * int64_t(a.c) : a.c; }

// x div ratio and x mod ratio for x ≥ 0: a shift and a mask for a power-of-two ratio (the 64-bit division is a long
// dependent chain on the path from the runs' load to the slots' addresses).
__device__ __forceinline__ int64_t ratio_div(const PoolArgs& a, int64_t x) {
  return a.ratio_log2 >= 0 ? x >> a.ratio_log2 : x / a.ratio;
}
__device__ __forceinline__ int64_t ratio_mod(const PoolArgs& a, int64_t x) {
  return a.ratio_log2 >= 0 ? x & (a.ratio - 1) : x % a.ratio;
}

// Where channels (column, column + 1) of the token at position q ≥ 0 come from: the run's rows or the state, and its
// ape; the address is selected without branches, so that loads of several slots issue back to back. kMayBePrevious:
// q may lie before the state's incomplete window (CSA's first halves, column < c, from the previous halves).
struct SlotSource {
  const float* value;
  const float* score;
  const float* ape;
};

template <bool kMayBePrevious>
__device__ __forceinline__ SlotSource slot_source(const PoolArgs& a, const RunView& r, int64_t q, int column) {
  const int64_t width = width_of(a);
  const int64_t slot = ratio_mod(a, q);
  const bool in_run = q >= r.start;
  const bool in_window = !kMayBePrevious || q >= r.start - ratio_mod(a, r.start);
  const int64_t run_offset = (q - r.start) * a.row_stride + column;
  const float* value = in_run      ? r.kv + run_offset
                       : in_window ? r.state.window_kv + slot * width + column
                                   : r.state.previous_kv + slot * a.c + column;
  const float* score = in_run      ? r.gate + run_offset
                       : in_window ? r.state.window_score + slot * width + column
                                   : r.state.previous_score + slot * a.c + column;
  return {value, score, a.ape + slot * width + column};
}

// The slot's value, and its score with ape added (the state holds scores as projected).
__device__ __forceinline__ SlotValue slot_value(float2 v, float2 s, float2 bias) {
  return {v, make_float2(s.x + bias.x, s.y + bias.y)};
}

// A slot as pooled.
template <bool kMayBePrevious>
__device__ __forceinline__ SlotValue load_slot(const PoolArgs& a, const RunView& r, int64_t q, int column) {
  const SlotSource source = slot_source<kMayBePrevious>(a, r, q, column);
  return slot_value(load_pair(source.value), load_pair(source.score), load_pair(source.ape));
}

// Pooled slot s (unclamped) of entry w for the thread's pair at `channel`: CSA's slots [0, m) are window w−1's first
// halves, [m, 2m) window w's second halves. Past the window (s ≥ slots) or before position 0 (CSA's first entry) the
// slot is invalid, and reads a valid position (the last slot, or 0) whose value is dropped.
struct PooledSlot {
  int64_t q;
  int column;
  bool valid;
};

__device__ __forceinline__ PooledSlot pooled_slot(const PoolArgs& a, int64_t w, int s_unclamped, int slots,
                                                  int channel) {
  const int s = min(s_unclamped, slots - 1);
  const bool first_half = a.overlapping && s < a.ratio;
  const int64_t within = a.overlapping && !first_half ? s - a.ratio : s;
  const int64_t q = (first_half ? w - 1 : w) * a.ratio + within;
  return {max(q, int64_t(0)), channel + (a.overlapping && !first_half ? a.c : 0), s_unclamped < slots && q >= 0};
}

// Channels (column, column + 1) of the run's token at position q ≥ start as the state stores them.
__device__ __forceinline__ SlotValue load_run_slot(const PoolArgs& a, const RunView& r, int64_t q, int column) {
  const int64_t offset = (q - r.start) * a.row_stride + column;
  return {load_pair(r.kv + offset), load_pair(r.gate + offset)};
}

// Keeps the compiler from moving shared-memory accesses across a cp.async issue or wait (their asm statements have
// no memory clobber): the ring's slots are read back by the thread that copied them, with no barrier between.
__device__ __forceinline__ void compiler_memory_fence() { asm volatile("" ::: "memory"); }

// Online softmax of one channel, kSlotBatch values at a time (one rescale per batch).
struct OnlineSoftmax {
  float max = kNegativeInfinity;
  float denominator = 0.0f;
  float numerator = 0.0f;

  // A score of −∞ has weight exactly 0, as on the CPU.
  __device__ __forceinline__ void add(const float (&value)[kSlotBatch], const float (&score)[kSlotBatch]) {
    float batch_max = max;
#pragma unroll
    for (int k = 0; k < kSlotBatch; ++k) batch_max = fmaxf(batch_max, score[k]);
    if (batch_max == kNegativeInfinity) return;
    const float rescale = expf(max - batch_max);  // 0 while nothing was added
    denominator *= rescale;
    numerator *= rescale;
#pragma unroll
    for (int k = 0; k < kSlotBatch; ++k) {
      const float weight = expf(score[k] - batch_max);
      denominator += weight;
      numerator += weight * value[k];
    }
    max = batch_max;
  }
};

// A channel pair's pooled values from its slot groups' partial softmaxes (max[g · pairs], den[…], num[…], g < groups;
// float2: the pair's channels adjacent), merged in group order with per channel the same operations as alone (the same
// bits). No branch per group, so every group's loads and expf issue together: a group that pooled nothing (max −∞,
// sums 0) adds 0 · expf(−∞) = +0 to each sum, as skipping it did (the sums are never −0).
// Unrolled by two, not by the compiler's choice: a CTA merges once, from cold instruction cache, and the pair's two
// chains interleave.
__device__ __forceinline__ float2 merge_pair_partials(int groups, const float2* max, const float2* den,
                                                      const float2* num, int pairs) {
  float2 m = make_float2(kNegativeInfinity, kNegativeInfinity);
#pragma unroll 2
  for (int g = 0; g < groups; ++g) {
    const float2 x = max[g * pairs];
    m.x = fmaxf(m.x, x.x);
    m.y = fmaxf(m.y, x.y);
  }
  float2 d = make_float2(0.0f, 0.0f), n = make_float2(0.0f, 0.0f);
#pragma unroll 2
  for (int g = 0; g < groups; ++g) {
    const float2 x = max[g * pairs], pd = den[g * pairs], pn = num[g * pairs];
    const float scale0 = expf(x.x - m.x), scale1 = expf(x.y - m.y);
    d.x += pd.x * scale0;
    n.x += pn.x * scale0;
    d.y += pd.y * scale1;
    n.y += pn.y * scale1;
  }
  return make_float2(n.x / d.x, n.y / d.y);
}

// A channel pair's share of the RMSNorm's sum of squares, and the norm's factor from the entry's sum.
__device__ __forceinline__ float pair_square(float x0, float x1) { return x0 * x0 + x1 * x1; }

// Adds a batch of slots to a channel pair's two softmaxes; invalid slots weigh 0.
__device__ __forceinline__ void add_batch(OnlineSoftmax& channel0, OnlineSoftmax& channel1,
                                          const SlotValue (&slot)[kSlotBatch], const bool (&valid)[kSlotBatch]) {
  float value0[kSlotBatch], value1[kSlotBatch], score0[kSlotBatch], score1[kSlotBatch];
#pragma unroll
  for (int k = 0; k < kSlotBatch; ++k) {
    value0[k] = valid[k] ? slot[k].value.x : 0.0f;
    value1[k] = valid[k] ? slot[k].value.y : 0.0f;
    score0[k] = valid[k] ? slot[k].score.x : kNegativeInfinity;
    score1[k] = valid[k] ? slot[k].score.y : kNegativeInfinity;
  }
  channel0.add(value0, score0);
  channel1.add(value1, score1);
}

// A thread's share of entry w's pooling for its pair at `channel`: slots group, group + groups, … (slots in all),
// kSlotBatch at a time. rope_here: the thread also makes the factors of RoPE pair rope_pair (frequency), while its
// first loads are in flight.
struct PoolingTask {
  int64_t w;
  int group, channel, slots;
  bool rope_here;
  int rope_pair;
  float frequency;
};

// The pair's RoPE factors at the window start: one 8-byte load from the table, or a double-precision sincos.
__device__ __forceinline__ RopeFactors window_rope(const PoolArgs& a, const PoolingTask& t) {
  if (a.rope_table == nullptr) return rope_factors(t.w * a.ratio, t.frequency);
  const float2 f = __ldg(a.rope_table + t.w * a.ratio * (a.rope_dim / 2) + t.rope_pair);
  return {f.x, f.y};
}

// Loads into registers, each batch's issued before any of them is used.
__device__ __forceinline__ void pool_from_registers(const PoolArgs& a, const RunView& r, const PoolingTask& t,
                                                    RopeFactors& rope, OnlineSoftmax& channel0,
                                                    OnlineSoftmax& channel1) {
  for (int s0 = t.group; s0 < t.slots; s0 += kSlotBatch * a.groups) {
    SlotValue slot[kSlotBatch];
    bool valid[kSlotBatch];
#pragma unroll
    for (int k = 0; k < kSlotBatch; ++k) {
      const PooledSlot p = pooled_slot(a, t.w, s0 + k * a.groups, t.slots, t.channel);
      slot[k] = load_slot<true>(a, r, p.q, p.column);
      valid[k] = p.valid;
    }
    if (s0 == t.group && t.rope_here) rope = window_rope(a, t);
    add_batch(channel0, channel1, slot, valid);
  }
}

// Position of entry w's first pooled slot (CSA: window w − 1's first token).
__device__ __forceinline__ int64_t window_first_position(const PoolArgs& a, int64_t w) {
  return (w - (a.overlapping ? 1 : 0)) * a.ratio;
}

// Loads as cp.async copies into the thread's part of the ring (kStages batches in flight, no registers held while
// they are): a prefill CTA keeps its window's bytes in flight with the registers of a few values. kWindowInRun: the
// window lies wholly in the run (known at compile time: the loop's code holds one address path, not both per slot,
// and the in-run path's copies sit in ≈ 12 KB of code instead of spread over 50 KB).
template <bool kWindowInRun>
__device__ __forceinline__ void pool_from_staging_loop(const PoolArgs& a, const RunView& r, const PoolingTask& t,
                                                       float2* ring, RopeFactors& rope,
                                                       OnlineSoftmax& channel0, OnlineSoftmax& channel1) {
  const int step = kSlotBatch * a.groups;
  const int batches = (t.slots - t.group + step - 1) / step;  // group < groups ≤ slots
  const int threads = int(blockDim.x);
  float2* const mine = ring + threadIdx.x;
  // Kind 0: value, 1: score, 2: ape, of batch slot k in stage `stage`.
  const auto at = [&](int stage, int k, int kind) { return mine + ((stage * kSlotBatch + k) * 3 + kind) * threads; };
  // A window wholly in the run (every entry of a prefill chunk but its first): slot s's row is the window's first
  // plus s (second halves: plus s − ratio and c columns on), so its addresses need no per-slot source selection.
  const int64_t window_offset =
      kWindowInRun ? (window_first_position(a, t.w) - r.start) * a.row_stride + t.channel : 0;
  const auto issue = [&](int batch, int stage) {
#pragma unroll
    for (int k = 0; k < kSlotBatch; ++k) {
      const int slot = t.group + batch * step + k * a.groups;
      SlotSource source;
      if constexpr (kWindowInRun) {
        const int s = min(slot, t.slots - 1);  // past the window: a valid address, its value dropped
        const bool second = a.overlapping && s >= a.ratio;
        const int64_t offset = window_offset + int64_t(s) * a.row_stride + (second ? a.c : 0);
        source = {r.kv + offset, r.gate + offset,
                  a.ape + (second ? s - a.ratio : s) * width_of(a) + t.channel + (second ? a.c : 0)};
      } else {
        const PooledSlot p = pooled_slot(a, t.w, slot, t.slots, t.channel);
        source = slot_source<true>(a, r, p.q, p.column);
      }
      ptx::cp_async_or_zero<8>(uint32_t(__cvta_generic_to_shared(at(stage, k, 0))), source.value, true);
      ptx::cp_async_or_zero<8>(uint32_t(__cvta_generic_to_shared(at(stage, k, 1))), source.score, true);
      ptx::cp_async_or_zero<8>(uint32_t(__cvta_generic_to_shared(at(stage, k, 2))), source.ape, true);
    }
    ptx::cp_async_commit();
  };
  static_assert(kStages == 2, "the waits below keep one batch in flight behind the one used");
  issue(0, 0);
  if (batches > 1) issue(1, 1);
  if (t.rope_here) rope = window_rope(a, t);
  for (int b = 0; b < batches; ++b) {
    if (b + 1 < batches)
      ptx::cp_async_wait<1>();
    else
      ptx::cp_async_wait<0>();
    compiler_memory_fence();
    const int stage = b & 1;
    SlotValue slot[kSlotBatch];
    bool valid[kSlotBatch];
#pragma unroll
    for (int k = 0; k < kSlotBatch; ++k) {
      const int slot_index = t.group + b * step + k * a.groups;
      // Every position of a window in the run is ≥ 0.
      valid[k] = kWindowInRun ? slot_index < t.slots : pooled_slot(a, t.w, slot_index, t.slots, t.channel).valid;
      slot[k] = slot_value(*at(stage, k, 0), *at(stage, k, 1), *at(stage, k, 2));
    }
    add_batch(channel0, channel1, slot, valid);
    compiler_memory_fence();  // this stage's reads come before its refill
    if (b + 2 < batches) issue(b + 2, stage);
  }
}

__device__ __forceinline__ void pool_from_staging(const PoolArgs& a, const RunView& r, const PoolingTask& t,
                                                  float2* ring, RopeFactors& rope,
                                                  OnlineSoftmax& channel0, OnlineSoftmax& channel1) {
  if (window_first_position(a, t.w) >= r.start)  // CTA-uniform
    pool_from_staging_loop<true>(a, r, t, ring, rope, channel0, channel1);
  else
    pool_from_staging_loop<false>(a, r, t, ring, rope, channel0, channel1);
}

// float_to_e4m3 then e4m3_to_float of both values by the hardware conversions (round to nearest even, saturating
// at ±448 as float_to_e4m3 does): two instructions instead of ≈ 40.
__device__ __forceinline__ float2 e4m3_round_trip(float x0, float x1) {
  const uint16_t codes = e4m3x2_codes(x0, x1);
  uint32_t halves;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"(codes));
  return __half22float2(*reinterpret_cast<const __half2*>(&halves));
}

// The fp8 KV block scale for a block's amax: s = 2^ceil(log2(max(amax, 1e-4) / 448)).
__device__ __forceinline__ float kv_fp8_scale(float amax) {
  return e8m0_to_float(e4m3_block_scale_code(amax));
}

// round_kv_reference of a channel pair: e4m3 at the block's scale (nope channels), else bf16.
__device__ __forceinline__ void kv_fp8_round_pair(float& x0, float& x1, float scale, bool nope) {
  if (nope) {
    // scale is a power of two ≥ 2^-22: its reciprocal is exact and x · (1/scale) is x / scale's value (the same
    // bits) without a division.
    const float inverse = 1.0f / scale;
    const float2 rounded = e4m3_round_trip(x0 * inverse, x1 * inverse);
    // An e4m3 value times a power of two ≥ 2^-22 is exact in bf16 (3 mantissa bits, no underflow).
    x0 = rounded.x * scale;
    x1 = rounded.y * scale;
  } else {
    x0 = round_to_bf16(x0);
    x1 = round_to_bf16(x1);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, m));
  return v;
}

// One warp's work on the whole entry `row` (c = 32·kPerLane, lane l holds channels kPerLane·l ..): the indexer
// rounding (IndexerFp4) in place, and with fp8 output the e4m3 codes and scale of entry w of `slot` stored.
// v: the lane's values, rounded in place; returns whether they were stored (fp8 output) or remain to be stored.
template <int kPerLane>
__device__ __forceinline__ bool finish_warp_vector(const PoolArgs& a, float (&v)[kPerLane], int lane, int64_t slot,
                                                   int64_t w) {
  if (a.stored_rounding == CompressorStoredRounding::IndexerFp4)
    indexer::warp_round_indexer_reference<kPerLane>(v, lane);
  if (a.slot_entries_fp8 != nullptr) {
    uint8_t codes[kPerLane];
    const float scale = indexer::warp_quantize_fp8<kPerLane>(v, codes);  // every lane: warp shuffles
    if (w < a.slot_entry_capacity) {
      indexer::store_fragment_bytes(a.slot_entries_fp8 + slot * a.slot_entry_stride + w * a.c + kPerLane * lane, codes);
      if (lane == 0) a.slot_entry_scales[slot * a.slot_scale_stride + w] = scale;
    }
    return true;
  }
  return false;
}

template <int kPerLane>
__device__ __forceinline__ void finish_whole_vector(const PoolArgs& a, float* row, int lane, int64_t slot,
                                                    int64_t w) {
  float v[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = row[kPerLane * lane + i];
  if (finish_warp_vector<kPerLane>(a, v, lane, slot, w)) return;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) row[kPerLane * lane + i] = v[i];
}

// The run's new state for channels [first, first + 2·pairs): CSA's previous halves when the run completes a window
// (item i: slot i / pairs of window end_window − 1, pair i % pairs), then the new incomplete window's slots (item i:
// token window_from + i / (halves·pairs), then half, then pair). Within each part no stored value is another's
// source; a barrier separates the parts (the previous halves may come from the old window slots).
struct StateUpdate {
  int64_t previous_base, window_from;
  int previous_items, window_items;  // 32-bit item arithmetic (bounded by the launcher: ratio · head_dim < 2^30)
  int first;
  FastDivisor pairs, row;  // pairs of the channels, and halves · pairs (one token's items)
};

// whole: the entry's c channels from 0 (the ticket update), else this CTA's channel slice from `first`.
__device__ __forceinline__ StateUpdate plan_state_update(const PoolArgs& a, const RunView& r, int first, bool whole) {
  const int64_t end = r.start + r.tokens, end_window = ratio_div(a, end);
  const FastDivisor pairs = whole ? a.whole_pairs_div : a.slice_pairs_div;
  const FastDivisor row = whole ? a.whole_row_div : a.slice_row_div;
  const bool completes = a.overlapping && end_window > ratio_div(a, r.start);
  const int64_t from = max(r.start, end_window * a.ratio);
  return {.previous_base = (end_window - 1) * a.ratio,
          .window_from = from,
          .previous_items = completes ? int(a.ratio) * int(pairs.divisor) : 0,
          .window_items = int(end - from) * int(row.divisor),
          .first = first,
          .pairs = pairs,
          .row = row};
}

// Position and column of window item i.
__device__ __forceinline__ int64_t window_item_position(const StateUpdate& u, int i) {
  return u.window_from + u.row.div(i);
}
__device__ __forceinline__ int window_item_column(const PoolArgs& a, const StateUpdate& u, int i) {
  const uint32_t within = u.row.mod(i);
  return int(u.pairs.div(within)) * a.c + u.first + 2 * int(u.pairs.mod(within));
}

// Item i of the window's slots (kWindow) or of the previous halves: its source value, and its store into the state.
template <bool kWindow>
__device__ __forceinline__ SlotValue load_item(const PoolArgs& a, const RunView& r, const StateUpdate& u, int i) {
  if constexpr (kWindow) {
    return load_run_slot(a, r, window_item_position(u, i), window_item_column(a, u, i));
  } else {
    const SlotSource source =
        slot_source<false>(a, r, u.previous_base + u.pairs.div(i), u.first + 2 * int(u.pairs.mod(i)));
    return {load_pair(source.value), load_pair(source.score)};
  }
}

template <bool kWindow>
__device__ __forceinline__ void store_item(const PoolArgs& a, const RunView& r, const StateUpdate& u, int i,
                                           const SlotValue& v) {
  if constexpr (kWindow) {
    const int64_t offset = ratio_mod(a, window_item_position(u, i)) * width_of(a) + window_item_column(a, u, i);
    *reinterpret_cast<float2*>(r.state.window_kv + offset) = v.value;
    *reinterpret_cast<float2*>(r.state.window_score + offset) = v.score;
  } else {
    const int64_t offset = int64_t(u.pairs.div(i)) * a.c + u.first + 2 * int(u.pairs.mod(i));
    *reinterpret_cast<float2*>(r.state.previous_kv + offset) = v.value;
    *reinterpret_cast<float2*>(r.state.previous_score + offset) = v.score;
  }
}

// A thread's first kEarlyItems items of each part, loaded before the pooling: a decode step's whole update, so that
// its loads overlap the pooling's instead of following them.
inline constexpr int kEarlyItems = 2;
struct EarlyUpdate {
  SlotValue previous[kEarlyItems];
  SlotValue window[kEarlyItems];
};

__device__ __forceinline__ EarlyUpdate load_early_update(const PoolArgs& a, const RunView& r, const StateUpdate& u) {
  EarlyUpdate e;
  const int thread = int(threadIdx.x), stride = int(blockDim.x);
#pragma unroll
  for (int k = 0; k < kEarlyItems; ++k) {
    // Past the end: a harmless repeat of the last item's load (never stored).
    if (u.previous_items > 0) e.previous[k] = load_item<false>(a, r, u, min(thread + k * stride, u.previous_items - 1));
    if (u.window_items > 0) e.window[k] = load_item<true>(a, r, u, min(thread + k * stride, u.window_items - 1));
  }
  return e;
}

// One part of the update (kWindow: the window's slots, else the previous halves) by every thread of the CTA, from
// item `first` of the thread (kEarly: its first items already in `early`), kUpdateBatch loads before their stores.
template <bool kWindow, bool kEarly>
__device__ __forceinline__ void update_part(const PoolArgs& a, const RunView& r, const StateUpdate& u, int items,
                                            int stride, int first, const SlotValue (&early)[kEarlyItems]) {
  if (kEarly) {
    const int thread = int(threadIdx.x);
#pragma unroll
    for (int k = 0; k < kEarlyItems; ++k)
      if (thread + k * stride < items) store_item<kWindow>(a, r, u, thread + k * stride, early[k]);
  }
  for (int i0 = first; i0 < items; i0 += kUpdateBatch * stride) {
    SlotValue value[kUpdateBatch];
#pragma unroll
    for (int k = 0; k < kUpdateBatch; ++k) value[k] = load_item<kWindow>(a, r, u, min(i0 + k * stride, items - 1));
#pragma unroll
    for (int k = 0; k < kUpdateBatch; ++k)
      if (i0 + k * stride < items) store_item<kWindow>(a, r, u, i0 + k * stride, value[k]);
  }
}

// The whole update by every thread of the CTA: the previous halves, then (after a barrier: their sources may be old
// window slots) the window's.
template <bool kEarly>
__device__ void update_state(const PoolArgs& a, const RunView& r, const StateUpdate& u, const EarlyUpdate& early) {
  const int stride = int(blockDim.x), first = int(threadIdx.x) + (kEarly ? kEarlyItems * stride : 0);
  if (u.previous_items > 0) {
    update_part<false, kEarly>(a, r, u, u.previous_items, stride, first, early.previous);
    __syncthreads();
  }
  update_part<true, kEarly>(a, r, u, u.window_items, stride, first, early.window);
}

// Where CTA `local` of pool `a` sits (CTAs are [run][entry of the run][cluster rank]; past a.ctas: padding of the last
// hardware cluster, which only takes part in the cluster barriers). 32-bit CTA arithmetic: the launcher keeps a
// launch under 2^31 CTAs.
struct ItemPlace {
  int entry_row;  // row of the compact fp32 output
  int rank;       // the CTA's channel slice of the entry
  int run_index;
  bool real;
};

// The entry row of the launch's `position`-th entry (positions [run][k]): a run's last entry row comes first, then its
// rows in order: each run's ticket-taking entries first (its last row, and the first one or two, whose windows reach
// before the run), so the state update by the last of them overlaps the in-run entries' CTAs instead of ending the
// launch.
__device__ __forceinline__ int entry_row_at(const PoolArgs& a, int position) {
  const int run = int(a.entries_div.div(uint32_t(position))), per_run = int(a.entries_div.divisor);
  const int k = position - run * per_run;
  return run * per_run + (k == 0 ? per_run - 1 : k - 1);
}

__device__ __forceinline__ ItemPlace item_place(const PoolArgs& a, int64_t local) {
  const bool real = local < a.ctas;
  const int entry_row = real ? entry_row_at(a, int(a.cluster_div.div(uint32_t(local)))) : 0;
  return {entry_row, int(a.cluster_div.mod(uint32_t(local))), int(a.entries_div.div(uint32_t(entry_row))), real};
}

// One entry a CTA pools: its run, its number, whether the run completes it, and (group 0, cache output) its cache row.
struct EntryItem {
  ItemPlace place;
  CompressorRun run;
  RunView r;
  int entry;  // of the run
  int64_t w;
  bool emitting;
  uint8_t* stored;
};

__device__ __forceinline__ RunView run_view(const PoolArgs& a, const CompressorRun& run) {
  return {.kv = a.kv + int64_t(run.first_token) * a.row_stride,
          .gate = a.gate + int64_t(run.first_token) * a.row_stride,
          .start = run.start_position,
          .tokens = run.tokens,
          .state = a.state.of_slot(run.slot)};
}

__device__ __forceinline__ EntryItem entry_item(const PoolArgs& a, const ItemPlace& place, const CompressorRun& run) {
  const RunView r = run_view(a, run);
  const int entry = int(a.entries_div.mod(uint32_t(place.entry_row)));
  const int64_t first_entry = ratio_div(a, r.start);
  const bool emitting = place.real && entry < ratio_div(a, r.start + r.tokens) - first_entry;  // entries emitted
  return {place, run, r, entry, first_entry + entry, emitting, nullptr};
}

// An in-run entry (see the notes): emitted, its window wholly in the run, not the run's last entry row.
__device__ __forceinline__ bool in_run_entry(const PoolArgs& a, const EntryItem& e) {
  return e.emitting && window_first_position(a, e.w) >= e.r.start && e.entry < a.entries_per_run - 1;
}

// The run's CTAs that take a ticket: all but the in-run entries' (entries [first, min(emitted, entries_per_run − 1))
// with first = 1 for CSA's previous halves, + 1 when the run starts inside a window).
__device__ __forceinline__ unsigned ticket_ctas(const PoolArgs& a, const RunView& r) {
  const int64_t emitted = ratio_div(a, r.start + r.tokens) - ratio_div(a, r.start);
  const int64_t first = (a.overlapping ? 1 : 0) + (ratio_mod(a, r.start) != 0 ? 1 : 0);
  const int64_t in_run = max(int64_t(0), min(emitted, a.entries_per_run - 1) - first);
  return unsigned((a.entries_per_run - in_run) * a.cluster_ctas);
}

// The cache row's page lookup (group 0 of an emitting entry with cache output), and the entry row's numbers.
__device__ __forceinline__ void prepare_entry_outputs(const PoolArgs& a, EntryItem& e, int group) {
  if (e.emitting && a.cache.pool != nullptr && group == 0)
    e.stored = a.cache.entry_address(
        a.cache.physical_entry(a.cache.pages_of(e.run.slot, a.cache_layer, KvArray::Compressed), e.w));
  if (e.place.real && e.place.rank == 0 && threadIdx.x == 0) {
    if (a.entry_rows != nullptr) a.entry_rows[e.place.entry_row] = e.emitting ? int32_t(e.w) : -1;
    if (a.entry_slots != nullptr) a.entry_slots[e.place.entry_row] = e.run.slot;
  }
}

// A thread of an entry's finish: the RoPE pair at `channel` (pair `pair` of the CTA's slice) of group 0 owns it.
struct FinishThread {
  int pair, group, channel;
  bool active;  // the pair lies in the slice
  float2 norm_weight;
};

// The CTA's shared memory of a pool: per slot group and channel the partial (max, denominator, numerator), then the
// CTA's channels of one entry.
struct PoolSmem {
  float* part_max;
  float* part_den;
  float* part_num;
  float* entry_vector;
};

__device__ __forceinline__ PoolSmem pool_smem(const PoolArgs& a, float* smem) {
  const int n = a.groups * a.channels_per_cta;
  return {smem, smem + n, smem + 2 * n, smem + 3 * n};
}

// An entry's finish after the pooling's partials are in shared memory (every thread of the CTA calls it: barriers):
// group 0 merges its pair's partials, RMSNorm over the entry (square_sum: this CTA's sum, which the other CTAs of a
// split read through distributed shared memory after the cluster barrier when cluster_sync; arrive_after_read: this
// CTA's arrival on the next cluster barrier follows its reads), RoPE, the stored rounding and the output stores.
// kTrace: a traced launch (trace_point).
template <bool kTrace>
__device__ __forceinline__ void finish_entry(const PoolArgs& a, const EntryItem& e, const FinishThread& t,
                                             const RopeFactors& rope, const PoolSmem& s, float* warp_partials,
                                             float* square_sum, bool cluster_sync, bool arrive_after_read,
                                             uint64_t* trace) {
  const int c = a.c, channels = a.channels_per_cta;
  const bool owner = e.emitting && t.group == 0 && t.active;
  float v[2] = {0.0f, 0.0f};
  if (owner) {
    // The pair's channels 2·pair, 2·pair + 1 of each group's row are adjacent (channels is even).
    const auto pairs_of = [&](const float* part) { return reinterpret_cast<const float2*>(part) + t.pair; };
    const float2 merged = merge_pair_partials(a.groups, pairs_of(s.part_max), pairs_of(s.part_den),
                                              pairs_of(s.part_num), channels / 2);
    v[0] = merged.x, v[1] = merged.y;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (a.round_pooled_to_bf16) v[j] = round_to_bf16(v[j]);
  }
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_MERGED, __float_as_uint(v[0] + v[1]));
  // RMSNorm over all c channels: group 0's warps (0 .. pairs_padded / 32 − 1), then the entry's CTAs.
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const float warp_square_sum = warp_sum(pair_square(v[0], v[1]));
  if (t.group == 0 && lane == 0) warp_partials[warp] = warp_square_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float cta_sum = 0.0f;
    for (int i = 0; i < a.pairs_padded / 32; ++i) cta_sum += warp_partials[i];
    *square_sum = cta_sum;
  }
  float total = 0.0f;
  if (cluster_sync) {
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();
    if (e.emitting && t.group == 0) {  // the sum's users (owner threads)
      // Every CTA's sum loaded before any is added (their round trips overlap), then added in rank order (the same
      // bits as a loop of dependent remote loads).
      const int first_rank = int(cluster.block_rank()) - e.place.rank;
      float sums[kMaxClusterCtas];
#pragma unroll
      for (int i = 0; i < kMaxClusterCtas; ++i)
        if (i < a.cluster_ctas) sums[i] = *cluster.map_shared_rank(square_sum, first_rank + i);
#pragma unroll
      for (int i = 0; i < kMaxClusterCtas; ++i)
        if (i < a.cluster_ctas) total += sums[i];
    }
    if (arrive_after_read) __cluster_barrier_arrive();
  } else {
    __syncthreads();
    total = *square_sum;
  }
  if (!e.emitting) return;
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_NORMED, __float_as_uint(total));

  const int rope_begin = c - a.rope_dim;
  const float inv_rms = inverse_rms(total, static_cast<float>(c), a.norm_eps);
  if (owner) {
    v[0] = v[0] * inv_rms * t.norm_weight.x;
    v[1] = v[1] * inv_rms * t.norm_weight.y;
    if (t.channel >= rope_begin) rope_rotate_pair(v[0], v[1], rope, false);
  }
  if (a.stored_rounding == CompressorStoredRounding::KvFp8) {
    // One fp8 block of 64 non-rope channels = one warp of group 0; rope channels stay bf16.
    const bool nope = owner && t.channel < c - a.rope_dim;
    const float scale = kv_fp8_scale(warp_max(nope ? fmaxf(fabsf(v[0]), fabsf(v[1])) : 0.0f));
    kv_fp8_round_pair(v[0], v[1], scale, nope);
  } else if (a.stored_rounding == CompressorStoredRounding::IndexerFp4 || a.slot_entries_fp8 != nullptr) {
    // The whole vector is in this CTA (no cluster split with this rounding or output): warp 0 finishes it.
    if (owner) {
      s.entry_vector[2 * t.pair] = v[0];
      s.entry_vector[2 * t.pair + 1] = v[1];
    }
    __syncthreads();
    if (warp == 0) {
      switch (c) {
        case 32: finish_whole_vector<1>(a, s.entry_vector, lane, e.run.slot, e.w); break;
        case 64: finish_whole_vector<2>(a, s.entry_vector, lane, e.run.slot, e.w); break;
        default: finish_whole_vector<4>(a, s.entry_vector, lane, e.run.slot, e.w); break;
      }
    }
    __syncthreads();
    if (owner) {
      v[0] = s.entry_vector[2 * t.pair];
      v[1] = s.entry_vector[2 * t.pair + 1];
    }
  }
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_ROUNDED, __float_as_uint(v[0] + v[1]));
  if (a.cache.pool != nullptr) {
    // Group 0's warps, each one 64-channel block of the entry (warp-uniform: every lane takes part).
    if (t.group == 0) {
      kv_store_dims<2>(a.cache.layout, e.stored, t.channel, owner, v);
      if (e.place.rank == 0) kv_store_pad(a.cache.layout, e.stored, t.pair);
    }
  } else if (owner && a.slot_entries_fp8 == nullptr) {
    if (a.entries != nullptr) {
      *reinterpret_cast<float2*>(a.entries + int64_t(e.place.entry_row) * c + t.channel) = make_float2(v[0], v[1]);
    } else if (e.w < a.slot_entry_capacity) {
      __nv_bfloat16* out = a.slot_entries_bf16 + e.run.slot * a.slot_entry_stride + e.w * c + t.channel;
      out[0] = __float2bfloat16_rn(v[0]);
      out[1] = __float2bfloat16_rn(v[1]);
    }
  }
}

// The finish-phase thread of the CTA's slice `rank`, with the epilogue's weights (they depend on no earlier kernel, so
// they load while the previous kernel drains).
__device__ __forceinline__ FinishThread finish_thread(const PoolArgs& a, int rank, int& rope_pair, float& frequency) {
  const int pair = int(a.pairs_padded_div.mod(threadIdx.x)), group = int(a.pairs_padded_div.div(threadIdx.x));
  const bool active = 2 * pair < a.channels_per_cta;
  const int channel = rank * a.channels_per_cta + 2 * pair;  // this thread's first channel
  const int rope_begin = a.c - a.rope_dim;
  const bool weights = active && group == 0;
  rope_pair = (channel - rope_begin) / 2;
  frequency = weights && channel >= rope_begin && a.rope_table == nullptr ? a.rope_frequencies[rope_pair] : 0.0f;
  return {pair, group, channel, active,
          weights ? make_float2(a.norm_weight[channel], a.norm_weight[channel + 1]) : make_float2(0.0f, 0.0f)};
}

// The run's state update by its CTA that took the last ticket (every CTA's reads of the state came before its
// ticket; the last one may now overwrite it), then the ticket counter's reset. last: thread 0's verdict.
__device__ __forceinline__ void update_state_if_last(const PoolArgs& a, const RunView& r, bool last,
                                                     bool* is_last_cta) {
  if (threadIdx.x == 0) *is_last_cta = last;
  __syncthreads();
  if (*is_last_cta) {
    __threadfence();
    update_state<false>(a, r, plan_state_update(a, r, 0, true), EarlyUpdate{});
    if (threadIdx.x == 0) *r.state.finished_ctas = 0;
  }
}

// CTA `local` of pool `a`: one entry slice.
// kSliceUpdates: every run of the launch has at most `ratio` tokens (entries_per_run = 1), and each CTA updates its
// channel slice of its run's state; otherwise the run's last ticket-taking CTA updates all of it.
// kStaged: the pooling's slot loads go through the shared-memory ring (pool_from_staging), after the entry vector.
// kTrace: a traced launch (trace_point).
template <bool kSliceUpdates, bool kStaged, bool kTrace>
__device__ __forceinline__ void compress(const PoolArgs& a, int64_t local, int hardware_cluster, float* smem,
                                         uint64_t* trace) {
  const int channels = a.channels_per_cta;
  const PoolSmem s = pool_smem(a, smem);
  __shared__ float warp_partials[32];
  __shared__ float cta_square_sum;
  __shared__ bool is_last_cta;

  const ItemPlace place = item_place(a, local);
  int rope_pair;
  float frequency;
  FinishThread t = finish_thread(a, place.rank, rope_pair, frequency);
  t.active = t.active && t.group < a.groups;
  // The runs, the projections and the state are earlier operations' outputs; runs that were ready when the chain
  // began (runs_ready_at_launch) load before the wait, so their round trip overlaps the previous kernel.
  CompressorRun run{};
  if (a.runs_before_wait) run = a.runs[place.run_index];
  float2* const ring = reinterpret_cast<float2*>(s.entry_vector + channels);
  wait_for_prior_grids();
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_PRIOR_DONE);
  if (!a.runs_before_wait) run = a.runs[place.run_index];
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_RUN_LOADED, uint32_t(run.tokens));
  EntryItem e = entry_item(a, place, run);
  const RunView& r = e.r;
  const bool in_run = !kSliceUpdates && in_run_entry(a, e);  // CTA-uniform
  // A run of at most `ratio` tokens: this CTA's channel slice is all of the state it reads, so it updates that slice
  // itself (after the barrier that ends its pooling reads), its loads issued now.
  const StateUpdate slice = plan_state_update(a, r, place.rank * channels, false);
  EarlyUpdate early;
  if (kSliceUpdates && place.real) early = load_early_update(a, r, slice);
  if constexpr (kTrace && kSliceUpdates) {
    if (place.real && (slice.previous_items > 0 || slice.window_items > 0))
      trace_point<kTrace>(trace, COMPRESSOR_TRACE_UPDATE_LOADED,
                          __float_as_uint(slice.previous_items > 0 ? early.previous[0].value.x
                                                                   : early.window[0].value.x));
  }
  // The cache row's page, looked up while the slots load.
  prepare_entry_outputs(a, e, t.group);
  // The cluster barriers: every CTA of the hardware cluster arrives (padding and non-emitting ones too); the second
  // arrival says this CTA has read the others' sums, and each waits for it before leaving (freeing its shared
  // memory). A hardware cluster that is one entry's split decides alike in all its CTAs, so it skips them when the
  // entry is not emitted (most decode steps of an HCA layer).
  const bool cluster_barriers = hardware_cluster > 1 && (e.emitting || a.cluster_ctas != hardware_cluster);
  // A decode step's CTA that completes no entry (CTA-uniform; most steps) reads no state: its threads store the
  // token's row they loaded (no previous halves: those come with a completed window) and leave (GPU round s20-2, H200,
  // hot graph: the CSA pair storing its token 2.31 -> 1.77 µs, HCA 2.17 -> 1.71).
  if (kSliceUpdates && !e.emitting && !cluster_barriers) {
    if (place.real) update_state<true>(a, r, slice, early);
    trace_point<kTrace>(trace, COMPRESSOR_TRACE_END);
    return;
  }

  RopeFactors rope{1.0f, 0.0f};
  if (e.emitting && t.active) {
    // The RoPE factors are made (or loaded) while the first loads are in flight.
    const PoolingTask task{.w = e.w,
                           .group = t.group,
                           .channel = t.channel,
                           .slots = a.overlapping ? 2 * int(a.ratio) : int(a.ratio),
                           .rope_here = t.group == 0 && t.channel >= a.c - a.rope_dim,
                           .rope_pair = rope_pair,
                           .frequency = frequency};
    OnlineSoftmax channel0, channel1;
    if constexpr (kStaged)
      pool_from_staging(a, r, task, ring, rope, channel0, channel1);
    else
      pool_from_registers(a, r, task, rope, channel0, channel1);
    const int local_channel = t.group * channels + 2 * t.pair;
    s.part_max[local_channel] = channel0.max;
    s.part_max[local_channel + 1] = channel1.max;
    s.part_den[local_channel] = channel0.denominator;
    s.part_den[local_channel + 1] = channel1.denominator;
    s.part_num[local_channel] = channel0.numerator;
    s.part_num[local_channel + 1] = channel1.numerator;
  }
  __syncthreads();  // every pooling read of the state is done
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_POOLED);
  // Ticket mode: this CTA's reads of the state are done, so it takes its ticket now (no output stores pending for the
  // fence to wait for); the answer is needed only at the end. In-run entries read no state and take none.
  const bool takes_ticket = !kSliceUpdates && place.real && !in_run;
  unsigned ticket = 0;
  if (takes_ticket && threadIdx.x == 0) {
    __threadfence();
    ticket = atomicAdd(r.state.finished_ctas, 1u);
  }
  finish_entry<kTrace>(a, e, t, rope, s, warp_partials, &cta_square_sum, cluster_barriers, true, trace);
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_FINISHED);

  if (place.real) {
    if (kSliceUpdates)
      update_state<true>(a, r, slice, early);
    else
      update_state_if_last(a, r, takes_ticket && ticket == ticket_ctas(a, r) - 1, &is_last_cta);
  }
  if (cluster_barriers) __cluster_barrier_wait();
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_END);
}

// ---- Lean slot loads (CompressorSlotLoads::Lean) ----
// A team of c / 4 threads pools one entry, thread i channels 4i .. 4i + 3 (two RoPE pairs; a 64-channel fp8 block is
// 16 lanes); a 128-thread CTA holds 512 / c teams. Every slot of the window (at most kLeanSlots) is loaded at once
// by 16-byte loads, from 32-bit offsets off the window's first row when the window lies in the run, and pooled by
// window_softmax (one pass; the staged path's expf batches with online rescales and group merges cost ≈ 400 more
// instructions per thread: GPU round s19-2, H200, the CSA pair 33.4 vs 28.6 µs). The RMSNorm sums the same 64-channel
// blocks in the same order as the staged path (a 16-lane butterfly over pairs is its 32-lane one). The state: tickets
// per entry as there; the run's last ticket-taking entry's CTA updates the whole state.
inline constexpr int kLeanThreads = 128;
inline constexpr int kLeanSlots = 2 * kSlotBatch;
inline constexpr int kLeanMaxTeams = kLeanThreads / 32;

// A thread's four consecutive channels, loaded as one 16-byte access.
struct Quad {
  float v[4];
};

__device__ __forceinline__ Quad load_quad(const float* p) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  return {{x.x, x.y, x.z, x.w}};
}

// Slot of the thread's visit v, in the staged path's slot-group order (groups 1: slots in order; groups 2: visits
// v / kSlotBatch = g take slots g, g + 2, …).
__device__ __forceinline__ int lean_slot(int v, int groups) {
  return groups == 1 ? v : v / kSlotBatch + 2 * (v % kSlotBatch);
}

// The ape offset of slot s (its window position s mod ratio, second halves c columns on) for the thread's channel.
__device__ __forceinline__ int lean_ape_offset(const PoolArgs& a, int s, int channel) {
  const bool second = a.overlapping && s >= a.ratio;
  return (second ? s - int(a.ratio) : s) * int(width_of(a)) + (second ? a.c : 0) + channel;
}

// A window's softmax-weighted mean in one pass (its slots all in registers): the max, then each weight 2^(s·log2 e
// − max·log2 e) by one FFMA and the MUFU's ex2.approx (2 ulp) instead of expf (≈ 9 instructions) and the online
// rescales. A score of −∞ weighs 0.
template <int kSlots>
__device__ __forceinline__ float window_softmax(const float (&value)[kSlots], const float (&score)[kSlots]) {
  constexpr float kLog2e = 1.4426950408889634f;
  float m = score[0];
#pragma unroll
  for (int k = 1; k < kSlots; ++k) m = fmaxf(m, score[k]);
  const float offset = m * kLog2e;
  float den = 0.0f, num = 0.0f;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    float weight;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(weight) : "f"(fmaf(score[k], kLog2e, -offset)));
    den += weight;
    num = fmaf(weight, value[k], num);
  }
  return num / den;
}

// A CSA window of ratio 4 wholly in the run, for the thread's channels: its 8 consecutive rows from `kv` / `gate` (the
// window's first row at the thread's channel; second halves c columns on) and their ape from `ape` (row 0 at the
// channel), in the visit order lean_slot(·, kGroups): offsets known at compile time but for the row stride and c.
template <int kGroups>
__device__ __forceinline__ void load_csa_window(const float* kv, const float* gate, const float* ape, int row_stride,
                                                int c, Quad (&value)[kLeanSlots], Quad (&score)[kLeanSlots],
                                                Quad (&bias)[kLeanSlots]) {
  constexpr int kRatio = kLeanSlots / 2;
#pragma unroll
  for (int v = 0; v < kLeanSlots; ++v) {
    const int s = lean_slot(v, kGroups);
    const int offset = s * row_stride + (s >= kRatio ? c : 0);
    value[v] = load_quad(kv + offset), score[v] = load_quad(gate + offset);
  }
#pragma unroll
  for (int v = 0; v < kLeanSlots; ++v) {
    const int s = lean_slot(v, kGroups);
    bias[v] = load_quad(ape + (s >= kRatio ? (s - kRatio) * 2 * c + c : s * 2 * c));
  }
}

// CTA `local` of a lean pool: its teams' entries. kTrace: a traced launch (trace_point; thread 0 is team 0's: its
// entry's points, "pooled" when its window's softmaxes are done).
template <bool kTrace>
__device__ __forceinline__ void compress_lean(const PoolArgs& a, int64_t local, uint64_t* trace) {
  __shared__ float block_sums[kLeanThreads / 16];  // per 16 lanes: one 64-channel block's sum of squares
  __shared__ CompressorRun team_runs[kLeanMaxTeams];
  __shared__ bool team_updates[kLeanMaxTeams];
  const int team_threads = a.c / 4, blocks = a.c / 64;
  const int team = int(a.team_div.div(threadIdx.x)), thread = int(threadIdx.x) - team * team_threads;
  const int channel = 4 * thread, lane = int(threadIdx.x) & 31;
  const int slots = a.overlapping ? 2 * int(a.ratio) : int(a.ratio);
  const int64_t position = local * a.lean_teams + team;
  const bool real = position < a.rows;
  const int64_t row = real ? entry_row_at(a, int(position)) : position;
  const int run_index = real ? int(a.entries_div.div(uint32_t(row))) : 0;

  // What depends on no earlier kernel loads while it drains: the norm weights and RoPE frequencies.
  const int rope_begin = a.c - a.rope_dim;
  const bool rope_here = channel >= rope_begin;
  const int rope_pair = (channel - rope_begin) / 2;
  const Quad weight = load_quad(a.norm_weight + channel);
  float frequency[2] = {0.0f, 0.0f};
  if (rope_here && a.rope_table == nullptr)
#pragma unroll
    for (int j = 0; j < 2; ++j) frequency[j] = a.rope_frequencies[rope_pair + j];

  CompressorRun run{};
  if (a.runs_before_wait && real) run = a.runs[run_index];
  wait_for_prior_grids();
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_PRIOR_DONE);
  if (!a.runs_before_wait && real) run = a.runs[run_index];
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_RUN_LOADED, uint32_t(run.tokens));
  const EntryItem e = entry_item(a, ItemPlace{int(row), 0, run_index, real}, run);
  const RunView& r = e.r;
  const bool in_run = in_run_entry(a, e);  // team-uniform
  if (real && thread == 0) {
    if (a.entry_rows != nullptr) a.entry_rows[row] = e.emitting ? int32_t(e.w) : -1;
    if (a.entry_slots != nullptr) a.entry_slots[row] = run.slot;
  }

  float pooled[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  RopeFactors rope[2] = {{1.0f, 0.0f}, {1.0f, 0.0f}};
  uint8_t* stored = nullptr;
  // The cache row's page and the RoPE factors, looked up while the slots load.
  const auto look_up_entry = [&] {
    if (a.cache.pool != nullptr)
      stored = a.cache.entry_address(
          a.cache.physical_entry(a.cache.pages_of(run.slot, a.cache_layer, KvArray::Compressed), e.w));
    if (rope_here)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        rope[j] = window_rope(a, PoolingTask{.w = e.w, .rope_pair = rope_pair + j, .frequency = frequency[j]});
  };
  if (e.emitting && in_run && a.lean_csa_windows) {
    const int row_stride = int(a.row_stride);
    const int64_t base = (window_first_position(a, e.w) - r.start) * row_stride + channel;
    Quad value[kLeanSlots], score[kLeanSlots], ape[kLeanSlots];
    if (a.groups == 1)
      load_csa_window<1>(r.kv + base, r.gate + base, a.ape + channel, row_stride, a.c, value, score, ape);
    else
      load_csa_window<2>(r.kv + base, r.gate + base, a.ape + channel, row_stride, a.c, value, score, ape);
    look_up_entry();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float values[kLeanSlots], scores[kLeanSlots];
#pragma unroll
      for (int v = 0; v < kLeanSlots; ++v) values[v] = value[v].v[i], scores[v] = score[v].v[i] + ape[v].v[i];
      pooled[i] = window_softmax(values, scores);
      if (a.round_pooled_to_bf16) pooled[i] = round_to_bf16(pooled[i]);
    }
  } else if (e.emitting) {
    Quad value[kLeanSlots] = {}, score[kLeanSlots] = {};
    bool valid[kLeanSlots];
    if (in_run) {
      // Slot s of a window in the run: row first_q − start + s (CSA's second halves c columns on).
      const int row_stride = int(a.row_stride);
      const int base = int(window_first_position(a, e.w) - r.start) * row_stride + channel;
#pragma unroll
      for (int v = 0; v < kLeanSlots; ++v) {
        const int s = lean_slot(v, a.groups);
        valid[v] = s < slots;
        if (valid[v]) {
          const int offset = base + s * row_stride + (a.overlapping && s >= a.ratio ? a.c : 0);
          value[v] = load_quad(r.kv + offset), score[v] = load_quad(r.gate + offset);
        }
      }
    } else {
#pragma unroll
      for (int v = 0; v < kLeanSlots; ++v) {
        const PooledSlot p = pooled_slot(a, e.w, lean_slot(v, a.groups), slots, channel);
        const SlotSource source = slot_source<true>(a, r, p.q, p.column);
        value[v] = load_quad(source.value), score[v] = load_quad(source.score);
        valid[v] = p.valid;
      }
    }
    // ape behind the slots' loads (L1 hits after the first CTAs).
    Quad ape[kLeanSlots] = {};
#pragma unroll
    for (int v = 0; v < kLeanSlots; ++v) {
      const int s = lean_slot(v, a.groups);
      if (s < slots) ape[v] = load_quad(a.ape + lean_ape_offset(a, s, channel));
    }
    look_up_entry();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float values[kLeanSlots], scores[kLeanSlots];
#pragma unroll
      for (int v = 0; v < kLeanSlots; ++v) {
        values[v] = valid[v] ? value[v].v[i] : 0.0f;
        scores[v] = valid[v] ? score[v].v[i] + ape[v].v[i] : kNegativeInfinity;
      }
      pooled[i] = window_softmax(values, scores);
      if (a.round_pooled_to_bf16) pooled[i] = round_to_bf16(pooled[i]);
    }
  }

  trace_point<kTrace>(trace, COMPRESSOR_TRACE_POOLED, __float_as_uint(pooled[0]));
  // RMSNorm: each 16 lanes' block sum as the staged path's warp sum (a butterfly over the pairs), then the entry's
  // blocks in order.
  float square[2] = {pair_square(pooled[0], pooled[1]), pair_square(pooled[2], pooled[3])};
#pragma unroll
  for (int m = 8; m > 0; m /= 2)
#pragma unroll
    for (int j = 0; j < 2; ++j) square[j] += __shfl_xor_sync(0xFFFFFFFFu, square[j], m);
  if ((lane & 15) == 0) block_sums[threadIdx.x / 16] = square[0] + square[1];
  __syncthreads();  // also: every pooling read of the state is done (the ticket below)
  float total = 0.0f;
  for (int i = 0; i < blocks; ++i) total += block_sums[team * blocks + i];
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_NORMED, __float_as_uint(total));

  // The ticket of an entry that read the state (or may update it), taken now; the answer is used at the end.
  const bool takes_ticket = real && !in_run;
  if (thread == 0) {
    bool last = false;
    if (takes_ticket) {
      __threadfence();
      last = atomicAdd(r.state.finished_ctas, 1u) == ticket_ctas(a, r) - 1;
    }
    team_updates[team] = last;
    team_runs[team] = run;
  }

  if (e.emitting) {
    const float inv_rms = inverse_rms(total, static_cast<float>(a.c), a.norm_eps);
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = pooled[i] * inv_rms * weight.v[i];
    if (rope_here)
#pragma unroll
      for (int j = 0; j < 2; ++j) rope_rotate_pair(v[2 * j], v[2 * j + 1], rope[j], false);
    if (a.stored_rounding == CompressorStoredRounding::KvFp8) {
      const bool nope = !rope_here;
      float amax = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) amax = fmaxf(amax, nope ? fabsf(v[i]) : 0.0f);
#pragma unroll
      for (int m = 8; m > 0; m /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
      const float scale = kv_fp8_scale(amax);
#pragma unroll
      for (int j = 0; j < 2; ++j) kv_fp8_round_pair(v[2 * j], v[2 * j + 1], scale, nope);
    }
    // The indexer rounding and fp8 keys (c = 128): the team is one warp holding 4 channels per lane.
    if (a.stored_rounding == CompressorStoredRounding::IndexerFp4 || a.slot_entries_fp8 != nullptr)
      finish_warp_vector<4>(a, v, lane, run.slot, e.w);
    trace_point<kTrace>(trace, COMPRESSOR_TRACE_ROUNDED, __float_as_uint(v[0] + v[1]));
    if (a.cache.pool != nullptr) {
      kv_store_dims<4>(a.cache.layout, stored, channel, true, v);
      kv_store_pad(a.cache.layout, stored, thread);
    } else if (a.slot_entries_fp8 == nullptr) {
      if (a.entries != nullptr) {
        *reinterpret_cast<float4*>(a.entries + row * a.c + channel) = make_float4(v[0], v[1], v[2], v[3]);
      } else if (e.w < a.slot_entry_capacity) {
        const __nv_bfloat162 low = __floats2bfloat162_rn(v[0], v[1]), high = __floats2bfloat162_rn(v[2], v[3]);
        uint2 packed;
        packed.x = *reinterpret_cast<const uint32_t*>(&low), packed.y = *reinterpret_cast<const uint32_t*>(&high);
        *reinterpret_cast<uint2*>(a.slot_entries_bf16 + run.slot * a.slot_entry_stride + e.w * a.c + channel) =
            packed;
      }
    }
  }

  trace_point<kTrace>(trace, COMPRESSOR_TRACE_FINISHED);
  // The runs whose last ticket an entry of this CTA took: their whole state, by every thread of the CTA.
  __syncthreads();
  for (int i = 0; i < a.lean_teams; ++i) {
    if (!team_updates[i]) continue;  // CTA-uniform
    __threadfence();
    const RunView u = run_view(a, team_runs[i]);
    update_state<false>(a, u, plan_state_update(a, u, 0, true), EarlyUpdate{});
    if (threadIdx.x == 0) *u.state.finished_ctas = 0;
    __syncthreads();
  }
  trace_point<kTrace>(trace, COMPRESSOR_TRACE_END);
}

// A preparation CTA: its warps' vectors (indexer::prepare_row, as indexer_prepare_kernel).
template <bool kTrace>
__device__ __forceinline__ void prepare_vectors(const LaunchArgs& launch) {
  const int warp = int(threadIdx.x >> 5);
  if (warp >= launch.prepare_rows_per_cta) return;  // warp-uniform
  wait_for_prior_grids();  // the queries and positions are earlier operations' outputs
  trace_point<kTrace>(launch.trace, COMPRESSOR_TRACE_PRIOR_DONE);
  const int64_t row = (int64_t(blockIdx.x) - launch.prepare_first_cta) * launch.prepare_rows_per_cta + warp;
  if (row >= launch.prepare.rows) return;  // warp-uniform
  const int lane = int(threadIdx.x & 31);
  switch (launch.prepare_head_dim) {
    case 32: indexer::prepare_row<32>(launch.prepare, row, lane); break;
    case 64: indexer::prepare_row<64>(launch.prepare, row, lane); break;
    default: indexer::prepare_row<128>(launch.prepare, row, lane); break;
  }
  trace_point<kTrace>(launch.trace, COMPRESSOR_TRACE_END);
}

// The staged kernels run CTAs of at most kStagedThreads threads with registers for three per SM in prefill (the ring,
// not registers, holds the loads in flight; the decode steps' early state loads need more); the lean kernel three
// 128-thread CTAs per SM (a window's slots and the softmaxes of four channels take ≈ 160 registers; two channels per
// thread in 256-thread CTAs at 116 registers were slower for a CSA layer's pair: 31.3 vs 28.6 µs, H200).
// kTrace: a traced launch (CompressorParams::trace).
template <bool kSliceUpdates, CompressorSlotLoads kLoads, bool kTrace = false>
__global__ void __launch_bounds__(kLoads == CompressorSlotLoads::Lean     ? kLeanThreads
                                  : kLoads == CompressorSlotLoads::Staged ? kStagedThreads
                                                                          : kMaxThreads,
                                  kLoads == CompressorSlotLoads::Lean     ? 3
                                  : kLoads == CompressorSlotLoads::Staged ? (kSliceUpdates ? 2 : 3)
                                                                          : 1)
    compressor_kernel(const __grid_constant__ LaunchArgs launch) {
  extern __shared__ __align__(16) float smem[];
  trace_point<kTrace>(launch.trace, COMPRESSOR_TRACE_START);
  allow_dependents();  // the dependent's own wait still orders it after this grid's completion
  if (launch.prepare_head_dim != 0 && int64_t(blockIdx.x) >= launch.prepare_first_cta) {
    prepare_vectors<kTrace>(launch);
    return;
  }
  const int pool = launch.pool_count > 1 && int64_t(blockIdx.x) >= launch.pools[1].first_cta ? 1 : 0;
  const PoolArgs& a = launch.pools[pool];
  if constexpr (kLoads == CompressorSlotLoads::Lean)
    compress_lean<kTrace>(a, int64_t(blockIdx.x) - a.first_cta, launch.trace);
  else
    compress<kSliceUpdates, kLoads == CompressorSlotLoads::Staged, kTrace>(
        a, int64_t(blockIdx.x) - a.first_cta, launch.hardware_cluster, smem, launch.trace);
}

}  // namespace dsv4::cuda::compressor
