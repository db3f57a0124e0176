#include "backends/cuda/kernels/indexer.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/indexer.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/tma.cuh"
#include "core/error.hpp"
#include "core/log.hpp"

namespace dsv4::cuda {
namespace {

// Query groups share one CTA's key loads; the group's fragments stay within this much shared memory.
constexpr size_t kScoresSmemBudget = 64 * 1024;
using indexer::kMaxQueriesPerCta;
static_assert(kMaxQueriesPerCta <= 32, "cta_visible_keys reduces one query per lane of a warp");
// The kernels' shared-memory limits: the largest layout any launch asks for (the top-k's sort buffer included).
constexpr size_t kScoresSmemLimit = indexer::selection_offset(kScoresSmemBudget) + indexer::kSelectionSmemBytes;
constexpr size_t kWgmmaSmemBytes =
    indexer::wgmma_smem_layout(kMaxQueriesPerCta, false, true).bytes;
constexpr size_t kStreamedSmemBytes = indexer::streamed_smem_layout(kMaxQueriesPerCta, true).bytes;
constexpr size_t kStagedSmemBytes = indexer::staged_smem_layout(kMaxQueriesPerCta, true).bytes;

bool supported_head_dim(int64_t head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

struct DeviceLimits {
  int multiprocessors = 0;
  int fused_ctas_per_sm = 0;  // resident CTAs of the fused scores + top-k kernel (split mode)
};

template <int kHeadDim, bool kFp8>
using FusedSource = indexer::ComputedScores<kHeadDim, kFp8>;

// Raises the fused kernels' shared-memory limit (the top-k's) and returns the split kernel's residency.
template <int kHeadDim, bool kFp8>
int prepare_fused_kernels(int device) {
  for (auto* kernel : {topk::top_k_kernel<true, FusedSource<kHeadDim, kFp8>>,
                       topk::top_k_kernel<false, FusedSource<kHeadDim, kFp8>>}) {
    DSV4_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(topk::kSmemBytes)));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
  }
  int ctas = 0;
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &ctas, topk::top_k_kernel<true, FusedSource<kHeadDim, kFp8>>, topk::kThreads, topk::kSmemBytes));
  check(ctas > 0, "indexer_scores_top_k: the fused kernel (head_dim ", kHeadDim, ") cannot be resident on device ",
        device);
  return ctas;
}

// Queried once per device (with the score kernels' shared-memory limit raised), so launches make no attribute calls.
DeviceLimits device_limits() {
  static PerDeviceCache<DeviceLimits> cache;
  return cache.get(&cache, [] {
    const int device = current_device();
    DeviceLimits limits;
    DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device));
    using indexer::indexer_scores_kernel, indexer::indexer_scores_wgmma_kernel;
    for (auto* kernel :
         {indexer_scores_kernel<32, false, false>, indexer_scores_kernel<64, false, false>,
          indexer_scores_kernel<128, false, false>, indexer_scores_kernel<32, true, false>,
          indexer_scores_kernel<64, true, false>, indexer_scores_kernel<128, true, false>,
          indexer_scores_kernel<32, false, true>, indexer_scores_kernel<64, false, true>,
          indexer_scores_kernel<128, false, true>, indexer_scores_kernel<32, true, true>,
          indexer_scores_kernel<64, true, true>, indexer_scores_kernel<128, true, true>})
      DSV4_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kScoresSmemLimit)));
    for (auto* kernel : {indexer_scores_wgmma_kernel<false, false>, indexer_scores_wgmma_kernel<true, false>,
                         indexer_scores_wgmma_kernel<false, true>, indexer_scores_wgmma_kernel<true, true>})
      DSV4_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kWgmmaSmemBytes)));
    using indexer::indexer_scores_streamed_kernel;
    for (auto* kernel : {indexer_scores_streamed_kernel<false>, indexer_scores_streamed_kernel<true>})
      DSV4_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kStreamedSmemBytes)));
    using indexer::indexer_scores_staged_kernel;
    for (auto* kernel : {indexer_scores_staged_kernel<false>, indexer_scores_staged_kernel<true>,
                         indexer_scores_staged_kernel<false, true>})
      DSV4_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kStagedSmemBytes)));
    // Every instantiation has the same launch bounds and shared memory: the smallest residency bounds them all.
    limits.fused_ctas_per_sm = std::min(
        {prepare_fused_kernels<32, false>(device), prepare_fused_kernels<64, false>(device),
         prepare_fused_kernels<128, false>(device), prepare_fused_kernels<32, true>(device),
         prepare_fused_kernels<64, true>(device), prepare_fused_kernels<128, true>(device)});
    return limits;
  });
}

