#include "backends/cuda/kernels/moe_routing.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/moe_routing.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

int64_t moe_max_work_items(int64_t tokens, int64_t experts, int64_t top_k, int64_t rows_per_item) {
  check(tokens >= 0 && experts > 0 && top_k > 0 && rows_per_item > 0, "moe: bad work-item bound arguments tokens=",
        tokens, " experts=", experts, " top_k=", top_k, " rows_per_item=", rows_per_item);
  const int64_t slots = tokens * top_k;
  return (slots + rows_per_item - 1) / rows_per_item + std::min(experts, slots) +
         (tokens + rows_per_item - 1) / rows_per_item;
}

void check_moe_routing_params(const MoeRoutingParams& p) {
  const DeviceMatrixView& r = p.router;
  check(r.format == WeightFormat::BF16 || r.format == WeightFormat::F32, "moe routing: router is ",
        to_string(r.format), "; BF16 or F32 expected");
  check(r.rows >= 1 && r.rows <= kMoeMaxExperts, "moe routing: router has ", r.rows, " rows (experts); 1 to ",
        kMoeMaxExperts, " supported");
  check(r.cols > 0 && r.cols % moe::kRouterVector == 0 && r.cols <= 12288, "moe routing: hidden size ", r.cols,
        " must be a positive multiple of ", moe::kRouterVector, " up to 12288 (u of 4 tokens in shared memory)");
  check(r.data != nullptr, "moe routing: router has no device data");
  check(p.tokens >= 1, "moe routing: ", p.tokens, " tokens; at least 1 expected");
  check(p.top_k >= 1 && p.top_k <= std::min<int64_t>(r.rows, moe::kWarpSize), "moe routing: top_k = ", p.top_k,
        " must lie in [1, min(experts = ", r.rows, ", 32)]");
  check(p.rows_per_item >= 1, "moe routing: rows_per_item must be positive, got ", p.rows_per_item);
  check(p.u != nullptr && reinterpret_cast<uintptr_t>(p.u) % 16 == 0, "moe routing: u must be a 16-byte aligned ",
        "device pointer");
  check(p.tid2eid == nullptr || (p.token_ids != nullptr && p.vocab > 0),
        "moe routing: hash routing needs token ids and a positive vocab (got vocab ", p.vocab, ")");
  const MoeRoutingBuffers& o = p.out;
  check(o.logits && o.u_bf16 && o.expert_ids && o.expert_weights && o.expert_offsets && o.row_tokens && o.slot_rows &&
            o.work_items && o.work_item_count && o.finished_ctas && o.status,
        "moe routing: an output or scratch buffer pointer is null");
  check(o.item_counter_count >= 0, "moe routing: item_counter_count is negative (", o.item_counter_count, ")");
  check(o.item_counter_count == 0 || o.item_counters != nullptr, "moe routing: ", o.item_counter_count,
        " item counters to zero, but item_counters is null");
  check(reinterpret_cast<uintptr_t>(o.u_bf16) % 16 == 0, "moe routing: u_bf16 must be 16-byte aligned");
}

namespace {

bool fuses_routing(const MoeRoutingParams& p) { return p.fused_routing && p.tokens <= kMoeFusedRoutingMaxTokens; }

// The decode router: about one CTA per SM, each staging ceil(E / SMs) rows, fewer where that exceeds the shared
// memory left beside the kernel's static scratch (then more CTAs than SMs; the last-CTA ticket needs no co-residency).
void launch_decode_router(const MoeRoutingParams& p) {
  check(reinterpret_cast<uintptr_t>(p.router.data) % 16 == 0, "moe routing: the decode router needs a 16-byte ",
        "aligned router (bulk copies of its rows)");
  const int experts = int(p.router.rows);
  const size_t row_bytes = size_t(p.router.cols) * (p.router.format == WeightFormat::BF16 ? 2 : 4);
  constexpr int kFew = moe::kDecodeFewKeysPerLane, kMax = moe::kDecodeMaxKeysPerLane;
  const bool bf16 = p.router.format == WeightFormat::BF16, few_keys = experts <= kFew * moe::kWarpSize;
  auto* kernel = bf16 && few_keys ? moe::moe_router_decode_kernel<true, kFew>
                 : bf16           ? moe::moe_router_decode_kernel<true, kMax>
                 : few_keys       ? moe::moe_router_decode_kernel<false, kFew>
                                  : moe::moe_router_decode_kernel<false, kMax>;
  const size_t budget = size_t(max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel)));
  check(budget >= row_bytes, "moe routing: a router row of ", row_bytes, " bytes does not fit the decode router's ",
        budget, " bytes of shared memory");
  const int per_sm = (experts + current_multiprocessors() - 1) / current_multiprocessors();
  const int rows_per_cta = std::max(1, std::min(per_sm, int(budget / row_bytes)));
  const size_t smem = size_t(rows_per_cta) * row_bytes;
  const moe::DecodeRouterArgs args{
      .logits = moe::router_logits_args(p, rows_per_cta),
      .route = moe::route_args(p),
  };
  launch_chained(kernel, dim3(unsigned((experts + rows_per_cta - 1) / rows_per_cta)),
                 dim3(moe::kDecodeRouterThreads), smem, p.stream, args, "moe_router_decode_kernel");
}

}  // namespace

