// Writes a checkpoint directory in one of the layouts the loader reads, from fp32 values per weight slot:
// - DeepSeekRelease: release names and storage (fp8 e4m3 + e8m0 128x128 scales for projections, MXFP4 routed
//   experts as I8 + e8m0 per 32, bf16/fp32 small tensors, int64 tid2eid);
// - HuggingFace: transformers' file names (`model.` prefix, `embed_tokens`, `hc_head.hc_fn`, `attn.norm`), fp32;
// - ModelOptNvfp4: the release with routed experts re-encoded as NVFP4 (U8 + e4m3 per 16 + fp32 global + input scale).
// Tests and fixtures build tiny checkpoints with it; a conversion command can reuse it.
#pragma once

#include "io/model_config.hpp"
#include "model/weight_slots.hpp"

#include <nlohmann/json.hpp>

#include <functional>
#include <string>

namespace dsv4 {

enum class CheckpointLayout { DeepSeekRelease, HuggingFace, ModelOptNvfp4 };

std::string_view to_string(CheckpointLayout layout);

// Fills `values` (numel of slot.shape floats, row-major) for one slot. For ExpertTable slots the values are expert
// ids (integers stored as float).
using SlotValues = std::function<void(const WeightSlot& slot, float* values)>;

struct CheckpointWriteOptions {
  CheckpointLayout layout = CheckpointLayout::DeepSeekRelease;
  size_t max_shard_bytes = 0;  // 0: one model.safetensors; else shards + model.safetensors.index.json
  bool include_mtp = true;     // write the optional MTP slots (transformers' saves have none)
};

// Writes `config_json` as config.json and every slot of `config` (which must describe the same model).
void write_checkpoint(const std::string& dir, const ModelConfig& config, const nlohmann::json& config_json,
                      const SlotValues& values, const CheckpointWriteOptions& options);

// The stored name of a canonical weight name in a layout (the inverse of canonicalize_tensor_name).
std::string stored_tensor_name(const std::string& canonical, CheckpointLayout layout);

}  // namespace dsv4
