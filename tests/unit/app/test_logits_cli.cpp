// `dsv4 logits` end to end on a golden fixture: the .npy it writes equals transformers' logits.
#include "io/npy.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sys/wait.h>

namespace fs = std::filesystem;

namespace {

int run(const std::string& args, std::string* output = nullptr) {
  FILE* pipe = popen((std::string(DSV4_BINARY) + " " + args + " 2>&1").c_str(), "r");
  std::string text;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) text.append(buffer, n);
  const int status = pclose(pipe);
  if (output) *output = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

const fs::path kFixture = fs::path(DSV4_SOURCE_DIR) / "tests" / "golden" / "flash_like";

}  // namespace

TEST(LogitsCli, WritesTheLogitsOfEveryPosition) {
  const fs::path out = fs::temp_directory_path() / ("dsv4-logits-" + std::to_string(::getpid()) + ".npy");
  for (const char* chunk : {"0", "1", "3"}) {
    std::string text;
    ASSERT_EQ(run("logits -m " + kFixture.string() + " --tokens 323,230,12,473 --chunk " + chunk + " --out " +
                      out.string(),
                  &text),
              0)
        << text;
    const dsv4::NpyArray got = dsv4::read_npy_f32(out.string());
    const dsv4::NpyArray want = dsv4::read_npy_f32((kFixture / "logits_t4.npy").string());
    ASSERT_EQ(got.shape, want.shape);
    for (size_t i = 0; i < want.values.size(); ++i) ASSERT_NEAR(got.values[i], want.values[i], 1e-4) << i;
  }
  fs::remove(out);
}

TEST(LogitsCli, PrintsTopLogitsAndRejectsBadInput) {
  std::string text;
  EXPECT_EQ(run("logits -m " + kFixture.string() + " --tokens 323,230 --top 3", &text), 0) << text;
  EXPECT_NE(text.find("position 1 (token 230):"), std::string::npos) << text;
  EXPECT_EQ(run("logits -m " + kFixture.string() + " --tokens 1,x", &text), 1);
  EXPECT_NE(text.find("'x'"), std::string::npos) << text;
  EXPECT_EQ(run("logits -m " + kFixture.string() + " --tokens 1,512", &text), 1);
  EXPECT_NE(text.find("outside the vocabulary"), std::string::npos) << text;
  EXPECT_EQ(run("logits -m " + kFixture.string() + " --tokens 1 --mode fast", &text), 1);
  EXPECT_NE(text.find("numerics mode"), std::string::npos) << text;
}
