#include "backends/cuda/kernels/quantized_gemm.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/quantized_gemm.cuh"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
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

template <int kBlockTokens, int kCtas>
QuantizedGemmConfig config_for(GemmWeight weight) {
  auto make = [](auto layout) {
    using L = decltype(layout);
    return QuantizedGemmConfig{.block_tokens = kBlockTokens, .stages = L::kStages,
                               .shared_bytes = size_t(L::kTotalBytes), .ctas_per_sm = kCtas};
  };
  switch (weight) {
    case GemmWeight::BF16: return make(gemm::SharedLayout<GemmWeight::BF16, kBlockTokens, kCtas>{});
    case GemmWeight::FP8_E8M0: return make(gemm::SharedLayout<GemmWeight::FP8_E8M0, kBlockTokens, kCtas>{});
    case GemmWeight::FP8_F32: return make(gemm::SharedLayout<GemmWeight::FP8_F32, kBlockTokens, kCtas>{});
    case GemmWeight::MXFP4: return make(gemm::SharedLayout<GemmWeight::MXFP4, kBlockTokens, kCtas>{});
    case GemmWeight::NVFP4: return make(gemm::SharedLayout<GemmWeight::NVFP4, kBlockTokens, kCtas>{});
  }
  fail("quantized_gemm: unknown weight kind");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K never makes slices shorter than this many k-tiles (shorter ones spend their time filling the ring and
// reducing, not streaming weights), nor more than kMaxSplits: the last CTA of a tile reads every split's partial
// tile, and at 16-32 splits of 64 tokens that read alone took longer than the decode kernel's whole call (H200).
constexpr int64_t kMinSplitKTiles = 2;
constexpr int64_t kMaxSplits = 4;

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

template <GemmWeight W, int kBlockTokens, int kCtas>
void launch(const QuantizedGemmParams& p, const QuantizedGemmConfig& config, const gemm::GemmKernelArgs& args) {
  constexpr auto kernel = gemm::quantized_gemm_kernel<W, kBlockTokens, kCtas>;
  constexpr int kSharedBytes = gemm::SharedLayout<W, kBlockTokens, kCtas>::kTotalBytes;
  // The opt-in above 48 KiB, set once per device (per_device_cache.hpp).
  const int limit = max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel));
  check(kSharedBytes <= limit, "quantized_gemm: ", kSharedBytes, " bytes of shared memory per CTA exceed the device's ",
        limit);
  const dim3 grid(unsigned(ceil_div(p.weight.rows, gemm::kBlockRows)), unsigned(ceil_div(p.tokens, kBlockTokens)),
                  unsigned(config.k_splits));
  launch_chained(kernel, grid, dim3(gemm::kThreads), kSharedBytes, p.stream, args, "quantized_gemm_kernel");
}

template <int kBlockTokens, int kCtas>
void launch_for_weight(GemmWeight weight, const QuantizedGemmParams& p, const QuantizedGemmConfig& config,
                       const gemm::GemmKernelArgs& args) {
  switch (weight) {
    case GemmWeight::BF16: return launch<GemmWeight::BF16, kBlockTokens, kCtas>(p, config, args);
    case GemmWeight::FP8_E8M0: return launch<GemmWeight::FP8_E8M0, kBlockTokens, kCtas>(p, config, args);
    case GemmWeight::FP8_F32: return launch<GemmWeight::FP8_F32, kBlockTokens, kCtas>(p, config, args);
    case GemmWeight::MXFP4: return launch<GemmWeight::MXFP4, kBlockTokens, kCtas>(p, config, args);
    case GemmWeight::NVFP4: return launch<GemmWeight::NVFP4, kBlockTokens, kCtas>(p, config, args);
  }
}

}  // namespace

