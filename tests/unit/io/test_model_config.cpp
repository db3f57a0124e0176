// ModelConfig: the three config spellings of V4-Flash and V4-Pro (tests/unit/io/configs/) read to the documented
// values of dsv4-model.md §1, agree with each other, and every malformed field is reported by name.
#include "io/model_config.hpp"

#include <array>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace {

using dsv4::ConfigSpelling;
using dsv4::ExpertDtype;
using dsv4::LayerKind;
using dsv4::ModelConfig;
using dsv4::RouterScoring;
using dsv4::ScaleFormat;
using json = nlohmann::json;

std::filesystem::path fixture_path(const std::string& name) {
  return std::filesystem::path(DSV4_SOURCE_DIR) / "tests" / "unit" / "io" / "configs" / name;
}

json read_fixture(const std::string& name) {
  std::ifstream file(fixture_path(name));
  return json::parse(file);
}

ModelConfig load(const std::string& name) { return ModelConfig::from_file(fixture_path(name)); }

// Parses `config` and expects a dsv4::Error whose message contains the origin and every fragment.
void expect_config_error(const json& config, const std::vector<std::string>& fragments) {
  try {
    ModelConfig::from_json(config, "crafted.json");
    ADD_FAILURE() << "accepted; expected an error mentioning " << fragments.front();
  } catch (const dsv4::Error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("crafted.json"), std::string::npos) << message;
    for (const auto& fragment : fragments) EXPECT_NE(message.find(fragment), std::string::npos) << message;
  }
}

void expect_error_after(const std::string& fixture, const std::function<void(json&)>& mutate,
                        const std::vector<std::string>& fragments) {
  json config = read_fixture(fixture);
  mutate(config);
  SCOPED_TRACE(fixture + " expecting " + fragments.front());
  expect_config_error(config, fragments);
}

// Layer kinds of dsv4-model.md §1: Flash L0-L1 SWA, Pro L0-L1 HCA; then even CSA (ratio 4), odd HCA (ratio 128).
void expect_layer_schedule(const ModelConfig& config, LayerKind first_two) {
  ASSERT_EQ(config.layer_kinds.size(), static_cast<size_t>(config.num_layers));
  for (int layer = 0; layer < config.num_layers; ++layer) {
    const LayerKind expected = layer < 2        ? first_two
                               : layer % 2 == 0 ? LayerKind::CompressedSparse
                                                : LayerKind::HeavilyCompressed;
    const int ratio = expected == LayerKind::SlidingWindow ? 0 : expected == LayerKind::CompressedSparse ? 4 : 128;
    EXPECT_EQ(config.layer_kind(layer), expected) << "layer " << layer;
    EXPECT_EQ(config.compress_ratio(layer), ratio) << "layer " << layer;
    EXPECT_EQ(config.has_indexer(layer), expected == LayerKind::CompressedSparse) << "layer " << layer;
    EXPECT_EQ(config.has_compressor(layer), ratio != 0) << "layer " << layer;
    EXPECT_EQ(config.is_hash_routed(layer), layer < 3) << "layer " << layer;
    EXPECT_EQ(config.layer_rope_theta(layer), ratio != 0 ? 160000.0 : 10000.0) << "layer " << layer;
    EXPECT_EQ(config.layer_uses_yarn(layer), ratio != 0) << "layer " << layer;
  }
}

