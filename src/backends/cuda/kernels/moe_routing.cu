#include "backends/cuda/kernels/moe_routing.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/moe_routing.cuh"
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
  check(r.cols > 0 && r.cols % moe::kRouterVector == 0, "moe routing: hidden size ", r.cols,
        " must be a positive multiple of ", moe::kRouterVector);
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
  check(reinterpret_cast<uintptr_t>(o.u_bf16) % 16 == 0, "moe routing: u_bf16 must be 16-byte aligned");
}

void run_moe_routing(const MoeRoutingParams& p) {
  check_moe_routing_params(p);
  const int experts = int(p.router.rows), hidden = int(p.router.cols);
  const moe::RouterLogitsArgs logits_args{
      .router = p.router.data,
      .u = p.u,
      .logits = p.out.logits,
      .u_bf16 = p.out.u_bf16,
      .tokens = p.tokens,
      .experts = experts,
      .hidden = hidden,
  };
  const dim3 logits_grid(unsigned((experts + moe::kRouterWarpsPerCta - 1) / moe::kRouterWarpsPerCta),
                         unsigned((p.tokens + moe::kRouterTokensPerCta - 1) / moe::kRouterTokensPerCta));
  check(logits_grid.y <= 65535, "moe routing: ", p.tokens, " tokens exceed the router launch's grid limit");
  constexpr unsigned kRouterThreads = moe::kRouterWarpsPerCta * moe::kWarpSize;
  if (p.router.format == WeightFormat::BF16)
    moe::moe_router_logits_kernel<true><<<logits_grid, kRouterThreads, 0, p.stream>>>(logits_args);
  else
    moe::moe_router_logits_kernel<false><<<logits_grid, kRouterThreads, 0, p.stream>>>(logits_args);
  DSV4_CUDA_CHECK_LAUNCH("moe_router_logits_kernel");

  const moe::RouteArgs route_args{
      .logits = p.out.logits,
      .bias = p.bias,
      .tid2eid = p.tid2eid,
      .vocab = p.vocab,
      .token_ids = p.token_ids,
      .tokens = p.tokens,
      .experts = experts,
      .top_k = p.top_k,
      .rows_per_item = p.rows_per_item,
      .routed_scaling_factor = p.routed_scaling_factor,
      .out = p.out,
  };
  const unsigned route_ctas = unsigned((p.tokens + moe::kSelectWarpsPerCta - 1) / moe::kSelectWarpsPerCta);
  moe::moe_route_and_bucket_kernel<<<route_ctas, moe::kSelectWarpsPerCta * moe::kWarpSize, 0, p.stream>>>(
      route_args);
  DSV4_CUDA_CHECK_LAUNCH("moe_route_and_bucket_kernel");
}

}  // namespace dsv4::cuda
