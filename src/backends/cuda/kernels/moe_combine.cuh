// Device code behind run_moe_combine (moe_combine.hpp holds the contract).
// NOTES: one thread per 4 consecutive outputs of a token (float4 loads and stores); the token's top_k rows and
// weights are read once per CTA into shared memory. Memory bound: (top_k + 2) · d · 4 bytes per token.
#pragma once

#include <cstdint>

#include "backends/cuda/ptx/dependent_launch.cuh"

namespace dsv4::cuda::moe {

inline constexpr int kCombineThreads = 256;
inline constexpr int kCombineMaxTopK = 32;

struct CombineArgs {
  const float* down;
  const float* weights;
  const int32_t* slot_rows;
  float* out;
  int tokens, top_k, hidden;
};

__global__ void __launch_bounds__(kCombineThreads) moe_combine_kernel(const CombineArgs a) {
  __shared__ int32_t rows[kCombineMaxTopK];
  __shared__ float weights[kCombineMaxTopK];
  wait_for_prior_grids();  // the down outputs and the routing
  const int quad = blockIdx.x * blockDim.x + threadIdx.x;
  for (int t = blockIdx.y; t < a.tokens; t += gridDim.y) {
    __syncthreads();  // the previous token's rows are read
    if (threadIdx.x < a.top_k) {
      rows[threadIdx.x] = __ldg(a.slot_rows + size_t(t) * a.top_k + threadIdx.x);
      weights[threadIdx.x] = __ldg(a.weights + size_t(t) * a.top_k + threadIdx.x);
    }
    __syncthreads();
    if (quad * 4 >= a.hidden) continue;
    const size_t shared_row = size_t(a.tokens) * a.top_k + t;
    float4 acc = __ldg(reinterpret_cast<const float4*>(a.down + shared_row * a.hidden) + quad);
    for (int j = 0; j < a.top_k; ++j) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(a.down + size_t(rows[j]) * a.hidden) + quad);
      const float w = weights[j];
      acc.x = fmaf(w, v.x, acc.x);
      acc.y = fmaf(w, v.y, acc.y);
      acc.z = fmaf(w, v.z, acc.z);
      acc.w = fmaf(w, v.w, acc.w);
    }
    reinterpret_cast<float4*>(a.out + size_t(t) * a.hidden)[quad] = acc;
  }
}

}  // namespace dsv4::cuda::moe
