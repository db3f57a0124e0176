// The GPU benchmarks' --only list (bench/bench_selection.hpp): its items by separator, each match mode, and the error
// that names every item that selected no case.
#include <gtest/gtest.h>

#include <string>

#include "../bench/bench_selection.hpp"

namespace dsv4 {
namespace {

std::string error_of(const OnlySelection& only) {
  try {
    only.require_all_used();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(BenchSelection, NoListSelectsEverythingAndNeverFails) {
  OnlySelection only;
  EXPECT_TRUE(only.all());
  EXPECT_TRUE(only.selects("flash:csa:64:65536"));
  EXPECT_EQ(error_of(only), "");
}

TEST(BenchSelection, PrefixesSelectTheNamesTheyStart) {
  OnlySelection only("flash:swa,pro:csa:1:65536", ',', OnlyMatch::Prefix);
  EXPECT_FALSE(only.all());
  EXPECT_TRUE(only.selects("flash:swa:1:4096"));
  EXPECT_TRUE(only.selects("pro:csa:1:65536"));
  EXPECT_FALSE(only.selects("pro:csa:8:65536"));
  EXPECT_FALSE(only.selects("xflash:swa:1:4096"));
  EXPECT_EQ(error_of(only), "");
}

TEST(BenchSelection, ExactNamesSelectOnlyThemselves) {
  OnlySelection only("flash:bf16:8192", ',', OnlyMatch::Exact);
  EXPECT_FALSE(only.selects("flash:bf16:81920"));
  EXPECT_FALSE(only.selects("flash:bf16"));
  EXPECT_EQ(error_of(only), "--only: 'flash:bf16:8192' selected no case");
  EXPECT_TRUE(only.selects("flash:bf16:8192"));
  EXPECT_EQ(error_of(only), "");
}

TEST(BenchSelection, PipeSeparatedPartsKeepTheirCommas) {
  OnlySelection only("decode, one token|HCA", '|', OnlyMatch::Substring);
  EXPECT_TRUE(only.selects("compressor CSA main, decode, one token"));
  EXPECT_FALSE(only.selects("compressor CSA main, prefill"));
  EXPECT_EQ(error_of(only), "--only: 'HCA' selected no case");
}

TEST(BenchSelection, OneNameUsesEveryItemItMatches) {
  OnlySelection only("hc_pre|pre", '|', OnlyMatch::Substring);
  EXPECT_TRUE(only.selects("hc_pre (persistent kernel)"));
  EXPECT_EQ(error_of(only), "");
}

TEST(BenchSelection, TheErrorNamesEveryUnusedItem) {
  OnlySelection only("flash,prro,flsh", ',', OnlyMatch::Prefix);
  EXPECT_TRUE(only.selects("flash:csa:1:65536"));
  EXPECT_EQ(error_of(only), "--only: 'prro', 'flsh' selected no case");
}

TEST(BenchSelection, EmptyItemsAreErrors) {
  EXPECT_THROW(OnlySelection("", ',', OnlyMatch::Prefix), Error);
  EXPECT_THROW(OnlySelection("flash,,pro", ',', OnlyMatch::Prefix), Error);
  EXPECT_THROW(OnlySelection("flash|", '|', OnlyMatch::Substring), Error);
}

}  // namespace
}  // namespace dsv4
