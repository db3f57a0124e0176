// Sparse MQA attention on the GPU through run_sparse_attention_prefill (the two-block wgmma kernel), in two parts.
// Prefill: the kernel against the previous prefill path (run_sparse_attention with prefill_kernel off and the splits
// choose_sparse_attention_splits picks), on the same inputs. A chunk of 4096 queries at the end of an 8K or 64K
// context of one sequence, CSA slots (the 128 window ring rows up to each query + 512 random visible compressed rows,
// causal), V4-Flash (H 64) and V4-Pro (H 128), fp8 (584-byte) and bf16 entries, fp32 q in and bf16 out (the model's
// prefill call). Reported per case: µs per call (L2 flushed before each), TFLOP/s (4·H·D flops per used slot: QKᵀ and
// PV) against the same-run cuBLAS bf16 GEMM rate (4096³, the floor) and the nominal dense bf16 peak (4096 flops per SM
// per clock), the speed-up over today's path, and the largest difference between the two outputs over the largest
// |output| (FAIL above 2^-6: both round q and P to bf16, in other orders); and the prefill kernel once more with q in
// bf16 (bf16q: the same MMA input, half the q bytes), also with SparseAttentionPrefillOptions::prefetch_resolved
// (+pf), and with --no-kv with every slot unused (noKV: the producer zero-fills its buffers without reading an entry,
// the kernel's time without KV traffic; nan without --no-kv).
// Decode: batch 64 and 256 (one query per sequence, each sequence its own pages) in the SWA (128 window slots, 4K
// context), CSA (128 + 512 random compressed rows of 64K / 4) and HCA (128 + all 512 compressed rows of 64K / 128)
// layouts, both models, both entry formats, q in bf16 and fp32 out (the engine's decode call): the kernel without and
// with prefetch_resolved (+pf) against today's decode dispatch (run_sparse_attention with prefill_kernel off: the
// head_dim 512 wgmma kernel with its cluster-merged splits), the faster against its floor max(KV bytes at the same-run
// copy bandwidth, flops at the cuBLAS bf16 rate), with the same output comparison (the larger of the two). The decode
// step is make_decode_step's (tests/support/sparse_attention_cases.hpp, as bench_cuda_attention's).
// Entries are fill_random_entries' (finite, no NaN codes); prefill q is a hash of its positions.
// --quick: the prefill cases without today's path and the comparison with it (the kernel's variants only).
// --trace: each prefill case's bf16-q call once more as a traced launch (SparseAttentionPrefillOptions::trace, after an
// L2 flush): medians over the CTAs of each phase of a CTA's timeline (start to Q staged, or Q's copies issued for bf16
// q with bf16 entries; entries resolved, first data, first scores, each pair, the epilogue's staging and stores), of
// the gap between consecutive CTAs on one SM, and per pair of the late half's release, its first tile's arrival and
// consumer 1's wait for the max (%globaltimer ticks 0.256 µs on the H200); then the same marks and every pair's
// hand-offs in SM clock cycles within each CTA. Its times are diagnostics (phases inside one call, headed by the
// per-CTA floor: a CTA's mean flops at one SM's share of the cuBLAS rate), not results held to the floor / baseline
// rule: the untraced calls are.
// Usage: bench_cuda_attention_prefill [--json PATH] [--part prefill|decode] [--only CASE[,CASE...]] [--trace]
// [--quick] [--no-kv]. --part runs one part; --only runs the cases named (prefill MODEL:FORMAT:CONTEXT, e.g.
// flash:bf16:8192, pro:fp8-reference:65536; decode MODEL:LAYOUT:BATCH:FORMAT, e.g. flash:csa:256:bf16; for a
// profiler; a name that selects no case fails the run). Exit status 1 when outputs disagree.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/rope.hpp"
#include "backends/cuda/copy_bandwidth.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kernels/sparse_attention_prefill.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "cuda_bench_support.hpp"
#include "support/bounded_synchronize.hpp"
#include "support/l2_flushed_timing.hpp"
#include "support/prefill_chunk.hpp"
#include "support/sparse_attention_cases.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kHeadDim = kDecodeHeadDim, kRopeDim = kDecodeRopeDim, kWindow = kDecodeWindow, kTopK = kDecodeTopK,
              kPageRows = kDecodePageRows;
constexpr int64_t kTokens = 4096;

using decode_step_detail::hash32;

// A value in [-2, 2) from a hash.
__device__ __forceinline__ float hashed_value(uint64_t i, uint32_t seed) {
  return float(hash32(i * 0x9E3779B97F4A7C15ull + seed) >> 8) * (4.0f / 16777216.0f) - 2.0f;
}

__global__ void to_bf16(const float* in, __nv_bfloat16* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

__global__ void fill_q(float* q, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    q[i] = hashed_value(uint64_t(i), seed);
}

std::vector<float> bf16_output(const DeviceBuffer& out, size_t n) {
  std::vector<uint16_t> bits(n);
  out.download(bits.data(), n * 2);
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t word = uint32_t(bits[i]) << 16;
    std::memcpy(&values[i], &word, 4);
  }
  return values;
}

// Largest |got − expected| over the largest |expected| of two fp32 outputs (∞ for a non-finite value); prints the
// worst element's place when it is above 2^-6.
double relative_difference(const std::vector<float>& expected, const std::vector<float>& got, int heads,
                           const std::string& name) {
  double largest = 0, worst = 0;
  size_t worst_index = 0;
  for (const float e : expected) largest = std::max(largest, double(std::fabs(e)));
  for (size_t i = 0; i < expected.size(); ++i) {
    const double difference = std::isfinite(got[i]) ? std::fabs(double(got[i]) - expected[i]) : INFINITY;
    if (difference > worst) {
      worst = difference;
      worst_index = i;
    }
  }
  if (!(worst <= std::ldexp(largest, -6)))
    std::printf("  %s: largest difference at t=%zu h=%zu d=%zu: %g against %g\n", name.c_str(),
                worst_index / (size_t(heads) * kHeadDim), (worst_index / kHeadDim) % size_t(heads),
                worst_index % kHeadDim, double(got[worst_index]), double(expected[worst_index]));
  return largest > 0 ? worst / largest : worst;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// The traced launch's %clock64 marks (cycles, within each CTA): the startup and epilogue marks from the CTA's first
// start, and each pair's events (prefill_trace::kPairEvents) from consumer 0's end of the pair before (for pair 0 its
// first scores), medians over the CTAs.
template <typename Record>
void print_clock_trace(int64_t ctas, int pairs, const Record& record) {
  namespace pt = prefill_trace;
  const auto clock = [&](int64_t cta, int warp, int slot) { return double(int64_t(record(cta, warp)[slot])); };
  const auto median_of = [&](auto&& value) {
    std::vector<double> v;
    v.reserve(size_t(ctas));
    for (int64_t c = 0; c < ctas; ++c) v.push_back(value(c));
    return median(v);
  };
  const auto start = [&](int64_t c) {
    return std::min({clock(c, 0, pt::kClocks + pt::kStart), clock(c, 4, pt::kClocks + pt::kStart),
                     clock(c, 8, pt::kClocks + pt::kStart)});
  };
  const auto mark = [&](int warp, int slot) {
    return median_of([&](int64_t c) { return clock(c, warp, pt::kClocks + slot) - start(c); });
  };
  std::printf("  clocks from the CTA's start: c0 Q staged/issued %.0f, first data %.0f, first scores %.0f, epilogue "
              "%.0f, staged %.0f, end %.0f; c1 Q staged/issued %.0f, epilogue %.0f, end %.0f; producer resolved %.0f, "
              "first issued %.0f, end %.0f\n",
              mark(0, pt::kQStaged), mark(0, pt::kFirstData), mark(0, pt::kFirstScores), mark(0, pt::kEpilogue),
              mark(0, pt::kStaged), mark(0, pt::kEnd), mark(4, pt::kQStaged), mark(4, pt::kEpilogue),
              mark(4, pt::kEnd), mark(8, pt::kResolved), mark(8, pt::kFirstIssued), mark(8, pt::kEnd));
  const char* c0_names[] = {"valid", "max sent", "own PV", "pair max", "other P", "late half", "other PV", "next QK"};
  const char* c1_names[] = {"issued", "late tile", "scores", "max recv", "max sent", "other P", "half", "own PV",
                            "other PV"};
  const char* producer_names[] = {"empty00", "empty01", "empty11", "empty10", "issued", "resolved"};
  for (int i = 0; i < std::min(pairs, pt::kClockPairs); ++i) {
    const auto reference = [&](int64_t c) {
      return i == 0 ? clock(c, 0, pt::kClocks + pt::kFirstScores)
                    : clock(c, 0, pt::kPairClocks + (i - 1) * pt::kPairEvents + pt::kC0NextScores);
    };
    const auto event = [&](int warp, int e) {
      return median_of([&](int64_t c) { return clock(c, warp, pt::kPairClocks + i * pt::kPairEvents + e) -
                                               reference(c); });
    };
    std::printf("  pair %d clocks from c0's previous end:\n    c0:", i);
    for (int e = 0; e < int(std::size(c0_names)); ++e)
      if (i + 1 < pairs || e != pt::kC0NextScores) std::printf(" %s %.0f", c0_names[e], event(0, e));
    std::printf("\n    c1:");
    for (int e = 0; e < int(std::size(c1_names)); ++e) std::printf(" %s %.0f", c1_names[e], event(4, e));
    std::printf("\n    producer:");
    for (int e = 0; e < int(std::size(producer_names)); ++e)
      if (i + 1 < pairs || e != pt::kNextResolved) std::printf(" %s %.0f", producer_names[e], event(8, e));
    std::printf("\n");
  }
}

// One traced launch of `call` (L2 flushed first): medians of its CTAs' phases in µs, headed by the per-CTA floor
// `cta_floor_us`.
void print_trace(const SparseAttentionParams& call, int64_t ctas, int pairs, double cta_floor_us, void* flush,
                 size_t flush_bytes) {
    const size_t words = size_t(ctas) * kPrefillTraceWarps * kPrefillTraceSlots;
  DeviceBuffer trace(words * 8, "trace");
  trace.fill_bytes(0);
  DSV4_CUDA_CHECK(cudaMemsetAsync(flush, 0x5A, flush_bytes));
  run_sparse_attention_prefill(call, {.prefetch_resolved = PrefetchResolved::Off, .trace = trace.as<uint64_t>()});
  synchronize_or_exit("sparse_attention_prefill (traced)");
  std::vector<uint64_t> w(words);
  trace.download(w.data(), words * 8);
  const auto record = [&](int64_t cta, int warp) {
    return &w[(size_t(cta) * kPrefillTraceWarps + warp) * kPrefillTraceSlots];
  };
  const auto us = [](uint64_t from, uint64_t to) { return (double(to) - double(from)) * 1e-3; };
  std::vector<double> q, resolved, issued, first_data, first_scores, epilogue, tail, total, gap;
  std::vector<std::vector<double>> pair(std::min(pairs, prefill_trace::kPairs));
  struct Span { uint64_t start, end; };
  std::vector<std::vector<Span>> per_sm(1024);
  uint64_t first = UINT64_MAX, last = 0;
  for (int64_t c = 0; c < ctas; ++c) {
    const uint64_t *c0 = record(c, 0), *c1 = record(c, 4), *pr = record(c, 8);
    const uint64_t start = std::min({c0[prefill_trace::kStart], c1[prefill_trace::kStart], pr[prefill_trace::kStart]});
    const uint64_t end = std::max({c0[prefill_trace::kEnd], c1[prefill_trace::kEnd], pr[prefill_trace::kEnd]});
    q.push_back(us(start, c0[prefill_trace::kQStaged]));
    resolved.push_back(us(start, pr[prefill_trace::kResolved]));
    issued.push_back(us(start, pr[prefill_trace::kFirstIssued]));
    first_data.push_back(us(start, c0[prefill_trace::kFirstData]));
    first_scores.push_back(us(start, c0[prefill_trace::kFirstScores]));
    uint64_t previous = c0[prefill_trace::kFirstScores];
    for (size_t i = 0; i < pair.size(); ++i) {
      pair[i].push_back(us(previous, c0[prefill_trace::kPairEnd + i]));
      previous = c0[prefill_trace::kPairEnd + i];
    }
    epilogue.push_back(us(previous, c0[prefill_trace::kEpilogue]));
    tail.push_back(us(c0[prefill_trace::kEpilogue], end));
    total.push_back(us(start, end));
    per_sm[c0[prefill_trace::kSm] % 1024].push_back({start, end});
    first = std::min(first, start);
    last = std::max(last, end);
  }
  for (auto& spans : per_sm) {
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
    for (size_t i = 1; i < spans.size(); ++i) gap.push_back(us(spans[i - 1].end, spans[i].start));
  }
  std::printf("  trace (a diagnostic; per-CTA floor %.2f µs: a CTA's mean flops at one SM's share of the cuBLAS "
              "rate)\n", cta_floor_us);
  std::printf("  trace (median µs from the CTA's start): Q staged/issued %.2f, resolved %.2f, first copies issued "
              "%.2f, first data %.2f, first scores %.2f\n  pairs:",
              median(q), median(resolved), median(issued), median(first_data), median(first_scores));
  for (const auto& p : pair) std::printf(" %.2f", median(p));
  std::printf("; last pair to epilogue %.2f, epilogue %.2f; CTA %.2f, gap to the SM's next CTA %.2f; span %.1f us\n",
              median(epilogue), median(tail), median(total), median(gap), us(first, last));
  // Pair i ≥ 1's late half (buffer 1, dims 0-255): consumer 0's end of pair i − 1 to its release, the release to
  // consumer 1 having its first tile, that to consumer 0's max received.
  std::printf("  late half by pair (end of pair i-1 -> released / released -> consumer 1 has it / has it -> max "
              "received):");
  for (int i = 1; i < std::min(pairs, prefill_trace::kConsumer1Pairs); ++i) {
    std::vector<double> released, arrived, max_received;
    for (int64_t c = 0; c < ctas; ++c) {
      const uint64_t *c0 = record(c, 0), *c1 = record(c, 4), *pr = record(c, 8);
      released.push_back(us(c0[prefill_trace::kPairEnd + i - 1], pr[prefill_trace::kLastHalfReleased + i]));
      arrived.push_back(us(pr[prefill_trace::kLastHalfReleased + i], c1[prefill_trace::kLastHalfArrived + i]));
      max_received.push_back(us(c1[prefill_trace::kLastHalfArrived + i], c1[prefill_trace::kMaxReceived + i]));
    }
    std::printf(" %d: %.2f / %.2f / %.2f", i, median(released), median(arrived), median(max_received));
  }
  std::vector<double> staging, stores;
  for (int64_t c = 0; c < ctas; ++c) {
    const uint64_t* c0 = record(c, 0);
    staging.push_back(us(c0[prefill_trace::kEpilogue], c0[prefill_trace::kStaged]));
    stores.push_back(us(c0[prefill_trace::kStaged], c0[prefill_trace::kEnd]));
  }
  std::printf("\n  epilogue: normalise and stage %.2f, stores issued %.2f\n", median(staging), median(stores));
  print_clock_trace(ctas, pairs, record);
}

struct Case {
  std::string model, format;
  int heads;
  int64_t context;
  int old_splits;
  double old_us, new_us, old_tflops, new_tflops, percent_of_cublas, percent_of_peak, relative_difference;
  double bf16_q_us, bf16_q_tflops;  // the prefill kernel with q in bf16 (its MMA input: same result, half the bytes)
  double bf16_q_prefetch_us;        // the same with SparseAttentionPrefillOptions::prefetch_resolved
  double bf16_q_no_entries_us;      // the same call with every slot unused: no entry reads (the kernel's own floor)
};

Case run_case(const char* model, int heads, KvEntryFormat format, int64_t context, double cublas_tflops,
              double peak_tflops, int sms, void* flush, size_t flush_bytes, bool trace, bool quick, bool no_kv,
              std::mt19937& rng) {
  const int64_t capacity = 8192;  // ring rows: the window plus the chunk
  const std::unique_ptr<KvCache> cache =
      prefill_chunk_cache(format, kHeadDim, kRopeDim, kPageRows, context, capacity);
  const KvCacheView view = cache->view();
  fill_random_entries(view, cache->config().pages * kPageRows, uint32_t(rng()));

  const int64_t T = kTokens;
  const PrefillChunkSlots chunk = prefill_chunk_slots(context, T, kWindow, kTopK, capacity, rng);
  const std::vector<float> sink(size_t(heads), 0.5f);
  const cpu::RopeTable rope(160000.0, kRopeDim);
  DeviceBuffer d_slots = to_device(chunk.slots, "slots"), d_window = to_device(chunk.window_index, "window index"),
               d_compressed = to_device(chunk.compressed_index, "compressed index"),
               d_pos = to_device(chunk.positions, "positions"), d_sink = to_device(sink, "sink"),
               d_freq = to_device(rope.frequencies(), "frequencies");
  const size_t outputs = size_t(T) * heads * kHeadDim;
  DeviceBuffer d_q(outputs * 4, "q");
  fill_q<<<1024, 256>>>(d_q.as<float>(), int64_t(outputs), rng());
  DSV4_CUDA_CHECK_LAUNCH("fill_q");
  DeviceBuffer old_out(outputs * 2, "today's out"), new_out(outputs * 2, "prefill kernel out");
  const int splits = choose_sparse_attention_splits(T, heads, kHeadDim, format, kWindow + kTopK, sms);
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(T, heads, kHeadDim, splits)),
                         "workspace");
  SparseAttentionParams p{.cache = view, .layer = 0, .tokens = T, .heads = heads,
                          .softmax_scale = 1.0f / std::sqrt(float(kHeadDim)), .q = d_q.data(),
                          .q_dtype = AttentionDtype::F32, .attn_sink = d_sink.as<float>(),
                          .sequence_slots = d_slots.as<int32_t>(), .positions = d_pos.as<int64_t>(),
                          .rope_frequencies = d_freq.as<float>(), .window_index = d_window.as<int32_t>(),
                          .window_slots = kWindow, .compressed_index = d_compressed.as<int32_t>(),
                          .compressed_slots = kTopK, .out = old_out.data(), .out_dtype = AttentionDtype::Bf16,
                          .splits = splits, .prefill_kernel = false,  // the baseline: the previous path
                          .workspace = workspace.data(), .workspace_bytes = workspace.bytes()};
  const double old_ms = quick ? NAN : median_ms(10, flush, flush_bytes, [&] { run_sparse_attention(p); });
  // The prefill kernel with the L2 prefetch of resolved entries off (its default for this many queries) and on.
  const SparseAttentionPrefillOptions plain{.prefetch_resolved = PrefetchResolved::Off};
  const SparseAttentionPrefillOptions prefetch{.prefetch_resolved = PrefetchResolved::On};
  SparseAttentionParams prefill = p;
  prefill.out = new_out.data();
  prefill.splits = 1;
  prefill.workspace = nullptr;
  prefill.workspace_bytes = 0;
  new_out.fill_bytes(0xFF);
  run_sparse_attention_prefill(prefill, plain);
  synchronize_or_exit("sparse_attention_prefill");
  const double new_ms = median_ms(10, flush, flush_bytes, [&] { run_sparse_attention_prefill(prefill, plain); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  DeviceBuffer q_bf16(outputs * 2, "q bf16");
  to_bf16<<<1024, 256>>>(d_q.as<float>(), static_cast<__nv_bfloat16*>(q_bf16.data()), int64_t(outputs));
  DSV4_CUDA_CHECK_LAUNCH("to_bf16");
  DeviceBuffer bf16_q_out(outputs * 2, "prefill kernel out, bf16 q");
  SparseAttentionParams prefill_bf16_q = prefill;
  prefill_bf16_q.q = q_bf16.data();
  prefill_bf16_q.q_dtype = AttentionDtype::Bf16;
  prefill_bf16_q.out = bf16_q_out.data();
  const double bf16_q_ms =
      median_ms(10, flush, flush_bytes, [&] { run_sparse_attention_prefill(prefill_bf16_q, plain); });
  const double bf16_q_prefetch_ms =
      median_ms(10, flush, flush_bytes, [&] { run_sparse_attention_prefill(prefill_bf16_q, prefetch); });
  // --no-kv: every slot −1, the producer zero-fills its buffers without reading an entry (the diagnostic's floor).
  double no_entries_ms = NAN;
  if (no_kv) {
    DeviceBuffer no_window(chunk.window_index.size() * 4, "no window index"),
        no_compressed(chunk.compressed_index.size() * 4, "no compressed index"),
        no_entries_out(outputs * 2, "prefill kernel out, no entries");
    no_window.fill_bytes(0xFF);
    no_compressed.fill_bytes(0xFF);
    SparseAttentionParams no_entries = prefill_bf16_q;
    no_entries.window_index = no_window.as<int32_t>();
    no_entries.compressed_index = no_compressed.as<int32_t>();
    no_entries.out = no_entries_out.data();
    no_entries_ms = median_ms(10, flush, flush_bytes, [&] { run_sparse_attention_prefill(no_entries, plain); });
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());  // before the buffers go
  }
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  const double flops = 4.0 * heads * kHeadDim * double(chunk.used_slots);
  if (trace) {
    const int64_t ctas = sparse_attention_prefill_ctas(prefill_bf16_q);
    const double cta_floor_us = flops / double(ctas) * sms / (cublas_tflops * 1e6);
    print_trace(prefill_bf16_q, ctas, (kWindow + kTopK + 127) / 128, cta_floor_us, flush, flush_bytes);
  }

  Case r;
  r.model = model;
  r.format = to_string(format);
  r.heads = heads;
  r.context = context;
  r.old_splits = splits;
  r.old_us = old_ms * 1e3;
  r.new_us = new_ms * 1e3;
  r.old_tflops = flops / (old_ms * 1e9);
  r.new_tflops = flops / (new_ms * 1e9);
  r.bf16_q_us = bf16_q_ms * 1e3;
  r.bf16_q_tflops = flops / (bf16_q_ms * 1e9);
  r.bf16_q_prefetch_us = bf16_q_prefetch_ms * 1e3;
  r.bf16_q_no_entries_us = no_entries_ms * 1e3;
  r.percent_of_cublas = 100.0 * r.new_tflops / cublas_tflops;
  r.percent_of_peak = 100.0 * r.new_tflops / peak_tflops;
  r.relative_difference =
      quick ? 0.0
            : relative_difference(bf16_output(old_out, outputs), bf16_output(new_out, outputs), heads,
                                  r.model + " " + r.format + " " + std::to_string(context));
  return r;
}

