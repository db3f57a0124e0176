// Sparse MQA attention with sink for prefill chunks (head_dim 512, the DSV4 models): the same call and numerics
// contract as run_sparse_attention (sparse_attention.hpp: window ∪ compressed slots per query, one softmax with the
// per-head sink in the denominator, inverse RoPE on the output's last rope_dim dims, bf16 or fp8 entries, q rounded to
// bf16, fp32 scores, softmax and accumulation), built for many queries: one CTA per (query, 64-head block) walks the
// query's whole slot list in 64-entry blocks, two at a time, with no split and no merge.
// The kernel (FlashMLA's sparse-prefill structure, written for this cache): a producer warpgroup gathers two blocks of
// entries by index into shared memory (bf16 entries by cp.async, fp8 entries dequantised to bf16 through registers);
// consumer warpgroup w computes S = Q Kᵀ of block w over all 512 dims (wgmma, N = 64 entries), the two hand their row
// maxima to each other through shared memory so both use one reference, and each accumulates the output's dims
// [256w, 256w + 256) over both blocks: its own block's P from registers, the other's from shared memory.
// Every kernel of a model step is a programmatic dependent launch: nothing an earlier kernel wrote is read before
// griddepcontrol.wait.
//
// Dispatch contract: head_dim 512 (bf16 entries, or fp8 entries in DeepSeek's 584-byte layout), any heads ≥ 1 (blocks
// of 64, padded), tokens ≥ 0; `splits` must be 1 and the workspace is unused. Asynchronous on `stream`, no
// allocation, no synchronisation (graph-capturable).
#pragma once

#include "backends/cuda/kernels/sparse_attention.hpp"

namespace dsv4::cuda {

// Whether run_sparse_attention_prefill serves this cache layout and head count (head_dim 512; fp8 entries in the
// 584-byte layout on pages of at least 2 entries).
bool sparse_attention_prefill_supports(const KvEntryLayout& layout, int page_shift, int heads);

// Throws (naming the shape, pointer or field at fault) unless run_sparse_attention_prefill supports the call.
void check_sparse_attention_prefill_params(const SparseAttentionParams& params);

// The CTAs run_sparse_attention_prefill launches: one per (query, 64-head block).
int64_t sparse_attention_prefill_ctas(const SparseAttentionParams& params);

// Whether the producer asks L2 for a pair's entries as soon as it has resolved them (no extra loads), so that the
// pair's later halves, copied only once the consumers release their buffers, wait for L2 rather than DRAM. Auto: where
// the grid is at most kSparseAttentionPrefillPrefetchWaves waves of (query, 64-head block) CTAs, decode batches, whose
// entries are read once and cold (H200, bf16 entries, bf16 q, L2 flushed: Flash CSA/HCA batch 256 86.4 / 81.6 →
// 80.2 / 78.2 µs, Pro CSA batch 64 / 256 42.3 / 142.1 → 38.7 / 135.5 µs); not for prefill chunks, whose queries share
// one sequence's entries in L2 (4096 queries: 952.6 → 975.0 µs).
enum class PrefetchResolved : uint8_t { Auto, Off, On };
inline constexpr int kSparseAttentionPrefillPrefetchWaves = 4;

// Traced launches (bench_cuda_attention_prefill --trace): each CTA owns kPrefillTraceWarps records of
// kPrefillTraceSlots words (one per warp; warps 0, 4 and 8, the first of consumer 0, consumer 1 and the producer, fill
// theirs): %globaltimer (ns) at the marks below (slots < kClocks), the SM id in kSm, %clock64 at the same marks in
// slot kClocks + mark, and %clock64 at each pair's events (kPairEvents) from slot kPairClocks; unreached marks keep
// what was there. Clocks compare within a CTA (one SM), the timer across CTAs.
inline constexpr int kPrefillTraceWarps = 12, kPrefillTraceSlots = 80;
namespace prefill_trace {
inline constexpr int kClocks = 16, kPairClocks = 32, kPairEvents = 10, kClockPairs = 4;
// Pair events, clock slot kPairClocks + pair · kPairEvents + event for pair < kClockPairs. Consumer 0: its block's
// valid flags waited, its max handed on, its own PV done (buffer 0 half 0 released), the pair's max received, consumer
// 1's weights received, the late half (buffer 1 half 0) waited, the other PV done (late half released), the next
// pair's scores done.
inline constexpr int kC0Valid = 0, kC0MaxSent = 1, kC0OwnPv = 2, kC0PairMax = 3, kC0OtherP = 4, kC0LateHalf = 5,
                     kC0OtherPv = 6, kC0NextScores = 7;
// Consumer 1: its scores issued, the late half's first tile waited, its scores done, consumer 0's max received, the
// pair's max handed back, consumer 0's weights received, buffer 0 half 1 waited, its own PV done (buffer 1 half 1
// released), the other PV done (buffer 0 half 1 released).
inline constexpr int kC1Issued = 0, kC1LateTile = 1, kC1Scores = 2, kC1MaxReceived = 3, kC1MaxSent = 4,
                     kC1OtherP = 5, kC1Half = 6, kC1OwnPv = 7, kC1OtherPv = 8;
// Producer: each half's release waited, in its order ((0, 0), (0, 1), (1, 1), (1, 0)), the last half's copies issued,
// the next pair's entries resolved.
inline constexpr int kEmpty00 = 0, kEmpty01 = 1, kEmpty11 = 2, kEmpty10 = 3, kLastIssued = 4, kNextResolved = 5;
inline constexpr int kStart = 0;  // every warpgroup: its first instruction after the barrier initialisation
// consumers: Q ready: staged in shared memory (fp32 q or fp8 entries) or, bf16 q with bf16 entries, its per-tile
// copies issued (the scores wait on each tile); consumer 0: its first data (buffer 0, half 0) arrived, its first
// scores done
inline constexpr int kQStaged = 1, kFirstData = 2, kFirstScores = 3;
// producer: the first pair's entries resolved, its first half's copies issued
inline constexpr int kResolved = 1, kFirstIssued = 2;
inline constexpr int kPairEnd = 4, kPairs = 8;  // consumer 0: pair i < kPairs done (its last wait)
// producer: pair i < kPairs's last half (buffer 1, dims 0-255) released to it by consumer 0's PV of the pair before
inline constexpr int kLastHalfReleased = 4;
// consumer 1, pair i < kConsumer1Pairs: that half's first tile arrived, consumer 0's max received
inline constexpr int kLastHalfArrived = 4, kMaxReceived = 8, kConsumer1Pairs = 4;
inline constexpr int kEpilogue = 12, kEnd = 13, kSm = 15;
inline constexpr int kStaged = 14;  // consumers, bf16 output: the rows staged in shared memory (before their stores)
}  // namespace prefill_trace

// Variants of the kernel that a benchmark compares on the same call.
struct SparseAttentionPrefillOptions {
  PrefetchResolved prefetch_resolved = PrefetchResolved::Auto;
  // Traced launch: tokens × head blocks × kPrefillTraceWarps × kPrefillTraceSlots words (nullptr: untraced kernel).
  uint64_t* trace = nullptr;
};

void run_sparse_attention_prefill(const SparseAttentionParams& params,
                                  const SparseAttentionPrefillOptions& options = {});

}  // namespace dsv4::cuda
