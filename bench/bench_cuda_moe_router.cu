// The MoE router stage alone on the GPU (run_moe_routing at T <= 8 with fused_routing: logits of E experts from an
// fp32 u over the router, scoring with a bias, top 6, weights and the bucketing of work items, one launch) for
// V4-Flash (E 256, d 4096) and V4-Pro (E 384, d 7168) routers in F32 and BF16, T ∈ {1, 2, 4, 8}, through two paths:
// "fused" (moe_router_logits_kernel with the routing in its last CTA) and "decode" (MoeRoutingParams::decode_router).
// Each timing is a CUDA graph of back-to-back calls, chained by programmatic dependent launch as in a decode step,
// that rotates over enough router layers (fresh random weights each) for every call to read its router from HBM;
// reported: µs per call, the byte floor (router bytes / same-run copy bandwidth, read + write counted, as every
// bench here) and its share of the time.
// --follower: each call is followed (PDL-chained) by a stand-in for the streamed expert kernel that follows the
// router in the model (2 CTAs per SM of 256 threads, ~128 registers and 100 KB of shared memory each, streaming its
// share of 32 MB into registers before its grid-dependency wait), and the pair is timed, beside the follower alone:
// how much of the follower's head start each router leaves it.
// --ncu: no timing; each (T, path) runs twice outside graphs, for `ncu -k regex:moe_router` (one call per kernel
// profiled, ncu's own cache control).
// Usage: bench_cuda_moe_router [--json PATH] [--tokens 1,2,...] [--model flash|pro] [--format f32|bf16] [--follower]
//        [--ncu]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/error.hpp"

#include "support/moe_routing_buffers.hpp"
#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

// The follower (see --follower): 30 16-byte loads per thread held in registers across the wait.
inline constexpr int kFollowerLoads = 30;
inline constexpr int kFollowerThreads = 256;
inline constexpr size_t kFollowerSmem = 100 * 1024;

struct FollowerArgs {
  const uint4* weights;
  uint32_t* sink;
};

__global__ void __launch_bounds__(kFollowerThreads, 2) expert_like_follower(const FollowerArgs a) {
  extern __shared__ uint4 staging[];
  uint4 v[kFollowerLoads];
  const uint4* w = a.weights + size_t(blockIdx.x) * kFollowerLoads * kFollowerThreads + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kFollowerLoads; ++j) v[j] = __ldg(w + j * kFollowerThreads);
  wait_for_prior_grids();
  allow_dependents();
  uint32_t acc = 0;
#pragma unroll
  for (int j = 0; j < kFollowerLoads; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  staging[threadIdx.x] = make_uint4(acc, 0, 0, 0);
  __syncthreads();
  if (threadIdx.x == 0) a.sink[blockIdx.x] = staging[kFollowerThreads - 1].x ^ acc;
}

struct Follower {
  DeviceBuffer weights, sink;
  unsigned ctas;
  explicit Follower(int multiprocessors)
      : weights(size_t(2 * multiprocessors) * kFollowerLoads * kFollowerThreads * 16, "follower weights"),
        sink(size_t(2 * multiprocessors) * 4, "follower sink"), ctas(unsigned(2 * multiprocessors)) {
    weights.fill_bytes(0x3C);
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(expert_like_follower, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kFollowerSmem)));
  }
  void launch(cudaStream_t stream) {
    launch_chained(expert_like_follower, dim3(ctas), dim3(kFollowerThreads), kFollowerSmem, stream,
                   FollowerArgs{weights.as<const uint4>(), sink.as<uint32_t>()}, "expert_like_follower");
  }
};

struct RouterModel {
  const char* name;
  int experts, hidden, top_k;
};

struct Result {
  std::string model, format, path;
  int tokens = 0;
  double us = 0, floor_us = 0;
};

// One router layer on the device: weights of N(0, (2/√d)²) and a bias of N(0, 0.1²).
struct RouterLayer {
  DeviceBuffer router, bias;
};

RouterLayer make_layer(const RouterModel& m, WeightFormat format, std::mt19937& rng) {
  const size_t n = size_t(m.experts) * size_t(m.hidden);
  const std::vector<float> w = normal_floats(n, 2.0f / std::sqrt(float(m.hidden)), rng);
  RouterLayer layer;
  if (format == WeightFormat::BF16) {
    std::vector<uint16_t> bits(n);
    std::transform(w.begin(), w.end(), bits.begin(), [](float v) { return float_to_bf16(v); });
    layer.router = to_device(bits, "router");
  } else {
    layer.router = to_device(w, "router");
  }
  layer.bias = to_device(normal_floats(size_t(m.experts), 0.1f, rng), "bias");
  return layer;
}

