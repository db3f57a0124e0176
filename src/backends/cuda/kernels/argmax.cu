#include "backends/cuda/kernels/argmax.hpp"

#include <cstdint>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/argmax.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

void check_argmax_params(const ArgmaxParams& p) {
  check(p.rows >= 1 && p.rows <= INT32_MAX / argmax_detail::kClusterCtas, "argmax: rows ", p.rows,
        " must be in [1, 2^31 / ", argmax_detail::kClusterCtas, ")");
  check(p.vocab >= 1 && p.vocab <= INT32_MAX, "argmax: vocab ", p.vocab, " must be in [1, 2^31)");
  check(p.row_stride >= p.vocab, "argmax: row_stride ", p.row_stride, " is below the vocab ", p.vocab);
  check(p.logits != nullptr, "argmax: logits are required");
  check(p.ids != nullptr, "argmax: ids output is required");
}

void run_argmax(const ArgmaxParams& p) {
  check_argmax_params(p);
  // 16-byte loads need every row to start 16-byte aligned: the base pointer and the stride.
  const bool vector_loads = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && p.row_stride % 4 == 0;
  argmax_detail::argmax_rows_kernel<<<unsigned(p.rows) * argmax_detail::kClusterCtas, argmax_detail::kThreads, 0,
                                      p.stream>>>(
      p.logits, p.vocab, p.row_stride, vector_loads, p.ids, p.nan_flag);
  DSV4_CUDA_CHECK_LAUNCH("argmax");
}

}  // namespace dsv4::cuda
