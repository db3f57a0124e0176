// Lightning-indexer scores and top-k on the GPU, each against its floor and a straightforward baseline in the same run
// (device named in the output; the compressor's benchmark is bench_cuda_compressor):
// - indexer scores (run_indexer_scores, bf16 mma.sync) at 64K and 1M context (key_count = context / 4), 1, 8 and
//   64 queries of one sequence; floor = max(bytes / copy bandwidth, flops / cuBLAS bf16 GEMM rate); baseline = the
//   dots alone as one cuBLAS bf16 GEMM (keys × q^T → fp32 [keys, heads·T]); keys rotate over copies beyond the L2.
//   The fp8 variant (e4m3 keys + fp32 scale, e4m3 mma.sync) against the same-run bf16 kernel, its compute floor at
//   twice the bf16 rate; and the scores + top-k in one launch (run_indexer_scores_top_k:
//   TopKKernel, and LastCta where key_count ≤ 2048) against the two. The warpgroup-MMA kernels
//   (IndexerScoresKernel::Warpgroup) in both formats against the same-run mma.sync kernel of that format, and their
//   streamed variants (WarpgroupStreamed: bf16 keys by cp.async, fp8 keys staged by TMA) against them.
// - at batch 1, short contexts (1024 and 16384 visible keys) in the key buffer of the context's capacity, as the model
//   launches them, and the whole context: the default kernel in both formats against a launch sized to the visible
//   keys.
// - top-k (run_top_k, k = 512) over the same key counts on the indexer's own scores (fp4-rounded inputs: many ties) and
//   on distinct random scores; target ≤ 20 µs over 262,144 candidates at batch 1; baseline = a full CUB segmented radix
//   sort of (score, index) pairs. Scores are L2-resident, as right after the indexer. At batch 1 also diagnostics: the
//   split capped at 1, 32 and 64 CTAs, 300 or 4096 visible keys in the grid of the whole capacity (a short context as
//   the model step launches it), and "top-k trace" lines: one launch's phases (TopKParams::trace) for CTA 0 and the
//   final CTA.
// Times are GPU time per call inside a CUDA graph (20 calls captured, the graph replayed), as a decode step runs:
// no host launch cost; kernels launched as programmatic dependents (top-k, indexer) overlap their start with the
// previous call's end, as in the step. The cuBLAS/CUB baselines are timed the same way.
// - the decode chain at batch 1 (contexts 64 = the e2e bench's 16-key bound, 4K, 64K, 1M, and 16 keys visible in
//   the 4K grid) and batch 8 (4K, 64K): indexer_prepare, scores and top-k alone, and the ways of running them (three
//   launches; prepare + fused scores/top-k; with ≤ 2048 keys prepare + LastCta), both formats, the scores with the
//   default kernel choice
//   (IndexerScoresKernel::Auto: the warpgroup kernel for fp8 keys); the top-k's trace at 16 visible.
// - with --slots: a batched decode step of T sequences, each in its own slot (bench_slots).
// Usage: bench_cuda_indexer [--json PATH] [--decode | --short | --context N [--tokens T] [--scores | --slots]
// [--trace]]: --context runs batch T (default 1) at a context of N tokens only (--scores: the score kernels' rows
// only; --slots: T sequences through sequence_slots; --trace: also the staged kernel's timeline, print_staged_trace);
// --decode runs the decode chains' cases only, --short those up to a 4K context.
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/indexer.hpp"
#include "backends/cuda/kernels/rope.hpp"
#include "backends/cuda/kernels/top_k.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/stream_timing.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"

#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

// GPU microseconds per call of body(stream): `reps` calls captured in one CUDA graph, as a decode step runs them, and
// the graph replayed between two events, so no host launch cost is counted. Returns −1 if the calls cannot be
// captured (the row then says n/a).
template <class Body>
double graph_us(cudaStream_t stream, int reps, Body&& body) {
  body(stream);
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph = nullptr;
  try {
    graph = capture_calls(stream, reps, body);
  } catch (const std::exception& e) {
    cudaStreamEndCapture(stream, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    std::fprintf(stderr, "graph capture failed: %s\n", e.what());
    return -1.0;
  }
  return graph_replay_us(stream, graph, reps);
}

// Median milliseconds of single calls (events around each), for the device-wide yardsticks (copy, GEMM).
template <class Body>
double median_ms(int iterations, Body&& body) {
  StreamTimer timer;
  body();
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) times.push_back(timer.elapsed_ms(nullptr, body));
  std::sort(times.begin(), times.end());
  return double(times[times.size() / 2]);
}

