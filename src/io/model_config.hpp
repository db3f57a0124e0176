// ModelConfig: the single source of truth for DeepSeek-V4 shapes, layer kinds and numerics constants.
// It is read from any of the three spellings a checkpoint may carry (dsv4-model.md §1):
//   - DeepSeekRelease:   the release `config.json` (compress_ratios, num_hash_layers, rope_scaling, ...);
//   - HuggingFace:       what transformers' DeepseekV4Config saves (layer_types, compress_rates, mlp_layer_types,
//                        partial_rotary_factor, rope_parameters {main, compress}, ...);
//   - DeepSeekInference: DeepSeek's `inference/config.json`, i.e. ModelArgs of inference/model.py (dim, n_layers,
//                        n_heads, moe_inter_dim, window_size, route_scale, score_func, rope_factor, ...).
// All three map onto the same fields; two configs describing the same model compare equal whatever their spelling.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv4 {

enum class ConfigSpelling { DeepSeekRelease, HuggingFace, DeepSeekInference };

// Attention kind of one layer. SlidingWindow layers attend to the window only; CompressedSparse (CSA) layers add
// overlapping compressed entries chosen by the lightning indexer; HeavilyCompressed (HCA) layers add every
// non-overlapping compressed entry.
enum class LayerKind { SlidingWindow, CompressedSparse, HeavilyCompressed };

// Router activation: DeepSeek's `score_func` / HuggingFace's `scoring_func`.
enum class RouterScoring { SqrtSoftplus, Softmax, Sigmoid };

// How non-expert weight block scales are stored: power-of-two bytes (e8m0) or fp32 (the -Base checkpoints).
enum class ScaleFormat { Ue8m0, Fp32 };

// Storage type of the routed experts (`expert_dtype`).
enum class ExpertDtype { Fp4, Fp8, BF16 };

std::string_view to_string(ConfigSpelling spelling);
std::string_view to_string(LayerKind kind);
std::string_view to_string(RouterScoring scoring);
std::string_view to_string(ScaleFormat format);
std::string_view to_string(ExpertDtype dtype);

// YaRN frequency interpolation, applied on compressed (CSA/HCA) layers only; no attention-scale factor.
struct YarnScaling {
  double factor = 1.0;
  int64_t original_max_position = 0;  // tokens
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool operator==(const YarnScaling&) const = default;
};

// Lightning indexer of CSA layers.
struct IndexerConfig {
  int num_heads = 0;
  int head_dim = 0;
  int topk = 0;  // compressed entries kept per query
  bool operator==(const IndexerConfig&) const = default;
};

struct MoeConfig {
  int num_routed_experts = 0;
  int experts_per_token = 0;
  int num_shared_experts = 0;
  int intermediate_size = 0;  // of each routed and each shared expert
  RouterScoring scoring = RouterScoring::SqrtSoftplus;
  double routed_scaling_factor = 1.0;
  double swiglu_limit = 0.0;   // 0 = no clamp
  bool norm_topk_prob = true;  // renormalise the selected experts' scores to sum 1
  bool operator==(const MoeConfig&) const = default;
};

// Manifold-constrained hyper-connections (mHC).
struct HyperConnectionConfig {
  int hc_mult = 0;  // residual streams n
  int sinkhorn_iters = 0;
  double eps = 0.0;
  bool operator==(const HyperConnectionConfig&) const = default;
};

// Non-expert weights stored as fp8 e4m3 with one scale per [block_rows, block_cols] tile.
struct WeightQuantization {
  int block_rows = 0;
  int block_cols = 0;
  ScaleFormat scale_format = ScaleFormat::Ue8m0;
  bool operator==(const WeightQuantization&) const = default;
};

struct ModelConfig {
  // Dimensions.
  int hidden_size = 0;
  int num_layers = 0;  // main blocks; the MTP layers are counted in num_mtp_layers
  int vocab_size = 0;
  int num_heads = 0;
  int head_dim = 0;       // one head, nope + rope dims; K and V share one such vector per token
  int rope_head_dim = 0;  // RoPE acts on the last rope_head_dim dims of a head
  int q_lora_rank = 0;
  int o_groups = 0;
  int o_lora_rank = 0;
  int window_size = 0;  // sliding window in tokens, the current token included

  // Per main layer (num_layers entries each).
  std::vector<LayerKind> layer_kinds;
  std::vector<int> compress_ratios;  // tokens per compressed entry; 0 on sliding-window layers
  std::vector<bool> hash_routed;     // true where the MoE routes by token id (tid2eid)

  // Rotary embedding: rope_theta on sliding-window layers, compress_rope_theta (+ YaRN) on compressed layers.
  double rope_theta = 0.0;
  double compress_rope_theta = 0.0;
  std::optional<YarnScaling> yarn;
  int64_t max_position_embeddings = 0;

  IndexerConfig indexer;
  MoeConfig moe;
  HyperConnectionConfig mhc;
  double rms_norm_eps = 0.0;
  int num_mtp_layers = 0;
  int bos_token_id = 0;
  std::vector<int> eos_token_ids;
  bool tie_word_embeddings = false;

  // Checkpoint storage, when the config states it: nullopt weight_quantization = bf16/fp32 weights;
  // nullopt expert_dtype = not stated (the checkpoint's tensor dtypes decide).
  std::optional<WeightQuantization> weight_quantization;
  std::optional<ExpertDtype> expert_dtype;

  // Where the values came from. Not part of equality: the same model read from two spellings compares equal.
  ConfigSpelling source_format = ConfigSpelling::DeepSeekRelease;
  std::string origin;  // file path (or caller-given name) used in error messages

  // Reads any spelling (detected from the keys) and validates. Errors name `origin` and the field at fault.
  static ModelConfig from_json(const nlohmann::json& config, std::string_view origin);
  static ModelConfig from_file(const std::filesystem::path& path);
  // `dir/config.json`, else `dir/inference/config.json`.
  static ModelConfig from_dir(const std::filesystem::path& dir);

  // Throws dsv4::Error naming the origin and the first inconsistent field.
  void validate() const;
  nlohmann::json summary_json() const;

  // Per-layer helpers; `layer` must be in [0, num_layers).
  LayerKind layer_kind(int layer) const;
  int compress_ratio(int layer) const;
  bool has_compressor(int layer) const { return compress_ratio(layer) != 0; }
  bool has_indexer(int layer) const { return layer_kind(layer) == LayerKind::CompressedSparse; }
  bool is_hash_routed(int layer) const;
  double layer_rope_theta(int layer) const { return has_compressor(layer) ? compress_rope_theta : rope_theta; }
  bool layer_uses_yarn(int layer) const { return has_compressor(layer) && yarn.has_value(); }
  int num_layers_of_kind(LayerKind kind) const;

  // Derived sizes (elements).
  int nope_head_dim() const { return head_dim - rope_head_dim; }
  int64_t q_dim() const { return int64_t{num_heads} * head_dim; }  // rows of wq_b
  int heads_per_group() const { return num_heads / o_groups; }
  int64_t o_group_input_dim() const { return int64_t{heads_per_group()} * head_dim; }  // columns of wo_a
  int64_t o_proj_dim() const { return int64_t{o_groups} * o_lora_rank; }               // rows of wo_a
  int64_t hc_dim() const { return int64_t{mhc.hc_mult} * hidden_size; }                // flattened streams

  bool operator==(const ModelConfig& other) const;
};

}  // namespace dsv4
