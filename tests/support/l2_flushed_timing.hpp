// Timing for the GPU benches: the median of calls each after an L2 flush, and the same-run cuBLAS bf16 GEMM rate
// that tensor-core kernels are measured against.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

// Median milliseconds of `body` over `iterations` calls on the default stream, each after an L2 flush (a memset of
// `flush_bytes` at `flush`); one untimed call first warms up.
template <class Body>
double median_ms(int iterations, void* flush, size_t flush_bytes, Body&& body) {
  StreamTimer timer;
  body();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    DSV4_CUDA_CHECK(cudaMemsetAsync(flush, i & 0xFF, flush_bytes));
    times.push_back(timer.elapsed_ms(nullptr, body));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// bf16 tensor rate of cuBLAS on a 4096³ GEMM (bf16 in, fp32 accumulate), in TFLOP/s.
inline double cublas_bf16_tflops(void* flush, size_t flush_bytes) {
  constexpr int n = 4096;
  cublasHandle_t handle = nullptr;
  const cublasStatus_t created = cublasCreate(&handle);
  check(created == CUBLAS_STATUS_SUCCESS, "cuBLAS error ", int(created), " in cublasCreate");
  DeviceBuffer a(size_t(n) * n * 2, "gemm a"), b(size_t(n) * n * 2, "gemm b"), c(size_t(n) * n * 4, "gemm c");
  a.fill_bytes(0x3C);
  b.fill_bytes(0x3C);
  const float alpha = 1.0f, beta = 0.0f;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const double ms = median_ms(10, flush, flush_bytes, [&] {
    status = cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.data(), CUDA_R_16BF, n, b.data(),
                          CUDA_R_16BF, n, &beta, c.data(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  });
  cublasDestroy(handle);
  check(status == CUBLAS_STATUS_SUCCESS, "cuBLAS error ", int(status), " in cublasGemmEx");
  return 2.0 * n * double(n) * n / (ms * 1e9);
}

}  // namespace dsv4::cuda
