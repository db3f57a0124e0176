// The kernel behind run_quantized_linear (quantized_linear.hpp holds the contract).
//
// NOTES:
// - One CTA = 4 warps = 64 consecutive weight rows (one 16-row tile per warp) × one split of K. The x slice is
//   staged once per chunk into shared memory (weight_tile_mma.cuh's permuted order) and shared by the 4 warps;
//   weights stream from HBM once, straight into registers (no shared-memory round trip).
// - Split-K reduction without a memset or fp32 atomics: each CTA stores its unscaled partial tile to the workspace,
//   fences, and takes a ticket; the CTA that draws the last ticket of its row block sums the partials in split
//   order (a fixed order, so the result does not depend on which CTA finishes last) and resets the ticket.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/ptx/cluster.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/warp_trace.cuh"

namespace dsv4::cuda::linear {

inline constexpr int kWarpsPerCta = 4;
inline constexpr int kRowsPerCta = kWarpsPerCta * tile::kTileRows;
inline constexpr int kThreadsPerCta = kWarpsPerCta * tile::kWarpSize;

struct LinearKernelArgs {
  DeviceMatrixView weight;
  const __nv_bfloat16* x;
  int64_t x_row_stride;
  float* y;                // fp32 output, or null
  __nv_bfloat16* y_bf16;   // bf16 output, or null
  int64_t y_row_stride;
  int tokens;
  int64_t rows_per_group;        // N / G (N when not grouped)
  int64_t row_blocks_per_group;  // CTAs along the rows of one group
  int k_splits;
  int64_t split_k;
  int64_t chunk_k;
  int ring_slots;     // STREAMED path: stages in flight per warp
  uint32_t* tickets;  // [row_blocks], split-K only
  float* partials;    // [k_splits][tokens][N], split-K only
  tile::stream::StreamMaps maps;  // STREAMED path: the weight's tensor maps (a __grid_constant__ parameter there)
  const float* norm_x;       // RMSNorm prologue: fp32 input rows (x_row_stride apart) instead of x, or null
  const float* norm_weight;  // [K]
  float norm_eps;
  uint64_t* trace;           // traced launches (QuantizedLinearParams::trace), or null
};

// Records a LinearTraceSlot point of the calling warp (lane 0 stores) when kTrace; nothing otherwise.
template <bool kTrace>
__device__ __forceinline__ void trace_point(const LinearKernelArgs& args, int slot) {
  if constexpr (kTrace)
    sm90::record_warp_trace_point(args.trace, kWarpsPerCta, kLinearTraceSlots, slot, TRACE_START, TRACE_SM);
}

// What one CTA computes (both load paths): up to 64 rows [row0, row_end) of one group, whose x columns start at
// group·K, over the K range [split_begin, split_end) of its split.
struct CtaWork {
  int64_t group, row0, row_end, split_begin, split_end;
};

__device__ __forceinline__ CtaWork cta_work(const LinearKernelArgs& args, int64_t row_block, int split) {
  // 32-bit division (grids stay below 2^31 row blocks): a 64-bit one is a subroutine call at the head of every CTA,
  // ahead of its first weight copies.
  const uint32_t per_group = uint32_t(args.row_blocks_per_group);
  const uint32_t group_index = uint32_t(row_block) / per_group;
  const int64_t group = group_index;
  const int64_t block_in_group = uint32_t(row_block) - group_index * per_group;
  const int64_t row0 = group * args.rows_per_group + block_in_group * kRowsPerCta;
  const int64_t row_end = min(row0 + kRowsPerCta, (group + 1) * args.rows_per_group);
  const int64_t split_begin = int64_t(split) * args.split_k;
  return {.group = group,
          .row0 = row0,
          .row_end = row_end,
          .split_begin = split_begin,
          .split_end = min(args.weight.cols, split_begin + args.split_k)};
}

// Stages x[:, chunk_begin, chunk_end) of the CTA's group into the tile: the bf16 rows as they are, or with the
// RMSNorm prologue the fp32 rows normalised by inv_rms (rms_norm_inverse_rms) and the norm weight.
template <tile::TileFormat F>
__device__ __forceinline__ void stage_input(const LinearKernelArgs& args, const __nv_bfloat16* x_group,
                                            const float* inv_rms, int64_t chunk_begin, int64_t chunk_end,
                                            int padded_tokens, __nv_bfloat16* x_tile) {
  if (args.norm_x != nullptr)
    tile::stage_normed_x_tile<F>([&](int t) { return args.norm_x + t * args.x_row_stride + chunk_begin; },
                                 args.norm_weight + chunk_begin, inv_rms, args.tokens, padded_tokens,
                                 chunk_end - chunk_begin, x_tile, int(threadIdx.x), kThreadsPerCta);
  else
    tile::stage_x_tile<F>([&](int t) { return x_group + t * args.x_row_stride + chunk_begin; }, args.tokens,
                          padded_tokens, chunk_end - chunk_begin, x_tile, int(threadIdx.x), kThreadsPerCta);
}

// With the RMSNorm prologue: every CTA computes its tokens' inverse RMS over the whole row (x_tile serves as the
// reduction's scratch before the first staging), kLoads loads per lane in flight (rms_norm_inverse_rms). Called by
// the whole CTA.
template <int kLoads>
__device__ __forceinline__ void prepare_norm(const LinearKernelArgs& args, void* x_tile, float* inv_rms) {
  if (args.norm_x != nullptr)
    tile::rms_norm_inverse_rms<kLoads>(args.norm_x, args.x_row_stride, int(args.weight.cols), args.norm_eps,
                                       args.tokens, static_cast<float*>(x_tile), inv_rms);
}

// Register caps (65536 / (128 · CTAs)) that fit what NT token tiles need without spilling (from ptxas -v); stated
// explicitly because ptxas's own choice of cap spilled.
constexpr int min_ctas_per_sm(int token_tiles) { return token_tiles <= 2 ? 4 : token_tiles == 4 ? 3 : 2; }

// Writes the warp's accumulators (rows row0..row0 + 15 of the CTA's [cta_row0, cta_row_end)): straight to y, or
// as this split's partial sums, the CTA that draws the last ticket of its row block then adding every split in
// split order. Called by the whole CTA (it synchronises).
template <tile::TileFormat F, int NT, bool kStreamRows = false>
__device__ __forceinline__ void write_output(const LinearKernelArgs& args, const float (&acc)[NT][4], int64_t row0,
                                             int64_t cta_row0, int64_t cta_row_end, int64_t row_block, int split,
                                             bool* is_last_split) {
  const DeviceMatrixView& w = args.weight;
  const int lane = int(threadIdx.x) % tile::kWarpSize;
  const float output_scale = tile::weight_tile_output_scale<F>(w);
  const int g = lane / 4, t = lane % 4;
  auto store = [&](int64_t row, int token, float value) {
    if (args.y != nullptr)
      args.y[token * args.y_row_stride + row] = value;
    else
      args.y_bf16[token * args.y_row_stride + row] = __float2bfloat16_rn(value);
  };
  // Fragment element i of token tile nt sits at (row0 + g + 8·(i / 2), token 8·nt + 2t + i % 2), rows remapped by
  // stream_row on the STREAMED path.
  auto for_each_fragment_element = [&](auto&& body) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tile_row = g + 8 * (i / 2);
        const int64_t row = row0 + (kStreamRows ? tile::stream::stream_row(tile_row) : tile_row);
        const int token = nt * tile::kTokensPerMma + 2 * t + i % 2;
        if (row < cta_row_end && token < args.tokens) body(row, token, acc[nt][i]);
      }
  };

  if (args.k_splits == 1) {
    for_each_fragment_element([&](int64_t row, int token, float value) { store(row, token, value * output_scale); });
    return;
  }

  float* partial = args.partials + int64_t(split) * args.tokens * w.rows;
  for_each_fragment_element([&](int64_t row, int token, float value) { partial[token * w.rows + row] = value; });
  __threadfence();  // partials visible device-wide before the ticket says so
  __syncthreads();
  if (threadIdx.x == 0) *is_last_split = atomicAdd(args.tickets + row_block, 1u) == uint32_t(args.k_splits - 1);
  __syncthreads();
  if (!*is_last_split) return;
  __threadfence();
  const int cta_rows = int(cta_row_end - cta_row0);
  for (int i = int(threadIdx.x); i < cta_rows * args.tokens; i += kThreadsPerCta) {
    const int token = i / cta_rows;
    const int64_t row = cta_row0 + i % cta_rows;
    const float* column = args.partials + token * w.rows + row;
    // Split order from 0. The streamed kernels load up to 8 splits at once (sum_splits_in_order: one L2 round trip
    // instead of one per split, the tail every split-K launch waits for); the register-path kernels one at a
    // time, as the batch pushed their register-capped two-token-tile instantiations into spills. Same sums.
    float sum = 0.0f;
    if constexpr (kStreamRows)
      sum = tile::sum_splits_in_order(column, int64_t(args.tokens) * w.rows, args.k_splits);
    else
      for (int s = 0; s < args.k_splits; ++s) sum += __ldcg(column + int64_t(s) * args.tokens * w.rows);
    store(row, token, sum * output_scale);
  }
  if (threadIdx.x == 0) args.tickets[row_block] = 0;  // every split has arrived: ready for the next launch
}

