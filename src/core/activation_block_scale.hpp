// The power-of-two block scales DeepSeek's kernels give activations quantised on the fly (fp8 KV entries and indexer
// keys, fp4 indexer q), shared by the CPU reference roundings and the CUDA kernels so both pick the same scale.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/host_device.hpp"

namespace dsv4 {

// DeepSeek's floor on an fp8 block's amax, so an all-zero block still gets a finite scale.
inline constexpr float kFp8AmaxFloor = 1e-4f;
// DeepSeek's fp4 floor (activations and MXFP4 weights): the scale never goes below 2^-126.
inline constexpr float kFp4AmaxFloor = kE2m1Max * 0x1p-126f;

// 2^ceil(log2(max(amax, floor) · (1 / max))) as an e8m0 code: the product with the fp32 reciprocal, as those kernels
// form it (not a division), its ceil(log2) taken exactly from the bits.
DSV4_HD uint8_t activation_block_scale_code(float amax, float amax_floor, float reciprocal_of_max) {
  return float_to_e8m0_ceil(fmaxf(amax, amax_floor) * reciprocal_of_max);
}

// An fp8 (e4m3) block's scale code: amax / s <= 448.
DSV4_HD uint8_t e4m3_block_scale_code(float amax) {
  return activation_block_scale_code(amax, kFp8AmaxFloor, 1.0f / kE4m3Max);
}

// An fp4 (e2m1) block's scale code: amax / s <= 6.
DSV4_HD uint8_t e2m1_block_scale_code(float amax) {
  return activation_block_scale_code(amax, kFp4AmaxFloor, 1.0f / kE2m1Max);
}

}  // namespace dsv4