QuantizedGemmConfig choose_quantized_gemm_config(const DeviceMatrixView& weight, int64_t tokens,
                                                 int multiprocessors) {
  const GemmWeight kind = gemm_weight_of(weight);
  const int64_t row_tiles = ceil_div(weight.rows, gemm::kBlockRows);
  // 64-token tiles for batched decode (a wider tile would only multiply zero-filled tokens); 256-token tiles halve
  // the activation traffic per FLOP, but only pay when they still fill every SM.
  const bool wide = tokens > 128 && row_tiles * ceil_div(tokens, 256) >= multiprocessors;
  const int64_t tiles = row_tiles * ceil_div(tokens, tokens <= 64 ? 64 : wide ? 256 : 128);
  // Two CTAs per SM where the tiles alone fill the SMs (see gemm::SharedLayout's kCtas).
  QuantizedGemmConfig config = tokens > 64          ? (wide ? config_for<256, 1>(kind) : config_for<128, 1>(kind))
                               : tiles >= multiprocessors ? config_for<64, 2>(kind)
                                                          : config_for<64, 1>(kind);
  const int64_t k_tiles = std::max<int64_t>(1, weight.cols / gemm::kBlockK);
  // Split K while the output tiles alone leave SMs idle (one CTA per SM: the ring takes the shared memory).
  int64_t splits = 1;
  if (tokens <= kGemmMaxSplitTokens && tiles < multiprocessors)
    splits = std::clamp<int64_t>(multiprocessors / tiles, 1,
                                 std::clamp<int64_t>(k_tiles / kMinSplitKTiles, 1, kMaxSplits));
  config.split_k_tiles = int(ceil_div(k_tiles, splits));
  config.k_splits = int(ceil_div(k_tiles, config.split_k_tiles));
  config.ctas = tiles * config.k_splits;
  if (config.k_splits > 1) {
    // Tickets in the ticket area shared with quantized_linear (kLinearTicketAreaBytes), the partial sums after it.
    check(tiles * int64_t(sizeof(uint32_t)) <= int64_t(kLinearTicketAreaBytes), "quantized_gemm: weight [",
          weight.rows, ", ", weight.cols, "] splits K over ", tiles, " tiles, more tickets than the workspace's ",
          "ticket area holds");
    config.ticket_bytes = kLinearTicketAreaBytes;
    config.workspace_bytes =
        config.ticket_bytes + size_t(config.k_splits) * size_t(tokens) * size_t(weight.rows) * sizeof(float);
  }
  return config;
}

size_t quantized_gemm_workspace_bytes(const DeviceMatrixView& weight, int64_t tokens) {
  // Only calls of up to kGemmMaxSplitTokens tokens split K; fewer tokens may split more ways.
  const int multiprocessors = current_multiprocessors();
  size_t bytes = 0;
  for (int64_t t = 1; t <= std::min(tokens, kGemmMaxSplitTokens); ++t)
    bytes = std::max(bytes, choose_quantized_gemm_config(weight, t, multiprocessors).workspace_bytes);
  return bytes;
}

namespace {

// The pointer, stride and workspace checks of check_quantized_gemm_params for an already chosen config.
void check_params_for_config(const QuantizedGemmParams& p, const QuantizedGemmConfig& config) {
  const DeviceMatrixView& w = p.weight;
  check(w.rows >= 1 && w.rows <= INT_MAX, "quantized_gemm: ", describe(w), ": N must be in [1, ", INT_MAX, "]");
  check(w.cols >= gemm::kBlockK && w.cols % gemm::kBlockK == 0 && w.cols <= INT_MAX, "quantized_gemm: ", describe(w),
        ": K = ", w.cols, " must be a positive multiple of ", gemm::kBlockK);
  check(p.tokens >= 1 && p.tokens <= INT_MAX, "quantized_gemm: ", p.tokens, " tokens (at least 1)");
  check(p.groups >= 1 && w.rows % p.groups == 0 && (p.groups == 1 || (w.rows / p.groups) % gemm::kBlockRows == 0),
        "quantized_gemm: ", describe(w), " in ", p.groups, " groups: the groups must be whole 128-row tiles");
  check(int64_t(p.groups) * w.cols <= INT_MAX, "quantized_gemm: ", p.groups, " groups of K = ", w.cols,
        " exceed the x tensor map");
  check(w.data != nullptr, "quantized_gemm: ", describe(w), " has no device data");
  check(w.format == WeightFormat::BF16 || w.scales != nullptr, "quantized_gemm: ", describe(w),
        " has no device scales");
  check(reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && w.data_row_bytes % 16 == 0, "quantized_gemm: ",
        describe(w), " data must be 16-byte aligned with a row pitch that is a multiple of 16 bytes (pitch ",
        w.data_row_bytes, ")");
  check(w.format != WeightFormat::NVFP4 || (std::isfinite(w.global_scale) && w.global_scale > 0.0f),
        "quantized_gemm: ", describe(w), " has global scale ", w.global_scale, " (positive finite expected)");
  check(p.x != nullptr, "quantized_gemm: null x");
  check((p.y == nullptr) != (p.y_bf16 == nullptr), "quantized_gemm: exactly one of y (fp32) and y_bf16 must be set");
  check(reinterpret_cast<uintptr_t>(p.x) % 16 == 0, "quantized_gemm: x must be 16-byte aligned");
  const int64_t x_cols = int64_t(p.groups) * w.cols;
  check(p.x_row_stride >= x_cols && p.x_row_stride % 8 == 0, "quantized_gemm: x row stride ", p.x_row_stride,
        " must be at least groups × K = ", x_cols, " and a multiple of 8 elements (16 bytes)");
  check(p.y_row_stride >= w.rows, "quantized_gemm: y row stride ", p.y_row_stride, " is less than N = ", w.rows);
  const size_t out_element = p.y != nullptr ? sizeof(float) : sizeof(__nv_bfloat16);
  const auto* out_begin = p.y != nullptr ? reinterpret_cast<const char*>(p.y) : reinterpret_cast<const char*>(p.y_bf16);
  check(reinterpret_cast<uintptr_t>(out_begin) % out_element == 0, "quantized_gemm: the output must be ",
        out_element, "-byte aligned");
  const char* out_end = out_begin + size_t((p.tokens - 1) * p.y_row_stride + w.rows) * out_element;
  const auto* x_begin = reinterpret_cast<const char*>(p.x);
  const char* x_end = x_begin + size_t((p.tokens - 1) * p.x_row_stride + x_cols) * sizeof(__nv_bfloat16);
  check(out_end <= x_begin || x_end <= out_begin, "quantized_gemm: y must not alias x");
  if (config.workspace_bytes > 0) {
    check(p.workspace != nullptr && p.workspace_bytes >= config.workspace_bytes, "quantized_gemm: ", describe(w),
          " at ", p.tokens, " tokens splits K ", config.k_splits, " ways and needs a workspace of ",
          config.workspace_bytes, " bytes (have ", p.workspace == nullptr ? size_t(0) : p.workspace_bytes, ")");
    check(reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0, "quantized_gemm: the workspace must be 16-byte aligned");
    const auto* ws_begin = static_cast<const char*>(p.workspace);
    const char* ws_end = ws_begin + config.workspace_bytes;
    check(out_end <= ws_begin || ws_end <= out_begin, "quantized_gemm: y must not overlap the workspace");
  }
  check(ceil_div(p.tokens, config.block_tokens) <= 65535, "quantized_gemm: ", p.tokens,
        " tokens exceed the launch grid (", 65535 * config.block_tokens, " at most)");
  check_device();
}

}  // namespace

