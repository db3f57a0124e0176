// Device code behind run_moe_gate_up / run_moe_down (moe_experts.hpp holds the contract), built on the warp tile
// of weight_tile_mma.cuh (16 weight rows × 8·NT tokens on mma.sync, weight dequantised exactly in registers).
//
// NOTES:
// - A CTA of 8 warps serves one work item on a band of weight rows: gate/up: 4 bands of 16 rows, warps 0–3 on w1
//   and warps 4–7 on w3 of the same rows (their loads are in flight together; the SwiGLU pairs them through shared
//   memory); down: 8 bands of 16 rows of w2. Each warp covers the whole K, so no partial sums cross warps.
// - x (the item's rows of u, or of h) is staged per K chunk for 8·NT tokens by stage_x_tile; the chunk is as large
//   as ~72 KB of shared memory allows (the whole K of V4-Flash for one token tile), so small items stage once and
//   each warp streams its weight rows over one long k range (weight_tile_mma keeps the next batch in flight).
// - Items of up to 8 rows (decode: 1–2 tokens per routed expert) run with one token tile; larger ones (the shared
//   expert, prefill) with four (32 rows per pass), so one weight decode serves 32 tokens. The switch is uniform
//   per CTA, as is the one over the expert's weight format (the shared expert is FP8 in the release while routed
//   experts are MXFP4/NVFP4: both ride in the same launch).
// - Before staging x, each warp asks L2 for the start of its weight rows (bulk prefetch), so the first loads of the
//   MMA loop find them there instead of waiting behind the staging.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe_weights.hpp"

namespace dsv4::cuda::moe {

enum class ExpertGemm { GATE_UP, DOWN };

inline constexpr int kExpertWarps = 8;
inline constexpr int kExpertThreads = kExpertWarps * tile::kWarpSize;
inline constexpr int kSmallTokenTiles = 1;  // items of <= 8 rows
inline constexpr int kLargeTokenTiles = 2;  // larger items, 32 rows per pass
inline constexpr size_t kXTileBudget = 72 * 1024;  // shared memory for one x chunk: three CTAs fit an SM
inline constexpr int kPrefetchBytesPerRow = 512;   // first bytes of each weight row requested ahead of the MMAs

// Weight rows one CTA covers.
template <ExpertGemm G>
inline constexpr int kCtaRows = (G == ExpertGemm::GATE_UP ? kExpertWarps / 2 : kExpertWarps) * tile::kTileRows;

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

// The widest K chunk (a multiple of 128) whose x tile of 8·token_tiles rows fits kXTileBudget, and the number of
// chunks K then splits into: whole 128-blocks spread evenly, the last chunk ending at K (which only has to be a
// multiple of the format's load granularity).
__host__ __device__ constexpr int max_chunk_k(int token_tiles) {
  return int((kXTileBudget / (2 * tile::kTokensPerMma * size_t(token_tiles)) - 32) / tile::kTileKAlignment *
             tile::kTileKAlignment);
}
__host__ __device__ constexpr int k_blocks(int k_total) {
  return (k_total + int(tile::kTileKAlignment) - 1) / int(tile::kTileKAlignment);
}
__host__ __device__ constexpr int chunk_count(int k_total, int token_tiles) {
  return (k_blocks(k_total) + max_chunk_k(token_tiles) / int(tile::kTileKAlignment) - 1) /
         (max_chunk_k(token_tiles) / int(tile::kTileKAlignment));
}
__host__ __device__ inline void chunk_range(int k_total, int chunk, int chunks, int& k_begin, int& k_end) {
  const int blocks = k_blocks(k_total);
  const int base = blocks / chunks, extra = blocks % chunks;
  k_begin = (chunk * base + min(chunk, extra)) * int(tile::kTileKAlignment);
  k_end = min(k_total, k_begin + (base + (chunk < extra ? 1 : 0)) * int(tile::kTileKAlignment));
}

// Shared memory of one CTA: the x chunk of either path, then (gate/up) the w3 results handed to the w1 warps.
__host__ __device__ inline size_t x_chunk_bytes(int k_total, int token_tiles) {
  const int chunks = chunk_count(k_total, token_tiles);
  const int widest = (k_blocks(k_total) + chunks - 1) / chunks * int(tile::kTileKAlignment);
  return tile::x_tile_bytes(token_tiles, widest);
}
__host__ __device__ inline size_t exchange_offset(int k_total) {
  const size_t a = x_chunk_bytes(k_total, kSmallTokenTiles), b = x_chunk_bytes(k_total, kLargeTokenTiles);
  return ((a > b ? a : b) + 15) / 16 * 16;
}
template <ExpertGemm G>
__host__ __device__ inline size_t expert_gemm_smem_bytes(int k_total) {
  // w3 results of the 4 up-projection warps: [warp][16 rows][8·kLargeTokenTiles tokens] fp32.
  const size_t exchange = G == ExpertGemm::GATE_UP
                              ? size_t(kExpertWarps / 2) * tile::kTileRows * tile::kTokensPerMma * kLargeTokenTiles * 4
                              : 0;
  return exchange_offset(k_total) + exchange;
}

// PTX ISA "cp.async.bulk.prefetch.L2": asks L2 to fetch [address, address + bytes) without waiting (16-byte aligned
// address, bytes a multiple of 16).
__device__ __forceinline__ void prefetch_l2_bulk(const void* address, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(address), "r"(bytes) : "memory");
}

