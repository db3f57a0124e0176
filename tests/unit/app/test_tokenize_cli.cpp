// `dsv4 tokenize` and `dsv4 detokenize` end to end: the built binary on a small tokenizer written here.
#include "support/byte_level.hpp"
#include "support/cli_runner.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace {

using dsv4::testing::CliResult;
using dsv4::testing::run_cli;

// A byte-level BPE folder: id b is byte b, "hi" = 256 (merge "h i"), "<s>" = 257 (special, BOS).
class TokenizeCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("dsv4-tokenize-cli-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(dir_);
    nlohmann::json vocab = nlohmann::json::object();
    for (int b = 0; b < 256; ++b) vocab[dsv4::testing::byte_level_spelling(static_cast<unsigned char>(b))] = b;
    vocab["hi"] = 256;
    tokenizer_json_ = {
        {"added_tokens", {{{"id", 257}, {"content", "<s>"}, {"special", true}, {"normalized", false}}}},
        {"normalizer", nullptr},
        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
        {"post_processor", nullptr},
        {"decoder", {{"type", "ByteLevel"}}},
        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"h i"}}}}};
    write("tokenizer.json", tokenizer_json_.dump());
    write("tokenizer_config.json", R"({"bos_token": "<s>", "add_bos_token": true})");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void write(const std::string& name, const std::string& contents) const {
    std::ofstream(dir_ / name, std::ios::binary) << contents;
  }
  std::string path(const std::string& name = "") const { return (name.empty() ? dir_ : dir_ / name).string(); }

  std::filesystem::path dir_;
  nlohmann::json tokenizer_json_;
};

TEST_F(TokenizeCli, PrintsIdsForTextAndFiles) {
  CliResult result = run_cli("tokenize --tokenizer " + path("tokenizer.json") + " --text 'hi hi'");
  EXPECT_EQ(result.exit_code, 0) << result.text();
  EXPECT_EQ(result.out, "256,32,256\n");

  result = run_cli("tokenize -m " + path() + " --text hi --bos");
  EXPECT_EQ(result.out, "257,256\n");

  write("prompt.txt", "<s>hi\n");
  result = run_cli("tokenize -m " + path() + " --file " + path("prompt.txt"));
  EXPECT_EQ(result.out, "257,256,10\n");
  result = run_cli("tokenize -m " + path() + " --file " + path("prompt.txt") + " --no-special");
  EXPECT_EQ(result.out, "60,115,62,256,10\n");

  result = run_cli("tokenize -m " + path() + " --text 'hi!' --json");
  ASSERT_EQ(result.exit_code, 0) << result.text();
  const nlohmann::json json = nlohmann::json::parse(result.out);
  EXPECT_EQ(json["ids"], nlohmann::json({256, 33}));
  EXPECT_EQ(json["tokens"], nlohmann::json({"hi", "!"}));
  EXPECT_EQ(json["count"], 2);
}

TEST_F(TokenizeCli, DetokenizePrintsText) {
  CliResult result = run_cli("detokenize -m " + path() + " --ids 257,256,32,33");
  EXPECT_EQ(result.exit_code, 0) << result.text();
  EXPECT_EQ(result.out, "<s>hi !\n");
  result = run_cli("detokenize -m " + path() + " --ids '257 256' --skip-special");
  EXPECT_EQ(result.out, "hi\n");
  // Half of "é" shows as U+FFFD rather than as a broken byte.
  result = run_cli("detokenize -m " + path() + " --ids 104,195");
  EXPECT_EQ(result.out, "h\xEF\xBF\xBD\n");
}

TEST_F(TokenizeCli, BadInputFailsWithItsCause) {
  CliResult result = run_cli("detokenize -m " + path() + " --ids 1,258");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("token id 258 is out of range"), std::string::npos) << result.text();

  result = run_cli("detokenize -m " + path() + " --ids 1,two");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("'two' is not a token id"), std::string::npos) << result.text();

  write("bad.txt", "ok\xC3(");
  result = run_cli("tokenize -m " + path() + " --file " + path("bad.txt"));
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("invalid UTF-8 at byte offset 2 (0xC3)"), std::string::npos) << result.text();

  result = run_cli("tokenize --tokenizer " + path("missing.json") + " --text hi");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("tokenizer file not found"), std::string::npos) << result.text();

  result = run_cli("tokenize --text hi");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("no tokenizer given"), std::string::npos) << result.text();

  result = run_cli("tokenize -m " + path());
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("nothing to tokenize"), std::string::npos) << result.text();

  result = run_cli("tokenize -m " + path() + " --text hi --file x");
  EXPECT_NE(result.exit_code, 0);
  EXPECT_NE(result.exit_code, 1) << "a usage error, reported by the option parser";

  tokenizer_json_["normalizer"] = {{"type", "NFKC"}};
  write("tokenizer.json", tokenizer_json_.dump());
  result = run_cli("tokenize -m " + path() + " --text hi");
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_NE(result.text().find("normalizer.type 'NFKC' is not supported"), std::string::npos) << result.text();
}

}  // namespace
