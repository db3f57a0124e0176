// Shared-memory mbarriers (PTX ISA "mbarrier"), the completion mechanism of TMA loads and of producer/consumer
// rings. Thin wrappers over CCCL's cuda::ptx so kernels read as their protocol: init, arrive (with an expected
// transaction byte count for TMA), and wait for a phase by parity.
//
// Phase protocol of a ring slot: consumers wait on `full` with parity (pass & 1); producers wait on `empty` with
// parity (pass & 1) ^ 1, which succeeds at once on the first pass (a fresh barrier's phase 0 is still open, and
// try_wait.parity(1) asks whether the phase before it completed).
#pragma once

#include <cuda/ptx>

#include <cstdint>

namespace dsv4::cuda::sm90 {

// One thread initialises; the fence makes the initialised barrier visible to the async proxy (the TMA unit) and to
// the other threads after the following __syncthreads().
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, uint32_t arrivals) {
  ::cuda::ptx::mbarrier_init(barrier, arrivals);
}

__device__ __forceinline__ void fence_mbarrier_init() {
  ::cuda::ptx::fence_mbarrier_init(::cuda::ptx::sem_release, ::cuda::ptx::scope_cluster);
}

// Arrive once and tell the barrier that `bytes` more transaction bytes (TMA completions) belong to this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* barrier, uint32_t bytes) {
  ::cuda::ptx::mbarrier_arrive_expect_tx(::cuda::ptx::sem_release, ::cuda::ptx::scope_cta,
                                         ::cuda::ptx::space_shared, barrier, bytes);
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* barrier) {
  (void)::cuda::ptx::mbarrier_arrive(barrier);
}

// Spins until the phase with this parity has completed (try_wait suspends the thread for a while between polls).
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  while (!::cuda::ptx::mbarrier_try_wait_parity(barrier, parity)) {
  }
}

}  // namespace dsv4::cuda::sm90
