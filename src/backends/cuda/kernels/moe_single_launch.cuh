// Device code behind run_moe_single_launch (moe_single_launch.hpp holds the contract).
//
// NOTES:
// - The CTA is the streamed expert kernel's (8 warps, moe_experts.cuh): per-warp rings, the x region, the
//   exchange; two CTAs per SM. The routing CTA's scratch (biased scores, bucket counts) lives in its x region,
//   which no task uses before the routing is published.
// - Router rows: warp w of CTA c computes rows c + w·grid, c + (w + 8)·grid, ... for every token with the products
//   and the order of moe_router_logits_kernel (lane-strided 8-value vectors, fma per token, warp butterfly), so the
//   logits are the three-launch path's bits; u comes from global memory (L1) instead of a staged tile.
// - Synchronisation through global memory: writers fence, then count themselves with an atomic (the routing flag, the
//   per-item done counts, the band tickets of the combine); one thread per waiting CTA polls with acquire loads,
//   then a CTA barrier. Data written inside the grid is read with ld.cg (work items, row tokens, slot rows, expert
//   weights) or, for x (u in bf16, h), through lines that no CTA of the SM read before they were written.
// - Deadlock freedom: every task a CTA waits for (all router rows, an item's gate/up bands) belongs to the first
//   phases of CTAs that wait only for earlier phases, and every CTA of the grid is resident (grid ≤ occupancy ×
//   SMs; a CTA still waiting for an SM held by the previous kernel gets it when that kernel ends, which does not
//   depend on this one). allow_dependents() comes after the routing wait, when every CTA is running.
// - The last CTA to finish resets the flag and the item counters; the router ticket and the band tickets are
//   reset by their last users as in the three-launch path.
// - Measured (H200, bench_cuda_moe, V4-Flash, GPU round 4; graphs of the sub-block): T = 1 69.4 µs in one launch
//   against 70.4 µs in three (77.3 in session 12); T = 8 280 against 253 µs. Not profiled yet; candidates: at T = 8
//   each CTA runs about five gate/up and five down tasks in a row, each with its own start (item, view and tensor
//   map loads, the ring's first stages, x staging) that nothing overlaps; at T = 1 the experts' streams themselves
//   (the three-launch kernels are issue-bound there: ncu, 6.1 cycles per issued instruction at 4 warps per
//   scheduler, DRAM 38 % busy for gate/up).
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/moe_experts.cuh"
#include "backends/cuda/kernels/moe_routing.cuh"
#include "backends/cuda/kernels/moe_single_launch.hpp"
#include "backends/cuda/ptx/memory_order.cuh"

namespace dsv4::cuda::moe {

struct SingleLaunchArgs {
  RouterLogitsArgs logits;  // rows_per_cta unused
  RouteArgs route;
  ExpertGemmArgs gate_up, down;
  uint32_t* routed_flag;    // 1 once the routing is published
  uint32_t* finished_ctas;  // CTAs past their last task
  uint32_t* item_done;      // [max_work_items]: gate/up bands done per work item
  int gate_up_bands, down_bands;
};

// The x region holds the routing CTA's scratch.
inline constexpr size_t kSingleLaunchRouteBytes = sizeof(RouteScratch) + sizeof(BucketScratch);
static_assert(kSingleLaunchRouteBytes <= kStreamedXBytes, "the routing scratch fits the largest x region");
static_assert(kExpertWarps * kMoeFusedRoutingMaxTokens * kWarpSize * sizeof(float) <= kSingleLaunchRouteBytes,
              "the router rows' running sums fit the x region");

// Blocks the CTA until *counter >= target. The wait is bounded (a trap after 2^24 polls, seconds: the awaited work
// takes microseconds), so a counter left non-zero by a bad workspace fails the launch instead of hanging the stream.
__device__ __forceinline__ void wait_for_count(const uint32_t* counter, uint32_t target) {
  if (threadIdx.x == 0) {
    for (uint32_t polls = 0; load_acquire(counter) < target; ++polls) {
      if (polls == (1u << 24)) __trap();
      __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

// Publishes the CTA's global writes, then adds one to *counter (one thread).
__device__ __forceinline__ void count_done(uint32_t* counter) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(counter, 1u);
}

// A warp's ring barriers are invalidated before start_stream initialises them again for the next task (PTX ISA
// "mbarrier.inval": required before an mbarrier's memory is initialised anew); every phase has completed.
__device__ __forceinline__ void invalidate_ring(uint64_t* full) {
  if (threadIdx.x % kWarpSize == 0) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(full));
#pragma unroll
    for (int s = 0; s < kStreamedSlots; ++s)
      asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(address + s * uint32_t(sizeof(uint64_t))) : "memory");
  }
  __syncwarp();
}

