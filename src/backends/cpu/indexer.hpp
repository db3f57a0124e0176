// Lightning indexer (dsv4-model.md §3.3): scores the visible indexer keys of each query and keeps the top-k.
// score_j = Σ_h w_h · ReLU(q_h · K_j), w_h = weights_proj output · head_dim^-0.5 · heads^-0.5 (applied here).
// A query at position p sees keys j < (p+1) div ratio; invisible keys are never selected.
// In reference mode the caller has Hadamard-rotated and fp4-rounded q and the keys (reference_rounding.hpp).
#pragma once

#include <cstdint>

namespace dsv4::cpu {

struct IndexerParams {
  int64_t tokens = 0;     // T queries
  int64_t heads = 64;     // index_n_heads
  int64_t head_dim = 128; // index_head_dim
  int64_t ratio = 4;      // the CSA compression ratio: key j covers tokens up to ratio·(j+1) − 1
  int64_t top_k = 512;    // index_topk
};

struct IndexerInputs {
  const float* q = nullptr;             // [T, heads, head_dim], RoPE applied
  const float* head_weights = nullptr;  // [T, heads]: weights_proj @ x, not yet scaled
  const float* keys = nullptr;          // [key_count, head_dim] indexer compressor entries
  int64_t key_count = 0;
  const int64_t* positions = nullptr;   // [T]
};

// Keys a query at `position` may use: min(key_count, (position + 1) div ratio).
int64_t visible_key_count(int64_t position, int64_t ratio, int64_t key_count);

// scores: [T, key_count]; entries a query cannot see are −inf.
void indexer_scores(const IndexerInputs& inputs, const IndexerParams& params, float* scores);

// The indices of the min(k, visible) largest of scores[0, visible), by score descending, ties to the lower index.
// Returns how many were written to selected. NaN scores are an error.
int64_t select_top_k(const float* scores, int64_t visible, int64_t k, int32_t* selected);

// scores + top-k for every query. selected: [T, top_k], padded with −1 past counts[t] (counts: [T]).
void indexer_select(const IndexerInputs& inputs, const IndexerParams& params, int32_t* selected, int32_t* counts);

}  // namespace dsv4::cpu
