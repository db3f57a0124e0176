// `dsv4 bench` end to end: on the tiny checkpoint (CPU) the llama-bench style table and the JSON hold one row per
// test with positive rates and one timing per repetition; bad options fail with a message naming the option; `bench
// e2e` without a GPU says what it needs, and (where a GPU is present) runs on a small config's synthetic weights in
// either numerics mode, naming the mode in the table and the JSON.
#include "support/cli_runner.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>

namespace fs = std::filesystem;
using dsv4::testing::CliResult;
using dsv4::testing::gpu_present;
using dsv4::testing::run_cli;

namespace {

const fs::path kTiny = fs::path(DSV4_SOURCE_DIR) / "models" / "tiny-fortunes";

// The rate of the table row whose test column is `test`, or -1 when there is no such row.
double row_rate(const std::string& out, const std::string& test) {
  const std::string key = "| " + test + " | ";
  const size_t at = out.find(key);
  if (at == std::string::npos) return -1;
  return std::stod(out.substr(at + key.size()));
}

void expect_failure(const std::string& args, const std::string& message) {
  const CliResult r = run_cli(args);
  EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.text();
  EXPECT_NE(r.err.find(message), std::string::npos) << args << "\n" << r.text();
}

TEST(BenchCli, PrintsATableOfPrefillAndDecodeRates) {
  const CliResult r = run_cli("bench -m " + kTiny.string() + " -p 16 -n 8 -r 1 --device cpu");
  ASSERT_EQ(r.exit_code, 0) << r.text();
  EXPECT_NE(r.out.find("| model | layers | format | numerics | test | t/s |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| tiny-fortunes | 4 | checkpoint | exact | pp16 | "), std::string::npos) << r.out;
  EXPECT_GT(row_rate(r.out, "pp16"), 0.0) << r.out;
  EXPECT_GT(row_rate(r.out, "tg8"), 0.0) << r.out;
  EXPECT_NE(r.out.find("1 SWA, 2 CSA, 1 HCA"), std::string::npos) << r.out;
}

TEST(BenchCli, WritesOneJsonRowPerTestWithEveryRepetition) {
  const fs::path out = fs::temp_directory_path() / ("dsv4-bench-" + std::to_string(::getpid()) + ".json");
  const CliResult r =
      run_cli("bench -m " + kTiny.string() + " -p 8,24 -n 4 -r 2 --device cpu --json " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.text();
  std::ifstream file(out);
  const nlohmann::json j = nlohmann::json::parse(file);
  fs::remove(out);
  EXPECT_EQ(j["model"], "tiny-fortunes");
  EXPECT_EQ(j["layers"], 4);
  EXPECT_EQ(j["numerics"], "exact");
  EXPECT_EQ(j["device"]["name"], "cpu");
  EXPECT_EQ(j["plan"]["prompts"], nlohmann::json({8, 24}));
  EXPECT_EQ(j["plan"]["repetitions"], 2);
  ASSERT_EQ(j["results"].size(), 3u) << j.dump(2);
  const char* tests[] = {"pp8", "pp24", "tg4"};
  const int tokens[] = {8, 24, 4};
  for (size_t i = 0; i < 3; ++i) {
    const nlohmann::json& row = j["results"][i];
    EXPECT_EQ(row["test"], tests[i]);
    EXPECT_EQ(row["batch"], 1);
    EXPECT_EQ(row["tokens"], tokens[i]);
    ASSERT_EQ(row["seconds"].size(), 2u);
    for (const auto& s : row["seconds"]) EXPECT_GT(s.get<double>(), 0.0);
    const double mean = (row["tokens_per_second"][0].get<double>() + row["tokens_per_second"][1].get<double>()) / 2;
    EXPECT_NEAR(row["mean_tps"].get<double>(), mean, 1e-9 * mean);
    EXPECT_GE(row["stddev_tps"].get<double>(), 0.0);
    EXPECT_FALSE(row.contains("extrapolated_tps"));
  }
}

TEST(BenchCli, RejectsBadOptions) {
  const std::string tiny = kTiny.string();
  expect_failure("bench e2e --config flush", "--config: 'flush' is neither a built-in model config");
  expect_failure("bench e2e --format int4", "--format: 'int4' is not an expert format (nvfp4, mxfp4 or fp8)");
  expect_failure("bench e2e --config pro --layers 62", "--layers: 62 is not in [1, 61]");
  expect_failure("bench e2e --layers -1", "--layers: -1 must not be negative");
  expect_failure("bench e2e --fusion fused_wo", "--fusion 'fused_wo': expected NAME=on or NAME=off");
  expect_failure("bench e2e --fusion fused_wo=yes", "--fusion 'fused_wo=yes': the value must be on or off, not 'yes'");
  expect_failure("bench e2e --numerics fp8",
                 "--numerics: 'fp8' is not a numerics mode of bench e2e (exact or reference)");
  expect_failure("bench e2e --numerics gpu-bf16", "--numerics: 'gpu-bf16' is not a numerics mode of bench e2e");
#if DSV4_HAVE_CUDA
  // The switch names are the CUDA model's: checked before any GPU work, so with or without a device.
  expect_failure("bench e2e --fusion fused_w=on", "--fusion fused_w: no such switch (fuse_projections, ");
#endif
  expect_failure("bench", "-m DIR (a checkpoint) is required");
  expect_failure("bench -m " + tiny + " --device cpu -b 1,4", "-b 4: batched decode needs the GPU");
  expect_failure("bench -m " + tiny + " --device cpu -r 0", "-r: 0 repetitions must be at least 1");
  expect_failure("bench -m " + tiny + " --device cpu -p 0 -n 0", "nothing to measure");
  expect_failure("bench -m " + tiny + " --device tpu", "--device: 'tpu' is not a device");
}

TEST(BenchCli, E2eSaysItNeedsAGpu) {
  if (gpu_present()) GTEST_SKIP() << "a GPU is present: bench e2e runs (see E2eRunsOnSyntheticWeights)";
  expect_failure("bench e2e --config flash --format mxfp4 --layers 2", "bench e2e needs ");
}

TEST(BenchCli, E2eRunsOnSyntheticWeights) {
  if (!gpu_present()) GTEST_SKIP() << "no GPU";
  const CliResult r =
      run_cli("bench e2e --config " + kTiny.string() + " --layers 2 --format nvfp4 -p 32 -n 4 -b 1,2 -r 1");
  ASSERT_EQ(r.exit_code, 0) << r.text();
  EXPECT_GT(row_rate(r.out, "pp32"), 0.0) << r.out;
  EXPECT_GT(row_rate(r.out, "tg4"), 0.0) << r.out;
  EXPECT_GT(row_rate(r.out, "tg4 @ b2"), 0.0) << r.out;
  EXPECT_NE(r.out.find("extrapolated t/s"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(4 layers)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("kernel launches per decode step"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("kernel launches per layer kind"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("b2 "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| nvfp4 | exact | tg4 | "), std::string::npos) << r.out;
  // What the model reports it stores (CudaModel::storage): the tiny config's 64-dim entries and 32-dim indexer keys.
  EXPECT_NE(r.out.find("numerics exact: KV cache entries bf16 (128 B), indexer keys bf16 (64 B)"), std::string::npos)
      << r.out;
}

// Reference numerics: the fp8 KV cache entries and (fp8_indexer_keys, on by default) fp8 indexer keys, named in the
// table, the notes and the JSON as the model reports them (CudaModel::storage); with the switch off the keys are bf16.
TEST(BenchCli, E2eRunsInReferenceNumerics) {
  if (!gpu_present()) GTEST_SKIP() << "no GPU";
  const fs::path out = fs::temp_directory_path() / ("dsv4-bench-e2e-" + std::to_string(::getpid()) + ".json");
  const std::string args =
      "bench e2e --config " + kTiny.string() + " --layers 4 --format nvfp4 -n 4 -b 1,2 -r 1 --numerics reference";
  const CliResult r = run_cli(args + " -p 16 --json " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.text();
  EXPECT_GT(row_rate(r.out, "pp16"), 0.0) << r.out;
  EXPECT_GT(row_rate(r.out, "tg4 @ b2"), 0.0) << r.out;
  EXPECT_NE(r.out.find("| nvfp4 | reference | tg4 | "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("numerics reference: KV cache entries fp8-reference (48 e4m3 values with a ue8m0 scale per 64, "
                       "16 rope dims bf16: 88 B)"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("indexer keys fp8 e4m3 + an fp32 scale per key (36 B)"), std::string::npos) << r.out;
  std::ifstream file(out);
  const nlohmann::json j = nlohmann::json::parse(file);
  fs::remove(out);
  EXPECT_EQ(j["numerics"], "reference");
  EXPECT_EQ(j["kv_entries"], "fp8-reference");
  EXPECT_EQ(j["indexer_keys"], "fp8");
  EXPECT_EQ(j["indexer_key_bytes"], 36);
  EXPECT_EQ(j["results"].size(), 3u) << j.dump(2);

  const CliResult bf16_keys = run_cli(args + " -p 0 --fusion fp8_indexer_keys=off");
  ASSERT_EQ(bf16_keys.exit_code, 0) << bf16_keys.text();
  EXPECT_NE(bf16_keys.out.find("numerics reference: KV cache entries fp8-reference ("), std::string::npos)
      << bf16_keys.out;
  EXPECT_NE(bf16_keys.out.find("indexer keys bf16 (64 B)"), std::string::npos) << bf16_keys.out;
}

}  // namespace
