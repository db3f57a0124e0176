#include "backends/cuda/kernels/top_k.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/top_k.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

struct DeviceLimits {
  int multiprocessors = 0;
  int split_ctas_per_sm = 0;  // resident split-mode CTAs per SM
};

DeviceLimits query_device_limits(int device) {
  DeviceLimits limits;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  // The largest shared-memory carveout: the occupancy below (the split grid's co-residency bound) then holds for
  // every launch, whatever carveout the driver would prefer.
  for (auto* kernel : {topk::top_k_kernel<true, topk::StoredScores>, topk::top_k_kernel<false, topk::StoredScores>}) {
    DSV4_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(topk::kSmemBytes)));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
  }
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &limits.split_ctas_per_sm, topk::top_k_kernel<true, topk::StoredScores>, topk::kThreads, topk::kSmemBytes));
  return limits;
}

// Queried once per device: the launch path stays free of attribute calls (they would dominate a 10 µs step).
DeviceLimits device_limits() {
  static PerDeviceCache<DeviceLimits> limits;
  return limits.get(&limits, [] { return query_device_limits(current_device()); });
}

}  // namespace

size_t top_k_workspace_bytes(int queries) {
  return size_t(std::clamp(queries, 0, kTopKMaxSplitQueries)) * sizeof(topk::QueryWorkspace);
}

int top_k_ctas_per_query(int queries, int64_t candidates, int max_ctas_per_query, int resident_ctas_per_sm) {
  if (queries <= 0 || queries > kTopKMaxSplitQueries || max_ctas_per_query == 1) return 1;
  const DeviceLimits limits = device_limits();
  // Every CTA of a split query must be resident at once (they wait for each other at the pass barriers).
  const int per_sm = resident_ctas_per_sm > 0 ? resident_ctas_per_sm : limits.split_ctas_per_sm;
  const int64_t resident = int64_t(per_sm) * limits.multiprocessors;
  const int64_t wanted = (candidates + topk::kMinCandidatesPerCta - 1) / topk::kMinCandidatesPerCta;
  const int64_t cap = max_ctas_per_query > 0 ? max_ctas_per_query : 65535;
  return int(std::clamp<int64_t>(std::min({wanted, resident / queries, cap}), 1, 65535));
}

void check_top_k_params(const TopKParams& p) {
  check(p.queries >= 0 && p.candidates >= 0 && p.k >= 0, "top_k: bad parameters queries=", p.queries,
        " candidates=", p.candidates, " k=", p.k);
  check(p.k <= kTopKMax, "top_k: k = ", p.k, " exceeds the supported maximum ", kTopKMax);
  check(p.candidates < (int64_t(1) << 31), "top_k: ", p.candidates, " candidates exceed int32 indices");
  check(p.row_stride >= p.candidates, "top_k: row_stride ", p.row_stride, " < candidates ", p.candidates);
  check(p.positions == nullptr || p.ratio > 0, "top_k: ratio ", p.ratio, " must be positive");
  if (p.queries == 0) return;
  check(p.counts != nullptr && (p.k == 0 || p.selected != nullptr), "top_k: selected and counts are required");
  check(p.candidates == 0 || p.scores != nullptr, "top_k: scores are required");
  check(p.queries <= 65535 * 32, "top_k: ", p.queries, " queries exceed the launch limit");
  check(p.max_ctas_per_query >= 0, "top_k: negative max_ctas_per_query ", p.max_ctas_per_query);
}

topk::TopKArgs topk::kernel_args(const TopKParams& p, int ctas) {
  if (ctas > 1) {
    const size_t needed = top_k_workspace_bytes(p.queries);
    check(p.workspace != nullptr && p.workspace_bytes >= needed, "top_k: ", p.queries,
          " queries need a workspace of ", needed, " bytes (top_k_workspace_bytes), got ", p.workspace_bytes);
  }
  return TopKArgs{.scores = p.scores,
                  .row_stride = p.row_stride,
                  .candidates = p.candidates,
                  .k = p.k,
                  .positions = p.positions,
                  .ratio = p.ratio,
                  .selected = p.selected,
                  .counts = p.counts,
                  .nan_flag = p.nan_flag,
                  .workspace = ctas > 1 ? static_cast<QueryWorkspace*>(p.workspace) : nullptr,
                  .ctas_per_query = ctas,
                  .trace = p.trace};
}

void run_top_k(const TopKParams& p) {
  check_top_k_params(p);
  if (p.queries == 0) return;
  const int ctas = top_k_ctas_per_query(p.queries, p.candidates, p.max_ctas_per_query);
  const topk::TopKArgs args = topk::kernel_args(p, ctas);
  device_limits();  // raises the kernels' shared-memory limits once per device
  if (ctas == 1) {
    launch_chained(topk::top_k_kernel<false, topk::StoredScores>, dim3(unsigned(p.queries)), dim3(topk::kThreads),
                   topk::kSmemBytes, p.stream, topk::TopKLaunch<topk::StoredScores>{args, {}},
                   "top_k_kernel (one CTA per query)");
    return;
  }
  // An ordinary (programmatic) launch: top_k_ctas_per_query keeps the grid within the resident capacity, which the
  // pass barriers need (see top_k.cuh).
  launch_chained(topk::top_k_kernel<true, topk::StoredScores>, dim3(unsigned(p.queries * ctas)),
                 dim3(topk::kThreads), topk::kSmemBytes, p.stream, topk::TopKLaunch<topk::StoredScores>{args, {}},
                 "top_k_kernel (split over CTAs)");
}

}  // namespace dsv4::cuda
