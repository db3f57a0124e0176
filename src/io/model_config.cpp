#include "io/model_config.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace dsv4 {

using json = nlohmann::json;

std::string_view to_string(ConfigSpelling spelling) {
  switch (spelling) {
    case ConfigSpelling::DeepSeekRelease: return "deepseek-release";
    case ConfigSpelling::HuggingFace: return "huggingface";
    case ConfigSpelling::DeepSeekInference: return "deepseek-inference";
  }
  return "?";
}

std::string_view to_string(LayerKind kind) {
  switch (kind) {
    case LayerKind::SlidingWindow: return "sliding_window";
    case LayerKind::CompressedSparse: return "csa";
    case LayerKind::HeavilyCompressed: return "hca";
  }
  return "?";
}

std::string_view to_string(RouterScoring scoring) {
  switch (scoring) {
    case RouterScoring::SqrtSoftplus: return "sqrtsoftplus";
    case RouterScoring::Softmax: return "softmax";
    case RouterScoring::Sigmoid: return "sigmoid";
  }
  return "?";
}

std::string_view to_string(ScaleFormat format) {
  switch (format) {
    case ScaleFormat::Ue8m0: return "ue8m0";
    case ScaleFormat::Fp32: return "fp32";
  }
  return "?";
}

std::string_view to_string(ExpertDtype dtype) {
  switch (dtype) {
    case ExpertDtype::Fp4: return "fp4";
    case ExpertDtype::Fp8: return "fp8";
    case ExpertDtype::BF16: return "bf16";
  }
  return "?";
}

namespace {

constexpr std::string_view kHfSlidingType = "sliding_attention";
constexpr std::string_view kHfCsaType = "compressed_sparse_attention";
constexpr std::string_view kHfHcaType = "heavily_compressed_attention";
// DeepSeek's reference builds the indexer and the overlapping compressor exactly where the ratio is 4; any other
// non-zero ratio is a heavily-compressed layer. HuggingFace instead names each layer's kind (layer_types).
constexpr int kReferenceCsaRatio = 4;
// Fixed in DeepSeek's reference code (inference/model.py `block_size`), so inference/config.json never states it.
constexpr int kReferenceWeightBlock = 128;

// Keys that only one spelling uses; `compress_ratios` is shared by the release and inference spellings.
constexpr std::array<std::string_view, 3> kReleaseOnlyKeys = {"compress_ratios", "num_hash_layers", "rope_scaling"};
constexpr std::array<std::string_view, 7> kHuggingFaceOnlyKeys = {
    "layer_types",           "mlp_layer_types",   "compress_rates",   "rope_parameters",
    "partial_rotary_factor", "compress_rate_csa", "compress_rate_hca"};
constexpr std::array<std::string_view, 14> kInferenceOnlyKeys = {
    "dim",           "n_layers",    "n_heads",  "moe_inter_dim", "n_activated_experts", "route_scale",
    "score_func",    "window_size", "norm_eps", "rope_factor",   "original_seq_len",    "rope_head_dim",
    "n_hash_layers", "n_mtp_layers"};
// Keys of the release and HuggingFace spellings that an inference config never has.
constexpr std::array<std::string_view, 6> kTransformersKeys = {"hidden_size",         "num_hidden_layers",
                                                               "num_attention_heads", "sliding_window",
                                                               "num_experts_per_tok", "moe_intermediate_size"};

// How each ModelConfig field is spelled in the three formats, so that validation errors name the key the user sees.
struct FieldSpelling {
  std::string_view engine, release, huggingface, inference;
};
constexpr std::array<FieldSpelling, 32> kFieldSpellings = {{
    {"hidden_size", "hidden_size", "hidden_size", "dim"},
    {"num_layers", "num_hidden_layers", "num_hidden_layers", "n_layers"},
    {"vocab_size", "vocab_size", "vocab_size", "vocab_size"},
    {"num_heads", "num_attention_heads", "num_attention_heads", "n_heads"},
    {"head_dim", "head_dim", "head_dim", "head_dim"},
    {"rope_head_dim", "qk_rope_head_dim", "partial_rotary_factor", "rope_head_dim"},
    {"q_lora_rank", "q_lora_rank", "q_lora_rank", "q_lora_rank"},
    {"o_groups", "o_groups", "o_groups", "o_groups"},
    {"o_lora_rank", "o_lora_rank", "o_lora_rank", "o_lora_rank"},
    {"window_size", "sliding_window", "sliding_window", "window_size"},
    {"layer_kinds", "compress_ratios", "layer_types", "compress_ratios"},
    {"compress_ratios", "compress_ratios", "compress_rates", "compress_ratios"},
    {"hash_routed", "num_hash_layers", "mlp_layer_types", "n_hash_layers"},
    {"rope_theta", "rope_theta", "rope_theta", "rope_theta"},
    {"compress_rope_theta", "compress_rope_theta", "compress_rope_theta", "compress_rope_theta"},
    {"yarn.factor", "rope_scaling.factor", "rope_parameters.compress.factor", "rope_factor"},
    {"yarn.original_max_position", "rope_scaling.original_max_position_embeddings",
     "rope_parameters.compress.original_max_position_embeddings", "original_seq_len"},
    {"yarn.beta_fast", "rope_scaling.beta_fast", "rope_parameters.compress.beta_fast", "beta_fast"},
    {"yarn.beta_slow", "rope_scaling.beta_slow", "rope_parameters.compress.beta_slow", "beta_slow"},
    {"max_position_embeddings", "max_position_embeddings", "max_position_embeddings", "max_position_embeddings"},
    {"moe.num_routed_experts", "n_routed_experts", "n_routed_experts", "n_routed_experts"},
    {"moe.experts_per_token", "num_experts_per_tok", "num_experts_per_tok", "n_activated_experts"},
    {"moe.num_shared_experts", "n_shared_experts", "n_shared_experts", "n_shared_experts"},
    {"moe.intermediate_size", "moe_intermediate_size", "moe_intermediate_size", "moe_inter_dim"},
    {"moe.routed_scaling_factor", "routed_scaling_factor", "routed_scaling_factor", "route_scale"},
    {"moe.swiglu_limit", "swiglu_limit", "swiglu_limit", "swiglu_limit"},
    {"mhc.hc_mult", "hc_mult", "hc_mult", "hc_mult"},
    {"mhc.sinkhorn_iters", "hc_sinkhorn_iters", "hc_sinkhorn_iters", "hc_sinkhorn_iters"},
    {"mhc.eps", "hc_eps", "hc_eps", "hc_eps"},
    {"rms_norm_eps", "rms_norm_eps", "rms_norm_eps", "norm_eps"},
    {"num_mtp_layers", "num_nextn_predict_layers", "num_nextn_predict_layers", "n_mtp_layers"},
    {"weight_quantization", "quantization_config.weight_block_size", "quantization_config.weight_block_size", "dtype"},
}};

// The key under which `engine_name` appears in a file of the given spelling (engine_name itself if not listed).
std::string_view spelled(std::string_view engine_name, ConfigSpelling spelling) {
  for (const auto& entry : kFieldSpellings) {
    if (entry.engine != engine_name) continue;
    switch (spelling) {
      case ConfigSpelling::DeepSeekRelease: return entry.release;
      case ConfigSpelling::HuggingFace: return entry.huggingface;
      case ConfigSpelling::DeepSeekInference: return entry.inference;
    }
  }
  return engine_name;
}

std::string indexed(std::string_view key, size_t index) { return std::string(key) + "[" + std::to_string(index) + "]"; }

std::string_view json_type_name(const json& value) {
  if (value.is_number_integer()) return "integer";
  if (value.is_number_float()) return "number";
  if (value.is_string()) return "string";
  if (value.is_boolean()) return "boolean";
  if (value.is_array()) return "array";
  if (value.is_object()) return "object";
  return "null";
}

// Typed access to one JSON object; every error names the file and the full key path.
class FieldReader {
 public:
  FieldReader(const json& object, std::string_view origin, std::string prefix = {})
      : object_(&object), origin_(origin), prefix_(std::move(prefix)) {}

