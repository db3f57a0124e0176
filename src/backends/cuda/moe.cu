#include "backends/cuda/moe.hpp"

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/moe_combine.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

constexpr size_t kWorkspaceAlignment = 256;

// Byte offsets of every buffer in the workspace. The counters come first at a fixed place, so a workspace sized
// for a larger T keeps them where prepare_moe_workspace zeroed them.
struct WorkspaceLayout {
  static constexpr size_t finished_ctas = 0, status = 4, work_item_count = 8, band_tickets = 16,
                          item_counters = kMoeItemCountersOffset, counters_end = 1024;
  static constexpr int band_ticket_capacity = int((item_counters - band_tickets) / sizeof(uint32_t));
  static_assert(item_counters + kMoeCountedItemsMax * sizeof(uint32_t) <= counters_end,
                "the per-item counters fit the counters");
  size_t logits = 0, u_bf16 = 0, expert_ids = 0, expert_weights = 0, expert_offsets = 0, row_tokens = 0,
         slot_rows = 0, work_items = 0, h = 0, down = 0, total = 0;
  int64_t max_work_items = 0;
};

WorkspaceLayout workspace_layout(const MoeConfig& c, int64_t tokens) {
  check_moe_config(c);
  check(tokens >= 1, "moe: ", tokens, " tokens; at least 1 expected");
  WorkspaceLayout l;
  size_t cursor = WorkspaceLayout::counters_end;
  auto reserve = [&](size_t bytes) {
    const size_t offset = (cursor + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
    cursor = offset + bytes;
    return offset;
  };
  const size_t T = size_t(tokens), E = size_t(c.experts), k = size_t(c.top_k);
  const size_t rows = T * k + T;
  l.max_work_items = moe_max_work_items(tokens, c.experts, c.top_k, kMoeRowsPerWorkItem);
  l.logits = reserve(T * E * sizeof(float));
  l.u_bf16 = reserve(T * size_t(c.hidden) * sizeof(__nv_bfloat16));
  l.expert_ids = reserve(T * k * sizeof(int32_t));
  l.expert_weights = reserve(T * k * sizeof(float));
  l.expert_offsets = reserve((E + 2) * sizeof(int32_t));
  l.row_tokens = reserve(rows * sizeof(int32_t));
  l.slot_rows = reserve(T * k * sizeof(int32_t));
  l.work_items = reserve(size_t(l.max_work_items) * sizeof(MoeWorkItem));
  l.h = reserve(rows * size_t(c.intermediate) * sizeof(__nv_bfloat16));
  l.down = reserve(rows * size_t(c.hidden) * sizeof(float));
  l.total = reserve(0);
  return l;
}

template <class T>
T* at(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace

size_t moe_workspace_bytes(const MoeConfig& config, int64_t tokens) { return workspace_layout(config, tokens).total; }

size_t moe_expert_trace_words(const MoeConfig& config, int64_t tokens, bool gate_up) {
  // The streamed launches' grid: bands × (work items + the split shared expert's second CTAs, at most one row).
  const int64_t rows = gate_up ? config.intermediate : config.hidden;
  const int64_t band_rows = gate_up ? kMoeDownBandRows / 2 : kMoeDownBandRows;
  const int64_t bands = (rows + band_rows - 1) / band_rows;
  const int64_t items = moe_max_work_items(tokens, config.experts, config.top_k, kMoeRowsPerWorkItem) + 1;
  return size_t(bands * items) * kMoeTraceWarpsPerCta * kMoeTraceSlots;
}

bool moe_streams_experts(const MoeConfig& config, int64_t tokens) {
  return tokens * config.top_k <= kMoeStreamedRowsPerExpert * config.experts;
}

namespace {

bool fuses_combine(const MoeRunParams& p) { return p.fused_small_batches && p.tokens <= kMoeFusedCombineMaxTokens; }

bool streams_experts(const DeviceMoeWeights& weights, const MoeRunParams& p) {
  return weights.streamed_tiles() &&
         (p.expert_kernels == MoeExpertKernels::STREAMED ||
          (p.expert_kernels == MoeExpertKernels::AUTO && moe_streams_experts(weights.config(), p.tokens)));
}

MoeRoutingBuffers routing_buffers(const WorkspaceLayout& l, void* ws) {
  return MoeRoutingBuffers{
      .logits = at<float>(ws, l.logits),
      .u_bf16 = at<__nv_bfloat16>(ws, l.u_bf16),
      .expert_ids = at<int32_t>(ws, l.expert_ids),
      .expert_weights = at<float>(ws, l.expert_weights),
      .expert_offsets = at<int32_t>(ws, l.expert_offsets),
      .row_tokens = at<int32_t>(ws, l.row_tokens),
      .slot_rows = at<int32_t>(ws, l.slot_rows),
      .work_items = at<MoeWorkItem>(ws, l.work_items),
      .work_item_count = at<int32_t>(ws, WorkspaceLayout::work_item_count),
      .finished_ctas = at<uint32_t>(ws, WorkspaceLayout::finished_ctas),
      .status = at<int32_t>(ws, WorkspaceLayout::status),
      .item_counters = at<uint32_t>(ws, WorkspaceLayout::item_counters),
      .item_counter_count = kMoeCountedItemsMax,
  };
}

// The expert GEMMs' parameters of a call (workspace buffers at layout l, the routing's outputs and item counters in
// `routing`).
MoeExpertGemmParams expert_gemm_params(const DeviceMoeWeights& weights, const MoeRunParams& p,
                                       const WorkspaceLayout& l, const MoeRoutingBuffers& routing) {
  const MoeConfig& c = weights.config();
  void* ws = p.workspace;
  const bool streamed = streams_experts(weights, p);
  MoeExpertGemmParams gemm{
      .experts = weights.device_experts(),
      .routed_format = weights.routed_format(),
      .shared_format = weights.shared_format(),
      .experts_count = int(c.experts),
      .hidden = int(c.hidden),
      .intermediate = int(c.intermediate),
      .swiglu_limit = c.swiglu_limit,
      .u_bf16 = routing.u_bf16,
      .row_tokens = routing.row_tokens,
      .work_items = routing.work_items,
      .work_item_count = routing.work_item_count,
      .max_work_items = int(l.max_work_items),
      .h = at<__nv_bfloat16>(ws, l.h),
      .down = at<float>(ws, l.down),
      .streamed = streamed,
      .stream_maps = weights.stream_maps(),
      .lean_decode = p.lean_expert_decode && streamed,
      .shared_expert_split = p.shared_expert_split,
      .down_head_start = p.down_head_start && streamed,
      .column_stages = p.column_stages && streamed,
      .tokens = p.tokens,
      .item_counters = routing.item_counters,
      .down_waits_per_item = p.down_waits_per_item,
      .stream = p.stream,
  };
  if (fuses_combine(p)) {
    MoeFusedCombine& f = gemm.combine;
    f.out = p.out, f.expert_weights = routing.expert_weights, f.slot_rows = routing.slot_rows;
    f.band_tickets = at<uint32_t>(ws, WorkspaceLayout::band_tickets);
    f.band_ticket_capacity = WorkspaceLayout::band_ticket_capacity, f.tokens = p.tokens, f.top_k = int(c.top_k);
  }
  return gemm;
}

}  // namespace

int moe_launches(const DeviceMoeWeights&, const MoeRunParams& p) {
  return moe_routing_launches({.tokens = p.tokens, .fused_routing = p.fused_small_batches}) + 2 +
         (fuses_combine(p) ? 0 : 1);
}

bool moe_splits_shared_expert(const DeviceMoeWeights& weights, const MoeRunParams& p) {
  const WorkspaceLayout l = workspace_layout(weights.config(), p.tokens);
  return moe_shared_expert_splits(expert_gemm_params(weights, p, l, routing_buffers(l, p.workspace)),
                                  device_multiprocessors());
}

void prepare_moe_workspace(void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  check(workspace != nullptr && workspace_bytes >= WorkspaceLayout::counters_end,
        "moe: prepare_moe_workspace needs a workspace of at least ", WorkspaceLayout::counters_end, " bytes");
  DSV4_CUDA_CHECK(cudaMemsetAsync(workspace, 0, WorkspaceLayout::counters_end, stream));
}

void check_moe_params(const DeviceMoeWeights& weights, const MoeRunParams& p) {
  const MoeConfig& c = weights.config();
  const WorkspaceLayout l = workspace_layout(c, p.tokens);
  check(p.u != nullptr && p.out != nullptr, "moe: null ", p.u == nullptr ? "u" : "out");
  check(!weights.hashed() || p.token_ids != nullptr, "moe: a hash-routed layer needs token ids");
  check(p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % kWorkspaceAlignment == 0,
        "moe: the workspace must be a non-null, ", kWorkspaceAlignment, "-byte aligned device pointer");
  check(p.workspace_bytes >= l.total, "moe: workspace of ", p.workspace_bytes, " bytes; ", p.tokens, " tokens need ",
        l.total, " (moe_workspace_bytes)");
  const auto* out = reinterpret_cast<const char*>(p.out);
  const size_t out_bytes = size_t(p.tokens) * size_t(c.hidden) * sizeof(float);
  const auto* u = reinterpret_cast<const char*>(p.u);
  const auto* ws = static_cast<const char*>(p.workspace);
  check(out + out_bytes <= u || u + out_bytes <= out, "moe: out must not alias u");
  check(out + out_bytes <= ws || ws + l.total <= out, "moe: out must not alias the workspace");
}

void run_moe(const DeviceMoeWeights& weights, const MoeRunParams& p) {
  check_moe_params(weights, p);
  const MoeConfig& c = weights.config();
  const WorkspaceLayout l = workspace_layout(c, p.tokens);
  void* ws = p.workspace;
  int stage = 0;
  auto mark_stage = [&] {
    if (p.stage_events != nullptr) DSV4_CUDA_CHECK(cudaEventRecord(p.stage_events[stage++], p.stream));
  };
  mark_stage();

  const MoeRoutingBuffers routing = routing_buffers(l, ws);
  const MoeRoutingParams routing_params{
      .router = weights.router(),
      .bias = weights.bias(),
      .tid2eid = weights.tid2eid(),
      .vocab = weights.vocab(),
      .u = p.u,
      .token_ids = p.token_ids,
      .tokens = p.tokens,
      .top_k = int(c.top_k),
      .routed_scaling_factor = c.routed_scaling_factor,
      .rows_per_item = kMoeRowsPerWorkItem,
      .out = routing,
      .stream = p.stream,
      .after_logits = p.stage_events != nullptr ? p.stage_events[stage++] : nullptr,
      .fused_routing = p.fused_small_batches,
      .decode_router = p.decode_router,
  };

  MoeExpertGemmParams gemm = expert_gemm_params(weights, p, l, routing);
  run_moe_routing(routing_params);
  mark_stage();
  gemm.trace = p.trace_gate_up;
  run_moe_gate_up(gemm);
  mark_stage();
  gemm.trace = p.trace_down;
  run_moe_down(gemm);
  mark_stage();
  if (fuses_combine(p)) {
    mark_stage();  // the combine stage is empty
    return;
  }

  run_moe_combine({
      .down = gemm.down,
      .expert_weights = routing.expert_weights,
      .slot_rows = routing.slot_rows,
      .out = p.out,
      .tokens = p.tokens,
      .top_k = int(c.top_k),
      .hidden = int(c.hidden),
      .stream = p.stream,
  });
  mark_stage();
}

void check_moe_status(const MoeRunParams& p) {
  DSV4_CUDA_CHECK(cudaStreamSynchronize(p.stream));
  check(p.workspace != nullptr, "moe: check_moe_status needs the workspace");
  int32_t status = 0;
  auto* status_word = at<int32_t>(p.workspace, WorkspaceLayout::status);
  DSV4_CUDA_CHECK(cudaMemcpy(&status, status_word, sizeof status, cudaMemcpyDeviceToHost));
  if (status == 0) return;
  DSV4_CUDA_CHECK(cudaMemset(status_word, 0, sizeof status));
  const int position = status - 1;
  int32_t token = 0;
  if (p.token_ids != nullptr && position < p.tokens)
    DSV4_CUDA_CHECK(cudaMemcpy(&token, p.token_ids + position, sizeof token, cudaMemcpyDeviceToHost));
  fail("moe: token id ", token, " at position ", position, " is outside the hash routing table (routed like token 0)");
}

MoeWorkspaceView moe_workspace_view(const MoeConfig& config, int64_t tokens, const void* workspace) {
  const WorkspaceLayout l = workspace_layout(config, tokens);
  auto* ws = const_cast<void*>(workspace);
  return MoeWorkspaceView{
      .expert_ids = at<int32_t>(ws, l.expert_ids),
      .expert_weights = at<float>(ws, l.expert_weights),
      .h_bf16 = at<uint16_t>(ws, l.h),
      .down = at<float>(ws, l.down),
      .slot_rows = at<int32_t>(ws, l.slot_rows),
  };
}

}  // namespace dsv4::cuda
