// Decode-path linear layer benchmark on the GPU: run_quantized_linear for the V4-Flash and V4-Pro projection and
// expert shapes (wo_a grouped) in every weight format at T ∈ {1, 4, 8, 16, 32, 64}, against two same-run references:
// the device-to-device copy bandwidth (cudaMemcpy of 1 GiB, read + write counted) and cuBLAS bf16
// (cublasGemmEx, or cublasGemmStridedBatchedEx for the grouped wo_a, bf16 × bf16 → fp32) for the same shape.
// Weights rotate over enough copies to exceed three times the L2. The main times are COLD, as a model step sees each
// layer's matrices: a CUDA graph alternates a kernel that reads twice the L2 (evicting every weight byte) and
// rewrites the activations (so they sit in L2 as the previous kernel of a step leaves them) with the timed call, and
// the same graph without the call is subtracted. (Back-to-back replays of one call let each launch stream its
// weights while the previous one drains, and, with stream launches, the host's launch cost hides the kernel's: both
// flattered the kernels, so they are kept as the secondary "graph" and "stream" columns.) Each case times
// the default config and, next to it, the ALIGNED register path and the STREAMED shared-memory path at 1-4 ring
// slots where it applies (weight_tile_mma.cuh), so the default can be checked against its alternatives, and the
// wgmma GEMM (run_quantized_gemm: 64-token tiles, split-K) that linear_dispatch can take from a token count on, and
// (streamed path with split-K) the cluster split-K reduction instead of the workspace one, against the read floor of
// the weight's data (read_floor_kernel, cold). Ungrouped shapes also time, cold, the RMSNorm prologue (fp32 rows
// normalised by every CTA) against run_rms_norm followed by the plain call (the launch the prologue removes).
// Usage: bench_cuda_linear [--json PATH] [--quick] [--model flash|pro] [--tokens 1,8,...] [--shapes wq_b,wo_a,...]
//                          [--formats bf16,fp8_block128,mxfp4,nvfp4] [--sweep] [--profile] [--trace]
//   (--quick: T ∈ {1, 16}; --model: one model's shapes; --tokens: these token counts; --shapes: these shapes;
//   --formats: these weight formats; --sweep: instead of the table, the cold time of every STREAMED config by ring
//   slots × K splits × split-K reduction; --profile: instead of timing, one launch each of the default config and
//   the STREAMED configs at 1-4 ring slots, for a profiler such as ncu, which flushes the L2 per kernel itself;
//   --trace: instead of timing, the timeline of one cold call of each FP8 or BF16 default config on the STREAMED path
//   at up to 8 tokens, from QuantizedLinearParams::trace, alone and launched behind a 5 µs kernel as in a model step)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_gemm.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/linear_dispatch.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/quantized_matrix.hpp"
#include "support/l2_flushed_timing.hpp"

#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

struct Shape {
  const char* model;
  const char* name;
  int64_t rows, cols;  // N × K (K per group for the grouped wo_a)
  int groups;
};

// Milliseconds per call of `body(i)` averaged over `iterations` calls after a warm-up.
template <class Body>
double time_ms(int iterations, Body&& body) {
  for (int i = 0; i < 3; ++i) body(i);
  const float ms = stream_elapsed_ms(nullptr, [&] {
    for (int i = 0; i < iterations; ++i) body(i);
  });
  return double(ms) / iterations;
}

// Milliseconds per call of `body(i, stream)` when `iterations` calls are replayed as one CUDA graph on `stream`
// (how the engine's decode step runs them: no host launch cost between kernels), the mean of 5 replays.
template <class Body>
double time_graph_ms(int iterations, cudaStream_t stream, Body&& body) {
  body(0, stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < iterations; ++i) body(i, stream);
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  constexpr int kReplays = 5;
  const float ms = stream_elapsed_ms(stream, [&] {
    for (int r = 0; r < kReplays; ++r) DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  });
  DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
  DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
  return double(ms) / (kReplays * iterations);
}

// The read floor of a matrix: `words` 16-byte words read once, four independent loads in flight per thread before
// the first use, the same eviction and sink rule as l2_read_sweep_kernel. Timed cold like the linears, it is what
// streaming the same bytes costs without any arithmetic, launch and ramp included.
__global__ void read_floor_kernel(const uint4* data, size_t words, uint4* sink) {
  constexpr int kLoads = 4;
  uint32_t sum = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words; i += kLoads * stride) {
    uint4 v[kLoads];
#pragma unroll
    for (int l = 0; l < kLoads; ++l)
      v[l] = i + l * stride < words ? __ldcs(data + i + l * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int l = 0; l < kLoads; ++l) sum += v[l].x ^ v[l].y ^ v[l].z ^ v[l].w;
  }
  if (sum == 0x9E3779B9u) *sink = make_uint4(sum, 0, 0, 0);
}

// The previous kernel of a traced call "behind" another: one warp that lets its dependents launch at once and
// spins for `ns` nanoseconds, so the linear's CTAs start (programmatic launch) and issue their first weight copies
// while it runs, as in a model step, and the trace shows what follows the grid-dependency wait.
__global__ void spin_then_exit_kernel(uint64_t ns) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// Rewrites the activations from pristine copies: their lines are then in L2, as after the kernel that produced them.
struct Refresh {
  const uint4* source = nullptr;
  uint4* target = nullptr;
  size_t count = 0;  // 16-byte words
};
__global__ void refresh_kernel(Refresh a, Refresh b) {
  const auto copy = [](const Refresh& r) {
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < r.count; i += size_t(gridDim.x) * blockDim.x)
      r.target[i] = r.source[i];
  };
  copy(a);
  copy(b);
}

