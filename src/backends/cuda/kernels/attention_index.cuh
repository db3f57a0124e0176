// Device code of the attention index lists (attention_index.hpp): a CTA fills a slice of one token's list, so the
// lists can also ride in another launch's extra CTAs (the step's embedding, embedding.hpp).
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/attention_index.hpp"

namespace dsv4::cuda::attention_lists {

inline constexpr int kThreads = 256;

// The CTAs that build a call's lists: x_blocks slices of each token's list, for `lists` lists (the window first when
// there is one); from a checked call (attention_index.cu).
struct ListsGrid {
  unsigned x_blocks;
  unsigned lists;
  int64_t ctas() const { return int64_t(x_blocks) * lists; }  // per token
};
ListsGrid lists_grid(const AttentionIndexParams& params);

// Slice x (of x_blocks) of token t's list `list`, by a CTA of kThreads threads.
__device__ __forceinline__ void build_list_slice(const AttentionIndexParams& p, int x, int x_blocks, int64_t t,
                                                 int list) {
  const int64_t position = p.positions[t];
  list -= p.window > 0 ? 1 : 0;
  if (list < 0) {
    for (int s = x * kThreads + threadIdx.x; s < p.window; s += x_blocks * kThreads) {
      const int64_t source = position - (p.window - 1) + s;
      p.window_index[t * p.window + s] = source >= 0 ? int32_t(source % p.ring_rows) : -1;
    }
    return;
  }
  const VisibleEntriesList& v = p.visible[list];
  const int64_t visible = min(v.entries, (position + 1) / v.ratio);
  if (v.counts != nullptr && x == 0 && threadIdx.x == 0) v.counts[t] = int32_t(visible);
  for (int64_t e = x * int64_t(kThreads) + threadIdx.x; e < v.entries; e += int64_t(x_blocks) * kThreads)
    v.index[t * v.entries + e] = e < visible ? int32_t(e) : -1;
}

}  // namespace dsv4::cuda::attention_lists
