#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "io/safetensors_writer.hpp"
#include "model/checkpoint_loader.hpp"
#include "support/tiny_checkpoint.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>

using namespace dsv4;
using dsv4::testing::TempDir;
using dsv4::testing::write_tiny_checkpoint;

namespace {

// The values the writer was given for a slot.
std::vector<float> original_values(const ModelConfig& config, const std::string& name, uint64_t seed = 1) {
  for (const WeightSlot& slot : weight_slots(config)) {
    if (slot.name != name) continue;
    int64_t numel = 1;
    for (int64_t extent : slot.shape) numel *= extent;
    std::vector<float> values(static_cast<size_t>(numel));
    dsv4::testing::seeded_slot_values(seed, config.moe.num_routed_experts)(slot, values.data());
    return values;
  }
  ADD_FAILURE() << "no slot " << name;
  return {};
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

std::string issue_list(const LoadedCheckpoint& c) {
  std::string s;
  for (const CheckpointIssue& i : c.issues) s += std::string(to_string(i.kind)) + " " + i.tensor + ": " + i.message + "\n";
  return s;
}

}  // namespace

TEST(CheckpointLoader, ReleaseLayoutKeepsStoredFormats) {
  TempDir dir("release");
  const ModelConfig config = write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  ASSERT_TRUE(ckpt.loadable()) << issue_list(ckpt);
  EXPECT_TRUE(ckpt.issues.empty()) << issue_list(ckpt);
  EXPECT_EQ(ckpt.layout, "DeepSeek release");
  ASSERT_EQ(ckpt.weights.layers.size(), 4u);
  ASSERT_EQ(ckpt.weights.mtp.size(), 1u);

  const BlockWeights& csa = ckpt.weights.layers[1];
  EXPECT_EQ(csa.attn.wq_a.format, WeightFormat::FP8_BLOCK128);
  EXPECT_EQ(csa.attn.wq_a.scale_type, ScaleType::E8M0);
  EXPECT_EQ(csa.ffn.experts[3].w2.format, WeightFormat::MXFP4);
  EXPECT_EQ(csa.ffn.shared.w1.format, WeightFormat::FP8_BLOCK128);
  EXPECT_EQ(csa.attn.compressor->wkv.format, WeightFormat::BF16);
  EXPECT_EQ(csa.attn.compressor->wkv.rows, 2 * 64);  // CSA carries two series
  EXPECT_EQ(ckpt.weights.layers[2].attn.compressor->wkv.rows, 64);
  EXPECT_TRUE(csa.attn.indexer.has_value());
  EXPECT_FALSE(ckpt.weights.layers[2].attn.indexer.has_value());
  EXPECT_FALSE(ckpt.weights.layers[0].attn.compressor.has_value());
  EXPECT_EQ(ckpt.weights.hc_head.fn.format, WeightFormat::F32);

  // Dequantized weights stay within the format's rounding of what was written.
  EXPECT_LE(max_abs_diff(dequantize(csa.attn.wq_a), original_values(config, "layers.1.attn.wq_a.weight")), 1.0f / 16);
  EXPECT_LE(max_abs_diff(dequantize(csa.ffn.experts[3].w2), original_values(config, "layers.1.ffn.experts.3.w2.weight")),
            0.25f);
  EXPECT_LE(max_abs_diff(csa.attn_norm, original_values(config, "layers.1.attn_norm.weight")), 1.0f / 128);
  EXPECT_EQ(max_abs_diff(csa.attn.sink, original_values(config, "layers.1.attn.attn_sink")), 0.0f);

  // Hash routing on layer 0 only; the table holds the written ids.
  const std::vector<float> ids = original_values(config, "layers.0.ffn.gate.tid2eid");
  ASSERT_EQ(ckpt.weights.layers[0].ffn.tid2eid.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) ASSERT_EQ(ckpt.weights.layers[0].ffn.tid2eid[i], int(ids[i]));
  EXPECT_TRUE(ckpt.weights.layers[0].ffn.gate_bias.empty());
  EXPECT_EQ(ckpt.weights.layers[1].ffn.gate_bias.size(), 8u);

  for (const char* format : {"fp8_block128", "mxfp4", "bf16", "f32", "i32"}) EXPECT_TRUE(ckpt.totals.contains(format)) << format;
  EXPECT_GT(ckpt.weight_bytes(), 0u);
}

TEST(CheckpointLoader, HuggingFaceLayoutIsExact) {
  TempDir dir("hf");
  const ModelConfig config = write_tiny_checkpoint(dir.path(), CheckpointLayout::HuggingFace);
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  ASSERT_TRUE(ckpt.loadable()) << issue_list(ckpt);
  EXPECT_TRUE(ckpt.issues.empty()) << issue_list(ckpt);
  EXPECT_EQ(ckpt.layout, "HuggingFace");
  EXPECT_TRUE(ckpt.weights.mtp.empty());
  const BlockWeights& csa = ckpt.weights.layers[3];
  EXPECT_EQ(csa.attn.wq_b.format, WeightFormat::F32);
  EXPECT_EQ(max_abs_diff(dequantize(csa.attn.wq_b), original_values(config, "layers.3.attn.wq_b.weight")), 0.0f);
  EXPECT_EQ(max_abs_diff(csa.attn.kv_norm, original_values(config, "layers.3.attn.kv_norm.weight")), 0.0f);
  EXPECT_EQ(max_abs_diff(dequantize(ckpt.weights.embed), original_values(config, "embed.weight")), 0.0f);
  EXPECT_EQ(max_abs_diff(dequantize(ckpt.weights.hc_head.fn), original_values(config, "hc_head_fn")), 0.0f);
}

TEST(CheckpointLoader, ModelOptNvfp4Experts) {
  TempDir dir("nvfp4");
  const ModelConfig config = write_tiny_checkpoint(dir.path(), CheckpointLayout::ModelOptNvfp4);
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  ASSERT_TRUE(ckpt.loadable()) << issue_list(ckpt);
  EXPECT_TRUE(ckpt.issues.empty()) << issue_list(ckpt);
  EXPECT_EQ(ckpt.layout, "ModelOpt NVFP4");
  const ExpertWeights& e = ckpt.weights.layers[2].ffn.experts[5];
  EXPECT_EQ(e.w1.format, WeightFormat::NVFP4);
  EXPECT_GT(e.w1.global_scale, 0.0f);
  EXPECT_LE(max_abs_diff(dequantize(e.w1), original_values(config, "layers.2.ffn.experts.5.w1.weight")), 0.2f);
  EXPECT_EQ(ckpt.weights.layers[2].attn.wo_b.format, WeightFormat::FP8_BLOCK128);
  // ModelOpt's activation calibration scales are read and set aside by name.
  EXPECT_FALSE(ckpt.ignored.empty());
  EXPECT_NE(std::find(ckpt.ignored.begin(), ckpt.ignored.end(), "layers.2.ffn.experts.5.w1.input_scale"),
            ckpt.ignored.end());
}

TEST(CheckpointLoader, ShardedCheckpoint) {
  TempDir dir("sharded");
  write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease, 64 * 1024);
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  EXPECT_GT(ckpt.store.shards().size(), 2u);
  EXPECT_TRUE(ckpt.loadable()) << issue_list(ckpt);
  EXPECT_TRUE(ckpt.issues.empty()) << issue_list(ckpt);
}

