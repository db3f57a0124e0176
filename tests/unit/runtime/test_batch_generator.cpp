// Continuous batching on the CPU (runtime/batch_generator.hpp) with the trained tiny model (models/tiny-fortunes):
// every request generates what Engine::generate gives for it alone (greedy and seeded sampling), requests join
// between steps and a finished or cancelled one gives its sequence back at once, a bad request fails alone, and a
// step's prompt tokens stay within the budget while every generating sequence decodes in every step.
#include "core/error.hpp"
#include "runtime/batch_generator.hpp"
#include "runtime/engine.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

using namespace dsv4;
namespace fs = std::filesystem;

namespace {

// The engine's model behind a fixed number of sequence slots (as a GPU model has), recording each batched step's
// entries (tokens per sequence) and how many sequences are alive. With `device_sampling` it stands in for a model that
// samples on its device: forward_batch_and_sample follows the device contract (the adjustments and draw of
// Sampler::device_step; greedy and temperature sampling, no filters) on the host.
class RecordingModel final : public LanguageModel {
 public:
  RecordingModel(LanguageModel& inner, int slots, bool device_sampling = false)
      : inner_(inner), slots_(slots), device_sampling_(device_sampling) {}

  const ModelConfig& config() const override { return inner_.config(); }
  std::string device() const override { return "recording " + inner_.device(); }
  int64_t context_length() const override { return inner_.context_length(); }
  std::unique_ptr<SequenceCache> new_sequence() override {
    check(live_ < slots_, "all ", slots_, " sequence slots are in use");
    return std::make_unique<Sequence>(inner_.new_sequence(), live_);
  }
  void forward(SequenceCache& sequence, std::span<const int32_t> ids, LogitRows rows,
               std::vector<float>& logits) override {
    inner_.forward(*static_cast<Sequence&>(sequence).inner, ids, rows, logits);
  }
  BatchLimits batch_limits() const override {
    BatchLimits limits;
    limits.sequences = slots_;
    return limits;
  }
  void forward_batch(std::span<const BatchEntry> entries, std::vector<float>& logits) override {
    std::vector<std::pair<const SequenceCache*, size_t>> step;
    for (const BatchEntry& e : entries) step.emplace_back(e.sequence, e.ids.size());
    steps.push_back(step);
    LanguageModel::forward_batch(entries, logits);
  }

  bool samples_on_device() const override { return device_sampling_; }
  void forward_batch_and_sample(std::span<const BatchEntry> entries, std::vector<SampledEntry>& tokens) override {
    std::vector<float> logits;
    forward_batch(entries, logits);
    const size_t vocab = size_t(config().vocab_size);
    tokens.assign(entries.size(), SampledEntry{});
    for (size_t i = 0; i < entries.size(); ++i) {
      if (!entries[i].sampling) continue;
      ++sampled_rows;
      tokens[i].token = sample_row(std::span(logits).subspan(i * vocab, vocab), *entries[i].sampling);
    }
  }

  int live() const { return live_; }
  std::vector<std::vector<std::pair<const SequenceCache*, size_t>>> steps;
  int64_t sampled_rows = 0;

 private:
  static int32_t sample_row(std::span<float> logits, const sampling::SamplingStep& step) {
    const sampling::RowParams& row = step.row;
    check(row.top_k == 0 && row.top_p == 1.0f && row.min_p == 0.0f, "the stand-in samples without filters");
    for (const sampling::LogitAdjustment& a : step.adjustments)
      logits[size_t(a.token)] = sampling::adjust_logit(logits[size_t(a.token)], a, row);
    const float max_logit = *std::max_element(logits.begin(), logits.end());
    if (row.temperature == 0.0f) return int32_t(std::find(logits.begin(), logits.end(), max_logit) - logits.begin());
    const float inverse_temperature = 1.0f / row.temperature;
    const int shift = sampling::mass_shift(int64_t(logits.size()));
    auto mass = [&](float logit) {
      return sampling::weight_mass(sampling::tempered_weight(logit, max_logit, inverse_temperature), shift);
    };
    uint64_t total = 0;
    for (const float logit : logits) total += mass(logit);
    const uint64_t target = sampling::draw_target(row.draw, total);
    uint64_t running = 0;
    for (size_t t = 0; t < logits.size(); ++t) {
      running += mass(logits[t]);
      if (target < running) return int32_t(t);
    }
    fail("the stand-in's draw found no token");
  }

