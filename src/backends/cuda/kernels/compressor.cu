#include "backends/cuda/kernels/compressor.hpp"

#include <algorithm>
#include <bit>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/compressor.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

constexpr int64_t kMaxHeadDim = 2 * compressor::kMaxThreads;
using compressor::kMaxClusterCtas;
constexpr int64_t kWantedCtas = 256;  // about two per SM: below this, entries are split over clusters
// Decode steps (runs of at most `ratio` tokens) load into registers with CTAs of up to 512 threads at 128 registers:
// one per SM, so their splits stop at about one wave (H200, HCA batch 64 completing windows: 2 CTAs per entry 22.2 µs,
// 4 (two waves) 37.6).
constexpr int64_t kWantedDecodeCtas = 128;
// Slot-channel values an entry's CTA pools at least: a CSA window (8 slots × 512 channels) stays in one CTA, where
// a cluster barrier would cost more than its loads; an HCA window (128 × 512) is split 8 ways.
constexpr int64_t kMinCtaWork = 8 * 1024;
// Slot groups per channel: enough loads in flight for a 128-slot window, few enough partials to merge.
constexpr int kMaxGroups = 16;
constexpr int kManyEntriesThreads = 256;
// The indexer's query preparation in the pools' launch: vectors per CTA at least this, CTAs at most about this.
constexpr int64_t kPrepareMinRows = 4;
constexpr int64_t kPrepareWave = 128;

const char* rounding_name(CompressorStoredRounding rounding) {
  switch (rounding) {
    case CompressorStoredRounding::None: return "None";
    case CompressorStoredRounding::KvFp8: return "KvFp8";
    case CompressorStoredRounding::IndexerFp4: return "IndexerFp4";
  }
  return "?";
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The indexer rounding and the fp8 output work on the whole vector in one warp: no split of an entry over CTAs.
bool whole_vector_in_one_cta(const CompressorParams& p) {
  return p.stored_rounding == CompressorStoredRounding::IndexerFp4 || p.slot_entries_fp8 != nullptr;
}

}  // namespace

void check_compressor_params(const CompressorParams& p) {
  check(p.head_dim > 0 && p.head_dim % 2 == 0 && p.head_dim <= kMaxHeadDim, "compressor: head_dim ", p.head_dim,
        " must be even and at most ", kMaxHeadDim);
  check(p.ratio > 0 && p.run_count >= 0 && p.max_run_tokens >= 0, "compressor: bad ratio ", p.ratio, ", run_count ",
        p.run_count, " or max_run_tokens ", p.max_run_tokens);
  check(p.ratio * p.head_dim < (int64_t(1) << 30), "compressor: ratio ", p.ratio, " × head_dim ", p.head_dim,
        " exceeds the kernel's 32-bit state arithmetic (2^30)");
  check(p.rope_dim >= 0 && p.rope_dim % 2 == 0 && p.rope_dim <= p.head_dim, "compressor: rope_dim ", p.rope_dim,
        " must be even and within head_dim ", p.head_dim);
  check(p.rope_dim == 0 || p.rope_frequencies != nullptr || p.rope_table != nullptr,
        "compressor: rope_frequencies or rope_table are required");
  const CompressorStateView& s = p.state;
  check(s.ratio == p.ratio && s.head_dim == p.head_dim && s.overlapping == p.overlapping,
        "compressor: state was made for ratio ", s.ratio, " head_dim ", s.head_dim, " overlapping ", s.overlapping,
        ", params say ratio ", p.ratio, " head_dim ", p.head_dim, " overlapping ", p.overlapping);
  check(p.run_count <= s.slots, "compressor: ", p.run_count, " runs but the state has ", s.slots,
        " slots (runs have distinct slots)");
  const int cluster = p.cluster_ctas;
  check(cluster == 0 || cluster == 1 ||
            ((cluster == 2 || cluster == 4 || cluster == kMaxClusterCtas) && p.head_dim % (64 * cluster) == 0 &&
             !whole_vector_in_one_cta(p)),
        "compressor: cluster_ctas ", cluster, " must be 0, 1, or 2, 4, 8 splitting head_dim ", p.head_dim,
        " into 64-channel blocks (not with stored rounding IndexerFp4 or slot_entries_fp8)");
  if (p.run_count == 0) return;
  check(s.window_kv != nullptr && s.window_score != nullptr && s.finished_ctas != nullptr &&
            (!p.overlapping || (s.previous_kv != nullptr && s.previous_score != nullptr)),
        "compressor: the state has no device storage");
  check(p.runs != nullptr, "compressor: runs are required");
  check(p.ape != nullptr && p.norm_weight != nullptr, "compressor: ape and norm weights are required");
  check(p.max_run_tokens == 0 || (p.kv != nullptr && p.gate != nullptr), "compressor: kv and gate are required");
  check(aligned8(p.kv) && aligned8(p.gate) && aligned8(p.ape), "compressor: kv, gate and ape must be 8-byte aligned");
  check(p.row_stride == 0 || (p.row_stride >= p.projection_width() && p.row_stride % 2 == 0),
        "compressor: row_stride ", p.row_stride, " must be even and at least the projection width ",
        p.projection_width());
  const bool to_cache = p.cache.pool != nullptr;
  check(int(p.entries != nullptr) + int(p.slot_entries_bf16 != nullptr) + int(p.slot_entries_fp8 != nullptr) +
                int(to_cache) ==
            1,
        "compressor: give exactly one of entries (fp32), slot_entries_bf16, slot_entries_fp8 and cache");
  if (to_cache) {
    check(p.cache.page_table != nullptr && p.cache_layer >= 0 && p.cache_layer < p.cache.layers,
          "compressor: cache layer ", p.cache_layer, " outside [0, ", p.cache.layers, ") or no page table");
    check(p.cache.layout.head_dim == p.head_dim, "compressor: the cache holds entries of ", p.cache.layout.head_dim,
          " dims, the compressor makes ", p.head_dim);
    check(p.stored_rounding == CompressorStoredRounding::None, "compressor: stored rounding ",
          rounding_name(p.stored_rounding), " with cache output (the cache layout rounds)");
  }
  check(aligned8(p.entries), "compressor: entries must be 8-byte aligned");
  check(p.slot_entries_bf16 == nullptr ||
            (p.slot_entry_capacity >= 0 && p.slot_entry_stride >= p.slot_entry_capacity * p.head_dim),
        "compressor: slot_entry_stride ", p.slot_entry_stride, " cannot hold ", p.slot_entry_capacity,
        " entries of ", p.head_dim);
  if (p.slot_entries_fp8 != nullptr) {
    check(p.slot_entry_scales != nullptr && p.slot_entry_capacity >= 0 &&
              p.slot_scale_stride >= p.slot_entry_capacity &&
              p.slot_entry_stride >= p.slot_entry_capacity * p.head_dim,
          "compressor: slot_entries_fp8 needs slot_entry_scales, and strides (", p.slot_entry_stride, " bytes, ",
          p.slot_scale_stride, " scales) that hold slot_entry_capacity ", p.slot_entry_capacity, " entries of ",
          p.head_dim);
    check(reinterpret_cast<uintptr_t>(p.slot_entries_fp8) % 16 == 0 && p.slot_entry_stride % 16 == 0,
          "compressor: slot_entries_fp8 and slot_entry_stride ", p.slot_entry_stride, " must keep 16-byte alignment");
    check(p.stored_rounding != CompressorStoredRounding::KvFp8,
          "compressor: stored rounding KvFp8 with slot_entries_fp8 (the fp8 keys have their own rule)");
  }
  check(!whole_vector_in_one_cta(p) || (p.head_dim == 32 || p.head_dim == 64 || p.head_dim == 128),
        "compressor: stored rounding ", rounding_name(p.stored_rounding),
        (p.slot_entries_fp8 != nullptr ? " with slot_entries_fp8" : ""), " needs head_dim 32, 64 or 128, got ",
        p.head_dim);
}

