// Per-token cost of Sampler::sample over DeepSeek-V4's 129,280-token vocabulary, per filter configuration.
// Logits look like a language model's: a spread-out bulk with a few dozen plausible tokens on top.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/random.hpp"
#include "runtime/sampler.hpp"

namespace {

constexpr int32_t kVocab = 129280;

// Bulk ~ uniform in [-4, 4] (a stand-in for a Gaussian, from the project's own PRNG), 32 candidates raised to
// [8, 14]; spread = 0 gives a flat distribution (every logit equal up to 1e-3), the worst case for top_p.
std::vector<float> model_like_logits(float spread) {
  dsv4::Xoshiro256 rng(1);
  std::vector<float> logits(kVocab);
  for (float& logit : logits) logit = static_cast<float>(spread * (2.0 * rng.uniform() - 1.0) + 1e-3 * rng.uniform());
  if (spread > 0) {
    for (int i = 0; i < 32; ++i) logits[rng.next() % kVocab] = static_cast<float>(8.0 + 6.0 * rng.uniform());
  }
  return logits;
}

void run(benchmark::State& state, const dsv4::SamplingParams& params, float spread) {
  dsv4::SamplingParams seeded = params;
  seeded.seed = 7;
  dsv4::Sampler sampler(seeded, kVocab);
  const std::vector<float> logits = model_like_logits(spread);
  std::vector<float> scratch = logits;
  for (auto _ : state) {
    // sample() only writes the logits when bias or penalties are on; restore them so every iteration is the same.
    if (!params.logit_bias.empty() || params.repetition_penalty != 1.0f) {
      std::memcpy(scratch.data(), logits.data(), logits.size() * sizeof(float));
    }
    benchmark::DoNotOptimize(sampler.sample(scratch, {}, {}));
  }
  state.SetItemsProcessed(state.iterations());
}

dsv4::SamplingParams make(float temperature, int32_t top_k, float top_p, float min_p) {
  dsv4::SamplingParams params;
  params.temperature = temperature;
  params.top_k = top_k;
  params.top_p = top_p;
  params.min_p = min_p;
  return params;
}

void BM_Greedy(benchmark::State& state) { run(state, make(0.0f, 0, 1.0f, 0.0f), 4.0f); }
void BM_Temperature(benchmark::State& state) { run(state, make(0.8f, 0, 1.0f, 0.0f), 4.0f); }
void BM_TopK40(benchmark::State& state) { run(state, make(0.8f, 40, 1.0f, 0.0f), 4.0f); }
void BM_TopP095(benchmark::State& state) { run(state, make(0.8f, 0, 0.95f, 0.0f), 4.0f); }
void BM_MinP005(benchmark::State& state) { run(state, make(0.8f, 0, 1.0f, 0.05f), 4.0f); }
void BM_TopK50TopP09MinP002(benchmark::State& state) { run(state, make(0.8f, 50, 0.9f, 0.02f), 4.0f); }
void BM_TopP095Flat(benchmark::State& state) { run(state, make(1.0f, 0, 0.95f, 0.0f), 0.0f); }
void BM_Penalties4kPrompt(benchmark::State& state) {
  dsv4::SamplingParams params = make(0.8f, 40, 0.95f, 0.0f);
  params.repetition_penalty = 1.1f;
  params.frequency_penalty = 0.3f;
  params.presence_penalty = 0.2f;
  params.seed = 7;
  dsv4::Sampler sampler(params, kVocab);
  const std::vector<float> logits = model_like_logits(4.0f);
  std::vector<int32_t> prompt(4096);
  std::vector<int32_t> generated(512);
  dsv4::Xoshiro256 rng(3);
  for (int32_t& token : prompt) token = static_cast<int32_t>(rng.next() % kVocab);
  for (int32_t& token : generated) token = static_cast<int32_t>(rng.next() % 2000);
  std::vector<float> scratch = logits;
  for (auto _ : state) {
    std::memcpy(scratch.data(), logits.data(), logits.size() * sizeof(float));
    benchmark::DoNotOptimize(sampler.sample(scratch, prompt, generated));
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_Greedy)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Temperature)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopK40)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopP095)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MinP005)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopK50TopP09MinP002)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopP095Flat)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Penalties4kPrompt)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
