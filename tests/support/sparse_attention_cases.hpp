// The case harness of the sparse attention tests (test_sparse_attention, test_sparse_attention_prefill): a paged KV
// cache of random bf16 or fp8 entries for a few sequences, the queries at each sequence's last positions with their
// window slots in ring order and random compressed slots with −1 holes (and optional per-query compressed counts whose
// slots past each count hold live rows), the CPU reference output and the tolerance's scale per output, and the device
// inputs with the call that reads them. Both tests draw the same inputs for the same case and seed. And the decode step
// the attention benches time (make_decode_step: DSV4 shapes, one sequence of random entries per query).
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
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda {

// A device copy of `host` (at least 16 bytes: an empty vector still gives a valid, aligned pointer). The harness's
// own, so that it needs neither the tests' nor the benches' helper header (each defines a to_device).
template <class T>
DeviceBuffer attention_case_upload(const std::vector<T>& host, const char* what) {
  DeviceBuffer buffer(std::max<size_t>(host.size() * sizeof(T), 16), what);
  if (!host.empty()) buffer.upload(host.data(), host.size() * sizeof(T));
  return buffer;
}

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
  data.q = c.q_dtype == AttentionDtype::F32 ? attention_case_upload(q, "q") : attention_case_upload(q_bf16, "q bf16");
  data.sink = attention_case_upload(sink, "sink");
  data.slots = attention_case_upload(slots, "slots");
  data.positions = attention_case_upload(positions, "positions");
  data.frequencies = attention_case_upload(rope.frequencies(), "frequencies");
  data.window_index = attention_case_upload(window_index, "window index");
  data.compressed_index = attention_case_upload(compressed_index, "compressed index");
  data.counts = attention_case_upload(c.counts ? counts : std::vector<int32_t>{0}, "compressed counts");
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


// ---- the decode step the attention benches time (bench_cuda_attention, bench_cuda_attention_prefill) ----

// The DSV4 decode layouts: SWA (the 128 window slots only), CSA (window + 512 top-k compressed slots of context / 4
// rows) and HCA (window + all context / 128 compressed rows).
enum class DecodeLayout { Swa, Csa, Hca };
inline constexpr int kDecodeHeadDim = 512, kDecodeRopeDim = 64, kDecodeWindow = 128, kDecodeTopK = 512,
                     kDecodePageRows = 64;

inline const char* to_string(DecodeLayout layout) {
  return layout == DecodeLayout::Swa ? "swa" : layout == DecodeLayout::Csa ? "csa" : "hca";
}

inline int64_t decode_compressed_rows(DecodeLayout layout, int64_t context) {
  return layout == DecodeLayout::Swa ? 0 : layout == DecodeLayout::Csa ? context / 4 : context / 128;
}

inline int decode_compressed_slots(DecodeLayout layout, int64_t context) {
  return layout == DecodeLayout::Csa ? kDecodeTopK : int(decode_compressed_rows(layout, context));
}

// Cache bytes of a decode step (what a bench skips above its limit before building it).
inline double decode_cache_bytes(KvEntryFormat format, DecodeLayout layout, int batch, int64_t context) {
  return double(batch) * double(decode_compressed_rows(layout, context) + kDecodeWindow) *
         KvEntryLayout::make(format, kDecodeHeadDim, kDecodeRopeDim).entry_bytes;
}

namespace decode_step_detail {

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  x ^= x >> 33;
  return uint32_t(x);
}

// Random valid entries: each byte a hash of its pool offset. fp8 codes of magnitude 0.5-3.75 of either sign, scales
// 2^-3..2^0, bf16 values (rope dims, or every dim of bf16 entries) of magnitude 0.125-2 of either sign (no NaN or
// infinity anywhere, so a kernel reading a wrong entry gives a wrong but finite result).
static __global__ void fill_random_entries(uint8_t* pool, int64_t bytes, const KvEntryLayout layout, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t h = hash32(uint64_t(i) * 0x9E3779B97F4A7C15ull + seed);
    const int byte = int(i % layout.entry_bytes);
    const bool fp8 = layout.format == KvEntryFormat::Fp8Reference;
    const int bf16_byte = fp8 ? byte - layout.rope_offset : byte;  // byte within the bf16 values
    uint8_t value = 0;
    if (fp8 && byte < layout.nope_dim)
      value = uint8_t((h & 0x80) | (0x30 + (h >> 8) % 0x18));
    else if (fp8 && byte >= layout.scale_offset && byte < layout.scale_offset + layout.scale_blocks)
      value = uint8_t(0x7C + h % 4);
    else if (bf16_byte >= 0 && bf16_byte < 2 * (fp8 ? layout.rope_dim : layout.head_dim))
      value = bf16_byte % 2 == 0 ? uint8_t(h) : uint8_t((h & 0x80) | (0x3E + (h >> 8) % 2));
    pool[i] = value;
  }
}

}  // namespace decode_step_detail

// Random valid bytes (decode_step_detail::fill_random_entries) in the first `entries` entries of the cache's pool.
inline void fill_random_entries(const KvCacheView& view, int64_t entries, uint32_t seed) {
  const int64_t bytes = entries * view.layout.entry_bytes;
  decode_step_detail::fill_random_entries<<<unsigned(std::min<int64_t>(4096, (bytes + 255) / 256)), 256>>>(
      view.pool, bytes, view.layout, seed);
  DSV4_CUDA_CHECK_LAUNCH("fill_random_entries");
}

// One decode step of `batch` sequences on layer 0 of its own cache: query b = sequence b at position context − 1,
// each sequence with its own pages (all window and compressed rows allocated, the page table uploaded) of random
// entries; window slots the 128 ring rows in order, compressed slots random rows (CSA) or all rows in order (HCA);
// q normal (σ 1) in fp32 and bf16, every head's sink 0.5, the inverse RoPE's frequencies (base 160000). `call` reads
// them with bf16 q and fp32 out (the engine's decode call; out, splits, workspace and routing left to the bench).
struct SparseAttentionDecodeStep {
  DecodeLayout layout = DecodeLayout::Swa;
  int batch = 0, heads = 0, compressed_slots = 0;
  int64_t context = 0;
  std::unique_ptr<KvCache> cache;
  std::vector<int32_t> slots, window_index, compressed_index;
  std::vector<int64_t> positions;
  std::vector<float> q, sink;  // host copies (q in fp32; the kernels round it to bf16)
  DeviceBuffer d_slots, d_window_index, d_compressed_index, d_positions, d_q, d_q_bf16, d_sink, d_frequencies;
  SparseAttentionParams call;

  int slots_per_query() const { return kDecodeWindow + compressed_slots; }
  // The KV bytes the step reads (every slot names an entry) and its flops (4·H·D per slot: QKᵀ and PV).
  double kv_bytes() const { return double(batch) * slots_per_query() * cache->layout().entry_bytes; }
  double flops() const { return 4.0 * heads * kDecodeHeadDim * double(batch) * slots_per_query(); }
};

inline const cpu::RopeTable& decode_rope_table() {
  static const cpu::RopeTable table(160000.0, kDecodeRopeDim);
  return table;
}

inline std::unique_ptr<SparseAttentionDecodeStep> make_decode_step(KvEntryFormat format, int heads,
                                                                   DecodeLayout layout, int batch, int64_t context,
                                                                   std::mt19937& rng) {
  auto step = std::make_unique<SparseAttentionDecodeStep>();
  SparseAttentionDecodeStep& s = *step;
  s.layout = layout;
  s.batch = batch;
  s.heads = heads;
  s.context = context;
  const int64_t compressed_rows = decode_compressed_rows(layout, context);
  s.compressed_slots = decode_compressed_slots(layout, context);
  s.cache = std::make_unique<KvCache>(KvCacheConfig{
      .format = format, .head_dim = kDecodeHeadDim, .rope_dim = kDecodeRopeDim, .layers = 1, .max_sequences = batch,
      .window_capacity = kDecodeWindow, .max_compressed_rows = compressed_rows, .page_rows = kDecodePageRows,
      .pages = int64_t(batch) * ((compressed_rows + kDecodePageRows - 1) / kDecodePageRows +
                                 kDecodeWindow / kDecodePageRows)});
  KvCache& cache = *s.cache;
  for (int b = 0; b < batch; ++b) {
    cache.add_sequence();
    cache.ensure_rows(b, 0, KvArray::Window, kDecodeWindow);
    cache.ensure_rows(b, 0, KvArray::Compressed, compressed_rows);
  }
  cache.upload_page_table(nullptr);
  const KvCacheView view = cache.view();
  fill_random_entries(view, cache.config().pages * kDecodePageRows, uint32_t(rng()));

  const int C = s.compressed_slots;
  s.slots.resize(size_t(batch));
  s.window_index.resize(size_t(batch) * kDecodeWindow);
  s.compressed_index.resize(size_t(batch) * C);
  s.positions.assign(size_t(batch), context - 1);
  for (int b = 0; b < batch; ++b) {
    s.slots[size_t(b)] = b;
    for (int w = 0; w < kDecodeWindow; ++w)
      s.window_index[size_t(b) * kDecodeWindow + w] = int32_t((context - kDecodeWindow + w) % kDecodeWindow);
    for (int c = 0; c < C; ++c)
      s.compressed_index[size_t(b) * C + c] =
          layout == DecodeLayout::Csa ? int32_t(rng() % uint64_t(compressed_rows)) : c;
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  s.q.resize(size_t(batch) * heads * kDecodeHeadDim);
  for (float& v : s.q) v = normal(rng);
  std::vector<uint16_t> q_bits(s.q.size());
  for (size_t i = 0; i < s.q.size(); ++i) q_bits[i] = float_to_bf16(s.q[i]);
  s.sink.assign(size_t(heads), 0.5f);
  s.d_slots = attention_case_upload(s.slots, "slots");
  s.d_window_index = attention_case_upload(s.window_index, "window index");
  s.d_compressed_index = attention_case_upload(s.compressed_index, "compressed index");
  s.d_positions = attention_case_upload(s.positions, "positions");
  s.d_q = attention_case_upload(s.q, "q");
  s.d_q_bf16 = attention_case_upload(q_bits, "q bf16");
  s.d_sink = attention_case_upload(s.sink, "sink");
  s.d_frequencies = attention_case_upload(decode_rope_table().frequencies(), "frequencies");
  s.call = SparseAttentionParams{
      .cache = view, .layer = 0, .tokens = batch, .heads = heads,
      .softmax_scale = 1.0f / std::sqrt(float(kDecodeHeadDim)), .q = s.d_q_bf16.data(),
      .q_dtype = AttentionDtype::Bf16, .attn_sink = s.d_sink.as<float>(), .sequence_slots = s.d_slots.as<int32_t>(),
      .positions = s.d_positions.as<int64_t>(), .rope_frequencies = s.d_frequencies.as<float>(),
      .window_index = s.d_window_index.as<int32_t>(), .window_slots = kDecodeWindow,
      .compressed_index = s.d_compressed_index.as<int32_t>(), .compressed_slots = C,
      .out_dtype = AttentionDtype::F32};
  return step;
}

}  // namespace dsv4::cuda
