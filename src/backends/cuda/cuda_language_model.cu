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

CudaSequence& cuda_sequence(SequenceCache* sequence) {
  auto* cuda_sequence = dynamic_cast<CudaSequence*>(sequence);
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

bool all_single_tokens(std::span<const BatchEntry> entries) {
  return std::all_of(entries.begin(), entries.end(), [](const BatchEntry& e) { return e.ids.size() == 1; });
}

}  // namespace

// The sampling kernel's inputs (a step's RowParams, then its rows' adjustments right after them, so that one copy
// moves both) and results, on the device and staged in pinned memory, for up to `rows` rows. Grows only when a step
// brings more adjustments than ever before. The logits of the rows a mixed step samples are uploaded into `logits`
// (allocated on the first such step).
struct CudaLanguageModel::DeviceSampling {
  DeviceSampling(size_t rows, size_t adjustments)
      : rows(rows),
        adjustments(adjustments),
        device_inputs(input_bytes(rows, adjustments), "sampling rows"),
        host_inputs(input_bytes(rows, adjustments)),
        device_results(rows * sizeof(SampledToken), "sampled tokens"),
        host_results(rows * sizeof(SampledToken)) {}

  static size_t input_bytes(size_t rows, size_t adjustments) {
    return rows * sizeof(sampling::RowParams) + adjustments * sizeof(sampling::LogitAdjustment);
  }
  sampling::RowParams* host_rows() const { return static_cast<sampling::RowParams*>(host_inputs.data()); }
  // Where the adjustments of a step of `step_rows` rows start (RowParams' size keeps them aligned).
  static_assert(sizeof(sampling::RowParams) % alignof(sampling::LogitAdjustment) == 0,
                "the adjustments follow the rows' parameters in one buffer");
  static sampling::LogitAdjustment* adjustments_after(void* inputs, size_t step_rows) {
    return reinterpret_cast<sampling::LogitAdjustment*>(static_cast<unsigned char*>(inputs) +
                                                        step_rows * sizeof(sampling::RowParams));
  }

  size_t rows;
  size_t adjustments;
  DeviceBuffer device_inputs;
  PinnedBuffer host_inputs;
  DeviceBuffer device_results;
  PinnedBuffer host_results;
  std::unique_ptr<DeviceBuffer> logits;  // [rows, vocab] fp32
};

CudaLanguageModel::CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights,
                                     const CudaModelOptions& options)
    : model_(std::make_shared<CudaModel>(config, weights, options)),
      // Room for a row whose every context token is adjusted, plus a logit_bias of 1024 tokens; grows on demand.
      sampling_(std::make_unique<DeviceSampling>(size_t(options.max_sequences), size_t(options.max_context) + 1024)) {}

CudaLanguageModel::~CudaLanguageModel() = default;

std::unique_ptr<SequenceCache> CudaLanguageModel::new_sequence() { return std::make_unique<CudaSequence>(model_); }

void CudaLanguageModel::forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
                                std::vector<float>& logits) {
  model_->forward(cuda_sequence(&sequence).slot(), ids, rows, logits);
}

BatchLimits CudaLanguageModel::batch_limits() const {
  const CudaModelOptions& o = model_->options();
  BatchLimits limits;
  limits.sequences = o.max_sequences;
  limits.tokens = std::max<int64_t>(o.max_step_tokens, o.max_sequences);
  limits.entry_tokens = o.max_step_tokens;
  return limits;
}

void CudaLanguageModel::forward_batch(std::span<const BatchEntry> entries, std::vector<float>& logits) {
  check(!entries.empty(), "batched step: no sequences");
  if (all_single_tokens(entries)) {
    std::vector<int> slots;
    std::vector<int32_t> ids;
    for (const BatchEntry& e : entries) {
      slots.push_back(cuda_sequence(e.sequence).slot());
      ids.push_back(e.ids[0]);
    }
    model_->decode(slots, ids, logits);
    return;
  }
  std::vector<StepSequence> sequences;
  for (const BatchEntry& e : entries) sequences.push_back(StepSequence{cuda_sequence(e.sequence).slot(), e.ids});
  model_->step(sequences, logits);
}

