// The RoPE factors of every position of a context on the device (a RoPE table): row p holds (cos θ_i, sin θ_i) of
// each pair i < pairs at position p, as float2, exactly the values rope_factors (rope.cuh) computes for (p, f_i). Built
// once when a model loads (per distinct frequency set), it is a parameter like a weight: a kernel reads its pairs'
// factors instead of taking a double-precision sincos per pair, and may read them before its grid-dependency wait.
// Size: positions · pairs · 8 B (Flash/Pro, 32 pairs: 256 B per position, 1 MiB per 4096 positions).
//
// Dispatch contract of run_rope_table: table [positions, pairs] float2, frequencies [pairs] fp32
// (cpu::RopeTable::frequencies()); asynchronous on `stream`, no allocation, no synchronisation.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace dsv4::cuda {

struct RopeTableParams {
  float2* table = nullptr;             // device [positions, pairs]
  const float* frequencies = nullptr;  // device [pairs]
  int64_t pairs = 0;                   // rope_dim / 2
  int64_t positions = 0;               // rows: positions 0 .. positions − 1
  cudaStream_t stream = nullptr;
};

size_t rope_table_bytes(int64_t pairs, int64_t positions);

// Throws (naming the field at fault) unless run_rope_table supports the call.
void check_rope_table_params(const RopeTableParams& params);

void run_rope_table(const RopeTableParams& params);

}  // namespace dsv4::cuda
