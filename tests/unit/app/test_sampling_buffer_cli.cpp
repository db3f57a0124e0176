// `--sampling-buffer N` (EngineOptions::sampling_adjustments, the GPU's device sampling buffers): a negative count and
// the CPU backend (which has no such buffers) are refused with a message naming the flag; on a GPU a count below the
// vocabulary is refused and a valid one generates what the default buffers do.
#include "support/cli_runner.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace fs = std::filesystem;
using dsv4::testing::CliResult;
using dsv4::testing::gpu_present;
using dsv4::testing::run_cli;

namespace {

const std::string kModel = "-m " + (fs::path(DSV4_SOURCE_DIR) / "models" / "tiny-fortunes").string();

void expect_failure(const std::string& args, const std::string& message) {
  const CliResult r = run_cli(args);
  EXPECT_EQ(r.exit_code, 1) << args << "\n" << r.text();
  EXPECT_NE(r.err.find(message), std::string::npos) << args << "\n" << r.text();
}

}  // namespace

TEST(SamplingBufferCli, NegativeAndCpuAreRefused) {
  expect_failure("generate " + kModel + " -p hi -n 2 --device cpu --sampling-buffer -1",
                 "--sampling-buffer must not be negative");
  expect_failure("generate " + kModel + " -p hi -n 2 --device cpu --sampling-buffer 100000",
                 "--sampling-buffer sizes the GPU's sampling buffers");
  expect_failure("chat " + kModel + " --device cpu --sampling-buffer 100000",
                 "--sampling-buffer sizes the GPU's sampling buffers");
  const CliResult r = run_cli("generate " + kModel + " -p hi -n 2 --device cpu --sampling-buffer 0");
  EXPECT_EQ(r.exit_code, 0) << r.text();
}

TEST(SamplingBufferCli, OnTheGpuBelowTheVocabularyIsRefusedAndAValidSizeGeneratesTheSame) {
  if (!gpu_present()) GTEST_SKIP() << "no CUDA device";
  // tiny-fortunes has a 4096-token vocabulary: a row may adjust every token.
  expect_failure("generate " + kModel + " -p hi -n 2 --device cuda --sampling-buffer 100", "below the vocabulary");
  const std::string run = "generate " + kModel + " -p 'a fortune' -n 16 --temp 0.8 --repeat-penalty 1.3 --seed 3 "
                          "--device cuda";
  const CliResult planned = run_cli(run);
  const CliResult sized = run_cli(run + " --sampling-buffer 5000");
  ASSERT_EQ(planned.exit_code, 0) << planned.text();
  ASSERT_EQ(sized.exit_code, 0) << sized.text();
  EXPECT_EQ(planned.out, sized.out);
}
