// What the GPU kernel benchmarks share: the same-run floor every result is compared with (device-to-device copy
// bandwidth), the check of the cuBLAS baseline calls, random operands, their upload, CUDA graph timing and the main
// wrapper; the --only list (bench_selection.hpp).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <random>
#include <vector>

#include "backends/cuda/copy_bandwidth.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "bench_selection.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

inline void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) fail("cuBLAS error ", int(status), " in ", call);
}

// The same-run floor: copy bandwidth in GB/s (read + write counted), measured by the library.
inline double copy_bandwidth_gbps(cudaStream_t stream = nullptr) { return measure_copy_bandwidth_gbps(stream); }

// n values drawn from N(0, stddev²): benchmark operands with a fixed seed.
inline std::vector<float> normal_floats(size_t n, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// A device copy of `host`; at least 16 bytes are allocated so that an empty operand still has a valid address.
template <class T>
DeviceBuffer to_device(const std::vector<T>& host, const char* what) {
  DeviceBuffer buffer(std::max<size_t>(host.size() * sizeof(T), 16), what);
  buffer.upload(host.data(), host.size() * sizeof(T));
  return buffer;
}

// `reps` calls of body(stream) captured in one CUDA graph, as a decode step runs them.
template <class Body>
cudaGraph_t capture_calls(cudaStream_t stream, int reps, Body&& body) {
  cudaGraph_t graph = nullptr;
  DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < reps; ++r) body(stream);
  DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  return graph;
}

// GPU microseconds per call of a graph of `reps` calls: instantiated, launched once, then replayed between two events
// so that no host launch cost is counted. Destroys the graph.
inline double graph_replay_us(cudaStream_t stream, cudaGraph_t graph, int reps) {
  cudaGraphExec_t exec;
  DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  constexpr int kReplays = 5;
  const float ms = stream_elapsed_ms(stream, [&] {
    for (int r = 0; r < kReplays; ++r) DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  });
  DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
  DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
  return double(ms) * 1e3 / (kReplays * reps);
}

// A benchmark's main: runs `run` and turns an escaping exception into a message that names the benchmark and exit
// status 1.
inline int run_benchmark_main(const char* name, int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace dsv4::cuda

#define BENCH_CUBLAS_CHECK(call) ::dsv4::cuda::check_cublas((call), #call)
