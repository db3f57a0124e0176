// Sparse multi-query attention with a sink on the paged KV cache (dsv4-model.md §3.4; the CPU reference is
// cpu::sparse_attention). Per query t: the entries named by its window slots (logical window-ring rows) and its
// compressed slots (logical compressed rows) of sequence slot sequence_slots[t], −1 = unused slot; one softmax over
// all of them with the per-head sink in the denominator; the output's last rope_dim dims rotated back by −θ at the
// query's position. K = V is one shared head, so a CTA serves 16, 32 or 64 heads of one query from each entry it
// loads (head_dim 512 with > 32 heads: a producer warpgroup gathers entries, fp8 ones by bulk copies expanded to bf16
// once, bf16 ones by 16-byte copies straight into the MMA layout, two consumer warpgroups run wgmma over 64 heads;
// other shapes: mma.sync; fp32 accumulation, online softmax); a query's slot list is split across CTAs when tokens ×
// head blocks would not fill the GPU. The splits are
// merged with a log-sum-exp combine where the sink joins once: by a second kernel, or (cluster_merge, head_dim 512
// kernel, 2-16 splits: 8 is the portable cluster size, up to 16 where the device holds such clusters) inside the one
// launch, the splits of a (query, head block) being one thread-block cluster that merges its partial outputs through
// distributed shared memory (no workspace, no second launch). With cluster_merge the split heuristic weighs the
// combine's extra launch: the DSV4 SWA and CSA calls (≤ 640 slots) stay in one launch at every batch size and context;
// only long HCA lists (≥ 48 tiles at batch 1, ≈ 180K context) take the combine, where it is faster.
// Every kernel is a programmatic dependent launch: it reads nothing an earlier kernel wrote before
// griddepcontrol.wait, and lets its dependent launch early.
//
// Dispatch contract:
// - head_dim ∈ {64, 128, 256, 512} (the cache's), any heads ≥ 1, tokens ≥ 0 (decode: one query per sequence, or
//   several; prefill: every token of a chunk, each with its own index lists — the same kernel).
// - q: fp32 or bf16 [T, H, D], 16-byte aligned; it is rounded to bf16 (the MMA input). Entries are bf16 already
//   (or fp8 + e8m0 dequantised exactly to bf16). The scores, softmax and PV accumulate in fp32.
// - Indices name rows whose pages are allocated and uploaded (KvCache::ensure_rows, upload_page_table); a row
//   outside the array's pages is treated as an unused slot (the kernel never reads outside the pool).
// - workspace: sparse_attention_workspace_bytes(...) bytes of device scratch when splits > 1 (else may be null).
// - Asynchronous on `stream`; no allocation, no synchronisation (graph-capturable).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/kv_cache.hpp"

