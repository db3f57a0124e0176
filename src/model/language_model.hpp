// What the runtime drives: a model that runs a sequence's next tokens and returns logits, whatever runs it (the
// CPU backend through Dsv4Model, or the GPU's CudaModel). Sequences are created by the model that runs them. A model
// whose logits live on a device may also pick the next token there (samples_on_device), so that only the token
// comes back.
#pragma once

#include "core/error.hpp"
#include "core/sampling_math.hpp"
#include "io/model_config.hpp"
#include "model/backend.hpp"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace dsv4 {

// Which positions of a call get logits.
enum class LogitRows { All, Last };

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
};

}  // namespace dsv4
