// MoE sub-block benchmark on the GPU: run_moe for V4-Flash (E 256, d 4096, I 2048, top 6) and V4-Pro (E 384,
// d 7168, I 3072) layers of synthetic weights generated on the device (MXFP4 routed experts, FP8 shared expert,
// bf16 router, scored routing through a random router and bias, so tokens spread over the experts roughly
// uniformly), T ∈ {1, 4, 16, 64, 256, 4096}.
// Each call is a CUDA graph of the whole sub-block (which also checks that it captures). Calls rotate over several
// layers and fresh inputs so that the touched experts (and the shared expert) come from HBM, not from L2.
// Reported per T: time per call, the bytes of the experts actually touched (routed, counted from the routing of each
// input, plus the shared expert) / time, that rate as a share of the same-run device copy bandwidth (cudaMemcpy D2D
// of 1 GiB, read + write), TFLOP/s of the expert GEMMs, and the kernel launches in the graph. At T <= 8 both
// expert-kernel paths are timed: "streamed" (weights through shared memory, the default there) and "register".
// Usage: bench_cuda_moe [--json PATH] [--tokens 1,4,...] [--model flash|pro]
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

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/moe.hpp"
#include "backends/cuda/moe_weights.hpp"
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
  std::string path;  // expert kernels: "streamed" or "register"
  int tokens = 0;
  double us = 0, touched_bytes = 0, experts_touched = 0, gbps = 0, copy_share = 0, tflops = 0;
  double stage_us[kMoeStages] = {};  // router, scoring + bucketing, gate/up, down, combine (serialised stream launches)
  size_t launches = 0;
};

// Keeps the stream busy for `cycles` SM clocks, so that the launches queued behind it start back to back.
__global__ void hold_stream_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

size_t expert_bytes(const MoeExpertView& e) { return e.w1.stored_bytes + e.w3.stored_bytes + e.w2.stored_bytes; }

// One rotation slot: a layer, an input, the captured graph, and what its routing touches.
struct Slot {
  int layer = 0;
  DeviceBuffer u, workspace;
  cudaGraphExec_t graph = nullptr;
  double touched_bytes = 0;
  int experts_touched = 0;
};

