// Loads a checkpoint directory (DeepSeek release, HuggingFace, or ModelOpt NVFP4 layout) into ModelWeights:
// every tensor name is canonicalised (io/checkpoint_names.hpp), every slot the config implies is filled with the
// stored format kept, and each shape is checked against the config. Problems are collected, not thrown one by
// one, so `dsv4 inspect` can list every missing, unexpected or malformed tensor at once.
#pragma once

#include "io/model_config.hpp"
#include "io/tensor_store.hpp"
#include "model/model_weights.hpp"

#include <map>
#include <string>
#include <vector>

namespace dsv4 {

struct CheckpointIssue {
  enum class Kind { Missing, Unexpected, BadShape, BadFormat };
  Kind kind;
  std::string tensor;   // canonical name of the slot (or stored name, for unexpected tensors)
  std::string message;  // what is wrong, with the file where one is involved
};

std::string_view to_string(CheckpointIssue::Kind kind);

// Parameters and bytes held per stored format, over every matrix and vector slot.
struct FormatTotals {
  int64_t tensors = 0;
  int64_t parameters = 0;
  size_t bytes = 0;
};

struct LoadedCheckpoint {
  ModelConfig config;
  TensorStore store;
  ModelWeights weights;
  std::string layout;  // "DeepSeek release", "HuggingFace", "ModelOpt NVFP4"
  std::vector<CheckpointIssue> issues;
  std::map<std::string, FormatTotals> totals;  // keyed by format name ("fp8_block128", "mxfp4", "f32", "i32"...)
  std::vector<std::string> ignored;            // tensors read but unused by design (e.g. ModelOpt input scales)

  // Loadable when no slot is missing, malformed or mis-shaped; unexpected tensors alone are reported only.
  bool loadable() const;
  // Throws dsv4::Error listing the issues when not loadable.
  void require_loadable() const;
  // Bytes of the weights as held in memory (stored formats + fp32 copies of vectors).
  size_t weight_bytes() const;
};

// Reads the config from `dir` (any spelling) and the tensors of the directory. Throws dsv4::Error only for problems
// that stop everything (no config, unreadable or corrupt safetensors); slot problems land in `issues`.
LoadedCheckpoint load_checkpoint(const std::string& dir);

}  // namespace dsv4