  struct Sequence final : SequenceCache {
    Sequence(std::unique_ptr<SequenceCache> inner, int& live) : inner(std::move(inner)), live(live) { ++live; }
    ~Sequence() override { --live; }
    int64_t length() const override { return inner->length(); }
    std::unique_ptr<SequenceCache> inner;
    int& live;
  };

  LanguageModel& inner_;
  int slots_;
  bool device_sampling_;
  int live_ = 0;
};

class BatchGeneratorTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    EngineOptions options;
    options.model_dir = (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
    options.progress = false;
    options.device = "cpu";
    options.prefill_chunk = 7;
    options.max_batch = 3;
    engine_ = new Engine(options);
  }
  static void TearDownTestSuite() { delete engine_; }

  static std::vector<int32_t> prompt(const std::string& text) { return engine_->tokenizer().encode(text); }
  static std::string chat(const std::string& user) {
    return "<｜begin▁of▁sentence｜><｜User｜>" + user + "<｜Assistant｜></think>";
  }
  static SamplingParams greedy(int n) {
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = n;
    return p;
  }
  static SamplingParams seeded(int n, uint64_t seed) {
    SamplingParams p;
    p.temperature = 0.9f;
    p.top_k = 40;
    p.seed = seed;
    p.max_tokens = n;
    return p;
  }
  static GenerationResult alone(const std::vector<int32_t>& ids, const SamplingParams& params) {
    engine_->reset();
    return engine_->generate(ids, params, {});
  }
  static BatchGeneratorOptions options(int max_batch, int64_t budget) {
    BatchGeneratorOptions o = BatchGeneratorOptions::from(engine_->options());
    o.max_batch = max_batch;
    o.step_prefill_tokens = budget;
    return o;
  }
  static BatchRequest request(std::vector<int32_t> ids, SamplingParams params) {
    BatchRequest r;
    r.prompt = std::move(ids);
    r.params = std::move(params);
    return r;
  }

  static Engine* engine_;
};
Engine* BatchGeneratorTest::engine_ = nullptr;

}  // namespace

TEST_F(BatchGeneratorTest, EveryRequestGeneratesWhatItGeneratesAlone) {
  struct Case {
    std::vector<int32_t> ids;
    SamplingParams params;
  };
  std::vector<Case> cases = {
      {prompt(chat("Tell me a fortune.")), greedy(20)},
      {prompt(chat("Tell me a long fortune about computers, cats, the sea and the stars.")), seeded(30, 1)},
      {prompt("<｜begin▁of▁sentence｜>The best way to"), seeded(12, 2)},
      {prompt(chat("Say something wise about patience and time.")), greedy(25)},
      {prompt("<｜begin▁of▁sentence｜>Q: What do you call"), seeded(40, 3)},
      {prompt("<｜begin▁of▁sentence｜>A"), greedy(8)},
      {prompt(chat("Tell me a fortune about computers.")), seeded(16, 4)},
  };
  cases[1].params.top_p = 0.9f, cases[1].params.repetition_penalty = 1.2f;
  cases[4].params.min_p = 0.05f, cases[4].params.frequency_penalty = 0.4f, cases[4].params.stop = {"."};
  cases[6].params.logit_bias = {{5, 2.0f}}, cases[6].params.presence_penalty = 0.5f;

  BatchGenerator generator(*engine_, options(3, 10));
  EXPECT_EQ(generator.chunk(), 7);
  std::vector<std::string> streamed(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    BatchRequest r = request(cases[i].ids, cases[i].params);
    r.on_text = [&streamed, i](std::string_view text) { streamed[i] += text; };
    EXPECT_EQ(generator.submit(std::move(r)), i);
  }
  generator.run();
  EXPECT_EQ(generator.queued(), 0u);
  EXPECT_EQ(generator.running(), 0u);
  EXPECT_EQ(generator.stats().max_running, 3);
  int64_t generated = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    std::optional<BatchOutcome> got = generator.take(i);
    ASSERT_TRUE(got.has_value());
    ASSERT_TRUE(got->ok()) << got->error;
    EXPECT_FALSE(generator.take(i).has_value());  // taken once
    const GenerationResult want = alone(cases[i].ids, cases[i].params);
    EXPECT_EQ(got->result.tokens, want.tokens);
    EXPECT_EQ(got->result.text, want.text);
    EXPECT_EQ(streamed[i], want.text);
    EXPECT_EQ(got->result.finish, want.finish);
    EXPECT_EQ(got->result.prompt_tokens, int64_t(cases[i].ids.size()));
    EXPECT_EQ(got->result.prefilled_tokens, int64_t(cases[i].ids.size()));
    generated += int64_t(want.tokens.size());
  }
  EXPECT_EQ(generator.stats().generated_tokens, generated);
}

