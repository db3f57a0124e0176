#include "backends/cuda/kernels/quantized_linear.hpp"

#include <algorithm>
#include <string_view>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/quantized_linear.cuh"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

using tile::TileFormat;

constexpr int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }
constexpr int64_t ceil_div(int64_t value, int64_t divisor) { return (value + divisor - 1) / divisor; }

TileFormat tile_format_of(const DeviceMatrixView& w) {
  switch (w.format) {
    case WeightFormat::BF16: return TileFormat::BF16;
    case WeightFormat::FP8_BLOCK128: return TileFormat::FP8_BLOCK128;
    case WeightFormat::MXFP4: return TileFormat::MXFP4;
    case WeightFormat::NVFP4: return TileFormat::NVFP4;
    default:
      fail("quantized_linear: weight [", w.rows, ", ", w.cols, "] is ", to_string(w.format),
           "; supported formats are BF16, FP8_BLOCK128, MXFP4 and NVFP4");
  }
}

// k per 16-byte load of one row.
int64_t values_per_load(TileFormat format) {
  switch (format) {
    case TileFormat::BF16: return tile::TileFormatTraits<TileFormat::BF16>::kValuesPerLoad;
    case TileFormat::FP8_BLOCK128: return tile::TileFormatTraits<TileFormat::FP8_BLOCK128>::kValuesPerLoad;
    case TileFormat::MXFP4: return tile::TileFormatTraits<TileFormat::MXFP4>::kValuesPerLoad;
    case TileFormat::NVFP4: return tile::TileFormatTraits<TileFormat::NVFP4>::kValuesPerLoad;
  }
  fail("quantized_linear: unknown tile format");
}

void check_shape(const DeviceMatrixView& w, int tokens, int groups) {
  const TileFormat format = tile_format_of(w);
  check(w.rows > 0 && w.cols > 0, "quantized_linear: weight [", w.rows, ", ", w.cols, "] (", to_string(w.format),
        ") must have at least one row and one column");
  check(tokens >= 1 && tokens <= kLinearMaxTokens, "quantized_linear: ", tokens, " tokens; the decode path takes 1 to ",
        kLinearMaxTokens);
  check(groups >= 1, "quantized_linear: group count ", groups, " must be at least 1");
  check(w.rows % groups == 0, "quantized_linear: weight [", w.rows, ", ", w.cols, "] does not split into ", groups,
        " groups of equal row count");
  const ScaleType expected_scales = format == TileFormat::NVFP4 ? ScaleType::E4M3 : ScaleType::E8M0;
  if (format == TileFormat::FP8_BLOCK128)
    check(w.scale_type == ScaleType::E8M0 || w.scale_type == ScaleType::F32, "quantized_linear: FP8_BLOCK128 weight [",
          w.rows, ", ", w.cols, "] has ", to_string(w.scale_type), " scales; e8m0 or f32 expected");
  else if (format != TileFormat::BF16)
    check(w.scale_type == expected_scales, "quantized_linear: ", to_string(w.format), " weight [", w.rows, ", ",
          w.cols, "] has ", to_string(w.scale_type), " scales; ", to_string(expected_scales), " expected");
}

template <TileFormat F, bool kAlignedTiles>
void launch_for_token_tiles(const linear::LinearKernelArgs& args, const QuantizedLinearConfig& config,
                            cudaStream_t stream) {
  const dim3 grid(unsigned(config.row_blocks), unsigned(config.k_splits));
  const dim3 block(linear::kThreadsPerCta);
  // One instantiation per token-tile count: NT sizes the accumulators of each warp.
  switch (config.token_tiles) {
    case 1: linear::quantized_linear_kernel<F, 1, kAlignedTiles><<<grid, block, config.smem_bytes, stream>>>(args); break;
    case 2: linear::quantized_linear_kernel<F, 2, kAlignedTiles><<<grid, block, config.smem_bytes, stream>>>(args); break;
    case 4: linear::quantized_linear_kernel<F, 4, kAlignedTiles><<<grid, block, config.smem_bytes, stream>>>(args); break;
    case 8: linear::quantized_linear_kernel<F, 8, kAlignedTiles><<<grid, block, config.smem_bytes, stream>>>(args); break;
    default: fail("quantized_linear: ", config.token_tiles, " token tiles per warp is not instantiated");
  }
  DSV4_CUDA_CHECK_LAUNCH("quantized_linear_kernel");
}

template <TileFormat F, int NT, linear::StreamedReduce kReduce, bool kTrace>
void launch_streamed_kernel(const linear::LinearKernelArgs& args, const QuantizedLinearConfig& config,
                            cudaStream_t stream) {
  constexpr bool kCluster = kReduce != linear::StreamedReduce::WORKSPACE;
  const auto kernel = linear::quantized_linear_streamed_kernel<F, NT, kReduce, kTrace>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in: set once per device, to the device's limit.
  const int limit = max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel));
  check(config.smem_bytes <= size_t(limit), "quantized_linear: ", config.smem_bytes,
        " bytes of shared memory per CTA exceed the device's ", limit);
  if (kCluster && config.k_splits > 8) {  // beyond the portable cluster size (Hopper allows 16)
    static PerDeviceCache<bool> non_portable;
    non_portable.get(reinterpret_cast<const void*>(kernel), [&] {
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      return true;
    });
  }
  // A programmatic launch: the CTAs may start their weight streams while the previous kernel in the stream drains.
  // With the cluster reduction, the splits of a row block (grid y) form one cluster.
  launch_chained(kernel, dim3(unsigned(config.row_blocks), unsigned(config.k_splits)), dim3(linear::kThreadsPerCta),
                 config.smem_bytes, stream, dim3(1, kCluster ? unsigned(config.k_splits) : 1u, 1),
                 "quantized_linear_streamed_kernel", args);
}

template <TileFormat F, int NT, bool kTrace>
void launch_streamed_variant(const linear::LinearKernelArgs& args, const QuantizedLinearConfig& config,
                             cudaStream_t stream) {
  using linear::StreamedReduce;
  if (config.k_splits > 1 && config.reduce == SplitKReduce::CLUSTER)
    launch_streamed_kernel<F, NT, StreamedReduce::CLUSTER, kTrace>(args, config, stream);
  else
    launch_streamed_kernel<F, NT, StreamedReduce::WORKSPACE, kTrace>(args, config, stream);
}

template <TileFormat F, int NT>
void launch_streamed(const linear::LinearKernelArgs& args, const QuantizedLinearConfig& config, cudaStream_t stream) {
  if constexpr ((F == TileFormat::FP8_BLOCK128 || F == TileFormat::BF16) && NT == 1)
    if (args.trace != nullptr) return launch_streamed_variant<F, NT, true>(args, config, stream);
  launch_streamed_variant<F, NT, false>(args, config, stream);
}

template <TileFormat F>
void launch_for_format(const linear::LinearKernelArgs& args, const QuantizedLinearConfig& config,
                       cudaStream_t stream) {
  if (config.load_path == WeightLoadPath::STREAMED) {
    if (config.token_tiles == 1)
      launch_streamed<F, 1>(args, config, stream);
    else
      launch_streamed<F, 2>(args, config, stream);
  } else if (config.load_path == WeightLoadPath::ALIGNED)
    launch_for_token_tiles<F, true>(args, config, stream);
  else
    launch_for_token_tiles<F, false>(args, config, stream);
}

// Bytes of row_blocks tickets, padded to 256 (within the workspace's ticket area).
size_t ticket_bytes_of(int64_t row_blocks) { return size_t(round_up(row_blocks * int64_t(sizeof(uint32_t)), 256)); }

bool same_tiling(const QuantizedLinearConfig& a, const QuantizedLinearConfig& b) {
  return a.rows_per_cta == b.rows_per_cta && a.row_blocks == b.row_blocks && a.k_splits == b.k_splits &&
         a.split_k == b.split_k && a.chunk_k == b.chunk_k && a.token_tiles == b.token_tiles &&
         a.load_path == b.load_path && a.ring_slots == b.ring_slots && a.ctas_per_sm == b.ctas_per_sm &&
         a.reduce == b.reduce &&
         a.smem_bytes == b.smem_bytes && a.workspace_bytes == b.workspace_bytes && a.ticket_bytes == b.ticket_bytes;
}

