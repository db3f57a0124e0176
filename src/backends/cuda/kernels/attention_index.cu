#include "backends/cuda/kernels/attention_index.hpp"

#include <algorithm>

#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

// blockIdx.y: the token; blockIdx.z: the list (0 the window when there is one, then the visible-entry lists).
__global__ void attention_index_kernel(const __grid_constant__ AttentionIndexParams p) {
  allow_dependents();
  wait_for_prior_grids();  // the positions are the step's inputs; the lists may still be read by the previous step
  const int64_t t = blockIdx.y;
  const int64_t position = p.positions[t];
  const int list = int(blockIdx.z) - (p.window > 0 ? 1 : 0);
  if (list < 0) {
    for (int s = blockIdx.x * kThreads + threadIdx.x; s < p.window; s += gridDim.x * kThreads) {
      const int64_t source = position - (p.window - 1) + s;
      p.window_index[t * p.window + s] = source >= 0 ? int32_t(source % p.ring_rows) : -1;
    }
    return;
  }
  const VisibleEntriesList& v = p.visible[list];
  const int64_t visible = min(v.entries, (position + 1) / v.ratio);
  if (v.counts != nullptr && blockIdx.x == 0 && threadIdx.x == 0) v.counts[t] = int32_t(visible);
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < v.entries; e += int64_t(gridDim.x) * kThreads)
    v.index[t * v.entries + e] = e < visible ? int32_t(e) : -1;
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

void run_attention_index(const AttentionIndexParams& p) {
  check_attention_index_params(p);
  const int lists = (p.window > 0 ? 1 : 0) + p.visible_lists;
  if (p.tokens == 0 || lists == 0) return;
  int64_t longest = p.window;
  for (int i = 0; i < p.visible_lists; ++i) longest = std::max(longest, p.visible[i].entries);
  const unsigned blocks = unsigned(std::min<int64_t>((longest + kThreads - 1) / kThreads, 1024));
  launch_chained(attention_index_kernel, dim3(blocks, unsigned(p.tokens), unsigned(lists)), dim3(kThreads), 0,
                 p.stream, p, "attention_index");
}

}  // namespace dsv4::cuda
