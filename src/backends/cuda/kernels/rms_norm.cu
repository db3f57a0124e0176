#include "backends/cuda/kernels/rms_norm.hpp"

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
                              .y_bf16 = p.y_bf16};
  if (p.width <= kWarpRowMaxWidth) {
    constexpr int kRowsPerCta = rms::kThreads / 32;
    const int64_t blocks = (p.rows + kRowsPerCta - 1) / kRowsPerCta;
    check(blocks <= 0x7FFFFFFF, "rms_norm: ", p.rows, " rows exceed the launch limit");
    rms::rms_norm_kernel<32><<<unsigned(blocks), rms::kThreads, 0, p.stream>>>(args);
  } else {
    check(p.rows <= 0x7FFFFFFF, "rms_norm: ", p.rows, " rows exceed the launch limit");
    rms::rms_norm_kernel<rms::kThreads><<<unsigned(p.rows), rms::kThreads, 0, p.stream>>>(args);
  }
  DSV4_CUDA_CHECK_LAUNCH("rms_norm");
}

}  // namespace dsv4::cuda
