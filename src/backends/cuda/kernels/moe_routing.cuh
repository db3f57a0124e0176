// Device code behind run_moe_routing (moe_routing.hpp holds the contract).
//
// NOTES:
// - Router GEMV: a CTA stages up to 4 tokens of u (fp32) in shared memory, then its warps take router rows, lanes
//   striding K in 8-value vectors (16-byte bf16 loads, two for fp32) with 8 loads in flight each. Small T: many
//   CTAs of 8 rows, so the E·d·2 router bytes stream over many SMs; large T: a CTA covers all rows of its tokens
//   (u staged once per token chunk).
// - Router rows are asked of L2 before the PDL wait (they are weights), so their HBM read overlaps the previous
//   kernel.
// - Scoring/top-k: W warps per token (W = 8 at few tokens per CTA, 1 at 8): warp w of the token's group holds
//   experts (i·W + w)·32 + lane (E ≤ 512 → at most 16 per lane, constant-indexed registers) and finds their top_k;
//   each of the top_k rounds is a warp argmax on (value, lower index); a NaN score counts as −inf so a valid expert
//   is always chosen. With W > 1 the group's first warp then picks the top_k of the W·top_k candidates the same
//   way. Round k's winner is parked in lane k, so Σ s[id] is summed in k order like the CPU reference.
// - Both kernels are chained with programmatic dependent launch (ptx/dependent_launch.cuh): each waits for its
//   predecessor's writes first, then lets the next kernel's CTAs be scheduled.
// - Bucketing runs in the last CTA to finish (a ticket counter in the workspace, reset by that CTA): shared-memory
//   counts, one warp's scan, then a stable scatter by one warp over the ids staged in shared memory
//   (__match_any_sync gives each slot its rank among the lanes of its chunk that chose the same expert), so the row
//   order is a function of the routing alone. With few tokens (fused_routing) the router kernel's last CTA does the
//   routing and the bucketing itself.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/moe_prefetch.cuh"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"

namespace dsv4::cuda::moe {

inline constexpr int kWarpSize = 32;
inline constexpr int kRouterWarpsPerCta = 8;
inline constexpr int kRouterMaxTokensPerCta = 4;
inline constexpr int kRouterVector = 8;  // router values per lane per load
inline constexpr int kRouterBatch = 8;   // loads per lane in flight before the first use
inline constexpr int kSelectWarpsPerCta = 8;
static_assert(kSelectWarpsPerCta == kRouterWarpsPerCta, "route_tokens_in_cta serves both kernels' CTAs");
inline constexpr int kMaxExpertsPerLane = 16;  // kMoeMaxExperts / 32

struct RouterLogitsArgs {
  const uint8_t* router;  // [E, d] BF16 or F32
  const float* u;         // [T, d]
  float* logits;          // [T, E]
  __nv_bfloat16* u_bf16;  // [T, d]
  int tokens, experts, hidden;
  int rows_per_cta;       // a multiple of kRouterWarpsPerCta
};

template <bool kBf16>
__device__ __forceinline__ void load_router_vector(const uint8_t* row, int k, float (&w)[kRouterVector]) {
  if constexpr (kBf16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + size_t(k) * 2));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(words[i] << 16);
      w[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
    }
  } else {
    const float4 a = __ldg(reinterpret_cast<const float4*>(row + size_t(k) * 4));
    const float4 b = __ldg(reinterpret_cast<const float4*>(row + size_t(k) * 4) + 1);
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  }
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
  int tokens_per_cta;  // moe_route_and_bucket_kernel: tokens routed by one CTA (1, 2, 4 or 8)
};

__device__ __forceinline__ float sqrt_softplus(float v) {
  // log1p(exp(v)) without overflow for large v, as the CPU reference.
  return sqrtf(v > 20.0f ? v : log1pf(expf(v)));
}

// Whether (v, e) ranks above (best, best_e): higher value, ties to the lower expert index.
__device__ __forceinline__ bool ranks_above(float v, int e, float best, int best_e) {
  return v > best || (v == best && e < best_e);
}

