// A bounded wait for the default stream, shared by the GPU tests and benches whose kernels pipeline through barriers:
// a deadlock would otherwise hold the device until ctest's timeout; ending the process releases it.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace dsv4::cuda {

// Waits for the default stream; after 20 s prints that `what` did not finish and exits the process with status 1.
inline void synchronize_or_exit(const char* what) {
  const auto start = std::chrono::steady_clock::now();
  while (cudaStreamQuery(nullptr) == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(20)) {
      std::fprintf(stderr, "%s: the kernel did not finish within 20 s\n", what);
      std::fflush(stderr);
      std::_Exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace dsv4::cuda
