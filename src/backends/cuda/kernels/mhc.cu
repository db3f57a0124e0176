#include "backends/cuda/kernels/mhc.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/mhc.cuh"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

static_assert(kAutoClusterPerTileMaxTokens <= kFusedPostPreMaxTokens,
              "hc_post_pre on clusters per tile is one fused launch");
static_assert(kHcDecodeMaxTokens == mhc::kDecodeMaxTokens &&
                  kHcDecodeMaxHidden == int64_t(mhc::kDecodeMaxSlices) * mhc::kDecodeSliceDims,
              "the public decode-kernel limits are the kernel's");
static_assert(mhc::single_cluster_vectors(kHcSingleClusterHiddenQuantum) == 1 &&
                  mhc::single_cluster_vectors(kHcSingleClusterMaxHidden) == 1 &&
                  mhc::single_cluster_vectors(kHcSingleClusterMaxHidden + kHcSingleClusterHiddenQuantum) != 1 &&
                  mhc::single_cluster_vectors(kHcSingleClusterWideMaxHidden) == 2 &&
                  mhc::single_cluster_vectors(kHcSingleClusterWideMaxHidden + kHcSingleClusterWideHiddenQuantum) == 0 &&
                  mhc::single_cluster_vectors(kHcSingleClusterMaxHidden + kHcSingleClusterWideHiddenQuantum) == 2,
              "the public single-cluster limits are the kernel's");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
bool aligned16(const void* p) { return aligned(p, 16); }

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  return pa < pb + b_bytes && pb < pa + a_bytes;
}

void check_shape(const char* op, int64_t tokens, int64_t hidden, int streams) {
  check(streams == kMhcStreams, op, ": ", streams, " streams; the kernels are built for n = ", kMhcStreams);
  check(tokens >= 0, op, ": negative token count ", tokens);
  check(hidden > 0 && hidden % 4 == 0, op, ": hidden size ", hidden, " must be a positive multiple of 4");
  check(hidden <= (int64_t(1) << 24), op, ": hidden size ", hidden, " is beyond the supported 2^24");
}

// 64-dim slices (fewer partial sums to reduce, fn held by fewer CTAs) when they still give about every SM a CTA.
// Two 64-dim CTAs per SM overlap each other's per-tile chains. `wide` (hc_pre from kWideSliceMinTiles tiles): 128-dim
// slices, one CTA of 512 threads per SM, where 64 would be taken (see kWideSliceMinTiles).
int choose_slice_dims(int64_t token_tiles, int64_t hidden, int multiprocessors, bool wide = false) {
  if (ceil_div(hidden, 64) * token_tiles * 4 < int64_t(multiprocessors) * 3) return 32;
  return wide ? 128 : 64;
}

// Slice clusters of the cluster decode kernel (64-dim slices, kClusterCtas per cluster).
int64_t slice_clusters(int64_t hidden) {
  return ceil_div(ceil_div(hidden, mhc::kDecodeSliceDims), mhc::kClusterCtas);
}

// The cluster decode kernel's words: the row words [partial rows][16][Q], then Σy² [16][Q].
size_t decode_word_count(int64_t hidden) {
  return size_t(mhc::kPartialRows<false> + 1) * mhc::kTileTokens * size_t(slice_clusters(hidden));
}

size_t partial_bytes(int64_t token_tiles, int64_t hidden, int multiprocessors) {
  const int64_t slices = ceil_div(hidden, choose_slice_dims(token_tiles, hidden, multiprocessors));
  return size_t(token_tiles * slices) * mhc::kTileWords * 8;
}