namespace moe {

RouteArgs route_args(const MoeRoutingParams& p) {
  return RouteArgs{
      .logits = p.out.logits,
      .bias = p.bias,
      .tid2eid = p.tid2eid,
      .vocab = p.vocab,
      .token_ids = p.token_ids,
      .tokens = p.tokens,
      .experts = int(p.router.rows),
      .top_k = p.top_k,
      .rows_per_item = p.rows_per_item,
      .routed_scaling_factor = p.routed_scaling_factor,
      .out = p.out,
  };
}

RouterLogitsArgs router_logits_args(const MoeRoutingParams& p, int rows_per_cta) {
  return RouterLogitsArgs{.router = p.router.data,
                          .u = p.u,
                          .logits = p.out.logits,
                          .u_bf16 = p.out.u_bf16,
                          .tokens = p.tokens,
                          .experts = int(p.router.rows),
                          .hidden = int(p.router.cols),
                          .rows_per_cta = rows_per_cta};
}

}  // namespace moe

int moe_routing_launches(const MoeRoutingParams& p) { return fuses_routing(p) ? 1 : 2; }

void run_moe_routing(const MoeRoutingParams& p) {
  check_moe_routing_params(p);
  const int experts = int(p.router.rows), hidden = int(p.router.cols);
  if (fuses_routing(p) && p.decode_router) {
    launch_decode_router(p);
    if (p.after_logits != nullptr) DSV4_CUDA_CHECK(cudaEventRecord(p.after_logits, p.stream));
    return;
  }
  // Tokens per CTA: the next power of two of T up to the maximum (u staged in shared memory per chunk).
  const int chunk_tokens = p.tokens >= 4 ? 4 : p.tokens >= 2 ? 2 : 1;
  const int chunks = (p.tokens + chunk_tokens - 1) / chunk_tokens;
  // Enough CTAs to spread the router over the SMs (4 per SM), never fewer than one warp's row per CTA.
  const int row_groups = (experts + moe::kRouterWarpsPerCta - 1) / moe::kRouterWarpsPerCta;
  const int row_blocks = std::clamp((4 * current_multiprocessors() + chunks - 1) / chunks, 1, row_groups);
  const int rows_per_cta = (row_groups + row_blocks - 1) / row_blocks * moe::kRouterWarpsPerCta;
  const moe::RouteArgs route = moe::route_args(p);
  const moe::RouterArgs router_args{
      .logits = moe::router_logits_args(p, rows_per_cta),
      .route = route,
  };
  const dim3 logits_grid(unsigned((experts + rows_per_cta - 1) / rows_per_cta), unsigned(chunks));
  check(chunks <= 65535, "moe routing: ", p.tokens, " tokens exceed the router launch's grid limit");
  const size_t smem = size_t(chunk_tokens) * size_t(hidden) * sizeof(float);
  constexpr unsigned kRouterThreads = moe::kRouterWarpsPerCta * moe::kWarpSize;
  const bool bf16 = p.router.format == WeightFormat::BF16, fused = fuses_routing(p);
  auto launch = [&](auto kernel) {
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch_chained(kernel, logits_grid, dim3(kRouterThreads), smem, p.stream, router_args,
                   fused ? "moe_router_logits_kernel<route>" : "moe_router_logits_kernel");
  };
  // The instantiations: router format × tokens per CTA × fused routing (only at few tokens: 1, 2 or 4 per CTA).
  switch (chunk_tokens * 4 + (bf16 ? 2 : 0) + (fused ? 1 : 0)) {
    case 4: launch(moe::moe_router_logits_kernel<false, 1, false>); break;
    case 5: launch(moe::moe_router_logits_kernel<false, 1, true>); break;
    case 6: launch(moe::moe_router_logits_kernel<true, 1, false>); break;
    case 7: launch(moe::moe_router_logits_kernel<true, 1, true>); break;
    case 8: launch(moe::moe_router_logits_kernel<false, 2, false>); break;
    case 9: launch(moe::moe_router_logits_kernel<false, 2, true>); break;
    case 10: launch(moe::moe_router_logits_kernel<true, 2, false>); break;
    case 11: launch(moe::moe_router_logits_kernel<true, 2, true>); break;
    case 16: launch(moe::moe_router_logits_kernel<false, 4, false>); break;
    case 17: launch(moe::moe_router_logits_kernel<false, 4, true>); break;
    case 18: launch(moe::moe_router_logits_kernel<true, 4, false>); break;
    default: launch(moe::moe_router_logits_kernel<true, 4, true>); break;
  }
  if (p.after_logits != nullptr) DSV4_CUDA_CHECK(cudaEventRecord(p.after_logits, p.stream));
  if (fused) return;

  const unsigned route_ctas = unsigned((p.tokens + moe::kSelectWarpsPerCta - 1) / moe::kSelectWarpsPerCta);
  launch_chained(moe::moe_route_and_bucket_kernel, dim3(route_ctas), dim3(moe::kSelectWarpsPerCta * moe::kWarpSize),
                 0, p.stream, route, "moe_route_and_bucket_kernel");
}

}  // namespace dsv4::cuda
