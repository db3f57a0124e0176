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
#include <string>
#include <vector>

#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "support/expect_error.hpp"
#include "support/sparse_attention_cases.hpp"
#include "support/device_buffers.hpp"

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
  int splits;                   // 0 = choose_sparse_attention_splits (for each merge mode)
  AttentionDtype q_dtype = AttentionDtype::F32, out_dtype = AttentionDtype::F32;
  bool empty_query = false;     // add a query whose slots are all −1
  int page_rows = 16;           // KV cache entries per page
  bool counts = false;          // per-query compressed_counts; the slots past a query's count hold live rows
  bool bf16_partials = false;   // the cluster merge exchanges bf16 partials (cluster_merge_bf16_partials)
  int head_split_tiles = -1;    // ≥ 0: also run the head-split path (this head_split_tiles), which must serve it
  bool early_entries = false;   // ... with head_split_early_entries (entries asked of L2 before the wait)
  bool prefill_kernel = false;  // route prefill-sized calls to run_sparse_attention_prefill (which must serve it)
  bool prefill_kernel_decode = false;  // ... and decode-sized ones (SparseAttentionParams::prefill_kernel_decode)
};

void compare_with_cpu(const AttentionCase& c, bool cluster_merge, SparseAttentionParams call,
                      const std::vector<float>& expected, const std::vector<double>& magnitude);

constexpr size_t kGuardBytes = 256;  // past the output, must stay 0xFF

void check_attention(const AttentionCase& c, uint32_t seed) {
  SCOPED_TRACE(std::string(c.name) + " " + to_string(c.format) + " seed " + std::to_string(seed));
  SparseAttentionCaseData data;
  ASSERT_NO_FATAL_FAILURE(prepare_sparse_attention_case(c, seed, data));
  const std::vector<float>& expected = data.expected;
  const std::vector<double>& magnitude = data.magnitude;
  SparseAttentionParams call = data.call;
  call.cluster_merge_bf16_partials = c.bf16_partials;
  call.head_split = false;
  call.prefill_kernel = c.prefill_kernel;
  call.prefill_kernel_decode = c.prefill_kernel_decode;
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
    head_split.head_split_early_entries = c.early_entries;
    ASSERT_GT(sparse_attention_head_split_splits(head_split), 0) << "the head-split path does not serve the case";
    compare_with_cpu(c, true, head_split, expected, magnitude);
  }
}

// Runs `call` with c's splits (0: choose_sparse_attention_splits for the merge mode) into an output poisoned with
// 0xFF and followed by a guard region; returns the output and guard bytes.
std::vector<uint8_t> run_call(const AttentionCase& c, bool cluster_merge, SparseAttentionParams call, int& splits) {
  const int64_t T = call.tokens;
  const int H = call.heads, D = c.head_dim;
  splits = c.splits > 0 ? c.splits
                        : choose_sparse_attention_splits(T, H, D, c.format, c.window + c.compressed_slots,
                                                         list_devices()[0].multiprocessors, cluster_merge);
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(T, H, D, splits)), "workspace");
  workspace.fill_bytes(0xFF);
  const size_t out_bytes = size_t(T * H * D) * (c.out_dtype == AttentionDtype::F32 ? 4 : 2);
  DeviceBuffer d_out(out_bytes + kGuardBytes, "out");
  d_out.fill_bytes(0xFF);
  call.out = d_out.data();
  call.splits = splits;
  call.workspace = workspace.data();
  call.workspace_bytes = workspace.bytes();
  run_sparse_attention(call);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> raw(out_bytes + kGuardBytes);
  d_out.download(raw.data(), raw.size());
  return raw;
}

