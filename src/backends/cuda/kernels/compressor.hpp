// KV compressor pooling on the GPU: dsv4::cpu::compressor_pool for the new tokens of several sequences in one
// launch (a decode step: one token each; a prefill chunk: one run of T tokens), any chunking of a sequence giving
// the entries of one pass (dsv4-model.md §3.2).
//
// Dispatch contract:
// - The step's tokens are runs (CompressorRun, device memory): run r is `tokens` consecutive rows of kv, gate
//   [step tokens, coff·c] fp32 (wkv·x and wgate·x, without ape; rows row_stride elements apart, so both may be
//   slices of one wider projection output) starting at row first_token, the tokens at positions
//   start_position … of sequence slot `slot`, whose state (row `slot` of the DeviceCompressorState) the launch reads
//   and updates: it must have seen exactly start_position tokens. Slots of one launch are distinct; every run has at
//   most max_run_tokens tokens. The runs live on the device, so a captured launch replays for new positions.
// - A run completes compressor_entries_emitted(start_position, tokens, ratio) entries (≤ entries_per_run =
//   compressor_max_entries(max_run_tokens, ratio)), numbers compressor_first_entry(...) onwards. Each is pooled
//   (joint per-channel softmax), optionally bf16-rounded before the norm (round_pooled_to_bf16), RMSNorm'ed with the
//   weight, RoPE'd on the last rope_dim dims at position ratio·w, then given the stored rounding: KvFp8 =
//   round_kv_reference (fp8 e4m3 per 64 of the non-rope dims, bf16 rope dims), IndexerFp4 = round_indexer_reference
//   (Hadamard, bf16, fp4 per 32; head_dim 32/64/128), None = as pooled (exact numerics).
// - Output (one of the four):
//   - entries fp32 [run_count · entries_per_run, c]: run r's e-th new entry at row r·entries_per_run + e, with
//     entry_rows[row] = its entry number w and entry_slots[row] = the run's slot (both optional), and −1 in
//     entry_rows for the rows of runs that completed fewer entries (their entries rows are not written);
//   - slot_entries_bf16: entry w of slot s at s·slot_entry_stride + w·c (e.g. the indexer keys of every sequence);
//     entries w ≥ slot_entry_capacity are not written;
//   - slot_entries_fp8 + slot_entry_scales (head_dim 32, 64 or 128; the indexer's fp8 keys): the same places in
//     bytes, each entry as e4m3 codes with one fp32 scale at s·slot_scale_stride + w, by indexer.hpp's fp8 operand
//     rule (the bf16-rounded entry, s = 2^ceil(log2(max(amax, 1e-4) / 448)), code = e4m3_rne(x / s)): after the
//     IndexerFp4 rounding the codes · scale are that rounding's values (lossless, see indexer.hpp);
//   - cache (a KvCacheView with a pool): entry w of slot s stored, as kv_insert stores it (bf16, or the fp8
//     reference layout), at row w of the Compressed array of (s, cache_layer), whose page must be allocated and
//     uploaded; head_dim = the cache's, stored_rounding None (the layout is the rounding). The step's compressed
//     entries then need no launch of their own.
// - One launch: per run, one CTA per possible entry, or a cluster of up to 8 CTAs per entry when entries are few and
//   long (HCA decode and prefill); at least one CTA per run. A run of at most `ratio` tokens has its state updated
//   by its CTAs, each its own channels; a longer run's state by the last to finish of its CTAs that may read the
//   state (entries whose window does not lie wholly in the run, and the run's last entry row).
// - run_compressors: up to two compressors in one launch (a CSA layer's main and indexer compressors: −1 launch per
//   CSA layer), each with the contract above; one stream, distinct states; their runs, projections, shapes and
//   outputs are independent (the same runs table may serve both).
// - head_dim even and ≤ 1024, ratio · head_dim < 2^30; a programmatic dependent launch (ptx/dependent_launch.cuh);
//   asynchronous on `stream`, no allocation, no synchronisation (graph-capturable).
//   Steps of one state must be stream-ordered (each reads what the previous wrote).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/kernels/indexer.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/host_device.hpp"

