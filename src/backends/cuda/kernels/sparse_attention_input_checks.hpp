// The checks of a sparse-attention call's device arrays shared by the decode launcher (sparse_attention.cu) and the
// prefill launcher (sparse_attention_prefill.cu).
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/sparse_attention.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

// Throws, naming `op`, unless q, out and the index arrays that a call of p.tokens > 0 reads are present and aligned
// as the kernels load them.
inline void check_sparse_attention_inputs(const SparseAttentionParams& p, const char* op) {
  check(p.q != nullptr && p.out != nullptr && p.sequence_slots != nullptr, op,
        ": q, out and sequence_slots are required");
  check(reinterpret_cast<uintptr_t>(p.q) % 16 == 0, op, ": q must be 16-byte aligned");
  check(reinterpret_cast<uintptr_t>(p.out) % 8 == 0, op, ": out must be 8-byte aligned");
  check(p.window_slots == 0 || p.window_index != nullptr, op, ": window_slots ", p.window_slots,
        " without window_index");
  check(p.compressed_slots == 0 || p.compressed_index != nullptr, op, ": compressed_slots ", p.compressed_slots,
        " without compressed_index");
  check(p.rope_frequencies == nullptr || (p.positions != nullptr && p.cache.layout.rope_dim > 0), op,
        ": the inverse RoPE needs positions and a cache rope_dim > 0");
}

}  // namespace dsv4::cuda
