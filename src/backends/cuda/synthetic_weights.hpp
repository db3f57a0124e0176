// Random model weights generated directly on the device at a config's real widths, for end-to-end benchmarks of
// models that no checkpoint on this machine holds (V4-Flash, V4-Pro): no host copy of any weight is made.
//
// Formats follow DeepSeek's release (dsv4-model.md §6.1): attention projections, the indexer's wq_b and the shared
// expert FP8_BLOCK128 with e8m0 scales; compressor projections, the indexer's weights_proj, the router, the embedding
// and the head BF16; mHC projections F32; the routed experts in the chosen format (MXFP4 as released, NVFP4, or
// FP8_BLOCK128). Values keep activations finite and O(1), as the tiny test models' do: every matrix has unit-ish gain
// (element std ≈ 1/sqrt(cols); fp4 and e8m0 scales are powers of two, so within √2 of it), the router 2/sqrt(d)
// (spread routing scores), the embedding std 1; norm weights 1; sinks, compressor position biases and mHC bases
// uniform with std 1; mHC scales uniform in [0.3, 1.5]; the selection bias std 0.3; each hash-table row top_k distinct
// experts. The MTP module is not generated (a forward pass of the main layers never reads it).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/weight_upload.hpp"
#include "core/quantized_matrix.hpp"
#include "io/model_config.hpp"

namespace dsv4::cuda {

// Pool memory make_synthetic_weights takes (every buffer rounded up to DeviceAllocator::kAlignment).
struct SyntheticWeightsPlan {
  size_t model_bytes = 0;           // embedding, head, final norm, hc_head
  std::vector<size_t> layer_bytes;  // per main layer
  int64_t tensors = 0;              // matrices and non-empty vectors
  size_t total_bytes() const;
};

// Throws naming the format unless it is one the routed experts may take (NVFP4, MXFP4, FP8_BLOCK128).
void check_synthetic_expert_format(WeightFormat expert_format);

SyntheticWeightsPlan plan_synthetic_weights(const ModelConfig& config, WeightFormat expert_format);

// Generates every weight of the config's main layers in `pool` (one slab reserved for the plan) with kernels on
// `stream`, and returns once they have completed (the weights may then be used from any stream). Deterministic in
// `seed`. Before allocating, throws naming the bytes needed and the device's free memory when they do not fit.
DeviceModelWeights make_synthetic_weights(const ModelConfig& config, WeightFormat expert_format, DeviceAllocator& pool,
                                          uint64_t seed, cudaStream_t stream);

// Bytes of `weights` that one decode step of one token reads (the batch-1 weight-bandwidth floor): outside the layers
// the head, the final norm, hc_head and one embedding row; per layer every dense matrix and vector (attention,
// compressor, indexer, router, shared expert, mHC, norms), top_k routed experts and the token's hash-table row.
struct DecodeStepWeightBytes {
  size_t model_bytes = 0;
  std::vector<size_t> layer_bytes;
  size_t total_bytes() const;
};

DecodeStepWeightBytes decode_step_weight_bytes(const ModelConfig& config, const DeviceModelWeights& weights);

}  // namespace dsv4::cuda
