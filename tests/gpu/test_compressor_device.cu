// The compressor on the GPU against cpu::compressor_pool: CSA (ratio 4, overlapping; main c = 512 and indexer
// c = 128) and HCA (ratio 128). Three sequences of different lengths, each in its own state slot (odd slots of a
// larger state), are fed together, one launch per step: one token each (a batched decode), chunks cycling 3/7/13
// at different phases (runs of different lengths in one launch), or each whole sequence in one launch; every GPU
// chunking is compared with the CPU's one pass per sequence. Exact numerics (fp32 entries by run, with their entry
// numbers and slots) and reference numerics (bf16 before the norm, fp8 KV or Hadamard + fp4 indexer rounding of
// the stored entries; bf16 output keyed by slot and entry number); and the main compressor's entries stored
// straight into a paged KV cache (bf16, fp8 layout) at their rows, decoded back. Outputs are poisoned and every element checked,
// as are the entry numbers known from positions. kv and gate also as slices of one wider projection output.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/compressor.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/kv_entry_decode.hpp"

namespace dsv4::cuda {
namespace {

struct CompressorCase {
  const char* name;
  int64_t head_dim, ratio;
  bool overlapping;
  int64_t rope_dim;
  int64_t tokens;  // sequence length
  CompressorStoredRounding rounding;
  bool round_pooled;
  bool bf16_output;
};

constexpr int kSequences = 3;

// Chunk sizes that cover a sequence: 1 at a time, cycling 3/7/13 from phase `phase`, or one pass.
std::vector<int64_t> chunking(const std::string& kind, int64_t tokens, int phase) {
  std::vector<int64_t> sizes;
  if (kind == "one pass") return {tokens};
  const std::vector<int64_t> cycle = kind == "single tokens" ? std::vector<int64_t>{1} : std::vector<int64_t>{3, 7, 13};
  for (int64_t done = 0, i = phase; done < tokens; ++i) {
    const int64_t n = std::min(cycle[size_t(i) % cycle.size()], tokens - done);
    sizes.push_back(n);
    done += n;
  }
  return sizes;
}

struct Sequence {
  int slot;
  int64_t tokens;
  std::vector<float> kv, gate;  // [tokens, width]
  std::vector<float> expected;  // [total, c]
  int64_t total = 0;
  std::vector<float> got;       // fp32 output, in entry order
  std::vector<int64_t> chunks;
  size_t next_chunk = 0;
  int64_t position = 0;
};

// to_cache: the entries go straight into a paged KV cache (bf16, or the fp8 layout for the KvFp8 cases) instead of
// the case's own output. stacked: kv and gate are slices of one wider projection output ([kv | gate | NaN gap] per
// token, row_stride apart), as the model's stacked compressor projections give them.
void check_case(const CompressorCase& c, const std::string& chunks, uint32_t seed, bool to_cache = false,
                bool stacked = false) {
  SCOPED_TRACE(std::string(c.name) + ", " + chunks + (to_cache ? ", into the KV cache" : "") +
               (stacked ? ", stacked projections" : ""));
  const bool reference =
      c.rounding != CompressorStoredRounding::None || c.round_pooled || c.bf16_output || to_cache;
  const int64_t width = c.overlapping ? 2 * c.head_dim : c.head_dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> ape(size_t(c.ratio * width)), norm(size_t(c.head_dim));
  for (float& v : ape) v = normal(rng);
  for (float& v : norm) v = 1.0f + 0.25f * normal(rng);
  const cpu::RopeTable rope(160000.0, c.rope_dim, cpu::YarnScaling{});

  // Sequences of different lengths in slots 1, 3, 5 of a 7-slot state; the CPU's one pass of each.
  std::vector<Sequence> sequences(kSequences);
  int64_t longest = 0;
  for (int q = 0; q < kSequences; ++q) {
    Sequence& sq = sequences[size_t(q)];
    sq.slot = 2 * q + 1;
    sq.tokens = std::max<int64_t>(1, c.tokens - q * (c.tokens / 3 + 1));
    longest = std::max(longest, sq.tokens);
    sq.kv.resize(size_t(sq.tokens * width));
    sq.gate.resize(sq.kv.size());
    for (float& v : sq.kv) v = normal(rng);
    for (float& v : sq.gate) v = 2.0f * normal(rng);
    cpu::CompressorParams cpu_params{1, c.head_dim, c.ratio, c.overlapping, 1e-6f, c.round_pooled};
    cpu::CompressorState cpu_state(c.ratio, c.head_dim, c.overlapping);
    sq.total = cpu::compressor_pool(cpu_params, {nullptr, nullptr, ape.data(), norm.data()}, rope, cpu_state,
                                    sq.kv.data(), sq.gate.data(), sq.tokens, sq.expected);
    if (c.rounding == CompressorStoredRounding::KvFp8)
      cpu::round_kv_reference(sq.expected.data(), sq.total, c.head_dim, c.rope_dim);
    if (c.rounding == CompressorStoredRounding::IndexerFp4)
      cpu::round_indexer_reference(sq.expected.data(), sq.total, c.head_dim);
    if (c.bf16_output || (to_cache && c.rounding == CompressorStoredRounding::None))
      for (float& v : sq.expected) v = round_to_bf16(v);
    sq.chunks = chunking(chunks, sq.tokens, q);
  }

  DeviceBuffer d_ape = to_device(ape, "ape"), d_norm = to_device(norm, "norm");
  DeviceBuffer d_freq = to_device(rope.frequencies(), "rope frequencies");
  constexpr int kSlots = 2 * kSequences + 1;
  DeviceCompressorState state(c.ratio, c.head_dim, c.overlapping, kSlots);
  const int64_t capacity = longest / c.ratio + 1;  // bf16 output: entries per slot
  DeviceBuffer d_keys(size_t(kSlots * capacity * c.head_dim) * 2, "slot entries");
  d_keys.fill_bytes(0xFF);
  DeviceBuffer d_kv(size_t(kSequences * longest * width) * 4, "step kv"), d_gate(d_kv.bytes(), "step gate");
  const int64_t stride = 2 * width + 6;
  DeviceBuffer d_stacked(size_t(kSequences * longest * stride) * 4, "step stacked projections");
  // The cache: layer 1 of 2, rows of 8 entries, every slot's compressed rows backed (interleaved page order).
  constexpr int kCacheLayer = 1, kPageRows = 8;
  const int64_t pages_per_slot = (capacity + kPageRows - 1) / kPageRows;
  std::optional<KvCache> cache;
  if (to_cache) {
    cache.emplace(KvCacheConfig{.format = c.rounding == CompressorStoredRounding::KvFp8 ? KvEntryFormat::Fp8Reference
                                                                          : KvEntryFormat::Bf16,
                 .head_dim = int(c.head_dim), .rope_dim = int(c.rope_dim), .layers = 2, .max_sequences = kSlots,
                 .window_capacity = 8, .max_compressed_rows = capacity, .page_rows = kPageRows,
                 .pages = pages_per_slot * kSlots});
    for (int slot = 0; slot < kSlots; ++slot) ASSERT_EQ(cache->add_sequence(), slot);
    for (int slot = kSlots - 1; slot >= 0; --slot) cache->ensure_rows(slot, kCacheLayer, KvArray::Compressed, capacity);
    cache->upload_page_table(nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemset(cache->view().pool, 0xFF, size_t(cache->config().pages * kPageRows) *
                                                        size_t(cache->layout().entry_bytes)),
              cudaSuccess);
  }

  for (int step = 0;; ++step) {
    // This step's runs: the next chunk of every sequence that has one.
    std::vector<CompressorRun> runs;
    std::vector<float> kv, gate;
    std::vector<Sequence*> in_step;
    int64_t max_run = 0;
    for (Sequence& sq : sequences) {
      if (sq.next_chunk == sq.chunks.size()) continue;
      const int64_t n = sq.chunks[sq.next_chunk++];
      runs.push_back({.start_position = sq.position, .slot = sq.slot, .first_token = int32_t(kv.size() / size_t(width)),
                      .tokens = int32_t(n)});
      kv.insert(kv.end(), sq.kv.begin() + sq.position * width, sq.kv.begin() + (sq.position + n) * width);
      gate.insert(gate.end(), sq.gate.begin() + sq.position * width, sq.gate.begin() + (sq.position + n) * width);
      in_step.push_back(&sq);
      max_run = std::max(max_run, n);
    }
    if (runs.empty()) break;
    if (stacked) {
      const size_t tokens = kv.size() / size_t(width);
      std::vector<float> rows(tokens * size_t(stride), std::nanf(""));
      for (size_t t = 0; t < tokens; ++t) {
        const auto from = std::ptrdiff_t(t * size_t(width)), to = std::ptrdiff_t(t * size_t(stride));
        std::copy_n(kv.begin() + from, width, rows.begin() + to);
        std::copy_n(gate.begin() + from, width, rows.begin() + to + width);
      }
      d_stacked.upload(rows.data(), rows.size() * 4);
    } else {
      d_kv.upload(kv.data(), kv.size() * 4);
      d_gate.upload(gate.data(), gate.size() * 4);
    }
    DeviceBuffer d_runs = to_device(runs, "runs");
    const int64_t per_run = compressor_max_entries(max_run, c.ratio);
    const size_t rows = runs.size() * size_t(per_run);
    DeviceBuffer d_entries = poisoned(rows * size_t(c.head_dim), "entries");
    DeviceBuffer d_rows = poisoned(rows, "entry rows"), d_slots = poisoned(rows, "entry slots");
    CompressorParams p{.head_dim = c.head_dim,
                       .ratio = c.ratio,
                       .overlapping = c.overlapping,
                       .norm_eps = 1e-6f,
                       .round_pooled_to_bf16 = c.round_pooled,
                       .stored_rounding = c.rounding,
                       .kv = d_kv.as<float>(),
                       .gate = d_gate.as<float>(),
                       .runs = d_runs.as<CompressorRun>(),
                       .run_count = int(runs.size()),
                       .max_run_tokens = max_run,
                       .ape = d_ape.as<float>(),
                       .norm_weight = d_norm.as<float>(),
                       .rope_frequencies = d_freq.as<float>(),
                       .rope_dim = c.rope_dim,
                       .state = state.view()};
    if (stacked) p.kv = d_stacked.as<float>(), p.gate = d_stacked.as<float>() + width, p.row_stride = stride;
    if (to_cache) {
      p.stored_rounding = CompressorStoredRounding::None, p.cache = cache->view(), p.cache_layer = kCacheLayer;
    } else if (c.bf16_output) {
      p.slot_entries_bf16 = d_keys.as<__nv_bfloat16>(), p.slot_entry_stride = capacity * c.head_dim;
      p.slot_entry_capacity = capacity;
    } else {
      p.entries = d_entries.as<float>(), p.entry_rows = d_rows.as<int32_t>(), p.entry_slots = d_slots.as<int32_t>();
    }
    run_compressor(p);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (!c.bf16_output && !to_cache) {
      const std::vector<float> entries = download(d_entries, rows * size_t(c.head_dim));
      std::vector<int32_t> entry_rows(rows), entry_slots(rows);
      const std::vector<float> raw_rows = download(d_rows, rows), raw_slots = download(d_slots, rows);
      std::memcpy(entry_rows.data(), raw_rows.data(), rows * 4);
      std::memcpy(entry_slots.data(), raw_slots.data(), rows * 4);
      for (size_t r = 0; r < runs.size(); ++r) {
        Sequence& sq = *in_step[r];
        const int64_t emitted = compressor_entries_emitted(sq.position, runs[r].tokens, c.ratio);
        for (int64_t e = 0; e < per_run; ++e) {
          const size_t row = r * size_t(per_run) + size_t(e);
          ASSERT_EQ(entry_slots[row], sq.slot) << "step " << step << " run " << r << " row " << e;
          if (e >= emitted) {
            ASSERT_EQ(entry_rows[row], -1) << "step " << step << " run " << r << " row " << e;
            uint32_t bits;
            std::memcpy(&bits, &entries[row * size_t(c.head_dim)], 4);
            ASSERT_EQ(bits, 0xFFFFFFFFu) << "step " << step << ": an entry row with no entry was written";
            continue;
          }
          ASSERT_EQ(entry_rows[row], compressor_first_entry(sq.position, c.ratio) + e)
              << "step " << step << " run " << r;
          ASSERT_EQ(int64_t(sq.got.size()) / c.head_dim, entry_rows[row]);
          sq.got.insert(sq.got.end(), entries.begin() + std::ptrdiff_t(row * size_t(c.head_dim)),
                        entries.begin() + std::ptrdiff_t((row + 1) * size_t(c.head_dim)));
        }
      }
    }
    for (size_t r = 0; r < runs.size(); ++r) in_step[r]->position += runs[r].tokens;
  }
  if (to_cache) {
    // Every sequence's entries from its rows; nothing else in the pool touched.
    const KvCacheView view = cache->view();
    std::vector<uint8_t> pool(size_t(cache->config().pages * kPageRows) * size_t(view.layout.entry_bytes));
    ASSERT_EQ(cudaMemcpy(pool.data(), view.pool, pool.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<int32_t> table(size_t(kSlots * 2 * 2 * view.max_pages_per_array));
    ASSERT_EQ(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<bool> written(pool.size() / size_t(view.layout.entry_bytes), false);
    for (Sequence& sq : sequences) {
      const int32_t* pages = &table[size_t(((sq.slot * 2 + kCacheLayer) * 2 + 1) * view.max_pages_per_array)];
      for (int64_t w = 0; w < sq.total; ++w) {
        const int64_t physical = int64_t(pages[w / kPageRows]) * kPageRows + w % kPageRows;
        written[size_t(physical)] = true;
        const std::vector<float> v = decode_kv_entry(view.layout, &pool[size_t(physical) * view.layout.entry_bytes]);
        sq.got.insert(sq.got.end(), v.begin(), v.end());
        if (view.layout.format == KvEntryFormat::Fp8Reference)
          for (int b = view.layout.scale_offset + view.layout.scale_blocks; b < view.layout.entry_bytes; ++b)
            ASSERT_EQ(pool[size_t(physical) * view.layout.entry_bytes + size_t(b)], 0) << "pad byte " << b;
      }
    }
    for (size_t e = 0; e < written.size(); ++e) {
      if (written[e]) continue;
      const uint8_t* entry = &pool[e * size_t(view.layout.entry_bytes)];
      ASSERT_TRUE(std::all_of(entry, entry + view.layout.entry_bytes, [](uint8_t b) { return b == 0xFF; }))
          << "physical entry " << e << " was written";
    }
  }
  if (c.bf16_output) {
    std::vector<uint16_t> keys(size_t(kSlots * capacity * c.head_dim));
    d_keys.download(keys.data(), keys.size() * 2);
    for (int slot = 0; slot < kSlots; ++slot) {
      const Sequence* owner = nullptr;
      for (const Sequence& sq : sequences) owner = sq.slot == slot ? &sq : owner;
      const int64_t written = owner != nullptr ? owner->total : 0;
      for (int64_t i = written * c.head_dim; i < capacity * c.head_dim; ++i)
        ASSERT_EQ(keys[size_t(slot * capacity * c.head_dim + i)], 0xFFFF) << "slot " << slot << " element " << i
                                                                          << " written past its entries";
    }
    for (Sequence& sq : sequences)
      for (int64_t i = 0; i < sq.total * c.head_dim; ++i)
        sq.got.push_back(bf16_to_float(keys[size_t(sq.slot * capacity * c.head_dim + i)]));
  }

  // Exact numerics: fp32 in another summation order (online softmax, tree reductions) → a few ulps of O(1) values.
  // Reference numerics: the same, then roundings (bf16, fp8, fp4) that a last-bit difference may tip to the
  // neighbouring code; such flips must stay rare and within one code step of their block.
  for (const Sequence& sq : sequences) {
    SCOPED_TRACE("slot " + std::to_string(sq.slot) + " of " + std::to_string(sq.tokens) + " tokens");
    ASSERT_EQ(int64_t(sq.got.size()), sq.total * c.head_dim);
    int64_t flips = 0, failures = 0;
    double max_error = 0.0;
    for (int64_t e = 0; e < sq.total && failures < 10; ++e) {
      const float* want = sq.expected.data() + e * c.head_dim;
      const float* have = sq.got.data() + e * c.head_dim;
      float amax = 0.0f;
      for (int64_t i = 0; i < c.head_dim; ++i) amax = std::max(amax, std::fabs(want[i]));
      for (int64_t i = 0; i < c.head_dim && failures < 10; ++i) {
        const double error = std::fabs(double(have[i]) - want[i]);
        const bool close = std::isfinite(have[i]) && error <= 3e-5 * (1.0 + std::fabs(want[i]));
        max_error = std::max(max_error, std::isfinite(have[i]) ? error : INFINITY);
        if (close) continue;
        const bool one_step = reference && std::isfinite(have[i]) && error <= 0.7 * amax;
        if (one_step) {
          ++flips;
          continue;
        }
        ++failures;
        ADD_FAILURE() << "entry " << e << " channel " << i << ": got " << have[i] << ", want " << want[i];
      }
    }
    EXPECT_LE(double(flips), 0.02 * double(sq.got.size()) + 2) << flips << " rounding flips of " << sq.got.size();
    std::printf("%s, %s%s, slot %d: %lld entries, max error %.3g, %lld rounding flips\n", c.name, chunks.c_str(),
                to_cache ? ", into the KV cache" : "", sq.slot, (long long)sq.total, max_error, (long long)flips);
  }
}

const CompressorCase kCases[] = {
    {"CSA main c=512 exact", 512, 4, true, 64, 57, CompressorStoredRounding::None, false, false},
    {"CSA main c=512 reference fp8", 512, 4, true, 64, 57, CompressorStoredRounding::KvFp8, true, false},
    {"CSA indexer c=128 exact", 128, 4, true, 64, 61, CompressorStoredRounding::None, false, false},
    {"CSA indexer c=128 reference fp4 bf16 out", 128, 4, true, 64, 61, CompressorStoredRounding::IndexerFp4, true,
     true},
    {"HCA c=512 exact", 512, 128, false, 64, 389, CompressorStoredRounding::None, false, false},
    {"HCA c=512 reference fp8", 512, 128, false, 64, 389, CompressorStoredRounding::KvFp8, true, false},
    {"CSA odd c=96 rope 32", 96, 4, true, 32, 30, CompressorStoredRounding::None, false, false},
    {"HCA c=64 ratio 8 fp4", 64, 8, false, 16, 43, CompressorStoredRounding::IndexerFp4, false, false},
    // The golden fixtures' shapes: head_dim 64 with rope 16 (an fp8 block of 48 channels), indexer c = 32.
    {"CSA golden c=64 rope 16 reference fp8", 64, 4, true, 16, 37, CompressorStoredRounding::KvFp8, true, false},
    {"CSA golden indexer c=32 reference fp4", 32, 4, true, 16, 37, CompressorStoredRounding::IndexerFp4, true, true},
    {"HCA golden c=64 ratio 16 exact", 64, 16, false, 16, 70, CompressorStoredRounding::None, false, false},
    // Prefill chunks of ≥ 256 entries (narrow CTAs, no cluster) in one pass.
    {"CSA main c=512 long exact", 512, 4, true, 64, 1100, CompressorStoredRounding::None, false, false},
    {"CSA indexer c=128 long reference fp4", 128, 4, true, 64, 1030, CompressorStoredRounding::IndexerFp4, true, true},
    // A cluster of two CTAs per entry (128 channels = two fp8 blocks).
    {"HCA c=128 ratio 128 reference fp8", 128, 128, false, 64, 300, CompressorStoredRounding::KvFp8, true, false},
};

TEST(Compressor, EveryChunkingMatchesTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const CompressorCase& c : kCases)
    for (const char* chunks : {"one pass", "single tokens", "chunks of 3/7/13"}) {
      check_case(c, chunks, seed++);
      // Straight into the KV cache: the main compressor's stores (no indexer rounding, no bf16 side output).
      if (c.rounding != CompressorStoredRounding::IndexerFp4 && !c.bf16_output) check_case(c, chunks, seed++, true);
    }
}

// The model's stacked compressor projections: kv and gate read row_stride apart, the gap (NaN) never read, the
// state updated from the same slices, for decode steps and chunks of several runs.
TEST(Compressor, StackedProjectionsMatchTheCpuOnePass) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 500;
  for (const CompressorCase& c : kCases)
    for (const char* chunks : {"single tokens", "chunks of 3/7/13"}) check_case(c, chunks, seed++, false, true);
}

TEST(Compressor, EntriesKnownFromPositions) {
  EXPECT_EQ(compressor_entries_emitted(0, 3, 4), 0);
  EXPECT_EQ(compressor_entries_emitted(0, 4, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(3, 1, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(4, 1, 4), 0);
  EXPECT_EQ(compressor_entries_emitted(5, 13, 4), 3);  // windows 1..3 end at 7, 11, 15; 19 is past the chunk
  EXPECT_EQ(compressor_first_entry(5, 4), 1);
  EXPECT_EQ(compressor_entries_emitted(127, 1, 128), 1);
  EXPECT_EQ(compressor_entries_emitted(0, 4096, 128), 32);
  // The per-run bound sizes a launch's grid: no start gives more.
  for (int64_t ratio : {4, 128})
    for (int64_t tokens : {1, 2, 3, 4, 5, 127, 128, 129, 512})
      for (int64_t start = 0; start < 2 * ratio; ++start)
        EXPECT_LE(compressor_entries_emitted(start, tokens, ratio), compressor_max_entries(tokens, ratio));
  EXPECT_EQ(compressor_max_entries(1, 4), 1);
  EXPECT_EQ(compressor_max_entries(5, 4), 2);
}

TEST(Compressor, RefusesMismatchedState) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceCompressorState state(4, 128, true);
  CompressorParams p{.head_dim = 512, .ratio = 4, .overlapping = true, .state = state.view()};
  testing::expect_error([&] { run_compressor(p); }, "state was made for ratio 4 head_dim 128");
  // More runs than the state has slots (runs have distinct slots).
  CompressorParams more{.head_dim = 128, .ratio = 4, .overlapping = true, .run_count = 2, .state = state.view()};
  testing::expect_error([&] { run_compressor(more); }, "2 runs but the state has 1 slots");
}

}  // namespace
}  // namespace dsv4::cuda