// top_k rounds of a warp argmax over each lane's first n candidates (v: the ranking value, s: the score the weight
// comes from, id: the expert, unique; v never NaN): lane k < top_k gets the k-th choice. Higher v first, ties to
// the lower id. Padding candidates (id INT_MAX, v -inf) are never chosen.
template <int N>
__device__ __forceinline__ void warp_top_k(const float (&v)[N], const float (&s)[N], const int (&id)[N], int n,
                                           int top_k, int lane, int& my_id, float& my_s, float& my_v) {
  uint32_t taken = 0;  // bit i: candidate i chosen
  for (int k = 0; k < top_k; ++k) {
    float best = -INFINITY, best_s = 0.0f;
    int best_e = 0x7FFFFFFF;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i >= n) break;
      if (!(taken >> i & 1u) && ranks_above(v[i], id[i], best, best_e)) best = v[i], best_e = id[i], best_s = s[i];
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xFFFFFFFFu, best, offset);
      const int other_e = __shfl_xor_sync(0xFFFFFFFFu, best_e, offset);
      const float other_s = __shfl_xor_sync(0xFFFFFFFFu, best_s, offset);
      if (ranks_above(other, other_e, best, best_e)) best = other, best_e = other_e, best_s = other_s;
    }
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n && id[i] == best_e) taken |= 1u << i;
    if (lane == k) my_id = best_e, my_s = best_s, my_v = best;
  }
}

// The scores of the calling warp's slice of token t's experts: e = (i·W + w)·32 + lane for i < n, the warp being
// the w-th of W that share the token (W = 1: every expert).
__device__ __forceinline__ void slice_scores(const RouteArgs& a, int t, int w, int W, int n, int lane,
                                             float (&s)[kMaxExpertsPerLane], float (&biased)[kMaxExpertsPerLane],
                                             int (&id)[kMaxExpertsPerLane]) {
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int e = (i * W + w) * kWarpSize + lane;
    s[i] = 0.0f, biased[i] = -INFINITY, id[i] = 0x7FFFFFFF;
    if (i < n && e < a.experts) {
      s[i] = sqrt_softplus(__ldcg(a.logits + size_t(t) * a.experts + e));  // written by other CTAs
      const float b = s[i] + (a.bias != nullptr ? __ldg(a.bias + e) : 0.0f);
      biased[i] = isnan(b) ? -INFINITY : b;
      id[i] = e;
    }
  }
}

// Writes token t's choices (lane k < top_k holds the k-th): the bias only selects; the weights come from the
// unbiased scores, summed in k order.
__device__ __forceinline__ void write_route(const RouteArgs& a, int t, int lane, int my_id, float my_s) {
  float sum = 0.0f;
  for (int k = 0; k < a.top_k; ++k) sum += __shfl_sync(0xFFFFFFFFu, my_s, k);
  if (lane < a.top_k) {
    a.out.expert_ids[size_t(t) * a.top_k + lane] = my_id;
    a.out.expert_weights[size_t(t) * a.top_k + lane] = my_s / sum * a.routed_scaling_factor;
  }
}

// Routes token `t` with the calling warp: writes expert_ids / expert_weights [t, :].
__device__ void route_token(const RouteArgs& a, int t, int lane) {
  float s[kMaxExpertsPerLane], biased[kMaxExpertsPerLane];
  int id[kMaxExpertsPerLane];
  slice_scores(a, t, 0, 1, kMaxExpertsPerLane, lane, s, biased, id);
  // Lane k < top_k ends up holding the k-th choice.
  int my_id = 0;
  float my_s = 0.0f, my_v = 0.0f;
  if (a.tid2eid != nullptr) {
    int32_t token = __ldg(a.token_ids + t);
    if (token < 0 || token >= a.vocab) {
      if (lane == 0) atomicCAS(a.out.status, 0, t + 1);
      token = 0;
    }
    for (int k = 0; k < a.top_k; ++k) {
      const int chosen_id = __ldg(a.tid2eid + size_t(token) * a.top_k + k);
      float owned = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxExpertsPerLane; ++i)
        if (i == chosen_id / kWarpSize) owned = s[i];
      const float chosen = __shfl_sync(0xFFFFFFFFu, owned, chosen_id % kWarpSize);
      if (lane == k) my_id = chosen_id, my_s = chosen;
    }
  } else {
    warp_top_k(biased, s, id, kMaxExpertsPerLane, a.top_k, lane, my_id, my_s, my_v);
  }
  write_route(a, t, lane, my_id, my_s);
}

