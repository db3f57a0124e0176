// Device code behind run_moe_gate_up / run_moe_down (moe_experts.hpp holds the contract), built on the warp tile
// of weight_tile_mma.cuh (16 weight rows × 8·NT tokens on mma.sync, weight dequantised exactly in registers).
//
// NOTES:
// - A CTA of 8 warps serves one work item on a band of weight rows: gate/up: 4 bands of 16 rows, warps 0–3 on w1
//   and warps 4–7 on w3 of the same rows (their loads are in flight together; the SwiGLU pairs them through shared
//   memory); down: 8 bands of 16 rows of w2. Each warp covers the whole K, so no partial sums cross warps.
// - x (the item's rows of u, or of h) is staged per K chunk for 8·NT tokens by stage_x_tile, as one x tile per
//   sub-range of 512 stored bytes per weight row (1024 k of fp4, 512 of FP8, 256 of BF16); a chunk holds as many
//   sub-ranges as 160 KB of shared memory allows (the whole K of V4-Flash and V4-Pro for one token tile), so small
//   items stage once.
// - One CTA per SM: weight_tile_mma's fp4 path with two batches in flight needs more than 128 registers per thread
//   (capping it there spills), so each SM runs 8 warps with up to 255 registers; the L2 prefetches below, not the
//   warp count, keep HBM busy.
// - Each warp streams its 16 rows sub-range by sub-range (one weight_tile_mma call each, which keeps its next load
//   batch in flight) and asks L2 for the rows of the sub-range two ahead (one bulk prefetch per row), so the MMA
//   loop's loads hit L2: a warp's own pipeline is too shallow to cover HBM latency, and at decode sizes there are
//   not enough warps to make up for it. Outstanding prefetches stay at 2 × 8 KB per warp (< 30 MB for a whole
//   V4-Flash decode wave), within L2.
// - The kernels are chained with programmatic dependent launch (ptx/dependent_launch.cuh): the CTAs of the first
//   work item (the shared expert's, whose weights do not depend on the routing) start fetching their weight bands
//   into L2 while the routing is still running.
// - Items of up to 8 rows (decode: 1–2 tokens per routed expert) run with one token tile; larger ones (the shared
//   expert, prefill) with four (32 rows per pass), so one weight decode serves 32 tokens. The switch is uniform
//   per CTA, as is the one over the expert's weight format (the shared expert is FP8 in the release while routed
//   experts are MXFP4/NVFP4: both ride in the same launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstdio>

#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/moe_prefetch.cuh"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe_weights.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/memory_order.cuh"
#include "backends/cuda/ptx/warp_trace.cuh"

namespace dsv4::cuda::moe {

enum class ExpertGemm { GATE_UP, DOWN };

inline constexpr int kExpertWarps = 8;
inline constexpr int kExpertThreads = kExpertWarps * tile::kWarpSize;
inline constexpr int kSmallTokenTiles = 1;  // items of <= 8 rows
inline constexpr int kLargeTokenTiles = 4;  // larger items, 32 rows per pass
inline constexpr size_t kXTileBudget = 160 * 1024;  // x tiles of one chunk (one CTA per SM, see NOTES)
inline constexpr int kSubRangeBytes = 512;         // stored bytes of one weight row per sub-range
inline constexpr int kPrefetchDistance = 2;        // sub-ranges requested from L2 ahead of the MMAs
// The fp4 experts' words on the device: repacked at upload (write_fp4_device_layout) so that each bf16 pair of the
// decode is one rotation and one mask (weight_tile_mma.cuh Fp4Layout::DEVICE; 8 instructions per word of 8 values
// against 13 for the checkpoint order, the same pairs). SASS (sm_90a), one 16 × 512 stage of the T <= 8 gate/up loop,
// checkpoint order → DEVICE: column stages NVFP4 679 → 519, MXFP4 660 → 500; lean stages 768 → 609, 727 → 567;
// weight_tile_mma's stages 870 → 645, 826 → 602.
inline constexpr tile::Fp4Layout kExpertFp4Layout = tile::Fp4Layout::DEVICE;

// Weight rows one CTA covers.
template <ExpertGemm G>
inline constexpr int kCtaRows = (G == ExpertGemm::GATE_UP ? kExpertWarps / 2 : kExpertWarps) * tile::kTileRows;
static_assert(kCtaRows<ExpertGemm::DOWN> == kMoeDownBandRows, "the fused combine's bands are the down CTAs' bands");

// Stored bytes per two values of a format, and the k extent of a sub-range.
template <tile::TileFormat F>
inline constexpr int kBytesPer2 = F == tile::TileFormat::BF16 ? 4 : F == tile::TileFormat::FP8_BLOCK128 ? 2 : 1;
template <tile::TileFormat F>
inline constexpr int kSubK = kSubRangeBytes * 2 / kBytesPer2<F>;
// Sub-ranges whose x tiles of 8·NT rows fit the budget together.
template <tile::TileFormat F, int NT>
inline constexpr int kSubsPerChunk = int(kXTileBudget / tile::x_tile_bytes(NT, kSubK<F>));
static_assert(kSubsPerChunk<tile::TileFormat::MXFP4, kLargeTokenTiles> >= 1, "one sub-range must fit the budget");

// Shared memory of one CTA: the x tiles, then (gate/up) the w3 results handed to the w1 warps,
// [warp][16 rows][8·kLargeTokenTiles tokens] fp32.
inline constexpr size_t kExchangeBytes =
    size_t(kExpertWarps / 2) * tile::kTileRows * tile::kTokensPerMma * kLargeTokenTiles * sizeof(float);
template <ExpertGemm G>
inline constexpr size_t kExpertGemmSmemBytes = kXTileBudget + (G == ExpertGemm::GATE_UP ? kExchangeBytes : 0);

struct ExpertGemmArgs {
  const MoeExpertView* experts;
  int shared_expert;  // E: index of the shared expert's views
  WeightFormat routed_format, shared_format;  // every routed expert has the same (DeviceMoeWeights checks it)
  int k_total;  // d (gate/up) or I (down)
  int n_total;  // I (gate/up) or d (down): weight rows
  float swiglu_limit;
  const __nv_bfloat16* x;     // u_bf16 [T, d] gathered through row_tokens (gate/up), or h [rows, I] (down)
  const int32_t* row_tokens;  // gate/up only
  const MoeWorkItem* work_items;
  const int32_t* work_item_count;
  __nv_bfloat16* h;  // gate/up output [rows, I]
  float* down;       // down output [rows, d]
  const tile::stream::StreamMaps* stream_maps;  // streamed kernel: [E + 1][w1, w3, w2] tensor maps
  MoeFusedCombine combine;                      // down: out != nullptr for the fused combine
  int streamed_x_bytes;                         // streamed kernel: bytes of its x region (16-byte multiple)
  // Per-item counts (null: none): one-tile streamed kernels whose down CTAs wait for their own item's gate/up CTAs
  // (MoeExpertGemmParams::down_waits_per_item; see wait_for_item_rows).
  uint32_t* item_counters;
  uint64_t* trace;  // traced launches (MoeExpertGemmParams::trace), or null
};

static_assert(kMoeTraceWarpsPerCta == kExpertWarps, "the trace's warps per CTA");

// A traced launch's point `slot` (MoeExpertGemmParams::trace): lane 0 of the warp stores the time.
template <bool kTrace>
__device__ __forceinline__ void trace_point(const ExpertGemmArgs& a, int slot) {
  if constexpr (kTrace)
    sm90::record_warp_trace_point(a.trace, kExpertWarps, kMoeTraceSlots, slot, MOE_TRACE_START, MOE_TRACE_SM);
}

// What one lane asks L2 for, sub-range by sub-range: lanes 0..15 the data of row row0 + lane (one bulk request per
// sub-range; k ranges are multiples of the load granularity, so byte counts are multiples of 16), lanes 16..31 the
// line holding that row's fp4 scales (FP8 scales are per 128×128 block: few, and shared by the band's rows).
struct LanePrefetch {
  const uint8_t* base = nullptr;  // null: nothing to ask for
  int row_bytes = 0;              // bytes of the row's data (data lanes)
  int scale_bytes_per_sub = 0;    // scale lanes: bytes of scales per sub-range
};

template <tile::TileFormat F>
__device__ __forceinline__ LanePrefetch lane_prefetch(const DeviceMatrixView& w, int64_t row0, int k_total, int lane) {
  LanePrefetch p;
  const int64_t row = min(row0 + lane % tile::kTileRows, w.rows - 1);
  if (lane < tile::kTileRows) {
    p.base = w.data + row * int64_t(w.data_row_bytes);
    p.row_bytes = k_total / 2 * kBytesPer2<F>;
  } else if constexpr (F == tile::TileFormat::MXFP4 || F == tile::TileFormat::NVFP4) {
    p.base = w.scales + row * w.scales_per_row;
    p.scale_bytes_per_sub = kSubK<F> / (F == tile::TileFormat::MXFP4 ? 32 : 16);
  }
  return p;
}

template <tile::TileFormat F>
__device__ __forceinline__ void prefetch_sub_range(const LanePrefetch& p, int sub) {
  if (p.base == nullptr) return;
  if (p.row_bytes > 0) {
    const int offset = sub * kSubRangeBytes;
    if (offset < p.row_bytes)
      prefetch_l2_bulk(p.base + offset, uint32_t(min(kSubRangeBytes, p.row_bytes - offset)));
  } else {
    prefetch_l2_line(p.base + sub * p.scale_bytes_per_sub);
  }
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// The warp's band within the CTA and its matrix: gate/up: warps w and w + 4 share a band, on w1 and w3 (the SwiGLU
// pairs them); down: one band of w2 per warp.
template <ExpertGemm G>
__device__ __forceinline__ int warp_band() {
  const int warp_idx = threadIdx.x / tile::kWarpSize;
  return G == ExpertGemm::GATE_UP ? warp_idx % (kExpertWarps / 2) : warp_idx;
}
template <ExpertGemm G>
__device__ __forceinline__ const DeviceMatrixView& warp_matrix(const MoeExpertView& expert) {
  if constexpr (G == ExpertGemm::GATE_UP)
    return threadIdx.x / tile::kWarpSize >= kExpertWarps / 2 ? expert.w3 : expert.w1;
  else
    return expert.w2;
}

// Before the routing is known (programmatic launch, ahead of wait_for_prior_grids): the CTAs of the first work item,
// always the shared expert's, ask L2 for their whole weight band, which only depends on the weights.
template <tile::TileFormat F, ExpertGemm G>
__device__ __forceinline__ void prefetch_shared_band(const ExpertGemmArgs& a, const MoeExpertView& expert, int band) {
  const int64_t row0 = int64_t(band) * kCtaRows<G> + warp_band<G>() * tile::kTileRows;
  if (row0 >= a.n_total) return;
  const LanePrefetch prefetch = lane_prefetch<F>(warp_matrix<G>(expert), row0, a.k_total, threadIdx.x % 32);
  const int subs = (a.k_total + kSubK<F> - 1) / kSubK<F>;
  for (int sub = 0; sub < subs; ++sub) prefetch_sub_range<F>(prefetch, sub);
}

// Writes a warp's accumulators: row row0 + g (+ 8 for i >= 2), token 8·nt + 2t (+ 1 for odd i) of acc[nt][i].
// gate/up: the w3 warps hand their results to the w1 warps through `exchange` ([4 bands][16 rows][kExchangeTokens]
// fp32), which apply the clamped SwiGLU and store h in bf16; down: fp32 rows. Called by the whole CTA.
template <tile::TileFormat F, ExpertGemm G, int NT, int kExchangeTokens, bool kStreamRows = false>
__device__ __forceinline__ void write_rows(const ExpertGemmArgs& a, const DeviceMatrixView& w,
                                           const float (&acc)[NT][4], int64_t row0, int row_base, int tokens,
                                           float* exchange_base) {
  // The tile row of accumulator element i (remapped by stream_row for the streamed tiles).
  auto tile_row = [&](int g_, int i) {
    const int r = g_ + (i >= 2 ? 8 : 0);
    return kStreamRows ? tile::stream::stream_row(r) : r;
  };
  constexpr bool kGateUp = G == ExpertGemm::GATE_UP;
  const int warp_idx = threadIdx.x / tile::kWarpSize, lane = threadIdx.x % tile::kWarpSize;
  const bool up_warp = kGateUp && warp_idx >= kExpertWarps / 2;
  const int g = lane / 4, t = lane % 4;
  const float scale = tile::weight_tile_output_scale<F>(w);
  if constexpr (kGateUp) {
    float* exchange = exchange_base + warp_band<G>() * tile::kTileRows * kExchangeTokens;
    auto at = [](int nt, int i, int g_, int t_) {
      return (g_ + (i >= 2 ? 8 : 0)) * kExchangeTokens + nt * tile::kTokensPerMma + 2 * t_ + (i & 1);
    };
    if (up_warp) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) exchange[at(nt, i, g, t)] = acc[nt][i] * scale;
    }
    __syncthreads();
    if (!up_warp) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int token = nt * tile::kTokensPerMma + 2 * t + (i & 1);
          const int64_t n = row0 + tile_row(g, i);
          if (token >= tokens || n >= a.n_total) continue;
          const float gate = fminf(acc[nt][i] * scale, a.swiglu_limit);
          const float up = fminf(fmaxf(exchange[at(nt, i, g, t)], -a.swiglu_limit), a.swiglu_limit);
          a.h[int64_t(row_base + token) * a.n_total + n] = __float2bfloat16_rn(silu(gate) * up);
        }
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = nt * tile::kTokensPerMma + 2 * t + (i & 1);
        const int64_t n = row0 + tile_row(g, i);
        if (token >= tokens || n >= a.n_total) continue;
        a.down[int64_t(row_base + token) * a.n_total + n] = acc[nt][i] * scale;
      }
  }
}

