// KV compressor (dsv4-model.md §3.2): pools every `ratio` tokens into one compressed entry.
// HCA (ratio ≠ 4): entry w = per-channel softmax over the window's ratio slots of (wgate·x + ape) applied to wkv·x.
// CSA (ratio 4, overlapping): the projections are 2c wide, [A | B]; entry w pools 2·ratio slots in one joint softmax:
// the (A, ZA) halves of window w−1 and the (B, ZB) halves of window w (window −1 contributes weight 0).
// Then C_w = norm(C_w) (DeepSeek rounds C_w to bf16 first: round_pooled_to_bf16) and RoPE on its last rope_dim
// dims at position ratio·w, the window's FIRST token. The caller stores the entry, rounding it per §3.5 in reference
// mode (fp8 KV for the main compressor, Hadamard + fp4 for the indexer's).
// The state makes any split of a sequence into chunks give exactly the entries of one pass.
#pragma once

#include <cstdint>
#include <vector>

#include "backends/cpu/rope.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4::cpu {

struct CompressorParams {
  int64_t hidden = 0;     // d
  int64_t head_dim = 0;   // c: 512 for the main compressor, 128 for the indexer's
  int64_t ratio = 0;      // m: 4 on CSA layers, e.g. 128 on HCA layers
  // CSA layers pool overlapping windows (two series per token); HCA layers do not. The layer kind decides, not the
  // ratio: a config may give CSA another rate (transformers' compress_rates).
  bool overlapping = false;
  float norm_eps = 1e-6f;
  bool round_pooled_to_bf16 = false;  // DeepSeek's norm(bf16(C_w)); false keeps fp32 (HuggingFace)

  int64_t projection_width() const { return overlapping ? 2 * head_dim : head_dim; }  // coff·c
};

struct CompressorWeights {
  const QuantizedMatrix* wkv = nullptr;    // [coff·c, d]
  const QuantizedMatrix* wgate = nullptr;  // [coff·c, d]
  const float* ape = nullptr;              // [ratio, coff·c] position bias, added to the gate
  const float* norm = nullptr;             // [c] RMSNorm weight
};

// What one sequence's compressor (one layer, main or indexer) carries between calls.
class CompressorState {
 public:
  CompressorState(int64_t ratio, int64_t head_dim, bool overlapping);

  int64_t tokens_seen() const { return tokens_seen_; }          // absolute position of the next token
  int64_t entries_emitted() const { return entries_emitted_; }  // compressed entries produced so far
  void reset();

 private:
  friend int64_t compressor_pool(const CompressorParams&, const CompressorWeights&, const RopeTable&,
                                 CompressorState&, const float*, const float*, int64_t, std::vector<float>&);
  int64_t ratio_;
  int64_t head_dim_;
  bool overlapping_;
  int64_t tokens_seen_ = 0;
  int64_t entries_emitted_ = 0;
  // The current incomplete window, slot = position mod ratio: [ratio, coff·c] values and gate scores (ape added).
  std::vector<float> window_kv_;
  std::vector<float> window_score_;
  // CSA only: the (A, ZA) halves of the last complete window, [ratio, c]; scores −inf before the first window.
  std::vector<float> previous_kv_;
  std::vector<float> previous_score_;
};

// Pools already-projected tokens. kv, gate: [T, coff·c] (wkv·x and wgate·x, without ape) of the T tokens at
// positions state.tokens_seen() … +T−1. Appends each completed entry ([c] floats, normalised and rotated) to
// `entries` and returns how many were appended. Uses weights.ape and weights.norm only.
int64_t compressor_pool(const CompressorParams& params, const CompressorWeights& weights, const RopeTable& rope,
                        CompressorState& state, const float* kv, const float* gate, int64_t T,
                        std::vector<float>& entries);

// Projects x: [T, d] with wkv and wgate (fp32 math), then compressor_pool.
int64_t compressor_step(const CompressorParams& params, const CompressorWeights& weights, const RopeTable& rope,
                        CompressorState& state, const float* x, int64_t T, std::vector<float>& entries);

}  // namespace dsv4::cpu
