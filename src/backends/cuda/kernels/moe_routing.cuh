// Device code behind run_moe_routing (moe_routing.hpp holds the contract).
//
// NOTES:
// - Router GEMV: a CTA stages up to 4 tokens of u (fp32) in shared memory, then its warps take router rows, lanes
//   striding K in 8-value vectors (16-byte bf16 loads, two for fp32) with 8 loads in flight each. Small T: many
//   CTAs of 8 rows, so the E·d·2 router bytes stream over many SMs; large T: a CTA covers all rows of its tokens
//   (u staged once per token chunk).
// - Scoring/top-k: a CTA routes up to 8 tokens: its threads compute the biased scores (one per thread at a time)
//   into shared memory, then one warp per token runs top_k rounds of a warp argmax on (value, lower index) over
//   them (lane l scans experts l, l + 32, ...); a NaN score counts as −inf so a valid expert is always chosen.
//   Round k's winner is parked in lane k, which recomputes its unbiased score from the logit, so Σ s[id] is summed
//   in k order like the CPU reference. The code stays loops, not unrolled copies: it runs once per CTA from a cold
//   instruction cache (the unrolled version, 16 scores per lane in registers, was 88 KB of SASS and ≈ 15 µs of the
//   T = 1 routing).
// - Both kernels are chained with programmatic dependent launch (ptx/dependent_launch.cuh): each waits for its
//   predecessor's writes first, then lets the next kernel's CTAs be scheduled.
// - Bucketing runs in the last CTA to finish (a ticket counter in the workspace, reset by that CTA): shared-memory
//   counts, one warp's scan, then a stable scatter by one warp (__match_any_sync gives each slot its rank among the
//   lanes of its chunk that chose the same expert), so the row order is a function of the routing alone.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/moe_prefetch.cuh"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/memory_order.cuh"

