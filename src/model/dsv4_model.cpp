#include "model/dsv4_model.hpp"

#include "core/error.hpp"

#include <algorithm>

namespace dsv4 {

Dsv4Model::Dsv4Model(const ModelConfig& config, const ModelWeights& weights, Backend& backend)
    : config_(config), weights_(weights), backend_(backend) {
  check(int(weights.layers.size()) == config.num_layers, "model weights hold ", weights.layers.size(),
        " layers, the config ", config.num_layers);
}

void Dsv4Model::forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
                        std::vector<float>& logits) {
  const int64_t T = int64_t(ids.size());
  const int64_t d = config_.hidden_size, n = config_.mhc.hc_mult, vocab = config_.vocab_size;
  check(T > 0, "forward: no tokens");
  for (int64_t t = 0; t < T; ++t)
    check(ids[t] >= 0 && ids[t] < vocab, "token id ", ids[t], " at index ", t, " is outside the vocabulary [0, ",
          vocab, ")");
  check(sequence.length() + T <= config_.max_position_embeddings, "sequence of ", sequence.length() + T,
        " tokens exceeds the model's context of ", config_.max_position_embeddings, " tokens");

  // Residual streams X [T, n, d]: every stream starts as the token's embedding.
  std::vector<float> e(size_t(T * d)), X(size_t(T * n * d));
  backend_.embed(weights_.embed, ids.data(), T, e.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < n; ++k) std::copy_n(&e[size_t(t * d)], d, &X[size_t((t * n + k) * d)]);
  backend_.round_residual(X.data(), int64_t(X.size()));

  std::vector<float> y(size_t(T * d)), normed(size_t(T * d)), out(size_t(T * d));
  std::vector<float> post(size_t(T * n)), comb(size_t(T * n * n));
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    const BlockWeights& block = weights_.layers[size_t(layer)];

    backend_.hc_pre(block.hc_attn, X.data(), T, y.data(), post.data(), comb.data());
    backend_.rms_norm(y.data(), block.attn_norm, T, normed.data());
    backend_.attention(layer, block.attn, sequence, normed.data(), T, out.data());
    backend_.hc_post(out.data(), X.data(), post.data(), comb.data(), T, X.data());
    backend_.round_residual(X.data(), int64_t(X.size()));

    backend_.hc_pre(block.hc_ffn, X.data(), T, y.data(), post.data(), comb.data());
    backend_.rms_norm(y.data(), block.ffn_norm, T, normed.data());
    backend_.moe(block.ffn, normed.data(), ids.data(), T, out.data());
    backend_.hc_post(out.data(), X.data(), post.data(), comb.data(), T, X.data());
    backend_.round_residual(X.data(), int64_t(X.size()));
  }

  // Logits only where asked: decoding needs the last position alone.
  const int64_t first = rows == LogitRows::All ? 0 : T - 1, count = T - first;
  std::vector<float> h(size_t(count * d));
  backend_.hc_head(weights_.hc_head, &X[size_t(first * n * d)], count, h.data());
  backend_.rms_norm(h.data(), weights_.norm, count, h.data());
  logits.resize(size_t(count * vocab));
  backend_.linear(weights_.head, h.data(), count, logits.data());
}

}  // namespace dsv4
