// A pool allocator for device memory (weights, KV pages, workspaces) over plain cudaMalloc, never managed memory.
// Memory is reserved in large slabs and handed out in 256-byte-aligned pieces by best fit; freed pieces merge with
// free neighbours and are reused, so steady-state allocation makes no CUDA call (cudaMalloc synchronises the
// device). Slabs go back to the driver only through release_unused(). One mutex makes it thread-safe.
#pragma once

#include <cstddef>
#include <memory>
#include <string_view>
#include <utility>

namespace dsv4::cuda {

namespace detail {
class DevicePool;
}

struct DeviceAllocatorStats {
  size_t reserved_bytes = 0;     // held in slabs (cudaMalloc'ed)
  size_t in_use_bytes = 0;       // handed out, each allocation rounded up to the alignment
  size_t peak_in_use_bytes = 0;  // the most in_use_bytes has been
  size_t slabs = 0;
  size_t allocations = 0;        // live allocations
};

// One piece of pool memory, returned to the pool when this object dies. It keeps the pool alive, so allocations
// may outlive the DeviceAllocator that made them.
class DeviceAllocation {
 public:
  DeviceAllocation() = default;
  ~DeviceAllocation() { reset(); }
  DeviceAllocation(DeviceAllocation&& other) noexcept;
  DeviceAllocation& operator=(DeviceAllocation&& other) noexcept;
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;

  void* data() const { return data_; }
  // The size asked for (the pool counts it rounded up to the alignment).
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return data_ != nullptr; }
  // Gives the memory back to the pool now.
  void reset() noexcept;

 private:
  friend class DeviceAllocator;
  DeviceAllocation(std::shared_ptr<detail::DevicePool> pool, void* data, size_t bytes)
      : pool_(std::move(pool)), data_(data), bytes_(bytes) {}

  std::shared_ptr<detail::DevicePool> pool_;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class DeviceAllocator {
 public:
  static constexpr size_t kAlignment = 256;
  static constexpr size_t kDefaultSlabBytes = size_t(256) << 20;

  // A pool on device `device_index`. New slabs take slab_bytes, or more for a larger request; near the memory
  // limit a slab shrinks to what the request needs.
  explicit DeviceAllocator(int device_index, size_t slab_bytes = kDefaultSlabBytes);
  ~DeviceAllocator();
  DeviceAllocator(const DeviceAllocator&) = delete;
  DeviceAllocator& operator=(const DeviceAllocator&) = delete;

  // `bytes` of device memory aligned to kAlignment; an empty allocation for 0 bytes. When the device cannot supply
  // it, throws dsv4::Error naming the request (`what` and its size), the device's free memory and the pool's state.
  DeviceAllocation allocate(size_t bytes, std::string_view what);
  // Makes sure one free piece of at least `bytes` exists, adding a slab of exactly that size (rounded up to the
  // driver's 2 MiB granularity) when none does: a known total (the model's weights) then takes one cudaMalloc.
  // Throws like allocate().
  void reserve(size_t bytes, std::string_view what);
  // Frees the slabs nothing is allocated from; returns the bytes given back to the driver.
  size_t release_unused();

  DeviceAllocatorStats stats() const;
  int device_index() const;
  size_t slab_bytes() const;

 private:
  std::shared_ptr<detail::DevicePool> pool_;
};

}  // namespace dsv4::cuda
