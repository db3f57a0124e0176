#include "backends/cuda/kernels/moe_single_launch.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/moe_single_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

int moe_single_launch_counter_words(int max_work_items) { return 2 + max_work_items; }

void check_moe_single_launch_params(const MoeSingleLaunchParams& p) {
  check_moe_routing_params(p.routing);
  check_moe_expert_gemm_params(p.experts);
  const int T = p.routing.tokens;
  check(T <= kMoeSingleLaunchMaxTokens, "moe single launch: ", T, " tokens; at most ", kMoeSingleLaunchMaxTokens);
  check(p.experts.streamed, "moe single launch: the experts must be streamed (moe_streamed_tiles_apply)");
  check(p.experts.tokens == T && p.experts.combine.out != nullptr && p.experts.combine.tokens == T,
        "moe single launch: the expert GEMMs need the call's token count and the fused combine");
  check(p.experts.experts_count == p.routing.router.rows && p.experts.hidden == p.routing.router.cols,
        "moe single launch: the router is [", p.routing.router.rows, ", ", p.routing.router.cols, "] but the experts ",
        "are ", p.experts.experts_count, " of hidden size ", p.experts.hidden);
  check(p.experts.u_bf16 == p.routing.out.u_bf16 && p.experts.row_tokens == p.routing.out.row_tokens &&
            p.experts.work_items == p.routing.out.work_items &&
            p.experts.work_item_count == p.routing.out.work_item_count,
        "moe single launch: the expert GEMMs must read the routing's u_bf16, row tokens and work items");
  check(p.counters != nullptr && p.counter_words >= moe_single_launch_counter_words(p.experts.max_work_items),
        "moe single launch: ", p.counter_words, " counter words; ", p.experts.max_work_items, " work items need ",
        moe_single_launch_counter_words(p.experts.max_work_items));
}

void run_moe_single_launch(const MoeSingleLaunchParams& p) {
  check_moe_single_launch_params(p);
  const MoeExpertGemmParams& e = p.experts;
  moe::SingleLaunchArgs args{
      .logits = moe::router_logits_args(p.routing, 0),
      .route = moe::route_args(p.routing),
      .gate_up = moe::expert_gemm_args(e, moe::ExpertGemm::GATE_UP),
      .down = moe::expert_gemm_args(e, moe::ExpertGemm::DOWN),
      .routed_flag = p.counters,
      .finished_ctas = p.counters + 1,
      .item_done = p.counters + 2,
      .gate_up_bands = (e.intermediate + moe::kCtaRows<moe::ExpertGemm::GATE_UP> - 1) /
                       moe::kCtaRows<moe::ExpertGemm::GATE_UP>,
      .down_bands = (e.hidden + moe::kCtaRows<moe::ExpertGemm::DOWN> - 1) / moe::kCtaRows<moe::ExpertGemm::DOWN>,
  };
  // One x region for both GEMMs and the routing scratch (the exchange follows it at the same offset in both).
  const int x_bytes = std::max({moe::streamed_x_region_bytes(e.tokens, e.hidden),
                                moe::streamed_x_region_bytes(e.tokens, e.intermediate),
                                int(moe::kSingleLaunchRouteBytes + 15) / 16 * 16});
  args.gate_up.streamed_x_bytes = args.down.streamed_x_bytes = x_bytes;
  const size_t smem = moe::kStreamedRingBytes + size_t(x_bytes) + moe::kStreamedExchangeBytes;
  auto* kernel = p.routing.router.format == WeightFormat::BF16 ? moe::moe_single_launch_kernel<true>
                                                                : moe::moe_single_launch_kernel<false>;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // Co-resident CTAs only (see moe_single_launch.cuh NOTES), no more than the largest phase has tasks or rows.
  int per_sm = 0;
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, moe::kExpertThreads, smem));
  check(per_sm >= 1, "moe single launch: a CTA of ", smem, " bytes of shared memory does not fit an SM");
  const int tasks = e.max_work_items * std::max(args.gate_up_bands, args.down_bands);
  const int router_ctas = (args.logits.experts + moe::kExpertWarps - 1) / moe::kExpertWarps;
  const int ctas = std::min(per_sm * current_multiprocessors(), std::max(tasks, router_ctas));
  launch_chained(kernel, dim3(unsigned(ctas)), dim3(moe::kExpertThreads), smem, p.stream, args,
                 "moe_single_launch_kernel");
}

}  // namespace dsv4::cuda
