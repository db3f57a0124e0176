// run_sparse_attention against cpu::sparse_attention on the paged KV cache: bf16 and fp8 entries, V4-Flash
// (H 64, D 512) and V4-Pro (H 128) shapes and tiny head dims with odd head counts, window rings that wrap, −1 slots,
// a query with no entries, several sequences of different lengths in one batch, one split and many (the
// log-sum-exp merge: by the combine kernel, and by the head_dim 512 kernel's cluster merge for 2-16 splits), fp32/bf16
// q and output. Every case runs both merge modes on the same inputs. Fresh random inputs per case, outputs poisoned
// with NaN plus a guard region, every element checked; per-query compressed counts with live rows past each count.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/attention.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/expect_error.hpp"
#include "support/device_buffers.hpp"

namespace dsv4::cuda {
namespace {

// Stores `values` (already representable: bf16, or round_kv_reference output for fp8) in the entry layout.
void encode_entry(const KvEntryLayout& layout, const float* values, uint8_t* entry) {
  std::memset(entry, 0, size_t(layout.entry_bytes));
  if (layout.format == KvEntryFormat::Bf16) {
    for (int d = 0; d < layout.head_dim; ++d) {
      const uint16_t bits = float_to_bf16(values[d]);
      std::memcpy(entry + 2 * d, &bits, 2);
    }
    return;
  }
  for (int b = 0; b < layout.scale_blocks; ++b) {
    const int end = std::min((b + 1) * kKvFp8BlockSize, layout.nope_dim);
    float amax = 0;
    for (int d = b * kKvFp8BlockSize; d < end; ++d) amax = std::max(amax, std::fabs(values[d]));
    const uint8_t code = float_to_e8m0_ceil(std::max(amax, 1e-4f) / kE4m3Max);
    entry[layout.scale_offset + b] = code;
    for (int d = b * kKvFp8BlockSize; d < end; ++d) entry[d] = float_to_e4m3(values[d] / e8m0_to_float(code));
  }
  for (int d = 0; d < layout.rope_dim; ++d) {
    const uint16_t bits = float_to_bf16(values[layout.nope_dim + d]);
    std::memcpy(entry + layout.rope_offset + 2 * d, &bits, 2);
  }
}

struct AttentionCase {
  const char* name;
  KvEntryFormat format;
  int head_dim, rope_dim, heads;
  int window, window_capacity;  // model window and ring rows
  int compressed_slots;         // per query (0 = window only)
  std::vector<int64_t> lengths; // tokens per sequence (each sequence gets one query at its last position ...)
  int queries_per_sequence;     // ... or the last few positions
  int splits;                   // 0 = choose_sparse_attention_splits (for each merge mode)
  AttentionDtype q_dtype = AttentionDtype::F32, out_dtype = AttentionDtype::F32;
  bool empty_query = false;     // add a query whose slots are all −1
  int page_rows = 16;           // KV cache entries per page
  bool counts = false;          // per-query compressed_counts; the slots past a query's count hold live rows
  bool bf16_partials = false;   // the cluster merge exchanges bf16 partials (cluster_merge_bf16_partials)
  int head_split_tiles = -1;    // ≥ 0: also run the head-split path (this head_split_tiles), which must serve it
  bool prefill_kernel = false;  // route prefill-sized calls to run_sparse_attention_prefill (which must serve it)
};

void compare_with_cpu(const AttentionCase& c, bool cluster_merge, SparseAttentionParams call,
                      const std::vector<float>& expected, const std::vector<double>& magnitude);

void check_attention(const AttentionCase& c, uint32_t seed) {
  SCOPED_TRACE(std::string(c.name) + " " + to_string(c.format) + " seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int D = c.head_dim, H = c.heads, S = int(c.lengths.size());
  constexpr int kLayers = 2, kLayer = 1;
  const int page_rows = c.page_rows;
  const int64_t max_compressed = 1024;
  KvCache cache({.format = c.format, .head_dim = D, .rope_dim = c.rope_dim, .layers = kLayers, .max_sequences = S,
                 .window_capacity = c.window_capacity, .max_compressed_rows = max_compressed, .page_rows = page_rows,
                 .pages = 2 * S * (max_compressed + c.window_capacity) / page_rows + 8});
  const KvEntryLayout& layout = cache.layout();

  // Host copies of every logical row: window rows of sequence s at s·capacity + row, compressed at s·max + row.
  std::vector<float> window_kv(static_cast<size_t>(S * c.window_capacity * D), 0.0f);
  std::vector<float> compressed_kv(static_cast<size_t>(S * max_compressed * D), 0.0f);
  std::vector<int64_t> compressed_count(static_cast<size_t>(S));
  const auto random_entry = [&](float* v) {
    const float magnitude = std::ldexp(1.0f, int(rng() % 5) - 2);
    for (int d = 0; d < D; ++d) v[d] = normal(rng) * magnitude;
    if (c.format == KvEntryFormat::Fp8Reference)
      cpu::round_kv_reference(v, 1, D, c.rope_dim);
    else
      for (int d = 0; d < D; ++d) v[d] = round_to_bf16(v[d]);
  };
  std::vector<uint8_t> entry(static_cast<size_t>(layout.entry_bytes));
  for (int s = 0; s < S; ++s) ASSERT_EQ(cache.add_sequence(), s);
  // Interleave the sequences' allocations so logical neighbours live on scattered pages.
  for (int s = 0; s < S; ++s)
    cache.ensure_rows(s, kLayer, KvArray::Window, std::min<int64_t>(c.window_capacity, c.lengths[size_t(s)]));
  for (int s = S - 1; s >= 0; --s) {
    compressed_count[size_t(s)] =
        c.compressed_slots > 0 ? std::min<int64_t>(max_compressed, c.lengths[size_t(s)] / 4 + 1) : 0;
    cache.ensure_rows(s, kLayer, KvArray::Compressed, compressed_count[size_t(s)]);
  }
  cache.upload_page_table(nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const KvCacheView view = cache.view();
  std::vector<int32_t> table(static_cast<size_t>(S * kLayers * 2 * view.max_pages_per_array));
  ASSERT_EQ(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  const auto upload_row = [&](int s, KvArray array, int64_t row, const float* values) {
    const int32_t* pages = &table[size_t(((s * kLayers + kLayer) * 2 + int(array)) * view.max_pages_per_array)];
    const int64_t physical = int64_t(pages[row / page_rows]) * page_rows + row % page_rows;
    encode_entry(layout, values, entry.data());
    ASSERT_EQ(cudaMemcpy(view.pool + physical * layout.entry_bytes, entry.data(), entry.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
  };
  for (int s = 0; s < S; ++s) {
    for (int64_t r = 0; r < std::min<int64_t>(c.window_capacity, c.lengths[size_t(s)]); ++r) {
      float* v = &window_kv[size_t((s * c.window_capacity + r) * D)];
      random_entry(v);
      upload_row(s, KvArray::Window, r, v);
    }
    for (int64_t r = 0; r < compressed_count[size_t(s)]; ++r) {
      float* v = &compressed_kv[size_t((s * max_compressed + r) * D)];
      random_entry(v);
      upload_row(s, KvArray::Compressed, r, v);
    }
  }

  // Queries: the last positions of each sequence; their window slots in ring order, compressed slots a random
  // choice of the sequence's entries with −1 holes.
  std::vector<int32_t> slots, window_index, compressed_index, cpu_window_index, cpu_compressed_index;
  std::vector<int64_t> positions;
  for (int s = 0; s < S; ++s)
    for (int k = std::min<int>(c.queries_per_sequence, int(c.lengths[size_t(s)])) - 1; k >= 0; --k) {
      const int64_t p = c.lengths[size_t(s)] - 1 - k;
      slots.push_back(s);
      positions.push_back(p);
      const int64_t lo = std::max<int64_t>(0, p - (c.window - 1));
      for (int w = 0; w < c.window; ++w) {
        const int64_t pos = lo + w;
        const int32_t row = pos <= p ? int32_t(pos % c.window_capacity) : -1;
        window_index.push_back(row);
        cpu_window_index.push_back(row < 0 ? -1 : s * c.window_capacity + row);
      }
      std::vector<int32_t> rows(static_cast<size_t>(compressed_count[size_t(s)]));
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng);
      for (int w = 0; w < c.compressed_slots; ++w) {
        const int32_t row = w < int(rows.size()) && rng() % 8 != 0 ? rows[size_t(w)] : -1;
        compressed_index.push_back(row);
        cpu_compressed_index.push_back(row < 0 ? -1 : int32_t(s * max_compressed + row));
      }
    }
  if (c.empty_query) {
    slots.push_back(0);
    positions.push_back(c.lengths[0] - 1);
    window_index.insert(window_index.end(), size_t(c.window), -1);
    cpu_window_index.insert(cpu_window_index.end(), size_t(c.window), -1);
    compressed_index.insert(compressed_index.end(), size_t(c.compressed_slots), -1);
    cpu_compressed_index.insert(cpu_compressed_index.end(), size_t(c.compressed_slots), -1);
  }
  const int64_t T = int64_t(slots.size());

  // Per-query counts (none, all, past the bound and negative, which clamp, and random): the GPU's slots past a
  // count hold rows of live entries (any read of them changes the result), the CPU's are unused.
  std::vector<int32_t> counts;
  if (c.counts)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t choices[] = {0, c.compressed_slots, c.compressed_slots + 5, -3,
                                 int32_t(rng() % uint32_t(c.compressed_slots + 1))};
      const int32_t count = choices[t % 2 == 0 ? (t / 2) % 4 : 4];
      counts.push_back(count);
      const int64_t live = compressed_count[size_t(slots[size_t(t)])];
      for (int w = std::clamp(count, 0, c.compressed_slots); w < c.compressed_slots; ++w) {
        const size_t i = size_t(t * c.compressed_slots + w);
        compressed_index[i] = live > 0 ? int32_t(rng() % uint64_t(live)) : -1;
        cpu_compressed_index[i] = -1;
      }
    }

  std::vector<float> q(static_cast<size_t>(T * H * D)), sink(static_cast<size_t>(H));
  for (float& v : q) v = round_to_bf16(normal(rng) * 2.0f);  // the kernel's MMA input is bf16 q
  for (float& v : sink) v = normal(rng);
  if (H > 1) sink[1] = -std::numeric_limits<float>::infinity();  // a head without a sink
  const cpu::RopeTable rope(160000.0, c.rope_dim, cpu::YarnScaling{16.0, 65536, 32.0, 1.0});

  std::vector<float> expected(static_cast<size_t>(T * H * D));
  cpu::SparseAttentionInputs inputs;
  inputs.q = q.data();
  inputs.attn_sink = sink.data();
  inputs.window_kv = window_kv.data();
  inputs.window_rows = S * c.window_capacity;
  inputs.window_index = cpu_window_index.data();
  inputs.compressed_kv = compressed_kv.data();
  inputs.compressed_rows = S * max_compressed;
  inputs.compressed_index = c.compressed_slots > 0 ? cpu_compressed_index.data() : nullptr;
  inputs.positions = positions.data();
  inputs.rope = &rope;
  const float scale = 1.0f / std::sqrt(float(D));
  cpu::sparse_attention(inputs, {T, H, D, scale, c.window, c.compressed_slots}, expected.data());

  // The tolerance's scale per output: Σ_j w_j |v_j| over the query's entries (the GPU rounds each weight to bf16,
  // relative error ≤ 2^-9, and sums in another order), in double from the same inputs.
  std::vector<double> magnitude(static_cast<size_t>(T * H * D), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<const float*> kv;
    for (int w = 0; w < c.window; ++w)
      if (cpu_window_index[size_t(t * c.window + w)] >= 0)
        kv.push_back(&window_kv[size_t(cpu_window_index[size_t(t * c.window + w)]) * D]);
    for (int w = 0; w < c.compressed_slots; ++w)
      if (cpu_compressed_index[size_t(t * c.compressed_slots + w)] >= 0)
        kv.push_back(&compressed_kv[size_t(cpu_compressed_index[size_t(t * c.compressed_slots + w)]) * D]);
    for (int h = 0; h < H; ++h) {
      std::vector<double> score(kv.size());
      double mx = -1e300, den = 0;
      for (size_t j = 0; j < kv.size(); ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += double(q[size_t((t * H + h) * D + d)]) * kv[j][d];
        score[j] = dot * scale;
        mx = std::max(mx, score[j]);
      }
      for (double& sc : score) den += (sc = std::exp(sc - mx));
      if (std::isfinite(sink[size_t(h)])) den += std::exp(double(sink[size_t(h)]) - mx);
      for (size_t j = 0; j < kv.size(); ++j)
        for (int d = 0; d < D; ++d) {
          // The inverse RoPE mixes the two dims of a pair: take both.
          const double v = d >= D - c.rope_dim ? std::fabs(kv[j][d]) + std::fabs(kv[j][d ^ 1]) : std::fabs(kv[j][d]);
          magnitude[size_t((t * H + h) * D + d)] += score[j] / den * v;
        }
    }
  }

  std::vector<uint16_t> q_bf16(q.size());
  for (size_t i = 0; i < q.size(); ++i) q_bf16[i] = float_to_bf16(q[i]);
  DeviceBuffer d_q = c.q_dtype == AttentionDtype::F32 ? to_device(q, "q") : to_device(q_bf16, "q bf16");
  DeviceBuffer d_sink = to_device(sink, "sink"), d_slots = to_device(slots, "slots"),
               d_pos = to_device(positions, "positions"), d_freq = to_device(rope.frequencies(), "frequencies"),
               d_window = to_device(window_index, "window index"),
               d_compressed = to_device(compressed_index, "compressed index");
  DeviceBuffer d_counts = to_device(c.counts ? counts : std::vector<int32_t>{0}, "compressed counts");
  const SparseAttentionParams call{.cache = view, .layer = kLayer, .tokens = T, .heads = H, .softmax_scale = scale,
                                   .q = d_q.data(), .q_dtype = c.q_dtype, .attn_sink = d_sink.as<float>(),
                                   .sequence_slots = d_slots.as<int32_t>(), .positions = d_pos.as<int64_t>(),
                                   .rope_frequencies = d_freq.as<float>(), .window_index = d_window.as<int32_t>(),
                                   .window_slots = c.window, .compressed_index = d_compressed.as<int32_t>(),
                                   .compressed_slots = c.compressed_slots,
                                   .compressed_counts = c.counts ? d_counts.as<int32_t>() : nullptr,
                                   .out_dtype = c.out_dtype, .cluster_merge_bf16_partials = c.bf16_partials,
                                   .head_split = false, .prefill_kernel = c.prefill_kernel};
  if (c.prefill_kernel) ASSERT_TRUE(sparse_attention_uses_prefill_kernel(call)) << "not routed to the prefill kernel";
  for (const bool cluster_merge : {false, true}) {
    SparseAttentionParams merged = call;
    merged.cluster_merge = cluster_merge;
    compare_with_cpu(c, cluster_merge, merged, expected, magnitude);
  }
  if (c.head_split_tiles >= 0) {
    SparseAttentionParams head_split = call;
    head_split.head_split = true;
    head_split.head_split_tiles = c.head_split_tiles;
    ASSERT_GT(sparse_attention_head_split_splits(head_split), 0) << "the head-split path does not serve the case";
    compare_with_cpu(c, true, head_split, expected, magnitude);
  }
}

// One run of `call` (its splits, workspace and output filled in here; poisoned first) against the CPU's `expected`,
// within the tolerance that `magnitude` scales.
void compare_with_cpu(const AttentionCase& c, bool cluster_merge, SparseAttentionParams call,
                      const std::vector<float>& expected, const std::vector<double>& magnitude) {
  SCOPED_TRACE(call.head_split ? "head split" : cluster_merge ? "cluster merge" : "combine kernel");
  const int64_t T = call.tokens;
  const int H = call.heads, D = c.head_dim;
  const int splits = c.splits > 0 ? c.splits
                                  : choose_sparse_attention_splits(T, H, D, c.format, c.window + c.compressed_slots,
                                                                   list_devices()[0].multiprocessors, cluster_merge);
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(T, H, D, splits)), "workspace");
  workspace.fill_bytes(0xFF);
  const size_t out_elements = size_t(T * H * D), element_bytes = c.out_dtype == AttentionDtype::F32 ? 4 : 2;
  constexpr size_t kGuardBytes = 256;
  DeviceBuffer d_out(out_elements * element_bytes + kGuardBytes, "out");
  d_out.fill_bytes(0xFF);
  call.out = d_out.data();
  call.splits = splits;
  call.workspace = workspace.data();
  call.workspace_bytes = workspace.bytes();
  run_sparse_attention(call);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> raw(out_elements * element_bytes + kGuardBytes);
  d_out.download(raw.data(), raw.size());

  int failures = 0;
  double worst = 0;
  for (size_t i = 0; i < out_elements; ++i) {
    float got;
    if (c.out_dtype == AttentionDtype::F32) {
      std::memcpy(&got, &raw[4 * i], 4);
    } else {
      uint16_t bits;
      std::memcpy(&bits, &raw[2 * i], 2);
      got = bf16_to_float(bits);
    }
    const double want = expected[i];
    double tolerance = 1e-6 + std::ldexp(magnitude[i], -7);
    // bf16 partials: each split's share of the output is rounded once more (2^-9 relative, the shares' magnitudes
    // summing to at most magnitude[i]).
    if (c.bf16_partials && cluster_merge) tolerance += std::ldexp(magnitude[i], -9);
    if (c.out_dtype == AttentionDtype::Bf16) tolerance += std::ldexp(std::fabs(want), -8);  // the output rounding
    const double error = std::fabs(double(got) - want);
    worst = std::max(worst, error / tolerance);
    if (!(std::isfinite(got) && error <= tolerance) && ++failures <= 10)
      ADD_FAILURE() << "out[t=" << i / size_t(H * D) << ", h=" << (i / size_t(D)) % size_t(H) << ", d=" << i % size_t(D)
                    << "] = " << got << ", expected " << want << ", tolerance " << tolerance;
  }
  EXPECT_EQ(failures, 0) << failures << " mismatches of " << out_elements << " (splits " << splits << ")";
  for (size_t b = out_elements * element_bytes; b < raw.size(); ++b)
    ASSERT_EQ(raw[b], 0xFF) << "write past the end of out at byte " << b;
  const int reported_splits = call.head_split ? sparse_attention_head_split_splits(call) : splits;
  std::printf("  %-28s %-13s T=%lld H=%d D=%d splits=%d %s: worst error/tolerance %.3f\n", c.name,
              to_string(c.format), static_cast<long long>(T), H, D, reported_splits,
              call.head_split ? "head split" : cluster_merge ? "cluster" : "combine", worst);
}

TEST(SparseAttention, FlashShapesMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 10;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    // CSA decode: window 128 (wrapped) + 512 top-k slots; three sequences of different lengths.
    check_attention({"flash csa decode", format, 512, 64, 64, 128, 128, 512, {300, 2100, 129}, 1, 0}, seed++);
    check_attention({"flash csa decode 1 split", format, 512, 64, 64, 128, 128, 512, {300, 2100, 129}, 1, 1}, seed++);
    // A few queries per sequence (prefill-like), ring with room for the chunk, window only.
    check_attention({"flash swa chunk", format, 512, 64, 64, 128, 160, 0, {40, 150}, 20, 0}, seed++);
  }
}

TEST(SparseAttention, ProShapesMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_attention({"pro hca decode", KvEntryFormat::Fp8Reference, 512, 64, 128, 128, 128, 100, {3000, 700}, 1, 0},
                  20);
  check_attention({"pro csa 7 splits bf16 io", KvEntryFormat::Bf16, 512, 64, 128, 128, 128, 512, {5000}, 2, 7,
                   AttentionDtype::Bf16, AttentionDtype::Bf16},
                  21);
}

TEST(SparseAttention, TinyHeadDimsOddHeadCountsAndEmptyQueries) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 30;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    check_attention({"tiny d64 h3", format, 64, 16, 3, 8, 12, 5, {3, 40, 17}, 3, 0, AttentionDtype::F32,
                     AttentionDtype::F32, true},
                    seed++);
    check_attention({"tiny d64 h3 split 2", format, 64, 16, 3, 8, 8, 40, {100, 9}, 2, 2, AttentionDtype::Bf16,
                     AttentionDtype::F32, true},
                    seed++);
    check_attention({"d128 h20", format, 128, 64, 20, 16, 16, 64, {70, 33}, 2, 0}, seed++);
    check_attention({"d256 h40", format, 256, 64, 40, 32, 40, 96, {500}, 3, 0, AttentionDtype::F32,
                     AttentionDtype::Bf16},
                    seed++);
    check_attention({"d512 h5", format, 512, 64, 5, 16, 16, 33, {64, 1}, 1, 3, AttentionDtype::F32,
                     AttentionDtype::F32, true},
                    seed++);
  }
}

