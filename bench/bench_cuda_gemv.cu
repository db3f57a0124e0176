// Decode GEMV benchmark on the GPU: run_quantized_gemv for the V4-Flash projection and expert shapes in every weight
// format at T ∈ {1, 4, 8}, against two same-run references: the device-to-device copy bandwidth (cudaMemcpy of
// 1 GiB, read + write counted) and cuBLAS bf16 (cublasGemmEx bf16 × bf16 → fp32) for the same shape.
// Weights rotate over enough copies to exceed three times the L2, so every launch streams from HBM.
// Usage: bench_cuda_gemv [output.json]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/quantized_gemv.hpp"
#include "core/bf16.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4::cuda {
namespace {

#define BENCH_CUBLAS_CHECK(call)                                                              \
  do {                                                                                        \
    const cublasStatus_t status_ = (call);                                                    \
    if (status_ != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error ", int(status_), " in ", #call); \
  } while (0)

struct Shape {
  const char* name;
  int64_t rows, cols;
};

// Milliseconds per call of `body(i)` averaged over `iterations` calls after a warm-up.
template <class Body>
double time_ms(int iterations, Body&& body) {
  for (int i = 0; i < 3; ++i) body(i);
  cudaEvent_t start, stop;
  DSV4_CUDA_CHECK(cudaEventCreate(&start));
  DSV4_CUDA_CHECK(cudaEventCreate(&stop));
  DSV4_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < iterations; ++i) body(i);
  DSV4_CUDA_CHECK(cudaEventRecord(stop));
  DSV4_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  DSV4_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  DSV4_CUDA_CHECK(cudaEventDestroy(start));
  DSV4_CUDA_CHECK(cudaEventDestroy(stop));
  return double(ms) / iterations;
}

// Random stored bytes with valid codes: no e4m3 NaN (0x7F / 0xFF) in fp8 data or NVFP4 scales, e8m0 scales near 1.
OwnedQuantizedMatrix random_matrix(WeightFormat format, int64_t rows, int64_t cols, std::mt19937& rng) {
  const ScaleType scale_type = format == WeightFormat::NVFP4 ? ScaleType::E4M3 : ScaleType::E8M0;
  OwnedQuantizedMatrix m = allocate_quantized_matrix(format, rows, cols, scale_type, 0.01f);
  for (uint8_t& b : m.storage->data) {
    b = uint8_t(rng());
    if (format == WeightFormat::FP8_BLOCK128 && (b & 0x7F) == 0x7F) b ^= 1;
  }
  for (uint8_t& s : m.storage->scales) s = format == WeightFormat::NVFP4 ? uint8_t(0x30 + rng() % 16) : uint8_t(120 + rng() % 8);
  return m;
}

int copies_beyond_l2(size_t bytes, size_t l2_bytes) {
  return int(std::max<size_t>(2, (3 * l2_bytes + bytes - 1) / bytes));
}

double copy_bandwidth_gbps() {
  constexpr size_t kBytes = size_t(1) << 30;
  DeviceBuffer src(kBytes, "copy source"), dst(kBytes, "copy destination");
  src.fill_bytes(1);
  const double ms = time_ms(10, [&](int) {
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice));
  });
  return 2.0 * double(kBytes) / (ms * 1e6);
}

