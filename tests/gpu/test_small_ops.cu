// The CUDA RMSNorm and embedding kernels against the CPU ops. RMSNorm: every width the model normalises (d 4096 /
// 7168, q_lora 1024 / 1536, D 512 per head without weight) and odd ones (7, 96, 1025, the 8192 limit), rows
// {1, 5, 64, 300}, in place and out of place, fp32 + bf16 outputs, both numerics modes; the per-head norm with its
// RoPE epilogue bit-identical to the norm followed by run_rope_apply; the RoPE table against the CPU's factors.
// Embedding: BF16, F32 and FP8_BLOCK128 (e8m0 and f32 scales) tables with a partial 128-row band, broadcast to 4
// streams and to 1, exact against the CPU decode. Attention index lists (window ring rows, visible compressed
// entries) for the tokens of a batched step (and the per-token visible counts): sequences of different lengths,
// decode tokens and prefill runs mixed, each list alone, all of a step's in one launch, and in the embedding's launch,
// exact against the rule written out on the host. Strided norm input (a slice of a wider output) bit-identical to
// contiguous rows. Outputs poisoned with NaN plus a guard region; every element checked. The shared PerDeviceCache:
// one compute per key and device under concurrent calls.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backends/cpu/bf16_rounding.hpp"
#include "backends/cpu/rms_norm.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/attention_index.hpp"
#include "backends/cuda/kernels/embedding.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/rope_apply.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cpu/rope.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "support/device_buffers.hpp"
#include "support/device_rope_table.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

void check_rms_norm(int64_t rows, int64_t width, bool with_weight, bool in_place, bool round, uint32_t seed,
                    bool cta_rows = false) {
  SCOPED_TRACE("rms_norm rows=" + std::to_string(rows) + " width=" + std::to_string(width) +
               (with_weight ? " weighted" : " weightless") + (in_place ? " in place" : "") +
               (round ? " reference" : " exact") + (cta_rows ? " CTA rows" : ""));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(rows * width)), weight(static_cast<size_t>(width));
  for (int64_t r = 0; r < rows; ++r) {
    const float magnitude = std::ldexp(1.0f, int(rng() % 9) - 4);
    for (int64_t i = 0; i < width; ++i) x[size_t(r * width + i)] = normal(rng) * magnitude;
  }
  for (float& w : weight) w = 1.0f + 0.2f * normal(rng);
  std::vector<float> expected(x.size());
  cpu::rms_norm(x.data(), with_weight ? weight.data() : nullptr, expected.data(), {rows, width, 1e-6f});
  const std::vector<float> unrounded = expected;
  if (round) cpu::round_to_bf16_inplace(expected.data(), int64_t(expected.size()));

  DeviceBuffer x_d = poisoned(x.size(), "x"), y_d = poisoned(x.size(), "y"), w_d(weight.size() * 4, "weight");
  x_d.upload(x.data(), x.size() * sizeof(float));
  w_d.upload(weight.data(), weight.size() * sizeof(float));
  DeviceBuffer y_bf16(x.size() * 2 + 16, "y_bf16");
  y_bf16.fill_bytes(0xFF);
  DeviceBuffer& y_target = in_place ? x_d : y_d;
  run_rms_norm({.x = x_d.as<float>(),
                .weight = with_weight ? w_d.as<float>() : nullptr,
                .rows = rows,
                .width = width,
                .eps = 1e-6f,
                .round_to_bf16 = round,
                .y = y_target.as<float>(),
                .y_bf16 = y_bf16.as<__nv_bfloat16>(),
                .cta_rows = cta_rows});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> y = download(y_target, x.size());
  std::vector<uint16_t> bf16(x.size());
  y_bf16.download(bf16.data(), bf16.size() * 2);
  int failures = 0;
  for (size_t e = 0; e < y.size() && failures < 8; ++e) {
    // y = x · inv_rms · w: only inv_rms's sum of squares runs in another order, a relative error of a few ulps.
    double tolerance = 1e-5 * std::fabs(unrounded[e]);
    if (round) tolerance += bf16_ulp(std::fabs(unrounded[e]) * 1.00001f);
    const bool ok = std::fabs(double(y[e]) - expected[e]) <= tolerance && (!round || round_to_bf16(y[e]) == y[e]) &&
                    bf16[e] == float_to_bf16(y[e]);
    if (!ok) {
      ++failures;
      ADD_FAILURE() << "y[" << e / size_t(width) << ", " << e % size_t(width) << "] = " << y[e] << " (bf16 0x"
                    << std::hex << bf16[e] << std::dec << "), expected " << expected[e] << ", tolerance "
                    << tolerance;
    }
  }
}