namespace dsv4::cuda::moe {

inline constexpr int kWarpSize = 32;
inline constexpr int kRouterWarpsPerCta = 8;
inline constexpr int kRouterMaxTokensPerCta = 4;
inline constexpr int kRouterVector = 8;  // router values per lane per load
inline constexpr int kRouterBatch = 8;   // loads per lane in flight before the first use
inline constexpr int kSelectWarpsPerCta = 8;
// A selecting lane marks its chosen experts (lane + 32 i) in one 32-bit mask.
static_assert(kMoeMaxExperts / kWarpSize <= 32, "experts per lane fit the taken mask");

struct RouterLogitsArgs {
  const uint8_t* router;  // [E, d] BF16 or F32
  const float* u;         // [T, d]
  float* logits;          // [T, E]
  __nv_bfloat16* u_bf16;  // [T, d]
  int tokens, experts, hidden;
  int rows_per_cta;       // a multiple of kRouterWarpsPerCta
};

template <bool kBf16>
inline constexpr int kRouterVectorWords = kBf16 ? 1 : 2;  // 16-byte words of one vector of kRouterVector values

// A router vector as loaded, widened to fp32 (bf16 is fp32's upper half).
template <bool kBf16>
__device__ __forceinline__ void widen_router_vector(const uint4 (&raw)[kRouterVectorWords<kBf16>],
                                                    float (&w)[kRouterVector]) {
  if constexpr (kBf16) {
    const uint32_t words[4] = {raw[0].x, raw[0].y, raw[0].z, raw[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(words[i] << 16);
      w[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kRouterVectorWords<kBf16>; ++i) {
      w[4 * i] = __uint_as_float(raw[i].x), w[4 * i + 1] = __uint_as_float(raw[i].y);
      w[4 * i + 2] = __uint_as_float(raw[i].z), w[4 * i + 3] = __uint_as_float(raw[i].w);
    }
  }
}

template <bool kBf16>
__device__ __forceinline__ void load_router_vector(const uint8_t* row, int k, float (&w)[kRouterVector]) {
  if constexpr (kBf16) {
    const uint4 raw[1] = {__ldg(reinterpret_cast<const uint4*>(row + size_t(k) * 2))};
    widen_router_vector<true>(raw, w);
  } else {
    const float4 a = __ldg(reinterpret_cast<const float4*>(row + size_t(k) * 4));
    const float4 b = __ldg(reinterpret_cast<const float4*>(row + size_t(k) * 4) + 1);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  }
}

// sum + w · x for one vector, x = (x0, x1): the router's products in their order, shared by
// moe_router_logits_kernel and the decode router so that both give the same logits bit for bit.
__device__ __forceinline__ float fma_router_vector(const float (&w)[kRouterVector], float4 x0, float4 x1, float sum) {
  sum = fmaf(w[0], x0.x, sum);
  sum = fmaf(w[1], x0.y, sum);
  sum = fmaf(w[2], x0.z, sum);
  sum = fmaf(w[3], x0.w, sum);
  sum = fmaf(w[4], x1.x, sum);
  sum = fmaf(w[5], x1.y, sum);
  sum = fmaf(w[6], x1.z, sum);
  return fmaf(w[7], x1.w, sum);
}

struct RouteArgs {
  const float* logits;     // [T, E]
  const float* bias;       // [E] or nullptr
  const int32_t* tid2eid;  // [vocab, top_k] or nullptr
  int64_t vocab;
  const int32_t* token_ids;
  int tokens, experts, top_k, rows_per_item;
  float routed_scaling_factor;
  MoeRoutingBuffers out;
};

// By the routing's last CTA, once every earlier launch has ended (its wait): the expert GEMMs' per-item counts set to
// zero for this call (MoeRoutingBuffers::item_counters).
__device__ __forceinline__ void zero_item_counters(const MoeRoutingBuffers& out) {
  for (int i = threadIdx.x; i < out.item_counter_count; i += blockDim.x) out.item_counters[i] = 0;
}

__device__ __forceinline__ float sqrt_softplus(float v) {
  // log1p(exp(v)) without overflow for large v, as the CPU reference.
  return sqrtf(v > 20.0f ? v : log1pf(expf(v)));
}

// Whether (v, e) ranks above (best, best_e): higher value, ties to the lower expert index.
__device__ __forceinline__ bool ranks_above(float v, int e, float best, int best_e) {
  return v > best || (v == best && e < best_e);
}

// Tokens a CTA routes together: their biased scores are computed by the whole CTA into shared memory, then one
// warp selects each token's experts.
inline constexpr int kRouteTokensPerCta = 8;
static_assert(kRouteTokensPerCta == kSelectWarpsPerCta && kRouteTokensPerCta == kRouterWarpsPerCta &&
                  kRouteTokensPerCta >= kMoeFusedRoutingMaxTokens,
              "one selecting warp per token of a CTA's block");

// Shared memory of one CTA's routing: the biased scores [token][expert] of up to kRouteTokensPerCta tokens.
struct RouteScratch {
  float biased[kRouteTokensPerCta][kMoeMaxExperts];
};

// The CTA's threads score tokens [token_begin, token_begin + count) (count <= kRouteTokensPerCta) of a scored layer:
// biased[t][e] = sqrt(softplus(logit)) + bias[e], NaN as -inf (so a valid expert is always chosen). One score per
// thread at a time: the serial part of the routing stays a few instructions long.
inline __device__ void score_tokens(const RouteArgs& a, int token_begin, int count, RouteScratch& scratch) {
  const int scores = count * a.experts;
#pragma unroll 1
  for (int i = threadIdx.x; i < scores; i += blockDim.x) {
    const int t = i / a.experts, e = i - t * a.experts;
    const float s = sqrt_softplus(__ldcg(a.logits + size_t(token_begin + t) * a.experts + e));  // other CTAs wrote it
    const float b = s + (a.bias != nullptr ? __ldg(a.bias + e) : 0.0f);
    scratch.biased[t][e] = isnan(b) ? -INFINITY : b;
  }
}

// Routes token `t` with the calling warp (scored layers: `biased` is its row of score_tokens): writes expert_ids /
// expert_weights [t, :]. Lane k < top_k ends up holding the k-th choice.
inline __device__ void select_experts(const RouteArgs& a, int t, const float* biased, int lane) {
  int my_id = 0;
  if (a.tid2eid != nullptr) {
    int32_t token = __ldg(a.token_ids + t);
    if (token < 0 || token >= a.vocab) {
      if (lane == 0) atomicCAS(a.out.status, 0, t + 1);
      token = 0;
    }
    if (lane < a.top_k) my_id = __ldg(a.tid2eid + size_t(token) * a.top_k + lane);
  } else {
    uint32_t taken = 0;  // bit i: expert lane + 32 i already chosen
#pragma unroll 1
    for (int k = 0; k < a.top_k; ++k) {
      float best = -INFINITY;
      int best_e = 0x7FFFFFFF;
#pragma unroll 1
      for (int i = 0, e = lane; e < a.experts; ++i, e += kWarpSize)
        if (!(taken >> i & 1u) && ranks_above(biased[e], e, best, best_e)) best = biased[e], best_e = e;
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xFFFFFFFFu, best, offset);
        const int other_e = __shfl_xor_sync(0xFFFFFFFFu, best_e, offset);
        if (ranks_above(other, other_e, best, best_e)) best = other, best_e = other_e;
      }
      if (lane == best_e % kWarpSize) taken |= 1u << (best_e / kWarpSize);
      if (lane == k) my_id = best_e;
    }
  }
  // The bias only selects; the weights come from the unbiased scores, summed in k order.
  const float my_s = lane < a.top_k ? sqrt_softplus(__ldcg(a.logits + size_t(t) * a.experts + my_id)) : 0.0f;
  float sum = 0.0f;
#pragma unroll 1
  for (int k = 0; k < a.top_k; ++k) sum += __shfl_sync(0xFFFFFFFFu, my_s, k);
  if (lane < a.top_k) {
    a.out.expert_ids[size_t(t) * a.top_k + lane] = my_id;
    a.out.expert_weights[size_t(t) * a.top_k + lane] = my_s / sum * a.routed_scaling_factor;
  }
}

// Routes tokens [token_begin, token_begin + count) with the whole CTA (count <= kRouteTokensPerCta, one warp per
// token; blockDim.x = 32 · kRouteTokensPerCta).
inline __device__ void route_tokens(const RouteArgs& a, int token_begin, int count, RouteScratch& scratch) {
  if (a.tid2eid == nullptr) score_tokens(a, token_begin, count, scratch);
  __syncthreads();
  const int warp_idx = threadIdx.x / kWarpSize;
  if (warp_idx < count) select_experts(a, token_begin + warp_idx, scratch.biased[warp_idx], threadIdx.x % kWarpSize);
}

// Exclusive scans of counts[0..n) and of ceil(counts / R) by one warp: offsets[0..n] and item_offsets[0..n], the
// latter starting at first_item.
inline __device__ void warp_scan_counts(const int* counts, int n, int rows_per_item, int first_item, int* offsets,
                                 int* item_offsets, int lane) {
  const int per_lane = (n + kWarpSize - 1) / kWarpSize;
  const int begin = min(n, lane * per_lane), end = min(n, begin + per_lane);
  int rows = 0, items = 0;
  #pragma unroll 1
  for (int e = begin; e < end; ++e) rows += counts[e], items += (counts[e] + rows_per_item - 1) / rows_per_item;
  int rows_before = rows, items_before = items;  // inclusive scan, then made exclusive
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int r = __shfl_up_sync(0xFFFFFFFFu, rows_before, offset);
    const int i = __shfl_up_sync(0xFFFFFFFFu, items_before, offset);
    if (lane >= offset) rows_before += r, items_before += i;
  }
  rows_before -= rows;
  items_before += first_item - items;
  #pragma unroll 1
  for (int e = begin; e < end; ++e) {
    offsets[e] = rows_before;
    item_offsets[e] = items_before;
    rows_before += counts[e];
    items_before += (counts[e] + rows_per_item - 1) / rows_per_item;
  }
  if (lane == kWarpSize - 1) offsets[n] = rows_before, item_offsets[n] = items_before;
}