// Hopper (sm_90): shared memory of one SM, of which the hardware reserves 1 KiB per resident CTA, and the most one
// CTA may take dynamically (227 KiB less a margin for the kernel's static barriers).
constexpr size_t kSharedMemoryPerSm = 228 * 1024;
constexpr size_t kSharedMemoryPerCta = 226 * 1024;
constexpr size_t kSharedMemoryReservedPerCta = 1024;
// The STREAMED path's x tile budget: T = 1 stages up to 8 K inputs at once; more tokens stage in shorter chunks.
constexpr size_t kStreamedXTileBudget = 16 * 1024;
// STREAMED: stages per warp by default, and where AUTO takes it. Measured on an H200 (bench_cuda_linear, V4-Flash
// shapes, 1-4 slots): FP8 and fp4 were fastest with one slot per warp at T = 1 and 8 (1.1-1.7x the ALIGNED path;
// deeper rings only queue more requests behind the same 16 warps per SM); BF16 gained only at T = 1, with four.
// Cold (L2 evicted before each call, session 14): FP8 wq_b T = 1 13.2 / 14.0 / 15.8 / 19.6 µs at 1-4 slots, ncu
// 16.6 / 18.1 / 19.7 / 24.7 µs with DRAM 42 / 39 / 36 / 28 % busy: more bytes in flight per SM made it slower.
int default_ring_slots(TileFormat format) { return format == TileFormat::BF16 ? 4 : 1; }
bool auto_takes_streamed(TileFormat format, int tokens) {
  return format == TileFormat::BF16 ? tokens == 1 : tokens <= tile::kTokensPerMma;
}
// AUTO takes the streamed path with the cluster reduction (up to kLinearMaxStreamedTokens tokens) where K splits
// and the grid is at most two CTAs per SM. Measured on an H200 in CUDA graphs: V4-Flash wq_a / wkv FP8 5.5 → 4.7 /
// 4.5 → 3.9 µs at T = 1 and 18 → 10 / 17 → 8 µs at T = 16, fp4 experts 15 → 12 µs at T = 16; grids of 512 CTAs
// (wo_a, wo_b, FP8 experts) ran 30 % slower with clusters, and BF16 (4-slot rings, fewer CTAs per SM) too. With the
// partials pushed to rank 0 (session 19) still slower there: wo_b T = 1 cold 16.1 vs 14.1 µs (8 splits, H200), and
// the BF16 compressor stacks at T = 1 on it lost end to end (8 layers b1 770.7 vs 773.1 t/s, H200). Session 20: the
// T = 1 clusters that won cold (BF16 stacks with two-slot rings and 4-stage splits: CSA 10.77 → 8.30 µs, HCA 7.29 →
// 5.22; FP8 cluster pairs at one to two row blocks per SM: indexer wq_b 8.31 → 6.73, wo_a 13.39 → 12.21) lost end to
// end, all together: 8 layers b1 739.3 vs 763.7 t/s (H200, same job). Session 21, each shape alone in the model step
// (8 layers b1, H200, same jobs, defaults 762-769 t/s): every other T = 1 launch shape tried lost or tied. Lost: wo_b
// in 256 / 384 / 1024 CTAs (2/4/w 734.9, 1/6/w 746.5, 1/16/w 756.2), wo_a in 256 / 384 / 1024 (750.7, 758.6, 757.1)
// or cluster pairs (735.6), wq_b with 2 slots (760.1) or in 1024 CTAs (739.2), the FP8 one-token-tile kernel at 5
// CTAs per SM (launch bound 5: 762.4 vs 772.9). Level: the indexer's wq_b in 128 CTAs (2/1/w 772.8 vs 772.9), the
// BF16 stacks in fewer CTAs (773.1) or at one slot (769.8 vs 767-768), [wq_a; wkv] in 16-CTA clusters or with 2
// slots, the BF16 head at 1-2 slots (763-766 vs 755-768).
bool auto_takes_cluster(TileFormat format, const QuantizedLinearConfig& cluster, int multiprocessors) {
  return format != TileFormat::BF16 && cluster.reduce == SplitKReduce::CLUSTER &&
         cluster.row_blocks * cluster.k_splits <= 2 * int64_t(std::max(multiprocessors, 1));
}
// Small matrices (few row blocks, long K) at T <= 8 first try the cluster reduction with the K splits that keep the
// grid within 2.5 CTAs per SM, taken when that still splits K at least kWideClusterMinSplits ways. Measured cold
// (L2 evicted before each call, bench_cuda_linear --sweep, H200, FP8): V4-Flash [wq_a; wkv] 1536 × 4096 7.50 → 6.80 µs
// at T = 1, 11.10 → 9.19 at T = 8 (16 splits through the workspace → 8 in clusters); the CSA compressors' stack
// 2560 × 4096 8.72 → 7.91 / 12.07 → 10.54 (8 splits, workspace → clusters); where the rule above already took
// clusters (the HCA stack, 16 splits) it gives the same config. Larger matrices split K fewer ways and keep the
// rule above (wo_a / wo_b / wq_b: at most 0.7 µs between their best configs and the defaults, not one rule).
constexpr int kWideClusterMinSplits = 8;
int64_t wide_cluster_splits(int64_t row_blocks, int multiprocessors) {
  return std::min<int64_t>(kLinearMaxClusterSplits, 5 * int64_t(std::max(multiprocessors, 1)) / (2 * row_blocks));
}

