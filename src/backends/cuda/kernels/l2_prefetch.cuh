// Device code of the bulk L2 prefetch (l2_prefetch.hpp).
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/l2_prefetch.hpp"

namespace dsv4::cuda::l2_prefetch {

// Bytes one bulk prefetch instruction asks for: a range is cut into such chunks, one per thread, so that a weight
// matrix's request spreads over many CTAs (many SMs' copy engines) instead of queueing behind one.
inline constexpr uint32_t kChunkBytes = 16 * 1024;
inline constexpr int kThreads = 32;

struct Args {
  const uint8_t* data[kL2PrefetchMaxRanges];
  uint64_t bytes[kL2PrefetchMaxRanges];       // multiples of 16
  uint64_t chunks_end[kL2PrefetchMaxRanges];  // chunks of the ranges up to and including each one
  int range_count;                            // >= 1
};

// PTX ISA "cp.async.bulk.prefetch.L2": `bytes` (a multiple of 16) from the 16-byte aligned `address` into L2, without
// waiting and without shared memory or registers to land in.
__device__ __forceinline__ void bulk_prefetch_l2(const void* address, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(address), "r"(bytes) : "memory");
}

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(const Args a) {
  const uint64_t total = a.chunks_end[a.range_count - 1];
  const uint64_t stride = uint64_t(gridDim.x) * kThreads;
  for (uint64_t chunk = uint64_t(blockIdx.x) * kThreads + threadIdx.x; chunk < total; chunk += stride) {
    int r = 0;
    while (chunk >= a.chunks_end[r]) ++r;
    const uint64_t offset = (chunk - (r == 0 ? 0 : a.chunks_end[r - 1])) * kChunkBytes;
    bulk_prefetch_l2(a.data[r] + offset, uint32_t(min(uint64_t(kChunkBytes), a.bytes[r] - offset)));
  }
}

}  // namespace dsv4::cuda::l2_prefetch