  // Present and not null (DeepSeek writes `null` for "not set").
  bool has(std::string_view key) const {
    const auto it = object_->find(key);
    return it != object_->end() && !it->is_null();
  }

  std::string path(std::string_view key) const { return prefix_ + std::string(key); }

  template <typename... Parts>
  [[noreturn]] void fail_field(std::string_view key, Parts&&... parts) const {
    fail(origin_, ": field '", path(key), "' ", std::forward<Parts>(parts)...);
  }

  // `context` says who requires the field, e.g. "DeepSeek release spelling".
  const json& require(std::string_view key, std::string_view context) const {
    if (!has(key)) fail(origin_, ": missing required field '", path(key), "' (", context, ")");
    return *object_->find(key);
  }

  int64_t require_int64(std::string_view key, std::string_view context) const {
    return as_int64(key, require(key, context));
  }
  int require_int(std::string_view key, std::string_view context) const {
    return narrow(key, require_int64(key, context));
  }
  std::optional<int> optional_int(std::string_view key) const {
    if (!has(key)) return std::nullopt;
    return narrow(key, as_int64(key, *object_->find(key)));
  }
  int int_or(std::string_view key, int fallback) const { return optional_int(key).value_or(fallback); }

  double require_number(std::string_view key, std::string_view context) const {
    return as_number(key, require(key, context));
  }
  std::optional<double> optional_number(std::string_view key) const {
    if (!has(key)) return std::nullopt;
    return as_number(key, *object_->find(key));
  }
  double number_or(std::string_view key, double fallback) const { return optional_number(key).value_or(fallback); }

  bool bool_or(std::string_view key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& value = *object_->find(key);
    if (!value.is_boolean()) fail_field(key, "must be true or false, got ", json_type_name(value));
    return value.get<bool>();
  }

  std::optional<std::string> optional_string(std::string_view key) const {
    if (!has(key)) return std::nullopt;
    const json& value = *object_->find(key);
    if (!value.is_string()) fail_field(key, "must be a string, got ", json_type_name(value));
    return value.get<std::string>();
  }

  const json& require_array(std::string_view key, std::string_view context) const {
    const json& value = require(key, context);
    if (!value.is_array()) fail_field(key, "must be a list, got ", json_type_name(value));
    return value;
  }

  // The nested object at `key`, or nullopt when absent or null.
  std::optional<FieldReader> optional_object(std::string_view key) const {
    if (!has(key)) return std::nullopt;
    const json& value = *object_->find(key);
    if (!value.is_object()) fail_field(key, "must be an object, got ", json_type_name(value));
    return FieldReader(value, origin_, path(key) + ".");
  }

  std::vector<int> int_list(std::string_view key, const json& list) const {
    std::vector<int> values;
    values.reserve(list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string item = indexed(key, i);
      values.push_back(narrow(item, as_int64(item, list[i])));
    }
    return values;
  }

  std::vector<std::string> string_list(std::string_view key, const json& list) const {
    std::vector<std::string> values;
    values.reserve(list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      if (!list[i].is_string()) fail_field(indexed(key, i), "must be a string, got ", json_type_name(list[i]));
      values.push_back(list[i].get<std::string>());
    }
    return values;
  }

  const json& object() const { return *object_; }
  std::string_view origin() const { return origin_; }