void bench_model(const RouterModel& m, WeightFormat format, const std::vector<int>& token_counts, bool ncu,
                 Follower* follower, double copy_gbps, size_t l2_bytes, cudaStream_t stream,
                 std::vector<Result>& results) {
  const size_t router_bytes = size_t(m.experts) * size_t(m.hidden) * (format == WeightFormat::BF16 ? 2 : 4);
  // Twice the L2 in routers, so each call's router has left L2 by its next use.
  const int layers = ncu ? 1 : int(std::clamp<size_t>(2 * l2_bytes / router_bytes + 1, 2, 64));
  std::mt19937 rng(2026);
  std::vector<RouterLayer> routers;
  for (int l = 0; l < layers; ++l) routers.push_back(make_layer(m, format, rng));
  const int max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  const DeviceBuffer u = to_device(normal_floats(size_t(max_tokens) * m.hidden, 1.0f, rng), "u");
  for (const int T : token_counts) {
    // The routing outputs and scratch (shared by every call, as the model's workspace is).
    MoeRoutingRunBuffers workspace(m.experts, m.hidden, m.top_k, kMoeRowsPerWorkItem, T);
    const char* const paths[] = {"fused", "decode"};
    for (int path = 0; path < 2; ++path) {
      auto call = [&](cudaStream_t s, int layer) {
        run_moe_routing(MoeRoutingParams{
            .router = DeviceMatrixView{.format = format,
                                       .rows = m.experts,
                                       .cols = m.hidden,
                                       .data = routers[size_t(layer)].router.as<uint8_t>()},
            .bias = routers[size_t(layer)].bias.as<float>(),
            .u = u.as<float>(),
            .tokens = T,
            .top_k = m.top_k,
            .routed_scaling_factor = 1.5f,
            .rows_per_item = kMoeRowsPerWorkItem,
            .out = workspace.view(),
            .stream = s,
            .fused_routing = true,
            .decode_router = path == 1,
        });
        if (follower != nullptr) follower->launch(s);
      };
      if (ncu) {
        for (int r = 0; r < 2; ++r) call(stream, 0);
        DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
        continue;
      }
      const int calls = 4 * layers;
      const double us = graph_replay_us(stream, capture_calls(stream, calls, [&, l = 0](cudaStream_t s) mutable {
                                          call(s, l);
                                          l = (l + 1) % layers;
                                        }),
                                        calls);
      Result r{.model = m.name,
               .format = format == WeightFormat::BF16 ? "bf16" : "f32",
               .path = std::string(paths[path]) + (follower != nullptr ? "+follower" : ""),
               .tokens = T,
               .us = us,
               .floor_us = double(router_bytes) / (copy_gbps * 1e3)};
      std::printf("%-5s %-4s T=%d %-21s %8.2f us  floor %5.2f us (%4.1f %%)\n", r.model.c_str(), r.format.c_str(), T,
                  r.path.c_str(), r.us, r.floor_us, 100.0 * r.floor_us / r.us);
      results.push_back(r);
    }
  }
}

int run(int argc, char** argv) {
  std::string json_path, model_filter, format_filter;
  std::vector<int> token_counts = {1, 2, 4, 8};
  bool ncu = false, with_follower = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_filter = argv[++i];
    } else if (std::strcmp(argv[i], "--format") == 0 && i + 1 < argc) {
      format_filter = argv[++i];
    } else if (std::strcmp(argv[i], "--ncu") == 0) {
      ncu = true;
    } else if (std::strcmp(argv[i], "--follower") == 0) {
      with_follower = true;
    } else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
      token_counts.clear();
      for (const char* p = argv[++i]; *p != 0;) {
        char* end = nullptr;
        const long t = std::strtol(p, &end, 10);
        if (end == p || t < 1 || t > kMoeFusedRoutingMaxTokens) {
          std::fprintf(stderr, "bench_cuda_moe_router: --tokens takes counts 1..%d, comma separated\n",
                       kMoeFusedRoutingMaxTokens);
          return 2;
        }
        token_counts.push_back(int(t));
        p = *end == ',' ? end + 1 : end;
      }
    } else {
      std::fprintf(stderr, "usage: bench_cuda_moe_router [--json PATH] [--tokens 1,2,...] [--model flash|pro] "
                           "[--format f32|bf16] [--follower] [--ncu]\n");
      return 2;
    }
  }
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty()) {
    std::fprintf(stderr, "bench_cuda_moe_router: no CUDA device\n");
    return 1;
  }
  const DeviceInfo& device = devices.front();
  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_gbps = ncu ? 0.0 : copy_bandwidth_gbps(stream);
  std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n",
              device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, copy_gbps);
  const RouterModel models[] = {{"flash", 256, 4096, 6}, {"pro", 384, 7168, 6}};
  std::vector<Result> results;
  std::optional<Follower> follower;
  if (with_follower && !ncu) {
    follower.emplace(device.multiprocessors);
    constexpr int kCalls = 64;
    const double us =
        graph_replay_us(stream, capture_calls(stream, kCalls, [&](cudaStream_t s) { follower->launch(s); }), kCalls);
    std::printf("follower alone %8.2f us\n", us);
    results.push_back(Result{.model = "-", .format = "-", .path = "follower", .tokens = 0, .us = us});
  }
  for (const RouterModel& m : models)
    for (const WeightFormat format : {WeightFormat::F32, WeightFormat::BF16}) {
      const char* format_name = format == WeightFormat::BF16 ? "bf16" : "f32";
      if ((!model_filter.empty() && model_filter != m.name) || (!format_filter.empty() && format_filter != format_name))
        continue;
      bench_model(m, format, token_counts, ncu, follower ? &*follower : nullptr, copy_gbps, device.l2_bytes, stream,
                  results);
    }
  DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    check(f != nullptr, "bench_cuda_moe_router: cannot write ", json_path);
    std::fprintf(f, "{\"device\": \"%s\", \"copy_gbps\": %.1f, \"results\": [", device.name.c_str(), copy_gbps);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f, "%s\n  {\"model\": \"%s\", \"format\": \"%s\", \"path\": \"%s\", \"tokens\": %d, \"us\": %.3f, "
                      "\"floor_us\": %.3f}",
                   i == 0 ? "" : ",", r.model.c_str(), r.format.c_str(), r.path.c_str(), r.tokens, r.us, r.floor_us);
    }
    std::fprintf(f, "\n]}\n");
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_moe_router", dsv4::cuda::run, argc, argv);
}
