#include "backends/cuda/compressor_state.hpp"

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

DeviceCompressorState::DeviceCompressorState(int64_t ratio, int64_t head_dim, bool overlapping) {
  check(ratio > 0 && head_dim > 0 && head_dim % 2 == 0, "DeviceCompressorState: bad ratio ", ratio,
        " or head_dim ", head_dim, " (positive, head_dim even)");
  const int64_t width = overlapping ? 2 * head_dim : head_dim;
  const size_t window_floats = size_t(ratio * width);
  const size_t previous_floats = overlapping ? size_t(ratio * head_dim) : 0;
  // One allocation: window kv, window scores, previous kv, previous scores, then the ticket (16-byte aligned).
  const size_t float_bytes = (2 * window_floats + 2 * previous_floats) * sizeof(float);
  storage_ = DeviceBuffer(float_bytes + 16, "compressor state");
  auto* base = storage_.as<float>();
  view_ = CompressorStateView{.ratio = ratio,
                              .head_dim = head_dim,
                              .overlapping = overlapping,
                              .window_kv = base,
                              .window_score = base + window_floats,
                              .previous_kv = overlapping ? base + 2 * window_floats : nullptr,
                              .previous_score = overlapping ? base + 2 * window_floats + previous_floats : nullptr,
                              .finished_ctas = reinterpret_cast<uint32_t*>(storage_.as<char>() + float_bytes)};
  reset(nullptr);
  DSV4_CUDA_CHECK(cudaStreamSynchronize(nullptr));
}

void DeviceCompressorState::reset(cudaStream_t stream) {
  DSV4_CUDA_CHECK(cudaMemsetAsync(view_.finished_ctas, 0, sizeof(uint32_t), stream));
}

}  // namespace dsv4::cuda
