// run_sparse_attention_prefill against cpu::sparse_attention on the paged KV cache: bf16 and fp8 entries, chunks of
// consecutive queries per sequence (prefill) with V4-Flash (H 64) and V4-Pro (H 128) heads, window rings that wrap,
// window-only and window + compressed (top-k with −1 holes) slot lists whose lengths are not multiples of the 64-entry
// block (odd block counts, a lone partial block), per-query compressed counts with live rows past each count, a query
// without entries, padded head blocks, 1-entry pages, fp32/bf16 q and output, a rope_dim other than 64. Fresh random
// inputs per case, outputs poisoned with NaN plus a guard region, every element checked.
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
#include "backends/cuda/kernels/sparse_attention_prefill.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/bounded_synchronize.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

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
  AttentionDtype q_dtype = AttentionDtype::F32, out_dtype = AttentionDtype::F32;
  bool empty_query = false;     // add a query whose slots are all −1
  int page_rows = 16;           // KV cache entries per page
  bool counts = false;          // per-query compressed_counts; the slots past a query's count hold live rows
};

void compare_with_cpu(const AttentionCase& c, SparseAttentionParams call, const std::vector<float>& expected,
                      const std::vector<double>& magnitude);

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
  compare_with_cpu(c, {.cache = view, .layer = kLayer, .tokens = T, .heads = H, .softmax_scale = scale,
                       .q = d_q.data(), .q_dtype = c.q_dtype, .attn_sink = d_sink.as<float>(),
                       .sequence_slots = d_slots.as<int32_t>(), .positions = d_pos.as<int64_t>(),
                       .rope_frequencies = d_freq.as<float>(), .window_index = d_window.as<int32_t>(),
                       .window_slots = c.window, .compressed_index = d_compressed.as<int32_t>(),
                       .compressed_slots = c.compressed_slots,
                       .compressed_counts = c.counts ? d_counts.as<int32_t>() : nullptr, .out_dtype = c.out_dtype},
                   expected, magnitude);
}

// One run of `call` (its output filled in here, poisoned first) against the CPU's `expected`, within the tolerance
// that `magnitude` scales.
void compare_with_cpu(const AttentionCase& c, SparseAttentionParams call, const std::vector<float>& expected,
                      const std::vector<double>& magnitude) {
  const int64_t T = call.tokens;
  const int H = call.heads, D = c.head_dim;
  const size_t out_elements = size_t(T * H * D), element_bytes = c.out_dtype == AttentionDtype::F32 ? 4 : 2;
  constexpr size_t kGuardBytes = 256;
  DeviceBuffer d_out(out_elements * element_bytes + kGuardBytes, "out");
  d_out.fill_bytes(0xFF);
  call.out = d_out.data();
  run_sparse_attention_prefill(call);
  synchronize_or_exit(c.name);
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
    if (c.out_dtype == AttentionDtype::Bf16) tolerance += std::ldexp(std::fabs(want), -8);  // the output rounding
    const double error = std::fabs(double(got) - want);
    worst = std::max(worst, error / tolerance);
    if (!(std::isfinite(got) && error <= tolerance) && ++failures <= 10)
      ADD_FAILURE() << "out[t=" << i / size_t(H * D) << ", h=" << (i / size_t(D)) % size_t(H) << ", d=" << i % size_t(D)
                    << "] = " << got << ", expected " << want << ", tolerance " << tolerance;
  }
  EXPECT_EQ(failures, 0) << failures << " mismatches of " << out_elements;
  for (size_t b = out_elements * element_bytes; b < raw.size(); ++b)
    ASSERT_EQ(raw[b], 0xFF) << "write past the end of out at byte " << b;
  std::printf("  %-28s %-13s T=%lld H=%d D=%d: worst error/tolerance %.3f\n", c.name, to_string(c.format),
              static_cast<long long>(T), H, D, worst);
}

constexpr KvEntryFormat kFormats[] = {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16};