// The prefill kernel's variants timed on decode cases: without and with
// SparseAttentionPrefillOptions::prefetch_resolved.
constexpr int kDecodeVariants = 2;
constexpr bool decode_variant_prefetch(int variant) { return variant == 1; }

struct DecodeCase {
  std::string model, layout, format;
  int heads, batch, slots, today_splits;
  int64_t context;
  double today_us, floor_us, today_percent_of_floor;
  double us[kDecodeVariants];  // the prefill kernel's variants
  int best;                    // the fastest variant
  double relative_difference;  // the largest over the variants
};

// One decode step of `batch` sequences (query b = sequence b at position context − 1, its own pages): today's
// dispatch and the prefill kernel on the same cache, q (bf16) and slots.
DecodeCase run_decode_case(const char* model, int heads, DecodeLayout kind, KvEntryFormat format, int batch,
                           int64_t context, double copy_gbps, double cublas_tflops, int sms, void* flush,
                           size_t flush_bytes, std::mt19937& rng) {
  const std::unique_ptr<SparseAttentionDecodeStep> step = make_decode_step(format, heads, kind, batch, context, rng);
  const size_t outputs = size_t(batch) * heads * kHeadDim;
  DeviceBuffer today_out(outputs * 4, "today's out"), new_out(outputs * 4, "prefill kernel out");
  const int slots_per_query = step->slots_per_query();
  const int splits = choose_sparse_attention_splits(batch, heads, kHeadDim, format, slots_per_query, sms);
  DeviceBuffer workspace(std::max<size_t>(16, sparse_attention_workspace_bytes(batch, heads, kHeadDim, splits)),
                         "workspace");
  SparseAttentionParams today = step->call;
  today.out = today_out.data();
  today.splits = splits;
  today.prefill_kernel = false;  // the decode kernels
  today.workspace = workspace.data();
  today.workspace_bytes = workspace.bytes();
  today_out.fill_bytes(0xFF);
  const double today_ms = median_ms(10, flush, flush_bytes, [&] { run_sparse_attention(today); });
  std::vector<float> expected(outputs), got(outputs);
  today_out.download(expected.data(), outputs * 4);
  DecodeCase r;
  r.relative_difference = 0;
  r.best = 0;
  for (int v = 0; v < kDecodeVariants; ++v) {
    SparseAttentionParams prefill = today;
    prefill.out = new_out.data();
    prefill.splits = 1;
    prefill.workspace = nullptr;
    prefill.workspace_bytes = 0;
    const SparseAttentionPrefillOptions options{
        .prefetch_resolved = decode_variant_prefetch(v) ? PrefetchResolved::On : PrefetchResolved::Off};
    new_out.fill_bytes(0xFF);
    run_sparse_attention_prefill(prefill, options);
    synchronize_or_exit("sparse_attention_prefill (decode)");
    new_out.download(got.data(), outputs * 4);
    const std::string name = std::string(model) + " " + to_string(kind) + (decode_variant_prefetch(v) ? " +pf" : "");
    r.relative_difference = std::max(r.relative_difference, relative_difference(expected, got, heads, name));
    r.us[v] = 1e3 * median_ms(10, flush, flush_bytes, [&] { run_sparse_attention_prefill(prefill, options); });
    if (r.us[v] < r.us[r.best]) r.best = v;
  }
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  r.model = model;
  r.layout = to_string(kind);
  r.format = to_string(format);
  r.heads = heads;
  r.batch = batch;
  r.slots = slots_per_query;
  r.today_splits = splits;
  r.context = context;
  r.today_us = today_ms * 1e3;
  r.floor_us = std::max(step->kv_bytes() / (copy_gbps * 1e3), step->flops() / (cublas_tflops * 1e6));
  r.today_percent_of_floor = 100.0 * r.floor_us / r.today_us;
  return r;
}


