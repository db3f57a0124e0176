// Tiny DSV4 checkpoints for tests: every layer kind (SWA, CSA, HCA), a hash-routed and scored MoE layers, an MTP
// module, written in any layout by model/checkpoint_writer.hpp with seeded random values.
#pragma once

#include "io/model_config.hpp"
#include "model/checkpoint_writer.hpp"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>

namespace dsv4::testing {

// The release spelling of config.json (compress_ratios has one entry more than layers: the MTP layer).
inline nlohmann::json tiny_release_config_json() {
  return {
      {"architectures", {"DeepseekV4ForCausalLM"}},
      {"model_type", "deepseek_v4"},
      {"vocab_size", 256},
      {"hidden_size", 64},
      {"num_hidden_layers", 4},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 1},
      {"head_dim", 64},
      {"qk_rope_head_dim", 16},
      {"q_lora_rank", 32},
      {"o_groups", 2},
      {"o_lora_rank", 16},
      {"sliding_window", 8},
      {"compress_ratios", {0, 4, 8, 4, 0}},
      {"rope_theta", 10000},
      {"compress_rope_theta", 160000},
      {"rope_scaling",
       {{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 256}, {"beta_fast", 32},
        {"beta_slow", 1}}},
      {"max_position_embeddings", 4096},
      {"index_n_heads", 2},
      {"index_head_dim", 32},
      {"index_topk", 4},
      {"n_routed_experts", 8},
      {"num_experts_per_tok", 2},
      {"n_shared_experts", 1},
      {"moe_intermediate_size", 32},
      {"num_hash_layers", 1},
      {"scoring_func", "sqrtsoftplus"},
      {"routed_scaling_factor", 1.5},
      {"swiglu_limit", 10.0},
      {"norm_topk_prob", true},
      {"hc_mult", 4},
      {"hc_sinkhorn_iters", 20},
      {"hc_eps", 1e-6},
      {"rms_norm_eps", 1e-6},
      {"num_nextn_predict_layers", 1},
      {"bos_token_id", 0},
      {"eos_token_id", 1},
      {"tie_word_embeddings", false},
      {"quantization_config",
       {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"scale_fmt", "ue8m0"}, {"weight_block_size", {128, 128}}}},
      {"expert_dtype", "fp4"},
  };
}

// Deterministic values per slot: uniform in [-1, 1) from a seed mixed with the slot's name; expert ids for tables.
inline SlotValues seeded_slot_values(uint64_t seed, int num_experts) {
  return [seed, num_experts](const WeightSlot& slot, float* values) {
    std::mt19937_64 rng(seed ^ std::hash<std::string>{}(slot.name));
    int64_t numel = 1;
    for (int64_t extent : slot.shape) numel *= extent;
    if (slot.kind == SlotKind::ExpertTable) {
      std::uniform_int_distribution<int> expert(0, num_experts - 1);
      for (int64_t i = 0; i < numel; ++i) values[i] = float(expert(rng));
      return;
    }
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (int64_t i = 0; i < numel; ++i) values[i] = uniform(rng);
  };
}

// Writes the tiny model into `dir` in `layout`; returns its config.
inline ModelConfig write_tiny_checkpoint(const std::filesystem::path& dir, CheckpointLayout layout,
                                         size_t max_shard_bytes = 0, uint64_t seed = 1) {
  nlohmann::json json = tiny_release_config_json();
  // ModelOpt exports name their method in config.json and leave the formats to the tensors.
  if (layout == CheckpointLayout::ModelOptNvfp4)
    json["quantization_config"] = {{"quant_method", "modelopt"}, {"quant_algo", "NVFP4"}};
  const ModelConfig config = ModelConfig::from_json(json, "tiny config");
  CheckpointWriteOptions options;
  options.layout = layout;
  options.max_shard_bytes = max_shard_bytes;
  options.include_mtp = layout != CheckpointLayout::HuggingFace;
  write_checkpoint(dir.string(), config, json, seeded_slot_values(seed, config.moe.num_routed_experts), options);
  return config;
}

// A fresh empty directory under the system temp folder, removed when the object dies.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("dsv4-" + tag + "-" + std::to_string(rd()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace dsv4::testing
