// Every weight slot a ModelConfig implies: canonical (DeepSeek release) name, logical shape, and the storage the
// DeepSeek release uses for it (dsv4-model.md §6.1). The loader fills ModelWeights from this list, and checkpoint
// writers (tests, fixtures, conversion) produce tensors from it, so names and shapes are stated in one place.
#pragma once

#include "io/model_config.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace dsv4 {

enum class SlotKind {
  Matrix,       // [rows, cols], consumed by linear ops in any stored format
  Vector,       // a small parameter held as fp32 (shape given; numel is what is checked)
  ExpertTable,  // tid2eid: integer expert ids [vocab, top_k]
};

// How the DeepSeek release stores a slot.
enum class ReleaseStorage { BF16, F32, FP8_BLOCK128, MXFP4, I64 };

struct WeightSlot {
  std::string name;  // canonical, e.g. "layers.2.attn.indexer.wq_b.weight"
  SlotKind kind;
  std::vector<int64_t> shape;
  ReleaseStorage release_storage;
  bool optional = false;  // MTP modules: absent from transformers' saves
};

// In a fixed order: top level, then each layer, then the MTP modules.
std::vector<WeightSlot> weight_slots(const ModelConfig& config);

}  // namespace dsv4
