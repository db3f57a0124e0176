#include "backends/cuda/device_matrix.hpp"

#include <utility>

#include "backends/cuda/cuda_check.hpp"

namespace dsv4::cuda {

DeviceBuffer::DeviceBuffer(size_t bytes, std::string_view what) : bytes_(bytes), name_(what) {
  if (bytes == 0) return;
  const cudaError_t status = cudaMalloc(&data_, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();  // an allocation failure is not sticky; clear it so later calls report their own
    data_ = nullptr;
    fail("cudaMalloc of ", bytes, " bytes for device buffer '", name_, "' failed: ", cudaGetErrorName(status), ": ",
         cudaGetErrorString(status));
  }
}

DeviceBuffer::DeviceBuffer(DeviceAllocator& pool, size_t bytes, std::string_view what)
    : bytes_(bytes), name_(what), pooled_(pool.allocate(bytes, what)) {
  data_ = pooled_.data();
}

DeviceBuffer::~DeviceBuffer() { release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)),
      name_(std::move(other.name_)), pooled_(std::move(other.pooled_)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    name_ = std::move(other.name_);
    pooled_ = std::move(other.pooled_);
  }
  return *this;
}

void DeviceBuffer::release() noexcept {
  // A destructor cannot throw; a failing cudaFree here means the context is already broken and the next checked
  // call reports it.
  if (pooled_)
    pooled_.reset();
  else if (data_ != nullptr)
    cudaFree(data_);
  data_ = nullptr;
  bytes_ = 0;
}

void DeviceBuffer::upload(const void* host, size_t bytes) {
  check(bytes <= bytes_, "upload of ", bytes, " bytes into device buffer '", name_, "' of ", bytes_, " bytes");
  check(bytes == 0 || host != nullptr, "upload into device buffer '", name_, "' from a null host pointer");
  if (bytes > 0) DSV4_CUDA_CHECK(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* host, size_t bytes) const {
  check(bytes <= bytes_, "download of ", bytes, " bytes from device buffer '", name_, "' of ", bytes_, " bytes");
  check(bytes == 0 || host != nullptr, "download from device buffer '", name_, "' into a null host pointer");
  if (bytes > 0) DSV4_CUDA_CHECK(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost));
}

void DeviceBuffer::fill_bytes(uint8_t value) {
  if (bytes_ > 0) DSV4_CUDA_CHECK(cudaMemset(data_, value, bytes_));
}

DeviceMatrix::DeviceMatrix(const QuantizedMatrix& layout, DeviceBuffer data, DeviceBuffer scales)
    : data_(std::move(data)), scales_(std::move(scales)) {
  view_ = DeviceMatrixView{
      .format = layout.format,
      .scale_type = layout.scale_type,
      .rows = layout.rows,
      .cols = layout.cols,
      .data = data_.as<uint8_t>(),
      .scales = layout.scale_bytes() > 0 ? scales_.as<uint8_t>() : nullptr,
      .global_scale = layout.global_scale,
      .data_row_bytes = layout.data_row_bytes(),
      .scales_per_row = layout.scales_per_row(),
      .stored_bytes = layout.stored_bytes(),
  };
}

DeviceMatrix::DeviceMatrix(const QuantizedMatrix& host, std::string_view what)
    : DeviceMatrix(unfilled(host, what, nullptr)) {
  data_.upload(host.data, host.data_bytes());
  scales_.upload(host.scales, host.scale_bytes());
}

DeviceMatrix::DeviceMatrix(const QuantizedMatrix& host, std::string_view what, DeviceAllocator& pool)
    : DeviceMatrix(unfilled(host, what, &pool)) {
  data_.upload(host.data, host.data_bytes());
  scales_.upload(host.scales, host.scale_bytes());
}

DeviceMatrix DeviceMatrix::allocate(const QuantizedMatrix& layout, std::string_view what, DeviceAllocator& pool) {
  return unfilled(layout, what, &pool);
}

DeviceMatrix DeviceMatrix::unfilled(const QuantizedMatrix& layout, std::string_view what, DeviceAllocator* pool) {
  // The layout is checked before its sizes are trusted for an allocation.
  layout.check_layout(what);
  const std::string data_name = std::string(what) + " data", scales_name = std::string(what) + " scales";
  DeviceBuffer data = pool != nullptr ? DeviceBuffer(*pool, layout.data_bytes(), data_name)
                                      : DeviceBuffer(layout.data_bytes(), data_name);
  DeviceBuffer scales = pool != nullptr ? DeviceBuffer(*pool, layout.scale_bytes(), scales_name)
                                        : DeviceBuffer(layout.scale_bytes(), scales_name);
  return DeviceMatrix(layout, std::move(data), std::move(scales));
}

}  // namespace dsv4::cuda