// Re-emits a valid checkpoint with one tensor dropped, one re-shaped, one re-typed and one extra, and expects each
// to be reported by name.
TEST(CheckpointLoader, ReportsMissingUnexpectedAndMalformedTensors) {
  TempDir good("good"), bad("bad");
  write_tiny_checkpoint(good.path(), CheckpointLayout::DeepSeekRelease);
  {
    const TensorStore store = TensorStore::open(good.path().string());
    SafetensorsWriter writer;
    const std::vector<float> extra(3, 0.0f);
    for (const TensorView* t : store.all()) {
      if (t->name == "layers.2.attn.wkv.weight") continue;  // missing (its scale is left behind: unexpected)
      if (t->name == "layers.1.attn_norm.weight") {         // wrong length
        writer.add(t->name, t->dtype, {t->shape[0] / 2}, t->data, t->bytes / 2);
        continue;
      }
      if (t->name == "layers.3.attn.attn_sink") {  // wrong dtype: I32 where F32/BF16 belong
        writer.add(t->name, DType::I32, t->shape, t->data, t->bytes);
        continue;
      }
      writer.add(t->name, t->dtype, t->shape, t->data, t->bytes, store.keepalive(*t));
    }
    writer.add("layers.9.attn.wq_a.weight", DType::F32, {3}, extra.data(), extra.size() * 4);
    writer.write((bad.path() / "model.safetensors").string());
    std::filesystem::copy_file(good.path() / "config.json", bad.path() / "config.json");
  }
  const LoadedCheckpoint ckpt = load_checkpoint(bad.path().string());
  EXPECT_FALSE(ckpt.loadable());
  auto has = [&](CheckpointIssue::Kind kind, const std::string& tensor) {
    return std::any_of(ckpt.issues.begin(), ckpt.issues.end(),
                       [&](const CheckpointIssue& i) { return i.kind == kind && i.tensor == tensor; });
  };
  EXPECT_TRUE(has(CheckpointIssue::Kind::Missing, "layers.2.attn.wkv.weight")) << issue_list(ckpt);
  EXPECT_TRUE(has(CheckpointIssue::Kind::BadShape, "layers.1.attn_norm.weight")) << issue_list(ckpt);
  EXPECT_TRUE(has(CheckpointIssue::Kind::BadFormat, "layers.3.attn.attn_sink")) << issue_list(ckpt);
  EXPECT_TRUE(has(CheckpointIssue::Kind::Unexpected, "layers.9.attn.wq_a.weight")) << issue_list(ckpt);
  EXPECT_TRUE(has(CheckpointIssue::Kind::Unexpected, "layers.2.attn.wkv.scale")) << issue_list(ckpt);
  EXPECT_EQ(ckpt.issues.size(), 5u) << issue_list(ckpt);
  try {
    ckpt.require_loadable();
    FAIL() << "require_loadable accepted a broken checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.2.attn.wkv.weight"), std::string::npos) << e.what();
  }
}

