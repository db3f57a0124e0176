// `dsv4 logits` end to end on a golden fixture: the .npy it writes equals transformers' logits.
#include "io/npy.hpp"
#include "support/cli_runner.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

namespace fs = std::filesystem;
using dsv4::testing::CliResult;
using dsv4::testing::run_cli;

namespace {

const fs::path kFixture = fs::path(DSV4_SOURCE_DIR) / "tests" / "golden" / "flash_like";

}  // namespace

TEST(LogitsCli, WritesTheLogitsOfEveryPosition) {
  const fs::path out = fs::temp_directory_path() / ("dsv4-logits-" + std::to_string(::getpid()) + ".npy");
  for (const char* chunk : {"0", "1", "3"}) {
    const CliResult r = run_cli("logits -m " + kFixture.string() + " --tokens 323,230,12,473 --chunk " + chunk +
                                " --out " + out.string());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const dsv4::NpyArray got = dsv4::read_npy_f32(out.string());
    const dsv4::NpyArray want = dsv4::read_npy_f32((kFixture / "logits_t4.npy").string());
    ASSERT_EQ(got.shape, want.shape);
    for (size_t i = 0; i < want.values.size(); ++i) ASSERT_NEAR(got.values[i], want.values[i], 1e-4) << i;
  }
  fs::remove(out);
}

TEST(LogitsCli, PrintsTopLogitsAndRejectsBadInput) {
  CliResult r = run_cli("logits -m " + kFixture.string() + " --tokens 323,230 --top 3");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("position 1 (token 230):"), std::string::npos) << r.text();
  r = run_cli("logits -m " + kFixture.string() + " --tokens 1,x");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("'x'"), std::string::npos) << r.text();
  r = run_cli("logits -m " + kFixture.string() + " --tokens 1,512");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("outside the vocabulary"), std::string::npos) << r.text();
  r = run_cli("logits -m " + kFixture.string() + " --tokens 1 --mode fast");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("numerics mode"), std::string::npos) << r.text();
}