// The STREAMED path's rings of `slots` stages per warp, and the slack that aligns them for the swizzled boxes.
size_t streamed_ring_bytes(TileFormat format, int slots) {
  return size_t(linear::kWarpsPerCta) * size_t(slots) * size_t(tile::stream::slot_bytes(format)) +
         tile::stream::kSlotAlignment;
}
// The least dynamic shared memory of one STREAMED CTA: the rings and an x tile of one stage.
size_t streamed_min_cta_bytes(TileFormat format, int tokens, int slots) {
  return streamed_ring_bytes(format, slots) +
         size_t(tokens) * 2 * size_t(tile::x_tile_row_stride(tile::stream::stage_k(format)));
}

bool ranges_overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto* a0 = static_cast<const char*>(a);
  const auto* b0 = static_cast<const char*>(b);
  return a_bytes > 0 && b_bytes > 0 && a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

}  // namespace

bool streamed_load_path_applies(const DeviceMatrixView& weight, int tokens, int groups) {
  check_shape(weight, tokens, groups);
  return tokens <= kLinearMaxStreamedTokens && (weight.rows / groups) % tile::kTileRows == 0 &&
         tile::stream::streamed_tile_applies(weight, tile_format_of(weight));
}

bool streamed_rings_fit(const DeviceMatrixView& weight, int tokens, int ring_slots) {
  const TileFormat format = tile_format_of(weight);
  check(ring_slots >= 1 && ring_slots <= tile::stream::kMaxSlots && tokens >= 1 && tokens <= kLinearMaxStreamedTokens,
        "quantized_linear: ", ring_slots, " ring slots at ", tokens, " tokens; the streamed path takes 1 to ",
        tile::stream::kMaxSlots, " slots and 1 to ", kLinearMaxStreamedTokens, " tokens");
  return streamed_min_cta_bytes(format, tokens, ring_slots) <= kSharedMemoryPerCta;
}