template <int kHeadDim>
void launch_prepare(const indexer::PrepareArgs& args, cudaStream_t stream) {
  const auto blocks = unsigned((args.rows + indexer::kPrepareWarps - 1) / indexer::kPrepareWarps);
  launch_chained(indexer::indexer_prepare_kernel<kHeadDim>, dim3(blocks), dim3(indexer::kPrepareWarps * 32), 0, stream,
                 args, "indexer_prepare_kernel");
}

bool fp8_keys(const IndexerScoresParams& p) { return p.keys_fp8 != nullptr; }

// The shapes the warpgroup kernels take.
bool warpgroup_shape(const IndexerScoresParams& p) {
  return p.head_dim == indexer::kWgmmaHeadDim && p.heads <= indexer::kWgmmaHeads;
}

// Auto: the warpgroup kernel where it was measured faster (H200, session 15): fp8 keys always (T = 1: 1.2-1.8× the
// mma.sync kernel at 1K-256K keys; T = 8 and 64 of one sequence: 1.3-3.1×); bf16 keys where a launch scores at
// least 2^20 (query, key) pairs of one sequence (64K keys × 64 queries 1.33×, 256K × 8 1.47×, 256K × 64 1.65×;
// below it 0.8-0.96×: 16K × 8, 256K × 1).
bool uses_warpgroup_kernel(const IndexerScoresParams& p) {
  if (p.kernel != IndexerScoresKernel::Auto) return p.kernel == IndexerScoresKernel::Warpgroup;
  if (!warpgroup_shape(p)) return false;
  return fp8_keys(p) || (p.sequence_slots == nullptr && p.tokens * p.key_count >= (int64_t(1) << 20));
}

// The staged kernel takes these fp8 keys: of one sequence, or through sequence_slots with the slot count known and
// each slot's keys a whole number of 128-byte map rows apart, every row within the map's int32 coordinates.
bool stageable(const IndexerScoresParams& p) {
  if (p.sequence_slots == nullptr) return true;
  return p.slot_count > 0 && p.keys_slot_stride % indexer::kWgmmaHeadDim == 0 &&
         p.slot_count * (p.keys_slot_stride / indexer::kWgmmaHeadDim) <= std::numeric_limits<int32_t>::max();
}

// Auto's streamed warpgroup kernels: bf16 keys of one query over ≥ 16K keys of one sequence (H200, session 18: 64K
// and 1M contexts 1.35× and 1.15× the mma.sync kernel Auto took there); fp8 keys, the staged kernel, everywhere it
// takes them (H200, against the register-fed warpgroup kernel; session 20 round 2: T = 1 64K 4.78 → 3.72 µs, 1M
// 13.74 → 12.27; T = 8 of one sequence 64K 12.38 → 8.81, 1M 59.47 → 56.56; round s21-1: 1024 keys T = 1 3.94 → 2.96,
// with the top-k in the last CTA 12.65 → 11.62, T = 8 10.09 → 6.77; through slots, a sequence each: 1024 keys T = 8
// 4.51 → 3.30, T = 64 7.55 → 5.70, 16K keys T = 8 9.74 → 7.75, T = 64 39.4 → 39.8 (84 % of the byte floor, level),
// with the top-k in the last CTA T = 8 13.89 → 12.75, T = 64 19.44 → 17.83).
bool streams_by_default(const IndexerScoresParams& p) {
  if (p.kernel != IndexerScoresKernel::Auto || !warpgroup_shape(p)) return false;
  if (fp8_keys(p)) return stageable(p);
  return p.sequence_slots == nullptr && p.tokens == 1 && p.key_count >= 16384;
}

// The kernels' view of the parameters (strides resolved).
indexer::ScoresArgs scores_args(const IndexerScoresParams& p, int queries_per_cta) {
  return indexer::ScoresArgs{
      .q = p.q,
      .q_fp8 = p.q_fp8,
      .q_scales = p.q_scales,
      .head_weights = p.head_weights,
      .head_weights_row_stride = p.head_weights_row_stride > 0 ? p.head_weights_row_stride : p.heads,
      .keys = p.keys,
      .keys_fp8 = p.keys_fp8,
      .key_scales = p.key_scales,
      .key_scales_slot_stride = p.key_scales_slot_stride,
      .key_count = p.key_count,
      .sequence_slots = p.sequence_slots,
      .keys_slot_stride = p.keys_slot_stride,
      .positions = p.positions,
      .tokens = p.tokens,
      .heads = int(p.heads),
      .ratio = p.ratio,
      .scores = p.scores,
      .score_stride = p.score_stride,
      .queries_per_cta = queries_per_cta,
      .weight_scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim)) / std::sqrt(static_cast<float>(p.heads)),
      .top_k = -1,
      .selected = nullptr,
      .counts = nullptr,
      .nan_flag = nullptr,
      .tickets = nullptr,
  };
}

// The scores kernels' grid: one wave of resident CTAs over all query groups (y), as many CTAs across the keys (x) as
// that wave leaves per group and the keys fill at `keys_per_cta`; the CTAs loop over the remaining key tiles.
dim3 scores_grid(const indexer::ScoresArgs& args, int64_t keys_per_cta, int query_groups, int ctas_per_sm) {
  const int64_t wanted = (args.key_count + keys_per_cta - 1) / keys_per_cta;
  const int64_t resident = int64_t(ctas_per_sm) * device_limits().multiprocessors;
  const int64_t across_keys = std::clamp<int64_t>(resident / query_groups, 1, std::max<int64_t>(wanted, 1));
  check(query_groups <= 65535, "indexer_scores: ", args.tokens, " queries need ", query_groups,
        " query groups, beyond the grid limit 65535");
  return dim3{unsigned(across_keys), unsigned(query_groups)};
}

template <int kHeadDim, bool kSelect>
void launch_scores(const indexer::ScoresArgs& args, bool fp8, dim3 grid, cudaStream_t stream) {
  size_t smem = indexer::scores_smem_layout(args.queries_per_cta, args.heads, kHeadDim, fp8).bytes;
  if (kSelect) smem = indexer::selection_offset(smem) + indexer::kSelectionSmemBytes;
  if (fp8)
    launch_chained(indexer::indexer_scores_kernel<kHeadDim, true, kSelect>, grid, dim3(indexer::kScoreWarps * 32), smem,
                   stream, args, kSelect ? "indexer_scores_kernel (fp8, top-k)" : "indexer_scores_kernel (fp8)");
  else
    launch_chained(indexer::indexer_scores_kernel<kHeadDim, false, kSelect>, grid, dim3(indexer::kScoreWarps * 32),
                   smem, stream, args, kSelect ? "indexer_scores_kernel (top-k)" : "indexer_scores_kernel");
}

// The streamed warpgroup kernels (bf16 keys): the warpgroup kernels' tiles, one CTA per SM.
template <bool kSelect>
void launch_scores_streamed(const indexer::ScoresArgs& args, dim3 grid, cudaStream_t stream) {
  const size_t smem = indexer::streamed_smem_layout(args.queries_per_cta, kSelect).bytes;
  launch_chained(indexer::indexer_scores_streamed_kernel<kSelect>, grid, dim3(indexer::kScoreWarps * 32), smem, stream,
                 args, "indexer_scores_streamed_kernel (bf16)");
}

// The staged warpgroup kernels (fp8 keys): the keys' tensor map over key_count rows of 128 bytes (slot_count ·
// the slot stride's rows through sequence_slots), boxes of one 64-key tile in the 128B swizzle.
template <bool kSelect, bool kTrace = false>
void launch_scores_staged(const indexer::ScoresArgs& args, int64_t slot_count, uint64_t* trace, dim3 grid,
                          cudaStream_t stream) {
  const int64_t slot_rows = args.sequence_slots != nullptr ? args.keys_slot_stride / indexer::kWgmmaHeadDim : 0;
  const indexer::StagedScoresArgs staged{
      .keys = sm90::encode_tensor_map_2d({.type = CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                          .base = args.keys_fp8,
                                          .cols = uint64_t(indexer::kWgmmaHeadDim),
                                          .rows = uint64_t(slot_rows > 0 ? slot_count * slot_rows : args.key_count),
                                          .row_stride_bytes = uint64_t(indexer::kWgmmaHeadDim),
                                          .box_cols = uint32_t(indexer::kWgmmaHeadDim),
                                          .box_rows = uint32_t(indexer::kWgmmaKeysPerTile),
                                          .swizzle = CU_TENSOR_MAP_SWIZZLE_128B},
                                         "indexer fp8 keys"),
      .scores = args,
      .slot_rows = int(slot_rows),
      .trace = trace};
  const size_t smem = indexer::staged_smem_layout(args.queries_per_cta, kSelect).bytes;
  launch_chained(indexer::indexer_scores_staged_kernel<kSelect, kTrace>, grid, dim3(indexer::kScoreWarps * 32), smem,
                 stream, dim3(1, 1, 1), "indexer_scores_staged_kernel (fp8)", staged);
}

// The warpgroup kernels: 64-key tiles per warpgroup, the same one wave of resident CTAs over the query groups.
template <bool kSelect>
void launch_scores_wgmma(const indexer::ScoresArgs& args, bool fp8, dim3 grid, cudaStream_t stream) {
  const size_t smem = indexer::wgmma_smem_layout(args.queries_per_cta, fp8, kSelect).bytes;
  if (fp8)
    launch_chained(indexer::indexer_scores_wgmma_kernel<true, kSelect>, grid, dim3(indexer::kScoreWarps * 32), smem,
                   stream, args, "indexer_scores_wgmma_kernel (fp8)");
  else
    launch_chained(indexer::indexer_scores_wgmma_kernel<false, kSelect>, grid, dim3(indexer::kScoreWarps * 32), smem,
                   stream, args, "indexer_scores_wgmma_kernel (bf16)");
}

// How a checked run_indexer_scores call runs: the kernel, its query groups and its grid.
struct ScoresPlan {
  bool warpgroup = false;
  bool streamed = false;  // the warpgroup kernel's streamed variant
  int queries_per_cta = 1;
  int query_groups = 0;
  dim3 grid;
};

// Whether warn_if_unstaged has spoken in this process (reset_indexer_warnings_for_tests forgets it).
std::atomic<bool> unstaged_warned{false};

// Auto's one fp8 case that the staged kernel cannot take (slots without their count, or slots not whole 128-byte
// map rows apart) runs on the slower register-fed kernel: said once per process, not silently.
void warn_if_unstaged(const IndexerScoresParams& p) {
  if (p.kernel != IndexerScoresKernel::Auto || !fp8_keys(p) || !warpgroup_shape(p) || stageable(p)) return;
  if (!unstaged_warned.exchange(true))
    log_warning("indexer_scores: fp8 keys through sequence_slots with slot_count ", p.slot_count,
                " and keys_slot_stride ", p.keys_slot_stride, " run on the register-fed warpgroup kernel (slower): ",
                "the staged kernel needs slot_count > 0, a stride that is a multiple of ", indexer::kWgmmaHeadDim,
                " and at most 2^31 - 1 key rows in all slots");
}

ScoresPlan plan_scores(const IndexerScoresParams& p) {
  ScoresPlan plan;
  const bool fp8 = fp8_keys(p);
  warn_if_unstaged(p);
  plan.streamed = p.kernel == IndexerScoresKernel::WarpgroupStreamed || streams_by_default(p);
  plan.warpgroup = plan.streamed || uses_warpgroup_kernel(p);
  const size_t per_query = indexer::scores_smem_layout(1, int(p.heads), int(p.head_dim), fp8).bytes;
  // Queries of one CTA share its key loads: only those of one sequence.
  const int64_t group_limit = p.sequence_slots != nullptr ? 1 : kMaxQueriesPerCta;
  plan.queries_per_cta = int(std::min<int64_t>(
      {p.tokens, group_limit, plan.warpgroup ? kMaxQueriesPerCta : int64_t(kScoresSmemBudget / per_query)}));
  plan.query_groups = int((p.tokens + plan.queries_per_cta - 1) / plan.queries_per_cta);
  const int64_t keys_per_cta = plan.warpgroup ? int64_t(indexer::kWgmmaKeysPerTile) * indexer::kWgmmaWarpgroups
                                              : int64_t(indexer::kKeysPerWarpTile) * indexer::kScoreWarps;
  // fp8 keys stream through the staged kernel (two CTAs per SM), bf16 keys through the cp.async one (one).
  plan.grid = scores_grid(scores_args(p, plan.queries_per_cta), keys_per_cta, plan.query_groups,
                          plan.streamed && !fp8 ? indexer::kStreamCtasPerSm : indexer::kScoreCtasPerSm);
  return plan;
}

void launch_planned(const IndexerScoresParams& p, const ScoresPlan& plan, const indexer::ScoresArgs& args) {
  const bool fp8 = fp8_keys(p), select = args.top_k >= 0;
  if (plan.streamed && fp8) {
    if (select)
      launch_scores_staged<true>(args, p.slot_count, nullptr, plan.grid, p.stream);
    else if (p.trace != nullptr)
      launch_scores_staged<false, true>(args, p.slot_count, p.trace, plan.grid, p.stream);
    else
      launch_scores_staged<false>(args, p.slot_count, nullptr, plan.grid, p.stream);
    return;
  }
  if (plan.streamed) {
    if (select)
      launch_scores_streamed<true>(args, plan.grid, p.stream);
    else
      launch_scores_streamed<false>(args, plan.grid, p.stream);
    return;
  }
  if (plan.warpgroup) {
    if (select)
      launch_scores_wgmma<true>(args, fp8, plan.grid, p.stream);
    else
      launch_scores_wgmma<false>(args, fp8, plan.grid, p.stream);
    return;
  }
  const auto launch = [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    if (select)
      launch_scores<kHeadDim, true>(args, fp8, plan.grid, p.stream);
    else
      launch_scores<kHeadDim, false>(args, fp8, plan.grid, p.stream);
  };
  switch (p.head_dim) {
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    default: launch(std::integral_constant<int, 128>{}); break;
  }
}

}  // namespace

void reset_indexer_warnings_for_tests() { unstaged_warned.store(false); }

void check_indexer_prepare_params(const IndexerPrepareParams& p) {
  check(supported_head_dim(p.head_dim), "indexer_prepare: head_dim ", p.head_dim, " is not supported (32, 64, 128)");
  check(p.tokens >= 0 && p.heads > 0, "indexer_prepare: bad shape tokens=", p.tokens, " heads=", p.heads);
  check((p.output != nullptr) != (p.output_fp8 != nullptr),
        "indexer_prepare: give exactly one of output (bf16) and output_fp8");
  check(p.output_fp8 == nullptr || p.output_scales != nullptr, "indexer_prepare: output_fp8 needs output_scales");
  if (p.tokens == 0) return;
  check(p.input != nullptr, "indexer_prepare: null input");
  check(p.input_row_stride == 0 || p.input_row_stride >= p.heads * p.head_dim, "indexer_prepare: input_row_stride ",
        p.input_row_stride, " < heads · head_dim = ", p.heads * p.head_dim);
  check(p.rope_frequencies == nullptr || p.rope_table == nullptr,
        "indexer_prepare: give rope_frequencies or rope_table, not both");
  if (p.rope_frequencies != nullptr || p.rope_table != nullptr) {
    check(p.positions != nullptr, "indexer_prepare: RoPE needs positions");
    check(p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.rope_dim <= p.head_dim, "indexer_prepare: rope_dim ", p.rope_dim,
          " must be even and within head_dim ", p.head_dim);
  }
  const auto* in = reinterpret_cast<const char*>(p.input);
  const size_t elements = size_t(p.tokens * p.heads * p.head_dim);
  const int64_t row_stride = p.input_row_stride > 0 ? p.input_row_stride : p.heads * p.head_dim;
  const size_t input_bytes = size_t((p.tokens - 1) * row_stride + p.heads * p.head_dim) * 4;
  const auto disjoint = [&](const void* out, size_t bytes) {
    const auto* o = reinterpret_cast<const char*>(out);
    return o + bytes <= in || in + input_bytes <= o;
  };
  if (p.output != nullptr) {
    check(disjoint(p.output, elements * 2), "indexer_prepare: output must not alias input");
  } else {
    check(disjoint(p.output_fp8, elements) && disjoint(p.output_scales, size_t(p.tokens * p.heads) * 4),
          "indexer_prepare: output_fp8 and output_scales must not alias input");
  }
}

void run_indexer_prepare(const IndexerPrepareParams& p) {
  check_indexer_prepare_params(p);
  if (p.tokens == 0) return;
  const indexer::PrepareArgs args = indexer::prepare_args(p);
  switch (p.head_dim) {
    case 32: launch_prepare<32>(args, p.stream); break;
    case 64: launch_prepare<64>(args, p.stream); break;
    default: launch_prepare<128>(args, p.stream); break;
  }
}

void check_indexer_scores_params(const IndexerScoresParams& p) {
  check(supported_head_dim(p.head_dim), "indexer_scores: head_dim ", p.head_dim, " is not supported (32, 64, 128)");
  check(p.heads > 0 && p.heads <= 128, "indexer_scores: heads ", p.heads, " must be 1 to 128");
  check(p.tokens >= 0 && p.key_count >= 0 && p.ratio > 0, "indexer_scores: bad parameters tokens=", p.tokens,
        " key_count=", p.key_count, " ratio=", p.ratio);
  check(p.key_count < (int64_t(1) << 31), "indexer_scores: key_count ", p.key_count, " exceeds int32 indices");
  check(p.score_stride >= p.key_count, "indexer_scores: score_stride ", p.score_stride, " < key_count ", p.key_count);
  check((p.keys != nullptr) + (p.keys_fp8 != nullptr) <= 1, "indexer_scores: give keys (bf16) or keys_fp8, not both");
  check((p.q != nullptr) + (p.q_fp8 != nullptr) <= 1, "indexer_scores: give q (bf16) or q_fp8, not both");
  if (fp8_keys(p)) {
    check(p.q == nullptr, "indexer_scores: fp8 keys need fp8 queries (q_fp8 + q_scales), not bf16 q");
  } else {
    check(p.q_fp8 == nullptr, "indexer_scores: fp8 queries (q_fp8) need fp8 keys (keys_fp8 + key_scales)");
  }
  check(p.head_weights_row_stride == 0 || p.head_weights_row_stride >= p.heads,
        "indexer_scores: head_weights_row_stride ", p.head_weights_row_stride, " < heads ", p.heads);
  check((p.kernel != IndexerScoresKernel::Warpgroup && p.kernel != IndexerScoresKernel::WarpgroupStreamed) ||
            warpgroup_shape(p),
        "indexer_scores: the ", p.kernel == IndexerScoresKernel::Warpgroup ? "Warpgroup" : "WarpgroupStreamed",
        " kernel needs head_dim ", indexer::kWgmmaHeadDim, " (got ", p.head_dim, ") and at most ", indexer::kWgmmaHeads,
        " heads (got ", p.heads, ")");
  check(p.kernel != IndexerScoresKernel::WarpgroupStreamed || !fp8_keys(p) || stageable(p),
        "indexer_scores: the WarpgroupStreamed kernel takes fp8 keys through sequence_slots with slot_count > 0 (got ",
        p.slot_count, "), keys_slot_stride a multiple of ", indexer::kWgmmaHeadDim, " (got ", p.keys_slot_stride,
        ") and at most 2^31 - 1 rows in all slots; use Warpgroup otherwise");
  if (p.tokens == 0 || p.key_count == 0) return;
  check(p.q != nullptr || p.q_fp8 != nullptr, "indexer_scores: no queries (q or q_fp8)");
  check(p.keys != nullptr || p.keys_fp8 != nullptr, "indexer_scores: no keys (keys or keys_fp8)");
  check(p.head_weights != nullptr && p.positions != nullptr && p.scores != nullptr,
        "indexer_scores: head_weights, positions and scores are required");
  check(p.q == nullptr || aligned(p.q, 16), "indexer_scores: q must be 16-byte aligned");
  check(p.q_fp8 == nullptr || (aligned(p.q_fp8, 8) && p.q_scales != nullptr),
        "indexer_scores: q_fp8 must be 8-byte aligned and come with q_scales");
  check(p.key_count < (int64_t(1) << 30), "indexer_scores: key_count ", p.key_count,
        " exceeds the kernels' 32-bit key arithmetic (2^30)");
  if (fp8_keys(p)) {
    check(aligned(p.keys_fp8, 16) && p.key_scales != nullptr,
          "indexer_scores: keys_fp8 must be 16-byte aligned and come with key_scales");
    check(p.sequence_slots == nullptr ||
              (p.keys_slot_stride >= p.key_count * p.head_dim && p.keys_slot_stride % 16 == 0 &&
               p.key_scales_slot_stride >= p.key_count),
          "indexer_scores: fp8 keys_slot_stride ", p.keys_slot_stride, " must hold key_count ", p.key_count,
          " keys of ", p.head_dim, " bytes and keep 16-byte alignment, key_scales_slot_stride ",
          p.key_scales_slot_stride, " must hold key_count scales");
  } else {
    check(aligned(p.keys, 16), "indexer_scores: keys must be 16-byte aligned");
    check(p.sequence_slots == nullptr ||
              (p.keys_slot_stride >= p.key_count * p.head_dim && p.keys_slot_stride % 8 == 0),
          "indexer_scores: keys_slot_stride ", p.keys_slot_stride, " must hold key_count ", p.key_count, " keys of ",
          p.head_dim, " and keep 16-byte alignment");
  }
  check(indexer::scores_smem_layout(1, int(p.heads), int(p.head_dim), fp8_keys(p)).bytes <= kScoresSmemBudget,
        "indexer_scores: heads ", p.heads, " × head_dim ", p.head_dim, " does not fit shared memory");
}

void run_indexer_scores(const IndexerScoresParams& p) {
  check_indexer_scores_params(p);
  if (p.tokens == 0 || p.key_count == 0) return;
  const ScoresPlan plan = plan_scores(p);
  check(p.trace == nullptr || (plan.streamed && fp8_keys(p)),
        "indexer_scores: a trace is the staged kernel's only (fp8 keys on WarpgroupStreamed)");
  launch_planned(p, plan, scores_args(p, plan.queries_per_cta));
}

namespace {

template <int kHeadDim, bool kFp8>
void launch_scores_top_k(const indexer::ScoresArgs& scores, topk::TopKArgs top, int queries, cudaStream_t stream) {
  const topk::TopKLaunch<FusedSource<kHeadDim, kFp8>> launch{top, {scores}};
  if (top.ctas_per_query == 1)
    launch_chained(topk::top_k_kernel<false, FusedSource<kHeadDim, kFp8>>, dim3(unsigned(queries)),
                   dim3(topk::kThreads), topk::kSmemBytes, stream, launch, "indexer_scores_top_k (one CTA per query)");
  else
    launch_chained(topk::top_k_kernel<true, FusedSource<kHeadDim, kFp8>>, dim3(unsigned(queries * top.ctas_per_query)),
                   dim3(topk::kThreads), topk::kSmemBytes, stream, launch, "indexer_scores_top_k (split over CTAs)");
}

}  // namespace

void run_indexer_scores_top_k(const IndexerScoresParams& s, const TopKParams& t) {
  check_indexer_scores_params(s);
  check(s.trace == nullptr, "indexer_scores_top_k: a trace is run_indexer_scores' only");
  TopKParams top = t;
  top.scores = s.scores, top.row_stride = s.score_stride, top.candidates = s.key_count;
  check(s.tokens <= std::numeric_limits<int>::max(), "indexer_scores_top_k: ", s.tokens, " queries");
  top.queries = int(s.tokens), top.positions = s.positions, top.ratio = s.ratio, top.trace = nullptr;
  top.stream = s.stream;
  check_top_k_params(top);
  if (top.queries == 0) return;
  check(s.scores != nullptr, "indexer_scores_top_k: scores is required");

  if (s.top_k_method != IndexerTopKMethod::TopKKernel) {
    if (s.key_count == 0) {  // nothing to score: the top-k alone writes the empty selections
      run_top_k(top);
      return;
    }
    const ScoresPlan plan = plan_scores(s);
    const bool few_keys = s.key_count <= kIndexerLastCtaMaxKeys;
    // Tickets (several CTAs per query group): one per group in the top-k's workspace.
    const bool tickets_fit =
        plan.grid.x == 1 || (plan.query_groups <= kTopKMaxSplitQueries && top.workspace != nullptr &&
                             top.workspace_bytes >= top_k_workspace_bytes(plan.query_groups));
    // Auto: only where a CTA scores one query (T = 1, or sequence_slots). A group of several queries would be sorted
    // one after another by its last CTA, slower than the top-k's CTA per query (H100, 1024 keys, T = 8 of one
    // sequence: 31.4 µs against 17.3 for the two launches; T = 1: 13.1 against 13.4, 16 keys 5.5 against 7.7).
    const bool one_query_per_cta = plan.queries_per_cta == 1;
    if (s.top_k_method == IndexerTopKMethod::Auto && !(few_keys && tickets_fit && one_query_per_cta)) {
      run_indexer_scores(s);
      run_top_k(top);
      return;
    }
    check(few_keys, "indexer_scores_top_k: LastCta needs key_count ≤ ", kIndexerLastCtaMaxKeys, " (got ",
          s.key_count, ")");
    check(tickets_fit, "indexer_scores_top_k: LastCta over ", plan.grid.x, " CTAs per query group needs at most ",
          kTopKMaxSplitQueries, " query groups (got ", plan.query_groups, ") and a workspace of ",
          top_k_workspace_bytes(plan.query_groups), " bytes (got ", top.workspace_bytes, ")");
    indexer::ScoresArgs args = scores_args(s, plan.queries_per_cta);
    args.top_k = top.k, args.selected = top.selected, args.counts = top.counts, args.nan_flag = top.nan_flag;
    args.tickets = static_cast<topk::QueryWorkspace*>(top.workspace);
    launch_planned(s, plan, args);
    return;
  }

  check(s.kernel != IndexerScoresKernel::Warpgroup && s.kernel != IndexerScoresKernel::WarpgroupStreamed,
        "indexer_scores_top_k: the TopKKernel method scores on the mma.sync kernels only (not Warpgroup or "
        "WarpgroupStreamed)");
  check(s.key_count < (int64_t(1) << 30), "indexer_scores_top_k: key_count ", s.key_count,
        " exceeds the 32-bit key arithmetic (2^30)");
  const bool fp8 = fp8_keys(s);
  check(indexer::scores_smem_layout(1, int(s.heads), int(s.head_dim), fp8).bytes <=
            topk::kListCapacity * sizeof(uint64_t),
        "indexer_scores_top_k: heads ", s.heads, " × head_dim ", s.head_dim, (fp8 ? " fp8" : " bf16"),
        " query operands exceed the top-k's sort buffer");
  const int ctas =
      top_k_ctas_per_query(top.queries, top.candidates, top.max_ctas_per_query, device_limits().fused_ctas_per_sm);
  const topk::TopKArgs top_args = topk::kernel_args(top, ctas);
  const indexer::ScoresArgs args = scores_args(s, 1);
  const auto launch = [&](auto head_dim) {
    if (fp8)
      launch_scores_top_k<decltype(head_dim)::value, true>(args, top_args, top.queries, s.stream);
    else
      launch_scores_top_k<decltype(head_dim)::value, false>(args, top_args, top.queries, s.stream);
  };
  switch (s.head_dim) {
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    default: launch(std::integral_constant<int, 128>{}); break;
  }
}

}  // namespace dsv4::cuda
