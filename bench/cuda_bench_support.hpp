// What the GPU kernel benchmarks share: the same-run floor every result is compared with (device-to-device copy
// bandwidth) and the check of the cuBLAS baseline calls.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backends/cuda/copy_bandwidth.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

inline void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error ", int(status), " in ", call);
}

// The same-run floor: copy bandwidth in GB/s (read + write counted), measured by the library.
inline double copy_bandwidth_gbps(cudaStream_t stream = nullptr) { return measure_copy_bandwidth_gbps(stream); }

}  // namespace dsv4::cuda

#define BENCH_CUBLAS_CHECK(call) ::dsv4::cuda::check_cublas((call), #call)
