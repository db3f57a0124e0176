#include "backends/cuda/kernels/quantized_gemv.hpp"

#include <algorithm>
#include <utility>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/quantized_gemv.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

using gemv::GemvFormat;

int64_t values_per_vector(WeightFormat format) {
  switch (format) {
    case WeightFormat::FP8_BLOCK128: return gemv::FormatTraits<GemvFormat::FP8_BLOCK128_E8M0>::kValuesPerVector;
    case WeightFormat::MXFP4: return gemv::FormatTraits<GemvFormat::MXFP4>::kValuesPerVector;
    case WeightFormat::NVFP4: return gemv::FormatTraits<GemvFormat::NVFP4>::kValuesPerVector;
    default: fail("quantized_gemv: weight format ", to_string(format), " is not supported (FP8_BLOCK128, MXFP4, NVFP4)");
  }
}

void check_shape(WeightFormat format, int64_t rows, int64_t cols, int tokens) {
  const int64_t vector = values_per_vector(format);
  check(rows > 0 && cols > 0, "quantized_gemv: weight [", rows, ", ", cols, "] (", to_string(format),
        ") must have at least one row and one column");
  check(cols % vector == 0, "quantized_gemv: K = ", cols, " of weight [", rows, ", ", cols, "] (", to_string(format),
        ") must be a multiple of ", vector, " (one 16-byte vector of stored weights)");
  check(tokens >= 1 && tokens <= kGemvMaxTokens, "quantized_gemv: ", tokens, " tokens; the decode GEMV takes 1 to ",
        kGemvMaxTokens);
}

template <GemvFormat F>
void launch_for_tokens(const gemv::GemvKernelArgs& args, int tokens, dim3 grid, size_t smem, cudaStream_t stream) {
  constexpr dim3 block(gemv::kWarpsPerCta * gemv::kWarpSize);
  // One instantiation per token count: T sizes the per-thread accumulators.
  switch (tokens) {
    case 1: gemv::quantized_gemv_kernel<F, 1><<<grid, block, smem, stream>>>(args); break;
    case 2: gemv::quantized_gemv_kernel<F, 2><<<grid, block, smem, stream>>>(args); break;
    case 3: gemv::quantized_gemv_kernel<F, 3><<<grid, block, smem, stream>>>(args); break;
    case 4: gemv::quantized_gemv_kernel<F, 4><<<grid, block, smem, stream>>>(args); break;
    case 5: gemv::quantized_gemv_kernel<F, 5><<<grid, block, smem, stream>>>(args); break;
    case 6: gemv::quantized_gemv_kernel<F, 6><<<grid, block, smem, stream>>>(args); break;
    case 7: gemv::quantized_gemv_kernel<F, 7><<<grid, block, smem, stream>>>(args); break;
    case 8: gemv::quantized_gemv_kernel<F, 8><<<grid, block, smem, stream>>>(args); break;
    default: fail("quantized_gemv: ", tokens, " tokens; the decode GEMV takes 1 to ", kGemvMaxTokens);
  }
  DSV4_CUDA_CHECK_LAUNCH("quantized_gemv_kernel");
}

