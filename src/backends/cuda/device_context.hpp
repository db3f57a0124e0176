// The device the CUDA backend runs on: chosen by a "cuda:N" spec, checked to be Hopper (the kernels are built for
// sm_90a only), made current, with the backend's streams. Also the device report that `dsv4 inspect` and the
// benchmarks' JSON print (name, memory, multiprocessors).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "backends/cuda/device.hpp"

namespace dsv4::cuda {

// The device index of "cuda" (index 0) or "cuda:N". Throws naming the spec when it is anything else.
int parse_device_spec(std::string_view spec);

// One CUDA stream, owned: created non-blocking (no implicit ordering with the legacy default stream, which the
// synchronous cudaMemcpy of DeviceBuffer uses) and destroyed with the object.
class Stream {
 public:
  // `what` names the stream in error messages ("compute", "weight upload").
  explicit Stream(std::string_view what);
  ~Stream();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  const std::string& name() const { return name_; }
  // Waits for all work queued so far; an asynchronous fault of that work is reported here, naming the stream.
  void synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
  std::string name_;
};

struct DeviceMemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

// Free and total memory of the current device (cudaMemGetInfo).
DeviceMemoryInfo current_device_memory();

// Bytes as "12.34 GiB" / "512.0 MiB" / "980 B" for messages.
std::string format_bytes(size_t bytes);

class DeviceContext {
 public:
  // Makes device `index` current on the calling thread after checking that it exists (the error lists the devices
  // that do) and that it is sm_90; creates the compute and copy streams.
  explicit DeviceContext(int index);
  // The same from a spec: "cuda" or "cuda:N".
  static DeviceContext open(std::string_view spec) { return DeviceContext(parse_device_spec(spec)); }

  int index() const { return info_.index; }
  const DeviceInfo& info() const { return info_; }
  // Kernels of a decode step run in order on this one.
  cudaStream_t compute_stream() const { return compute_.get(); }
  // Host-to-device transfers (weight upload) run here, so they can overlap compute.
  cudaStream_t copy_stream() const { return copy_.get(); }
  // Makes this device current on the calling thread (CUDA's current device is per thread).
  void make_current() const;
  // Memory now, read from the driver.
  DeviceMemoryInfo memory() const;

  // "cuda:0 NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, L2 50 MiB, 79.10 GiB free of 79.19 GiB)".
  std::string describe() const;
  // The same as one JSON object: {"index", "name", "compute_capability", "multiprocessors", "l2_bytes",
  // "memory_total_bytes", "memory_free_bytes"}.
  std::string json() const;

 private:
  DeviceInfo info_;
  Stream compute_;
  Stream copy_;
};

}  // namespace dsv4::cuda
