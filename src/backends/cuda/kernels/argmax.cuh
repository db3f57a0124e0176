// Device code of the greedy argmax (argmax.hpp). A row's candidates are compared as one 64-bit key: the value mapped
// to an unsigned integer of the same order (NaN above everything) in the high half, the complement of the id in
// the low half, so the largest key is the largest value at its lowest id and the reduction is a plain max.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::cuda::argmax_detail {

constexpr int kThreads = 512;
constexpr unsigned long long kNanOrder = 0xFFFFFFFFull;

// Monotone map float -> uint32 (-0 and +0 share one key; every NaN maps above +inf).
__device__ __forceinline__ unsigned long long order_key(float value, uint32_t id) {
  uint32_t bits = __float_as_uint(value);
  unsigned long long order;
  if (value != value)
    order = kNanOrder;
  else if (value == 0.0f)
    order = 0x80000000u;
  else
    order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (order << 32) | (0xFFFFFFFFu - id);
}

__device__ __forceinline__ unsigned long long max_key(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}

__global__ void __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ logits, int64_t vocab, int64_t row_stride, bool vector_loads,
                   int32_t* __restrict__ ids, int32_t* __restrict__ nan_flag) {
  const float* row = logits + int64_t(blockIdx.x) * row_stride;
  unsigned long long best = 0;  // below every key: the smallest order, -inf's, is 0x007FFFFF
  int64_t scalar_begin = 0;
  if (vector_loads) {
    const int64_t quads = vocab / 4;
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int64_t q = threadIdx.x; q < quads; q += kThreads) {
      const float4 v = __ldg(row4 + q);
      const uint32_t id = uint32_t(q * 4);
      best = max_key(best, order_key(v.x, id));
      best = max_key(best, order_key(v.y, id + 1));
      best = max_key(best, order_key(v.z, id + 2));
      best = max_key(best, order_key(v.w, id + 3));
    }
    scalar_begin = quads * 4;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < vocab; i += kThreads)
    best = max_key(best, order_key(__ldg(row + i), uint32_t(i)));

  for (int offset = 16; offset > 0; offset /= 2) best = max_key(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
  __shared__ unsigned long long warp_best[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? warp_best[lane] : 0;
    for (int offset = 16; offset > 0; offset /= 2) best = max_key(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
    if (lane == 0) {
      ids[blockIdx.x] = int32_t(0xFFFFFFFFu - uint32_t(best & 0xFFFFFFFFull));
      if ((best >> 32) == kNanOrder && nan_flag != nullptr) *nan_flag = 1;
    }
  }
}

}  // namespace dsv4::cuda::argmax_detail
