// RMSNorm on the GPU (CPU reference: backends/cpu/rms_norm.hpp): y = x · rsqrt(mean(x²) + eps) · w, fp32 math.
// One op for every norm of the model: attn_norm / ffn_norm / the final norm over d, q_norm over q_lora, kv_norm over
// D, and the weightless per-head q norm (rows = T·H, width = D, weight null).
//
// Dispatch contract:
// - x fp32 [rows, width], rows x_row_stride elements apart (0: width, e.g. a slice of a wider projection output);
//   width 1..kRmsNormMaxWidth (any value, no alignment needed). Rows come in groups of rows_per_position (a token's
//   heads) whose first rows are x_group_stride apart (0: rows_per_position · x_row_stride), so the heads of each
//   token may be a slice of a wider row (the queries of a stacked projection). A warp per row up to 1024 values, a
//   CTA per row beyond; the row stays in registers, so x is read once and y may alias x (then x is contiguous).
// - y is always contiguous [rows, width].
// - Outputs: y fp32 and/or y_bf16 (at least one); round_to_bf16 stores y rounded to bf16 in the fp32 buffer too
//   (Reference numerics).
// - Optional RoPE after the norm (the queries: per-head norm then rotation in one launch): with rope_table (rope.hpp,
//   a row for every position given), the last rope_dim ≤ 2 · kRmsNormMaxRopePairs dims of row r are rotated at
//   positions[r / rows_per_position], exactly as run_rope_apply does on the normed values (bit-identical to the
//   two launches in a row).
// - A programmatic dependent launch (ptx/dependent_launch.cuh): the weight is read before the previous kernel in
//   the stream has finished, x, the positions and their RoPE factors only after.
// - Asynchronous on `stream`; no allocation, no host synchronisation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::cuda {

inline constexpr int64_t kRmsNormMaxWidth = 8192;
inline constexpr int64_t kRmsNormMaxRopePairs = 64;

struct RmsNormParams {
  const float* x = nullptr;        // [rows, width], rows x_row_stride apart
  int64_t x_row_stride = 0;        // elements; 0 = width
  const float* weight = nullptr;   // [width], or null for the weightless form
  int64_t rows = 0;
  int64_t width = 0;
  float eps = 1e-6f;
  bool round_to_bf16 = false;
  float* y = nullptr;              // [rows, width]; may alias x; may be null when y_bf16 is set
  __nv_bfloat16* y_bf16 = nullptr; // optional [rows, width]
  const float2* rope_table = nullptr;       // optional device [positions, rope_dim / 2] (rope.hpp)
  const int64_t* positions = nullptr;       // device [rows / rows_per_position], with rope_table
  int64_t rope_dim = 0;                     // even, ≤ width
  int64_t rows_per_position = 1;            // e.g. heads; also the row groups of x_group_stride
  int64_t x_group_stride = 0;               // elements; 0 = rows_per_position · x_row_stride
  // A CTA (256 threads) per row whatever the width, instead of a warp per row up to 1024 values: a few short rows
  // (a decode step's query heads) then spread over 8× the SMs with 1/8 of the serial work per thread. The sum of
  // squares runs in the CTA rows' order (another fp32 order than the warp rows' for widths ≤ 1024).
  bool cta_rows = false;
  cudaStream_t stream = nullptr;
};

// Throws (naming the field at fault) unless run_rms_norm supports the call.
void check_rms_norm_params(const RmsNormParams& params);

void run_rms_norm(const RmsNormParams& params);

}  // namespace dsv4::cuda