// One pass over up to 8·NT rows of an item starting at row_base.
template <tile::TileFormat F, ExpertGemm G, int NT>
__device__ __forceinline__ void run_pass(const ExpertGemmArgs& a, const MoeExpertView& expert, int row_base,
                                         int tokens, uint8_t* smem) {
  constexpr bool kGateUp = G == ExpertGemm::GATE_UP;
  const int lane = threadIdx.x % tile::kWarpSize;
  const int64_t row0 = int64_t(blockIdx.x) * kCtaRows<G> + warp_band<G>() * tile::kTileRows;
  const DeviceMatrixView w = warp_matrix<G>(expert);  // a copy: no stack
  auto* x_tiles = reinterpret_cast<__nv_bfloat16*>(smem);
  constexpr int kSubs = kSubsPerChunk<F, NT>;
  constexpr size_t kTileElements = tile::x_tile_bytes(NT, kSubK<F>) / sizeof(__nv_bfloat16);
  const int subs = (a.k_total + kSubK<F> - 1) / kSubK<F>;
  // Warps whose band lies past the last row (tails of small models) stage x and meet the barriers, nothing else.
  const bool has_rows = row0 < a.n_total;
  LanePrefetch prefetch;
  if (has_rows) prefetch = lane_prefetch<F>(w, row0, a.k_total, lane);
  for (int sub = 0; sub < kPrefetchDistance; ++sub) prefetch_sub_range<F>(prefetch, sub);

  float acc[NT][4] = {};
  for (int first = 0; first < subs; first += kSubs) {
    const int last = min(subs, first + kSubs);
    __syncthreads();  // the previous chunk (or pass) is done with the x tiles and the exchange
    for (int sub = first; sub < last; ++sub) {
      const int k_begin = sub * kSubK<F>, k_end = min(a.k_total, k_begin + kSubK<F>);
      auto row_of = [&](int t) {
        const int64_t source_row = kGateUp ? __ldg(a.row_tokens + row_base + t) : row_base + t;
        return a.x + source_row * a.k_total + k_begin;
      };
      tile::stage_x_tile<F>(row_of, tokens, NT * tile::kTokensPerMma, k_end - k_begin,
                            x_tiles + (sub - first) * kTileElements, threadIdx.x, kExpertThreads);
    }
    __syncthreads();
    if (has_rows) {
      for (int sub = first; sub < last; ++sub) {
        prefetch_sub_range<F>(prefetch, sub + kPrefetchDistance);
        const int k_begin = sub * kSubK<F>, k_end = min(a.k_total, k_begin + kSubK<F>);
        tile::weight_tile_mma<F, NT, 2, false, tile::detail::kChains<NT>, kExpertFp4Layout>(
            w, row0, k_begin, k_end, x_tiles + (sub - first) * kTileElements, acc);
      }
    }
  }

  write_rows<F, G, NT, kLargeTokenTiles * tile::kTokensPerMma>(
      a, w, acc, row0, row_base, tokens, reinterpret_cast<float*>(smem + kXTileBudget));
}