// head_dim 512 with more than 32 heads takes the wgmma kernel: a padded head block (48 of 64 heads), partial tiles,
// bf16 q and output; and its fallback to the mma.sync kernel for fp8 entries on 1-entry pages.
TEST(SparseAttention, WideHeadBlocksAndOneEntryPages) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 40;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    check_attention({"d512 h48", format, 512, 64, 48, 24, 24, 77, {90, 400, 7}, 2, 0, AttentionDtype::Bf16,
                     AttentionDtype::Bf16, true},
                    seed++);
    check_attention({"d512 h96 3 splits", format, 512, 64, 96, 128, 128, 200, {1000}, 1, 3}, seed++);
    check_attention({"d512 h64 1-entry pages", format, 512, 64, 64, 16, 16, 40, {200, 50}, 1, 0,
                     AttentionDtype::F32, AttentionDtype::F32, false, 1},
                    seed++);
  }
}

// compressed_counts: a shared slot bound (HCA's max_context / ratio) with each query's own count; both kernels,
// one split and many (splits past a query's count hold no tiles).
TEST(SparseAttention, PerQueryCompressedCounts) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 50;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    AttentionCase flash{"flash hca bounded", format, 512, 64, 64, 128, 128, 600, {3000, 700, 129, 2100}, 1, 0};
    flash.counts = true;
    check_attention(flash, seed++);
    flash.name = "flash hca bounded 6 splits";
    flash.splits = 6;
    check_attention(flash, seed++);
    AttentionCase pro{"pro csa bounded chunk", format, 512, 64, 128, 128, 160, 512, {5000, 90}, 3, 1};
    pro.counts = true;
    check_attention(pro, seed++);
    AttentionCase tiny{"tiny d64 h3 bounded", format, 64, 16, 3, 8, 12, 70, {300, 40, 17}, 2, 3,
                       AttentionDtype::F32, AttentionDtype::F32, true};
    tiny.counts = true;
    check_attention(tiny, seed++);
    AttentionCase d256{"d256 h40 bounded", format, 256, 64, 40, 32, 40, 200, {900, 3}, 2, 0};
    d256.counts = true;
    check_attention(d256, seed++);
  }
}

