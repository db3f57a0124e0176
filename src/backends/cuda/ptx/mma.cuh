// Warp-level tensor-core MMA and the global loads that feed it, one inline-asm wrapper each (PTX ISA 8.x).
#pragma once

#include <cstdint>

namespace dsv4::cuda::ptx {

// D = A·B + D for one warp, bf16 inputs, fp32 accumulators (PTX ISA "Warp-level Matrix Multiply-Accumulate
// Instructions", mma.m16n8k16 with .bf16). Fragments, with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   d[0] = D[g][2t], d[1] = D[g][2t+1], d[2] = D[g+8][2t], d[3] = D[g+8][2t+1]
// Each 32-bit register holds two bf16, the lower k (or column) in the low half.
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                      uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes of data read exactly once (weights): read-only path, no L1 allocation, and a hint that L2 fetch the
// whole 256-byte span around it, which the next steps along the same row read (PTX ISA "ld", .L2::256B).
__device__ __forceinline__ uint4 load_streaming_16B(const void* address) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// Asks L2 to fetch the line holding `address` without waiting for it (PTX ISA "prefetch", .global.L2).
__device__ __forceinline__ void prefetch_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
}

}  // namespace dsv4::cuda::ptx
