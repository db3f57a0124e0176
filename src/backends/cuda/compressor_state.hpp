// The compressor state of every sequence slot for one compressor (one layer's main or indexer compressor) on the
// device (dsv4::cpu::CompressorState's data, per slot, except that the scores are stored as projected and take
// their ape when pooled: a decode step that completes no entry then reads only its token's projections): the
// tokens of the incomplete window (projected kv and gate scores, [ratio, coff·c] each), for CSA the (A, ZA) halves
// of the last complete window ([ratio, c] each), and the ticket counter that elects the CTA which updates a slot's
// state at the end of a step. Slots are rows of one allocation, so a batched launch reaches any sequence's state from
// its slot number alone. The sequence position is the caller's (the engine knows its sequence lengths), so the state
// holds no counter that the host would have to read back.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"
#include "core/host_device.hpp"

namespace dsv4::cuda {

// Plain pointers into a DeviceCompressorState, passed into launches: slot s's arrays start s strides in.
struct CompressorStateView {
  int64_t ratio = 0;
  int64_t head_dim = 0;
  bool overlapping = false;
  int slots = 0;
  float* window_kv = nullptr;       // [slots, ratio, coff·c]
  float* window_score = nullptr;    // [slots, ratio, coff·c]
  float* previous_kv = nullptr;     // [slots, ratio, c], CSA only
  float* previous_score = nullptr;  // [slots, ratio, c], CSA only
  uint32_t* finished_ctas = nullptr;  // [slots]

  DSV4_HD int64_t window_floats() const { return ratio * (overlapping ? 2 * head_dim : head_dim); }
  // The view of one slot's state (slots = 1).
  DSV4_HD CompressorStateView of_slot(int slot) const {
    CompressorStateView v = *this;
    v.slots = 1;
    v.window_kv += slot * window_floats();
    v.window_score += slot * window_floats();
    if (overlapping) {
      v.previous_kv += slot * ratio * head_dim;
      v.previous_score += slot * ratio * head_dim;
    }
    v.finished_ctas += slot;
    return v;
  }
};

class DeviceCompressorState {
 public:
  DeviceCompressorState(int64_t ratio, int64_t head_dim, bool overlapping, int slots = 1);

  const CompressorStateView& view() const { return view_; }
  // Bytes on the device (the window slots dominate: HCA ratio 128 × 512 × 2 floats × 2 = 512 KiB per slot).
  size_t bytes() const { return storage_.bytes(); }
  static size_t bytes_for(int64_t ratio, int64_t head_dim, bool overlapping, int slots);
  // Makes slot `slot`'s state that of an empty sequence (zeroes its ticket; window slots are only read once written).
  void reset(int slot, cudaStream_t stream);

 private:
  DeviceBuffer storage_;
  CompressorStateView view_;
};

}  // namespace dsv4::cuda
