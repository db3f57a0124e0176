#include "core/quantized_matrix.hpp"

#include <cmath>

#include "core/error.hpp"

namespace dsv4 {

std::string_view to_string(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return "f32";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::FP8_BLOCK128: return "fp8_block128";
    case WeightFormat::MXFP4: return "mxfp4";
    case WeightFormat::NVFP4: return "nvfp4";
  }
  return "unknown";
}

std::string_view to_string(ScaleType scale_type) {
  switch (scale_type) {
    case ScaleType::NONE: return "none";
    case ScaleType::E8M0: return "e8m0";
    case ScaleType::F32: return "f32";
    case ScaleType::E4M3: return "e4m3";
  }
  return "unknown";
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t QuantizedMatrix::data_row_bytes() const {
  switch (format) {
    case WeightFormat::F32: return size_t(cols) * 4;
    case WeightFormat::BF16: return size_t(cols) * 2;
    case WeightFormat::FP8_BLOCK128: return size_t(cols);
    case WeightFormat::MXFP4:
    case WeightFormat::NVFP4: return size_t(ceil_div(cols, 2));
  }
  return 0;
}

int64_t QuantizedMatrix::scales_per_row() const {
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: return 0;
    case WeightFormat::FP8_BLOCK128: return ceil_div(cols, kFp8BlockSize);
    case WeightFormat::MXFP4: return ceil_div(cols, kMxfp4BlockSize);
    case WeightFormat::NVFP4: return ceil_div(cols, kNvfp4BlockSize);
  }
  return 0;
}

size_t QuantizedMatrix::data_bytes() const { return size_t(rows) * data_row_bytes(); }

size_t QuantizedMatrix::scale_bytes() const {
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: return 0;
    case WeightFormat::FP8_BLOCK128:
      return size_t(ceil_div(rows, kFp8BlockSize) * scales_per_row()) * (scale_type == ScaleType::F32 ? 4 : 1);
    case WeightFormat::MXFP4:
    case WeightFormat::NVFP4: return size_t(rows * scales_per_row());
  }
  return 0;
}

bool format_uses_scale_type(WeightFormat format, ScaleType scale_type) {
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: return scale_type == ScaleType::NONE;
    case WeightFormat::FP8_BLOCK128: return scale_type == ScaleType::E8M0 || scale_type == ScaleType::F32;
    case WeightFormat::MXFP4: return scale_type == ScaleType::E8M0;
    case WeightFormat::NVFP4: return scale_type == ScaleType::E4M3;
  }
  return false;
}

void QuantizedMatrix::check_layout(std::string_view what) const {
  const std::string_view name = to_string(format);
  check(name != "unknown", what, ": unknown weight format ", int(format));
  check(rows >= 0 && cols >= 0, what, ": ", name, " matrix has negative shape [", rows, ", ", cols, "]");
  check(format_uses_scale_type(format, scale_type), what, ": ", name, " matrix cannot have ", to_string(scale_type),
        " scales");
  check(data != nullptr || data_bytes() == 0, what, ": ", name, " matrix [", rows, ", ", cols, "] has no data");
  check(scales != nullptr || scale_bytes() == 0, what, ": ", name, " matrix [", rows, ", ", cols, "] has no scales");
  check(format != WeightFormat::NVFP4 || (std::isfinite(global_scale) && global_scale > 0.0f), what,
        ": nvfp4 global scale ", global_scale, " is not a positive finite number");
}

void QuantizedMatrix::check_row_range(int64_t row_begin, int64_t row_end, const float* out,
                                      std::string_view what) const {
  check(0 <= row_begin && row_begin <= row_end && row_end <= rows, what, ": row range [", row_begin, ", ", row_end,
        ") outside the ", rows, " rows of the ", to_string(format), " matrix");
  check(out != nullptr || row_begin == row_end || cols == 0, what, ": null output buffer");
}

void check_quantizer_input(const float* values, int64_t rows, int64_t cols, std::string_view what) {
  check(rows >= 0 && cols >= 0, what, ": negative shape [", rows, ", ", cols, "]");
  check(values != nullptr || rows * cols == 0, what, ": null input for shape [", rows, ", ", cols, "]");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k)
      check(std::isfinite(values[r * cols + k]), what, ": non-finite input ", values[r * cols + k], " at row ", r,
            ", col ", k);
}

OwnedQuantizedMatrix allocate_quantized_matrix(WeightFormat format, int64_t rows, int64_t cols,
                                               ScaleType scale_type, float global_scale) {
  OwnedQuantizedMatrix owned;
  owned.storage = std::make_shared<QuantizedStorage>();
  QuantizedMatrix& m = owned.matrix;
  m.format = format;
  m.rows = rows;
  m.cols = cols;
  m.scale_type = scale_type;
  m.global_scale = global_scale;
  check(rows >= 0 && cols >= 0, "allocate ", to_string(format), " matrix: negative shape [", rows, ", ", cols, "]");
  check(format_uses_scale_type(format, scale_type), "allocate ", to_string(format), " matrix: cannot have ",
        to_string(scale_type), " scales");
  owned.storage->data.assign(m.data_bytes(), 0);
  owned.storage->scales.assign(m.scale_bytes(), 0);
  m.data = owned.storage->data.data();
  m.scales = owned.storage->scales.data();
  m.keepalive = owned.storage;
  return owned;
}

}  // namespace dsv4
