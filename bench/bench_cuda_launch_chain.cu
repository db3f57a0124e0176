// The launch-chain ceiling of a batch-1 decode step (issue 7's "≥ 75 % of the weight-bandwidth floor"): kernels that
// do nothing but read the weight bytes of V4-Flash sliding-window layers' main path, one kernel per weight-reading
// launch of the model's step, chained as the model chains them (programmatic dependent launches captured in one CUDA
// graph), against the measured copy bandwidth. No real kernel can beat its chain here, so the rows bound what the
// model's launch structure allows and separate it from what the kernels themselves lose.
// Per-kernel bytes are the stored bytes (QuantizedMatrix::stored_bytes, data + scales) of the config's matrices in
// the formats of `bench e2e --format nvfp4`: FP8 block-128 linears and shared expert, NVFP4 routed experts, the bf16
// router and the fp32 mHC projections; the small kernels between them (norms, kv_insert, attention at a short context)
// read ≈ 0 and are kept as launches of 0 bytes. Each launch is SMs × k CTAs of 1024 / k threads, 16-byte loads, 4 in
// flight per thread (up to 64 KB in flight per SM: ptxas keeps no more than 4 of a thread's loads outstanding here).
// Each row is the median of 5 timings of 5 graph replays. The same-run baseline of each chain row is the one-launch row
// of its shape (its time over the chain's: × one launch); the floor is the layer's bytes at the measured copy
// bandwidth. No CPU op exists to check: the kernels only read.
// Rows:
//   - one launch: a layer's bytes in one kernel (no launch boundary);
//   - chain, strict: each kernel waits for its predecessor (griddepcontrol.wait) before its first load;
//   - chain, early: each CTA asks L2 for the first `early` bytes of its share (cp.async.bulk.prefetch.L2) before that
//     wait, as the model's kernels issue their first weight stages;
//   each chain with 1 CTA per SM and 120 KB of shared memory (the next kernel's CTAs cannot start on an SM until this
//   kernel's CTA there has left, like the model's ring-buffered kernels) and with 2 CTAs of 512 threads per SM and no
//   shared memory (the next kernel's CTAs fit beside them).
// Usage: bench_cuda_launch_chain [--layers N] [--early KB]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "cuda_bench_support.hpp"
#include "core/error.hpp"
#include "core/quantized_matrix.hpp"
#include "io/builtin_configs.hpp"
#include "io/model_config.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kThreadsPerSm = 1024;
constexpr int kLoadsInFlight = 4;
constexpr int kTimings = 5;

// XOR of `words` 16-byte words of `data` (this CTA's share) into sink[blockIdx.x], so the loads are not dropped.
// kStrict: wait for the previous grid before any load; else prefetch the share's first `early_bytes` to L2 first.
template <bool kStrict>
__global__ void __launch_bounds__(kThreadsPerSm)
    read_share_kernel(const uint4* data, int64_t words, int64_t early_bytes, uint32_t* sink) {
  const int64_t share = (words + gridDim.x - 1) / gridDim.x;
  const int64_t begin = min(words, share * blockIdx.x), end = min(words, begin + share);
  if constexpr (!kStrict) {
    const int64_t early_end = min(end, begin + early_bytes / 16);
    constexpr int64_t kChunkWords = 4096 / 16;  // 4 KB per prefetch, one per thread
    for (int64_t w = begin + int64_t(threadIdx.x) * kChunkWords; w < early_end;
         w += int64_t(blockDim.x) * kChunkWords) {
      const uint32_t bytes = uint32_t(min(kChunkWords, early_end - w) * 16);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(data + w), "r"(bytes) : "memory");
    }
  }
  wait_for_prior_grids();
  allow_dependents();
  uint32_t x = 0;
  for (int64_t w = begin + threadIdx.x; w < end; w += int64_t(blockDim.x) * kLoadsInFlight) {
    uint4 v[kLoadsInFlight];
#pragma unroll
    for (int i = 0; i < kLoadsInFlight; ++i) {
      const int64_t at = w + int64_t(i) * blockDim.x;
      v[i] = at < end ? __ldcs(data + at) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kLoadsInFlight; ++i) x ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
  }
  for (int offset = 16; offset > 0; offset /= 2) x ^= __shfl_xor_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0 && x == 0x9e3779b9u) sink[blockIdx.x] = x;  // practically never taken; keeps the loads
}

