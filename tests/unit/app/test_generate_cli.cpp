// `dsv4 generate` and `dsv4 chat` end to end on a golden tiny model with a tiny tokenizer.
#include "support/cli_runner.hpp"
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"

#include <gtest/gtest.h>

#include <filesystem>

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