// Common checks of hc_pre and hc_head: the projection inputs, the output pair and the workspace.
void check_projection(const char* op, const float* X, const float* fn, const float* base, const float* scale,
                      int64_t tokens, int64_t hidden, int streams, const float* out, const void* out_bf16,
                      const float* out_norm_weight, const void* workspace, size_t workspace_bytes) {
  check_shape(op, tokens, hidden, streams);
  check(out_norm_weight == nullptr || out != nullptr, op,
        ": the fused output norm needs the fp32 output (it holds the normalised values)");
  check(out_norm_weight == nullptr || aligned16(out_norm_weight), op, ": out_norm_weight must be 16-byte aligned");
  check(X != nullptr && fn != nullptr && base != nullptr && scale != nullptr, op, ": null ",
        X == nullptr ? "X" : fn == nullptr ? "fn" : base == nullptr ? "base" : "scale");
  check(aligned16(X) && aligned16(fn), op, ": ", aligned16(X) ? "fn" : "X", " must be 16-byte aligned");
  check(out != nullptr || out_bf16 != nullptr, op, ": no output (both the fp32 and the bf16 pointer are null)");
  check(out == nullptr || aligned16(out), op, ": the fp32 output must be 16-byte aligned");
  check(out_bf16 == nullptr || aligned(out_bf16, 8), op, ": the bf16 output must be 8-byte aligned");
  const size_t x_bytes = size_t(tokens) * size_t(streams) * size_t(hidden) * sizeof(float);
  const size_t out_elements = size_t(tokens) * size_t(hidden);
  check(out == nullptr || !overlaps(out, out_elements * 4, X, x_bytes), op, ": the fp32 output overlaps X");
  check(out_bf16 == nullptr || !overlaps(out_bf16, out_elements * 2, X, x_bytes), op,
        ": the bf16 output overlaps X");
  const size_t needed = hc_projection_workspace_bytes(tokens, hidden, current_multiprocessors());
  check(workspace != nullptr && workspace_bytes >= needed, op, ": workspace of ", workspace_bytes,
        " bytes; this launch needs ", needed, " (hc_projection_workspace_bytes)");
  check(aligned16(workspace), op, ": workspace must be 16-byte aligned");
}

// CTAs of `kernel` resident per SM with `smem_bytes` of dynamic shared memory, after raising the kernel's shared
// memory limits on the current device (once per kernel and device).
int prepare_resident_ctas(const void* kernel, int threads, size_t smem_bytes) {
  static PerDeviceCache<int> cache;
  return cache.get(kernel, [&] {
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
    int resident = 0;
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem_bytes));
    return resident;
  });
}

}  // namespace

void mhc::size_projection_grid(ProjectionArgs& args, const void* kernel, int threads, size_t smem_bytes,
                               int multiprocessors, const char* op) {
  const int resident = prepare_resident_ctas(kernel, threads, smem_bytes);
  // The CTAs of one token tile wait for each other (each tile's reducer for every slice, every slice for the
  // reducer): all slices of a group must be resident at once, so the persistent grid never exceeds the card.
  const int64_t capacity = int64_t(resident) * multiprocessors;
  check(capacity >= args.slices, op, ": ", args.slices, " CTAs per token tile cannot be resident together (",
        resident, " per SM × ", multiprocessors, " SMs)");
  args.groups = int(std::min<int64_t>(args.tiles, capacity / args.slices));
}

