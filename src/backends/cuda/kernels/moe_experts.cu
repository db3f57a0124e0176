#include "backends/cuda/kernels/moe_experts.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/moe_experts.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

// The tile format of an expert format the grouped GEMMs take (checked by moe_expert_k_granularity).
tile::TileFormat tile_format(WeightFormat format) {
  return format == WeightFormat::MXFP4          ? tile::TileFormat::MXFP4
         : format == WeightFormat::NVFP4        ? tile::TileFormat::NVFP4
         : format == WeightFormat::FP8_BLOCK128 ? tile::TileFormat::FP8_BLOCK128
                                                : tile::TileFormat::BF16;
}

int max_dynamic_smem() {
  int device = 0, bytes = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// The one-tile (T <= 8) streamed kernel of these options (the head start exists for the down GEMM only; traced
// launches, MoeExpertGemmParams::trace, with the lean decode only).
template <moe::ExpertGemm G, bool kLean, bool kSplit, bool kColumns = false, bool kTrace = false>
auto* one_tile_kernel(bool head_start) {
  if constexpr (G == moe::ExpertGemm::DOWN)
    if (head_start) return moe::moe_expert_streamed_kernel<G, false, kLean, kSplit, true, kColumns, kTrace>;
  return moe::moe_expert_streamed_kernel<G, false, kLean, kSplit, false, kColumns, kTrace>;
}
// The column stages replace every fp4 stage, so they come with the lean kernels only (the other stages are the same).
template <moe::ExpertGemm G, bool kTrace = false>
auto* one_tile_kernel(bool lean, bool split, bool head_start, bool columns) {
  if (columns)
    return split ? one_tile_kernel<G, true, true, true, kTrace>(head_start)
                 : one_tile_kernel<G, true, false, true, kTrace>(head_start);
  if constexpr (kTrace)
    return split ? one_tile_kernel<G, true, true, false, true>(head_start)
                 : one_tile_kernel<G, true, false, false, true>(head_start);
  else
    return lean ? (split ? one_tile_kernel<G, true, true>(head_start) : one_tile_kernel<G, true, false>(head_start))
                : (split ? one_tile_kernel<G, false, true>(head_start) : one_tile_kernel<G, false, false>(head_start));
}

// The x region of a streamed launch's GEMM of input size k_total: min(T, 16) rows of the whole K up to the cap, or
// for the column stages the whole K of the item's rows in one chunk, then their zero block.
int streamed_x_bytes_of(const MoeExpertGemmParams& p, int k_total) {
  const int bytes = moe::streamed_x_region_bytes(p.tokens, k_total);
  if (!moe_column_stages_apply(p, k_total)) return bytes;
  return std::max(bytes, (moe::columns::x_bytes(k_total, std::min(p.tokens, moe::columns::kMaxRows)) + 15) / 16 * 16);
}

// One streamed launch. The kernel's shared-memory limit is set once per device, to the most any launch asks (the x
// region at its cap), and its resident CTAs per SM at that limit (a lower bound for every launch) read once.
template <moe::ExpertGemm G>
void launch_streamed(const MoeExpertGemmParams& p, moe::ExpertGemmArgs args, const char* name) {
  constexpr size_t kFixedSmem = moe::kStreamedRingBytes + moe::kStreamedExchangeBytes;
  const bool columns = moe_column_stages_apply(p, args.k_total);
  args.streamed_x_bytes = streamed_x_bytes_of(p, args.k_total);
  const size_t smem = kFixedSmem + size_t(args.streamed_x_bytes);
  // Items have at most min(T, kMoeRowsPerWorkItem) rows: one token tile serves every item at T <= 8.
  const bool multi_tile = p.tokens > tile::kTokensPerMma;
  // One grid row more: the shared expert's second CTAs.
  const bool split = moe_shared_expert_splits(p, device_multiprocessors());
  const dim3 grid(unsigned((args.n_total + moe::kCtaRows<G> - 1) / moe::kCtaRows<G>),
                  unsigned(p.max_work_items + (split ? 1 : 0)));
  auto* kernel = multi_tile ? (p.lean_decode ? moe::moe_expert_streamed_kernel<G, true, true>
                                             : moe::moe_expert_streamed_kernel<G, true, false>)
                            : p.trace != nullptr ? one_tile_kernel<G, true>(true, split, p.down_head_start, columns)
                                                 : one_tile_kernel<G>(p.lean_decode, split, p.down_head_start, columns);
  static PerDeviceCache<int> resident;
  const int per_sm = resident.get(reinterpret_cast<const void*>(kernel), [&] {
    const int max_smem = int(kFixedSmem + moe::kStreamedXBytes);
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    int ctas = 0;
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, moe::kExpertThreads, max_smem));
    return ctas;
  });
  // The fused combine's summing CTAs (one per band, MoeFusedCombine) spin until their bands' other CTAs arrive: the
  // GPU must hold every band's spinning CTA and still have room for one more CTA, or the launch can hang (then trap).
  if (G == moe::ExpertGemm::DOWN && p.combine.out != nullptr) {
    const int64_t bands = (args.n_total + kMoeDownBandRows - 1) / kMoeDownBandRows;
    const int64_t slots = int64_t(device_multiprocessors()) * per_sm;
    check(bands < slots, "moe ", name, ": the fused combine's ", bands, " bands (hidden size ", args.n_total,
          ") would each keep a CTA waiting for the band's others, but this GPU holds only ", slots,
          " CTAs of the kernel at once (", device_multiprocessors(), " SMs × ", per_sm,
          "): no forward progress guaranteed; run without the fused combine (MoeRunParams::fused_small_batches off)");
  }
  launch_chained(kernel, grid, dim3(moe::kExpertThreads), smem, p.stream, args, name);
}

