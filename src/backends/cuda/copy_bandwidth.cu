#include "backends/cuda/copy_bandwidth.hpp"

#include <cstddef>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

double measure_copy_bandwidth_gbps(cudaStream_t stream) {
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
