// L2 prefetches shared by the MoE kernels: weights that do not depend on the previous kernel's results are asked
// for before a programmatic launch waits for that kernel (ptx/dependent_launch.cuh), and the register-path expert
// GEMM keeps its loads ahead of the MMAs with them.
#pragma once

#include <cstdint>

namespace dsv4::cuda::moe {

// PTX ISA "cp.async.bulk.prefetch.L2": asks L2 to fetch [address, address + bytes) without waiting (16-byte aligned
// address, bytes a multiple of 16).
__device__ __forceinline__ void prefetch_l2_bulk(const void* address, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(address), "r"(bytes) : "memory");
}

// PTX ISA "prefetch": asks L2 for the line holding `address`.
__device__ __forceinline__ void prefetch_l2_line(const void* address) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
}

}  // namespace dsv4::cuda::moe
