// A RoPE table (backends/cuda/kernels/rope.hpp) of a CPU RopeTable's frequencies on the device, for the GPU tests of
// the kernels that read one.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cpu/rope.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/rope.hpp"
#include "support/device_buffers.hpp"

namespace dsv4::cuda {

// Rows for positions [0, positions); complete when this returns.
inline DeviceBuffer device_rope_table(const cpu::RopeTable& rope, int64_t positions) {
  const DeviceBuffer frequencies = to_device(rope.frequencies(), "RoPE frequencies");
  DeviceBuffer table(rope_table_bytes(rope.rope_dim() / 2, positions), "RoPE table");
  run_rope_table({.table = table.as<float2>(), .frequencies = frequencies.as<float>(), .pairs = rope.rope_dim() / 2,
                  .positions = positions});
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  return table;
}

}  // namespace dsv4::cuda