// Shared memory of the bucketing.
struct BucketScratch {
  int counts[kMoeMaxExperts];
  int offsets[kMoeMaxExperts + 1];
  int item_offsets[kMoeMaxExperts + 1];
};

// The last CTA's work: bucket the T·top_k slots by expert; the shared expert's T rows follow the routed rows, and
// its work items come first (it is the largest expert, so its CTAs should start earliest).
inline __device__ void bucket_slots(const RouteArgs& a, BucketScratch& scratch) {
  int* counts = scratch.counts;
  int* offsets = scratch.offsets;
  int* item_offsets = scratch.item_offsets;
  const int lane = threadIdx.x % kWarpSize, warp_idx = threadIdx.x / kWarpSize;
  const int slots = a.tokens * a.top_k, experts = a.experts;
  const int shared_items = (a.tokens + a.rows_per_item - 1) / a.rows_per_item;
  #pragma unroll 1
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  #pragma unroll 1
  for (int s = threadIdx.x; s < slots; s += blockDim.x) atomicAdd(&counts[__ldcg(a.out.expert_ids + s)], 1);
  __syncthreads();
  if (warp_idx == 0) warp_scan_counts(counts, experts, a.rows_per_item, shared_items, offsets, item_offsets, lane);
  __syncthreads();
  if (warp_idx == 0) {
    // Stable scatter: chunk by chunk in slot order; counts[] becomes each expert's cursor.
    for (int e = lane; e < experts; e += kWarpSize) counts[e] = offsets[e];
    __syncwarp();
    #pragma unroll 1
    for (int chunk = 0; chunk < slots; chunk += kWarpSize) {
      const int s = chunk + lane;
      const int e = s < slots ? __ldcg(a.out.expert_ids + s) : -1 - lane;
      const unsigned same = __match_any_sync(0xFFFFFFFFu, e);
      if (s < slots) {
        const int row = counts[e] + __popc(same & ((1u << lane) - 1u));
        a.out.row_tokens[row] = s / a.top_k;
        a.out.slot_rows[s] = row;
      }
      __syncwarp();
      if (s < slots && lane == __ffs(same) - 1) counts[e] += __popc(same);
      __syncwarp();
    }
  } else {
    const int helper = threadIdx.x - kWarpSize, helpers = blockDim.x - kWarpSize;
    for (int e = helper; e <= experts; e += helpers) a.out.expert_offsets[e] = offsets[e];
    if (helper == 0) {
      a.out.expert_offsets[experts + 1] = slots + a.tokens;
      *a.out.work_item_count = item_offsets[experts];
    }
    #pragma unroll 1
    for (int t = helper; t < a.tokens; t += helpers) a.out.row_tokens[slots + t] = t;
    #pragma unroll 1
    for (int j = helper; j < shared_items; j += helpers)
      a.out.work_items[j] = MoeWorkItem{
          .expert = experts,
          .row_begin = slots + j * a.rows_per_item,
          .row_count = min(a.rows_per_item, a.tokens - j * a.rows_per_item),
      };
    #pragma unroll 1
    for (int e = helper; e < experts; e += helpers) {
      const int rows = offsets[e + 1] - offsets[e];
      #pragma unroll 1
      for (int j = 0; j * a.rows_per_item < rows; ++j)
        a.out.work_items[item_offsets[e] + j] = MoeWorkItem{
            .expert = e,
            .row_begin = offsets[e] + j * a.rows_per_item,
            .row_count = min(a.rows_per_item, rows - j * a.rows_per_item),
        };
    }
  }
  if (threadIdx.x == 0) *a.out.finished_ctas = 0;  // every other CTA has counted itself already
  zero_item_counters(a.out);
}

