#include "backends/cuda/copy_bandwidth.hpp"

#include <cstddef>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/stream_timing.hpp"

namespace dsv4::cuda {

double measure_copy_bandwidth_gbps(cudaStream_t stream) {
  constexpr size_t kBytes = size_t(1) << 30;
  constexpr int kWarmup = 3, kIterations = 10;
  DeviceBuffer src(kBytes, "copy source"), dst(kBytes, "copy destination");
  src.fill_bytes(1);
  for (int i = 0; i < kWarmup; ++i)
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice, stream));
  const float ms = stream_elapsed_ms(stream, [&] {
    for (int i = 0; i < kIterations; ++i)
      DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * double(kBytes) * kIterations / (double(ms) * 1e6);
}

}  // namespace dsv4::cuda
