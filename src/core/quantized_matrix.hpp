// A weight matrix in its stored format: the one type every backend's linear op consumes (design.md §2).
// y = x Wᵀ with W logically [rows = N (outputs), cols = K (inputs)]. The bytes are borrowed (usually from the
// mmapped checkpoint); `keepalive` holds whatever owns them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

namespace dsv4 {

enum class WeightFormat : uint8_t {
  F32,           // data: float [N, K]
  BF16,          // data: bf16 [N, K]
  FP8_BLOCK128,  // data: e4m3 [N, K]; scales: [ceil(N/128), ceil(K/128)] e8m0 bytes or f32 (scale_type)
  MXFP4,         // data: e2m1 packed [N, K/2], low nibble = even k; scales: e8m0 [N, K/32]
  NVFP4,         // data: e2m1 packed [N, K/2], low nibble = even k; scales: e4m3 [N, K/16]; × global_scale
};

enum class ScaleType : uint8_t { NONE, E8M0, F32, E4M3 };

std::string_view to_string(WeightFormat format);

struct QuantizedMatrix {
  WeightFormat format = WeightFormat::F32;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K
  const uint8_t* data = nullptr;
  const uint8_t* scales = nullptr;
  ScaleType scale_type = ScaleType::NONE;
  float global_scale = 1.0f;  // NVFP4 only (ModelOpt weight_scale_2)
  std::shared_ptr<const void> keepalive;

  size_t data_bytes() const;
  size_t scale_bytes() const;
  // Parameters held (rows × cols) and the bytes a pass over the matrix reads (data + scales).
  int64_t parameters() const { return rows * cols; }
  size_t stored_bytes() const { return data_bytes() + scale_bytes(); }
};

}  // namespace dsv4
