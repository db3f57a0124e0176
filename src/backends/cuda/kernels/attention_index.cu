#include "backends/cuda/kernels/attention_index.hpp"

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void window_index_kernel(WindowIndexParams p) {
  const int64_t t = blockIdx.y;
  const int64_t position = p.positions[t];
  for (int s = blockIdx.x * kThreads + threadIdx.x; s < p.window; s += gridDim.x * kThreads) {
    const int64_t source = position - (p.window - 1) + s;
    p.index[t * p.window + s] = source >= 0 ? int32_t(source % p.ring_rows) : -1;
  }
}

__global__ void visible_entries_kernel(VisibleEntriesIndexParams p) {
  const int64_t t = blockIdx.y;
  const int64_t visible = min(p.entries, (p.positions[t] + 1) / p.ratio);
  if (p.counts != nullptr && blockIdx.x == 0 && threadIdx.x == 0) p.counts[t] = int32_t(visible);
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < p.entries; e += int64_t(gridDim.x) * kThreads)
    p.index[t * p.entries + e] = e < visible ? int32_t(e) : -1;
}

unsigned blocks_for(int64_t n) { return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 1024)); }

}  // namespace

void run_window_index(const WindowIndexParams& p) {
  check(p.tokens >= 0 && p.window > 0 && p.ring_rows >= p.window, "window_index: tokens ", p.tokens, ", window ",
        p.window, ", ring rows ", p.ring_rows, " (the ring must hold a window)");
  check(p.tokens == 0 || (p.positions && p.index), "window_index: positions and index are required");
  check(p.tokens <= 65535, "window_index: ", p.tokens, " tokens exceed one launch's 65535");
  if (p.tokens == 0) return;
  window_index_kernel<<<dim3(blocks_for(p.window), unsigned(p.tokens)), kThreads, 0, p.stream>>>(p);
  DSV4_CUDA_CHECK_LAUNCH("window_index");
}

void run_visible_entries_index(const VisibleEntriesIndexParams& p) {
  check(p.tokens >= 0 && p.entries >= 0 && p.ratio > 0, "visible_entries_index: tokens ", p.tokens, ", entries ",
        p.entries, ", ratio ", p.ratio);
  check(p.tokens <= 65535, "visible_entries_index: ", p.tokens, " tokens exceed one launch's 65535");
  if (p.tokens == 0 || p.entries == 0) return;
  check(p.positions && p.index, "visible_entries_index: positions and index are required");
  visible_entries_kernel<<<dim3(blocks_for(p.entries), unsigned(p.tokens)), kThreads, 0, p.stream>>>(p);
  DSV4_CUDA_CHECK_LAUNCH("visible_entries_index");
}

}  // namespace dsv4::cuda
