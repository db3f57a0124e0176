// The release config.json of V4-Flash and V4-Pro, built into the binary (the same text as
// tests/unit/io/configs/{flash,pro}_release_config.json, whitespace removed), so that synthetic-weight benchmarks run
// at the real widths without a checkpoint.
#include "io/builtin_configs.hpp"

#include <array>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace dsv4 {

namespace {

struct BuiltinConfig {
  std::string_view name;
  std::string_view json;
};

// clang-format off
constexpr std::array<BuiltinConfig, 2> kBuiltinConfigs = {{
    {"flash", R"json({"architectures":["DeepseekV4ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"bos_token_id":0,"eos_token_id":1,"expert_dtype":"fp4","hc_eps":1e-06,"hc_mult":4,"hc_sinkhorn_iters":20,"head_dim":512,"hidden_act":"silu","hidden_size":4096,"index_head_dim":128,"index_n_heads":64,"index_topk":512,"initializer_range":0.02,"max_position_embeddings":1048576,"model_type":"deepseek_v4","moe_intermediate_size":2048,"n_routed_experts":256,"n_shared_experts":1,"norm_topk_prob":true,"num_attention_heads":64,"num_experts_per_tok":6,"num_hidden_layers":43,"num_hash_layers":3,"num_key_value_heads":1,"num_nextn_predict_layers":1,"o_groups":8,"o_lora_rank":1024,"q_lora_rank":1024,"qk_rope_head_dim":64,"quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8","scale_fmt":"ue8m0","weight_block_size":[128,128]},"rms_norm_eps":1e-06,"rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":16,"original_max_position_embeddings":65536,"type":"yarn"},"rope_theta":10000,"routed_scaling_factor":1.5,"scoring_func":"sqrtsoftplus","sliding_window":128,"swiglu_limit":10.0,"tie_word_embeddings":false,"topk_method":"noaux_tc","torch_dtype":"bfloat16","transformers_version":"4.57.1","use_cache":true,"vocab_size":129280,"compress_rope_theta":160000,"compress_ratios":[0,0,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,0]})json"},
    {"pro", R"json({"architectures":["DeepseekV4ForCausalLM"],"attention_bias":false,"attention_dropout":0.0,"bos_token_id":0,"eos_token_id":1,"hc_eps":1e-06,"hc_mult":4,"hc_sinkhorn_iters":20,"head_dim":512,"hidden_act":"silu","hidden_size":7168,"index_head_dim":128,"index_n_heads":64,"index_topk":1024,"initializer_range":0.02,"max_position_embeddings":1048576,"model_type":"deepseek_v4","moe_intermediate_size":3072,"n_routed_experts":384,"n_shared_experts":1,"norm_topk_prob":true,"num_attention_heads":128,"num_experts_per_tok":6,"num_hidden_layers":61,"num_hash_layers":3,"num_key_value_heads":1,"num_nextn_predict_layers":1,"o_groups":16,"o_lora_rank":1024,"q_lora_rank":1536,"qk_rope_head_dim":64,"quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8","scale_fmt":"ue8m0","weight_block_size":[128,128]},"rms_norm_eps":1e-06,"rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":16,"original_max_position_embeddings":65536,"type":"yarn"},"rope_theta":10000,"routed_scaling_factor":2.5,"scoring_func":"sqrtsoftplus","sliding_window":128,"swiglu_limit":10.0,"tie_word_embeddings":false,"topk_method":"noaux_tc","torch_dtype":"bfloat16","transformers_version":"4.57.1","use_cache":true,"vocab_size":129280,"compress_rope_theta":160000,"compress_ratios":[128,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,128,4,0]})json"},
}};
// clang-format on

}  // namespace

std::vector<std::string_view> builtin_config_names() {
  std::vector<std::string_view> names;
  for (const BuiltinConfig& c : kBuiltinConfigs) names.push_back(c.name);
  return names;
}

std::optional<ModelConfig> builtin_config(std::string_view name) {
  for (const BuiltinConfig& c : kBuiltinConfigs)
    if (c.name == name)
      return ModelConfig::from_json(nlohmann::json::parse(c.json), "built-in config '" + std::string(name) + "'");
  return std::nullopt;
}

ModelConfig resolve_model_config(std::string_view spec) {
  if (std::optional<ModelConfig> builtin = builtin_config(spec)) return *std::move(builtin);
  const std::filesystem::path path{std::string(spec)};
  std::error_code error;
  const bool is_dir = std::filesystem::is_directory(path, error);
  const bool is_file = std::filesystem::is_regular_file(path, error);
  check(is_dir || is_file, "--config: '", spec,
        "' is neither a built-in model config (flash, pro) nor a config.json file or checkpoint directory");
  return is_dir ? ModelConfig::from_dir(path) : ModelConfig::from_file(path);
}

ModelConfig first_layers(const ModelConfig& config, int layers) {
  check(layers >= 1 && layers <= config.num_layers, "--layers: ", layers, " is not in [1, ", config.num_layers,
        "], the main layers of ", config.origin);
  ModelConfig kept = config;
  kept.num_layers = layers;
  kept.layer_kinds.resize(size_t(layers));
  kept.compress_ratios.resize(size_t(layers));
  kept.hash_routed.resize(size_t(layers));
  kept.num_mtp_layers = 0;  // the MTP module drafts tokens; a forward pass of the main layers never runs it
  kept.validate();
  return kept;
}

std::string describe_layer_kinds(const ModelConfig& config) {
  int counts[3] = {0, 0, 0}, hashed = 0;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    ++counts[int(config.layer_kind(layer))];
    hashed += config.is_hash_routed(layer) ? 1 : 0;
  }
  return std::to_string(config.num_layers) + " layers: " + std::to_string(counts[int(LayerKind::SlidingWindow)]) +
         " SWA, " + std::to_string(counts[int(LayerKind::CompressedSparse)]) + " CSA, " +
         std::to_string(counts[int(LayerKind::HeavilyCompressed)]) + " HCA; " + std::to_string(hashed) +
         " hash-routed";
}

}  // namespace dsv4
