// RoPE applied in place to fp32 vectors on the device: [tokens, heads, head_dim], the last rope_dim dims of each
// vector rotated at its token's position (the queries of the attention; KV vectors get theirs inside kv_insert and
// the compressor). Same rotation as cpu::apply_rope (rope.cuh: fp32 angle, double cos/sin, no FMA contraction), the
// factors read from a RoPE table (rope.hpp) with a row for every position given.
// A programmatic dependent launch (ptx/dependent_launch.cuh); asynchronous on `stream`; no allocation, no
// synchronisation.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

struct RopeApplyParams {
  float* x = nullptr;                       // device [tokens, heads, head_dim], rotated in place
  int64_t tokens = 0;
  int64_t heads = 1;
  int64_t head_dim = 0;
  int64_t rope_dim = 0;                     // even, ≤ head_dim
  const float2* rope_table = nullptr;       // device [positions, rope_dim / 2] (rope.hpp)
  const int64_t* positions = nullptr;       // device [tokens]
  cudaStream_t stream = nullptr;
};

void run_rope_apply(const RopeApplyParams& params);

}  // namespace dsv4::cuda
