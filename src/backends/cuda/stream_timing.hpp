// Device-side timing of work queued on a CUDA stream: a start and a stop event recorded around it. Shared by the
// copy-bandwidth floor, the `bench` command and the kernel benchmarks so that all of them time the same way.
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

// A start/stop pair of timing events, reusable for many measurements; destroyed with the object (also when the
// timed work throws, so a failed benchmark leaks no events).
class StreamTimer {
 public:
  StreamTimer() {
    DSV4_CUDA_CHECK(cudaEventCreate(&start_));
    DSV4_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~StreamTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;

  // Device milliseconds of the work `enqueue()` puts on `stream` (nullptr: the legacy default stream); waits for it.
  template <class Enqueue>
  float elapsed_ms(cudaStream_t stream, Enqueue&& enqueue) {
    DSV4_CUDA_CHECK(cudaEventRecord(start_, stream));
    enqueue();
    DSV4_CUDA_CHECK(cudaEventRecord(stop_, stream));
    DSV4_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    DSV4_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

// One measurement with a timer of its own: device milliseconds of the work `enqueue()` puts on `stream`.
template <class Enqueue>
float stream_elapsed_ms(cudaStream_t stream, Enqueue&& enqueue) {
  StreamTimer timer;
  return timer.elapsed_ms(stream, enqueue);
}

}  // namespace dsv4::cuda
