// What the GPU tests share: whether a device is there, host vectors copied to device buffers, and outputs poisoned
// with NaN (0xFF bytes) followed by a guard region that a kernel must leave untouched.
#pragma once

#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace dsv4::cuda {

inline bool has_device() { return !list_devices().empty(); }

// A device copy of `host` (at least 16 bytes, so an empty vector still gives a valid, aligned pointer).
template <class T>
DeviceBuffer to_device(const std::vector<T>& host, const char* what) {
  DeviceBuffer buffer(std::max<size_t>(host.size() * sizeof(T), 16), what);
  if (!host.empty()) buffer.upload(host.data(), host.size() * sizeof(T));
  return buffer;
}

inline constexpr size_t kGuardFloats = 64;

// A device output of `floats` values plus a guard region, every byte 0xFF (NaN).
inline DeviceBuffer poisoned(size_t floats, const char* what) {
  DeviceBuffer buffer((floats + kGuardFloats) * sizeof(float), what);
  buffer.fill_bytes(0xFF);
  return buffer;
}

// The `floats` values of a poisoned() output; fails the test where the kernel wrote into the guard region.
inline std::vector<float> download(const DeviceBuffer& buffer, size_t floats) {
  std::vector<float> host(floats + kGuardFloats);
  buffer.download(host.data(), host.size() * sizeof(float));
  for (size_t i = floats; i < host.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &host[i], sizeof bits);
    EXPECT_EQ(bits, 0xFFFFFFFFu) << buffer.name() << ": write past the end at float " << i;
  }
  host.resize(floats);
  return host;
}

// One bf16 step at `magnitude` (the spacing of bf16 values there).
inline float bf16_ulp(float magnitude) {
  const int exponent = magnitude > 0 ? std::ilogb(magnitude) : -126;
  return std::ldexp(1.0f, std::max(exponent, -126) - 7);
}

}  // namespace dsv4::cuda
