// Warpgroup MMA (PTX ISA "wgmma", sm_90a): shared-memory matrix descriptors for K-major tiles in the 128-byte
// swizzle, the bf16 mma_async shapes the kernels use, and the fences that order them. Also the warpgroup
// utilities that go with them (register reallocation, named barriers, the generic → async proxy fence).
//
// NOTES:
// - A K-major operand tile with the 128B swizzle is rows of 64 bf16 (128 bytes); eight rows form a 1024-byte
//   swizzle atom in which the 16-byte chunk c of row r sits at chunk c ^ (r % 8). That is exactly what TMA writes
//   with CU_TENSOR_MAP_SWIZZLE_128B, and what a kernel that fills a tile itself must write. Tiles start on
//   1024-byte boundaries, so the descriptor's base-offset field stays 0.
// - Descriptor (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading-dimension byte
//   offset >> 4 (unused for swizzled K-major tiles whose K step fits the swizzle width), 32-45 stride-dimension byte
//   offset >> 4 (1024: from one 8-row group to the next), 62-63 swizzle mode (1 = 128B).
// - A k16 step inside the 64-wide tile advances the start address by 32 bytes (+2 in the encoded field); the
//   hardware applies the swizzle to the full address, so this selects the right chunks in every row.
// - Accumulators in flight, and A fragments in registers, belong to the tensor core until a wait covers the wgmma:
//   fence_operand() after that wait keeps the compiler from moving accesses to them across it (or reusing the
//   registers earlier).
#pragma once

#include <cstdint>

// The accumulator operands every wgmma wrapper lists (here and in the kernels that add their own shapes): for N = 16,
// 32, 64 and 128 fp32 registers d[0 .. N), DSV4_WGMMA_ACCUMULATORS_N is the output-operand list "+f"(d[0]), ...
// and DSV4_WGMMA_ACCUMULATOR_REGISTERS_N the string "%0, %1, ..., %N-1" naming them in the instruction, so the other
// operands number from %N on. The caller's accumulator array must be called d.
#define DSV4_WGMMA_ACCUMULATORS_8(i)                                                                                  \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]),         \
      "+f"(d[i + 7])
#define DSV4_WGMMA_ACCUMULATORS_16 DSV4_WGMMA_ACCUMULATORS_8(0), DSV4_WGMMA_ACCUMULATORS_8(8)
#define DSV4_WGMMA_ACCUMULATORS_32 \
  DSV4_WGMMA_ACCUMULATORS_16, DSV4_WGMMA_ACCUMULATORS_8(16), DSV4_WGMMA_ACCUMULATORS_8(24)
#define DSV4_WGMMA_ACCUMULATORS_64                                                                                    \
  DSV4_WGMMA_ACCUMULATORS_32, DSV4_WGMMA_ACCUMULATORS_8(32), DSV4_WGMMA_ACCUMULATORS_8(40),                           \
      DSV4_WGMMA_ACCUMULATORS_8(48), DSV4_WGMMA_ACCUMULATORS_8(56)
#define DSV4_WGMMA_ACCUMULATORS_128                                                                                   \
  DSV4_WGMMA_ACCUMULATORS_64, DSV4_WGMMA_ACCUMULATORS_8(64), DSV4_WGMMA_ACCUMULATORS_8(72),                           \
      DSV4_WGMMA_ACCUMULATORS_8(80), DSV4_WGMMA_ACCUMULATORS_8(88), DSV4_WGMMA_ACCUMULATORS_8(96),                    \
      DSV4_WGMMA_ACCUMULATORS_8(104), DSV4_WGMMA_ACCUMULATORS_8(112), DSV4_WGMMA_ACCUMULATORS_8(120)
#define DSV4_WGMMA_ACCUMULATOR_REGISTERS_16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define DSV4_WGMMA_ACCUMULATOR_REGISTERS_32  \
  DSV4_WGMMA_ACCUMULATOR_REGISTERS_16        \
  ", %16, %17, %18, %19, %20, %21, %22, %23" \
  ", %24, %25, %26, %27, %28, %29, %30, %31"
#define DSV4_WGMMA_ACCUMULATOR_REGISTERS_64  \
  DSV4_WGMMA_ACCUMULATOR_REGISTERS_32        \
  ", %32, %33, %34, %35, %36, %37, %38, %39" \
  ", %40, %41, %42, %43, %44, %45, %46, %47" \
  ", %48, %49, %50, %51, %52, %53, %54, %55" \
  ", %56, %57, %58, %59, %60, %61, %62, %63"