void check_quantized_gemm_params(const QuantizedGemmParams& p) {
  check(p.tokens >= 1, "quantized_gemm: ", p.tokens, " tokens (at least 1)");
  check_params_for_config(p, choose_quantized_gemm_config(p.weight, p.tokens, current_multiprocessors()));
}

void run_quantized_gemm(const QuantizedGemmParams& p) {
  const DeviceMatrixView& w = p.weight;
  const GemmWeight kind = gemm_weight_of(w);
  check(p.tokens >= 1, "quantized_gemm: ", p.tokens, " tokens (at least 1)");
  const QuantizedGemmConfig config = choose_quantized_gemm_config(w, p.tokens, current_multiprocessors());
  check_params_for_config(p, config);

  auto* workspace = static_cast<uint8_t*>(p.workspace);
  const gemm::GemmKernelArgs args{
      .x_map = sm90::encode_tensor_map_2d(
          {.type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
           .base = p.x,
           .cols = uint64_t(p.groups) * uint64_t(w.cols),
           .rows = uint64_t(p.tokens),
           .row_stride_bytes = uint64_t(p.x_row_stride) * sizeof(__nv_bfloat16),
           .box_cols = gemm::kBlockK,
           .box_rows = uint32_t(config.block_tokens),
           .swizzle = CU_TENSOR_MAP_SWIZZLE_128B},
          "quantized_gemm x"),
      .w_map = weight_tensor_map(w),
      .scales = w.scales,
      .scales_per_row = w.scales_per_row,
      .rows = int(w.rows),
      .tokens = int(p.tokens),
      .k_tiles = int(w.cols / gemm::kBlockK),
      .rows_per_group = int(w.rows / p.groups),
      .split_k_tiles = config.split_k_tiles,
      .k_splits = config.k_splits,
      .y = p.y,
      .y_bf16 = p.y_bf16,
      .y_row_stride = p.y_row_stride,
      .output_scale = w.format == WeightFormat::NVFP4 ? w.global_scale : 1.0f,
      .tickets = config.k_splits > 1 ? reinterpret_cast<uint32_t*>(workspace) : nullptr,
      .partials = config.k_splits > 1 ? reinterpret_cast<float*>(workspace + config.ticket_bytes) : nullptr,
  };
  if (config.block_tokens == 256)
    launch_for_weight<256, 1>(kind, p, config, args);
  else if (config.block_tokens == 128)
    launch_for_weight<128, 1>(kind, p, config, args);
  else if (config.ctas_per_sm == 2)
    launch_for_weight<64, 2>(kind, p, config, args);
  else
    launch_for_weight<64, 1>(kind, p, config, args);
}

}  // namespace dsv4::cuda
