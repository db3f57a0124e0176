// Programmatic dependent launch (PDL) for chains of kernels in one stream (the MoE's, the quantized linear's). Each
// is launched with programmatic stream serialization, so its CTAs may be scheduled while the previous kernel drains
// (no launch gap, and work that reads only weights can start early); every kernel calls wait_for_prior_grids() before
// touching anything an earlier launch wrote, and allow_dependents() once it has passed that wait. Captured into a
// CUDA graph, the pairs become programmatic edges. When the previous operation in the stream is not such a kernel,
// the launch is ordinary.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

// PTX ISA "griddepcontrol.wait": blocks until the prerequisite grids have completed and their writes are visible.
__device__ __forceinline__ void wait_for_prior_grids() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// PTX ISA "griddepcontrol.launch_dependents": the dependent grid may be scheduled once every CTA of this grid has
// executed it (or exited).
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Launches `kernel(args...)` as a programmatic dependent launch over `grid` × `block` with `smem_bytes` of dynamic
// shared memory, in thread-block clusters of `cluster` CTAs where it has more than one (each grid dimension a multiple
// of the cluster's; a 1 × 1 × 1 cluster launches without the cluster attribute, which would take the cluster
// scheduling path for nothing). Clusters above the portable 8 CTAs need the kernel's
// cudaFuncAttributeNonPortableClusterSizeAllowed, which the caller sets once per device (per_device_cache.hpp).
// A failed launch throws, naming `name`.
template <class... KernelArgs, class... Args>
void launch_chained(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                    dim3 cluster, const char* name, Args&&... args) {
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = cluster.x;
  attributes[1].val.clusterDim.y = cluster.y;
  attributes[1].val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = cluster.x * cluster.y * cluster.z > 1 ? 2 : 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), name, __FILE__, __LINE__);
}

// The same without clusters, for a kernel of one argument.
template <class Args>
void launch_chained(void (*kernel)(Args), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                    const Args& args, const char* name) {
  launch_chained(kernel, grid, block, smem_bytes, stream, dim3(1, 1, 1), name, args);
}

}  // namespace dsv4::cuda
