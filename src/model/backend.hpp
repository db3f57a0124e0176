// The seam between the model (src/model: layer loop, residual streams, chunking, logits) and the machines that run
// it. A backend implements the operations at the granularity a fast implementation fuses: the mHC sites, norms,
// linear layers, and the two sub-blocks, attention (projections, RoPE, compressor, indexer, sparse attention with
// sink, grouped output projection, cache update) and MoE (routing, experts, shared expert). The CPU backend is the
// numerical reference; every other backend is tested against it.
// Activations are fp32 [T, ...] row-major buffers in memory the backend can address directly.
#pragma once

#include "model/model_weights.hpp"
#include "model/numerics_mode.hpp"

#include <cstdint>
#include <memory>
#include <string_view>

namespace dsv4 {

// One sequence's attention state in every layer: the window ring, compressed KV entries, indexer keys and
// compressor state. Created by the backend that runs the sequence; tokens are appended strictly in order.
class SequenceCache {
 public:
  virtual ~SequenceCache() = default;
  // Tokens stored so far: the position of the next token.
  virtual int64_t length() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string_view name() const = 0;
  virtual NumericsMode numerics() const = 0;

  virtual std::unique_ptr<SequenceCache> new_sequence() = 0;

  // out[t] = table[ids[t]]: [T, d].
  virtual void embed(const QuantizedMatrix& table, const int32_t* ids, int64_t T, float* out) = 0;
  // mHC site: X [T, n, d] -> y [T, d], post [T, n], comb [T, n, n].
  virtual void hc_pre(const HyperConnectionWeights& w, const float* X, int64_t T, float* y, float* post,
                      float* comb) = 0;
  // X_out [T, n, d] = post ⊗ out + combᵀ X (X_out may alias X).
  virtual void hc_post(const float* out, const float* X, const float* post, const float* comb, int64_t T,
                       float* X_out) = 0;
  // Final collapse of the streams: X [T, n, d] -> h [T, d].
  virtual void hc_head(const HyperConnectionWeights& w, const float* X, int64_t T, float* h) = 0;
  // y = RMSNorm(x) · weight over rows of weight.size() values.
  virtual void rms_norm(const float* x, const std::vector<float>& weight, int64_t rows, float* y) = 0;
  // y [T, N] = x [T, K] Wᵀ.
  virtual void linear(const QuantizedMatrix& w, const float* x, int64_t T, float* y) = 0;
  // The attention sub-block of `layer` for T new tokens at positions cache.length() … + T − 1:
  // x [T, d] (attn_norm output) -> out [T, d]. Appends the tokens to the cache.
  virtual void attention(int layer, const AttentionWeights& w, SequenceCache& cache, const float* x, int64_t T,
                         float* out) = 0;
  // The MoE sub-block: u [T, d] (ffn_norm output), token_ids [T] (hash routing) -> out [T, d].
  virtual void moe(const MoeWeights& w, const float* u, const int32_t* token_ids, int64_t T, float* out) = 0;
  // Where the reference keeps the residual streams in bf16 (Reference numerics), rounds them; Exact: no-op.
  virtual void round_residual(float* x, int64_t n) = 0;
};

}  // namespace dsv4
