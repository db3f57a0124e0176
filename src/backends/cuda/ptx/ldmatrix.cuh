// ldmatrix / stmatrix: a warp moves 8×8 b16 matrices between shared memory and mma.sync fragments (PTX ISA
// "ldmatrix", "stmatrix").
// Lane l supplies the row address of row l % 8 of matrix l / 8; .trans delivers the transposed fragments.
#pragma once

#include <cstdint>

namespace dsv4::cuda::ptx {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Four 8×8 b16 matrices from mma fragments to shared memory (stmatrix.x4, sm_90): lane l gives the address of row
// l % 8 of matrix l / 8; register i of every lane holds its two elements of matrix i (row lane / 4, columns
// 2 (lane % 4), +1).
__device__ __forceinline__ void stmatrix_x4(uint32_t address, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace dsv4::cuda::ptx