template <tile::TileFormat F, ExpertGemm G>
__device__ __forceinline__ void run_work_item(const ExpertGemmArgs& a, const MoeExpertView& expert,
                                              const MoeWorkItem& item, uint8_t* smem) {
  if (item.row_count <= kSmallTokenTiles * tile::kTokensPerMma) {
    run_pass<F, G, kSmallTokenTiles>(a, expert, item.row_begin, item.row_count, smem);
    return;
  }
  constexpr int kPassRows = kLargeTokenTiles * tile::kTokensPerMma;
  for (int first = 0; first < item.row_count; first += kPassRows)
    run_pass<F, G, kLargeTokenTiles>(a, expert, item.row_begin + first, min(kPassRows, item.row_count - first), smem);
}

// Calls body.template operator()<F>() with the tile format F of a weight format; the formats refused on the host
// (check_moe_expert_gemm_params) do nothing.
template <class Body>
__device__ __forceinline__ void with_tile_format(WeightFormat format, Body&& body) {
  switch (format) {
    case WeightFormat::MXFP4: body.template operator()<tile::TileFormat::MXFP4>(); break;
    case WeightFormat::NVFP4: body.template operator()<tile::TileFormat::NVFP4>(); break;
    case WeightFormat::FP8_BLOCK128: body.template operator()<tile::TileFormat::FP8_BLOCK128>(); break;
    case WeightFormat::BF16: body.template operator()<tile::TileFormat::BF16>(); break;
    default: break;
  }
}

// Called by both expert kernels once their weight-only head start is issued: waits for the previous kernels (the
// work items, x and (down) h come from them), lets the next kernel be scheduled, and returns the call's work item
// count (the grid covers the worst case: CTAs past it have no item).
__device__ __forceinline__ int work_items_after_prior_grids(const ExpertGemmArgs& a) {
  wait_for_prior_grids();
  allow_dependents();
  return __ldg(a.work_item_count);
}

// A count that has not reached its target after this long means a pairing of CTAs broke (a gate/up CTA that never
// publishes, a down CTA that never arrives at its band's ticket, a wrong expected count): the kernel traps instead of
// hanging the device. The trap is a sticky error: it poisons the CUDA context, so every later call in the process
// fails. A healthy wait can trip it too where the GPU stops running the kernel for that long (a debugger halting it,
// time-slicing with other processes' contexts). The seconds are a macro so that the trap's message prints the same
// number.
#define DSV4_MOE_COUNT_TIMEOUT_S 2
#define DSV4_MOE_STRINGIFY_(x) #x
#define DSV4_MOE_STRINGIFY(x) DSV4_MOE_STRINGIFY_(x)
inline constexpr uint64_t kCountTimeoutNs = uint64_t(DSV4_MOE_COUNT_TIMEOUT_S) * 1'000'000'000;
// Polls before the deadline is first read: a short wait reads no timer; a longer one moves to the out-of-line loop,
// whose timer read per poll is small beside the poll's sleep.
inline constexpr int kCountQuickPolls = 64;

// The rest of wait_for_count once the quick polls failed: out of line, so the waits stay short.
static __device__ __noinline__ void wait_for_count_slowly(const uint32_t* counter, uint32_t target, const char* what,
                                                          int index) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  uint32_t seen;
  while ((seen = load_acquire(counter)) < target) {
    __nanosleep(64);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > kCountTimeoutNs) {
      printf("MoE down: CTA (%d, %d) waited " DSV4_MOE_STRINGIFY(DSV4_MOE_COUNT_TIMEOUT_S) " s for %s %d: %u of %u "
             "arrivals\n", int(blockIdx.x), int(blockIdx.y), what, index, seen, target);
      __trap();
    }
  }
}
// The timeout's macros serve the message above only: they do not leak to the header's includers.
#undef DSV4_MOE_STRINGIFY
#undef DSV4_MOE_STRINGIFY_
#undef DSV4_MOE_COUNT_TIMEOUT_S

// One thread waits with acquire loads until *counter >= target (what, index: the trap's message).
__device__ __forceinline__ void wait_for_count(const uint32_t* counter, uint32_t target, const char* what,
                                               int index) {
  int polls = 0;
  while (load_acquire(counter) < target) {
    if (++polls == kCountQuickPolls) {
      wait_for_count_slowly(counter, target, what, index);
      return;
    }
    __nanosleep(64);
  }
}

// Per-item counts in global memory ([kMoeCountedItemsMax], set to zero by the call's routing), for down CTAs that
// wait for their own item's gate/up CTAs instead of the whole gate/up grid: each gate/up CTA adds one to its item's
// ready count once its h rows are stored (publish_item_rows: a barrier, then one thread's release add, cumulative
// over the CTA's stores that the barrier ordered before it); a down CTA's first thread waits with acquire loads until
// the count reaches the item's gate/up CTAs. The counts stay until the next call's routing zeroes them (its last
// CTA, past its wait for every earlier launch), so no down CTA counts itself. The waiting down CTAs read h through
// L2.
__device__ __forceinline__ void publish_item_rows(uint32_t* item_counters, int item_index) {
  __syncthreads();  // every h row of this CTA is stored
  if (threadIdx.x == 0) add_release(item_counters + item_index, 1u);
}
__device__ __forceinline__ void wait_for_item_rows(const uint32_t* item_counters, int item_index, int gate_up_ctas) {
  if (threadIdx.x == 0)
    wait_for_count(item_counters + item_index, uint32_t(gate_up_ctas), "work item (h rows)", item_index);
  __syncthreads();
}

// The fused combine (moe_experts.hpp MoeFusedCombine), called by every CTA of the down kernel that had a work item,
// once its rows are written: one CTA per band sums the band once every other CTA of the band has arrived at the
// band's ticket (sum_combine_band). Two forms, the same sums in the same order:
// - combine_band (the streamed kernels): the summing CTA is the band's CTA of the last work item (the last grid row
//   with an item, among the last CTAs to start); every other CTA adds its arrival with one thread's release after its
//   barrier and leaves at once, so only the summing CTA waits for the ticket (acquire loads), reads the slots' rows
//   and weights before that wait and hands them over through `scratch` (shared memory no warp reads once the CTA is
//   past its barrier), then sets the ticket back to zero;
// - combine_band_if_last_fenced (the register kernel, which has no such scratch): the band's last CTA to arrive
//   (its ticket counts the work items) sums it; every thread's sequentially consistent fences around a relaxed
//   ticket, the slots read from global memory by the summing CTA.

// A slot's row of down and its weight.
struct CombineSlot {
  int32_t row;
  float weight;
};

// The band's outputs, by its summing CTA: out[t, n] = down[T·top_k + t][n] + Σ_j weight(s) · down[row(s)][n] for
// s = t·top_k + j in moe_combine's order (slot_of(s) gives slot s).
template <class SlotOf>
__device__ __forceinline__ void sum_combine_band(const ExpertGemmArgs& a, int band, SlotOf slot_of) {
  const MoeFusedCombine& c = a.combine;
  const int64_t n0 = int64_t(band) * kMoeDownBandRows;
  const int band_rows = int(min(int64_t(kMoeDownBandRows), a.n_total - n0));
  const int64_t shared_rows = int64_t(c.tokens) * c.top_k;
  for (int i = threadIdx.x; i < c.tokens * band_rows; i += blockDim.x) {
    const int t = i / band_rows;
    const int64_t n = n0 + i % band_rows;
    float acc = __ldcg(a.down + (shared_rows + t) * a.n_total + n);  // written by other CTAs of this grid
    for (int j = 0; j < c.top_k; ++j) {
      const CombineSlot slot = slot_of(t * c.top_k + j);
      acc = fmaf(slot.weight, __ldcg(a.down + int64_t(slot.row) * a.n_total + n), acc);
    }
    c.out[int64_t(t) * a.n_total + n] = acc;
  }
}