// Routes tokens [first, first + count) with the whole CTA of kRouterWarpsPerCta warps: on scored layers
// W = 8 / count (rounded down to a power of two) warps share a token, each finds the top_k of its slice of the
// experts, and the first of them picks the token's top_k among those W·top_k candidates (the same choice: the
// order is total), so at W = 8 a lane scans one or two experts instead of eight to twelve. Hash layers select
// nothing: one warp per token. Called by the whole CTA (it synchronises).
__device__ void route_tokens_in_cta(const RouteArgs& a, int first_token, int count) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (a.tid2eid != nullptr) {
    for (int t = first_token + warp; t < first_token + count; t += kRouterWarpsPerCta) route_token(a, t, lane);
    return;
  }
  constexpr int kMaxMergeCandidates = kRouterWarpsPerCta;  // per lane: W·top_k <= 8·32
  __shared__ float candidate_v[kRouterWarpsPerCta][kWarpSize], candidate_s[kRouterWarpsPerCta][kWarpSize];
  __shared__ int candidate_id[kRouterWarpsPerCta][kWarpSize];
  const int W = count == 1 ? 8 : count == 2 ? 4 : count <= 4 ? 2 : 1;
  const int groups = kRouterWarpsPerCta / W, group = warp / W, w = warp % W;
  const int n = (a.experts + W * kWarpSize - 1) / (W * kWarpSize);
  for (int first = 0; first < count; first += groups) {  // the same trip count in every warp (barriers inside)
    const int t = first_token + first + group;
    const bool routes = first + group < count;
    int my_id = 0;
    float my_s = 0.0f, my_v = 0.0f;
    if (routes) {
      float s[kMaxExpertsPerLane], biased[kMaxExpertsPerLane];
      int id[kMaxExpertsPerLane];
      slice_scores(a, t, w, W, n, lane, s, biased, id);
      warp_top_k(biased, s, id, n, a.top_k, lane, my_id, my_s, my_v);
    }
    if (W > 1) {
      if (routes && lane < a.top_k)
        candidate_v[warp][lane] = my_v, candidate_s[warp][lane] = my_s, candidate_id[warp][lane] = my_id;
      __syncthreads();
      if (routes && w == 0) {
        float v[kMaxMergeCandidates], s[kMaxMergeCandidates];
        int id[kMaxMergeCandidates];
        const int count = W * a.top_k, m = (count + kWarpSize - 1) / kWarpSize;
#pragma unroll
        for (int i = 0; i < kMaxMergeCandidates; ++i) {
          const int j = i * kWarpSize + lane;  // candidate j: choice j % top_k of the group's warp j / top_k
          v[i] = -INFINITY, s[i] = 0.0f, id[i] = 0x7FFFFFFF;
          if (i < m && j < count) {
            const int from = warp + j / a.top_k, k = j % a.top_k;
            v[i] = candidate_v[from][k], s[i] = candidate_s[from][k], id[i] = candidate_id[from][k];
          }
        }
        warp_top_k(v, s, id, m, a.top_k, lane, my_id, my_s, my_v);
      }
      __syncthreads();  // the candidates are read before the next tokens write theirs
    }
    if (routes && w == 0) write_route(a, t, lane, my_id, my_s);
  }
}

// Exclusive scans of counts[0..n) and of ceil(counts / R) by one warp: offsets[0..n] and item_offsets[0..n], the
// latter starting at first_item.
__device__ void warp_scan_counts(const int* counts, int n, int rows_per_item, int first_item, int* offsets,
                                 int* item_offsets, int lane) {
  const int per_lane = (n + kWarpSize - 1) / kWarpSize;
  const int begin = min(n, lane * per_lane), end = min(n, begin + per_lane);
  int rows = 0, items = 0;
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
  for (int e = begin; e < end; ++e) {
    offsets[e] = rows_before;
    item_offsets[e] = items_before;
    rows_before += counts[e];
    items_before += (counts[e] + rows_per_item - 1) / rows_per_item;
  }
  if (lane == kWarpSize - 1) offsets[n] = rows_before, item_offsets[n] = items_before;
}