// bf16 tensor rate of cuBLAS on a 4096³ GEMM (TFLOP/s), the compute floor's yardstick.
double cublas_bf16_tflops(cublasHandle_t handle) {
  constexpr int n = 4096;
  DeviceBuffer a(size_t(n) * n * 2, "gemm a"), b(size_t(n) * n * 2, "gemm b"), c(size_t(n) * n * 4, "gemm c");
  a.fill_bytes(0x3C);
  b.fill_bytes(0x3C);
  const float alpha = 1.0f, beta = 0.0f;
  const double ms = median_ms(10, [&] {
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.data(), CUDA_R_16BF, n,
                                    b.data(), CUDA_R_16BF, n, &beta, c.data(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
  });
  return 2.0 * n * double(n) * n / (ms * 1e9);
}

struct Row {
  std::string op, variant;
  double us = 0, floor_us = 0, baseline_us = 0;
  double bytes = 0, flops = 0;
  std::string note;
};

// --------------------------------------------------------------------------------------------- indexer + top-k

// One top-k launch with its phase trace (TopKParams::trace), after a warm-up launch: prints, for CTA 0 and for the
// query's final CTA, the µs (SM clock) from each phase boundary it passed to the next.
void print_top_k_trace(const std::string& label, TopKParams p) {
  const int ctas = p.queries * top_k_ctas_per_query(p.queries, p.candidates, p.max_ctas_per_query);
  DeviceBuffer trace(size_t(ctas) * kTopKTracePoints * sizeof(int64_t), "top-k trace");
  p.trace = trace.as<int64_t>();
  for (int launch = 0; launch < 2; ++launch) {
    trace.fill_bytes(0);
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
    run_top_k(p);
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<int64_t> points(size_t(ctas) * kTopKTracePoints);
  trace.download(points.data(), trace.bytes());
  int clock_khz = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  int final_cta = 0;
  for (int c = 0; c < ctas; ++c)
    if (points[size_t(c) * kTopKTracePoints + kTraceFinal] != 0) final_cta = c;
  for (const int cta : {0, final_cta}) {
    std::string line = "top-k trace " + label + ", CTA " + std::to_string(cta) + (cta == final_cta ? " (final)" : "") +
                       " of " + std::to_string(ctas) + ":";
    const int64_t* row = points.data() + size_t(cta) * kTopKTracePoints;
    int previous = kTraceEntry;
    for (int point = kTraceEntry + 1; point < kTopKTracePoints; ++point) {
      if (row[point] == 0) continue;
      char part[96];
      std::snprintf(part, sizeof(part), " %s +%.2f", kTopKTracePointNames[point],
                    double(row[point] - row[previous]) * 1e3 / clock_khz);
      line += part;
      previous = point;
    }
    std::printf("%s µs\n", line.c_str());
  }
}

// --trace: the staged kernel's timeline in the last of 20 calls replayed in a graph (each call overlaps its start
// with the previous one's end, as in the benchmark rows): per warpgroup (thread 0) µs from the earliest CTA start to
// each IndexerTracePoint, printed as median / max over the warpgroups, the end times' spread by tiles per warpgroup,
// and tiles per SM.
void print_staged_trace(const std::string& label, const std::function<void(cudaStream_t, uint64_t*)>& call,
                        int64_t warps, cudaStream_t stream) {
  DeviceBuffer trace(size_t(warps) * kIndexerTracePoints * 8, "trace");
  trace.fill_bytes(0);
  graph_us(stream, 20, [&](cudaStream_t on) { call(on, trace.as<uint64_t>()); });
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint64_t> words(size_t(warps) * kIndexerTracePoints);
  trace.download(words.data(), trace.bytes());
  std::vector<const uint64_t*> records;
  uint64_t t0 = ~uint64_t(0);
  for (int64_t w = 0; w < warps; w += 4) {
    const uint64_t* r = words.data() + size_t(w) * kIndexerTracePoints;
    if (r[kIndexerTraceStart] == 0) continue;
    records.push_back(r);
    t0 = std::min(t0, r[kIndexerTraceStart]);
  }
  const auto stats = [&](auto&& value) {
    std::vector<double> v;
    for (const uint64_t* r : records)
      if (const double x = value(r); x >= 0) v.push_back(x);
    if (v.empty()) return std::string("-");
    std::sort(v.begin(), v.end());
    char text[64];
    std::snprintf(text, sizeof(text), "%.2f / %.2f", v[v.size() / 2], v.back());
    return std::string(text);
  };
  const auto at = [&](int point) {
    return [&, point](const uint64_t* r) { return r[point] == 0 ? -1.0 : double(r[point] - t0) * 1e-3; };
  };
  const auto between = [&](int from, int to) {
    return [&, from, to](const uint64_t* r) {
      return r[from] == 0 || r[to] == 0 ? -1.0 : double(int64_t(r[to] - r[from])) * 1e-3;
    };
  };
  std::printf("staged trace %s: %zu warpgroups, µs median / max: start %s, waited %s, visible %s, ready %s, first "
              "tile %s, last tile %s, end %s; wait %s, ready after wait %s, first tile after ready %s, per tile after "
              "the first %s, end after the last %s\n",
              label.c_str(), records.size(), stats(at(kIndexerTraceStart)).c_str(),
              stats(at(kIndexerTraceWaited)).c_str(), stats(at(kIndexerTraceVisible)).c_str(),
              stats(at(kIndexerTraceReady)).c_str(),
              stats(at(kIndexerTraceFirst)).c_str(), stats(at(kIndexerTraceLast)).c_str(),
              stats(at(kIndexerTraceEnd)).c_str(), stats(between(kIndexerTraceStart, kIndexerTraceWaited)).c_str(),
              stats(between(kIndexerTraceWaited, kIndexerTraceReady)).c_str(),
              stats(between(kIndexerTraceReady, kIndexerTraceFirst)).c_str(),
              stats([&](const uint64_t* r) {
                return r[kIndexerTraceTiles] < 2 ? -1.0
                                                 : double(r[kIndexerTraceLast] - r[kIndexerTraceFirst]) * 1e-3 /
                                                       double(r[kIndexerTraceTiles] - 1);
              }).c_str(),
              stats(between(kIndexerTraceLast, kIndexerTraceEnd)).c_str());
  std::map<uint64_t, std::vector<const uint64_t*>> by_tiles;
  std::map<uint64_t, uint64_t> sm_tiles;
  for (const uint64_t* r : records) {
    by_tiles[r[kIndexerTraceTiles]].push_back(r);
    sm_tiles[r[kIndexerTraceSm]] += r[kIndexerTraceTiles];
  }
  for (const auto& [tiles, group] : by_tiles) {
    std::vector<double> ends;
    for (const uint64_t* r : group) ends.push_back(double(r[kIndexerTraceEnd] - t0) * 1e-3);
    std::sort(ends.begin(), ends.end());
    std::printf("  %llu tiles: %zu warpgroups, end µs min %.2f median %.2f max %.2f\n", (unsigned long long)tiles,
                group.size(), ends.front(), ends[ends.size() / 2], ends.back());
  }
  std::map<uint64_t, int> sms_with;
  for (const auto& [sm, tiles] : sm_tiles) ++sms_with[tiles];
  std::string line = "  tiles per SM (SMs):";
  for (const auto& [tiles, sms] : sms_with) line += " " + std::to_string(tiles) + " (" + std::to_string(sms) + ")";
  std::printf("%s\n", line.c_str());
}

void bench_indexer_and_top_k(int64_t context, int tokens, double copy_gbps, double gemm_tflops, cudaStream_t stream,
                             cublasHandle_t cublas, std::mt19937& rng, std::vector<Row>& rows,
                             bool scores_only = false, bool trace = false) {
  constexpr int64_t kHeads = 64, kHeadDim = 128, kRatio = 4;
  constexpr int kTopK = 512;
  const int64_t keys = context / kRatio;
  const std::string shape = (context >= 1024 ? std::to_string(context / 1024) + "K" : std::to_string(context)) +
                            " context (" + std::to_string(keys) + " keys), T=" +
                            std::to_string(tokens);
  // Reference-mode operands, as the model stores them: Hadamard + fp4-rounded on the device, which bf16 and fp8
  // (with its per-vector scale) both hold exactly. Queries get RoPE on their last 64 dims.
  DeviceBuffer key_values = to_device(normal_floats(size_t(keys * kHeadDim), 1.0f, rng), "key values");
  DeviceBuffer q_raw = to_device(normal_floats(size_t(tokens * kHeads * kHeadDim), 1.0f, rng), "raw q");
  std::vector<float> frequencies(kHeadDim / 4);
  for (size_t i = 0; i < frequencies.size(); ++i) frequencies[i] = float(std::pow(160000.0, -2.0 * double(i) / 64.0));
  DeviceBuffer d_frequencies = to_device(frequencies, "frequencies");
  std::vector<int64_t> positions(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) positions[size_t(t)] = context - tokens + t;
  DeviceBuffer d_positions = to_device(positions, "positions");

  const size_t key_bytes = size_t(keys * kHeadDim) * 2;
  const size_t fp8_key_bytes = size_t(keys * kHeadDim);  // then the fp32 scales, in the same buffer
  const size_t fp8_bytes = fp8_key_bytes + size_t(keys) * 4;
  DeviceBuffer key_source(key_bytes, "keys"), fp8_source(fp8_bytes, "fp8 keys");
  run_indexer_prepare({.input = key_values.as<float>(),
                       .output = key_source.as<__nv_bfloat16>(),
                       .tokens = keys,
                       .heads = 1,
                       .head_dim = kHeadDim,
                       .reference_rounding = true});
  run_indexer_prepare({.input = key_values.as<float>(),
                       .output_fp8 = fp8_source.as<uint8_t>(),
                       .output_scales = reinterpret_cast<float*>(fp8_source.as<uint8_t>() + fp8_key_bytes),
                       .tokens = keys,
                       .heads = 1,
                       .head_dim = kHeadDim,
                       .reference_rounding = true});
  DeviceBuffer q(size_t(tokens * kHeads * kHeadDim) * 2, "q"), q_fp8(size_t(tokens * kHeads * kHeadDim), "fp8 q");
  DeviceBuffer q_scales(size_t(tokens * kHeads) * 4, "q scales");
  // Reference numerics for the queries' preparation (Hadamard + fp4 rounding), as the model in --mode reference;
  // false: exact numerics (RoPE and bf16 only: the e2e bench's mode).
  bool reference_q = true;
  // Into `out` / `out_scales` (the fp8 scales), RoPE by sincos or, given one, from `table`.
  auto prepare_q_into = [&](cudaStream_t on, bool fp8, DeviceBuffer& out, DeviceBuffer& out_scales,
                            const float2* table) {
    run_indexer_prepare({.input = q_raw.as<float>(),
                         .output = fp8 ? nullptr : out.as<__nv_bfloat16>(),
                         .output_fp8 = fp8 ? out.as<uint8_t>() : nullptr,
                         .output_scales = fp8 ? out_scales.as<float>() : nullptr,
                         .tokens = tokens,
                         .heads = kHeads,
                         .head_dim = kHeadDim,
                         .positions = d_positions.as<int64_t>(),
                         .rope_frequencies = table ? nullptr : d_frequencies.as<float>(),
                         .rope_table = table,
                         .rope_dim = kHeadDim / 2,
                         .reference_rounding = reference_q,
                         .stream = on});
  };
  auto prepare_q = [&](cudaStream_t on, bool fp8) { prepare_q_into(on, fp8, fp8 ? q_fp8 : q, q_scales, nullptr); };
  prepare_q(stream, false);
  prepare_q(stream, true);
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  // The queries' preparation with its RoPE factors read from a table of the context's positions (as the model's
  // layers hold one) against the double sincos per pair, both formats; the same bits (checked here).
  if (context <= 65536 && tokens <= 8) {
    DeviceBuffer table(rope_table_bytes(kHeadDim / 4, context), "RoPE table");
    run_rope_table({.table = table.as<float2>(),
                    .frequencies = d_frequencies.as<float>(),
                    .pairs = kHeadDim / 4,
                    .positions = context,
                    .stream = stream});
    for (const bool fp8 : {false, true}) {
      const size_t bytes = fp8 ? q_fp8.bytes() : q.bytes();
      DeviceBuffer out(bytes, "prepared q (table)"), out_scales(q_scales.bytes(), "q scales (table)");
      const auto prepare_with_table = [&](cudaStream_t on) {
        prepare_q_into(on, fp8, out, out_scales, table.as<float2>());
      };
      const double table_us = graph_us(stream, 20, prepare_with_table);
      const double sincos_us = graph_us(stream, 20, [&](cudaStream_t on) { prepare_q(on, fp8); });
      DSV4_CUDA_CHECK(cudaDeviceSynchronize());
      std::vector<uint8_t> a(bytes), b(bytes);
      out.download(a.data(), bytes);
      (fp8 ? q_fp8 : q).download(b.data(), bytes);
      check(a == b, "bench: the RoPE table's prepared queries differ from the sincos ones");
      const double prepare_bytes = double(tokens) * kHeads * kHeadDim * (4 + (fp8 ? 1 : 2));
      rows.push_back({"indexer_prepare, RoPE table", shape + (fp8 ? ", fp8" : ", bf16"), table_us,
                      prepare_bytes / (copy_gbps * 1e3), sincos_us, prepare_bytes, 0.0,
                      "64 heads, rope 64; baseline: a double sincos per pair (same bits, checked)"});
    }
  }

  // Keys rotate over copies beyond the L2 (bf16 and fp8 alike), so every call streams them from HBM; at most 2048
  // copies (a context of a few hundred tokens stays in L2, as the compressor that just wrote them leaves it).
  const int copies = int(std::clamp<size_t>((size_t(200) << 20) / fp8_bytes + 1, 2, 2048));
  std::vector<DeviceBuffer> key_copies, fp8_copies;
  for (int i = 0; i < copies; ++i) {
    key_copies.emplace_back(key_bytes, "keys");
    DSV4_CUDA_CHECK(cudaMemcpy(key_copies.back().data(), key_source.data(), key_bytes, cudaMemcpyDeviceToDevice));
    fp8_copies.emplace_back(fp8_bytes, "fp8 keys");
    DSV4_CUDA_CHECK(cudaMemcpy(fp8_copies.back().data(), fp8_source.data(), fp8_bytes, cudaMemcpyDeviceToDevice));
  }
  DeviceBuffer weights = to_device(normal_floats(size_t(tokens * kHeads), 1.0f, rng), "w");
  DeviceBuffer scores(size_t(tokens) * size_t(keys) * 4, "scores");

  int rotation = 0;
  // fp8: fp8 keys and queries; kernel: mma.sync (Warp) unless told (the decode chain runs the model's default, Auto).
  auto scores_params = [&](cudaStream_t on, bool fp8 = false, IndexerScoresKernel kernel = IndexerScoresKernel::Warp) {
    IndexerScoresParams p{.head_weights = weights.as<float>(),
                          .key_count = keys,
                          .positions = d_positions.as<int64_t>(),
                          .tokens = tokens,
                          .heads = kHeads,
                          .head_dim = kHeadDim,
                          .ratio = kRatio,
                          .scores = scores.as<float>(),
                          .score_stride = keys,
                          .kernel = kernel,
                          .stream = on};
    const int copy = rotation++ % copies;
    if (fp8) {
      p.keys_fp8 = fp8_copies[size_t(copy)].as<uint8_t>();
      p.key_scales = reinterpret_cast<const float*>(fp8_copies[size_t(copy)].as<uint8_t>() + fp8_key_bytes);
    } else {
      p.keys = key_copies[size_t(copy)].as<__nv_bfloat16>();
    }
    if (fp8) {
      p.q_fp8 = q_fp8.as<uint8_t>(), p.q_scales = q_scales.as<float>();
    } else {
      p.q = q.as<__nv_bfloat16>();
    }
    return p;
  };
  const double score_us = graph_us(stream, 20, [&](cudaStream_t on) { run_indexer_scores(scores_params(on)); });
  // Baseline: the dots alone, keys [keys, 128] × q^T → [keys, heads·T] fp32, one cuBLAS bf16 GEMM.
  DeviceBuffer dots(size_t(keys) * size_t(kHeads * tokens) * 4, "dots");
  const float alpha = 1.0f, beta = 0.0f;
  BENCH_CUBLAS_CHECK(cublasSetStream(cublas, stream));
  const double gemm_us = graph_us(stream, 20, [&](cudaStream_t) {
    BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(keys), int(kHeads * tokens), int(kHeadDim),
                                    &alpha, key_copies[size_t(rotation++ % copies)].data(), CUDA_R_16BF,
                                    int(kHeadDim), q.data(), CUDA_R_16BF, int(kHeadDim), &beta, dots.data(),
                                    CUDA_R_32F, int(keys), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  const double score_bytes = double(key_bytes) + double(tokens) * keys * 4 + double(q.bytes());
  const double score_flops = 2.0 * tokens * double(keys) * kHeads * kHeadDim;
  const double score_floor_us =
      std::max(score_bytes / (copy_gbps * 1e3), score_flops / (gemm_tflops * 1e6));
  rows.push_back({"indexer scores", shape, score_us, score_floor_us, gemm_us, score_bytes, score_flops,
                  "baseline: cuBLAS bf16 GEMM of the dots only"});
  // fp8 keys and queries; the same-run bf16 kernel is the baseline. Compute floor at twice the bf16 tensor rate.
  const double fp8_us = graph_us(stream, 20, [&](cudaStream_t on) { run_indexer_scores(scores_params(on, true)); });
  const double fp8_score_bytes =
      double(fp8_bytes) + double(tokens) * keys * 4 + double(q_fp8.bytes()) + double(q_scales.bytes());
  const double fp8_floor_us =
      std::max(fp8_score_bytes / (copy_gbps * 1e3), score_flops / (2 * gemm_tflops * 1e6));
  rows.push_back({"indexer scores fp8", shape, fp8_us, fp8_floor_us, score_us, fp8_score_bytes, score_flops,
                  "keys 128 B + fp32 scale; floor flops at 2x the bf16 rate; baseline: the bf16 kernel"});
  // The warpgroup-MMA kernels, each against the mma.sync kernel of its format; the streamed one (bf16 keys only)
  // against the register-fed one.
  for (const bool fp8 : {false, true}) {
    const double us =
        graph_us(stream, 20, [&](cudaStream_t on) {
          run_indexer_scores(scores_params(on, fp8, IndexerScoresKernel::Warpgroup));
        });
    rows.push_back({fp8 ? "indexer scores fp8, warpgroup MMA" : "indexer scores, warpgroup MMA", shape, us,
                    fp8 ? fp8_floor_us : score_floor_us, fp8 ? fp8_us : score_us,
                    fp8 ? fp8_score_bytes : score_bytes, score_flops,
                    "wgmma m64n64, keys as register A; baseline: the mma.sync kernel of the same format"});
    const double streamed_us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_indexer_scores(scores_params(on, fp8, IndexerScoresKernel::WarpgroupStreamed));
    });
    if (fp8)
      rows.push_back({"indexer scores fp8, staged warpgroup MMA", shape, streamed_us, fp8_floor_us, us,
                      fp8_score_bytes, score_flops,
                      "wgmma m64n64k32, keys and queries from shared memory, key tiles by TMA in the 128B swizzle; "
                      "baseline: the register-fed warpgroup kernel"});
    else
      rows.push_back({"indexer scores, streamed warpgroup MMA", shape, streamed_us, score_floor_us, us, score_bytes,
                      score_flops,
                      "wgmma m64n64, keys through a shared-memory ring; baseline: the register-fed warpgroup kernel"});
    if (fp8 && trace) {
      const int64_t warps = int64_t(current_multiprocessors()) * 2 * tokens * 8;  // ≥ the grid's warps
      print_staged_trace(shape, [&](cudaStream_t on, uint64_t* words) {
        IndexerScoresParams p = scores_params(on, true, IndexerScoresKernel::WarpgroupStreamed);
        p.trace = words;
        run_indexer_scores(p);
      }, warps, stream);
    }
  }
  // At batch 1, short contexts in a key buffer of this capacity as the model launches them (key_count the buffer's
  // bound, the grid sized by it, what a query sees from its position), and the whole context: the default kernel
  // choice in both formats against the same visible keys scored in a launch sized to them (key_count = visible; the
  // default kernel there may be another).
  if (tokens == 1) {
    std::vector<int64_t> visible_counts;
    for (const int64_t visible : {int64_t(1024), int64_t(16384)})
      if (visible * 4 <= keys) visible_counts.push_back(visible);  // short in this capacity
    visible_counts.push_back(keys);
    for (const int64_t visible : visible_counts) {
      const DeviceBuffer d_position = to_device(std::vector<int64_t>{visible * kRatio - 1}, "position");
      for (const bool fp8 : {false, true}) {
        const auto call = [&](int64_t key_count) {
          return [&, key_count](cudaStream_t on) {
            IndexerScoresParams p = scores_params(on, fp8, IndexerScoresKernel::Auto);
            p.positions = d_position.as<int64_t>(), p.key_count = key_count;
            run_indexer_scores(p);
          };
        };
        const double us = graph_us(stream, 20, call(keys));
        const double sized_us = graph_us(stream, 20, call(visible));
        const double bytes = double(visible) * (fp8 ? kHeadDim + 4 : 2 * kHeadDim) + double(visible) * 4 +
                             double(fp8 ? q_fp8.bytes() + q_scales.bytes() : q.bytes());
        const double flops = 2.0 * double(visible) * kHeads * kHeadDim;
        const double floor_us = std::max(bytes / (copy_gbps * 1e3), flops / ((fp8 ? 2 : 1) * gemm_tflops * 1e6));
        rows.push_back({"indexer scores, short context", shape + ", " + std::to_string(visible) + " visible" +
                                                             (fp8 ? ", fp8" : ", bf16"),
                        us, floor_us, sized_us, bytes, flops,
                        "default kernel in the capacity's grid; baseline: a launch sized to the visible keys"});
      }
    }
  }
  if (scores_only) return;
  // Top-k on the indexer's scores (now in `scores`), then on distinct random scores.
  DeviceBuffer workspace(std::max<size_t>(top_k_workspace_bytes(tokens), 16), "top-k workspace");
  workspace.fill_bytes(0);
  DeviceBuffer selected(size_t(tokens) * kTopK * 4, "selected"), counts(size_t(tokens) * 4, "counts"),
      nan_flag(4, "nan flag");
  nan_flag.fill_bytes(0);
  // CUB baseline buffers: full segmented descending sort of (score, index).
  DeviceBuffer sorted_scores(scores.bytes(), "sorted scores"), indices(size_t(tokens) * size_t(keys) * 4, "indices"),
      sorted_indices(indices.bytes(), "sorted indices");
  std::vector<int32_t> host_indices(size_t(tokens) * size_t(keys)), offsets(size_t(tokens) + 1);
  for (int t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < keys; ++j) host_indices[size_t(t * keys + j)] = int32_t(j);
  for (int t = 0; t <= tokens; ++t) offsets[size_t(t)] = int32_t(t * keys);
  indices.upload(host_indices.data(), indices.bytes());
  DeviceBuffer d_offsets = to_device(offsets, "offsets");
  size_t temp_bytes = 0;
  DSV4_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, temp_bytes, scores.as<float>(), sorted_scores.as<float>(), indices.as<int32_t>(),
      sorted_indices.as<int32_t>(), int(tokens * keys), tokens, d_offsets.as<int32_t>(), d_offsets.as<int32_t>() + 1));
  DeviceBuffer temp(std::max<size_t>(temp_bytes, 16), "cub temp");
  // Top-k of every query's row of `scores`; max_ctas_per_query 0 leaves the split over CTAs uncapped.
  auto top_k_params = [&](cudaStream_t on, int max_ctas_per_query) {
    return TopKParams{.scores = scores.as<float>(),
                      .row_stride = keys,
                      .candidates = keys,
                      .queries = tokens,
                      .k = kTopK,
                      .positions = d_positions.as<int64_t>(),
                      .ratio = kRatio,
                      .selected = selected.as<int32_t>(),
                      .counts = counts.as<int32_t>(),
                      .nan_flag = nan_flag.as<int32_t>(),
                      .workspace = workspace.data(),
                      .workspace_bytes = workspace.bytes(),
                      .max_ctas_per_query = max_ctas_per_query,
                      .stream = on};
  };
  const double top_k_bytes = double(tokens) * keys * 4;

  for (const bool indexer_scores : {true, false}) {
    if (!indexer_scores) {
      std::vector<float> distinct = normal_floats(size_t(tokens) * size_t(keys), 100.0f, rng);
      scores.upload(distinct.data(), scores.bytes());
    } else {
      run_indexer_scores(scores_params(stream));
    }
    const double top_k_us = graph_us(stream, 20, [&](cudaStream_t on) { run_top_k(top_k_params(on, 0)); });
    const double sort_us = graph_us(stream, 5, [&](cudaStream_t on) {
      DSV4_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          temp.data(), temp_bytes, scores.as<float>(), sorted_scores.as<float>(), indices.as<int32_t>(),
          sorted_indices.as<int32_t>(), int(tokens * keys), tokens, d_offsets.as<int32_t>(),
          d_offsets.as<int32_t>() + 1, 0, 32, on));
    });
    const std::string scores_name = indexer_scores ? ", indexer scores" : ", distinct scores";
    rows.push_back({"top-k 512", shape + scores_name, top_k_us, top_k_bytes / (copy_gbps * 1e3), sort_us,
                    top_k_bytes, 0.0,
                    "ctas/query " + std::to_string(top_k_ctas_per_query(tokens, keys)) +
                        "; baseline: CUB segmented radix sort (full)"});
  }
  // The scores and the top-k in one launch (prepared queries) against the two launches: the top-k kernel computing
  // its scores (TopKKernel, mma.sync scores), and where the key bound allows, the scores kernel's last CTA selecting
  // (LastCta, the default kernel choice).
  for (const bool fp8 : {false, true}) {
    const double two_launch_us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_indexer_scores(scores_params(on, fp8));
      run_top_k(top_k_params(on, 0));
    });
    const auto fused_params = [&](cudaStream_t on, IndexerTopKMethod method) {
      IndexerScoresParams p = scores_params(
          on, fp8, method == IndexerTopKMethod::LastCta ? IndexerScoresKernel::Auto : IndexerScoresKernel::Warp);
      p.top_k_method = method;
      return p;
    };
    const double fused_us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_indexer_scores_top_k(fused_params(on, IndexerTopKMethod::TopKKernel), top_k_params(on, 0));
    });
    rows.push_back({"indexer scores + top-k 512, one launch (TopKKernel)", shape + (fp8 ? ", fp8" : ", bf16"),
                    fused_us, fp8 ? fp8_floor_us : score_floor_us, two_launch_us, 0.0, score_flops,
                    "floor: the scores'; baseline: scores + top-k, two launches (mma.sync scores)"});
    if (keys > kIndexerLastCtaMaxKeys) continue;
    const double auto_two_us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_indexer_scores(scores_params(on, fp8, IndexerScoresKernel::Auto));
      run_top_k(top_k_params(on, 0));
    });
    const double last_cta_us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_indexer_scores_top_k(fused_params(on, IndexerTopKMethod::LastCta), top_k_params(on, 0));
    });
    rows.push_back({"indexer scores + top-k 512, one launch (LastCta)", shape + (fp8 ? ", fp8" : ", bf16"),
                    last_cta_us, fp8 ? fp8_floor_us : score_floor_us, auto_two_us, 0.0, score_flops,
                    "floor: the scores'; baseline: scores + top-k, two launches (default kernel choice)"});
    if (fp8) {
      const auto last_cta_on = [&](IndexerScoresKernel kernel) {
        return graph_us(stream, 20, [&, kernel](cudaStream_t on) {
          IndexerScoresParams p = scores_params(on, true, kernel);
          p.top_k_method = IndexerTopKMethod::LastCta;
          run_indexer_scores_top_k(p, top_k_params(on, 0));
        });
      };
      const double register_fed_us = last_cta_on(IndexerScoresKernel::Warpgroup);
      rows.push_back({"indexer scores + top-k 512, one launch (LastCta), staged", shape + ", fp8",
                      last_cta_on(IndexerScoresKernel::WarpgroupStreamed), fp8_floor_us, register_fed_us, 0.0,
                      score_flops, "the staged kernel's last CTA selecting; baseline: the register-fed warpgroup "
                                   "kernel's"});
    }
  }
  // The decode step's chain at batch 1, every way the model can run it (in both formats): the pieces alone, then
  // indexer_prepare + scores + top-k (three launches), prepare + the fused scores + top-k (two), prepare + the
  // scores with the top-k in their last CTA (two: the model's default at ≤ 2048 keys). Baseline: the three launches.
  // At the shortest context also with 16 keys visible in its grid (a 64-token sequence, as the e2e bench decodes).
  const std::vector<int64_t> e2e_position{16 * kRatio};
  const DeviceBuffer d_e2e_position = to_device(e2e_position, "e2e position");
  for (const bool e2e_like : {false, true}) {
    if (tokens > 8 || (e2e_like && (context != 4096 || tokens != 1))) continue;
    // Every call of this chain reads the e2e-like position instead of the context's.
    const auto positions = [&](auto p) {
      if (e2e_like) p.positions = d_e2e_position.as<int64_t>();
      return p;
    };
    const auto scores_params_at = [&](cudaStream_t on, bool fp8,
                                      IndexerTopKMethod method = IndexerTopKMethod::Auto) {
      IndexerScoresParams p = positions(scores_params(on, fp8, IndexerScoresKernel::Auto));
      p.top_k_method = method;
      if (method == IndexerTopKMethod::TopKKernel) p.kernel = IndexerScoresKernel::Warp;
      return p;
    };
    const auto top_k_params_at = [&](cudaStream_t on) { return positions(top_k_params(on, 0)); };
    for (const bool fp8 : {false, true}) {
      const std::string format = std::string(fp8 ? ", fp8" : ", bf16") + (e2e_like ? ", 16 keys visible" : "");
      const double three_us = graph_us(stream, 20, [&](cudaStream_t on) {
        prepare_q(on, fp8);
        run_indexer_scores(scores_params_at(on, fp8));
        run_top_k(top_k_params_at(on));
      });
      const auto chain_row = [&](const std::string& variant, double us, const std::string& note) {
        rows.push_back({"indexer decode chain", shape + format + ", " + variant, us,
                        fp8 ? fp8_floor_us : score_floor_us, three_us, 0.0, score_flops,
                        note + "; floor: the scores'; baseline: prepare + scores + top-k (three launches)"});
      };
      chain_row("indexer_prepare alone", graph_us(stream, 20, [&](cudaStream_t on) { prepare_q(on, fp8); }),
                "one piece");
      chain_row("scores alone",
                graph_us(stream, 20, [&](cudaStream_t on) { run_indexer_scores(scores_params_at(on, fp8)); }),
                "one piece (prepared q)");
      chain_row("top-k alone", graph_us(stream, 20, [&](cudaStream_t on) { run_top_k(top_k_params_at(on)); }),
                "one piece");
      chain_row("prepare + scores + top-k", three_us, "3 launches");
      chain_row("prepare + fused scores/top-k (TopKKernel)", graph_us(stream, 20, [&](cudaStream_t on) {
                  prepare_q(on, fp8);
                  run_indexer_scores_top_k(scores_params_at(on, fp8, IndexerTopKMethod::TopKKernel),
                                           top_k_params_at(on));
                }),
                "2 launches");
      if (keys <= kIndexerLastCtaMaxKeys) {
        chain_row("prepare + scores with the top-k in the last CTA", graph_us(stream, 20, [&](cudaStream_t on) {
                    prepare_q(on, fp8);
                    run_indexer_scores_top_k(scores_params_at(on, fp8, IndexerTopKMethod::LastCta),
                                             top_k_params_at(on));
                  }),
                  "2 launches (top_k_method LastCta: the model's default)");
      }
    }
    if (e2e_like) print_top_k_trace(shape + ", 16 keys visible", top_k_params_at(stream));
  }
  // Exact numerics (the e2e bench's mode: bf16 keys, queries RoPE'd and rounded to bf16 only) at batch 1: the three
  // launches against the top-k in the scores launch.
  if (tokens == 1 && keys <= kIndexerLastCtaMaxKeys) {
    reference_q = false;
    const auto last_cta = [&](cudaStream_t on) {
      IndexerScoresParams p = scores_params(on, false, IndexerScoresKernel::Auto);
      p.top_k_method = IndexerTopKMethod::LastCta;
      run_indexer_scores_top_k(p, top_k_params(on, 0));
    };
    const double three_us = graph_us(stream, 20, [&](cudaStream_t on) {
      prepare_q(on, false);
      run_indexer_scores(scores_params(on, false, IndexerScoresKernel::Auto));
      run_top_k(top_k_params(on, 0));
    });
    const auto exact_row = [&](const std::string& variant, double us, const std::string& note) {
      rows.push_back({"indexer decode chain, exact numerics", shape + ", bf16, " + variant, us, score_floor_us,
                      three_us, 0.0, score_flops,
                      note + "; baseline: prepare + scores + top-k (three launches, exact q)"});
    };
    exact_row("prepare + scores + top-k", three_us, "3 launches");
    exact_row("prepare + scores with the top-k in the last CTA", graph_us(stream, 20, [&](cudaStream_t on) {
                prepare_q(on, false);
                last_cta(on);
              }),
              "2 launches");
    reference_q = true;
  }
  // Diagnostics at batch 1: the split capped at fewer CTAs (1 = one CTA, no barrier), and short contexts in a grid
  // sized for the whole capacity (as the model step launches it: the visible count comes from the positions).
  if (tokens == 1) {
    for (const int cap : {1, 32, 64}) {
      const double capped_us = graph_us(stream, 20, [&](cudaStream_t on) { run_top_k(top_k_params(on, cap)); });
      rows.push_back({"top-k 512", shape + ", distinct scores, ≤ " + std::to_string(cap) + " CTAs", capped_us,
                      top_k_bytes / (copy_gbps * 1e3), 0.0, top_k_bytes, 0.0,
                      "diagnostic: ctas/query " + std::to_string(top_k_ctas_per_query(tokens, keys, cap))});
    }
    print_top_k_trace(shape + ", distinct", top_k_params(stream, 0));
    for (const int64_t visible : {int64_t(300), int64_t(4096)}) {
      if (visible >= keys) continue;  // not a short context of this capacity
      const std::vector<int64_t> short_position{visible * kRatio};
      DeviceBuffer d_short = to_device(short_position, "short position");
      const double short_us = graph_us(stream, 20, [&](cudaStream_t on) {
        TopKParams p = top_k_params(on, 0);
        p.positions = d_short.as<int64_t>();
        run_top_k(p);
      });
      rows.push_back({"top-k 512", shape + ", distinct scores, " + std::to_string(visible) + " visible", short_us,
                      double(visible) * 4 / (copy_gbps * 1e3), 0.0, double(visible) * 4, 0.0,
                      "diagnostic: a short context in the capacity's grid"});
    }
  }
  int32_t flag = 0;
  nan_flag.download(&flag, 4);
  check(flag == 0, "bench: top-k saw a NaN score");
}