// sums: whether this CTA sums the band; others: the band's other CTAs (work items - 1 + the split shared expert's
// second CTA).
template <bool kTrace>
__device__ __forceinline__ void combine_band(const ExpertGemmArgs& a, int band, bool sums, int others,
                                             uint8_t* scratch) {
  const MoeFusedCombine& c = a.combine;
  __syncthreads();  // every down row of this CTA is stored, every warp is past its stages
  if (!sums) {
    if (threadIdx.x == 0) add_release(c.band_tickets + band, 1u);
    return;
  }
  const int slots = c.tokens * c.top_k;  // <= kExpertThreads (check_moe_expert_gemm_params)
  int32_t row = 0;
  float weight = 0.0f;
  if (int(threadIdx.x) < slots) {
    row = __ldcg(c.slot_rows + threadIdx.x);
    weight = __ldcg(c.expert_weights + threadIdx.x);
  }
  if (threadIdx.x == 0) {
    wait_for_count(c.band_tickets + band, uint32_t(others), "the combine ticket of band", band);
    c.band_tickets[band] = 0;  // every other CTA of the band has arrived: ready for the next call
  }
  int32_t* slot_rows = reinterpret_cast<int32_t*>(scratch);
  float* slot_weights = reinterpret_cast<float*>(scratch) + slots;
  if (int(threadIdx.x) < slots) slot_rows[threadIdx.x] = row, slot_weights[threadIdx.x] = weight;
  __syncthreads();
  trace_point<kTrace>(a, MOE_TRACE_COMBINE_READY);
  sum_combine_band(a, band, [&](int s) { return CombineSlot{slot_rows[s], slot_weights[s]}; });
}

__device__ __forceinline__ void combine_band_if_last_fenced(const ExpertGemmArgs& a, int band) {
  const MoeFusedCombine& c = a.combine;
  __shared__ bool is_last;
  __threadfence();  // this CTA's down rows, before its ticket
  __syncthreads();
  if (threadIdx.x == 0)
    is_last = atomicAdd(c.band_tickets + band, 1u) == uint32_t(__ldcg(a.work_item_count)) - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  sum_combine_band(a, band,
                   [&](int s) { return CombineSlot{__ldcg(c.slot_rows + s), __ldcg(c.expert_weights + s)}; });
  if (threadIdx.x == 0) c.band_tickets[band] = 0;  // every CTA of the band has arrived: ready for the next call
}

template <ExpertGemm G>
__global__ void __launch_bounds__(kExpertThreads, 1) moe_expert_gemm_kernel(const ExpertGemmArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  if (blockIdx.y == 0) {
    const MoeExpertView& shared = a.experts[a.shared_expert];
    with_tile_format(shared.w1.format,
                     [&]<tile::TileFormat F>() { prefetch_shared_band<F, G>(a, shared, int(blockIdx.x)); });
  }
  if (int(blockIdx.y) >= work_items_after_prior_grids(a)) return;
  const MoeWorkItem item = a.work_items[blockIdx.y];
  const MoeExpertView expert = a.experts[item.expert];
  with_tile_format(G == ExpertGemm::GATE_UP ? expert.w1.format : expert.w2.format,
                   [&]<tile::TileFormat F>() { run_work_item<F, G>(a, expert, item, smem); });
  if (G == ExpertGemm::DOWN && a.combine.out != nullptr) combine_band_if_last_fenced(a, int(blockIdx.x));
}

// ---------------------------------------------------------------------------------------------------------------
// Streamed kernel (every expert matrix passes streamed_tile_applies; run_moe takes it while the experts get few rows
// each): the same CTA bands and outputs, each warp's 16 rows streamed through its own shared-memory ring by the
// tensor copy engine (weight_tile_mma.cuh, namespace stream; the maps of every expert matrix in a device table)
// instead of register loads and L2 prefetches. Shared memory: 8 rings of kStreamedSlots slots (one size for every
// format, so routed and shared experts of different formats share the launch), the x region, the exchange:
// ~111 KB, two CTAs per SM (16 warps streaming), where the register path runs one.
// - An item is served in passes of up to 8 rows (items of at most 8 rows: one token tile) or 16 rows (larger
//   items: two token tiles), the weights streamed once per pass. Decode items have 1-2 rows; at 64-256 tokens a
//   routed expert averages 1.5-6 rows (V4-Flash) and the shared expert's items (64 rows) take 4 passes, a small
//   share of the bytes next to ~200 touched experts.
// - The warp's stage counter runs on across passes (ring slot j % slots, barrier phase j / slots), so the next
//   pass's first stages are in flight while the current pass writes its rows.
// - x is staged for the pass's real rows only, in chunks as long as the x region holds for that many rows (whole
//   stages of every format): the whole K of V4-Flash and V4-Pro in one chunk for 1-2 rows, 512 inputs per chunk for
//   16 rows. The launch sizes the x region for min(T, 16) rows up to kStreamedXBytes (decode launches stay small,
//   which leaves the SM more L1).
inline constexpr int kStreamedSlots = 2;
inline constexpr int kStreamedMaxTokenTiles = 2;
inline constexpr int kStreamedPassRows = kStreamedMaxTokenTiles * tile::kTokensPerMma;
// The rings, after up to 1 KB that aligns them for the swizzled boxes.
inline constexpr size_t kStreamedRingBytes =
    size_t(kExpertWarps) * kStreamedSlots * size_t(tile::stream::kSlotBytes) + tile::stream::kSlotAlignment;
inline constexpr size_t kStreamedXBytes = 26 * 1024;  // the most; ExpertGemmArgs::streamed_x_bytes
// The w3 results handed to the w1 warps: [4 bands][16 rows][16 tokens] fp32.
inline constexpr size_t kStreamedExchangeBytes =
    size_t(kExpertWarps / 2) * tile::kTileRows * kStreamedPassRows * sizeof(float);
// Split CTAs (one token tile): write_rows's exchange takes [4 bands][16 rows][8 tokens] fp32, reduce_k_parts's
// area (4 pairs × 32 lanes × 4 fp32) follows it in the exchange region.
inline constexpr int kStreamedReduceOffset = (kExpertWarps / 2) * tile::kTileRows * tile::kTokensPerMma;
static_assert((kStreamedReduceOffset + 4 * tile::kWarpSize * 4) * sizeof(float) <= kStreamedExchangeBytes,
              "the split CTAs' reduction fits the exchange region");
// Two CTAs per SM: 228 KiB per SM, 1 KiB reserved per CTA, the ring barriers static.
static_assert(2 * (kStreamedRingBytes + kStreamedXBytes + kStreamedExchangeBytes + 1024 +
                   kExpertWarps * kStreamedSlots * sizeof(uint64_t)) <= 228 * 1024,
              "two streamed CTAs per SM");
// x chunks are whole stages of every format (fp4 stages are the longest).
inline constexpr int64_t kStreamedChunkGranule = tile::stream::stage_k(tile::TileFormat::MXFP4);
static_assert(kStreamedXBytes >= size_t(kStreamedPassRows) * tile::x_tile_row_stride(kStreamedChunkGranule) *
                                     sizeof(__nv_bfloat16),
              "a pass of 16 rows must fit one granule of x");

// Bytes of x for `rows` rows of k inputs.
__host__ __device__ constexpr int streamed_x_bytes(int rows, int k) {
  return rows * tile::x_tile_row_stride(k) * int(sizeof(__nv_bfloat16));
}

// Inputs per x chunk for `rows` rows in an x region of x_bytes: the whole K when it fits, else the most whole
// granules that fit (at least one: a region smaller than the whole K for min(T, 16) rows is kStreamedXBytes),
// balanced over the chunks K needs.
__device__ __forceinline__ int streamed_chunk_k(int k_total, int rows, int x_bytes) {
  constexpr int G = int(kStreamedChunkGranule);
  if (streamed_x_bytes(rows, k_total) <= x_bytes) return k_total;
  const int fitting = (x_bytes / (rows * int(sizeof(__nv_bfloat16))) - 32) / G * G;
  const int chunks = (k_total + fitting - 1) / fitting;
  return ((k_total + chunks - 1) / chunks + G - 1) / G * G;
}

// The warp's matrix's tensor maps: expert e's [w1, w3, w2] in the table.
template <ExpertGemm G>
__device__ __forceinline__ const tile::stream::StreamMaps* warp_maps(const ExpertGemmArgs& a, int expert) {
  const int matrix = G == ExpertGemm::DOWN ? 2 : threadIdx.x / tile::kWarpSize >= kExpertWarps / 2 ? 1 : 0;
  return a.stream_maps + 3 * expert + matrix;
}

