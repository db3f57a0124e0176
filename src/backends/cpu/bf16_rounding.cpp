#include "backends/cpu/bf16_rounding.hpp"

#include "core/bf16.hpp"

namespace dsv4::cpu {

void round_to_bf16_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_to_bf16(x[i]);
}

}  // namespace dsv4::cpu