QuantizedLinearConfig choose_quantized_linear_config(const DeviceMatrixView& weight, int tokens, int groups,
                                                     int multiprocessors, WeightLoadPath load_path,
                                                     int ring_slots, SplitKReduce reduce, int k_splits) {
  check_shape(weight, tokens, groups);
  const TileFormat format = tile_format_of(weight);
  // ALIGNED: 16-byte aligned rows, and every warp's 16-row tile starts at a multiple of 16 (groups of whole tiles).
  const bool aligned_possible = tile::weight_rows_aligned(weight) && (weight.rows / groups) % tile::kTileRows == 0;
  const bool streamed_possible = streamed_load_path_applies(weight, tokens, groups);
  check(load_path != WeightLoadPath::ALIGNED || aligned_possible, "quantized_linear: weight [", weight.rows, ", ",
        weight.cols, "] in ", groups, " group(s) has rows that are not 16-byte aligned or groups that are not whole ",
        "16-row tiles; the aligned load path cannot read it");
  check(load_path != WeightLoadPath::STREAMED || streamed_possible, "quantized_linear: weight [", weight.rows, ", ",
        weight.cols, "] (", to_string(weight.format), ") in ", groups, " group(s) at ", tokens, " tokens: the ",
        "streamed load path needs 16-byte aligned rows and scales, K a multiple of ", tile::stream::stage_k(format),
        ", whole 16-row tiles per group and at most ", kLinearMaxStreamedTokens, " tokens");
  check(k_splits >= 0 && (k_splits == 0 || load_path == WeightLoadPath::STREAMED), "quantized_linear: ", k_splits,
        " K splits asked for; a split count is taken on the streamed load path only (0: the default)");
  if (load_path == WeightLoadPath::AUTO && reduce == SplitKReduce::AUTO && streamed_possible) {
    const int64_t wide_splits =
        wide_cluster_splits(groups * ceil_div(weight.rows / groups, linear::kRowsPerCta), multiprocessors);
    if (format != TileFormat::BF16 && tokens <= tile::kTokensPerMma && wide_splits >= kWideClusterMinSplits) {
      const QuantizedLinearConfig wide =
          choose_quantized_linear_config(weight, tokens, groups, multiprocessors, WeightLoadPath::STREAMED,
                                         ring_slots, SplitKReduce::CLUSTER, int(wide_splits));
      if (wide.reduce == SplitKReduce::CLUSTER && wide.k_splits >= kWideClusterMinSplits) return wide;
    }
    const QuantizedLinearConfig cluster =
        choose_quantized_linear_config(weight, tokens, groups, multiprocessors, WeightLoadPath::STREAMED, ring_slots,
                                       SplitKReduce::CLUSTER, 0);
    if (auto_takes_cluster(format, cluster, multiprocessors)) return cluster;
  }
  QuantizedLinearConfig config;
  config.rows_per_cta = linear::kRowsPerCta;
  config.row_blocks = groups * ceil_div(weight.rows / groups, linear::kRowsPerCta);  // CTAs never span two groups
  const int64_t token_tiles = ceil_div(tokens, tile::kTokensPerMma);
  config.token_tiles = token_tiles <= 1 ? 1 : token_tiles <= 2 ? 2 : token_tiles <= 4 ? 4 : 8;
  config.load_path = load_path != WeightLoadPath::AUTO                            ? load_path
                     : streamed_possible && auto_takes_streamed(format, tokens) ? WeightLoadPath::STREAMED
                     : aligned_possible                                         ? WeightLoadPath::ALIGNED
                                                                                : WeightLoadPath::GENERIC;
  const bool streamed = config.load_path == WeightLoadPath::STREAMED;

  if (streamed) {
    // Splits and chunks are whole stages (256 stored bytes per row). The x tile holds the real tokens only.
    const int64_t stage_k = tile::stream::stage_k(format);
    check(ring_slots >= 0 && ring_slots <= tile::stream::kMaxSlots, "quantized_linear: ", ring_slots,
          " ring slots; the streamed path takes 1 to ", tile::stream::kMaxSlots, " (0: the default)");
    config.ring_slots = ring_slots > 0 ? ring_slots : default_ring_slots(format);
    const size_t rings = streamed_ring_bytes(format, config.ring_slots);
    const size_t x_row_bytes_per_k = size_t(tokens) * 2;
    // CTAs per SM: 4 by registers (the kernel's launch bound), fewer when the rings and an x tile of at least one
    // stage do not fit.
    const size_t min_cta_bytes = streamed_min_cta_bytes(format, tokens, config.ring_slots);
    check(min_cta_bytes <= kSharedMemoryPerCta, "quantized_linear: ", config.ring_slots, " ring slots of ",
          to_string(weight.format), " stages at ", tokens, " tokens need ", min_cta_bytes,
          " bytes of shared memory per CTA, beyond the ", kSharedMemoryPerCta, " one CTA may use");
    // With the cluster reduction, rank 0's receive area (one partial tile per split) counts too; it depends on the
    // split count, which depends on the CTAs per SM: fewer CTAs per SM until the CTA with its area fits that many.
    // (Counted after the choice before session 20; since, V4-Flash [wq_a; wkv] at T = 16 splits 8 ways within two CTAs
    // per SM and AUTO takes the cluster there: 11.4 µs cold against 12.4 on the aligned path it took, H200.)
    const int64_t max_splits = reduce == SplitKReduce::CLUSTER ? kLinearMaxClusterSplits : weight.cols / stage_k;
    size_t receive = 0;
    const int max_ctas_per_sm =
        int(std::clamp<size_t>(kSharedMemoryPerSm / (min_cta_bytes + kSharedMemoryReservedPerCta), 1, 4));
    const auto fits = [&](int ctas) {
      return ctas == 1 || size_t(ctas) * (min_cta_bytes + receive + kSharedMemoryReservedPerCta) <= kSharedMemoryPerSm;
    };
    for (config.ctas_per_sm = max_ctas_per_sm;; --config.ctas_per_sm) {
      const int64_t slots = int64_t(std::max(multiprocessors, 1)) * config.ctas_per_sm;
      const int64_t wanted = k_splits > 0 ? int64_t(k_splits) : slots / config.row_blocks;
      const int64_t splits = std::max<int64_t>(1, std::min({wanted, weight.cols / stage_k, max_splits}));
      config.split_k = round_up(ceil_div(weight.cols, splits), stage_k);
      config.k_splits = int(ceil_div(weight.cols, config.split_k));
      receive = reduce == SplitKReduce::CLUSTER && config.k_splits > 1
                    ? linear::cluster_receive_bytes(config.k_splits, tokens)
                    : 0;
      if (fits(config.ctas_per_sm)) break;
    }
    // As many CTAs per SM as fit with the final receive area: asking again for this split count (k_splits) gives this
    // config back.
    while (config.ctas_per_sm < max_ctas_per_sm && fits(config.ctas_per_sm + 1)) ++config.ctas_per_sm;
    // The x tile takes what the resident CTAs and their receive areas leave, within the budget, in whole stages.
    const size_t per_cta = kSharedMemoryPerSm / size_t(config.ctas_per_sm) - kSharedMemoryReservedPerCta;
    const size_t taken = rings + receive;
    const size_t x_budget =
        std::max(per_cta >= taken && kSharedMemoryPerCta >= taken
                     ? std::min({kStreamedXTileBudget, per_cta - taken, kSharedMemoryPerCta - taken})
                     : size_t(0),
                 x_row_bytes_per_k * size_t(tile::x_tile_row_stride(stage_k)));
    const int64_t max_chunk_k =
        std::max<int64_t>(stage_k, (int64_t(x_budget / x_row_bytes_per_k) - 32) / stage_k * stage_k);
    const int64_t chunks = ceil_div(config.split_k, max_chunk_k);
    config.chunk_k = round_up(ceil_div(config.split_k, chunks), stage_k);
    config.smem_bytes = rings + x_row_bytes_per_k * size_t(tile::x_tile_row_stride(config.chunk_k));
  } else {
    // Split K only while the row blocks alone leave resident CTA slots (SMs × CTAs per SM at this register use)
    // empty, and never into slices shorter than two steps per warp (shorter ones spend their time staging x and
    // reducing, not streaming weights). Splitting further to round up a partial last wave measured slower (H200).
    const int64_t step_k = 4 * values_per_load(format);
    config.ctas_per_sm = linear::min_ctas_per_sm(config.token_tiles);
    const int64_t slots = int64_t(std::max(multiprocessors, 1)) * config.ctas_per_sm;
    const int64_t min_split_k = round_up(2 * step_k, tile::kTileKAlignment);
    const int64_t splits =
        std::max<int64_t>(1, std::min(slots / config.row_blocks, weight.cols / min_split_k));
    config.split_k = round_up(ceil_div(weight.cols, splits), tile::kTileKAlignment);
    config.k_splits = int(ceil_div(weight.cols, config.split_k));

    // 48 KiB of x tile (no opt-in needed) lets the register-limited CTAs per SM fit.
    constexpr size_t smem_budget = 48 * 1024;
    const int64_t max_chunk_k =
        std::max<int64_t>(tile::kTileKAlignment,
                          (int64_t(smem_budget / (size_t(config.token_tiles) * tile::kTokensPerMma * 2)) - 32) /
                              tile::kTileKAlignment * tile::kTileKAlignment);
    const int64_t chunks = ceil_div(config.split_k, max_chunk_k);
    config.chunk_k = round_up(ceil_div(config.split_k, chunks), tile::kTileKAlignment);
    config.smem_bytes = tile::x_tile_bytes(config.token_tiles, config.chunk_k);
  }

  check(reduce != SplitKReduce::CLUSTER || streamed, "quantized_linear: the cluster split-K reduction runs on the ",
        "streamed load path only");
  config.reduce =
      reduce == SplitKReduce::CLUSTER && config.k_splits > 1 ? SplitKReduce::CLUSTER : SplitKReduce::WORKSPACE;
  if (config.reduce == SplitKReduce::CLUSTER) {
    // Rank 0's receive area for the other ranks' partial tiles (write_output_cluster).
    config.smem_bytes += linear::cluster_receive_bytes(config.k_splits, tokens);
    check(config.smem_bytes <= kSharedMemoryPerCta, "quantized_linear: the cluster reduction of weight [",
          weight.rows, ", ", weight.cols, "] over ", config.k_splits, " splits at ", tokens, " tokens needs ",
          config.smem_bytes, " bytes of shared memory per CTA, beyond the ", kSharedMemoryPerCta, " one CTA may use");
  }
  check(config.row_blocks <= 0x7FFFFFFF && config.k_splits <= 65535, "quantized_linear: weight [", weight.rows, ", ",
        weight.cols, "] needs a grid of ", config.row_blocks, " × ", config.k_splits,
        " CTAs, beyond the launch limits");
  if (config.k_splits > 1 && config.reduce == SplitKReduce::WORKSPACE) {
    check(ticket_bytes_of(config.row_blocks) <= kLinearTicketAreaBytes, "quantized_linear: weight [", weight.rows,
          ", ", weight.cols, "] splits K over ", config.row_blocks, " row blocks, more tickets than the workspace's ",
          "ticket area holds");
    config.ticket_bytes = kLinearTicketAreaBytes;
    config.workspace_bytes =
        config.ticket_bytes + size_t(config.k_splits) * size_t(tokens) * size_t(weight.rows) * sizeof(float);
  }
  return config;
}

