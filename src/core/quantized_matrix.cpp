#include "core/quantized_matrix.hpp"

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

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t QuantizedMatrix::data_bytes() const {
  switch (format) {
    case WeightFormat::F32: return size_t(rows * cols) * 4;
    case WeightFormat::BF16: return size_t(rows * cols) * 2;
    case WeightFormat::FP8_BLOCK128: return size_t(rows * cols);
    case WeightFormat::MXFP4:
    case WeightFormat::NVFP4: return size_t(rows * ceil_div(cols, 2));
  }
  return 0;
}

size_t QuantizedMatrix::scale_bytes() const {
  switch (format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: return 0;
    case WeightFormat::FP8_BLOCK128:
      return size_t(ceil_div(rows, 128) * ceil_div(cols, 128)) * (scale_type == ScaleType::F32 ? 4 : 1);
    case WeightFormat::MXFP4: return size_t(rows * ceil_div(cols, 32));
    case WeightFormat::NVFP4: return size_t(rows * ceil_div(cols, 16));
  }
  return 0;
}

}  // namespace dsv4
