// Grouped expert GEMMs of the MoE (dsv4-model.md §4), one launch each over every touched expert plus the shared
// expert (expert id E), driven by the work items that moe_routing wrote on the device, in one of two kernel sets:
// the register path (weights loaded into registers, L2 prefetches ahead; items of many rows reuse each weight for 32
// rows per pass) or the streamed path (weights streamed through shared memory by the tensor copy engine, 8 or 16
// rows per pass: for items of few rows, on layers whose matrices allow it):
// - gate/up: h[row, :] = silu(min(w1 · u[token(row)], limit)) · clamp(w3 · u[token(row)], ±limit), rounded to bf16;
// - down:    down[row, :] = w2 · h[row, :] in fp32.
// A CTA owns a band of weight rows of one work item's expert and loops over the item's rows (tokens) in tiles, so
// each weight byte is fetched from memory once per item; the grid is sized for the worst case
// (moe_max_work_items) and CTAs past *work_item_count exit, so the launches need no host knowledge of the routing.
//
// Dispatch contract: asynchronous on `stream`, no allocation, no synchronisation (graph-capturable). Weights
// MXFP4, NVFP4, FP8_BLOCK128 (e8m0 or fp32 scales) or BF16 with the view's format read per expert on the device
// (routed and shared experts may differ); d and I any multiples of moe_expert_k_granularity of both formats (32 for
// fp4: tiny test models included); activations bf16, accumulation fp32.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"

