// A transformers-spelled config with non-default compress rates (CSA every 8 tokens, HCA every 32): the model loads
// from the HuggingFace layout and any split of a sequence gives the logits of one prefill, in both numerics modes.
#include "backends/cpu/cpu_backend.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/dsv4_model.hpp"
#include "support/tiny_checkpoint.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

using namespace dsv4;

TEST(CustomCompressRates, ChunkingInvariantInBothModes) {
  const auto json = nlohmann::json::parse(
      std::ifstream(std::string(DSV4_SOURCE_DIR) + "/tests/unit/io/configs/tiny_huggingface_custom_rates.json"));
  const ModelConfig config = ModelConfig::from_json(json, "custom rates");
  ASSERT_EQ(config.layer_kind(1), LayerKind::CompressedSparse);
  ASSERT_EQ(config.compress_ratio(1), 8);
  dsv4::testing::TempDir dir("custom-rates");
  CheckpointWriteOptions options;
  options.layout = CheckpointLayout::HuggingFace;
  options.include_mtp = false;
  // Small weights keep the random model's activations O(1).
  const SlotValues base = dsv4::testing::seeded_slot_values(3, config.moe.num_routed_experts);
  write_checkpoint(dir.path().string(), config, json,
                   [&](const WeightSlot& slot, float* v) {
                     base(slot, v);
                     if (slot.kind == SlotKind::Matrix) {
                       int64_t n = slot.shape[0] * slot.shape[1];
                       for (int64_t i = 0; i < n; ++i) v[i] *= 0.2f;
                     }
                   },
                   options);
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  ckpt.require_loadable();

  std::vector<int32_t> tokens(70);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t((i * 37 + 11) % config.vocab_size);
  for (NumericsMode mode : {NumericsMode::Exact, NumericsMode::Reference}) {
    cpu::CpuBackend backend(ckpt.config, mode);
    Dsv4Model model(ckpt.config, ckpt.weights, backend);
    auto run = [&](size_t chunk) {
      auto seq = model.new_sequence();
      std::vector<float> all, part;
      for (size_t at = 0; at < tokens.size(); at += chunk) {
        model.forward(*seq, std::span(tokens).subspan(at, std::min(chunk, tokens.size() - at)), LogitRows::All, part);
        all.insert(all.end(), part.begin(), part.end());
      }
      return all;
    };
    const std::vector<float> one = run(tokens.size());
    for (float v : one) ASSERT_TRUE(std::isfinite(v));
    for (size_t chunk : {1u, 3u, 9u, 32u}) {
      const std::vector<float> split = run(chunk);
      float max_abs = 0, max_diff = 0;
      for (size_t i = 0; i < one.size(); ++i) {
        max_abs = std::max(max_abs, std::abs(one[i]));
        max_diff = std::max(max_diff, std::abs(one[i] - split[i]));
      }
      EXPECT_LE(max_diff / max_abs, 1e-5f) << to_string(mode) << " chunk " << chunk;
    }
  }
}
