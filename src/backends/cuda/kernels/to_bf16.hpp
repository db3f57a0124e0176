// fp32 → bf16 (round to nearest even) on the device: the input of a linear layer whose producer wrote fp32.
// A programmatic dependent launch (ptx/dependent_launch.cuh); asynchronous on `stream`; no allocation, no
// synchronisation.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dsv4::cuda {

void run_to_bf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t stream);

}  // namespace dsv4::cuda
