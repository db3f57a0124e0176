#include "backends/cuda/kernels/rope_apply.hpp"

#include <algorithm>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

// One thread per rotated pair.
__global__ void rope_apply_kernel(const RopeApplyParams p) {
  allow_dependents();
  wait_for_prior_grids();  // x is the previous kernel's output
  const int64_t pairs_per_vector = p.rope_dim / 2;
  const int64_t pairs = p.tokens * p.heads * pairs_per_vector;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < pairs; i += int64_t(gridDim.x) * kThreads) {
    const int64_t vector = i / pairs_per_vector, pair = i % pairs_per_vector;
    const int64_t token = vector / p.heads;
    float* v = p.x + vector * p.head_dim + (p.head_dim - p.rope_dim) + 2 * pair;
    float x0 = v[0], x1 = v[1];
    rope_rotate_pair(x0, x1, rope_table_factors(p.rope_table, int(pairs_per_vector), p.positions[token], int(pair)),
                     false);
    v[0] = x0;
    v[1] = x1;
  }
}

}  // namespace

void run_rope_apply(const RopeApplyParams& p) {
  check(p.tokens >= 0 && p.heads > 0 && p.head_dim > 0 && p.rope_dim > 0 && p.rope_dim % 2 == 0 &&
            p.rope_dim <= p.head_dim,
        "rope_apply: tokens ", p.tokens, ", heads ", p.heads, ", head_dim ", p.head_dim, ", rope_dim ", p.rope_dim,
        " (rope_dim even, at most head_dim)");
  if (p.tokens == 0) return;
  check(p.x && p.rope_table && p.positions, "rope_apply: x, rope_table and positions are required");
  const int64_t pairs = p.tokens * p.heads * (p.rope_dim / 2);
  const unsigned blocks = unsigned(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 4096));
  launch_chained(rope_apply_kernel, dim3(blocks), dim3(kThreads), 0, p.stream, p, "rope_apply");
}

}  // namespace dsv4::cuda