std::vector<Result> bench_model(const Model& model, const std::vector<int>& token_counts, double copy_gbps,
                                cudaStream_t stream) {
  const MoeConfig& c = model.config;
  std::vector<DeviceMoeWeights> layers;
  for (int l = 0; l < model.layers; ++l)
    layers.push_back(DeviceMoeWeights::synthetic(c, MoeSyntheticSpec{}, 1000 + uint64_t(l)));
  std::vector<Result> results;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // (T, streamed decode): at most 8 tokens both expert-kernel paths, above that the register path alone.
  std::vector<std::pair<int, bool>> cases;
  for (const int T : token_counts) {
    cases.emplace_back(T, true);
    if (T <= kMoeMaxStreamedTokens) cases.emplace_back(T, false);
  }
  for (const auto& [T, streamed] : cases) {
    constexpr int kSlots = 8;
    const size_t workspace_bytes = moe_workspace_bytes(c, T);
    DeviceBuffer out(size_t(T) * size_t(c.hidden) * sizeof(float), "out");
    std::vector<Slot> slots(kSlots);
    std::vector<float> u(size_t(T) * size_t(c.hidden));
    size_t launches = 0;
    for (int s = 0; s < kSlots; ++s) {
      Slot& slot = slots[size_t(s)];
      slot.layer = s % model.layers;
      for (float& v : u) v = normal(rng);
      slot.u = DeviceBuffer(u.size() * sizeof(float), "u");
      slot.u.upload(u.data(), u.size() * sizeof(float));
      slot.workspace = DeviceBuffer(workspace_bytes, "moe workspace");
      prepare_moe_workspace(slot.workspace.data(), workspace_bytes, stream);
      const MoeRunParams params{.u = slot.u.as<float>(),
                                .out = out.as<float>(),
                                .tokens = T,
                                .workspace = slot.workspace.data(),
                                .workspace_bytes = workspace_bytes,
                                .stream = stream,
                                .streamed_decode = streamed};
      const DeviceMoeWeights& weights = layers[size_t(slot.layer)];
      run_moe(weights, params);  // once uncaptured: any one-time setup happens outside the capture
      cudaGraph_t graph;
      DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      run_moe(weights, params);
      DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      size_t nodes = 0;
      DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &nodes));
      launches = nodes;
      DSV4_CUDA_CHECK(cudaGraphInstantiate(&slot.graph, graph, 0));
      DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
      DSV4_CUDA_CHECK(cudaGraphLaunch(slot.graph, stream));
      check_moe_status(params);
      // What this input's routing touches.
      const MoeWorkspaceView view = moe_workspace_view(c, T, slot.workspace.data());
      std::vector<int32_t> ids(size_t(T) * size_t(c.top_k));
      DSV4_CUDA_CHECK(cudaMemcpy(ids.data(), view.expert_ids, ids.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
      const std::set<int32_t> touched(ids.begin(), ids.end());
      slot.experts_touched = int(touched.size());
      slot.touched_bytes = double(expert_bytes(weights.experts().back()));  // the shared expert
      for (const int32_t e : touched) slot.touched_bytes += double(expert_bytes(weights.experts()[size_t(e)]));
    }
    const int iterations = T >= 1024 ? 4 : 25;
    for (int s = 0; s < kSlots; ++s) DSV4_CUDA_CHECK(cudaGraphLaunch(slots[size_t(s)].graph, stream));
    const float ms = stream_elapsed_ms(stream, [&] {
      for (int i = 0; i < iterations; ++i)
        for (int s = 0; s < kSlots; ++s) DSV4_CUDA_CHECK(cudaGraphLaunch(slots[size_t(s)].graph, stream));
    });

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
          run_moe(layers[size_t(slot.layer)], {.u = slot.u.as<float>(),
                                               .out = out.as<float>(),
                                               .tokens = T,
                                               .workspace = slot.workspace.data(),
                                               .workspace_bytes = workspace_bytes,
                                               .stream = stream,
                                               .stage_events = stage_events,
                                               .streamed_decode = streamed});
          DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
          for (int st = 0; st < kMoeStages; ++st) {
            float stage_ms = 0;
            DSV4_CUDA_CHECK(cudaEventElapsedTime(&stage_ms, stage_events[st], stage_events[st + 1]));
            stage_us[st] += double(stage_ms) * 1e3 / (stage_runs * kSlots);
          }
        }
      for (cudaEvent_t& e : stage_events) DSV4_CUDA_CHECK(cudaEventDestroy(e));
    }

    const bool streamed_path = streamed && T <= kMoeMaxStreamedTokens && layers.front().streamed_tiles();
    Result r{.model = model.name, .path = streamed_path ? "streamed" : "register", .tokens = T, .launches = launches};
    std::copy(std::begin(stage_us), std::end(stage_us), std::begin(r.stage_us));
    r.us = double(ms) * 1e3 / (iterations * kSlots);
    for (const Slot& slot : slots) {
      r.touched_bytes += slot.touched_bytes / kSlots;
      r.experts_touched += double(slot.experts_touched) / kSlots;
      DSV4_CUDA_CHECK(cudaGraphExecDestroy(slot.graph));
    }
    r.gbps = r.touched_bytes / (r.us * 1e3);
    r.copy_share = r.gbps / copy_gbps;
    const double rows = double(T) * double(c.top_k + 1);
    r.tflops = 2.0 * rows * 3.0 * double(c.hidden) * double(c.intermediate) / (r.us * 1e6);
    std::printf("%-6s T = %5d %-8s: %9.1f us  %6.1f experts + shared touched  %8.1f MB  %7.0f GB/s  %5.1f %% of copy  "
                "%6.1f TFLOP/s  %zu launches\n",
                model.name, T, r.path.c_str(), r.us, r.experts_touched, r.touched_bytes / 1e6, r.gbps, 100.0 * r.copy_share,
                r.tflops, r.launches);
    std::printf("         stages (serialised, events between): router %.1f us, route+bucket %.1f us, "
                "gate/up %.1f us, down %.1f us, combine %.1f us\n",
                r.stage_us[0], r.stage_us[1], r.stage_us[2], r.stage_us[3], r.stage_us[4]);
    results.push_back(r);
  }
  return results;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path, model_filter;
  std::vector<int> token_counts = {1, 4, 16, 64, 256, 4096};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_filter = argv[++i];
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
    } else {
      std::fprintf(stderr, "usage: bench_cuda_moe [--json PATH] [--tokens 1,4,...] [--model flash|pro]\n");
      return 2;
    }
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
    const double copy_gbps = copy_bandwidth_gbps(stream);
    std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, copy_gbps);
    const Model models[] = {
        {"flash", MoeConfig{.hidden = 4096, .intermediate = 2048, .experts = 256, .top_k = 6,
                            .routed_scaling_factor = 1.5f, .swiglu_limit = 10.0f}, 4},
        {"pro", MoeConfig{.hidden = 7168, .intermediate = 3072, .experts = 384, .top_k = 6,
                          .routed_scaling_factor = 2.5f, .swiglu_limit = 10.0f}, 2},
    };
    std::vector<Result> results;
    for (const Model& model : models) {
      if (!model_filter.empty() && model_filter != model.name) continue;
      const std::vector<Result> r = bench_model(model, token_counts, copy_gbps, stream);
      results.insert(results.end(), r.begin(), r.end());
    }
    DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
    if (!json_path.empty()) {
      FILE* out = std::fopen(json_path.c_str(), "w");
      check(out != nullptr, "bench_cuda_moe: cannot write ", json_path);
      std::fprintf(out,
                   "{\n  \"benchmark\": \"bench_cuda_moe\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n"
                   "  \"copy_gbps\": %.1f,\n  \"weights\": \"MXFP4 routed, FP8 shared, bf16 router, scored\",\n"
                   "  \"results\": [\n",
                   device.name.c_str(), device.multiprocessors, copy_gbps);
      for (size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        std::fprintf(out,
                     "    {\"model\": \"%s\", \"path\": \"%s\", \"tokens\": %d, \"us\": %.2f, \"experts_touched\": %.2f, "
                     "\"touched_bytes\": %.0f, \"gbps\": %.1f, \"copy_share\": %.4f, \"tflops\": %.2f, "
                     "\"launches\": %zu, \"stage_us\": {\"router\": %.2f, \"route_bucket\": %.2f, "
                     "\"gate_up\": %.2f, \"down\": %.2f, \"combine\": %.2f}}%s\n",
                     r.model.c_str(), r.path.c_str(), r.tokens, r.us, r.experts_touched, r.touched_bytes, r.gbps, r.copy_share,
                     r.tflops, r.launches, r.stage_us[0], r.stage_us[1], r.stage_us[2], r.stage_us[3], r.stage_us[4],
                     i + 1 < results.size() ? "," : "");
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
