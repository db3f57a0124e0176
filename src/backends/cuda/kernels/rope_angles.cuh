// Device RoPE helpers matching dsv4::cpu::RopeTable bit for bit where the hardware allows: the angle is the fp32
// product position · f_i (as the reference forms it), its cos/sin are taken in double and rounded to float, and the
// rotation avoids FMA contraction so that it rounds like the CPU's separate multiplies and add.
#pragma once

#include <cstdint>

namespace dsv4::cuda {

// cos and sin of the fp32 angle position · frequency.
__device__ __forceinline__ float2 rope_cos_sin(int64_t position, float frequency) {
  const float angle = __fmul_rn(static_cast<float>(position), frequency);
  double sine, cosine;
  sincos(static_cast<double>(angle), &sine, &cosine);
  return make_float2(static_cast<float>(cosine), static_cast<float>(sine));
}

// Rotates the interleaved pair (x0, x1) by +θ: x0' = x0·cos − x1·sin, x1' = x0·sin + x1·cos.
__device__ __forceinline__ float2 rope_rotate_pair(float x0, float x1, float2 cos_sin) {
  return make_float2(__fsub_rn(__fmul_rn(x0, cos_sin.x), __fmul_rn(x1, cos_sin.y)),
                     __fadd_rn(__fmul_rn(x0, cos_sin.y), __fmul_rn(x1, cos_sin.x)));
}

}  // namespace dsv4::cuda
