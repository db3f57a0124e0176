// Decode-path quantized linear layer on Hopper tensor cores: y[T, N] = x[T, K] · Wᵀ for T = 1..64 tokens, W stored
// as BF16, FP8_BLOCK128 (e8m0 or fp32 scales), MXFP4 or NVFP4 on the device, dequantised exactly to bf16 in
// registers, bf16 mma.sync with fp32 accumulation (weight_tile_mma.cuh holds the warp-level block and its NOTES).
//
// Dispatch contract:
// - x is bf16 [T, groups·K] with a row stride of x_row_stride elements (>= groups·K). The output is exactly one of
//   y (fp32) and y_bf16 (bf16, rounded to nearest even), [T, N] with a row stride of y_row_stride elements (>= N);
//   it must not overlap x or the workspace. Rows of x that are 16-byte
//   aligned (stride a multiple of 8) are staged 16 bytes at a time, others element by element.
// - Any N and K >= 1. The fast path needs weight rows that start 16-byte aligned (every DSV4 shape: K a multiple of
//   8 / 16 / 32 for BF16 / FP8 / fp4); other rows (tiny test models) are read bytewise. Partial scale blocks are
//   handled. MXFP4 scale codes must be <= 128 (check_quantized_linear_scales).
// - groups > 1 is the grouped output projection (wo_a): the matrix is G independent blocks of N/G rows, and
//   y[t, g·(N/G) + r] = Σ_k W[g·(N/G) + r, k] · x[t, g·K + k]. N must be a multiple of G.
// - Split-K: when the shape has too few 64-row CTAs for the GPU (choose_quantized_linear_config), K is split over
//   CTAs that write fp32 partial sums to the caller's workspace; the last CTA of each row block (an atomic ticket
//   in the workspace) adds them in split order, so results are deterministic, and resets its ticket to 0. The
//   workspace (quantized_linear_workspace_bytes) must be zero-filled ONCE when allocated and may then be reused
//   by any number of launches on one stream, of any shape (kLinearTicketAreaBytes), never by two launches running
//   concurrently.
// - Split-K on the STREAMED path may instead reduce inside a thread-block cluster (SplitKReduce::CLUSTER, up to
//   kLinearMaxClusterSplits splits): the splits of a row block form one cluster, each CTA stores its partial tile
//   into rank 0's shared memory (distributed shared memory stores completing on an mbarrier there) and rank 0 adds
//   them in split order: the same sums in the same order as the workspace (bitwise equal), without the global round
//   trips; no workspace.
// - The STREAMED path is launched as a programmatic dependent launch: its CTAs may begin streaming weights while
//   the previous kernel in the stream drains, and read x (and write y and the workspace) only once it has completed.
// - RMSNorm prologue (optional, groups = 1, K <= kRmsNormMaxWidth): instead of x, norm_x holds fp32 rows (x_row_stride
//   apart) and every CTA normalises them itself before staging: the staged x is bf16(x · rsqrt(mean(x²) + eps) · w),
//   bit for bit run_rms_norm's y_bf16 for the same row (the same summation order), so the result equals
//   run_rms_norm followed by this op on its bf16 output, without that launch. Each CTA reads the whole of its tokens'
//   rows once more for the sum of squares: meant for few tokens.
// - Asynchronous on `stream`; no allocation, no host synchronisation (CUDA-graph capturable). Anything unsupported
//   is refused with an error naming the shape, format or pointer; there is no fallback path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

inline constexpr int kLinearMaxTokens = 64;

// How the warps read weight rows (weight_tile_mma.cuh): ALIGNED, plain 16-byte loads into registers and one FP8
// block scale per 16-row tile, for 16-byte aligned rows in groups of whole 16-row tiles (every DSV4 shape);
// GENERIC, any layout (bytewise where rows are not aligned, FP8 scales per row); STREAMED, the ALIGNED conditions
// plus K a multiple of 256 stored bytes (512 fp4, 256 FP8, 128 BF16 inputs) and at most kLinearMaxStreamedTokens
// tokens (every DSV4 shape at decode): each warp's
// rows stream through a shared-memory ring filled by tensor copies, which keeps more bytes in flight per SM. AUTO
// takes STREAMED where it applies and measured faster (FP8 and fp4 at T <= 8, BF16 at T = 1, and FP8 / fp4 up to
// T = 16 with the cluster reduction where that applies: SplitKReduce), else ALIGNED, else GENERIC.
enum class WeightLoadPath : uint8_t { AUTO, ALIGNED, GENERIC, STREAMED };