__device__ __forceinline__ MoeWorkItem load_work_item(const MoeWorkItem* item) {
  const int32_t* words = reinterpret_cast<const int32_t*>(item);
  return MoeWorkItem{.expert = __ldcg(words), .row_begin = __ldcg(words + 1), .row_count = __ldcg(words + 2)};
}

// logits[t, row] for every token (T <= 8) by the calling warp: moe_router_logits_kernel's products and order per
// token (see NOTES; a lane's k run in the same order whatever the number of loads in flight). A batch is 64 bytes
// per lane (4 bf16 or 2 fp32 vectors), kept as loaded and widened at each use: with the u values the compiler
// loads ahead, larger batches spill next to the expert phases' registers. The token loop is not unrolled (one copy
// of the batch's FMAs) and keeps each token's running sum in the warp's `acc` ([8 tokens][32 lanes], shared memory).
template <bool kBf16>
__device__ __forceinline__ void router_row_logits(const RouterLogitsArgs& a, int row, int lane, float* acc) {
  constexpr int kBatch = kBf16 ? kRouterBatch / 2 : kRouterBatch / 4;
  const uint8_t* weights = a.router + size_t(row) * a.hidden * (kBf16 ? 2 : 4);
  for (int t = 0; t < a.tokens; ++t) acc[t * kWarpSize + lane] = 0.0f;
#pragma unroll 1
  for (int k0 = lane * kRouterVector; k0 < a.hidden; k0 += kWarpSize * kRouterVector * kBatch) {
    uint4 raw[kBatch][kRouterVectorWords<kBf16>];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int k = k0 + b * kWarpSize * kRouterVector;
      if (k < a.hidden)
#pragma unroll
        for (int i = 0; i < kRouterVectorWords<kBf16>; ++i)
          raw[b][i] = __ldg(reinterpret_cast<const uint4*>(weights + size_t(k) * (kBf16 ? 2 : 4)) + i);
    }
#pragma unroll 1
    for (int t = 0; t < a.tokens; ++t) {
      float sum = acc[t * kWarpSize + lane];
      const float* u = a.u + size_t(t) * a.hidden;
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int k = k0 + b * kWarpSize * kRouterVector;
        if (k >= a.hidden) break;
        float w[kRouterVector];
        widen_router_vector<kBf16>(raw[b], w);
        sum = fma_router_vector(w, __ldg(reinterpret_cast<const float4*>(u + k)),
                                __ldg(reinterpret_cast<const float4*>(u + k) + 1), sum);
      }
      acc[t * kWarpSize + lane] = sum;
    }
  }
#pragma unroll 1
  for (int t = 0; t < a.tokens; ++t) {
    float sum = acc[t * kWarpSize + lane];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (lane == t) a.logits[size_t(t) * a.experts + row] = sum;
  }
}

// The router rows of warp `warp` of this CTA (see NOTES), and their L2 prefetch (weights only).
template <bool kBf16>
__device__ __forceinline__ void prefetch_router_rows(const RouterLogitsArgs& a, int warp, int lane) {
  const uint32_t row_bytes = uint32_t(a.hidden) * (kBf16 ? 2 : 4), piece = 4096;  // a multiple of 16 (d % 8 == 0)
  for (int row = int(blockIdx.x) + warp * int(gridDim.x); row < a.experts; row += kExpertWarps * int(gridDim.x))
    for (uint32_t offset = uint32_t(lane) * piece; offset < row_bytes; offset += kWarpSize * piece)
      prefetch_l2_bulk(a.router + size_t(row) * row_bytes + offset, min(piece, row_bytes - offset));
}

// `scratch`: the CTA's x region (kExpertWarps · 8 · 32 floats), free until the routing is published.
template <bool kBf16>
__device__ __forceinline__ void compute_router_rows(const RouterLogitsArgs& a, int warp, int lane, float* scratch) {
  float* acc = scratch + warp * kMoeFusedRoutingMaxTokens * kWarpSize;
  for (int row = int(blockIdx.x) + warp * int(gridDim.x); row < a.experts; row += kExpertWarps * int(gridDim.x))
    router_row_logits<kBf16>(a, row, lane, acc);
}

