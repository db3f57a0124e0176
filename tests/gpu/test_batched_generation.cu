// Continuous batching on the GPU (runtime/batch_generator.hpp over CudaLanguageModel): more requests than the batch
// holds, prompts read in chunks mixed with other sequences' decode tokens (CudaModel::step), all-decode steps as
// replayed CUDA graphs (or eager launches with DSV4_DISABLE_CUDA_GRAPHS=1) with one sampling launch over the rows,
// sequences leaving and joining between steps. Each request's tokens and text must equal Engine::generate's for it
// alone on the same model, greedy and seeded sampling, sampling on the device and on the host. The trained tiny model
// (models/tiny-fortunes) has clear top-1 margins, so the batched kernels' summation order cannot flip a token.
// Sampling on the device in several launches (more logit adjustments than the buffers hold) picks the tokens of one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <optional>
#include <string>
#include <vector>

#include "backends/cuda/cuda_language_model.hpp"
#include "backends/cuda/device.hpp"
#include "model/checkpoint_loader.hpp"
#include "runtime/batch_generator.hpp"
#include "runtime/engine.hpp"

using namespace dsv4;
namespace fs = std::filesystem;

namespace {

struct Case {
  std::string prompt;
  SamplingParams params;
};

std::vector<Case> cases() {
  // Chat prompts of 9 to about 30 tokens (one to five 7-token chunks) and raw ones.
  const char* prompts[] = {
      "<｜begin▁of▁sentence｜><｜User｜>Tell me a fortune.<｜Assistant｜></think>",
      "<｜begin▁of▁sentence｜><｜User｜>Tell me a long fortune about computers, cats, the sea and the stars, in the "
      "words of an old proverb.<｜Assistant｜></think>",
      "<｜begin▁of▁sentence｜>The best way to",
      "<｜begin▁of▁sentence｜><｜User｜>Say something wise about patience and time.<｜Assistant｜></think>",
      "<｜begin▁of▁sentence｜>Q: What do you call",
      "<｜begin▁of▁sentence｜><｜User｜>Tell me a fortune about computers.<｜Assistant｜></think>",
      "<｜begin▁of▁sentence｜>A"};
  std::vector<Case> out;
  for (size_t i = 0; i < std::size(prompts); ++i) {
    Case c{prompts[i], {}};
    c.params.max_tokens = 12 + int32_t(i) * 5;  // different lengths: sequences leave at different steps
    if (i % 3 == 0) {
      c.params.temperature = 0.0f;
    } else {
      c.params.temperature = 0.8f, c.params.top_k = 40, c.params.seed = 100 + i;
      if (i % 3 == 2) c.params.top_p = 0.9f, c.params.repetition_penalty = 1.1f;
    }
    out.push_back(std::move(c));
  }
  return out;
}

// Generates every case batched (max_batch 3 of 7 requests, a 7-token chunk, 10 prompt tokens per step) and alone,
// on one model, and compares.
void expect_batched_equals_alone(bool sample_on_device) {
  EngineOptions options;
  options.model_dir = (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
  options.progress = false;
  options.device = "cuda";
  options.max_context = 512;
  options.prefill_chunk = 7;
  options.max_batch = 3;
  options.sample_on_device = sample_on_device;
  Engine engine(options);
  const std::vector<Case> all = cases();
  std::vector<std::vector<int32_t>> prompts;
  std::vector<GenerationResult> alone;
  for (const Case& c : all) {
    prompts.push_back(engine.tokenizer().encode(c.prompt));
    engine.reset();
    alone.push_back(engine.generate(prompts.back(), c.params, {}));
  }

  BatchGeneratorOptions batch = BatchGeneratorOptions::from(options);
  batch.step_prefill_tokens = 10;
  BatchGenerator generator(engine, batch);
  std::vector<std::string> streamed(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    BatchRequest request;
    request.prompt = prompts[i];
    request.params = all[i].params;
    request.on_text = [&streamed, i](std::string_view text) { streamed[i] += text; };
    EXPECT_EQ(generator.submit(std::move(request)), i);
  }
  generator.run();
  EXPECT_EQ(generator.stats().max_running, 3);
  for (size_t i = 0; i < all.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i) + " '" + all[i].prompt + "'");
    const std::optional<BatchOutcome> got = generator.take(i);
    ASSERT_TRUE(got.has_value());
    ASSERT_TRUE(got->ok()) << got->error;
    EXPECT_EQ(got->result.tokens, alone[i].tokens);
    EXPECT_EQ(got->result.text, alone[i].text);
    EXPECT_EQ(streamed[i], got->result.text);
    EXPECT_EQ(got->result.finish, alone[i].finish);
    EXPECT_GE(alone[i].tokens.size(), 2u) << "too short to decode batched";
  }
}

bool has_device() { return !cuda::list_devices().empty(); }

}  // namespace