// How the streamed kernel's split-K partial sums meet: through the workspace, or in a cluster
// (write_output_cluster).
enum class StreamedReduce { WORKSPACE, CLUSTER };

// Bytes of the cluster reduction's receive area after the x tile: every split's partial tile [tokens][64 rows] fp32.
__host__ __device__ constexpr size_t cluster_receive_bytes(int k_splits, int tokens) {
  return size_t(k_splits) * size_t(tokens) * kRowsPerCta * sizeof(float);
}

// The cluster split-K reduction (SplitKReduce::CLUSTER): the k_splits CTAs of a row block are one cluster, rank =
// split. Every rank but 0 stores its unscaled partial tile into slot `rank` of rank 0's receive area (st.async, each
// store adding its bytes to rank 0's `arrived` barrier) and may exit at once; rank 0 writes its own into slot 0, waits
// for the other ranks' bytes and adds the slots in rank order, as the workspace path adds the splits (bitwise the
// same result). No cluster barrier after the MMAs: round s19-1 (H200) trace, last MMA to output [wq_a; wkv] 1.35 →
// 0.64 µs, weights_proj 1.41 → 0.67 µs, against rank 0 reading the tiles between two cluster barriers. `arrived` was
// initialised by rank 0 (prepare_cluster_reduce) and every thread of the cluster arrived on the cluster barrier after
// that; the wait here pairs with it. Called by the whole CTA after its last MMA.
template <tile::TileFormat F, int NT>
__device__ __forceinline__ void write_output_cluster(const LinearKernelArgs& args, const float (&acc)[NT][4],
                                                     int64_t row0, int64_t cta_row0, int64_t cta_row_end,
                                                     float* receive, uint64_t* arrived) {
  namespace cg = cooperative_groups;
  const uint32_t rank = cg::this_cluster().block_rank();
  const int lane = int(threadIdx.x) % tile::kWarpSize, g = lane / 4, t = lane % 4;
  const int cta_rows = int(cta_row_end - cta_row0);
  const int slot_floats = args.tokens * kRowsPerCta;
  float* const slot = receive + rank * uint32_t(slot_floats);
  sm90::cluster_wait_acquire();  // rank 0's barrier is initialised
  const uint32_t remote_slot = rank != 0 ? sm90::cluster_shared_address(slot, 0) : 0u;
  const uint32_t remote_arrived = rank != 0 ? sm90::cluster_shared_address(arrived, 0) : 0u;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + tile::stream::stream_row(g + 8 * (i / 2));
      const int token = nt * tile::kTokensPerMma + 2 * t + i % 2;
      if (row >= cta_row_end || token >= args.tokens) continue;
      const int offset = token * kRowsPerCta + int(row - cta_row0);
      if (rank == 0)
        slot[offset] = acc[nt][i];
      else
        sm90::st_async_f32(remote_slot + uint32_t(offset) * uint32_t(sizeof(float)), acc[nt][i], remote_arrived);
    }
  if (rank != 0) return;
  __syncthreads();  // rank 0's own slot is written
  sm90::mbarrier_wait(arrived, 0);
  const float output_scale = tile::weight_tile_output_scale<F>(args.weight);
  for (int i = int(threadIdx.x); i < cta_rows * args.tokens; i += kThreadsPerCta) {
    const int token = i / cta_rows, r = i % cta_rows;
    const float* column = receive + token * kRowsPerCta + r;
    float sum = 0.0f;
    for (int s = 0; s < args.k_splits; ++s) sum += column[s * slot_floats];
    const float value = sum * output_scale;
    const int64_t offset = token * args.y_row_stride + cta_row0 + r;
    if (args.y != nullptr)
      args.y[offset] = value;
    else
      args.y_bf16[offset] = __float2bfloat16_rn(value);
  }
}

