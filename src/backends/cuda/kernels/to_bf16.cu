#include "backends/cuda/kernels/to_bf16.hpp"

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    y[i] = __float2bfloat16_rn(x[i]);
}

}  // namespace

void run_to_bf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t stream) {
  check(n >= 0, "to_bf16: negative count ", n);
  if (n == 0) return;
  check(x && y, "to_bf16: x and y are required");
  const unsigned blocks = unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  to_bf16_kernel<<<blocks, kThreads, 0, stream>>>(x, n, y);
  DSV4_CUDA_CHECK_LAUNCH("to_bf16");
}

}  // namespace dsv4::cuda
