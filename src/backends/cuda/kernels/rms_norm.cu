#include "backends/cuda/kernels/rms_norm.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/rms_norm.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

constexpr int64_t kWarpRowMaxWidth = 32 * rms::kValuesPerThread;

static_assert(kRmsNormMaxWidth == int64_t(rms::kThreads) * rms::kValuesPerThread,
              "the CTA-per-row kernel holds kRmsNormMaxWidth values in registers");

}  // namespace

void check_rms_norm_params(const RmsNormParams& p) {
  check(p.rows >= 0, "rms_norm: negative row count ", p.rows);
  check(p.width >= 1 && p.width <= kRmsNormMaxWidth, "rms_norm: width ", p.width, " outside 1..", kRmsNormMaxWidth);
  check(p.x != nullptr, "rms_norm: null x");
  check(p.y != nullptr || p.y_bf16 != nullptr, "rms_norm: no output (both the fp32 and the bf16 pointer are null)");
  const auto* x = reinterpret_cast<const char*>(p.x);
  const auto* y = reinterpret_cast<const char*>(p.y_bf16);
  const size_t elements = size_t(p.rows) * size_t(p.width);
  check(p.y_bf16 == nullptr || y + elements * 2 <= x || x + elements * 4 <= y, "rms_norm: y_bf16 overlaps x");
  const auto* y32 = reinterpret_cast<const char*>(p.y);
  check(p.y == nullptr || p.y == p.x || y32 + elements * 4 <= x || x + elements * 4 <= y32,
        "rms_norm: y must be x itself or not overlap it");
  if (p.rope_frequencies != nullptr) {
    check(p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.rope_dim <= p.width && p.width % 2 == 0, "rms_norm: rope_dim ",
          p.rope_dim, " must be even and within the even width ", p.width);
    check(p.positions != nullptr && p.rows_per_position >= 1, "rms_norm: RoPE needs positions and rows_per_position ",
          "≥ 1 (got ", p.rows_per_position, ")");
  }
}

void run_rms_norm(const RmsNormParams& p) {
  check_rms_norm_params(p);
  if (p.rows == 0) return;
  const rms::RmsNormArgs args{.x = p.x,
                              .weight = p.weight,
                              .rows = p.rows,
                              .width = int(p.width),
                              .eps = p.eps,
                              .round_to_bf16 = p.round_to_bf16,
                              .y = p.y,
                              .y_bf16 = p.y_bf16,
                              .rope_frequencies = p.rope_frequencies,
                              .positions = p.positions,
                              .rope_dim = int(p.rope_dim),
                              .rows_per_position = std::max<int64_t>(p.rows_per_position, 1)};
  if (p.width <= kWarpRowMaxWidth) {
    constexpr int kRowsPerCta = rms::kThreads / 32;
    const int64_t blocks = (p.rows + kRowsPerCta - 1) / kRowsPerCta;
    check(blocks <= 0x7FFFFFFF, "rms_norm: ", p.rows, " rows exceed the launch limit");
    if (p.rope_frequencies != nullptr)
      rms::rms_norm_kernel<32, true><<<unsigned(blocks), rms::kThreads, 0, p.stream>>>(args);
    else
      rms::rms_norm_kernel<32, false><<<unsigned(blocks), rms::kThreads, 0, p.stream>>>(args);
  } else {
    check(p.rows <= 0x7FFFFFFF, "rms_norm: ", p.rows, " rows exceed the launch limit");
    if (p.rope_frequencies != nullptr)
      rms::rms_norm_kernel<rms::kThreads, true><<<unsigned(p.rows), rms::kThreads, 0, p.stream>>>(args);
    else
      rms::rms_norm_kernel<rms::kThreads, false><<<unsigned(p.rows), rms::kThreads, 0, p.stream>>>(args);
  }
  DSV4_CUDA_CHECK_LAUNCH("rms_norm");
}

}  // namespace dsv4::cuda
