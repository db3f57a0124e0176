// mHC, RMSNorm and embedding kernels on the GPU at T ∈ {1, 8, 64, 256, 4096} for V4-Flash (d 4096) and V4-Pro
// (d 7168), n = 4: µs per launch, bytes moved (each input read once, each output written once) / time, and that as
// a share of the same-run copy bandwidth (cudaMemcpy D2D of 1 GiB, read + write counted). Same-run baseline for
// hc_pre and hc_head: cuBLAS fp32 SGEMM for the projection + one simple kernel per token for the norm, sigmoids,
// Sinkhorn and collapse (two launches, X read twice); for hc_post_pre (one fused launch up to 128 tokens, the two
// kernels above): run_hc_post then run_hc_pre (two launches, X read twice and written once). Up to 16 tokens the
// default (single-cluster decode) kernel is also timed against the persistent one, and the fused output norm (y
// normalised into bf16 in the same launch) against the persistent kernel followed by run_rms_norm, and the cluster
// decode kernel (HcKernelChoice::CLUSTER_ASYNC) beside the default, both also behind a full-card kernel (the model's
// case: a linear layer or the experts before the site); at
// every size the warp-specialised persistent hc_post_pre (HcKernelChoice::PERSISTENT_WARP_SPECIALIZED) beside the
// default; from 17 to 1024 tokens the default with its output norm (up to kAutoClusterPerTileMaxTokens: the
// single-cluster kernel, a cluster per 16-token tile, norm fused) against the persistent kernel, then run_rms_norm. Inputs rotate over enough copies to exceed three times the L2, so every launch streams from HBM like a
// layer's own weights and activations do.
// Usage: bench_cuda_mhc [--json PATH] [--tokens T,T,...] [--iterations N] [--only TEXT[|TEXT...]]
// [--model TEXT[|TEXT...]] (fewer token counts or iterations, only the rows whose kernel name contains a TEXT, only the
// models whose name contains a TEXT, a TEXT that selects nothing failing the run: for a profiler run).
// bench_cuda_mhc --trace [--iterations N]: instead, the single-cluster kernel's phase timeline at one token (V4-Flash
// hc_pre + norm and hc_post_pre + norm, alone and behind a full-card kernel): a copy of the kernel built in this file
// with its phase marks (mhc.cuh, SingleClusterPhase) recording clock64 and %globaltimer.
// bench_cuda_mhc --trace-persistent [--tokens T] [--iterations N]: instead, the persistent kernel's phases per
// iteration, its cross-CTA hops' slack and its slow paths (V4-Flash hc_pre and hc_head, default 4096 tokens; a traced
// copy with the marks of mhc.cuh's ProjectionPhase).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

// The phase marks of the traced copy of the single-cluster kernel: CTA thread 0 (the projection warps' marks) and the
// mix warp's lane 0 (its own) store the SM clock and the global timer of each mark, per CTA of the one cluster.
namespace dsv4::cuda::mhc_trace {
inline constexpr int kMaxPhases = 20;
inline constexpr int kFirstMixPhase = 14;  // SingleClusterPhase::kMixExchanged (checked below)
__device__ unsigned long long g_clock[16][kMaxPhases];
__device__ unsigned long long g_timer[16][kMaxPhases];
__device__ __forceinline__ void mark(int phase) {
  if ((threadIdx.x & 31) != 0 || (threadIdx.x != 0 && phase < kFirstMixPhase)) return;
  unsigned long long clock, timer;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clock)::"memory");
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(timer)::"memory");
  g_clock[blockIdx.x % 16][phase] = clock;
  g_timer[blockIdx.x % 16][phase] = timer;
}
}  // namespace dsv4::cuda::mhc_trace
#define DSV4_MHC_SINGLE_CLUSTER_MARK(phase) ::dsv4::cuda::mhc_trace::mark(int(phase))
#define DSV4_MHC_SINGLE_CLUSTER_MARK_AFTER(phase, value) \
  do {                                                   \
    asm volatile("" ::"f"(value));                       \
    ::dsv4::cuda::mhc_trace::mark(int(phase));           \
  } while (0)
// The persistent kernel's traced copy: per CTA and loop iteration, CTA thread 0 stores the SM clock and the global
// timer of each phase mark (the pre mark: the CTA's last thread), and every slow path taken is counted per CTA.
namespace dsv4::cuda::mhc_projection_trace {
inline constexpr int kMaxCtas = 320, kMaxIterations = 160, kPhases = 8, kSlowPaths = 3;
inline constexpr int kPreStoredPhase = 4;  // ProjectionPhase::kPreStored (checked below)
__device__ unsigned long long g_clock[kMaxCtas][kMaxIterations][kPhases];
__device__ unsigned long long g_timer[kMaxCtas][kMaxIterations][kPhases];
__device__ unsigned long long g_slow[kMaxCtas][kSlowPaths];
__device__ __forceinline__ void mark(int phase, int j) {
  const unsigned marker = phase == kPreStoredPhase ? blockDim.x - 1 : 0;
  if (threadIdx.x != marker || blockIdx.x >= kMaxCtas || j >= kMaxIterations) return;
  unsigned long long clock, timer;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(clock)::"memory");
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(timer)::"memory");
  g_clock[blockIdx.x][j][phase] = clock;
  g_timer[blockIdx.x][j][phase] = timer;
}
__device__ __forceinline__ void slow(int path) {
  if (blockIdx.x < kMaxCtas) atomicAdd(&g_slow[blockIdx.x][path], 1ull);
}
}  // namespace dsv4::cuda::mhc_projection_trace
#define DSV4_MHC_PROJECTION_MARK(phase, j) ::dsv4::cuda::mhc_projection_trace::mark(int(phase), j)
#define DSV4_MHC_PROJECTION_SLOW(path) ::dsv4::cuda::mhc_projection_trace::slow(int(path))
#define hc_single_cluster_kernel hc_single_cluster_kernel_traced  // the library's own copy stays unmarked
#define hc_projection_kernel hc_projection_kernel_traced
#include "backends/cuda/kernels/mhc.cuh"
#undef hc_projection_kernel
#undef DSV4_MHC_PROJECTION_MARK
#undef DSV4_MHC_PROJECTION_SLOW
#undef hc_single_cluster_kernel
#undef DSV4_MHC_SINGLE_CLUSTER_MARK
#undef DSV4_MHC_SINGLE_CLUSTER_MARK_AFTER

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/embedding.hpp"
#include "backends/cuda/kernels/mhc.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/stream_timing.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/quantized_matrix.hpp"

#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kN = kMhcStreams;
constexpr int kSiteRows = (2 + kN) * kN;
constexpr int kSinkhornIters = 20;
constexpr float kEps = 1e-6f;

// Milliseconds per call of `body(i)` on `stream`, averaged over `iterations` calls after a warm-up.
template <class Body>
double time_ms(cudaStream_t stream, int iterations, Body&& body) {
  for (int i = 0; i < 3; ++i) body(i);
  const float ms = stream_elapsed_ms(stream, [&] {
    for (int i = 0; i < iterations; ++i) body(i);
  });
  return double(ms) / iterations;
}

