// Options shared by the commands that run a model: where it is and how to run it, and how to sample.
#pragma once

#include "core/error.hpp"
#include "runtime/engine.hpp"

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace dsv4::app {

struct EngineCli {
  EngineOptions engine;
  std::string numerics = "exact";

  // with_prefill_chunk: false for commands that choose their own chunking (logits --chunk).
  void add_to(CLI::App& sub, bool with_prefill_chunk = true) {
    sub.add_option("-m,--model", engine.model_dir, "Checkpoint directory (config.json, safetensors, tokenizer.json)")
        ->required();
    sub.add_option("--mode", numerics,
                   "Numerics: exact (matches transformers), reference (DeepSeek's rounding) or gpu-bf16 (CPU: exact "
                   "plus the GPU kernels' bf16 roundings)")
        ->capture_default_str();
    sub.add_option("--device", engine.device, "cpu, cuda, cuda:N, or auto (a GPU when there is one)")
        ->capture_default_str();
    sub.add_option("--ctx", engine.max_context,
                   "Tokens a sequence may hold (0 = the model's context on the CPU, up to 8192 on a GPU)")
        ->capture_default_str();
    sub.add_option("--sampling-buffer", engine.sampling_adjustments,
                   "GPU: logit adjustments (tokens a row's penalties or logit_bias touch) per sampling launch (0 = "
                   "sized for the batch, at most 8 vocabularies); a step bringing more samples in several launches")
        ->capture_default_str();
    if (with_prefill_chunk)
      sub.add_option("--prefill-chunk", engine.prefill_chunk, "Prompt tokens per prefill step")->capture_default_str();
  }
  EngineOptions options() const {
    EngineOptions o = engine;
    const std::optional<NumericsMode> mode = parse_numerics_mode(numerics);
    check(mode.has_value(), "--mode: '", numerics, "' is not a numerics mode (exact, reference or gpu-bf16)");
    o.numerics = *mode;
    return o;
  }
};

struct SamplingCli {
  SamplingParams params;
  int64_t seed = -1;
  int32_t max_tokens = 256;

  void add_to(CLI::App& sub) {
    sub.add_option("-n,--max-tokens", max_tokens, "Tokens to generate at most")->capture_default_str();
    sub.add_option("--temp,--temperature", params.temperature, "Sampling temperature (0 = greedy)")
        ->capture_default_str();
    sub.add_option("--top-p", params.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
    sub.add_option("--top-k", params.top_k, "Keep the k most likely tokens (0 = off)")->capture_default_str();
    sub.add_option("--min-p", params.min_p, "Drop tokens below min_p × the top probability (0 = off)")
        ->capture_default_str();
    sub.add_option("--repeat-penalty", params.repetition_penalty, "Repetition penalty (1 = off)")
        ->capture_default_str();
    sub.add_option("--presence-penalty", params.presence_penalty, "OpenAI presence penalty")->capture_default_str();
    sub.add_option("--frequency-penalty", params.frequency_penalty, "OpenAI frequency penalty")
        ->capture_default_str();
    sub.add_option("--seed", seed, "Random seed (same seed and input = same output; default: random)");
    sub.add_option("--stop", params.stop, "Stop string (repeatable)");
  }
  SamplingParams sampling() const {
    SamplingParams p = params;
    check(max_tokens >= 1, "--max-tokens must be at least 1, got ", max_tokens);
    p.max_tokens = max_tokens;
    if (seed >= 0) p.seed = uint64_t(seed);
    return p;
  }
};

}  // namespace dsv4::app
