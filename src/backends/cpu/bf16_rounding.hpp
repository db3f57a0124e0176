// Rounding fp32 activations to bf16 in place, where DeepSeek's reference stores bf16 (mHC outputs y and X',
// hc_head's h, RMSNorm results, linear outputs): the CPU backend keeps fp32 buffers, and the model calls this at
// those points when it reproduces the reference. Round to nearest even (core/bf16.hpp).
#pragma once

#include <cstdint>

namespace dsv4::cpu {

void round_to_bf16_inplace(float* x, int64_t n);

}  // namespace dsv4::cpu
