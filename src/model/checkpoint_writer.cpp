#include "model/checkpoint_writer.hpp"

#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"
#include "io/safetensors_writer.hpp"

#include <filesystem>
#include <fstream>

namespace dsv4 {

std::string_view to_string(CheckpointLayout layout) {
  switch (layout) {
    case CheckpointLayout::DeepSeekRelease: return "DeepSeek release";
    case CheckpointLayout::HuggingFace: return "HuggingFace";
    case CheckpointLayout::ModelOptNvfp4: return "ModelOpt NVFP4";
  }
  return "unknown";
}

std::string stored_tensor_name(const std::string& canonical, CheckpointLayout layout) {
  if (layout != CheckpointLayout::HuggingFace) return canonical;
  if (canonical == "embed.weight") return "model.embed_tokens.weight";
  if (canonical == "head.weight") return "lm_head.weight";
  if (canonical.starts_with("hc_head_")) return "model.hc_head.hc_" + canonical.substr(8);
  std::string name = "model." + canonical;
  const std::string kv_norm = ".attn.kv_norm.";
  if (size_t at = name.find(kv_norm); at != std::string::npos) name.replace(at, kv_norm.size(), ".attn.norm.");
  return name;
}

namespace {

std::vector<uint16_t> to_bf16(const std::vector<float>& values) {
  std::vector<uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = float_to_bf16(values[i]);
  return out;
}

// Stores one slot in the layout's format.
void add_slot(SafetensorsWriter& writer, const WeightSlot& slot, const std::vector<float>& values,
              CheckpointLayout layout) {
  const std::string name = stored_tensor_name(slot.name, layout);
  const std::vector<int64_t>& shape = slot.shape;
  auto add_owned = [&](std::string tensor, DType dtype, std::vector<int64_t> dims, const void* data, size_t bytes) {
    writer.add(std::move(tensor), dtype, std::move(dims), data, bytes);
  };
  if (slot.kind == SlotKind::ExpertTable) {
    std::vector<int64_t> ids(values.begin(), values.end());
    return add_owned(name, DType::I64, shape, ids.data(), ids.size() * 8);
  }
  ReleaseStorage storage = slot.release_storage;
  if (layout == CheckpointLayout::HuggingFace) storage = ReleaseStorage::F32;
  const std::string base = name.substr(0, name.size() - std::string_view(".weight").size());
  switch (storage) {
    case ReleaseStorage::F32: return add_owned(name, DType::F32, shape, values.data(), values.size() * 4);
    case ReleaseStorage::BF16: {
      std::vector<uint16_t> bits = to_bf16(values);
      return add_owned(name, DType::BF16, shape, bits.data(), bits.size() * 2);
    }
    case ReleaseStorage::FP8_BLOCK128: {
      OwnedQuantizedMatrix q = quantize_fp8_block128(values.data(), shape[0], shape[1], ScaleType::E8M0);
      add_owned(name, DType::F8_E4M3, shape, q.matrix.data, q.matrix.data_bytes());
      return add_owned(base + ".scale", DType::F8_E8M0, {(shape[0] + 127) / 128, (shape[1] + 127) / 128},
                       q.matrix.scales, q.matrix.scale_bytes());
    }
    case ReleaseStorage::MXFP4: {
      const std::vector<int64_t> packed{shape[0], (shape[1] + 1) / 2};
      if (layout == CheckpointLayout::ModelOptNvfp4) {
        OwnedQuantizedMatrix q = quantize_nvfp4(values.data(), shape[0], shape[1]);
        const float input_scale = 1.0f;
        add_owned(name, DType::U8, packed, q.matrix.data, q.matrix.data_bytes());
        add_owned(base + ".weight_scale", DType::F8_E4M3, {shape[0], (shape[1] + 15) / 16}, q.matrix.scales,
                  q.matrix.scale_bytes());
        add_owned(base + ".weight_scale_2", DType::F32, {}, &q.matrix.global_scale, 4);
        return add_owned(base + ".input_scale", DType::F32, {}, &input_scale, 4);
      }
      OwnedQuantizedMatrix q = quantize_mxfp4(values.data(), shape[0], shape[1]);
      add_owned(name, DType::I8, packed, q.matrix.data, q.matrix.data_bytes());
      return add_owned(base + ".scale", DType::F8_E8M0, {shape[0], (shape[1] + 31) / 32}, q.matrix.scales,
                       q.matrix.scale_bytes());
    }
    case ReleaseStorage::I64: break;
  }
  fail("internal: slot ", slot.name, " has no storage rule");
}

}  // namespace

void write_checkpoint(const std::string& dir, const ModelConfig& config, const nlohmann::json& config_json,
                      const SlotValues& values, const CheckpointWriteOptions& options) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  SafetensorsWriter writer;
  std::vector<float> buffer;
  for (const WeightSlot& slot : weight_slots(config)) {
    if (slot.optional && !options.include_mtp) continue;
    int64_t numel = 1;
    for (int64_t extent : slot.shape) numel *= extent;
    buffer.assign(size_t(numel), 0.0f);
    values(slot, buffer.data());
    add_slot(writer, slot, buffer, options.layout);
  }
  writer.set_metadata("format", "pt");
  if (options.max_shard_bytes > 0)
    writer.write_sharded(dir, options.max_shard_bytes);
  else
    writer.write((fs::path(dir) / "model.safetensors").string());
  std::ofstream(fs::path(dir) / "config.json") << config_json.dump(2) << "\n";
  if (options.layout == CheckpointLayout::ModelOptNvfp4) {
    nlohmann::json quant = {{"producer", {{"name", "modelopt"}}},
                            {"quantization", {{"quant_algo", "NVFP4"}, {"group_size", 16}}}};
    std::ofstream(fs::path(dir) / "hf_quant_config.json") << quant.dump(2) << "\n";
  }
}

}  // namespace dsv4
