// `dsv4 inspect` end to end: the built binary on tiny checkpoints of each layout and on a broken one.
#include "support/tiny_checkpoint.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <array>
#include <cstdio>
#include <fstream>
#include <sys/wait.h>

using dsv4::CheckpointLayout;
using dsv4::testing::TempDir;

namespace {

struct Result {
  int exit_code;
  std::string output;  // stdout and stderr
};

Result run(const std::string& args) {
  const std::string command = std::string(DSV4_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::string output;
  std::array<char, 4096> buffer;
  while (size_t n = fread(buffer.data(), 1, buffer.size(), pipe)) output.append(buffer.data(), n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

}  // namespace

TEST(InspectCli, DescribesEachLayout) {
  for (CheckpointLayout layout :
       {CheckpointLayout::DeepSeekRelease, CheckpointLayout::HuggingFace, CheckpointLayout::ModelOptNvfp4}) {
    TempDir dir("inspect");
    dsv4::testing::write_tiny_checkpoint(dir.path(), layout);
    const Result text = run("inspect " + dir.path().string());
    EXPECT_EQ(text.exit_code, 0) << text.output;
    EXPECT_NE(text.output.find(std::string(to_string(layout)) + " tensors"), std::string::npos) << text.output;
    EXPECT_NE(text.output.find("0 SWA, 1 CSA/4, 2 HCA/8, 3 CSA/4"), std::string::npos) << text.output;
    EXPECT_NE(text.output.find("loadable: yes"), std::string::npos) << text.output;

    const Result json = run("inspect --json " + dir.path().string());
    ASSERT_EQ(json.exit_code, 0) << json.output;
    const nlohmann::json report = nlohmann::json::parse(json.output);
    EXPECT_TRUE(report["loadable"].get<bool>());
    EXPECT_EQ(report["layout"], to_string(layout));
    EXPECT_TRUE(report["issues"].empty()) << json.output;
    const char* expert_format = layout == CheckpointLayout::HuggingFace     ? "f32"
                                : layout == CheckpointLayout::ModelOptNvfp4 ? "nvfp4"
                                                                            : "mxfp4";
    EXPECT_TRUE(report["formats"].contains(expert_format)) << json.output;
    EXPECT_GT(report["weight_bytes"].get<size_t>(), 0u);
  }
}

TEST(InspectCli, BrokenCheckpointsFailWithTheirCause) {
  TempDir dir("inspect-bad");
  dsv4::testing::write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  nlohmann::json config = dsv4::testing::tiny_release_config_json();
  config["hidden_size"] = 96;
  std::ofstream(dir / "config.json") << config.dump();
  Result r = run("inspect " + dir.path().string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("bad shape"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("embed.weight"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("loadable: NO"), std::string::npos) << r.output;

  std::filesystem::remove(dir / "config.json");
  r = run("inspect " + dir.path().string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("config"), std::string::npos) << r.output;

  r = run("inspect " + (dir / "nope").string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("nope"), std::string::npos) << r.output;

  r = run("inspect");
  EXPECT_NE(r.exit_code, 0) << r.output;
}

TEST(Cli, HelpListsTheSubcommands) {
  const Result r = run("help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("inspect"), std::string::npos) << r.output;
  const Result sub = run("help inspect");
  EXPECT_EQ(sub.exit_code, 0) << sub.output;
  EXPECT_NE(sub.output.find("--json"), std::string::npos) << sub.output;
  EXPECT_EQ(run("help no-such-command").exit_code, 2);
}