TEST(SmallOpsGpu, RmsNormMatchesCpuForModelAndOddWidths) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const int64_t width : {4096, 7168, 1024, 1536, 512, 7, 96, 1025, 8192})
    for (const int64_t rows : {1, 5, 64, 300})
      for (const bool round : {false, true}) {
        const bool in_place = seed % 2 == 1;  // alternate so every width runs both ways
        check_rms_norm(rows, width, true, in_place, round, seed++);
      }
}

// Rows x_row_stride apart (a slice of a wider projection output, e.g. q_lora of the stacked [wq_a; wkv]): the
// same bits as the contiguous rows, and the gaps (NaN) never read.
TEST(SmallOpsGpu, RmsNormOfStridedRowsEqualsContiguousRows) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 70;
  for (const auto [width, stride] : {std::pair{int64_t(1024), int64_t(1536)}, std::pair{int64_t(4096), int64_t(4099)},
                                     std::pair{int64_t(7), int64_t(8)}}) {
    SCOPED_TRACE("width " + std::to_string(width) + " stride " + std::to_string(stride));
    const int64_t rows = 37;
    std::mt19937 rng(seed++);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(size_t(rows * width)), strided(size_t(rows * stride), std::nanf(""));
    std::vector<float> weight(static_cast<size_t>(width));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < width; ++i) strided[size_t(r * stride + i)] = x[size_t(r * width + i)] = normal(rng);
    for (float& w : weight) w = 1.0f + 0.2f * normal(rng);
    DeviceBuffer x_d = to_device(x, "x"), strided_d = to_device(strided, "strided x"), w_d = to_device(weight, "w");
    DeviceBuffer want_d = poisoned(x.size(), "contiguous y"), got_d = poisoned(x.size(), "strided y");
    RmsNormParams p{
        .x = x_d.as<float>(), .weight = w_d.as<float>(), .rows = rows, .width = width, .y = want_d.as<float>()};
    run_rms_norm(p);
    p.x = strided_d.as<float>(), p.x_row_stride = stride, p.y = got_d.as<float>();
    run_rms_norm(p);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> want = download(want_d, x.size()), got = download(got_d, x.size());
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(std::memcmp(&want[i], &got[i], 4), 0) << "row " << i / size_t(width) << " element "
                                                      << i % size_t(width) << ": strided " << got[i]
                                                      << ", contiguous " << want[i];
  }
}

// The per-head norm (with and without RoPE) of queries that are a slice of wider token rows (the stacked
// [wq_b; indexer wq_b] output): rows_per_position heads x_row_stride apart, tokens x_group_stride apart; the same
// bits as the contiguous heads, the gaps (NaN) never read, y contiguous. Also the q_lora slice of [wq_a; wkv] as
// groups of one row.
TEST(SmallOpsGpu, RmsNormOfGroupedRowsEqualsContiguousRows) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  const struct {
    int64_t tokens, heads, width, row_stride, group_stride, rope_dim;
  } cases[] = {{5, 64, 512, 512, 64 * 512 + 64 * 128, 64}, {3, 128, 512, 512, 128 * 512 + 64 * 128, 64},
               {7, 4, 64, 64, 4 * 64 + 96, 16}, {2, 3, 96, 100, 3 * 100 + 5, 0}, {9, 1, 1024, 1024, 1536, 0}};
  uint32_t seed = 90;
  for (const auto& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.tokens) + " heads=" + std::to_string(c.heads) + " width=" +
                 std::to_string(c.width) + " row stride " + std::to_string(c.row_stride) + " group stride " +
                 std::to_string(c.group_stride) + " rope " + std::to_string(c.rope_dim));
    std::mt19937 rng(seed++);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    const int64_t rows = c.tokens * c.heads;
    std::vector<float> x(size_t(rows * c.width)), grouped(size_t(c.tokens * c.group_stride), std::nanf(""));
    for (int64_t t = 0; t < c.tokens; ++t)
      for (int64_t h = 0; h < c.heads; ++h)
        for (int64_t i = 0; i < c.width; ++i)
          grouped[size_t(t * c.group_stride + h * c.row_stride + i)] =
              x[size_t((t * c.heads + h) * c.width + i)] = normal(rng);
    std::vector<int64_t> positions(size_t(c.tokens));
    for (int64_t& p : positions) p = int64_t(rng() % 70000);
    const cpu::RopeTable rope(10000.0, std::max<int64_t>(c.rope_dim, 2), std::nullopt);
    DeviceBuffer x_d = to_device(x, "x"), grouped_d = to_device(grouped, "grouped x");
    DeviceBuffer pos_d = to_device(positions, "positions"), table_d = device_rope_table(rope, 70000);
    DeviceBuffer want_d = poisoned(x.size(), "contiguous y"), got_d = poisoned(x.size(), "grouped y");
    RmsNormParams p{.x = x_d.as<float>(), .rows = rows, .width = c.width, .y = want_d.as<float>()};
    p.rows_per_position = c.heads;
    if (c.rope_dim > 0)
      p.rope_table = table_d.as<float2>(), p.positions = pos_d.as<int64_t>(), p.rope_dim = c.rope_dim;
    run_rms_norm(p);
    p.x = grouped_d.as<float>(), p.x_row_stride = c.row_stride, p.x_group_stride = c.group_stride;
    p.y = got_d.as<float>();
    run_rms_norm(p);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> want = download(want_d, x.size()), got = download(got_d, x.size());
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(std::memcmp(&want[i], &got[i], 4), 0) << "row " << i / size_t(c.width) << " element "
                                                      << i % size_t(c.width) << ": grouped " << got[i]
                                                      << ", contiguous " << want[i];
  }
}