namespace {

int64_t entries_per_run_of(const CompressorParams& p) {
  return std::max<int64_t>(compressor_max_entries(p.max_run_tokens, p.ratio), 1);
}

// CTAs per entry: the entry's channels split over a cluster when entries are too few to fill the GPU (decode, HCA
// prefill): up to 8 CTAs, each a whole number of 64-channel fp8 blocks. The indexer rounding and the fp8 output need
// the whole vector in one CTA.
int entry_split(const CompressorParams& p) {
  if (p.cluster_ctas != 0) return p.cluster_ctas;
  const int64_t entries = p.run_count * entries_per_run_of(p), c = p.head_dim;
  const int64_t slots = p.overlapping ? 2 * p.ratio : p.ratio;
  const int64_t wanted = p.max_run_tokens <= p.ratio ? kWantedDecodeCtas : kWantedCtas;
  int cluster = 1;
  if (!whole_vector_in_one_cta(p))
    while (cluster < kMaxClusterCtas && entries * cluster < wanted && c % (2 * cluster * 64) == 0 &&
           slots * (c / cluster) > kMinCtaWork)
      cluster *= 2;
  return cluster;
}

// Why pool p cannot take the lean slot loads (CompressorSlotLoads::Lean), or null.
const char* lean_refusal(const CompressorParams& p) {
  const int64_t c = p.head_dim, slots = p.overlapping ? 2 * p.ratio : p.ratio;
  const int64_t row_stride = p.row_stride == 0 ? p.projection_width() : p.row_stride;
  const CompressorStateView& s = p.state;
  if (c != 128 && c != 256 && c != 512) return "head_dim is not 128, 256 or 512 (whole teams per CTA)";
  if (slots > compressor::kLeanSlots) return "a window has more than 8 slots";
  if (entry_split(p) != 1) return "entries are split over CTAs";
  if (p.rope_dim % 4 != 0) return "rope_dim is not a multiple of 4";
  if (row_stride % 4 != 0 || !aligned16(p.kv) || !aligned16(p.gate) || !aligned16(p.ape) ||
      !aligned16(p.norm_weight) || !aligned16(s.window_kv) || !aligned16(s.window_score) ||
      !aligned16(s.previous_kv) || !aligned16(s.previous_score))
    return "kv, gate, ape, norm weights or the state are not 16-byte aligned rows";
  if ((p.max_run_tokens + 1) * row_stride >= (int64_t(1) << 31)) return "a run's rows exceed 32-bit offsets";
  if (!aligned16(p.entries) || !aligned8(p.slot_entries_bf16) ||
      (p.slot_entries_bf16 != nullptr && p.slot_entry_stride % 4 != 0))
    return "the entries output is not 16-byte (fp32) or 8-byte (bf16) aligned";
  return nullptr;
}


// One pool's launch shape: the entries' split over CTAs and the CTA's thread layout for the launch's slot loads (lean:
// the staged path's slot-group order of visits, which fixes its summation order, and teams of c / 4 threads).
compressor::PoolArgs pool_args(const CompressorParams& p, CompressorSlotLoads loads) {
  const bool lean = loads == CompressorSlotLoads::Lean;
  const bool staged = lean || loads == CompressorSlotLoads::Staged;
  const int64_t entries_per_run = entries_per_run_of(p);
  const int64_t entries = p.run_count * entries_per_run;
  check(entries * kMaxClusterCtas < (int64_t(1) << 31), "compressor: ", entries, " entries exceed the grid limit");
  const int c = int(p.head_dim);
  const int slots = int(p.overlapping ? 2 * p.ratio : p.ratio);
  const int cluster = entry_split(p);
  const int channels = c / cluster;
  const int pairs_padded = (channels / 2 + 31) / 32 * 32;
  check(!staged || pairs_padded <= compressor::kStagedThreads, "compressor: staged slot loads pool at most ",
        2 * compressor::kStagedThreads, " channels per CTA; head_dim ", c, " over ", cluster, " CTAs per entry has ",
        channels);
  // Many entries (CSA prefill) fill the GPU with CTAs already: small CTAs then schedule better than wide ones.
  // Staged: every thread keeps at least a whole batch of slots in flight (a CSA window of 8 slots: two groups, so the
  // indexer compressor's CTAs are 128 threads and more of them fit an SM), not batches of clamped repeats.
  const int max_threads = staged                                   ? compressor::kStagedThreads
                          : cluster == 1 && entries >= kWantedCtas ? kManyEntriesThreads
                                                                   : compressor::kMaxThreads;
  // Decode steps too: a group of clamped repeats costs its loads, expf and merge (a CSA indexer entry took 8 groups of
  // one slot: GPU round s21-2, H200, with 2 groups of 4 its completing step 7.07 -> 5.89 µs, storing 1.71 -> 1.37, the
  // CSA pair's completing step 6.93 -> 6.08 with the merge below; bits change for c = 128 / 96 / 32 CSA decode).
  const int min_slots_per_group = staged || entries_per_run == 1 ? compressor::kSlotBatch : 1;
  int groups = 1;
  while (2 * groups * pairs_padded <= max_threads && 2 * groups * min_slots_per_group <= slots && groups < kMaxGroups)
    groups *= 2;
  const int halves = p.overlapping ? 2 : 1;
  const int lean_teams = lean ? compressor::kLeanThreads / (c / 4) : 0;
  // A power-of-two ratio divides by shifts in the kernel.
  const int ratio_log2 = (p.ratio & (p.ratio - 1)) == 0 ? std::countr_zero(uint64_t(p.ratio)) : -1;
  return compressor::PoolArgs{.c = c,
                              .ratio = p.ratio,
                              .ratio_log2 = ratio_log2,
                              .runs_before_wait = p.runs_ready_at_launch,
                              .overlapping = p.overlapping,
                              .norm_eps = p.norm_eps,
                              .round_pooled_to_bf16 = p.round_pooled_to_bf16,
                              .stored_rounding = p.stored_rounding,
                              .kv = p.kv,
                              .gate = p.gate,
                              .row_stride = p.row_stride == 0 ? p.projection_width() : p.row_stride,
                              .runs = p.runs,
                              .ape = p.ape,
                              .norm_weight = p.norm_weight,
                              .rope_frequencies = p.rope_frequencies,
                              .rope_table = p.rope_table,
                              .rope_dim = int(p.rope_dim),
                              .state = p.state,
                              .entries = p.entries,
                              .entry_rows = p.entry_rows,
                              .entry_slots = p.entry_slots,
                              .slot_entries_bf16 = p.slot_entries_bf16,
                              .slot_entry_stride = p.slot_entry_stride,
                              .slot_entry_capacity = p.slot_entry_capacity,
                              .slot_entries_fp8 = p.slot_entries_fp8,
                              .slot_entry_scales = p.slot_entry_scales,
                              .slot_scale_stride = p.slot_scale_stride,
                              .cache = p.cache,
                              .cache_layer = p.cache_layer,
                              .entries_per_run = entries_per_run,
                              .first_cta = 0,
                              .ctas = lean ? (entries + lean_teams - 1) / lean_teams : entries * cluster,
                              .cluster_ctas = cluster,
                              .channels_per_cta = channels,
                              .pairs_padded = pairs_padded,
                              .groups = groups,
                              .cluster_div = compressor::FastDivisor::of(uint32_t(cluster)),
                              .entries_div = compressor::FastDivisor::of(uint32_t(entries_per_run)),
                              .pairs_padded_div = compressor::FastDivisor::of(uint32_t(pairs_padded)),
                              .slice_pairs_div = compressor::FastDivisor::of(uint32_t(channels / 2)),
                              .slice_row_div = compressor::FastDivisor::of(uint32_t(halves * channels / 2)),
                              .whole_pairs_div = compressor::FastDivisor::of(uint32_t(c / 2)),
                              .whole_row_div = compressor::FastDivisor::of(uint32_t(halves * c / 2)),
                              .lean_teams = lean_teams,
                              .rows = entries,
                              .team_div = compressor::FastDivisor::of(uint32_t(lean ? c / 4 : 1)),
                              .lean_csa_windows = p.overlapping && p.ratio == compressor::kLeanSlots / 2};
}

// A launch of the pools (and the indexer's query preparation when `prepare` is given, checked by the caller): its
// kernel arguments, grid, CTA size, shared memory and slot loads.
struct LaunchPlan {
  compressor::LaunchArgs launch{};
  CompressorSlotLoads loads = CompressorSlotLoads::Registers;
  int64_t ctas = 0;
  int threads = 0;
  size_t smem = 0;
  bool slice_updates = true;  // decode steps (every run within one window's worth of tokens)
  int pool_of_param[compressor::kMaxPools] = {-1, -1};  // params[i]'s pool in `launch` (−1: no runs, not launched)
};

LaunchPlan plan_launch(std::span<const CompressorParams> params, const IndexerPrepareParams* prepare) {
  check(!params.empty() && params.size() <= size_t(compressor::kMaxPools), "compressor: ", params.size(),
        " compressors in one launch (1 to ", compressor::kMaxPools, ")");
  for (const CompressorParams& p : params) check_compressor_params(p);
  if (params.size() == 2) {
    check(params[0].stream == params[1].stream, "compressor: the compressors of one launch need one stream");
    check(params[0].slot_loads == params[1].slot_loads,
          "compressor: the compressors of one launch need the same slot_loads");
    check(params[0].state.finished_ctas != params[1].state.finished_ctas,
          "compressor: the compressors of one launch need distinct states");
    check(params[0].trace == params[1].trace, "compressor: the compressors of one launch need the same trace");
  }
  LaunchPlan plan;
  plan.loads = compressor_slot_loads(params);
  const bool lean = plan.loads == CompressorSlotLoads::Lean;
  compressor::LaunchArgs& launch = plan.launch;
  int hardware_cluster = 1, threads = 0;
  size_t smem = 0;
  // A lean launch's second pool (a CSA layer's indexer compressor) first, not last on half-empty SMs: the e2e prefill
  // decided (faster), not the isolated one-wave 512-token chunk (slower).
  const bool reversed = lean && params.size() == 2;
  for (size_t k = 0; k < params.size(); ++k) {
    const size_t i = reversed ? params.size() - 1 - k : k;
    const CompressorParams& p = params[i];
    if (p.run_count == 0) continue;
    const compressor::PoolArgs pool = pool_args(p, plan.loads);
    plan.pool_of_param[i] = launch.pool_count;
    launch.pools[launch.pool_count++] = pool;
    hardware_cluster = std::max(hardware_cluster, pool.cluster_ctas);
    threads = lean ? compressor::kLeanThreads : std::max(threads, pool.pairs_padded * pool.groups);
    if (!lean) smem = std::max(smem, compressor::pool_smem_bytes(pool.channels_per_cta, pool.groups));
  }
  const bool prepares = prepare != nullptr && prepare->tokens > 0;
  if (launch.pool_count == 0 && !prepares) return plan;
  // Each pool's CTAs fill whole hardware clusters (a cluster never spans two pools), then the preparation's do.
  const auto whole_clusters = [&](int64_t n) {
    return (n + hardware_cluster - 1) / hardware_cluster * hardware_cluster;
  };
  int64_t ctas = 0;
  for (int i = 0; i < launch.pool_count; ++i) {
    launch.pools[i].first_cta = ctas;
    ctas += whole_clusters(launch.pools[i].ctas);
  }
  if (prepares) {
    // Without runs the CTAs only prepare: as many warps as the chosen kernel's launch bounds allow.
    if (threads == 0) threads = lean ? compressor::kLeanThreads : indexer::kPrepareWarps * 32;
    launch.prepare = indexer::prepare_args(*prepare);
    launch.prepare_head_dim = int(prepare->head_dim);
    launch.prepare_first_cta = ctas;
    // Vectors spread to about one wave of CTAs, at least kPrepareMinRows each: sixteen warps of one SM take 1.2 µs
    // longer than four (GPU round s20-2, H200, the decode pair storing its token: the next kernel released 4.5 ->
    // 3.6 µs after the previous one's end).
    const int64_t warps = threads / 32;
    const int64_t spread = std::max(kPrepareMinRows, (launch.prepare.rows + kPrepareWave - 1) / kPrepareWave);
    const int64_t rows_per_cta = std::min(warps, spread);
    launch.prepare_rows_per_cta = int(rows_per_cta);
    ctas += whole_clusters((launch.prepare.rows + rows_per_cta - 1) / rows_per_cta);
  }
  check(ctas < (int64_t(1) << 31), "compressor: ", ctas, " CTAs exceed the grid limit");
  launch.hardware_cluster = hardware_cluster;
  for (int i = 0; i < launch.pool_count; ++i)
    plan.slice_updates = plan.slice_updates && launch.pools[i].entries_per_run == 1;
  if (plan.loads == CompressorSlotLoads::Staged && launch.pool_count > 0)
    smem += compressor::staging_smem_bytes(threads);
  launch.trace = params[0].trace;
  plan.ctas = ctas, plan.threads = threads, plan.smem = smem;
  return plan;
}

// The pools' launch (plan_launch's).
void launch_compressors(std::span<const CompressorParams> params, const IndexerPrepareParams* prepare) {
  const LaunchPlan plan = plan_launch(params, prepare);
  if (plan.ctas == 0) return;
  using enum CompressorSlotLoads;
  const bool lean = plan.loads == Lean, staged = plan.loads == Staged, slice_updates = plan.slice_updates;
  const bool traced = plan.launch.trace != nullptr;
  check(!traced || plan.loads == Registers || !slice_updates,
        "compressor: a traced decode launch needs the registers slot loads");
  check(!traced || plan.ctas <= params[0].trace_ctas, "compressor: a traced launch of ", plan.ctas,
        " CTAs, its trace holds ", params[0].trace_ctas);
  const auto kernel = lean            ? (traced ? compressor::compressor_kernel<false, Lean, true>
                                                : compressor::compressor_kernel<false, Lean>)
                      : slice_updates ? (staged   ? compressor::compressor_kernel<true, Staged>
                                         : traced ? compressor::compressor_kernel<true, Registers, true>
                                                  : compressor::compressor_kernel<true, Registers>)
                                      : (staged   ? (traced ? compressor::compressor_kernel<false, Staged, true>
                                                            : compressor::compressor_kernel<false, Staged>)
                                         : traced ? compressor::compressor_kernel<false, Registers, true>
                                                  : compressor::compressor_kernel<false, Registers>);
  if (plan.smem > 48 * 1024) {
    const int limit = max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel));
    check(plan.smem <= size_t(limit), "compressor: ", plan.smem, " bytes of shared memory per CTA exceed the device's ",
          limit);
  }
  // A programmatic dependent launch, in clusters only where entries are split.
  launch_chained(kernel, dim3(unsigned(plan.ctas)), dim3(unsigned(plan.threads)), plan.smem, params[0].stream,
                 dim3(unsigned(plan.launch.hardware_cluster)), "compressor_kernel", plan.launch);
  DSV4_CUDA_CHECK_LAUNCH("compressor_kernel");
}

}  // namespace

