// Greedy token selection on the device: the argmax of each fp32 logit row as an int32 id, ties to the lowest id like
// the CPU sampler's greedy path, so a decode loop can feed the chosen tokens back without copying logits to the host.
//
// Contract:
// - logits: device fp32 [rows, vocab] with a row stride of row_stride elements (>= vocab); ids: device int32 [rows].
// - Orders values as floats (-0 equals +0; +inf is a value like any other). NaN: the CPU sampler refuses such a row;
//   here the row's lowest NaN position is returned (always a valid id, so a fed-back step cannot index out of the
//   vocabulary) and *nan_flag (optional) is set to 1; the flag is never cleared by the kernel.
// - One cluster of 8 CTAs per row (rows < 2^31 / 8); 16-byte loads where the rows are 16-byte aligned. Asynchronous
//   on `stream`, no allocation, no synchronisation (CUDA-graph capturable).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::cuda {

struct ArgmaxParams {
  const float* logits = nullptr;  // device [rows, row_stride]
  int64_t rows = 0;
  int64_t vocab = 0;              // 1 .. INT32_MAX
  int64_t row_stride = 0;         // elements between rows, >= vocab
  int32_t* ids = nullptr;         // device [rows]
  int32_t* nan_flag = nullptr;    // optional device flag, set to 1 when some row holds NaN
  cudaStream_t stream = nullptr;
};

// Throws naming the field at fault unless run_argmax supports the call.
void check_argmax_params(const ArgmaxParams& params);

void run_argmax(const ArgmaxParams& params);

}  // namespace dsv4::cuda
