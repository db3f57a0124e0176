// Device discovery for the CUDA backend.
#pragma once

#include <string>
#include <vector>

namespace dsv4::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  int multiprocessors = 0;
  size_t global_memory_bytes = 0;
  size_t l2_bytes = 0;
};

// Devices the runtime sees; empty (not an error) when there is no driver or no GPU.
std::vector<DeviceInfo> list_devices();

// Multiprocessors of the calling thread's current device: launchers size their grids with it.
int current_multiprocessors();

}  // namespace dsv4::cuda
