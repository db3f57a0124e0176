#include "runtime/batch_generator.hpp"

#include "core/error.hpp"
#include "runtime/engine.hpp"

#include <algorithm>

namespace dsv4 {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration<double>(end - start).count();
}

}  // namespace

BatchGeneratorOptions BatchGeneratorOptions::from(const EngineOptions& engine) {
  BatchGeneratorOptions options;
  options.max_batch = engine.max_batch;
  options.prefill_chunk = engine.prefill_chunk;
  options.step_prefill_tokens = engine.prefill_chunk;
  options.sample_on_device = engine.sample_on_device;
  return options;
}

// A request that holds a sequence: prefilling its prompt, then generating.
struct BatchGenerator::Running {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  const std::atomic<bool>* cancel = nullptr;
  std::optional<GenerationStream> stream;
  std::unique_ptr<SequenceCache> sequence;
  int64_t prefilled = 0;          // prompt tokens run
  std::optional<int32_t> next;    // the last sampled token: the input of its next decode step
  std::optional<int64_t> chunk;   // this step's prompt tokens, when a chunk of the prompt is in the step
  Clock::time_point admitted, prefill_done;
  bool ended = false;
};

BatchGenerator::BatchGenerator(LanguageModel& model, const Tokenizer& tokenizer, std::vector<int32_t> eos_ids,
                               const BatchGeneratorOptions& options)
    : model_(model), tokenizer_(tokenizer), eos_ids_(std::move(eos_ids)), options_(options),
      limits_(model.batch_limits()) {
  check(options.max_batch >= 1, "batch generator: max_batch must be at least 1, got ", options.max_batch);
  check(options.prefill_chunk >= 1 && options.step_prefill_tokens >= 1,
        "batch generator: prefill_chunk and step_prefill_tokens must be positive, got ", options.prefill_chunk,
        " and ", options.step_prefill_tokens);
  check(options.max_batch <= limits_.sequences, "batch generator: a batch of ", options.max_batch,
        " sequences exceeds the ", limits_.sequences, " the model on ", model.device(),
        " runs in one step (load it with a larger batch)");
  // A whole chunk fits beside one decode token of every other running sequence, so a prompt always advances.
  const int64_t room = limits_.tokens - (options.max_batch - 1);
  chunk_ = std::min({options.prefill_chunk, options.step_prefill_tokens, limits_.entry_tokens, room});
  check(chunk_ >= 1, "batch generator: the model's step of ", limits_.tokens, " tokens leaves no room for a prompt ",
        "chunk beside ", options.max_batch - 1, " decode tokens");
}

BatchGenerator::BatchGenerator(Engine& engine, const BatchGeneratorOptions& options)
    // The comma runs reset before the model is borrowed: the engine's sequence slot is free for the batch.
    : BatchGenerator((engine.reset(), engine.model()), engine.tokenizer(), engine.eos_ids(), options) {}

BatchGenerator::~BatchGenerator() = default;

uint64_t BatchGenerator::submit(BatchRequest request) {
  const uint64_t id = next_id_++;
  try {
    const int64_t context = model_.context_length();
    check(!request.prompt.empty(), "the prompt is empty");
    check(int64_t(request.prompt.size()) < context, "the prompt has ", request.prompt.size(),
          " tokens; the model's context is ", context, " tokens");
    for (size_t i = 0; i < request.prompt.size(); ++i)
      check(request.prompt[i] >= 0 && request.prompt[i] < model_.config().vocab_size, "prompt token ", i, " (id ",
            request.prompt[i], ") is outside the vocabulary [0, ", model_.config().vocab_size, ")");
    validate(request.params, model_.config().vocab_size);
    StopStringMatcher check_stop_strings(request.params.stop);
  } catch (const std::exception& e) {
    BatchOutcome outcome;
    outcome.result.prompt_tokens = int64_t(request.prompt.size());
    outcome.error = e.what();
    outcomes_.emplace(id, std::move(outcome));
    return id;
  }
  queue_.push_back(Queued{id, std::move(request)});
  return id;
}

void BatchGenerator::admit() {
  while (!queue_.empty() && int(running_.size()) < options_.max_batch) {
    Queued queued = std::move(queue_.front());
    queue_.pop_front();
    auto running = std::make_unique<Running>();
    running->id = queued.id;
    running->cancel = queued.request.cancel;
    running->admitted = Clock::now();
    try {
      running->stream.emplace(tokenizer_, queued.request.params, eos_ids_, model_.config().vocab_size,
                              std::move(queued.request.on_text));
      running->stream->result().prompt_tokens = int64_t(queued.request.prompt.size());
      running->sequence = model_.new_sequence();
    } catch (const std::exception& e) {
      BatchOutcome outcome;
      outcome.result.prompt_tokens = int64_t(queued.request.prompt.size());
      outcome.error = e.what();
      outcomes_.emplace(queued.id, std::move(outcome));
      continue;
    }
    running->prompt = std::move(queued.request.prompt);
    running_.push_back(std::move(running));
  }
}

void BatchGenerator::end(Running& running, FinishReason reason) {
  const Clock::time_point now = Clock::now();
  running.sequence.reset();  // the sequence's memory (a GPU slot) goes back before anything else can fail
  running.ended = true;
  GenerationResult& result = running.stream->result();
  try {
    running.stream->finish(reason);
  } catch (const std::exception& e) {
    return fail_request(running, e.what());
  }
  result.prefilled_tokens = running.prefilled;
  if (running.prefilled == int64_t(running.prompt.size())) {
    result.prefill_seconds = seconds_between(running.admitted, running.prefill_done);
    result.decode_seconds = seconds_between(running.prefill_done, now);
  } else {
    result.prefill_seconds = seconds_between(running.admitted, now);
  }
  outcomes_[running.id] = BatchOutcome{std::move(result), ""};
}