namespace dsv4::cuda {

struct MoeExpertView;  // moe_weights.hpp
namespace tile::stream {
struct StreamMaps;  // weight_tile_mma.cuh
}

// Rows (tokens) per work item: an item's rows are served by one CTA per weight-row band.
inline constexpr int kMoeRowsPerWorkItem = 64;
// Weight rows per CTA band of the down GEMM (the fused combine keeps one ticket per band).
inline constexpr int kMoeDownBandRows = 128;
// The most tokens the fused combine serves (its last CTA per band sums T · band rows outputs).
inline constexpr int kMoeFusedCombineMaxTokens = 8;
// The most work items MoeExpertGemmParams::down_waits_per_item serves (its per-item counters).
inline constexpr int kMoeCountedItemsMax = 64;

// The combine done by the down GEMM itself (few tokens): once every CTA of a band of kMoeDownBandRows weight rows has
// finished, over every work item, one of them (the streamed kernels: the band's CTA of the last work item; the
// register kernel: the last to arrive) writes out[t, n] = down[T·top_k + t][n] + Σ_j weight[t, j] · down[row(t, j)][n]
// for the band's n, in moe_combine's order (bit-identical to run_moe_combine), so the combine launch goes.
// Forward progress: the streamed kernels' summing CTA waits (acquire loads, no barrier the hardware knows of) for its
// band's other CTAs, so it relies on them being scheduled while up to one summing CTA per band occupies an SM slot.
// run_moe_down refuses such a launch unless the bands are fewer than the CTAs of the kernel the GPU holds at once
// (SMs × resident CTAs per SM at the kernel's largest shared memory); the register kernel's summing CTA (the last to
// arrive) waits for nobody.
struct MoeFusedCombine {
  float* out = nullptr;                   // [T, d]; null: no fused combine
  const float* expert_weights = nullptr;  // [T, top_k]
  const int32_t* slot_rows = nullptr;     // [T, top_k]
  uint32_t* band_tickets = nullptr;       // [ceil(d / kMoeDownBandRows)], zero before the call; left zero
  int band_ticket_capacity = 0;           // entries at band_tickets
  int tokens = 0;                         // T <= kMoeFusedCombineMaxTokens
  int top_k = 0;
};

// Where the shared expert's CTAs split (MoeExpertGemmParams::shared_expert_split, moe_shared_expert_splits).
enum class MoeSharedExpertSplit {
  NEVER,
  ONE_WAVE,  // where the split launch stays within one wave of CTAs (V4-Flash at T = 1 on a 132-SM GPU)
  ALWAYS,    // at every T <= 8 (tests, benchmarks)
};

struct MoeExpertGemmParams {
  const MoeExpertView* experts = nullptr;  // device [E + 1]; [E] is the shared expert
  WeightFormat routed_format = WeightFormat::MXFP4;  // host copies of the formats, checked before launching
  WeightFormat shared_format = WeightFormat::FP8_BLOCK128;
  int experts_count = 0;                   // E
  int hidden = 0;                          // d
  int intermediate = 0;                    // I
  float swiglu_limit = 10.0f;
  const __nv_bfloat16* u_bf16 = nullptr;   // [T, d]
  const int32_t* row_tokens = nullptr;     // [rows]: the token of each expert-sorted row
  const MoeWorkItem* work_items = nullptr; // [max_work_items]
  const int32_t* work_item_count = nullptr;
  int max_work_items = 0;
  __nv_bfloat16* h = nullptr;              // [rows, I]
  float* down = nullptr;                   // [rows, d]
  // The streamed kernels (shared-memory weight streams, any item size; the weights are read once per 16 rows of
  // an item, so they suit items of few rows); every expert matrix must pass moe_streamed_tiles_apply.
  bool streamed = false;
  const tile::stream::StreamMaps* stream_maps = nullptr;  // device [E + 1][w1, w3, w2] (encode_moe_stream_maps)
  // Streamed kernels: fp4 stages through the MoE's own lean stage product (moe_experts.cuh, namespace lean: no
  // per-load choice between x and zeros). Same operands, same MMAs in the same order: the same bits.
  bool lean_decode = false;
  // Streamed kernels at T <= 8 where moe_shared_expert_splits: the shared expert's CTAs split in two per band, each
  // covering half the band's rows with two warps per 16 rows (even and odd stages, summed in shared memory), so a
  // shared CTA streams the bytes of a routed one instead of twice them (the FP8 shared expert beside fp4 routed
  // experts) and the launch no longer ends on the shared expert's CTAs alone. One CTA more per band; the shared
  // expert's sums are added in another order (even-stage + odd-stage partial sums, both fp32): as exact, not the
  // same bits.
  MoeSharedExpertSplit shared_expert_split = MoeSharedExpertSplit::NEVER;
  // run_moe_down, streamed kernels at T <= 8: every CTA (not only the shared expert's) reads its work item and starts
  // streaming its weights before waiting for the previous launch, so the down weights flow while the gate/up CTAs
  // finish. Only valid where the previous launch on the stream is run_moe_gate_up of the same routing (run_moe's
  // order): its CTAs let this launch start only after the routing is complete. The same bits.
  bool down_head_start = false;
  // Streamed kernels at T <= 2 where moe_column_stages_apply (no effect elsewhere): fp4 stages put each scale
  // block's sum (per item row) in its own MMA output column and scale the fp32 column sums (moe_experts.cuh,
  // namespace columns) instead of multiplying every weight pair by its factor (NVFP4 stage 745 -> 675 SASS
  // instructions). The block sums in another fp32 order: as exact, not the same bits. x is staged × 2^64 (|x| must
  // stay below 2^64).
  bool column_stages = false;
  MoeFusedCombine combine;  // run_moe_down only
  int tokens = 0;           // T (the streamed kernels size their x region by it)
  // down_waits_per_item: [kMoeCountedItemsMax] device counters, zero before the call (the call's routing zeroes
  // them: MoeRoutingBuffers::item_counters); left as counted.
  uint32_t* item_counters = nullptr;
  // run_moe_gate_up / run_moe_down where moe_down_waits_per_item_apply (the one-tile streamed kernels with the down
  // head start): each down CTA waits for its own item's gate/up CTAs (per-item counts at item_counters, published by
  // the gate/up CTAs) instead of the whole gate/up grid, so the down CTAs of the items done early (the first wave at
  // T = 2-8) run beside the last gate/up CTAs. Only where the previous launch on the stream is run_moe_gate_up of the
  // same parameters (run_moe's order). The same bits.
  bool down_waits_per_item = false;
  // Traced launch (benchmarks; the one-tile streamed kernels with the lean decode, T <= 8): lane 0 of every warp stores
  // %globaltimer (ns) at the MoeTraceSlot points into trace[warp · kMoeTraceSlots + slot], warp = (blockIdx.y ·
  // gridDim.x + blockIdx.x) · 8 + warp in the CTA (null: not traced; the untraced kernels carry nothing of it).
  uint64_t* trace = nullptr;
  cudaStream_t stream = nullptr;
};

// The points of a traced launch (MoeExpertGemmParams::trace): the SM id, the CTA's start, its first weight copies
// issued (0 where the CTA has no item), its item's inputs ready (the prior grids' wait or the item's gate/up CTAs
// passed), x staged, for each of the first kMoeTraceStages stages its data in shared memory and its MMAs done, the
// rows written, the band's other CTAs arrived (the fused combine's summing CTA only), and the end (after the fused
// combine).
inline constexpr int kMoeTraceStages = 8;
enum MoeTraceSlot : int {
  MOE_TRACE_SM = 0,
  MOE_TRACE_START,
  MOE_TRACE_ISSUED,
  MOE_TRACE_READY,
  MOE_TRACE_X_STAGED,
  MOE_TRACE_STAGE,  // + 2·j: stage j's data arrived; + 2·j + 1: stage j multiplied
  MOE_TRACE_WRITTEN = MOE_TRACE_STAGE + 2 * kMoeTraceStages,
  MOE_TRACE_COMBINE_READY,
  MOE_TRACE_END,
  kMoeTraceSlots
};
inline constexpr int kMoeTraceWarpsPerCta = 8;

// Whether every matrix of these experts can be streamed through shared memory (16-byte aligned rows and scales, d
// and I multiples of the formats' stages: 512 fp4, 256 FP8, 128 BF16 inputs, and at least two stages).
bool moe_streamed_tiles_apply(const std::vector<MoeExpertView>& experts);

// The streamed kernels' tensor maps of every expert matrix, [E + 1][w1, w3, w2], uploaded to the device (experts
// that moe_streamed_tiles_apply accepts). `what` names the layer in errors.
DeviceBuffer encode_moe_stream_maps(const std::vector<MoeExpertView>& experts, std::string_view what);

// Whether a streamed GEMM of input size k_total takes the column stages (MoeExpertGemmParams::column_stages):
// T <= 2 and the item's rows of the whole K, with the zero block, fit the x region (V4-Flash both GEMMs; V4-Pro's
// gate/up at T = 2 does not: d 7168).
bool moe_column_stages_apply(const MoeExpertGemmParams& params, int64_t k_total);

// K granularity of an expert format: one 16-byte load of stored weights (8 BF16, 16 FP8, 32 fp4 values).
int64_t moe_expert_k_granularity(WeightFormat format);

// Whether shared_expert_split applies on a GPU of `multiprocessors` SMs: streamed one-tile launches (T <= 8) whose
// shared expert takes more stages per weight row than the routed experts (a smaller stage_k: FP8 or BF16 beside
// fp4), at least 2·kStreamedSlots stages per row of each matrix, and for ONE_WAVE both launches' working CTAs with
// the split within two per SM. Past one wave the shared expert's CTAs (the first to start) no longer end the launch
// alone, and the split was slower (H200, V4-Pro T = 1: 110.5 -> 119.4 us; V4-Flash T = 2-8 within ±1 %).
bool moe_shared_expert_splits(const MoeExpertGemmParams& params, int multiprocessors);

// Throws naming the field or format at fault unless the grouped GEMMs support the call.
void check_moe_expert_gemm_params(const MoeExpertGemmParams& params);

void run_moe_gate_up(const MoeExpertGemmParams& params);
void run_moe_down(const MoeExpertGemmParams& params);

// Whether MoeExpertGemmParams::down_waits_per_item takes effect: set, item counters, the streamed kernels with the
// down head start at T <= 8 and at most kMoeCountedItemsMax work items.
bool moe_down_waits_per_item_apply(const MoeExpertGemmParams& params);

}  // namespace dsv4::cuda
