// Thread-block cluster primitives (PTX ISA "barrier.cluster", "mapa", "st.async"): a split cluster barrier and
// stores into another CTA's shared memory that complete on an mbarrier there (transaction bytes), so the receiving
// CTA learns of their arrival without a cluster barrier.
#pragma once

#include <cuda/ptx>

#include <cstdint>

namespace dsv4::cuda::sm90 {

// Every thread of the cluster's CTAs arrives and later waits (acquire), in that order, once each. The relaxed arrive
// orders nothing by itself (a release arrive is a GPU-scope memory barrier, MEMBAR.ALL.GPU): an mbarrier initialised
// before it is published to the cluster by fence_mbarrier_init (mbarrier.cuh) before the arrive.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  ::cuda::ptx::barrier_cluster_arrive(::cuda::ptx::sem_relaxed);
}
__device__ __forceinline__ void cluster_wait_acquire() { ::cuda::ptx::barrier_cluster_wait(::cuda::ptx::sem_acquire); }

// A whole cluster barrier for every thread of every CTA of the cluster: shared-memory writes before it are visible to
// the peers after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// The same without ordering memory (the release costs a GPU-scope fence, which would wait for the CTA's outstanding
// global stores): only to know that every peer has got past its reads of this CTA's shared memory.
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed;\nbarrier.cluster.wait;\n" ::: "memory");
}

// `local`'s counterpart in the shared memory of cluster CTA `rank`, as a generic pointer, so that loads through it are
// plain 16-byte loads with immediate offsets (ld.shared::cluster on a 32-bit mapa address made ptxas rebuild the
// generic address, an S2R and two moves, before every load in the attention's split merge).
template <class T>
__device__ __forceinline__ const T* cluster_peer(const T* local, int rank) {
  return static_cast<const T*>(__cluster_map_shared_rank(const_cast<T*>(local), unsigned(rank)));
}

// The shared::cluster address of `local` (an object in this CTA's shared memory) in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t cluster_shared_address(const void* local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(local))), "r"(rank));
  return remote;
}

// Stores `value` at `remote` (a shared::cluster address) and adds its 4 bytes to the transaction count of the
// mbarrier at `remote_barrier` (in the same CTA as `remote`).
__device__ __forceinline__ void st_async_f32(uint32_t remote, float value, uint32_t remote_barrier) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
               :
               : "r"(remote), "r"(__float_as_uint(value)), "r"(remote_barrier)
               : "memory");
}

}  // namespace dsv4::cuda::sm90