// The cluster merge at every cluster size on the DSV4 shapes: batch-1 SWA decode (the window only), CSA decode with
// splits whose slot ranges are empty for short queries, per-query counts, a query without entries, Pro's two head
// blocks and a padded head block.
TEST(SparseAttention, ClusterMergeEverySplitCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 60;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    check_attention({"flash swa decode batch 1", format, 512, 64, 64, 128, 128, 0, {300}, 1, 0}, seed++);
    // Each merge unrolling (2, 4, 8, 16 splits) at and below its bound; 9-16: non-portable cluster sizes (the combine
    // kernel where the device holds no such cluster).
    for (const int splits : {2, 3, 4, 5, 8, 9, 11, 16}) {
      AttentionCase flash{"flash csa decode", format, 512, 64, 64, 128, 128, 512, {300, 2100, 40}, 1, splits,
                          AttentionDtype::F32, AttentionDtype::Bf16, true};
      flash.counts = splits % 2 == 1;
      check_attention(flash, seed++);
    }
    // bf16 partials at each merge unrolling (the combine kernel's run ignores the flag).
    for (const int splits : {2, 4, 5, 16}) {
      AttentionCase flash{"flash csa decode bf16 partials", format, 512, 64, 64, 128, 128, 512, {300, 2100, 40}, 1,
                          splits, AttentionDtype::F32, splits % 4 == 0 ? AttentionDtype::Bf16 : AttentionDtype::F32,
                          true};
      flash.counts = splits == 5;
      flash.bf16_partials = true;
      check_attention(flash, seed++);
    }
    check_attention({"pro csa decode 4 splits", format, 512, 64, 128, 128, 128, 512, {5000, 90}, 1, 4,
                     AttentionDtype::Bf16, AttentionDtype::F32},
                    seed++);
    check_attention({"d512 h48 7 splits", format, 512, 64, 48, 24, 24, 300, {900, 7}, 2, 7, AttentionDtype::F32,
                     AttentionDtype::F32, true},
                    seed++);
  }
}

