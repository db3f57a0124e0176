// The case harness of the sparse attention tests (test_sparse_attention, test_sparse_attention_prefill): a paged KV
// cache of random bf16 or fp8 entries for a few sequences, the queries at each sequence's last positions with their
// window slots in ring order and random compressed slots with −1 holes (and optional per-query compressed counts whose
// slots past each count hold live rows), the CPU reference output and the tolerance's scale per output, and the device
// inputs with the call that reads them. Both tests draw the same inputs for the same case and seed.
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cpu/attention.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/device_buffers.hpp"

namespace dsv4::cuda {

// Stores `values` (already representable: bf16, or round_kv_reference output for fp8) in the entry layout.
inline void encode_entry(const KvEntryLayout& layout, const float* values, uint8_t* entry) {
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

// What prepare_sparse_attention_case builds: the cache and device inputs that `call` points into, the CPU's output
// and the tolerance's scale per output (Σ_j w_j |v_j|).
struct SparseAttentionCaseData {
  std::unique_ptr<KvCache> cache;
  std::vector<float> expected;
  std::vector<double> magnitude;
  DeviceBuffer q, sink, slots, positions, frequencies, window_index, compressed_index, counts;
  SparseAttentionParams call;  // every input; out, splits, workspace and the routing flags left to the test
};

// Builds `data` for case `c` (a test's AttentionCase: name, format, head_dim, rope_dim, heads, window,
// window_capacity, compressed_slots, lengths, queries_per_sequence, q_dtype, out_dtype, empty_query, page_rows,
// counts) from random inputs drawn with `seed`. Call it through ASSERT_NO_FATAL_FAILURE.
template <class Case>
void prepare_sparse_attention_case(const Case& c, uint32_t seed, SparseAttentionCaseData& data) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int D = c.head_dim, H = c.heads, S = int(c.lengths.size());
  constexpr int kLayers = 2, kLayer = 1;
  const int page_rows = c.page_rows;
  const int64_t max_compressed = 1024;
  data.cache = std::make_unique<KvCache>(
      KvCacheConfig{.format = c.format, .head_dim = D, .rope_dim = c.rope_dim, .layers = kLayers, .max_sequences = S,
                    .window_capacity = c.window_capacity, .max_compressed_rows = max_compressed,
                    .page_rows = page_rows, .pages = 2 * S * (max_compressed + c.window_capacity) / page_rows + 8});
  KvCache& cache = *data.cache;
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

  std::vector<float>& expected = data.expected;
  expected.resize(static_cast<size_t>(T * H * D));
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
  cpu::sparse_attention(inputs, cpu::SparseAttentionParams{T, H, D, scale, c.window, c.compressed_slots},
                        expected.data());

  // The tolerance's scale per output: Σ_j w_j |v_j| over the query's entries (the GPU rounds each weight to bf16,
  // relative error ≤ 2^-9, and sums in another order), in double from the same inputs.
  std::vector<double>& magnitude = data.magnitude;
  magnitude.assign(static_cast<size_t>(T * H * D), 0.0);
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
  data.q = c.q_dtype == AttentionDtype::F32 ? to_device(q, "q") : to_device(q_bf16, "q bf16");
  data.sink = to_device(sink, "sink");
  data.slots = to_device(slots, "slots");
  data.positions = to_device(positions, "positions");
  data.frequencies = to_device(rope.frequencies(), "frequencies");
  data.window_index = to_device(window_index, "window index");
  data.compressed_index = to_device(compressed_index, "compressed index");
  data.counts = to_device(c.counts ? counts : std::vector<int32_t>{0}, "compressed counts");
  data.call = SparseAttentionParams{
      .cache = view, .layer = kLayer, .tokens = T, .heads = H, .softmax_scale = scale, .q = data.q.data(),
      .q_dtype = c.q_dtype, .attn_sink = data.sink.as<float>(), .sequence_slots = data.slots.as<int32_t>(),
      .positions = data.positions.as<int64_t>(), .rope_frequencies = data.frequencies.as<float>(),
      .window_index = data.window_index.as<int32_t>(), .window_slots = c.window,
      .compressed_index = data.compressed_index.as<int32_t>(), .compressed_slots = c.compressed_slots,
      .compressed_counts = c.counts ? data.counts.as<int32_t>() : nullptr, .out_dtype = c.out_dtype};
}

// What check_attention_output found: mismatches (NaN included) and the worst error over its tolerance.
struct AttentionOutputCheck {
  int failures = 0;
  double worst = 0;
};

// Checks the first T·H·D elements (out_dtype) of the downloaded output `raw` against the CPU's `expected` within
// 1e-6 + magnitude·2^-7, plus magnitude·2^-9 where `bf16_partials` (each split's share rounded once more), plus
// |expected|·2^-8 for a bf16 output (its rounding); adds a failure for each of the first 10 mismatches.
inline AttentionOutputCheck check_attention_output(const std::vector<uint8_t>& raw, AttentionDtype out_dtype, int H,
                                                   int D, const std::vector<float>& expected,
                                                   const std::vector<double>& magnitude, bool bf16_partials) {
  AttentionOutputCheck result;
  for (size_t i = 0; i < expected.size(); ++i) {
    float got;
    if (out_dtype == AttentionDtype::F32) {
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
    if (bf16_partials) tolerance += std::ldexp(magnitude[i], -9);
    if (out_dtype == AttentionDtype::Bf16) tolerance += std::ldexp(std::fabs(want), -8);  // the output rounding
    const double error = std::fabs(double(got) - want);
    result.worst = std::max(result.worst, error / tolerance);
    if (!(std::isfinite(got) && error <= tolerance) && ++result.failures <= 10)
      ADD_FAILURE() << "out[t=" << i / size_t(H * D) << ", h=" << (i / size_t(D)) % size_t(H) << ", d=" << i % size_t(D)
                    << "] = " << got << ", expected " << want << ", tolerance " << tolerance;
  }
  return result;
}

}  // namespace dsv4::cuda