// A batched decode step of `tokens` sequences, each query in its own slot at the full context (fp8 keys, reference
// numerics, keys rotating over copies beyond the L2): the staged kernel through sequence_slots against the
// register-fed warpgroup kernel, and with the top-k in the last CTA where key_count ≤ 2048.
void bench_slots(int64_t context, int tokens, double copy_gbps, double gemm_tflops, cudaStream_t stream,
                 std::mt19937& rng, std::vector<Row>& rows) {
  constexpr int64_t kHeads = 64, kHeadDim = 128, kRatio = 4;
  constexpr int kTopK = 512;
  const int64_t keys = context / kRatio;
  const std::string shape = std::to_string(context / 1024) + "K context (" + std::to_string(keys) +
                            " keys) in each of " + std::to_string(tokens) + " slots, T=" + std::to_string(tokens);
  const int64_t slot_keys = int64_t(tokens) * keys;
  const size_t code_bytes = size_t(slot_keys * kHeadDim), bytes = code_bytes + size_t(slot_keys) * 4;
  DeviceBuffer key_values = to_device(normal_floats(size_t(slot_keys * kHeadDim), 1.0f, rng), "key values");
  DeviceBuffer source(bytes, "fp8 keys");
  run_indexer_prepare({.input = key_values.as<float>(),
                       .output_fp8 = source.as<uint8_t>(),
                       .output_scales = reinterpret_cast<float*>(source.as<uint8_t>() + code_bytes),
                       .tokens = slot_keys,
                       .heads = 1,
                       .head_dim = kHeadDim,
                       .reference_rounding = true});
  const int copies = int(std::clamp<size_t>((size_t(200) << 20) / bytes + 1, 2, 64));
  std::vector<DeviceBuffer> key_copies;
  for (int i = 0; i < copies; ++i) {
    key_copies.emplace_back(bytes, "fp8 keys");
    DSV4_CUDA_CHECK(cudaMemcpy(key_copies.back().data(), source.data(), bytes, cudaMemcpyDeviceToDevice));
  }
  std::vector<int64_t> positions(static_cast<size_t>(tokens), context - 1);
  std::vector<int32_t> slots(static_cast<size_t>(tokens));
  for (int t = 0; t < tokens; ++t) slots[size_t(t)] = t;
  DeviceBuffer d_positions = to_device(positions, "positions"), d_slots = to_device(slots, "slots");
  DeviceBuffer q_raw = to_device(normal_floats(size_t(tokens * kHeads * kHeadDim), 1.0f, rng), "raw q");
  DeviceBuffer q_fp8(size_t(tokens * kHeads * kHeadDim), "fp8 q"), q_scales(size_t(tokens * kHeads) * 4, "q scales");
  run_indexer_prepare({.input = q_raw.as<float>(),
                       .output_fp8 = q_fp8.as<uint8_t>(),
                       .output_scales = q_scales.as<float>(),
                       .tokens = tokens,
                       .heads = kHeads,
                       .head_dim = kHeadDim,
                       .reference_rounding = true});
  DeviceBuffer weights = to_device(normal_floats(size_t(tokens * kHeads), 1.0f, rng), "w");
  DeviceBuffer scores(size_t(tokens) * size_t(keys) * 4, "scores");
  DeviceBuffer workspace(std::max<size_t>(top_k_workspace_bytes(tokens), 16), "top-k workspace");
  workspace.fill_bytes(0);
  DeviceBuffer selected(size_t(tokens) * kTopK * 4, "selected"), counts(size_t(tokens) * 4, "counts");
  DeviceBuffer nan_flag(4, "nan flag");
  nan_flag.fill_bytes(0);
  int rotation = 0;
  const auto params = [&](cudaStream_t on, IndexerScoresKernel kernel) {
    const DeviceBuffer& copy = key_copies[size_t(rotation++ % copies)];
    return IndexerScoresParams{.q_fp8 = q_fp8.as<uint8_t>(),
                               .q_scales = q_scales.as<float>(),
                               .head_weights = weights.as<float>(),
                               .keys_fp8 = copy.as<uint8_t>(),
                               .key_scales = reinterpret_cast<const float*>(copy.as<uint8_t>() + code_bytes),
                               .key_scales_slot_stride = keys,
                               .key_count = keys,
                               .sequence_slots = d_slots.as<int32_t>(),
                               .keys_slot_stride = keys * kHeadDim,
                               .slot_count = tokens,
                               .positions = d_positions.as<int64_t>(),
                               .tokens = tokens,
                               .heads = kHeads,
                               .head_dim = kHeadDim,
                               .ratio = kRatio,
                               .scores = scores.as<float>(),
                               .score_stride = keys,
                               .kernel = kernel,
                               .stream = on};
  };
  const double score_bytes = double(bytes) + double(slot_keys) * 4 + double(q_fp8.bytes() + q_scales.bytes());
  const double flops = 2.0 * double(slot_keys) * kHeads * kHeadDim;
  const double floor_us = std::max(score_bytes / (copy_gbps * 1e3), flops / (2 * gemm_tflops * 1e6));
  const auto scores_us = [&](IndexerScoresKernel kernel) {
    return graph_us(stream, 20, [&, kernel](cudaStream_t on) { run_indexer_scores(params(on, kernel)); });
  };
  const double register_fed_us = scores_us(IndexerScoresKernel::Warpgroup);
  rows.push_back({"indexer scores fp8 through slots, staged", shape, scores_us(IndexerScoresKernel::WarpgroupStreamed),
                  floor_us, register_fed_us, score_bytes, flops,
                  "one query per CTA; baseline: the register-fed warpgroup kernel"});
  rows.push_back({"indexer scores fp8 through slots, Auto", shape, scores_us(IndexerScoresKernel::Auto), floor_us,
                  register_fed_us, score_bytes, flops, "the default choice; baseline: the register-fed kernel"});
  if (keys > kIndexerLastCtaMaxKeys || tokens > kTopKMaxSplitQueries) return;
  const auto last_cta_us = [&](IndexerScoresKernel kernel) {
    return graph_us(stream, 20, [&, kernel](cudaStream_t on) {
      IndexerScoresParams p = params(on, kernel);
      p.top_k_method = IndexerTopKMethod::LastCta;
      run_indexer_scores_top_k(p, TopKParams{.k = kTopK,
                                             .selected = selected.as<int32_t>(),
                                             .counts = counts.as<int32_t>(),
                                             .nan_flag = nan_flag.as<int32_t>(),
                                             .workspace = workspace.data(),
                                             .workspace_bytes = workspace.bytes()});
    });
  };
  const double register_fed_last_us = last_cta_us(IndexerScoresKernel::Warpgroup);
  rows.push_back({"indexer scores + top-k 512 fp8 through slots (LastCta), staged", shape,
                  last_cta_us(IndexerScoresKernel::WarpgroupStreamed), floor_us, register_fed_last_us, 0.0, flops,
                  "the last CTA of each query selecting; baseline: the register-fed kernel's"});
}

