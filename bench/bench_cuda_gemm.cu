// GEMM benchmark on the GPU: run_quantized_gemm for the V4-Flash and V4-Pro projection (wo_a grouped) and expert
// shapes in every weight format at T ∈ {16, 64, 256, 1024, 4096, 8192}, against same-run cuBLAS bf16 (cublasGemmEx,
// bf16 × bf16 → fp32 out, fp32 compute; strided-batched per group for wo_a) of the same shape, the measured bf16 peak
// (the same cuBLAS call at 8192 × 8192 × 8192) and the same-run copy bandwidth (stored weight bytes per second: the
// floor at few tokens). Weights (and cuBLAS's bf16 copies) rotate over enough copies to exceed three times the L2,
// so every call streams its weight from HBM, as in a model step.
// Usage: bench_cuda_gemm [--json PATH] [--tokens 16,64,...] [--model flash|pro]
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

struct Kind {
  WeightFormat format;
  ScaleType scale_type;
  const char* name;
};

// Milliseconds per call of `body()`: iterations sized to about 40 ms after a warm-up call.
template <class Body>
double time_ms(Body&& body) {
  StreamTimer timer;
  auto measure = [&](int iterations) {
    const float ms = timer.elapsed_ms(nullptr, [&] {
      for (int i = 0; i < iterations; ++i) body();
    });
    return double(ms) / iterations;
  };
  const double first = measure(2);
  const int iterations = int(std::clamp(40.0 / std::max(first, 1e-3), 5.0, 200.0));
  return measure(iterations);
}

uint64_t next_random(uint64_t& state) {  // xorshift64*: fast fill for hundreds of MB of weights
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 0x2545F4914F6CDD1Dull;
}

// Random stored bytes with valid codes: bf16 values in ±[2^-8, 2^0), no e4m3 NaN in fp8 data or NVFP4 scales,
// e8m0 scales near 1.
OwnedQuantizedMatrix random_matrix(const Kind& kind, int64_t rows, int64_t cols, uint64_t& state) {
  OwnedQuantizedMatrix m = allocate_quantized_matrix(kind.format, rows, cols, kind.scale_type, 0.01f);
  std::vector<uint8_t>& data = m.storage->data;
  for (size_t i = 0; i + 8 <= data.size(); i += 8) {
    uint64_t r = next_random(state);
    if (kind.format == WeightFormat::BF16) r = (r & 0x807F807F807F807Full) | 0x3B003B003B003B00ull;
    std::memcpy(&data[i], &r, 8);
  }
  if (kind.format == WeightFormat::FP8_BLOCK128)
    for (uint8_t& b : data)
      if ((b & 0x7F) == 0x7F) b ^= 1;
  std::vector<uint8_t>& scales = m.storage->scales;
  if (kind.scale_type == ScaleType::F32) {
    for (size_t i = 0; i < scales.size(); i += 4) {
      const float s = 1.0f / 448.0f * float(1 + next_random(state) % 4);
      std::memcpy(&scales[i], &s, 4);
    }
  } else {
    for (uint8_t& s : scales)
      s = kind.format == WeightFormat::NVFP4 ? uint8_t(0x30 + next_random(state) % 16)
                                             : uint8_t(120 + next_random(state) % 8);
  }
  return m;
}

struct Row {
  std::string model, shape, format;
  int64_t rows, cols, tokens;
  int groups, block_tokens, k_splits;
  double us, tflops, cublas_us, cublas_tflops, percent_of_cublas, percent_of_peak, percent_of_copy;
};

