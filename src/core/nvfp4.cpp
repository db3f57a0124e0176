#include "core/nvfp4.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "core/e2m1.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"

namespace dsv4 {

namespace {

// ModelOpt's rule for one block of `count` values starting at an even k; returns the e4m3 scale code.
uint8_t quantize_nvfp4_block(const float* x, int64_t count, float global, uint8_t* packed) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(x[i]));
  const uint8_t scale = nvfp4_scale_for_amax(amax, global);
  encode_e2m1_block(x, count, nvfp4_block_factor(scale, global), packed);
  return scale;
}

// e4m3 holds the powers of two 2^-9 (smallest subnormal) .. 2^8.
constexpr int kE4m3MinPowerOfTwo = -9;
constexpr int kE4m3MaxPowerOfTwo = 8;
constexpr int kE4m3PowerOfTwoCount = kE4m3MaxPowerOfTwo - kE4m3MinPowerOfTwo + 1;

uint8_t e4m3_power_of_two(int exponent) { return float_to_e4m3(std::ldexp(1.0f, exponent)); }

bool block_payload_is_zero(const uint8_t* packed_row, int64_t k0, int64_t count) {
  for (int64_t k = k0; k < k0 + count; ++k)
    if ((e2m1_nibble(packed_row, k) & 0x7u) != 0) return false;
  return true;
}

// Global exponent G maximising the number of blocks whose e8m0 code c satisfies c - 127 - G in [-9, 8]; ties go to
// the highest G. `histogram` counts non-zero blocks per e8m0 code.
int choose_global_exponent(const std::array<int64_t, 256>& histogram) {
  int best_top = -1;  // highest e8m0 code of the window [top - 17, top]
  int64_t best_count = -1;
  // Windows whose top lies past 254 still cover codes; the global 2^(top - 127 - 8) stays a float for top <= 262.
  for (int top = 0; top <= 254 + kE4m3PowerOfTwoCount - 1; ++top) {
    int64_t count = 0;
    for (int code = std::max(0, top - kE4m3PowerOfTwoCount + 1); code <= std::min(top, 254); ++code)
      count += histogram[code];
    if (count >= best_count) {
      best_count = count;
      best_top = top;
    }
  }
  if (best_count == 0) return 0;
  return best_top - 127 - kE4m3MaxPowerOfTwo;
}

}  // namespace

OwnedQuantizedMatrix quantize_nvfp4_with_global(const float* values, int64_t rows, int64_t cols, float global_scale) {
  constexpr std::string_view what = "quantize nvfp4";
  check_quantizer_input(values, rows, cols, what);
  check(std::isfinite(global_scale) && global_scale > 0.0f, what, ": global scale ", global_scale,
        " is not a positive finite number");
  OwnedQuantizedMatrix owned =
      allocate_quantized_matrix(WeightFormat::NVFP4, rows, cols, ScaleType::E4M3, global_scale);
  const size_t row_bytes = owned.matrix.data_row_bytes();
  const int64_t blocks_per_row = owned.matrix.scales_per_row();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const int64_t k0 = b * kNvfp4BlockSize;
      owned.storage->scales[r * blocks_per_row + b] =
          quantize_nvfp4_block(values + r * cols + k0, std::min(kNvfp4BlockSize, cols - k0), global_scale,
                               owned.storage->data.data() + r * row_bytes + k0 / 2);
    }
  }
  return owned;
}

OwnedQuantizedMatrix quantize_nvfp4(const float* values, int64_t rows, int64_t cols) {
  check_quantizer_input(values, rows, cols, "quantize nvfp4");
  float amax = 0.0f;
  for (int64_t i = 0; i < rows * cols; ++i) amax = std::max(amax, std::fabs(values[i]));
  return quantize_nvfp4_with_global(values, rows, cols, nvfp4_global_scale_for_amax(amax));
}

