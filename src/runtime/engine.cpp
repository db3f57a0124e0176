#include "runtime/engine.hpp"

#include "model/dsv4_model.hpp"
#if DSV4_HAVE_CUDA
#include "backends/cuda/cuda_language_model.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/upload_progress.hpp"
#endif

#include "core/error.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

namespace dsv4 {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Engine::Engine(const EngineOptions& options) : options_(options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.progress) std::fprintf(stderr, "loading %s ...\n", options.model_dir.c_str());
  checkpoint_ = load_checkpoint(options.model_dir);
  checkpoint_.require_loadable();
  const std::filesystem::path tokenizer_file = std::filesystem::path(options.model_dir) / "tokenizer.json";
  if (std::filesystem::exists(tokenizer_file)) tokenizer_.emplace(Tokenizer::from_file(tokenizer_file));
  model_ = make_model(options);

  eos_ids_ = checkpoint_.config.eos_token_ids;
  if (tokenizer_ && tokenizer_->has_eos()) eos_ids_.push_back(tokenizer_->eos_id());
  std::sort(eos_ids_.begin(), eos_ids_.end());
  eos_ids_.erase(std::unique(eos_ids_.begin(), eos_ids_.end()), eos_ids_.end());
  if (options.progress)
    std::fprintf(stderr, "loaded %s weights (%.1f MiB, %s layout) on the %s backend in %.2f s\n",
                 std::string(to_string(options.numerics)).c_str(), double(checkpoint_.weight_bytes()) / (1 << 20),
                 checkpoint_.layout.c_str(), model_->device().c_str(), seconds_since(start));
}

std::unique_ptr<LanguageModel> Engine::make_model(const EngineOptions& options) {
  const ModelConfig& config = checkpoint_.config;
  check(options.max_context >= 0, "--ctx must not be negative, got ", options.max_context);
  check(options.prefill_chunk > 0, "prefill chunk must be positive, got ", options.prefill_chunk);
  check(options.max_batch >= 1, "--batch must be at least 1, got ", options.max_batch);
  check(options.sampling_adjustments >= 0, "--sampling-buffer must not be negative (0 = sized for the batch), got ",
        options.sampling_adjustments);
  std::string device = options.device;
#if DSV4_HAVE_CUDA
  if (device == "auto") device = cuda::list_devices().empty() ? "cpu" : "cuda";
#else
  if (device == "auto") device = "cpu";
#endif
  if (device == "cpu") {
    // The CPU samples on the host, without device buffers: refused rather than ignored.
    check(options.sampling_adjustments == 0, "--sampling-buffer sizes the GPU's sampling buffers; the CPU backend has ",
          "none (device ", options.device, ")");
    check(options.max_context == 0 || options.max_context <= config.max_position_embeddings, "--ctx ",
          options.max_context, " exceeds the model's context of ", config.max_position_embeddings, " tokens");
    backend_ = std::make_unique<cpu::CpuBackend>(config, options.numerics);
    return std::make_unique<Dsv4Model>(config, checkpoint_.weights, *backend_);
  }
  check(device == "cuda" || device.starts_with("cuda:"), "--device: '", device,
        "' is not a device (cpu, cuda, cuda:N or auto)");
#if DSV4_HAVE_CUDA
  cuda::CudaModelOptions gpu;
  gpu.device = device;
  gpu.numerics = options.numerics;
  gpu.max_context = options.max_context > 0 ? options.max_context
                                            : std::min<int64_t>(config.max_position_embeddings, 8192);
  check(gpu.max_context <= config.max_position_embeddings, "--ctx ", gpu.max_context,
        " exceeds the model's context of ", config.max_position_embeddings, " tokens");
  gpu.max_sequences = options.max_batch;
  // Room for a whole prompt chunk beside every other sequence's decode token in one step.
  gpu.max_step_tokens = std::min<int64_t>(options.prefill_chunk + options.max_batch - 1, 4096);
  gpu.sampling_adjustments = options.sampling_adjustments;
  std::optional<cuda::UploadProgressBar> bar;  // outlives the upload, which the constructor runs
  if (options.progress) gpu.progress = bar.emplace("uploading weights").callback();
  return std::make_unique<cuda::CudaLanguageModel>(config, checkpoint_.weights, gpu);
#else
  fail("--device ", device, ": this build has no CUDA backend (configure with the cuda preset)");
#endif
}

