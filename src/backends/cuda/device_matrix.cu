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

DeviceBuffer::~DeviceBuffer() { release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)),
      name_(std::move(other.name_)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
    name_ = std::move(other.name_);
  }
  return *this;
}

void DeviceBuffer::release() noexcept {
  // A destructor cannot throw; a failing cudaFree here means the context is already broken and the next checked
  // call reports it.
  if (data_ != nullptr) cudaFree(data_);
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

DeviceMatrix::DeviceMatrix(const QuantizedMatrix& host, std::string_view what)
    : data_((host.check_layout(what), host.data_bytes()), std::string(what) + " data"),
      scales_(host.scale_bytes(), std::string(what) + " scales") {
  data_.upload(host.data, host.data_bytes());
  scales_.upload(host.scales, host.scale_bytes());
  view_ = DeviceMatrixView{
      .format = host.format,
      .scale_type = host.scale_type,
      .rows = host.rows,
      .cols = host.cols,
      .data = data_.as<uint8_t>(),
      .scales = host.scale_bytes() > 0 ? scales_.as<uint8_t>() : nullptr,
      .global_scale = host.global_scale,
      .data_row_bytes = host.data_row_bytes(),
      .scales_per_row = host.scales_per_row(),
      .stored_bytes = host.stored_bytes(),
  };
}

}  // namespace dsv4::cuda
