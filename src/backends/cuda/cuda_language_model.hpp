// CudaModel behind the runtime's LanguageModel interface: each SequenceCache the runtime creates holds one of the
// model's sequence slots and gives it back when destroyed. Decode steps can sample on the device
// (forward_and_sample): the logits stay there and only the chosen token is copied back.
#pragma once

#include "backends/cuda/cuda_model.hpp"
#include "model/language_model.hpp"

#include <memory>

namespace dsv4::cuda {

class CudaLanguageModel final : public LanguageModel {
 public:
  CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights, const CudaModelOptions& options);
  ~CudaLanguageModel() override;

  const ModelConfig& config() const override { return model_->config(); }
  std::string device() const override { return model_->describe(); }
  int64_t context_length() const override { return model_->options().max_context; }
  std::unique_ptr<SequenceCache> new_sequence() override;
  void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
               std::vector<float>& logits) override;
  bool samples_on_device() const override { return true; }
  // One decode step of the sequence, then the sampling kernel (kernels/sampling.hpp) on the model's stream.
  int32_t forward_and_sample(SequenceCache& sequence, int32_t id, const sampling::SamplingStep& step) override;

 private:
  struct DeviceSampling;

  std::shared_ptr<CudaModel> model_;  // shared with the sequences, which may outlive this object briefly
  std::unique_ptr<DeviceSampling> sampling_;
};

}  // namespace dsv4::cuda
