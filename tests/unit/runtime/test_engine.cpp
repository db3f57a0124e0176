// The generation loop on a golden tiny model with a tiny tokenizer: greedy decoding equals the argmax of one-shot
// prefill logits at every step, seeds reproduce, chat turns reuse the sequence, stops and bad input behave.
#include "core/error.hpp"
#include "runtime/engine.hpp"
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"

#include <gtest/gtest.h>

#include <algorithm>

using namespace dsv4;
namespace fs = std::filesystem;

namespace {

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new dsv4::testing::TempDir("engine");
    for (const auto& entry : fs::directory_iterator(fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like"))
      fs::copy(entry.path(), dir_->path() / entry.path().filename());
    dsv4::testing::write_tiny_tokenizer(dir_->path());
  }
  static void TearDownTestSuite() { delete dir_; }
  static EngineOptions options() {
    EngineOptions o;
    o.model_dir = dir_->path().string();
    o.progress = false;
    o.prefill_chunk = 5;
    return o;
  }
  static SamplingParams greedy(int n) {
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = n;
    return p;
  }
  static dsv4::testing::TempDir* dir_;
};
dsv4::testing::TempDir* EngineTest::dir_ = nullptr;

}  // namespace

TEST_F(EngineTest, GreedyDecodingFollowsTheOneShotArgmax) {
  Engine engine(options());
  const std::vector<int32_t> prompt = engine.tokenizer().encode_prompt("the cat sat on the mat");
  std::string streamed;
  const GenerationResult r = engine.generate(prompt, greedy(12), [&](std::string_view t) { streamed += t; });
  ASSERT_FALSE(r.tokens.empty());
  EXPECT_EQ(r.text, streamed);
  EXPECT_EQ(r.prompt_tokens, int64_t(prompt.size()));

  // Recompute each step from scratch: prefill of prompt + the tokens so far, argmax of the last row.
  std::vector<int32_t> all = prompt;
  const int64_t vocab = engine.config().vocab_size;
  for (int32_t token : r.tokens) {
    auto seq = engine.model().new_sequence();
    std::vector<float> logits;
    engine.model().forward(*seq, all, LogitRows::Last, logits);
    EXPECT_EQ(std::max_element(logits.begin(), logits.begin() + vocab) - logits.begin(), token);
    all.push_back(token);
  }
  if (r.finish == FinishReason::Length) EXPECT_EQ(r.tokens.size(), 12u);
  else EXPECT_EQ(r.tokens.back(), 1);  // EOS
}

TEST_F(EngineTest, SeedsReproduceAndChatTurnsReuseTheSequence) {
  Engine engine(options());
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 7;
  p.max_tokens = 10;
  const std::vector<int32_t> prompt = engine.tokenizer().encode_prompt("once upon a time");
  const GenerationResult a = engine.generate(prompt, p, nullptr);
  engine.reset();
  const GenerationResult b = engine.generate(prompt, p, nullptr);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(b.prefilled_tokens, int64_t(prompt.size()));

  // A prompt that extends the last one runs only the new tokens.
  std::vector<int32_t> next = prompt;
  next.insert(next.end(), b.tokens.begin(), b.tokens.end());
  const std::vector<int32_t> more = engine.tokenizer().encode(" and then");
  next.insert(next.end(), more.begin(), more.end());
  const GenerationResult c = engine.generate(next, greedy(3), nullptr);
  EXPECT_EQ(c.prefilled_tokens, int64_t(more.size()) + 1);  // the last sampled token was never run

  // The same prompt from scratch gives the same tokens.
  engine.reset();
  EXPECT_EQ(engine.generate(next, greedy(3), nullptr).tokens, c.tokens);
}

TEST_F(EngineTest, StopsCancellationAndErrors) {
  Engine engine(options());
  const std::vector<int32_t> prompt = engine.tokenizer().encode_prompt("hello there");
  const GenerationResult full = engine.generate(prompt, greedy(16), nullptr);
  ASSERT_GE(full.text.size(), 4u);

  // A stop string cuts the text before it.
  SamplingParams stop = greedy(16);
  stop.stop = {full.text.substr(2, 2)};
  const GenerationResult cut = engine.generate(prompt, stop, nullptr);
  EXPECT_EQ(cut.finish, FinishReason::Stop);
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop.stop[0])));

  std::atomic<bool> cancel{true};
  EXPECT_EQ(engine.generate(prompt, greedy(16), nullptr, &cancel).finish, FinishReason::Abort);

  EXPECT_THROW(engine.generate({}, greedy(4), nullptr), Error);
  // A callback that throws mid-generation leaves no half-filled cache behind: the next call runs from scratch.
  EXPECT_THROW(engine.generate(prompt, greedy(8), [](std::string_view) { throw Error("client went away"); }), Error);
  const GenerationResult again = engine.generate(prompt, greedy(16), nullptr);
  EXPECT_EQ(again.prefilled_tokens, int64_t(prompt.size()));
  EXPECT_EQ(again.tokens, full.tokens);
  SamplingParams bad = greedy(4);
  bad.top_p = 2;
  EXPECT_THROW(engine.generate(prompt, bad, nullptr), Error);
  std::vector<int32_t> too_long(size_t(engine.config().max_position_embeddings), 5);
  EXPECT_THROW(engine.generate(too_long, greedy(4), nullptr), Error);
}

TEST(EngineLoad, MissingTokenizerIsAClearError) {
  EngineOptions o;
  o.model_dir = (fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like").string();
  o.progress = false;
  Engine engine(o);
  try {
    engine.tokenizer();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos);
  }
}
