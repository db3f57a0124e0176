// Continuous batching: many generation requests share one model, a step at a time. Requests are admitted between
// steps while fewer than max_batch run; each step is one batched call of the model (LanguageModel::forward_batch: one
// kernel pass on a GPU) that carries one decode token of every sequence that is generating, plus prompt chunks of
// sequences still prefilling, up to a per-step budget of prompt tokens so a long prompt never stalls the others'
// decoding for more than a bounded step. A request that finishes (stop, length), is cancelled or fails gives its
// sequence (its KV pages, its GPU slot) back at once, and a queued request takes the place at the next step.
//
// Each request generates exactly what Engine::generate gives for it alone with the same prefill chunk: the same
// prompt chunks (unless the model's step limit makes the chunk smaller than Engine's: chunk() tells), its own Sampler
// (random stream) and GenerationStream (stop tokens and strings, max_tokens, text).
// On the CPU the numbers are those of separate calls; on a GPU the batched kernels sum in their own order, so
// logits agree to rounding (and the tokens wherever no two candidates are that close).
//
// A bad request (empty prompt, one that leaves no room in the context, parameters out of range) fails alone when
// submitted; a text callback that throws, or NaN / infinite logits caught by its sampler, fail their request alone;
// a model step that throws fails the requests that were in it (on a GPU that includes NaN indexer scores, which the
// model reports at its next step). Single-threaded: submit, step and take from one thread (the cancel flags may be set
// from any).
#pragma once

#include "model/language_model.hpp"
#include "runtime/generation_stream.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dsv4 {

class Engine;
struct EngineOptions;

struct BatchGeneratorOptions {
  int max_batch = 8;            // sequences running at once
  int64_t prefill_chunk = 512;  // prompt tokens of one sequence per step (Engine's prefill_chunk: the same chunks)
  // Prompt tokens per step, all sequences together: bounds the time a step takes while prompts are being read, so
  // the sequences that generate keep going. At least one chunk always runs (the chunk is capped by the budget).
  int64_t step_prefill_tokens = 512;
  // Where the model samples on its device, only the tokens come back (same tokens as the CPU Sampler).
  bool sample_on_device = true;

  // An engine's settings: its max_batch, prefill_chunk (also the budget) and sample_on_device.
  static BatchGeneratorOptions from(const EngineOptions& engine);
};

struct BatchRequest {
  std::vector<int32_t> prompt;
  SamplingParams params;
  TextCallback on_text;                       // may be empty
  const std::atomic<bool>* cancel = nullptr;  // may be null; set: the request ends at the next step (Abort)
};

struct BatchOutcome {
  GenerationResult result;  // what was generated (up to the failure, when one happened)
  std::string error;        // empty when the request ran to its finish reason
  bool ok() const { return error.empty(); }
};

struct BatchStats {
  int64_t steps = 0;
  int64_t prompt_tokens = 0;     // prompt tokens run
  int64_t generated_tokens = 0;  // tokens sampled
  int max_running = 0;           // most sequences in one step
};

class BatchGenerator {
 public:
  // Borrows the model and tokenizer. Throws when max_batch exceeds the model's batch_limits().sequences or an
  // option is not positive.
  BatchGenerator(LanguageModel& model, const Tokenizer& tokenizer, std::vector<int32_t> eos_ids,
                 const BatchGeneratorOptions& options);
  // On an engine's model, tokenizer and EOS ids; first gives the engine's reusable sequence back (Engine::reset), as
  // a GPU model holds a fixed number of sequence slots.
  BatchGenerator(Engine& engine, const BatchGeneratorOptions& options);
  ~BatchGenerator();
  BatchGenerator(const BatchGenerator&) = delete;
  BatchGenerator& operator=(const BatchGenerator&) = delete;

  // Queues a request and returns its id (consecutive from 0). A request that cannot run gets its outcome (error)
  // at once.
  uint64_t submit(BatchRequest request);
  // One step: ends cancelled requests, admits queued ones, runs the batched model call and hands each sequence its
  // next token. Returns whether requests remain (queued or running).
  bool step();
  // Steps until every submitted request has an outcome.
  void run();

  // The outcome of a finished request, once (then forgotten); none while it is queued or running.
  std::optional<BatchOutcome> take(uint64_t id);
  size_t queued() const { return queue_.size(); }
  size_t running() const { return running_.size(); }
  const BatchStats& stats() const { return stats_; }
  // Prompt tokens of one sequence per step: the options' prefill_chunk capped by the budget and the model's limits.
  int64_t chunk() const { return chunk_; }

 private:
  struct Running;
  struct Queued {
    uint64_t id;
    BatchRequest request;
  };

  void admit();
  void end(Running& running, FinishReason reason);
  void fail_request(Running& running, const std::string& error);
  void remove_ended();

  LanguageModel& model_;
  const Tokenizer& tokenizer_;
  std::vector<int32_t> eos_ids_;
  BatchGeneratorOptions options_;
  BatchLimits limits_;
  int64_t chunk_ = 0;
  uint64_t next_id_ = 0;
  std::deque<Queued> queue_;
  std::vector<std::unique_ptr<Running>> running_;  // in admission order
  std::map<uint64_t, BatchOutcome> outcomes_;
  BatchStats stats_;
};

}  // namespace dsv4