// The same with `launches` calls captured once into a CUDA graph and the graph replayed: the device time per call
// without the host's launch overhead (how the engine's decode step runs), and a check that the launch captures.
template <class Body>
double graph_time_ms(cudaStream_t stream, int launches, Body&& body) {
  for (int i = 0; i < 3; ++i) body(i);  // first-call setup (attributes, occupancy) stays outside the capture
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) body(i);
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  constexpr int kReplays = 5;
  const double ms = time_ms(stream, kReplays, [&](int) { DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
  DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
  return ms / launches;
}

// Uniform values with the given mean and standard deviation from a xorshift generator: the 4096-token sets hold
// hundreds of millions of floats, too many for std::normal_distribution in a benchmark that must stay short.
DeviceBuffer random_buffer(size_t floats, float sigma, float mean, std::mt19937& rng, const char* what) {
  uint32_t state = rng() | 1u;
  const float half_width = sigma * std::sqrt(3.0f);
  std::vector<float> host(floats);
  for (float& v : host) {
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    v = mean + half_width * (float(state >> 8) * 0x1p-23f - 1.0f);
  }
  DeviceBuffer buffer(floats * sizeof(float), what);
  buffer.upload(host.data(), floats * sizeof(float));
  return buffer;
}

// Baseline second stage of hc_pre / hc_head: one CTA per token reads mixes (from cuBLAS) and X, computes the norm,
// the sigmoids, Sinkhorn (thread 0, serially) and the collapse.
template <bool kHead>
__global__ void baseline_finish_kernel(const float* X, const float* mixes, const float* base, const float* scale,
                                       int hidden, float* y, float* post, float* comb) {
  constexpr int kRows = kHead ? kN : kSiteRows;
  __shared__ float partial[256];
  __shared__ float pre[kN];
  const int64_t t = blockIdx.x;
  const float* x = X + t * kN * hidden;
  float sum = 0;
  for (int i = threadIdx.x; i < kN * hidden; i += blockDim.x) sum += x[i] * x[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0;
    for (int i = 0; i < int(blockDim.x); ++i) total += partial[i];
    const float inv_rms = 1.0f / sqrtf(total / float(kN * hidden) + kEps);
    const float* m = mixes + t * kRows;
    for (int k = 0; k < kN; ++k) pre[k] = 1.0f / (1.0f + expf(-(m[k] * inv_rms * scale[0] + base[k]))) + kEps;
    if constexpr (!kHead) {
      for (int k = 0; k < kN; ++k)
        post[t * kN + k] = 2.0f / (1.0f + expf(-(m[kN + k] * inv_rms * scale[1] + base[kN + k])));
      float c[kN][kN];
      for (int j = 0; j < kN; ++j) {
        float row_max = -INFINITY;
        for (int k = 0; k < kN; ++k) {
          c[j][k] = m[2 * kN + j * kN + k] * inv_rms * scale[2] + base[2 * kN + j * kN + k];
          row_max = fmaxf(row_max, c[j][k]);
        }
        float s = 0;
        for (int k = 0; k < kN; ++k) s += (c[j][k] = expf(c[j][k] - row_max));
        for (int k = 0; k < kN; ++k) c[j][k] = c[j][k] / s + kEps;
      }
      for (int it = 0; it < kSinkhornIters; ++it) {
        if (it > 0)
          for (int j = 0; j < kN; ++j) {
            float s = 0;
            for (int k = 0; k < kN; ++k) s += c[j][k];
            for (int k = 0; k < kN; ++k) c[j][k] /= s + kEps;
          }
        for (int k = 0; k < kN; ++k) {
          float s = 0;
          for (int j = 0; j < kN; ++j) s += c[j][k];
          for (int j = 0; j < kN; ++j) c[j][k] /= s + kEps;
        }
      }
      for (int j = 0; j < kN; ++j)
        for (int k = 0; k < kN; ++k) comb[(t * kN + j) * kN + k] = c[j][k];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = 0;
    for (int k = 0; k < kN; ++k) v += pre[k] * x[k * hidden + i];
    y[t * hidden + i] = v;
  }
}

// The model's predecessor of an mHC site (a linear layer or the experts) in miniature: one CTA per SM holding most of
// its shared memory, streaming a buffer, chained by programmatic dependent launch. An mHC launch behind it cannot
// place its CTAs (nor start its weight loads) before these CTAs leave, as in a decode step; the bench rows "after a
// full-card kernel" time the pair, to be read against the filler's own row.
constexpr int kFillerThreads = 512;
constexpr size_t kFillerSmemBytes = 200 * 1024;

__global__ void __launch_bounds__(kFillerThreads) full_card_filler_kernel(const float4* source, float4* target,
                                                                          int64_t vectors) {
  extern __shared__ float4 filler_smem[];
  allow_dependents();
  wait_for_prior_grids();
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t v = blockIdx.x * int64_t(kFillerThreads) + threadIdx.x; v < vectors;
       v += int64_t(gridDim.x) * kFillerThreads) {
    const float4 x = source[v];
    sum = make_float4(sum.x + x.x, sum.y + x.y, sum.z + x.z, sum.w + x.w);
  }
  filler_smem[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) target[blockIdx.x] = filler_smem[kFillerThreads - 1];
}

// One rotation set: the inputs and outputs of one launch of every kernel at (T, d).
struct Set {
  DeviceBuffer X, fn, head_fn, out, y, y_bf16, post, comb, next_post, next_comb, mixes;
  DeviceBuffer ids;
};

struct Row {
  std::string kernel, model;
  int64_t hidden, tokens;
  double us, graph_us, bytes, gbps, percent_of_copy, baseline_us;
};


static_assert(int(mhc::SingleClusterPhase::kMixExchanged) == mhc_trace::kFirstMixPhase, "the mix warp's first mark");
static_assert(int(mhc::SingleClusterPhase::kCount) <= mhc_trace::kMaxPhases, "room for every mark");
static_assert(mhc::kSingleClusterCtas == 16, "one 16-CTA cluster per token tile");
static_assert(int(mhc::ProjectionPhase::kPreStored) == mhc_projection_trace::kPreStoredPhase &&
                  int(mhc::ProjectionPhase::kCount) == mhc_projection_trace::kPhases &&
                  int(mhc::ProjectionSlowPath::kCount) == mhc_projection_trace::kSlowPaths,
              "the persistent trace's phases and slow paths");

// --trace-persistent: V4-Flash hc_pre and hc_head at `tokens` tokens on the traced persistent kernel (the slices the
// launcher takes: 64 dims, hc_pre 128 from kWideSliceMinTiles tiles), `runs` launches each. Per CTA and iteration of
// the steady state (every phase present): the SM cycles of each phase, the iteration's period; per tile: the slack of
// each cross-CTA hop (from the last slice's store to the first reader's early read, global timer; negative: a reader
// read before the last store) and the spread of the slices' publications; per launch: the span and each CTA's start
// and tail, the slow paths taken.
void run_projection_trace(cudaStream_t stream, int runs, int64_t tokens, std::mt19937& rng) {
  namespace tr = mhc_projection_trace;
  constexpr int64_t d = 4096, flat = kN * d;
  const int multiprocessors = list_devices().front().multiprocessors;
  const DeviceBuffer X = random_buffer(size_t(tokens * flat), 1.0f, 0.0f, rng, "X");
  const DeviceBuffer fn = random_buffer(size_t(kSiteRows * flat), 2.0f / std::sqrt(float(flat)), 0.0f, rng, "fn");
  const DeviceBuffer base = random_buffer(kSiteRows, 0.5f, 0.0f, rng, "base");
  const std::vector<float> scale_host = {0.8f, 1.1f, 1.5f};
  DeviceBuffer scale(3 * sizeof(float), "scale");
  scale.upload(scale_host.data(), 3 * sizeof(float));
  DeviceBuffer y(size_t(tokens * d) * 4, "y"), post(size_t(tokens * kN) * 4, "post"),
      comb(size_t(tokens * kN * kN) * 4, "comb");
  const size_t workspace_bytes = hc_projection_workspace_bytes(tokens, d, multiprocessors);
  DeviceBuffer workspace(workspace_bytes, "mhc workspace");
  workspace.fill_bytes(0);
  const char* const names[tr::kPhases] = {"top",        "tile landed", "projected", "published",
                                          "pre stored", "pre ready",   "collapsed", "summed"};
  const auto trace = [&](auto head_constant, auto slice_dims_constant, const HcProjectionConfig& config) {
    constexpr bool head = decltype(head_constant)::value;
    constexpr int slice_dims = decltype(slice_dims_constant)::value;
    // The launch as the library sizes it: the instance's shape and lags, its grid from size_projection_grid.
    using Shape = mhc::ProjectionShape<head, false, slice_dims>;
    const auto kernel = mhc::hc_projection_kernel_traced<head, false, slice_dims>;
    const int threads = Shape::kThreads, smem = Shape::kSmemBytes;
    const int collapse_lag = Shape::kCollapseLag, sum_lag = Shape::kSumLag;
    mhc::ProjectionArgs args{};
    args.X = X.as<float>();
    args.fn = fn.as<float>();
    args.base = base.as<float>();
    args.scale = scale.as<float>();
    args.tokens = tokens;
    args.hidden = int(d);
    args.sinkhorn_iters = kSinkhornIters;
    args.hc_eps = kEps;
    args.norm_eps = kEps;
    args.y = y.as<float>();
    args.post = head ? nullptr : post.as<float>();
    args.comb = head ? nullptr : comb.as<float>();
    mhc::place_projection_launch(args, workspace.data(), int(config.slices), int(config.token_tiles), "traced");
    mhc::size_projection_grid(args, reinterpret_cast<const void*>(kernel), threads, size_t(smem), multiprocessors,
                              "traced persistent kernel");
    const int slices = args.slices, tiles = args.tiles;
    const int ctas = args.groups * slices;
    const int most_iterations = (tiles + args.groups - 1) / args.groups + collapse_lag;
    check(ctas <= tr::kMaxCtas && most_iterations < tr::kMaxIterations, "--trace-persistent: ", ctas, " CTAs × ",
          most_iterations, " iterations (and the start/end slot) exceed the trace's arrays");
    std::vector<std::vector<double>> phase_cycles(tr::kPhases + 1);  // [kPhases]: the period
    std::vector<double> sum_slack, collapse_slack, spread, launch_span, cta_start, cta_tail;
    double slow_total[tr::kSlowPaths] = {};
    std::vector<unsigned long long> clock(size_t(tr::kMaxCtas) * tr::kMaxIterations * tr::kPhases),
        timer(clock.size()), slow(size_t(tr::kMaxCtas) * tr::kSlowPaths);
    const auto at = [](int cta, int j, int p) { return (size_t(cta) * tr::kMaxIterations + j) * tr::kPhases + p; };
    for (int run = -2; run < runs; ++run) {  // 2 warm-up launches
      void* slow_counts = nullptr;
      DSV4_CUDA_CHECK(cudaGetSymbolAddress(&slow_counts, tr::g_slow));
      DSV4_CUDA_CHECK(cudaMemsetAsync(slow_counts, 0, slow.size() * 8, stream));
      launch_chained(kernel, dim3(unsigned(ctas)), dim3(unsigned(threads)), size_t(smem), stream, args,
                     "traced persistent kernel");
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
      DSV4_CUDA_CHECK(cudaMemcpyFromSymbol(clock.data(), tr::g_clock, clock.size() * 8));
      DSV4_CUDA_CHECK(cudaMemcpyFromSymbol(timer.data(), tr::g_timer, timer.size() * 8));
      DSV4_CUDA_CHECK(cudaMemcpyFromSymbol(slow.data(), tr::g_slow, slow.size() * 8));
      if (run < 0) continue;
      for (int c = 0; c < ctas; ++c)
        for (int k = 0; k < tr::kSlowPaths; ++k) slow_total[k] += double(slow[size_t(c) * tr::kSlowPaths + k]);
      unsigned long long first_start = ~0ull, last_end = 0;
      for (int g = 0; g < args.groups; ++g) {
        const int count = (tiles - g + args.groups - 1) / args.groups;
        for (int s = 0; s < slices; ++s) {
          const int c = g * slices + s;
          // The start/end slot past the last iteration; the start to the first iteration's top, the last iteration's
          // slice sums to the end (hc_pre: post and comb of the CTA's tiles).
          const int last = count + collapse_lag;
          const unsigned long long start = timer[at(c, last, int(mhc::kCtaStartMark))];
          const unsigned long long end = timer[at(c, last, int(mhc::kCtaEndMark))];
          first_start = std::min(first_start, start);
          last_end = std::max(last_end, end);
          cta_start.push_back(double(int64_t(timer[at(c, 0, 0)] - start)));
          cta_tail.push_back(double(int64_t(end - timer[at(c, last - 1, int(mhc::ProjectionPhase::kSummed))])));
          for (int j = collapse_lag; j + 1 < count; ++j) {
            static constexpr int kOrder[] = {0, 1, 2, 3, 5, 6, 7};  // thread 0's marks in program order
            for (int q = 1; q < 7; ++q)
              phase_cycles[size_t(kOrder[q])].push_back(
                  double(int64_t(clock[at(c, j, kOrder[q])] - clock[at(c, j, kOrder[q - 1])])));
            phase_cycles[4].push_back(double(int64_t(clock[at(c, j, 4)] - clock[at(c, j, 0)])));
            phase_cycles[tr::kPhases].push_back(double(int64_t(clock[at(c, j + 1, 0)] - clock[at(c, j, 0)])));
          }
        }
        // Tile j of group g: published in iteration j, its slices summed in j + sum_lag (words read at the top), the
        // sums read for its collapse at the top of j + collapse_lag.
        for (int j = 0; j < count; ++j) {
          unsigned long long last_published = 0, first_published = ~0ull, last_summed = 0, first_sum_read = ~0ull,
                             first_pre_read = ~0ull;
          for (int s = 0; s < slices; ++s) {
            const int c = g * slices + s;
            last_published = std::max(last_published, timer[at(c, j, 3)]);
            first_published = std::min(first_published, timer[at(c, j, 3)]);
            last_summed = std::max(last_summed, timer[at(c, j + sum_lag, 7)]);
            first_sum_read = std::min(first_sum_read, timer[at(c, j + sum_lag, 0)]);
            first_pre_read = std::min(first_pre_read, timer[at(c, j + collapse_lag, 0)]);
          }
          sum_slack.push_back(double(int64_t(first_sum_read - last_published)));
          collapse_slack.push_back(double(int64_t(first_pre_read - last_summed)));
          spread.push_back(double(last_published - first_published));
        }
      }
      launch_span.push_back(double(last_end - first_start));
    }
    const auto quantile = [](std::vector<double> v, double q) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[size_t(q * double(v.size() - 1))];
    };
    const auto negative = [](const std::vector<double>& v) {
      if (v.empty()) return 0.0;
      return 100.0 * double(std::count_if(v.begin(), v.end(), [](double x) { return x < 0; })) / double(v.size());
    };
    std::printf("trace: V4-Flash %s T=%lld (persistent kernel, %d slices of %d dims × %d groups, %d tiles, lags %d "
                "/ %d), %d launches\n",
                head ? "hc_head" : "hc_pre", (long long)tokens, slices, slice_dims, args.groups, tiles, sum_lag,
                collapse_lag, runs);
    std::printf("| phase (CTA thread 0, steady state) | cycles p10 | median | p90 |\n|---|---|---|---|\n");
    for (int p = 1; p <= tr::kPhases; ++p)
      std::printf("| %s%s | %.0f | %.0f | %.0f |\n", p == tr::kPhases ? "iteration period" : names[p],
                  p == tr::kPreStoredPhase ? " (last thread, after top)" : "", quantile(phase_cycles[size_t(p)], 0.1),
                  quantile(phase_cycles[size_t(p)], 0.5), quantile(phase_cycles[size_t(p)], 0.9));
    std::printf("hops (ns, per tile): partials last store -> first early read p10 / median / p90 %.0f / %.0f / %.0f "
                "(%.1f %% negative); sums last store -> first pre read %.0f / %.0f / %.0f (%.1f %% negative); "
                "publication spread over the slices %.0f / %.0f / %.0f\n",
                quantile(sum_slack, 0.1), quantile(sum_slack, 0.5), quantile(sum_slack, 0.9), negative(sum_slack),
                quantile(collapse_slack, 0.1), quantile(collapse_slack, 0.5), quantile(collapse_slack, 0.9),
                negative(collapse_slack), quantile(spread, 0.1), quantile(spread, 0.5), quantile(spread, 0.9));
    std::printf("launch (ns): first CTA start -> last CTA end, median %.0f; per CTA p10 / median / p90: start -> "
                "first iteration %.0f / %.0f / %.0f, last iteration's slice sums -> end %.0f / %.0f / %.0f\n",
                quantile(launch_span, 0.5), quantile(cta_start, 0.1), quantile(cta_start, 0.5),
                quantile(cta_start, 0.9), quantile(cta_tail, 0.1), quantile(cta_tail, 0.5), quantile(cta_tail, 0.9));
    std::printf("slow paths per launch: stale pre and post/comb words re-read %.1f, slice sums out of line %.1f "
                "(their words not counted as stale words), X tiles not landed %.1f (of %d CTA-tiles)\n",
                slow_total[0] / runs, slow_total[1] / runs, slow_total[2] / runs, tiles * slices);
  };
  for (const bool head : {false, true}) {
    const HcProjectionConfig config =
        choose_hc_projection_config(tokens, d, multiprocessors, head ? HcProjectionOp::HEAD : HcProjectionOp::PRE);
    check(config.slice_dims == 64 || (!head && config.slice_dims == 128), "--trace-persistent: the launch takes ",
          config.slice_dims, "-dim slices; the traced copies are the 64-dim kernels and hc_pre's 128-dim one");
    using Wide = std::integral_constant<int, 128>;
    using Default = std::integral_constant<int, 64>;
    if (head)  // hc_head keeps 64-dim slices
      trace(std::true_type{}, Default{}, config);
    else
      config.slice_dims == 128 ? trace(std::false_type{}, Wide{}, config) : trace(std::false_type{}, Default{}, config);
  }
}

