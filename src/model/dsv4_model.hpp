// The DeepSeek-V4 forward pass (dsv4-model.md §2), written once against the Backend interface: embedding, the
// blocks with their two mHC sites, the final collapse, norm and LM head. Any split of a sequence into calls
// (one prefill, chunked prefill, token-by-token decode) gives the same logits.
#pragma once

#include "io/model_config.hpp"
#include "model/backend.hpp"
#include "model/model_weights.hpp"

#include <span>
#include <vector>

namespace dsv4 {

// Which positions of a call get logits.
enum class LogitRows { All, Last };

class Dsv4Model {
 public:
  // Borrows all three; they must outlive the model.
  Dsv4Model(const ModelConfig& config, const ModelWeights& weights, Backend& backend);

  std::unique_ptr<SequenceCache> new_sequence() { return backend_.new_sequence(); }

  // Runs `ids` at the sequence's next positions and writes fp32 logits [rows, vocab] (rows = ids.size() or 1).
  // Throws dsv4::Error for an empty call, an id outside the vocabulary or a sequence past the context length.
  void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows, std::vector<float>& logits);

  const ModelConfig& config() const { return config_; }

 private:
  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
};

}  // namespace dsv4