int run(int argc, char** argv) {
  std::string json_path, part;
  OnlySelection only;  // --only's comma-separated case names
  bool trace = false, quick = false, no_kv = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc)
      json_path = argv[++i];
    else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc)
      only = OnlySelection(argv[++i], ',', OnlyMatch::Exact);
    else if (std::strcmp(argv[i], "--part") == 0 && i + 1 < argc)
      part = argv[++i];
    else if (std::strcmp(argv[i], "--trace") == 0)
      trace = true;
    else if (std::strcmp(argv[i], "--quick") == 0)
      quick = true;
    else if (std::strcmp(argv[i], "--no-kv") == 0)
      no_kv = true;
    else
      fail("usage: bench_cuda_attention_prefill [--json PATH] [--part prefill|decode] [--only CASE[,CASE...]] "
           "[--trace] [--quick] [--no-kv]");
  }
  check(part.empty() || part == "prefill" || part == "decode", "--part ", part, ": expected prefill or decode");
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty()) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  const DeviceInfo& device = devices[0];
  const size_t flush_bytes = size_t(256) << 20;
  DeviceBuffer flush(flush_bytes, "L2 flush");
  int clock_khz = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device.index));
  const double peak_tflops = 4096.0 * device.multiprocessors * clock_khz * 1e3 / 1e12;
  const double cublas_tflops = cublas_bf16_tflops(flush.data(), flush_bytes);
  const bool decode_part = part != "prefill", prefill_part = part != "decode";
  const double copy_gbps = decode_part ? measure_copy_bandwidth_gbps() : 0.0;
  std::printf("%s, %d SMs; cuBLAS bf16 GEMM %.0f TFLOP/s, nominal peak %.0f TFLOP/s (%d MHz); copy %.0f GB/s\n",
              device.name.c_str(), device.multiprocessors, cublas_tflops, peak_tflops, clock_khz / 1000, copy_gbps);
  std::mt19937 rng(11);
  bool ok = true;
  std::vector<Case> cases;
  if (prefill_part) {
    std::printf("prefill: %lld queries, CSA %d window + %d top-k slots, fp32 q, bf16 out; today = "
                "run_sparse_attention\n",
                static_cast<long long>(kTokens), kWindow, kTopK);
    std::printf("%-6s %-13s %4s %7s | %6s %9s %8s | %9s %8s %8s %6s | %8s %9s | %9s %8s %8s %8s %8s\n", "model",
                "format", "H", "context", "splits", "today us", "TFLOP/s", "new us", "TFLOP/s", "%cublas", "%peak",
                "speedup", "rel diff", "bf16q us", "TFLOP/s", "%cublas", "+pf us", "noKV us");
  }
  for (const auto& [model, heads] : {std::pair<const char*, int>{"flash", 64}, {"pro", 128}})
    for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16})
      for (const int64_t context : {int64_t(8192), int64_t(65536)}) {
        if (!prefill_part ||
            !only.selects(std::string(model) + ":" + to_string(format) + ":" + std::to_string(context)))
          continue;
        const Case r = run_case(model, heads, format, context, cublas_tflops, peak_tflops, device.multiprocessors,
                                flush.data(), flush_bytes, trace, quick, no_kv, rng);
        const bool agrees = r.relative_difference <= std::ldexp(1.0, -6);
        ok = ok && agrees;
        std::printf("%-6s %-13s %4d %7lld | %6d %9.1f %8.1f | %9.1f %8.1f %8.1f %6.1f | %8.2f %9.2e | %9.1f %8.1f "
                    "%7.1f%% %8.1f %8.1f%s\n",
                    r.model.c_str(), r.format.c_str(), r.heads, static_cast<long long>(r.context), r.old_splits,
                    r.old_us, r.old_tflops, r.new_us, r.new_tflops, r.percent_of_cublas, r.percent_of_peak,
                    r.old_us / r.new_us, r.relative_difference, r.bf16_q_us, r.bf16_q_tflops,
                    100.0 * r.bf16_q_tflops / cublas_tflops, r.bf16_q_prefetch_us, r.bf16_q_no_entries_us,
                    agrees ? "" : " FAIL");
        std::fflush(stdout);
        cases.push_back(r);
      }
  std::vector<DecodeCase> decode_cases;
  if (decode_part) {
    std::printf("decode: one query per sequence, bf16 q, fp32 out; today = run_sparse_attention (decode kernels)\n");
    std::printf("%-6s %-4s %5s %-13s %5s | %6s %9s %7s | %8s %8s | %4s %7s %8s | %9s\n", "model", "kind", "batch",
                "format", "slots", "splits", "today us", "%floor", "new us", "+pf us", "best", "%floor", "speedup",
                "rel diff");
  }
  for (const auto& [model, heads] : {std::pair<const char*, int>{"flash", 64}, {"pro", 128}})
    for (const DecodeLayout kind : {DecodeLayout::Swa, DecodeLayout::Csa, DecodeLayout::Hca})
      for (const int batch : {64, 256})
        for (const KvEntryFormat format : {KvEntryFormat::Fp8Reference, KvEntryFormat::Bf16}) {
          if (!decode_part || !only.selects(std::string(model) + ":" + to_string(kind) + ":" + std::to_string(batch) +
                                            ":" + to_string(format)))
            continue;
          const int64_t context = kind == DecodeLayout::Swa ? 4096 : 65536;
          const DecodeCase r = run_decode_case(model, heads, kind, format, batch, context, copy_gbps, cublas_tflops,
                                               device.multiprocessors, flush.data(), flush_bytes, rng);
          const bool agrees = r.relative_difference <= std::ldexp(1.0, -6);
          ok = ok && agrees;
          const double best_us = r.us[r.best];
          std::printf("%-6s %-4s %5d %-13s %5d | %6d %9.1f %7.1f | %8.1f %8.1f | %4s %7.1f %8.2f | %9.2e%s\n",
                      r.model.c_str(), r.layout.c_str(), r.batch, r.format.c_str(), r.slots, r.today_splits,
                      r.today_us, r.today_percent_of_floor, r.us[0], r.us[1],
                      decode_variant_prefetch(r.best) ? "+pf" : "-", 100.0 * r.floor_us / best_us,
                      r.today_us / best_us, r.relative_difference, agrees ? "" : " FAIL");
          decode_cases.push_back(r);
        }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    check(f != nullptr, "cannot write ", json_path);
    std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"cublas_bf16_tflops\": %.1f,\n  \"peak_bf16_tflops\": %.1f,\n"
                    "  \"copy_gbps\": %.1f,\n  \"prefill\": [\n",
                 device.name.c_str(), cublas_tflops, peak_tflops, copy_gbps);
    for (size_t i = 0; i < cases.size(); ++i) {
      const Case& r = cases[i];
      std::fprintf(f,
                   "    {\"model\": \"%s\", \"format\": \"%s\", \"heads\": %d, \"context\": %lld, \"tokens\": %lld, "
                   "\"today_splits\": %d, \"today_us\": %.1f, \"today_tflops\": %.1f, \"us\": %.1f, \"tflops\": %.1f, "
                   "\"percent_of_cublas\": %.1f, \"percent_of_peak\": %.1f, \"relative_difference\": %.3e, "
                   "\"bf16_q_us\": %.1f, \"bf16_q_tflops\": %.1f, \"bf16_q_prefetch_us\": %.1f}%s\n",
                   r.model.c_str(), r.format.c_str(), r.heads, static_cast<long long>(r.context),
                   static_cast<long long>(kTokens), r.old_splits, r.old_us, r.old_tflops, r.new_us, r.new_tflops,
                   r.percent_of_cublas, r.percent_of_peak, r.relative_difference, r.bf16_q_us, r.bf16_q_tflops,
                   r.bf16_q_prefetch_us, i + 1 < cases.size() ? "," : "");
    }
    std::fprintf(f, "  ],\n  \"decode\": [\n");
    for (size_t i = 0; i < decode_cases.size(); ++i) {
      const DecodeCase& r = decode_cases[i];
      std::fprintf(f,
                   "    {\"model\": \"%s\", \"layout\": \"%s\", \"format\": \"%s\", \"heads\": %d, \"batch\": %d, "
                   "\"context\": %lld, \"slots\": %d, \"today_splits\": %d, \"today_us\": %.1f, "
                   "\"plain_us\": %.1f, \"prefetch_us\": %.1f, \"best_prefetch\": %s, \"us\": %.1f, "
                   "\"floor_us\": %.2f, \"today_percent_of_floor\": %.1f, \"percent_of_floor\": %.1f, "
                   "\"relative_difference\": %.3e}%s\n",
                   r.model.c_str(), r.layout.c_str(), r.format.c_str(), r.heads, r.batch,
                   static_cast<long long>(r.context), r.slots, r.today_splits, r.today_us, r.us[0], r.us[1],
                   decode_variant_prefetch(r.best) ? "true" : "false", r.us[r.best], r.floor_us,
                   r.today_percent_of_floor,
                   100.0 * r.floor_us / r.us[r.best], r.relative_difference, i + 1 < decode_cases.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
  }
  only.require_all_used();
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_attention_prefill", dsv4::cuda::run, argc, argv);
}
