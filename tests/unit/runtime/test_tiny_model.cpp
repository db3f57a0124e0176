// The embedded trained model (models/tiny-fortunes, and its NVFP4 twin) against what PyTorch recorded at export
// (reference.json): the tokenizer gives the same prompt ids, greedy decoding (prefill, then one token per step)
// gives the same continuations, and the held-out perplexity agrees within 1 %.
#include "runtime/engine.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

using namespace dsv4;
namespace fs = std::filesystem;

namespace {

const fs::path kModels = fs::path(DSV4_SOURCE_DIR) / "models";

nlohmann::json reference() { return nlohmann::json::parse(std::ifstream(kModels / "tiny-fortunes/reference.json")); }

Engine load(const std::string& name) {
  EngineOptions options;
  options.model_dir = (kModels / name).string();
  options.progress = false;
  return Engine(options);
}

int32_t argmax(const std::vector<float>& logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

}  // namespace

class TinyModel : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyModel, GreedyContinuationsMatchPyTorch) {
  Engine engine = load(GetParam());
  const nlohmann::json ref = reference();
  for (const auto& c : ref["greedy"]["cases"]) {
    const std::vector<int32_t> prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> expected = c["continuation_ids"].get<std::vector<int32_t>>();
    SCOPED_TRACE(c["prompt"].get<std::string>());
    EXPECT_EQ(engine.tokenizer().encode(c["prompt"].get<std::string>()), prompt);

    auto sequence = engine.model().new_sequence();
    std::vector<float> logits;
    engine.model().forward(*sequence, prompt, LogitRows::Last, logits);
    std::vector<int32_t> generated;
    for (size_t step = 0; step < expected.size(); ++step) {
      generated.push_back(argmax(logits));
      engine.model().forward(*sequence, std::span(&generated.back(), 1), LogitRows::Last, logits);
    }
    EXPECT_EQ(generated, expected);
  }
}

TEST_P(TinyModel, HeldOutPerplexityMatchesPyTorch) {
  Engine engine = load(GetParam());
  const nlohmann::json ppl = reference()["perplexity"];
  const int64_t vocab = engine.config().vocab_size;
  double nll = 0;
  int64_t count = 0;
  for (const auto& window : ppl["windows"]) {
    const std::vector<int32_t> ids = window.get<std::vector<int32_t>>();
    auto sequence = engine.model().new_sequence();
    std::vector<float> logits;
    engine.model().forward(*sequence, ids, LogitRows::All, logits);
    for (size_t t = 1; t < ids.size(); ++t) {
      const float* row = &logits[(t - 1) * size_t(vocab)];
      const float max = *std::max_element(row, row + vocab);
      double sum = 0;
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - max);
      nll += std::log(sum) + max - row[ids[t]];
      ++count;
    }
  }
  const double perplexity = std::exp(nll / double(count));
  const double expected = ppl["perplexity"].get<double>();
  EXPECT_NEAR(perplexity / expected, 1.0, 0.01) << "engine " << perplexity << ", PyTorch " << expected;
}

INSTANTIATE_TEST_SUITE_P(Models, TinyModel, ::testing::Values("tiny-fortunes", "tiny-fortunes-nvfp4"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });
