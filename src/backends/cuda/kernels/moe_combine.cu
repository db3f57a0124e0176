#include "backends/cuda/kernels/moe_combine.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/moe_combine.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

void check_moe_combine_params(const MoeCombineParams& p) {
  check(p.tokens >= 1, "moe combine: ", p.tokens, " tokens; at least 1 expected");
  check(p.top_k >= 1 && p.top_k <= moe::kCombineMaxTopK, "moe combine: top_k = ", p.top_k, " must lie in [1, ",
        moe::kCombineMaxTopK, "]");
  check(p.hidden > 0 && p.hidden % 4 == 0, "moe combine: hidden size ", p.hidden, " must be a positive multiple of 4");
  check(p.down && p.expert_weights && p.slot_rows && p.out, "moe combine: a null ",
        !p.down ? "down" : !p.expert_weights ? "expert_weights" : !p.slot_rows ? "slot_rows" : "out", " pointer");
  check(reinterpret_cast<uintptr_t>(p.down) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0,
        "moe combine: down and out must be 16-byte aligned");
  const auto* down_begin = reinterpret_cast<const char*>(p.down);
  const auto* down_end = down_begin + (size_t(p.tokens) * (p.top_k + 1)) * size_t(p.hidden) * sizeof(float);
  const auto* out_begin = reinterpret_cast<const char*>(p.out);
  const auto* out_end = out_begin + size_t(p.tokens) * size_t(p.hidden) * sizeof(float);
  check(out_end <= down_begin || down_end <= out_begin, "moe combine: out must not alias down");
}

void run_moe_combine(const MoeCombineParams& p) {
  check_moe_combine_params(p);
  const moe::CombineArgs args{.down = p.down,
                              .weights = p.expert_weights,
                              .slot_rows = p.slot_rows,
                              .out = p.out,
                              .tokens = p.tokens,
                              .top_k = p.top_k,
                              .hidden = p.hidden};
  const dim3 grid(unsigned((p.hidden / 4 + moe::kCombineThreads - 1) / moe::kCombineThreads),
                  unsigned(std::min(p.tokens, 65535)));  // the kernel strides over the tokens past 65535
  launch_chained(moe::moe_combine_kernel, grid, dim3(moe::kCombineThreads), 0, p.stream, args, "moe_combine_kernel");
}

}  // namespace dsv4::cuda
