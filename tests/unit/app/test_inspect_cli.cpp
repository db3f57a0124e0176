// `dsv4 inspect` end to end: the built binary on tiny checkpoints of each layout and on a broken one.
#include "support/cli_runner.hpp"
#include "support/tiny_checkpoint.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

using dsv4::CheckpointLayout;
using dsv4::testing::CliResult;
using dsv4::testing::run_cli;
using dsv4::testing::TempDir;

TEST(InspectCli, DescribesEachLayout) {
  for (CheckpointLayout layout :
       {CheckpointLayout::DeepSeekRelease, CheckpointLayout::HuggingFace, CheckpointLayout::ModelOptNvfp4}) {
    TempDir dir("inspect");
    dsv4::testing::write_tiny_checkpoint(dir.path(), layout);
    const CliResult plain = run_cli("inspect " + dir.path().string());
    EXPECT_EQ(plain.exit_code, 0) << plain.text();
    EXPECT_NE(plain.text().find(std::string(to_string(layout)) + " tensors"), std::string::npos) << plain.text();
    EXPECT_NE(plain.text().find("0 SWA, 1 CSA/4, 2 HCA/8, 3 CSA/4"), std::string::npos) << plain.text();
    EXPECT_NE(plain.text().find("loadable: yes"), std::string::npos) << plain.text();

    const CliResult json = run_cli("inspect --json " + dir.path().string());
    ASSERT_EQ(json.exit_code, 0) << json.text();
    const nlohmann::json report = nlohmann::json::parse(json.out);
    EXPECT_TRUE(report["loadable"].get<bool>());
    EXPECT_EQ(report["layout"], to_string(layout));
    EXPECT_TRUE(report["issues"].empty()) << json.text();
    const char* expert_format = layout == CheckpointLayout::HuggingFace     ? "f32"
                                : layout == CheckpointLayout::ModelOptNvfp4 ? "nvfp4"
                                                                            : "mxfp4";
    EXPECT_TRUE(report["formats"].contains(expert_format)) << json.text();
    EXPECT_GT(report["weight_bytes"].get<size_t>(), 0u);
  }
}

TEST(InspectCli, BrokenCheckpointsFailWithTheirCause) {
  TempDir dir("inspect-bad");
  dsv4::testing::write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  nlohmann::json config = dsv4::testing::tiny_release_config_json();
  config["hidden_size"] = 96;
  std::ofstream(dir / "config.json") << config.dump();
  CliResult r = run_cli("inspect " + dir.path().string());
  EXPECT_EQ(r.exit_code, 1) << r.text();
  EXPECT_NE(r.text().find("bad shape"), std::string::npos) << r.text();
  EXPECT_NE(r.text().find("embed.weight"), std::string::npos) << r.text();
  EXPECT_NE(r.text().find("loadable: NO"), std::string::npos) << r.text();

  std::filesystem::remove(dir / "config.json");
  r = run_cli("inspect " + dir.path().string());
  EXPECT_EQ(r.exit_code, 1) << r.text();
  EXPECT_NE(r.text().find("config"), std::string::npos) << r.text();

  r = run_cli("inspect " + (dir / "nope").string());
  EXPECT_EQ(r.exit_code, 1) << r.text();
  EXPECT_NE(r.text().find("nope"), std::string::npos) << r.text();

  r = run_cli("inspect");
  EXPECT_NE(r.exit_code, 0) << r.text();
}

TEST(Cli, HelpListsTheSubcommands) {
  const CliResult r = run_cli("help");
  EXPECT_EQ(r.exit_code, 0) << r.text();
  EXPECT_NE(r.text().find("inspect"), std::string::npos) << r.text();
  const CliResult sub = run_cli("help inspect");
  EXPECT_EQ(sub.exit_code, 0) << sub.text();
  EXPECT_NE(sub.text().find("--json"), std::string::npos) << sub.text();
  EXPECT_EQ(run_cli("help no-such-command").exit_code, 2);
}
