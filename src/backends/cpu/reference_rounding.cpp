#include "backends/cpu/reference_rounding.hpp"

#include <algorithm>
#include <cmath>

#include "backends/cpu/bf16_rounding.hpp"
#include "core/activation_block_scale.hpp"
#include "core/bf16.hpp"
#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cpu {

namespace {

constexpr int64_t kKvFp8Block = 64;
constexpr int64_t kIndexerFp4Block = 32;

float block_amax(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax;
}

}  // namespace

void round_fp8_blocks_ue8m0(float* x, int64_t n, int64_t block) {
  check(n >= 0 && block > 0, "round_fp8_blocks_ue8m0: bad n=", n, " block=", block);
  for (int64_t begin = 0; begin < n; begin += block) {
    const int64_t len = std::min(block, n - begin);
    float* v = x + begin;
    const float scale = e8m0_to_float(e4m3_block_scale_code(block_amax(v, len)));
    for (int64_t i = 0; i < len; ++i) {
      // Dividing by a power of two is exact; float_to_e4m3 saturates, which is the clamp to ±448.
      const float q = e4m3_to_float(float_to_e4m3(v[i] / scale));
      v[i] = round_to_bf16(q * scale);
    }
  }
}

void round_fp4_blocks_ue8m0(float* x, int64_t n, int64_t block) {
  check(n >= 0 && block > 0, "round_fp4_blocks_ue8m0: bad n=", n, " block=", block);
  for (int64_t begin = 0; begin < n; begin += block) {
    const int64_t len = std::min(block, n - begin);
    float* v = x + begin;
    const float scale = e8m0_to_float(e2m1_block_scale_code(block_amax(v, len)));
    for (int64_t i = 0; i < len; ++i) {
      const float q = e2m1_to_float(float_to_e2m1(v[i] / scale));
      v[i] = round_to_bf16(q * scale);
    }
  }
}

void hadamard_transform(float* x, int64_t n) {
  check(n > 0 && (n & (n - 1)) == 0, "hadamard_transform: size ", n, " is not a power of two");
  // In-place fast Walsh–Hadamard butterflies give H x in Sylvester order; then the 1/√n normalisation.
  for (int64_t half = 1; half < n; half *= 2) {
    for (int64_t base = 0; base < n; base += 2 * half) {
      for (int64_t i = base; i < base + half; ++i) {
        const float a = x[i];
        const float b = x[i + half];
        x[i] = a + b;
        x[i + half] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t i = 0; i < n; ++i) x[i] *= norm;
}

void round_kv_reference(float* kv, int64_t rows, int64_t head_dim, int64_t rope_dim) {
  check(rows >= 0 && rope_dim >= 0 && rope_dim <= head_dim, "round_kv_reference: bad shape rows=", rows,
        " head_dim=", head_dim, " rope_dim=", rope_dim);
  const int64_t nope_dim = head_dim - rope_dim;
  for (int64_t r = 0; r < rows; ++r) {
    float* v = kv + r * head_dim;
    round_fp8_blocks_ue8m0(v, nope_dim, kKvFp8Block);
    round_to_bf16_inplace(v + nope_dim, rope_dim);
  }
}

void round_indexer_reference(float* x, int64_t rows, int64_t head_dim) {
  check(rows >= 0, "round_indexer_reference: negative row count ", rows);
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * head_dim;
    hadamard_transform(v, head_dim);
    round_to_bf16_inplace(v, head_dim);
    round_fp4_blocks_ue8m0(v, head_dim, kIndexerFp4Block);
  }
}

}  // namespace dsv4::cpu
