#include "backends/cpu/linear.hpp"

#include <algorithm>
#include <vector>

#include "backends/cpu/vector_math.hpp"
#include "backends/cpu/weight_decode.hpp"
#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

// A dequantized tile holds about this many floats (256 KiB): small enough to stay in a core's L2 while every
// token's dot products run over it, large enough to amortise the per-tile work.
constexpr int64_t kTileFloats = 64 * 1024;
constexpr int64_t kMaxTileRows = 64;

struct ProjectionShape {
  int64_t groups = 1;       // G: row blocks that each read their own slice of x
  int64_t group_rows = 0;   // R: output rows per group
  int64_t k_len = 0;        // K: inputs per group (= w.cols)
  int64_t x_stride = 0;     // floats between tokens in x
  int64_t y_stride = 0;     // floats between tokens in y
};

void check_weight(const QuantizedMatrix& w, const char* op) {
  check(w.rows > 0 && w.cols > 0, op, ": weight has an empty shape [", w.rows, ", ", w.cols, "]");
  // Once per call, so the tile decoders can skip per-tile validation.
  w.check_layout(op);
}

void project(const QuantizedMatrix& w, const ProjectionShape& s, const float* x, int64_t T, float* y) {
  if (T == 0) return;
  const int64_t rows_per_tile = std::clamp<int64_t>(kTileFloats / s.k_len / 4 * 4, 1, kMaxTileRows);
  const int64_t tiles_per_group = (s.group_rows + rows_per_tile - 1) / rows_per_tile;
  ThreadPool::global().parallel_for(0, s.groups * tiles_per_group, [&](int64_t item) {
    const int64_t group = item / tiles_per_group;
    const int64_t local_begin = (item % tiles_per_group) * rows_per_tile;
    const int64_t rows = std::min(rows_per_tile, s.group_rows - local_begin);
    const int64_t row_begin = group * s.group_rows + local_begin;
    // Reused across calls so the hot loop never allocates.
    thread_local std::vector<float> tile;
    if (static_cast<int64_t>(tile.size()) < rows * s.k_len) tile.resize(rows * s.k_len);
    decode_weight_rows(w, row_begin, row_begin + rows, tile.data());
    matmul_tile(tile.data(), rows, s.k_len, x + group * s.k_len, s.x_stride, T, y + row_begin, s.y_stride);
  });
}

}  // namespace

void linear(const QuantizedMatrix& w, const float* x, int64_t T, float* y) {
  check_weight(w, "linear");
  check(T >= 0, "linear: negative token count ", T);
  project(w, {.groups = 1, .group_rows = w.rows, .k_len = w.cols, .x_stride = w.cols, .y_stride = w.rows}, x, T, y);
}

void grouped_linear(const QuantizedMatrix& w, int64_t groups, const float* x, int64_t T, float* y) {
  check_weight(w, "grouped_linear");
  check(T >= 0, "grouped_linear: negative token count ", T);
  check(groups > 0 && w.rows % groups == 0, "grouped_linear: ", w.rows, " weight rows do not split into ", groups,
        " groups");
  project(w,
          {.groups = groups,
           .group_rows = w.rows / groups,
           .k_len = w.cols,
           .x_stride = groups * w.cols,
           .y_stride = w.rows},
          x, T, y);
}

}  // namespace dsv4::cpu
