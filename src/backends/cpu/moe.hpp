// Mixture of experts (dsv4-model.md §4): sqrt-softplus router with a selection-only bias (or token-id hash
// routing on the first layers), top-k routed experts with clamped SwiGLU, plus one always-on shared expert.
// All math and the accumulation of routed outputs are fp32 (bf16_expert_inputs: the CUDA experts' roundings).
#pragma once

#include <cstdint>

#include "core/quantized_matrix.hpp"

namespace dsv4::cpu {

struct MoeParams {
  int64_t tokens = 0;        // T
  int64_t hidden = 0;        // d
  int64_t intermediate = 0;  // I (moe_intermediate_size), routed and shared
  int64_t experts = 0;       // E (n_routed_experts)
  int64_t top_k = 6;         // num_experts_per_tok
  float routed_scaling_factor = 1.0f;
  float swiglu_limit = 10.0f;
  // GpuBf16 numerics: the expert GEMMs read u and the SwiGLU output h rounded to bf16, as the CUDA kernels do (the
  // router still reads u in fp32).
  bool bf16_expert_inputs = false;
};

// expert(u) = w2 @ (silu(min(w1 @ u, limit)) · clamp(w3 @ u, −limit, limit)).
struct ExpertWeights {
  const QuantizedMatrix* w1 = nullptr;  // [I, d] gate
  const QuantizedMatrix* w2 = nullptr;  // [d, I] down
  const QuantizedMatrix* w3 = nullptr;  // [I, d] up
};

struct MoeWeights {
  const QuantizedMatrix* gate = nullptr;  // [E, d] router (bf16 in the release)
  const float* gate_bias = nullptr;       // [E] selection bias; nullptr on hash layers
  const int32_t* tid2eid = nullptr;       // [vocab, top_k] hash routing table; nullptr on scored layers
  int64_t vocab = 0;                      // rows of tid2eid
  const ExpertWeights* experts = nullptr; // [E]
  ExpertWeights shared;                   // the shared expert (weight 1)
};

// s = sqrt(softplus(gate @ u)); idx = tid2eid[token] (hash) or the top_k of s + bias (ties to the lower index);
// weight = s[idx] / Σ s[idx] · routed_scaling_factor.
// u: [T, d]; token_ids: [T] (needed for hash routing, else may be nullptr); expert_ids, expert_weights: [T, top_k].
void moe_route(const MoeWeights& weights, const MoeParams& params, const float* u, const int32_t* token_ids,
               int32_t* expert_ids, float* expert_weights);

// One clamped-SwiGLU expert over T tokens: u: [T, d] → out: [T, d].
void swiglu_expert(const ExpertWeights& expert, const MoeParams& params, const float* u, int64_t T, float* out);

// out = Σ_k weight_k · expert_{idx_k}(u) + shared(u). u: [T, d] (the ffn_norm output) → out: [T, d].
void moe_forward(const MoeWeights& weights, const MoeParams& params, const float* u, const int32_t* token_ids,
                 float* out);

}  // namespace dsv4::cpu
