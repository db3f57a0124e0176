// What the GPU kernel benchmarks share: the same-run floor every result is compared with (device-to-device copy
// bandwidth) and the check of the cuBLAS baseline calls.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

inline void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error ", int(status), " in ", call);
}

// Copy bandwidth of 1 GiB device to device on `stream`, read + write counted, in GB/s: 3 warm-up copies, then the
// mean of 10 timed between two events.
inline double copy_bandwidth_gbps(cudaStream_t stream = nullptr) {
  constexpr size_t kBytes = size_t(1) << 30;
  constexpr int kWarmup = 3, kIterations = 10;
  DeviceBuffer src(kBytes, "copy source"), dst(kBytes, "copy destination");
  src.fill_bytes(1);
  for (int i = 0; i < kWarmup; ++i)
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice, stream));
  cudaEvent_t start, stop;
  DSV4_CUDA_CHECK(cudaEventCreate(&start));
  DSV4_CUDA_CHECK(cudaEventCreate(&stop));
  DSV4_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < kIterations; ++i)
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice, stream));
  DSV4_CUDA_CHECK(cudaEventRecord(stop, stream));
  DSV4_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  DSV4_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  DSV4_CUDA_CHECK(cudaEventDestroy(start));
  DSV4_CUDA_CHECK(cudaEventDestroy(stop));
  return 2.0 * double(kBytes) * kIterations / (double(ms) * 1e6);
}

}  // namespace dsv4::cuda

#define BENCH_CUBLAS_CHECK(call) ::dsv4::cuda::check_cublas((call), #call)