// Values both models share.
void expect_common_v4_values(const ModelConfig& config) {
  EXPECT_EQ(config.vocab_size, 129280);
  EXPECT_EQ(config.head_dim, 512);
  EXPECT_EQ(config.rope_head_dim, 64);
  EXPECT_EQ(config.nope_head_dim(), 448);
  EXPECT_EQ(config.o_lora_rank, 1024);
  EXPECT_EQ(config.window_size, 128);
  EXPECT_EQ(config.rope_theta, 10000.0);
  EXPECT_EQ(config.compress_rope_theta, 160000.0);
  ASSERT_TRUE(config.yarn.has_value());
  EXPECT_EQ(*config.yarn,
            (dsv4::YarnScaling{.factor = 16, .original_max_position = 65536, .beta_fast = 32, .beta_slow = 1}));
  EXPECT_EQ(config.max_position_embeddings, 1048576);
  EXPECT_EQ(config.indexer.num_heads, 64);
  EXPECT_EQ(config.indexer.head_dim, 128);
  EXPECT_EQ(config.moe.experts_per_token, 6);
  EXPECT_EQ(config.moe.num_shared_experts, 1);
  EXPECT_EQ(config.moe.scoring, RouterScoring::SqrtSoftplus);
  EXPECT_EQ(config.moe.swiglu_limit, 10.0);
  EXPECT_TRUE(config.moe.norm_topk_prob);
  EXPECT_EQ(config.mhc, (dsv4::HyperConnectionConfig{.hc_mult = 4, .sinkhorn_iters = 20, .eps = 1e-6}));
  EXPECT_EQ(config.rms_norm_eps, 1e-6);
  EXPECT_EQ(config.num_mtp_layers, 1);
  EXPECT_EQ(config.bos_token_id, 0);
  EXPECT_EQ(config.eos_token_ids, std::vector<int>{1});
  EXPECT_FALSE(config.tie_word_embeddings);
  ASSERT_TRUE(config.weight_quantization.has_value());
  EXPECT_EQ(*config.weight_quantization,
            (dsv4::WeightQuantization{.block_rows = 128, .block_cols = 128, .scale_format = ScaleFormat::Ue8m0}));
}

void expect_flash_values(const ModelConfig& config) {
  expect_common_v4_values(config);
  EXPECT_EQ(config.hidden_size, 4096);
  EXPECT_EQ(config.num_layers, 43);
  EXPECT_EQ(config.num_heads, 64);
  EXPECT_EQ(config.q_lora_rank, 1024);
  EXPECT_EQ(config.o_groups, 8);
  EXPECT_EQ(config.indexer.topk, 512);
  EXPECT_EQ(config.moe.num_routed_experts, 256);
  EXPECT_EQ(config.moe.intermediate_size, 2048);
  EXPECT_EQ(config.moe.routed_scaling_factor, 1.5);
  expect_layer_schedule(config, LayerKind::SlidingWindow);
  // Shapes of dsv4-model.md §3.1.
  EXPECT_EQ(config.q_dim(), 32768);
  EXPECT_EQ(config.heads_per_group(), 8);
  EXPECT_EQ(config.o_group_input_dim(), 4096);
  EXPECT_EQ(config.o_proj_dim(), 8192);
  EXPECT_EQ(config.hc_dim(), 16384);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::SlidingWindow), 2);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::CompressedSparse), 21);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::HeavilyCompressed), 20);
}

void expect_pro_values(const ModelConfig& config) {
  expect_common_v4_values(config);
  EXPECT_EQ(config.hidden_size, 7168);
  EXPECT_EQ(config.num_layers, 61);
  EXPECT_EQ(config.num_heads, 128);
  EXPECT_EQ(config.q_lora_rank, 1536);
  EXPECT_EQ(config.o_groups, 16);
  EXPECT_EQ(config.indexer.topk, 1024);
  EXPECT_EQ(config.moe.num_routed_experts, 384);
  EXPECT_EQ(config.moe.intermediate_size, 3072);
  EXPECT_EQ(config.moe.routed_scaling_factor, 2.5);
  expect_layer_schedule(config, LayerKind::HeavilyCompressed);
  EXPECT_EQ(config.q_dim(), 65536);
  EXPECT_EQ(config.o_group_input_dim(), 4096);
  EXPECT_EQ(config.o_proj_dim(), 16384);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::SlidingWindow), 0);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::CompressedSparse), 30);
  EXPECT_EQ(config.num_layers_of_kind(LayerKind::HeavilyCompressed), 31);
}

TEST(ModelConfig, FlashReadsTheSameFromAllThreeSpellings) {
  const ModelConfig release = load("flash_release_config.json");
  const ModelConfig huggingface = load("flash_huggingface_config.json");
  const ModelConfig inference = load("flash_inference_config.json");
  EXPECT_EQ(release.source_format, ConfigSpelling::DeepSeekRelease);
  EXPECT_EQ(huggingface.source_format, ConfigSpelling::HuggingFace);
  EXPECT_EQ(inference.source_format, ConfigSpelling::DeepSeekInference);
  for (const ModelConfig* config : {&release, &huggingface, &inference}) {
    SCOPED_TRACE(config->origin);
    expect_flash_values(*config);
    EXPECT_EQ(config->expert_dtype, ExpertDtype::Fp4);
  }
  EXPECT_EQ(release, huggingface);
  EXPECT_EQ(release, inference);
}

