// Device code behind run_moe_gate_up / run_moe_down (moe_experts.hpp holds the contract), built on the warp tile
// of weight_tile_mma.cuh (16 weight rows × 8 tokens on mma.sync, weight dequantised exactly in registers).
//
// NOTES:
// - CTA = kBands × kSplits warps over one work item: kBands bands of 16 weight rows, K split kSplits ways in whole
//   128-wide blocks. Splitting K inside the CTA keeps many loads in flight per 16-row band (the decode case has
//   1–8 tokens per expert, so there is little else to parallelise) and the partial sums meet in shared memory, so
//   the nonlinear SwiGLU can sit in the epilogue, and their order (split 0, 1, ...) is fixed: deterministic.
// - Each split stages its own x tile (the item's next 8 rows over the split's k range) with stage_x_tile; the
//   bands of a split share it. Tiles of all splits together hold 8 tokens × K bf16, the largest shared-memory user.
// - The expert's format is read from its view on the device and picked by a switch that is uniform per CTA, so the
//   shared expert (FP8 in the release) rides in the same launch as routed MXFP4/NVFP4 experts.
// - An item's rows are served 8 at a time; after the first group the CTA's weight slice is an L2 hit.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe_weights.hpp"

namespace dsv4::cuda::moe {

enum class ExpertGemm { GATE_UP, DOWN };

template <ExpertGemm G>
struct ExpertGemmShape;
template <>
struct ExpertGemmShape<ExpertGemm::GATE_UP> {
  static constexpr int kBands = 1, kSplits = 8;  // K = d: 512 per split on V4-Flash
};
template <>
struct ExpertGemmShape<ExpertGemm::DOWN> {
  static constexpr int kBands = 2, kSplits = 4;  // K = I: 512 per split on V4-Flash
};

inline constexpr int kExpertWarps = 8;
inline constexpr int kExpertThreads = kExpertWarps * tile::kWarpSize;
inline constexpr int kGroupTokens = tile::kTokensPerMma;  // rows of an item per pass (NT = 1)
inline constexpr int kTileOutputs = tile::kTileRows * kGroupTokens;  // 128 accumulators per warp tile

struct ExpertGemmArgs {
  const MoeExpertView* experts;
  int k_total;  // d (gate/up) or I (down)
  int n_total;  // I (gate/up) or d (down): weight rows
  float swiglu_limit;
  const __nv_bfloat16* x;     // u_bf16 [T, d] gathered through row_tokens (gate/up), or h [rows, I] (down)
  const int32_t* row_tokens;  // gate/up only
  const MoeWorkItem* work_items;
  const int32_t* work_item_count;
  __nv_bfloat16* h;  // gate/up output [rows, I]
  float* down;       // down output [rows, d]
};

// The k range of split s: whole 128-blocks, the remainder spread over the first splits.
__host__ __device__ inline void split_k_range(int k_total, int split, int splits, int& k_begin, int& k_end) {
  const int blocks = k_total / int(tile::kTileKAlignment);
  const int base = blocks / splits, extra = blocks % splits;
  const int first = split * base + min(split, extra);
  k_begin = first * int(tile::kTileKAlignment);
  k_end = k_begin + (base + (split < extra ? 1 : 0)) * int(tile::kTileKAlignment);
}

// Bytes of one split's x tile slot (the widest split's tile).
__host__ __device__ inline size_t x_slot_bytes(int k_total, int splits) {
  const int blocks = k_total / int(tile::kTileKAlignment);
  return tile::x_tile_bytes(1, int64_t((blocks + splits - 1) / splits) * tile::kTileKAlignment);
}

// Shared memory of one CTA: the x tiles, reused for the partial sums once every warp's MMAs are done.
template <ExpertGemm G>
__host__ __device__ inline size_t expert_gemm_smem_bytes(int k_total) {
  using Shape = ExpertGemmShape<G>;
  const size_t tiles = size_t(Shape::kSplits) * x_slot_bytes(k_total, Shape::kSplits);
  const size_t partials = size_t(kExpertWarps) * 2 * kTileOutputs * sizeof(float);
  return tiles > partials ? tiles : partials;
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

template <tile::TileFormat F, ExpertGemm G>
__device__ void run_work_item(const ExpertGemmArgs& a, const MoeExpertView& expert, const MoeWorkItem& item,
                              uint8_t* smem) {
  using Shape = ExpertGemmShape<G>;
  const int warp_idx = threadIdx.x / tile::kWarpSize, lane = threadIdx.x % tile::kWarpSize;
  const int band = warp_idx / Shape::kSplits, split = warp_idx % Shape::kSplits;
  const int64_t row0 = (int64_t(blockIdx.x) * Shape::kBands + band) * tile::kTileRows;
  const size_t slot_bytes = x_slot_bytes(a.k_total, Shape::kSplits);
  int k_begin, k_end;
  split_k_range(a.k_total, split, Shape::kSplits, k_begin, k_end);
  const auto* my_tile = reinterpret_cast<const __nv_bfloat16*>(smem + split * slot_bytes);
  auto* partials = reinterpret_cast<float*>(smem);  // [warp][matrix][16 rows][8 tokens]
  const DeviceMatrixView& first = G == ExpertGemm::GATE_UP ? expert.w1 : expert.w2;
  const float output_scale = tile::weight_tile_output_scale<F>(first);
  const float output_scale3 = tile::weight_tile_output_scale<F>(expert.w3);

  for (int group = 0; group < item.row_count; group += kGroupTokens) {
    const int tokens = min(kGroupTokens, item.row_count - group);
    const int row_base = item.row_begin + group;
    __syncthreads();  // the previous group's partial sums are consumed
    for (int s = 0; s < Shape::kSplits; ++s) {
      int s_begin, s_end;
      split_k_range(a.k_total, s, Shape::kSplits, s_begin, s_end);
      if (s_end == s_begin) continue;
      auto row_of = [&](int t) {
        const int64_t source_row = G == ExpertGemm::GATE_UP ? __ldg(a.row_tokens + row_base + t) : row_base + t;
        return a.x + source_row * a.k_total + s_begin;
      };
      tile::stage_x_tile<F>(row_of, tokens, 1, s_end - s_begin,
                            reinterpret_cast<__nv_bfloat16*>(smem + s * slot_bytes), threadIdx.x, kExpertThreads);
    }
    __syncthreads();
    float acc[2][1][4] = {};
    if (k_end > k_begin) {
      tile::weight_tile_mma<F, 1>(first, row0, k_begin, k_end, my_tile, acc[0]);
      if constexpr (G == ExpertGemm::GATE_UP) tile::weight_tile_mma<F, 1>(expert.w3, row0, k_begin, k_end, my_tile, acc[1]);
    }
    __syncthreads();  // every warp is done reading the x tiles: reuse them for the partial sums
    const int g = lane / 4, t = lane % 4;
    constexpr int kMatrices = G == ExpertGemm::GATE_UP ? 2 : 1;
#pragma unroll
    for (int m = 0; m < kMatrices; ++m) {
      float* mine = partials + (warp_idx * 2 + m) * kTileOutputs;
      mine[g * kGroupTokens + 2 * t] = acc[m][0][0];
      mine[g * kGroupTokens + 2 * t + 1] = acc[m][0][1];
      mine[(g + 8) * kGroupTokens + 2 * t] = acc[m][0][2];
      mine[(g + 8) * kGroupTokens + 2 * t + 1] = acc[m][0][3];
    }
    __syncthreads();
    for (int o = threadIdx.x; o < Shape::kBands * kTileOutputs; o += kExpertThreads) {
      const int o_band = o / kTileOutputs, within = o % kTileOutputs;
      const int r = within / kGroupTokens, token = within % kGroupTokens;
      if (token >= tokens) continue;
      const int64_t n = (int64_t(blockIdx.x) * Shape::kBands + o_band) * tile::kTileRows + r;
      float sums[2] = {0.0f, 0.0f};
      for (int s = 0; s < Shape::kSplits; ++s)
#pragma unroll
        for (int m = 0; m < kMatrices; ++m) sums[m] += partials[((o_band * Shape::kSplits + s) * 2 + m) * kTileOutputs + within];
      const int64_t row = row_base + token;
      if constexpr (G == ExpertGemm::GATE_UP) {
        const float gate = fminf(sums[0] * output_scale, a.swiglu_limit);
        const float up = fminf(fmaxf(sums[1] * output_scale3, -a.swiglu_limit), a.swiglu_limit);
        a.h[row * a.n_total + n] = __float2bfloat16_rn(silu(gate) * up);
      } else {
        a.down[row * a.n_total + n] = sums[0] * output_scale;
      }
    }
  }
}

template <ExpertGemm G>
__global__ void __launch_bounds__(kExpertThreads) moe_expert_gemm_kernel(const ExpertGemmArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  if (int(blockIdx.y) >= __ldg(a.work_item_count)) return;  // the grid covers the worst case
  const MoeWorkItem item = a.work_items[blockIdx.y];
  const MoeExpertView expert = a.experts[item.expert];
  const WeightFormat format = G == ExpertGemm::GATE_UP ? expert.w1.format : expert.w2.format;
  switch (format) {
    case WeightFormat::MXFP4: run_work_item<tile::TileFormat::MXFP4, G>(a, expert, item, smem); break;
    case WeightFormat::NVFP4: run_work_item<tile::TileFormat::NVFP4, G>(a, expert, item, smem); break;
    case WeightFormat::FP8_BLOCK128: run_work_item<tile::TileFormat::FP8_BLOCK128, G>(a, expert, item, smem); break;
    case WeightFormat::BF16: run_work_item<tile::TileFormat::BF16, G>(a, expert, item, smem); break;
    default: break;  // refused on the host (check_moe_expert_gemm_params)
  }
}

}  // namespace dsv4::cuda::moe