// The cluster reduction's set-up, before the CTA's first wait: rank 0's thread 0 initialises `arrived` to complete
// once the other ranks' partial tiles (their valid rows and tokens) have landed, and every thread arrives on the
// cluster barrier so the other ranks may store into rank 0 once they pass its wait (write_output_cluster).
__device__ __forceinline__ void prepare_cluster_reduce(const LinearKernelArgs& args, const CtaWork& work,
                                                       uint64_t* arrived) {
  namespace cg = cooperative_groups;
  if (threadIdx.x == 0 && cg::this_cluster().block_rank() == 0) {
    sm90::mbarrier_init(arrived, 1);
    sm90::fence_mbarrier_init();
    const uint32_t bytes = uint32_t(args.k_splits - 1) * uint32_t(args.tokens) * uint32_t(work.row_end - work.row0) *
                           uint32_t(sizeof(float));
    sm90::mbarrier_arrive_expect_tx(arrived, bytes);
  }
  sm90::cluster_arrive_relaxed();
}

template <tile::TileFormat F, int NT, bool kAlignedTiles>
__global__ void __launch_bounds__(kThreadsPerCta, min_ctas_per_sm(NT))
    quantized_linear_kernel(const LinearKernelArgs args) {
  extern __shared__ uint4 x_tile_storage[];
  __shared__ bool is_last_split;
  __shared__ float inv_rms[kLinearMaxTokens];
  auto* x_tile = reinterpret_cast<__nv_bfloat16*>(x_tile_storage);

  const DeviceMatrixView& w = args.weight;
  const int64_t row_block = blockIdx.x;
  const int split = int(blockIdx.y);
  const auto [group, cta_row0, cta_row_end, split_begin, split_end] = cta_work(args, row_block, split);
  const int warp_idx = int(threadIdx.x) / tile::kWarpSize;
  const int64_t row0 = cta_row0 + warp_idx * tile::kTileRows;
  const __nv_bfloat16* x_group = args.x + group * w.cols;

  float acc[NT][4] = {};
  if (row0 < cta_row_end)
    tile::prefetch_weight_tile<F>(w, row0, split_begin, min(split_end, split_begin + args.chunk_k));
  prepare_norm<8>(args, x_tile, inv_rms);  // the register-path kernels have none to spare
  for (int64_t chunk_begin = split_begin; chunk_begin < split_end; chunk_begin += args.chunk_k) {
    const int64_t chunk_end = min(split_end, chunk_begin + args.chunk_k);
    // Overlaps staging (the first chunk's was asked for before the norm's reduction).
    if (row0 < cta_row_end && chunk_begin != split_begin)
      tile::prefetch_weight_tile<F>(w, row0, chunk_begin, chunk_end);
    if (chunk_begin != split_begin) __syncthreads();  // the previous chunk's tile is no longer read
    stage_input<F>(args, x_group, inv_rms, chunk_begin, chunk_end, NT * tile::kTokensPerMma, x_tile);
    __syncthreads();
    if (row0 < cta_row_end)
      tile::weight_tile_mma<F, NT, 2, kAlignedTiles>(w, row0, chunk_begin, chunk_end, x_tile, acc);
  }

  write_output<F, NT>(args, acc, row0, cta_row0, cta_row_end, row_block, split, &is_last_split);
}