// Lanes 0..15 of the warp ask for the first bytes of rows row0 + lane over [k_begin, k_end).
template <tile::TileFormat F>
__device__ __forceinline__ void prefetch_rows(const DeviceMatrixView& w, int64_t row0, int k_begin, int k_end,
                                              int lane) {
  if (lane >= tile::kTileRows) return;
  // Stored bytes per 2 values; k ranges are multiples of the load granularity, so byte counts are multiples of 16.
  constexpr int kBytesPer2 = F == tile::TileFormat::BF16 ? 4 : F == tile::TileFormat::FP8_BLOCK128 ? 2 : 1;
  const int64_t row = min(row0 + lane, w.rows - 1);
  const int bytes = min(kPrefetchBytesPerRow, (k_end - k_begin) / 2 * kBytesPer2);
  if (bytes > 0)
    prefetch_l2_bulk(w.data + row * int64_t(w.data_row_bytes) + int64_t(k_begin) / 2 * kBytesPer2, uint32_t(bytes));
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// One pass over up to 8·NT rows of an item starting at row_base.
template <tile::TileFormat F, ExpertGemm G, int NT>
__device__ __forceinline__ void run_pass(const ExpertGemmArgs& a, const MoeExpertView& expert, int row_base, int tokens,
                         uint8_t* smem) {
  constexpr bool kGateUp = G == ExpertGemm::GATE_UP;
  const int warp_idx = threadIdx.x / tile::kWarpSize, lane = threadIdx.x % tile::kWarpSize;
  // Gate/up: warps w and w + 4 share a band, on w1 and w3; down: one band per warp.
  const bool up_warp = kGateUp && warp_idx >= kExpertWarps / 2;
  const int band = kGateUp ? warp_idx % (kExpertWarps / 2) : warp_idx;
  const int64_t row0 = int64_t(blockIdx.x) * kCtaRows<G> + band * tile::kTileRows;
  const DeviceMatrixView w = kGateUp ? (up_warp ? expert.w3 : expert.w1) : expert.w2;  // a copy: no stack
  auto* x_chunk = reinterpret_cast<__nv_bfloat16*>(smem);
  const int chunks = chunk_count(a.k_total, NT);

  // Warps whose band lies past the last row (tails of small models) stage x and meet the barriers, nothing else.
  const bool has_rows = row0 < a.n_total;
  float acc[NT][4] = {};
  for (int chunk = 0; chunk < chunks; ++chunk) {
    int k_begin, k_end;
    chunk_range(a.k_total, chunk, chunks, k_begin, k_end);
    if (has_rows) prefetch_rows<F>(w, row0, k_begin, k_end, lane);
    __syncthreads();  // the previous chunk (or pass) is done with the x tile and the exchange
    auto row_of = [&](int t) {
      const int64_t source_row = kGateUp ? __ldg(a.row_tokens + row_base + t) : row_base + t;
      return a.x + source_row * a.k_total + k_begin;
    };
    tile::stage_x_tile<F>(row_of, tokens, NT, k_end - k_begin, x_chunk, threadIdx.x, kExpertThreads);
    __syncthreads();
    if (has_rows) tile::weight_tile_mma<F, NT>(w, row0, k_begin, k_end, x_chunk, acc);
  }

  // Accumulator (nt, i) holds row row0 + g (+ 8 for i >= 2), token 8·nt + 2t (+ 1 for odd i).
  const int g = lane / 4, t = lane % 4;
  const float scale = tile::weight_tile_output_scale<F>(w);
  if constexpr (kGateUp) {
    float* exchange = reinterpret_cast<float*>(smem + exchange_offset(a.k_total)) +
                      band * tile::kTileRows * tile::kTokensPerMma * kLargeTokenTiles;
    auto at = [](int nt, int i, int g_, int t_) {
      return (g_ + (i >= 2 ? 8 : 0)) * tile::kTokensPerMma * kLargeTokenTiles + nt * tile::kTokensPerMma + 2 * t_ +
             (i & 1);
    };
    if (up_warp) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) exchange[at(nt, i, g, t)] = acc[nt][i] * scale;
    }
    __syncthreads();
    if (!up_warp) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int token = nt * tile::kTokensPerMma + 2 * t + (i & 1);
          const int64_t n = row0 + g + (i >= 2 ? 8 : 0);
          if (token >= tokens || n >= a.n_total) continue;
          const float gate = fminf(acc[nt][i] * scale, a.swiglu_limit);
          const float up = fminf(fmaxf(exchange[at(nt, i, g, t)], -a.swiglu_limit), a.swiglu_limit);
          a.h[int64_t(row_base + token) * a.n_total + n] = __float2bfloat16_rn(silu(gate) * up);
        }
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = nt * tile::kTokensPerMma + 2 * t + (i & 1);
        const int64_t n = row0 + g + (i >= 2 ? 8 : 0);
        if (token >= tokens || n >= a.n_total) continue;
        a.down[int64_t(row_base + token) * a.n_total + n] = acc[nt][i] * scale;
      }
  }
}

template <tile::TileFormat F, ExpertGemm G>
__device__ __forceinline__ void run_work_item(const ExpertGemmArgs& a, const MoeExpertView& expert, const MoeWorkItem& item,
                              uint8_t* smem) {
  if (item.row_count <= kSmallTokenTiles * tile::kTokensPerMma) {
    run_pass<F, G, kSmallTokenTiles>(a, expert, item.row_begin, item.row_count, smem);
    return;
  }
  constexpr int kPassRows = kLargeTokenTiles * tile::kTokensPerMma;
  for (int first = 0; first < item.row_count; first += kPassRows)
    run_pass<F, G, kLargeTokenTiles>(a, expert, item.row_begin + first, min(kPassRows, item.row_count - first), smem);
}

template <ExpertGemm G>
__global__ void __launch_bounds__(kExpertThreads, 2) moe_expert_gemm_kernel(const ExpertGemmArgs a) {
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
