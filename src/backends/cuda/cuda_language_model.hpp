// CudaModel behind the runtime's LanguageModel interface: each SequenceCache the runtime creates holds one of the
// model's sequence slots and gives it back when destroyed. Batched steps whose entries are all one token run as one
// decode step (CudaModel::decode_on_device: a CUDA graph per batch size, replayed); steps with prompt chunks run as
// one mixed kernel pass (CudaModel::step). Steps can sample on the device (forward_and_sample,
// forward_batch_and_sample): the logits stay there, one sampling launch over the step's rows reads them (its buffers
// are the model's, sized in its memory plan: CudaModelOptions::sampling_adjustments, 0 =
// default_sampling_adjustments; at least the vocabulary), and only the chosen tokens are copied back.
#pragma once

#include "backends/cuda/cuda_model.hpp"
#include "model/language_model.hpp"

#include <memory>

namespace dsv4::cuda {

// The logit adjustments (one per token a row's penalties or logit_bias touch) the sampling buffers hold when
// CudaModelOptions::sampling_adjustments is 0: every row of a step whose sequences' whole contexts are distinct tokens
// and which bring up to 1024 biases each, but at most 8 rows of a whole vocabulary (16 B each: 16.5 MB at
// DeepSeek's 129,280 tokens, and a pinned host copy as large) and at least one. A step that brings more (long
// penalised contexts in large batches: rare) samples its rows in several launches.
int64_t default_sampling_adjustments(int64_t vocab, int64_t max_sequences, int64_t max_context);

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
  // max_sequences entries; max(max_step_tokens, max_sequences) tokens, max_step_tokens of one entry.
  BatchLimits batch_limits() const override;
  void forward_batch(std::span<const BatchEntry> entries, std::vector<float>& logits) override;
  // The decode step (one-token entries) or the mixed step (prompt chunks) leaving its logits on the device, then one
  // sampling launch over its rows there (several only when the entries bring more logit adjustments than the
  // buffers were planned for).
  void forward_batch_and_sample(std::span<const BatchEntry> entries, std::vector<SampledEntry>& tokens) override;

 private:
  struct DeviceSampling;

  std::shared_ptr<CudaModel> model_;  // shared with the sequences, which may outlive this object briefly
  std::unique_ptr<DeviceSampling> sampling_;
};

}  // namespace dsv4::cuda
