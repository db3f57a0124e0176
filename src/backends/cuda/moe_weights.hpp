// One MoE layer's weights on the device (dsv4-model.md §4): the router, its selection bias or hash table, every
// routed expert's w1/w3/w2 and the shared expert (uploaded here in one allocation, or borrowed from the model's
// upload), plus a device array of the experts' DeviceMatrixViews so that kernels pick an expert by id without the
// host (the routing decides on the device).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "backends/cuda/weight_upload.hpp"
#include "model/model_weights.hpp"

namespace dsv4::cuda {

// The layer's hyper-parameters (config.json); the same for every MoE layer of a model.
struct MoeConfig {
  int64_t hidden = 0;        // d
  int64_t intermediate = 0;  // I (moe_intermediate_size), routed and shared
  int64_t experts = 0;       // E (n_routed_experts)
  int64_t top_k = 6;         // num_experts_per_tok
  float routed_scaling_factor = 1.0f;
  float swiglu_limit = 10.0f;
};

// Throws naming the field unless the config is usable (positive sizes, 1 <= top_k <= experts <= kMoeMaxExperts).
void check_moe_config(const MoeConfig& config);

// One expert's three matrices. Index E of the device array is the shared expert.
struct MoeExpertView {
  DeviceMatrixView w1;  // gate [I, d]
  DeviceMatrixView w3;  // up   [I, d]
  DeviceMatrixView w2;  // down [d, I]
};

// Rewrites the data of an fp4 expert matrix (MXFP4, NVFP4; other formats are left alone) in place into the MoE
// kernels' DEVICE layout (weight_tile_mma.cuh Fp4Layout: each 32-bit word's bits moved so that every bf16 pair of
// the decode is one rotation and one mask), asynchronously on `stream`. Every expert upload does it once:
// upload_model_weights and make_synthetic_weights (write_expert_device_layout), DeviceMoeWeights' own uploads; the
// kernels read only that layout (the checkpoint and host bytes never change). Throws naming `what` unless the rows
// are whole, 4-byte aligned words.
void write_fp4_device_layout(const DeviceMatrixView& w, cudaStream_t stream, std::string_view what);

// What a synthetic layer is made of (benchmarks): formats only, the bytes are random valid codes.
struct MoeSyntheticSpec {
  WeightFormat router_format = WeightFormat::BF16;  // BF16 or F32
  WeightFormat routed_format = WeightFormat::MXFP4;
  WeightFormat shared_format = WeightFormat::FP8_BLOCK128;
  bool hashed = false;  // hash routing (tid2eid of `vocab` rows) instead of a selection bias
  int64_t vocab = 0;
};

class DeviceMoeWeights {
 public:
  // Checks the host layer against `config` (every routed expert must share one format, scale type and the shapes
  // [I, d] / [I, d] / [d, I]; the error names the expert otherwise) and uploads it into one allocation (from
  // `pool` when given). `what` names the layer in errors ("layer 3 ffn").
  DeviceMoeWeights(const MoeWeights& host, const MoeConfig& config, std::string_view what,
                   DeviceAllocator* pool = nullptr);

  // Borrows a layer already on the device (upload_model_weights, make_synthetic_weights: its fp4 experts in the
  // DEVICE layout), with the same checks, and publishes only the table of views; `uploaded` must outlive this object.
  DeviceMoeWeights(const device_weights::Moe& uploaded, const MoeConfig& config, std::string_view what);

  // A layer of random weights generated on the device (no host copy of the experts): valid codes of each format
  // with scales that keep activations O(1); a random router and bias, or a random hash table. Deterministic in seed.
  static DeviceMoeWeights synthetic(const MoeConfig& config, const MoeSyntheticSpec& spec, uint64_t seed);

  const MoeConfig& config() const { return config_; }
  const DeviceMatrixView& router() const { return router_; }
  const float* bias() const { return bias_; }        // [E] on the device; nullptr on hash layers
  const int32_t* tid2eid() const { return tid2eid_; }  // [vocab, top_k] on the device; nullptr on scored layers
  int64_t vocab() const { return vocab_; }
  bool hashed() const { return tid2eid_ != nullptr; }
  // [E + 1] views on the device; [E] is the shared expert.
  const MoeExpertView* device_experts() const { return device_views_.as<MoeExpertView>(); }
  // The same views on the host (byte accounting, launch checks).
  const std::vector<MoeExpertView>& experts() const { return host_views_; }
  WeightFormat routed_format() const { return host_views_.front().w1.format; }
  WeightFormat shared_format() const { return host_views_.back().w1.format; }
  // Whether the decode kernels may stream every expert matrix through shared memory (moe_streamed_tiles_apply).
  bool streamed_tiles() const { return streamed_tiles_; }
  // [E + 1][w1, w3, w2] tensor maps on the device for the decode kernels (null unless streamed_tiles()).
  const tile::stream::StreamMaps* stream_maps() const {
    return streamed_tiles_ ? stream_maps_.as<tile::stream::StreamMaps>() : nullptr;
  }

  DeviceMoeWeights(DeviceMoeWeights&&) noexcept = default;
  DeviceMoeWeights& operator=(DeviceMoeWeights&&) noexcept = default;

 private:
  DeviceMoeWeights() = default;
  void check_routing_tables(int64_t tid2eid_entries, int64_t bias_entries, const std::string& layer) const;
  // Uploads the view table and checks on the device what the kernels trust (MXFP4 scale range, hash-table entries;
  // throws naming the first offender).
  void publish_views(const std::string& what);

  MoeConfig config_;
  DeviceBuffer arena_;         // owned storage: every matrix's data and scales, the bias, the hash table (empty when
                               // the layer is borrowed)
  DeviceBuffer device_views_;  // MoeExpertView[E + 1]
  DeviceMatrixView router_;
  const float* bias_ = nullptr;
  const int32_t* tid2eid_ = nullptr;
  int64_t vocab_ = 0;
  std::vector<MoeExpertView> host_views_;
  bool streamed_tiles_ = false;
  DeviceBuffer stream_maps_;
};

}  // namespace dsv4::cuda
