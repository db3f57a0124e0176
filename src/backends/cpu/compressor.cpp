#include "backends/cpu/compressor.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "backends/cpu/bf16_rounding.hpp"
#include "backends/cpu/linear.hpp"
#include "backends/cpu/rms_norm.hpp"
#include "core/error.hpp"

namespace dsv4::cpu {

namespace {

constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();

void check_params(const CompressorParams& p, const RopeTable& rope) {
  check(p.ratio > 0 && p.head_dim > 0 && p.hidden > 0, "compressor: bad parameters ratio=", p.ratio,
        " head_dim=", p.head_dim, " hidden=", p.hidden);
  check(rope.rope_dim() <= p.head_dim, "compressor: rope_dim ", rope.rope_dim(), " exceeds head_dim ", p.head_dim);
}

// One slot source of a pooling: `slots` rows of values and gate scores, `stride` floats apart.
struct PoolSource {
  const float* value = nullptr;
  const float* score = nullptr;
  int64_t slots = 0;
  int64_t stride = 0;
};

// out[i] = Σ_s softmax_s(score[s][i]) · value[s][i] per channel i, one joint softmax over the slots of both sources.
void pool_channels(const PoolSource& first, const PoolSource& second, int64_t channels, float* out) {
  for (int64_t i = 0; i < channels; ++i) {
    float max_score = kMinusInfinity;
    for (const PoolSource* src : {&first, &second})
      for (int64_t s = 0; s < src->slots; ++s) max_score = std::max(max_score, src->score[s * src->stride + i]);
    float denominator = 0.0f;
    float numerator = 0.0f;
    for (const PoolSource* src : {&first, &second}) {
      for (int64_t s = 0; s < src->slots; ++s) {
        const float weight = std::exp(src->score[s * src->stride + i] - max_score);
        denominator += weight;
        // A −inf slot weighs exactly 0; skipping it also keeps its (zero) value from making 0·inf NaNs.
        if (weight != 0.0f) numerator += weight * src->value[s * src->stride + i];
      }
    }
    out[i] = numerator / denominator;
  }
}

}  // namespace

CompressorState::CompressorState(int64_t ratio, int64_t head_dim, bool overlapping)
    : ratio_(ratio), head_dim_(head_dim), overlapping_(overlapping) {
  check(ratio > 0 && head_dim > 0, "CompressorState: bad ratio ", ratio, " or head_dim ", head_dim);
  reset();
}

void CompressorState::reset() {
  const int64_t width = overlapping_ ? 2 * head_dim_ : head_dim_;
  tokens_seen_ = 0;
  entries_emitted_ = 0;
  window_kv_.assign(ratio_ * width, 0.0f);
  window_score_.assign(ratio_ * width, kMinusInfinity);
  if (overlapping_) {
    previous_kv_.assign(ratio_ * head_dim_, 0.0f);
    previous_score_.assign(ratio_ * head_dim_, kMinusInfinity);
  }
}

int64_t compressor_pool(const CompressorParams& p, const CompressorWeights& w, const RopeTable& rope,
                        CompressorState& state, const float* kv, const float* gate, int64_t T,
                        std::vector<float>& entries) {
  check_params(p, rope);
  check(state.ratio_ == p.ratio && state.head_dim_ == p.head_dim && state.overlapping_ == p.overlapping,
        "compressor: state was made for ratio ", state.ratio_, " head_dim ", state.head_dim_, " overlapping ",
        state.overlapping_, ", params say ratio ", p.ratio, " head_dim ", p.head_dim, " overlapping ", p.overlapping);
  check(w.ape != nullptr && w.norm != nullptr, "compressor: ape and norm weights are required");
  check(T >= 0, "compressor: negative token count ", T);
  const int64_t c = p.head_dim;
  const int64_t m = p.ratio;
  const int64_t width = p.projection_width();
  int64_t emitted = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t position = state.tokens_seen_;
    const int64_t slot = position % m;
    float* slot_kv = state.window_kv_.data() + slot * width;
    float* slot_score = state.window_score_.data() + slot * width;
    for (int64_t i = 0; i < width; ++i) {
      slot_kv[i] = kv[t * width + i];
      slot_score[i] = gate[t * width + i] + w.ape[slot * width + i];
    }
    ++state.tokens_seen_;
    if (slot != m - 1) continue;

    // The window is complete: pool it into entry w = position div m.
    const size_t entry_offset = entries.size();
    entries.resize(entry_offset + c);
    float* entry = entries.data() + entry_offset;
    if (p.overlapping) {
      // Slots: (A, ZA) of the previous window, then (B, ZB) of this one (the second halves, columns c..2c).
      pool_channels({state.previous_kv_.data(), state.previous_score_.data(), m, c},
                    {state.window_kv_.data() + c, state.window_score_.data() + c, m, width}, c, entry);
      for (int64_t s = 0; s < m; ++s) {
        std::copy_n(state.window_kv_.data() + s * width, c, state.previous_kv_.data() + s * c);
        std::copy_n(state.window_score_.data() + s * width, c, state.previous_score_.data() + s * c);
      }
    } else {
      pool_channels({state.window_kv_.data(), state.window_score_.data(), m, width}, {}, c, entry);
    }
    if (p.round_pooled_to_bf16) round_to_bf16_inplace(entry, c);
    rms_norm(entry, w.norm, entry, {.rows = 1, .dim = c, .eps = p.norm_eps});
    rope.rotate(entry + (c - rope.rope_dim()), m * state.entries_emitted_);
    ++state.entries_emitted_;
    ++emitted;
  }
  return emitted;
}

int64_t compressor_step(const CompressorParams& p, const CompressorWeights& w, const RopeTable& rope,
                        CompressorState& state, const float* x, int64_t T, std::vector<float>& entries) {
  check_params(p, rope);
  check(w.wkv != nullptr && w.wgate != nullptr, "compressor: wkv and wgate weights are required");
  const int64_t width = p.projection_width();
  check(w.wkv->rows == width && w.wkv->cols == p.hidden && w.wgate->rows == width && w.wgate->cols == p.hidden,
        "compressor: wkv/wgate must be [", width, ", ", p.hidden, "], got [", w.wkv->rows, ", ", w.wkv->cols,
        "] and [", w.wgate->rows, ", ", w.wgate->cols, "]");
  std::vector<float> kv(T * width), gate(T * width);
  linear(*w.wkv, x, T, kv.data());
  linear(*w.wgate, x, T, gate.data());
  return compressor_pool(p, w, rope, state, kv.data(), gate.data(), T, entries);
}

}  // namespace dsv4::cpu
