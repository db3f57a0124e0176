#include "backends/cuda/cuda_language_model.hpp"

#include <algorithm>
#include <cstring>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sampling.hpp"
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

CudaSequence& cuda_sequence(SequenceCache& sequence) {
  auto* cuda_sequence = dynamic_cast<CudaSequence*>(&sequence);
  check(cuda_sequence != nullptr, "CUDA model: the sequence was not created by this model");
  return *cuda_sequence;
}

// Page-locked host memory, so the per-step copies are asynchronous on the model's stream.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t bytes) { DSV4_CUDA_CHECK(cudaMallocHost(&data_, bytes)); }
  ~PinnedBuffer() { cudaFreeHost(data_); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
};

}  // namespace

// The sampling kernel's inputs (one RowParams, then the adjustments) and its result, on the device and staged in
// pinned memory. Grows only when a step brings more adjustments than ever before.
struct CudaLanguageModel::DeviceSampling {
  static size_t step_bytes(size_t adjustments) {
    return sizeof(sampling::RowParams) + adjustments * sizeof(sampling::LogitAdjustment);
  }

  explicit DeviceSampling(size_t adjustments)
      : capacity(adjustments),
        device_step(step_bytes(adjustments), "sampling step"),
        host_step(step_bytes(adjustments)),
        device_result(sizeof(SampledToken), "sampled token"),
        host_result(sizeof(SampledToken)) {}

  size_t capacity;
  DeviceBuffer device_step;
  PinnedBuffer host_step;
  DeviceBuffer device_result;
  PinnedBuffer host_result;
};

CudaLanguageModel::CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights,
                                     const CudaModelOptions& options)
    : model_(std::make_shared<CudaModel>(config, weights, options)),
      // Room for a step whose every context token is adjusted, plus a logit_bias of 1024 tokens.
      sampling_(std::make_unique<DeviceSampling>(size_t(options.max_context) + 1024)) {}

CudaLanguageModel::~CudaLanguageModel() = default;

std::unique_ptr<SequenceCache> CudaLanguageModel::new_sequence() { return std::make_unique<CudaSequence>(model_); }

void CudaLanguageModel::forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
                                std::vector<float>& logits) {
  model_->forward(cuda_sequence(sequence).slot(), ids, rows, logits);
}

int32_t CudaLanguageModel::forward_and_sample(SequenceCache& sequence, int32_t id, const sampling::SamplingStep& step) {
  const int slot = cuda_sequence(sequence).slot();
  if (step.adjustments.size() > sampling_->capacity) {
    sampling_ = std::make_unique<DeviceSampling>(std::max(step.adjustments.size(), 2 * sampling_->capacity));
  }
  DeviceSampling& buffers = *sampling_;
  sampling::RowParams row = step.row;
  row.adjustments_begin = 0;
  row.adjustments_count = int32_t(step.adjustments.size());
  auto* staged = static_cast<unsigned char*>(buffers.host_step.data());
  std::memcpy(staged, &row, sizeof row);
  if (!step.adjustments.empty()) {
    std::memcpy(staged + sizeof row, step.adjustments.data(), step.adjustments.size_bytes());
  }
  const cudaStream_t stream = model_->stream();
  // The parameters go first, so the sampling kernel follows the step's last kernel directly.
  const size_t step_bytes = DeviceSampling::step_bytes(step.adjustments.size());
  DSV4_CUDA_CHECK(
      cudaMemcpyAsync(buffers.device_step.data(), staged, step_bytes, cudaMemcpyHostToDevice, stream));
  const float* logits = model_->decode_on_device(std::span(&slot, 1), std::span(&id, 1));
  SamplingLaunchParams launch;
  launch.logits = logits;
  launch.rows = 1;
  launch.vocab = model_->config().vocab_size;
  launch.row_stride = launch.vocab;
  launch.row_params = buffers.device_step.as<sampling::RowParams>();
  launch.adjustments = reinterpret_cast<const sampling::LogitAdjustment*>(
      buffers.device_step.as<unsigned char>() + sizeof(sampling::RowParams));
  launch.results = buffers.device_result.as<SampledToken>();
  launch.any_top_p = row.top_p < 1.0f;
  launch.stream = stream;
  run_sampling(launch);
  DSV4_CUDA_CHECK(cudaMemcpyAsync(buffers.host_result.data(), launch.results, sizeof(SampledToken),
                                  cudaMemcpyDeviceToHost, stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  const SampledToken result = *static_cast<const SampledToken*>(buffers.host_result.data());
  check_sampled_token(result);
  return result.token;
}

}  // namespace dsv4::cuda
