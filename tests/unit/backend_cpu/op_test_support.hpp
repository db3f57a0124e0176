// Shared helpers for the CPU op tests: seeded random data, fp32 weight views, error measures.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/quantized_matrix.hpp"

namespace dsv4::cpu::testing {

inline std::vector<float> random_vector(int64_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// An F32 QuantizedMatrix owning a copy of values [rows, cols].
inline OwnedQuantizedMatrix f32_matrix(const std::vector<float>& values, int64_t rows, int64_t cols) {
  OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::F32, rows, cols, ScaleType::NONE);
  std::memcpy(m.storage->data.data(), values.data(), values.size() * sizeof(float));
  return m;
}

inline double max_abs_diff(const float* a, const float* b, int64_t n) {
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

}  // namespace dsv4::cpu::testing
