// Bulk L2 prefetch of device memory (PTX cp.async.bulk.prefetch.L2): one small launch asks L2 to fetch byte ranges
// (the weights a later kernel of the step reads) and returns without waiting for them. Meant for a side branch of a
// step, forked where latency-bound kernels leave HBM idle, so that the next bandwidth-bound linear finds its weights
// in L2; a prefetch is a hint and changes no value. Asynchronous on `stream`; no allocation, no synchronisation
// (CUDA-graph capturable). Not a programmatic dependent launch: it reads nothing a kernel writes, and on its branch
// it should start only once the kernel it follows has finished (a programmatic edge would let it compete with that
// kernel's own reads). It runs at the device's greatest stream priority, so its few CTAs are scheduled ahead of the
// step's pending ones.
#pragma once

#include <array>
#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

inline constexpr int kL2PrefetchMaxRanges = 8;

struct L2PrefetchRange {
  const void* data = nullptr;  // 16-byte aligned
  uint64_t bytes = 0;          // prefetched in whole 16-byte units: a tail of up to 15 bytes is left out
};

struct L2PrefetchParams {
  std::array<L2PrefetchRange, kL2PrefetchMaxRanges> ranges{};
  int range_count = 0;
  cudaStream_t stream = nullptr;
};

// Appends the first `budget` bytes of `w` (its data, then its scales) as ranges of `p`; returns the bytes added.
// Throws when `p` has no room for them.
uint64_t add_l2_prefetch_matrix(L2PrefetchParams& p, const DeviceMatrixView& w, uint64_t budget);

// Bytes of the ranges of `p`, as prefetched (each rounded down to whole 16-byte units).
uint64_t l2_prefetch_bytes(const L2PrefetchParams& p);

// Throws naming the range at fault: a count outside [0, kL2PrefetchMaxRanges], a range without data but with bytes,
// data not 16-byte aligned.
void check_l2_prefetch_params(const L2PrefetchParams& p);

// Launches the prefetches (nothing when no range holds 16 bytes).
void run_l2_prefetch(const L2PrefetchParams& p);

}  // namespace dsv4::cuda
