// MoE sub-block benchmark on the GPU: run_moe for V4-Flash (E 256, d 4096, I 2048, top 6) and V4-Pro (E 384,
// d 7168, I 3072) layers of synthetic weights generated on the device (MXFP4 routed experts, or NVFP4 with
// --format nvfp4 as in `dsv4 bench e2e --format nvfp4`; FP8 shared expert,
// bf16 router, scored routing through a random router and bias, so tokens spread over the experts roughly
// uniformly), T ∈ {1, 4, 16, 64, 256, 4096}.
// Each call is a CUDA graph of the whole sub-block (which also checks that it captures). Calls rotate over several
// layers and fresh inputs so that the touched experts (and the shared expert) come from HBM, not from L2.
// Both expert-kernel paths are timed at every T up to 1024: "streamed" (weights through shared memory, with the
// routing and combine fused into the router and down launches at T <= 8) and "register" (five launches); above,
// the register path alone; at T <= 64 also the streamed kernels' options (MoeRunParams): "tile-decode" (the
// weight_tile_mma fp4 decode instead of the default lean one), "fused-router" (the fused router kernel instead of
// the decode router at T <= 8) and
// "fused-router+tile-decode", the shared expert never split and split at every T <= 8 (MoeRunParams::
// shared_expert_split; within one wave by default): "unsplit-shared", "split-shared-to-8", and without the down head
// start (MoeRunParams::down_head_start): "no-down-head-start", and the fp4 column stages other than the default
// (MoeRunParams::column_stages; T <= 2 only): "no-columns" (or "columns"), and the down CTAs' wait other than the
// default (MoeRunParams::down_waits_per_item; T <= 8): "down-waits-grid" (or "down-waits-item").
// Reported per T and path: time per call, the bytes of the experts actually touched (routed, counted from the
// routing of each input, plus the shared expert) / time, that rate as a share of the same-run device copy bandwidth
// (cudaMemcpy D2D of 1 GiB, read + write), TFLOP/s of the expert GEMMs and their share of the same-run cuBLAS bf16
// rate (8192³), the floor max(touched bytes / copy rate, expert flops / cuBLAS rate) as a share of the time, and the
// kernel launches in the graph.
// Same-run baseline per T: cuBLAS bf16 GEMMs (cublasGemmEx, fp32 accumulation) of the same routing — per touched
// expert (and the shared one) [n_e, d] × [d, 2I] then [n_e, I] × [I, d], captured in one CUDA graph — on bf16 weights
// of the same shapes (a pool of 8 experts used in turn, 0.4-1 GB, so every GEMM reads its weights from HBM; no
// routing, SwiGLU or combine). Reported: its time, and "x baseline" = baseline time / run_moe time.
// Usage: bench_cuda_moe [--json PATH] [--tokens 1,4,...] [--model flash|pro] [--format mxfp4|nvfp4]
//                       [--paths streamed,...] [--trace]
//        bench_cuda_moe --stream-layout
// (--paths: only those paths, e.g. to profile one kernel set; --trace: instead of timing, the expert launches'
// timeline of one cold call at each T <= 8, see print_trace: the default streamed path, or each streamed path that
// --paths names; --stream-layout: the weight copies alone, see layout_probe, with no other option).
#include <cuda_runtime.h>

#include <algorithm>
#include <iterator>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <cublas_v2.h>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe.hpp"
#include "backends/cuda/moe_weights.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "core/error.hpp"

#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

struct Model {
  const char* name;
  MoeConfig config;
  int layers;  // rotated so that more than the L2 is touched between two uses of one layer
};

struct Result {
  std::string model;
  std::string path;  // a PathSpec name ("streamed", ..., "register")
  int tokens = 0;
  double us = 0, touched_bytes = 0, experts_touched = 0, gbps = 0, copy_share = 0, tflops = 0;
  double tensor_share = 0;   // tflops / the same-run cuBLAS bf16 rate
  double floor_share = 0;    // max(byte floor, flop floor) / us
  double baseline_us = 0;    // cuBLAS bf16 expert GEMMs of the same routings
  double stage_us[kMoeStages] = {};  // router, scoring + bucketing, gate/up, down, combine (serialised stream launches)
  size_t launches = 0;
};

// Same-run floors.
struct Floors {
  double copy_gbps = 0;      // device copy, read + write
  double tensor_tflops = 0;  // cuBLAS bf16 8192³, fp32 accumulation
};