// The head-split path (small-batch decode, 16-head groups, each split's entries resident, splits merged in a
// cluster) at every tile count per CTA: batch-1 SWA (one split, no merge), CSA with 2-20 splits, per-query counts
// (splits past a query's count), a short wrapped window with unused slots, a query without entries, Pro's 8 groups,
// a padded head group (H 40, 48), fp32/bf16 q and output, several queries in one launch.
TEST(SparseAttention, HeadSplitMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 70;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    for (int tiles = 0; tiles <= kSparseAttentionHeadSplitMaxTiles; ++tiles) {
      AttentionCase swa{"flash swa decode head split", format, 512, 64, 64, 128, 128, 0, {300}, 1, 0,
                        AttentionDtype::Bf16, AttentionDtype::Bf16};
      swa.head_split_tiles = tiles;
      check_attention(swa, seed++);
      // 20 tiles: 5, 7 or 10 splits (1 tile per CTA would need clusters of 20); three queries (one without
      // entries) keep the grid within one wave.
      AttentionCase csa{"flash csa decode head split", format, 512, 64, 64, 128, 128, 512, {300, 2100}, 1, 0,
                        tiles % 2 == 0 ? AttentionDtype::F32 : AttentionDtype::Bf16, AttentionDtype::F32, true};
      csa.counts = tiles % 2 == 1;
      csa.head_split_tiles = tiles == 1 ? 2 : tiles;
      check_attention(csa, seed++);
    }
    AttentionCase short_window{"swa short window head split", format, 512, 64, 64, 128, 128, 0, {50, 7}, 1, 0,
                               AttentionDtype::F32, AttentionDtype::Bf16, true};
    short_window.head_split_tiles = 2;
    check_attention(short_window, seed++);
    AttentionCase pro{"pro csa decode head split", format, 512, 64, 128, 128, 128, 512, {5000}, 1, 0,
                      AttentionDtype::Bf16, AttentionDtype::Bf16};
    pro.head_split_tiles = 4;
    check_attention(pro, seed++);
    AttentionCase pro_hca{"pro hca bounded head split", format, 512, 64, 128, 128, 128, 300, {3000}, 1, 0};
    pro_hca.counts = true;
    pro_hca.head_split_tiles = 3;
    check_attention(pro_hca, seed++);
    AttentionCase padded{"d512 h48 head split", format, 512, 64, 48, 24, 24, 77, {90, 400}, 2, 0,
                         AttentionDtype::Bf16, AttentionDtype::F32, true};
    padded.head_split_tiles = 1;
    check_attention(padded, seed++);
    AttentionCase h40{"d512 h40 head split", format, 512, 64, 40, 128, 128, 100, {1000}, 1, 0};
    h40.head_split_tiles = 0;
    check_attention(h40, seed++);
  }
}

