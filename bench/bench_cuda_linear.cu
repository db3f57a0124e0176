// Decode-path linear layer benchmark on the GPU: run_quantized_linear for the V4-Flash and V4-Pro projection and
// expert shapes (wo_a grouped) in every weight format at T ∈ {1, 4, 8, 16, 32, 64}, against two same-run references:
// the device-to-device copy bandwidth (cudaMemcpy of 1 GiB, read + write counted) and cuBLAS bf16
// (cublasGemmEx, or cublasGemmStridedBatchedEx for the grouped wo_a, bf16 × bf16 → fp32) for the same shape.
// Weights rotate over enough copies to exceed three times the L2, so every launch streams from HBM. Each case times
// the default config and, next to it, the ALIGNED register path and the STREAMED shared-memory path at 1-4 ring
// slots where it applies (weight_tile_mma.cuh), so the default can be checked against its alternatives, and the
// wgmma GEMM (run_quantized_gemm: 64-token tiles, split-K) that linear_dispatch can take from a token count on, and
// (streamed path with split-K) the cluster split-K reduction instead of the workspace one. Ungrouped shapes also
// time, in CUDA graphs, the RMSNorm prologue (fp32 rows normalised by every CTA) against the plain call and against
// run_rms_norm followed by the plain call (the launch the prologue removes). Where a model's wo_a and wo_b are both
// selected, the pair kernel (run_quantized_linear_pair, one launch) is timed against the two launches it replaces.
// Usage: bench_cuda_linear [--json PATH] [--quick] [--model flash|pro] [--tokens 1,8,...] [--shapes wq_b,wo_a,...]
//                          [--formats bf16,fp8_block128,mxfp4,nvfp4]
//   (--quick: T ∈ {1, 16}; --model: one model's shapes; --tokens: these token counts; --shapes: these shapes;
//   --formats: these weight formats)
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
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

struct Row {
  std::string model, shape, format;
  int64_t rows, cols;
  int groups, tokens, k_splits;
  std::string load_path;
  double us, gbps, percent_of_copy, cublas_us, speedup;
  double graph_us = 0;                // the default config replayed in a CUDA graph
  double aligned_us = 0;              // the ALIGNED path (register loads)
  double streamed_us[5] = {0, 0, 0, 0, 0};  // the STREAMED path by ring slots (1..4); 0: not applicable
  double cluster_us = 0;              // the streamed default with the cluster split-K reduction; 0: not applicable
  double gemm_us = 0;                 // run_quantized_gemm for the same call
  int gemm_k_splits = 0;
  double prologue_graph_us = 0;       // the default config with the RMSNorm prologue, in a graph; 0: not timed
  double norm_then_linear_graph_us = 0;  // run_rms_norm (bf16 out) then the default config, in a graph
};

