// The whole CPU model against HuggingFace transformers' DeepseekV4ForCausalLM (fp32) on the golden fixtures of
// tests/golden (scripts/make_golden.py), and prefill/decode/chunking invariance.
#include "backends/cpu/cpu_backend.hpp"
#include "io/npy.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/dsv4_model.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

using namespace dsv4;
namespace fs = std::filesystem;

namespace {

const fs::path kGolden = fs::path(DSV4_SOURCE_DIR) / "tests" / "golden";

struct GoldenCase {
  std::string name;
  std::vector<int32_t> tokens;
  std::vector<int64_t> positions;
  NpyArray logits;
};

std::vector<GoldenCase> read_cases(const fs::path& dir) {
  nlohmann::json j = nlohmann::json::parse(std::ifstream(dir / "tokens.json"));
  std::vector<GoldenCase> cases;
  for (const auto& c : j["cases"])
    cases.push_back({c["name"], c["tokens"].get<std::vector<int32_t>>(), c["positions"].get<std::vector<int64_t>>(),
                     read_npy_f32((dir / c["logits"].get<std::string>()).string())});
  return cases;
}

struct LoadedModel {
  LoadedCheckpoint ckpt;
  cpu::CpuBackend backend;
  Dsv4Model model;
  LoadedModel(const fs::path& dir, NumericsMode mode)
      : ckpt(load_checkpoint(dir.string())), backend(ckpt.config, mode), model(ckpt.config, ckpt.weights, backend) {
    ckpt.require_loadable();
  }
  // Logits of every position, the sequence fed in chunks of the given sizes (cycled).
  std::vector<float> run(const std::vector<int32_t>& tokens, const std::vector<int64_t>& chunks) {
    auto seq = model.new_sequence();
    std::vector<float> all, part;
    size_t at = 0, chunk = 0;
    while (at < tokens.size()) {
      const size_t n = std::min<size_t>(size_t(chunks[chunk++ % chunks.size()]), tokens.size() - at);
      model.forward(*seq, std::span(tokens).subspan(at, n), LogitRows::All, part);
      all.insert(all.end(), part.begin(), part.end());
      at += n;
    }
    return all;
  }
};

void expect_matches_golden(const fs::path& dir) {
  LoadedModel m(dir, NumericsMode::Exact);
  const int64_t vocab = m.ckpt.config.vocab_size;
  for (const GoldenCase& c : read_cases(dir)) {
    SCOPED_TRACE(dir.filename().string() + "/" + c.name);
    const std::vector<float> logits = m.run(c.tokens, {int64_t(c.tokens.size())});
    ASSERT_EQ(c.logits.shape, (std::vector<int64_t>{int64_t(c.positions.size()), vocab}));
    for (size_t r = 0; r < c.positions.size(); ++r) {
      const float* want = &c.logits.values[r * size_t(vocab)];
      const float* got = &logits[size_t(c.positions[r]) * size_t(vocab)];
      float max_abs = 0, max_diff = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        ASSERT_TRUE(std::isfinite(got[v])) << "position " << c.positions[r] << " token " << v;
        max_abs = std::max(max_abs, std::abs(want[v]));
        max_diff = std::max(max_diff, std::abs(want[v] - got[v]));
      }
      EXPECT_LE(max_diff / max_abs, 1e-4f) << "position " << c.positions[r];
      EXPECT_EQ(std::max_element(want, want + vocab) - want, std::max_element(got, got + vocab) - got)
          << "argmax differs at position " << c.positions[r];
    }
  }
}

float max_relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  float max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_abs = std::max(max_abs, std::abs(a[i]));
    max_diff = std::max(max_diff, std::abs(a[i] - b[i]));
  }
  return max_diff / max_abs;
}

std::vector<std::string> fixtures() {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(kGolden))
    if (fs::exists(entry.path() / "tokens.json") && fs::exists(entry.path() / "config.json"))
      names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

class GoldenFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenFixture, ExactModeMatchesTransformers) { expect_matches_golden(kGolden / GetParam()); }

// Chunked prefill and token-by-token decode give the logits of one prefill, in both numerics modes.
TEST_P(GoldenFixture, AnySplitOfTheSequenceGivesTheSameLogits) {
  const fs::path dir = kGolden / GetParam();
  const std::vector<GoldenCase> cases = read_cases(dir);
  std::vector<int32_t> tokens = cases.back().tokens;
  tokens.resize(std::min<size_t>(tokens.size(), 80));
  for (NumericsMode mode : {NumericsMode::Exact, NumericsMode::Reference}) {
    SCOPED_TRACE(std::string(to_string(mode)));
    LoadedModel m(dir, mode);
    const std::vector<float> one_shot = m.run(tokens, {int64_t(tokens.size())});
    for (const std::vector<int64_t>& chunks : {std::vector<int64_t>{1}, {7, 1, 13, 4}, {3}, {32, 5}}) {
      const std::vector<float> split = m.run(tokens, chunks);
      EXPECT_LE(max_relative_difference(one_shot, split), 1e-5f) << "first chunk " << chunks[0];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenFixture, ::testing::ValuesIn(fixtures()),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });
