#include "backends/cuda/device_allocator.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_context.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

// cudaMalloc hands out memory in 2 MiB pages; a slab of another size would waste the rest of its last page.
constexpr size_t kSlabGranularity = size_t(2) << 20;

size_t round_up(size_t bytes, size_t multiple) { return (bytes + multiple - 1) / multiple * multiple; }

// CUDA's current device is per thread; slab allocation switches to the pool's device and back.
class CurrentDeviceGuard {
 public:
  explicit CurrentDeviceGuard(int device) {
    DSV4_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) DSV4_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CurrentDeviceGuard() { cudaSetDevice(previous_); }
  CurrentDeviceGuard(const CurrentDeviceGuard&) = delete;
  CurrentDeviceGuard& operator=(const CurrentDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

namespace detail {

class DevicePool {
 public:
  DevicePool(int device, size_t slab_bytes) : device_(device), slab_bytes_(slab_bytes) {}

  ~DevicePool() {
    // Every DeviceAllocation holds the pool, so nothing is allocated any more when this runs. A destructor cannot
    // throw: failures here (a broken context, a driver already shut down at exit) are left for later calls to report.
    int previous = device_;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    for (auto& [id, slab] : slabs_) cudaFree(slab.base);
    cudaSetDevice(previous);
  }

  void* allocate(size_t bytes, std::string_view what) {
    const size_t rounded = rounded_request(bytes, what);
    std::lock_guard lock(mutex_);
    auto block = free_by_size_.lower_bound({rounded, 0, 0});
    if (block == free_by_size_.end()) {
      add_slab_or_throw(std::max(slab_bytes_, round_up(rounded, kSlabGranularity)), rounded, what);
      block = free_by_size_.lower_bound({rounded, 0, 0});
    }
    return take(block, rounded);
  }

  void deallocate(void* data) noexcept {
    std::lock_guard lock(mutex_);
    const auto placed = placements_.find(data);
    if (placed == placements_.end()) return;  // not from this pool: DeviceAllocation never passes such a pointer
    const auto [slab_id, begin, size] = placed->second;
    placements_.erase(placed);
    Slab& slab = slabs_.at(slab_id);
    --slab.live_allocations;
    stats_.in_use_bytes -= size;
    --stats_.allocations;

    size_t offset = begin, merged = size;
    if (const auto next = slab.free_blocks.find(begin + size); next != slab.free_blocks.end()) {
      free_by_size_.erase({next->second, slab_id, next->first});
      merged += next->second;
      slab.free_blocks.erase(next);
    }
    if (auto prev = slab.free_blocks.lower_bound(begin); prev != slab.free_blocks.begin()) {
      --prev;
      if (prev->first + prev->second == begin) {
        free_by_size_.erase({prev->second, slab_id, prev->first});
        offset = prev->first;
        merged += prev->second;
        slab.free_blocks.erase(prev);
      }
    }
    add_free_block(slab_id, offset, merged);
  }

  void reserve(size_t bytes, std::string_view what) {
    const size_t rounded = rounded_request(bytes, what);
    if (rounded == 0) return;
    std::lock_guard lock(mutex_);
    if (free_by_size_.lower_bound({rounded, 0, 0}) != free_by_size_.end()) return;
    add_slab_or_throw(round_up(rounded, kSlabGranularity), rounded, what);
  }

  size_t release_unused() {
    std::lock_guard lock(mutex_);
    return release_unused_locked();
  }

  DeviceAllocatorStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }

  int device() const { return device_; }
  size_t slab_bytes() const { return slab_bytes_; }

 private:
  struct Slab {
    char* base = nullptr;
    size_t bytes = 0;
    size_t live_allocations = 0;
    std::map<size_t, size_t> free_blocks;  // offset -> size; neighbours are found here to merge
  };
  struct Placement {
    uint64_t slab_id;
    size_t offset;
    size_t bytes;  // rounded
  };
  // Free blocks ordered by size first, so lower_bound({n, 0, 0}) is the best fit for n bytes.
  using FreeBlockKey = std::tuple<size_t, uint64_t, size_t>;  // size, slab id, offset

  static size_t rounded_request(size_t bytes, std::string_view what) {
    check(bytes <= std::numeric_limits<size_t>::max() - kSlabGranularity, "device allocation of ", bytes,
          " bytes for '", what, "': size overflows");
    return round_up(bytes, DeviceAllocator::kAlignment);
  }

  void add_free_block(uint64_t slab_id, size_t offset, size_t bytes) {
    slabs_.at(slab_id).free_blocks.emplace(offset, bytes);
    free_by_size_.emplace(bytes, slab_id, offset);
  }

  void* take(std::set<FreeBlockKey>::iterator block, size_t rounded) {
    const auto [size, slab_id, offset] = *block;
    free_by_size_.erase(block);
    Slab& slab = slabs_.at(slab_id);
    slab.free_blocks.erase(offset);
    if (size > rounded) add_free_block(slab_id, offset + rounded, size - rounded);
    ++slab.live_allocations;
    void* data = slab.base + offset;
    placements_.emplace(data, Placement{slab_id, offset, rounded});
    stats_.in_use_bytes += rounded;
    stats_.peak_in_use_bytes = std::max(stats_.peak_in_use_bytes, stats_.in_use_bytes);
    ++stats_.allocations;
    return data;
  }

  bool try_add_slab(size_t bytes) {
    CurrentDeviceGuard guard(device_);
    void* base = nullptr;
    const cudaError_t status = cudaMalloc(&base, bytes);
    if (status != cudaSuccess) {
      cudaGetLastError();  // an allocation failure is not sticky; clear it so later calls report their own
      if (status == cudaErrorMemoryAllocation) return false;
      fail("cudaMalloc of a ", bytes, "-byte slab on cuda:", device_, " failed: ", cudaGetErrorName(status), ": ",
           cudaGetErrorString(status));
    }
    const uint64_t id = next_slab_id_++;
    slabs_.emplace(id, Slab{static_cast<char*>(base), bytes, 0, {}});
    add_free_block(id, 0, bytes);
    stats_.reserved_bytes += bytes;
    ++stats_.slabs;
    return true;
  }

  // A slab of `preferred` bytes, else (after giving idle slabs back) one just big enough for the request.
  void add_slab_or_throw(size_t preferred, size_t rounded, std::string_view what) {
    if (try_add_slab(preferred)) return;
    release_unused_locked();
    if (try_add_slab(round_up(rounded, kSlabGranularity))) return;
    CurrentDeviceGuard guard(device_);
    const DeviceMemoryInfo memory = current_device_memory();
    fail("out of device memory on cuda:", device_, ": cannot allocate ", format_bytes(rounded), " (", rounded,
         " bytes) for '", what, "'; the device has ", format_bytes(memory.free_bytes), " free of ",
         format_bytes(memory.total_bytes), "; this pool holds ", format_bytes(stats_.reserved_bytes), " in ",
         stats_.slabs, " slabs, ", format_bytes(stats_.in_use_bytes), " of it in use");
  }

  size_t release_unused_locked() {
    CurrentDeviceGuard guard(device_);
    size_t released = 0;
    for (auto it = slabs_.begin(); it != slabs_.end();) {
      Slab& slab = it->second;
      if (slab.live_allocations > 0) {
        ++it;
        continue;
      }
      // With nothing allocated, the merges left exactly one free block covering the slab.
      free_by_size_.erase({slab.bytes, it->first, 0});
      DSV4_CUDA_CHECK(cudaFree(slab.base));
      released += slab.bytes;
      stats_.reserved_bytes -= slab.bytes;
      --stats_.slabs;
      it = slabs_.erase(it);
    }
    return released;
  }

  const int device_;
  const size_t slab_bytes_;
  mutable std::mutex mutex_;
  std::map<uint64_t, Slab> slabs_;
  std::set<FreeBlockKey> free_by_size_;
  std::unordered_map<const void*, Placement> placements_;
  uint64_t next_slab_id_ = 0;
  DeviceAllocatorStats stats_;
};

}  // namespace detail

DeviceAllocation::DeviceAllocation(DeviceAllocation&& other) noexcept
    : pool_(std::move(other.pool_)), data_(std::exchange(other.data_, nullptr)),
      bytes_(std::exchange(other.bytes_, 0)) {}

DeviceAllocation& DeviceAllocation::operator=(DeviceAllocation&& other) noexcept {
  if (this != &other) {
    reset();
    pool_ = std::move(other.pool_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceAllocation::reset() noexcept {
  if (data_ != nullptr) pool_->deallocate(data_);
  pool_.reset();
  data_ = nullptr;
  bytes_ = 0;
}

DeviceAllocator::DeviceAllocator(int device_index, size_t slab_bytes) {
  check(slab_bytes > 0, "device allocator: slab size must be positive");
  check(device_index >= 0, "device allocator: bad device index ", device_index);
  pool_ = std::make_shared<detail::DevicePool>(device_index, round_up(slab_bytes, kSlabGranularity));
}

DeviceAllocator::~DeviceAllocator() = default;

DeviceAllocation DeviceAllocator::allocate(size_t bytes, std::string_view what) {
  if (bytes == 0) return {};
  void* data = pool_->allocate(bytes, what);
  return DeviceAllocation(pool_, data, bytes);
}

void DeviceAllocator::reserve(size_t bytes, std::string_view what) { pool_->reserve(bytes, what); }

size_t DeviceAllocator::release_unused() { return pool_->release_unused(); }

DeviceAllocatorStats DeviceAllocator::stats() const { return pool_->stats(); }

int DeviceAllocator::device_index() const { return pool_->device(); }

size_t DeviceAllocator::slab_bytes() const { return pool_->slab_bytes(); }

}  // namespace dsv4::cuda