// What one warp of a streamed CTA computes: 16 weight rows from row0, over the stages s of each pass with
// s % kParts == k_part. kParts = 1: the CTA's band as in NOTES, every stage. kParts = 2 (the split shared expert,
// moe_expert_streamed_kernel): CTA part p of band b covers half the band's rows, b·kCtaRows + p·kCtaRows / 2, and
// two warps share each 16 rows (and matrix), one on the even stages, one on the odd ones (reduce_k_parts sums them).
struct WarpSlice {
  int64_t row0;
  int k_part;
};
template <ExpertGemm G, int kParts>
__device__ __forceinline__ WarpSlice warp_slice(int band, int part) {
  static_assert(kParts == 1 || kParts == 2, "one or two CTA parts");
  if constexpr (kParts == 1) {
    return {int64_t(band) * kCtaRows<G> + warp_band<G>() * tile::kTileRows, 0};
  } else {
    // Tiles of one matrix per part: down 4 (of 8), gate/up 2 (of 4 per matrix).
    constexpr int kTiles = kCtaRows<G> / tile::kTileRows / 2;
    const int wb = warp_band<G>();
    return {int64_t(band) * kCtaRows<G> + part * (kCtaRows<G> / 2) + (wb % kTiles) * tile::kTileRows, wb / kTiles};
  }
}

// Stages per pass of a warp on k_part of kParts.
template <int kParts>
__device__ __forceinline__ int slice_pass_stages(int pass_stages, int k_part) {
  return (pass_stages - k_part + kParts - 1) / kParts;
}

// The warp's first stages of its matrix: before the routing is known for the shared expert's CTAs (their item is
// always the first), else once the item is read.
template <tile::TileFormat F, ExpertGemm G, int kParts>
__device__ __forceinline__ void start_stream(const ExpertGemmArgs& a, int expert, const WarpSlice& slice,
                                             uint8_t* ring, uint64_t* full) {
  namespace st = tile::stream;
  st::init_ring(full, kStreamedSlots);
  __syncwarp();
  const int stages = slice_pass_stages<kParts>(int(a.k_total / st::stage_k(F)), slice.k_part);
  for (int j = 0; j < kStreamedSlots && j < stages; ++j)
    st::issue_stage<F>(warp_maps<G>(a, expert), slice.row0, (slice.k_part + j * kParts) * st::stage_k(F),
                       ring + j * st::kSlotBytes, full + j);
}
template <tile::TileFormat F, ExpertGemm G>
__device__ __forceinline__ void start_stream(const ExpertGemmArgs& a, int expert, int band, uint8_t* ring,
                                             uint64_t* full) {
  start_stream<F, G, 1>(a, expert, warp_slice<G, 1>(band, 0), ring, full);
}

