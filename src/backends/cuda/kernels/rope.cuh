// Device RoPE (dsv4-model.md §3): interleaved pairs (x[2i], x[2i+1]) rotated by θ = p·f_i. The angle is the fp32
// product p·f_i exactly as RopeTable::angles forms it, and its cos/sin are taken in double precision and rounded
// to float, as the CPU does; so the rotation factors match the CPU's to the last bit (barring a 1-ulp difference in
// the double libm result at a rounding tie) and only the fp32 rotation arithmetic itself can differ in order.
// Frequencies come from RopeTable::frequencies() copied to the device; a RoPE table (rope.hpp) holds these factors
// per position, computed once.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

struct RopeFactors {
  float cos_theta;
  float sin_theta;
};

__device__ __forceinline__ RopeFactors rope_factors(int64_t position, float frequency) {
  const float angle = static_cast<float>(position) * frequency;
  double s, c;
  sincos(static_cast<double>(angle), &s, &c);
  return {static_cast<float>(c), static_cast<float>(s)};
}

// Pair `pair`'s factors at `position` from a RoPE table of `pairs` pairs per row (rope.hpp): rope_factors' values.
__device__ __forceinline__ RopeFactors rope_table_factors(const float2* table, int pairs, int64_t position, int pair) {
  const float2 f = __ldg(table + position * pairs + pair);
  return {f.x, f.y};
}

// Rotates one pair by +θ (inverse = false) or −θ with the CPU's operations (rope.cpp rotate_pairs); the explicit
// _rn intrinsics keep the compiler from contracting them into FMAs, so equal inputs give equal outputs.
__device__ __forceinline__ void rope_rotate_pair(float& x0, float& x1, RopeFactors f, bool inverse) {
  const float c = f.cos_theta;
  const float s = inverse ? -f.sin_theta : f.sin_theta;
  const float a = x0, b = x1;
  x0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  x1 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

}  // namespace dsv4::cuda