// One warp's ring of the STREAMED path: `slots` stages in shared memory and their barriers (stage J of the CTA's
// work sits in slot J % slots and completes barrier phase J / slots).
struct WarpRing {
  uint8_t* stages;
  uint64_t* full;
  int slots;
};

// Starts the copies of the work's first min(slots, stages) weight stages. Called by the whole warp (lane 0 issues);
// reads only weights, so it may run before wait_for_prior_grids.
template <tile::TileFormat F>
__device__ __forceinline__ void issue_first_stages(const LinearKernelArgs& a, const CtaWork& work, int64_t row0,
                                                   const WarpRing& ring) {
  namespace st = tile::stream;
  constexpr int64_t kStageK = st::stage_k(F);
  const int64_t stages = (work.split_end - work.split_begin) / kStageK;
  for (int j = 0; j < ring.slots && j < stages; ++j) {
    st::issue_stage<F>(&a.maps, row0, work.split_begin + j * kStageK, ring.stages + j * st::slot_bytes(F),
                       ring.full + j);
  }
}

// acc = the warp's tile of the work: for each chunk of its k range, stage_x(chunk_begin, chunk_end) stages x into
// x_tile (called by the whole CTA between barriers), then the warp multiplies the chunk's stages as they arrive,
// refilling the ring. The first stages must have been issued (issue_first_stages); stage 0's FP8 block scales are
// `first_scales` (load_stage_scale_words, loaded by the caller). Called by the whole CTA.
template <tile::TileFormat F, int NT, bool kTrace, class StageX>
__device__ __forceinline__ void multiply_streamed_item(const LinearKernelArgs& args, const CtaWork& work,
                                                       int64_t row0, bool has_rows, const WarpRing& ring,
                                                       const __nv_bfloat16* x_tile, StageX&& stage_x,
                                                       const tile::stream::StageScaleWords& first_scales,
                                                       float (&acc)[NT][4]) {
  namespace st = tile::stream;
  constexpr int64_t kStageK = st::stage_k(F);
  constexpr int C = tile::detail::kChains<NT>;
  const DeviceMatrixView& w = args.weight;
  const int g = int(threadIdx.x) % tile::kWarpSize / 4;
  const int64_t stages = (work.split_end - work.split_begin) / kStageK;
  float sums[C][NT][4];
  tile::detail::clear_sums<NT, C>(sums);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  const int lane_tiles = (args.tokens - g + tile::kTokensPerMma - 1) / tile::kTokensPerMma;
  for (int64_t chunk_begin = work.split_begin; chunk_begin < work.split_end; chunk_begin += args.chunk_k) {
    const int64_t chunk_end = min(work.split_end, chunk_begin + args.chunk_k);
    if (chunk_begin != work.split_begin) __syncthreads();  // the previous chunk's tile is no longer read
    stage_x(chunk_begin, chunk_end);
    __syncthreads();
    if (chunk_begin == work.split_begin) trace_point<kTrace>(args, TRACE_X_STAGED);
    if (!has_rows) continue;
    const int row_stride = tile::x_tile_row_stride(chunk_end - chunk_begin);
    const __nv_bfloat16* x_lane = x_tile + g * row_stride + (threadIdx.x % 4) * tile::kXChunk;
    for (int64_t k0 = chunk_begin; k0 < chunk_end; k0 += kStageK) {
      const int64_t j = (k0 - work.split_begin) / kStageK;
      const uint32_t stage = uint32_t(j);
      const int slot = int(stage % uint32_t(ring.slots));
      float block_scales[st::kMaxBlocksPerStage];
      st::stage_scale_values<F>(w, j == 0 ? first_scales : st::load_stage_scale_words<F>(w, row0, k0), block_scales);
      sm90::mbarrier_wait(ring.full + slot, (stage / uint32_t(ring.slots)) & 1u);
      if (j < kLinearTraceStages) trace_point<kTrace>(args, TRACE_STAGE_READY + 2 * int(j));
      st::multiply_stage<F, NT, C>(ring.stages + slot * st::slot_bytes(F), x_lane + (k0 - chunk_begin), row_stride,
                                   lane_tiles, block_scales, sums, acc);
      if (j < kLinearTraceStages) trace_point<kTrace>(args, TRACE_STAGE_READY + 2 * int(j) + 1);
      __syncwarp();  // every lane's reads of the slot precede the copy that refills it
      if (j + ring.slots < stages)
        st::issue_stage<F>(&args.maps, row0, k0 + ring.slots * kStageK, ring.stages + slot * st::slot_bytes(F),
                           ring.full + slot);
    }
  }
  tile::detail::finish_tile<F, NT, C>(sums, acc);
  trace_point<kTrace>(args, TRACE_MULTIPLIED);
}