size_t quantized_linear_workspace_bytes(const DeviceMatrixView& weight, int tokens, int groups) {
  // The most any call of 1..tokens tokens needs: the paths split K differently, so fewer tokens can split more.
  const int multiprocessors = current_multiprocessors();
  size_t bytes = 0;
  for (int t = 1; t <= tokens; ++t)
    bytes = std::max(bytes, choose_quantized_linear_config(weight, t, groups, multiprocessors).workspace_bytes);
  return bytes;
}

void check_quantized_linear_scales(const QuantizedMatrix& host, std::string_view what) {
  host.check_layout(what);
  if (host.format != WeightFormat::MXFP4) return;
  const int64_t blocks_per_row = host.scales_per_row();
  for (int64_t r = 0; r < host.rows; ++r)
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const uint8_t code = host.scales[r * blocks_per_row + b];
      check(code <= 128, what, ": MXFP4 scale code ", int(code), " (2^", int(code) - 127, ") at row ", r,
            ", block ", b, " is beyond the tensor-core path's range (codes <= 128, scales <= 2: the bf16 factor ",
            "2^(code - 1) would overflow)");
    }
}

namespace {

// The pointer, stride and workspace checks of check_quantized_linear_params for an already chosen config.
void check_params_for_config(const QuantizedLinearParams& params, const QuantizedLinearConfig& config) {
  const DeviceMatrixView& w = params.weight;
  const int64_t x_cols = int64_t(params.groups) * w.cols;
  check(w.data != nullptr && (w.format == WeightFormat::BF16 || w.scales != nullptr), "quantized_linear: weight [",
        w.rows, ", ", w.cols, "] has no device data or scales");
  check(w.scale_type != ScaleType::F32 || reinterpret_cast<uintptr_t>(w.scales) % 4 == 0,
        "quantized_linear: the f32 scales of weight [", w.rows, ", ", w.cols, "] must be 4-byte aligned");
  const bool norm = params.norm_x != nullptr;
  check(norm != (params.x != nullptr), "quantized_linear: exactly one of x (bf16) and norm_x (fp32, RMSNorm ",
        "prologue) must be set");
  if (norm) {
    check(params.norm_weight != nullptr, "quantized_linear: the RMSNorm prologue needs norm_weight");
    check(params.groups == 1, "quantized_linear: the RMSNorm prologue normalises whole rows; groups must be 1, not ",
          params.groups);
    check(w.cols <= kRmsNormMaxWidth, "quantized_linear: the RMSNorm prologue takes K up to ", kRmsNormMaxWidth,
          ", not ", w.cols);
    check(reinterpret_cast<uintptr_t>(params.norm_x) % 4 == 0 &&
              reinterpret_cast<uintptr_t>(params.norm_weight) % 4 == 0,
          "quantized_linear: norm_x and norm_weight must be 4-byte aligned");
  } else {
    check(params.norm_weight == nullptr, "quantized_linear: norm_weight is set without norm_x");
  }
  check((params.y == nullptr) != (params.y_bf16 == nullptr),
        "quantized_linear: exactly one of y (fp32) and y_bf16 must be set");
  check(params.trace == nullptr ||
            (config.load_path == WeightLoadPath::STREAMED &&
             (w.format == WeightFormat::FP8_BLOCK128 || w.format == WeightFormat::BF16) && config.token_tiles == 1),
        "quantized_linear: a traced launch runs FP8_BLOCK128 or BF16 weights on the streamed load path at up to ",
        tile::kTokensPerMma, " tokens only");
  const size_t y_element = params.y != nullptr ? sizeof(float) : sizeof(__nv_bfloat16);
  const void* y = params.y != nullptr ? static_cast<const void*>(params.y) : static_cast<const void*>(params.y_bf16);
  check(reinterpret_cast<uintptr_t>(params.x) % 2 == 0 && reinterpret_cast<uintptr_t>(y) % y_element == 0,
        "quantized_linear: x (bf16) must be 2-byte and y (fp32) 4-byte / y_bf16 2-byte aligned");
  check(params.x_row_stride >= x_cols, "quantized_linear: x row stride ", params.x_row_stride, " is below ", x_cols,
        " (groups × K)");
  check(params.y_row_stride >= w.rows, "quantized_linear: y row stride ", params.y_row_stride, " is below N = ",
        w.rows);
  if (config.workspace_bytes > 0) {
    check(params.workspace != nullptr && params.workspace_bytes >= config.workspace_bytes,
          "quantized_linear: weight [", w.rows, ", ", w.cols, "] at ", params.tokens, " tokens splits K ",
          config.k_splits, " ways and needs a workspace of ", config.workspace_bytes, " bytes (have ",
          params.workspace == nullptr ? size_t(0) : params.workspace_bytes, ")");
    check(reinterpret_cast<uintptr_t>(params.workspace) % 16 == 0,
          "quantized_linear: the workspace must be 16-byte aligned");
  }
  const size_t x_bytes = (size_t(params.tokens - 1) * size_t(params.x_row_stride) + size_t(x_cols)) * (norm ? 4 : 2);
  const void* x = norm ? static_cast<const void*>(params.norm_x) : static_cast<const void*>(params.x);
  const size_t y_bytes = (size_t(params.tokens - 1) * size_t(params.y_row_stride) + size_t(w.rows)) * y_element;
  check(!ranges_overlap(y, y_bytes, x, x_bytes), "quantized_linear: y must not overlap x");
  check(config.workspace_bytes == 0 || !ranges_overlap(y, y_bytes, params.workspace, config.workspace_bytes),
        "quantized_linear: y must not overlap the workspace");
}

}  // namespace

