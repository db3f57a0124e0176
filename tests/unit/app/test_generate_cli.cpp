// `dsv4 generate` and `dsv4 chat` end to end on a golden tiny model with a tiny tokenizer; `generate --prompt-file`
// (continuous batching) on the trained tiny model.
#include "support/cli_runner.hpp"
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using dsv4::testing::CliResult;
using dsv4::testing::run_cli;

namespace {

class GenerateCli : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const auto& entry : fs::directory_iterator(fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like"))
      fs::copy(entry.path(), dir_.path() / entry.path().filename());
    dsv4::testing::write_tiny_tokenizer(dir_.path());
  }
  std::string model() const { return "-m " + dir_.path().string(); }
  dsv4::testing::TempDir dir_{"generate-cli"};
};

}  // namespace

TEST_F(GenerateCli, StreamsTextAndReportsSpeed) {
  const CliResult a = run_cli("generate " + model() + " -p 'hello world' -n 12 --seed 4");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_FALSE(a.out.empty());
  EXPECT_NE(a.err.find("generated"), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("tok/s"), std::string::npos) << a.err;
  // Same seed, same text; raw and chat prompts differ in length.
  EXPECT_EQ(run_cli("generate " + model() + " -p 'hello world' -n 12 --seed 4").out, a.out);
  // Raw: BOS and the text's tokens, without the chat template around them.
  const CliResult raw = run_cli("generate " + model() + " -p 'hello world' -n 4 --raw --temp 0");
  ASSERT_EQ(raw.exit_code, 0) << raw.err;
  EXPECT_NE(raw.err.find("[prompt 8 tokens"), std::string::npos) << raw.err;
  EXPECT_NE(a.err.find("[prompt 11 tokens"), std::string::npos) << a.err;
  const CliResult think = run_cli("generate " + model() + " -p 'hello world' -n 4 --think --temp 0");
  EXPECT_EQ(think.exit_code, 0) << think.err;
}

TEST_F(GenerateCli, BadInputFailsWithAMessage) {
  CliResult r = run_cli("generate " + model() + " -p ''");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("empty"), std::string::npos) << r.err;
  r = run_cli("generate " + model() + " -p hi --temp -1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("temperature"), std::string::npos) << r.err;
  r = run_cli("generate " + model() + " -p \"$(printf '\\377\\376')\"");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("UTF-8"), std::string::npos) << r.err;
  r = run_cli("generate -m " + (fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like").string() + " -p hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("tokenizer.json"), std::string::npos) << r.err;
}

