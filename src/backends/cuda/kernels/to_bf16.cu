#include "backends/cuda/kernels/to_bf16.hpp"

#include <algorithm>

#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

struct ToBf16Args {
  const float* x;
  int64_t n;
  __nv_bfloat16* y;
};

__global__ void to_bf16_kernel(const ToBf16Args a) {
  allow_dependents();
  wait_for_prior_grids();  // x is the previous kernel's output
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < a.n; i += int64_t(gridDim.x) * kThreads)
    a.y[i] = __float2bfloat16_rn(a.x[i]);
}

}  // namespace

void run_to_bf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t stream) {
  check(n >= 0, "to_bf16: negative count ", n);
  if (n == 0) return;
  check(x && y, "to_bf16: x and y are required");
  const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  launch_chained(to_bf16_kernel, dim3(blocks), dim3(kThreads), 0, stream, ToBf16Args{x, n, y}, "to_bf16");
}

}  // namespace dsv4::cuda