void check_quantized_linear_params(const QuantizedLinearParams& params) {
  check_params_for_config(params, choose_quantized_linear_config(params.weight, params.tokens, params.groups,
                                                                 current_multiprocessors()));
}

namespace {

// The kernel arguments of a call with its (checked) config; the workspace holds the tickets, then the partials.
linear::LinearKernelArgs kernel_args(const QuantizedLinearParams& params, const QuantizedLinearConfig& config) {
  const DeviceMatrixView& w = params.weight;
  auto* workspace = static_cast<uint8_t*>(params.workspace);
  linear::LinearKernelArgs args{
      .weight = w,
      .x = params.x,
      .x_row_stride = params.x_row_stride,
      .y = params.y,
      .y_bf16 = params.y_bf16,
      .y_row_stride = params.y_row_stride,
      .tokens = params.tokens,
      .rows_per_group = w.rows / params.groups,
      .row_blocks_per_group = config.row_blocks / params.groups,
      .k_splits = config.k_splits,
      .split_k = config.split_k,
      .chunk_k = config.chunk_k,
      .ring_slots = config.ring_slots,
      .tickets = config.workspace_bytes > 0 ? reinterpret_cast<uint32_t*>(workspace) : nullptr,
      .partials = config.workspace_bytes > 0 ? reinterpret_cast<float*>(workspace + config.ticket_bytes) : nullptr,
      .maps = {},
      .norm_x = params.norm_x,
      .norm_weight = params.norm_weight,
      .norm_eps = params.norm_eps,
      .trace = params.trace,
  };
  if (config.load_path == WeightLoadPath::STREAMED)
    args.maps = tile::stream::encode_stream_maps(w, tile_format_of(w), "quantized_linear weight");
  return args;
}

// Launches with a config already known to belong to this call (checked by the callers).
void launch_quantized_linear(const QuantizedLinearParams& params, const QuantizedLinearConfig& config) {
  check_params_for_config(params, config);
  const linear::LinearKernelArgs args = kernel_args(params, config);
  switch (tile_format_of(params.weight)) {
    case TileFormat::BF16: launch_for_format<TileFormat::BF16>(args, config, params.stream); break;
    case TileFormat::FP8_BLOCK128: launch_for_format<TileFormat::FP8_BLOCK128>(args, config, params.stream); break;
    case TileFormat::MXFP4: launch_for_format<TileFormat::MXFP4>(args, config, params.stream); break;
    case TileFormat::NVFP4: launch_for_format<TileFormat::NVFP4>(args, config, params.stream); break;
  }
}

}  // namespace

void run_quantized_linear(const QuantizedLinearParams& params) {
  launch_quantized_linear(params, choose_quantized_linear_config(params.weight, params.tokens, params.groups,
                                                                 current_multiprocessors()));
}

void run_quantized_linear(const QuantizedLinearParams& params, const QuantizedLinearConfig& config) {
  const DeviceMatrixView& w = params.weight;
  // On the STREAMED path the split count is a choice (k_splits): asking for the config's own count gives it back
  // (a count of whole-stage splits is a fixed point of the rounding).
  const bool streamed = config.load_path == WeightLoadPath::STREAMED;
  const QuantizedLinearConfig expected = choose_quantized_linear_config(
      w, params.tokens, params.groups, current_multiprocessors(), config.load_path, streamed ? config.ring_slots : 0,
      config.reduce, streamed ? config.k_splits : 0);
  check(same_tiling(expected, config), "quantized_linear: the config for weight [", w.rows,
        ", ", w.cols, "] at ", params.tokens, " tokens is not the one choose_quantized_linear_config gives for ",
        "its load path on this device");
  launch_quantized_linear(params, config);
}

}  // namespace dsv4::cuda
