// The per-query entry lists that sparse attention reads (dsv4-model.md §3.4), built on the device from positions so a
// decode step needs no host work per token; every list of a step in one launch:
//  - window: query at position p sees the KV vectors of positions max(0, p − window + 1) … p, stored in the paged
//    window ring at row position mod ring_rows; slots for positions before 0 are −1.
//  - visible compressed entries (HCA layers, one list per compression ratio): entries 0 … min(entries,
//    (p + 1) div ratio) − 1, the rest −1, and optionally that count per token (the attention's per-query
//    compressed_counts, so a batch shares one bound).
// (CSA layers take their compressed lists from the indexer's top-k instead.) The step's embedding launch can build
// them too (EmbeddingParams::attention_lists): one launch less per step.
// A programmatic dependent launch (ptx/dependent_launch.cuh); asynchronous on `stream`; no allocation, no
// synchronisation.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

inline constexpr int kMaxVisibleEntryLists = 4;

struct VisibleEntriesList {
  int64_t entries = 0;                 // compressed entries stored (slots per query)
  int64_t ratio = 0;                   // the layers' compression ratio
  int32_t* index = nullptr;            // device [tokens, entries]
  int32_t* counts = nullptr;           // device [tokens] or null: the visible count of each token
};

struct AttentionIndexParams {
  const int64_t* positions = nullptr;  // device [tokens]
  int64_t tokens = 0;
  int window = 0;                      // slots per query (the model's sliding window); 0: no window list
  int64_t ring_rows = 0;               // rows of the window ring (≥ window)
  int32_t* window_index = nullptr;     // device [tokens, window]
  VisibleEntriesList visible[kMaxVisibleEntryLists];
  int visible_lists = 0;
  cudaStream_t stream = nullptr;
};

// Throws (naming the field at fault) unless run_attention_index supports the call.
void check_attention_index_params(const AttentionIndexParams& params);

void run_attention_index(const AttentionIndexParams& params);

}  // namespace dsv4::cuda
