// Programmatic dependent launch (PDL) for chains of kernels in one stream (the MoE's, the quantized linear's). Each
// is launched with programmatic stream serialization, so its CTAs may be scheduled while the previous kernel drains
// (no launch gap, and work that reads only weights can start early); every kernel calls wait_for_prior_grids() before
// touching anything an earlier launch wrote, and allow_dependents() once it has passed that wait. Captured into a
// CUDA graph, the pairs become programmatic edges. When the previous operation in the stream is not such a kernel,
// the launch is ordinary.
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

// PTX ISA "griddepcontrol.wait": blocks until the prerequisite grids have completed and their writes are visible.
__device__ __forceinline__ void wait_for_prior_grids() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// PTX ISA "griddepcontrol.launch_dependents": the dependent grid may be scheduled once every CTA of this grid has
// executed it (or exited).
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <class Args>
void launch_chained(void (*kernel)(Args), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                    const Args& args, const char* name) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, args), name, __FILE__, __LINE__);
}

}  // namespace dsv4::cuda