TEST(ModelConfig, ProReadsTheSameFromAllThreeSpellings) {
  ModelConfig release = load("pro_release_config.json");
  ModelConfig huggingface = load("pro_huggingface_config.json");
  const ModelConfig inference = load("pro_inference_config.json");
  for (const ModelConfig* config : std::array<const ModelConfig*, 3>{&release, &huggingface, &inference}) {
    SCOPED_TRACE(config->origin);
    expect_pro_values(*config);
  }
  // The published Pro config.json does not state expert_dtype; inference/config.json must (ModelArgs needs it).
  EXPECT_FALSE(release.expert_dtype.has_value());
  EXPECT_FALSE(huggingface.expert_dtype.has_value());
  EXPECT_EQ(inference.expert_dtype, ExpertDtype::Fp4);
  EXPECT_NE(release, inference);
  release.expert_dtype = huggingface.expert_dtype = ExpertDtype::Fp4;
  EXPECT_EQ(release, huggingface);
  EXPECT_EQ(release, inference);
}

TEST(ModelConfig, FlashAndProDiffer) { EXPECT_NE(load("flash_release_config.json"), load("pro_release_config.json")); }

TEST(ModelConfig, EqualityComparesEveryModelFieldButNotTheOrigin) {
  const ModelConfig flash = load("flash_release_config.json");
  ModelConfig renamed = flash;
  renamed.origin = "elsewhere.json";
  renamed.source_format = ConfigSpelling::HuggingFace;
  EXPECT_EQ(flash, renamed);
  const std::vector<std::function<void(ModelConfig&)>> mutations = {
      [](ModelConfig& c) { c.hidden_size += 1; },
      [](ModelConfig& c) { c.layer_kinds[5] = LayerKind::SlidingWindow; },
      [](ModelConfig& c) { c.compress_ratios[7] = 64; },
      [](ModelConfig& c) { c.hash_routed[3] = true; },
      [](ModelConfig& c) { c.yarn.reset(); },
      [](ModelConfig& c) { c.yarn->beta_slow = 2; },
      [](ModelConfig& c) { c.indexer.topk = 1024; },
      [](ModelConfig& c) { c.moe.scoring = RouterScoring::Sigmoid; },
      [](ModelConfig& c) { c.moe.norm_topk_prob = false; },
      [](ModelConfig& c) { c.mhc.eps = 1e-5; },
      [](ModelConfig& c) { c.eos_token_ids.push_back(2); },
      [](ModelConfig& c) { c.weight_quantization->scale_format = ScaleFormat::Fp32; },
      [](ModelConfig& c) { c.expert_dtype = ExpertDtype::Fp8; },
      [](ModelConfig& c) { c.num_mtp_layers = 0; },
  };
  for (size_t i = 0; i < mutations.size(); ++i) {
    ModelConfig changed = flash;
    mutations[i](changed);
    EXPECT_NE(flash, changed) << "mutation " << i;
  }
}

TEST(ModelConfig, CompressRatiosMayOmitOrExtendTheMtpEntries) {
  const ModelConfig reference = load("flash_release_config.json");
  json config = read_fixture("flash_release_config.json");
  // One entry per main layer only.
  config["compress_ratios"].erase(config["compress_ratios"].size() - 1);
  EXPECT_EQ(ModelConfig::from_json(config, "layers_only.json"), reference);
  // Three trailing MTP entries, as the -0731 release ships.
  config["compress_ratios"].push_back(0);
  config["compress_ratios"].push_back(0);
  config["compress_ratios"].push_back(0);
  EXPECT_EQ(ModelConfig::from_json(config, "three_mtp.json"), reference);
  config["compress_ratios"][44] = 4;
  expect_config_error(config, {"compress_ratios[44]", "MTP"});
}