TEST(BatchedGeneration, EqualsAloneWithCudaGraphs) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  expect_batched_equals_alone(true);
}

TEST(BatchedGeneration, EqualsAloneSamplingOnTheHost) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  expect_batched_equals_alone(false);
}

// The model reads DSV4_DISABLE_CUDA_GRAPHS when it is built: the same steps as eager launches.
TEST(BatchedGeneration, EqualsAloneWithoutCudaGraphs) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  ::setenv("DSV4_DISABLE_CUDA_GRAPHS", "1", 1);
  expect_batched_equals_alone(true);
  ::unsetenv("DSV4_DISABLE_CUDA_GRAPHS");
}

// 64 requests at once (the prompts of `generate --prompt-file` with 64 lines "Tell me fortune number N."), their
// prompts read together in two mixed steps of up to 512 prompt tokens, then decoding as one batch: a greedy token may
// differ from the alone run only where the alone run's logits nearly tie, as the batched kernels sum in another order
// over bf16 operands (relative rounding 2^-9 per operand, a few hundredths on logits of this model's size). A sequence
// fed another's token or logits row diverges with a gap of whole logits.
TEST(BatchedGeneration, ManyRequestsInOneStepDivergeOnlyAtNearTies) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int kRequests = 64;
  constexpr float kTieTolerance = 0.1f;
  EngineOptions options;
  options.model_dir = (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
  options.progress = false;
  options.device = "cuda";
  options.max_context = 512;
  options.max_batch = kRequests;
  Engine engine(options);
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  greedy.max_tokens = 64;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<GenerationResult> alone;
  for (int i = 0; i < kRequests; ++i) {
    prompts.push_back(engine.tokenizer().encode("<｜begin▁of▁sentence｜><｜User｜>Tell me fortune number " +
                                                std::to_string(i + 1) + ".<｜Assistant｜></think>"));
    engine.reset();
    alone.push_back(engine.generate(prompts.back(), greedy, {}));
  }
  BatchGenerator generator(engine, BatchGeneratorOptions::from(options));
  for (const std::vector<int32_t>& prompt : prompts) generator.submit(BatchRequest{prompt, greedy, {}, nullptr});
  generator.run();
  EXPECT_EQ(generator.stats().max_running, kRequests);
  int differing = 0;
  for (int i = 0; i < kRequests; ++i) {
    const std::optional<BatchOutcome> got = generator.take(uint64_t(i));
    ASSERT_TRUE(got && got->ok()) << i << ": " << (got ? got->error : "no outcome");
    const std::vector<int32_t>& want = alone[size_t(i)].tokens;
    const std::vector<int32_t>& tokens = got->result.tokens;
    size_t k = 0;
    while (k < want.size() && k < tokens.size() && want[k] == tokens[k]) ++k;
    if (k == want.size() && k == tokens.size()) continue;
    ++differing;
    ASSERT_TRUE(k < want.size() && k < tokens.size()) << i << ": one run stopped where the other went on";
    // The alone run's logits at the divergence: how far the batched choice is below its argmax.
    std::vector<int32_t> context = prompts[size_t(i)];
    context.insert(context.end(), want.begin(), want.begin() + int64_t(k));
    auto sequence = engine.model().new_sequence();
    std::vector<float> logits;
    engine.model().forward(*sequence, context, LogitRows::Last, logits);
    const float gap = logits[size_t(want[k])] - logits[size_t(tokens[k])];
    std::printf("request %d: first different token at %zu (alone %d, batched %d), logit gap %.4f\n", i, k, want[k],
                tokens[k], gap);
    EXPECT_LE(gap, kTieTolerance) << "request " << i << " token " << k;
  }
  std::printf("%d of %d requests differ from their alone run\n", differing, kRequests);
}

