// Lightning indexer on the GPU (dsv4-model.md §3.3): the query preparation and the scores of dsv4::cpu::indexer_scores;
// the top-k that follows is top_k.hpp.
//
// Dispatch contract:
// - run_indexer_prepare turns fp32 vectors [rows, head_dim] (indexer q heads, or new indexer keys) into the operands
//   of the scores: optional RoPE on the last rope_dim dims at each token's position, then in reference numerics
//   round_indexer_reference (Hadamard of head_dim, bf16, fp4 e2m1 with a ue8m0 scale per 32 — every result is exactly
//   a bf16), in exact numerics a plain round to bf16. head_dim 32, 64 or 128. Output bf16, or fp8: each vector's
//   bf16 operand as e4m3 codes with one fp32 scale, by DeepSeek's fp8 block rule over the whole vector
//   (s = 2^ceil(log2(max(amax, 1e-4) / 448)), code = e4m3_rne(x / s)); lossless for fp4-rounded vectors with
//   amax ≥ 1e-4 whose 32-blocks' scales span at most 2^14, i.e. in reference numerics the fp8 operands are the bf16
//   ones.
// - run_indexer_scores: scores[t, j] = Σ_h (w[t,h] · head_dim^-0.5 · heads^-0.5) · ReLU(q[t,h] · K[j]) for the keys a
//   query at positions[t] sees (j < visible_t = min(key_count, (positions[t] + 1) div ratio)), fp32 accumulation.
//   Keys bf16 (mma.sync m16n8k16) or fp8 + a scale per key (mma.sync m16n8k32 e4m3: half the bytes; the scales are
//   factored out of the ReLU). The queries come in the keys' format from run_indexer_prepare.
//   heads 1 to 128, head_dim 32/64/128. Columns from visible_t on hold −inf or are left unwritten (the top-k reads
//   only the visible ones), so key_count may be a bound (the keys buffer's capacity) and the work follows the
//   positions: no kernel loads a key row past the last 64-key tile its CTA's queries see.
// - Several sequences in one launch: with sequence_slots, query t reads the keys of slot sequence_slots[t] at
//   keys + slot·keys_slot_stride (fp8: scales at key_scales + slot·key_scales_slot_stride; each query then has its own
//   CTAs); without, every query reads `keys`.
// - IndexerScoresParams::kernel: Warp, the mma.sync kernels (every shape); Warpgroup, the same scores on warpgroup
//   MMAs (sm_90a; bf16, or e4m3 at twice the bf16 rate) for head_dim 128 and up to 64 heads, refused otherwise;
//   WarpgroupStreamed, the Warpgroup kernel's shapes and MMAs with the keys streamed through a ring of shared-memory
//   stages (more key bytes in flight than registers hold): bf16 keys by cp.async, one CTA per SM; fp8 keys staged by
//   TMA in the 128B swizzle, both operands from shared memory, two CTAs per SM (head_dim summed in its natural order,
//   so its e4m3 per-step rounding may differ from Warpgroup's), through sequence_slots only with slot_count given and
//   keys_slot_stride a multiple of 128 (one tensor map over every slot's rows), refused otherwise;
//   Auto (the default), in those shapes: WarpgroupStreamed for fp8 keys (Warpgroup, with a warning, through slots it
//   cannot take), and for bf16 keys of one query over ≥ 16384 keys of one sequence; else Warpgroup for bf16 keys where
//   one sequence's launch scores ≥ 2^20 (query, key) pairs (tokens · key_count, no sequence_slots); else Warp. The e4m3
//   warpgroup MMA keeps about 14 bits of each k32 step's sum before the fp32 accumulate: operands of reference numerics
//   (fp4-rounded) sum exactly (the staged and register-fed kernels then agree bit for bit), plain e4m3 ones within ~1e-4
//   of Σ|w·q·k| (H200), against ~1e-8 for the mma.sync kernels.
// - run_indexer_scores_top_k: the scores and the top-k of top_k.hpp, in one launch where IndexerTopKMethod allows.
// - Asynchronous on `stream`, no allocation, no synchronisation (graph-capturable); unsupported shapes throw.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/kernels/top_k.hpp"