// Cold-call timing (see the header): microseconds of body(i, stream) following an L2 eviction and the activations'
// refresh, the mean over kColdIterations calls in one graph replayed kColdReplays times, less the same graph without
// the calls.
class ColdTimer {
 public:
  ColdTimer(size_t l2_bytes, int multiprocessors, cudaStream_t stream)
      : flush_(2 * l2_bytes, "L2 eviction buffer"), sink_(16, "eviction sink"), blocks_(4 * multiprocessors),
        multiprocessors_(multiprocessors), stream_(stream) {
    flush_.fill_bytes(0x5A);
  }

  // Activations the timed calls read: rewritten from `pristine` before every call (at most two).
  void refresh(const DeviceBuffer& pristine, DeviceBuffer& live) {
    check(refreshes_ < 2 && pristine.bytes() == live.bytes() && live.bytes() % 16 == 0,
          "bench_cuda_linear: ColdTimer refreshes two buffers of equal 16-byte multiple sizes");
    Refresh& slot = refreshes_ == 0 ? a_ : b_;
    slot.source = pristine.as<uint4>();
    slot.target = live.as<uint4>();
    slot.count = live.bytes() / 16;
    ++refreshes_;
  }

  // One call of body(stream) after the same eviction and refresh, outside a graph (traced launches).
  template <class Body>
  void once(Body&& body) {
    launch_l2_read_sweep(flush_.data(), flush_.bytes(), sink_.as<uint4>(), multiprocessors_, stream_);
    refresh_kernel<<<blocks_, 256, 0, stream_>>>(a_, b_);
    DSV4_CUDA_CHECK_LAUNCH("refresh_kernel");
    body(stream_);
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  template <class Body>
  double us(Body&& body) {
    body(0, stream_);  // outside the graph: first-launch attributes
    const double with_calls = replay_us([&](int i) { body(i, stream_); });
    const double without = replay_us([](int) {});
    return (with_calls - without) / kColdIterations;
  }

 private:
  static constexpr int kColdIterations = 40;
  static constexpr int kColdReplays = 3;

  template <class Call>
  double replay_us(Call&& call) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < kColdIterations; ++i) {
      launch_l2_read_sweep(flush_.data(), flush_.bytes(), sink_.as<uint4>(), multiprocessors_, stream_);
      refresh_kernel<<<blocks_, 256, 0, stream_>>>(a_, b_);
      DSV4_CUDA_CHECK_LAUNCH("refresh_kernel");
      call(i);
    }
    DSV4_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    const float ms = stream_elapsed_ms(stream_, [&] {
      for (int r = 0; r < kColdReplays; ++r) DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    });
    DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
    DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
    return 1e3 * double(ms) / kColdReplays;
  }

  DeviceBuffer flush_, sink_;
  int blocks_;           // refresh_kernel's grid
  int multiprocessors_;  // launch_l2_read_sweep's
  cudaStream_t stream_;
  Refresh a_ = {}, b_ = {};
  int refreshes_ = 0;
};

// --trace: runs launch(trace) (a traced cold call of `config`) twice and prints the second's timeline: per
// LinearTraceSlot point, over the warps that reached it, the minimum / median / maximum time since the first warp's
// start, in µs.
template <class Launch>
void print_trace(const Shape& shape, int tokens, const QuantizedLinearConfig& config, const char* setting,
                 Launch&& launch) {
  const size_t warps = size_t(config.row_blocks) * size_t(config.k_splits) * 4;
  DeviceBuffer trace(warps * kLinearTraceSlots * sizeof(uint64_t), "trace");
  std::vector<uint64_t> host(warps * kLinearTraceSlots);
  for (int run = 0; run < 2; ++run) {
    trace.fill_bytes(0);
    launch(trace.as<uint64_t>());
  }
  trace.download(host.data(), trace.bytes());
  uint64_t t0 = UINT64_MAX;
  std::vector<int> ctas_on_sm(1024, 0);
  for (size_t w = 0; w < warps; ++w) {
    t0 = std::min(t0, host[w * kLinearTraceSlots + TRACE_START]);
    if (w % 4 == 0) ++ctas_on_sm[std::min<size_t>(host[w * kLinearTraceSlots + TRACE_SM], 1023)];
  }
  std::printf("trace %s %s T=%d %s: %lld x %d CTAs, %d slots, split_k %lld, %s; most CTAs on one SM %d\n",
              shape.model, shape.name, tokens, setting, (long long)config.row_blocks, config.k_splits,
              config.ring_slots,
              (long long)config.split_k, config.reduce == SplitKReduce::CLUSTER ? "cluster" : "workspace",
              *std::max_element(ctas_on_sm.begin(), ctas_on_sm.end()));
  std::printf("| point | warps | min µs | median µs | max µs |\n|---|---|---|---|---|\n");
  for (int slot = TRACE_START; slot < kLinearTraceSlots; ++slot) {
    std::vector<double> times;
    for (size_t w = 0; w < warps; ++w)
      if (const uint64_t t = host[w * kLinearTraceSlots + size_t(slot)]; t != 0) times.push_back(1e-3 * double(t - t0));
    if (times.empty()) continue;
    std::sort(times.begin(), times.end());
    std::string name = slot == TRACE_START          ? "start"
                       : slot == TRACE_ISSUED       ? "first copies issued"
                       : slot == TRACE_PRIOR_DONE   ? "previous kernel done"
                       : slot == TRACE_X_STAGED     ? "x staged"
                       : slot == TRACE_MULTIPLIED   ? "all stages multiplied"
                       : slot == TRACE_END          ? "output written"
                       : (slot - TRACE_STAGE_READY) % 2 == 0
                           ? "stage " + std::to_string((slot - TRACE_STAGE_READY) / 2) + " arrived"
                           : "stage " + std::to_string((slot - TRACE_STAGE_READY) / 2) + " multiplied";
    std::printf("| %s | %zu | %.2f | %.2f | %.2f |\n", name.c_str(), times.size(), times.front(),
                times[times.size() / 2], times.back());
  }
}

