// Fused "RMSNorm(kv_norm) → RoPE at the entry's position → quantise → insert" for new KV vectors
// (dsv4-model.md §3.1, §3.2, §3.5): fp32 [rows, D] in, one stored entry per row written into the paged KV cache.
//
// Dispatch contract:
// - Each row goes to (sequence_slots[r], layer, array, dest_rows[r]); that row's page must be allocated
//   (KvCache::ensure_rows) and the page table uploaded before the launch runs; rows must be distinct. A row with
//   dest_rows[r] < 0 is skipped (a batched step's compressor rows that completed no entry), so a captured launch
//   over a fixed row count serves any step; its sequence_slots[r] must still be a slot of the cache and, with RoPE,
//   its position a row of rope_table (both are read before the destination is tested).
// - Math in fp32 like cpu::rms_norm and cpu::RopeTable::rotate; the mean square is summed in another order, so
//   results may differ from the CPU's in the last bits. Bf16 caches store the rounded-to-nearest bf16 of the result;
//   Fp8Reference caches store exactly what cpu::round_kv_reference keeps (same scale rule and e4m3 rounding, from
//   the same host/device codecs).
// - x rows are x_row_stride elements apart (0: head_dim), so x may be a slice of a wider projection output.
// - Optionally one more RMSNorm rides in the same launch (fused_norm with rows > 0: the queries' per-head norm with
//   RoPE, or q_norm of the low-rank query), exactly as run_rms_norm computes it, in CTAs after the entries': one
//   launch less per layer. Needs head_dim ≤ kKvInsertFusedNormMaxHeadDim (the launch then has the norm's 256
//   threads); fused_norm.stream is unused.
// - RoPE factors come from a RoPE table (rope.hpp) with a row for every position the rows carry.
// - A programmatic dependent launch (ptx/dependent_launch.cuh): the parameters (kv_norm weight, the RoPE table, the
//   fused norm's weight) are read before the previous kernel in the stream has finished, everything else after.
// - Asynchronous on `stream`; no allocation, no synchronisation.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kv_cache.hpp"

namespace dsv4::cuda {

inline constexpr int64_t kKvInsertFusedNormMaxHeadDim = 512;

struct KvInsertParams {
  KvCacheView cache;
  KvArray array = KvArray::Window;
  int layer = 0;
  int64_t rows = 0;                         // new entries
  const float* x = nullptr;                 // device fp32 [rows, head_dim], rows x_row_stride apart
  int64_t x_row_stride = 0;                 // elements; 0 = head_dim
  const float* norm_weight = nullptr;       // device fp32 [head_dim] (kv_norm); null = store x as it is (entries
                                            // the compressor already normalised and rotated)
  float eps = 1e-6f;
  bool round_input_to_bf16 = false;         // compressor entries: the reference normalises bf16(C_w)
  const float2* rope_table = nullptr;       // device [positions, rope_dim / 2] (rope.hpp); null = no RoPE
  const int32_t* sequence_slots = nullptr;  // device [rows]
  const int64_t* positions = nullptr;       // device [rows]: RoPE positions (needed only with rope_table)
  const int32_t* dest_rows = nullptr;       // device [rows]: logical rows in the target array, < 0 = skip
  cudaStream_t stream = nullptr;
  RmsNormParams fused_norm;                 // rows 0: none
};

// Throws (naming the field at fault) unless run_kv_insert supports the call.
void check_kv_insert_params(const KvInsertParams& params);

void run_kv_insert(const KvInsertParams& params);

}  // namespace dsv4::cuda
