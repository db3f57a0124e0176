#include "backends/cuda/compressor_state.hpp"

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

struct StateSizes {
  size_t window_floats, previous_floats, float_bytes, ticket_bytes;
};

StateSizes sizes_of(int64_t ratio, int64_t head_dim, bool overlapping, int slots) {
  const int64_t width = overlapping ? 2 * head_dim : head_dim;
  StateSizes s;
  s.window_floats = size_t(slots) * size_t(ratio * width);
  s.previous_floats = overlapping ? size_t(slots) * size_t(ratio * head_dim) : 0;
  s.float_bytes = (2 * s.window_floats + 2 * s.previous_floats) * sizeof(float);
  s.ticket_bytes = (size_t(slots) * sizeof(uint32_t) + 15) / 16 * 16;
  return s;
}

}  // namespace

size_t DeviceCompressorState::bytes_for(int64_t ratio, int64_t head_dim, bool overlapping, int slots) {
  const StateSizes s = sizes_of(ratio, head_dim, overlapping, slots);
  return s.float_bytes + s.ticket_bytes;
}

DeviceCompressorState::DeviceCompressorState(int64_t ratio, int64_t head_dim, bool overlapping, int slots) {
  check(ratio > 0 && head_dim > 0 && head_dim % 2 == 0 && slots > 0, "DeviceCompressorState: bad ratio ", ratio,
        ", head_dim ", head_dim, " or slots ", slots, " (positive, head_dim even)");
  const StateSizes s = sizes_of(ratio, head_dim, overlapping, slots);
  // One allocation: window kv, window scores, previous kv, previous scores, then the tickets (16-byte aligned).
  storage_ = DeviceBuffer(s.float_bytes + s.ticket_bytes, "compressor state");
  auto* base = storage_.as<float>();
  view_ = CompressorStateView{.ratio = ratio,
                              .head_dim = head_dim,
                              .overlapping = overlapping,
                              .slots = slots,
                              .window_kv = base,
                              .window_score = base + s.window_floats,
                              .previous_kv = overlapping ? base + 2 * s.window_floats : nullptr,
                              .previous_score = overlapping ? base + 2 * s.window_floats + s.previous_floats : nullptr,
                              .finished_ctas = reinterpret_cast<uint32_t*>(storage_.as<char>() + s.float_bytes)};
  DSV4_CUDA_CHECK(cudaMemset(view_.finished_ctas, 0, s.ticket_bytes));
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
}

void DeviceCompressorState::reset(int slot, cudaStream_t stream) {
  check(slot >= 0 && slot < view_.slots, "DeviceCompressorState::reset: slot ", slot, " outside [0, ", view_.slots,
        ")");
  DSV4_CUDA_CHECK(cudaMemsetAsync(view_.finished_ctas + slot, 0, sizeof(uint32_t), stream));
}

}  // namespace dsv4::cuda