TEST(ModelConfig, HuggingFaceNonDefaultCompressRates) {
  const ModelConfig config = load("tiny_huggingface_custom_rates.json");
  EXPECT_EQ(config.source_format, ConfigSpelling::HuggingFace);
  EXPECT_EQ(config.layer_kinds, (std::vector<LayerKind>{LayerKind::SlidingWindow, LayerKind::CompressedSparse,
                                                        LayerKind::HeavilyCompressed, LayerKind::CompressedSparse}));
  EXPECT_EQ(config.compress_ratios, (std::vector<int>{0, 8, 32, 8}));
  EXPECT_EQ(config.hash_routed, (std::vector<bool>{true, false, false, false}));
  EXPECT_TRUE(config.has_indexer(1));
  EXPECT_FALSE(config.has_indexer(2));
  EXPECT_EQ(config.rope_head_dim, 16);
  EXPECT_EQ(config.compress_rope_theta, 40000.0);
  EXPECT_EQ(config.yarn,
            (dsv4::YarnScaling{.factor = 4, .original_max_position = 1024, .beta_fast = 32, .beta_slow = 1}));
  EXPECT_EQ(config.moe.scoring, RouterScoring::Sigmoid);
  EXPECT_EQ(config.eos_token_ids, (std::vector<int>{1, 2}));
  EXPECT_EQ(config.num_mtp_layers, 0);
  EXPECT_EQ(config.rms_norm_eps, 1e-5);
  EXPECT_EQ(config.mhc, (dsv4::HyperConnectionConfig{.hc_mult = 2, .sinkhorn_iters = 5, .eps = 1e-6}));
  EXPECT_FALSE(config.weight_quantization.has_value());
  EXPECT_FALSE(config.expert_dtype.has_value());
}

TEST(ModelConfig, HuggingFaceLegacyCompressRateKeysOverrideTheDict) {
  json config = read_fixture("tiny_huggingface_custom_rates.json");
  config["compress_rate_hca"] = 64;
  config["compress_rates"].erase("compressed_sparse_attention");  // falls back to HuggingFace's default 4
  EXPECT_EQ(ModelConfig::from_json(config, "legacy.json").compress_ratios, (std::vector<int>{0, 4, 64, 4}));
}

TEST(ModelConfig, InferenceNonDefaultCompressRatios) {
  const ModelConfig config = load("tiny_inference_custom_ratios.json");
  EXPECT_EQ(config.source_format, ConfigSpelling::DeepSeekInference);
  // Only ratio 4 builds an indexer in DeepSeek's reference; any other non-zero ratio is heavily compressed.
  EXPECT_EQ(config.layer_kinds, (std::vector<LayerKind>{LayerKind::SlidingWindow, LayerKind::CompressedSparse,
                                                        LayerKind::HeavilyCompressed, LayerKind::HeavilyCompressed}));
  EXPECT_EQ(config.compress_ratios, (std::vector<int>{0, 4, 16, 2}));
  EXPECT_EQ(config.hash_routed, (std::vector<bool>{true, false, false, false}));
  EXPECT_FALSE(config.yarn.has_value());
  EXPECT_FALSE(config.layer_uses_yarn(2));
  EXPECT_EQ(config.layer_rope_theta(2), 40000.0);
  EXPECT_EQ(config.max_position_embeddings, 2048);
  EXPECT_EQ(config.moe.scoring, RouterScoring::Softmax);
  EXPECT_FALSE(config.moe.norm_topk_prob);  // the reference renormalises for every scoring but softmax
  EXPECT_FALSE(config.weight_quantization.has_value());
}

TEST(ModelConfig, InferenceBaseCheckpointHasFp32Scales) {
  json config = read_fixture("flash_inference_config.json");
  config["scale_dtype"] = "fp32";
  config["scale_fmt"] = nullptr;
  config["expert_dtype"] = nullptr;
  const ModelConfig base = ModelConfig::from_json(config, "base.json");
  EXPECT_EQ(base.weight_quantization->scale_format, ScaleFormat::Fp32);
  EXPECT_FALSE(base.expert_dtype.has_value());
}

// NVIDIA's NVFP4 exports: the formats live in the tensors (and hf_quant_config.json), not in config.json.
TEST(ModelConfig, ModelOptQuantizationLeavesFormatsToTheTensors) {
  json config = read_fixture("flash_release_config.json");
  config["quantization_config"] = {{"quant_method", "modelopt"}, {"quant_algo", "NVFP4"}};
  const ModelConfig nvfp4 = ModelConfig::from_json(config, "nvfp4.json");
  EXPECT_FALSE(nvfp4.weight_quantization.has_value());
  EXPECT_EQ(nvfp4.num_layers, 43);
}

