// Every CUDA runtime call and kernel launch goes through these checks; the error names the operation.
#pragma once

#include "core/error.hpp"

#include <cuda_runtime.h>

namespace dsv4::cuda {

inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess)
    fail("CUDA error in ", what, " (", file, ":", line, "): ", cudaGetErrorName(status), ": ",
         cudaGetErrorString(status));
}

}  // namespace dsv4::cuda

#define DSV4_CUDA_CHECK(call) ::dsv4::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// After a <<<...>>> launch: catches bad launch configurations at once (asynchronous faults surface at the next sync).
#define DSV4_CUDA_CHECK_LAUNCH(op_name) ::dsv4::cuda::check_cuda(cudaGetLastError(), op_name, __FILE__, __LINE__)
