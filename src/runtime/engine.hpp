// A loaded model ready to run: checkpoint weights, tokenizer, backend and forward pass, plus the generation loop
// (prefill in chunks, then one token per step, sampling, stop conditions, UTF-8-safe streaming) of one sequence. The
// CLI's generate, chat and logits commands sit on top of it; runtime/batch_generator.hpp runs many requests at once
// on its model.
#pragma once

#include "backends/cpu/cpu_backend.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/language_model.hpp"
#include "runtime/generation_stream.hpp"
#include "tokenizer/bpe_tokenizer.hpp"

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace dsv4 {

struct EngineOptions {
  std::string model_dir;
  NumericsMode numerics = NumericsMode::Exact;
  int64_t prefill_chunk = 512;  // tokens per prefill call: bounds the activation memory of a long prompt
  bool progress = true;         // load progress on stderr
  // "cpu", "cuda" / "cuda:N", or "auto": the first GPU when this build has the CUDA backend and one is present.
  std::string device = "auto";
  // Tokens a sequence may hold; 0 = the model's context on the CPU, min(model's, 8192) on a GPU (whose KV cache and
  // indexer buffers are sized for it up front).
  int64_t max_context = 0;
  // On a GPU, decode steps pick the next token on the device (kernels/sampling.hpp): the logits stay there and only
  // the token comes back. Same parameters and random stream as the CPU Sampler, so the same tokens.
  bool sample_on_device = true;
  // Sequences that may run at once (BatchGenerator's max_batch): on a GPU, the sequence slots whose KV cache and
  // state are allocated at load, and a step's token capacity (prefill_chunk + max_batch - 1, so a prompt chunk fits
  // beside every other sequence's decode token).
  int max_batch = 1;
  // On a GPU, the logit adjustments (one per token a row's penalties or logit_bias touch) the device sampling buffers
  // hold per sampling launch (--sampling-buffer); 0 = cuda::default_sampling_adjustments (a batch's rows in the
  // common case, at most 8 vocabularies). A step that brings more samples its rows in several launches.
  int64_t sampling_adjustments = 0;
};

class Engine {
 public:
  explicit Engine(const EngineOptions& options);

  const EngineOptions& options() const { return options_; }
  const ModelConfig& config() const { return checkpoint_.config; }
  const LoadedCheckpoint& checkpoint() const { return checkpoint_; }
  LanguageModel& model() { return *model_; }
  bool has_tokenizer() const { return tokenizer_.has_value(); }
  // dsv4::Error when the checkpoint directory has no tokenizer.json.
  const Tokenizer& tokenizer() const;
  // The model's end-of-sequence ids (config and tokenizer) that always end a generation.
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }

  // Generates after `prompt`. When the prompt extends the previous call's prompt + output (a chat turn), only the
  // new tokens are prefilled; otherwise the sequence starts afresh. `cancel` (may be null) stops it at the next
  // token with FinishReason::Abort. Throws dsv4::Error for an empty prompt or one that leaves no room in the context.
  GenerationResult generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                            const TextCallback& on_text, const std::atomic<bool>* cancel = nullptr);
  // Forgets the reusable sequence (and gives its sequence slot back to the model).
  void reset();

 private:
  std::unique_ptr<LanguageModel> make_model(const EngineOptions& options);
  GenerationResult run_generation(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                  const TextCallback& on_text, const std::atomic<bool>* cancel);

  EngineOptions options_;
  LoadedCheckpoint checkpoint_;
  std::optional<Tokenizer> tokenizer_;
  std::unique_ptr<cpu::CpuBackend> backend_;  // the CPU path only
  std::unique_ptr<LanguageModel> model_;
  std::vector<int32_t> eos_ids_;
  std::unique_ptr<SequenceCache> sequence_;
  std::vector<int32_t> sequence_ids_;  // the tokens the sequence holds
};

}  // namespace dsv4
