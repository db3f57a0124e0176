#include "backends/cuda/kernels/rms_norm.hpp"

#include <algorithm>
#include <cstdint>

#include "backends/cuda/kernels/rms_norm.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

constexpr int64_t kWarpRowMaxWidth = 32 * rms::kValuesPerThread;
constexpr int64_t kMaxRows = int64_t(UINT32_MAX);  // rms_norm_rows divides row indices in 32 bits

static_assert(kRmsNormMaxWidth == int64_t(rms::kThreads) * rms::kValuesPerThread,
              "the CTA-per-row kernel holds kRmsNormMaxWidth values in registers");

}  // namespace

void check_rms_norm_params(const RmsNormParams& p) {
  check(p.rows >= 0, "rms_norm: negative row count ", p.rows);
  check(p.width >= 1 && p.width <= kRmsNormMaxWidth, "rms_norm: width ", p.width, " outside 1..", kRmsNormMaxWidth);
  check(p.x != nullptr, "rms_norm: null x");
  check(p.y != nullptr || p.y_bf16 != nullptr, "rms_norm: no output (both the fp32 and the bf16 pointer are null)");
  const int64_t stride = p.x_row_stride == 0 ? p.width : p.x_row_stride;
  check(stride >= p.width, "rms_norm: x_row_stride ", p.x_row_stride, " is below the width ", p.width);
  check(p.rows_per_position >= 1, "rms_norm: rows_per_position ", p.rows_per_position, " must be at least 1");
  check(p.rows <= kMaxRows && p.rows_per_position <= kMaxRows, "rms_norm: ", p.rows, " rows of ", p.rows_per_position,
        " per position exceed the kernel's 32-bit row indices");
  const int64_t group_stride = p.x_group_stride == 0 ? p.rows_per_position * stride : p.x_group_stride;
  check(group_stride >= (p.rows_per_position - 1) * stride + p.width, "rms_norm: x_group_stride ", p.x_group_stride,
        " is below a group of ", p.rows_per_position, " rows ", stride, " apart");
  const bool contiguous = stride == p.width && group_stride == p.rows_per_position * p.width;
  const auto* x = reinterpret_cast<const char*>(p.x);
  const size_t elements = size_t(p.rows) * size_t(p.width);
  const int64_t last = p.rows - 1;
  const size_t x_bytes =
      p.rows == 0 ? 0
                  : size_t((last / p.rows_per_position) * group_stride + (last % p.rows_per_position) * stride +
                           p.width) * 4;
  const auto* y = reinterpret_cast<const char*>(p.y_bf16);
  check(p.y_bf16 == nullptr || y + elements * 2 <= x || x + x_bytes <= y, "rms_norm: y_bf16 overlaps x");
  const auto* y32 = reinterpret_cast<const char*>(p.y);
  check(p.y == nullptr || (p.y == p.x && contiguous) || y32 + elements * 4 <= x || x + x_bytes <= y32,
        "rms_norm: y must be x itself (with contiguous rows) or not overlap it");
  if (p.rope_table != nullptr) {
    check(p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.rope_dim <= p.width && p.width % 2 == 0, "rms_norm: rope_dim ",
          p.rope_dim, " must be even and within the even width ", p.width);
    check(p.rope_dim <= 2 * kRmsNormMaxRopePairs, "rms_norm: rope_dim ", p.rope_dim, " exceeds ",
          2 * kRmsNormMaxRopePairs);
    check(p.positions != nullptr, "rms_norm: RoPE needs positions");
  }
}

namespace rms {

RmsNormLaunch rms_norm_launch(const RmsNormParams& p) {
  check_rms_norm_params(p);
  RmsNormLaunch launch;
  const int64_t stride = p.x_row_stride == 0 ? p.width : p.x_row_stride;
  launch.args = RmsNormArgs{.x = p.x,
                            .x_row_stride = stride,
                            .weight = p.weight,
                            .rows = p.rows,
                            .width = int(p.width),
                            .eps = p.eps,
                            .round_to_bf16 = p.round_to_bf16,
                            .y = p.y,
                            .y_bf16 = p.y_bf16,
                            .rope_table = p.rope_table,
                            .positions = p.positions,
                            .rope_dim = int(p.rope_dim),
                            .rows_per_position = p.rows_per_position,
                            .x_group_stride = p.x_group_stride == 0 ? p.rows_per_position * stride
                                                                    : p.x_group_stride};
  launch.warp_rows = !p.cta_rows && p.width <= kWarpRowMaxWidth;
  launch.rope = p.rope_table != nullptr;
  const int64_t group = launch.warp_rows ? 32 : kThreads;
  launch.values = p.width <= group * kTinyRowValues    ? kTinyRowValues
                  : p.width <= group * kShortRowValues ? kShortRowValues
                                                       : kValuesPerThread;
  launch.ctas = launch.warp_rows ? (p.rows + kRowsPerCta<32> - 1) / kRowsPerCta<32> : p.rows;
  check(launch.ctas <= 0x7FFFFFFF, "rms_norm: ", p.rows, " rows exceed the launch limit");
  return launch;
}

}  // namespace rms

void run_rms_norm(const RmsNormParams& p) {
  const rms::RmsNormLaunch launch = rms::rms_norm_launch(p);
  if (p.rows == 0) return;
  using Kernel = void (*)(rms::RmsNormArgs);
  using namespace rms;
  constexpr int kLong = kValuesPerThread, kShort = kShortRowValues, kTiny = kTinyRowValues;
  // [warp rows][rope][values: tiny, short, long]
  constexpr Kernel kKernels[2][2][3] = {
      {{rms_norm_kernel<kThreads, false, kTiny>, rms_norm_kernel<kThreads, false, kShort>,
        rms_norm_kernel<kThreads, false, kLong>},
       {rms_norm_kernel<kThreads, true, kTiny>, rms_norm_kernel<kThreads, true, kShort>,
        rms_norm_kernel<kThreads, true, kLong>}},
      {{rms_norm_kernel<32, false, kTiny>, rms_norm_kernel<32, false, kShort>, rms_norm_kernel<32, false, kLong>},
       {rms_norm_kernel<32, true, kTiny>, rms_norm_kernel<32, true, kShort>, rms_norm_kernel<32, true, kLong>}}};
  const int values = launch.values == kTiny ? 0 : launch.values == kShort ? 1 : 2;
  const Kernel kernel = kKernels[launch.warp_rows][launch.rope][values];
  launch_chained(kernel, dim3(unsigned(launch.ctas)), dim3(rms::kThreads), 0, p.stream, launch.args, "rms_norm");
}

}  // namespace dsv4::cuda