// Dynamic shared memory of the STREAMED kernel: up to 1 KB of alignment, 4 rings of `slots` slots (slot_bytes(F)
// each), then the x tile.
struct StreamedSmem {
  WarpRing ring;
  __nv_bfloat16* x_tile;
};

template <tile::TileFormat F>
__device__ __forceinline__ StreamedSmem streamed_smem(uint8_t* storage, int slots, uint64_t* full_barriers) {
  namespace st = tile::stream;
  uint8_t* smem = st::align_slots(storage);
  const int warp_idx = int(threadIdx.x) / tile::kWarpSize;
  return {.ring = {.stages = smem + size_t(warp_idx) * slots * st::slot_bytes(F),
                   .full = full_barriers + warp_idx * st::kMaxSlots,
                   .slots = slots},
          .x_tile = reinterpret_cast<__nv_bfloat16*>(smem + size_t(kWarpsPerCta) * slots * st::slot_bytes(F))};
}

// The STREAMED load path (weight_tile_mma.cuh, namespace stream): the same CTA shape, split-K and output, with each
// warp's weight tile streamed through its own ring of shared-memory stages by the tensor copy engine. Dynamic shared
// memory: up to 1 KB of alignment, 4 rings of args.ring_slots slots, then the x tile of the real tokens only.
// kTrace: a traced launch (QuantizedLinearParams::trace).
template <tile::TileFormat F, int NT, StreamedReduce kReduce, bool kTrace = false>
__global__ void __launch_bounds__(kThreadsPerCta, 4)
    quantized_linear_streamed_kernel(const __grid_constant__ LinearKernelArgs args) {
  trace_point<kTrace>(args, TRACE_START);
  extern __shared__ uint4 smem_storage[];
  __shared__ uint64_t full_barriers[kWarpsPerCta * tile::stream::kMaxSlots];
  __shared__ uint64_t partials_arrived;  // StreamedReduce::CLUSTER, rank 0
  __shared__ bool is_last_split;
  __shared__ float inv_rms[kLinearMaxTokens];
  const DeviceMatrixView& w = args.weight;
  const int64_t row_block = blockIdx.x;
  const int split = int(blockIdx.y);
  const CtaWork work = cta_work(args, row_block, split);
  const int64_t row0 = work.row0 + int(threadIdx.x) / tile::kWarpSize * tile::kTileRows;
  StreamedSmem smem = streamed_smem<F>(reinterpret_cast<uint8_t*>(smem_storage), args.ring_slots, full_barriers);
  WarpRing& ring = smem.ring;
  __nv_bfloat16* const x_tile = smem.x_tile;
  const bool has_rows = row0 < work.row_end;  // whole 16-row tiles (the path's precondition)
  const __nv_bfloat16* x_group = args.x + work.group * w.cols;

  // The first stages start streaming before x is staged, and before the previous kernel in the stream has finished
  // (programmatic dependent launch: they read only weights); x, y and the workspace only after it has.
  if (has_rows) {
    tile::stream::init_ring(ring.full, ring.slots);
    __syncwarp();
    issue_first_stages<F>(args, work, row0, ring);
  }
  if constexpr (kReduce == StreamedReduce::CLUSTER) prepare_cluster_reduce(args, work, &partials_arrived);
  trace_point<kTrace>(args, TRACE_ISSUED);
  wait_for_prior_grids();
  trace_point<kTrace>(args, TRACE_PRIOR_DONE);
  allow_dependents();
  // Stage 0's FP8 block scales go out here, ahead of the norm's and the staging's loads. (Loaded before the wait
  // above, with their conversion, the warp stalled on them there: session 18.)
  tile::stream::StageScaleWords first_scales{};
  if (has_rows) first_scales = tile::stream::load_stage_scale_words<F>(w, row0, work.split_begin);
  prepare_norm<32>(args, x_tile, inv_rms);

  float acc[NT][4];
  multiply_streamed_item<F, NT, kTrace>(
      args, work, row0, has_rows, ring, x_tile,
      [&](int64_t chunk_begin, int64_t chunk_end) {
        stage_input<F>(args, x_group, inv_rms, chunk_begin, chunk_end, args.tokens, x_tile);
      },
      first_scales, acc);

  if constexpr (kReduce == StreamedReduce::CLUSTER)
    write_output_cluster<F, NT>(
        args, acc, row0, work.row0, work.row_end,
        reinterpret_cast<float*>(x_tile + size_t(args.tokens) * tile::x_tile_row_stride(args.chunk_k)),
        &partials_arrived);
  else
    write_output<F, NT, true>(args, acc, row0, work.row0, work.row_end, row_block, split, &is_last_split);
  trace_point<kTrace>(args, TRACE_END);
}

}  // namespace dsv4::cuda::linear