// The default batched step (the CPU model's): each entry's logits are those of its own forward call, bit for bit.
TEST_F(BatchGeneratorTest, ABatchedStepGivesEachSequenceItsOwnLogits) {
  LanguageModel& model = engine_->model();
  const std::vector<int32_t> a = prompt(chat("Tell me a fortune.")), b = prompt("<｜begin▁of▁sentence｜>The best way to");
  auto batched_a = model.new_sequence(), batched_b = model.new_sequence();
  auto alone_a = model.new_sequence(), alone_b = model.new_sequence();
  std::vector<float> batched, want_a, want_b;
  model.forward_batch(std::vector<BatchEntry>{{batched_a.get(), a, nullptr}, {batched_b.get(), b, nullptr}}, batched);
  model.forward(*alone_a, a, LogitRows::Last, want_a);
  model.forward(*alone_b, b, LogitRows::Last, want_b);
  std::vector<float> want = want_a;
  want.insert(want.end(), want_b.begin(), want_b.end());
  EXPECT_EQ(batched, want);
  // Then one decode token each.
  const int32_t next_a = 7, next_b = 11;
  model.forward_batch(std::vector<BatchEntry>{{batched_b.get(), std::span(&next_b, 1), nullptr},
                                              {batched_a.get(), std::span(&next_a, 1), nullptr}},
                      batched);
  model.forward(*alone_a, std::span(&next_a, 1), LogitRows::Last, want_a);
  model.forward(*alone_b, std::span(&next_b, 1), LogitRows::Last, want_b);
  want = want_b;
  want.insert(want.end(), want_a.begin(), want_a.end());
  EXPECT_EQ(batched, want);
  EXPECT_EQ(batched_a->length(), int64_t(a.size()) + 1);
  EXPECT_THROW(model.forward_batch({}, batched), Error);
  std::vector<SampledEntry> tokens;
  EXPECT_THROW(model.forward_batch_and_sample(std::vector<BatchEntry>{{batched_a.get(), a, nullptr}}, tokens), Error);
}

// Where the model samples on its device, the generator hands it each row's Sampler::device_step (the prompt's last
// chunk and every decode token), and the tokens are those of host sampling alone.
TEST_F(BatchGeneratorTest, SamplingOnTheDeviceGivesTheSameTokens) {
  RecordingModel model(engine_->model(), 3, true);
  engine_->reset();
  BatchGenerator generator(model, engine_->tokenizer(), engine_->eos_ids(), options(3, 10));
  std::vector<std::pair<std::vector<int32_t>, SamplingParams>> cases;
  for (int i = 0; i < 5; ++i) {
    SamplingParams p = i % 2 == 0 ? greedy(10 + 3 * i) : seeded(10 + 3 * i, uint64_t(i));
    p.top_k = 0;
    if (i == 3) p.repetition_penalty = 1.3f, p.frequency_penalty = 0.5f, p.logit_bias = {{9, 1.5f}};
    cases.emplace_back(prompt(chat(i % 2 ? "Tell me a fortune about the sea and the stars." : "Say something.")), p);
  }
  for (const auto& [ids, params] : cases) generator.submit(request(ids, params));
  generator.run();
  int64_t generated = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::optional<BatchOutcome> got = generator.take(i);
    ASSERT_TRUE(got && got->ok()) << i;
    const GenerationResult want = alone(cases[i].first, cases[i].second);
    EXPECT_EQ(got->result.tokens, want.tokens) << i;
    EXPECT_EQ(got->result.text, want.text) << i;
    generated += int64_t(want.tokens.size());
  }
  EXPECT_EQ(model.sampled_rows, generated);  // one row per token, none for the chunks before a prompt's last
}

