#include "backends/cuda/kernels/quantized_gemm.hpp"

#include <climits>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/quantized_gemm.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

using gemm::GemmWeight;

std::string describe(const DeviceMatrixView& w) {
  return std::string(to_string(w.format)) + " weight [" + std::to_string(w.rows) + ", " + std::to_string(w.cols) +
         "]";
}

GemmWeight gemm_weight_of(const DeviceMatrixView& w) {
  switch (w.format) {
    case WeightFormat::BF16: return GemmWeight::BF16;
    case WeightFormat::FP8_BLOCK128:
      if (w.scale_type == ScaleType::E8M0) return GemmWeight::FP8_E8M0;
      if (w.scale_type == ScaleType::F32) return GemmWeight::FP8_F32;
      fail("quantized_gemm: ", describe(w), " has ", to_string(w.scale_type), " scales (e8m0 or f32 expected)");
    case WeightFormat::MXFP4: return GemmWeight::MXFP4;
    case WeightFormat::NVFP4: return GemmWeight::NVFP4;
    default: fail("quantized_gemm: ", describe(w), ": the format is not supported (BF16, FP8_BLOCK128, MXFP4, NVFP4)");
  }
}

template <GemmWeight W, int kBlockTokens>
using Layout = gemm::SharedLayout<W, kBlockTokens>;

template <int kBlockTokens>
QuantizedGemmConfig config_for(GemmWeight weight) {
  auto make = [](auto layout) {
    using L = decltype(layout);
    return QuantizedGemmConfig{kBlockTokens, L::kStages, size_t(L::kTotalBytes), 0};
  };
  switch (weight) {
    case GemmWeight::BF16: return make(Layout<GemmWeight::BF16, kBlockTokens>{});
    case GemmWeight::FP8_E8M0: return make(Layout<GemmWeight::FP8_E8M0, kBlockTokens>{});
    case GemmWeight::FP8_F32: return make(Layout<GemmWeight::FP8_F32, kBlockTokens>{});
    case GemmWeight::MXFP4: return make(Layout<GemmWeight::MXFP4, kBlockTokens>{});
    case GemmWeight::NVFP4: return make(Layout<GemmWeight::NVFP4, kBlockTokens>{});
  }
  fail("quantized_gemm: unknown weight kind");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_device() {
  int device = 0, major = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  check(major == 9, "quantized_gemm: device ", device, " has compute capability ", major,
        ".x; the kernels are built for sm_90a (Hopper)");
}

CUtensorMap weight_tensor_map(const DeviceMatrixView& w) {
  sm90::TensorMap2d t{.base = w.data, .rows = uint64_t(w.rows), .row_stride_bytes = uint64_t(w.data_row_bytes),
                      .box_rows = uint32_t(gemm::kBlockRows)};
  switch (w.format) {
    case WeightFormat::BF16:
      t.type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
      t.cols = uint64_t(w.cols);
      t.box_cols = gemm::kBlockK;
      t.swizzle = CU_TENSOR_MAP_SWIZZLE_128B;  // the tile is the wgmma A operand as loaded
      break;
    case WeightFormat::FP8_BLOCK128:
      t.cols = uint64_t(w.cols);
      t.box_cols = gemm::kBlockK;
      break;
    default:  // packed fp4, two per byte
      t.cols = uint64_t(w.cols / 2);
      t.box_cols = gemm::kBlockK / 2;
      break;
  }
  return sm90::encode_tensor_map_2d(t, "quantized_gemm " + describe(w));
}

template <GemmWeight W, int kBlockTokens>
void launch(const QuantizedGemmParams& p, const CUtensorMap& x_map, const CUtensorMap& w_map,
            const gemm::GemmKernelArgs& args) {
  constexpr auto kernel = gemm::quantized_gemm_kernel<W, kBlockTokens>;
  constexpr int kSharedBytes = Layout<W, kBlockTokens>::kTotalBytes;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes));
  const dim3 grid(unsigned(ceil_div(p.weight.rows, gemm::kBlockRows)), unsigned(ceil_div(p.tokens, kBlockTokens)));
  kernel<<<grid, gemm::kThreads, kSharedBytes, p.stream>>>(x_map, w_map, args);
  DSV4_CUDA_CHECK_LAUNCH("quantized_gemm_kernel");
}

template <int kBlockTokens>
void launch_for_weight(GemmWeight weight, const QuantizedGemmParams& p, const CUtensorMap& x_map,
                       const CUtensorMap& w_map, const gemm::GemmKernelArgs& args) {
  switch (weight) {
    case GemmWeight::BF16: return launch<GemmWeight::BF16, kBlockTokens>(p, x_map, w_map, args);
    case GemmWeight::FP8_E8M0: return launch<GemmWeight::FP8_E8M0, kBlockTokens>(p, x_map, w_map, args);
    case GemmWeight::FP8_F32: return launch<GemmWeight::FP8_F32, kBlockTokens>(p, x_map, w_map, args);
    case GemmWeight::MXFP4: return launch<GemmWeight::MXFP4, kBlockTokens>(p, x_map, w_map, args);
    case GemmWeight::NVFP4: return launch<GemmWeight::NVFP4, kBlockTokens>(p, x_map, w_map, args);
  }
}

}  // namespace