// kParts = 2: the odd-stage warp of each 16 rows hands its sums to the even-stage warp (the same lane holds the same
// accumulator elements), which adds them: acc = even stages + odd stages. `area`: 4 pairs × 32 lanes × 4·NT fp32.
template <ExpertGemm G, int NT>
__device__ __forceinline__ void reduce_k_parts(const WarpSlice& slice, float (&acc)[NT][4], float* area) {
  const int warp_idx = threadIdx.x / tile::kWarpSize, lane = threadIdx.x % tile::kWarpSize;
  constexpr int kTiles = kCtaRows<G> / tile::kTileRows / 2;
  const int pair = warp_band<G>() % kTiles + (G == ExpertGemm::GATE_UP ? kTiles * (warp_idx / (kExpertWarps / 2)) : 0);
  auto* mine = reinterpret_cast<float4*>(area) + (pair * tile::kWarpSize + lane) * NT;
  if (slice.k_part == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mine[nt] = make_float4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
  }
  __syncthreads();
  if (slice.k_part == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float4 other = mine[nt];
      acc[nt][0] += other.x, acc[nt][1] += other.y, acc[nt][2] += other.z, acc[nt][3] += other.w;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The lean fp4 stage product (MoeExpertGemmParams::lean_decode): the same MMAs on the same bf16 operands as
// tile::stream::multiply_stage, in the same order (the same bits), but every lane reads x for every token tile of
// the pass (token min(8·nt + g, rows - 1)) instead of choosing between x and zeros per load: a column of absent
// tokens holds a copy of a real token, and mma keeps columns apart, so the columns that are stored are unchanged
// (and the others never stored). Both decode the experts' fp4 words in the DEVICE layout (kExpertFp4Layout).
namespace lean {

// The lane's 16 stored bytes of tile row `row` at step u of the stage in `slot` (tile::stream::multiply_stage's
// reads: 64 bytes of each row per step, half u / 2 of the stage, chunk 4·(u % 2) + t, swizzled by the row).
__device__ __forceinline__ uint4 lane_row_bytes(const uint8_t* slot, int u, int row) {
  namespace st = tile::stream;
  const int chunk = ((u & 1) << 2) | int(threadIdx.x % 4);
  return *reinterpret_cast<const uint4*>(slot + (u >> 1) * st::kHalfBytes + row * st::kBoxBytes +
                                         ((chunk ^ (row & 7)) << 4));
}

// sums += the fp4 stage in `slot` × x, as tile::stream::multiply_stage<F, NT, C> (rows by stream_row, the MMAs of
// step u, token tile nt, chunk c, half h into sums[(2c + h) % C][nt]). x_lane[nt]: the lane's x of token tile nt at
// the stage's first input (a real token's row, see above).
template <tile::TileFormat F, int NT, int C>
__device__ __forceinline__ void multiply_stage(const uint8_t* slot, const __nv_bfloat16* const (&x_lane)[NT],
                                               float (&sums)[C][NT][4]) {
  namespace st = tile::stream;
  static_assert(F == tile::TileFormat::MXFP4 || F == tile::TileFormat::NVFP4, "fp4 stages only");
  constexpr int kStepK = 4 * st::values_per_load(F), kSteps = st::kRowBytes / 64;
  constexpr int kScaleBytes = st::stage_scale_bytes(F);
  const int lane = threadIdx.x % tile::kWarpSize, g = lane / 4, t = lane % 4;
  const int rows[2] = {st::stream_row(g), st::stream_row(g + 8)};
  const uint8_t* scales = slot + 2 * st::kHalfBytes;
#pragma unroll
  for (int u = 0; u < kSteps; ++u) {
    uint32_t pairs[2][16];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint4 raw = lane_row_bytes(slot, u, rows[r]);
      uint32_t factor0 = 0, factor1 = 0;
      if constexpr (F == tile::TileFormat::MXFP4) {
        factor0 = tile::detail::mxfp4_factor(scales[rows[r] * kScaleBytes + 4 * u + t]);
      } else {
        const uint16_t codes = *reinterpret_cast<const uint16_t*>(scales + rows[r] * kScaleBytes + 2 * (4 * u + t));
        tile::detail::nvfp4_factors(codes, factor0, factor1);
      }
      tile::detail::decode_row_bytes<F, kExpertFp4Layout>(raw, factor0, factor1, pairs[r]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 b = *reinterpret_cast<const uint4*>(x_lane[nt] + u * kStepK + c * 32);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int m = 2 * c + half;
          const uint32_t a_frag[4] = {pairs[0][2 * m], pairs[1][2 * m], pairs[0][2 * m + 1], pairs[1][2 * m + 1]};
          ptx::mma_m16n8k16_bf16_f32(sums[m % C][nt], a_frag, half == 0 ? b.x : b.z, half == 0 ? b.y : b.w);
        }
      }
  }
}

}  // namespace lean

// ---------------------------------------------------------------------------------------------------------------
// Few-token fp4 stages with the block scales on the MMA's output columns (MoeExpertGemmParams::
// column_stages; items of one or two rows). At T <= 2 six or seven of the MMA's eight token columns carried
// copies; here a column holds the partial sum of one scale block of one row instead, so the weights enter the MMA as
// bare e2m1 bits and the block scales are applied to fp32 column sums after it: per 16 × 512 stage the 128 bf16x2
// factor multiplies and the per-row factor conversions go, 32 fp32 FMAs and 16 scale conversions come.
// - Lane t decodes 32 values of rows g and g + 8 per step (tile::detail::e2m1_row_bits): the first 16 (A half) feed
//   four MMAs into sums_a, the last 16 (B half) four into sums_b, each MMA taking two of the half's pairs as its k slot
//   pairs t and t + 4. B column n <= 3 holds the item's row 0 on slot pairs n and n + 4 only, column n + 4 its row 1
//   on the same pairs (lane (g, t) feeds row 0 where g == t, row 1 where g == t + 4, zeros elsewhere and for an absent
//   row 1), so column n (n + 4) of sums_a / sums_b sums lane n's A / B half against row 0 (row 1): NVFP4 blocks 2n
//   and 2n + 1 of the step; MXFP4 block n (both halves, one scale).
// - Exponents: the bits are e2m1 × 2^-126 (0.5 a bf16 subnormal) and x is staged × 2^kXExponent (exact), so the
//   products and column sums are normal fp32 for |x| in [2^-60, 2^64); the column scales are NVFP4's e4m3 value and
//   MXFP4's 2^(e - 127 + kMxfp4ScaleExponent), and finish() brings the row sums to weight_tile_mma's accumulator
//   scale (write_rows then applies weight_tile_output_scale). The block sums are added in another order than the
//   other stages' (fp32 column sums, then scaled): as exact, not the same bits.
// - x layout (stage_x): the item's rows in input order, every chunk of 8 permuted as tile::detail::permute_chunk
//   (the lean pairs' order), so one 16-byte load holds the B fragments of two MMAs; then a zero block of 64 bytes
//   that the lanes without x read (at a 32 mod 128 byte offset: its broadcast shares no bank group with x reads).
namespace columns {

inline constexpr int kXExponent = 64;
inline constexpr int kMxfp4ScaleExponent = 126 - kXExponent;
inline constexpr uint32_t kXFactor = uint32_t(127 + kXExponent) << 7 | uint32_t(127 + kXExponent) << 23;
inline constexpr int kStepElements = 128;  // x per step: 4 lanes × 32 inputs
inline constexpr int kZeroChunks = 4;      // the zero block: one 16-byte load per pair of MMAs of a step
inline constexpr int kMaxRows = 2;         // rows per item: B columns 0-3 and 4-7

// Element offset of the zero block after `rows` rows of k_count staged inputs.
__host__ __device__ constexpr int zero_block_offset(int k_count, int rows) {
  return rows * k_count + 2 * tile::kXChunk;
}
// Bytes stage_x writes for `rows` rows of k_count inputs (k_count a multiple of 128).
__host__ __device__ constexpr int x_bytes(int k_count, int rows) {
  return (zero_block_offset(k_count, rows) + kZeroChunks * tile::kXChunk) * int(sizeof(__nv_bfloat16));
}

// Stages x[0, k_count) of the item's rows (row_of(r), 16-byte aligned, r < rows <= kMaxRows) and the zero block;
// called by thread_count threads of the CTA with distinct thread_idx (the caller synchronises before and after).
// kCoherent: read through L2 (rows written by other CTAs of the running grid).
template <bool kCoherent = false, class RowOf>
__device__ __forceinline__ void stage_x(RowOf row_of, int rows, int k_count, __nv_bfloat16* x_tile, int thread_idx,
                                        int thread_count) {
  const int chunks = k_count / tile::kXChunk;
  for (int i = thread_idx; i < rows * chunks + kZeroChunks; i += thread_count) {
    uint4 v = make_uint4(0, 0, 0, 0);
    int at = zero_block_offset(k_count, rows) + (i - rows * chunks) * tile::kXChunk;
    if (i < rows * chunks) {
      const int r = i / chunks, c = i % chunks;
      const uint4* source = reinterpret_cast<const uint4*>(row_of(r)) + c;
      v = tile::detail::permute_chunk<tile::TileFormat::MXFP4>(kCoherent ? __ldcg(source) : __ldg(source));
      v = make_uint4(tile::detail::bf16x2_mul(v.x, kXFactor), tile::detail::bf16x2_mul(v.y, kXFactor),
                     tile::detail::bf16x2_mul(v.z, kXFactor), tile::detail::bf16x2_mul(v.w, kXFactor));
      at = i * tile::kXChunk;
    }
    *reinterpret_cast<uint4*>(x_tile + at) = v;
  }
}

// Where lane (g, t) reads its B fragments at step s: x + s · stride where it feeds x (row 0 for g == t, row 1 for
// g == t + 4 when the item has it), else the zero block with stride 0.
struct LaneX {
  const __nv_bfloat16* x;
  int stride;
};
__device__ __forceinline__ LaneX lane_x(const __nv_bfloat16* x_tile, int rows, int k_count) {
  const int lane = threadIdx.x % tile::kWarpSize, g = lane / 4, t = lane % 4;
  const int row = g == t ? 0 : g == t + 4 ? 1 : kMaxRows;
  return row < rows ? LaneX{x_tile + row * k_count + 32 * t, kStepElements}
                    : LaneX{x_tile + zero_block_offset(k_count, rows), 0};
}

// The fp32 scales of lane t's accumulator columns 2t and 2t + 1 on one row at step u, for sums_a ([0][c]) and
// sums_b ([1][c]): lanes t and t + 2 take the same blocks (columns of rows 0 and 1), NVFP4 blocks 4t', 4t' + 2 and
// 4t' + 1, 4t' + 3 of the step, t' = t mod 2; MXFP4 blocks 2t' and 2t' + 1 for both.
template <tile::TileFormat F>
__device__ __forceinline__ void column_scales(const uint8_t* row_scales, int u, int t, float (&scale)[2][2]) {
  if constexpr (F == tile::TileFormat::NVFP4) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(row_scales + 8 * u + 4 * (t & 1));
    const uint32_t codes = __byte_perm(word, 0u, 0x3120u);  // blocks 4t, 4t + 2 | 4t + 1, 4t + 3
    const float2 a = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes), __NV_E4M3)));
    const float2 b =
        __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(codes >> 16), __NV_E4M3)));
    scale[0][0] = a.x, scale[0][1] = a.y, scale[1][0] = b.x, scale[1][1] = b.y;
  } else {
    const uint32_t codes = *reinterpret_cast<const uint16_t*>(row_scales + 4 * u + 2 * (t & 1));
    scale[0][0] = scale[1][0] = __uint_as_float(((codes & 0xFFu) + uint32_t(kMxfp4ScaleExponent)) << 23);
    scale[0][1] = scale[1][1] = __uint_as_float(((codes >> 8) + uint32_t(kMxfp4ScaleExponent)) << 23);
  }
}

// acc += the fp4 stage in `slot` × x by columns: acc[0..1] row g, columns 2t and 2t + 1; acc[2..3] row g + 8.
// `x`: the lane's B pointer at the stage's first step.
template <tile::TileFormat F>
__device__ __forceinline__ void multiply_stage(const uint8_t* slot, const LaneX& x, float (&acc)[4]) {
  namespace st = tile::stream;
  static_assert(F == tile::TileFormat::MXFP4 || F == tile::TileFormat::NVFP4, "fp4 stages only");
  constexpr int kSteps = st::kRowBytes / 64;
  constexpr int kScaleBytes = st::stage_scale_bytes(F);
  const int lane = threadIdx.x % tile::kWarpSize, g = lane / 4, t = lane % 4;
  const int rows[2] = {st::stream_row(g), st::stream_row(g + 8)};
  const uint8_t* scales = slot + 2 * st::kHalfBytes;
#pragma unroll
  for (int u = 0; u < kSteps; ++u) {
    uint32_t pairs[2][16];
    float scale[2][2][2];  // [row][half][column]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile::detail::e2m1_row_bits<kExpertFp4Layout>(lean::lane_row_bytes(slot, u, rows[r]), pairs[r]);
      column_scales<F>(scales + rows[r] * kScaleBytes, u, t, scale[r]);
    }
    float sums[2][4] = {};  // [half][D fragment]
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint4 b = *reinterpret_cast<const uint4*>(x.x + u * x.stride + c * tile::kXChunk);
      const int half = c / 2;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int p = 2 * (2 * c + j);  // the half's pairs p and p + 1 (pairs[8·half + ...])
        const uint32_t a_frag[4] = {pairs[0][p], pairs[1][p], pairs[0][p + 1], pairs[1][p + 1]};
        ptx::mma_m16n8k16_bf16_f32(sums[half], a_frag, j == 0 ? b.x : b.z, j == 0 ? b.y : b.w);
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      acc[0] = fmaf(scale[0][half][0], sums[half][0], acc[0]);
      acc[1] = fmaf(scale[0][half][1], sums[half][1], acc[1]);
      acc[2] = fmaf(scale[1][half][0], sums[half][2], acc[2]);
      acc[3] = fmaf(scale[1][half][1], sums[half][3], acc[3]);
    }
  }
}