namespace dsv4::cuda {

enum class CompressorStoredRounding { None, KvFp8, IndexerFp4 };

// How the pooling loads a window's slots. Registers: each thread's batch of loads into registers (CTAs up to 512
// threads). Staged: cp.async copies into a shared-memory ring, several batches in flight without registers held
// (CTAs up to 256 threads, an entry's slice at most 512 channels). Lean: 128-thread CTAs of up to four entries, four
// channels per thread, a window's slots (at most 8) in one round of 16-byte loads from 32-bit offsets and a one-pass
// softmax on the MUFU's 2^x (entries within ≈ 1e-6 of the other paths', not their bits); head_dim 128, 256 or 512,
// entries in one CTA each, kv, gate, ape, norm weights, state and the outputs 16-byte aligned (bf16: 8) with
// row_stride a multiple of 4, runs' rows within 32-bit offsets, rope_dim a multiple of 4. Auto: for launches whose
// runs complete several entries (prefill chunks) Lean where every pool takes it (a CSA layer's compressors), else
// Staged where every slice fits (1.2-2.1× faster than registers on an H200); Registers otherwise (decode steps, where
// Staged was 0.8-1.1×).
enum class CompressorSlotLoads { Registers, Staged, Lean, Auto };

// One sequence's tokens in a launch (device memory).
struct CompressorRun {
  int64_t start_position = 0;  // absolute position of the run's first token
  int32_t slot = 0;            // the sequence's state row
  int32_t first_token = 0;     // the run's first row of kv / gate
  int32_t tokens = 0;          // ≥ 0
  int32_t unused = 0;          // pads the struct to 24 bytes
};

struct CompressorParams {
  int64_t head_dim = 0;               // c
  int64_t ratio = 0;                  // m
  bool overlapping = false;           // CSA (two series per token) vs HCA
  float norm_eps = 1e-6f;
  bool round_pooled_to_bf16 = false;  // DeepSeek's norm(bf16(C_w))
  CompressorStoredRounding stored_rounding = CompressorStoredRounding::None;
  const float* kv = nullptr;          // device [step tokens, coff·c]
  const float* gate = nullptr;        // device [step tokens, coff·c]
  int64_t row_stride = 0;             // elements between token rows of kv and gate; 0 = coff·c
  const CompressorRun* runs = nullptr;  // device [run_count]
  // The runs were written before the programmatic chain began (the model's step inputs: a copy before the step's
  // first kernel), never by the kernel launched just before: the kernel then loads them before it waits for that
  // kernel. Off: after the wait, as everything else (the runs may be an earlier kernel's output).
  bool runs_ready_at_launch = false;
  int run_count = 0;
  int64_t max_run_tokens = 0;         // bound on every run's tokens (sizes the grid)
  const float* ape = nullptr;         // device [ratio, coff·c]
  const float* norm_weight = nullptr; // device [c]
  const float* rope_frequencies = nullptr;  // device [rope_dim / 2] (RopeTable::frequencies())
  // Or the factors per position: device [positions, rope_dim / 2] {cos, sin} of RopeTable::angles (the same values
  // the frequencies give), covering every completed entry's window start ratio·w; a load instead of a double sincos.
  const float2* rope_table = nullptr;
  int64_t rope_dim = 0;               // ≤ c, even
  CompressorStateView state;          // every slot's state
  float* entries = nullptr;           // device [run_count · entries_per_run, c], or null (slot_entries_bf16)
  int32_t* entry_rows = nullptr;      // device [run_count · entries_per_run] or null
  int32_t* entry_slots = nullptr;     // device [run_count · entries_per_run] or null
  __nv_bfloat16* slot_entries_bf16 = nullptr;  // device, entry w of slot s at s·slot_entry_stride + w·c
  int64_t slot_entry_stride = 0;      // elements
  int64_t slot_entry_capacity = 0;    // entries per slot (also of slot_entries_fp8)
  uint8_t* slot_entries_fp8 = nullptr;  // device e4m3, entry w of slot s at s·slot_entry_stride + w·c (16-aligned)
  float* slot_entry_scales = nullptr;   // device fp32, entry w of slot s's scale at s·slot_scale_stride + w
  int64_t slot_scale_stride = 0;        // floats, ≥ slot_entry_capacity
  KvCacheView cache;                  // pool null: no cache output
  int cache_layer = 0;
  // CTAs per entry (1, 2, 4 or 8, each a whole number of 64-channel blocks; 1 with IndexerFp4 or slot_entries_fp8);
  // 0: the launcher's choice (benchmarks and tests compare the splits).
  int cluster_ctas = 0;
  // See CompressorSlotLoads; the compressors of one launch agree on it.
  CompressorSlotLoads slot_loads = CompressorSlotLoads::Auto;
  // Diagnostic timeline (bench_cuda_compressor --trace / --trace-prefill; decode steps with slot loads Registers,
  // prefill chunks with any; lean CTAs record their first entry's points): thread 0 of every
  // CTA of the launch stores its SM id and %globaltimer (ns) at the CompressorTracePoint points into
  // trace[cta · kCompressorTracePoints + point] (points a CTA does not reach stay as they were). The compressors of
  // one launch give the same pointer (or null); trace_ctas: the CTAs it has room for (a launch of more is refused).
  uint64_t* trace = nullptr;
  int64_t trace_ctas = 0;
  cudaStream_t stream = nullptr;

