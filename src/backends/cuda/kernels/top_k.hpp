// Top-k of indexer scores on the GPU: dsv4::cpu::select_top_k for every query in one launch.
//
// Dispatch contract:
// - Query t considers scores[t, 0 .. visible_t) with visible_t = min(candidates, (positions[t] + 1) div ratio), or
//   all `candidates` when positions is null. It writes the indices of the min(k, visible_t) largest, by score
//   descending and ties to the lower index (exactly select_top_k's order; −0 equals +0), to selected[t, 0 .. count)
//   and −1 to the rest of the row of k; counts[t] = min(k, visible_t). k ≤ kTopKMax, candidates < 2^31.
// - NaN scores: the CPU reference throws; here a NaN among a query's visible scores sets *nan_flag to 1 (it is never
//   cleared by the kernel: the caller zeroes it once and checks it after the step, e.g. with the step's other
//   results) and that score ranks below every number (−inf included), so it is selected only when fewer than k
//   other scores are visible.
// - Method: radix select over 64-bit keys (order-preserving fp32 bits, then the inverted index, so every key is unique
//   and ties resolve to the lower index); each pass histograms one digit (12 bits first, then 10-11) of the keys still
//   matching the chosen prefix, until the chosen keys and the boundary bin's fit a small final sort; then one CTA sorts
//   them in shared memory (bitonic) and writes the first k, or, when the listed keys are few for the query's CTAs,
//   every CTA places a slice of them by rank (the count of larger listed keys). When few queries share the GPU (queries
//   ≤ kTopKMaxSplitQueries) each query is split over up to top_k_ctas_per_query CTAs, of which those needed for its
//   visible keys (≥ 2048 each) work and meet at barriers between passes; the passes' histograms and the list then live
//   in `workspace`. Otherwise, or when one CTA covers the visible keys, one CTA per query and no global memory but the
//   scores and the outputs.
// - workspace: top_k_workspace_bytes(queries) bytes, zero-filled once before the first launch (cudaMemset); every
//   launch leaves it zeroed again. A launch that faults leaves it undefined: zero it again. A workspace sized for
//   the largest step serves every smaller one (it covers min(queries, kTopKMaxSplitQueries) split queries).
// - Programmatic dependent launch (ptx/dependent_launch.cuh): the kernel reads its inputs only after
//   wait_for_prior_grids, and lets the next kernel launch at once.
// - Asynchronous on `stream`, no allocation, no synchronisation (graph-capturable).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dsv4::cuda {

inline constexpr int kTopKMax = 2048;
inline constexpr int kTopKMaxSplitQueries = 64;

// Phase boundaries of the kernel, for TopKParams::trace (a diagnostic of the bench).
enum TopKTracePoint : int {
  kTraceEntry,          // kernel entry
  kTraceInputsReady,    // past wait_for_prior_grids
  kTraceCached,         // the range's scores in shared memory
  kTraceHistogram,      // the first pass's CTA histogram done
  kTraceFlushed,        // ... added into the query's global histogram
  kTraceBarrier,        // ... past the first barrier
  kTracePassesDone,     // every pass done
  kTraceCollected,      // the listed keys appended
  kTraceFinal,          // elected the final CTA (the final CTA only), or past the ranking barrier
  kTraceListLoaded,     // the list in shared memory
  kTraceSorted,         // sorted or ranked
  kTraceWritten,        // outputs written
  kTopKTracePoints
};
inline constexpr const char* kTopKTracePointNames[kTopKTracePoints] = {
    "entry", "inputs ready", "cached", "histogram", "flushed", "barrier",
    "passes done", "collected", "final CTA", "list loaded", "sorted/ranked", "written"};

struct TopKParams {
  const float* scores = nullptr;        // device [queries, row_stride]
  int64_t row_stride = 0;               // elements from one query's scores to the next, ≥ candidates
  int64_t candidates = 0;               // scores per query (key_count)
  int queries = 0;                      // T
  int k = 512;                          // 0 .. kTopKMax
  const int64_t* positions = nullptr;   // device [queries] or null (everything visible)
  int64_t ratio = 4;                    // the visibility rule's compression ratio (with positions)
  int32_t* selected = nullptr;          // device [queries, k]
  int32_t* counts = nullptr;            // device [queries]
  int32_t* nan_flag = nullptr;          // device, one int: set to 1 when a visible score is NaN
  void* workspace = nullptr;            // device, top_k_workspace_bytes(queries), zeroed once
  size_t workspace_bytes = 0;
  int max_ctas_per_query = 0;           // caps the split over CTAs (e.g. to leave SMs to other work); 0 = no cap
  // Diagnostic: device int64 [queries · top_k_ctas_per_query(...), kTopKTracePoints], zeroed by the caller; each
  // working CTA writes its SM clock (clock64) at each phase boundary it passes. Null: no trace.
  int64_t* trace = nullptr;
  cudaStream_t stream = nullptr;
};

size_t top_k_workspace_bytes(int queries);

// CTAs per query the launcher uses for this shape on the current device (1 = one CTA per query);
// resident_ctas_per_sm: the kernel's residency if not run_top_k's (the indexer's fused scores + top-k).
int top_k_ctas_per_query(int queries, int64_t candidates, int max_ctas_per_query = 0, int resident_ctas_per_sm = 0);

void check_top_k_params(const TopKParams& params);
void run_top_k(const TopKParams& params);

}  // namespace dsv4::cuda
