// What the runtime drives: a model that runs a sequence's next tokens and returns logits, whatever runs it (the
// CPU backend through Dsv4Model, or the GPU's CudaModel). Sequences are created by the model that runs them. A model
// whose logits live on a device may also pick the next token there (samples_on_device), so that only the token
// comes back. A batched step runs several sequences' next tokens (prompt chunks and decode tokens mixed) in one
// call: one kernel pass on a GPU, the sequences one after the other on the CPU.
#pragma once

#include "core/error.hpp"
#include "core/sampling_math.hpp"
#include "io/model_config.hpp"
#include "model/backend.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace dsv4 {

// Which positions of a call get logits.
enum class LogitRows { All, Last };

// One sequence's part of a batched step.
struct BatchEntry {
  SequenceCache* sequence = nullptr;
  std::span<const int32_t> ids;  // its next tokens: a prompt chunk or one decode token
  // forward_batch_and_sample: how to pick the token after ids' last (Sampler::device_step); null: no token wanted
  // (a prompt chunk before the last).
  const sampling::SamplingStep* sampling = nullptr;
};

// What one batched step may hold.
struct BatchLimits {
  int sequences = std::numeric_limits<int>::max();            // entries
  int64_t tokens = std::numeric_limits<int64_t>::max();       // tokens of all entries together
  int64_t entry_tokens = std::numeric_limits<int64_t>::max();  // tokens of one entry
};

// A token picked on the device for one entry of a batched step, or why there is none.
struct SampledEntry {
  int32_t token = -1;  // -1: the entry wanted no token, or `error` says why it has none
  std::string error;   // Sampler::sample's message for NaN / +inf / all -inf logits
};

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  virtual const ModelConfig& config() const = 0;
  // Where it runs, for messages: "cpu", "cuda:0 NVIDIA H200 (...)".
  virtual std::string device() const = 0;
  // Tokens a sequence may hold (the model's context, or less where the device's buffers were sized for less).
  virtual int64_t context_length() const = 0;
  virtual std::unique_ptr<SequenceCache> new_sequence() = 0;
  // Runs `ids` at the sequence's next positions and writes fp32 logits [rows, vocab] (rows = ids.size() or 1).
  // Throws dsv4::Error for an empty call, an id outside the vocabulary or a sequence past the context length.
  virtual void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
                       std::vector<float>& logits) = 0;

  // Whether forward_and_sample is available.
  virtual bool samples_on_device() const { return false; }
  // Runs token `id` at the sequence's next position and picks the next token from its logits on the model's device,
  // with `step` from the sequence's Sampler (Sampler::device_step: parameters, logit adjustments and the draw), so
  // the token is the one Sampler::sample would pick from the same logits. Throws like forward, and like
  // Sampler::sample for NaN / +inf / all -inf logits.
  virtual int32_t forward_and_sample(SequenceCache& /*sequence*/, int32_t /*id*/,
                                     const sampling::SamplingStep& /*step*/) {
    fail("model on ", device(), ": sampling on the device is not supported");
  }

  virtual BatchLimits batch_limits() const { return {}; }
  // Runs every entry's ids at its sequence's next positions (sequences distinct) and writes fp32 logits
  // [entries, vocab], row i for the last token of entry i. Throws like forward; where a step fails after it began,
  // the sequences of the step are in an undefined state (release them). This default runs the entries one after
  // the other through forward: the numbers of separate calls.
  virtual void forward_batch(std::span<const BatchEntry> entries, std::vector<float>& logits) {
    check(!entries.empty(), "batched step: no sequences");
    const size_t vocab = size_t(config().vocab_size);
    logits.resize(entries.size() * vocab);
    std::vector<float> row;
    for (size_t i = 0; i < entries.size(); ++i) {
      check(entries[i].sequence != nullptr, "batched step: entry ", i, " has no sequence");
      forward(*entries[i].sequence, entries[i].ids, LogitRows::Last, row);
      std::copy(row.begin(), row.end(), logits.begin() + int64_t(i * vocab));
    }
  }
  // forward_batch, then each entry with `sampling` picks its next token on the device (samples_on_device), the token
  // Sampler::sample would pick from the same logits; tokens[i] for entry i. A bad row (NaN logits) fails alone, in
  // its SampledEntry::error; a failing step throws like forward_batch.
  virtual void forward_batch_and_sample(std::span<const BatchEntry> /*entries*/,
                                        std::vector<SampledEntry>& /*tokens*/) {
    fail("model on ", device(), ": sampling on the device is not supported");
  }
};

}  // namespace dsv4
