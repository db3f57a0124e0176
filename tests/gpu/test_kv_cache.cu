// The paged device KV cache and its fused insert against the CPU ops: the page allocator's bookkeeping and errors;
// run_kv_insert (RMSNorm → RoPE → quantise → insert) against cpu::rms_norm + cpu::apply_rope (+ round_kv_reference
// for the fp8 layout) for the V4 shape (D 512, rope 64) and a tiny one (D 64, rope 16, a partial fp8 block), window
// rows that wrap the ring, compressed rows with the bf16 pre-rounding, several sequences, rows with no destination
// (skipped); the pool is poisoned before each run and every stored byte of every touched entry is checked. The
// launch carrying another RMSNorm and reading strided rows: bit for bit the separate launches.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rms_norm.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/kv_insert.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"
#include "support/expect_error.hpp"
#include "support/device_buffers.hpp"
#include "support/device_rope_table.hpp"
#include "support/kv_entry_decode.hpp"

namespace dsv4::cuda {
namespace {

TEST(KvEntryLayout, FpEightLayoutOfTheModelsAndOddShapes) {
  const KvEntryLayout v4 = KvEntryLayout::make(KvEntryFormat::Fp8Reference, 512, 64);
  EXPECT_EQ(v4.entry_bytes, 584);
  EXPECT_EQ(v4.rope_offset, 448);
  EXPECT_EQ(v4.scale_offset, 576);
  EXPECT_EQ(v4.scale_blocks, 7);
  const KvEntryLayout tiny = KvEntryLayout::make(KvEntryFormat::Fp8Reference, 64, 16);
  EXPECT_EQ(tiny.scale_blocks, 1);              // 48 fp8 values: one partial block
  EXPECT_EQ(tiny.entry_bytes, 88);              // 48 + 32 + 1, padded to 8
  EXPECT_EQ(KvEntryLayout::make(KvEntryFormat::Bf16, 512, 64).entry_bytes, 1024);
  testing::expect_error([] { KvEntryLayout::make(KvEntryFormat::Fp8Reference, 64, 12); }, "fp8 part");
  testing::expect_error([] { KvEntryLayout::make(KvEntryFormat::Bf16, 60, 16); }, "head_dim 60");
  testing::expect_error([] { KvEntryLayout::make(KvEntryFormat::Bf16, 64, 6); }, "rope_dim 6");
}

TEST(KvCache, AllocatesPagesOnDemandAndFreesThemWithTheSequence) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  KvCache cache({.format = KvEntryFormat::Bf16, .head_dim = 64, .rope_dim = 16, .layers = 2, .max_sequences = 2,
                 .window_capacity = 40, .max_compressed_rows = 100, .page_rows = 16, .pages = 12});
  const int a = cache.add_sequence(), b = cache.add_sequence();
  EXPECT_NE(a, b);
  testing::expect_error([&] { cache.add_sequence(); }, "all 2 sequence slots");
  cache.ensure_rows(a, 1, KvArray::Window, 40);  // 3 pages
  EXPECT_EQ(cache.backed_rows(a, 1, KvArray::Window), 40);
  EXPECT_EQ(cache.free_pages(), 9);
  cache.ensure_rows(a, 1, KvArray::Window, 10);  // already backed
  EXPECT_EQ(cache.free_pages(), 9);
  cache.ensure_rows(b, 0, KvArray::Compressed, 33);  // 3 pages
  cache.ensure_rows(b, 0, KvArray::Compressed, 64);  // +1
  EXPECT_EQ(cache.free_pages(), 5);
  EXPECT_EQ(cache.backed_rows(b, 0, KvArray::Compressed), 64);
  testing::expect_error([&] { cache.ensure_rows(a, 0, KvArray::Window, 41); }, "exceed its capacity of 40");
  testing::expect_error([&] { cache.ensure_rows(a, 0, KvArray::Compressed, 100); }, "5 free pages, 7 needed");
  EXPECT_EQ(cache.free_pages(), 5);  // a failed request changes nothing
  testing::expect_error([&] { cache.ensure_rows(a, 2, KvArray::Window, 1); }, "layer 2");
  cache.release_sequence(b);
  EXPECT_EQ(cache.free_pages(), 9);
  testing::expect_error([&] { cache.ensure_rows(b, 0, KvArray::Window, 1); }, "slot 1 is not in use");
  EXPECT_EQ(cache.add_sequence(), b);
  EXPECT_EQ(cache.backed_rows(b, 0, KvArray::Compressed), 0);
  cache.release_sequence(a);
  EXPECT_EQ(cache.free_pages(), 12);

