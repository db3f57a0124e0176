// Sparse MQA attention decode on the GPU: run_sparse_attention over the fp8 KV cache (584-byte entries, D 512) for
// V4-Flash (H 64) and V4-Pro (H 128) shapes, batch 1/8/64/256 × context 4K/64K/1M, in the SWA layout (the 128 window
// entries only; context 4K), the CSA layout (128 window + 512 top-k entries per query) and the HCA layout (128 window +
// context/128 entries). Each query belongs to its own sequence with its own pages; the KV entries are random (a hash of
// their bytes' positions), so a kernel reading a wrong entry gives a wrong result. Reported per case: µs per call (L2
// flushed before every call) with the splits merged by the combine kernel and by the cluster merge (each with the
// splits choose_sparse_attention_splits picks for it), KV bytes read / time against the same-run device copy bandwidth,
// a check of both outputs against cpu::sparse_attention on a sample of queries (worst error over the query-and-head's
// largest |output|; FAIL above 2^-6), a straightforward baseline measured in the same run (one CTA per (query, head),
// plain loads, scalar dot products) with its speed-up, and the previous mma.sync kernel on a copy of the cache (uniform
// entries; its time only; caches up to 4 GiB). Cases whose cache exceeds 24 GiB are skipped. Each case also states its
// floor: the larger of the KV bytes at the same-run copy bandwidth and its flops (4·H·D per slot: QKᵀ and PV) at the
// same-run cuBLAS bf16 rate; for H = 128 (and, at D = 512, about H = 64 too) the flops set it, not the bytes. HCA cases
// below 1M context are timed a second time the way the engine's batched decode calls them: a shared bound of 1M / 128
// compressed slots, each query's own count in compressed_counts, live rows past the count.
// Prefill: a chunk of 4096 queries at the end of an 8K or 64K context of one sequence (CSA: 128 window + 512 top-k
// slots each, fp8 and bf16 entries), reported as TFLOP/s (4·H·D flops per valid slot: QKᵀ and PV) against the
// same-run cuBLAS bf16 GEMM rate (4096³) and the nominal dense bf16 peak (4096 flops per SM per clock).
// Decode (cluster call) and prefill are also timed with q in bf16 (bf16q: the kernel rounds q to bf16 anyway; half
// the q bytes and no conversion), and the decode cluster call once more with its partials exchanged as bf16
// (cl16p: cluster_merge_bf16_partials, half the merge's distributed shared-memory bytes). Where the head-split path
// (SparseAttentionParams::head_split: 16-head groups, small batch) serves a case, a second line gives its time with
// bf16 q (against the bf16q cluster call), its CPU check, its time at each tile count per CTA, and the time of an
// empty kernel on the same grid in its clusters, without clusters and as one CTA per (query, head group) (a call's
// launch floor in each shape). The decode cases' set-up is make_decode_step (tests/support/sparse_attention_cases.hpp).
// Usage: bench_cuda_attention [--json PATH] [--only MODEL:LAYOUT:BATCH:CONTEXT[,...]] [--prefill-only] [--warm]
//                             [--sweep] [--bf16-kv] [--route] [--mma-rates] [--trace] [--flush read|memset]
//                             [--out f32|bf16]
//   --only runs the decode cases whose name starts with one of the given comma-separated prefixes (flash, pro:hca,
//   flash:swa:1,pro:csa:1:65536; flash:csa:256:65536 for one case under a profiler; a prefix that selects no case
//   fails the run) and no prefill; --prefill-only
//   skips the decode cases. --warm times without the L2 flush (what is left is not memory latency). --sweep times every
//   decode case at every split count (cluster merge and combine kernel). --bf16-kv runs the decode cases on bf16
//   entries (1024 bytes, the engine's KV format outside reference numerics) instead of fp8. --route times each decode
//   case on the decode kernels and on the prefill kernel (run_sparse_attention_prefill), both checked against the CPU,
//   and says whether run_sparse_attention's defaults route it there (no prefill part; HCA also at 256K context, and
//   batch 128). --mma-rates times the head_dim 512 kernel's tensor-core work per tile
//   alone (mma_rate_kernel) against a tile's flops at the same-run cuBLAS rate and at the nominal peak, nothing else.
//   --trace times one cold traced call of each selected decode case on the head_dim 512 kernel (bf16 entries),
//   prints its CTAs' phases per wave with the floors of its tile pace and tail (run_trace_case; no prefill) and checks
//   its output against the CPU. Its times are diagnostics (phases inside one call), not results held to the
//   floor / baseline rule: the untraced cases are.
//   --flush read|memset: how L2 is flushed before each timed decode call (read, the default: a read sweep of a 256 MB
//   buffer, which leaves L2 full of clean lines, as the model's weight-reading kernels do; memset: a memset of it, the
//   sessions' flush up to 23, which leaves dirty lines that the timed call's misses write back, slowing it; numbers in
//   bench/NOTES.md). The prefill cases and the cuBLAS rate keep the memset; the JSON records the decode calls' flush
//   as decode_flush (none under --warm). --out f32|bf16: the output type of --trace's calls (f32 by default; the
//   model's decode writes bf16, level with f32 at b64). --mma-rates and --prefill-only take no --only.
//   Exit status 1 when a CPU check fails.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/attention.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kernels/sparse_attention_prefill.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "backends/cuda/stream_timing.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"

#include "cuda_bench_support.hpp"
#include "support/l2_flushed_timing.hpp"
#include "support/prefill_chunk.hpp"
#include "support/sparse_attention_cases.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kHeadDim = kDecodeHeadDim, kRopeDim = kDecodeRopeDim, kWindow = kDecodeWindow, kTopK = kDecodeTopK,
              kPageRows = kDecodePageRows;
constexpr int kBaselineThreads = 128;  // 4 dims per thread

// Baseline: one CTA per (query, head); every entry is read and decoded by every head's CTA, scores by a block
// reduction, online softmax in fp32, then the sink and the inverse RoPE.
__global__ void __launch_bounds__(kBaselineThreads) baseline_attention(const __grid_constant__ SparseAttentionParams p) {
  __shared__ float partial[kBaselineThreads / 32];
  const int64_t t = blockIdx.x / p.heads;
  const int h = int(blockIdx.x % p.heads);
  const KvCacheView& cache = p.cache;
  const KvEntryLayout& layout = cache.layout;
  const int d0 = threadIdx.x * 4;
  const float* q = static_cast<const float*>(p.q) + (t * p.heads + h) * kHeadDim + d0;
  float o[4] = {0, 0, 0, 0}, m = -INFINITY, l = 0;
  const int slots = p.window_slots + p.compressed_slots;
  for (int s = 0; s < slots; ++s) {
    const bool window = s < p.window_slots;
    const int32_t row = window ? p.window_index[t * p.window_slots + s]
                               : p.compressed_index[t * p.compressed_slots + s - p.window_slots];
    if (row < 0) continue;
    const int32_t* pages = cache.pages_of(p.sequence_slots[t], p.layer, window ? KvArray::Window : KvArray::Compressed);
    const uint8_t* entry = cache.entry_address(cache.physical_entry(pages, row));
    float v[4];
    for (int i = 0; i < 4; ++i) {
      const int d = d0 + i;
      v[i] = layout.format == KvEntryFormat::Bf16 ? bf16_to_float(reinterpret_cast<const uint16_t*>(entry)[d])
             : d < layout.nope_dim
                 ? e4m3_to_float(entry[d]) * e8m0_to_float(entry[layout.scale_offset + d / kKvFp8BlockSize])
                 : bf16_to_float(reinterpret_cast<const uint16_t*>(entry + layout.rope_offset)[d - layout.nope_dim]);
    }
    float dot = q[0] * v[0] + q[1] * v[1] + q[2] * v[2] + q[3] * v[3];
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, offset);
    __syncthreads();
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
    __syncthreads();
    const float score = (partial[0] + partial[1] + partial[2] + partial[3]) * p.softmax_scale;
    const float new_m = fmaxf(m, score), alpha = expf(m - new_m), w = expf(score - new_m);
    l = l * alpha + w;
    for (int i = 0; i < 4; ++i) o[i] = o[i] * alpha + w * v[i];
    m = new_m;
  }
  const float den = l + (p.attn_sink != nullptr && m != -INFINITY ? expf(p.attn_sink[h] - m) : 0.0f);
  const float inv = l > 0 ? 1.0f / den : 0.0f;
  for (int i = 0; i < 4; i += 2) {
    float x0 = o[i] * inv, x1 = o[i + 1] * inv;
    const int d = d0 + i;
    if (d >= layout.nope_dim) {
      const float angle = float(p.positions[t]) * p.rope_frequencies[(d - layout.nope_dim) / 2];
      float sn, cs;
      sincosf(angle, &sn, &cs);
      const float a = x0, b = x1;
      x0 = a * cs + b * sn;
      x1 = -a * sn + b * cs;
    }
    static_cast<float*>(p.out)[(t * p.heads + h) * kHeadDim + d] = x0;
    static_cast<float*>(p.out)[(t * p.heads + h) * kHeadDim + d + 1] = x1;
  }
}

// Nothing: timed with the head-split call's grid, block and cluster shape, the floor of a call's launch and completion.
__global__ void empty_kernel(int) {}

// --mma-rates: the tensor-core work of one 32-entry tile of the head_dim 512 kernel's consumers, alone: a CTA per SM,
// two warpgroups (the consumers, dims [256c, 256c + 256) each) issuing from shared memory laid out as the kernel's Q
// (64 heads × 512 dims, 128B-swizzled 64-dim blocks) and KV stages, each group waited for before the next as the
// kernel's dependences make it: MmaRate::Tile = QKᵀ (16 × m64n32k16, both operands in shared memory) then PV
// (2 × m64n256k16, P from registers); QkOnly / PvOnly either alone; Qk64 = the QKᵀ of 64 entries as 16 ×
// m64n64k16 (reported per 32 entries). Zeros throughout (the rate does not depend on the values).
enum class MmaRate { Tile, QkOnly, PvOnly, Qk64 };
constexpr int kD512TileHeads = 64;  // the heads of one CTA's wgmma M
constexpr int kMmaRateThreads = 256, kMmaRateQBytes = 64 * 1024, kMmaRateKvBytes = 64 * 1024;
constexpr int kMmaRateSmemBytes = kMmaRateQBytes + kMmaRateKvBytes + 1024;

template <MmaRate kMode>
__global__ void __launch_bounds__(kMmaRateThreads, 1) mma_rate_kernel(int tiles, float* sink) {
  extern __shared__ uint8_t mma_smem_raw[];
  uint8_t* smem = mma_smem_raw + (1024 - sm90::shared_address(mma_smem_raw) % 1024) % 1024;
  for (int i = threadIdx.x; i < (kMmaRateQBytes + kMmaRateKvBytes) / 16; i += kMmaRateThreads)
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
  sm90::fence_proxy_async_shared();
  __syncthreads();
  const int consumer = threadIdx.x / 128;
  constexpr int kQBlock = 64 * 128, kKvBlock32 = 32 * 128, kKvBlock64 = 64 * 128;  // one 64-dim block's bytes
  const uint64_t q = sm90::make_sw128_k_major_descriptor(smem + consumer * 4 * kQBlock);
  uint8_t* kv = smem + kMmaRateQBytes;
  const uint64_t k32 = sm90::make_sw128_k_major_descriptor(kv + consumer * 4 * kKvBlock32);
  const uint64_t k64 = sm90::make_sw128_k_major_descriptor(kv + consumer * 4 * kKvBlock64);
  float o[128], s32[16], s64[32];
  for (float& x : o) x = 0.0f;
  for (float& x : s32) x = 0.0f;
  for (float& x : s64) x = 0.0f;
  const uint32_t p[4] = {0, 0, 0, 0};
  for (int t = 0; t < tiles; ++t) {
    if constexpr (kMode == MmaRate::Tile || kMode == MmaRate::QkOnly || kMode == MmaRate::Qk64) {
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 16; ++kk) {
        const uint64_t a = sm90::advance_descriptor(q, (kk / 4) * kQBlock + (kk % 4) * 32);
        if constexpr (kMode == MmaRate::Qk64)
          sm90::wgmma_m64n64k16_bf16_ss(s64, a, sm90::advance_descriptor(k64, (kk / 4) * kKvBlock64 + (kk % 4) * 32),
                                        kk > 0);
        else
          sm90::wgmma_m64n32k16_bf16_ss(s32, a, sm90::advance_descriptor(k32, (kk / 4) * kKvBlock32 + (kk % 4) * 32),
                                        kk > 0);
      }
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(s32);
      sm90::fence_operand(s64);
    }
    if constexpr (kMode == MmaRate::Tile || kMode == MmaRate::PvOnly) {
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
        sm90::wgmma_m64n256k16_bf16_rs_n_major_b(
            o, p, sm90::make_sw128_n_major_descriptor(kv + consumer * 4 * kKvBlock32 + ks * 16 * 128, kKvBlock32), 1);
      sm90::wgmma_commit_group();
      sm90::wgmma_wait_group<0>();
      sm90::fence_operand(o);
    }
  }
  if (threadIdx.x == 0) sink[blockIdx.x] = o[0] + s32[0] + s64[0];
}

// µs per tile (per 32 entries for Qk64) of mma_rate_kernel<kMode> on every SM, the median of 5 launches.
template <MmaRate kMode>
double mma_rate_us(int sms, float* sink) {
  constexpr int kTiles = 2000;
  const auto kernel = mma_rate_kernel<kMode>;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaRateSmemBytes));
  const double ms = median_ms(5, nullptr, 0, [&] {
    kernel<<<sms, kMmaRateThreads, kMmaRateSmemBytes>>>(kTiles, sink);
    DSV4_CUDA_CHECK(cudaGetLastError());
  });
  return 1e3 * ms / kTiles / (kMode == MmaRate::Qk64 ? 2 : 1);
}
constexpr int kLaunchFloorShapes = 3;  // the head-split grid in clusters, without clusters, a CTA per head group

// Entry `row` of `array` of sequence `slot` (layer 0) as floats, read back from the device through a host copy of
// the page table.
std::vector<float> read_entry(const KvCacheView& view, const std::vector<int32_t>& host_page_table, int slot,
                              KvArray array, int32_t row) {
  KvCacheView host_view = view;
  host_view.page_table = host_page_table.data();
  const int64_t physical = host_view.physical_entry(host_view.pages_of(slot, 0, array), row);
  const KvEntryLayout& layout = view.layout;
  std::vector<uint8_t> bytes(size_t(layout.entry_bytes));
  DSV4_CUDA_CHECK(cudaMemcpy(bytes.data(), view.entry_address(physical), bytes.size(), cudaMemcpyDeviceToHost));
  std::vector<float> values(size_t(layout.head_dim));
  const auto bf16_at = [&](int offset) {
    uint16_t bits;
    std::memcpy(&bits, &bytes[size_t(offset)], 2);
    return bf16_to_float(bits);
  };
  for (int d = 0; d < layout.head_dim; ++d) {
    if (layout.format == KvEntryFormat::Bf16)
      values[size_t(d)] = bf16_at(2 * d);
    else if (d < layout.nope_dim)
      values[size_t(d)] =
          e4m3_to_float(bytes[size_t(d)]) * e8m0_to_float(bytes[size_t(layout.scale_offset + d / kKvFp8BlockSize)]);
    else
      values[size_t(d)] = bf16_at(layout.rope_offset + 2 * (d - layout.nope_dim));
  }
  return values;
}

// Worst error of the device output `out` [T, H, D] (p.out_dtype) against cpu::sparse_attention on the queries
// `sample`, each (query, head) over its largest |expected| (the kernel rounds q, P to bf16: errors ≈ 2^-8 of that;
// a bf16 output adds its rounding, 2^-9). The call's index lists are host copies; compressed counts are not used by
// the decode cases.
double cpu_check(const SparseAttentionParams& p, const std::vector<int32_t>& window_index,
                 const std::vector<int32_t>& compressed_index, const std::vector<float>& q,
                 const std::vector<float>& sink, const std::vector<int64_t>& positions, const DeviceBuffer& out,
                 const std::vector<int64_t>& sample) {
  const KvCacheView& view = p.cache;
  // One sequence slot per query.
  std::vector<int32_t> table(size_t(p.tokens) * view.layers * 2 * view.max_pages_per_array);
  DSV4_CUDA_CHECK(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost));
  const int H = p.heads, D = kHeadDim, W = p.window_slots, C = p.compressed_slots;
  std::vector<float> got(size_t(H) * D), want(size_t(H) * D);
  double worst = 0;
  for (const int64_t t : sample) {
    // The query's entries gathered into small arrays, slot s at row s (−1 slots stay −1).
    std::vector<float> window_kv(size_t(std::max(W, 1)) * D), compressed_kv(size_t(std::max(C, 1)) * D);
    std::vector<int32_t> window_rows(static_cast<size_t>(W)), compressed_rows(static_cast<size_t>(C));
    const int slot = int(t);
    for (int w = 0; w < W; ++w) {
      const int32_t row = window_index[size_t(t * W + w)];
      window_rows[size_t(w)] = row < 0 ? -1 : w;
      if (row >= 0)
        std::copy_n(read_entry(view, table, slot, KvArray::Window, row).begin(), D, &window_kv[size_t(w) * D]);
    }
    for (int c = 0; c < C; ++c) {
      const int32_t row = compressed_index[size_t(t * C + c)];
      compressed_rows[size_t(c)] = row < 0 ? -1 : c;
      if (row >= 0)
        std::copy_n(read_entry(view, table, slot, KvArray::Compressed, row).begin(), D, &compressed_kv[size_t(c) * D]);
    }
    std::vector<float> query(&q[size_t(t) * H * D], &q[size_t(t + 1) * H * D]);
    for (float& v : query) v = round_to_bf16(v);  // the kernel's MMA input
    cpu::SparseAttentionInputs inputs;
    inputs.q = query.data();
    inputs.attn_sink = sink.data();
    inputs.window_kv = window_kv.data();
    inputs.window_rows = std::max(W, 1);
    inputs.window_index = W > 0 ? window_rows.data() : nullptr;
    inputs.compressed_kv = compressed_kv.data();
    inputs.compressed_rows = std::max(C, 1);
    inputs.compressed_index = C > 0 ? compressed_rows.data() : nullptr;
    inputs.positions = &positions[size_t(t)];
    inputs.rope = &decode_rope_table();
    cpu::sparse_attention(inputs, {1, H, D, p.softmax_scale, W, C}, want.data());
    if (p.out_dtype == AttentionDtype::Bf16) {
      std::vector<uint16_t> bits(got.size());
      DSV4_CUDA_CHECK(cudaMemcpy(bits.data(), static_cast<const uint16_t*>(out.data()) + size_t(t) * H * D,
                                 bits.size() * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < bits.size(); ++i) got[i] = bf16_to_float(bits[i]);
    } else {
      DSV4_CUDA_CHECK(cudaMemcpy(got.data(), static_cast<const float*>(out.data()) + size_t(t) * H * D,
                                 got.size() * 4, cudaMemcpyDeviceToHost));
    }
    for (int h = 0; h < H; ++h) {
      double largest = 1e-6, error = 0;
      for (int d = 0; d < D; ++d) {
        largest = std::max(largest, double(std::fabs(want[size_t(h) * D + d])));
        const double e = std::fabs(double(got[size_t(h) * D + d]) - want[size_t(h) * D + d]);
        error = std::isfinite(e) ? std::max(error, e) : 1e30;
      }
      worst = std::max(worst, error / largest);
    }
  }
  return worst;
}

constexpr double kCpuCheckLimit = 1.0 / 64;

struct Result {
  std::string model, layout;
  int heads, batch, splits;
  int64_t context, slots;
  double us, kv_bytes, gbps, percent_of_copy, baseline_us, max_abs_diff;
  int cluster_splits;      // the splits chosen for the cluster merge
  double cluster_us;       // the call with cluster_merge (same as `us` where the merge does not apply)
  double bf16_q_us;        // the cluster call with q in bf16
  double bf16_partials_us;  // the cluster call exchanging bf16 partials (cluster_merge_bf16_partials)
  double bf16_partials_cpu_error;
  double cpu_error, cluster_cpu_error, bf16_q_cpu_error;  // cpu_check of each mode's output
  double total_bytes, percent_total;  // KV + q read + output written (+ split partials written and read)
  double mma_sync_us;  // the mma.sync kernel (taken for 1-entry pages) on the same data; 0 = not measured
  double floor_us, percent_of_floor;  // max(KV bytes / copy rate, flops / cuBLAS bf16 rate) and floor / measured
  double bounded_us;   // HCA below 1M: the same queries under the 1M / 128 slot bound with per-query counts; 0 = n/a
  // The head-split path (bf16 q, as the bf16q cluster call) where it serves the case: its splits (0 = not served),
  // µs and CPU check at the launcher's tile choice, and µs at each tile count per CTA (0 = not served).
  int head_split_splits = 0;
  double head_split_us = 0, head_split_cpu_error = 0;
  double head_split_tiles_us[kSparseAttentionHeadSplitMaxTiles + 1] = {};
  // empty_kernel on the head-split call's grid (its launcher's choice) in its clusters, without clusters, and one CTA
  // per (query, head group) (a call's launch floor in each shape).
  double launch_floor_us[kLaunchFloorShapes] = {};
  // The same in a CUDA graph of chained calls (µs per call): the head-split path at each tile count per CTA (0 = not
  // served) and the empty kernel in each shape.
  double head_split_graph_us[kSparseAttentionHeadSplitMaxTiles + 1] = {};
  double launch_floor_graph_us[kLaunchFloorShapes] = {};
};

// The same call on a copy of the cache with 1-entry pages, which run_sparse_attention serves with its mma.sync
// kernel (the wgmma kernel's 16-aligned entry spans need pages of ≥ 2 entries): the previous kernel, same run.
// Its entries hold uniform bytes (only its time is compared); logical rows and indices are unchanged.
double mma_sync_kernel_ms(const SparseAttentionParams& p, const KvCacheConfig& config, const L2Flush& flush) {
  KvCacheConfig one = config;
  one.page_rows = 1;
  one.pages = config.pages * config.page_rows;
  KvCache cache(one);
  for (int b = 0; b < config.max_sequences; ++b) {
    cache.add_sequence();
    cache.ensure_rows(b, 0, KvArray::Window, config.window_capacity);
    cache.ensure_rows(b, 0, KvArray::Compressed, config.max_compressed_rows);
  }
  cache.upload_page_table(nullptr);
  DSV4_CUDA_CHECK(cudaMemset(cache.view().pool, 0x30, size_t(one.pages) * cache.layout().entry_bytes));
  DeviceBuffer out(size_t(p.tokens) * p.heads * kHeadDim * 4, "mma.sync out");  // keeps the caller's output
  SparseAttentionParams q = p;
  q.cache = cache.view();
  q.out = out.data();
  const double ms = median_ms(10, flush, [&] { run_sparse_attention(q); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  return ms;
}

// q as bf16 on the device (the bf16q timings: the same values the kernel rounds fp32 q to).
DeviceBuffer bf16_q_to_device(const std::vector<float>& q) {
  std::vector<uint16_t> bits(q.size());
  for (size_t i = 0; i < q.size(); ++i) bits[i] = float_to_bf16(q[i]);
  return to_device(bits, "q bf16");
}

Result run_case(const char* model, int heads, DecodeLayout kind, KvEntryFormat format, int batch, int64_t context,
                double copy_gbps, double cublas_tflops, int sms, const L2Flush& flush, bool sweep,
                std::mt19937& rng) {
  const std::unique_ptr<SparseAttentionDecodeStep> step = make_decode_step(format, heads, kind, batch, context, rng);
  const KvCache& cache = *step->cache;
  const KvCacheView view = cache.view();
  const int compressed_slots = step->compressed_slots;
  const std::vector<int32_t>&window_index = step->window_index, &compressed_index = step->compressed_index;
  const std::vector<int64_t>& positions = step->positions;
  const std::vector<float>&q = step->q, &sink = step->sink;
  const size_t out_bytes = size_t(batch) * heads * kHeadDim * 4;
  DeviceBuffer out(out_bytes, "out"), baseline_out(out_bytes, "baseline out");
  const int64_t total_slots = kWindow + compressed_slots;
  const int splits =
      choose_sparse_attention_splits(batch, heads, kHeadDim, format, total_slots, sms, false);
  const int cluster_splits =
      choose_sparse_attention_splits(batch, heads, kHeadDim, format, total_slots, sms, true);
  // The workspace covers the combine kernel at any split count (--sweep times every count with both merges).
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(batch, heads, kHeadDim,
                                                                                 kSparseAttentionMaxSplits)),
                         "workspace");
  // The combine-kernel call with fp32 q; the variants below change one thing each.
  SparseAttentionParams p = step->call;
  p.q = step->d_q.data();
  p.q_dtype = AttentionDtype::F32;
  p.out = out.data();
  p.splits = splits;
  p.cluster_merge = false;
  p.head_split = false;
  p.prefill_kernel = false;
  p.workspace = workspace.data();
  p.workspace_bytes = workspace.bytes();
  // A sample of queries for the CPU check: the first, a middle and the last.
  std::vector<int64_t> sample{0, batch / 2, batch - 1};
  sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
  SparseAttentionParams cluster = p;
  cluster.cluster_merge = true;
  cluster.splits = cluster_splits;
  const double cluster_ms = median_ms(20, flush, [&] { run_sparse_attention(cluster); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  const double cluster_cpu_error = cpu_check(cluster, window_index, compressed_index, q, sink, positions, out, sample);
  // The same call with q in bf16 (cpu_check rounds q to bf16 as the kernel does, so the expected output is the same).
  SparseAttentionParams bf16_partials = cluster;
  bf16_partials.cluster_merge_bf16_partials = true;
  out.fill_bytes(0xFF);
  const double bf16_partials_ms = median_ms(20, flush, [&] { run_sparse_attention(bf16_partials); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  const double bf16_partials_cpu_error =
      cpu_check(bf16_partials, window_index, compressed_index, q, sink, positions, out, sample);
  SparseAttentionParams bf16_q = cluster;
  bf16_q.q = step->d_q_bf16.data();
  bf16_q.q_dtype = AttentionDtype::Bf16;
  out.fill_bytes(0xFF);
  const double bf16_q_ms = median_ms(20, flush, [&] { run_sparse_attention(bf16_q); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  const double bf16_q_cpu_error = cpu_check(bf16_q, window_index, compressed_index, q, sink, positions, out, sample);
  SparseAttentionParams head_split = bf16_q;
  head_split.head_split = true;
  const int head_split_splits = sparse_attention_head_split_splits(head_split);
  double head_split_ms = 0, head_split_cpu_error = 0;
  double launch_floor_ms[kLaunchFloorShapes] = {}, launch_floor_graph_us[kLaunchFloorShapes] = {};
  double head_split_tiles_us[kSparseAttentionHeadSplitMaxTiles + 1] = {};
  double head_split_graph_us[kSparseAttentionHeadSplitMaxTiles + 1] = {};
  if (head_split_splits > 0) {
    // Also per call in a CUDA graph of kGraphCalls chained calls (programmatic dependent launches, as in the model's
    // step: each call's launch and prologue overlap the one before; no L2 flush between them).
    constexpr int kGraphCalls = 20;
    cudaStream_t graph_stream = nullptr;
    DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&graph_stream, cudaStreamNonBlocking));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const unsigned groups = unsigned(batch * ((heads + 15) / 16)), splits_per_group = unsigned(head_split_splits);
    // The call's grid in clusters, the same grid without clusters, one CTA per (query, head group).
    const dim3 grids[kLaunchFloorShapes] = {dim3(groups * splits_per_group), dim3(groups * splits_per_group),
                                            dim3(groups)};
    const dim3 clusters[kLaunchFloorShapes] = {dim3(splits_per_group, 1, 1), dim3(1, 1, 1), dim3(1, 1, 1)};
    for (int shape = 0; shape < kLaunchFloorShapes; ++shape) {
      launch_floor_ms[shape] = median_ms(20, flush, [&] {
        launch_chained(empty_kernel, grids[shape], dim3(256), 0, nullptr, clusters[shape], "empty kernel", 0);
      });
      launch_floor_graph_us[shape] = graph_replay_us(graph_stream, capture_calls(graph_stream, kGraphCalls, [&](
          cudaStream_t stream) {
        launch_chained(empty_kernel, grids[shape], dim3(256), 0, stream, clusters[shape], "empty kernel", 0);
      }), kGraphCalls);
    }
    out.fill_bytes(0xFF);
    head_split_ms = median_ms(20, flush, [&] { run_sparse_attention(head_split); });
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
    head_split_cpu_error = cpu_check(head_split, window_index, compressed_index, q, sink, positions, out, sample);
    for (int tiles = 1; tiles <= kSparseAttentionHeadSplitMaxTiles; ++tiles) {
      SparseAttentionParams h = head_split;
      h.head_split_tiles = tiles;
      if (sparse_attention_head_split_splits(h) > 0) {
        head_split_tiles_us[tiles] = 1e3 * median_ms(20, flush, [&] { run_sparse_attention(h); });
        head_split_graph_us[tiles] = graph_replay_us(graph_stream, capture_calls(graph_stream, kGraphCalls, [&](
            cudaStream_t stream) {
          SparseAttentionParams call = h;
          call.stream = stream;
          run_sparse_attention(call);
        }), kGraphCalls);
      }
    }
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
    DSV4_CUDA_CHECK(cudaStreamDestroy(graph_stream));
  }
  if (sweep) {
    // Every split count the cluster merge serves and the combine kernel's, same inputs.
    const int64_t tiles = (total_slots + kSparseAttentionTileEntries - 1) / kSparseAttentionTileEntries;
    std::printf("sweep %s %s batch %d context %lld (%lld tiles): us per call by splits\n", model, to_string(kind),
                batch, static_cast<long long>(context), static_cast<long long>(tiles));
    std::printf("  %6s %10s %10s\n", "splits", "cluster", "combine");
    const int largest = max_sparse_attention_cluster_splits();
    for (int s = 1; s <= std::min<int64_t>(tiles, std::max(largest, 24)); ++s) {
      SparseAttentionParams a = cluster, c = p;
      a.splits = c.splits = s;
      const double a_us =
          s <= largest ? 1e3 * median_ms(10, flush, [&] { run_sparse_attention(a); }) : 0.0;
      const double c_us = 1e3 * median_ms(10, flush, [&] { run_sparse_attention(c); });
      std::printf("  %6d %10.1f %10.1f\n", s, a_us, c_us);
    }
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  }
  out.fill_bytes(0xFF);
  const double ms = median_ms(20, flush, [&] { run_sparse_attention(p); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  const double cpu_error = cpu_check(p, window_index, compressed_index, q, sink, positions, out, sample);

  // The engine's form of an HCA call: every query's list padded to the 1M-context bound (live row 0 past its
  // count, which a kernel that read it would pay for), compressed_counts = its real count.
  double bounded_ms = 0;
  constexpr int kBoundSlots = (int64_t(1) << 20) / 128;
  if (kind == DecodeLayout::Hca && compressed_slots < kBoundSlots) {
    std::vector<int32_t> bounded_index(size_t(batch) * kBoundSlots, 0);
    for (int b = 0; b < batch; ++b)
      std::copy_n(&compressed_index[size_t(b) * compressed_slots], compressed_slots,
                  &bounded_index[size_t(b) * kBoundSlots]);
    const std::vector<int32_t> counts(size_t(batch), compressed_slots);
    DeviceBuffer d_bounded = to_device(bounded_index, "bounded index"), d_counts = to_device(counts, "counts");
    const int bounded_splits =
        choose_sparse_attention_splits(batch, heads, kHeadDim, format, kWindow + kBoundSlots, sms, false);
    DeviceBuffer bounded_workspace(
        std::max<size_t>(16, sparse_attention_workspace_bytes(batch, heads, kHeadDim, bounded_splits)),
        "bounded workspace");
    SparseAttentionParams bounded = p;
    bounded.compressed_index = d_bounded.as<int32_t>();
    bounded.compressed_slots = kBoundSlots;
    bounded.compressed_counts = d_counts.as<int32_t>();
    bounded.splits = bounded_splits;
    bounded.workspace = bounded_workspace.data();
    bounded.workspace_bytes = bounded_workspace.bytes();
    bounded_ms = median_ms(20, flush, [&] { run_sparse_attention(bounded); });
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  }
  const double cache_bytes = double(cache.config().pages) * kPageRows * view.layout.entry_bytes;
  // Only fp8 entries fall back to the mma.sync kernel on 1-entry pages (bf16 entries are 16-byte aligned on any page).
  const double mma_sync_ms = format == KvEntryFormat::Fp8Reference && cache_bytes <= double(size_t(4) << 30)
                                 ? mma_sync_kernel_ms(p, cache.config(), flush)
                                 : 0.0;
  SparseAttentionParams b = p;
  b.out = baseline_out.data();
  const double baseline_ms = median_ms(batch >= 64 ? 3 : 5, flush, [&] {
    baseline_attention<<<unsigned(batch * heads), kBaselineThreads>>>(b);
    DSV4_CUDA_CHECK_LAUNCH("baseline attention");
  });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> x(out_bytes / 4), y(out_bytes / 4);
  out.download(x.data(), out_bytes);
  baseline_out.download(y.data(), out_bytes);
  double diff = 0;
  for (size_t i = 0; i < x.size(); ++i) diff = std::max(diff, double(std::fabs(x[i] - y[i])));
  if (!std::isfinite(diff)) diff = 1e30;

  Result r;
  r.model = model;
  r.layout = to_string(kind);
  r.heads = heads;
  r.batch = batch;
  r.splits = splits;
  r.context = context;
  r.slots = total_slots;
  r.us = ms * 1e3;
  r.kv_bytes = double(batch) * double(total_slots) * view.layout.entry_bytes;
  r.gbps = r.kv_bytes / (ms * 1e-3) / 1e9;
  r.percent_of_copy = 100.0 * r.gbps / copy_gbps;
  const double per_query_head = double(batch) * heads;
  r.total_bytes = r.kv_bytes + per_query_head * kHeadDim * 4 * 2 +
                  (splits > 1 ? 2.0 * splits * per_query_head * (kHeadDim + 2) * 4 : 0.0);
  r.percent_total = 100.0 * r.total_bytes / (ms * 1e-3) / 1e9 / copy_gbps;
  r.baseline_us = baseline_ms * 1e3;
  r.max_abs_diff = diff;
  r.mma_sync_us = mma_sync_ms * 1e3;
  const double flops = 4.0 * heads * kHeadDim * double(batch) * double(total_slots);
  r.floor_us = std::max(r.kv_bytes / (copy_gbps * 1e3), flops / (cublas_tflops * 1e6));
  r.percent_of_floor = 100.0 * r.floor_us / r.us;
  r.bounded_us = bounded_ms * 1e3;
  r.cluster_splits = cluster_splits;
  r.cluster_us = cluster_ms * 1e3;
  r.cpu_error = cpu_error;
  r.cluster_cpu_error = cluster_cpu_error;
  r.bf16_q_us = bf16_q_ms * 1e3;
  r.bf16_q_cpu_error = bf16_q_cpu_error;
  r.bf16_partials_us = bf16_partials_ms * 1e3;
  r.bf16_partials_cpu_error = bf16_partials_cpu_error;
  r.head_split_splits = head_split_splits;
  r.head_split_us = head_split_ms * 1e3;
  r.head_split_cpu_error = head_split_cpu_error;
  std::copy(std::begin(head_split_tiles_us), std::end(head_split_tiles_us), std::begin(r.head_split_tiles_us));
  for (int shape = 0; shape < kLaunchFloorShapes; ++shape) {
    r.launch_floor_us[shape] = launch_floor_ms[shape] * 1e3;
    r.launch_floor_graph_us[shape] = launch_floor_graph_us[shape];
  }
  std::copy(std::begin(head_split_graph_us), std::end(head_split_graph_us), std::begin(r.head_split_graph_us));
  return r;
}

// --route: the engine's decode call (bf16 q, fp32 out here) on the decode kernels (run_sparse_attention with
// prefill_kernel off: the head-split path where it serves the call, else the head_dim 512 kernel with its
// cluster-merged splits, chosen by the slot bound as the model does) against the prefill kernel
// (run_sparse_attention_prefill, its default options), same inputs, both checked against the CPU; and whether
// run_sparse_attention's defaults route the call there (prefill_kernel with prefill_kernel_decode).
struct RouteResult {
  std::string model, layout;
  int heads, batch, slots, splits;  // slots per query
  int64_t context;
  bool head_split, routed;
  double decode_us, prefill_us, floor_us, decode_cpu_error, prefill_cpu_error;
};

RouteResult run_route_case(const char* model, int heads, DecodeLayout kind, KvEntryFormat format, int batch,
                           int64_t context, double copy_gbps, double cublas_tflops, int sms, const L2Flush& flush,
                           std::mt19937& rng) {
  const std::unique_ptr<SparseAttentionDecodeStep> step = make_decode_step(format, heads, kind, batch, context, rng);
  const size_t out_bytes = size_t(batch) * heads * kHeadDim * 4;
  DeviceBuffer out(out_bytes, "out");
  SparseAttentionParams decode = step->call;
  decode.out = out.data();
  decode.prefill_kernel = false;
  decode.splits = choose_sparse_attention_splits(batch, heads, kHeadDim, format, step->slots_per_query(), sms);
  DeviceBuffer workspace(
      std::max<size_t>(16, sparse_attention_workspace_bytes(batch, heads, kHeadDim, decode.splits)), "workspace");
  decode.workspace = workspace.data();
  decode.workspace_bytes = workspace.bytes();
  // The first and last queries (the long HCA lists make the CPU reference the cost of a case).
  std::vector<int64_t> sample{0, batch - 1};
  sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
  const auto check = [&](const SparseAttentionParams& call) {
    return cpu_check(call, step->window_index, step->compressed_index, step->q, step->sink, step->positions, out,
                     sample);
  };
  RouteResult r;
  r.model = model;
  r.layout = to_string(kind);
  r.heads = heads;
  r.batch = batch;
  r.slots = step->slots_per_query();
  r.context = context;
  r.head_split = sparse_attention_head_split_splits(decode) > 0;
  r.splits = r.head_split ? sparse_attention_head_split_splits(decode) : decode.splits;
  out.fill_bytes(0xFF);
  r.decode_us = 1e3 * median_ms(20, flush, [&] { run_sparse_attention(decode); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  r.decode_cpu_error = check(decode);
  SparseAttentionParams prefill = decode;
  prefill.splits = 1;
  prefill.workspace = nullptr;
  prefill.workspace_bytes = 0;
  out.fill_bytes(0xFF);
  r.prefill_us = 1e3 * median_ms(20, flush, [&] { run_sparse_attention_prefill(prefill); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  r.prefill_cpu_error = check(prefill);
  SparseAttentionParams routed = decode;
  routed.prefill_kernel = SparseAttentionParams{}.prefill_kernel;
  r.routed = sparse_attention_uses_prefill_kernel(routed);
  r.floor_us = std::max(step->kv_bytes() / (copy_gbps * 1e3), step->flops() / (cublas_tflops * 1e6));
  return r;
}

// --trace: the route's decode call on the head_dim 512 kernel (bf16 entries, cluster-merged splits as the model
// chooses them, --out's output type), one cold call (--flush), traced. Each CTA's wave is its rank among the CTAs its
// SM ran; per wave, the medians over its CTAs of each mark (SparseAttentionTraceMark) in µs from the launch's first CTA
// start (points inside the call, whose time and floor head the rows), the median µs per tile between tile 0's and the
// last tile's arrival with its floor (a tile's entries for each of the wave's CTAs at the same-run copy rate), and
// from the last tile's arrival to the CTA's end with its floor (the wave's output bytes at the copy rate; a cluster
// merge's distributed shared-memory bytes are not in it).
void print_trace(const char* label, const std::vector<uint64_t>& trace, int ctas, int tiles, double tile_bytes,
                 double output_bytes_per_cta, double copy_gbps) {
  constexpr int kSlots = kSparseAttentionTraceSlots;
  uint64_t first = ~uint64_t(0);
  for (int c = 0; c < ctas; ++c) first = std::min(first, trace[size_t(c) * kSlots + kD512TraceStart]);
  std::vector<std::vector<int>> by_sm;
  for (int c = 0; c < ctas; ++c) {
    const size_t sm = size_t(trace[size_t(c) * kSlots + kD512TraceSm]);
    if (sm >= by_sm.size()) by_sm.resize(sm + 1);
    by_sm[sm].push_back(c);
  }
  std::vector<std::vector<int>> waves;
  for (std::vector<int>& list : by_sm) {
    std::sort(list.begin(), list.end(), [&](int a, int b) {
      return trace[size_t(a) * kSlots + kD512TraceStart] < trace[size_t(b) * kSlots + kD512TraceStart];
    });
    for (size_t rank = 0; rank < list.size(); ++rank) {
      if (rank >= waves.size()) waves.resize(rank + 1);
      waves[rank].push_back(list[rank]);
    }
  }
  const auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  static const char* const kNames[] = {"start",  "p.wait", "p.rows", "p.pages", "issued0", "issuedN", "c.wait",
                                       "q",      "tile0",  "tile1",  "tileN",   "mid",     "m.qk",    "m.exch",
                                       "m.soft", "m.pv",   "loop",   "written", "synced",  "factors", "stored",
                                       "end"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == kD512TraceSm, "a name per mark");
  std::printf("  %-8s %5s %5s", label, "wave", "ctas");
  for (const char* name : kNames) std::printf(" %7s", name);
  std::printf(" %8s %6s %8s %6s\n", "us/tile", "floor", "N->end", "floor");
  for (size_t w = 0; w < waves.size(); ++w) {
    std::printf("  %-8s %5zu %5zu", label, w, waves[w].size());
    for (int mark = 0; mark < kD512TraceSm; ++mark) {
      std::vector<double> at;
      for (const int c : waves[w]) {
        const uint64_t v = trace[size_t(c) * kSlots + mark];
        if (v != 0) at.push_back(double(v - first) * 1e-3);
      }
      std::printf(" %7.2f", median(at));
    }
    std::vector<double> per_tile, tail;
    for (const int c : waves[w]) {
      const uint64_t* r = &trace[size_t(c) * kSlots];
      if (tiles > 1 && r[kD512TraceTile0] != 0 && r[kD512TraceLastTile] != 0)
        per_tile.push_back(double(r[kD512TraceLastTile] - r[kD512TraceTile0]) * 1e-3 / (tiles - 1));
      if (r[kD512TraceLastTile] != 0 && r[kD512TraceEnd] != 0)
        tail.push_back(double(r[kD512TraceEnd] - r[kD512TraceLastTile]) * 1e-3);
    }
    const double wave_ctas = double(waves[w].size());
    std::printf(" %8.3f %6.3f %8.2f %6.2f\n", median(per_tile), wave_ctas * tile_bytes / (copy_gbps * 1e3),
                median(tail), wave_ctas * output_bytes_per_cta / (copy_gbps * 1e3));
  }
}

// Returns false when the traced call's output (f32 or bf16, as --out chose) fails its CPU check.
bool run_trace_case(const char* model, int heads, DecodeLayout kind, int batch, int64_t context, int sms,
                    double copy_gbps, const L2Flush& flush, AttentionDtype out_dtype, std::mt19937& rng) {
  const std::unique_ptr<SparseAttentionDecodeStep> step =
      make_decode_step(KvEntryFormat::Bf16, heads, kind, batch, context, rng);
  const int out_element_bytes = out_dtype == AttentionDtype::F32 ? 4 : 2;
  const double output_bytes = double(batch) * heads * kHeadDim * out_element_bytes;
  DeviceBuffer out(size_t(output_bytes), "out");
  SparseAttentionParams call = step->call;
  call.out = out.data();
  call.out_dtype = out_dtype;
  call.prefill_kernel = false;
  call.head_split = false;
  call.splits =
      choose_sparse_attention_splits(batch, heads, kHeadDim, KvEntryFormat::Bf16, step->slots_per_query(), sms);
  const int tiles_total = (step->slots_per_query() + kSparseAttentionTileEntries - 1) / kSparseAttentionTileEntries;
  const int tiles = (tiles_total + call.splits - 1) / call.splits;
  const int ctas = int(sparse_attention_d512_ctas(call));
  DeviceBuffer d_trace(size_t(ctas) * kSparseAttentionTraceSlots * 8, "trace");
  const double floor_us = (step->kv_bytes() + output_bytes) / (copy_gbps * 1e3);
  std::printf("%s %s batch %d context %lld: %d slots, %d splits, %d tiles per CTA, %d CTAs; flush %s, %s output; "
              "floor %.1f us (KV bytes and output at the copy rate)\n",
              model, to_string(kind), batch, static_cast<long long>(context), step->slots_per_query(), call.splits,
              tiles, ctas, flush.bytes == 0 ? "none" : to_string(flush.kind),
              out_dtype == AttentionDtype::F32 ? "fp32" : "bf16", floor_us);
  const double tile_bytes = double(kSparseAttentionTileEntries) * call.cache.layout.entry_bytes;
  run_sparse_attention(call);  // warm-up, untraced
  call.d512_trace = d_trace.as<uint64_t>();
  d_trace.fill_bytes(0);
  out.fill_bytes(0xFF);  // the traced call's output is the one checked
  flush.run(0);
  StreamTimer timer;
  const double ms = timer.elapsed_ms(nullptr, [&] { run_sparse_attention(call); });
  std::vector<uint64_t> trace(size_t(ctas) * kSparseAttentionTraceSlots);
  d_trace.download(trace.data(), trace.size() * 8);
  std::printf("  %.1f us (events), %.1f %% of the floor\n", ms * 1e3, 100.0 * floor_us / (ms * 1e3));
  print_trace("traced", trace, ctas, tiles, tile_bytes, output_bytes / ctas, copy_gbps);
  std::vector<int64_t> sample{0, batch - 1};
  sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
  const double cpu_error =
      cpu_check(call, step->window_index, step->compressed_index, step->q, step->sink, step->positions, out, sample);
  const bool passed = cpu_error <= kCpuCheckLimit;
  std::printf("  traced call's output: cpu err %.1e%s\n", cpu_error, passed ? "" : "  CPU CHECK FAILED");
  std::fflush(stdout);
  return passed;
}

struct PrefillResult {
  std::string model, format;
  int heads;
  int64_t context, tokens, slots;
  int splits;
  double us, tflops, percent_of_cublas, percent_of_peak;
  double bf16_q_us, bf16_q_tflops;  // the same call with q in bf16
};

// One prefill chunk of kPrefillTokens queries ending at `context`: window slots = the 128 ring rows up to each
// query, compressed slots = 512 random visible rows (context / 4 compressed entries, causal: row < (pos + 1) / 4).
PrefillResult run_prefill_case(const char* model, int heads, KvEntryFormat format, int64_t context,
                               double cublas_tflops, double peak_tflops, int sms, void* flush, size_t flush_bytes,
                               std::mt19937& rng) {
  constexpr int64_t kPrefillTokens = 4096;
  const int64_t capacity = 8192;  // ring rows: the window plus the chunk
  const std::unique_ptr<KvCache> cache =
      prefill_chunk_cache(format, kHeadDim, kRopeDim, kPageRows, context, capacity);
  const KvCacheView view = cache->view();
  // fp8: e4m3 0x30 = 0.5, scale 0x7F = 1, bf16 0x3030 ≈ 6.4e-10; bf16 entries: 0x3030 everywhere. Finite either way.
  DSV4_CUDA_CHECK(cudaMemset(view.pool, 0x30, size_t(cache->config().pages) * kPageRows * view.layout.entry_bytes));

  const int64_t T = kPrefillTokens;
  const PrefillChunkSlots chunk = prefill_chunk_slots(context, T, kWindow, kTopK, capacity, rng);
  const std::vector<float> q = normal_floats(size_t(T) * heads * kHeadDim, 1.0f, rng), sink(size_t(heads), 0.5f),
                           freq = decode_rope_table().frequencies();
  DeviceBuffer d_slots = to_device(chunk.slots, "slots"), d_window = to_device(chunk.window_index, "window index"),
               d_compressed = to_device(chunk.compressed_index, "compressed index"),
               d_pos = to_device(chunk.positions, "positions"), d_q = to_device(q, "q"),
               d_sink = to_device(sink, "sink"), d_freq = to_device(freq, "frequencies");
  DeviceBuffer out(size_t(T) * heads * kHeadDim * 2, "out");
  const int splits = choose_sparse_attention_splits(T, heads, kHeadDim, format, kWindow + kTopK, sms);
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(T, heads, kHeadDim, splits)),
                         "workspace");
  // The whole-model runner's prefill call: fp32 q in, bf16 out (the next linear layer's input).
  SparseAttentionParams p{.cache = view, .layer = 0, .tokens = T, .heads = heads,
                        .softmax_scale = 1.0f / std::sqrt(float(kHeadDim)), .q = d_q.data(),
                        .q_dtype = AttentionDtype::F32, .attn_sink = d_sink.as<float>(),
                        .sequence_slots = d_slots.as<int32_t>(), .positions = d_pos.as<int64_t>(),
                        .rope_frequencies = d_freq.as<float>(), .window_index = d_window.as<int32_t>(),
                        .window_slots = kWindow, .compressed_index = d_compressed.as<int32_t>(),
                        .compressed_slots = kTopK, .out = out.data(), .out_dtype = AttentionDtype::Bf16,
                        .splits = splits, .workspace = workspace.data(), .workspace_bytes = workspace.bytes()};
  const double ms = median_ms(10, flush, flush_bytes, [&] { run_sparse_attention(p); });
  const DeviceBuffer d_q_bf16 = bf16_q_to_device(q);
  p.q = d_q_bf16.data();
  p.q_dtype = AttentionDtype::Bf16;
  const double bf16_q_ms = median_ms(10, flush, flush_bytes, [&] { run_sparse_attention(p); });
  PrefillResult r;
  r.model = model;
  r.format = to_string(format);
  r.heads = heads;
  r.context = context;
  r.tokens = T;
  r.slots = kWindow + kTopK;
  r.splits = splits;
  r.us = ms * 1e3;
  r.tflops = 4.0 * heads * kHeadDim * double(chunk.used_slots) / (ms * 1e9);
  r.percent_of_cublas = 100.0 * r.tflops / cublas_tflops;
  r.percent_of_peak = 100.0 * r.tflops / peak_tflops;
  r.bf16_q_us = bf16_q_ms * 1e3;
  r.bf16_q_tflops = 4.0 * heads * kHeadDim * double(chunk.used_slots) / (bf16_q_ms * 1e9);
  return r;
}

int run(int argc, char** argv) {
  std::string json_path;
  OnlySelection only;  // --only's comma-separated prefixes
  bool prefill_only = false, warm = false, sweep = false, route = false, mma_rates = false, trace = false;
  KvEntryFormat decode_format = KvEntryFormat::Fp8Reference;
  L2FlushKind flush_mode = L2FlushKind::Read;
  AttentionDtype out_dtype = AttentionDtype::F32;
  bool out_given = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc)
      json_path = argv[++i];
    else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc)
      only = OnlySelection(argv[++i], ',', OnlyMatch::Prefix);
    else if (std::strcmp(argv[i], "--prefill-only") == 0)
      prefill_only = true;
    else if (std::strcmp(argv[i], "--warm") == 0)
      warm = true;
    else if (std::strcmp(argv[i], "--sweep") == 0)
      sweep = true;
    else if (std::strcmp(argv[i], "--bf16-kv") == 0)
      decode_format = KvEntryFormat::Bf16;
    else if (std::strcmp(argv[i], "--route") == 0)
      route = true;
    else if (std::strcmp(argv[i], "--mma-rates") == 0)
      mma_rates = true;
    else if (std::strcmp(argv[i], "--trace") == 0)
      trace = true;
    else if (std::strcmp(argv[i], "--flush") == 0 && i + 1 < argc) {
      const std::string value = argv[++i];
      check(value == "read" || value == "memset", "bench_cuda_attention: bad value for --flush: '", value,
            "' (read or memset)");
      flush_mode = value == "read" ? L2FlushKind::Read : L2FlushKind::Memset;
    } else if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      const std::string value = argv[++i];
      check(value == "f32" || value == "bf16", "bench_cuda_attention: bad value for --out: '", value,
            "' (f32 or bf16)");
      out_dtype = value == "bf16" ? AttentionDtype::Bf16 : AttentionDtype::F32;
      out_given = true;
    } else
      fail("unknown argument ", argv[i],
           " (usage: bench_cuda_attention [--json PATH] [--only MODEL:LAYOUT:BATCH:CONTEXT[,...]] [--prefill-only] "
           "[--warm] [--sweep] [--bf16-kv] [--route] [--mma-rates] [--trace] [--flush read|memset] "
           "[--out f32|bf16])");
  }
  check(!out_given || trace, "bench_cuda_attention: --out serves --trace only");
  check(!mma_rates || only.all(), "bench_cuda_attention: --mma-rates times no case; it takes no --only");
  check(!prefill_only || only.all(),
        "bench_cuda_attention: --only selects decode cases, which --prefill-only skips; the prefill part runs whole");
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty()) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  const DeviceInfo& device = devices[0];
  const double copy_gbps = copy_bandwidth_gbps();
  std::printf("%s, %d SMs; device copy bandwidth (read + write) %.0f GB/s\n", device.name.c_str(),
              device.multiprocessors, copy_gbps);
  const size_t flush_buffer_bytes = size_t(256) << 20;
  DeviceBuffer flush(flush_buffer_bytes, "L2 flush");
  const size_t flush_bytes = warm ? 0 : flush_buffer_bytes;  // a memset of 0 bytes flushes nothing
  if (warm) std::printf("--warm: no L2 flush before the timed calls\n");
  DeviceBuffer flush_sink(16, "L2 flush sink");
  const L2Flush l2_flush{.data = flush.data(), .bytes = flush_bytes, .kind = flush_mode,
                         .sink = flush_sink.as<uint4>(), .sms = device.multiprocessors};
  if (!warm)
    std::printf("--flush %s: the decode calls are timed after %s the 256 MB flush buffer\n", to_string(flush_mode),
                flush_mode == L2FlushKind::Memset ? "a memset of (L2 left full of dirty lines)"
                                                : "a read sweep of (L2 left full of clean lines)");
  std::mt19937 rng(7);
  int clock_khz = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device.index));
  const double peak_tflops = 4096.0 * device.multiprocessors * clock_khz * 1e3 / 1e12;
  const double cublas_tflops = cublas_bf16_tflops(flush.data(), flush_bytes);
  std::printf("cuBLAS bf16 GEMM %.0f TFLOP/s, nominal peak %.0f TFLOP/s (%d MHz)\n", cublas_tflops, peak_tflops,
              clock_khz / 1000);
  if (mma_rates) {
    DeviceBuffer sink(size_t(device.multiprocessors) * 4, "sink");
    float* out = sink.as<float>();
    const int sms = device.multiprocessors;
    // A tile's flops on one SM (QKᵀ and PV over 64 heads × 32 entries × 512 dims) at the same-run cuBLAS rate and at
    // the nominal peak, shared by the SMs: the tensor-rate floor of a tile.
    constexpr double kTileFlops = 4.0 * kD512TileHeads * kSparseAttentionTileEntries * kHeadDim;
    const double cublas_floor_us = kTileFlops * sms / (cublas_tflops * 1e6),
                 peak_floor_us = kTileFlops * sms / (peak_tflops * 1e6);
    const double tile_us = mma_rate_us<MmaRate::Tile>(sms, out);
    std::printf("--mma-rates: the head_dim 512 kernel's tensor-core work per 32-entry tile, a CTA per SM and two "
                "consumer warpgroups issuing back to back, us per tile: QK+PV (as the kernel: 16 m64n32k16 SS, wait, "
                "2 m64n256k16 RS, wait) %.3f; QK alone %.3f; PV alone %.3f; QK as 16 m64n64k16 SS per 64 entries "
                "%.3f per 32\n"
                "  a tile's %.2f MFLOP per SM: floor %.3f us at the cuBLAS rate (QK+PV at %.0f%% of it), %.3f us at "
                "the nominal peak (%.0f%%)\n",
                tile_us, mma_rate_us<MmaRate::QkOnly>(sms, out), mma_rate_us<MmaRate::PvOnly>(sms, out),
                mma_rate_us<MmaRate::Qk64>(sms, out), kTileFlops / 1e6, cublas_floor_us,
                100.0 * cublas_floor_us / tile_us, peak_floor_us, 100.0 * peak_floor_us / tile_us);
    only.require_all_used();
    return 0;
  }
  std::vector<Result> results;
  std::vector<RouteResult> routes;
  if (trace)
    std::printf("--trace: marks in us from the launch's first CTA start, medians per wave (a CTA's rank on its SM): "
                "start, producer / consumer 0 past the grid wait, producer's first index rows / page-table entries "
                "loaded, first / last tile's copies issued, Q stored, tiles "
                "0, 1, last arrived, the middle tile arrived / scored / exchanged / softmax done / PV issued, loop's "
                "last MMAs done, cluster merge's partial written / published / factors ready / output stored, end "
                "(points inside the call: the call's time and floor head its rows); us/tile between tile 0 and the "
                "last, its floor a tile's entries for each of the wave's CTAs at the copy rate; N->end from the last "
                "tile to the end, its floor the wave's output bytes at the copy rate\n");
  else if (route)
    std::printf("--route: the decode kernels (hs = head split, else the head_dim 512 kernel's splits) against the "
                "prefill kernel, bf16 q; slots per query; routed = run_sparse_attention's defaults send the call to "
                "the prefill kernel\n"
                "%-6s %-4s %5s %8s %6s %8s %10s %8s %9s | %10s %8s %9s | %8s %7s\n",
                "model", "kind", "batch", "context", "slots", "splits", "decode us", "%floor", "cpu err", "prefill us",
                "%floor", "cpu err", "speedup", "routed");
  else
    std::printf("GB/s and %%copy count KV bytes (combine-kernel merge); %%total adds q read, output written and split "
              "partials; floor = max(KV bytes at copy rate, flops at cuBLAS rate); bound us = HCA under the 1M slot "
              "bound + counts; cl = the cluster merge; cpu err = worst |error| / max |output| over sampled queries and "
              "heads\n");
  if (!route && !trace)
    std::printf("%-6s %-4s %5s %8s %6s %6s %10s %10s %8s %8s %9s %8s %12s %8s %10s %12s %9s %9s %9s %9s %9s %9s "
              "%9s %9s %9s\n",
              "model", "kind", "batch", "context", "slots", "splits", "us", "GB/s", "%copy", "%total", "floor us",
              "%floor", "baseline us", "speedup", "max|diff|", "mma.sync us", "bound us", "cl.splits", "cl.us",
              "bf16q us", "cpu err", "cl.err", "bf16q err", "cl16p us", "cl16p err");
  bool check_failed = false;
  const auto record_route = [&](const RouteResult& r) {
    const bool failed = !(r.decode_cpu_error <= kCpuCheckLimit && r.prefill_cpu_error <= kCpuCheckLimit);
    check_failed = check_failed || failed;
    std::printf("%-6s %-4s %5d %8lld %6d %5s%3d %10.1f %7.1f%% %9.1e | %10.1f %7.1f%% %9.1e | %7.2fx %7s%s\n",
                r.model.c_str(), r.layout.c_str(), r.batch, static_cast<long long>(r.context), r.slots,
                r.head_split ? "hs" : "", r.splits, r.decode_us, 100.0 * r.floor_us / r.decode_us, r.decode_cpu_error,
                r.prefill_us, 100.0 * r.floor_us / r.prefill_us, r.prefill_cpu_error, r.decode_us / r.prefill_us,
                r.routed ? "yes" : "no", failed ? "  CPU CHECK FAILED" : "");
    std::fflush(stdout);
    routes.push_back(r);
  };
  for (const auto& [model, heads] : {std::pair{"flash", 64}, std::pair{"pro", 128}})
    for (const DecodeLayout kind : {DecodeLayout::Swa, DecodeLayout::Csa, DecodeLayout::Hca})
      for (const int64_t context : {int64_t(4096), int64_t(65536), int64_t(262144), int64_t(1) << 20})
        for (const int batch : {1, 8, 64, 128, 256}) {
          // 128: between a wave of one-block CTAs and two, for the routing threshold of --route.
          if (batch == 128 && !route && !trace) continue;
          if (prefill_only || (kind == DecodeLayout::Swa && context != 4096)) continue;
          // 256K: an HCA list between 64K's and 1M's (2176 slots), for the routing threshold of --route.
          if (context == 262144 && !(route && kind == DecodeLayout::Hca)) continue;
          const std::string name = std::string(model) + ":" + to_string(kind) + ":" + std::to_string(batch) + ":" +
                                   std::to_string(context);
          if (!only.selects(name)) continue;
          const double cache_bytes = decode_cache_bytes(decode_format, kind, batch, context);
          if (cache_bytes > 24.0 * (1u << 30)) {
            std::printf("%-6s %-4s %5d %8lld  skipped: %.1f GiB of cache\n", model, to_string(kind), batch,
                        static_cast<long long>(context), cache_bytes / (1u << 30));
            continue;
          }
          if (trace) {
            check_failed = !run_trace_case(model, heads, kind, batch, context, device.multiprocessors, copy_gbps,
                                           l2_flush, out_dtype, rng) ||
                           check_failed;
            continue;
          }
          if (route) {
            record_route(run_route_case(model, heads, kind, decode_format, batch, context, copy_gbps, cublas_tflops,
                                        device.multiprocessors, l2_flush, rng));
            continue;
          }
          const Result r = run_case(model, heads, kind, decode_format, batch, context, copy_gbps, cublas_tflops,
                                    device.multiprocessors, l2_flush, sweep, rng);
          const bool failed = !(r.cpu_error <= kCpuCheckLimit && r.cluster_cpu_error <= kCpuCheckLimit &&
                                r.bf16_q_cpu_error <= kCpuCheckLimit && r.bf16_partials_cpu_error <= kCpuCheckLimit &&
                                r.head_split_cpu_error <= kCpuCheckLimit);
          check_failed = check_failed || failed;
          std::printf("%-6s %-4s %5d %8lld %6lld %6d %10.1f %10.0f %7.1f%% %7.1f%% %9.1f %7.1f%% %12.1f %7.1fx "
                      "%10.2e %12.1f %9.1f %9d %9.1f %9.1f %9.1e %9.1e %9.1e %9.1f %9.1e%s\n",
                      r.model.c_str(), r.layout.c_str(), r.batch, static_cast<long long>(r.context),
                      static_cast<long long>(r.slots), r.splits, r.us, r.gbps, r.percent_of_copy, r.percent_total,
                      r.floor_us, r.percent_of_floor, r.baseline_us, r.baseline_us / r.us, r.max_abs_diff,
                      r.mma_sync_us, r.bounded_us, r.cluster_splits, r.cluster_us, r.bf16_q_us, r.cpu_error,
                      r.cluster_cpu_error, r.bf16_q_cpu_error, r.bf16_partials_us, r.bf16_partials_cpu_error,
                      failed ? "  CPU CHECK FAILED" : "");
          if (r.head_split_splits > 0)
            std::printf("       head split (bf16 q): %d splits %.1f us (bf16q cluster %.1f us; an empty kernel on its "
                        "grid %.1f us, unclustered %.1f, a CTA per head group %.1f), cpu err %.1e; by tiles per CTA "
                        "1-4: %.1f %.1f %.1f %.1f us\n",
                        r.head_split_splits, r.head_split_us, r.bf16_q_us, r.launch_floor_us[0], r.launch_floor_us[1],
                        r.launch_floor_us[2], r.head_split_cpu_error, r.head_split_tiles_us[1],
                        r.head_split_tiles_us[2], r.head_split_tiles_us[3], r.head_split_tiles_us[4]);
          if (r.head_split_splits > 0)
            std::printf("       in a graph of chained calls, us per call: head split by tiles per CTA 1-4: %.2f %.2f "
                        "%.2f %.2f; empty kernel clustered %.2f, unclustered %.2f, a CTA per head group %.2f\n",
                        r.head_split_graph_us[1], r.head_split_graph_us[2], r.head_split_graph_us[3],
                        r.head_split_graph_us[4], r.launch_floor_graph_us[0], r.launch_floor_graph_us[1],
                        r.launch_floor_graph_us[2]);
          std::fflush(stdout);
          results.push_back(r);
        }
  if (!route && !trace && only.all()) {
    std::printf("\nprefill (4096 queries, CSA 128 + 512 slots)\n");
    std::printf("%-6s %-13s %8s %6s %10s %8s %8s %8s %10s %9s\n", "model", "entries", "context", "splits", "us",
                "TFLOP/s", "%cublas", "%peak", "bf16q us", "bf16q TF/s");
  }
  std::vector<PrefillResult> prefill;
  for (const auto& [model, heads] : {std::pair{"flash", 64}, std::pair{"pro", 128}})
    for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16})
      for (const int64_t context : {int64_t(8192), int64_t(65536)}) {
        if (!only.all() || route || trace) continue;
        const PrefillResult r = run_prefill_case(model, heads, format, context, cublas_tflops, peak_tflops,
                                                 device.multiprocessors, flush.data(), flush_bytes, rng);
        std::printf("%-6s %-13s %8lld %6d %10.1f %8.1f %7.1f%% %7.1f%% %10.1f %9.1f\n", r.model.c_str(),
                    r.format.c_str(), static_cast<long long>(r.context), r.splits, r.us, r.tflops,
                    r.percent_of_cublas, r.percent_of_peak, r.bf16_q_us, r.bf16_q_tflops);
        std::fflush(stdout);
        prefill.push_back(r);
      }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fprintf(f, "{\n  \"benchmark\": \"bench_cuda_attention\",\n  \"card\": \"%s\",\n  \"sms\": %d,\n",
                 device.name.c_str(), device.multiprocessors);
    std::fprintf(f, "  \"copy_gbps\": %.1f,\n  \"kv_entry_bytes\": %d,\n  \"decode_flush\": \"%s\",\n  \"cases\": [\n",
                 copy_gbps, KvEntryLayout::make(decode_format, kHeadDim, kRopeDim).entry_bytes,
                 warm ? "none" : to_string(flush_mode));
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   "    {\"model\": \"%s\", \"layout\": \"%s\", \"heads\": %d, \"batch\": %d, \"context\": %lld, "
                   "\"slots\": %lld, \"splits\": %d, \"us\": %.2f, \"kv_bytes\": %.0f, \"gbps\": %.1f, "
                   "\"percent_of_copy\": %.1f, \"baseline_us\": %.2f, \"speedup\": %.2f, \"max_abs_diff\": %.3g, "
                   "\"mma_sync_us\": %.2f, \"total_bytes\": %.0f, \"percent_total\": %.1f, \"floor_us\": %.2f, "
                   "\"percent_of_floor\": %.1f, \"bounded_us\": %.2f, \"cluster_splits\": %d, \"cluster_us\": %.2f, "
                   "\"bf16_q_us\": %.2f, \"cpu_error\": %.3g, \"cluster_cpu_error\": %.3g, "
                   "\"bf16_q_cpu_error\": %.3g, \"bf16_partials_us\": %.2f, \"bf16_partials_cpu_error\": %.3g, "
                   "\"head_split_splits\": %d, \"head_split_us\": %.2f, \"head_split_cpu_error\": %.3g, "
                   "\"head_split_tiles_us\": [%.2f, %.2f, %.2f, %.2f], \"launch_floor_us\": [%.2f, %.2f, %.2f], "
                   "\"head_split_graph_us\": [%.2f, %.2f, %.2f, %.2f], "
                   "\"launch_floor_graph_us\": [%.2f, %.2f, %.2f]}%s\n",
                   r.model.c_str(), r.layout.c_str(), r.heads, r.batch, static_cast<long long>(r.context),
                   static_cast<long long>(r.slots), r.splits, r.us, r.kv_bytes, r.gbps, r.percent_of_copy,
                   r.baseline_us, r.baseline_us / r.us, r.max_abs_diff, r.mma_sync_us, r.total_bytes,
                   r.percent_total, r.floor_us, r.percent_of_floor, r.bounded_us, r.cluster_splits, r.cluster_us,
                   r.bf16_q_us, r.cpu_error, r.cluster_cpu_error, r.bf16_q_cpu_error, r.bf16_partials_us,
                   r.bf16_partials_cpu_error, r.head_split_splits, r.head_split_us, r.head_split_cpu_error,
                   r.head_split_tiles_us[1], r.head_split_tiles_us[2], r.head_split_tiles_us[3],
                   r.head_split_tiles_us[4], r.launch_floor_us[0], r.launch_floor_us[1], r.launch_floor_us[2],
                   r.head_split_graph_us[1], r.head_split_graph_us[2], r.head_split_graph_us[3],
                   r.head_split_graph_us[4], r.launch_floor_graph_us[0], r.launch_floor_graph_us[1],
                   r.launch_floor_graph_us[2], i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"cublas_bf16_tflops\": %.1f,\n  \"peak_bf16_tflops\": %.1f,\n  \"prefill\": [\n",
                 cublas_tflops, peak_tflops);
    for (size_t i = 0; i < prefill.size(); ++i) {
      const PrefillResult& r = prefill[i];
      std::fprintf(f,
                   "    {\"model\": \"%s\", \"entries\": \"%s\", \"heads\": %d, \"context\": %lld, "
                   "\"tokens\": %lld, \"slots\": %lld, \"splits\": %d, \"us\": %.2f, \"tflops\": %.1f, "
                   "\"percent_of_cublas\": %.1f, \"percent_of_peak\": %.1f, \"bf16_q_us\": %.2f, "
                   "\"bf16_q_tflops\": %.1f}%s\n",
                   r.model.c_str(), r.format.c_str(), r.heads, static_cast<long long>(r.context),
                   static_cast<long long>(r.tokens), static_cast<long long>(r.slots), r.splits, r.us, r.tflops,
                   r.percent_of_cublas, r.percent_of_peak, r.bf16_q_us, r.bf16_q_tflops,
                   i + 1 < prefill.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"route\": [\n");
    for (size_t i = 0; i < routes.size(); ++i) {
      const RouteResult& r = routes[i];
      std::fprintf(f,
                   "    {\"model\": \"%s\", \"layout\": \"%s\", \"heads\": %d, \"batch\": %d, \"context\": %lld, "
                   "\"slots\": %d, \"head_split\": %s, \"splits\": %d, \"decode_us\": %.2f, "
                   "\"prefill_us\": %.2f, \"floor_us\": %.2f, \"decode_cpu_error\": %.3g, \"prefill_cpu_error\": %.3g, "
                   "\"routed\": %s}%s\n",
                   r.model.c_str(), r.layout.c_str(), r.heads, r.batch, static_cast<long long>(r.context), r.slots,
                   r.head_split ? "true" : "false", r.splits, r.decode_us, r.prefill_us, r.floor_us,
                   r.decode_cpu_error, r.prefill_cpu_error, r.routed ? "true" : "false",
                   i + 1 < routes.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  if (check_failed) std::fprintf(stderr, "bench_cuda_attention: a decode output differs from cpu::sparse_attention\n");
  only.require_all_used();
  return check_failed ? 1 : 0;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_attention", dsv4::cuda::run, argc, argv);
}