TEST(SmallOpsGpu, RmsNormPerHeadWithoutWeight) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  // q's per-head norm: T·H rows of D = 512 (Flash H 64, Pro H 128), no weight; and the tiny models' 64.
  check_rms_norm(5 * 64, 512, false, true, false, 50);
  check_rms_norm(64 * 128, 512, false, false, true, 51);
  check_rms_norm(3 * 4, 64, false, true, false, 52);
  // A CTA per head (q_norm_cta_rows: a decode step's heads over more SMs).
  check_rms_norm(64, 512, false, false, false, 53, true);
  check_rms_norm(3 * 128, 512, false, true, true, 54, true);
  check_rms_norm(5, 96, true, false, false, 55, true);
}

enum class TableKind { BF16, F32, FP8_E8M0, FP8_F32 };

OwnedQuantizedMatrix make_table(TableKind kind, int64_t vocab, int64_t hidden, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(size_t(vocab * hidden));
  for (int64_t r = 0; r < vocab; ++r) {
    const float magnitude = std::ldexp(1.0f, int(rng() % 9) - 4);
    for (int64_t i = 0; i < hidden; ++i) values[size_t(r * hidden + i)] = normal(rng) * magnitude;
  }
  switch (kind) {
    case TableKind::FP8_E8M0: return quantize_fp8_block128(values.data(), vocab, hidden, ScaleType::E8M0);
    case TableKind::FP8_F32: return quantize_fp8_block128(values.data(), vocab, hidden, ScaleType::F32);
    case TableKind::BF16: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::BF16, vocab, hidden, ScaleType::NONE);
      for (size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits = float_to_bf16(values[i]);
        std::memcpy(&m.storage->data[i * 2], &bits, 2);
      }
      return m;
    }
    case TableKind::F32: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(WeightFormat::F32, vocab, hidden, ScaleType::NONE);
      std::memcpy(m.storage->data.data(), values.data(), values.size() * sizeof(float));
      return m;
    }
  }
  fail("test: unknown table kind");
}

const char* kind_name(TableKind kind) {
  switch (kind) {
    case TableKind::BF16: return "BF16";
    case TableKind::F32: return "F32";
    case TableKind::FP8_E8M0: return "FP8_BLOCK128/e8m0";
    case TableKind::FP8_F32: return "FP8_BLOCK128/f32";
  }
  return "?";
}

