#include "backends/cuda/kernels/rope.hpp"

#include <algorithm>

#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

constexpr int kThreads = 256;

// One thread per (position, pair), grid-strided.
__global__ void rope_table_kernel(const RopeTableParams p) {
  allow_dependents();
  wait_for_prior_grids();  // the frequencies may come from an earlier launch
  const int64_t entries = p.positions * p.pairs;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < entries; i += int64_t(gridDim.x) * kThreads) {
    const RopeFactors f = rope_factors(i / p.pairs, p.frequencies[i % p.pairs]);
    p.table[i] = make_float2(f.cos_theta, f.sin_theta);
  }
}

}  // namespace

size_t rope_table_bytes(int64_t pairs, int64_t positions) {
  return size_t(std::max<int64_t>(pairs, 0)) * size_t(std::max<int64_t>(positions, 0)) * sizeof(float2);
}

void check_rope_table_params(const RopeTableParams& p) {
  check(p.pairs > 0 && p.positions > 0, "rope_table: pairs ", p.pairs, " and positions ", p.positions,
        " must be positive");
  check(p.table != nullptr && p.frequencies != nullptr, "rope_table: table and frequencies are required");
  check(reinterpret_cast<uintptr_t>(p.table) % alignof(float2) == 0, "rope_table: the table must be 8-byte aligned");
}

void run_rope_table(const RopeTableParams& p) {
  check_rope_table_params(p);
  const int64_t entries = p.positions * p.pairs;
  const unsigned blocks = unsigned(std::min<int64_t>((entries + kThreads - 1) / kThreads, 8192));
  launch_chained(rope_table_kernel, dim3(blocks), dim3(kThreads), 0, p.stream, p, "rope_table");
}

}  // namespace dsv4::cuda