inline constexpr int kLinearMaxStreamedTokens = 16;

// How split-K partial sums meet: AUTO picks (CLUSTER on the STREAMED path, when the load path is AUTO too, for grids of
// at most two CTAs per SM, and at T <= 8 for small matrices whose K still splits 8+ ways within 2.5 CTAs per SM; else
// WORKSPACE); WORKSPACE, through the caller's workspace and an atomic ticket per row block; CLUSTER, inside a
// thread-block cluster (STREAMED path only, at most kLinearMaxClusterSplits splits, so K may be split fewer ways).
enum class SplitKReduce : uint8_t { AUTO, WORKSPACE, CLUSTER };

inline constexpr int kLinearMaxClusterSplits = 16;  // Hopper's non-portable cluster size limit

// Every split-K workspace of the linear kernels (this one and quantized_gemm) keeps its tickets in its first
// kLinearTicketAreaBytes, zero between launches, and its partial sums after them: calls of different shapes may then
// share one workspace (the engine's), as no call's partial sums land on another call's tickets. 4096 tickets: a split
// call has fewer row blocks than half the GPU's resident CTAs.
inline constexpr size_t kLinearTicketAreaBytes = 16 * 1024;

struct QuantizedLinearParams {
  DeviceMatrixView weight;             // [N, K] on the device
  const __nv_bfloat16* x = nullptr;    // device, bf16 [tokens, groups·K]
  int64_t x_row_stride = 0;            // elements between token rows of x (>= groups·K; a multiple of 8 is fastest)
  float* y = nullptr;                  // device, fp32 [tokens, N]; null when y_bf16 is set
  int64_t y_row_stride = 0;            // elements between token rows of the output (>= N)
  int tokens = 1;                      // T, 1..kLinearMaxTokens
  int groups = 1;                      // G: 1, or the block count of a grouped projection
  void* workspace = nullptr;           // split-K partial sums + tickets; may be null when the size query says 0
  size_t workspace_bytes = 0;          // bytes available at `workspace`
  cudaStream_t stream = nullptr;
  __nv_bfloat16* y_bf16 = nullptr;     // device, bf16 [tokens, N] instead of y (saves a conversion launch)
  const float* norm_x = nullptr;       // RMSNorm prologue: device fp32 [tokens, K] instead of x (x must be null)
  const float* norm_weight = nullptr;  // device fp32 [K], with norm_x
  float norm_eps = 0.0f;               // rms_norm_eps, with norm_x
  // Benchmarks: the kernel's timeline (FP8 or BF16 on the STREAMED path at up to 8 tokens only; another kernel
  // instantiation, the default ones carry nothing of it): lane 0 of every warp stores the SM id and %globaltimer (ns)
  // at the LinearTraceSlot points into trace[warp · kLinearTraceSlots + slot], warp = (blockIdx.y · gridDim.x +
  // blockIdx.x) · 4 + warp in the CTA.
  uint64_t* trace = nullptr;
};

// The points of a traced launch (QuantizedLinearParams::trace): the SM id, the CTA's start, its first weight copies
// issued, the previous kernel done (grid-dependency wait), the x tile staged, for each of the warp's first
// kLinearTraceStages stages its data in shared memory and its MMAs done, all stages done, and the output written.
inline constexpr int kLinearTraceStages = 8;
enum LinearTraceSlot : int {
  TRACE_SM = 0,
  TRACE_START,
  TRACE_ISSUED,
  TRACE_PRIOR_DONE,
  TRACE_X_STAGED,
  TRACE_STAGE_READY,  // + 2·j: stage j's data arrived; + 2·j + 1: stage j multiplied
  TRACE_MULTIPLIED = TRACE_STAGE_READY + 2 * kLinearTraceStages,
  TRACE_END,
  kLinearTraceSlots
};