void check_embedding(TableKind kind, int64_t vocab, int64_t hidden, int64_t T, int streams, bool round,
                     uint32_t seed) {
  SCOPED_TRACE(std::string("embedding ") + kind_name(kind) + " [" + std::to_string(vocab) + ", " +
               std::to_string(hidden) + "] T=" + std::to_string(T) + " streams=" + std::to_string(streams) +
               (round ? " reference" : " exact"));
  std::mt19937 rng(seed);
  const OwnedQuantizedMatrix table = make_table(kind, vocab, hidden, rng);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int32_t& id : ids) id = int32_t(rng() % uint32_t(vocab));
  ids[0] = int32_t(vocab - 1);  // the last row sits in the partial 128-row scale band
  check_embedding_ids(ids.data(), T, vocab);

  std::vector<float> expected(size_t(T * streams * hidden)), row(static_cast<size_t>(hidden));
  for (int64_t t = 0; t < T; ++t) {
    dequantize_rows(table.matrix, ids[size_t(t)], ids[size_t(t)] + 1, row.data());
    if (round) cpu::round_to_bf16_inplace(row.data(), hidden);
    for (int k = 0; k < streams; ++k)
      std::memcpy(&expected[size_t((t * streams + k) * hidden)], row.data(), size_t(hidden) * sizeof(float));
  }

  const DeviceMatrix table_d(table.matrix, "embedding table");
  DeviceBuffer ids_d(ids.size() * sizeof(int32_t), "ids");
  ids_d.upload(ids.data(), ids.size() * sizeof(int32_t));
  DeviceBuffer X = poisoned(expected.size(), "X");
  run_embedding({.table = table_d.view(),
                 .ids = ids_d.as<int32_t>(),
                 .tokens = T,
                 .streams = streams,
                 .round_to_bf16 = round,
                 .X = X.as<float>()});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> actual = download(X, expected.size());
  // Both sides decode exactly (e4m3 · scale is one rounding, the same on both): bit-identical.
  for (size_t e = 0; e < actual.size(); ++e)
    if (std::memcmp(&actual[e], &expected[e], sizeof(float)) != 0) {
      const size_t per_token = size_t(streams * hidden);
      FAIL() << "X[t=" << e / per_token << ", stream " << (e % per_token) / size_t(hidden) << ", "
             << e % size_t(hidden) << "] = " << actual[e] << ", expected " << expected[e];
    }
}

TEST(SmallOpsGpu, EmbeddingMatchesCpuDecodeForEveryTableFormat) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  for (const TableKind kind : {TableKind::BF16, TableKind::F32, TableKind::FP8_E8M0, TableKind::FP8_F32})
    for (const auto& [vocab, hidden] : {std::pair<int64_t, int64_t>{1000, 4096}, {300, 7168}, {129, 260}, {5, 7}})
      for (const int64_t T : {1, 5, 64, 300})
        for (const bool round : {false, true}) check_embedding(kind, vocab, hidden, T, 4, round, seed++);
  check_embedding(TableKind::FP8_E8M0, 1000, 4096, 5, 1, false, seed++);
}

TEST(SmallOpsGpu, EmbeddingIdOutsideTheVocabularyGivesNanOnTheDeviceAndAnErrorOnTheHost) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(7);
  const OwnedQuantizedMatrix table = make_table(TableKind::BF16, 10, 64, rng);
  const std::vector<int32_t> ids = {3, 10, -1};
  testing::expect_error([&] { check_embedding_ids(ids.data(), 3, 10); }, "token id 10 at position 1");
  const DeviceMatrix table_d(table.matrix, "table");
  DeviceBuffer ids_d(ids.size() * 4, "ids");
  ids_d.upload(ids.data(), ids.size() * 4);
  DeviceBuffer X = poisoned(3 * 64, "X");
  X.fill_bytes(0);
  run_embedding({.table = table_d.view(), .ids = ids_d.as<int32_t>(), .tokens = 3, .streams = 1, .X = X.as<float>()});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> out(3 * 64);
  X.download(out.data(), out.size() * 4);
  // X was zeroed, so the valid row is checked against the table (a finite-only check would pass untouched zeros).
  std::vector<float> row_3(64);
  dequantize_rows(table.matrix, 3, 4, row_3.data());
  for (int i = 0; i < 64; ++i) {
    ASSERT_EQ(out[size_t(i)], row_3[size_t(i)]) << "row of the valid id 3, element " << i;
    ASSERT_TRUE(std::isnan(out[size_t(64 + i)])) << "row of id 10";
    ASSERT_TRUE(std::isnan(out[size_t(128 + i)])) << "row of id -1";
  }
}