 private:
  int64_t as_int64(std::string_view key, const json& value) const {
    if (value.is_number_unsigned()) {
      if (value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_field(key, "is out of range: ", value.dump());
      return static_cast<int64_t>(value.get<uint64_t>());
    }
    if (!value.is_number_integer())
      fail_field(key, "must be an integer, got ", json_type_name(value), " ", value.dump());
    return value.get<int64_t>();
  }
  int narrow(std::string_view key, int64_t value) const {
    if (value < std::numeric_limits<int>::min() || value > std::numeric_limits<int>::max())
      fail_field(key, "is out of range: ", value);
    return static_cast<int>(value);
  }
  double as_number(std::string_view key, const json& value) const {
    if (!value.is_number()) fail_field(key, "must be a number, got ", json_type_name(value), " ", value.dump());
    return value.get<double>();
  }

  const json* object_;  // a pointer so that readers can be reassigned
  std::string_view origin_;
  std::string prefix_;
};

template <size_t N>
std::optional<std::string_view> first_present(const json& config, const std::array<std::string_view, N>& keys) {
  for (std::string_view key : keys)
    if (config.contains(key)) return key;
  return std::nullopt;
}

ConfigSpelling detect_spelling(const json& config, std::string_view origin) {
  const auto inference_key = first_present(config, kInferenceOnlyKeys);
  const auto hf_key = first_present(config, kHuggingFaceOnlyKeys);
  const auto transformers_key = first_present(config, kTransformersKeys);
  // compress_ratios is shared by the release and inference spellings, so only the other release keys tell them apart.
  const auto release_key = first_present(config, kReleaseOnlyKeys);
  const auto release_exclusive_key =
      first_present(config, std::array<std::string_view, 2>{"num_hash_layers", "rope_scaling"});
  if (inference_key) {
    if (const auto other = transformers_key ? transformers_key : hf_key ? hf_key : release_exclusive_key)
      fail(origin, ": mixes config spellings: '", *inference_key, "' (DeepSeek inference) and '", *other,
           "' (release/HuggingFace); use one spelling per file");
    return ConfigSpelling::DeepSeekInference;
  }
  if (release_key && hf_key)
    fail(origin, ": mixes config spellings: '", *release_key, "' (DeepSeek release) and '", *hf_key,
         "' (HuggingFace); use one spelling per file");
  if (hf_key) return ConfigSpelling::HuggingFace;
  if (release_key) return ConfigSpelling::DeepSeekRelease;
  fail(origin,
       ": cannot tell the config spelling: none of 'compress_ratios' (DeepSeek release), 'layer_types' "
       "(HuggingFace) or 'n_layers' (DeepSeek inference) is present");
}

// model_type / architectures, where present, must name DeepSeek-V4.
void check_model_identity(const FieldReader& reader) {
  if (const auto model_type = reader.optional_string("model_type"); model_type && *model_type != "deepseek_v4")
    reader.fail_field("model_type", "is '", *model_type, "', not a DeepSeek-V4 model (expected 'deepseek_v4')");
  if (!reader.has("architectures")) return;
  const json& list = reader.object().at("architectures");
  if (!list.is_array()) reader.fail_field("architectures", "must be a list, got ", json_type_name(list));
  const auto names = reader.string_list("architectures", list);
  const bool known = std::any_of(names.begin(), names.end(), [](const std::string& name) {
    return name == "DeepseekV4ForCausalLM" || name == "DeepseekV4Model";
  });
  if (!known)
    reader.fail_field("architectures", "is ", list.dump(),
                      ": no DeepSeek-V4 architecture (expected 'DeepseekV4ForCausalLM')");
}

RouterScoring parse_scoring(const FieldReader& reader, std::string_view key) {
  const std::string name = reader.optional_string(key).value_or("sqrtsoftplus");
  if (name == "sqrtsoftplus") return RouterScoring::SqrtSoftplus;
  if (name == "softmax") return RouterScoring::Softmax;
  if (name == "sigmoid") return RouterScoring::Sigmoid;
  reader.fail_field(key, "is '", name, "': unknown router scoring (expected sqrtsoftplus, softmax or sigmoid)");
}

std::optional<ExpertDtype> parse_expert_dtype(const FieldReader& reader) {
  const auto name = reader.optional_string("expert_dtype");
  if (!name) return std::nullopt;
  if (*name == "fp4") return ExpertDtype::Fp4;
  if (*name == "fp8") return ExpertDtype::Fp8;
  if (*name == "bf16" || *name == "bfloat16") return ExpertDtype::BF16;
  reader.fail_field("expert_dtype", "is '", *name, "': unknown expert dtype (expected fp4, fp8 or bf16)");
}

// `quantization_config` of the release and HuggingFace spellings: block-scaled fp8 for non-expert weights.
// NVIDIA ModelOpt exports say quant_method 'modelopt' and describe their formats in hf_quant_config.json; their
// tensors (dtypes and scale tensors) tell the loader each weight's format, so the config states none.
std::optional<WeightQuantization> parse_quantization_config(const FieldReader& reader,
                                                            std::optional<ExpertDtype>& expert_dtype) {
  const auto quant = reader.optional_object("quantization_config");
  if (!quant) return std::nullopt;
  const std::string method = quant->optional_string("quant_method").value_or("");
  if (method == "modelopt") return std::nullopt;
  if (method != "fp8")
    quant->fail_field("quant_method", "is '", method,
                      "': unsupported weight quantization (expected 'fp8' or 'modelopt')");
  if (const auto fmt = quant->optional_string("fmt"); fmt && *fmt != "e4m3")
    quant->fail_field("fmt", "is '", *fmt, "': unsupported fp8 format (expected 'e4m3')");
  WeightQuantization quantization{.block_rows = kReferenceWeightBlock, .block_cols = kReferenceWeightBlock};
  if (quant->has("weight_block_size")) {
    const json& block = quant->object().at("weight_block_size");
    if (!block.is_array() || block.size() != 2)
      quant->fail_field("weight_block_size", "must be a list of two integers, got ", block.dump());
    const auto sizes = quant->int_list("weight_block_size", block);
    quantization.block_rows = sizes[0];
    quantization.block_cols = sizes[1];
  }
  // Without scale_fmt the scales are plain fp32 (the -Base checkpoints).
  const auto scale_fmt = quant->optional_string("scale_fmt");
  if (!scale_fmt) {
    quantization.scale_format = ScaleFormat::Fp32;
  } else if (*scale_fmt == "ue8m0") {
    quantization.scale_format = ScaleFormat::Ue8m0;
  } else {
    quant->fail_field("scale_fmt", "is '", *scale_fmt, "': unknown scale format (expected 'ue8m0' or absent)");
  }
  // Some exports put expert_dtype inside quantization_config instead of at the top level.
  if (const auto nested = parse_expert_dtype(*quant)) {
    if (expert_dtype && *expert_dtype != *nested)
      quant->fail_field("expert_dtype", "is '", to_string(*nested), "' but the top-level 'expert_dtype' is '",
                        to_string(*expert_dtype), "'");
    expert_dtype = nested;
  }
  return quantization;
}

// A YaRN block as the release (`rope_scaling`) and HuggingFace (`rope_parameters.compress`) spell it; nullopt for
// rope type "default".
std::optional<YarnScaling> parse_yarn_block(const FieldReader& block) {
  const std::string type_key = block.has("rope_type") ? "rope_type" : "type";
  const std::string type = block.optional_string(type_key).value_or("default");
  if (type == "default") return std::nullopt;
  if (type != "yarn")
    block.fail_field(type_key, "is '", type, "': unsupported RoPE scaling (DeepSeek-V4 uses 'yarn' or none)");
  // DeepSeek-V4 applies no YaRN attention scale; HuggingFace pins it to 1 explicitly.
  if (const auto attention_factor = block.optional_number("attention_factor");
      attention_factor && *attention_factor != 1.0)
    block.fail_field("attention_factor", "is ", *attention_factor,
                     ": DeepSeek-V4 applies no YaRN attention scale (expected 1.0)");
  return YarnScaling{
      .factor = block.require_number("factor", "YaRN parameters"),
      .original_max_position = block.require_int64("original_max_position_embeddings", "YaRN parameters"),
      .beta_fast = block.number_or("beta_fast", 32.0),
      .beta_slow = block.number_or("beta_slow", 1.0)};
}

// Release and inference spellings: per-layer ratios; entries past num_layers belong to the MTP layers, which are
// sliding-window blocks (the reference indexes compress_ratios[n_layers + i] for MTP layer i).
void set_layers_from_ratios(ModelConfig& config, const FieldReader& reader, std::string_view layers_key,
                            std::string_view spelling_name) {
  const auto ratios = reader.int_list("compress_ratios", reader.require_array("compress_ratios", spelling_name));
  if (std::ssize(ratios) < config.num_layers)
    reader.fail_field("compress_ratios", "has ", ratios.size(), " entries but '", layers_key, "' is ",
                      config.num_layers, " (expected one per layer, plus one per MTP layer)");
  for (size_t i = config.num_layers; i < ratios.size(); ++i)
    if (ratios[i] != 0)
      reader.fail_field(indexed("compress_ratios", i), "is ", ratios[i], " but entries past '", layers_key, "' (",
                        config.num_layers, ") describe MTP layers, which are sliding-window only (expected 0)");
  config.compress_ratios.assign(ratios.begin(), ratios.begin() + config.num_layers);
  for (size_t i = 0; i < config.compress_ratios.size(); ++i) {
    const int ratio = config.compress_ratios[i];
    if (ratio != 0 && ratio < 2)
      reader.fail_field(indexed("compress_ratios", i), "is ", ratio, " (expected 0 for sliding-window or >= 2)");
    config.layer_kinds.push_back(ratio == 0                    ? LayerKind::SlidingWindow
                                 : ratio == kReferenceCsaRatio ? LayerKind::CompressedSparse
                                                               : LayerKind::HeavilyCompressed);
  }
}

void set_hash_layers_from_count(ModelConfig& config, const FieldReader& reader, std::string_view key,
                                std::string_view layers_key, std::string_view spelling_name) {
  const int count = reader.require_int(key, spelling_name);
  if (count < 0 || count > config.num_layers)
    reader.fail_field(key, "is ", count, " (expected 0..", config.num_layers, ", the value of '", layers_key, "')");
  config.hash_routed.assign(config.num_layers, false);
  std::fill_n(config.hash_routed.begin(), count, true);
}

void read_indexer(ModelConfig& config, const FieldReader& reader, std::string_view spelling_name) {
  // Required only where a CSA layer needs them.
  const bool needed = std::count(config.layer_kinds.begin(), config.layer_kinds.end(), LayerKind::CompressedSparse) > 0;
  const auto read = [&](std::string_view key) {
    return needed ? reader.require_int(key, spelling_name) : reader.int_or(key, 0);
  };
  config.indexer = {.num_heads = read("index_n_heads"), .head_dim = read("index_head_dim"), .topk = read("index_topk")};
}

bool any_compressed(const ModelConfig& config) {
  return std::any_of(config.compress_ratios.begin(), config.compress_ratios.end(), [](int r) { return r != 0; });
}

// Fields spelled the same way in the release and HuggingFace configs.
void read_transformers_common(ModelConfig& config, const FieldReader& reader, std::string_view spelling_name) {
  check_model_identity(reader);
  if (const auto kv_heads = reader.optional_int("num_key_value_heads"); kv_heads && *kv_heads != 1)
    reader.fail_field("num_key_value_heads", "is ", *kv_heads, ": DeepSeek-V4 has one shared KV head (expected 1)");
  if (const auto act = reader.optional_string("hidden_act"); act && *act != "silu")
    reader.fail_field("hidden_act", "is '", *act, "': DeepSeek-V4 experts use 'silu'");
  if (const auto method = reader.optional_string("topk_method"); method && *method != "noaux_tc")
    reader.fail_field("topk_method", "is '", *method, "': DeepSeek-V4 routes with 'noaux_tc' (bias-corrected top-k)");

  config.hidden_size = reader.require_int("hidden_size", spelling_name);
  config.vocab_size = reader.require_int("vocab_size", spelling_name);
  config.num_heads = reader.require_int("num_attention_heads", spelling_name);
  config.head_dim = reader.require_int("head_dim", spelling_name);
  config.q_lora_rank = reader.require_int("q_lora_rank", spelling_name);
  config.o_groups = reader.require_int("o_groups", spelling_name);
  config.o_lora_rank = reader.require_int("o_lora_rank", spelling_name);
  config.window_size = reader.require_int("sliding_window", spelling_name);
  config.max_position_embeddings = reader.require_int64("max_position_embeddings", spelling_name);

  config.moe = {.num_routed_experts = reader.require_int("n_routed_experts", spelling_name),
                .experts_per_token = reader.require_int("num_experts_per_tok", spelling_name),
                .num_shared_experts = reader.int_or("n_shared_experts", 1),
                .intermediate_size = reader.require_int("moe_intermediate_size", spelling_name),
                .scoring = parse_scoring(reader, "scoring_func"),
                .routed_scaling_factor = reader.require_number("routed_scaling_factor", spelling_name),
                .swiglu_limit = reader.require_number("swiglu_limit", spelling_name),
                .norm_topk_prob = reader.bool_or("norm_topk_prob", true)};
  config.mhc = {.hc_mult = reader.require_int("hc_mult", spelling_name),
                .sinkhorn_iters = reader.int_or("hc_sinkhorn_iters", 20),
                .eps = reader.number_or("hc_eps", 1e-6)};
  config.rms_norm_eps = reader.number_or("rms_norm_eps", 1e-6);
  config.num_mtp_layers = reader.int_or("num_nextn_predict_layers", 1);
  config.bos_token_id = reader.int_or("bos_token_id", 0);
  if (!reader.has("eos_token_id")) {
    config.eos_token_ids = {1};
  } else if (const json& eos = reader.object().at("eos_token_id"); eos.is_array()) {
    config.eos_token_ids = reader.int_list("eos_token_id", eos);
  } else {
    config.eos_token_ids = {reader.require_int("eos_token_id", spelling_name)};
  }
  config.tie_word_embeddings = reader.bool_or("tie_word_embeddings", false);
  config.expert_dtype = parse_expert_dtype(reader);
  config.weight_quantization = parse_quantization_config(reader, config.expert_dtype);
}

void read_release(ModelConfig& config, const FieldReader& reader) {
  constexpr std::string_view spelling_name = "DeepSeek release spelling";
  read_transformers_common(config, reader, spelling_name);
  config.num_layers = reader.require_int("num_hidden_layers", spelling_name);
  if (config.num_layers <= 0) reader.fail_field("num_hidden_layers", "is ", config.num_layers, " (expected > 0)");
  config.rope_head_dim = reader.require_int("qk_rope_head_dim", spelling_name);
  set_layers_from_ratios(config, reader, "num_hidden_layers", spelling_name);
  set_hash_layers_from_count(config, reader, "num_hash_layers", "num_hidden_layers", spelling_name);
  read_indexer(config, reader, spelling_name);
  config.rope_theta = reader.number_or("rope_theta", 10000.0);
  if (any_compressed(config)) config.compress_rope_theta = reader.require_number("compress_rope_theta", spelling_name);
  if (const auto scaling = reader.optional_object("rope_scaling")) config.yarn = parse_yarn_block(*scaling);
}

LayerKind parse_hf_layer_type(const FieldReader& reader, size_t index, const std::string& name) {
  if (name == kHfSlidingType) return LayerKind::SlidingWindow;
  if (name == kHfCsaType) return LayerKind::CompressedSparse;
  if (name == kHfHcaType) return LayerKind::HeavilyCompressed;
  reader.fail_field(indexed("layer_types", index), "is '", name, "': unknown layer type (expected ", kHfSlidingType,
                    ", ", kHfCsaType, " or ", kHfHcaType, ")");
}

void read_huggingface_layers(ModelConfig& config, const FieldReader& reader, std::string_view spelling_name) {
  const json& types_json = reader.require_array("layer_types", spelling_name);
  if (std::ssize(types_json) != config.num_layers)
    reader.fail_field("layer_types", "has ", types_json.size(), " entries but 'num_hidden_layers' is ",
                      config.num_layers, " (expected one per layer)");
  const auto types = reader.string_list("layer_types", types_json);
  for (size_t i = 0; i < types.size(); ++i) config.layer_kinds.push_back(parse_hf_layer_type(reader, i, types[i]));

  // compress_rates maps the two compressed layer types to their ratio; HuggingFace defaults to 4 and 128 and folds
  // the legacy top-level compress_rate_csa / compress_rate_hca into it.
  int csa_rate = 4;
  int hca_rate = 128;
  if (const auto rates = reader.optional_object("compress_rates")) {
    for (const auto& [key, value] : rates->object().items())
      if (key != kHfCsaType && key != kHfHcaType)
        rates->fail_field(key, "is not a compressed layer type (expected ", kHfCsaType, " or ", kHfHcaType, ")");
    csa_rate = rates->int_or(kHfCsaType, csa_rate);
    hca_rate = rates->int_or(kHfHcaType, hca_rate);
  }
  csa_rate = reader.int_or("compress_rate_csa", csa_rate);
  hca_rate = reader.int_or("compress_rate_hca", hca_rate);
  for (const LayerKind kind : config.layer_kinds)
    config.compress_ratios.push_back(kind == LayerKind::SlidingWindow      ? 0
                                     : kind == LayerKind::CompressedSparse ? csa_rate
                                                                           : hca_rate);

  const json& mlp_json = reader.require_array("mlp_layer_types", spelling_name);
  if (std::ssize(mlp_json) != config.num_layers)
    reader.fail_field("mlp_layer_types", "has ", mlp_json.size(), " entries but 'num_hidden_layers' is ",
                      config.num_layers, " (expected one per layer)");
  const auto mlp_types = reader.string_list("mlp_layer_types", mlp_json);
  for (size_t i = 0; i < mlp_types.size(); ++i) {
    if (mlp_types[i] != "hash_moe" && mlp_types[i] != "moe")
      reader.fail_field(indexed("mlp_layer_types", i), "is '", mlp_types[i],
                        "': unknown MoE type (expected hash_moe or moe)");
    config.hash_routed.push_back(mlp_types[i] == "hash_moe");
  }
}

// Two sources for one value (a top-level key and its rope_parameters copy) must agree.
double agreeing_number(const FieldReader& top, std::string_view top_key, const std::optional<FieldReader>& nested,
                       std::string_view nested_key, std::optional<double> fallback, std::string_view spelling_name) {
  const auto top_value = top.optional_number(top_key);
  const auto nested_value = nested ? nested->optional_number(nested_key) : std::nullopt;
  if (top_value && nested_value && *top_value != *nested_value)
    nested->fail_field(nested_key, "is ", *nested_value, " but '", top_key, "' is ", *top_value);
  if (nested_value) return *nested_value;
  if (top_value) return *top_value;
  if (fallback) return *fallback;
  return top.require_number(top_key, spelling_name);
}

void read_huggingface(ModelConfig& config, const FieldReader& reader) {
  constexpr std::string_view spelling_name = "HuggingFace spelling";
  read_transformers_common(config, reader, spelling_name);
  config.num_layers = reader.require_int("num_hidden_layers", spelling_name);
  if (config.num_layers <= 0) reader.fail_field("num_hidden_layers", "is ", config.num_layers, " (expected > 0)");
  read_huggingface_layers(config, reader, spelling_name);
  read_indexer(config, reader, spelling_name);

  // RoPE dims: partial_rotary_factor (= rope dims / head_dim); transformers also keeps qk_rope_head_dim.
  const auto factor = reader.optional_number("partial_rotary_factor");
  const auto rope_dims = reader.optional_int("qk_rope_head_dim");
  if (!factor && !rope_dims) reader.require("partial_rotary_factor", spelling_name);
  if (factor) {
    const double exact = *factor * config.head_dim;
    if (!(exact > 0) || std::abs(exact - std::round(exact)) > 1e-6)
      reader.fail_field("partial_rotary_factor", "is ", *factor, ": head_dim ", config.head_dim, " x factor = ", exact,
                        " is not a whole positive number of dims");
    config.rope_head_dim = static_cast<int>(std::lround(exact));
    if (rope_dims && *rope_dims != config.rope_head_dim)
      reader.fail_field("qk_rope_head_dim", "is ", *rope_dims, " but partial_rotary_factor x head_dim is ",
                        config.rope_head_dim);
  } else {
    config.rope_head_dim = *rope_dims;
  }

  // rope_parameters is {main: plain RoPE of sliding-window layers, compress: RoPE (+ YaRN) of compressed layers};
  // an unnested dict is the legacy form and holds the compressed layers' YaRN parameters.
  std::optional<FieldReader> main;
  std::optional<FieldReader> compress;
  if (const auto parameters = reader.optional_object("rope_parameters")) {
    if (parameters->has("main") || parameters->has("compress")) {
      main = parameters->optional_object("main");
      compress = parameters->optional_object("compress");
      if (!main) parameters->require("main", spelling_name);
      if (!compress) parameters->require("compress", spelling_name);
      const std::string main_type_key = main->has("rope_type") ? "rope_type" : "type";
      if (const auto type = main->optional_string(main_type_key); type && *type != "default")
        main->fail_field(main_type_key, "is '", *type,
                         "': sliding-window layers of DeepSeek-V4 use plain RoPE (expected 'default')");
      for (const auto* block : {&*main, &*compress})
        if (const auto f = block->optional_number("partial_rotary_factor");
            f && std::abs(*f * config.head_dim - config.rope_head_dim) > 1e-6)
          block->fail_field("partial_rotary_factor", "is ", *f, " but the model's RoPE dims are ",
                            config.rope_head_dim);
      config.yarn = parse_yarn_block(*compress);
    } else {
      config.yarn = parse_yarn_block(*parameters);
    }
  }
  config.rope_theta = agreeing_number(reader, "rope_theta", main, "rope_theta", 10000.0, spelling_name);
  if (any_compressed(config))
    config.compress_rope_theta =
        agreeing_number(reader, "compress_rope_theta", compress, "rope_theta", std::nullopt, spelling_name);
}

void read_inference(ModelConfig& config, const FieldReader& reader) {
  constexpr std::string_view spelling_name = "DeepSeek inference spelling";
  check_model_identity(reader);
  config.hidden_size = reader.require_int("dim", spelling_name);
  config.num_layers = reader.require_int("n_layers", spelling_name);
  if (config.num_layers <= 0) reader.fail_field("n_layers", "is ", config.num_layers, " (expected > 0)");
  config.vocab_size = reader.require_int("vocab_size", spelling_name);
  config.num_heads = reader.require_int("n_heads", spelling_name);
  config.head_dim = reader.require_int("head_dim", spelling_name);
  config.rope_head_dim = reader.require_int("rope_head_dim", spelling_name);
  config.q_lora_rank = reader.require_int("q_lora_rank", spelling_name);
  config.o_groups = reader.require_int("o_groups", spelling_name);
  config.o_lora_rank = reader.require_int("o_lora_rank", spelling_name);
  config.window_size = reader.require_int("window_size", spelling_name);
  set_layers_from_ratios(config, reader, "n_layers", spelling_name);
  set_hash_layers_from_count(config, reader, "n_hash_layers", "n_layers", spelling_name);
  read_indexer(config, reader, spelling_name);

  config.rope_theta = reader.number_or("rope_theta", 10000.0);
  if (any_compressed(config)) config.compress_rope_theta = reader.require_number("compress_rope_theta", spelling_name);
  // The reference applies YaRN exactly when original_seq_len > 0.
  if (const int64_t original = reader.optional_int("original_seq_len").value_or(0); original > 0)
    config.yarn = YarnScaling{.factor = reader.require_number("rope_factor", spelling_name),
                              .original_max_position = original,
                              .beta_fast = reader.number_or("beta_fast", 32.0),
                              .beta_slow = reader.number_or("beta_slow", 1.0)};
  // No max_position_embeddings here: YaRN's extended length is original x factor; without YaRN the run-time
  // max_seq_len is the only bound the file gives.
  if (reader.has("max_position_embeddings")) {
    config.max_position_embeddings = reader.require_int64("max_position_embeddings", spelling_name);
  } else if (config.yarn) {
    config.max_position_embeddings = static_cast<int64_t>(
        std::llround(static_cast<double>(config.yarn->original_max_position) * config.yarn->factor));
  } else {
    config.max_position_embeddings = reader.require_int64("max_seq_len", spelling_name);
  }

  const RouterScoring scoring = parse_scoring(reader, "score_func");
  config.moe = {.num_routed_experts = reader.require_int("n_routed_experts", spelling_name),
                .experts_per_token = reader.require_int("n_activated_experts", spelling_name),
                .num_shared_experts = reader.int_or("n_shared_experts", 1),
                .intermediate_size = reader.require_int("moe_inter_dim", spelling_name),
                .scoring = scoring,
                .routed_scaling_factor = reader.require_number("route_scale", spelling_name),
                .swiglu_limit = reader.require_number("swiglu_limit", spelling_name),
                // The reference renormalises the selected weights for every scoring but softmax.
                .norm_topk_prob = scoring != RouterScoring::Softmax};
  config.mhc = {.hc_mult = reader.require_int("hc_mult", spelling_name),
                .sinkhorn_iters = reader.int_or("hc_sinkhorn_iters", 20),
                .eps = reader.number_or("hc_eps", 1e-6)};
  config.rms_norm_eps = reader.number_or("norm_eps", 1e-6);
  config.num_mtp_layers = reader.int_or("n_mtp_layers", 1);
  // Token ids come from the tokenizer in DeepSeek's generate.py; these are DeepSeek-V4's (dsv4-model.md §8).
  config.bos_token_id = 0;
  config.eos_token_ids = {1};
  config.tie_word_embeddings = false;  // the reference always has a separate head

  // dtype and scale_dtype default as in ModelArgs (fp8 weights, e8m0 scales); the block is the reference's 128.
  const std::string dtype = reader.optional_string("dtype").value_or("fp8");
  if (dtype == "fp8") {
    const std::string scale_dtype = reader.optional_string("scale_dtype").value_or("fp8");
    if (scale_dtype != "fp8" && scale_dtype != "fp32")
      reader.fail_field("scale_dtype", "is '", scale_dtype, "': unknown scale dtype (expected fp8 or fp32)");
    config.weight_quantization =
        WeightQuantization{.block_rows = kReferenceWeightBlock,
                           .block_cols = kReferenceWeightBlock,
                           .scale_format = scale_dtype == "fp8" ? ScaleFormat::Ue8m0 : ScaleFormat::Fp32};
  } else if (dtype != "bf16") {
    reader.fail_field("dtype", "is '", dtype, "': unknown weight dtype (expected fp8 or bf16)");
  }
  if (const auto scale_fmt = reader.optional_string("scale_fmt"); scale_fmt && *scale_fmt != "ue8m0")
    reader.fail_field("scale_fmt", "is '", *scale_fmt, "': unknown scale format (expected 'ue8m0' or null)");
  config.expert_dtype = parse_expert_dtype(reader);
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& config_json, std::string_view origin) {
  if (!config_json.is_object())
    fail(origin, ": a model config must be a JSON object, got ", json_type_name(config_json));
  ModelConfig config;
  config.origin = std::string(origin);
  config.source_format = detect_spelling(config_json, origin);
  const FieldReader reader(config_json, config.origin);
  switch (config.source_format) {
    case ConfigSpelling::DeepSeekRelease: read_release(config, reader); break;
    case ConfigSpelling::HuggingFace: read_huggingface(config, reader); break;
    case ConfigSpelling::DeepSeekInference: read_inference(config, reader); break;
  }
  config.validate();
  return config;
}

ModelConfig ModelConfig::from_file(const std::filesystem::path& path) {
  std::ifstream file(path);
  if (!file) fail(path.string(), ": cannot open model config");
  json parsed;
  try {
    parsed = json::parse(file);
  } catch (const json::parse_error& error) {
    fail(path.string(), ": invalid JSON: ", error.what());
  }
  return from_json(parsed, path.string());
}

ModelConfig ModelConfig::from_dir(const std::filesystem::path& dir) {
  const auto release = dir / "config.json";
  if (std::filesystem::is_regular_file(release)) return from_file(release);
  const auto inference = dir / "inference" / "config.json";
  if (std::filesystem::is_regular_file(inference)) return from_file(inference);
  fail(dir.string(), ": no model config (looked for ", release.string(), " and ", inference.string(), ")");
}

void ModelConfig::validate() const {
  const auto key = [&](std::string_view engine_name) { return spelled(engine_name, source_format); };
  const auto require = [&](bool condition, std::string_view engine_name, auto&&... parts) {
    if (!condition) fail(origin, ": field '", key(engine_name), "' ", parts...);
  };
  const auto require_positive = [&](auto value, std::string_view engine_name) {
    require(value > 0, engine_name, "is ", value, " (expected > 0)");
  };

  require_positive(hidden_size, "hidden_size");
  require_positive(num_layers, "num_layers");
  require_positive(vocab_size, "vocab_size");
  require_positive(num_heads, "num_heads");
  require_positive(head_dim, "head_dim");
  require_positive(q_lora_rank, "q_lora_rank");
  require_positive(o_groups, "o_groups");
  require_positive(o_lora_rank, "o_lora_rank");
  require_positive(window_size, "window_size");
  require_positive(max_position_embeddings, "max_position_embeddings");
  require(num_heads % o_groups == 0, "o_groups", "is ", o_groups, ": '", key("num_heads"), "' (", num_heads,
          ") must be divisible by it");
  require(rope_head_dim > 0 && rope_head_dim <= head_dim && rope_head_dim % 2 == 0, "rope_head_dim", "gives ",
          rope_head_dim, " RoPE dims (expected even, > 0 and <= head_dim ", head_dim, ")");

  const auto layer_count = static_cast<size_t>(num_layers);
  require(layer_kinds.size() == layer_count, "layer_kinds", "gives ", layer_kinds.size(), " layer kinds for ",
          num_layers, " layers");
  require(compress_ratios.size() == layer_count, "compress_ratios", "gives ", compress_ratios.size(),
          " compress ratios for ", num_layers, " layers");
  require(hash_routed.size() == layer_count, "hash_routed", "gives ", hash_routed.size(), " MoE routing kinds for ",
          num_layers, " layers");
  for (size_t layer = 0; layer < layer_count; ++layer) {
    const int ratio = compress_ratios[layer];
    if (layer_kinds[layer] == LayerKind::SlidingWindow)
      require(ratio == 0, "compress_ratios", "gives layer ", layer, " (sliding-window) ratio ", ratio, " (expected 0)");
    else
      require(ratio >= 2, "compress_ratios", "gives layer ", layer, " (", to_string(layer_kinds[layer]), ") ratio ",
              ratio, " (expected >= 2)");
  }

  const bool has_csa = num_layers_of_kind(LayerKind::CompressedSparse) > 0;
  if (has_csa) {
    require(indexer.num_heads > 0, "index_n_heads", "is ", indexer.num_heads,
            " (expected > 0: CSA layers need an indexer)");
    require(indexer.head_dim >= rope_head_dim && indexer.head_dim > 0, "index_head_dim", "is ", indexer.head_dim,
            " (expected > 0 and >= the ", rope_head_dim, " RoPE dims)");
    require(indexer.topk > 0, "index_topk", "is ", indexer.topk, " (expected > 0: CSA layers need an indexer)");
  }
  require(rope_theta > 0, "rope_theta", "is ", rope_theta, " (expected > 0)");
  if (any_compressed(*this))
    require(compress_rope_theta > 0, "compress_rope_theta", "is ", compress_rope_theta,
            " (expected > 0: compressed layers use it)");
  if (yarn) {
    require(yarn->factor >= 1.0, "yarn.factor", "is ", yarn->factor, " (expected >= 1)");
    require(yarn->original_max_position > 0, "yarn.original_max_position", "is ", yarn->original_max_position,
            " (expected > 0)");
    require(yarn->beta_slow > 0 && yarn->beta_fast > yarn->beta_slow, "yarn.beta_fast", "is ", yarn->beta_fast,
            " and beta_slow is ", yarn->beta_slow, " (expected beta_fast > beta_slow > 0)");
  }

  require_positive(moe.num_routed_experts, "moe.num_routed_experts");
  require(moe.experts_per_token > 0 && moe.experts_per_token <= moe.num_routed_experts, "moe.experts_per_token", "is ",
          moe.experts_per_token, " (expected 1..", moe.num_routed_experts, ", the number of routed experts)");
  require(moe.num_shared_experts >= 0, "moe.num_shared_experts", "is ", moe.num_shared_experts, " (expected >= 0)");
  require_positive(moe.intermediate_size, "moe.intermediate_size");
  require_positive(moe.routed_scaling_factor, "moe.routed_scaling_factor");
  require(moe.swiglu_limit >= 0, "moe.swiglu_limit", "is ", moe.swiglu_limit, " (expected >= 0; 0 = no clamp)");

  require_positive(mhc.hc_mult, "mhc.hc_mult");
  require_positive(mhc.sinkhorn_iters, "mhc.sinkhorn_iters");
  require_positive(mhc.eps, "mhc.eps");
  require_positive(rms_norm_eps, "rms_norm_eps");
  require(num_mtp_layers >= 0, "num_mtp_layers", "is ", num_mtp_layers, " (expected >= 0)");

  require(bos_token_id >= 0 && bos_token_id < vocab_size, "bos_token_id", "is ", bos_token_id, " (expected 0..",
          vocab_size - 1, ")");
  require(!eos_token_ids.empty(), "eos_token_id", "is empty");
  for (const int eos : eos_token_ids)
    require(eos >= 0 && eos < vocab_size, "eos_token_id", "has ", eos, " (expected 0..", vocab_size - 1, ")");
  if (weight_quantization)
    require(weight_quantization->block_rows > 0 && weight_quantization->block_cols > 0, "weight_quantization",
            "gives block [", weight_quantization->block_rows, ", ", weight_quantization->block_cols,
            "] (expected positive sizes)");
}

LayerKind ModelConfig::layer_kind(int layer) const {
  check(layer >= 0 && layer < std::ssize(layer_kinds), origin, ": layer ", layer, " out of range (", num_layers,
        " layers)");
  return layer_kinds[layer];
}

int ModelConfig::compress_ratio(int layer) const {
  check(layer >= 0 && layer < std::ssize(compress_ratios), origin, ": layer ", layer, " out of range (", num_layers,
        " layers)");
  return compress_ratios[layer];
}

bool ModelConfig::is_hash_routed(int layer) const {
  check(layer >= 0 && layer < std::ssize(hash_routed), origin, ": layer ", layer, " out of range (", num_layers,
        " layers)");
  return hash_routed[layer];
}

int ModelConfig::num_layers_of_kind(LayerKind kind) const {
  return static_cast<int>(std::count(layer_kinds.begin(), layer_kinds.end(), kind));
}

bool ModelConfig::operator==(const ModelConfig& other) const {
  const auto model_fields = [](const ModelConfig& c) {
    return std::tie(c.hidden_size, c.num_layers, c.vocab_size, c.num_heads, c.head_dim, c.rope_head_dim, c.q_lora_rank,
                    c.o_groups, c.o_lora_rank, c.window_size, c.layer_kinds, c.compress_ratios, c.hash_routed,
                    c.rope_theta, c.compress_rope_theta, c.yarn, c.max_position_embeddings, c.indexer, c.moe, c.mhc,
                    c.rms_norm_eps, c.num_mtp_layers, c.bos_token_id, c.eos_token_ids, c.tie_word_embeddings,
                    c.weight_quantization, c.expert_dtype);
  };
  return model_fields(*this) == model_fields(other);
}

json ModelConfig::summary_json() const {
  json kinds = json::array();
  for (const LayerKind kind : layer_kinds) kinds.push_back(to_string(kind));
  json hash_layers = json::array();
  for (int layer = 0; layer < std::ssize(hash_routed); ++layer)
    if (hash_routed[layer]) hash_layers.push_back(layer);

  json rope = {
      {"rope_head_dim", rope_head_dim}, {"rope_theta", rope_theta}, {"compress_rope_theta", compress_rope_theta}};
  rope["yarn"] = yarn ? json{{"factor", yarn->factor},
                             {"original_max_position", yarn->original_max_position},
                             {"beta_fast", yarn->beta_fast},
                             {"beta_slow", yarn->beta_slow}}
                      : json(nullptr);
  json quantization = {
      {"weights", weight_quantization
                      ? json{{"format", "fp8_e4m3"},
                             {"block", {weight_quantization->block_rows, weight_quantization->block_cols}},
                             {"scale_format", to_string(weight_quantization->scale_format)}}
                      : json("unquantized")},
      {"experts", expert_dtype ? json(to_string(*expert_dtype)) : json(nullptr)}};

  return {
      {"source_format", to_string(source_format)},
      {"origin", origin},
      {"hidden_size", hidden_size},
      {"num_layers", num_layers},
      {"vocab_size", vocab_size},
      {"attention",
       {{"num_heads", num_heads},
        {"head_dim", head_dim},
        {"q_lora_rank", q_lora_rank},
        {"o_groups", o_groups},
        {"o_lora_rank", o_lora_rank},
        {"window_size", window_size}}},
      {"layers",
       {{"kinds", kinds},
        {"compress_ratios", compress_ratios},
        {"hash_routed_layers", hash_layers},
        {"counts",
         {{"sliding_window", num_layers_of_kind(LayerKind::SlidingWindow)},
          {"csa", num_layers_of_kind(LayerKind::CompressedSparse)},
          {"hca", num_layers_of_kind(LayerKind::HeavilyCompressed)}}}}},
      {"rope", rope},
      {"max_position_embeddings", max_position_embeddings},
      {"indexer", {{"num_heads", indexer.num_heads}, {"head_dim", indexer.head_dim}, {"topk", indexer.topk}}},
      {"moe",
       {{"num_routed_experts", moe.num_routed_experts},
        {"experts_per_token", moe.experts_per_token},
        {"num_shared_experts", moe.num_shared_experts},
        {"intermediate_size", moe.intermediate_size},
        {"scoring", to_string(moe.scoring)},
        {"routed_scaling_factor", moe.routed_scaling_factor},
        {"swiglu_limit", moe.swiglu_limit},
        {"norm_topk_prob", moe.norm_topk_prob}}},
      {"mhc", {{"hc_mult", mhc.hc_mult}, {"sinkhorn_iters", mhc.sinkhorn_iters}, {"eps", mhc.eps}}},
      {"rms_norm_eps", rms_norm_eps},
      {"num_mtp_layers", num_mtp_layers},
      {"bos_token_id", bos_token_id},
      {"eos_token_ids", eos_token_ids},
      {"tie_word_embeddings", tie_word_embeddings},
      {"quantization", quantization},
  };
}

}  // namespace dsv4