TEST_F(GenerateCli, ChatKeepsGoingUntilQuit) {
  const CliResult r =
      run_cli("chat " + model() + " -n 6 --temp 0", "hello\n/think on\nwhy?\n/think maybe\n/reset\n/nope\nhi\n/quit\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("(thinking on)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(history cleared)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(unknown command /nope"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("expected on or off"), std::string::npos) << r.out;
  // One speed line per answered turn.
  size_t turns = 0;
  for (size_t at = 0; (at = r.err.find("[prompt ", at)) != std::string::npos; ++at) ++turns;
  EXPECT_EQ(turns, 3u) << r.err;
  // End of input also ends the chat.
  EXPECT_EQ(run_cli("chat " + model() + " -n 2", "hello\n").exit_code, 0);
}

// --prompt-file with --batch: the trained tiny model, every line generated concurrently; each result equals what
// `generate -p` gives for that prompt alone, in input order; a bad line fails alone.
TEST(GenerateBatchCli, EveryPromptGetsWhatItGetsAlone) {
  const std::string model = "-m " + (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
  dsv4::testing::TempDir dir("generate-batch-cli");
  const std::vector<std::string> lines = {
      "Tell me a fortune.",
      "",
      "Say something wise about patience.",
      R"({"prompt": "The best way to", "raw": true, "max_tokens": 6, "seed": 9, "temperature": 0.8})",
      R"({"prompt": "oops", "top_p": 2})",
      R"({"prompt": "Tell me a fortune about computers.", "stop": ".", "bogus": 1})",
      "Tell me a fortune about cats.",
  };
  const fs::path file = dir.path() / "prompts.txt";
  {
    std::ofstream out(file);
    for (const std::string& line : lines) out << line << "\n";
  }
  const std::string args = "generate " + model + " --prompt-file " + file.string() + " -n 16 --seed 4";
  const CliResult r = run_cli(args + " --batch 3 --json");
  EXPECT_EQ(r.exit_code, 1) << r.err;  // some lines failed
  EXPECT_NE(r.err.find("[batch: 6 prompts"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tok/s"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("2 failed"), std::string::npos) << r.err;
  std::vector<nlohmann::json> results;
  std::istringstream out(r.out);
  for (std::string line; std::getline(out, line);) results.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(results.size(), 6u) << r.out;
  const std::vector<int> line_numbers = {1, 3, 4, 5, 6, 7};
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(results[i]["index"], i);
    EXPECT_EQ(results[i]["line"], line_numbers[i]);
  }
  EXPECT_NE(results[3]["error"].get<std::string>().find("top_p"), std::string::npos) << results[3];
  EXPECT_NE(results[4]["error"].get<std::string>().find("unknown key 'bogus'"), std::string::npos) << results[4];
  EXPECT_EQ(results[4]["prompt"], "Tell me a fortune about computers.");
  // The others, each alone with the same settings.
  for (const size_t i : {0u, 1u, 5u}) {
    const CliResult alone = run_cli("generate " + model + " -p '" + results[i]["prompt"].get<std::string>() +
                                    "' -n 16 --seed 4");
    ASSERT_EQ(alone.exit_code, 0) << alone.err;
    EXPECT_EQ(results[i]["text"].get<std::string>() + "\n", alone.out) << i;
    EXPECT_EQ(results[i]["finish_reason"].get<std::string>(), alone.err.find("finish: stop") != std::string::npos
                                                                  ? "stop"
                                                                  : "length")
        << i;
  }
  const CliResult raw = run_cli("generate " + model + " -p 'The best way to' --raw -n 6 --seed 9 --temp 0.8");
  EXPECT_EQ(results[2]["text"].get<std::string>() + "\n", raw.out);
  EXPECT_EQ(results[2]["completion_tokens"], 6);

  // Plain output: a header per prompt, in input order, then its text; batch 1 gives the same texts.
  const CliResult plain = run_cli(args + " --batch 1");
  EXPECT_EQ(plain.exit_code, 1) << plain.err;
  size_t at = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    at = plain.out.find("### " + std::to_string(i + 1) + " (line " + std::to_string(line_numbers[i]), at);
    ASSERT_NE(at, std::string::npos) << i << "\n" << plain.out;
    if (results[i].contains("text"))
      EXPECT_EQ(plain.out.compare(plain.out.find('\n', at) + 1, results[i]["text"].get<std::string>().size(),
                                  results[i]["text"].get<std::string>()),
                0)
          << i;
  }
}

TEST(GenerateBatchCli, BadArgumentsFailWithAMessage) {
  const std::string model = "-m " + (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
  CliResult r = run_cli("generate " + model + " -p hi --prompt-file /nonexistent");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("either a prompt"), std::string::npos) << r.err;
  r = run_cli("generate " + model);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("either a prompt"), std::string::npos) << r.err;
  r = run_cli("generate " + model + " --prompt-file /nonexistent/prompts.txt");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot open"), std::string::npos) << r.err;
  r = run_cli("generate " + model + " --prompt-file /dev/null");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no prompt"), std::string::npos) << r.err;
  r = run_cli("generate " + model + " --prompt-file /dev/null --batch 0");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--batch"), std::string::npos) << r.err;
  for (const char* option : {" --batch 2", " --json"}) {
    r = run_cli("generate " + model + " -p hi" + option);
    EXPECT_NE(r.exit_code, 0) << option;
    EXPECT_NE(r.err.find("--prompt-file"), std::string::npos) << option << ": " << r.err;
  }
}

// A JSON line whose value has the wrong type fails alone, its message naming the key.
TEST(GenerateBatchCli, BadValuesInAJsonLineAreNamed) {
  const std::string model = "-m " + (fs::path(DSV4_SOURCE_DIR) / "models/tiny-fortunes").string();
  dsv4::testing::TempDir dir("generate-batch-values");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"prompt": "a", "max_tokens": "six"})", "'max_tokens' must be an integer"},
      {R"({"prompt": "a", "max_tokens": 2.5})", "'max_tokens' must be an integer"},
      {R"({"prompt": "a", "max_tokens": 0})", "'max_tokens' must be at least 1"},
      {R"({"prompt": "a", "seed": -1})", "'seed' must be a non-negative integer"},
      {R"({"prompt": "a", "temperature": "hot"})", "'temperature' must be a number"},
      {R"({"prompt": "a", "stop": [1]})", "'stop' must be a string or an array of strings"},
      {R"({"prompt": 5})", "'prompt' must be a string"},
      {R"({"prompt": "a", "raw": 1})", "'raw' must be true or false"},
      {R"({"prompt": "Tell me a fortune."})", ""},
  };
  const fs::path file = dir.path() / "prompts.txt";
  {
    std::ofstream out(file);
    for (const auto& c : cases) out << c.first << "\n";
  }
  const CliResult r = run_cli("generate " + model + " --prompt-file " + file.string() + " -n 4 --json");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  std::vector<nlohmann::json> results;
  std::istringstream out(r.out);
  for (std::string line; std::getline(out, line);) results.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(results.size(), cases.size()) << r.out;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (cases[i].second.empty()) {
      EXPECT_FALSE(results[i].contains("error")) << results[i];
      continue;
    }
    ASSERT_TRUE(results[i].contains("error")) << results[i];
    EXPECT_NE(results[i]["error"].get<std::string>().find(cases[i].second), std::string::npos) << results[i];
  }
}