void BatchGenerator::fail_request(Running& running, const std::string& error) {
  running.sequence.reset();
  running.ended = true;
  BatchOutcome outcome;
  if (running.stream) outcome.result = std::move(running.stream->result());
  outcome.result.prompt_tokens = int64_t(running.prompt.size());
  outcome.result.prefilled_tokens = running.prefilled;
  outcome.error = error;
  outcomes_[running.id] = std::move(outcome);
}

void BatchGenerator::remove_ended() {
  std::erase_if(running_, [](const std::unique_ptr<Running>& r) { return r->ended; });
}

bool BatchGenerator::step() {
  // Cancelled requests end first, so their places go to queued requests at once.
  std::erase_if(queue_, [&](Queued& queued) {
    if (!queued.request.cancel || !queued.request.cancel->load()) return false;
    BatchOutcome outcome;
    outcome.result.prompt_tokens = int64_t(queued.request.prompt.size());
    outcome.result.finish = FinishReason::Abort;
    outcomes_.emplace(queued.id, std::move(outcome));
    return true;
  });
  for (auto& running : running_)
    if (running->cancel && running->cancel->load()) end(*running, FinishReason::Abort);
  remove_ended();
  admit();
  if (running_.empty()) return !queue_.empty();

  // Every generating sequence decodes; prompts advance by whole chunks, in admission order, within the budget.
  std::vector<BatchEntry> entries;
  std::vector<Running*> owners;
  int64_t decodes = 0;
  for (auto& running : running_) decodes += running->next.has_value();
  const int64_t budget = std::min(options_.step_prefill_tokens, limits_.tokens - decodes);
  int64_t prefill = 0;
  for (auto& running : running_) {
    running->chunk.reset();
    if (running->next) {
      entries.push_back(BatchEntry{running->sequence.get(), std::span(&*running->next, 1), nullptr});
    } else {
      const int64_t n = std::min<int64_t>(chunk_, int64_t(running->prompt.size()) - running->prefilled);
      if (prefill + n > budget) continue;
      prefill += n;
      running->chunk = n;
      entries.push_back(BatchEntry{running->sequence.get(),
                                   std::span(running->prompt).subspan(size_t(running->prefilled), size_t(n)),
                                   nullptr});
    }
    owners.push_back(running.get());
  }
  // The entries that end with a token to sample: decode tokens and the prompt's last chunk.
  auto wants_token = [](const Running& r) {
    return !r.chunk || r.prefilled + *r.chunk == int64_t(r.prompt.size());
  };

  std::vector<SampledEntry> sampled(entries.size());
  std::vector<std::string> errors(entries.size());
  try {
    if (options_.sample_on_device && model_.samples_on_device()) {
      std::vector<sampling::SamplingStep> steps(entries.size());  // sized first: the entries point into it
      for (size_t i = 0; i < entries.size(); ++i) {
        Running& r = *owners[i];
        if (!wants_token(r)) continue;
        steps[i] = r.stream->sampler().device_step(r.prompt, r.stream->tokens());
        entries[i].sampling = &steps[i];
      }
      model_.forward_batch_and_sample(entries, sampled);
    } else {
      std::vector<float> logits;
      model_.forward_batch(entries, logits);
      const size_t vocab = size_t(model_.config().vocab_size);
      for (size_t i = 0; i < entries.size(); ++i) {
        Running& r = *owners[i];
        if (!wants_token(r)) continue;
        try {
          sampled[i].token = r.stream->sampler().sample(std::span(logits).subspan(i * vocab, vocab), r.prompt,
                                                         r.stream->tokens());
        } catch (const std::exception& e) {
          sampled[i].error = e.what();
        }
      }
    }
  } catch (const std::exception& e) {
    // The step failed as a whole: its sequences' states are undefined, so each of its requests fails.
    for (Running* r : owners) fail_request(*r, e.what());
    remove_ended();
    return !running_.empty() || !queue_.empty();
  }

  ++stats_.steps;
  stats_.prompt_tokens += prefill;
  stats_.max_running = std::max(stats_.max_running, int(entries.size()));
  const Clock::time_point stepped = Clock::now();
  const int64_t context = model_.context_length();
  for (size_t i = 0; i < entries.size(); ++i) {
    Running& r = *owners[i];
    const bool token_wanted = wants_token(r);
    if (r.chunk) {
      r.prefilled += *r.chunk;
      if (token_wanted) r.prefill_done = stepped;
    }
    if (!token_wanted) continue;
    if (!sampled[i].error.empty()) {
      fail_request(r, sampled[i].error);
      continue;
    }
    const int32_t token = sampled[i].token;
    ++stats_.generated_tokens;
    std::optional<FinishReason> finish;
    try {
      finish = r.stream->push(token);
    } catch (const std::exception& e) {
      fail_request(r, e.what());
      continue;
    }
    // Engine::generate's rule: the sampled token must fit beside the tokens run.
    if (!finish && r.sequence->length() + 1 >= context) finish = FinishReason::Length;
    if (finish) end(r, *finish);
    else r.next = token;
  }
  remove_ended();
  return !running_.empty() || !queue_.empty();
}

void BatchGenerator::run() {
  while (step()) {
  }
}

std::optional<BatchOutcome> BatchGenerator::take(uint64_t id) {
  const auto it = outcomes_.find(id);
  if (it == outcomes_.end()) return std::nullopt;
  BatchOutcome outcome = std::move(it->second);
  outcomes_.erase(it);
  return outcome;
}

}  // namespace dsv4