int current_multiprocessors() {
  int device = 0, count = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace

GemvLaunchConfig choose_quantized_gemv_config(WeightFormat format, int64_t rows, int64_t cols, int tokens,
                                              int multiprocessors) {
  check_shape(format, rows, cols, tokens);
  const int64_t vector = values_per_vector(format);
  auto round_up = [](int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; };
  // The x tile stays within 32 KiB so that several CTAs share an SM (the weight loads in flight come from them).
  constexpr int64_t kSmemBudget = 32 * 1024;
  const int64_t max_tile = std::max<int64_t>(vector, kSmemBudget / (4 * tokens) / vector * vector);
  // Below one unrolled pass of the warp per row, lanes idle and the x staging dominates.
  const int64_t min_tile = std::min<int64_t>(max_tile, gemv::kWarpSize * gemv::kUnroll * vector);
  const int64_t row_blocks = (rows + gemv::kRowsPerCta - 1) / gemv::kRowsPerCta;
  // Four CTAs per SM keep the memory system busy; fewer output rows than that are split along K.
  const int64_t wanted_ctas = 4 * int64_t(std::max(multiprocessors, 1));
  int64_t splits = (cols + max_tile - 1) / max_tile;
  if (row_blocks * splits < wanted_ctas)
    splits = std::max(splits, std::min((wanted_ctas + row_blocks - 1) / row_blocks, (cols + min_tile - 1) / min_tile));
  const int64_t tile_k = round_up((cols + splits - 1) / splits, vector);
  splits = (cols + tile_k - 1) / tile_k;
  check(splits <= 65535 && row_blocks <= 0x7FFFFFFF, "quantized_gemv: weight [", rows, ", ", cols,
        "] needs a grid of ", row_blocks, " × ", splits, " CTAs, beyond the launch limits");
  return GemvLaunchConfig{.rows_per_cta = gemv::kRowsPerCta,
                          .tile_k = tile_k,
                          .k_splits = int(splits),
                          .smem_bytes = size_t(tokens) * size_t(tile_k) * sizeof(float)};
}

void check_quantized_gemv_params(const QuantizedGemvParams& params) {
  const DeviceMatrixView& w = params.weight;
  check_shape(w.format, w.rows, w.cols, params.tokens);
  check(w.format != WeightFormat::FP8_BLOCK128 || w.scale_type == ScaleType::E8M0,
        "quantized_gemv: FP8_BLOCK128 weight [", w.rows, ", ", w.cols, "] has ", to_string(w.scale_type),
        " scales; the GEMV reads e8m0 scales only");
  check(w.data != nullptr && w.scales != nullptr, "quantized_gemv: weight [", w.rows, ", ", w.cols,
        "] has no device data or scales");
  check(params.x != nullptr && params.y != nullptr, "quantized_gemv: null ", params.x == nullptr ? "x" : "y");
  check(reinterpret_cast<uintptr_t>(params.x) % 16 == 0, "quantized_gemv: x must be 16-byte aligned");
  check(reinterpret_cast<uintptr_t>(w.data) % 16 == 0, "quantized_gemv: weight data must be 16-byte aligned");
  const auto* x_bytes = reinterpret_cast<const char*>(params.x);
  const auto* y_bytes = reinterpret_cast<const char*>(params.y);
  const size_t x_size = size_t(params.tokens) * size_t(w.cols) * sizeof(float);
  const size_t y_size = size_t(params.tokens) * size_t(w.rows) * sizeof(float);
  check(y_bytes + y_size <= x_bytes || x_bytes + x_size <= y_bytes, "quantized_gemv: y must not alias x");
}

void run_quantized_gemv(const QuantizedGemvParams& params) {
  check_quantized_gemv_params(params);
  const DeviceMatrixView& w = params.weight;
  const GemvLaunchConfig config =
      choose_quantized_gemv_config(w.format, w.rows, w.cols, params.tokens, current_multiprocessors());
  const bool split_k = config.k_splits > 1;
  if (split_k)
    DSV4_CUDA_CHECK(cudaMemsetAsync(params.y, 0, size_t(params.tokens) * size_t(w.rows) * sizeof(float),
                                    params.stream));
  const gemv::GemvKernelArgs args{
      .data = w.data,
      .scales = w.scales,
      .rows = w.rows,
      .cols = w.cols,
      .data_row_bytes = int64_t(w.data_row_bytes),
      .scales_per_row = w.scales_per_row,
      .global_scale = w.format == WeightFormat::NVFP4 ? w.global_scale : 1.0f,
      .x = params.x,
      .y = params.y,
      .tile_k = config.tile_k,
      .accumulate = split_k,
  };
  const dim3 grid(unsigned((w.rows + config.rows_per_cta - 1) / config.rows_per_cta), unsigned(config.k_splits));
  switch (w.format) {
    case WeightFormat::FP8_BLOCK128:
      launch_for_tokens<GemvFormat::FP8_BLOCK128_E8M0>(args, params.tokens, grid, config.smem_bytes, params.stream);
      break;
    case WeightFormat::MXFP4:
      launch_for_tokens<GemvFormat::MXFP4>(args, params.tokens, grid, config.smem_bytes, params.stream);
      break;
    case WeightFormat::NVFP4:
      launch_for_tokens<GemvFormat::NVFP4>(args, params.tokens, grid, config.smem_bytes, params.stream);
      break;
    default: fail("quantized_gemv: weight format ", to_string(w.format), " is not supported");
  }
}

}  // namespace dsv4::cuda