TEST(ModelConfig, FromDirPrefersConfigJsonThenInference) {
  const auto dir = std::filesystem::temp_directory_path() / ("dsv4_model_config_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "inference");
  try {
    ModelConfig::from_dir(dir);
    ADD_FAILURE() << "empty folder accepted";
  } catch (const dsv4::Error& error) {
    EXPECT_NE(std::string(error.what()).find("inference"), std::string::npos) << error.what();
  }
  std::filesystem::copy_file(fixture_path("flash_inference_config.json"), dir / "inference" / "config.json");
  EXPECT_EQ(ModelConfig::from_dir(dir).source_format, ConfigSpelling::DeepSeekInference);
  std::filesystem::copy_file(fixture_path("flash_release_config.json"), dir / "config.json");
  const ModelConfig config = ModelConfig::from_dir(dir);
  EXPECT_EQ(config.source_format, ConfigSpelling::DeepSeekRelease);
  EXPECT_EQ(config.origin, (dir / "config.json").string());
  std::filesystem::remove_all(dir);
}

TEST(ModelConfig, FileErrorsNameThePath) {
  const auto path =
      std::filesystem::temp_directory_path() / ("dsv4_bad_config_" + std::to_string(::getpid()) + ".json");
  std::ofstream(path) << "{\"hidden_size\": 4096,";
  try {
    ModelConfig::from_file(path);
    ADD_FAILURE() << "truncated JSON accepted";
  } catch (const dsv4::Error& error) {
    EXPECT_NE(std::string(error.what()).find(path.string()), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("invalid JSON"), std::string::npos) << error.what();
  }
  std::filesystem::remove(path);
  EXPECT_THROW(ModelConfig::from_file(path), dsv4::Error);
}

TEST(ModelConfig, SpellingDetectionErrors) {
  expect_config_error(json::array({1, 2}), {"JSON object"});
  expect_config_error(json{{"hidden_size", 4096}}, {"cannot tell the config spelling"});
  expect_error_after("flash_release_config.json", [](json& c) { c["layer_types"] = json::array(); },
                     {"mixes config spellings", "compress_ratios", "layer_types"});
  expect_error_after("flash_inference_config.json", [](json& c) { c["hidden_size"] = 4096; },
                     {"mixes config spellings", "dim", "hidden_size"});
  expect_error_after("flash_inference_config.json", [](json& c) { c["num_hash_layers"] = 3; },
                     {"mixes config spellings", "num_hash_layers"});
  expect_error_after("flash_huggingface_config.json", [](json& c) { c["rope_scaling"] = json::object(); },
                     {"mixes config spellings", "rope_scaling", "layer_types"});
}

TEST(ModelConfig, UnknownModelIsRejected) {
  expect_error_after("flash_release_config.json", [](json& c) { c["model_type"] = "deepseek_v3"; },
                     {"'model_type'", "deepseek_v3"});
  expect_error_after("flash_huggingface_config.json", [](json& c) { c["architectures"] = {"LlamaForCausalLM"}; },
                     {"'architectures'", "LlamaForCausalLM"});
  expect_error_after("flash_inference_config.json", [](json& c) { c["model_type"] = "deepseek_v41"; },
                     {"'model_type'"});
}

struct FieldCase {
  std::string fixture;
  std::function<void(json&)> mutate;
  std::vector<std::string> fragments;
};

TEST(ModelConfig, EachBadFieldIsNamed) {
  const std::string release = "flash_release_config.json";
  const std::string hf = "flash_huggingface_config.json";
  const std::string inference = "flash_inference_config.json";
  const std::vector<FieldCase> cases = {
      // Missing or mistyped.
      {release, [](json& c) { c.erase("hidden_size"); }, {"missing required field 'hidden_size'"}},
      {hf, [](json& c) { c.erase("mlp_layer_types"); }, {"missing required field 'mlp_layer_types'"}},
      {inference, [](json& c) { c.erase("n_hash_layers"); }, {"missing required field 'n_hash_layers'"}},
      {inference, [](json& c) { c.erase("route_scale"); }, {"missing required field 'route_scale'"}},
      {release, [](json& c) { c["hidden_size"] = "4096"; }, {"'hidden_size'", "must be an integer"}},
      {release, [](json& c) { c["sliding_window"] = 128.5; }, {"'sliding_window'", "must be an integer"}},
      {release, [](json& c) { c["vocab_size"] = 1LL << 40; }, {"'vocab_size'", "out of range"}},
      {release, [](json& c) { c["norm_topk_prob"] = 1; }, {"'norm_topk_prob'", "true or false"}},
      {release, [](json& c) { c["routed_scaling_factor"] = "1.5"; }, {"'routed_scaling_factor'", "number"}},
      {release, [](json& c) { c["compress_ratios"] = 4; }, {"'compress_ratios'", "list"}},
      {release, [](json& c) { c["compress_ratios"][3] = "128"; }, {"'compress_ratios[3]'"}},
      {hf, [](json& c) { c["layer_types"][2] = 4; }, {"'layer_types[2]'", "string"}},
      // Dimensions.
      {release, [](json& c) { c["o_groups"] = 6; }, {"'o_groups'", "num_attention_heads", "divisible"}},
      {inference, [](json& c) { c["n_heads"] = 60; }, {"'o_groups'", "'n_heads'"}},
      {release, [](json& c) { c["o_groups"] = 0; }, {"'o_groups'", "expected > 0"}},
      {release, [](json& c) { c["qk_rope_head_dim"] = 640; }, {"'qk_rope_head_dim'", "<= head_dim"}},
      {release, [](json& c) { c["qk_rope_head_dim"] = 63; }, {"'qk_rope_head_dim'", "even"}},
      {inference, [](json& c) { c["rope_head_dim"] = 0; }, {"'rope_head_dim'"}},
      {hf, [](json& c) { c["partial_rotary_factor"] = 0.3; }, {"'partial_rotary_factor'", "whole"}},
      {hf, [](json& c) { c["qk_rope_head_dim"] = 32; }, {"'qk_rope_head_dim'", "partial_rotary_factor"}},
      {release, [](json& c) { c["sliding_window"] = 0; }, {"'sliding_window'", "expected > 0"}},
      {inference, [](json& c) { c["window_size"] = -1; }, {"'window_size'"}},
      {release, [](json& c) { c["num_hidden_layers"] = 0; }, {"'num_hidden_layers'"}},
      {release, [](json& c) { c["num_key_value_heads"] = 8; }, {"'num_key_value_heads'"}},
      {release, [](json& c) { c["max_position_embeddings"] = 0; }, {"'max_position_embeddings'"}},
      // Layer schedules.
      {release, [](json& c) { c["num_hidden_layers"] = 50; }, {"'compress_ratios'", "44 entries", "num_hidden_layers"}},
      {inference, [](json& c) { c["n_layers"] = 42; }, {"'compress_ratios[42]'", "n_layers", "MTP"}},
      {release, [](json& c) { c["compress_ratios"][2] = 1; }, {"'compress_ratios[2]'", ">= 2"}},
      {release, [](json& c) { c["compress_ratios"][2] = -4; }, {"'compress_ratios[2]'"}},
      {hf, [](json& c) { c["num_hidden_layers"] = 42; }, {"'layer_types'", "43 entries", "num_hidden_layers"}},
      {hf, [](json& c) { c["layer_types"][5] = "full_attention"; }, {"'layer_types[5]'", "full_attention"}},
      {hf, [](json& c) { c["mlp_layer_types"].erase(0); }, {"'mlp_layer_types'", "42 entries"}},
      {hf, [](json& c) { c["mlp_layer_types"][0] = "dense"; }, {"'mlp_layer_types[0]'", "dense"}},
      {hf, [](json& c) { c["compress_rates"]["sliding_attention"] = 0; }, {"'compress_rates.sliding_attention'"}},
      {hf, [](json& c) { c["compress_rates"]["heavily_compressed_attention"] = 1; }, {"'compress_rates'", "ratio 1"}},
      {release, [](json& c) { c["num_hash_layers"] = 44; }, {"'num_hash_layers'", "0..43"}},
      {inference, [](json& c) { c["n_hash_layers"] = -1; }, {"'n_hash_layers'"}},
      // Indexer (needed by CSA layers).
      {release, [](json& c) { c.erase("index_topk"); }, {"missing required field 'index_topk'"}},
      {release, [](json& c) { c["index_n_heads"] = 0; }, {"'index_n_heads'"}},
      {inference, [](json& c) { c["index_head_dim"] = 32; }, {"'index_head_dim'", "RoPE"}},
      // MoE.
      {release, [](json& c) { c["num_experts_per_tok"] = 300; }, {"'num_experts_per_tok'", "1..256"}},
      {inference, [](json& c) { c["n_activated_experts"] = 0; }, {"'n_activated_experts'"}},
      {release, [](json& c) { c["n_routed_experts"] = 0; }, {"'n_routed_experts'"}},
      {inference, [](json& c) { c["moe_inter_dim"] = 0; }, {"'moe_inter_dim'"}},
      {release, [](json& c) { c["n_shared_experts"] = -1; }, {"'n_shared_experts'"}},
      {release, [](json& c) { c["scoring_func"] = "relu"; }, {"'scoring_func'", "relu"}},
      {inference, [](json& c) { c["score_func"] = "tanh"; }, {"'score_func'", "tanh"}},
      {inference, [](json& c) { c["route_scale"] = 0; }, {"'route_scale'"}},
      {release, [](json& c) { c["swiglu_limit"] = -1; }, {"'swiglu_limit'"}},
      {release, [](json& c) { c["topk_method"] = "greedy"; }, {"'topk_method'", "noaux_tc"}},
      {release, [](json& c) { c["hidden_act"] = "gelu"; }, {"'hidden_act'", "gelu"}},
      // RoPE.
      {release, [](json& c) { c.erase("compress_rope_theta"); }, {"missing required field 'compress_rope_theta'"}},
      {release, [](json& c) { c["rope_theta"] = 0; }, {"'rope_theta'"}},
      {release, [](json& c) { c["rope_scaling"]["type"] = "linear"; }, {"'rope_scaling.type'", "linear"}},
      {release, [](json& c) { c["rope_scaling"].erase("factor"); }, {"'rope_scaling.factor'"}},
      {release, [](json& c) { c["rope_scaling"]["factor"] = 0.5; }, {"'rope_scaling.factor'"}},
      {release, [](json& c) { c["rope_scaling"]["beta_fast"] = 0.5; }, {"'rope_scaling.beta_fast'"}},
      {inference, [](json& c) { c.erase("rope_factor"); }, {"missing required field 'rope_factor'"}},
      {inference,
       [](json& c) {
         c["original_seq_len"] = 0;
         c.erase("max_seq_len");
       },
       {"'max_seq_len'"}},
      {hf,
       [](json& c) { c["rope_parameters"]["compress"]["attention_factor"] = 1.277; },
       {"'rope_parameters.compress.attention_factor'"}},
      {hf,
       [](json& c) { c["rope_parameters"]["main"]["rope_theta"] = 5000.0; },
       {"'rope_parameters.main.rope_theta'", "'rope_theta'"}},
      {hf, [](json& c) { c["rope_parameters"]["main"]["rope_type"] = "yarn"; }, {"'rope_parameters.main.rope_type'"}},
      {hf,
       [](json& c) { c["rope_parameters"]["compress"]["partial_rotary_factor"] = 0.25; },
       {"'rope_parameters.compress.partial_rotary_factor'"}},
      {hf, [](json& c) { c["rope_parameters"].erase("main"); }, {"'rope_parameters.main'"}},
      // mHC, norms, token ids.
      {release, [](json& c) { c["hc_mult"] = 0; }, {"'hc_mult'"}},
      {release, [](json& c) { c["hc_sinkhorn_iters"] = 0; }, {"'hc_sinkhorn_iters'"}},
      {release, [](json& c) { c["hc_eps"] = 0; }, {"'hc_eps'"}},
      {release, [](json& c) { c["rms_norm_eps"] = 0; }, {"'rms_norm_eps'"}},
      {inference, [](json& c) { c["norm_eps"] = -1e-6; }, {"'norm_eps'"}},
      {release, [](json& c) { c["num_nextn_predict_layers"] = -1; }, {"'num_nextn_predict_layers'"}},
      {release, [](json& c) { c["eos_token_id"] = 200000; }, {"'eos_token_id'"}},
      {release, [](json& c) { c["eos_token_id"] = json::array(); }, {"'eos_token_id'", "empty"}},
      {release, [](json& c) { c["bos_token_id"] = -1; }, {"'bos_token_id'"}},
      // Storage formats.
      {release,
       [](json& c) { c["quantization_config"]["quant_method"] = "awq"; },
       {"'quantization_config.quant_method'", "awq"}},
      {release, [](json& c) { c["quantization_config"]["fmt"] = "e5m2"; }, {"'quantization_config.fmt'"}},
      {release, [](json& c) { c["quantization_config"]["scale_fmt"] = "e5m2"; }, {"'quantization_config.scale_fmt'"}},
      {release,
       [](json& c) { c["quantization_config"]["weight_block_size"] = {128}; },
       {"'quantization_config.weight_block_size'"}},
      {release,
       [](json& c) {
         c["quantization_config"]["weight_block_size"] = {128, 0};
       },
       {"'quantization_config.weight_block_size'", "positive"}},
      {release,
       [](json& c) { c["quantization_config"]["expert_dtype"] = "fp8"; },
       {"'quantization_config.expert_dtype'", "fp4"}},
      {release, [](json& c) { c["expert_dtype"] = "int4"; }, {"'expert_dtype'", "int4"}},
      {inference, [](json& c) { c["dtype"] = "int8"; }, {"'dtype'", "int8"}},
      {inference, [](json& c) { c["scale_dtype"] = "fp16"; }, {"'scale_dtype'"}},
  };
  for (const auto& field_case : cases) expect_error_after(field_case.fixture, field_case.mutate, field_case.fragments);
}

TEST(ModelConfig, ValidateCatchesInconsistentStructs) {
  const ModelConfig flash = load("flash_release_config.json");
  const std::vector<std::pair<std::function<void(ModelConfig&)>, std::string>> cases = {
      {[](ModelConfig& c) { c.layer_kinds[0] = LayerKind::CompressedSparse; }, "layer 0 (csa) ratio 0"},
      {[](ModelConfig& c) { c.compress_ratios[3] = 0; }, "layer 3 (hca) ratio 0"},
      {[](ModelConfig& c) { c.layer_kinds[2] = LayerKind::SlidingWindow; }, "layer 2 (sliding-window) ratio 4"},
      {[](ModelConfig& c) { c.hash_routed.pop_back(); }, "'num_hash_layers'"},
      {[](ModelConfig& c) { c.layer_kinds.push_back(LayerKind::SlidingWindow); }, "44 layer kinds for 43 layers"},
      {[](ModelConfig& c) { c.compress_rope_theta = 0; }, "'compress_rope_theta'"},
      {[](ModelConfig& c) { c.indexer.topk = 0; }, "'index_topk'"},
  };
  for (const auto& [mutate, fragment] : cases) {
    ModelConfig broken = flash;
    mutate(broken);
    try {
      broken.validate();
      ADD_FAILURE() << "accepted; expected " << fragment;
    } catch (const dsv4::Error& error) {
      EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find(flash.origin), std::string::npos) << error.what();
    }
  }
  // Without CSA layers no indexer is needed.
  ModelConfig no_csa = load("tiny_inference_custom_ratios.json");
  no_csa.compress_ratios[1] = 8;
  no_csa.layer_kinds[1] = LayerKind::HeavilyCompressed;
  no_csa.indexer = {};
  EXPECT_NO_THROW(no_csa.validate());
}