// The last CTA's work: bucket the T·top_k slots by expert; the shared expert's T rows follow the routed rows, and
// its work items come first (it is the largest expert, so its CTAs should start earliest).
__device__ void bucket_slots(const RouteArgs& a) {
  __shared__ int counts[kMoeMaxExperts];
  __shared__ int offsets[kMoeMaxExperts + 1];
  __shared__ int item_offsets[kMoeMaxExperts + 1];
  const int lane = threadIdx.x % kWarpSize, warp_idx = threadIdx.x / kWarpSize;
  const int slots = a.tokens * a.top_k, experts = a.experts;
  const int shared_items = (a.tokens + a.rows_per_item - 1) / a.rows_per_item;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < slots; s += blockDim.x) atomicAdd(&counts[__ldcg(a.out.expert_ids + s)], 1);
  __syncthreads();
  if (warp_idx == 0) warp_scan_counts(counts, experts, a.rows_per_item, shared_items, offsets, item_offsets, lane);
  __syncthreads();
  if (warp_idx == 0) {
    // Stable scatter: chunk by chunk in slot order; counts[] becomes each expert's cursor. The ids come through
    // shared memory a segment at a time, each lane's 32 loads in flight together, so the serial chunk loop waits on
    // no global load (one per chunk made it ~1 µs per 32 slots).
    constexpr int kLoadsPerLane = 32, kSegment = kLoadsPerLane * kWarpSize;
    __shared__ int segment_ids[kSegment];
    for (int e = lane; e < experts; e += kWarpSize) counts[e] = offsets[e];
    for (int segment = 0; segment < slots; segment += kSegment) {
      const int count = min(kSegment, slots - segment);
      int ids[kLoadsPerLane];
#pragma unroll
      for (int i = 0; i < kLoadsPerLane; ++i) {
        const int j = i * kWarpSize + lane;
        ids[i] = j < count ? __ldcg(a.out.expert_ids + segment + j) : 0;
      }
#pragma unroll
      for (int i = 0; i < kLoadsPerLane; ++i) segment_ids[i * kWarpSize + lane] = ids[i];
      __syncwarp();
      for (int chunk = 0; chunk < count; chunk += kWarpSize) {
        const int j = chunk + lane, s = segment + j;
        const int e = j < count ? segment_ids[j] : -1 - lane;
        const unsigned same = __match_any_sync(0xFFFFFFFFu, e);
        if (j < count) {
          const int row = counts[e] + __popc(same & ((1u << lane) - 1u));
          a.out.row_tokens[row] = s / a.top_k;
          a.out.slot_rows[s] = row;
        }
        __syncwarp();
        if (j < count && lane == __ffs(same) - 1) counts[e] += __popc(same);
        __syncwarp();
      }
    }
  } else {
    const int helper = threadIdx.x - kWarpSize, helpers = blockDim.x - kWarpSize;
    for (int e = helper; e <= experts; e += helpers) a.out.expert_offsets[e] = offsets[e];
    if (helper == 0) {
      a.out.expert_offsets[experts + 1] = slots + a.tokens;
      *a.out.work_item_count = item_offsets[experts];
    }
    for (int t = helper; t < a.tokens; t += helpers) a.out.row_tokens[slots + t] = t;
    for (int j = helper; j < shared_items; j += helpers)
      a.out.work_items[j] = MoeWorkItem{
          .expert = experts,
          .row_begin = slots + j * a.rows_per_item,
          .row_count = min(a.rows_per_item, a.tokens - j * a.rows_per_item),
      };
    for (int e = helper; e < experts; e += helpers) {
      const int rows = offsets[e + 1] - offsets[e];
      for (int j = 0; j * a.rows_per_item < rows; ++j)
        a.out.work_items[item_offsets[e] + j] = MoeWorkItem{
            .expert = e,
            .row_begin = offsets[e] + j * a.rows_per_item,
            .row_count = min(a.rows_per_item, rows - j * a.rows_per_item),
        };
    }
  }
  if (threadIdx.x == 0) *a.out.finished_ctas = 0;  // every other CTA has counted itself already
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

// Grid: one CTA per tokens_per_cta tokens (route_tokens_in_cta), the last CTA to finish buckets.
__global__ void __launch_bounds__(kSelectWarpsPerCta * kWarpSize) moe_route_and_bucket_kernel(const RouteArgs a) {
  wait_for_prior_grids();  // the logits
  allow_dependents();
  const int first = blockIdx.x * a.tokens_per_cta;
  route_tokens_in_cta(a, first, min(a.tokens_per_cta, a.tokens - first));
  if (arrived_last(a.out.finished_ctas)) bucket_slots(a);
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
__global__ void __launch_bounds__(kRouterWarpsPerCta * kWarpSize, 1) moe_router_logits_kernel(const RouterArgs args) {
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
        for (int t = 0; t < kTokens; ++t) {
          const float4 x0 = u_tile[t * quads_per_token + k / 4], x1 = u_tile[t * quads_per_token + k / 4 + 1];
          acc[t] = fmaf(w[b][0], x0.x, acc[t]);
          acc[t] = fmaf(w[b][1], x0.y, acc[t]);
          acc[t] = fmaf(w[b][2], x0.z, acc[t]);
          acc[t] = fmaf(w[b][3], x0.w, acc[t]);
          acc[t] = fmaf(w[b][4], x1.x, acc[t]);
          acc[t] = fmaf(w[b][5], x1.y, acc[t]);
          acc[t] = fmaf(w[b][6], x1.z, acc[t]);
          acc[t] = fmaf(w[b][7], x1.w, acc[t]);
        }
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
    if (!arrived_last(args.route.out.finished_ctas)) return;
    route_tokens_in_cta(args.route, 0, args.route.tokens);
    __syncthreads();  // the expert ids of every token, for the bucketing
    bucket_slots(args.route);
  }
}

}  // namespace dsv4::cuda::moe