  int64_t projection_width() const { return overlapping ? 2 * head_dim : head_dim; }
};

// The points of a traced launch (CompressorParams::trace): the SM id, the CTA's start, its grid-dependency wait
// passed, its run loaded, its first state-update loads arrived, the pooling's partials written (after the barrier),
// thread 0's channels merged, the RMSNorm's sum known, the stored rounding done, the entry finished (stored), the
// state updated (the CTA's last stores issued). Preparation CTAs: start, wait, end.
enum CompressorTracePoint : int {
  COMPRESSOR_TRACE_SM,
  COMPRESSOR_TRACE_START,
  COMPRESSOR_TRACE_PRIOR_DONE,
  COMPRESSOR_TRACE_RUN_LOADED,
  COMPRESSOR_TRACE_UPDATE_LOADED,
  COMPRESSOR_TRACE_POOLED,
  COMPRESSOR_TRACE_MERGED,
  COMPRESSOR_TRACE_NORMED,
  COMPRESSOR_TRACE_ROUNDED,
  COMPRESSOR_TRACE_FINISHED,
  COMPRESSOR_TRACE_END,
  kCompressorTracePoints
};

// The point's name in a trace's tables (bench_cuda_compressor): "sm", "start", "wait passed", ….
const char* compressor_trace_point_name(int point);

// Index of the first entry a chunk starting at start_position can complete.
inline int64_t compressor_first_entry(int64_t start_position, int64_t ratio) { return start_position / ratio; }

// Entries completed by the T tokens from start_position: windows whose last token lies in the chunk.
DSV4_HD int64_t compressor_entries_emitted(int64_t start_position, int64_t tokens, int64_t ratio) {
  return (start_position + tokens) / ratio - start_position / ratio;
}

// The most entries a run of up to `tokens` tokens completes, whatever its start.
inline int64_t compressor_max_entries(int64_t tokens, int64_t ratio) { return (tokens + ratio - 1) / ratio; }

void check_compressor_params(const CompressorParams& params);

// A launch's CTAs [first_cta, first_cta + ctas) (the padding to whole hardware clusters not counted).
struct CompressorCtaRange {
  int64_t first_cta = 0;
  int64_t ctas = 0;
};

// Where run_compressors(params[, prepare]) puts its CTAs: pool i's range (params[i]; empty for a pool without runs;
// the pools' ranges follow each other, params[1]'s first in a lean launch), then the indexer preparation's (prepare
// null or without tokens: empty); `ctas` the whole grid, `threads` per CTA.
// The launcher launches this plan; traces (CompressorParams::trace) are read by it.
struct CompressorLaunchShape {
  CompressorCtaRange pools[2];
  CompressorCtaRange prepare;
  int64_t ctas = 0;
  int threads = 0;
};
CompressorLaunchShape compressor_launch_shape(std::span<const CompressorParams> params,
                                              const IndexerPrepareParams* prepare = nullptr);
void run_compressor(const CompressorParams& params);
// The slot loads a launch of `params` takes (Auto resolved; refuses a Lean that cannot pool them, naming why).
CompressorSlotLoads compressor_slot_loads(std::span<const CompressorParams> params);  // 1 or 2
void run_compressors(std::span<const CompressorParams> params);  // 1 or 2; params[0].stream

// run_compressors and run_indexer_prepare in one launch (a CSA layer's indexer queries are ready when its compressors
// run: −1 launch per CSA layer): the preparation's vectors on CTAs after the pools', one warp each, the same bits as
// run_indexer_prepare. prepare.stream must be params[0].stream; prepare's output must not alias the compressors'.
void run_compressors(std::span<const CompressorParams> params, const IndexerPrepareParams& prepare);

}  // namespace dsv4::cuda