// The RoPE table holds the CPU's factors (cpu::RopeTable::angles): every position of a 4K context and a sample up
// to 1M, for an SWA layer's frequencies, a compressed layer's (YaRN) and a tiny model's; equal bits, barring a
// 1-ulp difference where the double-precision sincos of the two libraries rounds differently to float.
TEST(SmallOpsGpu, RopeTableHoldsTheCpuFactors) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  const cpu::RopeTable ropes[] = {cpu::RopeTable(10000.0, 64, std::nullopt),
                                  cpu::RopeTable(160000.0, 64, cpu::YarnScaling{16.0, 65536, 32.0, 1.0}),
                                  cpu::RopeTable(10000.0, 16, std::nullopt)};
  constexpr int64_t kPositions = int64_t(1) << 20;
  for (const cpu::RopeTable& rope : ropes) {
    SCOPED_TRACE("rope_dim " + std::to_string(rope.rope_dim()) + " f1 " + std::to_string(rope.frequencies()[1]));
    const int64_t pairs = rope.rope_dim() / 2;
    const DeviceBuffer table = device_rope_table(rope, kPositions);
    std::vector<float2> rows(size_t(kPositions * pairs));
    table.download(rows.data(), rows.size() * sizeof(float2));
    std::vector<float> want_cos(static_cast<size_t>(pairs)), want_sin(static_cast<size_t>(pairs));
    int64_t ulp_differences = 0, checked = 0;
    for (int64_t position = 0; position < kPositions; position += position < 4096 ? 1 : 997) {
      rope.angles(position, want_cos.data(), want_sin.data());
      for (int64_t k = 0; k < pairs; ++k, ++checked) {
        const float2 got = rows[size_t(position * pairs + k)];
        for (const auto [g, w] : {std::pair{got.x, want_cos[size_t(k)]}, std::pair{got.y, want_sin[size_t(k)]}}) {
          if (std::memcmp(&g, &w, 4) == 0) continue;
          ++ulp_differences;
          ASSERT_EQ(std::fabs(g - w), std::fabs(std::nextafter(w, 2.0f * g - w) - w))
              << "position " << position << " pair " << k << ": table " << g << ", CPU " << w;
        }
      }
    }
    EXPECT_LE(ulp_differences, checked / 100000 + 2) << "1-ulp differences in " << checked << " pairs";
  }
}

// The queries' per-head norm with RoPE in one launch: bit for bit the norm, then run_rope_apply; the same with the
// positions read before the grid-dependency wait.
TEST(SmallOpsGpu, RmsNormWithRopeEqualsNormThenRope) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  const struct {
    int64_t tokens, heads, head_dim, rope_dim;
  } cases[] = {{3, 64, 512, 64}, {1, 128, 512, 64}, {7, 8, 64, 16}, {2, 5, 2048, 64}, {4, 3, 96, 32}};
  uint32_t seed = 40;
  for (const auto& c : cases) {
    for (const auto [round, cta_rows] : {std::pair{false, false}, std::pair{true, false}, std::pair{false, true}}) {
      SCOPED_TRACE("T=" + std::to_string(c.tokens) + " H=" + std::to_string(c.heads) + " D=" +
                   std::to_string(c.head_dim) + " rope=" + std::to_string(c.rope_dim) + (round ? " rounded" : "") +
                   (cta_rows ? " CTA rows" : ""));
      std::mt19937 rng(seed++);
      std::normal_distribution<float> normal(0.0f, 3.0f);
      const size_t n = size_t(c.tokens * c.heads * c.head_dim);
      std::vector<float> x(n);
      for (float& v : x) v = normal(rng);
      std::vector<int64_t> positions(size_t(c.tokens));
      for (int64_t& p : positions) p = int64_t(rng() % 100000);
      const cpu::RopeTable rope(10000.0, c.rope_dim, std::nullopt);
      DeviceBuffer d_x = to_device(x, "x"), d_pos = to_device(positions, "positions");
      DeviceBuffer d_rope = device_rope_table(rope, 100000);
      DeviceBuffer separate = poisoned(n, "norm then rope"), fused = poisoned(n, "fused");
      const RmsNormParams norm{.x = d_x.as<float>(), .rows = c.tokens * c.heads, .width = c.head_dim,
                               .round_to_bf16 = round, .y = separate.as<float>(), .cta_rows = cta_rows};
      run_rms_norm(norm);
      run_rope_apply({.x = separate.as<float>(), .tokens = c.tokens, .heads = c.heads, .head_dim = c.head_dim,
                      .rope_dim = c.rope_dim, .rope_table = d_rope.as<float2>(), .positions = d_pos.as<int64_t>()});
      RmsNormParams with_rope = norm;
      with_rope.y = fused.as<float>();
      with_rope.rope_table = d_rope.as<float2>(), with_rope.positions = d_pos.as<int64_t>();
      with_rope.rope_dim = c.rope_dim, with_rope.rows_per_position = c.heads;
      run_rms_norm(with_rope);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> want = download(separate, n), got = download(fused, n);
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(std::memcmp(&want[i], &got[i], 4), 0) << "element " << i << " (dim " << i % size_t(c.head_dim)
                                                        << "): fused " << got[i] << ", separate " << want[i];
    }
  }
}

