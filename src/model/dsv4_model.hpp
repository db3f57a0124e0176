// The DeepSeek-V4 forward pass (dsv4-model.md §2), written once against the Backend interface: embedding, the
// blocks with their two mHC sites, the final collapse, norm and LM head. Any split of a sequence into calls
// (one prefill, chunked prefill, token-by-token decode) gives the same logits.
#pragma once

#include "io/model_config.hpp"
#include "model/backend.hpp"
#include "model/language_model.hpp"
#include "model/model_weights.hpp"

#include <span>
#include <vector>

namespace dsv4 {

class Dsv4Model final : public LanguageModel {
 public:
  // Borrows all three; they must outlive the model.
  Dsv4Model(const ModelConfig& config, const ModelWeights& weights, Backend& backend);

  std::unique_ptr<SequenceCache> new_sequence() override { return backend_.new_sequence(); }
  void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
               std::vector<float>& logits) override;
  const ModelConfig& config() const override { return config_; }
  std::string device() const override { return std::string(backend_.name()); }
  int64_t context_length() const override { return config_.max_position_embeddings; }

 private:
  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
};

}  // namespace dsv4