CompressorSlotLoads compressor_slot_loads(std::span<const CompressorParams> params) {
  const CompressorSlotLoads mode = params[0].slot_loads;
  if (mode == CompressorSlotLoads::Lean)
    for (const CompressorParams& p : params) {
      const char* refusal = p.run_count == 0 ? nullptr : lean_refusal(p);
      check(refusal == nullptr, "compressor: lean slot loads refused: ", refusal == nullptr ? "" : refusal);
    }
  if (mode != CompressorSlotLoads::Auto) return mode;
  // Decode steps (at most one entry per run) load into registers; only prefill chunks weigh the other modes.
  const auto several_entries = [](const CompressorParams& p) { return p.run_count > 0 && entries_per_run_of(p) > 1; };
  if (std::none_of(params.begin(), params.end(), several_entries)) return CompressorSlotLoads::Registers;
  bool lean = true, staged = true;
  for (const CompressorParams& p : params) {
    if (p.run_count == 0) continue;
    staged = staged && p.head_dim / entry_split(p) <= 2 * compressor::kStagedThreads;
    lean = lean && lean_refusal(p) == nullptr;
  }
  // Lean where every pool takes it (GPU round s20-1, H200, 4096 tokens, with CSA windows in straight-line loads: the
  // CSA layer's pair 24.4 vs 39.8 µs staged, its indexer compressor alone 10.0 vs 13.3, its main compressor alone 23.9
  // vs 24.9).
  if (lean) return CompressorSlotLoads::Lean;
  return staged ? CompressorSlotLoads::Staged : CompressorSlotLoads::Registers;
}

