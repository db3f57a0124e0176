#include "backends/cuda/cuda_language_model.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
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

// A row brings up to this many logit_bias entries in the planned case.
constexpr int64_t kPlannedLogitBias = 1024;
// The default buffers hold at most this many rows of a whole vocabulary's adjustments.
constexpr int64_t kPlannedVocabularyRows = 8;

CudaModelOptions with_sampling_buffers(const ModelConfig& config, CudaModelOptions options) {
  const int64_t vocab = config.vocab_size;
  if (options.sampling_adjustments == 0)
    options.sampling_adjustments =
        default_sampling_adjustments(vocab, options.max_sequences, options.max_context);
  check(options.sampling_adjustments >= vocab, "--sampling-buffer (sampling_adjustments) ", options.sampling_adjustments,
        " is below the vocabulary (", vocab, "): a row may adjust every token");
  return options;
}

}  // namespace

int64_t default_sampling_adjustments(int64_t vocab, int64_t max_sequences, int64_t max_context) {
  const int64_t per_row = std::min(vocab, max_context + kPlannedLogitBias);
  return std::max(vocab, std::min(max_sequences * per_row, kPlannedVocabularyRows * vocab));
}

// The sampling kernel's inputs staged in pinned memory (a launch's RowParams, then its rows' adjustments right after
// them, so that one copy moves both into the model's sampling buffers) and its results, for up to `rows` rows.
struct CudaLanguageModel::DeviceSampling {
  explicit DeviceSampling(const SamplingBuffers& device, size_t rows)
      : device(device), rows(rows), host_inputs(device.inputs_bytes), host_results(rows * sizeof(SampledToken)) {}

  sampling::RowParams* host_rows() const { return static_cast<sampling::RowParams*>(host_inputs.data()); }
  // Where the adjustments of a launch of `launch_rows` rows start (RowParams' size keeps them aligned).
  static_assert(sizeof(sampling::RowParams) % alignof(sampling::LogitAdjustment) == 0,
                "the adjustments follow the rows' parameters in one buffer");
  static sampling::LogitAdjustment* adjustments_after(void* inputs, size_t launch_rows) {
    return reinterpret_cast<sampling::LogitAdjustment*>(static_cast<unsigned char*>(inputs) +
                                                        launch_rows * sizeof(sampling::RowParams));
  }
  // Whether a launch of `launch_rows` rows and `adjustments` adjustments fits the buffers.
  bool fits(size_t launch_rows, size_t adjustments) const {
    return launch_rows * sizeof(sampling::RowParams) + adjustments * sizeof(sampling::LogitAdjustment) <=
           device.inputs_bytes;
  }

  SamplingBuffers device;
  size_t rows;
  PinnedBuffer host_inputs;
  PinnedBuffer host_results;
};

CudaLanguageModel::CudaLanguageModel(const ModelConfig& config, const ModelWeights& weights,
                                     const CudaModelOptions& options)
    : model_(std::make_shared<CudaModel>(config, weights, with_sampling_buffers(config, options))),
      sampling_(std::make_unique<DeviceSampling>(model_->sampling_buffers(), size_t(options.max_sequences))) {}

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
  DeviceSampling& buffers = *sampling_;
  // Every entry is a row of the step's logits and of the sampling launch (one without sampling draws a greedy token
  // that is ignored, so the launch reads the logits in place). The rows go in launches of consecutive rows whose
  // adjustments fit the buffers: one launch unless the step brings more than were planned for.
  std::vector<size_t> launch_begin{0};
  size_t launch_adjustments = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const size_t count = entries[i].sampling ? entries[i].sampling->adjustments.size() : 0;
    check(buffers.fits(1, count), "batched step: entry ", i, " brings ", count,
          " logit adjustments, more than the sampling buffers hold");
    if (!buffers.fits(i + 1 - launch_begin.back(), launch_adjustments + count)) {
      launch_begin.push_back(i);
      launch_adjustments = 0;
    }
    launch_adjustments += count;
  }
  launch_begin.push_back(entries.size());

  const cudaStream_t stream = model_->stream();
  // Stages launch l's rows and queues their copy to the device; returns whether some row has top_p < 1.
  auto stage = [&](size_t l) {
    const size_t begin = launch_begin[l], rows = launch_begin[l + 1] - begin;
    sampling::LogitAdjustment* staged_adjustments = DeviceSampling::adjustments_after(buffers.host_inputs.data(), rows);
    bool any_top_p = false;
    int32_t next_adjustment = 0;
    for (size_t r = 0; r < rows; ++r) {
      const sampling::SamplingStep* step = entries[begin + r].sampling;
      sampling::RowParams row;
      row.temperature = 0.0f;  // an unsampled row: greedy, no draw
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
    const size_t bytes =
        rows * sizeof(sampling::RowParams) + size_t(next_adjustment) * sizeof(sampling::LogitAdjustment);
    DSV4_CUDA_CHECK(cudaMemcpyAsync(buffers.device.inputs, buffers.host_rows(), bytes, cudaMemcpyHostToDevice, stream));
    return any_top_p;
  };

  // The first launch's inputs go up before the step, so the sampling kernel follows the step's last kernel directly.
  bool any_top_p = stage(0);
  std::vector<int> slots;
  for (const BatchEntry& e : entries) slots.push_back(cuda_sequence(e.sequence).slot());
  const float* logits = nullptr;
  if (all_single_tokens(entries)) {
    std::vector<int32_t> ids;
    for (const BatchEntry& e : entries) ids.push_back(e.ids[0]);
    logits = model_->decode_on_device(slots, ids);
  } else {
    std::vector<StepSequence> sequences;
    for (size_t i = 0; i < entries.size(); ++i) sequences.push_back(StepSequence{slots[i], entries[i].ids});
    logits = model_->step_on_device(sequences);
  }

  auto* results = static_cast<SampledToken*>(buffers.host_results.data());
  for (size_t l = 0; l + 1 < launch_begin.size(); ++l) {
    const size_t begin = launch_begin[l], rows = launch_begin[l + 1] - begin;
    if (l > 0) {
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));  // the previous launch's inputs have left the staging
      any_top_p = stage(l);
    }
    SamplingLaunchParams launch;
    launch.logits = logits + begin * size_t(vocab);
    launch.rows = int64_t(rows);
    launch.vocab = vocab;
    launch.row_stride = vocab;
    launch.row_params = static_cast<const sampling::RowParams*>(buffers.device.inputs);
    launch.adjustments = DeviceSampling::adjustments_after(buffers.device.inputs, rows);
    launch.results = buffers.device.results;
    launch.any_top_p = any_top_p;
    launch.stream = stream;
    run_sampling(launch);
    DSV4_CUDA_CHECK(cudaMemcpyAsync(results + begin, launch.results, rows * sizeof(SampledToken),
                                    cudaMemcpyDeviceToHost, stream));
  }
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  tokens.assign(entries.size(), SampledEntry{});
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!entries[i].sampling) continue;
    try {
      check_sampled_token(results[i]);
      tokens[i].token = results[i].token;
    } catch (const Error& e) {
      tokens[i].error = e.what();
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