// Prefill-sized calls (≥ two waves of CTAs, bf16 entries) routed to run_sparse_attention_prefill: a window-only chunk
// of 280 queries and a Pro chunk of 140 queries (two head blocks) with per-query counts; small windows and slot
// counts, since the CPU reference is the cost.
TEST(SparseAttention, PrefillCallsRoutedToThePrefillKernel) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  AttentionCase swa{"flash swa prefill chunk", KvEntryFormat::Bf16, 512, 64, 64, 128, 448, 0, {400}, 280, 0,
                    AttentionDtype::Bf16, AttentionDtype::Bf16};
  swa.prefill_kernel = true;
  check_attention(swa, 100);
  AttentionCase pro{"pro csa prefill chunk", KvEntryFormat::Bf16, 512, 64, 128, 64, 224, 32, {300, 900}, 70, 0};
  pro.prefill_kernel = true;
  pro.counts = true;
  check_attention(pro, 101);
}

// With the cluster merge the split heuristic stays within the largest cluster (no combine launch) for the DSV4 SWA and
// CSA calls (≤ 640 slots) at every batch size; a long HCA list at batch 1 takes the combine kernel, which pays there.
TEST(SparseAttention, ClusterMergeSplitsFitOneCluster) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int sms = list_devices()[0].multiprocessors, largest = max_sparse_attention_cluster_splits();
  std::printf("  largest cluster merge on this device: %d CTAs\n", largest);
  EXPECT_GE(largest, 8);  // the portable size holds on every Hopper part
  EXPECT_LE(largest, kSparseAttentionMaxClusterSplits);
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16})
    for (const int heads : {64, 128})
      for (const int64_t tokens : {1, 2, 3, 8, 16, 64, 256, 4096})
        for (const int64_t slots : {128, 160, 200, 640}) {
          const int splits = choose_sparse_attention_splits(tokens, heads, 512, format, slots, sms, true);
          EXPECT_GE(splits, 1);
          EXPECT_LE(splits, largest) << "heads " << heads << " tokens " << tokens << " slots " << slots;
        }
  EXPECT_GT(choose_sparse_attention_splits(1, 64, 512, KvEntryFormat::Fp8Reference, 8320, sms, true), largest);
}

