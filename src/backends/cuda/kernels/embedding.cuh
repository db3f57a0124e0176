// Kernel behind run_embedding (embedding.hpp holds the contract).
//
// NOTES:
// - The cost is the write of streams × hidden fp32 per token; the row is read once per element and decoded in
//   registers (e4m3 · block scale for FP8_BLOCK128, exact like the CPU decode), then stored to every stream.
//   A thread owns one element: consecutive threads write consecutive floats of each stream (coalesced).
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/attention_index.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4::cuda::embed {

inline constexpr int kThreads = 256;

enum class TableFormat { F32, BF16, FP8_E8M0, FP8_F32 };

struct EmbeddingArgs {
  const uint8_t* data;
  const uint8_t* scales;
  int64_t vocab;
  int64_t hidden;
  int64_t data_row_bytes;
  int64_t scales_per_row;
  const int32_t* ids;
  int64_t tokens;
  int streams;
  bool round_to_bf16;
  float* X;
  int64_t embedding_ctas;  // the CTAs after these build the attention lists
  AttentionIndexParams lists;
  unsigned list_x_blocks;
};

template <TableFormat F>
__device__ inline float decode(const EmbeddingArgs& a, int64_t row, int64_t i) {
  const uint8_t* row_data = a.data + row * a.data_row_bytes;
  if constexpr (F == TableFormat::F32) {
    return __ldg(reinterpret_cast<const float*>(row_data) + i);
  } else if constexpr (F == TableFormat::BF16) {
    return bf16_to_float(__ldg(reinterpret_cast<const unsigned short*>(row_data) + i));
  } else {
    const int64_t scale_index = (row / kFp8BlockSize) * a.scales_per_row + i / kFp8BlockSize;
    float scale;
    if constexpr (F == TableFormat::FP8_E8M0)
      scale = e8m0_to_float(__ldg(a.scales + scale_index));
    else
      scale = __ldg(reinterpret_cast<const float*>(a.scales) + scale_index);
    return e4m3_to_float(__ldg(row_data + i)) * scale;
  }
}

template <TableFormat F>
__global__ void __launch_bounds__(kThreads) embedding_kernel(const __grid_constant__ EmbeddingArgs args) {
  static_assert(kThreads == attention_lists::kThreads, "the list CTAs have the embedding's threads");
  allow_dependents();
  wait_for_prior_grids();  // the ids are the step's inputs; X may still be read by the previous step's kernels
  if (blockIdx.x >= args.embedding_ctas) {
    const int64_t cta = blockIdx.x - args.embedding_ctas, slices = cta / args.list_x_blocks;
    attention_lists::build_list_slice(args.lists, int(cta % args.list_x_blocks), int(args.list_x_blocks),
                                      slices % args.lists.tokens, int(slices / args.lists.tokens));
    return;
  }
  const int64_t element = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (element >= args.tokens * args.hidden) return;
  const int64_t t = element / args.hidden, i = element - t * args.hidden;
  const int32_t id = __ldg(args.ids + t);
  float value = __int_as_float(0x7FC00000);  // an id the host check missed gives NaN, not a stray read
  if (id >= 0 && id < args.vocab) value = decode<F>(args, id, i);
  if (args.round_to_bf16) value = round_to_bf16(value);
  float* out = args.X + t * args.streams * args.hidden + i;
  for (int k = 0; k < args.streams; ++k) out[k * args.hidden] = value;
}

}  // namespace dsv4::cuda::embed
