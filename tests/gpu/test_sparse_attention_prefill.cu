// run_sparse_attention_prefill against cpu::sparse_attention on the paged KV cache: bf16 and fp8 entries, chunks of
// consecutive queries per sequence (prefill) with V4-Flash (H 64) and V4-Pro (H 128) heads, window rings that wrap,
// window-only and window + compressed (top-k with −1 holes) slot lists whose lengths are not multiples of the 64-entry
// block (odd block counts, a lone partial block), per-query compressed counts with live rows past each count, a query
// without entries, padded head blocks, 1-entry pages, fp32/bf16 q and output, a rope_dim other than 64; decode batches
// (one query per sequence), with and without the producer's L2 prefetch of resolved entries. Every case runs twice on
// the same inputs: out 8 bytes past a 16-byte boundary (the weakest alignment allowed) and on one (bf16 rows leave
// through 16-byte stores there). Fresh random inputs per case, outputs poisoned with NaN, guard regions before and
// after, every element checked.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention_prefill.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "support/bounded_synchronize.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/sparse_attention_cases.hpp"

namespace dsv4::cuda {
namespace {

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

void compare_with_cpu(const AttentionCase& c, SparseAttentionParams call, const SparseAttentionPrefillOptions& options,
                      size_t offset_bytes, const std::vector<float>& expected, const std::vector<double>& magnitude);

// Default options: PrefetchResolved::Off, so that the plain producer is what the cases without On test.
void check_attention(const AttentionCase& c, uint32_t seed,
                     const SparseAttentionPrefillOptions& options = {.prefetch_resolved = PrefetchResolved::Off}) {
  const bool prefetch = options.prefetch_resolved == PrefetchResolved::On;
  SCOPED_TRACE(std::string(c.name) + " " + to_string(c.format) + " seed " + std::to_string(seed) +
               (prefetch ? " prefetch_resolved" : ""));
  SparseAttentionCaseData data;
  ASSERT_NO_FATAL_FAILURE(prepare_sparse_attention_case(c, seed, data));
  for (const size_t offset_bytes : {size_t(8), size_t(16)}) {
    SCOPED_TRACE("out at byte " + std::to_string(offset_bytes));
    compare_with_cpu(c, data.call, options, offset_bytes, data.expected, data.magnitude);
  }
}

// One run of `call` (its output filled in here, poisoned first) against the CPU's `expected`, within the tolerance
// that `magnitude` scales.
void compare_with_cpu(const AttentionCase& c, SparseAttentionParams call, const SparseAttentionPrefillOptions& options,
                      size_t offset_bytes, const std::vector<float>& expected, const std::vector<double>& magnitude) {
  const int64_t T = call.tokens;
  const int H = call.heads, D = c.head_dim;
  const size_t out_elements = size_t(T * H * D), element_bytes = c.out_dtype == AttentionDtype::F32 ? 4 : 2;
  // out `offset_bytes` into a 256-byte aligned buffer (8: the weakest alignment the contract allows, 16: a 16-byte
  // boundary), the bytes before it and a guard region after it checked.
  constexpr size_t kGuardBytes = 256;
  DeviceBuffer d_out(offset_bytes + out_elements * element_bytes + kGuardBytes, "out");
  d_out.fill_bytes(0xFF);
  call.out = static_cast<uint8_t*>(d_out.data()) + offset_bytes;
  run_sparse_attention_prefill(call, options);
  synchronize_or_exit(c.name);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> all(offset_bytes + out_elements * element_bytes + kGuardBytes);
  d_out.download(all.data(), all.size());
  for (size_t b = 0; b < offset_bytes; ++b) ASSERT_EQ(all[b], 0xFF) << "write before the start of out at byte " << b;
  const std::vector<uint8_t> raw(all.begin() + offset_bytes, all.end());

  const AttentionOutputCheck checked = check_attention_output(raw, c.out_dtype, H, D, expected, magnitude, false);
  EXPECT_EQ(checked.failures, 0) << checked.failures << " mismatches of " << out_elements;
  for (size_t b = out_elements * element_bytes; b < raw.size(); ++b)
    ASSERT_EQ(raw[b], 0xFF) << "write past the end of out at byte " << b;
  std::printf("  %-28s %-13s T=%lld H=%d D=%d out+%zu%s: worst error/tolerance %.3f\n", c.name, to_string(c.format),
              static_cast<long long>(T), H, D, offset_bytes,
              options.prefetch_resolved == PrefetchResolved::On ? " +pf" : "", checked.worst);
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

// Decode batches: one query per sequence (its own pages), with and without the producer's L2 prefetch of resolved
// entries; a query without entries, padded and multiple head blocks, per-query counts, 128 rope dims.
TEST(SparseAttentionPrefill, DecodeBatchesMatchCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 400;
  const SparseAttentionPrefillOptions prefetch{.prefetch_resolved = PrefetchResolved::On};
  for (const KvEntryFormat format : kFormats) {
    // CSA: 128 + 512 slots = 5 pairs.
    const AttentionCase csa{"flash csa decode", format, 512, 64, 64, 128, 128, 512, {3000, 700, 129, 5000}, 1};
    check_attention(csa, seed++);
    check_attention(csa, seed++, prefetch);
    check_attention(csa, seed++, {.prefetch_resolved = PrefetchResolved::Auto});
    // SWA: 128 window slots = one pair; a query without entries.
    check_attention({"flash swa decode", format, 512, 64, 64, 128, 128, 0, {40, 150, 1000}, 1, AttentionDtype::Bf16,
                     AttentionDtype::Bf16, true},
                    seed++, prefetch);
    // HCA with per-query counts (live rows past each count), a padded head block, bf16 out.
    AttentionCase hca{"h48 hca decode counts", format, 512, 64, 48, 128, 128, 300, {9000, 2000}, 1,
                      AttentionDtype::F32, AttentionDtype::Bf16};
    hca.counts = true;
    check_attention(hca, seed++, prefetch);
    // Pro: two head blocks.
    check_attention({"pro csa decode", format, 512, 64, 128, 128, 128, 512, {5000, 90}, 1, AttentionDtype::Bf16},
                    seed++, prefetch);
  }
  check_attention({"bf16 rope 128 decode", KvEntryFormat::Bf16, 512, 128, 64, 32, 40, 200, {500, 77}, 1}, seed++,
                  prefetch);
}

// A traced launch (bench_cuda_attention_prefill --trace) computes the same, every planned CTA traced: each of its three
// warpgroups records a start and an end no earlier, on an SM of the device; consumer 0's marks in order. fp32 q (Q
// staged through registers) and bf16 q and out (Q by tiles: kQStaged marks its copies issued).
TEST(SparseAttentionPrefill, TracedLaunchMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 500;
  for (const AttentionDtype dtype : {AttentionDtype::F32, AttentionDtype::Bf16}) {
    const AttentionCase c{dtype == AttentionDtype::F32 ? "flash csa chunk traced" : "flash csa chunk traced bf16",
                          KvEntryFormat::Bf16, 512, 64, 64, 128, 128, 512, {300, 2100}, 12, dtype, dtype};
    SCOPED_TRACE(c.name);
    // One CTA per (query, 64-head block).
    const int64_t kCtas = int64_t(c.lengths.size()) * c.queries_per_sequence * ((c.heads + 63) / 64);
    const size_t kWords = size_t(kCtas) * kPrefillTraceWarps * kPrefillTraceSlots;
    DeviceBuffer trace(kWords * 8, "trace");
    trace.fill_bytes(0);
    check_attention(c, seed++, {.prefetch_resolved = PrefetchResolved::Off, .trace = trace.as<uint64_t>()});
    std::vector<uint64_t> words(kWords);
    trace.download(words.data(), kWords * 8);
    const int sms = current_multiprocessors();
    for (int64_t cta = 0; cta < kCtas; ++cta) {
      const uint64_t* c0 = &words[size_t(cta) * kPrefillTraceWarps * kPrefillTraceSlots];
      for (const int warp : {0, 4, 8}) {  // the first warp of consumer 0, consumer 1, the producer
        const uint64_t* record = c0 + warp * kPrefillTraceSlots;
        EXPECT_GT(record[prefill_trace::kStart], 0u) << "CTA " << cta << " warp " << warp << " did not start";
        EXPECT_GE(record[prefill_trace::kEnd], record[prefill_trace::kStart]) << "CTA " << cta << " warp " << warp;
        EXPECT_LT(record[prefill_trace::kSm], uint64_t(sms)) << "CTA " << cta << " warp " << warp;
      }
      const int marks[] = {prefill_trace::kStart,       prefill_trace::kQStaged,     prefill_trace::kFirstData,
                           prefill_trace::kFirstScores, prefill_trace::kPairEnd + 0, prefill_trace::kPairEnd + 1,
                           prefill_trace::kPairEnd + 2, prefill_trace::kPairEnd + 3, prefill_trace::kPairEnd + 4,
                           prefill_trace::kEpilogue,    prefill_trace::kEnd};
      EXPECT_GT(c0[prefill_trace::kStart], 0u) << "CTA " << cta;
      for (size_t i = 1; i < std::size(marks); ++i)
        EXPECT_LE(c0[marks[i - 1]], c0[marks[i]]) << "CTA " << cta << " mark " << marks[i];
    }
  }
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
  // The device arrays' checks are check_sparse_attention_inputs, shared with run_sparse_attention and tested in
  // test_sparse_attention: one case shows this launcher runs them, under its own name.
  p = good;
  p.q = static_cast<const uint8_t*>(p.q) + 4;
  testing::expect_error([&] { run_sparse_attention_prefill(p); },
                        "sparse_attention_prefill: q must be 16-byte aligned");
  p = good;
  p.layer = 1;
  testing::expect_error([&] { run_sparse_attention_prefill(p); }, "layer 1");
}

}  // namespace
}  // namespace dsv4::cuda
