#include "core/dequantize.hpp"

#include <cstring>

#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/fp8_block.hpp"
#include "core/mxfp4.hpp"
#include "core/nvfp4.hpp"

namespace dsv4 {

namespace {

void dequantize_f32_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  const size_t bytes = size_t(row_end - row_begin) * w.data_row_bytes();
  if (bytes != 0) std::memcpy(out, w.data + row_begin * w.data_row_bytes(), bytes);
}

void dequantize_bf16_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  const uint8_t* bytes = w.data + row_begin * w.data_row_bytes();
  const int64_t count = (row_end - row_begin) * w.cols;
  for (int64_t i = 0; i < count; ++i) {
    uint16_t bits;  // the checkpoint's bytes carry no alignment promise
    std::memcpy(&bits, bytes + 2 * i, 2);
    out[i] = bf16_to_float(bits);
  }
}

}  // namespace

void dequantize_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  switch (w.format) {
    case WeightFormat::F32:
    case WeightFormat::BF16: {
      const std::string_view what = w.format == WeightFormat::F32 ? "dequantize f32" : "dequantize bf16";
      w.check_layout(what);
      w.check_row_range(row_begin, row_end, out, what);
      if (w.format == WeightFormat::F32)
        dequantize_f32_rows(w, row_begin, row_end, out);
      else
        dequantize_bf16_rows(w, row_begin, row_end, out);
      return;
    }
    case WeightFormat::FP8_BLOCK128: return dequantize_fp8_block128_rows(w, row_begin, row_end, out);
    case WeightFormat::MXFP4: return dequantize_mxfp4_rows(w, row_begin, row_end, out);
    case WeightFormat::NVFP4: return dequantize_nvfp4_rows(w, row_begin, row_end, out);
  }
  fail("dequantize: unknown weight format ", int(w.format));
}

std::vector<float> dequantize(const QuantizedMatrix& w) {
  w.check_layout("dequantize");
  std::vector<float> out(size_t(w.rows * w.cols));
  dequantize_rows(w, 0, w.rows, out.data());
  return out;
}

}  // namespace dsv4
