#include "backends/cuda/kernels/sparse_attention.cuh"

#include "backends/cuda/kernels/sparse_attention_prefill.hpp"

#include <algorithm>
#include <array>
#include <limits>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/sparse_attention_input_checks.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

using namespace sparse_attention_detail;

// Shared memory one SM offers to a CTA on Hopper (227 KB of the 228 KB).
constexpr int kSharedMemoryPerSm = 227 * 1024;

// 16-head tiles per CTA: all 64 heads of a block share each loaded entry; fewer heads use fewer warps.
int head_tiles_for(int heads) {
  const int tiles = (heads + 15) / 16;
  return tiles >= 3 ? 4 : tiles;
}

int head_blocks_for(int heads) { return (heads + 16 * head_tiles_for(heads) - 1) / (16 * head_tiles_for(heads)); }

bool supported_head_dim(int d) { return d == 64 || d == 128 || d == 256 || d == 512; }

// Tile-times a merge of the splits adds. The combine kernel's 2 is the session-11 constant (kept: the tiny models'
// split choices, which tests compare across batch shapes, stay as they were). The cluster merge's 1.5 is fitted to
// bench_cuda_attention (H200, L2 flushed, session 12): a tile ≈ 1.1 µs in a CTA's pipeline; Flash batch 1 SWA with
// 4 splits 17.9 µs (combine kernel) against 18.1 µs (cluster merge), Flash CSA batch 64 with 2 splits 50.7 against
// 42.2 µs, batch 8 with 10 combined splits against 7 in clusters 24.7 against 24.7 µs.
constexpr double kCombineMergeTiles = 2.0, kClusterMergeTiles = 1.5;
// Where the cluster merge is possible, a combine above the largest cluster also costs the model step a launch: it only
// pays where each of a cluster's splits would take many tiles. Fitted to bench_cuda_attention (H200, session 13,
// batch 1): Flash CSA, 20 tiles: a 10-CTA cluster 19.1 µs against 20 splits + combine 17.2 µs (the cluster, one
// launch, is kept); Flash HCA at 1M context, 260 tiles: a 16-CTA cluster 45.7 µs against 52 splits + combine 28.5 µs.
constexpr double kCombineAboveClusterTiles = 4.0;

template <int kHeadDim, int kHeadTiles, bool kFp8>
void launch(const SparseAttentionParams& p, const SharedMemoryPlan& plan, int head_blocks) {
  const auto kernel = sparse_attention_kernel<kHeadDim, kHeadTiles, kFp8>;
  // Once per device: the cap at the whole SM covers every entry layout's plan (the launch asks for plan.total).
  static PerDeviceCache<bool> attributes_set;
  attributes_set.get(reinterpret_cast<const void*>(kernel), [&] {
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedMemoryPerSm));
    return true;
  });
  launch_chained(kernel, dim3(unsigned(p.tokens * head_blocks * p.splits)),
                 dim3(unsigned(TileConfig<kHeadDim, kHeadTiles>::kThreads)), size_t(plan.total), p.stream,
                 dim3(1, 1, 1), "sparse_attention", p, plan, head_blocks);
}

template <int kHeadDim>
void dispatch_tiles(const SparseAttentionParams& p, const SharedMemoryPlan& plan, int head_tiles, int head_blocks) {
  const bool fp8 = p.cache.layout.format == KvEntryFormat::Fp8Reference;
  switch (head_tiles * 2 + (fp8 ? 1 : 0)) {
    case 2: return launch<kHeadDim, 1, false>(p, plan, head_blocks);
    case 3: return launch<kHeadDim, 1, true>(p, plan, head_blocks);
    case 4: return launch<kHeadDim, 2, false>(p, plan, head_blocks);
    case 5: return launch<kHeadDim, 2, true>(p, plan, head_blocks);
    case 8: return launch<kHeadDim, 4, false>(p, plan, head_blocks);
    case 9: return launch<kHeadDim, 4, true>(p, plan, head_blocks);
    default: fail("sparse_attention: no kernel for ", head_tiles, " head tiles");
  }
}

// The second pass of a split call: merges the splits' partial outputs.
void launch_combine(const SparseAttentionParams& p) {
  if (p.splits <= 1) return;
  launch_chained(sparse_attention_combine_kernel, dim3(unsigned(p.tokens * p.heads)), dim3(unsigned(kCombineThreads)),
                 0, p.stream, dim3(1, 1, 1), "sparse_attention combine", p, p.cache.layout.head_dim,
                 p.cache.layout.nope_dim);
}

