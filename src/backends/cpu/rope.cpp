#include "backends/cpu/rope.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

void rotate_pairs(float* x, const float* cos_v, const float* sin_v, int64_t pairs, bool inverse) {
  for (int64_t i = 0; i < pairs; ++i) {
    const float c = cos_v[i];
    const float s = inverse ? -sin_v[i] : sin_v[i];
    const float x0 = x[2 * i];
    const float x1 = x[2 * i + 1];
    x[2 * i] = x0 * c - x1 * s;
    x[2 * i + 1] = x0 * s + x1 * c;
  }
}

}  // namespace

std::pair<int64_t, int64_t> RopeTable::yarn_ramp_bounds(double theta, int64_t rope_dim, const YarnScaling& yarn) {
  const auto correction_dim = [&](double rotations) {
    return static_cast<double>(rope_dim) *
           std::log(static_cast<double>(yarn.original_max_position) / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(theta));
  };
  const auto low = static_cast<int64_t>(std::floor(correction_dim(yarn.beta_fast)));
  const auto high = static_cast<int64_t>(std::ceil(correction_dim(yarn.beta_slow)));
  return {std::max<int64_t>(low, 0), std::min<int64_t>(high, rope_dim - 1)};
}

RopeTable::RopeTable(double theta, int64_t rope_dim, std::optional<YarnScaling> yarn) : rope_dim_(rope_dim) {
  check(rope_dim > 0 && rope_dim % 2 == 0, "RopeTable: rope_dim must be positive and even, got ", rope_dim);
  check(theta > 1.0, "RopeTable: theta must be > 1, got ", theta);
  const int64_t pairs = rope_dim / 2;
  frequencies_.resize(pairs);
  for (int64_t i = 0; i < pairs; ++i) {
    // fp32 like the reference's torch.arange(..., float32) / dim and base ** exponent.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rope_dim);
    frequencies_[i] = static_cast<float>(1.0 / std::pow(theta, static_cast<double>(exponent)));
  }
  if (yarn) {
    check(yarn->factor > 0.0 && yarn->original_max_position > 0 && yarn->beta_fast > 0.0 && yarn->beta_slow > 0.0,
          "RopeTable: YaRN factor, original_max_position, beta_fast and beta_slow must be positive");
    const auto [low, high_bound] = yarn_ramp_bounds(theta, rope_dim, *yarn);
    // DeepSeek's linear_ramp_factor nudges an empty range so the division stays finite.
    const float high = low == high_bound ? static_cast<float>(high_bound) + 0.001f : static_cast<float>(high_bound);
    const auto factor = static_cast<float>(yarn->factor);
    for (int64_t i = 0; i < pairs; ++i) {
      const float ramp =
          std::clamp((static_cast<float>(i) - static_cast<float>(low)) / (high - static_cast<float>(low)), 0.0f, 1.0f);
      const float smooth = 1.0f - ramp;  // the reference's order of operations, kept for bit-equal tables
      frequencies_[i] = frequencies_[i] / factor * (1.0f - smooth) + frequencies_[i] * smooth;
    }
  }
}

void RopeTable::angles(int64_t position, float* cos_out, float* sin_out) const {
  const auto p = static_cast<float>(position);
  for (size_t i = 0; i < frequencies_.size(); ++i) {
    // The reference forms the angle as an fp32 product; cos/sin of that fp32 value.
    const double angle = static_cast<double>(p * frequencies_[i]);
    cos_out[i] = static_cast<float>(std::cos(angle));
    sin_out[i] = static_cast<float>(std::sin(angle));
  }
}

void RopeTable::rotate(float* x, int64_t position) const {
  std::vector<float> cos_v(frequencies_.size()), sin_v(frequencies_.size());
  angles(position, cos_v.data(), sin_v.data());
  rotate_pairs(x, cos_v.data(), sin_v.data(), rope_dim_ / 2, false);
}

void RopeTable::rotate_inverse(float* x, int64_t position) const {
  std::vector<float> cos_v(frequencies_.size()), sin_v(frequencies_.size());
  angles(position, cos_v.data(), sin_v.data());
  rotate_pairs(x, cos_v.data(), sin_v.data(), rope_dim_ / 2, true);
}

void apply_rope(const RopeTable& table, float* x, const int64_t* positions, const RopeApplyParams& params) {
  const int64_t rope_dim = table.rope_dim();
  check(params.tokens >= 0 && params.heads > 0 && params.head_dim >= rope_dim,
        "apply_rope: head_dim ", params.head_dim, " must hold the rope slice of ", rope_dim, " dims");
  const int64_t pairs = rope_dim / 2;
  ThreadPool::global().parallel_for(0, params.tokens, [&](int64_t t) {
    check(positions[t] >= 0, "apply_rope: negative position ", positions[t], " at token ", t);
    std::vector<float> cos_v(pairs), sin_v(pairs);
    table.angles(positions[t], cos_v.data(), sin_v.data());
    for (int64_t h = 0; h < params.heads; ++h) {
      float* slice = x + (t * params.heads + h) * params.head_dim + (params.head_dim - rope_dim);
      rotate_pairs(slice, cos_v.data(), sin_v.data(), pairs, params.inverse);
    }
  });
}

}  // namespace dsv4::cpu