#define DSV4_WGMMA_ACCUMULATOR_REGISTERS_128         \
  DSV4_WGMMA_ACCUMULATOR_REGISTERS_64                \
  ", %64, %65, %66, %67, %68, %69, %70, %71"         \
  ", %72, %73, %74, %75, %76, %77, %78, %79"         \
  ", %80, %81, %82, %83, %84, %85, %86, %87"         \
  ", %88, %89, %90, %91, %92, %93, %94, %95"         \
  ", %96, %97, %98, %99, %100, %101, %102, %103"     \
  ", %104, %105, %106, %107, %108, %109, %110, %111" \
  ", %112, %113, %114, %115, %116, %117, %118, %119" \
  ", %120, %121, %122, %123, %124, %125, %126, %127"

namespace dsv4::cuda::sm90 {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Descriptor of a K-major bf16 tile in the 128B swizzle starting at `tile` (1024-byte aligned).
__device__ __forceinline__ uint64_t make_sw128_k_major_descriptor(const void* tile) {
  constexpr uint64_t kLeadingByteOffset = 16 >> 4;  // ignored for this layout; 1 is the conventional value
  constexpr uint64_t kStrideByteOffset = 1024 >> 4;
  constexpr uint64_t kSwizzle128B = 1;
  return uint64_t((shared_address(tile) & 0x3FFFF) >> 4) | (kLeadingByteOffset << 16) | (kStrideByteOffset << 32) |
         (kSwizzle128B << 62);
}

// Advances a descriptor by a byte offset inside its swizzle atom row (k steps of 32 bytes).
__device__ __forceinline__ uint64_t advance_descriptor(uint64_t descriptor, uint32_t bytes) {
  return descriptor + (bytes >> 4);
}

// Orders this warpgroup's earlier register and shared-memory accesses before the next wgmma_*.
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

template <int kCount>
__device__ __forceinline__ void fence_operand(float (&registers)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(registers[i])::"memory");
}

template <int kCount>
__device__ __forceinline__ void fence_operand(uint32_t (&registers)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+r"(registers[i])::"memory");
}

// Shared memory written with ordinary stores and read next by wgmma or TMA (the async proxy) needs this fence in
// every writing thread before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Barrier over `kThreads` threads (whole warps) under hardware barrier `id` (0 is __syncthreads).
template <int kThreads>
__device__ __forceinline__ void named_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

// Arrives at hardware barrier `id` without waiting (the other `kThreads` - arrivals come from bar.sync elsewhere).
template <int kThreads>
__device__ __forceinline__ void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

// Warp-specialised register budgets: the producer warpgroup gives registers back, the consumers take them. Needs a
// register cap at kernel entry (__launch_bounds__(threads, 1)).
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_decrease() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_increase() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

// D[64 × 128] += A[64 × 16] · B[128 × 16]ᵀ, bf16 × bf16 → fp32, both operands K-major in shared memory;
// accumulate = 0 overwrites D instead.
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t a_desc, uint64_t b_desc,
                                                       int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_64 "}, "
      "%64, %65, p_acc, 1, 1, 0, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_64
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 256] (+)= A[64 × 16] · B, bf16 × bf16 → fp32, A K-major in shared memory and B in shared memory, K-major
// (B[256 × 16]ᵀ) or N-major (B[16 × 256], imm-trans-b = 1); accumulate = 0 overwrites D instead.
template <bool kNMajorB>
__device__ __forceinline__ void wgmma_m64n256k16_bf16_b_layout(float (&d)[128], uint64_t a_desc, uint64_t b_desc,
                                                               int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_128 "}, "
      "%128, %129, p_acc, 1, 1, 0, %131;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_128
      : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(int(kNMajorB)));
#else
  __trap();
#endif
}

// D[64 × 256] += A[64 × 16] · B[256 × 16]ᵀ, both operands K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], uint64_t a_desc, uint64_t b_desc,
                                                       int accumulate) {
  wgmma_m64n256k16_bf16_b_layout<false>(d, a_desc, b_desc, accumulate);
}

// D[64 × 256] (+)= A[64 × 16] · B[16 × 256], A K-major and B N-major (see make_sw128_n_major_descriptor), both in
// shared memory in the 128B swizzle.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_n_major_b(float (&d)[128], uint64_t a_desc, uint64_t b_desc,
                                                                int accumulate) {
  wgmma_m64n256k16_bf16_b_layout<true>(d, a_desc, b_desc, accumulate);
}