void dequantize_nvfp4_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
  constexpr std::string_view what = "dequantize nvfp4";
  w.check_layout(what);
  check(w.format == WeightFormat::NVFP4, what, ": matrix is ", to_string(w.format));
  w.check_row_range(row_begin, row_end, out, what);
  const size_t row_bytes = w.data_row_bytes();
  const int64_t blocks_per_row = w.scales_per_row();
  const float global = w.global_scale;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* packed = w.data + r * row_bytes;
    const uint8_t* scales = w.scales + r * blocks_per_row;
    const auto block_factor = [scales, global](int64_t b) { return nvfp4_block_factor(scales[b], global); };
    decode_e2m1_row<kNvfp4BlockSize>(packed, w.cols, block_factor, out + (r - row_begin) * w.cols);
  }
}

Mxfp4ToNvfp4Result mxfp4_to_nvfp4(const QuantizedMatrix& mx) {
  constexpr std::string_view what = "mxfp4 -> nvfp4";
  mx.check_layout(what);
  check(mx.format == WeightFormat::MXFP4, what, ": matrix is ", to_string(mx.format));
  const int64_t rows = mx.rows, cols = mx.cols;
  const size_t row_bytes = mx.data_row_bytes();
  const int64_t mx_blocks_per_row = mx.scales_per_row();
  const int64_t nv_blocks_per_row = (cols + kNvfp4BlockSize - 1) / kNvfp4BlockSize;
  constexpr int64_t kNvBlocksPerMxBlock = kMxfp4BlockSize / kNvfp4BlockSize;

  std::array<int64_t, 256> histogram{};
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* packed = mx.data + r * row_bytes;
    for (int64_t b = 0; b < nv_blocks_per_row; ++b) {
      const uint8_t code = mx.scales[r * mx_blocks_per_row + b / kNvBlocksPerMxBlock];
      check(code != kE8m0Nan, what, ": NaN e8m0 scale at row ", r, ", mxfp4 block ", b / kNvBlocksPerMxBlock);
      const int64_t k0 = b * kNvfp4BlockSize;
      if (!block_payload_is_zero(packed, k0, std::min(kNvfp4BlockSize, cols - k0))) ++histogram[code];
    }
  }
  const int global_exponent = choose_global_exponent(histogram);
  const float global = std::ldexp(1.0f, global_exponent);

  Mxfp4ToNvfp4Result result;
  result.nvfp4 = allocate_quantized_matrix(WeightFormat::NVFP4, rows, cols, ScaleType::E4M3, global);
  std::vector<uint8_t>& data = result.nvfp4.storage->data;
  std::vector<uint8_t>& scales = result.nvfp4.storage->scales;
  if (!data.empty()) std::memcpy(data.data(), mx.data, data.size());
  float block_values[kNvfp4BlockSize];
  float requantized[kNvfp4BlockSize];
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* packed = data.data() + r * row_bytes;
    for (int64_t b = 0; b < nv_blocks_per_row; ++b) {
      const uint8_t mx_code = mx.scales[r * mx_blocks_per_row + b / kNvBlocksPerMxBlock];
      const int exponent = int(mx_code) - 127 - global_exponent;
      const int64_t k0 = b * kNvfp4BlockSize;
      const int64_t count = std::min(kNvfp4BlockSize, cols - k0);
      uint8_t& scale = scales[r * nv_blocks_per_row + b];
      const int clamped = std::clamp(exponent, kE4m3MinPowerOfTwo, kE4m3MaxPowerOfTwo);
      if (clamped == exponent || block_payload_is_zero(packed, k0, count)) {
        scale = e4m3_power_of_two(clamped);
        continue;
      }
      const float mx_scale = e8m0_to_float(mx_code);
      for (int64_t i = 0; i < count; ++i) block_values[i] = e2m1_to_float(e2m1_nibble(packed, k0 + i)) * mx_scale;
      scale = quantize_nvfp4_block(block_values, count, global, packed + k0 / 2);
      decode_e2m1_scaled(packed + k0 / 2, count, nvfp4_block_factor(scale, global), requantized);
      float max_abs_error = 0.0f;
      for (int64_t i = 0; i < count; ++i)
        max_abs_error = std::max(max_abs_error, std::fabs(requantized[i] - block_values[i]));
      result.inexact_blocks.push_back({r, b, max_abs_error});
    }
  }
  return result;
}

}  // namespace dsv4