// The positions of a batched step: a prefill run of 37 tokens from 0, decode tokens of sequences at 0, 1, 5,
// window − 1, window, a ring wrap and a long context, and a chunk from 1000; in that (non-monotonic) order.
std::vector<int64_t> batch_positions(int64_t window) {
  std::vector<int64_t> positions;
  for (int64_t p = 0; p < 37; ++p) positions.push_back(p);
  for (int64_t p : {int64_t(0), int64_t(1), int64_t(5), window - 1, window, int64_t(3 * window + 7), int64_t(65535)})
    positions.push_back(p);
  for (int64_t p = 1000; p < 1013; ++p) positions.push_back(p);
  return positions;
}

// Reads an int32 output written into a poisoned() buffer (bit patterns: −1 stays distinguishable from the poison).
std::vector<int32_t> download_ints(const DeviceBuffer& buffer, size_t count) {
  const std::vector<float> raw = download(buffer, count);
  std::vector<int32_t> ints(count);
  std::memcpy(ints.data(), raw.data(), count * 4);
  return ints;
}

// The window list's rule written out: slot s holds position p − window + 1 + s, at its ring row, or −1 before the
// sequence's start.
void expect_window_list(const std::vector<int32_t>& got, const std::vector<int64_t>& positions, int window,
                        int64_t ring) {
  for (size_t t = 0; t < positions.size(); ++t)
    for (int64_t s = 0; s < window; ++s) {
      const int64_t source = positions[t] - window + 1 + s;
      const int32_t want = source >= 0 ? int32_t(source % ring) : -1;
      ASSERT_EQ(got[t * size_t(window) + size_t(s)], want)
          << "window " << window << ": token " << t << " (position " << positions[t] << ") slot " << s;
    }
}

// A visible-entry list's rule: each token sees (position + 1) div ratio of the `entries` bound.
void expect_visible_list(const std::vector<int32_t>& got, const std::vector<int32_t>& counts,
                         const std::vector<int64_t>& positions, int64_t ratio, int64_t entries) {
  for (size_t t = 0; t < positions.size(); ++t) {
    const int64_t visible = std::min(entries, (positions[t] + 1) / ratio);
    ASSERT_EQ(counts[t], int32_t(visible)) << "ratio " << ratio << ": token " << t << " (position " << positions[t]
                                           << ")";
    for (int64_t e = 0; e < entries; ++e)
      ASSERT_EQ(got[t * size_t(entries) + size_t(e)], e < visible ? int32_t(e) : -1)
          << "ratio " << ratio << ": token " << t << " (position " << positions[t] << ") entry " << e;
  }
}

TEST(SmallOpsGpu, WindowIndexPerTokenOfABatchedStep) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  for (const auto [window, ring] : {std::pair{128, int64_t(128 + 511)}, std::pair{16, int64_t(16)},
                                    std::pair{300, int64_t(300 + 63)}}) {
    SCOPED_TRACE("window " + std::to_string(window) + " ring " + std::to_string(ring));
    const std::vector<int64_t> positions = batch_positions(window);
    const int64_t T = int64_t(positions.size());
    DeviceBuffer d_pos = to_device(positions, "positions"), d_index = poisoned(size_t(T * window), "window index");
    run_attention_index({.positions = d_pos.as<int64_t>(), .tokens = T, .window = window, .ring_rows = ring,
                         .window_index = d_index.as<int32_t>()});
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_window_list(download_ints(d_index, size_t(T * window)), positions, window, ring);
  }
}

