// KV compressor pooling on the GPU: dsv4::cpu::compressor_pool for one sequence's chunk of T new tokens (T = 1 at
// decode), any chunking of the sequence giving the entries of one pass (dsv4-model.md §3.2).
//
// Dispatch contract:
// - Inputs are the chunk's projections kv, gate [T, coff·c] fp32 (wkv·x and wgate·x, without ape; the GEMMs are the
//   linear kernels'), the tokens at positions start_position … start_position + T − 1, and the sequence's
//   DeviceCompressorState, which the launch reads and updates (the state must have seen exactly start_position tokens).
// - It writes the entries completed by the chunk, compressor_first_entry(...) onwards, compressor_entries_emitted(...)
//   of them — both known on the host from positions alone — to entries (fp32) or entries_bf16 ([emitted, c], one of
//   the two): pooled (joint per-channel softmax), optionally bf16-rounded before the norm (round_pooled_to_bf16),
//   RMSNorm with the weight, RoPE on the last rope_dim dims at position ratio·w, then the stored rounding:
//   KvFp8 = round_kv_reference (fp8 e4m3 per 64 of the non-rope dims, bf16 rope dims), IndexerFp4 =
//   round_indexer_reference (Hadamard, bf16, fp4 per 32; head_dim 32/64/128), None = as pooled (exact numerics).
// - One launch: one CTA per emitted entry, or a cluster of up to 8 CTAs per entry when entries are few (decode, HCA
//   prefill); at least one CTA. The CTA that finishes last updates the state.
// - head_dim even and ≤ 2048; asynchronous on `stream`, no allocation, no synchronisation (graph-capturable).
//   Steps of one state must be stream-ordered (each reads what the previous wrote).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/compressor_state.hpp"

namespace dsv4::cuda {

enum class CompressorStoredRounding { None, KvFp8, IndexerFp4 };

struct CompressorParams {
  int64_t head_dim = 0;               // c
  int64_t ratio = 0;                  // m
  bool overlapping = false;           // CSA (two series per token) vs HCA
  float norm_eps = 1e-6f;
  bool round_pooled_to_bf16 = false;  // DeepSeek's norm(bf16(C_w))
  CompressorStoredRounding stored_rounding = CompressorStoredRounding::None;
  const float* kv = nullptr;          // device [tokens, coff·c]
  const float* gate = nullptr;        // device [tokens, coff·c]
  int64_t tokens = 0;                 // T ≥ 0
  int64_t start_position = 0;         // absolute position of the chunk's first token
  const float* ape = nullptr;         // device [ratio, coff·c]
  const float* norm_weight = nullptr; // device [c]
  const float* rope_frequencies = nullptr;  // device [rope_dim / 2] (RopeTable::frequencies())
  int64_t rope_dim = 0;               // ≤ c, even
  CompressorStateView state;
  float* entries = nullptr;               // device [emitted, c], or null when entries_bf16 is used
  __nv_bfloat16* entries_bf16 = nullptr;  // device [emitted, c] (e.g. the indexer's bf16 keys)
  cudaStream_t stream = nullptr;

  int64_t projection_width() const { return overlapping ? 2 * head_dim : head_dim; }
};

// Index of the first entry a chunk starting at start_position can complete.
inline int64_t compressor_first_entry(int64_t start_position, int64_t ratio) { return start_position / ratio; }

// Entries completed by the T tokens from start_position: windows whose last token lies in the chunk.
inline int64_t compressor_entries_emitted(int64_t start_position, int64_t tokens, int64_t ratio) {
  return (start_position + tokens) / ratio - start_position / ratio;
}

void check_compressor_params(const CompressorParams& params);
void run_compressor(const CompressorParams& params);

}  // namespace dsv4::cuda
