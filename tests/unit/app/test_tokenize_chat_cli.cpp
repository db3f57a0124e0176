// `dsv4 tokenize --chat`: the four golden DSV4 chat cases come out as the reference prompt text and its token ids.
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"
#include "tokenizer/bpe_tokenizer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sys/wait.h>

namespace fs = std::filesystem;

namespace {

int run(const std::string& args, std::string& out) {
  FILE* pipe = popen((std::string(DSV4_BINARY) + " " + args + " 2>&1").c_str(), "r");
  out.clear();
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

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
    std::string out;
    ASSERT_EQ(run("tokenize --tokenizer " + tokenizer.string() + " --chat " + input.string() + " --mode " + mode +
                      " --json",
                  out),
              0)
        << out;
    const nlohmann::json result = nlohmann::json::parse(out);
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
  std::string out;
  for (const auto& [content, message] : {std::pair{"[{\"role\": \"bogus\"}]", "unknown role 'bogus'"},
                                         std::pair{"{not json", "not valid JSON"},
                                         std::pair{"42", "expected a list of messages"}}) {
    std::ofstream(bad) << content;
    EXPECT_EQ(run("tokenize --tokenizer " + tokenizer.string() + " --chat " + bad.string(), out), 1);
    EXPECT_NE(out.find(message), std::string::npos) << out;
  }
  EXPECT_EQ(run("tokenize --tokenizer " + tokenizer.string() + " --chat " + bad.string() + " --mode fast", out), 1);
  EXPECT_NE(out.find("thinking or chat"), std::string::npos) << out;
}