namespace {

template <bool kHead, bool kPost, int kSliceDims, mhc::ProjectionVariant kVariant = mhc::ProjectionVariant::kShared>
void launch_projection(mhc::ProjectionArgs args, int multiprocessors, cudaStream_t stream, const char* op) {
  using Shape = mhc::ProjectionShape<kHead, kPost, kSliceDims, kVariant>;
  const auto kernel = mhc::hc_projection_kernel<kHead, kPost, kSliceDims, kVariant>;
  mhc::size_projection_grid(args, reinterpret_cast<const void*>(kernel), Shape::kThreads, Shape::kSmemBytes,
                            multiprocessors, op);
  launch_chained(kernel, dim3(unsigned(args.groups) * unsigned(args.slices)), dim3(Shape::kThreads),
                 size_t(Shape::kSmemBytes), stream, args, op);
}

// The warp-specialised variant serves PERSISTENT_WARP_SPECIALIZED hc_post_pre launches where the card holds a CTA per
// 64-dim slice; it fuses them at every token count.
bool warp_specialized_serves(HcKernelChoice choice, int64_t hidden, int multiprocessors) {
  return choice == HcKernelChoice::PERSISTENT_WARP_SPECIALIZED && ceil_div(hidden, 64) <= multiprocessors;
}

// `choice` PERSISTENT_WARP_SPECIALIZED takes its variant where it serves the launch (hc_post_pre: hc_pre and hc_head
// alone were slower on it, H200, Flash 4096 tokens 338.7 vs 284.4 µs, session 15). Its 64-dim slices need no more
// workspace than the launch's own choice (at most as many slices).
template <bool kHead, bool kPost>
void run_projection(mhc::ProjectionArgs args, void* workspace, cudaStream_t stream, const char* op,
                    HcKernelChoice choice) {
  const int multiprocessors = current_multiprocessors();
  const HcProjectionConfig config = choose_hc_projection_config(
      args.tokens, args.hidden, multiprocessors,
      kPost ? HcProjectionOp::POST_PRE : kHead ? HcProjectionOp::HEAD : HcProjectionOp::PRE);
  check(config.token_tiles <= 0x7FFFFFFF, op, ": ", args.tokens, " tokens exceed the supported tile count");
  // The kernel indexes the workspace's words in 32 bits: tiles × (slices + 1) × kTileWords < 2^31 (V4-Flash, 64
  // slices of 64 dims: about 1.3M tokens per launch; V4-Pro, 112 slices: about 760K).
  check(size_t(config.token_tiles) * size_t(config.slices + 1) * mhc::kTileWords <= 0x7FFFFFFF, op, ": ", args.tokens,
        " tokens × ", config.slices, " slices exceed the workspace words a launch can index");
  mhc::place_projection_launch(args, workspace, int(config.slices), int(config.token_tiles), op);
  if constexpr (kPost) {
    if (warp_specialized_serves(choice, args.hidden, multiprocessors)) {
      args.slices = int(ceil_div(args.hidden, 64));
      return launch_projection<false, true, 64, mhc::ProjectionVariant::kRoles>(args, multiprocessors, stream, op);
    }
  }
  if constexpr (!kPost && !kHead)
    if (config.slice_dims == 128) return launch_projection<false, false, 128>(args, multiprocessors, stream, op);
  if (config.slice_dims == 64) return launch_projection<kHead, kPost, 64>(args, multiprocessors, stream, op);
  launch_projection<kHead, kPost, 32>(args, multiprocessors, stream, op);
}

// The fields of one hc_pre that every projection kernel's arguments share.
template <class Args>
Args site_args(const HcPreParams& p) {
  Args args{};
  args.X = p.X;
  args.fn = p.fn;
  args.base = p.base;
  args.scale = p.scale;
  args.tokens = p.tokens;
  args.hidden = int(p.hidden);
  args.sinkhorn_iters = p.sinkhorn_iters;
  args.hc_eps = p.hc_eps;
  args.norm_eps = p.norm_eps;
  args.round_to_bf16 = p.round_to_bf16;
  args.y = p.y;
  args.y_bf16 = p.y_bf16;
  args.post = p.post;
  args.comb = p.comb;
  return args;
}

// The same for the decode kernels, with the fused output norm.
template <class Args>
Args decode_site_args(const HcPreParams& p) {
  Args args = site_args<Args>(p);
  args.norm_weight = p.out_norm_weight;
  args.norm_round_to_bf16 = p.out_norm_round_to_bf16;
  return args;
}

// The projection's arguments of one hc_pre (hc_head and the fused hc_post + hc_pre start from them too).
mhc::ProjectionArgs pre_projection_args(const HcPreParams& p) { return site_args<mhc::ProjectionArgs>(p); }

// The hc_pre of the site after an hc_post_pre, reading the updated residual X_out.
HcPreParams next_site_pre_params(const HcPostPreParams& p) {
  return {.X = p.X_out, .fn = p.next_fn, .base = p.next_base, .scale = p.next_scale, .tokens = p.tokens,
          .hidden = p.hidden, .streams = p.streams, .sinkhorn_iters = p.sinkhorn_iters, .hc_eps = p.hc_eps,
          .norm_eps = p.norm_eps, .round_to_bf16 = p.round_to_bf16, .y = p.y, .y_bf16 = p.y_bf16,
          .post = p.next_post, .comb = p.next_comb, .out_norm_weight = p.out_norm_weight,
          .out_norm_round_to_bf16 = p.out_norm_round_to_bf16, .kernel = p.kernel, .workspace = p.workspace,
          .workspace_bytes = p.workspace_bytes, .stream = p.stream};
}

// The cluster decode kernel serves a launch the single-cluster kernel does not, unless a persistent one is asked for or
// the launch is beyond the decode limits (session 13: the cluster kernel was at least as fast at every decode size).
bool cluster_kernel_serves(HcKernelChoice choice, int64_t tokens, int64_t hidden) {
  return (choice == HcKernelChoice::AUTO || choice == HcKernelChoice::CLUSTER_ASYNC) &&
         tokens <= kHcDecodeMaxTokens &&
         hidden <= kHcDecodeMaxHidden;
}

// The arguments of the next site's hc_pre (`args`) for a kernel that applies hc_post itself: it reads the residual
// X before the update and writes the updated one to X_out.
template <class Args>
Args with_fused_post(Args args, const HcPostPreParams& p) {
  args.X = p.X;
  args.out = p.out;
  args.post_in = p.post;
  args.comb_in = p.comb;
  args.X_out = p.X_out;
  return args;
}

// Clusters of the cluster decode kernel that the card holds at once (cached per kernel and device).
int resident_clusters(const void* kernel, const cudaLaunchConfig_t& config) {
  static PerDeviceCache<int> cache;
  return cache.get(kernel, [&] {
    int clusters = 0;
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
    return clusters;
  });
}

template <bool kHead, bool kPost>
void launch_cluster_decode(mhc::ClusterDecodeArgs args, void* workspace, cudaStream_t stream, const char* op) {
  args.clusters = int(slice_clusters(args.hidden));
  auto* base = static_cast<unsigned char*>(workspace);
  args.header = reinterpret_cast<unsigned*>(base);
  args.row_words = reinterpret_cast<unsigned long long*>(base + mhc::kHeaderBytes);
  args.square_words = args.row_words + size_t(mhc::kPartialRows<false>) * mhc::kTileTokens * size_t(args.clusters);
  const auto kernel = mhc::hc_cluster_decode_kernel<kHead, kPost>;
  prepare_resident_ctas(reinterpret_cast<const void*>(kernel), mhc::kDecodeThreads, mhc::kDecodeSmemBytes);
  // Programmatic dependent launch (ptx/dependent_launch.cuh) in clusters of kClusterCtas consecutive CTAs.
  cudaLaunchAttribute attributes[2] = {};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = mhc::kClusterCtas;
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  const int clusters = args.clusters + (kHead ? 0 : 1);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(clusters * mhc::kClusterCtas));
  config.blockDim = dim3(mhc::kDecodeThreads);
  config.dynamicSmemBytes = mhc::kDecodeSmemBytes;
  config.stream = stream;
  config.attrs = attributes + 1;  // the occupancy query takes the cluster shape only
  config.numAttrs = 1;
  // The CTAs wait for each other's words: all clusters must be resident at once.
  const int resident = resident_clusters(reinterpret_cast<const void*>(kernel), config);
  check(resident >= clusters, op, ": the cluster decode kernel's ", clusters, " clusters of ", mhc::kClusterCtas,
        " CTAs cannot be resident together (", resident, " at once)");
  config.attrs = attributes;
  config.numAttrs = 2;
  check_cuda(cudaLaunchKernelEx(&config, kernel, args), op, __FILE__, __LINE__);
}

