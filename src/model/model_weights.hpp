// The model's weights by slot (dsv4-model.md §6), whatever layout they were loaded from. Matrices keep their
// stored format (QuantizedMatrix borrows the mmapped bytes); vectors and other small parameters are held as fp32.
#pragma once

#include "core/quantized_matrix.hpp"

#include <optional>
#include <vector>

namespace dsv4 {

struct CompressorWeights {
  QuantizedMatrix wkv;       // [coff·c, d]
  QuantizedMatrix wgate;     // [coff·c, d]
  std::vector<float> ape;    // [ratio, coff·c] position bias
  std::vector<float> norm;   // [c]
};

struct IndexerWeights {
  QuantizedMatrix wq_b;          // [index_heads·index_head_dim, q_lora_rank]
  QuantizedMatrix weights_proj;  // [index_heads, d]
  CompressorWeights compressor;  // c = index_head_dim, ratio 4 (overlapping)
};

struct AttentionWeights {
  QuantizedMatrix wq_a;      // [q_lora_rank, d]
  std::vector<float> q_norm; // [q_lora_rank]
  QuantizedMatrix wq_b;      // [H·D, q_lora_rank]
  QuantizedMatrix wkv;       // [D, d]
  std::vector<float> kv_norm;// [D]
  QuantizedMatrix wo_a;      // [G·o_lora_rank, H·D/G]: G independent [o_lora_rank, H·D/G] blocks
  QuantizedMatrix wo_b;      // [d, G·o_lora_rank]
  std::vector<float> sink;   // [H]
  std::optional<CompressorWeights> compressor;  // CSA and HCA layers
  std::optional<IndexerWeights> indexer;        // CSA layers
};

struct ExpertWeights {
  QuantizedMatrix w1;  // gate [I, d]
  QuantizedMatrix w2;  // down [d, I]
  QuantizedMatrix w3;  // up   [I, d]
};

struct MoeWeights {
  QuantizedMatrix gate;             // router [E, d]
  std::vector<float> gate_bias;     // [E]; empty on hash-routed layers
  std::vector<int32_t> tid2eid;     // [vocab, top_k]; hash-routed layers only
  std::vector<ExpertWeights> experts;
  ExpertWeights shared;
};

struct HyperConnectionWeights {
  QuantizedMatrix fn;         // [(2+n)·n, n·d] (hc_head: [n, n·d]), fp32
  std::vector<float> base;    // [(2+n)·n] (hc_head: [n])
  std::vector<float> scale;   // [3] (hc_head: [1])
};

struct BlockWeights {
  std::vector<float> attn_norm;  // [d]
  std::vector<float> ffn_norm;   // [d]
  HyperConnectionWeights hc_attn, hc_ffn;
  AttentionWeights attn;
  MoeWeights ffn;
};

// Multi-token prediction module: a sliding-window block plus its own input projections and head collapse.
struct MtpWeights {
  BlockWeights block;
  QuantizedMatrix e_proj, h_proj;  // [d, d]
  std::vector<float> enorm, hnorm, norm;
  HyperConnectionWeights hc_head;
};

struct ModelWeights {
  QuantizedMatrix embed;     // [vocab, d]
  QuantizedMatrix head;      // [vocab, d]
  std::vector<float> norm;   // [d]
  HyperConnectionWeights hc_head;
  std::vector<BlockWeights> layers;
  std::vector<MtpWeights> mtp;  // empty when the checkpoint carries none
};

}  // namespace dsv4
