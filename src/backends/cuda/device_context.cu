#include "backends/cuda/device_context.hpp"

#include <charconv>
#include <cstdio>
#include <utility>

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

int parse_device_spec(std::string_view spec) {
  constexpr std::string_view kPrefix = "cuda";
  if (spec == kPrefix) return 0;
  const auto bad = [&]() { fail("device '", spec, "': expected 'cuda' or 'cuda:N' with N a device index"); };
  if (!spec.starts_with("cuda:")) bad();
  const std::string_view digits = spec.substr(kPrefix.size() + 1);
  int index = -1;
  const auto [end, status] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
  if (digits.empty() || status != std::errc{} || end != digits.data() + digits.size() || index < 0) bad();
  return index;
}

Stream::Stream(std::string_view what) : name_(what) {
  const cudaError_t status = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking);
  if (status != cudaSuccess) {
    stream_ = nullptr;
    fail("creating the '", name_, "' CUDA stream failed: ", cudaGetErrorName(status), ": ",
         cudaGetErrorString(status));
  }
}

Stream::~Stream() {
  // A destructor cannot throw; a failure here means the context is already broken and the next checked call says so.
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

Stream::Stream(Stream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)), name_(std::move(other.name_)) {}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
    name_ = std::move(other.name_);
  }
  return *this;
}

void Stream::synchronize() const {
  const cudaError_t status = cudaStreamSynchronize(stream_);
  if (status != cudaSuccess)
    fail("work on the '", name_, "' CUDA stream failed: ", cudaGetErrorName(status), ": ",
         cudaGetErrorString(status));
}

DeviceMemoryInfo current_device_memory() {
  DeviceMemoryInfo memory;
  DSV4_CUDA_CHECK(cudaMemGetInfo(&memory.free_bytes, &memory.total_bytes));
  return memory;
}

std::string format_bytes(size_t bytes) {
  char text[32];
  if (bytes >= (size_t(1) << 30))
    std::snprintf(text, sizeof text, "%.2f GiB", double(bytes) / double(size_t(1) << 30));
  else if (bytes >= (size_t(1) << 20))
    std::snprintf(text, sizeof text, "%.1f MiB", double(bytes) / double(size_t(1) << 20));
  else if (bytes >= (size_t(1) << 10))
    std::snprintf(text, sizeof text, "%.1f KiB", double(bytes) / double(size_t(1) << 10));
  else
    std::snprintf(text, sizeof text, "%zu B", bytes);
  return text;
}

namespace {

std::string list_of(const std::vector<DeviceInfo>& devices) {
  std::string text;
  for (const DeviceInfo& d : devices)
    text += (text.empty() ? "" : ", ") + ("cuda:" + std::to_string(d.index)) + " " + d.name + " (sm_" +
            std::to_string(d.sm_major) + std::to_string(d.sm_minor) + ")";
  return text;
}

// Finds device `index`, checks it can run the sm_90a kernels and makes it current.
DeviceInfo select_device(int index) {
  const std::vector<DeviceInfo> devices = list_devices();
  check(!devices.empty(), "device cuda:", index, ": no CUDA device is visible (no driver, no GPU, or ",
        "CUDA_VISIBLE_DEVICES hides them)");
  check(index >= 0 && size_t(index) < devices.size(), "device cuda:", index, " does not exist; ", devices.size(),
        " visible: ", list_of(devices));
  const DeviceInfo& info = devices[size_t(index)];
  check(info.sm_major == 9 && info.sm_minor == 0, "device cuda:", index, " (", info.name, ") has compute capability ",
        info.sm_major, ".", info.sm_minor, "; the CUDA kernels are built for Hopper sm_90a only (H100, H200)");
  DSV4_CUDA_CHECK(cudaSetDevice(index));
  return info;
}

std::string json_escaped(std::string_view text) {
  std::string out;
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char escape[8];
      std::snprintf(escape, sizeof escape, "\\u%04x", c);
      out += escape;
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

DeviceContext::DeviceContext(int index) : info_(select_device(index)), compute_("compute"), copy_("copy") {}

void DeviceContext::make_current() const { DSV4_CUDA_CHECK(cudaSetDevice(info_.index)); }

DeviceMemoryInfo DeviceContext::memory() const {
  make_current();
  return current_device_memory();
}

std::string DeviceContext::describe() const {
  const DeviceMemoryInfo mem = memory();
  return "cuda:" + std::to_string(info_.index) + " " + info_.name + " (sm_" + std::to_string(info_.sm_major) +
         std::to_string(info_.sm_minor) + ", " + std::to_string(info_.multiprocessors) + " SMs, L2 " +
         format_bytes(info_.l2_bytes) + ", " + format_bytes(mem.free_bytes) + " free of " +
         format_bytes(mem.total_bytes) + ")";
}

std::string DeviceContext::json() const {
  const DeviceMemoryInfo mem = memory();
  return "{\"index\": " + std::to_string(info_.index) + ", \"name\": \"" + json_escaped(info_.name) +
         "\", \"compute_capability\": \"" + std::to_string(info_.sm_major) + "." + std::to_string(info_.sm_minor) +
         "\", \"multiprocessors\": " + std::to_string(info_.multiprocessors) +
         ", \"l2_bytes\": " + std::to_string(info_.l2_bytes) + ", \"memory_total_bytes\": " +
         std::to_string(mem.total_bytes) + ", \"memory_free_bytes\": " + std::to_string(mem.free_bytes) + "}";
}

}  // namespace dsv4::cuda
