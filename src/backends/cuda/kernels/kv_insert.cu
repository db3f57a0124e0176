#include "backends/cuda/kernels/kv_insert.cuh"

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

void check_kv_insert_params(const KvInsertParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  check(p.cache.pool != nullptr && p.cache.page_table != nullptr, "kv_insert: the KV cache view has no pool/table");
  check(layout.head_dim > 0 && layout.head_dim <= 2 * kKvInsertMaxThreads, "kv_insert: head_dim ", layout.head_dim,
        " outside (0, ", 2 * kKvInsertMaxThreads, "]");
  check(p.layer >= 0 && p.layer < p.cache.layers, "kv_insert: layer ", p.layer, " outside [0, ", p.cache.layers, ")");
  check(p.rows >= 0 && p.rows < (int64_t(1) << 31), "kv_insert: row count ", p.rows, " out of range");
  check(p.rows == 0 || (p.x != nullptr && p.sequence_slots != nullptr && p.dest_rows != nullptr),
        "kv_insert: x, sequence_slots and dest_rows are required");
  check(p.rope_frequencies == nullptr || layout.rope_dim > 0, "kv_insert: rope_frequencies given but rope_dim is 0");
  check(p.rope_frequencies == nullptr || p.rows == 0 || p.positions != nullptr,
        "kv_insert: RoPE needs the positions");
  check(reinterpret_cast<uintptr_t>(p.x) % 8 == 0, "kv_insert: x must be 8-byte aligned");
}

void run_kv_insert(const KvInsertParams& p) {
  check_kv_insert_params(p);
  if (p.rows == 0) return;
  const int pairs = p.cache.layout.head_dim / 2;
  const int threads = (pairs + 31) / 32 * 32;
  kv_insert_kernel<<<unsigned(p.rows), unsigned(threads), 0, p.stream>>>(p);
  DSV4_CUDA_CHECK_LAUNCH("kv_insert");
}

}  // namespace dsv4::cuda