void CudaLanguageModel::forward_batch_and_sample(std::span<const BatchEntry> entries,
                                                 std::vector<SampledEntry>& tokens) {
  check(!entries.empty(), "batched step: no sequences");
  check(entries.size() <= sampling_->rows, "batched step: ", entries.size(), " sequences exceed max_sequences ",
        sampling_->rows);
  const int64_t vocab = model_->config().vocab_size;
  const bool decode = all_single_tokens(entries);
  // Sampled rows: every entry of a decode step (one without sampling draws a greedy token that is ignored, so the
  // launch reads the logits in place); only the entries that sample after a mixed step.
  std::vector<size_t> row_entry;
  size_t adjustment_count = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].sampling) adjustment_count += entries[i].sampling->adjustments.size();
    if (decode || entries[i].sampling) row_entry.push_back(i);
  }
  if (adjustment_count > sampling_->adjustments) {
    sampling_ = std::make_unique<DeviceSampling>(sampling_->rows,
                                                 std::max(adjustment_count, 2 * sampling_->adjustments));
  }
  DeviceSampling& buffers = *sampling_;
  sampling::LogitAdjustment* staged_adjustments =
      DeviceSampling::adjustments_after(buffers.host_inputs.data(), row_entry.size());
  bool any_top_p = false;
  int32_t next_adjustment = 0;
  for (size_t r = 0; r < row_entry.size(); ++r) {
    const sampling::SamplingStep* step = entries[row_entry[r]].sampling;
    sampling::RowParams row;
    row.temperature = 0.0f;  // an unsampled decode row: greedy, no draw
    if (step) {
      row = step->row;
      row.adjustments_begin = next_adjustment;
      row.adjustments_count = int32_t(step->adjustments.size());
      std::copy(step->adjustments.begin(), step->adjustments.end(), staged_adjustments + next_adjustment);
      next_adjustment += row.adjustments_count;
      any_top_p = any_top_p || row.top_p < 1.0f;
    }
    buffers.host_rows()[r] = row;
  }

  const cudaStream_t stream = model_->stream();
  // The inputs go up before the step, so the sampling kernel follows the step's last kernel directly.
  if (!row_entry.empty()) {
    const size_t bytes = row_entry.size() * sizeof(sampling::RowParams) +
                         size_t(next_adjustment) * sizeof(sampling::LogitAdjustment);
    DSV4_CUDA_CHECK(
        cudaMemcpyAsync(buffers.device_inputs.data(), buffers.host_rows(), bytes, cudaMemcpyHostToDevice, stream));
  }

  const float* logits = nullptr;
  std::vector<float> host_logits;
  if (decode) {
    std::vector<int> slots;
    std::vector<int32_t> ids;
    for (const BatchEntry& e : entries) {
      slots.push_back(cuda_sequence(e.sequence).slot());
      ids.push_back(e.ids[0]);
    }
    logits = model_->decode_on_device(slots, ids);
  } else {
    std::vector<StepSequence> sequences;
    for (const BatchEntry& e : entries) sequences.push_back(StepSequence{cuda_sequence(e.sequence).slot(), e.ids});
    model_->step(sequences, host_logits);
    if (!buffers.logits) {
      buffers.logits = std::make_unique<DeviceBuffer>(buffers.rows * size_t(vocab) * sizeof(float), "sampled logits");
    }
    for (size_t r = 0; r < row_entry.size(); ++r) {
      DSV4_CUDA_CHECK(cudaMemcpyAsync(buffers.logits->as<float>() + r * size_t(vocab),
                                      host_logits.data() + row_entry[r] * size_t(vocab), size_t(vocab) * sizeof(float),
                                      cudaMemcpyHostToDevice, stream));
    }
    logits = buffers.logits->as<float>();
  }

  tokens.assign(entries.size(), SampledEntry{});
  if (row_entry.empty()) return;
  SamplingLaunchParams launch;
  launch.logits = logits;
  launch.rows = int64_t(row_entry.size());
  launch.vocab = vocab;
  launch.row_stride = vocab;
  launch.row_params = buffers.device_inputs.as<sampling::RowParams>();
  launch.adjustments = DeviceSampling::adjustments_after(buffers.device_inputs.data(), row_entry.size());
  launch.results = buffers.device_results.as<SampledToken>();
  launch.any_top_p = any_top_p;
  launch.stream = stream;
  run_sampling(launch);
  DSV4_CUDA_CHECK(cudaMemcpyAsync(buffers.host_results.data(), launch.results, row_entry.size() * sizeof(SampledToken),
                                  cudaMemcpyDeviceToHost, stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  const auto* results = static_cast<const SampledToken*>(buffers.host_results.data());
  for (size_t r = 0; r < row_entry.size(); ++r) {
    if (!entries[row_entry[r]].sampling) continue;
    try {
      check_sampled_token(results[r]);
      tokens[row_entry[r]].token = results[r].token;
    } catch (const Error& e) {
      tokens[row_entry[r]].error = e.what();
    }
  }
}

int32_t CudaLanguageModel::forward_and_sample(SequenceCache& sequence, int32_t id, const sampling::SamplingStep& step) {
  const BatchEntry entry{&sequence, std::span(&id, 1), &step};
  std::vector<SampledEntry> tokens;
  forward_batch_and_sample(std::span(&entry, 1), tokens);
  check(tokens[0].error.empty(), tokens[0].error);
  return tokens[0].token;
}

}  // namespace dsv4::cuda