// The last CTA's work where one CTA routes every token (T <= kMoeFusedRoutingMaxTokens), then buckets the slots.
__device__ __forceinline__ void route_and_bucket_all(const RouteArgs& a, RouteScratch& route_scratch,
                                                     BucketScratch& bucket_scratch) {
  route_tokens(a, 0, a.tokens, route_scratch);
  __syncthreads();  // the expert ids of every token, for the bucketing
  bucket_slots(a, bucket_scratch);
}

// Publishes this CTA's global writes and counts it in the workspace's ticket; true in the last CTA of the grid to
// do so, which then sees every CTA's writes (bucket_slots resets the ticket).
__device__ __forceinline__ bool arrived_last(uint32_t* finished_ctas) {
  __threadfence();
  __syncthreads();
  __shared__ bool is_last;
  if (threadIdx.x == 0) is_last = atomicAdd(finished_ctas, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (is_last) __threadfence();
  return is_last;
}

__global__ void __launch_bounds__(kSelectWarpsPerCta * kWarpSize)
    moe_route_and_bucket_kernel(const RouteArgs a) {
  wait_for_prior_grids();  // the logits
  allow_dependents();
  __shared__ RouteScratch route_scratch;
  __shared__ BucketScratch bucket_scratch;
  const int token_begin = blockIdx.x * kRouteTokensPerCta;
  route_tokens(a, token_begin, min(kRouteTokensPerCta, a.tokens - token_begin), route_scratch);
  if (arrived_last(a.out.finished_ctas)) bucket_slots(a, bucket_scratch);
}

struct RouterArgs {
  RouterLogitsArgs logits;
  RouteArgs route;  // kRoute: what the last CTA routes and buckets
};

// Grid: (row blocks, token chunks of kTokens). Before waiting for u, the CTAs of the first chunk ask L2 for their
// router rows (weights only), so the router's HBM read overlaps the previous kernel. The chunk's u is staged in
// shared memory (fp32, zero past the last token), then each warp takes rows of the block with kRouterBatch loads per
// lane in flight. kRoute (few tokens): the last CTA to finish routes every token, one warp per token, and buckets
// the slots, which saves the routing launch and its wait.
template <bool kBf16, int kTokens, bool kRoute>
__global__ void __launch_bounds__(kRouterWarpsPerCta * kWarpSize) moe_router_logits_kernel(const RouterArgs args) {
  extern __shared__ float4 u_tile[];  // [kTokens][d / 4]
  const RouterLogitsArgs& a = args.logits;
  if (blockIdx.y == 0) {
    constexpr size_t kPiece = 16 * 1024;
    const size_t row_bytes = size_t(a.hidden) * (kBf16 ? 2 : 4);
    const int row_begin = blockIdx.x * a.rows_per_cta, row_end = min(a.experts, row_begin + a.rows_per_cta);
    const uint8_t* block = a.router + size_t(row_begin) * row_bytes;
    const size_t bytes = size_t(row_end - row_begin) * row_bytes;  // a multiple of 16: d % kRouterVector == 0
    for (size_t offset = threadIdx.x * kPiece; offset < bytes; offset += blockDim.x * kPiece)
      prefetch_l2_bulk(block + offset, uint32_t(min(kPiece, bytes - offset)));
  }
  wait_for_prior_grids();  // u comes from the previous operation
  allow_dependents();
  const int token_begin = blockIdx.y * kTokens;
  const int token_count = min(kTokens, a.tokens - token_begin);
  const int quads_per_token = a.hidden / 4;
  for (int i = threadIdx.x; i < kTokens * quads_per_token; i += blockDim.x) {
    const int t = i / quads_per_token;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (t < token_count) {
      v = __ldg(reinterpret_cast<const float4*>(a.u + size_t(token_begin) * a.hidden) + i);
      if (blockIdx.x == 0) {
        // One row block converts the chunk's u for the expert GEMMs.
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.u_bf16 + size_t(token_begin) * a.hidden) + 2 * i;
        dst[0] = __floats2bfloat162_rn(v.x, v.y);
        dst[1] = __floats2bfloat162_rn(v.z, v.w);
      }
    }
    u_tile[i] = v;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  const int row_end = min(a.experts, int(blockIdx.x + 1) * a.rows_per_cta);
  for (int expert = blockIdx.x * a.rows_per_cta + threadIdx.x / kWarpSize; expert < row_end;
       expert += kRouterWarpsPerCta) {
    const uint8_t* row = a.router + size_t(expert) * a.hidden * (kBf16 ? 2 : 4);
    float acc[kTokens] = {};
    for (int k0 = lane * kRouterVector; k0 < a.hidden; k0 += kWarpSize * kRouterVector * kRouterBatch) {
      float w[kRouterBatch][kRouterVector];
#pragma unroll
      for (int b = 0; b < kRouterBatch; ++b) {
        const int k = k0 + b * kWarpSize * kRouterVector;
        if (k < a.hidden) load_router_vector<kBf16>(row, k, w[b]);
      }
#pragma unroll
      for (int b = 0; b < kRouterBatch; ++b) {
        const int k = k0 + b * kWarpSize * kRouterVector;
        if (k >= a.hidden) break;
#pragma unroll
        for (int t = 0; t < kTokens; ++t)
          acc[t] = fma_router_vector(w[b], u_tile[t * quads_per_token + k / 4], u_tile[t * quads_per_token + k / 4 + 1],
                                     acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      float sum = acc[t];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
      if (lane == t && t < token_count) a.logits[size_t(token_begin + t) * a.experts + expert] = sum;
    }
  }
  if constexpr (kRoute) {
    __shared__ RouteScratch route_scratch;
    __shared__ BucketScratch bucket_scratch;
    if (arrived_last(args.route.out.finished_ctas)) route_and_bucket_all(args.route, route_scratch, bucket_scratch);
  }
}

// ---- The decode router (MoeRoutingParams::decode_router, T <= kMoeFusedRoutingMaxTokens): one launch ----
// CTA c owns router rows [c·R, c·R + R): one bulk copy moves them into shared memory before the wait for u, so the
// router's read overlaps the previous kernel. After the wait each warp takes (row, token) pairs: lane-strided
// 8-value vectors of the staged row against u read from global memory (kDecodeUBatch vectors in flight per lane),
// the products in moe_router_logits_kernel's order (fma_router_vector, then the same butterfly), so the logits are
// its bits; the CTA stores s = sqrt(softplus(logit)) in the logits scratch. The last CTA to arrive routes: the
// scores into shared memory, one warp per token keeps its experts' ordered
// keys in registers (8 or 16 per lane) and takes top_k rounds of two warp reductions (max key, then the lowest expert
// index holding it: the reference's ties to the lower index), then buckets the T·top_k slots with every thread
// owning a slot (rank among the slots by (expert, slot) by counting, work items by a ballot scan over the sorted
// rows): no global round trip between its steps. Nothing but the weights is loaded before the products' u (the
// bias comes with the logits in the routing CTA, the hash ids are stored after the products), and the code on the
// serial path is kept small: each CTA runs it once from a cold instruction cache.
// Measured (H200, bench_cuda_moe_router, graphs of chained calls, Flash bf16 router): T = 1 5.3 µs against 14.5
// for the fused router kernel, T = 8 10.8 against 24.0; ncu (cold L2, base clocks) T = 1 8.6 against 20.7 µs, where
// the routing CTA's SM is active ~10K cycles against ~5.4K for the others: the serial routing after the ticket
// (cold code, the ticket's and the scores' round trips) is what is left.
inline constexpr int kDecodeRouterThreads = 256;
inline constexpr int kDecodeRouterWarps = kDecodeRouterThreads / kWarpSize;
// u vectors per lane loaded before their products: 16, one round trip at d 4096 (~170 registers). 8 (at most 128
// registers, so a following streamed expert CTA fits beside the router's) was not faster: H200,
// bench_cuda_moe_router --follower, Flash bf16, router + expert-sized follower 10.37 against 10.07 µs at T = 1,
// 17.52 against 15.59 at T = 8.
inline constexpr int kDecodeUBatch = 16;
// Experts per lane in the selecting warp (the kernel's kKeys): 8 up to 256 experts (V4-Flash), else 16; the smaller
// unrolled body matters to the one CTA that runs it, from a cold instruction cache.
inline constexpr int kDecodeFewKeysPerLane = 8;
inline constexpr int kDecodeMaxKeysPerLane = kMoeMaxExperts / kWarpSize;
inline constexpr int kDecodeMaxSlots = kMoeFusedRoutingMaxTokens * kWarpSize;  // T · top_k, top_k <= 32
static_assert(kDecodeRouterThreads >= kDecodeMaxSlots, "one thread per slot in the bucketing");
static_assert(kDecodeRouterWarps >= kMoeFusedRoutingMaxTokens, "one selecting warp per token");

struct DecodeRouterArgs {
  RouterLogitsArgs logits;  // rows_per_cta: the rows staged per CTA
  RouteArgs route;
};

// Static shared memory of every CTA (only the routing CTA uses more than the bias and the hash ids).
struct DecodeRouteScratch {
  float score[kMoeFusedRoutingMaxTokens][kMoeMaxExperts];     // s = sqrt(softplus(logit)) from the logits scratch
  uint32_t key[kMoeFusedRoutingMaxTokens][kMoeMaxExperts];    // ordered_key(s + bias), NaN as −inf (scored layers)
  int32_t hash_ids[kDecodeMaxSlots];                        // tid2eid rows of the tokens, hash layers
  int32_t slot_expert[kDecodeMaxSlots];
  int32_t token_outside_vocab[kMoeFusedRoutingMaxTokens];  // hash layers: routed as token 0, reported in status
  int32_t row_expert[kDecodeMaxSlots];                      // the expert of each sorted row
  int32_t row_expert_end[kDecodeMaxSlots];                  // one past that expert's last row
  int32_t row_starts_item[kDecodeMaxSlots];
  int32_t warp_items[kDecodeRouterWarps];
};

// Maps a non-NaN float to an unsigned key of the same order; -0 and +0 (equal floats) get one key.
__device__ __forceinline__ uint32_t ordered_key(float v) {
  const uint32_t bits = __float_as_uint(v + 0.0f);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

// Warp `t` selects token t's experts of a scored layer from scratch.key; lane k < top_k returns choice k. A key of 0
// marks a taken or missing expert (every real key, −inf's included, is above it).
template <int kKeys>
__device__ __forceinline__ int select_decode_experts(const RouteArgs& a, int t, const DecodeRouteScratch& scratch,
                                                     int lane) {
  uint32_t key[kKeys];
#pragma unroll
  for (int i = 0; i < kKeys; ++i) {
    const int e = lane + i * kWarpSize;
    key[i] = e < a.experts ? scratch.key[t][e] : 0u;
  }
  int choice = 0;
#pragma unroll 1
  for (int k = 0; k < a.top_k; ++k) {
    uint32_t best = 0;
    int best_i = 0;
#pragma unroll
    for (int i = 0; i < kKeys; ++i)
      if (key[i] > best) best = key[i], best_i = i;  // strict: the lane's lowest index among equal keys
    const uint32_t top = __reduce_max_sync(0xFFFFFFFFu, best);
    const int e = int(__reduce_min_sync(0xFFFFFFFFu, best == top ? uint32_t(lane + best_i * kWarpSize) : ~0u));
    if (lane == k) choice = e;
    // Selects, not a store at key[e / 32] (which would move the keys to local memory).
#pragma unroll
    for (int i = 0; i < kKeys; ++i) key[i] = lane + i * kWarpSize == e ? 0u : key[i];
  }
  return choice;
}

// The routing CTA's work: ids, weights and the bucketing of every token (see the section comment).
template <int kKeys>
__device__ __forceinline__ void route_decode_tokens(const RouteArgs& a, DecodeRouteScratch& scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int T = a.tokens, K = a.top_k, E = a.experts, slots = T * K;
  // The bias is loaded here, beside the logits (one round trip for both), not by every CTA.
#pragma unroll 1
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const float bias = a.bias != nullptr ? __ldg(a.bias + e) : 0.0f;
#pragma unroll 1
    for (int t = 0; t < T; ++t) {
      const float s = __ldcg(a.logits + t * E + e);  // s, written by other CTAs
      const float biased = s + bias;
      scratch.score[t][e] = s;
      scratch.key[t][e] = ordered_key(isnan(biased) ? -INFINITY : biased);
    }
  }
  if (a.tid2eid != nullptr && threadIdx.x == 0) {
#pragma unroll 1
    for (int t = 0; t < T; ++t)
      if (scratch.token_outside_vocab[t] != 0) {
        atomicCAS(a.out.status, 0, t + 1);
        break;
      }
  }
  __syncthreads();
  if (warp < T) {
    const int id = a.tid2eid == nullptr ? select_decode_experts<kKeys>(a, warp, scratch, lane)
                                        : lane < K ? scratch.hash_ids[warp * K + lane] : 0;
    const float s = lane < K ? scratch.score[warp][id] : 0.0f;
    // The bias only selects; the weights come from the unbiased scores, summed in k order.
    float sum = 0.0f;
#pragma unroll 1
    for (int k = 0; k < K; ++k) sum += __shfl_sync(0xFFFFFFFFu, s, k);
    if (lane < K) {
      a.out.expert_ids[warp * K + lane] = id;
      a.out.expert_weights[warp * K + lane] = s / sum * a.routed_scaling_factor;
      scratch.slot_expert[warp * K + lane] = id;
    }
  }
  __syncthreads();
  // Slot s goes to row (slots of lower experts) + (earlier slots of its expert): a stable counting sort.
  const int s = threadIdx.x;
  if (s < slots) {
    const int e = scratch.slot_expert[s];
    int below = 0, same = 0, before = 0;
#pragma unroll 4  // four shared-memory loads in flight (T = 8: 48 slots)
    for (int other = 0; other < slots; ++other) {
      const int v = scratch.slot_expert[other];
      below += v < e;
      same += v == e;
      before += v == e && other < s;
    }
    const int row = below + before;
    a.out.row_tokens[row] = s / K;
    a.out.slot_rows[s] = row;
    scratch.row_expert[row] = e;
    scratch.row_expert_end[row] = below + same;
    scratch.row_starts_item[row] = before % a.rows_per_item == 0;
  }
  __syncthreads();
  // Work items: the shared expert's first, then one per rows_per_item rows of each expert, in row order.
  const int shared_items = (T + a.rows_per_item - 1) / a.rows_per_item;
  const int r = threadIdx.x;
  const bool starts = r < slots && scratch.row_starts_item[r] != 0;
  const unsigned starting = __ballot_sync(0xFFFFFFFFu, starts);
  if (lane == 0) scratch.warp_items[warp] = __popc(starting);
  __syncthreads();
  int items_before = shared_items, items = shared_items;
#pragma unroll
  for (int w = 0; w < kDecodeRouterWarps; ++w) {
    items_before += w < warp ? scratch.warp_items[w] : 0;
    items += scratch.warp_items[w];
  }
  if (starts)
    a.out.work_items[items_before + __popc(starting & ((1u << lane) - 1u))] = MoeWorkItem{
        .expert = scratch.row_expert[r],
        .row_begin = r,
        .row_count = min(a.rows_per_item, scratch.row_expert_end[r] - r),
    };
#pragma unroll 1
  for (int j = threadIdx.x; j < shared_items; j += blockDim.x)
    a.out.work_items[j] = MoeWorkItem{
        .expert = E,
        .row_begin = slots + j * a.rows_per_item,
        .row_count = min(a.rows_per_item, T - j * a.rows_per_item),
    };
  if (threadIdx.x < T) a.out.row_tokens[slots + threadIdx.x] = threadIdx.x;
  // offsets[e] = the first row of an expert >= e (a lower bound in the sorted rows); the shared expert's rows last.
#pragma unroll 1
  for (int e = threadIdx.x; e <= E + 1; e += blockDim.x) {
    int lo = 0, hi = slots;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (scratch.row_expert[mid] < e) lo = mid + 1;
      else hi = mid;
    }
    a.out.expert_offsets[e] = e <= E ? lo : slots + T;
  }
  if (threadIdx.x == 0) {
    *a.out.work_item_count = items;
    *a.out.finished_ctas = 0;  // every other CTA has counted itself already
  }
  zero_item_counters(a.out);
}

// u rounded to bf16 (the expert GEMMs' input), a grid-strided slice per CTA: the decode router's CTAs share the
// conversion.
__device__ __forceinline__ void convert_u_slice(const RouterLogitsArgs& a) {
  const int quads = a.tokens * a.hidden / 4;
  for (int i = int(blockIdx.x * blockDim.x + threadIdx.x); i < quads; i += int(gridDim.x * blockDim.x)) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(a.u) + i);
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(a.u_bf16) + 2 * i;
    dst[0] = __floats2bfloat162_rn(v.x, v.y);
    dst[1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

template <bool kBf16, int kKeys>
__global__ void __launch_bounds__(kDecodeRouterThreads, 1) moe_router_decode_kernel(const DecodeRouterArgs args) {
  extern __shared__ __align__(128) uint8_t staged_rows[];  // [rows][d] as stored
  __shared__ uint64_t rows_landed;
  __shared__ DecodeRouteScratch scratch;
  const RouterLogitsArgs& a = args.logits;
  const RouteArgs& route = args.route;
  const size_t row_bytes = size_t(a.hidden) * (kBf16 ? 2 : 4);
  const int row_begin = int(blockIdx.x) * a.rows_per_cta, rows = min(a.rows_per_cta, a.experts - row_begin);
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(&rows_landed, 1);
    sm90::fence_mbarrier_init();
    const uint32_t bytes = uint32_t(size_t(rows) * row_bytes);
    sm90::mbarrier_arrive_expect_tx(&rows_landed, bytes);
    ptx::cp_async_bulk_global_to_shared(static_cast<uint32_t>(__cvta_generic_to_shared(staged_rows)),
                                        a.router + size_t(row_begin) * row_bytes, bytes,
                                        static_cast<uint32_t>(__cvta_generic_to_shared(&rows_landed)));
  }
  __syncthreads();  // the barrier's initialisation
  wait_for_prior_grids();  // u and the token ids come from earlier operations
  allow_dependents();
  // Every CTA fetches the hash ids (the routing CTA is known only at the end); loaded now, stored after the router
  // rows, so their two dependent round trips overlap the products.
  const bool hash_slot = route.tid2eid != nullptr && int(threadIdx.x) < a.tokens * route.top_k;
  int32_t hash_id = 0;
  bool outside = false;
  if (hash_slot) {
    const int t = threadIdx.x / route.top_k, j = threadIdx.x % route.top_k;
    const int32_t token = __ldg(route.token_ids + t);
    outside = token < 0 || token >= route.vocab;
    hash_id = __ldg(route.tid2eid + size_t(outside ? 0 : token) * route.top_k + j);
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll 1
  for (int pair = warp; pair < rows * a.tokens; pair += kDecodeRouterWarps) {
    const int local_row = pair % rows, t = pair / rows;
    const uint8_t* row = staged_rows + size_t(local_row) * row_bytes;
    const float4* u = reinterpret_cast<const float4*>(a.u + size_t(t) * a.hidden);
    float sum = 0.0f;
#pragma unroll 1
    for (int k0 = lane * kRouterVector; k0 < a.hidden; k0 += kWarpSize * kRouterVector * kDecodeUBatch) {
      float4 x[kDecodeUBatch][2];
#pragma unroll
      for (int b = 0; b < kDecodeUBatch; ++b) {
        const int k = k0 + b * kWarpSize * kRouterVector;
        if (k < a.hidden) x[b][0] = __ldg(u + k / 4), x[b][1] = __ldg(u + k / 4 + 1);
      }
      sm90::mbarrier_wait(&rows_landed, 0);  // after the u loads: their round trip overlaps the rows' landing
#pragma unroll
      for (int b = 0; b < kDecodeUBatch; ++b) {
        const int k = k0 + b * kWarpSize * kRouterVector;
        if (k >= a.hidden) break;
        uint4 raw[kRouterVectorWords<kBf16>];
#pragma unroll
        for (int i = 0; i < kRouterVectorWords<kBf16>; ++i)
          raw[i] = reinterpret_cast<const uint4*>(row + size_t(k) * (kBf16 ? 2 : 4))[i];
        float w[kRouterVector];
        widen_router_vector<kBf16>(raw, w);
        sum = fma_router_vector(w, x[b][0], x[b][1], sum);
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    // The scratch holds s = sqrt(softplus(logit)) here: each CTA scores its own rows, not the routing CTA all.
    if (lane == 0) a.logits[size_t(t) * a.experts + row_begin + local_row] = sqrt_softplus(sum);
  }
  convert_u_slice(a);  // after the products: off their path
  if (hash_slot) {
    scratch.hash_ids[threadIdx.x] = hash_id;
    if (threadIdx.x % route.top_k == 0) scratch.token_outside_vocab[threadIdx.x / route.top_k] = outside;
  }
  // The last CTA to count itself routes. Thread 0's acq_rel add publishes the CTA's logits (ordered before it by the
  // barrier) and, in the last CTA, makes every other CTA's visible to the reads after the second barrier (ld.cg).
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) is_last = fetch_add_acq_rel(route.out.finished_ctas, 1u) == gridDim.x - 1;
  __syncthreads();
  if (is_last) route_decode_tokens<kKeys>(route, scratch);
}

// Host side (moe_routing.cu): the routing and router GEMV arguments of a call, as run_moe_routing builds them.
RouteArgs route_args(const MoeRoutingParams& params);
RouterLogitsArgs router_logits_args(const MoeRoutingParams& params, int rows_per_cta);

}  // namespace dsv4::cuda::moe