struct Row {
  std::string shape, format;
  int64_t rows, cols;
  int tokens, k_splits;
  double ms, gbps, percent_of_copy, cublas_ms, speedup;
};

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  const char* json_path = argc > 1 ? argv[1] : "bench_cuda_gemv.json";
  try {
    const std::vector<DeviceInfo> devices = list_devices();
    if (devices.empty()) {
      std::fprintf(stderr, "bench_cuda_gemv: no CUDA device\n");
      return 1;
    }
    const DeviceInfo& device = devices.front();
    const double copy_gbps = copy_bandwidth_gbps();
    std::printf("device: %s (%d SMs, L2 %zu MiB); copy bandwidth (1 GiB D2D, read + write): %.0f GB/s\n",
                device.name.c_str(), device.multiprocessors, device.l2_bytes >> 20, copy_gbps);

    cublasHandle_t cublas;
    BENCH_CUBLAS_CHECK(cublasCreate(&cublas));
    std::mt19937 rng(42);
    const Shape shapes[] = {{"wq_b", 32768, 1024}, {"wo_b", 4096, 8192}, {"expert_w1", 2048, 4096},
                            {"expert_w2", 4096, 2048}};
    const WeightFormat formats[] = {WeightFormat::FP8_BLOCK128, WeightFormat::MXFP4, WeightFormat::NVFP4};
    const int token_counts[] = {1, 4, 8};
    constexpr int kIterations = 200;
    std::vector<Row> table;

    for (const Shape& shape : shapes) {
      // Same-run cuBLAS bf16 reference, once per shape and T.
      const size_t bf16_bytes = size_t(shape.rows * shape.cols) * 2;
      const int bf16_copies = copies_beyond_l2(bf16_bytes, device.l2_bytes);
      std::vector<DeviceBuffer> bf16_weights;
      std::vector<uint16_t> bf16_host(size_t(shape.rows * shape.cols));
      std::normal_distribution<float> normal(0.0f, 0.05f);
      for (uint16_t& v : bf16_host) v = float_to_bf16(normal(rng));
      for (int c = 0; c < bf16_copies; ++c) {
        bf16_weights.emplace_back(bf16_bytes, "bf16 weight copy");
        bf16_weights.back().upload(bf16_host.data(), bf16_bytes);
      }
      DeviceBuffer x_bf16(size_t(8 * shape.cols) * 2, "x bf16"), x(size_t(8 * shape.cols) * 4, "x"),
          y(size_t(8 * shape.rows) * 4, "y");
      x_bf16.fill_bytes(0x3C);
      std::vector<float> x_host(size_t(8 * shape.cols));
      for (float& v : x_host) v = normal(rng) * 20;
      x.upload(x_host.data(), x_host.size() * 4);
      double cublas_ms[9] = {};
      for (const int tokens : token_counts) {
        const float alpha = 1.0f, beta = 0.0f;
        cublas_ms[tokens] = time_ms(kIterations, [&](int i) {
          BENCH_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(shape.rows), tokens, int(shape.cols),
                                          &alpha, bf16_weights[size_t(i % bf16_copies)].data(), CUDA_R_16BF,
                                          int(shape.cols), x_bf16.data(), CUDA_R_16BF, int(shape.cols), &beta,
                                          y.data(), CUDA_R_32F, int(shape.rows), CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
        });
      }
      bf16_weights.clear();

      for (const WeightFormat format : formats) {
        const OwnedQuantizedMatrix host = random_matrix(format, shape.rows, shape.cols, rng);
        const size_t stored = host.matrix.stored_bytes();
        const int copies = copies_beyond_l2(stored, device.l2_bytes);
        std::vector<DeviceMatrix> weights;
        for (int c = 0; c < copies; ++c) weights.emplace_back(host.matrix, std::string(shape.name) + " copy");
        for (const int tokens : token_counts) {
          const double ms = time_ms(kIterations, [&](int i) {
            run_quantized_gemv({.weight = weights[size_t(i % copies)].view(),
                                .x = x.as<float>(),
                                .y = y.as<float>(),
                                .tokens = tokens,
                                .stream = nullptr});
          });
          const GemvLaunchConfig config =
              choose_quantized_gemv_config(format, shape.rows, shape.cols, tokens, device.multiprocessors);
          const double gbps = double(stored) / (ms * 1e6);
          table.push_back({shape.name, std::string(to_string(format)), shape.rows, shape.cols, tokens,
                           config.k_splits, ms, gbps, 100.0 * gbps / copy_gbps, cublas_ms[tokens],
                           cublas_ms[tokens] / ms});
        }
      }
    }
    BENCH_CUBLAS_CHECK(cublasDestroy(cublas));

    std::printf("| shape | format | N × K | T | split-K | µs | GB/s (stored) | %% of copy | cuBLAS bf16 µs | speed-up |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : table)
      std::printf("| %s | %s | %lld × %lld | %d | %d | %.1f | %.0f | %.0f | %.1f | %.2f× |\n", r.shape.c_str(),
                  r.format.c_str(), (long long)r.rows, (long long)r.cols, r.tokens, r.k_splits, r.ms * 1e3, r.gbps,
                  r.percent_of_copy, r.cublas_ms * 1e3, r.speedup);

    FILE* out = std::fopen(json_path, "w");
    check(out != nullptr, "bench_cuda_gemv: cannot write ", json_path);
    std::fprintf(out, "{\n  \"benchmark\": \"bench_cuda_gemv\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n",
                 device.name.c_str(), device.multiprocessors);
    std::fprintf(out, "  \"copy_bandwidth_gbps\": %.1f,\n  \"iterations\": %d,\n  \"results\": [\n", copy_gbps,
                 kIterations);
    for (size_t i = 0; i < table.size(); ++i) {
      const Row& r = table[i];
      std::fprintf(out,
                   "    {\"shape\": \"%s\", \"format\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"tokens\": %d, "
                   "\"k_splits\": %d, \"us\": %.2f, \"stored_gbps\": %.1f, \"percent_of_copy\": %.1f, "
                   "\"cublas_bf16_us\": %.2f, \"speedup_vs_cublas\": %.3f}%s\n",
                   r.shape.c_str(), r.format.c_str(), (long long)r.rows, (long long)r.cols, r.tokens, r.k_splits,
                   r.ms * 1e3, r.gbps, r.percent_of_copy, r.cublas_ms * 1e3, r.speedup,
                   i + 1 < table.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_gemv: %s\n", e.what());
    return 1;
  }
  return 0;
}
