// Ordered global-memory accesses for CTAs that wait on counters other CTAs of the same grid publish (the top-k's
// arrival barrier).
#pragma once

#include <cstdint>

namespace dsv4::cuda {

// PTX ISA "ld.acquire.gpu": the load is ordered before every later access of this thread, so what the publishing CTA
// wrote before its release is visible once its count is seen.
__device__ __forceinline__ uint32_t load_acquire(const uint32_t* address) {
  uint32_t value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

}  // namespace dsv4::cuda
