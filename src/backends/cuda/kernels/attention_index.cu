#include "backends/cuda/kernels/attention_index.hpp"

#include <algorithm>

#include "backends/cuda/kernels/attention_index.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

// blockIdx.y: the token; blockIdx.z: the list.
__global__ void attention_index_kernel(const __grid_constant__ AttentionIndexParams p) {
  allow_dependents();
  wait_for_prior_grids();  // the positions are the step's inputs; the lists may still be read by the previous step
  attention_lists::build_list_slice(p, int(blockIdx.x), int(gridDim.x), blockIdx.y, int(blockIdx.z));
}

}  // namespace

void check_attention_index_params(const AttentionIndexParams& p) {
  check(p.tokens >= 0 && p.tokens <= 65535, "attention_index: ", p.tokens, " tokens outside one launch's [0, 65535]");
  check(p.window >= 0 && (p.window == 0 || p.ring_rows >= p.window), "attention_index: window ", p.window,
        ", ring rows ", p.ring_rows, " (the ring must hold a window)");
  check(p.visible_lists >= 0 && p.visible_lists <= kMaxVisibleEntryLists, "attention_index: ", p.visible_lists,
        " visible-entry lists outside [0, ", kMaxVisibleEntryLists, "]");
  if (p.tokens == 0) return;
  check(p.positions != nullptr, "attention_index: positions are required");
  check(p.window == 0 || p.window_index != nullptr, "attention_index: window_index is required");
  for (int i = 0; i < p.visible_lists; ++i) {
    const VisibleEntriesList& v = p.visible[i];
    check(v.entries > 0 && v.ratio > 0, "attention_index: visible list ", i, " has entries ", v.entries, ", ratio ",
          v.ratio, " (both must be positive)");
    check(v.index != nullptr, "attention_index: visible list ", i, " has no index");
  }
}

namespace attention_lists {

ListsGrid lists_grid(const AttentionIndexParams& p) {
  check_attention_index_params(p);
  int64_t longest = p.window;
  for (int i = 0; i < p.visible_lists; ++i) longest = std::max(longest, p.visible[i].entries);
  return {unsigned(std::clamp<int64_t>((longest + kThreads - 1) / kThreads, 1, 1024)),
          unsigned((p.window > 0 ? 1 : 0) + p.visible_lists)};
}

}  // namespace attention_lists

void run_attention_index(const AttentionIndexParams& p) {
  const attention_lists::ListsGrid grid = attention_lists::lists_grid(p);
  if (p.tokens == 0 || grid.lists == 0) return;
  launch_chained(attention_index_kernel, dim3(grid.x_blocks, unsigned(p.tokens), grid.lists),
                 dim3(attention_lists::kThreads), 0, p.stream, p, "attention_index");
}

}  // namespace dsv4::cuda