// splitmix64: fast enough to fill gigabytes of random weights on the host.
struct FastRandom {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

// Random stored bytes with valid codes: no e4m3 NaN in fp8 data or NVFP4 scales, scales near realistic weights
// (MXFP4 codes 116..123, within the tensor-core range), bf16 weights of magnitude ~2^-6.
OwnedQuantizedMatrix random_matrix(WeightFormat format, int64_t rows, int64_t cols, FastRandom& rng) {
  const ScaleType scale_type = format == WeightFormat::NVFP4  ? ScaleType::E4M3
                               : format == WeightFormat::BF16 ? ScaleType::NONE
                                                              : ScaleType::E8M0;
  OwnedQuantizedMatrix m = allocate_quantized_matrix(format, rows, cols, scale_type, 0.01f);
  std::vector<uint8_t>& data = m.storage->data;
  for (size_t i = 0; i < data.size(); i += 8) {
    const uint64_t bits = rng.next();
    std::memcpy(data.data() + i, &bits, std::min<size_t>(8, data.size() - i));
  }
  if (format == WeightFormat::FP8_BLOCK128)
    for (uint8_t& b : data)
      if ((b & 0x7F) == 0x7F) b ^= 1;
  if (format == WeightFormat::BF16) {
    auto* values = reinterpret_cast<uint16_t*>(data.data());
    for (size_t i = 0; i < data.size() / 2; ++i) values[i] = uint16_t((values[i] & 0x807F) | 0x3C00);
  }
  for (uint8_t& s : m.storage->scales)
    s = format == WeightFormat::NVFP4 ? uint8_t(0x30 + rng.next() % 16) : uint8_t(116 + rng.next() % 8);
  return m;
}

const char* load_path_name(WeightLoadPath path) {
  return path == WeightLoadPath::ALIGNED    ? "aligned"
         : path == WeightLoadPath::GENERIC  ? "generic"
         : path == WeightLoadPath::STREAMED ? "streamed"
                                            : "auto";
}

int copies_beyond_l2(size_t bytes, size_t l2_bytes) {
  return int(std::max<size_t>(2, (3 * l2_bytes + bytes - 1) / bytes));
}

// One case: the default config stream-launched (us, gbps, percent_of_copy, against cuBLAS's stream-launched time)
// and, cold unless named otherwise, the default and its alternatives.
struct Row {
  std::string model, shape, format;
  int64_t rows, cols;
  int groups, tokens, k_splits;
  std::string load_path;
  double us, gbps, percent_of_copy, cublas_us, speedup;
  int ring_slots = 0;                 // the default config's (STREAMED)
  double cold_us = 0;                 // the default config, cold: what a model step sees
  double cold_percent_of_copy = 0;
  double graph_us = 0;                // the default config replayed back to back in a CUDA graph (warm)
  double aligned_us = 0;              // the ALIGNED path (register loads)
  double streamed_us[5] = {0, 0, 0, 0, 0};  // the STREAMED path by ring slots (1..4); 0: not applicable
  double read_floor_us = 0;                 // read_floor_kernel over the weight's data bytes
  double read_floor_percent_of_copy = 0;
  double cluster_us = 0;              // the streamed default with the cluster split-K reduction; 0: not applicable
  double gemm_us = 0;                 // run_quantized_gemm for the same call
  int gemm_k_splits = 0;
  double prologue_cold_us = 0;        // the default config with the RMSNorm prologue; 0: not timed
  double norm_then_linear_cold_us = 0;  // run_rms_norm (bf16 out) then the default config
};

// --sweep: one STREAMED config, cold.
struct SweepRow {
  std::string model, shape, format;
  int tokens, ring_slots, k_splits;
  std::string reduce;
  int64_t ctas;
  int ctas_per_sm;
  double us, percent_of_copy;
};

// cuBLAS bf16 y = x · Wᵀ (per group for the grouped projection); column-major view: Y[N, T] = W[K, N]ᵀ · X[K, T].
void cublas_linear(cublasHandle_t handle, const Shape& s, const void* w, const void* x, float* y, int tokens) {
  const float alpha = 1.0f, beta = 0.0f;
  const int64_t rows_per_group = s.rows / s.groups;
  if (s.groups == 1) {
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(s.rows), tokens, int(s.cols), &alpha, w,
                                    CUDA_R_16BF, int(s.cols), x, CUDA_R_16BF, int(s.cols), &beta, y, CUDA_R_32F,
                                    int(s.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else {
    BENCH_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, CUBLAS_OP_T, CUBLAS_OP_N, int(rows_per_group), tokens, int(s.cols), &alpha, w, CUDA_R_16BF,
        int(s.cols), rows_per_group * s.cols, x, CUDA_R_16BF, int(s.groups * s.cols), s.cols, &beta, y, CUDA_R_32F,
        int(s.rows), rows_per_group, s.groups, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path = "bench_cuda_linear.json", model_filter, shape_filter, format_filter;
  bool quick = false, sweep = false, profile = false, trace = false;
  std::vector<int> tokens_option;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--sweep") {
      sweep = true;
    } else if (arg == "--trace") {
      trace = true;
    } else if (arg == "--profile") {
      profile = true;
    } else if (arg == "--model" && i + 1 < argc) {
      model_filter = argv[++i];
    } else if (arg == "--formats" && i + 1 < argc) {
      format_filter = "," + std::string(argv[++i]) + ",";
    } else if (arg == "--shapes" && i + 1 < argc) {
      shape_filter = "," + std::string(argv[++i]) + ",";
    } else if (arg == "--tokens" && i + 1 < argc) {
      for (const char* p = argv[++i]; *p != 0;) {
        char* end = nullptr;
        const long t = std::strtol(p, &end, 10);
        if (end == p || t < 1 || t > kLinearMaxTokens) {
          std::fprintf(stderr, "bench_cuda_linear: --tokens takes 1..%d, comma separated\n", kLinearMaxTokens);
          return 2;
        }
        tokens_option.push_back(int(t));
        p = *end == ',' ? end + 1 : end;
      }
    } else {
      std::fprintf(stderr, "usage: bench_cuda_linear [--json PATH] [--quick] [--model flash|pro] [--tokens 1,8] "
                           "[--shapes wq_b,wo_a] [--formats fp8_block128,nvfp4] [--sweep] [--profile] [--trace]\n");
      return 2;
    }
  }
  try {
    const std::vector<DeviceInfo> devices = list_devices();
    if (devices.empty()) {
      std::fprintf(stderr, "bench_cuda_linear: no CUDA device\n");
      return 1;
    }
    const DeviceInfo& device = devices.front();
    const double copy_gbps = copy_bandwidth_gbps();
    std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, copy_gbps);

    cublasHandle_t cublas;
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
    cudaStream_t graph_stream;
    DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&graph_stream, cudaStreamNonBlocking));
    FastRandom rng{42};
    const std::vector<Shape> all_shapes = {
        {"flash", "wq_a", 1024, 4096, 1},     {"flash", "wq_b", 32768, 1024, 1},     {"flash", "wkv", 512, 4096, 1},
        {"flash", "wo_a", 8192, 4096, 8},     {"flash", "wo_b", 4096, 8192, 1},
        {"flash", "expert_w1", 2048, 4096, 1}, {"flash", "expert_w2", 4096, 2048, 1},
        // The engine's stacked and small projections: [wq_a; wkv], the CSA / HCA compressors' stack, the
        // indexer's wq_b and weights_proj, and a CSA layer's [wq_b; indexer wq_b].
        {"flash", "wq_a_wkv", 1536, 4096, 1}, {"flash", "wq_b_indexer", 40960, 1024, 1},
        {"flash", "compressors_csa", 2560, 4096, 1},
        // The CSA stack as the model runs it by default (stack_indexer_projections: weights_proj's 64 rows under it).
        {"flash", "compressors_csa_wp", 2624, 4096, 1},
        {"flash", "compressors_hca", 1024, 4096, 1}, {"flash", "indexer_wq_b", 8192, 1024, 1},
        {"flash", "weights_proj", 64, 4096, 1}, {"pro", "wq_a", 1536, 7168, 1},       {"pro", "wq_b", 65536, 1536, 1},
        {"pro", "wkv", 512, 7168, 1},         {"pro", "wo_a", 16384, 4096, 16},      {"pro", "wo_b", 7168, 16384, 1},
        {"pro", "expert_w1", 3072, 7168, 1},  {"pro", "expert_w2", 7168, 3072, 1}};
    std::vector<Shape> shapes;
    for (const Shape& shape : all_shapes)
      if ((model_filter.empty() || model_filter == shape.model) &&
          (shape_filter.empty() || shape_filter.find("," + std::string(shape.name) + ",") != std::string::npos))
        shapes.push_back(shape);
    check(!shapes.empty(), "bench_cuda_linear: no shapes of model '", model_filter, "' (flash or pro) among '",
          shape_filter, "'");
    std::vector<WeightFormat> formats;
    for (const WeightFormat format :
         {WeightFormat::BF16, WeightFormat::FP8_BLOCK128, WeightFormat::MXFP4, WeightFormat::NVFP4})
      if (format_filter.empty() || format_filter.find("," + std::string(to_string(format)) + ",") != std::string::npos)
        formats.push_back(format);
    check(!formats.empty(), "bench_cuda_linear: no format among '", format_filter,
          "' (bf16, fp8_block128, mxfp4, nvfp4)");
    const std::vector<int> token_counts = !tokens_option.empty() ? tokens_option
                                          : quick                  ? std::vector<int>{1, 16}
                                                                   : std::vector<int>{1, 4, 8, 16, 32, 64};
    constexpr int kIterations = 100;
    std::vector<Row> table;
    std::vector<SweepRow> sweep_rows;