TEST(SparseAttentionPrefill, FlashChunksMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 100;
  for (const KvEntryFormat format : kFormats) {
    // CSA: window 128 (wrapped) + 512 top-k slots = 5 pairs of blocks; two sequences of different lengths.
    check_attention({"flash csa chunk", format, 512, 64, 64, 128, 128, 512, {300, 2100}, 12}, seed++);
    // SWA: window only, one pair of blocks (the second empty); the first queries see few entries.
    check_attention({"flash swa chunk", format, 512, 64, 64, 128, 160, 0, {40, 150}, 20}, seed++);
    // HCA with per-query counts: 128 + 100 slots (4 blocks, the last partial), slots past a count hold live rows.
    AttentionCase hca{"flash hca chunk counts", format, 512, 64, 64, 128, 128, 100, {3000, 700}, 8};
    hca.counts = true;
    check_attention(hca, seed++);
  }
}

TEST(SparseAttentionPrefill, ProChunksMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 200;
  for (const KvEntryFormat format : kFormats)
    check_attention({"pro csa chunk bf16 io", format, 512, 64, 128, 128, 128, 512, {5000, 90}, 6, AttentionDtype::Bf16,
                     AttentionDtype::Bf16},
                    seed++);
}

TEST(SparseAttentionPrefill, OddShapesMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  for (const KvEntryFormat format : kFormats) {
    // A padded head block (48 of 64 heads), 24 + 77 slots (2 blocks, one pair), a query without entries.
    check_attention({"h48 padded", format, 512, 64, 48, 24, 24, 77, {90, 400, 7}, 2, AttentionDtype::Bf16,
                     AttentionDtype::Bf16, true},
                    seed++);
    // Two head blocks, the second padded (96 heads); one head; a lone partial block of 5 window slots.
    check_attention({"h96", format, 512, 64, 96, 16, 16, 200, {1000}, 3}, seed++);
    check_attention({"h1", format, 512, 64, 1, 8, 12, 40, {100, 9}, 3, AttentionDtype::Bf16}, seed++);
    check_attention({"window 5", format, 512, 64, 64, 5, 8, 0, {30, 3}, 4}, seed++);
    // 1-entry pages: every entry on its own page.
    check_attention({"1-entry pages", format, 512, 64, 64, 16, 16, 150, {200, 50}, 2, AttentionDtype::F32,
                     AttentionDtype::F32, false, 1},
                    seed++);
  }
  // bf16 entries with 128 rope dims (the inverse RoPE over both consumers' ranges is the same table).
  check_attention({"bf16 rope 128", KvEntryFormat::Bf16, 512, 128, 64, 32, 40, 96, {500}, 3}, seed++);
}

TEST(SparseAttentionPrefill, RefusesUnsupportedCalls) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  KvCache small_cache({.format = KvEntryFormat::Bf16, .head_dim = 256, .rope_dim = 64, .layers = 1,
                       .max_sequences = 1, .window_capacity = 8, .page_rows = 8, .pages = 1});
  KvCache cache({.format = KvEntryFormat::Bf16, .head_dim = 512, .rope_dim = 64, .layers = 1, .max_sequences = 1,
                 .window_capacity = 8, .page_rows = 8, .pages = 1});
  DeviceBuffer buffer(1 << 20, "scratch");
  const SparseAttentionParams good{.cache = cache.view(), .tokens = 1, .heads = 64, .softmax_scale = 0.05f,
                                   .q = buffer.data(), .sequence_slots = buffer.as<int32_t>(),
                                   .window_index = buffer.as<int32_t>(), .window_slots = 8, .out = buffer.data()};
  EXPECT_NO_THROW(check_sparse_attention_prefill_params(good));
  SparseAttentionParams p = good;
  p.cache = small_cache.view();
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "head_dim 256");
  p = good;
  p.splits = 2;
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "splits 2");
  p = good;
  p.compressed_slots = 4;
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "without compressed_index");
  p = good;
  p.q = static_cast<const uint8_t*>(p.q) + 4;
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "16-byte aligned");
  p = good;
  p.rope_frequencies = buffer.as<float>();
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "positions");
  p = good;
  p.layer = 1;
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "layer 1");
}

}  // namespace
}  // namespace dsv4::cuda
