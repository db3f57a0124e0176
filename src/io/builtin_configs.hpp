// Model configs built into the binary (V4-Flash and V4-Pro as DeepSeek releases them) and the helpers benchmarks use
// to pick a config by name or path and to keep only the first layers of a model.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "io/model_config.hpp"

namespace dsv4 {

// "flash", "pro".
std::vector<std::string_view> builtin_config_names();

// The built-in config of that name, parsed and validated; nullopt for an unknown name.
std::optional<ModelConfig> builtin_config(std::string_view name);

// A built-in name, a config.json path or a checkpoint directory (config.json or inference/config.json). Throws
// naming `spec` when it is none of these, or the file's error when it does not parse.
ModelConfig resolve_model_config(std::string_view spec);

// The model cut to its first `layers` main layers: each keeps its kind (SWA / CSA / HCA), compress ratio and
// routing (hash or scored) from `config`; the MTP layers are dropped. Throws unless 1 <= layers <= num_layers.
ModelConfig first_layers(const ModelConfig& config, int layers);

// "4 layers: 2 SWA, 1 CSA, 1 HCA; 3 hash-routed".
std::string describe_layer_kinds(const ModelConfig& config);

}  // namespace dsv4