namespace dsv4::cuda {

enum class AttentionDtype : uint8_t { F32, Bf16 };

// Entries per KV tile of the attention kernel: the unit of the split heuristic.
inline constexpr int kSparseAttentionTileEntries = 32;
inline constexpr int kSparseAttentionMaxSplits = 64;
// Splits a cluster merge serves at most (one CTA per SM; above 8, the non-portable cluster sizes, where the device
// holds them: max_sparse_attention_cluster_splits()).
inline constexpr int kSparseAttentionMaxClusterSplits = 16;
// Tiles of 32 entries one CTA of the head-split path holds (all resident in shared memory).
inline constexpr int kSparseAttentionHeadSplitMaxTiles = 4;
// Slot lists that SparseAttentionParams::prefill_kernel_decode routes (at least this many slots per query): with
// several 64-head blocks per query, and with one.
inline constexpr int64_t kSparseAttentionPrefillDecodeSlots = 512;
inline constexpr int64_t kSparseAttentionPrefillDecodeSlotsOneBlock = 2048;

// The marks of a traced head_dim 512 launch (SparseAttentionParams::d512_trace), per CTA: its start (thread 0), the
// producer's and consumer 0's grid-dependency waits returned, the producer's first two chunks' index rows and then
// their page-table entries loaded (bf16 entries: only the bf16 kernel is traced), the producer's first and last
// tile's copies issued, consumer 0's Q stored, its tiles 0, 1 and last arrived, its middle tile (tiles / 2) arrived,
// scored (QKᵀ done), exchanged (partial scores summed), weighted (softmax done) and multiplied (PV issued), its loop's
// last MMAs done, with a cluster merge its partial written, its partial published (first cluster barrier passed), the
// merge factors ready (first peer loads issued, factors barrier passed), the merged output stored (before the last
// cluster barrier), its end (output stored or merged);
// kD512TraceSm holds the SM id.
enum SparseAttentionTraceMark : int {
  kD512TraceStart,
  kD512TraceProducerWaited,
  kD512TraceRowsLoaded,
  kD512TracePagesLoaded,
  kD512TraceFirstIssued,
  kD512TraceLastIssued,
  kD512TraceConsumerWaited,
  kD512TraceQReady,
  kD512TraceTile0,
  kD512TraceTile1,
  kD512TraceLastTile,
  kD512TraceMidTile,
  kD512TraceMidScored,
  kD512TraceMidExchanged,
  kD512TraceMidWeighted,
  kD512TraceMidMultiplied,
  kD512TraceLoopEnd,
  kD512TraceMergeWritten,
  kD512TraceMergeSynced,
  kD512TraceMergeFactors,
  kD512TraceMergeStored,
  kD512TraceEnd,
  kD512TraceSm,
  kSparseAttentionTraceSlots
};

struct SparseAttentionParams {
  KvCacheView cache;
  int layer = 0;
  int64_t tokens = 0;                       // T queries
  int heads = 0;                            // H
  float softmax_scale = 0.0f;               // D^-0.5
  const void* q = nullptr;                  // device [T, H, D] in q_dtype
  AttentionDtype q_dtype = AttentionDtype::F32;
  const float* attn_sink = nullptr;         // device [H]; null = no sink
  const int32_t* sequence_slots = nullptr;  // device [T]: the KV cache slot of each query
  const int64_t* positions = nullptr;       // device [T]: query positions (for the inverse RoPE)
  const float* rope_frequencies = nullptr;  // device [rope_dim / 2]; null = leave the output unrotated
  const int32_t* window_index = nullptr;    // device [T, window_slots]: window-ring rows, −1 = unused
  int window_slots = 0;
  const int32_t* compressed_index = nullptr;  // device [T, compressed_slots]: compressed rows, −1 = unused
  int compressed_slots = 0;
  // device [T]: query t reads only its first clamp(compressed_counts[t], 0, compressed_slots) compressed slots (the
  // rest may hold anything and are never read); null = compressed_slots for every query. Lets a batch share one
  // slot bound (e.g. max_context / ratio for HCA) without paying for slots past each query's count.
  const int32_t* compressed_counts = nullptr;
  void* out = nullptr;                      // device [T, H, D] in out_dtype
  AttentionDtype out_dtype = AttentionDtype::F32;
  int splits = 1;                           // CTAs per (query, head block); choose_sparse_attention_splits
  // Merge 2..max_sparse_attention_cluster_splits() splits inside the attention launch (a cluster per query and head
  // block) where the head_dim 512 kernel serves the call; the combine kernel otherwise.
  bool cluster_merge = true;
  // Cluster merge only: the splits' partial outputs cross distributed shared memory as bf16 instead of fp32: half the
  // bytes of the merge, which the SM-to-SM network bounds at batch 1 (ncu, Flash SWA: 40 % of the consumers' time);
  // each split's unnormalised partial is rounded once (2^-9 of its share of the output).
  bool cluster_merge_bf16_partials = false;
  // Small-batch decode (head_dim 512, more than 32 heads): CTAs over (query, 16-head group, split of at most
  // head_split_tiles · 32 entries) instead of (query, 64-head block, split), the splits merged in a cluster; used
  // where the grid is one wave on the device and the slot bound fits the largest cluster (else the kernels above).
  // `splits` and the workspace are then not used (sparse_attention_head_split_splits tells). H200, fp8 entries, L2
  // flushed: Flash SWA batch 1 14.8 → 12.0 µs, CSA 18.0 → 13.4, Pro CSA 18.1 → 14.3, Flash SWA batch 8 15.5 → 12.7.
  bool head_split = true;
  int head_split_tiles = 0;  // 1..kSparseAttentionHeadSplitMaxTiles tiles per CTA; 0 = the launcher's choice
  // Head-split path: each split asks L2 for its entries before griddepcontrol.wait, through the index as it stands
  // then (in a decode step mostly the previous step's rows, which the new lists share) and the step's page table, so
  // that its bulk copies after the wait find them in L2 rather than DRAM (the lists are read again after the wait).
  // H200, dsv4 bench e2e --config flash --layers 8 --format nvfp4 -p 0 -n 64 -b 1 -r 2, off / on interleaved in one
  // job (session 18): round 1 747.5, 754.2 / 751.5, 754.8 t/s; round 2 743.5, 744.1 / 752.0, 752.7; at -d 2048
  // level (729.8, 736.9 / 734.5, 730.0).
  bool head_split_early_entries = true;
  // Prefill-sized calls (head_dim 512, bf16 entries, more than 32 heads, tokens × 64-head blocks ≥ twice the SMs) go
  // to run_sparse_attention_prefill (sparse_attention_prefill.hpp; one CTA per query and head block over 64-entry
  // blocks, no split). H200, 4096-query CSA chunk: Flash 1278 → 1072 µs (8K), Pro 2498 → 2107. `splits` and the
  // workspace are then not used (sparse_attention_uses_prefill_kernel tells).
  bool prefill_kernel = true;
  // With prefill_kernel: decode-sized calls (bf16 entries, (query, 64-head block) CTAs from 15/16 of one wave up to
  // the two waves above) with long slot lists known on the host (no compressed_counts: with counts the bound says
  // nothing of the work) go there too: at least kSparseAttentionPrefillDecodeSlots slots with several head blocks
  // per query, kSparseAttentionPrefillDecodeSlotsOneBlock with one. H200, L2 flushed, bf16 q, the decode kernels →
  // the prefill kernel (session 17, bench_cuda_attention --route and bench_cuda_attention_prefill --part decode):
  // Pro batch 64, 640 slots 46.6 → 39.1 µs, 2176 slots 120.2 → 98.7, 8320 415.5 → 325.6; Flash batch 256, 2176 slots
  // 235.6 → 203.3; Flash batch 64 loses (640 slots 30.6 → 36.4) and stays below the wave. With the decode kernel's
  // session-19 copies (session 20, both rounds): one head block (Flash) loses at 640 slots (batch 128 43.1 → 45.3,
  // 256 78.4 → 83.8: not routed) and wins from 2176 (batch 128 105.2 → 98.6, 256 202.0 → 187.6; 8320 slots batch 128
  // 351.6 → 312.2); two (Pro) win from 640 (batch 64 41.4 → 39.2, 128 76.1 → 72.4; 2176 slots batch 64 103.2 → 90.0).
  bool prefill_kernel_decode = true;
  // Traced launch (bench_cuda_attention --trace; bf16 entries on the head_dim 512 kernel, else refused): each CTA
  // stores %globaltimer marks of its phases (SparseAttentionTraceMark) in its kSparseAttentionTraceSlots words here.
  uint64_t* d512_trace = nullptr;
  void* workspace = nullptr;                // device scratch for splits > 1 merged by the combine kernel
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// The largest cluster the head_dim 512 kernel's merge runs on the current device (8 portable; 16 where a GPC holds
// 16 of its CTAs); asked of the driver once per device.
int max_sparse_attention_cluster_splits();

// Splits that balance the waves of CTAs over `multiprocessors` SMs against the merge's cost: the cluster merge's up to
// max_sparse_attention_cluster_splits() where `cluster_merge` allows it (head_dim 512, more than 32 heads), the
// combine kernel's above (there weighed with its launch); 1 when one split already fills the GPU.
int choose_sparse_attention_splits(int64_t tokens, int heads, int head_dim, KvEntryFormat format, int64_t slots,
                                   int multiprocessors, bool cluster_merge = true);

// Workspace of a call merged by the combine kernel (an upper bound for any call of that shape: a cluster merge
// needs none).
size_t sparse_attention_workspace_bytes(int64_t tokens, int heads, int head_dim, int splits);

// Whether run_sparse_attention(params) takes the head-split path (params.head_split and a shape it serves), and
// with how many splits (0 when it does not).
int sparse_attention_head_split_splits(const SparseAttentionParams& params);

// Whether run_sparse_attention(params) hands the call to run_sparse_attention_prefill (params.prefill_kernel).
bool sparse_attention_uses_prefill_kernel(const SparseAttentionParams& params);

// The CTAs of the head_dim 512 kernel's launch for `params` (tokens × 64-head blocks × params.splits): its grid, and
// the records a traced launch's d512_trace holds (kSparseAttentionTraceSlots words each).
int64_t sparse_attention_d512_ctas(const SparseAttentionParams& params);

// Throws (naming the shape, pointer or field at fault) unless run_sparse_attention supports the call.
void check_sparse_attention_params(const SparseAttentionParams& params);

void run_sparse_attention(const SparseAttentionParams& params);

}  // namespace dsv4::cuda