// The column sums → weight_tile_mma's accumulator of tokens 0 and 1 (item rows; weight rows g and g + 8 in
// acc[0][0..1] and acc[0][2..3] of lane t = 0, the places write_rows reads; other lanes' elements belong to absent
// tokens): the sum over each row's columns (two per lane, lanes t = 0-1 for row 0 and 2-3 for row 1), times
// 2^(126 - 8 - kXExponent) for NVFP4 (weight_tile_mma's stages carry e4m3 · 2^-8), 1 for MXFP4.
template <tile::TileFormat F>
__device__ __forceinline__ void finish(const float (&columns)[4], float (&acc)[1][4]) {
  float row_g = columns[0] + columns[1], row_g8 = columns[2] + columns[3];
  row_g += __shfl_xor_sync(0xFFFFFFFFu, row_g, 1);
  row_g8 += __shfl_xor_sync(0xFFFFFFFFu, row_g8, 1);
  const float second_g = __shfl_xor_sync(0xFFFFFFFFu, row_g, 2);
  const float second_g8 = __shfl_xor_sync(0xFFFFFFFFu, row_g8, 2);
  constexpr float kToTileScale = F == tile::TileFormat::NVFP4 ? 0x1p54f : 1.0f;
  static_assert(126 - 8 - kXExponent == 54 && kMxfp4ScaleExponent + kXExponent == 126, "the exponents above");
  acc[0][0] = row_g * kToTileScale, acc[0][1] = second_g * kToTileScale;
  acc[0][2] = row_g8 * kToTileScale, acc[0][3] = second_g8 * kToTileScale;
}

}  // namespace columns

// One work item in passes of 8·NT rows (see above); kLean: fp4 stages by lean::multiply_stage; kColumns (items of
// at most columns::kMaxRows rows): fp4 stages by columns::multiply_stage instead. kParts = 2: the warp's slice of CTA
// part `part` (warp_slice; one pass only, its stages >= kStreamedSlots per warp). kCoherentX: x is read through L2
// (h written by gate/up CTAs that may still run: MoeExpertGemmParams::down_waits_per_item).
template <tile::TileFormat F, ExpertGemm G, int NT, bool kLean = false, int kParts = 1, bool kColumns = false,
          bool kCoherentX = false, bool kTrace = false>
__device__ __forceinline__ void run_streamed_item(const ExpertGemmArgs& a, const MoeExpertView& expert,
                                                  const MoeWorkItem& item, int band, uint8_t* smem, uint64_t* full,
                                                  bool started, int part = 0) {
  namespace st = tile::stream;
  static_assert(kParts == 1 || NT == 1, "split CTAs serve items of one token tile");
  static_assert(!kColumns || NT == 1, "the column stages serve items of one token tile");
  constexpr int kC = tile::detail::kChains<NT>, kPassRows = NT * tile::kTokensPerMma;
  constexpr int64_t kStageK = st::stage_k(F);
  const int warp_idx = threadIdx.x / tile::kWarpSize, g = threadIdx.x % tile::kWarpSize / 4;
  const WarpSlice slice = warp_slice<G, kParts>(band, part);
  const int64_t row0 = slice.row0;
  const DeviceMatrixView w = warp_matrix<G>(expert);
  uint8_t* ring = st::align_slots(smem) + size_t(warp_idx) * kStreamedSlots * st::kSlotBytes;
  auto* x_tile = reinterpret_cast<__nv_bfloat16*>(smem + kStreamedRingBytes);
  auto* exchange = reinterpret_cast<float*>(smem + kStreamedRingBytes + a.streamed_x_bytes);
  // >= kStreamedSlots (moe_streamed_tiles_apply; for kParts = 2, moe_shared_expert_splits)
  const int pass_stages = slice_pass_stages<kParts>(a.k_total / int(kStageK), slice.k_part);
  const int passes = (item.row_count + kPassRows - 1) / kPassRows;
  const int stages = pass_stages * passes;
  const tile::stream::StreamMaps* maps = warp_maps<G>(a, item.expert);
  if (!started) {
    start_stream<F, G, kParts>(a, item.expert, slice, ring, full);
    trace_point<kTrace>(a, MOE_TRACE_ISSUED);
  }

  int j = 0;                                                    // stages consumed by this warp over the item
  int refill = pass_stages == kStreamedSlots ? 0 : kStreamedSlots;  // stage within its pass of stage j + slots
  for (int pass = 0; pass < passes; ++pass) {
    const int row_begin = item.row_begin + pass * kPassRows;
    const int rows = min(kPassRows, item.row_count - pass * kPassRows);
    const int chunk_k = streamed_chunk_k(a.k_total, rows, a.streamed_x_bytes);
    // Token tiles this lane's token (8·nt + g) exists in; the others are fed zeros, never read.
    const int lane_tiles = min(NT, max(0, (rows - g + tile::kTokensPerMma - 1) / tile::kTokensPerMma));
    constexpr bool kFp4 = F == tile::TileFormat::MXFP4 || F == tile::TileFormat::NVFP4;
    constexpr bool kColumnStages = kColumns && kFp4, kLeanStages = kLean && kFp4 && !kColumnStages;
    float sums[kC][NT][4];
    tile::detail::clear_sums<NT, kC>(sums);
    float acc[NT][4] = {};
    float column_sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int chunk_begin = 0; chunk_begin < a.k_total; chunk_begin += chunk_k) {
      const int chunk_end = min(a.k_total, chunk_begin + chunk_k);
      if (pass != 0 || chunk_begin != 0) __syncthreads();  // the previous chunk's x (and exchange) are read
      auto row_of = [&](int t) {
        const int64_t source_row = G == ExpertGemm::GATE_UP ? __ldg(a.row_tokens + row_begin + t) : row_begin + t;
        return a.x + source_row * a.k_total + chunk_begin;
      };
      if constexpr (kColumnStages) {
        columns::stage_x<kCoherentX>(row_of, rows, chunk_end - chunk_begin, x_tile, threadIdx.x, kExpertThreads);
      } else {
        tile::stage_x_tile<F, kCoherentX>(row_of, rows, rows, chunk_end - chunk_begin, x_tile, threadIdx.x,
                                          kExpertThreads);
      }
      __syncthreads();
      if (pass == 0 && chunk_begin == 0) trace_point<kTrace>(a, MOE_TRACE_X_STAGED);
      [[maybe_unused]] const columns::LaneX column_x = columns::lane_x(x_tile, rows, chunk_end - chunk_begin);
      const int row_stride = tile::x_tile_row_stride(chunk_end - chunk_begin);
      const __nv_bfloat16* x_lane = x_tile + g * row_stride + (threadIdx.x % 4) * tile::kXChunk;
      // The lean stages' x rows: every token tile reads a real token (see lean::multiply_stage).
      const __nv_bfloat16* x_lanes[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        x_lanes[nt] = x_tile + min(nt * tile::kTokensPerMma + g, rows - 1) * row_stride +
                      (threadIdx.x % 4) * tile::kXChunk;
      // The chunk's first stage of this warp's slice (chunks start at whole stages).
      int first_k = chunk_begin;
      if constexpr (kParts > 1) {
        const int chunk_stage = chunk_begin / int(kStageK);
        first_k = (chunk_stage + (slice.k_part - chunk_stage % kParts + kParts) % kParts) * int(kStageK);
      }
      for (int k0 = first_k; k0 < chunk_end; k0 += kParts * int(kStageK), ++j) {
        const int slot = j % kStreamedSlots;
        // FP8 (the shared expert): two global loads per stage. The band's scales loaded once per warp into its ring
        // slot's free kilobyte (the shared CTAs' before the wait) measured level (round s21-1, H200, V4-Flash NVFP4
        // T = 1 48.3 vs 48.2 µs, T = 8 206.3 vs 206.0): the shared CTAs' first stage still took ~4 µs from its data
        // to its MMAs in the trace, as the routed CTAs' (the code's first run, not the scales).
        float block_scales[st::kMaxBlocksPerStage];
        st::load_stage_block_scales<F>(w, row0, k0, block_scales);
        sm90::mbarrier_wait(full + slot, uint32_t(j / kStreamedSlots) & 1u);
        if (j < kMoeTraceStages) trace_point<kTrace>(a, MOE_TRACE_STAGE + 2 * j);
        if constexpr (kColumnStages) {
          const int step = (k0 - chunk_begin) / columns::kStepElements;
          const columns::LaneX x_stage{column_x.x + step * column_x.stride, column_x.stride};
          columns::multiply_stage<F>(ring + slot * st::kSlotBytes, x_stage, column_sums);
        } else if constexpr (kLeanStages) {
          const __nv_bfloat16* x_stage[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) x_stage[nt] = x_lanes[nt] + (k0 - chunk_begin);
          lean::multiply_stage<F, NT, kC>(ring + slot * st::kSlotBytes, x_stage, sums);
        } else {
          st::multiply_stage<F, NT, kC, kExpertFp4Layout>(ring + slot * st::kSlotBytes, x_lane + (k0 - chunk_begin),
                                                          row_stride, lane_tiles, block_scales, sums, acc);
        }
        __syncwarp();  // every lane's reads of the slot precede the copy that refills it
        if (j < kMoeTraceStages) trace_point<kTrace>(a, MOE_TRACE_STAGE + 2 * j + 1);
        if (j + kStreamedSlots < stages) {
          st::issue_stage<F>(maps, row0, (slice.k_part + refill * kParts) * kStageK, ring + slot * st::kSlotBytes,
                             full + slot);
          if (++refill == pass_stages) refill = 0;
        }
      }
    }
    if constexpr (kColumnStages)
      columns::finish<F>(column_sums, acc);
    else
      tile::detail::finish_tile<F, NT, kC>(sums, acc);
    if constexpr (kParts > 1) reduce_k_parts<G, NT>(slice, acc, exchange + kStreamedReduceOffset);
    // The odd-stage warps of split CTAs write no rows (their gate/up w3 warps still fill exchange bands 2-3, which
    // no warp reads there).
    write_rows<F, G, NT, kPassRows, true>(a, w, acc, row0, row_begin, slice.k_part == 0 ? rows : 0, exchange);
  }
  trace_point<kTrace>(a, MOE_TRACE_WRITTEN);
}