const char* compressor_trace_point_name(int point) {
  static constexpr const char* kNames[kCompressorTracePoints] = {
      "sm", "start", "wait passed", "run", "update loads", "pooled", "merged", "normed", "rounded", "finished", "end"};
  return point >= 0 && point < kCompressorTracePoints ? kNames[point] : "?";
}

// One pool range per compressor a launch can take.
static_assert(sizeof(CompressorLaunchShape::pools) / sizeof(CompressorCtaRange) == size_t(compressor::kMaxPools));
CompressorLaunchShape compressor_launch_shape(std::span<const CompressorParams> params,
                                              const IndexerPrepareParams* prepare) {
  if (prepare != nullptr) check_indexer_prepare_params(*prepare);
  const LaunchPlan plan = plan_launch(params, prepare);
  CompressorLaunchShape shape;
  for (size_t i = 0; i < params.size(); ++i)
    if (plan.pool_of_param[i] >= 0) {
      const compressor::PoolArgs& pool = plan.launch.pools[plan.pool_of_param[i]];
      shape.pools[i] = {pool.first_cta, pool.ctas};
    }
  if (plan.launch.prepare_head_dim != 0)
    shape.prepare = {plan.launch.prepare_first_cta,
                     (plan.launch.prepare.rows + plan.launch.prepare_rows_per_cta - 1) /
                         plan.launch.prepare_rows_per_cta};
  shape.ctas = plan.ctas, shape.threads = plan.threads;
  return shape;
}

void run_compressor(const CompressorParams& params) { launch_compressors({&params, 1}, nullptr); }

void run_compressors(std::span<const CompressorParams> params) { launch_compressors(params, nullptr); }

void run_compressors(std::span<const CompressorParams> params, const IndexerPrepareParams& prepare) {
  check_indexer_prepare_params(prepare);
  check(!params.empty() && prepare.stream == params[0].stream,
        "compressor: the indexer preparation in the compressors' launch needs their stream");
  launch_compressors(params, &prepare);
}

}  // namespace dsv4::cuda
