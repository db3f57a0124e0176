// RMSNorm's factor, shared by the CPU ops and the CUDA kernels so every backend forms it in one operation order.
#pragma once

#include <cmath>

#include "core/host_device.hpp"

namespace dsv4 {

// 1 / sqrt(mean square + eps) of `count` values whose squares sum to `sum_of_squares`: the mean by a division, then
// the add, the square root and the reciprocal (an rsqrt would differ in the last bit from the CPU model).
DSV4_HD float inverse_rms(float sum_of_squares, float count, float eps) {
  return 1.0f / sqrtf(sum_of_squares / count + eps);
}

}  // namespace dsv4
