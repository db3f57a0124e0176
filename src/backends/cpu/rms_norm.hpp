// RMSNorm (dsv4-model.md §3): y = x · rsqrt(mean(x²) + eps) · w, in fp32.
// The reference casts the result back to the activation dtype (bf16); the model does that with
// round_to_bf16_inplace where it wants DeepSeek's rounding (exact mode keeps fp32).
#pragma once

#include <cstdint>

namespace dsv4::cpu {

struct RmsNormParams {
  int64_t rows = 0;    // vectors to normalise
  int64_t dim = 0;     // elements per vector
  float eps = 1e-6f;   // rms_norm_eps
};

// x, y: [rows, dim] (may alias); weight: [dim], or nullptr for the weightless form (per-head q norm).
void rms_norm(const float* x, const float* weight, float* y, const RmsNormParams& params);

}  // namespace dsv4::cpu
