// A weight matrix in its stored format: the one type every backend's linear op consumes (design.md §2).
// y = x Wᵀ with W logically [rows = N (outputs), cols = K (inputs)]. The bytes are borrowed (usually from the
// mmapped checkpoint); `keepalive` holds whatever owns them.
//
// Layouts (all row-major). Blocks run along K; when K (or N for FP8 row bands) is not a multiple of the block size
// the last block is partial: its scale covers only the elements that exist. Packed fp4 rows take ceil(K/2) bytes;
// for odd K the high nibble of each row's last byte is padding, written as 0 and ignored on read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

namespace dsv4 {

enum class WeightFormat : uint8_t {
  F32,           // data: float [N, K]
  BF16,          // data: bf16 [N, K]
  FP8_BLOCK128,  // data: e4m3 [N, K]; scales: [ceil(N/128), ceil(K/128)] e8m0 bytes or f32 (scale_type)
  MXFP4,         // data: e2m1 packed [N, ceil(K/2)], low nibble = even k; scales: e8m0 [N, ceil(K/32)]
  NVFP4,         // data: e2m1 packed [N, ceil(K/2)], low nibble = even k; scales: e4m3 [N, ceil(K/16)]; × global_scale
};

enum class ScaleType : uint8_t { NONE, E8M0, F32, E4M3 };

inline constexpr int64_t kFp8BlockSize = 128;   // FP8_BLOCK128: one scale per 128 rows × 128 cols
inline constexpr int64_t kMxfp4BlockSize = 32;  // MXFP4: one e8m0 scale per 32 consecutive k
inline constexpr int64_t kNvfp4BlockSize = 16;  // NVFP4: one e4m3 scale per 16 consecutive k

std::string_view to_string(WeightFormat format);
std::string_view to_string(ScaleType scale_type);

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

  // Bytes from one row of `data` to the next.
  size_t data_row_bytes() const;
  // Scale entries per row of `scales` (per 128-row band for FP8_BLOCK128); 0 for F32 and BF16.
  int64_t scales_per_row() const;
  // Throws an Error naming `what`, the format and the offending field when the view is inconsistent: negative
  // shape, missing data or scales, a scale type the format does not use, a non-finite or non-positive NVFP4 global.
  void check_layout(std::string_view what) const;
  // Throws naming `what` unless [row_begin, row_end) lies within [0, rows) and `out` is non-null when written to.
  void check_row_range(int64_t row_begin, int64_t row_end, const float* out, std::string_view what) const;
};

// Throws naming `what` and the position of the first offending element when a quantizer's float [rows, cols] input
// is null (and non-empty), has a negative shape, or holds a NaN or an infinity.
void check_quantizer_input(const float* values, int64_t rows, int64_t cols, std::string_view what);

// The scale type each format stores (FP8_BLOCK128 allows E8M0 and F32).
bool format_uses_scale_type(WeightFormat format, ScaleType scale_type);

// Buffers owned by a matrix that this process produced (quantized or converted) rather than mapped from a file.
struct QuantizedStorage {
  std::vector<uint8_t> data;
  std::vector<uint8_t> scales;
};

// A QuantizedMatrix together with its storage: `matrix` views `storage`, and matrix.keepalive shares it, so the
// view stays valid when this struct is gone. Writers fill storage->data and storage->scales in place.
struct OwnedQuantizedMatrix {
  std::shared_ptr<QuantizedStorage> storage;
  QuantizedMatrix matrix;
};

// Zero-filled storage of the right sizes for the format and shape, with the view already pointing at it.
OwnedQuantizedMatrix allocate_quantized_matrix(WeightFormat format, int64_t rows, int64_t cols,
                                               ScaleType scale_type, float global_scale = 1.0f);

}  // namespace dsv4