// --trace: V4-Flash, one token, hc_pre + norm and hc_post_pre + norm on the traced single-cluster kernel, `runs` launches
// each (every launch synchronised and its marks read back), alone and behind the full-card filler. Per mark: the
// median over the runs of its time after the cluster's first CTA started (ns, global timer), slowest CTA and CTA 0,
// and CTA 0's SM cycles after its grid-dependency wait.
void run_trace(cudaStream_t stream, int runs, std::mt19937& rng) {
  constexpr int64_t d = 4096, flat = kN * d;
  constexpr int kPhases = int(mhc::SingleClusterPhase::kCount);
  const char* const names[kPhases] = {
      "entry",           "barriers armed",  "CTA barrier passed", "fn copies issued", "grid wait",
      "X loaded",        "fn loaded",       "projected",          "exchange 1 sent",  "exchange 1 in",
      "pre ready",       "exchange 2 sent", "exchange 2 in",      "outputs stored",   "mix: exchange 1 in",
      "mix: first rows", "mix: comb stored"};
  const DeviceBuffer X = random_buffer(size_t(flat), 1.0f, 0.0f, rng, "X");
  const DeviceBuffer fn = random_buffer(size_t(kSiteRows * flat), 2.0f / std::sqrt(float(flat)), 0.0f, rng, "fn");
  const DeviceBuffer base = random_buffer(kSiteRows, 0.5f, 0.0f, rng, "base");
  const std::vector<float> scale_host = {0.8f, 1.1f, 1.5f};
  DeviceBuffer scale(3 * sizeof(float), "scale");
  scale.upload(scale_host.data(), 3 * sizeof(float));
  const DeviceBuffer norm_weight = random_buffer(size_t(d), 0.1f, 1.0f, rng, "norm weight");
  const DeviceBuffer out = random_buffer(size_t(d), 1.0f, 0.0f, rng, "out");
  const DeviceBuffer post_in = random_buffer(kN, 0.3f, 1.0f, rng, "post");
  const DeviceBuffer comb_in = random_buffer(kN * kN, 0.05f, 0.25f, rng, "comb");
  DeviceBuffer X_out(size_t(flat) * 4, "X out"), y(size_t(d) * 4, "y"), y_bf16(size_t(d) * 2, "y bf16"),
      post(kN * 4, "next post"), comb(kN * kN * 4, "next comb");
  constexpr int64_t kFillerVectors = (8 << 20) / 16;
  DeviceBuffer filler_source(size_t(kFillerVectors) * 16, "filler source"), filler_target(4096 * 16, "filler");
  filler_source.fill_bytes(0);
  const int multiprocessors = list_devices().front().multiprocessors;

  for (const bool fused_post : {false, true}) {
    const auto kernel = fused_post ? mhc::hc_single_cluster_kernel_traced<false, true, 0, 1>
                                   : mhc::hc_single_cluster_kernel_traced<false, false, 0, 1>;
    const int threads = mhc::single_cluster_threads(int(d), false);
    const int smem = mhc::single_cluster_smem_bytes(int(d), false);
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    mhc::DecodeSiteArgs args{};
    args.X = X.as<float>();
    args.fn = fn.as<float>();
    args.base = base.as<float>();
    args.scale = scale.as<float>();
    args.tokens = 1;
    args.hidden = int(d);
    args.sinkhorn_iters = kSinkhornIters;
    args.hc_eps = kEps;
    args.norm_eps = kEps;
    args.y = y.as<float>();
    args.y_bf16 = y_bf16.as<__nv_bfloat16>();
    args.post = post.as<float>();
    args.comb = comb.as<float>();
    args.norm_weight = norm_weight.as<float>();
    if (fused_post) {
      args.out = out.as<float>();
      args.post_in = post_in.as<float>();
      args.comb_in = comb_in.as<float>();
      args.X_out = X_out.as<float>();
    }
    for (const bool behind_filler : {false, true}) {
      std::vector<std::vector<double>> slowest(kPhases), first(kPhases), cycles(kPhases);
      for (int run = -3; run < runs; ++run) {  // 3 warm-up launches
        if (behind_filler)
          launch_chained(full_card_filler_kernel, dim3(unsigned(multiprocessors)), dim3(kFillerThreads),
                         kFillerSmemBytes, stream, dim3(1, 1, 1), "full_card_filler_kernel",
                         static_cast<const float4*>(filler_source.data()), filler_target.as<float4>(), kFillerVectors);
        launch_chained(kernel, dim3(mhc::kSingleClusterCtas), dim3(unsigned(threads)), size_t(smem), stream,
                       dim3(mhc::kSingleClusterCtas), "traced single-cluster kernel", args);
        DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
        unsigned long long clock[16][mhc_trace::kMaxPhases], timer[16][mhc_trace::kMaxPhases];
        DSV4_CUDA_CHECK(cudaMemcpyFromSymbol(clock, mhc_trace::g_clock, sizeof(clock)));
        DSV4_CUDA_CHECK(cudaMemcpyFromSymbol(timer, mhc_trace::g_timer, sizeof(timer)));
        if (run < 0) continue;
        unsigned long long start = timer[0][0];
        for (int c = 1; c < 16; ++c) start = std::min(start, timer[c][0]);
        const int kGridWait = int(mhc::SingleClusterPhase::kGridWait);
        for (int p = 0; p < kPhases; ++p) {
          const bool mix = p >= mhc_trace::kFirstMixPhase;  // CTA 0's mix warp only (token 0)
          double latest = 0.0;
          for (int c = 0; c < (mix ? 1 : 16); ++c) latest = std::max(latest, double(timer[c][p] - start));
          slowest[p].push_back(latest);
          first[p].push_back(double(timer[0][p] - start));
          cycles[p].push_back(double(int64_t(clock[0][p] - clock[0][kGridWait])));
        }
      }
      const auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      std::printf("trace: V4-Flash T=1 %s (single-cluster kernel, %s), median of %d launches\n",
                  fused_post ? "hc_post_pre + norm" : "hc_pre + norm",
                  behind_filler ? "behind the full-card filler" : "alone", runs);
      std::printf("| mark | ns after the first CTA's start (slowest CTA) | ns (CTA 0) | CTA 0 cycles after its grid "
                  "wait |\n|---|---|---|---|\n");
      for (int p = 0; p < kPhases; ++p)
        std::printf("| %s | %.0f | %.0f | %.0f |\n", names[p], median(slowest[p]), median(first[p]),
                    median(cycles[p]));
    }
  }
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path = "bench_cuda_mhc.json";
  std::vector<int64_t> token_counts = {1, 8, 64, 256, 4096};
  int iteration_limit = 0;  // 0: the defaults below
  OnlySelection only;        // --only: '|'-separated parts of kernel names; none: every row
  OnlySelection only_model;  // --model: '|'-separated parts of model names; none: every model
  bool trace = false, trace_persistent = false;
  const auto usage = [] {
    std::fprintf(stderr,
                 "usage: bench_cuda_mhc [--json PATH] [--tokens T,T,...] [--iterations N] [--only TEXT[|TEXT...]] "
                 "[--model TEXT[|TEXT...]] | --trace [--iterations N] | --trace-persistent [--tokens T] "
                 "[--iterations N]\n");
    return 2;
  };
  try {  // OnlySelection refuses an empty selection by throwing
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
        json_path = argv[++i];
      } else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
        token_counts.clear();
        for (const char* p = argv[++i]; *p != '\0';) {
          char* end = nullptr;
          const long long T = std::strtoll(p, &end, 10);
          if (end == p || T < 1) return usage();
          token_counts.push_back(T);
          p = *end == ',' ? end + 1 : end;
          if (*end != ',' && *end != '\0') return usage();
        }
      } else if (std::strcmp(argv[i], "--iterations") == 0 && i + 1 < argc) {
        iteration_limit = std::atoi(argv[++i]);
        if (iteration_limit < 1) return usage();
      } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
        only = OnlySelection(argv[++i], '|', OnlyMatch::Substring);
      } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
        only_model = OnlySelection(argv[++i], '|', OnlyMatch::Substring);
      } else if (std::strcmp(argv[i], "--trace") == 0) {
        trace = true;
      } else if (std::strcmp(argv[i], "--trace-persistent") == 0) {
        trace_persistent = true;
      } else {
        return usage();
      }
    }
    const std::vector<DeviceInfo> devices = list_devices();
    if (devices.empty()) {
      std::fprintf(stderr, "bench_cuda_mhc: no CUDA device\n");
      return 1;
    }
    const DeviceInfo& device = devices.front();
    const double copy_gbps = copy_bandwidth_gbps();
    std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, copy_gbps);
    cudaStream_t stream;
    DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(full_card_filler_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kFillerSmemBytes)));
    std::mt19937 rng(42);
    check(!(trace || trace_persistent) || (only.all() && only_model.all()),
          "--only and --model select timed rows; --trace and --trace-persistent take neither");
    if (trace) {
      run_trace(stream, iteration_limit > 0 ? iteration_limit : 101, rng);
      DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
      return 0;
    }
    if (trace_persistent) {
      run_projection_trace(stream, iteration_limit > 0 ? iteration_limit : 5,
                           token_counts.size() == 1 ? token_counts.front() : 4096, rng);
      DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
      return 0;
    }
    cublasHandle_t cublas;
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
    BENCH_CUBLAS_CHECK(cublasSetStream(cublas, stream));
    std::vector<Row> table;
    constexpr int64_t kVocab = 16384;

    const std::pair<const char*, int64_t> models[] = {{"V4-Flash", 4096}, {"V4-Pro", 7168}};
    for (const auto& [model, d] : models) {
      if (!only_model.selects(model)) continue;
      // Shared small parameters and the embedding table (rows touched per launch: T, so no rotation needed).
      const DeviceBuffer base = random_buffer(kSiteRows, 0.5f, 0.0f, rng, "base");
      const std::vector<float> scale_host = {0.8f, 1.1f, 1.5f};
      DeviceBuffer scale(3 * sizeof(float), "scale");
      scale.upload(scale_host.data(), 3 * sizeof(float));
      const DeviceBuffer norm_weight = random_buffer(size_t(d), 0.1f, 1.0f, rng, "norm weight");
      OwnedQuantizedMatrix embed_host = allocate_quantized_matrix(WeightFormat::BF16, kVocab, d, ScaleType::NONE);
      for (size_t i = 0; i < embed_host.storage->data.size(); i += 2) {
        const uint16_t bits = float_to_bf16(float(int(rng() % 2001) - 1000) * 1e-3f);
        std::memcpy(&embed_host.storage->data[i], &bits, 2);
      }
      const DeviceMatrix embed_table(embed_host.matrix, "embedding table");

      for (const int64_t T : token_counts) {
        const int64_t flat = kN * d;
        const size_t set_bytes = size_t(T * flat + kSiteRows * flat + T * d) * sizeof(float);
        const int copies = int(std::clamp<size_t>((3 * device.l2_bytes + set_bytes - 1) / set_bytes, 2, 64));
        std::vector<Set> sets;
        for (int c = 0; c < copies; ++c) {
          Set s;
          s.X = random_buffer(size_t(T * flat), 1.0f, 0.0f, rng, "X");
          s.fn = random_buffer(size_t(kSiteRows * flat), 2.0f / std::sqrt(float(flat)), 0.0f, rng, "fn");
          s.head_fn = random_buffer(size_t(kN * flat), 2.0f / std::sqrt(float(flat)), 0.0f, rng, "head fn");
          s.out = random_buffer(size_t(T * d), 1.0f, 0.0f, rng, "out");
          s.y = DeviceBuffer(size_t(T * d) * sizeof(float), "y");
          s.y_bf16 = DeviceBuffer(size_t(T * d) * sizeof(uint16_t), "y bf16");
          s.post = random_buffer(size_t(T * kN), 0.3f, 1.0f, rng, "post");
          s.comb = random_buffer(size_t(T * kN * kN), 0.05f, 0.25f, rng, "comb");
          s.next_post = DeviceBuffer(size_t(T * kN) * sizeof(float), "next post");
          s.next_comb = DeviceBuffer(size_t(T * kN * kN) * sizeof(float), "next comb");
          s.mixes = DeviceBuffer(size_t(T * kSiteRows) * sizeof(float), "mixes");
          std::vector<int32_t> ids(static_cast<size_t>(T));
          for (int32_t& id : ids) id = int32_t(rng() % kVocab);
          s.ids = DeviceBuffer(ids.size() * sizeof(int32_t), "ids");
          s.ids.upload(ids.data(), ids.size() * sizeof(int32_t));
          sets.push_back(std::move(s));
        }
        for (const auto& [op, op_name] :
             {std::pair{HcProjectionOp::PRE, "hc_pre"}, std::pair{HcProjectionOp::HEAD, "hc_head"},
              std::pair{HcProjectionOp::POST_PRE, "hc_post_pre"}}) {
          const HcProjectionConfig config = choose_hc_projection_config(T, d, device.multiprocessors, op);
          std::printf("%s T=%lld: %s in %lld slices of %d dims × %lld tiles of %d tokens, %d threads and %d X "
                      "stages per CTA\n",
                      model, (long long)T, op_name, (long long)config.slices,
                      config.slice_dims, (long long)config.token_tiles, config.token_tile, config.threads,
                      config.stages);
        }
        const size_t workspace_bytes = hc_projection_workspace_bytes(T, d, device.multiprocessors);
        DeviceBuffer workspace(workspace_bytes, "mhc workspace");
        workspace.fill_bytes(0);
        const int iterations = iteration_limit > 0 ? iteration_limit : T >= 4096 ? 30 : 200;
        const auto set = [&](int i) -> Set& { return sets[size_t(i % copies)]; };
        // Bandwidth from the graph time: the device's own time per launch.
        const auto record = [&](const char* kernel, const auto& body, double bytes, double baseline_ms) {
          if (!only.selects(kernel)) return;
          const double ms = time_ms(stream, iterations, body);
          const double graph_ms = graph_time_ms(stream, std::min(iterations, 20), body);
          const double gbps = bytes / (graph_ms * 1e6);
          table.push_back({kernel, model, d, T, ms * 1e3, graph_ms * 1e3, bytes, gbps, 100.0 * gbps / copy_gbps,
                           baseline_ms * 1e3});
        };
        const double x_bytes = double(T * flat) * 4, td_bytes = double(T * d) * 4;
        const bool decode_sized = T <= kHcDecodeMaxTokens;
        // The full-card filler over its own 8 MB per set (cold, as the rotation evicts it); decode sizes only.
        constexpr int64_t kFillerVectors = (8 << 20) / 16;
        std::vector<DeviceBuffer> filler_sources;
        for (int c = 0; decode_sized && c < copies; ++c) {
          filler_sources.emplace_back(size_t(kFillerVectors) * 16, "filler source");
          filler_sources.back().fill_bytes(0);
        }
        DeviceBuffer filler_target(size_t(device.multiprocessors) * 16, "filler target");
        const auto filler = [&](int i) {
          launch_chained(full_card_filler_kernel, dim3(unsigned(device.multiprocessors)), dim3(kFillerThreads),
                         kFillerSmemBytes, stream, dim3(1, 1, 1), "full_card_filler_kernel",
                         static_cast<const float4*>(filler_sources[size_t(i % copies)].data()),
                         filler_target.as<float4>(), kFillerVectors);
        };
        // Times `body` behind the filler (the pair per iteration): compare with the filler's own row.
        const auto after_filler = [&](const auto& body) {
          return [&filler, &body](int i) {
            filler(i);
            body(i);
          };
        };
        if (decode_sized) record("full-card filler kernel alone", filler, double(kFillerVectors) * 16, 0.0);

        // hc_pre of set s's X into y and the given post/comb; with `norm`, y normalised by norm_weight and also
        // written as bf16 (the attention's input).
        const auto run_pre = [&](Set& s, DeviceBuffer& post, DeviceBuffer& comb, HcKernelChoice kernel,
                                 bool norm = false, int sinkhorn_iters = kSinkhornIters) {
          run_hc_pre({.X = s.X.as<float>(), .fn = s.fn.as<float>(), .base = base.as<float>(),
                      .scale = scale.as<float>(), .tokens = T, .hidden = d, .sinkhorn_iters = sinkhorn_iters,
                      .y = s.y.as<float>(), .y_bf16 = norm ? s.y_bf16.as<__nv_bfloat16>() : nullptr,
                      .post = post.as<float>(), .comb = comb.as<float>(),
                      .out_norm_weight = norm ? norm_weight.as<float>() : nullptr, .kernel = kernel,
                      .workspace = workspace.data(), .workspace_bytes = workspace_bytes, .stream = stream});
        };
        const auto rms_to_bf16 = [&](Set& s) {
          run_rms_norm({.x = s.y.as<float>(), .weight = norm_weight.as<float>(), .rows = T, .width = d,
                        .y_bf16 = s.y_bf16.as<__nv_bfloat16>(), .stream = stream});
        };
        const auto hc_pre = [&](int i) {
          Set& s = set(i);
          run_pre(s, s.post, s.comb, HcKernelChoice::AUTO);
        };
        const auto hc_pre_persistent = [&](int i) {
          Set& s = set(i);
          run_pre(s, s.post, s.comb, HcKernelChoice::PERSISTENT);
        };
        const auto pre_baseline = [&](int i) {
          Set& s = set(i);
          const float alpha = 1.0f, beta = 0.0f;
          BENCH_CUBLAS_CHECK(cublasSgemm(cublas, CUBLAS_OP_T, CUBLAS_OP_N, kSiteRows, int(T), int(flat), &alpha,
                                         s.fn.as<float>(), int(flat), s.X.as<float>(), int(flat), &beta,
                                         s.mixes.as<float>(), kSiteRows));
          baseline_finish_kernel<false><<<unsigned(T), 256, 0, stream>>>(
              s.X.as<float>(), s.mixes.as<float>(), base.as<float>(), scale.as<float>(), int(d), s.y.as<float>(),
              s.post.as<float>(), s.comb.as<float>());
          DSV4_CUDA_CHECK_LAUNCH("baseline_finish_kernel");
        };
        const double pre_bytes = x_bytes + double(kSiteRows * flat) * 4 + td_bytes + double(T * (kN + kN * kN)) * 4;
        record("hc_pre", hc_pre, pre_bytes, time_ms(stream, iterations, pre_baseline));
        const bool tile_clusters_sized = !decode_sized && T <= 1024;
        if (tile_clusters_sized) {
          record("hc_pre (persistent kernel)", hc_pre_persistent, pre_bytes, 0.0);
          const auto persistent_norm = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::PERSISTENT, true);
          };
          const auto default_norm = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::AUTO, true);
          };
          record("hc_pre + attn_norm (default; baseline: persistent + rms_norm)", default_norm,
                 pre_bytes + double(d) * 4 + double(T * d) * 2, time_ms(stream, iterations, persistent_norm));
        }
        if (decode_sized) {
          record("hc_pre (persistent kernel)", hc_pre_persistent, pre_bytes, 0.0);
          // The share of Sinkhorn's serial chain in the decode kernel's time.
          const auto one_iteration = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::AUTO, false, 1);
          };
          record("hc_pre (1 Sinkhorn iteration)", one_iteration, pre_bytes, 0.0);
          // Baseline: the persistent hc_pre, then rms_norm into bf16 (the attention input before this option).
          const auto pre_then_norm = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::PERSISTENT);
            rms_to_bf16(s);
          };
          const auto pre_fused_norm = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::AUTO, true);
          };
          record("hc_pre + attn_norm (fused)", pre_fused_norm, pre_bytes + double(d) * 4 + double(T * d) * 2,
                 time_ms(stream, iterations, pre_then_norm));
          const auto async_kernel = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::CLUSTER_ASYNC);
          };
          record("hc_pre (asynchronous cluster kernel)", async_kernel, pre_bytes, 0.0);
          const auto async_one_iteration = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::CLUSTER_ASYNC, false, 1);
          };
          record("hc_pre (asynchronous cluster kernel, 1 Sinkhorn iteration)", async_one_iteration, pre_bytes, 0.0);
          const auto async_fused_norm = [&](int i) {
            Set& s = set(i);
            run_pre(s, s.post, s.comb, HcKernelChoice::CLUSTER_ASYNC, true);
          };
          record("hc_pre + attn_norm (fused, asynchronous cluster kernel)", async_fused_norm,
                 pre_bytes + double(d) * 4 + double(T * d) * 2, time_ms(stream, iterations, pre_then_norm));
          record("filler + hc_pre + attn_norm (fused, default: single-cluster kernel)", after_filler(pre_fused_norm),
                 0.0, 0.0);
          record("filler + hc_pre + attn_norm (fused, asynchronous cluster kernel)", after_filler(async_fused_norm),
                 0.0, 0.0);
        }

        const auto hc_post_then_pre = [&](int i) {
          Set& s = set(i);
          run_hc_post({.out = s.out.as<float>(), .X = s.X.as<float>(), .post = s.post.as<float>(),
                       .comb = s.comb.as<float>(), .tokens = T, .hidden = d, .X_out = s.X.as<float>(),
                       .stream = stream});
          run_pre(s, s.next_post, s.next_comb, HcKernelChoice::PERSISTENT);
        };
        const auto run_post_pre = [&](Set& s, HcKernelChoice kernel, bool norm, int sinkhorn_iters = kSinkhornIters) {
          run_hc_post_pre({.out = s.out.as<float>(), .X = s.X.as<float>(), .post = s.post.as<float>(),
                           .comb = s.comb.as<float>(), .X_out = s.X.as<float>(), .next_fn = s.fn.as<float>(),
                           .next_base = base.as<float>(), .next_scale = scale.as<float>(), .tokens = T,
                           .hidden = d, .sinkhorn_iters = sinkhorn_iters, .y = s.y.as<float>(),
                           .y_bf16 = norm ? s.y_bf16.as<__nv_bfloat16>() : nullptr,
                           .next_post = s.next_post.as<float>(), .next_comb = s.next_comb.as<float>(),
                           .out_norm_weight = norm ? norm_weight.as<float>() : nullptr, .kernel = kernel,
                           .workspace = workspace.data(), .workspace_bytes = workspace_bytes, .stream = stream});
        };
        const auto hc_post_pre = [&](int i) { run_post_pre(set(i), HcKernelChoice::AUTO, false); };
        // Read: out, X, post/comb, fn; written: X, y, the next post/comb.
        const double mix_bytes = double(T * (kN + kN * kN)) * 4;
        const double post_pre_bytes = td_bytes + 2 * x_bytes + double(kSiteRows * flat) * 4 + td_bytes + 2 * mix_bytes;
        record("hc_post_pre (in place)", hc_post_pre, post_pre_bytes, time_ms(stream, iterations, hc_post_then_pre));
        const auto roles_post_pre = [&](int i) {
          run_post_pre(set(i), HcKernelChoice::PERSISTENT_WARP_SPECIALIZED, false);
        };
        record("hc_post_pre (warp-specialized persistent kernel, one launch)", roles_post_pre, post_pre_bytes, 0.0);
        if (tile_clusters_sized) {
          const auto persistent = [&](int i) { run_post_pre(set(i), HcKernelChoice::PERSISTENT, false); };
          record("hc_post_pre (persistent kernel)", persistent, post_pre_bytes, 0.0);
          const auto persistent_norm = [&](int i) { run_post_pre(set(i), HcKernelChoice::PERSISTENT, true); };
          const auto default_norm = [&](int i) { run_post_pre(set(i), HcKernelChoice::AUTO, true); };
          record("hc_post_pre + norm (default; baseline: persistent + rms_norm)", default_norm,
                 post_pre_bytes + double(d) * 4 + double(T * d) * 2, time_ms(stream, iterations, persistent_norm));
        }
        if (decode_sized) {
          const auto persistent = [&](int i) { run_post_pre(set(i), HcKernelChoice::PERSISTENT, false); };
          record("hc_post_pre (persistent kernel)", persistent, post_pre_bytes, 0.0);
          const auto then_norm = [&](int i) {
            run_post_pre(set(i), HcKernelChoice::PERSISTENT, false);
            rms_to_bf16(set(i));
          };
          const auto fused_norm = [&](int i) { run_post_pre(set(i), HcKernelChoice::AUTO, true); };
          record("hc_post_pre + norm (fused)", fused_norm, post_pre_bytes + double(d) * 4 + double(T * d) * 2,
                 time_ms(stream, iterations, then_norm));
          // The share of Sinkhorn's serial chain in the fused site (the model's second mHC site of every layer).
          const auto fused_norm_one_iteration = [&](int i) { run_post_pre(set(i), HcKernelChoice::AUTO, true, 1); };
          record("hc_post_pre + norm (fused, 1 Sinkhorn iteration)", fused_norm_one_iteration,
                 post_pre_bytes + double(d) * 4 + double(T * d) * 2, 0.0);
          const auto async_norm = [&](int i) { run_post_pre(set(i), HcKernelChoice::CLUSTER_ASYNC, true); };
          record("hc_post_pre + norm (fused, asynchronous cluster kernel)", async_norm,
                 post_pre_bytes + double(d) * 4 + double(T * d) * 2, time_ms(stream, iterations, then_norm));
          record("filler + hc_post_pre + norm (fused, default: single-cluster kernel)", after_filler(fused_norm), 0.0,
                 0.0);
          record("filler + hc_post_pre + norm (fused, asynchronous cluster kernel)", after_filler(async_norm), 0.0,
                 0.0);
        }

        // hc_head of set s's X into h (s.y); with `norm`, h normalised by norm_weight and also written as bf16 (the
        // model's final norm, the head's input).
        const auto run_head = [&](Set& s, HcKernelChoice kernel, bool norm = false) {
          run_hc_head({.X = s.X.as<float>(), .fn = s.head_fn.as<float>(), .base = base.as<float>(),
                       .scale = scale.as<float>(), .tokens = T, .hidden = d, .h = s.y.as<float>(),
                       .h_bf16 = norm ? s.y_bf16.as<__nv_bfloat16>() : nullptr,
                       .out_norm_weight = norm ? norm_weight.as<float>() : nullptr, .kernel = kernel,
                       .workspace = workspace.data(), .workspace_bytes = workspace_bytes, .stream = stream});
        };
        const auto hc_head = [&](int i) { run_head(set(i), HcKernelChoice::AUTO); };
        const auto head_baseline = [&](int i) {
          Set& s = set(i);
          const float alpha = 1.0f, beta = 0.0f;
          BENCH_CUBLAS_CHECK(cublasSgemm(cublas, CUBLAS_OP_T, CUBLAS_OP_N, kN, int(T), int(flat), &alpha,
                                         s.head_fn.as<float>(), int(flat), s.X.as<float>(), int(flat), &beta,
                                         s.mixes.as<float>(), kN));
          baseline_finish_kernel<true><<<unsigned(T), 256, 0, stream>>>(
              s.X.as<float>(), s.mixes.as<float>(), base.as<float>(), scale.as<float>(), int(d), s.y.as<float>(),
              nullptr, nullptr);
          DSV4_CUDA_CHECK_LAUNCH("baseline_finish_kernel");
        };
        record("hc_head", hc_head, x_bytes + double(kN * flat) * 4 + td_bytes,
               time_ms(stream, iterations, head_baseline));
        if (tile_clusters_sized) {
          const auto persistent_norm = [&](int i) { run_head(set(i), HcKernelChoice::PERSISTENT, true); };
          const auto default_norm = [&](int i) { run_head(set(i), HcKernelChoice::AUTO, true); };
          record("hc_head + norm (default; baseline: persistent + rms_norm)", default_norm,
                 x_bytes + double(kN * flat) * 4 + td_bytes + double(d) * 4 + double(T * d) * 2,
                 time_ms(stream, iterations, persistent_norm));
        }
        if (decode_sized) {
          const auto persistent = [&](int i) { run_head(set(i), HcKernelChoice::PERSISTENT); };
          record("hc_head (persistent kernel)", persistent, x_bytes + double(kN * flat) * 4 + td_bytes, 0.0);
          const double head_norm_bytes = x_bytes + double(kN * flat) * 4 + td_bytes + double(d) * 4 + double(T * d) * 2;
          const auto fused_norm = [&](int i) { run_head(set(i), HcKernelChoice::AUTO, true); };
          record("hc_head + norm (fused)", fused_norm, head_norm_bytes, 0.0);
          const auto async_kernel = [&](int i) { run_head(set(i), HcKernelChoice::CLUSTER_ASYNC); };
          record("hc_head (asynchronous cluster kernel)", async_kernel, x_bytes + double(kN * flat) * 4 + td_bytes,
                 0.0);
          const auto async_norm = [&](int i) { run_head(set(i), HcKernelChoice::CLUSTER_ASYNC, true); };
          record("hc_head + norm (fused, asynchronous cluster kernel)", async_norm, head_norm_bytes, 0.0);
        }

        const auto hc_post = [&](int i) {
          Set& s = set(i);
          run_hc_post({.out = s.out.as<float>(), .X = s.X.as<float>(), .post = s.post.as<float>(),
                       .comb = s.comb.as<float>(), .tokens = T, .hidden = d, .X_out = s.X.as<float>(),
                       .stream = stream});
        };
        record("hc_post (in place)", hc_post,
               td_bytes + 2 * x_bytes + double(T * (kN + kN * kN)) * 4, 0.0);

        const auto rms = [&](int i) {
          Set& s = set(i);
          run_rms_norm({.x = s.out.as<float>(), .weight = norm_weight.as<float>(), .rows = T, .width = d,
                        .y = s.y.as<float>(), .stream = stream});
        };
        record("rms_norm", rms, 2 * td_bytes + double(d) * 4, 0.0);

        const auto embedding = [&](int i) {
          Set& s = set(i);
          run_embedding({.table = embed_table.view(), .ids = s.ids.as<int32_t>(), .tokens = T, .streams = kN,
                         .X = s.X.as<float>(), .stream = stream});
        };
        record("embedding (bf16 → 4 streams)", embedding, double(T * d) * 2 + x_bytes, 0.0);
      }
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));
    DSV4_CUDA_CHECK(cudaStreamDestroy(stream));

    std::printf("| kernel | model | T | µs (stream) | µs (graph) | MB moved | GB/s (graph) | %% of copy | "
                "baseline µs (stream) | speed-up (stream) |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : table) {
      std::printf("| %s | %s | %lld | %.1f | %.1f | %.2f | %.0f | %.0f |", r.kernel.c_str(), r.model.c_str(),
                  (long long)r.tokens, r.us, r.graph_us, r.bytes / 1e6, r.gbps, r.percent_of_copy);
      if (r.baseline_us > 0)
        std::printf(" %.1f | %.2f× |\n", r.baseline_us, r.baseline_us / r.us);
      else
        std::printf(" – | – |\n");
    }

    FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_mhc: cannot write ", json_path);
    std::fprintf(out, "{\n  \"benchmark\": \"bench_cuda_mhc\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n",
                 device.name.c_str(), device.multiprocessors);
    std::fprintf(out, "  \"copy_bandwidth_gbps\": %.1f,\n  \"results\": [\n", copy_gbps);
    for (size_t i = 0; i < table.size(); ++i) {
      const Row& r = table[i];
      std::fprintf(out,
                   "    {\"kernel\": \"%s\", \"model\": \"%s\", \"hidden\": %lld, \"tokens\": %lld, \"us\": %.2f, "
                   "\"graph_us\": %.2f, "
                   "\"bytes\": %.0f, \"gbps\": %.1f, \"percent_of_copy\": %.1f, \"baseline_us\": %s}%s\n",
                   r.kernel.c_str(), r.model.c_str(), (long long)r.hidden, (long long)r.tokens, r.us, r.graph_us,
                   r.bytes, r.gbps, r.percent_of_copy,
                   r.baseline_us > 0 ? std::to_string(r.baseline_us).c_str() : "null", i + 1 < table.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
    only.require_all_used();
    only_model.require_all_used();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_mhc: %s\n", e.what());
    return 1;
  }
  return 0;
}