// kMultiTile: items may have more than 8 rows (T > 8); without it the kernel holds only the one-tile path, the
// decode launches' code (half the instructions to fetch at each CTA's cold start). kLean: fp4 stages by
// lean::multiply_stage. kSplitShared (one-tile kernels; MoeExpertGemmParams::split_shared_expert): the shared
// expert's item is served by two CTAs per band (grid rows 0 and 1, warp_slice's parts), item i >= 1 by grid row
// i + 1. kHeadStart (down, one-tile kernels; MoeExpertGemmParams::down_head_start): every CTA starts its weight
// stream before the wait, not only the shared expert's: the launch before it is the gate/up GEMM, whose CTAs let it
// start only once they have waited for the routing, so the work items are complete and visible at the GPU scope
// (read through L2) while h is not (staged after the wait, read through L2). With item counters
// (MoeExpertGemmParams::down_waits_per_item) the wait is for the item's own gate/up CTAs (wait_for_item_rows), which
// the one-tile gate/up kernel then publishes. kColumns (one-tile kernels of T <= 2 launches;
// MoeExpertGemmParams::column_stages): fp4 items by columns::multiply_stage.
template <ExpertGemm G, bool kMultiTile, bool kLean, bool kSplitShared = false, bool kHeadStart = false,
          bool kColumns = false, bool kTrace = false>
__global__ void __launch_bounds__(kExpertThreads, 2) moe_expert_streamed_kernel(const ExpertGemmArgs a) {
  static_assert(!(kSplitShared && kMultiTile), "the split shared expert is a one-tile kernel");
  static_assert(!(kColumns && kMultiTile), "the column stages serve items of at most two rows");
  static_assert(!kHeadStart || (G == ExpertGemm::DOWN && !kMultiTile), "the head start is a one-tile down kernel");
  static_assert(!(kTrace && kMultiTile), "traced launches are one-tile kernels");
  trace_point<kTrace>(a, MOE_TRACE_START);
  constexpr int kSharedParts = kSplitShared ? 2 : 1;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ uint64_t full_barriers[kExpertWarps][kStreamedSlots];
  uint64_t* full = full_barriers[threadIdx.x / tile::kWarpSize];
  uint8_t* ring = tile::stream::align_slots(smem) +
                  size_t(threadIdx.x / tile::kWarpSize) * kStreamedSlots * tile::stream::kSlotBytes;
  const int band = int(blockIdx.x);
  const bool shared_item = int(blockIdx.y) < kSharedParts;  // work item 0 is always the shared expert's
  const int part = shared_item ? int(blockIdx.y) : 0;
  const int item_index = shared_item ? 0 : int(blockIdx.y) - (kSharedParts - 1);
  if (shared_item) {
    with_tile_format(a.shared_format, [&]<tile::TileFormat F>() {
      start_stream<F, G, kSharedParts>(a, a.shared_expert, warp_slice<G, kSharedParts>(band, part), ring, full);
    });
  } else if (kHeadStart && item_index < __ldcg(a.work_item_count)) {
    // At T <= 8 the shared expert has one item, the first: every other item is a routed expert's.
    const int expert = __ldcg(&a.work_items[item_index].expert);
    with_tile_format(a.routed_format, [&]<tile::TileFormat F>() { start_stream<F, G>(a, expert, band, ring, full); });
  }
  if (shared_item || kHeadStart) trace_point<kTrace>(a, MOE_TRACE_ISSUED);
  int items;  // the call's work items
  if (kHeadStart && a.item_counters != nullptr) {
    // Only this item's gate/up CTAs, not the whole grid (all of them are resident or done: this launch started after
    // each had passed its own wait; the routing and everything before it are complete).
    allow_dependents();
    items = __ldcg(a.work_item_count);
    if (item_index >= items) return;
    const int parts = shared_item ? kSharedParts : 1;
    wait_for_item_rows(a.item_counters, item_index,
                       (a.k_total + kCtaRows<ExpertGemm::GATE_UP> - 1) / kCtaRows<ExpertGemm::GATE_UP> * parts);
  } else {
    items = work_items_after_prior_grids(a);
    if (item_index >= items) return;
  }
  trace_point<kTrace>(a, MOE_TRACE_READY);
  // Every CTA with an item has started its stream with the head start (the item count read above is the same).
  const bool started = kHeadStart || shared_item;
  const MoeWorkItem item = a.work_items[item_index];
  // The format from the arguments, not the view, so the item's first copies start while its view is still loading.
  const WeightFormat format = item.expert == a.shared_expert ? a.shared_format : a.routed_format;
  const MoeExpertView expert = a.experts[item.expert];
  if (kSplitShared && shared_item) {
    with_tile_format(format, [&]<tile::TileFormat F>() {
      run_streamed_item<F, G, 1, kLean, kSharedParts, kColumns, kHeadStart, kTrace>(a, expert, item, band, smem, full,
                                                                                    true, part);
    });
  } else {
    with_tile_format(format, [&]<tile::TileFormat F>() {
      if (!kMultiTile || item.row_count <= tile::kTokensPerMma)
        run_streamed_item<F, G, 1, kLean, 1, kColumns, kHeadStart, kTrace>(a, expert, item, band, smem, full,
                                                                           started);
      else
        run_streamed_item<F, G, kStreamedMaxTokenTiles, kLean>(a, expert, item, band, smem, full, started);
    });
  }
  if (G == ExpertGemm::GATE_UP && !kMultiTile && a.item_counters != nullptr)
    publish_item_rows(a.item_counters, item_index);
  if (G == ExpertGemm::DOWN && a.combine.out != nullptr)
    combine_band<kTrace>(a, band, item_index == items - 1 && part == 0, items + kSharedParts - 2,
                         tile::stream::align_slots(smem));
  trace_point<kTrace>(a, MOE_TRACE_END);
}

// Host side (moe_experts.cu): the kernel arguments of one grouped GEMM (streamed_x_bytes left 0), as the launchers
// above build them, and the x region a streamed launch of T tokens sizes for K = k_total.
ExpertGemmArgs expert_gemm_args(const MoeExpertGemmParams& params, ExpertGemm gemm);
int streamed_x_region_bytes(int tokens, int k_total);

}  // namespace dsv4::cuda::moe
