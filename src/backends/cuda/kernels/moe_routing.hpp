// MoE routing on the device (dsv4-model.md §4), two launches (one at few tokens, see fused_routing):
// 1. moe_router_logits: logits[T, E] = u · routerᵀ (fp32 u, BF16 or F32 router, fp32 accumulation); the CTAs of the
//    first row block also write u rounded to bf16 (the expert GEMMs' input).
// 2. moe_route_and_bucket: one warp per token: s = sqrt(softplus(logit)), ids = top_k of s + bias (ties to the lower
//    expert index) or tid2eid[token], weights = s[id] / Σ s[id] · routed_scaling_factor; then the last CTA to finish
//    buckets the T·top_k slots by expert: counts, offsets, the expert-sorted row list (a stable counting sort: rows
//    of one expert in slot order, so the result does not depend on scheduling), the row of every slot, and the work
//    items of the grouped expert GEMMs. The shared expert is expert E with rows T·top_k + t for every token t.
// With fused_routing and T <= kMoeFusedRoutingMaxTokens, the router launch's last CTA does step 2's work itself (one
// warp per token, then the bucketing): one launch and one inter-kernel wait fewer on the decode path; decode_router
// makes that launch the decode router (moe_routing.cuh), which computes the same bits with fewer round trips.
//
// Dispatch contract: asynchronous on `stream`, no allocation, no host synchronisation (graph-capturable); scratch
// and outputs live in the caller's buffers. A token id outside [0, vocab) on a hash layer is routed to expert ids
// of row 0 and recorded in *status (the first such token's position + 1; see moe.hpp check_moe_status).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

// The routing kernels keep a token's E scores in registers of one warp (16 per lane).
inline constexpr int kMoeMaxExperts = 512;
// The most tokens the fused routing serves (its last CTA routes them one warp each).
inline constexpr int kMoeFusedRoutingMaxTokens = 8;

// One piece of grouped-GEMM work: rows [row_begin, row_begin + row_count) of the expert-sorted list, all of
// `expert` (E = the shared expert).
struct MoeWorkItem {
  int32_t expert;
  int32_t row_begin;
  int32_t row_count;
};

// The most work items any routing of T tokens can produce when an item holds at most rows_per_item rows:
// Σ_e ceil(n_e / R) ≤ T·top_k / R + (experts touched) for the routed experts, plus ceil(T / R) for the shared one.
int64_t moe_max_work_items(int64_t tokens, int64_t experts, int64_t top_k, int64_t rows_per_item);

// Everything routing writes (device pointers into the caller's workspace).
struct MoeRoutingBuffers {
  float* logits = nullptr;               // [T, E] scratch (the decode router leaves sqrt(softplus(logit)) there)
  __nv_bfloat16* u_bf16 = nullptr;       // [T, d]: u rounded to bf16
  int32_t* expert_ids = nullptr;         // [T, top_k]
  float* expert_weights = nullptr;       // [T, top_k]
  int32_t* expert_offsets = nullptr;     // [E + 2]: rows of expert e are [offsets[e], offsets[e + 1])
  int32_t* row_tokens = nullptr;         // [T·top_k + T]: the token of each expert-sorted row
  int32_t* slot_rows = nullptr;          // [T·top_k]: the row of slot t·top_k + j
  MoeWorkItem* work_items = nullptr;     // [moe_max_work_items(...)]
  int32_t* work_item_count = nullptr;    // [1]
  uint32_t* finished_ctas = nullptr;     // [1]: zero before the first call; the last CTA resets it
  int32_t* status = nullptr;             // [1]: zero before the first call; see the contract above
  // [item_counter_count] or null: the expert GEMMs' per-item ready counts (moe_experts.hpp
  // MoeExpertGemmParams::item_counters), which the last CTA sets to zero for the call's expert launches.
  uint32_t* item_counters = nullptr;
  int item_counter_count = 0;
};

struct MoeRoutingParams {
  DeviceMatrixView router;             // [E, d], BF16 or F32
  const float* bias = nullptr;         // [E] selection bias or nullptr (scored layers may have none)
  const int32_t* tid2eid = nullptr;    // [vocab, top_k]: hash routing when non-null
  int64_t vocab = 0;
  const float* u = nullptr;            // [T, d] fp32, 16-byte aligned
  const int32_t* token_ids = nullptr;  // [T]; required for hash routing
  int tokens = 0;                      // T >= 1
  int top_k = 0;
  float routed_scaling_factor = 1.0f;
  int rows_per_item = 0;               // R, the grouped GEMMs' rows per work item
  MoeRoutingBuffers out;
  cudaStream_t stream = nullptr;
  cudaEvent_t after_logits = nullptr;  // optional (benchmarks): recorded between the two launches (or after the one)
  bool fused_routing = false;          // one launch at T <= kMoeFusedRoutingMaxTokens (see above)
  // With fused_routing at T <= kMoeFusedRoutingMaxTokens: the decode router instead of the fused router kernel (the
  // same bits, 2-2.6× faster at T = 1; each CTA stages its router rows in shared memory before waiting for u, and the
  // routing CTA keeps scores, choices and slots on chip; moe_routing.cuh). Needs a 16-byte aligned router.
  bool decode_router = true;
};

// Kernel launches run_moe_routing makes for these parameters.
int moe_routing_launches(const MoeRoutingParams& params);

// Throws naming the field at fault unless run_moe_routing supports the call.
void check_moe_routing_params(const MoeRoutingParams& params);

// The launches above.
void run_moe_routing(const MoeRoutingParams& params);

}  // namespace dsv4::cuda