// The wgmma kernel serves head_dim 512 with more than 32 heads (blocks of 64, padded); fp8 entries in DeepSeek's
// 584-byte layout on pages of at least 2 entries (its 16-aligned entry spans stay on the page).
bool use_d512_kernel(const SparseAttentionParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  if (layout.head_dim != kD512HeadDim || p.heads <= 32) return false;
  if (layout.format == KvEntryFormat::Bf16) return true;
  return layout.nope_dim == kFp8NopeDim && layout.rope_offset == kFp8RopeOffset &&
         layout.scale_offset == kFp8ScaleOffset && layout.entry_bytes == kFp8EntryBytes && p.cache.page_shift >= 1;
}

// Lets a head_dim 512 kernel take its shared memory and launch clusters above the portable 8 CTAs (sizes the device
// cannot hold still get 0 from the occupancy query).
template <bool kFp8, bool kTrace>
void set_d512_attributes() {
  const auto kernel = sparse_attention_d512_kernel<kFp8, kTrace>;
  DSV4_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, D512Layout<kFp8>::kAllocationBytes));
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

// What the head_dim 512 kernels need from the device, set up once per device (function attributes belong to a
// device's context, and the cluster limits follow its GPC layout): clusters[size] = clusters of `size` CTAs (one CTA
// per SM) held at once, for sizes 2..kSparseAttentionMaxClusterSplits (on an H200, 16 clusters of 8 fit 128 CTAs but
// 112 CTAs in clusters of 7 took two waves; sizes above 8 need a GPC with that many free SMs); largest = the largest
// size with a resident cluster, so that every size up to it can be launched (sizes between two fitting ones fit too:
// a GPC that holds n CTAs holds fewer).
struct ClusterLimits {
  std::array<int, kSparseAttentionMaxClusterSplits + 1> clusters{};
  int largest = 1;
};

// The cluster limits of `kernel` (its attributes set) launched with `threads` threads and `bytes` of shared memory.
template <class... KernelArgs>
ClusterLimits query_cluster_limits(void (*kernel)(KernelArgs...), int threads, int bytes) {
  ClusterLimits limits;
  for (int size = 2; size <= kSparseAttentionMaxClusterSplits; ++size) {
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = unsigned(size);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(unsigned(size));
    config.blockDim = dim3(unsigned(threads));
    config.dynamicSmemBytes = size_t(bytes);
    config.attrs = &attribute;
    config.numAttrs = 1;
    int& count = limits.clusters[size_t(size)];
    // A size the hardware refuses outright (above 16, or a driver without non-portable sizes) counts as none.
    if (cudaOccupancyMaxActiveClusters(&count, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();
      count = 0;
    }
  }
  while (limits.largest < kSparseAttentionMaxClusterSplits && limits.clusters[size_t(limits.largest) + 1] > 0)
    ++limits.largest;
  return limits;
}

ClusterLimits d512_device_limits() {
  static PerDeviceCache<ClusterLimits> cache;
  return cache.get(reinterpret_cast<const void*>(sparse_attention_d512_kernel<false, false>), [] {
    set_d512_attributes<false, false>();
    set_d512_attributes<false, true>();
    set_d512_attributes<true, false>();
    constexpr int kBytes = D512Layout<false>::kAllocationBytes;  // the larger of the two entry formats'
    static_assert(kBytes >= D512Layout<true>::kAllocationBytes, "the bf16 layout is the larger");
    return query_cluster_limits(sparse_attention_d512_kernel<false, false>, kD512Threads, kBytes);
  });
}

int largest_d512_cluster() { return d512_device_limits().largest; }

int d512_head_blocks(int heads) { return (heads + kD512Heads - 1) / kD512Heads; }

int64_t d512_ctas(const SparseAttentionParams& p) { return p.tokens * d512_head_blocks(p.heads) * p.splits; }

// The splits merge inside the attention launch, one cluster per (query, head block).
bool merges_in_cluster(const SparseAttentionParams& p) {
  return p.cluster_merge && p.splits > 1 && p.splits <= largest_d512_cluster() && use_d512_kernel(p);
}

template <bool kFp8, bool kTrace = false>
void launch_d512(const SparseAttentionParams& p) {
  constexpr int kBytes = D512Layout<kFp8>::kAllocationBytes;
  static_assert(kBytes <= kSharedMemoryPerSm, "the head_dim 512 kernel's shared memory fits one SM");
  const auto kernel = sparse_attention_d512_kernel<kFp8, kTrace>;
  d512_device_limits();  // the kernel's attributes on this device
  const int head_blocks = d512_head_blocks(p.heads);
  const bool cluster = merges_in_cluster(p);
  launch_chained(kernel, dim3(unsigned(d512_ctas(p))), dim3(unsigned(kD512Threads)),
                 size_t(kBytes), p.stream, dim3(unsigned(cluster ? p.splits : 1), 1, 1),
                 "sparse_attention (head_dim 512, wgmma)", p, head_blocks, cluster);
}

// The head-split kernel's attributes and cluster limits on the current device, set up once per device.
ClusterLimits head_split_device_limits() {
  static PerDeviceCache<ClusterLimits> cache;
  return cache.get(reinterpret_cast<const void*>(sparse_attention_head_split_kernel<false>), [] {
    constexpr int kBytes = HeadSplitLayout::kBytes;
    static_assert(kBytes <= kSharedMemoryPerSm, "the head-split kernel's shared memory fits one SM");
    for (const auto kernel : {sparse_attention_head_split_kernel<false>, sparse_attention_head_split_kernel<true>}) {
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    return query_cluster_limits(sparse_attention_head_split_kernel<false>, kHeadSplitThreads, kBytes);
  });
}

int head_split_groups(int heads) { return (heads + kHeadSplitHeads - 1) / kHeadSplitHeads; }

// The head-split path's splits for the call, 0 where it does not serve it. Its tokens × head groups × splits CTAs
// (one per SM) must be one wave, and the splits at most the device's largest cluster (long HCA lists need more;
// larger batches fill the GPU with the kernels above). A call's head_split_tiles sets the tiles per CTA; left to the
// launcher, it takes the most splits (fewest tiles per CTA) whose CTAs fill at most half the SMs with every cluster
// resident at once, else the fewest splits. Measured on an H200 (bench_cuda_attention, fp8 entries, L2 flushed, µs at
// 1-4 tiles per CTA): Flash SWA batch 1 12.0 12.1 12.3 12.8, batch 8 19.9 (128 CTAs) 12.7 12.5 13.2; Flash CSA batch
// 1 — 13.4 14.1 14.6; Pro CSA batch 1 — 22.9 (80 CTAs in clusters of 10) 14.3 14.8.
int head_split_splits(const SparseAttentionParams& p) {
  if (!p.head_split || p.tokens == 0 || !use_d512_kernel(p)) return 0;
  const int64_t tiles = (int64_t(p.window_slots) + p.compressed_slots + kTile - 1) / kTile;
  const ClusterLimits limits = head_split_device_limits();
  const int64_t clusters = p.tokens * head_split_groups(p.heads), sms = device_multiprocessors();
  const auto splits_for = [&](int per_cta) -> int64_t {
    const int64_t splits = std::max<int64_t>(1, (tiles + per_cta - 1) / per_cta);
    return (splits == 1 || splits <= limits.largest) && clusters * splits <= sms ? splits : 0;
  };
  if (p.head_split_tiles > 0) return int(splits_for(p.head_split_tiles));
  for (int per_cta = 1; per_cta < kHeadSplitMaxTiles; ++per_cta) {
    const int64_t splits = splits_for(per_cta);
    if (splits > 0 && 2 * clusters * splits <= sms && (splits == 1 || clusters <= limits.clusters[size_t(splits)]))
      return int(splits);
  }
  return int(splits_for(kHeadSplitMaxTiles));
}

void launch_head_split(const SparseAttentionParams& p, int splits) {
  head_split_device_limits();  // the kernels' attributes on this device
  SparseAttentionParams call = p;
  call.splits = splits;
  const int head_groups = head_split_groups(p.heads);
  const auto kernel = p.cache.layout.format == KvEntryFormat::Fp8Reference ? sparse_attention_head_split_kernel<true>
                                                                           : sparse_attention_head_split_kernel<false>;
  launch_chained(kernel, dim3(unsigned(p.tokens * head_groups * splits)), dim3(unsigned(kHeadSplitThreads)),
                 size_t(HeadSplitLayout::kBytes), p.stream, dim3(unsigned(splits), 1, 1),
                 "sparse_attention (head split)", call, head_groups);
}

// Prefill-sized calls on bf16 entries (the prefill kernel's fp8 path was slower than the kernels here in its first
// measurement): at least two waves of (query, 64-head block) CTAs; with prefill_kernel_decode also decode-sized calls
// from 15/16 of one wave whose lists are long by their slot bound (longer with one head block per query) and have no
// per-query counts (see the option).
bool uses_prefill_kernel(const SparseAttentionParams& p) {
  if (!p.prefill_kernel || p.cache.layout.format != KvEntryFormat::Bf16 || !use_d512_kernel(p) ||
      !sparse_attention_prefill_supports(p.cache.layout, p.cache.page_shift, p.heads))
    return false;
  const int64_t head_blocks = d512_head_blocks(p.heads), ctas = p.tokens * head_blocks,
                sms = device_multiprocessors(), slots = int64_t(p.window_slots) + p.compressed_slots;
  if (ctas >= 2 * sms) return true;
  const int64_t least_slots =
      head_blocks > 1 ? kSparseAttentionPrefillDecodeSlots : kSparseAttentionPrefillDecodeSlotsOneBlock;
  return p.prefill_kernel_decode && p.compressed_counts == nullptr && 16 * ctas >= 15 * sms && slots >= least_slots;
}

}  // namespace

bool sparse_attention_uses_prefill_kernel(const SparseAttentionParams& params) { return uses_prefill_kernel(params); }

int sparse_attention_head_split_splits(const SparseAttentionParams& params) { return head_split_splits(params); }

int64_t sparse_attention_d512_ctas(const SparseAttentionParams& params) { return d512_ctas(params); }

int max_sparse_attention_cluster_splits() { return largest_d512_cluster(); }

int choose_sparse_attention_splits(int64_t tokens, int heads, int head_dim, KvEntryFormat format, int64_t slots,
                                   int multiprocessors, bool cluster_merge) {
  check(tokens >= 0 && heads > 0 && supported_head_dim(head_dim) && slots >= 0 && multiprocessors > 0,
        "choose_sparse_attention_splits: bad shape tokens=", tokens, " heads=", heads, " head_dim=", head_dim,
        " slots=", slots, " multiprocessors=", multiprocessors);
  const int64_t tiles = (slots + kTile - 1) / kTile;
  const int64_t ctas_per_split = tokens * head_blocks_for(heads);
  if (tiles <= 1 || ctas_per_split == 0) return 1;
  // Entry layout only matters for the shared-memory size, which sets how many CTAs share an SM.
  const KvEntryLayout layout = KvEntryLayout::make(format, head_dim, 0);
  const int smem = make_shared_memory_plan(head_dim, head_tiles_for(heads), layout).total;
  const int64_t slots_per_wave = int64_t(multiprocessors) * std::max(1, kSharedMemoryPerSm / smem);
  // The head_dim 512 kernel (one CTA per SM) merges up to largest_d512_cluster() splits in a cluster, whose CTAs
  // share a GPC; more splits go to the combine kernel, weighed with its launch.
  const bool clusters_possible = cluster_merge && head_dim == kD512HeadDim && heads > 32;
  const ClusterLimits limits = clusters_possible ? d512_device_limits() : ClusterLimits{};
  const int largest_cluster = limits.largest;
  // The head-split path's device set-up too, so that it happens here (a model's set-up) rather than on its first
  // launch, which may be inside a graph capture.
  if (head_dim == kD512HeadDim && heads > 32) {
    head_split_device_limits();
    device_multiprocessors();
  }
  // Cost in tile-times: the waves each CTA's tiles take, plus a tile for the prologue and the epilogue, plus the
  // merge of any split > 1.
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int s = 1; s <= std::min<int64_t>(kSparseAttentionMaxSplits, tiles); ++s) {
    const bool cluster = s > 1 && s <= largest_cluster;
    const int64_t per_wave = cluster ? int64_t(limits.clusters[size_t(s)]) * s : slots_per_wave;
    if (per_wave == 0) continue;  // no cluster of this size fits the device
    const int64_t waves = (ctas_per_split * s + per_wave - 1) / per_wave;
    const double merge = s == 1           ? 0.0
                         : cluster           ? kClusterMergeTiles
                         : clusters_possible ? kCombineAboveClusterTiles
                                             : kCombineMergeTiles;
    const double cost = double(waves) * double((tiles + s - 1) / s + 1) + merge;
    if (cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

size_t sparse_attention_workspace_bytes(int64_t tokens, int heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  // Partial outputs [splits, T, H, D] fp32, then their (max, sum) pairs [splits, T, H].
  return size_t(splits) * size_t(tokens) * size_t(heads) * (size_t(head_dim) + 2) * sizeof(float);
}

void check_sparse_attention_params(const SparseAttentionParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  const int d = layout.head_dim;
  check(p.cache.pool != nullptr && p.cache.page_table != nullptr, "sparse_attention: the KV cache view is empty");
  check(supported_head_dim(d), "sparse_attention: head_dim ", d, " is not one of 64, 128, 256, 512");
  check(p.layer >= 0 && p.layer < p.cache.layers, "sparse_attention: layer ", p.layer, " outside [0, ",
        p.cache.layers, ")");
  check(p.tokens >= 0 && p.heads > 0, "sparse_attention: bad shape tokens=", p.tokens, " heads=", p.heads);
  check(p.window_slots >= 0 && p.compressed_slots >= 0, "sparse_attention: negative slot count (window ",
        p.window_slots, ", compressed ", p.compressed_slots, ")");
  check(p.splits >= 1 && p.splits <= kSparseAttentionMaxSplits, "sparse_attention: splits ", p.splits,
        " outside [1, ", kSparseAttentionMaxSplits, "]");
  check(int64_t(p.tokens) * head_blocks_for(p.heads) * p.splits < (int64_t(1) << 31),
        "sparse_attention: too many CTAs for one launch (tokens ", p.tokens, ")");
  if (p.tokens == 0) return;
  check_sparse_attention_inputs(p, "sparse_attention");
  check(p.d512_trace == nullptr || (use_d512_kernel(p) && p.cache.layout.format == KvEntryFormat::Bf16 &&
                                    head_split_splits(p) == 0 && !uses_prefill_kernel(p)),
        "sparse_attention: a traced launch (d512_trace) needs a call that the head_dim 512 kernel serves on bf16 "
        "entries");
  check(p.head_split_tiles >= 0 && p.head_split_tiles <= kSparseAttentionHeadSplitMaxTiles,
        "sparse_attention: head_split_tiles ", p.head_split_tiles, " outside [0, ", kSparseAttentionHeadSplitMaxTiles,
        "]");
  const size_t needed = merges_in_cluster(p) || head_split_splits(p) > 0 || uses_prefill_kernel(p)
                            ? 0
                            : sparse_attention_workspace_bytes(p.tokens, p.heads, d, p.splits);
  check(p.workspace_bytes >= needed && (needed == 0 || p.workspace != nullptr), "sparse_attention: ", p.splits,
        " splits need ", needed, " bytes of workspace, got ", p.workspace_bytes);
  check(reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0, "sparse_attention: workspace must be 16-byte aligned");
}

void run_sparse_attention(const SparseAttentionParams& p) {
  check_sparse_attention_params(p);
  if (p.tokens == 0) return;
  const int d = p.cache.layout.head_dim;
  if (const int splits = head_split_splits(p); splits > 0) return launch_head_split(p, splits);
  if (uses_prefill_kernel(p)) {
    SparseAttentionParams call = p;
    call.splits = 1;  // the prefill kernel walks each query's whole list
    return run_sparse_attention_prefill(call);
  }
  if (use_d512_kernel(p)) {
    if (p.cache.layout.format == KvEntryFormat::Fp8Reference)
      launch_d512<true>(p);
    else if (p.d512_trace != nullptr)
      launch_d512<false, true>(p);
    else
      launch_d512<false>(p);
    if (!merges_in_cluster(p)) launch_combine(p);
    return;
  }
  const int head_tiles = head_tiles_for(p.heads);
  const int head_blocks = head_blocks_for(p.heads);
  const SharedMemoryPlan plan = make_shared_memory_plan(d, head_tiles, p.cache.layout);
  check(plan.total <= kSharedMemoryPerSm, "sparse_attention: ", plan.total, " bytes of shared memory for head_dim ",
        d, " exceed the SM's ", kSharedMemoryPerSm);
  switch (d) {
    case 64: dispatch_tiles<64>(p, plan, head_tiles, head_blocks); break;
    case 128: dispatch_tiles<128>(p, plan, head_tiles, head_blocks); break;
    case 256: dispatch_tiles<256>(p, plan, head_tiles, head_blocks); break;
    case 512: dispatch_tiles<512>(p, plan, head_tiles, head_blocks); break;
    default: fail("sparse_attention: head_dim ", d, " unsupported");
  }
  launch_combine(p);
}

}  // namespace dsv4::cuda
