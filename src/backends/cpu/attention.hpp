// Sparse multi-query attention with a sink (dsv4-model.md §3.4). One 512-d vector per entry is both K and V.
// Each query attends, in ONE softmax, over its window entries and its compressed entries (the index lists may
// overlap in time; nothing is de-duplicated); the per-head sink joins only the denominator. The output's rope
// slice is rotated back by −θ at the QUERY position.
#pragma once

#include <cstdint>

#include "backends/cpu/rope.hpp"

namespace dsv4::cpu {

struct SparseAttentionParams {
  int64_t tokens = 0;            // T queries
  int64_t heads = 0;             // H
  int64_t head_dim = 512;        // D
  float softmax_scale = 0.0f;    // D^-0.5
  int64_t window_slots = 0;      // entries per query in window_index (128 for the real models)
  int64_t compressed_slots = 0;  // entries per query in compressed_index (0 on SWA layers)
  // 0: exact softmax weights. n > 0: the weights as the CUDA kernel forms them (GpuBf16 numerics): the slot list
  // (window slots, then compressed slots, unused ones included) is walked in tiles of n slots with a running max m
  // over the tiles so far, each weight is bf16(exp(s − m)) and the denominator sums the rounded weights. (The
  // kernel's split of long lists over several CTAs, each with its own running max, is not reproduced.)
  int64_t bf16_weight_tile = 0;
};

struct SparseAttentionInputs {
  const float* q = nullptr;                  // [T, H, D]
  const float* attn_sink = nullptr;          // [H]; nullptr = no sink (a sink of −inf is the same)
  const float* window_kv = nullptr;          // [window_rows, D]
  int64_t window_rows = 0;
  const int32_t* window_index = nullptr;     // [T, window_slots]: rows of window_kv, −1 = unused slot
  const float* compressed_kv = nullptr;      // [compressed_rows, D]
  int64_t compressed_rows = 0;
  const int32_t* compressed_index = nullptr; // [T, compressed_slots]: rows of compressed_kv, −1 = unused slot
  const int64_t* positions = nullptr;        // [T] query positions, for the inverse RoPE
  const RopeTable* rope = nullptr;           // nullptr = leave the output unrotated
};

// out: [T, H, D]. A query with no entries (and any sink) gets a zero output.
void sparse_attention(const SparseAttentionInputs& inputs, const SparseAttentionParams& params, float* out);

}  // namespace dsv4::cpu