namespace dsv4::cuda {

struct IndexerPrepareParams {
  const float* input = nullptr;        // device fp32 [tokens, heads, head_dim] (token rows input_row_stride apart)
  int64_t input_row_stride = 0;        // elements from one token's row of input to the next; 0: heads · head_dim
  __nv_bfloat16* output = nullptr;     // device bf16 [tokens, heads, head_dim]; may not alias input. Or:
  uint8_t* output_fp8 = nullptr;       // device fp8 e4m3 [tokens, heads, head_dim], with
  float* output_scales = nullptr;      //   device fp32 [tokens, heads], one scale per vector
  int64_t tokens = 0;                  // rows = tokens · heads
  int64_t heads = 1;                   // vectors per token (index heads for q, 1 for keys)
  int64_t head_dim = 128;
  const int64_t* positions = nullptr;  // device [tokens]; needed with RoPE
  const float* rope_frequencies = nullptr;  // device [rope_dim / 2] (RopeTable::frequencies()), or
  const float2* rope_table = nullptr;  // device [positions, rope_dim / 2]: their factors (rope.hpp; rows past every
                                       // position); the same bits without a double sincos per pair. Neither: no RoPE
  int64_t rope_dim = 0;
  bool reference_rounding = false;     // Hadamard + bf16 + fp4/32 (reference numerics) instead of plain bf16
  cudaStream_t stream = nullptr;
};

void check_indexer_prepare_params(const IndexerPrepareParams& params);
void run_indexer_prepare(const IndexerPrepareParams& params);

enum class IndexerScoresKernel { Warp, Warpgroup, WarpgroupStreamed, Auto };

// How run_indexer_scores_top_k selects (run_indexer_scores ignores it):
// - LastCta: in the scores launch itself (any IndexerScoresKernel): the last CTA to finish a query group's scores
//   (a ticket in the top-k's workspace) sorts each query's visible scores and writes the top-k. Needs key_count ≤
//   kIndexerLastCtaMaxKeys (every visible count then sorts without a radix pass) and, where several CTAs span the
//   keys, at most kTopKMaxSplitQueries query groups and the workspace; refused otherwise. The scores are written too.
// - TopKKernel: the top-k's kernel with each CTA computing its range's scores (any key count; Warp scores only).
// - Auto: LastCta where it applies and each CTA scores one query (T = 1 or sequence_slots: decode steps), else
//   run_indexer_scores then run_top_k (two launches).
enum class IndexerTopKMethod { Auto, LastCta, TopKKernel };
inline constexpr int64_t kIndexerLastCtaMaxKeys = 2048;

struct IndexerScoresParams {
  // Queries [tokens, heads, head_dim], exactly one of: q (bf16, for bf16 keys), q_fp8 + q_scales (for fp8 keys), both
  // from run_indexer_prepare.
  const __nv_bfloat16* q = nullptr;      // device, 16-byte aligned
  const uint8_t* q_fp8 = nullptr;        // device, 8-byte aligned
  const float* q_scales = nullptr;       // device [tokens, heads]
  const float* head_weights = nullptr;   // device [tokens, heads]: weights_proj · x, not yet scaled
  int64_t head_weights_row_stride = 0;   // elements from one token's head weights to the next; 0: heads
  // Keys, exactly one of: keys (bf16) or keys_fp8 + key_scales (run_indexer_prepare's fp8 output for keys).
  const __nv_bfloat16* keys = nullptr;   // device [key_count, head_dim], 16-byte aligned
  const uint8_t* keys_fp8 = nullptr;     // device [key_count, head_dim] e4m3, 16-byte aligned
  const float* key_scales = nullptr;     // device [key_count]
  int64_t key_scales_slot_stride = 0;    // fp8 with sequence_slots: floats from one slot's scales to the next
  int64_t key_count = 0;                 // keys per sequence (or a bound: see the contract)
  const int32_t* sequence_slots = nullptr;  // device [tokens] or null (one sequence)
  int64_t keys_slot_stride = 0;          // elements (bf16 or fp8) from one slot's keys to the next
  int64_t slot_count = 0;                // with sequence_slots: the slots the keys buffer holds (every slot below
                                         // it); the staged kernel's bound (0: unknown, not staged: a warning)
  const int64_t* positions = nullptr;    // device [tokens] absolute positions
  int64_t tokens = 0;
  int64_t heads = 64;
  int64_t head_dim = 128;
  int64_t ratio = 4;                     // key j covers tokens up to ratio·(j+1) − 1
  float* scores = nullptr;               // device [tokens, score_stride]
  int64_t score_stride = 0;              // ≥ key_count
  IndexerScoresKernel kernel = IndexerScoresKernel::Auto;  // see the contract
  IndexerTopKMethod top_k_method = IndexerTopKMethod::Auto;  // run_indexer_scores_top_k only
  // The staged kernel's timeline (bench --trace; run_indexer_scores with fp8 keys on WarpgroupStreamed only): thread
  // 0 of each warpgroup stores %globaltimer at the IndexerTracePoint points, kIndexerTracePoints words per warp of
  // the grid (warps 0 and 4 of each CTA written; blockIdx.y-major).
  uint64_t* trace = nullptr;
  cudaStream_t stream = nullptr;
};

enum IndexerTracePoint {
  kIndexerTraceStart,     // CTA entry
  kIndexerTraceWaited,    // past the grid-dependency wait
  kIndexerTraceVisible,   // the CTA's visible keys known (its positions loaded), first key loads issued
  kIndexerTraceReady,     // query operands stored, first loads issued (past the CTA barrier)
  kIndexerTraceFirst,     // the first key tile landed
  kIndexerTraceLast,      // the last key tile landed
  kIndexerTraceEnd,       // scores stored
  kIndexerTraceSm,        // the SM id (not a time)
  kIndexerTraceTiles,     // tiles scored (not a time)
  kIndexerTracePoints
};

void check_indexer_scores_params(const IndexerScoresParams& params);
// Tests only: forget that run_indexer_scores' once-per-process warnings were given, so the next case that meets one
// warns again (a test of a warning then holds in any order and under --gtest_repeat).
void reset_indexer_warnings_for_tests();
void run_indexer_scores(const IndexerScoresParams& params);

// run_indexer_scores then run_top_k, in one launch by scores.top_k_method: selected, counts and nan_flag are
// run_top_k's on the scores (identical). From `top_k` only k, selected, counts, nan_flag, workspace,
// workspace_bytes and max_ctas_per_query are used: the candidates, queries, positions and ratio are the scores'.
// scores.scores ([tokens, score_stride]) is required. LastCta writes every score as run_indexer_scores does.
// TopKKernel: each of the top-k's CTAs scores its range of a query's visible keys itself (the same bits) straight
// into the top-k's shared-memory cache; scores holds only the ranges too long for a CTA's cache (many queries, few
// CTAs each), elsewhere it is left unwritten; heads · head_dim of the query operands must fit the top-k's sort
// buffer (32 KB: 64 × 128 bf16, 128 × 128 fp8).
void run_indexer_scores_top_k(const IndexerScoresParams& scores, const TopKParams& top_k);

}  // namespace dsv4::cuda