// Waits for the previous grid as every kernel of a step does (a no-op after an ordinary launch).
__global__ void empty_kernel(int* sink) {
  allow_dependents();
  wait_for_prior_grids();
  if (sink != nullptr && threadIdx.x == 0) *sink = int(blockIdx.x);
}

// Launch cost of an empty 128 × 512 grid in a graph, ordinary and programmatic-dependent (top-k's and the indexer's
// launches are programmatic).
void bench_launch(cudaStream_t stream, std::vector<Row>& rows) {
  for (const bool programmatic : {false, true}) {
    const double us = graph_us(stream, 20, [&](cudaStream_t on) {
      if (programmatic) {
        launch_chained(empty_kernel, dim3(128), dim3(512), 0, on, static_cast<int*>(nullptr), "empty_kernel");
      } else {
        empty_kernel<<<128, 512, 0, on>>>(nullptr);
        DSV4_CUDA_CHECK_LAUNCH("empty_kernel");
      }
    });
    rows.push_back({"empty kernel 128×512", programmatic ? "programmatic dependent launch" : "ordinary launch", us, 0.0,
                    0.0, 0.0, 0.0, "diagnostic: launch cost inside a graph"});
  }
}

int run(int argc, char** argv) {
  std::string json_path;
  bool decode_only = false, short_contexts = false, scores_only = false, slots_only = false, trace = false;
  int64_t only_context = 0;
  int only_tokens = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc)
      json_path = argv[++i];
    else if (std::strcmp(argv[i], "--context") == 0 && i + 1 < argc)
      only_context = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc)
      only_tokens = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--scores") == 0)
      scores_only = true;
    else if (std::strcmp(argv[i], "--slots") == 0)
      slots_only = true;
    else if (std::strcmp(argv[i], "--trace") == 0)
      trace = true;
    else if (std::strcmp(argv[i], "--decode") == 0)
      decode_only = true;
    else if (std::strcmp(argv[i], "--short") == 0)
      decode_only = short_contexts = true;
    else
      fail("unknown argument ", argv[i],
           " (usage: bench_cuda_indexer [--json PATH] [--decode | --short | --context N [--tokens T] [--scores | "
           "--slots] [--trace]])");
  }
  check(only_context >= 0 && only_context % 4 == 0, "bench_cuda_indexer: --context ", only_context,
        " must be a multiple of 4");
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty()) {
    std::fprintf(stderr, "bench_cuda_indexer: no CUDA device\n");
    return 1;
  }
  const DeviceInfo& device = devices.front();
  cublasHandle_t cublas;
  BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
  const double copy_gbps = copy_bandwidth_gbps();
  const double gemm_tflops = cublas_bf16_tflops(cublas);
  std::printf("device: %s (%d SMs); copy bandwidth %.0f GB/s; cuBLAS bf16 GEMM 4096^3 %.0f TFLOP/s\n",
              device.name.c_str(), device.multiprocessors, copy_gbps, gemm_tflops);
  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::mt19937 rng(42);
  std::vector<Row> rows;
  bench_launch(stream, rows);
  check(!scores_only || only_context > 0, "bench_cuda_indexer: --scores needs --context N");
  check(only_tokens >= 1 && (only_tokens == 1 || only_context > 0), "bench_cuda_indexer: --tokens ", only_tokens,
        " needs --context N and must be positive");
  check(!slots_only || only_context > 0, "bench_cuda_indexer: --slots needs --context N");
  if (only_context > 0) {
    if (slots_only)
      bench_slots(only_context, only_tokens, copy_gbps, gemm_tflops, stream, rng, rows);
    else
      bench_indexer_and_top_k(only_context, only_tokens, copy_gbps, gemm_tflops, stream, cublas, rng, rows,
                              scores_only, trace);
    decode_only = short_contexts = true;
  }
  // The decode chain's cases: batch 1 at the e2e bench's bound (64 tokens: 16 keys), a short, a long and the
  // longest context, batch 8 at the short and the long one; then 8 and 64 queries at the long contexts.
  for (const int64_t context : {int64_t(64), int64_t(4096), int64_t(65536), int64_t(1) << 20})
    if (only_context == 0 && (!short_contexts || context <= 4096))
      bench_indexer_and_top_k(context, 1, copy_gbps, gemm_tflops, stream, cublas, rng, rows);
  for (const int64_t context : {int64_t(4096), int64_t(65536)})
    if (only_context == 0 && (!short_contexts || context <= 4096))
      bench_indexer_and_top_k(context, 8, copy_gbps, gemm_tflops, stream, cublas, rng, rows);
  if (!decode_only) {
    bench_indexer_and_top_k(int64_t(1) << 20, 8, copy_gbps, gemm_tflops, stream, cublas, rng, rows);
    for (const int64_t context : {int64_t(65536), int64_t(1) << 20})
      bench_indexer_and_top_k(context, 64, copy_gbps, gemm_tflops, stream, cublas, rng, rows);
  }
  BENCH_CUBLAS_CHECK(cublasDestroy(cublas));
  DSV4_CUDA_CHECK(cudaStreamDestroy(stream));

  std::printf("| op | case | µs | floor µs | %% of floor | baseline µs | × baseline | note |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows)
    std::printf("| %s | %s | %.2f | %.2f | %.0f %% | %s | %s | %s |\n", r.op.c_str(), r.variant.c_str(), r.us,
                r.floor_us, r.us > 0 ? 100.0 * r.floor_us / r.us : 0.0,
                r.baseline_us > 0 ? std::to_string(r.baseline_us).substr(0, 7).c_str() : "-",
                r.baseline_us > 0 ? (std::to_string(r.baseline_us / r.us).substr(0, 5) + "×").c_str() : "-",
                r.note.c_str());
  if (!json_path.empty()) {
    FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_indexer: cannot write ", json_path);
    std::fprintf(out,
                 "{\n  \"benchmark\": \"bench_cuda_indexer\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n"
                 "  \"copy_bandwidth_gbps\": %.1f,\n  \"cublas_bf16_tflops\": %.1f,\n  \"results\": [\n",
                 device.name.c_str(), device.multiprocessors, copy_gbps, gemm_tflops);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(out,
                   "    {\"op\": \"%s\", \"case\": \"%s\", \"us\": %.3f, \"floor_us\": %.3f, \"percent_of_floor\": %.1f, "
                   "\"baseline_us\": %.3f, \"bytes\": %.0f, \"flops\": %.0f, \"note\": \"%s\"}%s\n",
                   r.op.c_str(), r.variant.c_str(), r.us, r.floor_us, r.us > 0 ? 100.0 * r.floor_us / r.us : 0.0, r.baseline_us,
                   r.bytes, r.flops, r.note.c_str(), i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_indexer", dsv4::cuda::run, argc, argv);
}
