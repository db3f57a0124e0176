// The MoE sub-block on the GPU (dsv4-model.md §4), the same function as dsv4::cpu::moe_forward:
//   out[T, d] = Σ_k weight_k · expert_{idx_k}(u) + shared(u).
//
// Dispatch contract:
// - Five launches (three at T <= 8 with fused_small_batches), all on params.stream, no host
//   round-trip, no allocation, no synchronisation, so the sub-block can be captured in a CUDA graph: router GEMV
//   (+ u → bf16), scoring/top-k (or hash) + bucketing (fused: in the router launch's last CTA), grouped gate/up GEMM
//   with the clamped SwiGLU (bf16 h), grouped down GEMM (fp32 per-row outputs), combine (fused: by one CTA of each
//   band of the down launch once the band is done, moe_experts.hpp MoeFusedCombine; the same sums in the same
//   order). The grouped launches are sized for the worst case (T·top_k routed rows + T shared rows); CTAs without
//   work exit. The launches are chained with programmatic dependent launch: each kernel's CTAs may start while its
//   predecessor drains (the router's rows and the shared expert's weights start streaming before their inputs are
//   known) and wait for its results before reading them. The expert GEMMs run the streamed kernels (weights through
//   shared memory, 8-16 rows per pass) while the experts get few rows each, the register kernels otherwise
//   (MoeExpertKernels).
// - u is fp32 [T, d] (the ffn_norm output); the router reads it in fp32, the expert GEMMs read it rounded to bf16 and
//   keep the SwiGLU output h in bf16 (fp32 accumulation everywhere; the combine is fp32 in a fixed order, so the
//   result is deterministic run to run).
// - Expert weights MXFP4, NVFP4, FP8_BLOCK128 (e8m0 or fp32 scales) or BF16; routed and shared experts may differ in
//   format. d and I: multiples of 32 for fp4 experts (16 FP8, 8 BF16), from the tiny test models to V4-Pro.
// - Any T >= 1, experts with no token included.
// - Workspace: moe_workspace_bytes(config, T) bytes, 256-byte aligned, from the caller. Its first 1024 bytes hold
//   counters that must be zero before the first call (prepare_moe_workspace); every call leaves them zero except the
//   expert GEMMs' per-item counts (kMoeItemCountersOffset, kMoeCountedItemsMax words), which the next call's routing
//   zeroes before any expert launch reads them, so one workspace serves any number of calls and any T up to the one
//   it was sized for.
// - Hash layers: a token id outside the table is routed like token 0 and recorded; check_moe_status reports it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/moe_weights.hpp"

