// The MoE sub-block at T <= 8 in one launch (moe.hpp's MoeRunParams::single_launch): router logits, scoring/top-k
// (or hash) + bucketing, grouped gate/up, grouped down and the combine in one persistent grid, with the same
// arithmetic in the same order as the three-launch path (run_moe_routing with fused_routing, the streamed expert
// kernels with the fused combine, the shared expert not split: MoeSharedExpertSplit::NEVER), so the same bits.
// - Every CTA computes router rows (one warp per row, u read from global memory) and converts a slice of u to
//   bf16; the last CTA to finish routes and buckets, then raises a flag in global memory.
// - The CTAs then take the gate/up tasks (work item × 64-row band) in turn, then the down tasks (work item ×
//   128-row band): a down task waits until every gate/up band of its item has counted itself done (per-item counters
//   in global memory), and the down bands' last CTAs do the combine. Weights never wait for the routing: before the
//   previous kernel has finished, the shared expert's gate/up CTAs start streaming their bands and every CTA asks L2
//   for its router rows and for its share of the shared expert's weights; a down task starts streaming its w2
//   band before it waits for h.
// - CTAs wait for other CTAs of the grid, so the grid holds at most as many CTAs as fit on the device at once
//   (occupancy × SMs); the kernel lets the next launch start only after every CTA is running.
//
// Dispatch contract: asynchronous on `stream`, no allocation, no host synchronisation (graph-capturable). Experts
// whose matrices moe_streamed_tiles_apply accepts (streamed tensor maps), T <= kMoeSingleLaunchMaxTokens.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"

namespace dsv4::cuda {

inline constexpr int kMoeSingleLaunchMaxTokens = kMoeFusedRoutingMaxTokens;

// Counter words the launch needs for a grid sized by max_work_items: the routing flag, the finished-CTA count and
// one done count per work item.
int moe_single_launch_counter_words(int max_work_items);

struct MoeSingleLaunchParams {
  MoeRoutingParams routing;     // everything but stream, after_logits and fused_routing, which are not read
  MoeExpertGemmParams experts;  // the streamed kernels' fields and the fused combine; its stream is not read
  uint32_t* counters = nullptr; // device [counter_words], zero before the first call; every call leaves them zero
  int counter_words = 0;
  cudaStream_t stream = nullptr;
};

// Throws naming the field at fault unless run_moe_single_launch supports the call.
void check_moe_single_launch_params(const MoeSingleLaunchParams& params);

void run_moe_single_launch(const MoeSingleLaunchParams& params);

}  // namespace dsv4::cuda