template <moe::ExpertGemm G>
void launch(const MoeExpertGemmParams& p) {
  check_moe_expert_gemm_params(p);
  const bool gate_up = G == moe::ExpertGemm::GATE_UP;
  const moe::ExpertGemmArgs args = moe::expert_gemm_args(p, G);
  if (p.streamed) {
    launch_streamed<G>(p, args, gate_up ? "moe_expert_streamed_kernel<gate_up>" : "moe_expert_streamed_kernel<down>");
    return;
  }
  const char* name = gate_up ? "moe_expert_gemm_kernel<gate_up>" : "moe_expert_gemm_kernel<down>";
  const dim3 grid(unsigned((args.n_total + moe::kCtaRows<G> - 1) / moe::kCtaRows<G>), unsigned(p.max_work_items));
  const size_t smem = moe::kExpertGemmSmemBytes<G>;
  static PerDeviceCache<bool> configured;
  configured.get(reinterpret_cast<const void*>(moe::moe_expert_gemm_kernel<G>), [&] {
    check(smem <= size_t(max_dynamic_smem()), "moe ", name, ": K = ", args.k_total, " needs ", smem,
          " bytes of shared memory per CTA, beyond this device's limit");
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(moe::moe_expert_gemm_kernel<G>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  });
  launch_chained(moe::moe_expert_gemm_kernel<G>, grid, dim3(moe::kExpertThreads), smem, p.stream, args, name);
}

}  // namespace

namespace moe {

ExpertGemmArgs expert_gemm_args(const MoeExpertGemmParams& p, ExpertGemm gemm) {
  const bool gate_up = gemm == ExpertGemm::GATE_UP;
  return ExpertGemmArgs{
      .experts = p.experts,
      .shared_expert = p.experts_count,
      .routed_format = p.routed_format,
      .shared_format = p.shared_format,
      .k_total = gate_up ? p.hidden : p.intermediate,
      .n_total = gate_up ? p.intermediate : p.hidden,
      .swiglu_limit = p.swiglu_limit,
      .x = gate_up ? p.u_bf16 : p.h,
      .row_tokens = p.row_tokens,
      .work_items = p.work_items,
      .work_item_count = p.work_item_count,
      .h = p.h,
      .down = p.down,
      .stream_maps = p.stream_maps,
      .combine = gate_up ? MoeFusedCombine{} : p.combine,
      .streamed_x_bytes = 0,
      .item_counters = moe_down_waits_per_item_apply(p) ? p.item_counters : nullptr,
      .trace = p.trace,
  };
}

int streamed_x_region_bytes(int tokens, int k_total) {
  // x for the most rows of a pass, min(T, 16), over the whole K, capped at kStreamedXBytes.
  const int x_rows = std::min(tokens, kStreamedPassRows);
  return (std::min(streamed_x_bytes(x_rows, k_total), int(kStreamedXBytes)) + 15) / 16 * 16;
}

}  // namespace moe

