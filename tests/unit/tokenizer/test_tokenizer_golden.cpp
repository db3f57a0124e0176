// The real DeepSeek tokenizer against ids from HuggingFace `tokenizers` (scripts/make_tokenizer_golden.py wrote
// tests/golden/tokenizer/deepseek_v3.jsonl). Skips when ../shared (which holds tokenizer.json) is absent.
#include "tokenizer/bpe_tokenizer.hpp"
#include "tokenizer/streaming_decoder.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace {

const std::filesystem::path kTokenizerDir = std::filesystem::path(DSV4_SHARED_DIR) / "data/tokenizer-deepseek-v3";
const std::filesystem::path kGoldenFile = std::filesystem::path(DSV4_SOURCE_DIR) / "tests/golden/tokenizer/deepseek_v3.jsonl";

struct GoldenCase {
  std::string text;
  std::vector<int32_t> ids;
  std::optional<std::vector<int32_t>> ids_plain;  // present where encoding without added tokens differs
  bool is_decode = false;                         // a {"decode": ids, "text": ...} case
};

std::vector<GoldenCase> read_golden() {
  std::ifstream file(kGoldenFile);
  std::vector<GoldenCase> cases;
  std::string line;
  while (std::getline(file, line)) {
    const nlohmann::json record = nlohmann::json::parse(line);
    GoldenCase golden;
    golden.text = record.at("text").get<std::string>();
    golden.is_decode = record.contains("decode");
    golden.ids = record.at(golden.is_decode ? "decode" : "ids").get<std::vector<int32_t>>();
    if (record.contains("ids_plain")) golden.ids_plain = record["ids_plain"].get<std::vector<int32_t>>();
    cases.push_back(std::move(golden));
  }
  return cases;
}

std::string ids_string(const std::vector<int32_t>& ids) {
  std::string out;
  for (const int32_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

class DeepSeekTokenizer : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kTokenizerDir / "tokenizer.json")) return;
    tokenizer_ = new dsv4::Tokenizer(dsv4::Tokenizer::from_file(kTokenizerDir));
    cases_ = new std::vector<GoldenCase>(read_golden());
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete cases_;
  }
  void SetUp() override {
    if (tokenizer_ == nullptr) GTEST_SKIP() << "no DeepSeek tokenizer at " << kTokenizerDir;
  }
  static dsv4::Tokenizer* tokenizer_;
  static std::vector<GoldenCase>* cases_;
};

dsv4::Tokenizer* DeepSeekTokenizer::tokenizer_ = nullptr;
std::vector<GoldenCase>* DeepSeekTokenizer::cases_ = nullptr;

TEST_F(DeepSeekTokenizer, FileFacts) {
  EXPECT_TRUE(tokenizer_->uses_jit());
  EXPECT_EQ(tokenizer_->vocab_size(), 128815);
  EXPECT_EQ(tokenizer_->bos_id(), tokenizer_->token_to_id("<｜begin▁of▁sentence｜>"));
  EXPECT_EQ(tokenizer_->eos_id(), tokenizer_->token_to_id("<｜end▁of▁sentence｜>"));
  EXPECT_TRUE(tokenizer_->is_special(tokenizer_->bos_id()));
  // tokenizer_config.json sets add_bos_token: a prompt starts with BOS.
  const std::vector<int32_t> prompt = tokenizer_->encode_prompt("Hello world");
  ASSERT_EQ(prompt.size(), 3u);
  EXPECT_EQ(prompt[0], tokenizer_->bos_id());
}

TEST_F(DeepSeekTokenizer, EncodeMatchesHuggingFace) {
  ASSERT_GE(cases_->size(), 2000u) << "golden file " << kGoldenFile << " is missing or short";
  int checked = 0;
  int mismatches = 0;
  for (const GoldenCase& golden : *cases_) {
    if (golden.is_decode) continue;
    ++checked;
    const std::vector<int32_t> ids = tokenizer_->encode(golden.text);
    if (ids != golden.ids && ++mismatches <= 10) {
      ADD_FAILURE() << "encode(" << nlohmann::json(golden.text).dump() << ")\n  got      " << ids_string(ids)
                    << "\n  expected " << ids_string(golden.ids);
    }
    const std::vector<int32_t> plain = tokenizer_->encode(golden.text, /*allow_special=*/false);
    const std::vector<int32_t>& expected_plain = golden.ids_plain ? *golden.ids_plain : golden.ids;
    if (plain != expected_plain && ++mismatches <= 10) {
      ADD_FAILURE() << "encode(" << nlohmann::json(golden.text).dump() << ", allow_special=false)\n  got      "
                    << ids_string(plain) << "\n  expected " << ids_string(expected_plain);
    }
    EXPECT_EQ(tokenizer_->decode(ids), golden.text);
  }
  EXPECT_GE(checked, 2000);
  EXPECT_EQ(mismatches, 0);
}

TEST_F(DeepSeekTokenizer, DecodeMatchesHuggingFace) {
  int checked = 0;
  for (const GoldenCase& golden : *cases_) {
    if (!golden.is_decode) continue;
    ++checked;
    EXPECT_EQ(tokenizer_->decode(golden.ids), golden.text) << "ids " << ids_string(golden.ids);
    // Streaming the same ids yields the same text, in pieces that are each valid UTF-8.
    dsv4::StreamingDecoder stream(*tokenizer_);
    std::string streamed;
    for (const int32_t id : golden.ids) streamed += stream.push(id);
    streamed += stream.finish();
    EXPECT_EQ(streamed, golden.text) << "ids " << ids_string(golden.ids);
  }
  EXPECT_GE(checked, 100);
}

}  // namespace
