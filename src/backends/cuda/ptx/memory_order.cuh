// Ordered global-memory accesses for CTAs that wait on counters other CTAs publish, of the same grid or of an earlier
// one (the top-k's arrival barrier, the MoE router's counters, the expert kernels' item counts and combine tickets).
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

// PTX ISA "atom.acq_rel.gpu": an arrival counter's add that both publishes this thread's earlier writes (and those
// ordered before it by a CTA barrier) and acquires those of the threads that added before.
__device__ __forceinline__ uint32_t fetch_add_acq_rel(uint32_t* counter, uint32_t value) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(counter), "r"(value) : "memory");
  return old;
}

// PTX ISA "red.release.gpu": a count's add that publishes this thread's earlier writes (and those ordered before it
// by a CTA barrier) to the threads that acquire the count; no value comes back.
__device__ __forceinline__ void add_release(uint32_t* counter, uint32_t value) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(counter), "r"(value) : "memory");
}

}  // namespace dsv4::cuda