namespace {

// `rows` sequences of a `context`-token model each biasing the tokens t with (t + row) % skip != 0 (skip 0: every
// token; distinct tokens per row), sampled at temperature 0.9 in a mixed step (prompts of 1 to 9 tokens) and then
// three decode steps, with sampling buffers for `planned` adjustments (0: the default): every step's tokens.
std::vector<int32_t> sample_biased_rows(const LoadedCheckpoint& ckpt, int rows, int skip, int64_t context,
                                        int64_t planned) {
  const int64_t vocab = ckpt.config.vocab_size;
  constexpr int kDecodeSteps = 3;
  const size_t row_count = static_cast<size_t>(rows);
  std::vector<std::vector<sampling::LogitAdjustment>> adjustments(row_count);
  std::vector<sampling::SamplingStep> steps(row_count);
  std::vector<std::vector<int32_t>> prompts(row_count);
  std::mt19937 rng(77);
  for (int r = 0; r < rows; ++r) {
    for (int32_t t = 0; t < vocab; ++t)
      if (skip == 0 || (t + r) % skip != 0) adjustments[size_t(r)].push_back({t, float((t * 7 + r) % 11) - 5.0f, 0, 0});
    steps[size_t(r)].row.temperature = 0.9f;
    steps[size_t(r)].row.draw = (uint64_t(r + 1) * 0x9E3779B97F4A7C15ull) >> 11;
    steps[size_t(r)].adjustments = adjustments[size_t(r)];
    const int prompt_tokens = r % 3 == 0 ? 5 : r % 3 == 1 ? 1 : 9;
    for (int i = 0; i < prompt_tokens; ++i) prompts[size_t(r)].push_back(int32_t(rng() % vocab));
  }
  cuda::CudaModelOptions options;
  options.max_sequences = rows;
  options.max_context = context;
  options.sampling_adjustments = planned;
  cuda::CudaLanguageModel model(ckpt.config, ckpt.weights, options);
  std::vector<std::unique_ptr<SequenceCache>> sequences;
  for (int r = 0; r < rows; ++r) sequences.push_back(model.new_sequence());
  std::vector<int32_t> tokens;
  std::vector<int32_t> last(row_count);
  for (int step = 0; step <= kDecodeSteps; ++step) {
    std::vector<BatchEntry> entries;
    for (int r = 0; r < rows; ++r)
      entries.push_back({sequences[size_t(r)].get(),
                         step == 0 ? std::span<const int32_t>(prompts[size_t(r)]) : std::span(&last[size_t(r)], 1),
                         &steps[size_t(r)]});
    std::vector<SampledEntry> sampled;
    model.forward_batch_and_sample(entries, sampled);
    EXPECT_EQ(sampled.size(), row_count);
    for (size_t r = 0; r < sampled.size(); ++r) {
      EXPECT_TRUE(sampled[r].error.empty()) << sampled[r].error;
      EXPECT_GE(sampled[r].token, 0);
      EXPECT_LT(sampled[r].token, vocab);
      last[r] = std::clamp<int32_t>(sampled[r].token, 0, int32_t(vocab - 1));
      tokens.push_back(sampled[r].token);
    }
  }
  return tokens;
}

}  // namespace

// Three sequences each biasing two thirds of the vocabulary: with buffers for all their adjustments
// (sampling_adjustments 3 × vocab: one launch) and at the smallest size (the vocabulary: a launch per row), the same
// tokens.
TEST(BatchedGeneration, SamplingInSeveralLaunchesPicksTheTokensOfOne) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const LoadedCheckpoint ckpt = load_checkpoint((fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string());
  ckpt.require_loadable();
  const int64_t vocab = ckpt.config.vocab_size;
  EXPECT_EQ(sample_biased_rows(ckpt, 3, 3, 64, 3 * vocab), sample_biased_rows(ckpt, 3, 3, 64, vocab));
}

// The default sampling buffers (sampling_adjustments 0): sized for a step's rows in the common case, capped at 8
// vocabularies (DeepSeek's vocabulary: batch 1 one vocabulary, 256 sequences of a long context 8 instead of 256).
TEST(BatchedGeneration, DefaultSamplingBuffersAreCapped) {
  constexpr int64_t kVocab = 129280;
  EXPECT_EQ(cuda::default_sampling_adjustments(kVocab, 1, 1 << 20), kVocab);
  EXPECT_EQ(cuda::default_sampling_adjustments(kVocab, 8, 8192), kVocab);        // 8 × 9216 below a vocabulary
  EXPECT_EQ(cuda::default_sampling_adjustments(kVocab, 64, 8192), 64 * 9216);    // every row's context + 1024 biases
  EXPECT_EQ(cuda::default_sampling_adjustments(kVocab, 256, 65536), 8 * kVocab);  // the cap
  EXPECT_EQ(cuda::default_sampling_adjustments(kVocab, 256, 1 << 20), 8 * kVocab);
  EXPECT_EQ(cuda::default_sampling_adjustments(1000, 1, 16), 1000);  // at least a vocabulary
}

// A step that brings more adjustments than the default buffers hold: 12 rows adjusting the whole vocabulary (12
// vocabularies; the default at a 4096-token context holds 8: two launches, and at 64 tokens 12 × 1088: a launch per
// 3 rows) picks the tokens of one launch over buffers for all of them.
TEST(BatchedGeneration, DefaultSamplingBuffersTakeALargerStepInSeveralLaunches) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const LoadedCheckpoint ckpt = load_checkpoint((fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string());
  ckpt.require_loadable();
  const int64_t vocab = ckpt.config.vocab_size;
  constexpr int kRows = 12;
  for (const int64_t context : {int64_t(4096), int64_t(64)}) {
    SCOPED_TRACE("context " + std::to_string(context));
    ASSERT_LT(cuda::default_sampling_adjustments(vocab, kRows, context), kRows * vocab);
    EXPECT_EQ(sample_biased_rows(ckpt, kRows, 0, context, 0),
              sample_biased_rows(ckpt, kRows, 0, context, kRows * vocab));
  }
}