TEST_F(BatchGeneratorTest, RequestsJoinBetweenStepsAndFinishedOnesFreeTheirSequence) {
  RecordingModel model(engine_->model(), 2);
  engine_->reset();
  BatchGenerator generator(model, engine_->tokenizer(), engine_->eos_ids(), options(2, 7));
  const std::vector<int32_t> a = prompt(chat("Tell me a fortune.")), b = prompt("<｜begin▁of▁sentence｜>The best way to");
  EXPECT_EQ(generator.submit(request(a, greedy(2))), 0u);
  EXPECT_EQ(generator.submit(request(b, greedy(12))), 1u);
  EXPECT_EQ(generator.submit(request(a, seeded(6, 9))), 2u);  // waits for a free sequence
  EXPECT_TRUE(generator.step());
  EXPECT_EQ(generator.running(), 2u);
  EXPECT_EQ(generator.queued(), 1u);
  EXPECT_EQ(model.live(), 2);
  // Request 0 reads its 9-token prompt in two steps (7 + 2 tokens; b's 5 tokens join the second, within the 7-token
  // budget), then decodes; the step that samples its second token ends it and frees its sequence at once.
  while (!generator.take(0)) {
    ASSERT_TRUE(generator.step());
  }
  EXPECT_EQ(model.live(), 1);
  EXPECT_EQ(generator.running(), 1u);
  EXPECT_EQ(generator.queued(), 1u);
  EXPECT_TRUE(generator.step());  // request 2 joins while request 1 decodes
  EXPECT_EQ(model.live(), 2);
  EXPECT_EQ(generator.queued(), 0u);
  // A request submitted between steps joins too.
  EXPECT_EQ(generator.submit(request(b, greedy(3))), 3u);
  generator.run();
  EXPECT_EQ(model.live(), 0);
  EXPECT_EQ(generator.take(1)->result.tokens, alone(b, greedy(12)).tokens);
  EXPECT_EQ(generator.take(2)->result.tokens, alone(a, seeded(6, 9)).tokens);
  EXPECT_EQ(generator.take(3)->result.tokens, alone(b, greedy(3)).tokens);
  // Never more sequences in a step than the batch.
  for (const auto& step : model.steps) EXPECT_LE(step.size(), 2u);
}

TEST_F(BatchGeneratorTest, CancelledRequestsEndAtTheNextStepAndFreeTheirSequence) {
  RecordingModel model(engine_->model(), 2);
  engine_->reset();
  BatchGenerator generator(model, engine_->tokenizer(), engine_->eos_ids(), options(2, 14));
  const std::vector<int32_t> ids = prompt("<｜begin▁of▁sentence｜>Q: What do you call");
  std::atomic<bool> cancel_running{false}, cancel_queued{false};
  BatchRequest running = request(ids, greedy(50)), queued = request(ids, greedy(50));
  running.cancel = &cancel_running;
  queued.cancel = &cancel_queued;
  generator.submit(std::move(running));
  generator.submit(request(ids, greedy(6)));
  generator.submit(std::move(queued));
  for (int i = 0; i < 3; ++i) generator.step();
  EXPECT_EQ(model.live(), 2);
  cancel_running = true;
  cancel_queued = true;
  generator.step();
  const std::optional<BatchOutcome> cancelled = generator.take(0);
  ASSERT_TRUE(cancelled.has_value());
  EXPECT_TRUE(cancelled->ok());
  EXPECT_EQ(cancelled->result.finish, FinishReason::Abort);
  EXPECT_EQ(cancelled->result.tokens.size(), 3u);  // one token per step before the cancel
  const std::optional<BatchOutcome> never_ran = generator.take(2);
  ASSERT_TRUE(never_ran.has_value());
  EXPECT_EQ(never_ran->result.finish, FinishReason::Abort);
  EXPECT_TRUE(never_ran->result.tokens.empty());
  EXPECT_EQ(model.live(), 1);
  generator.run();
  EXPECT_EQ(generator.take(1)->result.tokens, alone(ids, greedy(6)).tokens);
}