int64_t moe_expert_k_granularity(WeightFormat format) {
  switch (format) {
    case WeightFormat::BF16: return tile::TileFormatTraits<tile::TileFormat::BF16>::kValuesPerLoad;
    case WeightFormat::FP8_BLOCK128: return tile::TileFormatTraits<tile::TileFormat::FP8_BLOCK128>::kValuesPerLoad;
    case WeightFormat::MXFP4: return tile::TileFormatTraits<tile::TileFormat::MXFP4>::kValuesPerLoad;
    case WeightFormat::NVFP4: return tile::TileFormatTraits<tile::TileFormat::NVFP4>::kValuesPerLoad;
    default: fail("moe expert GEMM: expert format ", to_string(format), " is not supported (MXFP4, NVFP4, ",
                  "FP8_BLOCK128, BF16)");
  }
}

bool moe_streamed_tiles_apply(const std::vector<MoeExpertView>& experts) {
  // K must also fill the ring (at least kStreamedSlots stages): the ring's first copies, issued before the item is
  // known, then cover whole passes.
  auto fits = [](const DeviceMatrixView& w, tile::TileFormat f) {
    return tile::stream::streamed_tile_applies(w, f) && w.cols >= moe::kStreamedSlots * tile::stream::stage_k(f);
  };
  auto applies = [&](const DeviceMatrixView& w) {
    switch (w.format) {
      case WeightFormat::MXFP4: return fits(w, tile::TileFormat::MXFP4);
      case WeightFormat::NVFP4: return fits(w, tile::TileFormat::NVFP4);
      case WeightFormat::FP8_BLOCK128: return fits(w, tile::TileFormat::FP8_BLOCK128);
      case WeightFormat::BF16: return fits(w, tile::TileFormat::BF16);
      default: return false;
    }
  };
  // The CTA bands must be whole warp tiles too: I and d multiples of 16 rows (implied by the K multiples above for
  // the matrix pairs, checked anyway).
  return std::all_of(experts.begin(), experts.end(), [&](const MoeExpertView& e) {
    return applies(e.w1) && applies(e.w3) && applies(e.w2) && e.w1.rows % tile::kTileRows == 0 &&
           e.w2.rows % tile::kTileRows == 0;
  });
}

DeviceBuffer encode_moe_stream_maps(const std::vector<MoeExpertView>& experts, std::string_view what) {
  std::vector<tile::stream::StreamMaps> maps;
  maps.reserve(3 * experts.size());
  const std::string name(what);
  for (const MoeExpertView& e : experts)
    for (const DeviceMatrixView* w : {&e.w1, &e.w3, &e.w2})
      maps.push_back(tile::stream::encode_stream_maps(*w, tile_format(w->format), name + " expert matrix"));
  DeviceBuffer buffer(maps.size() * sizeof(tile::stream::StreamMaps), name + " expert tensor maps");
  buffer.upload(maps.data(), buffer.bytes());
  return buffer;
}

bool moe_column_stages_apply(const MoeExpertGemmParams& p, int64_t k_total) {
  if (!p.column_stages || !p.streamed || p.tokens > moe::columns::kMaxRows) return false;
  return moe::columns::x_bytes(int(k_total), p.tokens) + 15 <= int(moe::kStreamedXBytes);
}

bool moe_shared_expert_splits(const MoeExpertGemmParams& p, int multiprocessors) {
  if (p.shared_expert_split == MoeSharedExpertSplit::NEVER || !p.streamed || p.tokens > tile::kTokensPerMma)
    return false;
  const tile::TileFormat shared = tile_format(p.shared_format), routed = tile_format(p.routed_format);
  const int64_t stage = tile::stream::stage_k(shared), min_stages = 2 * moe::kStreamedSlots;
  if (stage >= tile::stream::stage_k(routed) || p.hidden / stage < min_stages || p.intermediate / stage < min_stages)
    return false;
  if (p.shared_expert_split == MoeSharedExpertSplit::ALWAYS) return true;
  // At T <= 8 an expert's rows fit one item, so max_work_items - 1 bounds the working items (the bound's item for
  // rows past kMoeRowsPerWorkItem cannot occur) and the split adds one CTA per band: bands × max_work_items.
  const int64_t gate_up_bands = (p.intermediate + moe::kCtaRows<moe::ExpertGemm::GATE_UP> - 1) /
                                moe::kCtaRows<moe::ExpertGemm::GATE_UP>;
  const int64_t down_bands = (p.hidden + kMoeDownBandRows - 1) / kMoeDownBandRows;
  return std::max(gate_up_bands, down_bands) * p.max_work_items <= 2 * int64_t(multiprocessors);
}