struct Launch {
  std::string name;
  int64_t bytes;  // a multiple of 16
};

// The stored bytes (data + scales) of a [rows, cols] matrix in `format`, rounded up to whole 16-byte words.
int64_t stored_bytes(WeightFormat format, int64_t rows, int64_t cols) {
  QuantizedMatrix m;
  m.format = format, m.rows = rows, m.cols = cols;
  m.scale_type = format == WeightFormat::NVFP4          ? ScaleType::E4M3
                 : format == WeightFormat::FP8_BLOCK128 ? ScaleType::E8M0
                 : format == WeightFormat::MXFP4        ? ScaleType::E8M0
                                                        : ScaleType::NONE;
  return (int64_t(m.stored_bytes()) + 15) / 16 * 16;
}

// The weight-reading launches of a V4-Flash sliding-window layer's batch-1 decode step, in graph order.
std::vector<Launch> flash_swa_layer(const ModelConfig& c) {
  constexpr WeightFormat kFp8 = WeightFormat::FP8_BLOCK128, kFp4 = WeightFormat::NVFP4;
  const int64_t d = c.hidden_size, inter = c.moe.intermediate_size, n = c.mhc.hc_mult;
  const int64_t mhc_fn = stored_bytes(WeightFormat::F32, 2 * n + n * n, n * d);
  const int64_t routed = c.moe.experts_per_token, shared = c.moe.num_shared_experts;
  // Per expert: gate and up [inter, d], down [d, inter].
  const int64_t gate_up = 2 * (routed * stored_bytes(kFp4, inter, d) + shared * stored_bytes(kFp8, inter, d));
  const int64_t down = routed * stored_bytes(kFp4, d, inter) + shared * stored_bytes(kFp8, d, inter);
  return {{"hc_pre", mhc_fn},
          {"wq_a + wkv", stored_bytes(kFp8, c.q_lora_rank + c.head_dim, d)},
          {"wq_b", stored_bytes(kFp8, c.q_dim(), c.q_lora_rank)},
          {"kv_insert + q norm", 0},
          {"attention", 0},
          {"wo_a", stored_bytes(kFp8, c.o_proj_dim(), c.o_group_input_dim())},
          {"wo_b", stored_bytes(kFp8, d, c.o_proj_dim())},
          {"hc_post_pre", mhc_fn},
          {"router", stored_bytes(WeightFormat::BF16, c.moe.num_routed_experts, d)},
          {"experts gate/up", gate_up},
          {"experts down", down}};
}

struct ChainShape {
  const char* name;
  int ctas_per_sm;
  int smem_bytes;
};