// D[64 × 128] += A[64 × 16] · B[128 × 16]ᵀ with A from registers (the m16k16 fragment of each warp's 16 rows,
// four bf16x2 registers a0..a3) and B K-major in shared memory. A's registers are read asynchronously: they must
// keep their values until a wait_group covers this wgmma.
__device__ __forceinline__ void wgmma_m64n128k16_bf16_rs(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2,
                                                          uint32_t a3, uint64_t b_desc, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_64 "}, "
      "{%64, %65, %66, %67}, %68, p_acc, 1, 1, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_64
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 64] (+)= A[64 × 16] · B[64 × 16]ᵀ, bf16 → fp32: A from registers (each warp's m16k16 fragment, as mma.sync's),
// B K-major in shared memory. A's registers are read asynchronously until a wait_group covers the MMA.
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint64_t b_desc, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "{%32, %33, %34, %35}, %36, p_acc, 1, 1, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// The same for e4m3 operands, k32 (A: mma.m16n8k32's fragment).
__device__ __forceinline__ void wgmma_m64n64k32_e4m3_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint64_t b_desc, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "{%32, %33, %34, %35}, %36, p_acc, 1, 1;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 256] (+)= A[64 × 16] · B, bf16 → fp32, with A from registers (the m16k16 fragment of each warp's 16 rows,
// four bf16x2 registers a0..a3) and B in shared memory, K-major (B[256 × 16]ᵀ) or N-major (B[16 × 256],
// imm-trans-b = 1).
// A's registers are read asynchronously: they must keep their values until a wait_group covers this wgmma.
template <bool kNMajorB>
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs_b_layout(float (&d)[128], uint32_t a0, uint32_t a1,
                                                                  uint32_t a2, uint32_t a3, uint64_t b_desc,
                                                                  int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_128 "}, "
      "{%128, %129, %130, %131}, %132, p_acc, 1, 1, %134;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_128
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b_desc), "r"(accumulate), "n"(int(kNMajorB)));
#else
  __trap();
#endif
}

// D[64 × 256] += A[64 × 16] · B[256 × 16]ᵀ with A from registers and B K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2,
                                                          uint32_t a3, uint64_t b_desc, int accumulate) {
  wgmma_m64n256k16_bf16_rs_b_layout<false>(d, a0, a1, a2, a3, b_desc, accumulate);
}

// Descriptor of an N-major bf16 B operand in the 128B swizzle: rows of 64 N values (128 bytes), 8-row groups along K
// 1024 bytes apart, 64-wide N blocks `n_block_bytes` apart (PTX ISA "Matrix Descriptor Format", MN-major).
__device__ __forceinline__ uint64_t make_sw128_n_major_descriptor(const void* tile, uint32_t n_block_bytes) {
  constexpr uint64_t kStrideByteOffset = 1024 >> 4;
  constexpr uint64_t kSwizzle128B = 1;
  return uint64_t((shared_address(tile) & 0x3FFFF) >> 4) | (uint64_t(n_block_bytes >> 4) << 16) |
         (kStrideByteOffset << 32) | (kSwizzle128B << 62);
}

// D[64 × 32] (+)= A[64 × 16] · B[32 × 16]ᵀ, bf16 → fp32, A and B K-major in shared memory (128B swizzle).
__device__ __forceinline__ void wgmma_m64n32k16_bf16_ss(float (&d)[16], uint64_t a_desc, uint64_t b_desc,
                                                        int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_16 "}, %16, %17, p_acc, 1, 1, 0, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_16
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 64] (+)= A[64 × 32] · B[64 × 32]ᵀ, e4m3 → fp32, A and B K-major in shared memory (128B swizzle).
__device__ __forceinline__ void wgmma_m64n64k32_e4m3_ss(float (&d)[32], uint64_t a_desc, uint64_t b_desc,
                                                        int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "%32, %33, p_acc, 1, 1;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 64] (+)= A[64 × 16] · B[64 × 16]ᵀ, bf16 → fp32, A and B K-major in shared memory (128B swizzle).
__device__ __forceinline__ void wgmma_m64n64k16_bf16_ss(float (&d)[32], uint64_t a_desc, uint64_t b_desc,
                                                        int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred p_acc;\n"
      "setp.ne.b32 p_acc, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{" DSV4_WGMMA_ACCUMULATOR_REGISTERS_32 "}, "
      "%32, %33, p_acc, 1, 1, 0, 0;\n"
      "}\n"
      : DSV4_WGMMA_ACCUMULATORS_32
      : "l"(a_desc), "l"(b_desc), "r"(accumulate));
#else
  __trap();
#endif
}

// D[64 × 256] (+)= A[64 × 16] · B[16 × 256], bf16 → fp32, A from registers (each warp's m16k16 fragment, as for
// mma.sync) and B N-major in shared memory (imm-trans-b = 1): B's rows are K, each holding 256 contiguous N values in
// 64-wide 128B-swizzled blocks.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs_n_major_b(float (&d)[128], const uint32_t (&a)[4],
                                                                   uint64_t b_desc, int accumulate) {
  wgmma_m64n256k16_bf16_rs_b_layout<true>(d, a[0], a[1], a[2], a[3], b_desc, accumulate);
}

}  // namespace dsv4::cuda::sm90
