#include "backends/cuda/cuda_language_model.hpp"

#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

class CudaSequence final : public SequenceCache {
 public:
  explicit CudaSequence(std::shared_ptr<CudaModel> model) : model_(std::move(model)), slot_(model_->add_sequence()) {}
  ~CudaSequence() override { model_->release_sequence(slot_); }
  int64_t length() const override { return model_->length(slot_); }
  int slot() const { return slot_; }

 private:
  std::shared_ptr<CudaModel> model_;
  int slot_;
};

}  // namespace

CudaLanguageModel::CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights,
                                     const CudaModelOptions& options)
    : model_(std::make_shared<CudaModel>(config, weights, options)) {}

std::unique_ptr<SequenceCache> CudaLanguageModel::new_sequence() { return std::make_unique<CudaSequence>(model_); }

void CudaLanguageModel::forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
                                std::vector<float>& logits) {
  auto* cuda_sequence = dynamic_cast<CudaSequence*>(&sequence);
  check(cuda_sequence != nullptr, "CUDA model: the sequence was not created by this model");
  model_->forward(cuda_sequence->slot(), ids, rows, logits);
}

}  // namespace dsv4::cuda