// wo_a (bf16 out) then wo_b: the two launches against the pair kernel, in CUDA graphs.
struct PairRow {
  std::string model, format;
  int tokens;
  double two_launches_us, pair_us;
  double pair_slots_us[5] = {0, 0, 0, 0, 0};  // the pair kernel by ring slots (1..4); 0: not timed
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
  bool quick = false;
  std::vector<int> tokens_option;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--quick") {
      quick = true;
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
                           "[--shapes wq_b,wo_a] [--formats fp8_block128,nvfp4]\n");
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
        {"flash", "wo_a", 8192, 4096, 8},     {"flash", "wo_b", 4096, 8192, 1},      {"flash", "expert_w1", 2048, 4096, 1},
        {"flash", "expert_w2", 4096, 2048, 1},
        // The engine's stacked and small projections: [wq_a; wkv], the CSA / HCA compressors' stack, the
        // indexer's wq_b and weights_proj.
        {"flash", "wq_a_wkv", 1536, 4096, 1},  {"flash", "compressors_csa", 2560, 4096, 1},
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

    for (const Shape& shape : shapes) {
      const int64_t x_cols = shape.groups * shape.cols;
      const size_t bf16_bytes = size_t(shape.rows * shape.cols) * 2;
      DeviceBuffer x(size_t(64 * x_cols) * 2, "x bf16"), y(size_t(64 * shape.rows) * 4, "y");
      // The RMSNorm prologue's fp32 input rows and norm weight, and run_rms_norm's bf16 output.
      DeviceBuffer norm_x(size_t(64 * x_cols) * 4, "x fp32"), norm_weight(size_t(x_cols) * 4, "norm weight");
      DeviceBuffer normed(size_t(64 * x_cols) * 2, "x normed bf16");
      {
        std::vector<uint16_t> x_host(size_t(64 * x_cols));
        for (uint16_t& v : x_host) v = float_to_bf16(float(int(rng.next() % 2001) - 1000) / 500.0f);
        x.upload(x_host.data(), x_host.size() * 2);
        std::vector<float> x_fp32(x_host.size()), weight_host(static_cast<size_t>(x_cols));
        for (size_t i = 0; i < x_fp32.size(); ++i) x_fp32[i] = bf16_to_float(x_host[i]) * 3.0f;
        for (float& v : weight_host) v = 1.0f + float(int(rng.next() % 201) - 100) / 400.0f;
        norm_x.upload(x_fp32.data(), x_fp32.size() * 4);
        norm_weight.upload(weight_host.data(), weight_host.size() * 4);
      }
      // Same-run cuBLAS bf16 reference, once per shape and T.
      std::vector<double> cublas_us(65, 0.0);
      {
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
        for (const int tokens : token_counts) {
          // Stream-launched (host launch cost included where it exceeds the kernel's) or replayed in a graph.
          const auto time_config = [&](const QuantizedLinearConfig& config, bool in_graph = false) {
            DeviceBuffer workspace(config.workspace_bytes, "linear workspace");
            workspace.fill_bytes(0);
            const auto launch = [&](int i, cudaStream_t s) {
              run_quantized_linear({.weight = weights[size_t(i % copies)].view(),
                                    .x = x.as<__nv_bfloat16>(),
                                    .x_row_stride = x_cols,
                                    .y = y.as<float>(),
                                    .y_row_stride = shape.rows,
                                    .tokens = tokens,
                                    .groups = shape.groups,
                                    .workspace = workspace.data(),
                                    .workspace_bytes = workspace.bytes(),
                                    .stream = s},
                                   config);
            };
            return in_graph ? time_graph_ms(kIterations, graph_stream, launch)
                            : time_ms(kIterations, [&](int i) { launch(i, nullptr); });
          };
          const QuantizedLinearConfig config =
              choose_quantized_linear_config(weights[0].view(), tokens, shape.groups, device.multiprocessors);
          const double ms = time_config(config);
          Row row{shape.model, shape.name, std::string(to_string(format)), shape.rows, shape.cols, shape.groups,
                  tokens, config.k_splits, load_path_name(config.load_path), ms * 1e3, double(stored) / (ms * 1e6),
                  0.0, cublas_us[size_t(tokens)], cublas_us[size_t(tokens)] / (ms * 1e3), 0.0};
          row.percent_of_copy = 100.0 * row.gbps / copy_gbps;
          row.graph_us = 1e3 * time_config(config, true);
          if (shape.groups == 1 && shape.cols <= kRmsNormMaxWidth) {
            DeviceBuffer workspace(config.workspace_bytes, "linear workspace");
            workspace.fill_bytes(0);
            const auto linear_of = [&](int i, cudaStream_t s, bool prologue) {
              QuantizedLinearParams p{.weight = weights[size_t(i % copies)].view(),
                                      .x = prologue ? nullptr : normed.as<__nv_bfloat16>(),
                                      .x_row_stride = x_cols,
                                      .y = y.as<float>(),
                                      .y_row_stride = shape.rows,
                                      .tokens = tokens,
                                      .workspace = workspace.data(),
                                      .workspace_bytes = workspace.bytes(),
                                      .stream = s};
              if (prologue) {
                p.norm_x = norm_x.as<float>(), p.norm_weight = norm_weight.as<float>(), p.norm_eps = 1e-6f;
              }
              run_quantized_linear(p, config);
            };
            row.prologue_graph_us =
                1e3 * time_graph_ms(kIterations, graph_stream, [&](int i, cudaStream_t s) { linear_of(i, s, true); });
            row.norm_then_linear_graph_us = 1e3 * time_graph_ms(kIterations, graph_stream, [&](int i, cudaStream_t s) {
                                              RmsNormParams norm;
                                              norm.x = norm_x.as<float>(), norm.weight = norm_weight.as<float>();
                                              norm.rows = tokens, norm.width = shape.cols, norm.eps = 1e-6f;
                                              norm.y_bf16 = normed.as<__nv_bfloat16>(), norm.stream = s;
                                              run_rms_norm(norm);
                                              linear_of(i, s, false);
                                            });
          }
          row.aligned_us = 1e3 * time_config(choose_quantized_linear_config(
                                     weights[0].view(), tokens, shape.groups, device.multiprocessors,
                                     WeightLoadPath::ALIGNED));
          if (streamed_load_path_applies(weights[0].view(), tokens, shape.groups))
            for (int slots = 1; slots <= 4; ++slots) {
              QuantizedLinearConfig streamed;
              try {
                streamed = choose_quantized_linear_config(weights[0].view(), tokens, shape.groups,
                                                          device.multiprocessors, WeightLoadPath::STREAMED, slots);
              } catch (const Error&) {
                continue;  // the rings do not fit one CTA's shared memory (bf16 at 3-4 slots)
              }
              row.streamed_us[slots] = 1e3 * time_config(streamed);
            }
          if (streamed_load_path_applies(weights[0].view(), tokens, shape.groups)) {
            const QuantizedLinearConfig cluster =
                choose_quantized_linear_config(weights[0].view(), tokens, shape.groups, device.multiprocessors,
                                               WeightLoadPath::STREAMED, 0, SplitKReduce::CLUSTER);
            if (cluster.reduce == SplitKReduce::CLUSTER) row.cluster_us = 1e3 * time_config(cluster, true);
          }
          {
            const QuantizedGemmConfig gemm = choose_quantized_gemm_config(weights[0].view(), tokens,
                                                                          device.multiprocessors);
            DeviceBuffer workspace(std::max<size_t>(gemm.workspace_bytes, 16), "gemm workspace");
            workspace.fill_bytes(0);
            row.gemm_k_splits = gemm.k_splits;
            row.gemm_us = 1e3 * time_ms(kIterations, [&](int i) {
                            run_quantized_gemm({.weight = weights[size_t(i % copies)].view(),
                                                .x = x.as<__nv_bfloat16>(),
                                                .x_row_stride = x_cols,
                                                .y = y.as<float>(),
                                                .y_row_stride = shape.rows,
                                                .tokens = tokens,
                                                .groups = shape.groups,
                                                .workspace = workspace.data(),
                                                .workspace_bytes = workspace.bytes()});
                          });
          }
          table.push_back(row);
        }
      }
    }
    // The pair kernel: each model's wo_a → wo_b where both shapes are selected, at the streamed token counts.
    std::vector<PairRow> pairs;
    for (const Shape& first_shape : shapes) {
      if (std::string(first_shape.name) != "wo_a") continue;
      const auto second_shape = std::find_if(shapes.begin(), shapes.end(), [&](const Shape& s) {
        return std::string(s.name) == "wo_b" && std::string(s.model) == first_shape.model;
      });
      if (second_shape == shapes.end()) continue;
      const int64_t x_cols = first_shape.groups * first_shape.cols;
      DeviceBuffer x(size_t(kLinearMaxStreamedTokens * x_cols) * 2, "x bf16");
      DeviceBuffer mid(size_t(kLinearMaxStreamedTokens * first_shape.rows) * 2, "mid bf16");
      DeviceBuffer y(size_t(kLinearMaxStreamedTokens * second_shape->rows) * 4, "y");
      {
        std::vector<uint16_t> x_host(size_t(kLinearMaxStreamedTokens * x_cols));
        for (uint16_t& v : x_host) v = float_to_bf16(float(int(rng.next() % 2001) - 1000) / 500.0f);
        x.upload(x_host.data(), x_host.size() * 2);
      }
      for (const WeightFormat format : formats) {
        const OwnedQuantizedMatrix first_host = random_matrix(format, first_shape.rows, first_shape.cols, rng);
        const OwnedQuantizedMatrix second_host = random_matrix(format, second_shape->rows, second_shape->cols, rng);
        const int copies = copies_beyond_l2(first_host.matrix.stored_bytes() + second_host.matrix.stored_bytes(),
                                            device.l2_bytes);
        std::vector<DeviceMatrix> firsts, seconds;
        for (int c = 0; c < copies; ++c) {
          firsts.emplace_back(first_host.matrix, "wo_a copy");
          seconds.emplace_back(second_host.matrix, "wo_b copy");
        }
        for (const int tokens : token_counts) {
          if (!quantized_linear_pair_applies(firsts[0].view(), first_shape.groups, seconds[0].view(), tokens)) continue;
          // The two launches' and the pair kernel's (linear_pair_workspace_bytes: what the engine allocates).
          DeviceBuffer workspace(linear_pair_workspace_bytes(firsts[0].view(), first_shape.groups, seconds[0].view()),
                                 "linear workspace");
          workspace.fill_bytes(0);
          PairRow row{first_shape.model, std::string(to_string(format)), tokens, 0, 0};
          row.two_launches_us = 1e3 * time_graph_ms(kIterations, graph_stream, [&](int i, cudaStream_t s) {
                                  run_quantized_linear({.weight = firsts[size_t(i % copies)].view(),
                                                        .x = x.as<__nv_bfloat16>(),
                                                        .x_row_stride = x_cols,
                                                        .y = nullptr,
                                                        .y_row_stride = first_shape.rows,
                                                        .tokens = tokens,
                                                        .groups = first_shape.groups,
                                                        .workspace = workspace.data(),
                                                        .workspace_bytes = workspace.bytes(),
                                                        .stream = s,
                                                        .y_bf16 = mid.as<__nv_bfloat16>()});
                                  run_quantized_linear({.weight = seconds[size_t(i % copies)].view(),
                                                        .x = mid.as<__nv_bfloat16>(),
                                                        .x_row_stride = first_shape.rows,
                                                        .y = y.as<float>(),
                                                        .y_row_stride = second_shape->rows,
                                                        .tokens = tokens,
                                                        .workspace = workspace.data(),
                                                        .workspace_bytes = workspace.bytes(),
                                                        .stream = s});
                                });
          const auto time_pair = [&](int ring_slots) {
            return 1e3 * time_graph_ms(kIterations, graph_stream, [&](int i, cudaStream_t s) {
                          run_quantized_linear_pair({.first = firsts[size_t(i % copies)].view(),
                                                     .first_groups = first_shape.groups,
                                                     .x = x.as<__nv_bfloat16>(),
                                                     .x_row_stride = x_cols,
                                                     .mid = mid.as<__nv_bfloat16>(),
                                                     .mid_row_stride = first_shape.rows,
                                                     .second = seconds[size_t(i % copies)].view(),
                                                     .y = y.as<float>(),
                                                     .y_row_stride = second_shape->rows,
                                                     .tokens = tokens,
                                                     .workspace = workspace.data(),
                                                     .workspace_bytes = workspace.bytes(),
                                                     .stream = s,
                                                     .ring_slots = ring_slots});
                        });
          };
          row.pair_us = time_pair(0);
          for (int slots = 1; slots <= 4; ++slots) {
            try {
              row.pair_slots_us[slots] = time_pair(slots);
            } catch (const Error&) {
              continue;  // the rings do not fit one CTA's shared memory
            }
          }
          pairs.push_back(row);
        }
      }
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));
    DSV4_CUDA_CHECK(cudaStreamDestroy(graph_stream));

    std::printf("| model | shape | format | N × K (G) | T | split-K | path | µs | GB/s (stored) | %% of copy | "
                "cuBLAS bf16 µs | speed-up | graph µs · %% of copy | aligned µs | streamed µs (1/2/3/4 slots) | cluster "
                "reduction graph µs | GEMM µs (split-K) | graph µs: norm prologue / rms_norm + linear |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : table)
      std::printf("| %s | %s | %s | %lld × %lld (%d) | %d | %d | %s | %.1f | %.0f | %.0f | %.1f | %.2f× | %.1f · %.0f | "
                  "%.1f | %.1f / %.1f / %.1f / %.1f | %.1f | %.1f (%d) | %.1f / %.1f |\n",
                  r.model.c_str(), r.shape.c_str(), r.format.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                  r.tokens, r.k_splits, r.load_path.c_str(), r.us, r.gbps, r.percent_of_copy, r.cublas_us, r.speedup,
                  r.graph_us, r.percent_of_copy * r.us / r.graph_us, r.aligned_us, r.streamed_us[1], r.streamed_us[2], r.streamed_us[3], r.streamed_us[4],
                  r.cluster_us, r.gemm_us, r.gemm_k_splits, r.prologue_graph_us, r.norm_then_linear_graph_us);
    if (!pairs.empty()) {
      std::printf("\n| model | format | T | wo_a (bf16 out) + wo_b graph µs | pair kernel graph µs | pair by ring "
                  "slots (1/2/3/4) |\n|---|---|---|---|---|---|\n");
      for (const PairRow& r : pairs)
        std::printf("| %s | %s | %d | %.1f | %.1f | %.1f / %.1f / %.1f / %.1f |\n", r.model.c_str(), r.format.c_str(),
                    r.tokens, r.two_launches_us, r.pair_us, r.pair_slots_us[1], r.pair_slots_us[2],
                    r.pair_slots_us[3], r.pair_slots_us[4]);
    }

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
                   "\"groups\": %d, \"tokens\": %d, \"k_splits\": %d, \"load_path\": \"%s\", \"us\": %.2f, "
                   "\"stored_gbps\": %.1f, \"percent_of_copy\": %.1f, \"cublas_bf16_us\": %.2f, "
                   "\"speedup_vs_cublas\": %.3f, \"graph_us\": %.2f, \"aligned_us\": %.2f, \"streamed_us_by_slots\": [%.2f, %.2f, %.2f, "
                   "%.2f], \"cluster_graph_us\": %.2f, \"gemm_us\": %.2f, \"gemm_k_splits\": %d, "
                   "\"prologue_graph_us\": %.2f, \"norm_then_linear_graph_us\": %.2f}%s\n",
                   r.model.c_str(), r.shape.c_str(), r.format.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                   r.tokens, r.k_splits, r.load_path.c_str(), r.us, r.gbps, r.percent_of_copy, r.cublas_us, r.speedup,
                   r.graph_us, r.aligned_us, r.streamed_us[1], r.streamed_us[2], r.streamed_us[3], r.streamed_us[4],
                   r.cluster_us, r.gemm_us, r.gemm_k_splits, r.prologue_graph_us, r.norm_then_linear_graph_us,
                   i + 1 < table.size() ? "," : "");
    }
    std::fprintf(out, "  ],\n  \"pairs\": [\n");
    for (size_t i = 0; i < pairs.size(); ++i)
      std::fprintf(out,
                   "    {\"model\": \"%s\", \"format\": \"%s\", \"tokens\": %d, \"two_launches_graph_us\": %.2f, "
                   "\"pair_graph_us\": %.2f, \"pair_graph_us_by_slots\": [%.2f, %.2f, %.2f, %.2f]}%s\n",
                   pairs[i].model.c_str(), pairs[i].format.c_str(), pairs[i].tokens, pairs[i].two_launches_us,
                   pairs[i].pair_us, pairs[i].pair_slots_us[1], pairs[i].pair_slots_us[2], pairs[i].pair_slots_us[3],
                   pairs[i].pair_slots_us[4], i + 1 < pairs.size() ? "," : "");
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_linear: %s\n", e.what());
    return 1;
  }
  return 0;
}
