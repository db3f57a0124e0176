// Timing for the GPU benches: the median of calls each after an L2 flush (a memset or a read sweep), and the same-run
// cuBLAS bf16 GEMM rate that tensor-core kernels are measured against.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

// Reads `count` 16-byte words through L2, grid-stride, so that no earlier byte stays in L2 (for a buffer of at least
// twice the L2) and L2 is left full of clean lines; the sum goes to `sink` only in the impossible case that it equals
// a sentinel, so the loads cannot be dropped and nothing is written.
inline __global__ void l2_read_sweep_kernel(const uint4* buffer, size_t count, uint4* sink) {
  uint32_t sum = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(buffer + i);
    sum += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (sum == 0x9E3779B9u) *sink = make_uint4(sum, 0, 0, 0);
}

// A read sweep of `bytes` (a multiple of 16) of `data` on `stream`: 8 CTAs of 256 threads per SM (`sms`), for every
// bench that sweeps (L2Flush, bench_cuda_linear's ColdTimer); `sink` is 16 bytes.
inline void launch_l2_read_sweep(const void* data, size_t bytes, uint4* sink, int sms, cudaStream_t stream) {
  l2_read_sweep_kernel<<<unsigned(8 * sms), 256, 0, stream>>>(static_cast<const uint4*>(data), bytes / 16, sink);
  DSV4_CUDA_CHECK_LAUNCH("l2_read_sweep_kernel");
}

// How L2 is flushed before each timed call: a memset of the flush buffer (L2 left full of dirty lines, which the
// call's own misses then write back beside its traffic) or a read sweep of it (l2_read_sweep_kernel: clean lines, as
// behind the model's weight-reading kernels).
enum class L2FlushKind { Memset, Read };

inline const char* to_string(L2FlushKind kind) { return kind == L2FlushKind::Memset ? "memset" : "read"; }

// An L2 flush on the default stream: `bytes` of `data` (0: none) by `kind`; a read sweep (launch_l2_read_sweep)
// needs `sink` (16 bytes) and the SM count `sms`.
struct L2Flush {
  void* data = nullptr;
  size_t bytes = 0;
  L2FlushKind kind = L2FlushKind::Memset;
  uint4* sink = nullptr;
  int sms = 0;

  // Flush `i` of a run (a memset writes byte i & 0xFF).
  void run(int i) const {
    if (bytes == 0) return;
    if (kind == L2FlushKind::Memset) {
      DSV4_CUDA_CHECK(cudaMemsetAsync(data, i & 0xFF, bytes));
    } else {
      launch_l2_read_sweep(data, bytes, sink, sms, nullptr);
    }
  }
};

// Median milliseconds of `body` over `iterations` calls on the default stream, each after `flush`; one untimed call
// first warms up.
template <class Body>
double median_ms(int iterations, const L2Flush& flush, Body&& body) {
  StreamTimer timer;
  body();  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    flush.run(i);
    times.push_back(timer.elapsed_ms(nullptr, body));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// median_ms after a memset of `flush_bytes` at `flush`.
template <class Body>
double median_ms(int iterations, void* flush, size_t flush_bytes, Body&& body) {
  return median_ms(iterations, L2Flush{.data = flush, .bytes = flush_bytes}, std::forward<Body>(body));
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