TEST(SmallOpsGpu, VisibleEntriesPerTokenOfABatchedStep) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  // entries: the bound of a step (the buffers' capacity); each token sees (position + 1) div ratio of them.
  for (const auto [ratio, entries] : {std::pair{int64_t(128), int64_t(512)}, std::pair{int64_t(4), int64_t(300)},
                                      std::pair{int64_t(16), int64_t(1)}}) {
    SCOPED_TRACE("ratio " + std::to_string(ratio) + " entries " + std::to_string(entries));
    const std::vector<int64_t> positions = batch_positions(128);
    const int64_t T = int64_t(positions.size());
    DeviceBuffer d_pos = to_device(positions, "positions"), d_index = poisoned(size_t(T * entries), "entry index");
    DeviceBuffer d_counts = poisoned(size_t(T), "counts");
    AttentionIndexParams p{.positions = d_pos.as<int64_t>(), .tokens = T};
    p.visible[0] = {.entries = entries, .ratio = ratio, .index = d_index.as<int32_t>(),
                    .counts = d_counts.as<int32_t>()};
    p.visible_lists = 1;
    run_attention_index(p);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    expect_visible_list(download_ints(d_index, size_t(T * entries)), download_ints(d_counts, size_t(T)), positions,
                        ratio, entries);
  }
}

// A model step's one launch: the window list and every HCA ratio's list (here three, of different lengths, one
// longer than the window and one shorter), each as its own launch would build it.
TEST(SmallOpsGpu, EveryListOfAStepInOneLaunch) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  const int window = 128;
  const int64_t ring = 128 + 63;
  const std::vector<int64_t> positions = batch_positions(window);
  const int64_t T = int64_t(positions.size());
  const std::vector<std::pair<int64_t, int64_t>> lists = {{128, 512}, {4, 1000}, {16, 40}};  // ratio, entries
  DeviceBuffer d_pos = to_device(positions, "positions"), d_window = poisoned(size_t(T * window), "window index");
  std::vector<DeviceBuffer> d_index, d_counts;
  AttentionIndexParams p{.positions = d_pos.as<int64_t>(), .tokens = T, .window = window, .ring_rows = ring,
                         .window_index = d_window.as<int32_t>()};
  for (const auto [ratio, entries] : lists) {
    d_index.push_back(poisoned(size_t(T * entries), "entry index"));
    d_counts.push_back(poisoned(size_t(T), "counts"));
    p.visible[p.visible_lists++] = {.entries = entries, .ratio = ratio, .index = d_index.back().as<int32_t>(),
                                    .counts = d_counts.back().as<int32_t>()};
  }
  run_attention_index(p);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  expect_window_list(download_ints(d_window, size_t(T * window)), positions, window, ring);
  for (size_t i = 0; i < lists.size(); ++i)
    expect_visible_list(download_ints(d_index[i], size_t(T * lists[i].second)),
                        download_ints(d_counts[i], size_t(T)), positions, lists[i].first, lists[i].second);
}

// The step's lists riding in the embedding's launch: the same rows as the embedding alone, the same lists as
// run_attention_index.
TEST(SmallOpsGpu, EmbeddingLaunchBuildsTheAttentionLists) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  const int window = 128;
  const int64_t ring = 128 + 63, hidden = 260, vocab = 129;
  const std::vector<int64_t> positions = batch_positions(window);
  const int64_t T = int64_t(positions.size());
  std::mt19937 rng(80);
  const OwnedQuantizedMatrix table = make_table(TableKind::BF16, vocab, hidden, rng);
  const DeviceMatrix table_d(table.matrix, "embedding table");
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int32_t& id : ids) id = int32_t(rng() % uint32_t(vocab));
  DeviceBuffer d_ids = to_device(ids, "ids"), d_pos = to_device(positions, "positions");
  DeviceBuffer alone = poisoned(size_t(T * 4 * hidden), "X alone"), with_lists = poisoned(size_t(T * 4 * hidden), "X");
  DeviceBuffer d_window = poisoned(size_t(T * window), "window index"), d_index = poisoned(size_t(T * 512), "index");
  DeviceBuffer d_counts = poisoned(size_t(T), "counts");
  AttentionIndexParams lists{.positions = d_pos.as<int64_t>(), .tokens = T, .window = window, .ring_rows = ring,
                             .window_index = d_window.as<int32_t>()};
  lists.visible[0] = {.entries = 512, .ratio = 128, .index = d_index.as<int32_t>(), .counts = d_counts.as<int32_t>()};
  lists.visible_lists = 1;
  EmbeddingParams p{.table = table_d.view(), .ids = d_ids.as<int32_t>(), .tokens = T, .X = alone.as<float>()};
  run_embedding(p);
  p.X = with_lists.as<float>(), p.attention_lists = &lists;
  run_embedding(p);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> want = download(alone, size_t(T * 4 * hidden)), got = download(with_lists, want.size());
  ASSERT_EQ(std::memcmp(want.data(), got.data(), want.size() * 4), 0) << "the rows differ with the lists built";
  expect_window_list(download_ints(d_window, size_t(T * window)), positions, window, ring);
  expect_visible_list(download_ints(d_index, size_t(T * 512)), download_ints(d_counts, size_t(T)), positions, 128,
                      512);
}