int run(int argc, char** argv) {
  int layers = 8;
  int64_t early_kb = 64;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--layers") == 0 && i + 1 < argc)
      layers = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--early") == 0 && i + 1 < argc)
      early_kb = std::atoll(argv[++i]);
    else
      fail("unknown argument '", argv[i], "' (usage: bench_cuda_launch_chain [--layers N] [--early KB])");
  }
  check(layers >= 1 && layers <= 64, "--layers: ", layers, " is not in [1, 64]");
  check(early_kb >= 0, "--early: ", early_kb, " is negative");

  const ModelConfig config = *builtin_config("flash");
  const std::vector<Launch> layer = flash_swa_layer(config);
  int64_t layer_bytes = 0;
  for (const Launch& l : layer) layer_bytes += l.bytes;

  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_gbps = copy_bandwidth_gbps(stream);
  // Every launch of every layer reads its own bytes (a step reads each weight once): layers × the layer's bytes.
  DeviceBuffer weights(size_t(layer_bytes) * size_t(layers), "launch chain weights");
  DSV4_CUDA_CHECK(cudaMemsetAsync(weights.data(), 0x5a, weights.bytes(), stream));
  int sms = 0;
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  DeviceBuffer sink(size_t(sms) * 2 * sizeof(uint32_t), "launch chain sink");
  const auto* words = static_cast<const uint4*>(weights.data());
  auto* sink_words = static_cast<uint32_t*>(sink.data());

  constexpr int kBigSmem = 120 * 1024;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(read_share_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBigSmem));
  DSV4_CUDA_CHECK(
      cudaFuncSetAttribute(read_share_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBigSmem));

  std::printf("launch chain ceiling: %d V4-Flash SWA layers (batch-1 weight bytes), H = %d, copy %.1f GB/s\n", layers,
              config.hidden_size, copy_gbps);
  std::printf("one layer: %zu launches, %.2f MB:", layer.size(), double(layer_bytes) / 1e6);
  for (const Launch& l : layer) std::printf(" %s %.2f,", l.name.c_str(), double(l.bytes) / 1e6);
  const double floor_us = double(layer_bytes) / (copy_gbps * 1e3);
  std::printf("\nfloor (bytes / copy bandwidth): %.2f us per layer\n\n", floor_us);
  std::printf("baseline: each shape's one launch per layer, same run (x one launch = its time over the row's)\n\n");
  std::printf("| rows | CTAs per SM | threads | smem | us per layer | of copy bandwidth | x one launch |\n"
              "|---|---:|---:|---:|---:|---:|---:|\n");

  // A graph of `layers` layers, each either one launch over its bytes or its launches in order.
  auto time_layers = [&](bool one_launch, bool strict, const ChainShape& shape) {
    const auto kernel = strict ? read_share_kernel<true> : read_share_kernel<false>;
    const dim3 grid(sms * shape.ctas_per_sm), block(kThreadsPerSm / shape.ctas_per_sm);
    cudaGraph_t graph = capture_calls(stream, 1, [&](cudaStream_t s) {
      int64_t offset = 0;  // in 16-byte words
      for (int l = 0; l < layers; ++l) {
        if (one_launch) {
          launch_chained(kernel, grid, block, size_t(shape.smem_bytes), s, dim3(1, 1, 1), "read_share",
                         words + offset, layer_bytes / 16, early_kb * 1024, sink_words);
          offset += layer_bytes / 16;
          continue;
        }
        for (const Launch& launch : layer) {
          launch_chained(kernel, grid, block, size_t(shape.smem_bytes), s, dim3(1, 1, 1), "read_share",
                         words + offset, launch.bytes / 16, early_kb * 1024, sink_words);
          offset += launch.bytes / 16;
        }
      }
    });
    return graph_replay_us(stream, graph, 1) / layers;
  };
  auto median_us = [&](bool one_launch, bool strict, const ChainShape& shape) {
    std::vector<double> us;
    for (int t = 0; t < kTimings; ++t) us.push_back(time_layers(one_launch, strict, shape));
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  };
  // What the rows mean rests on residency: a chained kernel's CTAs fit beside the running kernel's in the shape without
  // shared memory (at least twice its CTAs per SM) and not in the 120 KB shape (exactly one).
  auto check_residency = [&](const ChainShape& shape, int wanted_min, int wanted_max) {
    for (const auto kernel : {read_share_kernel<true>, read_share_kernel<false>}) {
      int resident = 0;
      DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &resident, kernel, kThreadsPerSm / shape.ctas_per_sm, size_t(shape.smem_bytes)));
      check(resident >= wanted_min && resident <= wanted_max, "bench_cuda_launch_chain: ", resident,
            " resident CTAs per SM in the shape '", shape.name, "', which needs ", wanted_min, " to ", wanted_max);
    }
  };
  const ChainShape shapes[] = {{"1 CTA/SM, 120 KB smem", 1, kBigSmem}, {"2 CTAs/SM, no smem", 2, 0}};
  check_residency(shapes[0], 1, 1);
  check_residency(shapes[1], 4, 1 << 30);
  for (const ChainShape& shape : shapes) {
    struct Row {
      const char* name;
      bool one_launch, strict;
    };
    double one_launch_us = 0;
    for (const Row row : {Row{"one launch per layer", true, true}, Row{"chain, strict", false, true},
                          Row{"chain, early L2 prefetch", false, false}}) {
      const double us = median_us(row.one_launch, row.strict, shape);
      if (row.one_launch) one_launch_us = us;
      std::printf("| %s | %d | %d | %d KB | %.2f | %.1f %% | %.3f |\n", row.name, shape.ctas_per_sm,
                  kThreadsPerSm / shape.ctas_per_sm, shape.smem_bytes / 1024, us, 100.0 * floor_us / us,
                  one_launch_us / us);
    }
  }
  std::printf("\nearly L2 prefetch: the first %lld KB of each CTA's share\n", static_cast<long long>(early_kb));
  DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_launch_chain", dsv4::cuda::run, argc, argv);
}