TEST(ModelConfig, LayerHelpersRejectOutOfRangeLayers) {
  const ModelConfig flash = load("flash_release_config.json");
  EXPECT_THROW(flash.layer_kind(43), dsv4::Error);
  EXPECT_THROW(flash.layer_kind(-1), dsv4::Error);
  EXPECT_THROW(flash.compress_ratio(43), dsv4::Error);
  EXPECT_THROW(flash.is_hash_routed(43), dsv4::Error);
  EXPECT_THROW(flash.has_indexer(100), dsv4::Error);
}

TEST(ModelConfig, SummaryJsonDescribesTheModel) {
  const json flash = load("flash_huggingface_config.json").summary_json();
  EXPECT_EQ(flash["source_format"], "huggingface");
  EXPECT_EQ(flash["hidden_size"], 4096);
  EXPECT_EQ(flash["layers"]["counts"], (json{{"sliding_window", 2}, {"csa", 21}, {"hca", 20}}));
  EXPECT_EQ(flash["layers"]["kinds"][2], "csa");
  EXPECT_EQ(flash["layers"]["hash_routed_layers"], (json{0, 1, 2}));
  EXPECT_EQ(flash["rope"]["yarn"]["factor"], 16.0);
  EXPECT_EQ(flash["moe"]["scoring"], "sqrtsoftplus");
  EXPECT_EQ(flash["quantization"]["weights"]["scale_format"], "ue8m0");
  EXPECT_EQ(flash["quantization"]["experts"], "fp4");
  const json tiny = load("tiny_inference_custom_ratios.json").summary_json();
  EXPECT_TRUE(tiny["rope"]["yarn"].is_null());
  EXPECT_EQ(tiny["quantization"]["weights"], "unquantized");
  EXPECT_EQ(tiny["layers"]["compress_ratios"], (json{0, 4, 16, 2}));
}

}  // namespace