TEST(SparseAttention, RefusesUnsupportedCalls) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  KvCache cache({.format = KvEntryFormat::Bf16, .head_dim = 96, .rope_dim = 32, .layers = 1, .max_sequences = 1,
                 .window_capacity = 8, .page_rows = 8, .pages = 1});
  KvCache good_cache({.format = KvEntryFormat::Bf16, .head_dim = 64, .rope_dim = 16, .layers = 1,
                      .max_sequences = 1, .window_capacity = 8, .page_rows = 8, .pages = 1});
  DeviceBuffer buffer(1 << 16, "scratch");
  const SparseAttentionParams good{.cache = good_cache.view(), .tokens = 1, .heads = 4, .softmax_scale = 0.125f,
                                   .q = buffer.data(), .sequence_slots = buffer.as<int32_t>(),
                                   .window_index = buffer.as<int32_t>(), .window_slots = 8, .out = buffer.data()};
  SparseAttentionParams p = good;
  p.cache = cache.view();
  testing::expect_error([&] { run_sparse_attention(p); }, "head_dim 96");
  p = good;
  p.splits = 4;
  testing::expect_error([&] { run_sparse_attention(p); }, "workspace");
  p = good;
  p.compressed_slots = 4;
  testing::expect_error([&] { run_sparse_attention(p); }, "without compressed_index");
  p = good;
  p.q = static_cast<const uint8_t*>(p.q) + 4;
  testing::expect_error([&] { run_sparse_attention(p); }, "16-byte aligned");
  p = good;
  p.rope_frequencies = buffer.as<float>();
  testing::expect_error([&] { run_sparse_attention(p); }, "positions");
  p = good;
  p.head_split_tiles = kSparseAttentionHeadSplitMaxTiles + 1;
  testing::expect_error([&] { run_sparse_attention(p); }, "head_split_tiles");
}

}  // namespace
}  // namespace dsv4::cuda
