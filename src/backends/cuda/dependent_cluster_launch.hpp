// The launch that the compressor and sparse attention kernels share: a programmatic dependent launch
// (ptx/dependent_launch.cuh) over a 1-D grid, in clusters of consecutive CTAs where the kernel splits its work.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

// Launches `kernel(args...)` over `ctas` CTAs of `threads` threads with programmatic stream serialization, in clusters
// of `cluster` CTAs only where cluster > 1 (a cluster of one would take the cluster scheduling path for nothing).
// A failed launch throws, naming `name`.
template <class... KernelArgs, class... Args>
void launch_dependent_clusters(void (*kernel)(KernelArgs...), int64_t ctas, int threads, size_t shared_bytes,
                               int cluster, cudaStream_t stream, const char* name, Args&&... args) {
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = unsigned(cluster);
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = cluster > 1 ? 2 : 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name, __FILE__, __LINE__);
}

}  // namespace dsv4::cuda