const Tokenizer& Engine::tokenizer() const {
  check(tokenizer_.has_value(), "checkpoint ", options_.model_dir, " has no tokenizer.json: text in and out needs one");
  return *tokenizer_;
}

void Engine::reset() {
  sequence_.reset();
  sequence_ids_.clear();
}

GenerationResult Engine::generate(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                  const TextCallback& on_text, const std::atomic<bool>* cancel) {
  try {
    return run_generation(prompt, params, on_text, cancel);
  } catch (...) {
    reset();  // a call that failed midway may have left tokens in some layers of the cache: never reuse it
    throw;
  }
}

GenerationResult Engine::run_generation(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                        const TextCallback& on_text, const std::atomic<bool>* cancel) {
  const int64_t context = model_->context_length();
  check(!prompt.empty(), "the prompt is empty");
  check(int64_t(prompt.size()) < context, "the prompt has ", prompt.size(), " tokens; the model's context is ",
        context, " tokens");
  GenerationStream stream(tokenizer(), params, eos_ids_, config().vocab_size, on_text);
  GenerationResult& result = stream.result();
  result.prompt_tokens = int64_t(prompt.size());
  // Reuse the sequence when the prompt continues it (the compressor state cannot be rewound, so a prompt that
  // diverges anywhere starts over).
  const bool continues = sequence_ && sequence_ids_.size() < prompt.size() &&
                         std::equal(sequence_ids_.begin(), sequence_ids_.end(), prompt.begin());
  if (!continues) {
    sequence_.reset();  // first give the old sequence's slot back: a GPU model may hold only one
    sequence_ = model_->new_sequence();
    sequence_ids_.clear();
  }

  const auto prefill_start = std::chrono::steady_clock::now();
  std::vector<float> logits;
  for (size_t at = sequence_ids_.size(); at < prompt.size();) {
    const size_t n = std::min<size_t>(size_t(options_.prefill_chunk), prompt.size() - at);
    model_->forward(*sequence_, std::span(prompt).subspan(at, n), LogitRows::Last, logits);
    sequence_ids_.insert(sequence_ids_.end(), prompt.begin() + int64_t(at), prompt.begin() + int64_t(at + n));
    result.prefilled_tokens += int64_t(n);
    at += n;
  }
  result.prefill_seconds = seconds_since(prefill_start);

  // The prompt's last logits come back from the prefill and are sampled here; after that a model that samples on its
  // device returns the next token itself (same parameters and random stream, so the same tokens).
  const bool sample_on_device = options_.sample_on_device && model_->samples_on_device();
  Sampler& sampler = stream.sampler();
  std::optional<int32_t> device_token;
  const auto decode_start = std::chrono::steady_clock::now();
  std::optional<FinishReason> finish;
  while (!finish) {
    if (cancel && cancel->load()) {
      finish = FinishReason::Abort;
      break;
    }
    const int32_t token = device_token ? *device_token : sampler.sample(logits, prompt, stream.tokens());
    finish = stream.push(token);
    if (!finish && int64_t(sequence_ids_.size()) + 1 >= context) finish = FinishReason::Length;
    if (finish) break;
    if (sample_on_device) {
      device_token = model_->forward_and_sample(*sequence_, token, sampler.device_step(prompt, stream.tokens()));
    } else {
      model_->forward(*sequence_, std::span(&token, 1), LogitRows::Last, logits);
    }
    sequence_ids_.push_back(token);
  }
  // The last sampled token was never run, so sequence_ids_ ends before it: a next prompt that contains it still
  // continues the sequence.
  stream.finish(*finish);
  result.decode_seconds = seconds_since(decode_start);
  return std::move(result);
}

}  // namespace dsv4