int copies_beyond_l2(size_t bytes, size_t l2_bytes) {
  return int(std::max<size_t>(2, (3 * l2_bytes + bytes - 1) / bytes));
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path = "bench_cuda_gemm.json", model_filter;
  std::vector<int64_t> token_counts = {16, 64, 256, 1024, 4096, 8192};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_filter = argv[++i];
    } else if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) {
      token_counts.clear();
      for (const char* p = argv[++i]; *p != 0;) {
        char* end = nullptr;
        const long long t = std::strtoll(p, &end, 10);
        if (end == p || t < 1 || t > 8192) {
          std::fprintf(stderr, "bench_cuda_gemm: --tokens takes 1..8192, comma separated\n");
          return 2;
        }
        token_counts.push_back(t);
        p = *end == ',' ? end + 1 : end;
      }
    } else {
      std::fprintf(stderr, "usage: bench_cuda_gemm [--json PATH] [--tokens 16,64,...] [--model flash|pro]\n");
      return 2;
    }
  }
  try {
    const std::vector<DeviceInfo> devices = list_devices();
    if (devices.empty()) {
      std::fprintf(stderr, "bench_cuda_gemm: no CUDA device\n");
      return 1;
    }
    const DeviceInfo& device = devices.front();
    cublasHandle_t cublas;
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
    const float alpha = 1.0f, beta = 0.0f;
    auto cublas_gemm = [&](const void* w, const void* x, float* y, int64_t n, int64_t k, int64_t t) {
      BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(t), int(k), &alpha, w,
                                      CUDA_R_16BF, int(k), x, CUDA_R_16BF, int(k), &beta, y, CUDA_R_32F, int(n),
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    // Column-major view per group: Y_g[N/G, T] = W_g[K, N/G]ᵀ · X_g[K, T], X_g at column offset g·K of x.
    auto cublas_shape = [&](const Shape& shape, const void* w, const void* x, float* y, int64_t t) {
      if (shape.groups == 1) return cublas_gemm(w, x, y, shape.rows, shape.cols, t);
      const int64_t rows = shape.rows / shape.groups;
      BENCH_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(rows), int(t), int(shape.cols), &alpha, w, CUDA_R_16BF,
          int(shape.cols), rows * shape.cols, x, CUDA_R_16BF, int(shape.groups * shape.cols), shape.cols, &beta, y,
          CUDA_R_32F, int(shape.rows), rows, shape.groups, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };

    // Buffers sized for the largest shape × 8192 tokens.
    constexpr int64_t kMaxTokens = 8192, kMaxCols = 16384, kMaxRows = 65536;
    DeviceBuffer x(size_t(kMaxTokens * kMaxCols) * 2, "x bf16"), y(size_t(kMaxTokens * kMaxRows) * 4, "y");
    {
      std::vector<uint16_t> x_host(size_t(kMaxTokens * kMaxCols));
      uint64_t state = 7;
      for (uint16_t& v : x_host) v = uint16_t((next_random(state) & 0x807F) | 0x3F00);
      x.upload(x_host.data(), x_host.size() * 2);
    }

    double peak_tflops = 0;
    {
      constexpr int64_t kPeak = 8192;
      DeviceBuffer w(size_t(kPeak * kPeak) * 2, "peak weight");
      w.fill_bytes(0x3C);
      const double ms = time_ms([&] { cublas_gemm(w.data(), x.data(), y.as<float>(), kPeak, kPeak, kPeak); });
      peak_tflops = 2.0 * kPeak * kPeak * kPeak / (ms * 1e9);
    }
    const double copy_gbps = copy_bandwidth_gbps();
    std::printf("device: %s (%d SMs, L2 %zu MiB); cuBLAS bf16 peak (8192^3, fp32 out): %.0f TFLOP/s; copy bandwidth "
                "(1 GiB D2D, read + write): %.0f GB/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, peak_tflops, copy_gbps);

    const Shape all_shapes[] = {{"flash", "wq_a", 1024, 4096, 1},       {"flash", "wkv", 512, 4096, 1},
                                {"flash", "wq_b", 32768, 1024, 1},      {"flash", "wo_a", 8192, 4096, 8},
                                {"flash", "wo_b", 4096, 8192, 1},       {"flash", "expert_w1", 2048, 4096, 1},
                                {"flash", "expert_w2", 4096, 2048, 1},  {"pro", "wq_a", 1536, 7168, 1},
                                {"pro", "wkv", 512, 7168, 1},           {"pro", "wq_b", 65536, 1536, 1},
                                {"pro", "wo_a", 16384, 4096, 16},       {"pro", "wo_b", 7168, 16384, 1},
                                {"pro", "expert_w1", 3072, 7168, 1},    {"pro", "expert_w2", 7168, 3072, 1}};
    std::vector<Shape> shapes;
    for (const Shape& shape : all_shapes)
      if (model_filter.empty() || model_filter == shape.model) shapes.push_back(shape);
    check(!shapes.empty(), "bench_cuda_gemm: no shapes of model '", model_filter, "' (flash or pro)");
    const Kind kinds[] = {{WeightFormat::BF16, ScaleType::NONE, "bf16"},
                          {WeightFormat::FP8_BLOCK128, ScaleType::E8M0, "fp8_e8m0"},
                          {WeightFormat::FP8_BLOCK128, ScaleType::F32, "fp8_f32"},
                          {WeightFormat::MXFP4, ScaleType::E8M0, "mxfp4"},
                          {WeightFormat::NVFP4, ScaleType::E4M3, "nvfp4"}};
    std::vector<Row> table;
    uint64_t state = 42;

    for (const Shape& shape : shapes) {
      // Per kind, copies of one random matrix (kinds.front() is BF16: cuBLAS's operand too).
      std::vector<std::vector<DeviceMatrix>> weights;
      for (const Kind& kind : kinds) {
        const OwnedQuantizedMatrix host = random_matrix(kind, shape.rows, shape.cols, state);
        const int copies = copies_beyond_l2(host.matrix.stored_bytes(), device.l2_bytes);
        weights.emplace_back();
        for (int c = 0; c < copies; ++c)
          weights.back().emplace_back(host.matrix, std::string(shape.name) + " " + kind.name);
      }
      const std::vector<DeviceMatrix>& bf16_weights = weights.front();
      const int64_t x_cols = shape.groups * shape.cols;
      for (const int64_t tokens : token_counts) {
        // The grouped wo_a's x at the largest T does not fit the shared buffers: those cases are left out.
        if (tokens * x_cols > kMaxTokens * kMaxCols || tokens * shape.rows > kMaxTokens * kMaxRows) continue;
        const double flop = 2.0 * double(shape.rows) * double(shape.cols) * double(tokens);
        size_t call = 0;
        const double cublas_ms = time_ms([&] {
          cublas_shape(shape, bf16_weights[call++ % bf16_weights.size()].view().data, x.data(), y.as<float>(),
                       tokens);
        });
        for (size_t k = 0; k < weights.size(); ++k) {
          const DeviceMatrixView& w0 = weights[k].front().view();
          const QuantizedGemmConfig config = choose_quantized_gemm_config(w0, tokens, device.multiprocessors);
          DeviceBuffer workspace(std::max<size_t>(config.workspace_bytes, 16), "gemm workspace");
          workspace.fill_bytes(0);
          const double ms = time_ms([&] {
            run_quantized_gemm({.weight = weights[k][call++ % weights[k].size()].view(),
                                .x = x.as<__nv_bfloat16>(),
                                .x_row_stride = x_cols,
                                .y = y.as<float>(),
                                .y_row_stride = shape.rows,
                                .tokens = tokens,
                                .groups = shape.groups,
                                .workspace = workspace.data(),
                                .workspace_bytes = workspace.bytes()});
          });
          const double tflops = flop / (ms * 1e9), cublas_tflops = flop / (cublas_ms * 1e9);
          const double gbps = double(w0.stored_bytes) / (ms * 1e6);
          table.push_back({shape.model, shape.name, kinds[k].name, shape.rows, shape.cols, tokens, shape.groups,
                           config.block_tokens, config.k_splits, ms * 1e3, tflops, cublas_ms * 1e3, cublas_tflops,
                           100.0 * tflops / cublas_tflops, 100.0 * tflops / peak_tflops, 100.0 * gbps / copy_gbps});
        }
      }
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));

    std::printf("| model | shape | N × K (G) | T | format | tile T | split-K | µs | TFLOP/s | %% of copy | cuBLAS bf16 "
                "µs | %% of cuBLAS | %% of peak |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : table)
      std::printf("| %s | %s | %lld × %lld (%d) | %lld | %s | %d | %d | %.1f | %.0f | %.0f | %.1f | %.0f | %.0f |\n",
                  r.model.c_str(), r.shape.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                  (long long)r.tokens, r.format.c_str(), r.block_tokens, r.k_splits, r.us, r.tflops,
                  r.percent_of_copy, r.cublas_us, r.percent_of_cublas, r.percent_of_peak);

    FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_gemm: cannot write ", json_path);
    std::fprintf(out, "{\n  \"benchmark\": \"bench_cuda_gemm\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n",
                 device.name.c_str(), device.multiprocessors);
    std::fprintf(out, "  \"cublas_bf16_peak_tflops\": %.1f,\n  \"copy_bandwidth_gbps\": %.1f,\n  \"results\": [\n",
                 peak_tflops, copy_gbps);
    for (size_t i = 0; i < table.size(); ++i) {
      const Row& r = table[i];
      std::fprintf(out,
                   "    {\"model\": \"%s\", \"shape\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"groups\": %d, "
                   "\"tokens\": %lld, \"format\": \"%s\", \"block_tokens\": %d, \"k_splits\": %d, \"us\": %.2f, "
                   "\"tflops\": %.1f, \"percent_of_copy\": %.1f, \"cublas_bf16_us\": %.2f, \"cublas_bf16_tflops\": "
                   "%.1f, \"percent_of_cublas\": %.1f, \"percent_of_peak\": %.1f}%s\n",
                   r.model.c_str(), r.shape.c_str(), (long long)r.rows, (long long)r.cols, r.groups,
                   (long long)r.tokens, r.format.c_str(), r.block_tokens, r.k_splits, r.us, r.tflops,
                   r.percent_of_copy, r.cublas_us, r.cublas_tflops, r.percent_of_cublas, r.percent_of_peak,
                   i + 1 < table.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_gemm: %s\n", e.what());
    return 1;
  }
  return 0;
}