void check_moe_expert_gemm_params(const MoeExpertGemmParams& p) {
  check(p.experts_count >= 1, "moe expert GEMM: ", p.experts_count, " experts");
  for (const WeightFormat f : {p.routed_format, p.shared_format}) {
    const int64_t granule = moe_expert_k_granularity(f);
    check(p.hidden > 0 && p.hidden % granule == 0 && p.intermediate > 0 && p.intermediate % granule == 0,
          "moe expert GEMM: hidden (", p.hidden, ") and intermediate (", p.intermediate, ") sizes must be positive ",
          "multiples of ", granule, " for ", to_string(f), " experts");
  }
  check(p.max_work_items >= 1 && p.max_work_items <= 65534, "moe expert GEMM: ", p.max_work_items,
        " work items exceed one launch's grid (fewer tokens per call)");
  check(!p.streamed || p.stream_maps != nullptr, "moe expert GEMM: the streamed kernels need the experts' tensor ",
        "maps (a layer whose matrices moe_streamed_tiles_apply accepts)");
  check(!p.streamed || p.tokens >= 1, "moe expert GEMM: the streamed kernels need the token count (got ", p.tokens,
        ")");
  check(!p.lean_decode || p.streamed, "moe expert GEMM: the lean decode is a streamed-kernel option");
  check(!p.down_head_start || p.streamed, "moe expert GEMM: the down head start is a streamed-kernel option");
  check(!p.column_stages || p.streamed, "moe expert GEMM: the column stages are a ",
        "streamed-kernel option");
  check(p.trace == nullptr || (p.streamed && p.lean_decode && p.tokens <= tile::kTokensPerMma), "moe expert GEMM: ",
        "traced launches are the streamed one-tile kernels with the lean decode (T <= 8)");
  const MoeFusedCombine& f = p.combine;
  if (f.out != nullptr) {
    check(!p.streamed || f.tokens * f.top_k <= moe::kExpertThreads, "moe expert GEMM: the streamed kernels' fused ",
          "combine reads one slot per thread: ", f.tokens, " tokens × top ", f.top_k, " exceed ",
          moe::kExpertThreads);
    const int bands = (p.hidden + kMoeDownBandRows - 1) / kMoeDownBandRows;
    check(f.tokens >= 1 && f.tokens <= kMoeFusedCombineMaxTokens && f.top_k >= 1, "moe expert GEMM: the fused ",
          "combine takes 1 to ", kMoeFusedCombineMaxTokens, " tokens and top_k >= 1 (got ", f.tokens, ", ", f.top_k,
          ")");
    check(f.expert_weights && f.slot_rows && f.band_tickets, "moe expert GEMM: the fused combine needs the expert ",
          "weights, the slot rows and the band tickets");
    check(bands <= f.band_ticket_capacity, "moe expert GEMM: hidden size ", p.hidden, " needs ", bands, " band ",
          "tickets for the fused combine; the workspace holds ", f.band_ticket_capacity);
  }
  check(p.experts && p.u_bf16 && p.row_tokens && p.work_items && p.work_item_count && p.h && p.down,
        "moe expert GEMM: a null device pointer among experts, u_bf16, row_tokens, work items, h, down");
  check(reinterpret_cast<uintptr_t>(p.u_bf16) % 16 == 0 && reinterpret_cast<uintptr_t>(p.h) % 16 == 0,
        "moe expert GEMM: u_bf16 and h must be 16-byte aligned");
}

void run_moe_gate_up(const MoeExpertGemmParams& p) { launch<moe::ExpertGemm::GATE_UP>(p); }

void run_moe_down(const MoeExpertGemmParams& p) { launch<moe::ExpertGemm::DOWN>(p); }

bool moe_down_waits_per_item_apply(const MoeExpertGemmParams& p) {
  return p.down_waits_per_item && p.item_counters != nullptr && p.streamed && p.down_head_start &&
         p.tokens <= tile::kTokensPerMma && p.max_work_items <= kMoeCountedItemsMax;
}

}  // namespace dsv4::cuda