// The config decides the shapes: the same tensors under a config with another width are all reported.
TEST(CheckpointLoader, ShapesAreCheckedAgainstTheConfig) {
  TempDir dir("mismatch");
  write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  nlohmann::json json = dsv4::testing::tiny_release_config_json();
  json["q_lora_rank"] = 48;
  std::ofstream(dir / "config.json") << json.dump();
  const LoadedCheckpoint ckpt = load_checkpoint(dir.path().string());
  EXPECT_FALSE(ckpt.loadable());
  bool found = false;
  for (const CheckpointIssue& i : ckpt.issues)
    if (i.kind == CheckpointIssue::Kind::BadShape && i.tensor == "layers.0.attn.wq_a.weight") {
      found = true;
      EXPECT_NE(i.message.find("[48, 64]"), std::string::npos) << i.message;
    }
  EXPECT_TRUE(found) << issue_list(ckpt);
}

TEST(CheckpointLoader, FatalProblemsThrowWithTheirCause) {
  TempDir dir("fatal");
  EXPECT_THROW(load_checkpoint((dir / "absent").string()), Error);
  try {
    load_checkpoint(dir.path().string());  // no config.json
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config"), std::string::npos) << e.what();
  }
  write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  std::filesystem::resize_file(dir / "model.safetensors", 1000);  // truncated
  try {
    load_checkpoint(dir.path().string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
}
