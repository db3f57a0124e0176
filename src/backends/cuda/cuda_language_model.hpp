// CudaModel behind the runtime's LanguageModel interface: each SequenceCache the runtime creates holds one of the
// model's sequence slots and gives it back when destroyed.
#pragma once

#include "backends/cuda/cuda_model.hpp"
#include "model/language_model.hpp"

#include <memory>

namespace dsv4::cuda {

class CudaLanguageModel final : public LanguageModel {
 public:
  CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights, const CudaModelOptions& options);

  const ModelConfig& config() const override { return model_->config(); }
  std::string device() const override { return model_->describe(); }
  int64_t context_length() const override { return model_->options().max_context; }
  std::unique_ptr<SequenceCache> new_sequence() override;
  void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
               std::vector<float>& logits) override;

 private:
  std::shared_ptr<CudaModel> model_;  // shared with the sequences, which may outlive this object briefly
};

}  // namespace dsv4::cuda
