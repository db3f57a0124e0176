// Asynchronous global → shared copies (PTX ISA "cp.async" and "cp.async.bulk").
// - cp.async (sm_80+): per-thread 8- or 16-byte copies tracked by commit groups;
// - cp.async.bulk (sm_90): one thread moves a contiguous block (16-byte aligned address and size, a multiple of 16)
//   with the copy engine; completion adds its bytes to an mbarrier's transaction count (see ptx/mbarrier.cuh).
#pragma once

#include <cstdint>

namespace dsv4::cuda::ptx {

// Copies `Bytes` (8 or 16) global bytes to shared memory, or zero-fills them when !valid.
template <int Bytes>
__device__ __forceinline__ void cp_async_or_zero(uint32_t shared_dst, const void* src, bool valid) {
  static_assert(Bytes == 8 || Bytes == 16, "cp.async moves 8 or 16 bytes here");
  const int src_bytes = valid ? Bytes : 0;
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_dst), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `Pending` commit groups of this thread are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// Waits until every cp.async this thread issued has landed (no commit group needed).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// One arrival on the mbarrier at shared address `barrier` once every cp.async this thread issued so far has landed
// (PTX ISA "cp.async.mbarrier.arrive.noinc": the arrival is counted in the barrier's initial count).
__device__ __forceinline__ void cp_async_mbarrier_arrive_noinc(uint32_t barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(barrier) : "memory");
}

// Bulk copy of `bytes` from global `src` to shared `shared_dst` (both 16-byte aligned, bytes a multiple of 16);
// completes on the mbarrier at shared address `barrier`.
__device__ __forceinline__ void cp_async_bulk_global_to_shared(uint32_t shared_dst, const void* src, uint32_t bytes,
                                                               uint32_t barrier) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   shared_dst),
               "l"(src), "r"(bytes), "r"(barrier)
               : "memory");
}

}  // namespace dsv4::cuda::ptx
