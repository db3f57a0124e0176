// A value computed once per (key, CUDA device) and then reused: function attributes (cudaFuncSetAttribute) and
// occupancy queries cost microseconds of host time each, more than a decode-sized kernel runs, and they belong to one
// device's context, so a launcher sets them up on the first launch on each device and later launches only read the
// cached result. Thread-safe: several host threads may launch the same kernel on different devices.
#pragma once

#include <mutex>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

// The calling thread's current device (cudaGetDevice), checked.
inline int current_device() {
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Usage: one static cache per value kind, keyed by the kernel's address (or any other stable pointer):
//   static PerDeviceCache<int> resident;
//   const int per_sm = resident.get(reinterpret_cast<const void*>(kernel), [&] { ...set attributes, query...; });
// `compute` runs at most once per (key, device) whatever the number of threads, on the device it is cached for; an
// exception from it propagates and caches nothing, so the next call tries again.
template <class Value>
class PerDeviceCache {
 public:
  template <class Compute>
  Value get(const void* key, Compute&& compute) {
    const int device = current_device();
    // Holding the lock through compute keeps it to one run per entry; computes are rare (the first launch of each
    // kernel on each device) and short, so the serialisation costs nothing later.
    const std::lock_guard lock(mutex_);
    for (const Entry& entry : entries_)
      if (entry.key == key && entry.device == device) return entry.value;
    Value value = std::forward<Compute>(compute)();
    entries_.push_back({key, device, value});
    return value;
  }

 private:
  struct Entry {
    const void* key;
    int device;
    Value value;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;  // a handful of kernels × devices: a linear scan beats hashing
};

// The current device's SM count (launchers size one-wave grids by it), queried once per device.
inline int device_multiprocessors() {
  static PerDeviceCache<int> cache;
  static const int key = 0;
  return cache.get(&key, [] {
    int count = 0;
    DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, current_device()));
    return count;
  });
}

// The dynamic shared memory `kernel` may use on the current device (the device's opt-in limit per block less the
// kernel's static shared memory), set as the kernel's attribute on its first use on each device: launchers whose size
// varies per call check against it instead of setting the attribute on every call.
inline int max_dynamic_shared_memory(const void* kernel) {
  static PerDeviceCache<int> cache;
  return cache.get(kernel, [&] {
    cudaFuncAttributes attributes{};
    DSV4_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int optin_bytes = 0;
    DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
    const int bytes = optin_bytes - int(attributes.sharedSizeBytes);
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return bytes;
  });
}

}  // namespace dsv4::cuda