// One run of `call` (its splits, workspace and output filled in here; poisoned first) against the CPU's `expected`,
// within the tolerance that `magnitude` scales.
void compare_with_cpu(const AttentionCase& c, bool cluster_merge, SparseAttentionParams call,
                      const std::vector<float>& expected, const std::vector<double>& magnitude) {
  SCOPED_TRACE(call.head_split ? "head split" : cluster_merge ? "cluster merge" : "combine kernel");
  const int64_t T = call.tokens;
  const int H = call.heads, D = c.head_dim;
  const size_t out_elements = size_t(T * H * D), element_bytes = c.out_dtype == AttentionDtype::F32 ? 4 : 2;
  int splits = 0;
  const std::vector<uint8_t> raw = run_call(c, cluster_merge, call, splits);
  ASSERT_FALSE(::testing::Test::HasFailure());

  const AttentionOutputCheck checked =
      check_attention_output(raw, c.out_dtype, H, D, expected, magnitude, c.bf16_partials && cluster_merge);
  EXPECT_EQ(checked.failures, 0) << checked.failures << " mismatches of " << out_elements << " (splits " << splits
                                 << ")";
  for (size_t b = out_elements * element_bytes; b < raw.size(); ++b)
    ASSERT_EQ(raw[b], 0xFF) << "write past the end of out at byte " << b;
  const int reported_splits = call.head_split ? sparse_attention_head_split_splits(call) : splits;
  std::printf("  %-28s %-13s T=%lld H=%d D=%d splits=%d %s: worst error/tolerance %.3f\n", c.name,
              to_string(c.format), static_cast<long long>(T), H, D, reported_splits,
              call.head_split ? "head split" : cluster_merge ? "cluster" : "combine", checked.worst);
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
// a padded head group (H 40, 48), fp32/bf16 q and output, several queries in one launch; with and without the
// entries asked of L2 before the wait (head_split_early_entries: the same output).
TEST(SparseAttention, HeadSplitMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 70;
  for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
    for (int tiles = 0; tiles <= kSparseAttentionHeadSplitMaxTiles; ++tiles) {
      AttentionCase swa{"flash swa decode head split", format, 512, 64, 64, 128, 128, 0, {300}, 1, 0,
                        AttentionDtype::Bf16, AttentionDtype::Bf16};
      swa.head_split_tiles = tiles;
      swa.early_entries = tiles % 2 == 0;
      check_attention(swa, seed++);
      // 20 tiles: 5, 7 or 10 splits (1 tile per CTA would need clusters of 20); three queries (one without
      // entries) keep the grid within one wave.
      AttentionCase csa{"flash csa decode head split", format, 512, 64, 64, 128, 128, 512, {300, 2100}, 1, 0,
                        tiles % 2 == 0 ? AttentionDtype::F32 : AttentionDtype::Bf16, AttentionDtype::F32, true};
      csa.counts = tiles % 2 == 1;
      csa.head_split_tiles = tiles == 1 ? 2 : tiles;
      csa.early_entries = tiles % 2 == 1;
      check_attention(csa, seed++);
    }
    AttentionCase short_window{"swa short window head split", format, 512, 64, 64, 128, 128, 0, {50, 7}, 1, 0,
                               AttentionDtype::F32, AttentionDtype::Bf16, true};
    short_window.head_split_tiles = 2;
    short_window.early_entries = true;
    check_attention(short_window, seed++);
    AttentionCase pro{"pro csa decode head split", format, 512, 64, 128, 128, 128, 512, {5000}, 1, 0,
                      AttentionDtype::Bf16, AttentionDtype::Bf16};
    pro.head_split_tiles = 4;
    check_attention(pro, seed++);
    AttentionCase pro_hca{"pro hca bounded head split", format, 512, 64, 128, 128, 128, 300, {3000}, 1, 0};
    pro_hca.counts = true;
    pro_hca.head_split_tiles = 3;
    pro_hca.early_entries = true;
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

// The head_dim 512 kernel on chunks of more (query, head block) items than SMs (two waves; Pro's two head blocks),
// per-query counts, a split call merged by the combine kernel and in a cluster, and the single-split epilogue with
// fp8 entries and with rope dims past the last 64 (rope_dim 128).
TEST(SparseAttention, D512TwoWavesSplitsAndEpilogues) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 90;
  AttentionCase flash{"flash csa chunk", KvEntryFormat::Bf16, 512, 64, 64, 32, 192, 40, {600}, 140, 0,
                      AttentionDtype::Bf16, AttentionDtype::Bf16};
  flash.counts = true;
  check_attention(flash, seed++);
  check_attention({"pro csa chunk", KvEntryFormat::Bf16, 512, 64, 128, 32, 112, 40, {300, 900}, 40, 0}, seed++);
  for (const bool counts : {false, true}) {
    AttentionCase split{"flash csa decode 3 splits", KvEntryFormat::Bf16, 512, 64, 64, 128, 128, 512,
                        {300, 2100, 129}, 1, 3, AttentionDtype::F32, AttentionDtype::Bf16, true};
    split.counts = counts;
    check_attention(split, seed++);
  }
  check_attention({"fp8 flash csa decode 1 split", KvEntryFormat::Fp8Reference, 512, 64, 64, 128, 128, 512,
                   {300, 2100, 129}, 1, 1, AttentionDtype::Bf16, AttentionDtype::F32},
                  seed++);
  check_attention({"bf16 rope 128 1 split", KvEntryFormat::Bf16, 512, 128, 64, 32, 40, 200, {500, 77}, 1, 1,
                   AttentionDtype::Bf16, AttentionDtype::Bf16},
                  seed++);
  // The single-split epilogue's rolled store loop past a padded head block (H 48).
  check_attention({"h48 1 split", KvEntryFormat::Bf16, 512, 64, 48, 128, 128, 300, {900, 7}, 2, 1, AttentionDtype::F32,
                   AttentionDtype::Bf16},
                  seed++);
}

// A traced head_dim 512 launch (SparseAttentionParams::d512_trace, bench_cuda_attention --trace) matches the CPU and
// leaves each CTA's marks in order: one split and a 3-split cluster merge with per-query counts (a split past a
// query's count has no tiles), Pro's two head blocks.
TEST(SparseAttention, D512TracedLaunchMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 150;
  AttentionCase counts{"flash csa 3 splits counts", KvEntryFormat::Bf16, 512, 64, 64, 128, 128, 512, {300, 2100, 129},
                       1, 3};
  counts.counts = true;
  const std::vector<AttentionCase> cases = {
      {"flash csa decode 1 split", KvEntryFormat::Bf16, 512, 64, 64, 128, 128, 512, {300, 2100, 129}, 1, 1},
      counts,
      {"pro csa 1 split bf16 io", KvEntryFormat::Bf16, 512, 64, 128, 128, 128, 512, {5000}, 2, 1,
       AttentionDtype::Bf16, AttentionDtype::Bf16}};
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.name);
    SparseAttentionCaseData data;
    ASSERT_NO_FATAL_FAILURE(prepare_sparse_attention_case(c, seed++, data));
    SparseAttentionParams call = data.call;
    call.head_split = false;
    call.prefill_kernel = false;
    const bool cluster_merge = c.splits > 1;
    call.cluster_merge = cluster_merge;
    call.splits = c.splits;
    const int64_t ctas = sparse_attention_d512_ctas(call);
    DeviceBuffer d_trace(size_t(ctas) * kSparseAttentionTraceSlots * 8, "trace");
    d_trace.fill_bytes(0);
    call.d512_trace = d_trace.as<uint64_t>();
    compare_with_cpu(c, cluster_merge, call, data.expected, data.magnitude);
    std::vector<uint64_t> trace(size_t(ctas) * kSparseAttentionTraceSlots);
    d_trace.download(trace.data(), trace.size() * 8);
    for (int64_t cta = 0; cta < ctas; ++cta) {
      const uint64_t* m = &trace[size_t(cta) * kSparseAttentionTraceSlots];
      SCOPED_TRACE("CTA " + std::to_string(cta));
      for (const int mark : {kD512TraceStart, kD512TraceProducerWaited, kD512TraceRowsLoaded, kD512TracePagesLoaded,
                             kD512TraceConsumerWaited, kD512TraceQReady, kD512TraceLoopEnd, kD512TraceEnd})
        ASSERT_NE(m[mark], 0u) << "mark " << mark << " missing";
      EXPECT_LE(m[kD512TraceStart], m[kD512TraceProducerWaited]);
      EXPECT_LE(m[kD512TraceProducerWaited], m[kD512TraceRowsLoaded]);
      EXPECT_LE(m[kD512TraceRowsLoaded], m[kD512TracePagesLoaded]);
      if (m[kD512TraceFirstIssued] != 0) EXPECT_LE(m[kD512TracePagesLoaded], m[kD512TraceFirstIssued]);
      EXPECT_LE(m[kD512TraceStart], m[kD512TraceConsumerWaited]);
      EXPECT_LE(m[kD512TraceConsumerWaited], m[kD512TraceQReady]);
      EXPECT_LE(m[kD512TraceQReady], m[kD512TraceLoopEnd]);
      EXPECT_LE(m[kD512TraceLoopEnd], m[kD512TraceEnd]);
      if (m[kD512TraceFirstIssued] != 0) EXPECT_LE(m[kD512TraceFirstIssued], m[kD512TraceLastIssued]);
      if (m[kD512TraceLastTile] != 0) EXPECT_LE(m[kD512TraceLastTile], m[kD512TraceLoopEnd]);
      if (m[kD512TraceMidTile] != 0) {
        EXPECT_LE(m[kD512TraceMidTile], m[kD512TraceMidScored]);
        EXPECT_LE(m[kD512TraceMidScored], m[kD512TraceMidExchanged]);
        EXPECT_LE(m[kD512TraceMidExchanged], m[kD512TraceMidWeighted]);
        EXPECT_LE(m[kD512TraceMidWeighted], m[kD512TraceMidMultiplied]);
      }
      if (cluster_merge) {
        EXPECT_LE(m[kD512TraceLoopEnd], m[kD512TraceMergeWritten]);
        EXPECT_LE(m[kD512TraceMergeWritten], m[kD512TraceMergeSynced]);
        EXPECT_LE(m[kD512TraceMergeSynced], m[kD512TraceMergeFactors]);
        EXPECT_LE(m[kD512TraceMergeFactors], m[kD512TraceMergeStored]);
        EXPECT_LE(m[kD512TraceMergeStored], m[kD512TraceEnd]);
      }
    }
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

// Decode batches routed by prefill_kernel_decode (bf16 entries, (query, 64-head block) CTAs from 15/16 of one wave,
// lists of at least kSparseAttentionPrefillDecodeSlots slots, kSparseAttentionPrefillDecodeSlotsOneBlock with one
// head block per query): a V4-Pro batch of just enough queries (two head blocks each) with 512 slots, several
// sequences of different lengths, against the CPU; then the routing decisions alone on the call's shape (one query
// short of the wave, one slot short of the list, V4-Flash's one head block, per-query counts, fp8 entries, the option
// off).
TEST(SparseAttention, DecodeBatchesRoutedToThePrefillKernel) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int sms = list_devices()[0].multiprocessors;
  const int flash_queries = (15 * sms + 15) / 16;  // the fewest one-block (query, head block) CTAs routed
  const int pro_queries = (flash_queries + 1) / 2;
  AttentionCase pro{"pro csa decode wave", KvEntryFormat::Bf16, 512, 64, 128, 128, 128,
                    int(kSparseAttentionPrefillDecodeSlots) - 128, {2100, 1500}, (pro_queries + 1) / 2, 0,
                    AttentionDtype::Bf16, AttentionDtype::Bf16};
  pro.prefill_kernel = pro.prefill_kernel_decode = true;
  check_attention(pro, 111);

  SparseAttentionCaseData data;
  AttentionCase small = pro;
  small.compressed_slots = 16;
  small.lengths = {300};
  small.queries_per_sequence = 1;
  ASSERT_NO_FATAL_FAILURE(prepare_sparse_attention_case(small, 112, data));
  // Only the decision is asked: the shape fields may exceed the index arrays.
  const auto routed = [&](int heads, int64_t tokens, int64_t slots, bool counts, bool option) {
    SparseAttentionParams call = data.call;
    call.heads = heads;
    call.tokens = tokens;
    call.compressed_slots = int(slots) - call.window_slots;
    call.compressed_counts = counts ? data.counts.as<int32_t>() : nullptr;
    call.prefill_kernel_decode = option;
    return sparse_attention_uses_prefill_kernel(call);
  };
  const int64_t least = kSparseAttentionPrefillDecodeSlots;  // the shortest slot list routed
  EXPECT_TRUE(routed(128, pro_queries, least, false, true));
  EXPECT_FALSE(routed(128, pro_queries - 1, least, false, true)) << "one Pro query short of the wave";
  EXPECT_FALSE(routed(128, pro_queries, least - 1, false, true)) << "one slot short";
  EXPECT_FALSE(routed(128, pro_queries, least, true, true)) << "per-query counts";
  EXPECT_FALSE(routed(128, pro_queries, least, false, false)) << "prefill_kernel_decode off";
  const int64_t least_one_block = kSparseAttentionPrefillDecodeSlotsOneBlock;  // ... with one head block per query
  EXPECT_TRUE(routed(64, flash_queries, least_one_block, false, true));
  EXPECT_FALSE(routed(64, flash_queries, least_one_block - 1, false, true)) << "Flash, one slot short";
  EXPECT_FALSE(routed(64, 2 * flash_queries, least, false, true)) << "Flash, a list that routes Pro";
  EXPECT_FALSE(routed(64, flash_queries, least_one_block, true, true)) << "Flash, per-query counts";
  EXPECT_FALSE(routed(64, flash_queries - 1, least_one_block, false, true)) << "one Flash query short of the wave";
  EXPECT_TRUE(routed(64, 2 * sms, 128, true, false)) << "two waves go to the prefill kernel whatever the list";
  AttentionCase fp8 = small;
  fp8.format = KvEntryFormat::Fp8Reference;
  ASSERT_NO_FATAL_FAILURE(prepare_sparse_attention_case(fp8, 113, data));
  EXPECT_FALSE(routed(128, pro_queries, least, false, true)) << "fp8 entries";
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