  // The uploaded device table agrees with the host bookkeeping.
  cache.ensure_rows(b, 1, KvArray::Compressed, 20);
  cache.upload_page_table(nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const KvCacheView view = cache.view();
  std::vector<int32_t> table(static_cast<size_t>(2 * 2 * 2 * view.max_pages_per_array));
  ASSERT_EQ(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  int allocated = 0;
  for (const int32_t page : table) allocated += page >= 0 ? 1 : 0;
  EXPECT_EQ(allocated, 2);
  const int32_t* row = &table[size_t(((b * 2 + 1) * 2 + 1) * view.max_pages_per_array)];
  EXPECT_GE(row[0], 0);
  EXPECT_GE(row[1], 0);
  EXPECT_EQ(row[2], -1);
}

struct InsertCase {
  KvEntryFormat format;
  int head_dim, rope_dim;
  KvArray array;
  bool round_input;
  int64_t rows;
  bool store_as_is = false;  // no norm weight and no RoPE: entries the compressor already normalised and rotated
};

// True when fp32 noise in x (relative 1e-5) could move its fp8 rounding: x/s near an e4m3 rounding midpoint, or the
// block's amax/448 near a power of two (the scale's ceil boundary).
bool near_fp8_boundary(float x, float amax) {
  const float ratio = std::max(amax, 1e-4f) / kE4m3Max;
  const float log2_ratio = std::log2(ratio);
  if (std::fabs(log2_ratio - std::round(log2_ratio)) < 2e-5f) return true;
  const float scale = e8m0_to_float(float_to_e8m0_ceil(ratio));
  const float q = x / scale;
  const float lo = e4m3_to_float(float_to_e4m3(q * (1 - 2e-5f))), hi = e4m3_to_float(float_to_e4m3(q * (1 + 2e-5f)));
  return lo != hi;
}

void check_insert(const InsertCase& c, uint32_t seed) {
  SCOPED_TRACE(std::string(to_string(c.format)) + " D=" + std::to_string(c.head_dim) + " rope=" +
               std::to_string(c.rope_dim) + (c.array == KvArray::Window ? " window" : " compressed") +
               " rows=" + std::to_string(c.rows));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int D = c.head_dim;
  constexpr int kLayers = 3, kLayer = 1, kSequences = 3;
  const int64_t capacity = 24;  // window ring rows; positions up to 100 wrap it several times
  KvCache cache({.format = c.format, .head_dim = D, .rope_dim = c.rope_dim, .layers = kLayers,
                 .max_sequences = kSequences, .window_capacity = capacity, .max_compressed_rows = 64, .page_rows = 8,
                 .pages = 80});
  for (int s = 0; s < kSequences; ++s) ASSERT_EQ(cache.add_sequence(), s);
  // Interleave allocations so consecutive logical pages are not consecutive physical pages.
  for (int s = kSequences - 1; s >= 0; --s) cache.ensure_rows(s, kLayer, c.array, c.array == KvArray::Window ? capacity : 64);
  cache.upload_page_table(nullptr);

  // Rows: distinct (sequence, destination) pairs; window rows are position mod capacity.
  std::vector<int32_t> slots(static_cast<size_t>(c.rows)), dest(static_cast<size_t>(c.rows));
  std::vector<int64_t> positions(static_cast<size_t>(c.rows));
  std::vector<std::vector<bool>> used(kSequences, std::vector<bool>(64, false));
  for (int64_t r = 0; r < c.rows; ++r) {
    while (true) {
      const int s = int(rng() % kSequences);
      const int64_t position = int64_t(rng() % 100);
      const int64_t row = c.array == KvArray::Window ? position % capacity : int64_t(rng() % 64);
      if (used[size_t(s)][size_t(row)]) continue;
      used[size_t(s)][size_t(row)] = true;
      slots[size_t(r)] = s;
      dest[size_t(r)] = int32_t(row);
      positions[size_t(r)] = c.array == KvArray::Window ? position : row * 4;
      break;
    }
  }
  // Every fourth row has no destination (−1, a batched compressor row without an entry): it must be skipped.
  std::vector<int32_t> sent_dest = dest;
  auto skipped = [](int64_t r) { return r % 4 == 3; };
  for (int64_t r = 0; r < c.rows; ++r)
    if (skipped(r)) sent_dest[size_t(r)] = -1;
  std::vector<float> x(static_cast<size_t>(c.rows * D)), weight(static_cast<size_t>(D));
  for (int64_t r = 0; r < c.rows; ++r) {
    const float magnitude = std::ldexp(1.0f, int(rng() % 9) - 4);  // different rows, different scales
    for (int d = 0; d < D; ++d) x[size_t(r * D + d)] = normal(rng) * magnitude;
  }
  for (float& w : weight) w = round_to_bf16(0.5f + 0.25f * normal(rng));
  const cpu::RopeTable rope(160000.0, c.rope_dim, cpu::YarnScaling{16.0, 65536, 32.0, 1.0});

  // CPU: (bf16 rounding) → RMSNorm → RoPE (→ reference rounding).
  std::vector<float> expected = x;
  if (c.round_input)
    for (float& v : expected) v = round_to_bf16(v);
  if (!c.store_as_is) {
    cpu::rms_norm(expected.data(), weight.data(), expected.data(), {c.rows, D, 1e-6f});
    cpu::apply_rope(rope, expected.data(), positions.data(), {c.rows, 1, D, false});
  }
  std::vector<float> rounded = expected;
  if (c.format == KvEntryFormat::Fp8Reference) cpu::round_kv_reference(rounded.data(), c.rows, D, c.rope_dim);

  const KvCacheView view = cache.view();
  const size_t pool_bytes = size_t(80) * 8 * view.layout.entry_bytes;
  ASSERT_EQ(cudaMemset(view.pool, 0xFF, pool_bytes), cudaSuccess);
  DeviceBuffer d_x = to_device(x, "x"), d_w = to_device(weight, "weight"), d_slots = to_device(slots, "slots"),
               d_dest = to_device(sent_dest, "dest"), d_pos = to_device(positions, "positions"),
               d_rope = device_rope_table(rope, 256);
  run_kv_insert({.cache = view, .array = c.array, .layer = kLayer, .rows = c.rows, .x = d_x.as<float>(),
                 .norm_weight = c.store_as_is ? nullptr : d_w.as<float>(), .eps = 1e-6f,
                 .round_input_to_bf16 = c.round_input,
                 .rope_table = c.store_as_is ? nullptr : d_rope.as<float2>(),
                 .sequence_slots = d_slots.as<int32_t>(),
                 .positions = d_pos.as<int64_t>(), .dest_rows = d_dest.as<int32_t>()});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> pool(pool_bytes);
  ASSERT_EQ(cudaMemcpy(pool.data(), view.pool, pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<int32_t> table(static_cast<size_t>(kSequences * kLayers * 2 * view.max_pages_per_array));
  ASSERT_EQ(cudaMemcpy(table.data(), view.page_table, table.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);

  int failures = 0, boundary_cases = 0;
  std::vector<bool> written(pool_bytes / size_t(view.layout.entry_bytes), false);
  for (int64_t r = 0; r < c.rows && failures < 10; ++r) {
    if (skipped(r)) continue;
    const int32_t* pages = &table[size_t(((slots[size_t(r)] * kLayers + kLayer) * 2 + int(c.array)) *
                                         view.max_pages_per_array)];
    const int64_t physical = int64_t(pages[dest[size_t(r)] / 8]) * 8 + dest[size_t(r)] % 8;
    written[size_t(physical)] = true;
    const uint8_t* entry = &pool[size_t(physical * view.layout.entry_bytes)];
    const std::vector<float> got = decode_kv_entry(view.layout, entry);
    for (int d = 0; d < D && failures < 10; ++d) {
      const float want = rounded[size_t(r * D + d)], fp32 = expected[size_t(r * D + d)];
      const float v = got[size_t(d)];
      bool ok;
      if (c.format == KvEntryFormat::Bf16 || d >= view.layout.nope_dim) {
        // bf16 storage of a value whose fp32 sum order differs from the CPU's: at most one bf16 step apart.
        ok = std::isfinite(v) && std::fabs(v - fp32) <= std::ldexp(std::fabs(fp32), -8) + 1e-30f;
      } else {
        // fp8: bit-equal to round_kv_reference unless fp32 noise sits on a rounding boundary.
        const int block = d / kKvFp8BlockSize;
        float amax = 0;
        for (int k = block * kKvFp8BlockSize; k < std::min((block + 1) * kKvFp8BlockSize, view.layout.nope_dim); ++k)
          amax = std::max(amax, std::fabs(expected[size_t(r * D + k)]));
        ok = v == want;
        if (!ok && near_fp8_boundary(fp32, amax)) {
          ++boundary_cases;
          ok = true;
        }
      }
      if (!ok) {
        ++failures;
        ADD_FAILURE() << "row " << r << " dim " << d << ": stored " << v << ", expected " << want << " (fp32 "
                      << fp32 << ")";
      }
    }
    if (c.format == KvEntryFormat::Fp8Reference) {
      for (int b = view.layout.scale_offset + view.layout.scale_blocks; b < view.layout.entry_bytes; ++b)
        EXPECT_EQ(entry[b], 0) << "pad byte " << b << " of row " << r;
    }
  }
  EXPECT_LE(boundary_cases, 2) << "too many fp8 boundary cases to be fp32 noise";
  // Nothing else in the pool was touched.
  for (size_t e = 0; e < written.size(); ++e) {
    if (written[e]) continue;
    const uint8_t* entry = &pool[e * size_t(view.layout.entry_bytes)];
    ASSERT_TRUE(std::all_of(entry, entry + view.layout.entry_bytes, [](uint8_t b) { return b == 0xFF; }))
        << "physical entry " << e << " was written";
  }
}

TEST(KvInsert, MatchesCpuNormRopeAndReferenceRoundingOrStoresAsIs) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const KvEntryFormat format : {KvEntryFormat::Bf16, KvEntryFormat::Fp8Reference})
    for (const auto [D, rope] : {std::pair{512, 64}, std::pair{64, 16}, std::pair{128, 64}}) {
      check_insert({format, D, rope, KvArray::Window, false, 1}, seed++);
      check_insert({format, D, rope, KvArray::Window, false, 37}, seed++);
      check_insert({format, D, rope, KvArray::Compressed, true, 50}, seed++);
      check_insert({format, D, rope, KvArray::Compressed, false, 20, true}, seed++);
    }
}

// One launch for the insert and an RMSNorm of other rows (the step's q_norm, or the queries' per-head norm with
// RoPE), x read as a slice of a wider projection output: the pool and the norm's outputs are bit for bit those of
// the two separate launches over contiguous rows. Each norm kind (warp or CTA rows, with or without RoPE).
struct FusedNormCase {
  int64_t rows, width;
  bool weighted, rope;
  bool cta_rows = false;  // a CTA per row (RmsNormParams::cta_rows)
};

void check_fused_insert(KvEntryFormat format, int D, int rope_dim, const FusedNormCase& n, uint32_t seed) {
  SCOPED_TRACE(std::string(to_string(format)) + " D=" + std::to_string(D) + " norm rows=" + std::to_string(n.rows) +
               " width=" + std::to_string(n.width) + (n.rope ? " rope" : "") + (n.cta_rows ? " CTA rows" : ""));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 13, capacity = 16, stride = D + 96;  // the kv slice sits at column 96 of wider rows
  KvCache cache({.format = format, .head_dim = D, .rope_dim = rope_dim, .layers = 1, .max_sequences = 2,
                 .window_capacity = capacity, .page_rows = 8, .pages = 4});
  for (int s = 0; s < 2; ++s) {
    ASSERT_EQ(cache.add_sequence(), s);
    cache.ensure_rows(s, 0, KvArray::Window, capacity);
  }
  cache.upload_page_table(nullptr);
  std::vector<float> x(size_t(rows * D)), wide(size_t(rows * stride), std::nanf("")), kv_weight(static_cast<size_t>(D));
  std::vector<int32_t> slots(static_cast<size_t>(rows)), dest(static_cast<size_t>(rows));
  std::vector<int64_t> positions(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    slots[size_t(r)] = int32_t(r % 2), dest[size_t(r)] = int32_t(r / 2), positions[size_t(r)] = 40 + r / 2;
    for (int d = 0; d < D; ++d) wide[size_t(r * stride + 96 + d)] = x[size_t(r * D + d)] = normal(rng);
  }
  for (float& w : kv_weight) w = 1.0f + 0.25f * normal(rng);
  std::vector<float> norm_x(size_t(n.rows * n.width)), norm_weight(size_t(n.width));
  std::vector<int64_t> norm_positions(size_t(n.rows));
  for (float& v : norm_x) v = 3.0f * normal(rng);
  for (float& w : norm_weight) w = 1.0f + 0.25f * normal(rng);
  for (int64_t r = 0; r < n.rows; ++r) norm_positions[size_t(r)] = 7 * r;
  const cpu::RopeTable rope(10000.0, rope_dim, std::nullopt);

  DeviceBuffer d_x = to_device(x, "x"), d_wide = to_device(wide, "wide x"), d_kvw = to_device(kv_weight, "kv_norm"),
               d_slots = to_device(slots, "slots"), d_dest = to_device(dest, "dest"),
               d_pos = to_device(positions, "positions"), d_rope = device_rope_table(rope, 512),
               d_norm_x = to_device(norm_x, "norm x"), d_norm_w = to_device(norm_weight, "norm weight"),
               d_norm_pos = to_device(norm_positions, "norm positions");
  const size_t norm_size = norm_x.size();  // even in every case: the bf16 outputs are whole floats
  DeviceBuffer separate_y = poisoned(norm_size, "separate y"), fused_y = poisoned(norm_size, "fused y");
  DeviceBuffer separate_bf16 = poisoned(norm_size / 2, "separate y_bf16"),
               fused_bf16 = poisoned(norm_size / 2, "fused y_bf16");
  const KvCacheView view = cache.view();
  const size_t pool_bytes = size_t(4) * 8 * view.layout.entry_bytes;

  const KvInsertParams insert{.cache = view, .rows = rows, .x = d_x.as<float>(), .norm_weight = d_kvw.as<float>(),
                              .rope_table = d_rope.as<float2>(), .sequence_slots = d_slots.as<int32_t>(),
                              .positions = d_pos.as<int64_t>(), .dest_rows = d_dest.as<int32_t>()};
  RmsNormParams norm{.x = d_norm_x.as<float>(),
                     .weight = n.weighted ? d_norm_w.as<float>() : nullptr,
                     .rows = n.rows,
                     .width = n.width,
                     .y = separate_y.as<float>(),
                     .y_bf16 = separate_bf16.as<__nv_bfloat16>(),
                     .cta_rows = n.cta_rows};
  if (n.rope) {
    norm.rope_table = d_rope.as<float2>(), norm.positions = d_norm_pos.as<int64_t>();
    norm.rope_dim = rope_dim, norm.rows_per_position = 1;
  }
  ASSERT_EQ(cudaMemset(view.pool, 0xFF, pool_bytes), cudaSuccess);
  run_rms_norm(norm);
  run_kv_insert(insert);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> want_pool(pool_bytes), got_pool(pool_bytes);
  ASSERT_EQ(cudaMemcpy(want_pool.data(), view.pool, pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);

  ASSERT_EQ(cudaMemset(view.pool, 0xFF, pool_bytes), cudaSuccess);
  KvInsertParams fused = insert;
  fused.x = d_wide.as<float>() + 96, fused.x_row_stride = stride;
  fused.fused_norm = norm;
  fused.fused_norm.y = fused_y.as<float>(), fused.fused_norm.y_bf16 = fused_bf16.as<__nv_bfloat16>();
  run_kv_insert(fused);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got_pool.data(), view.pool, pool_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t b = 0; b < pool_bytes; ++b)
    ASSERT_EQ(got_pool[b], want_pool[b]) << "pool byte " << b << " (entry " << b / size_t(view.layout.entry_bytes)
                                         << ")";
  const std::vector<float> want_y = download(separate_y, norm_size), got_y = download(fused_y, norm_size);
  const std::vector<float> want_b = download(separate_bf16, norm_size / 2),
                           got_b = download(fused_bf16, norm_size / 2);
  for (size_t i = 0; i < norm_size; ++i)
    ASSERT_EQ(std::memcmp(&want_y[i], &got_y[i], 4), 0) << "norm y[" << i << "]: fused " << got_y[i] << ", separate "
                                                        << want_y[i];
  ASSERT_EQ(std::memcmp(want_b.data(), got_b.data(), norm_size * 2), 0) << "the fused norm's bf16 output differs";
}

TEST(KvInsert, FusedNormAndStridedRowsGiveTheSeparateLaunchesBits) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  // q_norm of the low-rank query (Flash 1024, Pro 1536), the queries' per-head norm with RoPE (Flash: 64 heads of a
  // token), CTA-row norms with and without RoPE, and a row count that leaves a CTA's warps partly idle.
  const FusedNormCase norms[] = {{1, 1024, true, false},      {3, 1536, true, false}, {64, 512, false, true},
                                 {2, 4096, true, false},      {3, 2048, false, true}, {13, 96, true, false},
                                 {64, 512, false, true, true}, {5, 96, true, true, true}};
  for (const KvEntryFormat format : {KvEntryFormat::Bf16, KvEntryFormat::Fp8Reference})
    for (const auto [D, rope] : {std::pair{512, 64}, std::pair{64, 16}})
      for (const FusedNormCase& n : norms)
        check_fused_insert(format, D, rope, n, seed++);
}

TEST(KvInsert, RefusesBadCalls) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  KvCache cache({.format = KvEntryFormat::Bf16, .head_dim = 64, .rope_dim = 16, .layers = 1, .max_sequences = 1,
                 .window_capacity = 8, .page_rows = 8, .pages = 1});
  DeviceBuffer buffer(4096, "scratch");
  const KvInsertParams good{.cache = cache.view(), .rows = 1, .x = buffer.as<float>(),
                            .norm_weight = buffer.as<float>(), .sequence_slots = buffer.as<int32_t>(),
                            .dest_rows = buffer.as<int32_t>()};
  KvInsertParams p = good;
  p.layer = 1;
  testing::expect_error([&] { run_kv_insert(p); }, "layer 1");
  p = good;
  p.dest_rows = nullptr;
  testing::expect_error([&] { run_kv_insert(p); }, "dest_rows");
  p = good;
  p.rope_table = buffer.as<float2>();
  testing::expect_error([&] { run_kv_insert(p); }, "positions");
  p = good;
  p.x_row_stride = 32;
  testing::expect_error([&] { run_kv_insert(p); }, "x_row_stride 32");
  p = good;
  p.fused_norm = {.x = buffer.as<float>(), .rows = 1, .width = 16};
  testing::expect_error([&] { run_kv_insert(p); }, "no output");
}

}  // namespace
}  // namespace dsv4::cuda