TEST_F(BatchGeneratorTest, BadRequestsFailAloneWithAMessage) {
  BatchGenerator generator(*engine_, options(3, 7));
  const std::vector<int32_t> ids = prompt(chat("Say something wise."));
  const int64_t context = engine_->model().context_length(), vocab = engine_->config().vocab_size;
  std::map<uint64_t, std::string> expected_errors;
  expected_errors[generator.submit(request({}, greedy(4)))] = "empty";
  expected_errors[generator.submit(request(std::vector<int32_t>(size_t(context), 5), greedy(4)))] = "context";
  expected_errors[generator.submit(request({1, int32_t(vocab)}, greedy(4)))] = "vocabulary";
  SamplingParams bad_top_p = greedy(4);
  bad_top_p.top_p = 2;
  expected_errors[generator.submit(request(ids, bad_top_p))] = "top_p";
  SamplingParams empty_stop = greedy(4);
  empty_stop.stop = {""};
  expected_errors[generator.submit(request(ids, empty_stop))] = "stop";
  BatchRequest throwing = request(ids, greedy(10));
  throwing.on_text = [](std::string_view) { throw Error("client went away"); };
  expected_errors[generator.submit(std::move(throwing))] = "client went away";
  const uint64_t good = generator.submit(request(ids, greedy(10)));
  const uint64_t good_sampled = generator.submit(request(ids, seeded(10, 3)));
  generator.run();
  for (const auto& [id, message] : expected_errors) {
    std::optional<BatchOutcome> outcome = generator.take(id);
    ASSERT_TRUE(outcome.has_value()) << id;
    EXPECT_FALSE(outcome->ok()) << id;
    EXPECT_NE(outcome->error.find(message), std::string::npos) << id << ": " << outcome->error;
  }
  EXPECT_EQ(generator.take(good)->result.tokens, alone(ids, greedy(10)).tokens);
  EXPECT_EQ(generator.take(good_sampled)->result.tokens, alone(ids, seeded(10, 3)).tokens);
}

TEST_F(BatchGeneratorTest, PromptChunksStayWithinTheBudgetAndDecodesNeverWait) {
  RecordingModel model(engine_->model(), 3);
  engine_->reset();
  BatchGenerator generator(model, engine_->tokenizer(), engine_->eos_ids(), options(3, 10));
  const std::vector<int32_t> shorter = prompt("<｜begin▁of▁sentence｜>The best way to");
  const std::vector<int32_t> longer =
      prompt(chat("Tell me a very long fortune about computers, cats, the sea, the stars, old friends, rain and the "
                  "patience of mountains."));
  ASSERT_GT(longer.size(), 28u);
  generator.submit(request(shorter, greedy(30)));
  generator.step();  // its whole prompt in one chunk; from now on it decodes
  generator.submit(request(longer, greedy(5)));
  generator.submit(request(longer, greedy(5)));
  generator.run();
  ASSERT_GT(model.steps.size(), 8u);
  const SequenceCache* first = model.steps[0][0].first;
  for (size_t s = 1; s < model.steps.size(); ++s) {
    size_t prompt_tokens = 0;
    bool first_decodes = false;
    for (const auto& [sequence, tokens] : model.steps[s]) {
      if (sequence == first) first_decodes = tokens == 1;
      else if (tokens > 1) prompt_tokens += tokens;
    }
    EXPECT_LE(prompt_tokens, 10u) << "step " << s;  // one 7-token chunk of the 10-token budget
    if (s < 30) EXPECT_TRUE(first_decodes) << "step " << s;
  }
  EXPECT_EQ(generator.take(0)->result.tokens, alone(shorter, greedy(30)).tokens);
  EXPECT_EQ(generator.take(1)->result.tokens, alone(longer, greedy(5)).tokens);
}

TEST_F(BatchGeneratorTest, OptionsTheModelCannotRunAreRefused) {
  RecordingModel model(engine_->model(), 2);
  try {
    BatchGenerator generator(model, engine_->tokenizer(), engine_->eos_ids(), options(3, 7));
    FAIL() << "a batch of 3 on 2 slots was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch of 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(BatchGenerator(model, engine_->tokenizer(), engine_->eos_ids(), options(2, 0)), Error);
  EXPECT_THROW(BatchGenerator(model, engine_->tokenizer(), engine_->eos_ids(), options(0, 7)), Error);
}