TEST(SmallOpsGpu, RefusesUnsupportedCallsNamingTheProblem) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer x(64 * 4, "x"), y(64 * 4, "y");
  using testing::expect_error;
  expect_error([&] { run_rms_norm({.x = x.as<float>(), .rows = 1, .width = 8193, .y = y.as<float>()}); },
               "width 8193");
  expect_error([&] { run_rms_norm({.x = x.as<float>(), .rows = 1, .width = 16}); }, "no output");
  expect_error([&] { run_rms_norm({.x = x.as<float>(), .rows = 2, .width = 16, .y = x.as<float>() + 4}); },
               "y must be x itself");
  expect_error(
      [&] { run_rms_norm({.x = x.as<float>(), .x_row_stride = 8, .rows = 2, .width = 16, .y = y.as<float>()}); },
      "x_row_stride 8 is below the width 16");
  expect_error(
      [&] {
        run_rms_norm({.x = x.as<float>(), .rows = 4, .width = 8, .y = y.as<float>(), .rows_per_position = 2,
                      .x_group_stride = 12});
      },
      "x_group_stride 12 is below a group of 2 rows 8 apart");
  expect_error(
      [&] {
        run_rms_norm({.x = x.as<float>(), .rows = 2, .width = 8, .y = x.as<float>(), .rows_per_position = 1,
                      .x_group_stride = 16});
      },
      "y must be x itself (with contiguous rows) or not overlap it");
  expect_error([&] { run_rms_norm({.x = x.as<float>(), .rows = int64_t(1) << 32, .width = 1, .y = y.as<float>()}); },
               "exceed the kernel's 32-bit row indices");
  expect_error(
      [&] { run_attention_index({.positions = x.as<int64_t>(), .tokens = 1, .window = 16, .ring_rows = 8}); },
      "the ring must hold a window");
  AttentionIndexParams no_index{.positions = x.as<int64_t>(), .tokens = 1};
  no_index.visible[0] = {.entries = 4, .ratio = 4};
  no_index.visible_lists = 1;
  expect_error([&] { run_attention_index(no_index); }, "visible list 0 has no index");
  const OwnedQuantizedMatrix nv = allocate_quantized_matrix(WeightFormat::MXFP4, 8, 64, ScaleType::E8M0);
  const DeviceMatrix nv_d(nv.matrix, "mxfp4 table");
  expect_error([&] { run_embedding({.table = nv_d.view(), .ids = x.as<int32_t>(), .tokens = 1, .X = y.as<float>()}); },
               "table format mxfp4");
}

// The shared per-(kernel, device) cache: one compute per key however many threads ask at once, keys kept apart,
// a throwing compute caches nothing (the next call computes again).
TEST(SmallOpsGpu, PerDeviceCacheComputesOncePerKeyAndDevice) {
  if (list_devices().empty()) GTEST_SKIP() << "no CUDA device";
  PerDeviceCache<int> cache;
  std::atomic<int> computes{0};
  const int key_a = 0, key_b = 0;  // two distinct addresses as keys
  std::vector<std::thread> threads;
  std::vector<int> seen(16, -1);
  for (size_t t = 0; t < seen.size(); ++t)
    threads.emplace_back([&, t] {
      DSV4_CUDA_CHECK(cudaSetDevice(0));
      seen[t] = cache.get(&key_a, [&] { return 100 + computes.fetch_add(1); });
    });
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(computes.load(), 1);
  for (const int value : seen) EXPECT_EQ(value, 100);
  EXPECT_EQ(cache.get(&key_b, [] { return 7; }), 7);
  EXPECT_EQ(cache.get(&key_a, [] { return -1; }), 100);
  EXPECT_THROW(cache.get(&computes, []() -> int { fail("query failed"); }), Error);
  EXPECT_EQ(cache.get(&computes, [] { return 3; }), 3);
}


}  // namespace
}  // namespace dsv4::cuda
