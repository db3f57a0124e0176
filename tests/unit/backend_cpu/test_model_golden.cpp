// The whole CPU model against HuggingFace transformers' DeepseekV4ForCausalLM (fp32) on the golden fixtures of
// tests/golden (scripts/make_golden.py), and prefill/decode/chunking invariance.
#include "backends/cpu/cpu_backend.hpp"
#include "core/nvfp4.hpp"
#include "io/npy.hpp"
#include "io/safetensors_writer.hpp"
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

// The release fixtures with their MXFP4 experts re-encoded as ModelOpt NVFP4 (a scale rewrite of the same e2m1
// payload): the loader takes the NVFP4 layout and the logits stay those of the dequantized weights.
TEST(GoldenNvfp4, Mxfp4ExpertsRewrittenAsNvfp4GiveTheSameLogits) {
  int converted = 0;
  for (const std::string& name : fixtures()) {
    if (!name.ends_with("-release")) continue;
    ++converted;
    SCOPED_TRACE(name);
    const fs::path source = kGolden / name;
    const fs::path dir = fs::temp_directory_path() / ("dsv4-nvfp4-" + name + "-" + std::to_string(::getpid()));
    fs::create_directories(dir);
    {
      const LoadedCheckpoint release = load_checkpoint(source.string());
      SafetensorsWriter writer;
      std::vector<Mxfp4ToNvfp4Result> keep;
      for (const TensorView* t : release.store.all()) {
        const bool expert = t->name.find(".ffn.experts.") != std::string::npos;
        if (expert && t->name.ends_with(".scale")) continue;
        if (!expert) {
          writer.add(t->name, t->dtype, t->shape, t->data, t->bytes, release.store.keepalive(*t));
          continue;
        }
        // layers.L.ffn.experts.E.wN.weight: find the loaded MXFP4 matrix of that slot.
        const int layer = std::stoi(t->name.substr(7));
        const size_t e_at = t->name.find(".experts.") + 9;
        const int expert_index = std::stoi(t->name.substr(e_at));
        const char w = t->name[t->name.find(".w", e_at) + 2];
        const ExpertWeights& ew = release.weights.layers[size_t(layer)].ffn.experts[size_t(expert_index)];
        const QuantizedMatrix& mx = w == '1' ? ew.w1 : w == '2' ? ew.w2 : ew.w3;
        ASSERT_EQ(mx.format, WeightFormat::MXFP4);
        keep.push_back(mxfp4_to_nvfp4(mx));
        const QuantizedMatrix& nv = keep.back().nvfp4.matrix;
        EXPECT_TRUE(keep.back().inexact_blocks.empty()) << t->name;
        const std::string base = t->name.substr(0, t->name.size() - 7);
        writer.add(t->name, DType::U8, {nv.rows, (nv.cols + 1) / 2}, nv.data, nv.data_bytes());
        writer.add(base + ".weight_scale", DType::F8_E4M3, {nv.rows, (nv.cols + 15) / 16}, nv.scales, nv.scale_bytes());
        writer.add(base + ".weight_scale_2", DType::F32, {}, &nv.global_scale, 4);
      }
      writer.write((dir / "model.safetensors").string());
      for (const char* file : {"config.json", "tokens.json"}) fs::copy_file(source / file, dir / file);
      for (const auto& entry : fs::directory_iterator(source))
        if (entry.path().extension() == ".npy") fs::copy_file(entry.path(), dir / entry.path().filename());
    }
    EXPECT_EQ(load_checkpoint(dir.string()).layout, "ModelOpt NVFP4");
    expect_matches_golden(dir);
    fs::remove_all(dir);
  }
  EXPECT_EQ(converted, 3);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenFixture, ::testing::ValuesIn(fixtures()),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });
