#include "backends/cuda/kernels/indexer.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/indexer.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

// Query groups share one CTA's key loads; the group's fragments stay within this much shared memory.
constexpr size_t kScoresSmemBudget = 64 * 1024;
constexpr int kMaxQueriesPerCta = 4;

bool supported_head_dim(int64_t head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct DeviceLimits {
  int multiprocessors = 0;
};

// Queried once per device (with the score kernels' shared-memory limit raised), so launches make no attribute calls.
DeviceLimits device_limits() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceLimits limits[kMaxDevices];
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  check(device >= 0 && device < kMaxDevices, "indexer: device index ", device, " out of range");
  std::call_once(once[device], [&] {
    DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&limits[device].multiprocessors, cudaDevAttrMultiProcessorCount, device));
    for (auto* kernel : {indexer::indexer_scores_kernel<32>, indexer::indexer_scores_kernel<64>,
                         indexer::indexer_scores_kernel<128>})
      DSV4_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kScoresSmemBudget)));
  });
  return limits[device];
}

template <int kHeadDim>
void launch_prepare(const indexer::PrepareArgs& args, cudaStream_t stream) {
  const auto blocks = unsigned((args.rows + indexer::kPrepareWarps - 1) / indexer::kPrepareWarps);
  launch_chained(indexer::indexer_prepare_kernel<kHeadDim>, dim3(blocks), dim3(indexer::kPrepareWarps * 32), 0, stream,
                 args, "indexer_prepare_kernel");
}

template <int kHeadDim>
void launch_scores(const indexer::ScoresArgs& args, int query_groups, cudaStream_t stream) {
  const size_t smem = indexer::scores_smem_bytes(args.queries_per_cta, args.heads, kHeadDim);
  const int64_t warp_tiles = (args.key_count + indexer::kKeysPerWarpTile - 1) / indexer::kKeysPerWarpTile;
  const int64_t wanted = (warp_tiles + indexer::kScoreWarps - 1) / indexer::kScoreWarps;
  // One wave of resident CTAs over all query groups; warps loop over the remaining key tiles.
  const int64_t resident = int64_t(indexer::kScoreCtasPerSm) * device_limits().multiprocessors;
  const int64_t across_keys = std::clamp<int64_t>(resident / query_groups, 1, std::max<int64_t>(wanted, 1));
  check(query_groups <= 65535, "indexer_scores: ", args.tokens, " queries need ", query_groups,
        " query groups, beyond the grid limit 65535");
  const dim3 grid{unsigned(across_keys), unsigned(query_groups)};
  launch_chained(indexer::indexer_scores_kernel<kHeadDim>, grid, dim3(indexer::kScoreWarps * 32), smem, stream, args,
                 "indexer_scores_kernel");
}

}  // namespace

void check_indexer_prepare_params(const IndexerPrepareParams& p) {
  check(supported_head_dim(p.head_dim), "indexer_prepare: head_dim ", p.head_dim, " is not supported (32, 64, 128)");
  check(p.tokens >= 0 && p.heads > 0, "indexer_prepare: bad shape tokens=", p.tokens, " heads=", p.heads);
  if (p.tokens == 0) return;
  check(p.input != nullptr && p.output != nullptr, "indexer_prepare: null ", p.input == nullptr ? "input" : "output");
  if (p.rope_frequencies != nullptr) {
    check(p.positions != nullptr, "indexer_prepare: RoPE needs positions");
    check(p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.rope_dim <= p.head_dim, "indexer_prepare: rope_dim ", p.rope_dim,
          " must be even and within head_dim ", p.head_dim);
  }
  const auto* in = reinterpret_cast<const char*>(p.input);
  const auto* out = reinterpret_cast<const char*>(p.output);
  const size_t elements = size_t(p.tokens * p.heads * p.head_dim);
  check(out + elements * 2 <= in || in + elements * 4 <= out, "indexer_prepare: output must not alias input");
}

void run_indexer_prepare(const IndexerPrepareParams& p) {
  check_indexer_prepare_params(p);
  if (p.tokens == 0) return;
  const indexer::PrepareArgs args{.input = p.input,
                                  .output = p.output,
                                  .rows = p.tokens * p.heads,
                                  .heads = p.heads,
                                  .positions = p.positions,
                                  .rope_frequencies = p.rope_frequencies,
                                  .rope_dim = int(p.rope_dim),
                                  .reference_rounding = p.reference_rounding};
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
  if (p.tokens == 0 || p.key_count == 0) return;
  check(p.q != nullptr && p.head_weights != nullptr && p.keys != nullptr && p.positions != nullptr &&
            p.scores != nullptr,
        "indexer_scores: q, head_weights, keys, positions and scores are required");
  check(aligned16(p.q) && aligned16(p.keys), "indexer_scores: q and keys must be 16-byte aligned");
  check(p.sequence_slots == nullptr || (p.keys_slot_stride >= p.key_count * p.head_dim && p.keys_slot_stride % 8 == 0),
        "indexer_scores: keys_slot_stride ", p.keys_slot_stride, " must hold key_count ", p.key_count, " keys of ",
        p.head_dim, " and keep 16-byte alignment");
  check(indexer::scores_smem_bytes(1, int(p.heads), int(p.head_dim)) <= kScoresSmemBudget,
        "indexer_scores: heads ", p.heads, " × head_dim ", p.head_dim, " does not fit shared memory");
}

void run_indexer_scores(const IndexerScoresParams& p) {
  check_indexer_scores_params(p);
  if (p.tokens == 0 || p.key_count == 0) return;
  const size_t per_query = indexer::scores_smem_bytes(1, int(p.heads), int(p.head_dim));
  // Queries of one CTA share its key loads: only those of one sequence.
  const int64_t group_limit = p.sequence_slots != nullptr ? 1 : kMaxQueriesPerCta;
  const int queries_per_cta =
      int(std::min<int64_t>({p.tokens, group_limit, int64_t(kScoresSmemBudget / per_query)}));
  const int query_groups = int((p.tokens + queries_per_cta - 1) / queries_per_cta);
  const indexer::ScoresArgs args{
      .q = p.q,
      .head_weights = p.head_weights,
      .keys = p.keys,
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
  };
  switch (p.head_dim) {
    case 32: launch_scores<32>(args, query_groups, p.stream); break;
    case 64: launch_scores<64>(args, query_groups, p.stream); break;
    default: launch_scores<128>(args, query_groups, p.stream); break;
  }
}

}  // namespace dsv4::cuda