template <bool kBf16Router>
__global__ void __launch_bounds__(kExpertThreads, 2) moe_single_launch_kernel(const SingleLaunchArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ uint64_t full_barriers[kExpertWarps][kStreamedSlots];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int cta = int(blockIdx.x), ctas = int(gridDim.x);
  uint64_t* full = full_barriers[warp];
  // The warp's ring (recomputed where used: fewer live registers across the phases).
  auto ring = [&] {
    const size_t warp_offset = size_t(threadIdx.x / kWarpSize) * kStreamedSlots * tile::stream::kSlotBytes;
    return tile::stream::align_slots(smem) + warp_offset;
  };
  const MoeExpertView& shared_expert = a.gate_up.experts[a.gate_up.shared_expert];

  // Weights only, before the previous kernel's results: work item 0 is always the shared expert's, so gate/up task
  // `cta` < gate_up_bands is its band `cta`, and down task ctas - 1 - cta < down_bands its band ctas - 1 - cta.
  const bool shared_gate_up = cta < a.gate_up_bands;
  if (shared_gate_up)
    with_tile_format(a.gate_up.shared_format, [&]<tile::TileFormat F>() {
      start_stream<F, ExpertGemm::GATE_UP>(a.gate_up, a.gate_up.shared_expert, cta, ring(), full);
      prefetch_shared_band<F, ExpertGemm::GATE_UP>(a.gate_up, shared_expert, cta);
    });
  if (ctas - 1 - cta < a.down_bands)
    with_tile_format(a.down.shared_format, [&]<tile::TileFormat F>() {
      prefetch_shared_band<F, ExpertGemm::DOWN>(a.down, shared_expert, ctas - 1 - cta);
    });
  prefetch_router_rows<kBf16Router>(a.logits, warp, lane);
  wait_for_prior_grids();  // u

  compute_router_rows<kBf16Router>(a.logits, warp, lane, reinterpret_cast<float*>(smem + kStreamedRingBytes));
  convert_u_slice(a.logits);
  if (arrived_last(a.route.out.finished_ctas)) {
    auto* route_scratch = reinterpret_cast<RouteScratch*>(smem + kStreamedRingBytes);
    auto* bucket_scratch = reinterpret_cast<BucketScratch*>(smem + kStreamedRingBytes + sizeof(RouteScratch));
    route_and_bucket_all(a.route, *route_scratch, *bucket_scratch);
    count_done(a.routed_flag);
  }
  wait_for_count(a.routed_flag, 1);
  allow_dependents();  // every CTA is running (see NOTES)
  const int items = __ldcg(a.route.out.work_item_count);

  // A ring that held a stream (an earlier task, or the shared expert's head start) is invalidated before reuse.
  for (int task = cta; task < items * a.gate_up_bands; task += ctas) {
    const int item_index = task / a.gate_up_bands, band = task % a.gate_up_bands;
    const MoeWorkItem item = load_work_item(a.route.out.work_items + item_index);
    const bool shared = item.expert == a.gate_up.shared_expert, started = task < a.gate_up_bands && task == cta;
    const MoeExpertView expert = a.gate_up.experts[item.expert];
    if (task != cta) invalidate_ring(full);
    with_tile_format(shared ? a.gate_up.shared_format : a.gate_up.routed_format, [&]<tile::TileFormat F>() {
      run_streamed_item<F, ExpertGemm::GATE_UP, 1>(a.gate_up, expert, item, band, smem, full, started);
    });
    count_done(a.item_done + item_index);
  }

  for (int task = ctas - 1 - cta; task < items * a.down_bands; task += ctas) {
    const int item_index = task / a.down_bands, band = task % a.down_bands;
    const MoeWorkItem item = load_work_item(a.route.out.work_items + item_index);
    const bool shared = item.expert == a.down.shared_expert;
    const MoeExpertView expert = a.down.experts[item.expert];
    if (task != ctas - 1 - cta || cta < items * a.gate_up_bands) invalidate_ring(full);
    with_tile_format(shared ? a.down.shared_format : a.down.routed_format, [&]<tile::TileFormat F>() {
      start_stream<F, ExpertGemm::DOWN>(a.down, item.expert, band, ring(), full);  // w2 before h is ready
      wait_for_count(a.item_done + item_index, uint32_t(a.gate_up_bands));
      run_streamed_item<F, ExpertGemm::DOWN, 1>(a.down, expert, item, band, smem, full, true);
    });
    combine_band_if_last(a.down, band);
  }

  if (arrived_last(a.finished_ctas)) {
    for (int i = threadIdx.x; i < items; i += blockDim.x) a.item_done[i] = 0;
    if (threadIdx.x == 0) *a.routed_flag = 0, *a.finished_ctas = 0;
  }
}

}  // namespace dsv4::cuda::moe