// bf16 tensor rate of cuBLAS on an 8192³ GEMM (bf16 in, fp32 accumulate), in TFLOP/s: the median of 5 after a warm-up.
double cublas_bf16_tflops(cublasHandle_t handle, cudaStream_t stream) {
  constexpr int n = 8192;
  DeviceBuffer a(size_t(n) * n * 2, "gemm a"), b(size_t(n) * n * 2, "gemm b"), c(size_t(n) * n * 4, "gemm c");
  a.fill_bytes(0x3C);
  b.fill_bytes(0x3C);
  const float alpha = 1.0f, beta = 0.0f;
  auto gemm = [&] {
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.data(), CUDA_R_16BF, n,
                                    b.data(), CUDA_R_16BF, n, &beta, c.data(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
  };
  gemm();
  StreamTimer timer;
  std::vector<float> ms;
  for (int i = 0; i < 5; ++i) ms.push_back(timer.elapsed_ms(stream, gemm));
  std::sort(ms.begin(), ms.end());
  return 2.0 * double(n) * n * n / (double(ms[ms.size() / 2]) * 1e9);
}

// The cuBLAS baseline's operands: a pool of bf16 experts ([2I, d] gate/up stacked, [d, I] down) and activations
// for up to T rows.
struct BaselineOperands {
  static constexpr int kPool = 8;
  std::vector<DeviceBuffer> gate_up, down;
  DeviceBuffer x, y, out;
  BaselineOperands(const MoeConfig& c, int T) {
    const size_t d = size_t(c.hidden), I = size_t(c.intermediate);
    for (int i = 0; i < kPool; ++i) {
      gate_up.emplace_back(2 * I * d * 2, "baseline gate/up");
      down.emplace_back(d * I * 2, "baseline down");
      gate_up.back().fill_bytes(0x3C);
      down.back().fill_bytes(0x3C);
    }
    x = DeviceBuffer(size_t(T) * d * 2, "baseline x");
    y = DeviceBuffer(size_t(T) * 2 * I * 2, "baseline gate/up output");
    out = DeviceBuffer(size_t(T) * d * 4, "baseline out");
    x.fill_bytes(0x3C);
  }
};

// Captures the baseline GEMMs of one routing (rows per expert, the shared expert last) into a graph.
cudaGraphExec_t capture_baseline(cublasHandle_t handle, cudaStream_t stream, const MoeConfig& c,
                                 const std::vector<int>& rows_per_expert, BaselineOperands& ops) {
  const int d = int(c.hidden), I = int(c.intermediate);
  const float alpha = 1.0f, beta = 0.0f;
  cudaGraph_t graph;
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  int used = 0;
  for (const int n : rows_per_expert) {
    if (n == 0) continue;
    const int slot = used++ % BaselineOperands::kPool;  // consecutive experts never share weights
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, 2 * I, n, d, &alpha,
                                    ops.gate_up[size_t(slot)].data(), CUDA_R_16BF, d, ops.x.data(), CUDA_R_16BF, d,
                                    &beta, ops.y.data(), CUDA_R_16BF, 2 * I, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    BENCH_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, d, n, I, &alpha, ops.down[size_t(slot)].data(),
                                    CUDA_R_16BF, I, ops.y.data(), CUDA_R_16BF, 2 * I, &beta, ops.out.data(),
                                    CUDA_R_32F, d, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
  return exec;
}

// Keeps the stream busy for `cycles` SM clocks, so that the launches queued behind it start back to back.
__global__ void hold_stream_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

size_t expert_bytes(const MoeExpertView& e) { return e.w1.stored_bytes + e.w3.stored_bytes + e.w2.stored_bytes; }

// One rotation slot: a layer, an input, its workspace, and what its routing touches.
struct Slot {
  int layer = 0;
  DeviceBuffer u, workspace;
  double touched_bytes = 0;
  int experts_touched = 0;
  std::vector<int> rows_per_expert;  // [E + 1], the shared expert last
};

// The expert-kernel paths a result names: the streamed kernels (MoeRunParams defaults, then with
// options changed: the weight_tile_mma fp4 decode instead of the lean one, the fused router kernel instead of the
// decode router, both), the register kernels.
enum class Path {
  STREAMED,
  TILE_DECODE,
  FUSED_ROUTER,
  FUSED_ROUTER_TILE_DECODE,
  UNSPLIT_SHARED,
  SPLIT_SHARED_TO_8,
  NO_DOWN_HEAD_START,
  OTHER_COLUMNS,
  PER_ITEM,
  REGISTER
};
struct PathSpec {
  Path path;
  const char* name;
  bool tile_decode = false, fused_router = false;
  MoeSharedExpertSplit split = MoeRunParams{}.shared_expert_split;
  bool no_down_head_start = false;
  bool other_columns = false;
  bool other_per_item = false;
  bool option() const {
    return tile_decode || fused_router || no_down_head_start || other_columns || other_per_item ||
           split != MoeRunParams{}.shared_expert_split;
  }
};
constexpr PathSpec kPaths[] = {
    {Path::STREAMED, "streamed"},
    {Path::TILE_DECODE, "tile-decode", true},
    {Path::FUSED_ROUTER, "fused-router", false, true},
    {Path::FUSED_ROUTER_TILE_DECODE, "fused-router+tile-decode", true, true},
    {Path::UNSPLIT_SHARED, "unsplit-shared", false, false, MoeSharedExpertSplit::NEVER},
    {Path::SPLIT_SHARED_TO_8, "split-shared-to-8", false, false, MoeSharedExpertSplit::ALWAYS},
    {Path::NO_DOWN_HEAD_START, "no-down-head-start", false, false, MoeRunParams{}.shared_expert_split, true},
    {Path::OTHER_COLUMNS, MoeRunParams{}.column_stages ? "no-columns" : "columns", false, false,
     MoeRunParams{}.shared_expert_split, false, true},
    {Path::PER_ITEM, MoeRunParams{}.down_waits_per_item ? "down-waits-grid" : "down-waits-item", false, false,
     MoeRunParams{}.shared_expert_split, false, false, true},
    {Path::REGISTER, "register"},
};
static_assert([] {
  for (int i = 0; i < int(std::size(kPaths)); ++i)
    if (int(kPaths[i].path) != i) return false;
  return true;
}(), "kPaths is indexed by Path");
constexpr int kOptionsMaxTokens = 64;  // the streamed options' paths run up to here

MoeRunParams path_params(Path path) {
  const PathSpec& spec = kPaths[int(path)];
  MoeRunParams p;
  p.expert_kernels = path == Path::REGISTER ? MoeExpertKernels::REGISTER : MoeExpertKernels::STREAMED;
  if (spec.tile_decode) p.lean_expert_decode = false;
  if (spec.fused_router) p.decode_router = false;
  p.shared_expert_split = spec.split;
  if (spec.no_down_head_start) p.down_head_start = false;
  if (spec.other_columns) p.column_stages = !p.column_stages;
  if (spec.other_per_item) p.down_waits_per_item = !p.down_waits_per_item;
  p.fused_small_batches = path != Path::REGISTER;
  return p;
}

// Mean microseconds per graph over the rotation: each graph once to warm up, then `iterations` rounds.
double rotation_us(const std::vector<cudaGraphExec_t>& graphs, int iterations, cudaStream_t stream) {
  for (cudaGraphExec_t g : graphs) DSV4_CUDA_CHECK(cudaGraphLaunch(g, stream));
  const float ms = stream_elapsed_ms(stream, [&] {
    for (int i = 0; i < iterations; ++i)
      for (cudaGraphExec_t g : graphs) DSV4_CUDA_CHECK(cudaGraphLaunch(g, stream));
  });
  return double(ms) * 1e3 / (iterations * double(graphs.size()));
}

std::vector<Result> bench_model(const Model& model, const std::vector<int>& token_counts, const std::set<Path>& paths,
                                WeightFormat routed_format, const Floors& floors, cublasHandle_t cublas,
                                cudaStream_t stream) {
  const MoeConfig& c = model.config;
  std::vector<DeviceMoeWeights> layers;
  for (int l = 0; l < model.layers; ++l)
    layers.push_back(
        DeviceMoeWeights::synthetic(c, MoeSyntheticSpec{.routed_format = routed_format}, 1000 + uint64_t(l)));
  std::vector<Result> results;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const int T : token_counts) {
    constexpr int kSlots = 8;
    const int iterations = T >= 1024 ? 4 : 25;
    const size_t workspace_bytes = moe_workspace_bytes(c, T);
    DeviceBuffer out(size_t(T) * size_t(c.hidden) * sizeof(float), "out");
    auto run_params = [&](Slot& slot, Path path) {
      MoeRunParams p = path_params(path);
      p.u = slot.u.as<float>(), p.out = out.as<float>(), p.tokens = T;
      p.workspace = slot.workspace.data(), p.workspace_bytes = workspace_bytes, p.stream = stream;
      return p;
    };

    // Inputs and what their routing touches (the routing is the same for both paths).
    std::vector<Slot> slots(kSlots);
    std::vector<float> u(size_t(T) * size_t(c.hidden));
    for (int s = 0; s < kSlots; ++s) {
      Slot& slot = slots[size_t(s)];
      slot.layer = s % model.layers;
      for (float& v : u) v = normal(rng);
      slot.u = DeviceBuffer(u.size() * sizeof(float), "u");
      slot.u.upload(u.data(), u.size() * sizeof(float));
      slot.workspace = DeviceBuffer(workspace_bytes, "moe workspace");
      prepare_moe_workspace(slot.workspace.data(), workspace_bytes, stream);
      const DeviceMoeWeights& weights = layers[size_t(slot.layer)];
      const MoeRunParams params = run_params(slot, Path::REGISTER);
      run_moe(weights, params);
      check_moe_status(params);
      const MoeWorkspaceView view = moe_workspace_view(c, T, slot.workspace.data());
      std::vector<int32_t> ids(size_t(T) * size_t(c.top_k));
      DSV4_CUDA_CHECK(cudaMemcpy(ids.data(), view.expert_ids, ids.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
      slot.rows_per_expert.assign(size_t(c.experts) + 1, 0);
      for (const int32_t e : ids) ++slot.rows_per_expert[size_t(e)];
      slot.rows_per_expert.back() = T;
      const std::set<int32_t> touched(ids.begin(), ids.end());
      slot.experts_touched = int(touched.size());
      slot.touched_bytes = double(expert_bytes(weights.experts().back()));  // the shared expert
      for (const int32_t e : touched) slot.touched_bytes += double(expert_bytes(weights.experts()[size_t(e)]));
    }

    // The cuBLAS baseline on the same routings.
    double baseline_us = 0;
    {
      BaselineOperands operands(c, T);
      std::vector<cudaGraphExec_t> graphs;
      for (const Slot& slot : slots)
        graphs.push_back(capture_baseline(cublas, stream, c, slot.rows_per_expert, operands));
      baseline_us = rotation_us(graphs, iterations, stream);
      for (cudaGraphExec_t g : graphs) DSV4_CUDA_CHECK(cudaGraphExecDestroy(g));
    }

    for (const PathSpec& spec : kPaths) {
      const Path path = spec.path;
      if ((path == Path::STREAMED && T > 1024) || (spec.option() && T > kOptionsMaxTokens) ||
          (spec.other_columns && T > 2) ||
          (spec.other_per_item && T > 8))
        continue;
      if (!paths.contains(path)) continue;
      std::vector<cudaGraphExec_t> graphs;
      size_t launches = 0;
      for (Slot& slot : slots) {
        const DeviceMoeWeights& weights = layers[size_t(slot.layer)];
        const MoeRunParams params = run_params(slot, path);
        run_moe(weights, params);  // once uncaptured: any one-time setup happens outside the capture
        cudaGraph_t graph;
        DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        run_moe(weights, params);
        DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &launches));
        check(launches == size_t(moe_launches(weights, params)), "bench_cuda_moe: ", launches, " graph nodes, ",
              "moe_launches says ", moe_launches(weights, params));
        cudaGraphExec_t exec;
        DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
        graphs.push_back(exec);
      }
      const double us = rotation_us(graphs, iterations, stream);
      for (cudaGraphExec_t g : graphs) DSV4_CUDA_CHECK(cudaGraphExecDestroy(g));

      // Per-stage breakdown: events around the stages of stream launches (which serialise the stages: no overlap),
      // queued behind a kernel that holds the stream ~0.2 ms so that host launch costs do not show in the times.
      double stage_us[kMoeStages] = {};
      {
        cudaEvent_t stage_events[kMoeStages + 1];
        for (cudaEvent_t& e : stage_events) DSV4_CUDA_CHECK(cudaEventCreate(&e));
        const int stage_runs = T >= 1024 ? 1 : 3;
        for (int i = 0; i < stage_runs; ++i)
          for (Slot& slot : slots) {
            hold_stream_kernel<<<1, 1, 0, stream>>>(400000);
            DSV4_CUDA_CHECK_LAUNCH("hold_stream_kernel");
            MoeRunParams params = run_params(slot, path);
            params.stage_events = stage_events;
            run_moe(layers[size_t(slot.layer)], params);
            DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
            for (int st = 0; st < kMoeStages; ++st) {
              float stage_ms = 0;
              DSV4_CUDA_CHECK(cudaEventElapsedTime(&stage_ms, stage_events[st], stage_events[st + 1]));
              stage_us[st] += double(stage_ms) * 1e3 / (stage_runs * kSlots);
            }
          }
        for (cudaEvent_t& e : stage_events) DSV4_CUDA_CHECK(cudaEventDestroy(e));
      }

      const bool streamed_path = path != Path::REGISTER && layers.front().streamed_tiles();
      const char* name = streamed_path ? spec.name : "register";
      Result r{.model = model.name, .path = name, .tokens = T, .launches = launches};
      std::copy(std::begin(stage_us), std::end(stage_us), std::begin(r.stage_us));
      r.us = us;
      r.baseline_us = baseline_us;
      for (const Slot& slot : slots) {
        r.touched_bytes += slot.touched_bytes / kSlots;
        r.experts_touched += double(slot.experts_touched) / kSlots;
      }
      r.gbps = r.touched_bytes / (r.us * 1e3);
      r.copy_share = r.gbps / floors.copy_gbps;
      const double rows = double(T) * double(c.top_k + 1);
      r.tflops = 2.0 * rows * 3.0 * double(c.hidden) * double(c.intermediate) / (r.us * 1e6);
      r.tensor_share = r.tflops / floors.tensor_tflops;
      r.floor_share = std::max(r.copy_share, r.tensor_share);  // max(byte floor, flop floor) / time
      std::printf("%-6s T = %5d %-8s: %9.1f us  %6.1f experts + shared  %8.1f MB  %7.0f GB/s  %5.1f %% of copy  "
                  "%6.1f TFLOP/s (%4.1f %% of cuBLAS)  %5.1f %% of floor  cuBLAS bf16 baseline %9.1f us (x %.2f)  "
                  "%zu launches\n",
                  model.name, T, r.path.c_str(), r.us, r.experts_touched, r.touched_bytes / 1e6, r.gbps,
                  100.0 * r.copy_share, r.tflops, 100.0 * r.tensor_share, 100.0 * r.floor_share, r.baseline_us,
                  r.baseline_us / r.us, r.launches);
      std::printf("         stages (serialised, events between): router %.1f us, route+bucket %.1f us, "
                  "gate/up %.1f us, down %.1f us, combine %.1f us\n",
                  r.stage_us[0], r.stage_us[1], r.stage_us[2], r.stage_us[3], r.stage_us[4]);
      results.push_back(r);
    }
  }
  return results;
}

// --trace, per work item: when each chunk of the down GEMM's K (kTraceDownChunk inputs of I: the down's fp4 stage,
// gate/up bands of 64 rows) is complete (the latest end of its gate/up CTAs; the item is complete at the latest
// chunk), and when the item's down CTAs start, pass their wait, have x staged and end (median / latest over the
// item's warps). Then the SM hand-over: each down CTA's start after the latest gate/up CTA end on its SM before it.
// host[0] / host[1]: the gate/up / down records; grid row r >= shared_rows serves work item r - shared_rows + 1.
constexpr int64_t kTraceDownChunk = 512;
void print_trace_items(const std::vector<uint64_t> (&host)[2], uint64_t t0, int64_t gate_up_bands,
                       int64_t down_bands, int64_t intermediate, int shared_rows) {
  auto us = [&](uint64_t t) { return double(int64_t(t - t0)) * 1e-3; };
  auto cta_point = [&](int g, int64_t cta, int slot, bool latest) {  // over the CTA's warps; 0 if not reached
    uint64_t v = latest ? 0 : ~0ull;
    for (int w = 0; w < kMoeTraceWarpsPerCta; ++w) {
      const uint64_t* r = host[g].data() + (cta * kMoeTraceWarpsPerCta + w) * kMoeTraceSlots;
      if (r[MOE_TRACE_READY] == 0 || r[slot] == 0) return uint64_t(0);
      v = latest ? std::max(v, r[slot]) : std::min(v, r[slot]);
    }
    return v;
  };
  const int64_t rows = int64_t(host[1].size()) / (down_bands * kMoeTraceWarpsPerCta * kMoeTraceSlots);
  const int64_t bands_per_chunk = kTraceDownChunk / (kMoeDownBandRows / 2);
  const int64_t chunks = (intermediate + kTraceDownChunk - 1) / kTraceDownChunk;
  std::printf("| item | gate/up chunk ends (latest CTA each) | down start med / last | wait passed med / last | x "
              "staged med / last | down end med / last |\n|---|---|---|---|---|---|\n");
  for (int64_t row = 0; row < rows; ++row) {
    if (row > 0 && row < shared_rows) continue;
    std::string ends;
    bool any = false;
    for (int64_t c = 0; c < chunks; ++c) {
      uint64_t end = 0;
      for (int64_t part = 0; part < (row == 0 ? shared_rows : 1); ++part)
        for (int64_t b = c * bands_per_chunk; b < std::min(gate_up_bands, (c + 1) * bands_per_chunk); ++b)
          end = std::max(end, cta_point(0, (row + part) * gate_up_bands + b, MOE_TRACE_END, true));
      any = any || end != 0;
      char text[32];
      std::snprintf(text, sizeof(text), "%s%.2f", c == 0 ? "" : " ", us(end));
      ends += text;
    }
    if (!any) continue;
    std::string down;
    for (const int slot : {int(MOE_TRACE_START), int(MOE_TRACE_READY), int(MOE_TRACE_X_STAGED), int(MOE_TRACE_END)}) {
      std::vector<double> t;
      for (int64_t part = 0; part < (row == 0 ? shared_rows : 1); ++part)
        for (int64_t b = 0; b < down_bands; ++b) {
          const uint64_t v = cta_point(1, (row + part) * down_bands + b, slot, slot == MOE_TRACE_END);
          if (v != 0) t.push_back(us(v));
        }
      std::sort(t.begin(), t.end());
      char text[48];
      const double median = t.empty() ? 0.0 : t[t.size() / 2], last = t.empty() ? 0.0 : t.back();
      std::snprintf(text, sizeof(text), " %.2f / %.2f |", median, last);
      down += text;
    }
    std::printf("| %s | %s |%s\n", row == 0 ? "shared" : std::to_string(row - shared_rows + 1).c_str(), ends.c_str(),
                down.c_str());
  }
  // The SM hand-over: the gate/up CTA ends per SM, then each down CTA's start after the latest of them before it.
  std::vector<std::pair<uint64_t, uint64_t>> ends;  // (SM, end)
  for (int64_t cta = 0; cta < int64_t(host[0].size()) / (kMoeTraceWarpsPerCta * kMoeTraceSlots); ++cta) {
    const uint64_t end = cta_point(0, cta, MOE_TRACE_END, true);
    if (end != 0) ends.emplace_back(host[0][cta * kMoeTraceWarpsPerCta * kMoeTraceSlots + MOE_TRACE_SM], end);
  }
  std::vector<double> gaps;
  int early = 0;
  for (int64_t cta = 0; cta < rows * down_bands; ++cta) {
    const uint64_t start = cta_point(1, cta, MOE_TRACE_START, false);
    if (start == 0) continue;
    const uint64_t sm = host[1][cta * kMoeTraceWarpsPerCta * kMoeTraceSlots + MOE_TRACE_SM];
    uint64_t before = 0;
    for (const auto& [s, end] : ends)
      if (s == sm && end <= start) before = std::max(before, end);
    if (before == 0)
      ++early;
    else
      gaps.push_back(double(start - before) * 1e-3);
  }
  std::sort(gaps.begin(), gaps.end());
  if (!gaps.empty())
    std::printf("down CTA start after the SM's last gate/up CTA end before it: median %.2f, p90 %.2f, max %.2f us "
                "(%zu CTAs); %d down CTAs started before any gate/up CTA of their SM ended\n",
                gaps[gaps.size() / 2], gaps[gaps.size() * 9 / 10], gaps.back(), gaps.size(), early);
}

// --trace: the timeline of one cold call at T <= 8 (a streamed path's parameters, plain stream launches chained as in
// a model step): both expert launches traced (MoeRunParams::trace_gate_up / trace_down), each point's median and
// latest time over the launch's working warps, in µs from the gate/up launch's first CTA start; the shared
// expert's CTAs (its grid rows) apart from the routed ones; then print_trace_items.
void print_trace(const Model& model, int T, WeightFormat routed_format, Path path, cudaStream_t stream) {
  const MoeConfig& c = model.config;
  std::vector<DeviceMoeWeights> layers;
  for (int l = 0; l < model.layers; ++l)
    layers.push_back(
        DeviceMoeWeights::synthetic(c, MoeSyntheticSpec{.routed_format = routed_format}, 1000 + uint64_t(l)));
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> host_u(size_t(T) * size_t(c.hidden));
  for (float& v : host_u) v = normal(rng);
  DeviceBuffer u(host_u.size() * sizeof(float), "u"), out(host_u.size() * sizeof(float), "out");
  u.upload(host_u.data(), u.bytes());
  const size_t workspace_bytes = moe_workspace_bytes(c, T);
  DeviceBuffer workspace(workspace_bytes, "moe workspace");
  prepare_moe_workspace(workspace.data(), workspace_bytes, stream);
  const size_t words[2] = {moe_expert_trace_words(c, T, true), moe_expert_trace_words(c, T, false)};
  DeviceBuffer traces[2] = {DeviceBuffer(words[0] * 8, "gate/up trace"), DeviceBuffer(words[1] * 8, "down trace")};
  MoeRunParams params = path_params(path);
  params.u = u.as<float>(), params.out = out.as<float>(), params.tokens = T, params.stream = stream;
  params.workspace = workspace.data(), params.workspace_bytes = workspace_bytes;
  auto call = [&](int layer, bool traced) {
    MoeRunParams p = params;
    if (traced) p.trace_gate_up = traces[0].as<uint64_t>(), p.trace_down = traces[1].as<uint64_t>();
    run_moe(layers[size_t(layer)], p);
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  };
  for (int round = 0; round < 2; ++round) {  // the second round's traced call: warm code, cold weights
    for (int l = 1; l < model.layers; ++l) call(l, false);
    for (DeviceBuffer& t : traces) t.fill_bytes(0);
    call(0, true);
  }
  std::vector<uint64_t> host[2];
  for (int g = 0; g < 2; ++g) {
    host[g].resize(words[g]);
    traces[g].download(host[g].data(), words[g] * 8);
  }
  uint64_t t0 = ~0ull;
  for (size_t w = 0; w < words[0] / kMoeTraceSlots; ++w)
    if (host[0][w * kMoeTraceSlots + MOE_TRACE_START] != 0)
      t0 = std::min(t0, host[0][w * kMoeTraceSlots + MOE_TRACE_START]);
  const char* names[kMoeTraceSlots] = {};
  names[MOE_TRACE_START] = "CTA start", names[MOE_TRACE_ISSUED] = "first copies issued";
  names[MOE_TRACE_READY] = "inputs ready (wait passed)", names[MOE_TRACE_X_STAGED] = "x staged";
  names[MOE_TRACE_WRITTEN] = "rows written", names[MOE_TRACE_END] = "end (after the combine)";
  names[MOE_TRACE_COMBINE_READY] = "combine: band arrived (summing CTAs)";
  static const char* kStageNames[2 * kMoeTraceStages] = {
      "stage 0 arrived", "stage 0 multiplied", "stage 1 arrived", "stage 1 multiplied", "stage 2 arrived",
      "stage 2 multiplied", "stage 3 arrived", "stage 3 multiplied", "stage 4 arrived", "stage 4 multiplied",
      "stage 5 arrived", "stage 5 multiplied", "stage 6 arrived", "stage 6 multiplied", "stage 7 arrived",
      "stage 7 multiplied"};
  for (int j = 0; j < 2 * kMoeTraceStages; ++j) names[MOE_TRACE_STAGE + j] = kStageNames[j];
  const int64_t gate_up_bands = (c.intermediate + kMoeDownBandRows / 2 - 1) / (kMoeDownBandRows / 2);
  const int64_t down_bands = (c.hidden + kMoeDownBandRows - 1) / kMoeDownBandRows;
  const int shared_rows = moe_splits_shared_expert(layers.front(), params) ? 2 : 1;
  std::printf("trace %s T=%d %s (%s routed experts), µs from the gate/up launch's first CTA start: median / latest "
              "over the working warps, shared expert (its grid rows) | routed\n",
              model.name, T, kPaths[int(path)].name, routed_format == WeightFormat::NVFP4 ? "NVFP4" : "MXFP4");
  for (int g = 0; g < 2; ++g) {
    const int64_t bands = g == 0 ? gate_up_bands : down_bands;
    std::set<uint64_t> cta_sms;
    int ctas = 0;
    std::printf("| %s | shared median | shared latest | routed median | routed latest |\n|---|---|---|---|---|\n",
                g == 0 ? "gate/up" : "down");
    for (int slot = MOE_TRACE_START; slot < kMoeTraceSlots; ++slot) {
      std::vector<double> times[2];
      for (size_t w = 0; w < words[g] / kMoeTraceSlots; ++w) {
        const uint64_t* r = host[g].data() + w * kMoeTraceSlots;
        if (r[MOE_TRACE_READY] == 0 || r[slot] == 0) continue;  // CTAs without an item; points not reached
        if (slot == MOE_TRACE_START && w % kMoeTraceWarpsPerCta == 0) ++ctas, cta_sms.insert(r[MOE_TRACE_SM]);
        const bool shared = int64_t(w / kMoeTraceWarpsPerCta) < bands * shared_rows;
        times[shared ? 0 : 1].push_back(double(int64_t(r[slot] - t0)) * 1e-3);
      }
      if (times[0].empty() && times[1].empty()) continue;
      std::printf("| %s |", names[slot]);
      for (std::vector<double>& t : times) {
        std::sort(t.begin(), t.end());
        if (t.empty())
          std::printf(" - | - |");
        else
          std::printf(" %.2f | %.2f |", t[t.size() / 2], t.back());
      }
      std::printf("\n");
    }
    std::printf("(%s: %d working CTAs on %zu SMs)\n", g == 0 ? "gate/up" : "down", ctas, cta_sms.size());
  }
  print_trace_items(host, t0, gate_up_bands, down_bands, c.intermediate, shared_rows);
}

// --stream-layout: the HBM rate of the streamed experts' weight copies alone, in the stored order as uploaded. Each
// warp streams 16 rows × 2048 bytes (V4-Flash's w1 / w3 rows, NVFP4 with its scales) through a ring of kSlots slots
// in stages of 16 × 256 data bytes and 16 × 32 scale bytes, as the MoE kernels do (8 warps a CTA, 2 CTAs per SM),
// with no multiply (or a spin of the stage's multiply time): the stage's boxes cut from 16 rows of 2048 bytes (16
// pieces of 256 bytes, 2 KB apart; scales 16 × 32 bytes, 256 apart). "start": cycles each CTA waits before its first
// copies (the MoE CTAs' item and view reads before theirs).
namespace layout_probe {

constexpr int kWarps = 8, kSlots = 2, kRowBytes = 2048, kStages = kRowBytes / tile::stream::kRowBytes;

__global__ void __launch_bounds__(kWarps * 32, 2)
    stream_probe_kernel(const tile::stream::StreamMaps* maps, int spin_cycles, int start_cycles, uint32_t* sink) {
  namespace st = tile::stream;
  constexpr tile::TileFormat F = tile::TileFormat::NVFP4;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ uint64_t full[kWarps][kSlots];
  const int warp = int(threadIdx.x) / 32;
  uint8_t* ring = st::align_slots(smem) + size_t(warp) * kSlots * st::kSlotBytes;
  const int64_t band_row0 = (int64_t(blockIdx.x) * kWarps + warp) * tile::kTileRows;
  auto issue = [&](int j) {
    st::issue_stage<F>(maps, band_row0, int64_t(j) * st::stage_k(F), ring + (j % kSlots) * st::kSlotBytes,
                       &full[warp][j % kSlots]);
  };
  auto spin = [](int cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {
    }
  };
  spin(start_cycles);
  st::init_ring(full[warp], kSlots);
  __syncwarp();
  for (int j = 0; j < kSlots; ++j) issue(j);
  uint32_t acc = 0;
  for (int j = 0; j < kStages; ++j) {
    sm90::mbarrier_wait(&full[warp][j % kSlots], uint32_t(j / kSlots) & 1u);
    acc += *reinterpret_cast<const uint32_t*>(ring + (j % kSlots) * st::kSlotBytes + 4 * (threadIdx.x % 32));
    spin(spin_cycles);
    __syncwarp();
    if (j + kSlots < kStages) issue(j + kSlots);
  }
  if (acc == 0x9E3779B9u) *sink = acc;  // keeps the reads
}

void run(cudaStream_t stream, double copy_gbps) {
  namespace st = tile::stream;
  const int sms = device_multiprocessors();
  const int64_t ctas = int64_t(sms) * 2 * 6, rows = ctas * kWarps * tile::kTileRows;
  DeviceBuffer data(size_t(rows) * kRowBytes, "probe data"), scales(size_t(rows) * kRowBytes / 8, "probe scales");
  DeviceBuffer sink(4, "probe sink");
  data.fill_bytes(0x11);
  scales.fill_bytes(0x38);
  DeviceMatrixView w;
  w.format = WeightFormat::NVFP4, w.scale_type = ScaleType::E4M3;
  w.rows = rows, w.cols = int64_t(kRowBytes) * 2;
  w.data = data.as<uint8_t>(), w.scales = scales.as<uint8_t>();
  w.data_row_bytes = size_t(w.cols / 2), w.scales_per_row = w.cols / 16;
  const st::StreamMaps host_maps = st::encode_stream_maps(w, tile::TileFormat::NVFP4, "probe rows");
  DeviceBuffer maps(sizeof host_maps, "probe maps");
  maps.upload(&host_maps, sizeof host_maps);
  const size_t smem = size_t(kWarps) * kSlots * st::kSlotBytes + st::kSlotAlignment;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(stream_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const double bytes = double(data.bytes() + scales.bytes());
  std::printf("stream layout probe: %lld CTAs of %d warps, %.0f MB, ring %d slots; copy %.0f GB/s\n",
              (long long)ctas, kWarps, bytes / 1e6, kSlots, copy_gbps);
  StreamTimer timer;
  struct Case {
    int spin, start;
  };
  const Case cases[] = {{0, 0}, {1600, 0}, {1600, 4000}, {1600, 8000}};
  std::vector<float> ms[std::size(cases)];
  for (int rep = 0; rep < 7; ++rep)
    for (size_t c = 0; c < std::size(cases); ++c)
      ms[c].push_back(timer.elapsed_ms(stream, [&] {
        stream_probe_kernel<<<unsigned(ctas), kWarps * 32, smem, stream>>>(
            maps.as<st::StreamMaps>(), cases[c].spin, cases[c].start, sink.as<uint32_t>());
        DSV4_CUDA_CHECK(cudaGetLastError());
      }));
  for (size_t c = 0; c < std::size(cases); ++c) {
    std::sort(ms[c].begin(), ms[c].end());
    const double us = 1e3 * ms[c][ms[c].size() / 2];
    std::printf("  spin %4d cycles/stage, start %4d cycles: %8.1f us  %6.0f GB/s  %5.1f %% of copy\n", cases[c].spin,
                cases[c].start, us, bytes / us / 1e3, 100.0 * bytes / us / 1e3 / copy_gbps);
  }
}

}  // namespace layout_probe

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path, model_filter;
  std::vector<int> token_counts = {1, 4, 16, 64, 256, 4096};
  std::set<Path> paths;
  for (const PathSpec& spec : kPaths) paths.insert(spec.path);
  WeightFormat routed_format = WeightFormat::MXFP4;
  bool trace = false, paths_named = false, stream_layout = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--trace") == 0) {
      trace = true;
    } else if (std::strcmp(argv[i], "--stream-layout") == 0) {
      stream_layout = true;
    } else if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_filter = argv[++i];
    } else if (std::strcmp(argv[i], "--format") == 0 && i + 1 < argc) {
      const std::string format = argv[++i];
      if (format != "mxfp4" && format != "nvfp4") {
        std::fprintf(stderr, "bench_cuda_moe: --format takes mxfp4 or nvfp4 (the routed experts)\n");
        return 2;
      }
      routed_format = format == "nvfp4" ? WeightFormat::NVFP4 : WeightFormat::MXFP4;
    } else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
      token_counts.clear();
      for (const char* p = argv[++i]; *p != 0;) {
        char* end = nullptr;
        const long t = std::strtol(p, &end, 10);
        if (end == p || t < 1 || t > 65536) {
          std::fprintf(stderr, "bench_cuda_moe: --tokens takes counts 1..65536, comma separated\n");
          return 2;
        }
        token_counts.push_back(int(t));
        p = *end == ',' ? end + 1 : end;
      }
    } else if (std::strcmp(argv[i], "--paths") == 0 && i + 1 < argc) {
      paths.clear();
      paths_named = true;
      const std::string list = argv[++i];
      for (size_t begin = 0; begin <= list.size();) {
        const size_t end = std::min(list.find(',', begin), list.size());
        const std::string name = list.substr(begin, end - begin);
        const auto* known = std::find_if(std::begin(kPaths), std::end(kPaths),
                                         [&](const PathSpec& spec) { return name == spec.name; });
        if (known == std::end(kPaths)) {
          std::fprintf(stderr, "bench_cuda_moe: unknown path '%s'; known:", name.c_str());
          for (const PathSpec& spec : kPaths) std::fprintf(stderr, " %s", spec.name);
          std::fprintf(stderr, "\n");
          return 2;
        }
        paths.insert(known->path);
        begin = end + 1;
      }
    } else {
      std::fprintf(stderr, "usage: bench_cuda_moe [--json PATH] [--tokens 1,4,...] [--model flash|pro] "
                           "[--format mxfp4|nvfp4] [--trace] "
                           "[--paths streamed,tile-decode,fused-router,fused-router+tile-decode,"
                           "unsplit-shared,split-shared-to-8,no-down-head-start,no-columns|columns,"
                           "down-waits-grid|down-waits-item,"
                           "register]\n"
                           "       bench_cuda_moe --stream-layout\n");
      return 2;
    }
  }
  if (stream_layout && argc != 2) {
    std::fprintf(stderr, "bench_cuda_moe: --stream-layout runs alone (it takes none of --json, --tokens, --model, "
                         "--format, --paths, --trace)\n");
    return 2;
  }
  try {
    const std::vector<DeviceInfo> devices = list_devices();
    if (devices.empty()) {
      std::fprintf(stderr, "bench_cuda_moe: no CUDA device\n");
      return 1;
    }
    const DeviceInfo& device = devices.front();
    cudaStream_t stream;
    DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const Model models[] = {
        {"flash", MoeConfig{.hidden = 4096, .intermediate = 2048, .experts = 256, .top_k = 6,
                            .routed_scaling_factor = 1.5f, .swiglu_limit = 10.0f}, 4},
        {"pro", MoeConfig{.hidden = 7168, .intermediate = 3072, .experts = 384, .top_k = 6,
                          .routed_scaling_factor = 2.5f, .swiglu_limit = 10.0f}, 2},
    };
    if (stream_layout || trace)  // (the timed run's card below adds its floors)
      std::printf("device: %s (%d SMs)\n", device.name.c_str(), device.multiprocessors);
    if (stream_layout) {
      layout_probe::run(stream, copy_bandwidth_gbps(stream));
      DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
      return 0;
    }
    if (trace) {
      // The streamed kernels' default, or the streamed paths named by --paths (the options' A/B in one run).
      std::vector<Path> trace_paths;
      for (const Path path : paths)
        if (path != Path::REGISTER && (paths_named || path == Path::STREAMED)) trace_paths.push_back(path);
      for (const Model& model : models) {
        if (!model_filter.empty() && model_filter != model.name) continue;
        for (const int T : token_counts)
          for (const Path path : trace_paths)
            if (T <= kMoeFusedCombineMaxTokens) print_trace(model, T, routed_format, path, stream);
      }
      DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
      return 0;
    }
    cublasHandle_t cublas = nullptr;
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
    BENCH_CUBLAS_CHECK(cublasSetStream(cublas, stream));  // (resets the workspace: set it after)
    DeviceBuffer cublas_workspace(size_t(32) << 20, "cuBLAS workspace");  // explicit: graph capture allocates none
    BENCH_CUBLAS_CHECK(cublasSetWorkspace(cublas, cublas_workspace.data(), cublas_workspace.bytes()));
    const Floors floors{.copy_gbps = copy_bandwidth_gbps(stream), .tensor_tflops = cublas_bf16_tflops(cublas, stream)};
    std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s; cuBLAS bf16 "
                "8192^3: %.0f TFLOP/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, floors.copy_gbps,
                floors.tensor_tflops);
    std::vector<Result> results;
    for (const Model& model : models) {
      if (!model_filter.empty() && model_filter != model.name) continue;
      const std::vector<Result> r = bench_model(model, token_counts, paths, routed_format, floors, cublas, stream);
      results.insert(results.end(), r.begin(), r.end());
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));
    DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
    if (!json_path.empty()) {
      FILE* out = std::fopen(json_path.c_str(), "w");
      check(out != nullptr, "bench_cuda_moe: cannot write ", json_path);
      std::fprintf(out,
                   "{\n  \"benchmark\": \"bench_cuda_moe\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n"
                   "  \"copy_gbps\": %.1f,\n  \"cublas_bf16_tflops\": %.1f,\n"
                   "  \"weights\": \"%s routed, FP8 shared, bf16 router, scored\",\n"
                   "  \"baseline\": \"cuBLAS bf16 GEMMs per touched expert, same routing, one CUDA graph\",\n"
                   "  \"results\": [\n",
                   device.name.c_str(), device.multiprocessors, floors.copy_gbps, floors.tensor_tflops,
                   routed_format == WeightFormat::NVFP4 ? "NVFP4" : "MXFP4");
      for (size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        std::fprintf(out,
                     "    {\"model\": \"%s\", \"path\": \"%s\", \"tokens\": %d, \"us\": %.2f, \"experts_touched\": %.2f, "
                     "\"touched_bytes\": %.0f, \"gbps\": %.1f, \"copy_share\": %.4f, \"tflops\": %.2f, "
                     "\"tensor_share\": %.4f, \"floor_share\": %.4f, \"baseline_us\": %.2f, "
                     "\"launches\": %zu, \"stage_us\": {\"router\": %.2f, \"route_bucket\": %.2f, "
                     "\"gate_up\": %.2f, \"down\": %.2f, \"combine\": %.2f}}%s\n",
                     r.model.c_str(), r.path.c_str(), r.tokens, r.us, r.experts_touched, r.touched_bytes, r.gbps,
                     r.copy_share, r.tflops, r.tensor_share, r.floor_share, r.baseline_us, r.launches, r.stage_us[0],
                     r.stage_us[1], r.stage_us[2], r.stage_us[3], r.stage_us[4], i + 1 < results.size() ? "," : "");
      }
      std::fprintf(out, "  ]\n}\n");
      std::fclose(out);
      std::printf("wrote %s\n", json_path.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_moe: %s\n", e.what());
    return 1;
  }
  return 0;
}
