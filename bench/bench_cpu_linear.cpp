// CPU quantized GEMV/GEMM throughput on V4-Flash shapes: the fp8 block-128 attention output projection wo_b
// [4096, 8192] and MXFP4 routed-expert w1 matrices [2048, 4096]. Decode is weight-bandwidth bound, so the
// headline number is GB/s of stored weight bytes read (data + scales). Eight distinct experts are cycled so the
// MXFP4 case reads from memory rather than from the last-level cache, as a decode step touching fresh experts does.
// Arg: T (tokens per call). Threads: DSV4_THREADS or all cores.
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "backends/cpu/linear.hpp"
#include "backends/cpu/vector_math.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/thread_pool.hpp"

namespace {

std::vector<float> random_weights(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> values(rows * cols);
  for (float& v : values) v = dist(rng);
  return values;
}

void run(benchmark::State& state, const std::vector<dsv4::OwnedQuantizedMatrix>& matrices) {
  const int64_t T = state.range(0);
  const dsv4::QuantizedMatrix& first = matrices.front().matrix;
  std::vector<float> x(T * first.cols, 0.01f), y(T * first.rows);
  size_t next = 0;
  size_t bytes = 0;
  for (auto _ : state) {
    const dsv4::QuantizedMatrix& w = matrices[next].matrix;
    next = (next + 1) % matrices.size();
    dsv4::cpu::linear(w, x.data(), T, y.data());
    benchmark::DoNotOptimize(y.data());
    bytes += w.stored_bytes();
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(bytes) / 1e9, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * T * first.rows * first.cols * state.iterations() / 1e9,
                                                 benchmark::Counter::kIsRate);
  state.SetLabel(std::to_string(dsv4::ThreadPool::global().size()) + " threads" +
                 (dsv4::cpu::vector_math_uses_avx2() ? ", avx2" : ", portable"));
}

void BM_LinearFp8WoB(benchmark::State& state) {
  static const std::vector<dsv4::OwnedQuantizedMatrix> matrices = [] {
    std::vector<dsv4::OwnedQuantizedMatrix> m;
    m.push_back(dsv4::quantize_fp8_block128(random_weights(4096, 8192, 1).data(), 4096, 8192, dsv4::ScaleType::E8M0));
    return m;
  }();
  run(state, matrices);
}

// Same-run baseline: the wo_b matrix as plain fp32 (4× the bytes, no decode), through the same tiled GEMV.
void BM_LinearF32WoBBaseline(benchmark::State& state) {
  static const std::vector<dsv4::OwnedQuantizedMatrix> matrices = [] {
    const std::vector<float> values = random_weights(4096, 8192, 1);
    dsv4::OwnedQuantizedMatrix m = dsv4::allocate_quantized_matrix(dsv4::WeightFormat::F32, 4096, 8192,
                                                                   dsv4::ScaleType::NONE);
    std::memcpy(m.storage->data.data(), values.data(), values.size() * sizeof(float));
    return std::vector<dsv4::OwnedQuantizedMatrix>{m};
  }();
  run(state, matrices);
}

void BM_LinearMxfp4ExpertW1(benchmark::State& state) {
  static const std::vector<dsv4::OwnedQuantizedMatrix> matrices = [] {
    std::vector<dsv4::OwnedQuantizedMatrix> m;
    for (uint32_t e = 0; e < 8; ++e) m.push_back(dsv4::quantize_mxfp4(random_weights(2048, 4096, 10 + e).data(), 2048, 4096));
    return m;
  }();
  run(state, matrices);
}

// The floor for the GEMV numbers: memcpy of 256 MiB, bytes read + written per second (the same convention as the
// GPU copy-bandwidth floors in bench/NOTES.md).
void BM_CopyBandwidth(benchmark::State& state) {
  static std::vector<char> src(size_t(256) << 20, 1), dst(size_t(256) << 20);
  size_t bytes = 0;
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::DoNotOptimize(dst.data());
    bytes += 2 * src.size();
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(bytes) / 1e9, benchmark::Counter::kIsRate);
}

BENCHMARK(BM_CopyBandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LinearFp8WoB)->Arg(1)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LinearF32WoBBaseline)->Arg(1)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LinearMxfp4ExpertW1)->Arg(1)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
