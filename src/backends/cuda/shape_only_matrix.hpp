// A QuantizedMatrix that carries only a format and a shape: what the device-weight planners need to size and
// place a matrix before any bytes exist.
#pragma once

#include <cstdint>

#include "core/quantized_matrix.hpp"

namespace dsv4::cuda {

// The placeholder that lets DeviceMatrix::allocate check a layout: it needs non-null data and scale pointers, and
// never reads them.
inline constexpr uint8_t kNoHostBytes = 0;

// `rows` × `cols` of `format` with the scale type that format stores (e4m3 for NVFP4, e8m0 for MXFP4 and fp8
// block-128, none otherwise) and `global_scale`; data and scales point at a placeholder, never at weights.
inline QuantizedMatrix shape_only_matrix(WeightFormat format, int64_t rows, int64_t cols, float global_scale) {
  QuantizedMatrix m;
  m.format = format;
  m.rows = rows;
  m.cols = cols;
  m.scale_type = format == WeightFormat::NVFP4                                           ? ScaleType::E4M3
                 : format == WeightFormat::MXFP4 || format == WeightFormat::FP8_BLOCK128 ? ScaleType::E8M0
                                                                                          : ScaleType::NONE;
  m.global_scale = global_scale;
  m.data = &kNoHostBytes;
  m.scales = &kNoHostBytes;
  return m;
}

}  // namespace dsv4::cuda
