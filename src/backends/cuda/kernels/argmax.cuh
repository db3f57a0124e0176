// Device code of the greedy argmax (argmax.hpp). A row's candidates are compared as one 64-bit key: the value mapped
// to an unsigned integer of the same order (NaN above everything) in the high half, the complement of the id in
// the low half, so the largest key is the largest value at its lowest id and the reduction is a plain max.
#pragma once

#include <cooperative_groups.h>
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

// A row is split over a cluster of kClusterCtas CTAs (one CTA per row read 517 KB of a DSV4 logit row alone, ~30 µs):
// each CTA reduces its interleaved share of the quads, then rank 0 reduces the CTAs' keys through distributed shared
// memory. The max of keys is associative and exact, so the split does not change the result.
constexpr int kClusterCtas = 8;

__global__ void __cluster_dims__(kClusterCtas, 1, 1) __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ logits, int64_t vocab, int64_t row_stride, bool vector_loads,
                   int32_t* __restrict__ ids, int32_t* __restrict__ nan_flag) {
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = int(cluster.block_rank());
  const int64_t row_index = int64_t(blockIdx.x) / kClusterCtas;
  const float* row = logits + row_index * row_stride;
  const int64_t first = int64_t(rank) * kThreads + threadIdx.x;  // this thread's first element (or quad)
  constexpr int64_t kStep = int64_t(kThreads) * kClusterCtas;
  unsigned long long best = 0;  // below every key: the smallest order, -inf's, is 0x007FFFFF
  int64_t scalar_begin = 0;
  if (vector_loads) {
    const int64_t quads = vocab / 4;
    const float4* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
    for (int64_t q = first; q < quads; q += kStep) {
      const float4 v = __ldg(row4 + q);
      const uint32_t id = uint32_t(q * 4);
      best = max_key(best, order_key(v.x, id));
      best = max_key(best, order_key(v.y, id + 1));
      best = max_key(best, order_key(v.z, id + 2));
      best = max_key(best, order_key(v.w, id + 3));
    }
    scalar_begin = quads * 4;
  }
  for (int64_t i = scalar_begin + first; i < vocab; i += kStep)
    best = max_key(best, order_key(__ldg(row + i), uint32_t(i)));

  for (int offset = 16; offset > 0; offset /= 2) best = max_key(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
  __shared__ unsigned long long warp_best[kThreads / 32];
  __shared__ unsigned long long cta_best;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? warp_best[lane] : 0;
    for (int offset = 16; offset > 0; offset /= 2) best = max_key(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
    if (lane == 0) cta_best = best;
  }
  cluster.sync();  // every CTA's key is in its shared memory
  if (rank == 0 && warp == 0) {
    best = lane < kClusterCtas ? *cluster.map_shared_rank(&cta_best, lane) : 0;
    for (int offset = 16; offset > 0; offset /= 2) best = max_key(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
    if (lane == 0) {
      ids[row_index] = int32_t(0xFFFFFFFFu - uint32_t(best & 0xFFFFFFFFull));
      if ((best >> 32) == kNanOrder && nan_flag != nullptr) *nan_flag = 1;
    }
  }
  cluster.sync();  // the peers' shared memory stays alive until rank 0 has read it
}

}  // namespace dsv4::cuda::argmax_detail
