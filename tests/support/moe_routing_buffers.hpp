// The device buffers of one run_moe_routing call, sized for T tokens of a router (E experts, d wide, top_k, R rows
// per work item) as MoeRoutingBuffers documents them; the ticket, status and work-item count words start at zero.
// Shared by test_moe_router_cuda and bench_cuda_moe_router (which includes it by path: no gtest here).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>

#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"

namespace dsv4::cuda {

struct MoeRoutingRunBuffers {
  DeviceBuffer logits, u_bf16, ids, weights, offsets, row_tokens, slot_rows, work_items;
  DeviceBuffer words;  // finished_ctas, status, work_item_count

  MoeRoutingRunBuffers(int64_t experts, int64_t hidden, int top_k, int rows_per_item, int tokens)
      : logits(size_t(tokens) * size_t(experts) * 4, "logits"), u_bf16(size_t(tokens) * size_t(hidden) * 2, "u_bf16"),
        ids(size_t(tokens) * size_t(top_k) * 4, "expert_ids"),
        weights(size_t(tokens) * size_t(top_k) * 4, "expert_weights"),
        offsets(size_t(experts + 2) * 4, "expert_offsets"),
        row_tokens(size_t(tokens) * size_t(top_k + 1) * 4, "row_tokens"),
        slot_rows(size_t(tokens) * size_t(top_k) * 4, "slot_rows"),
        work_items(size_t(moe_max_work_items(tokens, experts, top_k, rows_per_item)) * sizeof(MoeWorkItem),
                   "work_items"),
        words(16, "ticket, status, count") {
    words.fill_bytes(0);
  }

  MoeRoutingBuffers view() {
    return MoeRoutingBuffers{
        .logits = logits.as<float>(),
        .u_bf16 = u_bf16.as<__nv_bfloat16>(),
        .expert_ids = ids.as<int32_t>(),
        .expert_weights = weights.as<float>(),
        .expert_offsets = offsets.as<int32_t>(),
        .row_tokens = row_tokens.as<int32_t>(),
        .slot_rows = slot_rows.as<int32_t>(),
        .work_items = work_items.as<MoeWorkItem>(),
        .work_item_count = words.as<int32_t>() + 2,
        .finished_ctas = words.as<uint32_t>(),
        .status = words.as<int32_t>() + 1,
    };
  }
};

}  // namespace dsv4::cuda