// Tokens the single-cluster kernel serves with `vectors` vectors per thread: two vectors serve one token (their MMA
// variants lost to the cluster decode kernel at 8 tokens, V4-Pro, H200: hc_pre 8.9 vs 6.5 µs, hc_post_pre + norm
// 11.0 vs 7.9).
constexpr int64_t single_cluster_max_tokens(int vectors) { return vectors == 1 ? kHcDecodeMaxTokens : 1; }

// Whether the card holds the single-cluster kernel's cluster with `kVectors` vectors per thread (checked once per
// kernel and device), sized for the widest hidden size of that variant: a card that holds that cluster holds every
// narrower one. The variants for other token counts take the same threads and shared memory.
template <bool kHead, bool kPost, int kVectors>
bool single_cluster_fits() {
  const auto kernel = mhc::hc_single_cluster_kernel<kHead, kPost, 0, kVectors>;
  static PerDeviceCache<int> cache;
  return cache.get(reinterpret_cast<const void*>(kernel), [&] {
    const int widest =
        mhc::kSingleClusterCtas * mhc::kSingleWarpDims * kVectors * mhc::single_cluster_max_warps(kVectors);
    const int threads = mhc::single_cluster_threads(widest, kHead);
    const int smem = mhc::single_cluster_smem_bytes(widest, kHead);
    const auto allow = [&](auto variant) {
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(variant, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(variant, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    };
    allow(kernel);
    if constexpr (single_cluster_max_tokens(kVectors) > 1) {
      allow(mhc::hc_single_cluster_kernel<kHead, kPost, 1, kVectors>);
      allow(mhc::hc_single_cluster_kernel<kHead, kPost, 2, kVectors>);
    }
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = mhc::kSingleClusterCtas;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(mhc::kSingleClusterCtas);
    config.blockDim = dim3(unsigned(threads));
    config.dynamicSmemBytes = size_t(smem);
    config.attrs = &cluster;
    config.numAttrs = 1;
    int clusters = 0;
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
    return clusters;
  }) > 0;
}

// The single-cluster decode kernel serves AUTO launches within its limits (mhc.hpp; above 16 tokens a cluster per
// 16-token tile) where the card holds its cluster.
template <bool kHead, bool kPost>
bool single_cluster_serves(HcKernelChoice choice, int64_t tokens, int64_t hidden) {
  const int vectors = mhc::single_cluster_vectors(hidden);
  const int64_t tile_clusters_max = kHead ? kAutoClusterPerTileMaxHeadTokens : kAutoClusterPerTileMaxTokens;
  if (choice != HcKernelChoice::AUTO || vectors == 0 ||
      tokens > (vectors == 1 ? tile_clusters_max : single_cluster_max_tokens(vectors)))
    return false;
  return vectors == 1 ? single_cluster_fits<kHead, kPost, 1>() : single_cluster_fits<kHead, kPost, 2>();
}

template <bool kHead, bool kPost, int kVectors>
void launch_single_cluster_kernel(const mhc::DecodeSiteArgs& args, cudaStream_t stream, const char* op) {
  // One token: the FMA projection; else the MMA's 8-token tiles (same shared memory and threads); past 16 tokens a
  // cluster per 16-token tile.
  auto kernel = mhc::hc_single_cluster_kernel<kHead, kPost, 0, kVectors>;
  if constexpr (single_cluster_max_tokens(kVectors) > 1) {
    if (args.tokens > 8) kernel = mhc::hc_single_cluster_kernel<kHead, kPost, 2, kVectors>;
    else if (args.tokens > 1) kernel = mhc::hc_single_cluster_kernel<kHead, kPost, 1, kVectors>;
  }
  const int64_t clusters = ceil_div(args.tokens, mhc::kTileTokens);
  check(clusters <= 0x7FFFFFFF / mhc::kSingleClusterCtas, op, ": ", args.tokens, " tokens exceed the launch limit");
  launch_chained(kernel, dim3(unsigned(clusters * mhc::kSingleClusterCtas)),
                 dim3(unsigned(mhc::single_cluster_threads(args.hidden, kHead))),
                 size_t(mhc::single_cluster_smem_bytes(args.hidden, kHead)), stream, dim3(mhc::kSingleClusterCtas),
                 op, args);
}

template <bool kHead, bool kPost>
void launch_single_cluster(const mhc::DecodeSiteArgs& args, cudaStream_t stream, const char* op) {
  if (mhc::single_cluster_vectors(args.hidden) == 1)
    return launch_single_cluster_kernel<kHead, kPost, 1>(args, stream, op);
  launch_single_cluster_kernel<kHead, kPost, 2>(args, stream, op);
}

// The persistent path's fused output norm: rms_norm of the projection's fp32 output in place.
void run_output_norm(float* y, __nv_bfloat16* y_bf16, const float* weight, bool round, int64_t tokens,
                     int64_t hidden, float eps, cudaStream_t stream) {
  run_rms_norm({.x = y, .weight = weight, .rows = tokens, .width = hidden, .eps = eps, .round_to_bf16 = round,
                .y = y, .y_bf16 = y_bf16, .stream = stream});
}

}  // namespace

HcProjectionConfig choose_hc_projection_config(int64_t tokens, int64_t hidden, int multiprocessors, HcProjectionOp op) {
  check(tokens >= 0 && hidden > 0 && hidden % 4 == 0, "hc projection: bad shape tokens=", tokens,
        " hidden=", hidden);
  HcProjectionConfig config;
  config.token_tile = mhc::kTileTokens;
  config.token_tiles = ceil_div(tokens, mhc::kTileTokens);
  config.slice_dims = choose_slice_dims(std::max<int64_t>(config.token_tiles, 1), hidden, multiprocessors,
                                       op == HcProjectionOp::PRE && config.token_tiles >= kWideSliceMinTiles);
  config.slices = ceil_div(hidden, config.slice_dims);
  config.threads = mhc::projection_threads(config.slice_dims);
  const bool post_pre = op == HcProjectionOp::POST_PRE;
  const int partial_rows = op == HcProjectionOp::HEAD ? mhc::kPartialRows<true> : mhc::kPartialRows<false>;
  config.stages = mhc::projection_stages(config.slice_dims, partial_rows, post_pre);
  config.smem_bytes = size_t(mhc::projection_smem_bytes(config.slice_dims, partial_rows, post_pre));
  return config;
}

size_t hc_projection_workspace_bytes(int64_t tokens, int64_t hidden, int multiprocessors) {
  const int64_t tiles = std::max<int64_t>(ceil_div(tokens, mhc::kTileTokens), 1);
  // The partial sums must also fit every smaller launch (narrower slices, more of them): the largest over the tile
  // counts up to `tiles`. Slices only widen as tiles grow, and at the widest the size grows with the tiles.
  size_t partials = 0;
  for (int64_t t = 1; t <= tiles; ++t) {
    if (choose_slice_dims(t, hidden, multiprocessors) == 64) {
      partials = std::max(partials, partial_bytes(tiles, hidden, multiprocessors));
      break;
    }
    partials = std::max(partials, partial_bytes(t, hidden, multiprocessors));
  }
  return mhc::kHeaderBytes + std::max(size_t(tiles) * mhc::kTileWords * 8 + partials, decode_word_count(hidden) * 8);
}

void check_hc_pre_params(const HcPreParams& p) {
  check_projection("hc_pre", p.X, p.fn, p.base, p.scale, p.tokens, p.hidden, p.streams, p.y, p.y_bf16,
                   p.out_norm_weight, p.workspace, p.workspace_bytes);
  check(p.post != nullptr && p.comb != nullptr, "hc_pre: null ", p.post == nullptr ? "post" : "comb");
  check(p.sinkhorn_iters >= 1, "hc_pre: sinkhorn_iters = ", p.sinkhorn_iters, "; at least one is needed");
}

void check_hc_head_params(const HcHeadParams& p) {
  check_projection("hc_head", p.X, p.fn, p.base, p.scale, p.tokens, p.hidden, p.streams, p.h, p.h_bf16,
                   p.out_norm_weight, p.workspace, p.workspace_bytes);
}

void check_hc_post_params(const HcPostParams& p) {
  check_shape("hc_post", p.tokens, p.hidden, p.streams);
  check(p.out != nullptr && p.X != nullptr && p.post != nullptr && p.comb != nullptr && p.X_out != nullptr,
        "hc_post: null ",
        p.out == nullptr    ? "out"
        : p.X == nullptr    ? "X"
        : p.post == nullptr ? "post"
        : p.comb == nullptr ? "comb"
                            : "X_out");
  check(aligned16(p.out) && aligned16(p.X) && aligned16(p.post) && aligned16(p.comb) && aligned16(p.X_out),
        "hc_post: out, X, post, comb and X_out must be 16-byte aligned");
  const size_t x_bytes = size_t(p.tokens) * kMhcStreams * size_t(p.hidden) * sizeof(float);
  check(p.X_out == p.X || !overlaps(p.X_out, x_bytes, p.X, x_bytes),
        "hc_post: X_out must be X itself or not overlap it");
  check(!overlaps(p.X_out, x_bytes, p.out, size_t(p.tokens) * size_t(p.hidden) * sizeof(float)),
        "hc_post: X_out overlaps out");
}

void check_hc_post_pre_params(const HcPostPreParams& p) {
  const char* op = "hc_post_pre";
  check(p.next_fn != nullptr && p.next_base != nullptr && p.next_scale != nullptr, op, ": null ",
        p.next_fn == nullptr ? "next_fn" : p.next_base == nullptr ? "next_base" : "next_scale");
  check_projection(op, p.X, p.next_fn, p.next_base, p.next_scale, p.tokens, p.hidden, p.streams, p.y, p.y_bf16,
                   p.out_norm_weight, p.workspace, p.workspace_bytes);
  check(p.out != nullptr && p.post != nullptr && p.comb != nullptr && p.X_out != nullptr && p.next_post != nullptr &&
            p.next_comb != nullptr,
        op, ": null ",
        p.out == nullptr         ? "out"
        : p.post == nullptr      ? "post"
        : p.comb == nullptr      ? "comb"
        : p.X_out == nullptr     ? "X_out"
        : p.next_post == nullptr ? "next_post"
                                 : "next_comb");
  check(aligned16(p.out) && aligned16(p.post) && aligned16(p.comb) && aligned16(p.X_out), op,
        ": out, post, comb and X_out must be 16-byte aligned");
  check(p.sinkhorn_iters >= 1, op, ": sinkhorn_iters = ", p.sinkhorn_iters, "; at least one is needed");
  const size_t x_bytes = size_t(p.tokens) * kMhcStreams * size_t(p.hidden) * sizeof(float);
  const size_t td_bytes = size_t(p.tokens) * size_t(p.hidden) * sizeof(float);
  const size_t post_bytes = size_t(p.tokens) * kMhcStreams * sizeof(float);
  const size_t comb_bytes = post_bytes * kMhcStreams;
  check(p.X_out == p.X || !overlaps(p.X_out, x_bytes, p.X, x_bytes), op, ": X_out must be X itself or not overlap it");
  check(!overlaps(p.X_out, x_bytes, p.out, td_bytes), op, ": X_out overlaps out");
  check(p.y == nullptr || !overlaps(p.y, td_bytes, p.X_out, x_bytes), op, ": the fp32 output overlaps X_out");
  check(p.y_bf16 == nullptr || !overlaps(p.y_bf16, td_bytes / 2, p.X_out, x_bytes), op,
        ": the bf16 output overlaps X_out");
  // A CTA reads a slice of out before it writes the same slice of y: y may be out itself.
  check(p.y == nullptr || static_cast<const void*>(p.y) == p.out || !overlaps(p.y, td_bytes, p.out, td_bytes), op,
        ": the fp32 output must be out itself or not overlap it");
  check(p.y_bf16 == nullptr || !overlaps(p.y_bf16, td_bytes / 2, p.out, td_bytes), op,
        ": the bf16 output overlaps out");
  const auto overlaps_inputs = [&](const void* output, size_t bytes) {
    return overlaps(output, bytes, p.post, post_bytes) || overlaps(output, bytes, p.comb, comb_bytes);
  };
  check(!overlaps_inputs(p.next_post, post_bytes), op, ": next_post overlaps post or comb (still read by the launch)");
  check(!overlaps_inputs(p.next_comb, comb_bytes), op, ": next_comb overlaps post or comb (still read by the launch)");
}

void run_hc_pre(const HcPreParams& p) {
  check_hc_pre_params(p);
  if (p.tokens == 0) return;
  if (single_cluster_serves<false, false>(p.kernel, p.tokens, p.hidden))
    return launch_single_cluster<false, false>(decode_site_args<mhc::DecodeSiteArgs>(p), p.stream, "hc_pre");
  if (cluster_kernel_serves(p.kernel, p.tokens, p.hidden))
    return launch_cluster_decode<false, false>(decode_site_args<mhc::ClusterDecodeArgs>(p), p.workspace, p.stream,
                                               "hc_pre");
  mhc::ProjectionArgs args = pre_projection_args(p);
  if (p.out_norm_weight != nullptr) args.y_bf16 = nullptr;  // the norm writes it
  run_projection<false, false>(args, p.workspace, p.stream, "hc_pre", p.kernel);
  if (p.out_norm_weight != nullptr)
    run_output_norm(p.y, p.y_bf16, p.out_norm_weight, p.out_norm_round_to_bf16, p.tokens, p.hidden, p.norm_eps,
                    p.stream);
}

void run_hc_head(const HcHeadParams& p) {
  check_hc_head_params(p);
  if (p.tokens == 0) return;
  const HcPreParams as_pre{.X = p.X, .fn = p.fn, .base = p.base, .scale = p.scale, .tokens = p.tokens,
                           .hidden = p.hidden, .sinkhorn_iters = 1, .hc_eps = p.hc_eps, .norm_eps = p.norm_eps,
                           .round_to_bf16 = p.round_to_bf16, .y = p.h, .y_bf16 = p.h_bf16,
                           .out_norm_weight = p.out_norm_weight,
                           .out_norm_round_to_bf16 = p.out_norm_round_to_bf16};
  if (single_cluster_serves<true, false>(p.kernel, p.tokens, p.hidden))
    return launch_single_cluster<true, false>(decode_site_args<mhc::DecodeSiteArgs>(as_pre), p.stream, "hc_head");
  if (cluster_kernel_serves(p.kernel, p.tokens, p.hidden))
    return launch_cluster_decode<true, false>(decode_site_args<mhc::ClusterDecodeArgs>(as_pre), p.workspace,
                                              p.stream, "hc_head");
  mhc::ProjectionArgs args = pre_projection_args(as_pre);
  if (p.out_norm_weight != nullptr) args.y_bf16 = nullptr;
  run_projection<true, false>(args, p.workspace, p.stream, "hc_head", p.kernel);
  if (p.out_norm_weight != nullptr)
    run_output_norm(p.h, p.h_bf16, p.out_norm_weight, p.out_norm_round_to_bf16, p.tokens, p.hidden, p.norm_eps,
                    p.stream);
}

void run_hc_post_pre(const HcPostPreParams& params) {
  check_hc_post_pre_params(params);
  if (params.tokens == 0) return;
  HcPostPreParams p = params;
  if (p.kernel == HcKernelChoice::AUTO && p.tokens >= kAutoWarpSpecializedPostPreMinTokens)
    p.kernel = HcKernelChoice::PERSISTENT_WARP_SPECIALIZED;
  // The warp-specialised variant fuses at every token count.
  if (p.tokens > kFusedPostPreMaxTokens && !warp_specialized_serves(p.kernel, p.hidden, current_multiprocessors())) {
    run_hc_post({.out = p.out, .X = p.X, .post = p.post, .comb = p.comb, .tokens = p.tokens, .hidden = p.hidden,
                 .streams = p.streams, .round_to_bf16 = p.round_to_bf16, .X_out = p.X_out, .stream = p.stream});
    run_hc_pre(next_site_pre_params(p));
    return;
  }
  const HcPreParams next = next_site_pre_params(p);
  if (single_cluster_serves<false, true>(p.kernel, p.tokens, p.hidden))
    return launch_single_cluster<false, true>(with_fused_post(decode_site_args<mhc::DecodeSiteArgs>(next), p), p.stream,
                                              "hc_post_pre");
  if (cluster_kernel_serves(p.kernel, p.tokens, p.hidden))
    return launch_cluster_decode<false, true>(with_fused_post(decode_site_args<mhc::ClusterDecodeArgs>(next), p),
                                              p.workspace, p.stream, "hc_post_pre");
  mhc::ProjectionArgs args = with_fused_post(pre_projection_args(next), p);
  if (p.out_norm_weight != nullptr) args.y_bf16 = nullptr;
  run_projection<false, true>(args, p.workspace, p.stream, "hc_post_pre", p.kernel);
  if (p.out_norm_weight != nullptr)
    run_output_norm(p.y, p.y_bf16, p.out_norm_weight, p.out_norm_round_to_bf16, p.tokens, p.hidden, p.norm_eps,
                    p.stream);
}

void run_hc_post(const HcPostParams& p) {
  check_hc_post_params(p);
  if (p.tokens == 0) return;
  const int64_t vectors = p.tokens * (p.hidden / 4);
  const int64_t blocks = ceil_div(vectors, mhc::kPostThreads);
  check(blocks <= 0x7FFFFFFF, "hc_post: ", p.tokens, " tokens × ", p.hidden, " exceed the launch limit");
  const mhc::PostArgs args{.out = p.out, .X = p.X, .post = p.post, .comb = p.comb, .tokens = p.tokens,
                           .hidden = int(p.hidden), .round_output = p.round_to_bf16, .X_out = p.X_out};
  launch_chained(mhc::hc_post_kernel, dim3(unsigned(blocks)), dim3(mhc::kPostThreads), 0, p.stream, args, "hc_post");
}

}  // namespace dsv4::cuda