// How one launch covers the matrix: CTAs of rows_per_cta weight rows (one 16-row tile per warp) × k_splits slices of
// split_k inputs, each slice walked in chunks of chunk_k inputs (the x tile staged in shared memory per chunk).
struct QuantizedLinearConfig {
  int rows_per_cta = 0;
  int64_t row_blocks = 0;   // CTAs along N
  int k_splits = 0;         // CTAs along K (> 1: split-K through the workspace)
  int64_t split_k = 0;      // inputs per split, a multiple of 128
  int64_t chunk_k = 0;      // inputs per staged x tile, a multiple of 128
  int token_tiles = 0;      // 8-token MMA tiles per warp (1, 2, 4 or 8)
  WeightLoadPath load_path = WeightLoadPath::AUTO;  // never AUTO in a chosen config
  int ring_slots = 0;       // STREAMED: stages in flight per warp (0 on the other paths)
  int ctas_per_sm = 0;      // resident CTAs per SM the split-K choice assumed (registers, shared memory)
  size_t smem_bytes = 0;    // dynamic shared memory of one CTA
  size_t workspace_bytes = 0;  // 0 without split-K
  size_t ticket_bytes = 0;     // the workspace's first ticket_bytes hold the tickets (zero between launches)
  SplitKReduce reduce = SplitKReduce::WORKSPACE;  // never AUTO in a chosen config (meaningful when k_splits > 1)
};

// The tiling for this weight, token count and group count on a device with `multiprocessors` SMs; throws (naming
// the problem) on what run_quantized_linear refuses. `load_path` other than AUTO forces that path; ALIGNED and
// STREAMED are refused where they do not apply. `ring_slots` > 0 sets the STREAMED path's stages per warp (1 to 4;
// benchmarks compare depths), 0 takes the default. `reduce` CLUSTER is refused off the STREAMED path. `k_splits` > 0
// (STREAMED only) asks for that many K splits instead of the default's (benchmarks compare the balance); the config
// may split fewer ways (whole stages per split, at most kLinearMaxClusterSplits with CLUSTER).
QuantizedLinearConfig choose_quantized_linear_config(const DeviceMatrixView& weight, int tokens, int groups,
                                                     int multiprocessors,
                                                     WeightLoadPath load_path = WeightLoadPath::AUTO,
                                                     int ring_slots = 0, SplitKReduce reduce = SplitKReduce::AUTO,
                                                     int k_splits = 0);

// Whether the STREAMED load path can run this weight at this token and group count.
bool streamed_load_path_applies(const DeviceMatrixView& weight, int tokens, int groups);

// Whether `ring_slots` (1 to 4) STREAMED stages per warp and an x tile of one stage at `tokens` (1 to
// kLinearMaxStreamedTokens) fit one CTA's shared memory: where they do not, choose_quantized_linear_config refuses the
// STREAMED path at that depth. Throws on arguments out of those ranges.
bool streamed_rings_fit(const DeviceMatrixView& weight, int tokens, int ring_slots);

// Workspace run_quantized_linear needs for any call of 1..tokens tokens on the current device (0 when no split-K).
size_t quantized_linear_workspace_bytes(const DeviceMatrixView& weight, int tokens, int groups = 1);

// Throws, naming the matrix `what` and the first offending block, unless every scale of the host matrix is in the
// range the tensor-core dequantisation is exact for: MXFP4 e8m0 codes <= 128 (scales <= 2; larger ones make the
// bf16 factor 2^(e-1) overflow, and the products e2m1 · 2^(e-127) could exceed bf16's range). Call it when
// uploading weights that will run through run_quantized_linear (or the MoE kernels built on weight_tile_mma.cuh).
void check_quantized_linear_scales(const QuantizedMatrix& host, std::string_view what);

// Throws (naming the format, shape, token count, stride or pointer at fault) unless run_quantized_linear supports
// the call on the current device.
void check_quantized_linear_params(const QuantizedLinearParams& params);

void run_quantized_linear(const QuantizedLinearParams& params);
// The same with a config from choose_quantized_linear_config for this call on this device (tests and benchmarks
// compare the load paths this way); any other config is refused.
void run_quantized_linear(const QuantizedLinearParams& params, const QuantizedLinearConfig& config);

}  // namespace dsv4::cuda
