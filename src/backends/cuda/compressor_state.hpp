// One compressor's state for one sequence and layer on the device (dsv4::cpu::CompressorState's data): the tokens of
// the incomplete window (projected kv and gate scores with ape added, [ratio, coff·c] each), for CSA the (A, ZA)
// halves of the last complete window ([ratio, c] each), and the ticket counter that elects the CTA which updates the
// state at the end of a step. The sequence position is the caller's (the engine knows its sequence length), so the
// state holds no counter that the host would have to read back.
#pragma once

#include <cstdint>

#include "backends/cuda/device_matrix.hpp"

namespace dsv4::cuda {

// Plain pointers into a DeviceCompressorState, passed into launches.
struct CompressorStateView {
  int64_t ratio = 0;
  int64_t head_dim = 0;
  bool overlapping = false;
  float* window_kv = nullptr;       // [ratio, coff·c]
  float* window_score = nullptr;    // [ratio, coff·c]
  float* previous_kv = nullptr;     // [ratio, c], CSA only
  float* previous_score = nullptr;  // [ratio, c], CSA only
  uint32_t* finished_ctas = nullptr;
};

class DeviceCompressorState {
 public:
  DeviceCompressorState(int64_t ratio, int64_t head_dim, bool overlapping);

  const CompressorStateView& view() const { return view_; }
  // Bytes on the device (the window slots dominate: HCA ratio 128 × 512 × 2 floats × 2 = 512 KiB).
  size_t bytes() const { return storage_.bytes(); }
  // Makes the state that of an empty sequence (zeroes the ticket; slots are only read once written).
  void reset(cudaStream_t stream);

 private:
  DeviceBuffer storage_;
  CompressorStateView view_;
};

}  // namespace dsv4::cuda
