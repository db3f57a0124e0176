// `dsv4 tokenize --chat`: the four golden DSV4 chat cases come out as the reference prompt text and its token ids.
#include "support/cli_runner.hpp"
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"
#include "tokenizer/bpe_tokenizer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using dsv4::testing::CliResult;
using dsv4::testing::run_cli;

namespace {

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST(TokenizeChatCli, GoldenChatCases) {
  const fs::path shared(DSV4_SHARED_DIR);
  const fs::path tokenizer = shared / "data/tokenizer-deepseek-v3/tokenizer.json";
  if (!fs::exists(tokenizer)) GTEST_SKIP() << "shared data not present: " << tokenizer;
  const dsv4::Tokenizer reference = dsv4::Tokenizer::from_file(tokenizer);
  for (int n = 1; n <= 4; ++n) {
    SCOPED_TRACE("case " + std::to_string(n));
    const fs::path input = shared / ("data/chat-encoding/input_" + std::to_string(n) + ".json");
    const std::string expected = read_file(shared / ("data/chat-encoding/output_" + std::to_string(n) + ".txt"));
    const std::string mode = n == 4 ? "chat" : "thinking";
    const CliResult r = run_cli("tokenize --tokenizer " + tokenizer.string() + " --chat " + input.string() +
                                " --mode " + mode + " --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const nlohmann::json result = nlohmann::json::parse(r.out);
    EXPECT_EQ(result["prompt"].get<std::string>(), expected);

    // The ids are those of the prompt text itself.
    EXPECT_EQ(result["ids"].get<std::vector<int32_t>>(), reference.encode(expected));
  }
}

TEST(TokenizeChatCli, BadChatFiles) {
  dsv4::testing::TempDir dir("bad-chat");
  dsv4::testing::write_tiny_tokenizer(dir.path());
  const fs::path tokenizer = dir / "tokenizer.json";
  const fs::path bad = dir / "chat.json";
  for (const auto& [content, message] : {std::pair{"[{\"role\": \"bogus\"}]", "unknown role 'bogus'"},
                                         std::pair{"{not json", "not valid JSON"},
                                         std::pair{"42", "expected a list of messages"}}) {
    std::ofstream(bad) << content;
    const CliResult r = run_cli("tokenize --tokenizer " + tokenizer.string() + " --chat " + bad.string());
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find(message), std::string::npos) << r.text();
  }
  const CliResult r =
      run_cli("tokenize --tokenizer " + tokenizer.string() + " --chat " + bad.string() + " --mode fast");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("thinking or chat"), std::string::npos) << r.text();
}