    for (const Shape& shape : shapes) {
      const int64_t x_cols = shape.groups * shape.cols;
      const size_t bf16_bytes = size_t(shape.rows * shape.cols) * 2;
      DeviceBuffer x(size_t(64 * x_cols) * 2, "x bf16"), y(size_t(64 * shape.rows) * 4, "y");
      // The RMSNorm prologue's fp32 input rows and norm weight, and run_rms_norm's bf16 output.
      DeviceBuffer norm_x(size_t(64 * x_cols) * 4, "x fp32"), norm_weight(size_t(x_cols) * 4, "norm weight");
      DeviceBuffer normed(size_t(64 * x_cols) * 2, "x normed bf16");
      // Pristine copies the cold timer rewrites the activations from before every call.
      DeviceBuffer x_pristine(x.bytes(), "x bf16 pristine"), norm_x_pristine(norm_x.bytes(), "x fp32 pristine");
      {
        std::vector<uint16_t> x_host(size_t(64 * x_cols));
        for (uint16_t& v : x_host) v = float_to_bf16(float(int(rng.next() % 2001) - 1000) / 500.0f);
        x.upload(x_host.data(), x_host.size() * 2);
        x_pristine.upload(x_host.data(), x_host.size() * 2);
        std::vector<float> x_fp32(x_host.size()), weight_host(static_cast<size_t>(x_cols));
        for (size_t i = 0; i < x_fp32.size(); ++i) x_fp32[i] = bf16_to_float(x_host[i]) * 3.0f;
        for (float& v : weight_host) v = 1.0f + float(int(rng.next() % 201) - 100) / 400.0f;
        norm_x.upload(x_fp32.data(), x_fp32.size() * 4);
        norm_x_pristine.upload(x_fp32.data(), x_fp32.size() * 4);
        norm_weight.upload(weight_host.data(), weight_host.size() * 4);
      }
      ColdTimer cold(device.l2_bytes, device.multiprocessors, graph_stream);
      cold.refresh(x_pristine, x);
      cold.refresh(norm_x_pristine, norm_x);
      // Same-run cuBLAS bf16 reference, once per shape and T (stream-launched).
      std::vector<double> cublas_us(65, 0.0);
      if (!sweep && !profile && !trace) {
        const OwnedQuantizedMatrix bf16_host = random_matrix(WeightFormat::BF16, shape.rows, shape.cols, rng);
        const int copies = copies_beyond_l2(bf16_bytes, device.l2_bytes);
        std::vector<DeviceMatrix> weights;
        for (int c = 0; c < copies; ++c) weights.emplace_back(bf16_host.matrix, "cuBLAS bf16 weight copy");
        for (const int tokens : token_counts)
          cublas_us[size_t(tokens)] = 1e3 * time_ms(kIterations, [&](int i) {
                                        cublas_linear(cublas, shape, weights[size_t(i % copies)].view().data,
                                                      x.data(), y.as<float>(), tokens);
                                      });
      }

      for (const WeightFormat format : formats) {
        const OwnedQuantizedMatrix host = random_matrix(format, shape.rows, shape.cols, rng);
        const size_t stored = host.matrix.stored_bytes();
        const int copies = copies_beyond_l2(stored, device.l2_bytes);
        std::vector<DeviceMatrix> weights;
        for (int c = 0; c < copies; ++c) weights.emplace_back(host.matrix, std::string(shape.name) + " copy");
        const auto weight_view = [&](int i) { return weights[size_t(i % copies)].view(); };
        const size_t data_bytes = size_t(shape.rows) * weights[0].view().data_row_bytes;
        double read_floor_us = 0;
        if (!sweep && !profile && !trace) {
          DeviceBuffer sink(16, "read floor sink");
          read_floor_us = cold.us([&](int i, cudaStream_t s) {
            read_floor_kernel<<<unsigned(4 * device.multiprocessors), 256, 0, s>>>(
                reinterpret_cast<const uint4*>(weight_view(i).data), data_bytes / 16,
                sink.as<uint4>());
            DSV4_CUDA_CHECK_LAUNCH("read_floor_kernel");
          });
        }
        for (const int tokens : token_counts) {
          // The call y = weight · x at this shape and T, with `workspace`, on stream `s`.
          const auto linear_params = [&](const DeviceMatrixView& weight, DeviceBuffer& workspace, cudaStream_t s) {
            return QuantizedLinearParams{.weight = weight,
                                         .x = x.as<__nv_bfloat16>(),
                                         .x_row_stride = x_cols,
                                         .y = y.as<float>(),
                                         .y_row_stride = shape.rows,
                                         .tokens = tokens,
                                         .groups = shape.groups,
                                         .workspace = workspace.data(),
                                         .workspace_bytes = workspace.bytes(),
                                         .stream = s};
          };
          enum class Timing { COLD, GRAPH, STREAM };
          // Cold (the main times), replayed back to back in a graph, or stream-launched (host launch cost included
          // where it exceeds the kernel's).
          const auto time_config = [&](const QuantizedLinearConfig& config, Timing timing) {
            DeviceBuffer workspace(config.workspace_bytes, "linear workspace");
            workspace.fill_bytes(0);
            const auto launch = [&](int i, cudaStream_t s) {
              run_quantized_linear(linear_params(weight_view(i), workspace, s), config);
            };
            if (timing == Timing::COLD) return cold.us(launch);
            return 1e3 * (timing == Timing::GRAPH ? time_graph_ms(kIterations, graph_stream, launch)
                                                  : time_ms(kIterations, [&](int i) { launch(i, nullptr); }));
          };
          const QuantizedLinearConfig config =
              choose_quantized_linear_config(weights[0].view(), tokens, shape.groups, device.multiprocessors);
          const bool streamed_applies = streamed_load_path_applies(weights[0].view(), tokens, shape.groups);
          // The STREAMED config at `slots` ring slots (0: the default), or none where the rings do not fit one CTA's
          // shared memory; any other refusal is an error of the benchmark and propagates.
          const auto streamed_config = [&](int slots, SplitKReduce reduce, int k_splits) {
            if (slots > 0 && !streamed_rings_fit(weights[0].view(), tokens, slots))
              return std::optional<QuantizedLinearConfig>();
            return std::optional(choose_quantized_linear_config(weights[0].view(), tokens, shape.groups,
                                                                device.multiprocessors, WeightLoadPath::STREAMED,
                                                                slots, reduce, k_splits));
          };

          if (trace) {
            if (config.load_path == WeightLoadPath::STREAMED &&
                (format == WeightFormat::FP8_BLOCK128 || format == WeightFormat::BF16) && config.token_tiles == 1)
              for (const bool behind : {false, true})
                print_trace(shape, tokens, config, behind ? "behind a 5 µs kernel" : "alone",
                            [&](uint64_t* trace_buffer) {
                              DeviceBuffer workspace(std::max<size_t>(config.workspace_bytes, 16),
                                                     "linear workspace");
                              workspace.fill_bytes(0);
                              QuantizedLinearParams p = linear_params(weight_view(0), workspace, nullptr);
                              p.trace = trace_buffer;
                              cold.once([&](cudaStream_t stream) {
                                if (behind) {
                                  spin_then_exit_kernel<<<1, 32, 0, stream>>>(5000);
                                  DSV4_CUDA_CHECK_LAUNCH("spin_then_exit_kernel");
                                }
                                p.stream = stream;
                                run_quantized_linear(p, config);
                              });
                            });
            continue;
          }

          if (profile) {
            // One launch each (in this order) of the default config and the STREAMED one at 1-4 slots.
            std::printf("profile %s %s %s T=%d: default (%s, %d slots, %d splits, %s)", shape.model, shape.name,
                        to_string(format).data(), tokens, load_path_name(config.load_path), config.ring_slots,
                        config.k_splits, config.reduce == SplitKReduce::CLUSTER ? "cluster" : "workspace");
            size_t workspace_bytes = quantized_linear_workspace_bytes(weights[0].view(), tokens, shape.groups);
            for (int slots = 1; slots <= 4 && streamed_applies; ++slots)
              if (const auto c = streamed_config(slots, SplitKReduce::WORKSPACE, 0))
                workspace_bytes = std::max(workspace_bytes, c->workspace_bytes);
            DeviceBuffer workspace(std::max<size_t>(workspace_bytes, 16), "linear workspace");
            workspace.fill_bytes(0);
            const auto launch_once = [&](const QuantizedLinearConfig& c) {
              run_quantized_linear(linear_params(weights[0].view(), workspace, nullptr), c);
            };
            launch_once(config);
            for (int slots = 1; slots <= 4 && streamed_applies; ++slots)
              if (const auto c = streamed_config(slots, SplitKReduce::WORKSPACE, 0)) {
                launch_once(*c);
                std::printf(", then %d slots (%d splits, %d CTAs/SM)", slots, c->k_splits, c->ctas_per_sm);
              }
            std::printf("\n");
            DSV4_CUDA_CHECK(cudaDeviceSynchronize());
            continue;
          }

          if (sweep) {
            if (!streamed_applies) continue;
            // The default, then every distinct STREAMED config by ring slots × asked K splits × reduction, cold.
            const double default_us = time_config(config, Timing::COLD);
            sweep_rows.push_back({shape.model, shape.name, std::string(to_string(format)), tokens, config.ring_slots,
                                  config.k_splits,
                                  config.reduce == SplitKReduce::CLUSTER ? "default, cluster" : "default, workspace",
                                  config.row_blocks * config.k_splits, config.ctas_per_sm, default_us,
                                  100.0 * double(stored) / (default_us * 1e3) / copy_gbps});
            std::vector<QuantizedLinearConfig> seen;
            for (int slots = 1; slots <= 4; ++slots)
              for (const SplitKReduce reduce : {SplitKReduce::WORKSPACE, SplitKReduce::CLUSTER})
                for (const int k_splits : {0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32}) {
                  const auto c = streamed_config(slots, reduce, k_splits);
                  if (!c || (c->k_splits == 1 && reduce == SplitKReduce::CLUSTER) ||
                      std::any_of(seen.begin(), seen.end(), [&](const QuantizedLinearConfig& o) {
                        return o.ring_slots == c->ring_slots && o.k_splits == c->k_splits && o.reduce == c->reduce;
                      }))
                    continue;
                  seen.push_back(*c);
                  const double us = time_config(*c, Timing::COLD);
                  sweep_rows.push_back({shape.model, shape.name, std::string(to_string(format)), tokens,
                                        c->ring_slots, c->k_splits,
                                        c->reduce == SplitKReduce::CLUSTER ? "cluster" : "workspace",
                                        c->row_blocks * c->k_splits, c->ctas_per_sm, us,
                                        100.0 * double(stored) / (us * 1e3) / copy_gbps});
                }
            continue;
          }

          const double ms = time_config(config, Timing::STREAM) * 1e-3;
          Row row{shape.model, shape.name, std::string(to_string(format)), shape.rows, shape.cols, shape.groups,
                  tokens, config.k_splits, load_path_name(config.load_path), ms * 1e3, double(stored) / (ms * 1e6),
                  0.0, cublas_us[size_t(tokens)], cublas_us[size_t(tokens)] / (ms * 1e3)};
          row.percent_of_copy = 100.0 * row.gbps / copy_gbps;
          row.ring_slots = config.ring_slots;
          row.cold_us = time_config(config, Timing::COLD);
          row.cold_percent_of_copy = 100.0 * double(stored) / (row.cold_us * 1e3) / copy_gbps;
          row.graph_us = time_config(config, Timing::GRAPH);
          if (shape.groups == 1 && shape.cols <= kRmsNormMaxWidth) {
            DeviceBuffer workspace(config.workspace_bytes, "linear workspace");
            workspace.fill_bytes(0);
            const auto linear_of = [&](int i, cudaStream_t s, bool prologue) {
              QuantizedLinearParams p = linear_params(weights[size_t(i % copies)].view(), workspace, s);
              p.x = prologue ? nullptr : normed.as<__nv_bfloat16>();
              if (prologue) {
                p.norm_x = norm_x.as<float>(), p.norm_weight = norm_weight.as<float>(), p.norm_eps = 1e-6f;
              }
              run_quantized_linear(p, config);
            };
            row.prologue_cold_us = cold.us([&](int i, cudaStream_t s) { linear_of(i, s, true); });
            row.norm_then_linear_cold_us = cold.us([&](int i, cudaStream_t s) {
              RmsNormParams norm;
              norm.x = norm_x.as<float>(), norm.weight = norm_weight.as<float>();
              norm.rows = tokens, norm.width = shape.cols, norm.eps = 1e-6f;
              norm.y_bf16 = normed.as<__nv_bfloat16>(), norm.stream = s;
              run_rms_norm(norm);
              linear_of(i, s, false);
            });
          }
          row.aligned_us = time_config(choose_quantized_linear_config(weights[0].view(), tokens, shape.groups,
                                                                      device.multiprocessors, WeightLoadPath::ALIGNED),
                                       Timing::COLD);
          row.read_floor_us = read_floor_us;
          row.read_floor_percent_of_copy =
              read_floor_us > 0 ? 100.0 * double(data_bytes) / (read_floor_us * 1e3) / copy_gbps : 0.0;
          if (streamed_applies) {
            for (int slots = 1; slots <= 4; ++slots)
              if (const auto c = streamed_config(slots, SplitKReduce::AUTO, 0))
                row.streamed_us[slots] = time_config(*c, Timing::COLD);
            if (const auto c = streamed_config(0, SplitKReduce::CLUSTER, 0); c && c->reduce == SplitKReduce::CLUSTER)
              row.cluster_us = time_config(*c, Timing::COLD);
          }
          {
            const QuantizedGemmConfig gemm = choose_quantized_gemm_config(weights[0].view(), tokens,
                                                                          device.multiprocessors);
            DeviceBuffer workspace(std::max<size_t>(gemm.workspace_bytes, 16), "gemm workspace");
            workspace.fill_bytes(0);
            row.gemm_k_splits = gemm.k_splits;
            row.gemm_us = cold.us([&](int i, cudaStream_t s) {
              run_quantized_gemm({.weight = weights[size_t(i % copies)].view(),
                                  .x = x.as<__nv_bfloat16>(),
                                  .x_row_stride = x_cols,
                                  .y = y.as<float>(),
                                  .y_row_stride = shape.rows,
                                  .tokens = tokens,
                                  .stream = s,
                                  .groups = shape.groups,
                                  .workspace = workspace.data(),
                                  .workspace_bytes = workspace.bytes()});
            });
          }
          table.push_back(row);
        }
      }
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));
    DSV4_CUDA_CHECK(cudaStreamDestroy(graph_stream));

    if (profile || trace) return 0;
    if (!table.empty()) {
      std::printf("| model | shape | format | N × K (G) | T | split-K | path (slots) | cold µs · %% of copy | "
                  "stream µs · %% of copy | cuBLAS bf16 stream µs | speed-up (stream) | warm graph µs | "
                  "cold: aligned µs | streamed µs (1/2/3/4 slots) | "
                  "read floor µs · %% of copy | cluster reduction µs | GEMM µs (split-K) | "
                  "norm prologue / rms_norm + linear µs |\n");
      std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    }
    for (const Row& r : table)
      std::printf("| %s | %s | %s | %lld × %lld (%d) | %d | %d | %s (%d) | %.1f · %.0f | %.1f · %.0f | %.1f | %.2f× | "
                  "%.1f | %.1f | %.1f / %.1f / %.1f / %.1f | %.1f · %.0f | %.1f | "
                  "%.1f (%d) | %.1f / %.1f |\n",
                  r.model.c_str(), r.shape.c_str(), r.format.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                  r.tokens, r.k_splits, r.load_path.c_str(), r.ring_slots, r.cold_us, r.cold_percent_of_copy, r.us,
                  r.percent_of_copy, r.cublas_us, r.speedup, r.graph_us, r.aligned_us, r.streamed_us[1],
                  r.streamed_us[2], r.streamed_us[3], r.streamed_us[4], r.read_floor_us, r.read_floor_percent_of_copy,
                  r.cluster_us,
                  r.gemm_us, r.gemm_k_splits, r.prologue_cold_us, r.norm_then_linear_cold_us);
    if (!sweep_rows.empty())
      std::printf("| model | shape | format | T | slots | K splits | reduction | CTAs (per SM) | cold µs | "
                  "%% of copy |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n");
    // Per case (its rows are consecutive, the default's first): the default, then the kSweepShown fastest configs
    // (the JSON has them all).
    constexpr size_t kSweepShown = 4;
    std::vector<SweepRow> shown;
    for (size_t begin = 0; begin < sweep_rows.size();) {
      size_t end = begin + 1;
      while (end < sweep_rows.size() && sweep_rows[end].reduce.rfind("default", 0) != 0) ++end;
      std::vector<SweepRow> fastest(sweep_rows.begin() + std::ptrdiff_t(begin) + 1,
                                    sweep_rows.begin() + std::ptrdiff_t(end));
      std::sort(fastest.begin(), fastest.end(), [](const SweepRow& a, const SweepRow& b) { return a.us < b.us; });
      shown.push_back(sweep_rows[begin]);
      fastest.resize(std::min(kSweepShown, fastest.size()));
      shown.insert(shown.end(), fastest.begin(), fastest.end());
      begin = end;
    }
    for (const SweepRow& r : shown)
      std::printf("| %s | %s | %s | %d | %d | %d | %s | %lld (%d) | %.2f | %.0f |\n", r.model.c_str(), r.shape.c_str(),
                  r.format.c_str(), r.tokens, r.ring_slots, r.k_splits, r.reduce.c_str(), (long long)r.ctas,
                  r.ctas_per_sm, r.us, r.percent_of_copy);
    FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_linear: cannot write ", json_path);
    std::fprintf(out, "{\n  \"benchmark\": \"bench_cuda_linear\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n",
                 device.name.c_str(), device.multiprocessors);
    std::fprintf(out, "  \"copy_bandwidth_gbps\": %.1f,\n  \"iterations\": %d,\n  \"results\": [\n", copy_gbps,
                 kIterations);
    for (size_t i = 0; i < table.size(); ++i) {
      const Row& r = table[i];
      std::fprintf(out,
                   "    {\"model\": \"%s\", \"shape\": \"%s\", \"format\": \"%s\", \"rows\": %lld, \"cols\": %lld, "
                   "\"groups\": %d, \"tokens\": %d, \"k_splits\": %d, \"load_path\": \"%s\", \"ring_slots\": %d, "
                   "\"cold_us\": %.2f, \"cold_percent_of_copy\": %.1f, \"stream_us\": %.2f, "
                   "\"stream_percent_of_copy\": %.1f, \"cublas_bf16_stream_us\": %.2f, \"speedup_vs_cublas\": %.3f, "
                   "\"warm_graph_us\": %.2f, \"aligned_cold_us\": %.2f, \"streamed_cold_us_by_slots\": [%.2f, %.2f, "
                   "%.2f, %.2f], "
                   "\"read_floor_cold_us\": %.2f, \"cluster_cold_us\": %.2f, \"gemm_cold_us\": %.2f, "
                   "\"gemm_k_splits\": %d, \"prologue_cold_us\": %.2f, \"norm_then_linear_cold_us\": %.2f}%s\n",
                   r.model.c_str(), r.shape.c_str(), r.format.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                   r.tokens, r.k_splits, r.load_path.c_str(), r.ring_slots, r.cold_us, r.cold_percent_of_copy, r.us,
                   r.percent_of_copy, r.cublas_us, r.speedup, r.graph_us, r.aligned_us, r.streamed_us[1],
                   r.streamed_us[2], r.streamed_us[3], r.streamed_us[4], r.read_floor_us, r.cluster_us, r.gemm_us,
                   r.gemm_k_splits,
                   r.prologue_cold_us, r.norm_then_linear_cold_us, i + 1 < table.size() ? "," : "");
    }
    std::fprintf(out, "  ],\n  \"sweep\": [\n");
    for (size_t i = 0; i < sweep_rows.size(); ++i) {
      const SweepRow& r = sweep_rows[i];
      std::fprintf(out,
                   "    {\"model\": \"%s\", \"shape\": \"%s\", \"format\": \"%s\", \"tokens\": %d, \"ring_slots\": %d, "
                   "\"k_splits\": %d, \"reduce\": \"%s\", \"ctas\": %lld, \"ctas_per_sm\": %d, \"cold_us\": %.2f, "
                   "\"percent_of_copy\": %.1f}%s\n",
                   r.model.c_str(), r.shape.c_str(), r.format.c_str(), r.tokens, r.ring_slots, r.k_splits,
                   r.reduce.c_str(), (long long)r.ctas, r.ctas_per_sm, r.us, r.percent_of_copy,
                   i + 1 < sweep_rows.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_linear: %s\n", e.what());
    return 1;
  }
  return 0;
}