QuantizedGemmConfig choose_quantized_gemm_config(const DeviceMatrixView& weight, int64_t tokens,
                                                 int multiprocessors) {
  const GemmWeight kind = gemm_weight_of(weight);
  const int64_t row_tiles = ceil_div(weight.rows, gemm::kBlockRows);
  // 256-token tiles halve the activation traffic per FLOP, but only pay when they still fill every SM.
  const bool wide = tokens > 128 && row_tiles * ceil_div(tokens, 256) >= multiprocessors;
  QuantizedGemmConfig config = wide ? config_for<256>(kind) : config_for<128>(kind);
  config.ctas = row_tiles * ceil_div(tokens, config.block_tokens);
  return config;
}

void check_quantized_gemm_params(const QuantizedGemmParams& p) {
  const DeviceMatrixView& w = p.weight;
  gemm_weight_of(w);
  check(w.rows >= 1 && w.rows <= INT_MAX, "quantized_gemm: ", describe(w), ": N must be in [1, ", INT_MAX, "]");
  check(w.cols >= gemm::kBlockK && w.cols % gemm::kBlockK == 0 && w.cols <= INT_MAX, "quantized_gemm: ", describe(w),
        ": K = ", w.cols, " must be a positive multiple of ", gemm::kBlockK);
  check(p.tokens >= 1 && p.tokens <= INT_MAX, "quantized_gemm: ", p.tokens, " tokens (at least 1)");
  check(w.data != nullptr, "quantized_gemm: ", describe(w), " has no device data");
  check(w.format == WeightFormat::BF16 || w.scales != nullptr, "quantized_gemm: ", describe(w),
        " has no device scales");
  check(reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && w.data_row_bytes % 16 == 0, "quantized_gemm: ",
        describe(w), " data must be 16-byte aligned with a row pitch that is a multiple of 16 bytes (pitch ",
        w.data_row_bytes, ")");
  check(w.format != WeightFormat::NVFP4 || (std::isfinite(w.global_scale) && w.global_scale > 0.0f),
        "quantized_gemm: ", describe(w), " has global scale ", w.global_scale, " (positive finite expected)");
  check(p.x != nullptr && p.y != nullptr, "quantized_gemm: null ", p.x == nullptr ? "x" : "y");
  check(reinterpret_cast<uintptr_t>(p.x) % 16 == 0, "quantized_gemm: x must be 16-byte aligned");
  check(p.x_row_stride >= w.cols && p.x_row_stride % 8 == 0, "quantized_gemm: x row stride ", p.x_row_stride,
        " must be at least K = ", w.cols, " and a multiple of 8 elements (16 bytes)");
  check(p.y_row_stride >= w.rows, "quantized_gemm: y row stride ", p.y_row_stride, " is less than N = ", w.rows);
  const auto* x_begin = reinterpret_cast<const char*>(p.x);
  const auto* y_begin = reinterpret_cast<const char*>(p.y);
  const char* x_end = x_begin + size_t((p.tokens - 1) * p.x_row_stride + w.cols) * sizeof(__nv_bfloat16);
  const char* y_end = y_begin + size_t((p.tokens - 1) * p.y_row_stride + w.rows) * sizeof(float);
  check(y_end <= x_begin || x_end <= y_begin, "quantized_gemm: y must not alias x");
  check_device();
}

void run_quantized_gemm(const QuantizedGemmParams& p) {
  check_quantized_gemm_params(p);
  const DeviceMatrixView& w = p.weight;
  const GemmWeight kind = gemm_weight_of(w);
  const QuantizedGemmConfig config = choose_quantized_gemm_config(w, p.tokens, current_multiprocessors());
  check(ceil_div(p.tokens, config.block_tokens) <= 65535, "quantized_gemm: ", p.tokens,
        " tokens exceed the launch grid (", 65535 * config.block_tokens, " at most)");

  const CUtensorMap x_map = sm90::encode_tensor_map_2d(
      {.type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
       .base = p.x,
       .cols = uint64_t(w.cols),
       .rows = uint64_t(p.tokens),
       .row_stride_bytes = uint64_t(p.x_row_stride) * sizeof(__nv_bfloat16),
       .box_cols = gemm::kBlockK,
       .box_rows = uint32_t(config.block_tokens),
       .swizzle = CU_TENSOR_MAP_SWIZZLE_128B},
      "quantized_gemm x");
  const CUtensorMap w_map = weight_tensor_map(w);
  const gemm::GemmKernelArgs args{
      .scales = w.scales,
      .scales_per_row = w.scales_per_row,
      .rows = int(w.rows),
      .tokens = int(p.tokens),
      .k_tiles = int(w.cols / gemm::kBlockK),
      .y = p.y,
      .y_row_stride = p.y_row_stride,
      .output_scale = w.format == WeightFormat::NVFP4 ? w.global_scale : 1.0f,
  };
  if (config.block_tokens == 256)
    launch_for_weight<256>(kind, p, x_map, w_map, args);
  else
    launch_for_weight<128>(kind, p, x_map, w_map, args);
}

}  // namespace dsv4::cuda
