// Device-resident buffers: DeviceBuffer owns one cudaMalloc allocation (activations, outputs, scratch), and
// DeviceMatrix is a QuantizedMatrix copied to the device (data + scales) that kernels read through a
// DeviceMatrixView. Plain cudaMalloc or a piece of a DeviceAllocator pool, never managed memory; every failure names
// the buffer and the operation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "backends/cuda/device_allocator.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // `what` names the buffer in error messages ("x", "expert 3 w1 data").
  DeviceBuffer(size_t bytes, std::string_view what);
  // The same with the storage taken from `pool` (returned to it when the buffer dies).
  DeviceBuffer(DeviceAllocator& pool, size_t bytes, std::string_view what);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  size_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }
  void* data() { return data_; }
  const void* data() const { return data_; }
  template <class T>
  T* as() { return static_cast<T*>(data_); }
  template <class T>
  const T* as() const { return static_cast<const T*>(data_); }

  // Synchronous copies of exactly `bytes` bytes starting at the buffer's beginning; throw when bytes > size.
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;
  // Every byte set to `value` (asynchronously on the default stream's order).
  void fill_bytes(uint8_t value);

 private:
  void release() noexcept;
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::string name_;
  DeviceAllocation pooled_;  // set when the storage comes from a pool; data_ then points into it
};

// What a kernel needs to read a quantized weight on the device; plain data, passed by value into launches.
struct DeviceMatrixView {
  WeightFormat format = WeightFormat::F32;
  ScaleType scale_type = ScaleType::NONE;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K
  const uint8_t* data = nullptr;
  const uint8_t* scales = nullptr;  // null for F32 / BF16
  float global_scale = 1.0f;        // NVFP4 only
  size_t data_row_bytes = 0;        // bytes from one row of data to the next
  int64_t scales_per_row = 0;       // scale entries per row (per 128-row band for FP8_BLOCK128)
  size_t stored_bytes = 0;          // data + scales: what one pass over the matrix reads
};

class DeviceMatrix {
 public:
  DeviceMatrix() = default;
  // Checks the host layout (naming `what`) and copies data and scales to the device.
  DeviceMatrix(const QuantizedMatrix& host, std::string_view what);
  // The same with data and scales stored in `pool`.
  DeviceMatrix(const QuantizedMatrix& host, std::string_view what, DeviceAllocator& pool);
  // Storage in `pool` for a matrix of `layout`'s format and shape, left unwritten: the caller fills data_buffer()
  // and scales_buffer() (the staged weight upload does, with asynchronous copies).
  static DeviceMatrix allocate(const QuantizedMatrix& layout, std::string_view what, DeviceAllocator& pool);

  const DeviceMatrixView& view() const { return view_; }
  // The storage behind view().data and view().scales (scales_buffer() is empty for F32 / BF16).
  DeviceBuffer& data_buffer() { return data_; }
  const DeviceBuffer& data_buffer() const { return data_; }
  DeviceBuffer& scales_buffer() { return scales_; }
  const DeviceBuffer& scales_buffer() const { return scales_; }

 private:
  DeviceBuffer data_;
  DeviceBuffer scales_;
  DeviceMatrixView view_;

  DeviceMatrix(const QuantizedMatrix& layout, DeviceBuffer data, DeviceBuffer scales);
  // Checked layout, storage from `pool` (or cudaMalloc when null), nothing copied yet.
  static DeviceMatrix unfilled(const QuantizedMatrix& layout, std::string_view what, DeviceAllocator* pool);
};

}  // namespace dsv4::cuda
