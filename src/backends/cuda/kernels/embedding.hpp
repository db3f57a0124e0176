// Token embedding on the GPU, broadcast to the residual streams: X[t][k] = table[ids[t]] for k < streams
// (CPU reference: CpuBackend::embed, then the model copies the row into each of the n streams).
//
// Dispatch contract:
// - table: a DeviceMatrixView [vocab, hidden] in BF16, F32 or FP8_BLOCK128 (e8m0 or f32 scales); other formats are
//   refused naming the format. X fp32 [tokens, streams, hidden] (streams = 1 gives a plain [tokens, hidden]).
// - ids: int32 on the device. The kernel cannot throw, so the host checks ids before uploading them
//   (check_embedding_ids names the first bad one); an id outside [0, vocab) that slips through yields a row of NaN,
//   never an out-of-bounds read.
// - round_to_bf16: X holds the values rounded to bf16 (Reference numerics keeps the residual streams in bf16).
// - A programmatic dependent launch (ptx/dependent_launch.cuh); asynchronous on `stream`; no allocation, no host
//   synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/attention_index.hpp"

namespace dsv4::cuda {

struct EmbeddingParams {
  DeviceMatrixView table;           // [vocab, hidden] on the device
  const int32_t* ids = nullptr;     // device [tokens]
  int64_t tokens = 0;
  int streams = 4;                  // copies of the row per token
  bool round_to_bf16 = false;
  float* X = nullptr;               // [tokens, streams, hidden]
  cudaStream_t stream = nullptr;
  // Optional: the step's attention index lists, built in extra CTAs of the same launch exactly as
  // run_attention_index builds them (checked as it checks them; their stream is unused).
  const AttentionIndexParams* attention_lists = nullptr;
};

// Host-side id check before upload: throws naming the position and value of the first id outside [0, vocab).
void check_embedding_ids(const int32_t* host_ids, int64_t tokens, int64_t vocab);

// Throws (naming the format, shape or pointer at fault) unless run_embedding supports the call.
void check_embedding_params(const EmbeddingParams& params);

void run_embedding(const EmbeddingParams& params);

}  // namespace dsv4::cuda
