// MoE combine: out[t] = shared[t] + Σ_j w[t, j] · down[row(t, j)] in fp32, summed in the fixed order shared, j = 0,
// 1, ... (deterministic, no atomics). `down` holds the grouped down GEMM's per-row outputs in expert-sorted order;
// the shared expert's row of token t is T·top_k + t (moe_routing.hpp).
// Dispatch contract: one launch, asynchronous on `stream`, no allocation or synchronisation; d must be a multiple
// of 4 and every pointer 16-byte aligned; out must not alias down.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

struct MoeCombineParams {
  const float* down = nullptr;            // [T·top_k + T, d] per-row expert outputs
  const float* expert_weights = nullptr;  // [T, top_k]
  const int32_t* slot_rows = nullptr;     // [T, top_k]: row of each slot in `down`
  float* out = nullptr;                   // [T, d]
  int tokens = 0;
  int top_k = 0;
  int hidden = 0;
  cudaStream_t stream = nullptr;
};

// Throws naming the field at fault unless run_moe_combine supports the call.
void check_moe_combine_params(const MoeCombineParams& params);

void run_moe_combine(const MoeCombineParams& params);

}  // namespace dsv4::cuda