namespace dsv4::cuda {

// Stages that MoeRunParams::stage_events brackets: router GEMV, scoring + bucketing, gate/up, down, combine (the
// fused stages are empty: their work is in the router and down stages).
inline constexpr int kMoeStages = 5;

// Which expert GEMM kernels run_moe launches.
enum class MoeExpertKernels {
  AUTO,      // the streamed kernels where the layer allows them and moe_streams_experts says so, else the register ones
  STREAMED,  // the streamed kernels at any T where the layer allows them (tests, benchmarks), else the register ones
  REGISTER,  // the register-path kernels
};

// AUTO's rule. The streamed kernels read an expert's weights once per 16 rows of a work item, the register kernels
// once per 32, but stream faster: H200, bench_cuda_moe, streamed over register time: 0.51-0.74 at T = 1-256 (V4-Flash
// and V4-Pro), 0.59 at 512 and 0.66 at 1024 (V4-Flash: 12 and 24 rows per expert), 0.59 at 1024 (V4-Pro: 16). So
// AUTO streams while the routed experts average at most kMoeStreamedRowsPerExpert rows: T·top_k <= 32·E (V4-Flash:
// T <= 1365, V4-Pro: T <= 2048); larger prefill chunks take the register kernels.
inline constexpr int64_t kMoeStreamedRowsPerExpert = 32;
bool moe_streams_experts(const MoeConfig& config, int64_t tokens);

struct MoeRunParams {
  const float* u = nullptr;            // device, fp32 [T, d], 16-byte aligned
  const int32_t* token_ids = nullptr;  // device, [T]; needed on hash layers, else may be null
  float* out = nullptr;                // device, fp32 [T, d]; must not alias u or the workspace
  int tokens = 0;                      // T
  void* workspace = nullptr;           // device, moe_workspace_bytes(config, T) bytes
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
  // Optional (benchmarks): kMoeStages + 1 events recorded on the stream before the first stage and after each.
  const cudaEvent_t* stage_events = nullptr;
  MoeExpertKernels expert_kernels = MoeExpertKernels::AUTO;
  // At T <= 8 (kMoeFusedRoutingMaxTokens, kMoeFusedCombineMaxTokens): the routing in the router launch and the
  // combine in the down launch, three launches instead of five (false: the five, for comparisons).
  bool fused_small_batches = true;
  // The streamed expert kernels' fp4 stages: the lean ones (MoeExpertGemmParams::lean_decode) or weight_tile_mma's;
  // the same bits. H200, bench_cuda_moe, MXFP4, lean against weight_tile_mma's at T <= 8 (session 14, when the lean
  // stages also had their own e2m1 decode; both now decode the repacked DEVICE words): V4-Flash T = 1 66.6 vs 70.8 µs,
  // T = 8 239.3 vs 256.7; V4-Pro T = 1 126.7 vs 131.8, T = 8 533.1 vs 571.7.
  bool lean_expert_decode = true;
  // MoeRoutingParams::decode_router (T <= 8 with fused_small_batches): the decode router (its default) or the fused
  // router kernel.
  bool decode_router = true;
  // MoeExpertGemmParams::shared_expert_split for the streamed kernels: the FP8 shared
  // expert's CTAs split in two so they stream the bytes of a routed fp4 CTA; the shared expert's sums in another
  // order (as exact). ONE_WAVE: where the expert launches stay one wave, which the shared expert's CTAs ended alone
  // (V4-Flash at T = 1). H200, bench_cuda_moe, NVFP4 (GPU rounds s15-2/3): V4-Flash T = 1 59.4 -> 51.8 us alone,
  // 49.0 with down_head_start; split at every T <= 8: V4-Flash T = 2-8 within ±1 %, V4-Pro T = 1 110.5 -> 119.4,
  // T = 8 536.1 -> 549.1 (several waves).
  MoeSharedExpertSplit shared_expert_split = MoeSharedExpertSplit::ONE_WAVE;
  // MoeExpertGemmParams::down_head_start for the streamed down kernel at T <= 8: every
  // down CTA starts streaming its w2 band before waiting for the gate/up launch. The same bits. Same run: T = 1
  // 59.4 -> 56.9 us, T = 8 221.9 -> 219.1.
  bool down_head_start = true;
  // MoeExpertGemmParams::column_stages for the streamed kernels at T <= 2: fp4 stages
  // sum each scale block of each item row in its own MMA output column and scale the fp32 column sums; the block
  // sums in another order (as exact). bench_cuda_moe against the lean stages, H200 (GPU round s16-3): V4-Flash
  // NVFP4 T = 1 51.3 -> 50.1 us, T = 2 87.8 -> 84.7, V4-Pro NVFP4 T = 1 114.3 -> 110.3; H100 (round s16-2, T = 1):
  // V4-Flash NVFP4 57.4 -> 56.5, MXFP4 60.3 -> 59.6, V4-Pro NVFP4 145.5 -> 138.5.
  bool column_stages = true;
  // MoeExpertGemmParams::down_waits_per_item for the streamed kernels at T <= 8: each down CTA waits for its own
  // item's gate/up CTAs, not the whole gate/up grid. The same bits. H200, bench_cuda_moe, V4-Flash NVFP4 (GPU round
  // s18-2): T = 1 49.8 -> 49.1 us, T = 2 83.1 -> 75.0, T = 8 220.4 -> 216.8; e2e 8 layers b1 751.5 -> 761.1 t/s.
  // (The expert GEMMs in one launch, each CTA's gate/up band then its down band with w2 streaming during the last
  // gate/up stages, measured slower in the same round: T = 1 53.9 us, e2e b1 709.9 t/s; removed. Every work item's
  // CTAs split in two per band where the launches pass one wave, round s18-3, H100: Flash T = 2 86.5 -> 94.0 us,
  // T = 8 252.4 -> 293.2, Pro T = 1 125.1 -> 125.8, e2e b8 2363.6 -> 2155.5 t/s; removed.)
  bool down_waits_per_item = true;
  // (The streamed kernels' counters are release / acq_rel adds, the combine's slots read before its ticket, since
  // session 22; against sequentially consistent fences, the same bits, H200, bench_cuda_moe, V4-Flash NVFP4, round
  // s22-3: T = 1 47.2 vs 47.9 µs, T = 2 70.1 vs 71.5, T = 8 199.5 vs 203.7; e2e 8 layers b1 interleaved 781.6 /
  // 770.3 / 776.0 vs 775.8 / 769.7 / 774.8 t/s. The fence form stays only in the register kernel's combine.)
  // (Session 21: the expert weight copies with an L2 evict-first policy and the gate/up CTAs' L2 prefetch of the
  // experts' tables were faster alone (T = 1 44.7 vs 48.3 µs) but slower in a model step (8 layers b1 761.8 / 767.1 /
  // 759.0 t/s against 767.8 / 767.9 / 768.4): removed in session 22, the copies without a cache hint.)
  // (Session 23's removed variants, level or slower, in bench/NOTES.md: CTAs alone on an SM are fp4-issue-bound.)
  // (The down CTAs hold their SMs only for their own work: the band's last item's CTA sums the fused combine.)
  // Optional (benchmarks): traced expert launches (MoeExpertGemmParams::trace; the streamed one-tile kernels with the
  // lean decode, T <= 8), each buffer moe_expert_trace_words(...) entries.
  uint64_t* trace_gate_up = nullptr;
  uint64_t* trace_down = nullptr;
};

// Entries of a traced expert launch's buffer (MoeRunParams::trace_gate_up / trace_down): kMoeTraceSlots per warp of
// the launch's grid.
size_t moe_expert_trace_words(const MoeConfig& config, int64_t tokens, bool gate_up);

// Whether run_moe's expert launches for these parameters split the shared expert's CTAs (moe_shared_expert_splits
// on the current device; the grid rows of a traced launch).
bool moe_splits_shared_expert(const DeviceMoeWeights& weights, const MoeRunParams& params);

// Kernel launches run_moe makes for these parameters (a CUDA graph of the call has as many kernel nodes).
int moe_launches(const DeviceMoeWeights& weights, const MoeRunParams& params);

size_t moe_workspace_bytes(const MoeConfig& config, int64_t tokens);
// Byte offset in the workspace of the expert GEMMs' per-item counts (kMoeCountedItemsMax uint32 words, among the
// counters of its first 1 KB; left as counted by a call, zeroed by the next call's routing).
inline constexpr size_t kMoeItemCountersOffset = 512;

// Zeroes the workspace's counters (its first 1 KB, asynchronously on `stream`); once per workspace.
void prepare_moe_workspace(void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Throws naming the field at fault unless run_moe supports the call.
void check_moe_params(const DeviceMoeWeights& weights, const MoeRunParams& params);

void run_moe(const DeviceMoeWeights& weights, const MoeRunParams& params);

// Synchronises params.stream; throws naming the position of a token whose id lay outside the hash table in a call
// since the last check (and clears the record).
void check_moe_status(const MoeRunParams& params);

// Where the last call's routing sits in the workspace (device pointers; tests and tools): expert ids and weights
// [T, top_k], the SwiGLU output h [T·top_k + T, I] bf16 and the down outputs [T·top_k + T, d] fp32 by expert-sorted
// row, and the row of every slot [T·top_k] (the shared expert's row of token t is T·top_k + t).
struct MoeWorkspaceView {
  const int32_t* expert_ids = nullptr;
  const float* expert_weights = nullptr;
  const uint16_t* h_bf16 = nullptr;
  const float* down = nullptr;
  const int32_t* slot_rows = nullptr;
};
MoeWorkspaceView moe_workspace_view(const MoeConfig& config, int64_t tokens, const void* workspace);

}  // namespace dsv4::cuda
