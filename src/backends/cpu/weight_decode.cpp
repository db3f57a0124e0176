#include "backends/cpu/weight_decode.hpp"

#include <cstring>

#include "core/dequantize.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#define DSV4_X86_64 1
#endif

namespace dsv4::cpu {

namespace {

#if DSV4_X86_64

// 8 e4m3 codes → 8 floats · scale, as e4m3_to_float: the 7 magnitude bits at the top of a float's exponent and
// mantissa, times 2^120, with the sign OR-ed in and S.1111.111 made NaN.
__attribute__((target("avx2,fma"))) inline __m256 decode_e4m3x8(const uint8_t* codes, __m256 scale) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i magnitude = _mm256_and_si256(bytes, _mm256_set1_epi32(0x7F));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0x80)), 24);
  __m256 value = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(magnitude, 20)), _mm256_set1_ps(0x1p120f));
  const __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7F)));
  value = _mm256_blendv_ps(value, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), is_nan);
  value = _mm256_or_ps(value, _mm256_castsi256_ps(sign));
  return _mm256_mul_ps(value, scale);
}

__attribute__((target("avx2,fma"))) void decode_fp8_rows(const QuantizedMatrix& w, int64_t row_begin,
                                                         int64_t row_end, float* out) {
  const int64_t cols = w.cols;
  const int64_t blocks = cols / kFp8BlockSize;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* codes = w.data + r * cols;
    float* row_out = out + (r - row_begin) * cols;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t index = (r / kFp8BlockSize) * w.scales_per_row() + b;
      float scale;
      if (w.scale_type == ScaleType::F32) {
        std::memcpy(&scale, w.scales + index * 4, 4);
      } else {
        scale = e8m0_to_float(w.scales[index]);
      }
      const __m256 scale_v = _mm256_set1_ps(scale);
      for (int64_t k = b * kFp8BlockSize; k < (b + 1) * kFp8BlockSize; k += 8)
        _mm256_storeu_ps(row_out + k, decode_e4m3x8(codes + k, scale_v));
    }
  }
}

// e2m1 magnitudes doubled, signed by bit 3: small integers, so one byte shuffle decodes 16 nibbles at a time.
__attribute__((target("avx2,fma"))) inline __m128i e2m1_doubled_table() {
  return _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
}

// The low 8 signed bytes of `doubled` (2·e2m1 values) → 8 floats · half_factor.
__attribute__((target("avx2,fma"))) inline void store_doubled_x8(__m128i doubled, __m256 half_factor, float* out) {
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(doubled)), half_factor));
}

// 16 packed bytes (32 values, low nibble first) → 32 floats · half_factor (the block factor / 2).
__attribute__((target("avx2,fma"))) inline void decode_e2m1x32(const uint8_t* packed, __m256 half_factor,
                                                               float* out) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, low_mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  const __m128i table = e2m1_doubled_table();
  // Interleave so element 2i is byte i's low nibble and 2i+1 its high nibble.
  const __m128i first = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(low, high));
  const __m128i second = _mm_shuffle_epi8(table, _mm_unpackhi_epi8(low, high));
  store_doubled_x8(first, half_factor, out);
  store_doubled_x8(_mm_srli_si128(first, 8), half_factor, out + 8);
  store_doubled_x8(second, half_factor, out + 16);
  store_doubled_x8(_mm_srli_si128(second, 8), half_factor, out + 24);
}

// 8 packed bytes (16 values) → 16 floats · half_factor.
__attribute__((target("avx2,fma"))) inline void decode_e2m1x16(const uint8_t* packed, __m256 half_factor,
                                                               float* out) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, low_mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  const __m128i doubled = _mm_shuffle_epi8(e2m1_doubled_table(), _mm_unpacklo_epi8(low, high));
  store_doubled_x8(doubled, half_factor, out);
  store_doubled_x8(_mm_srli_si128(doubled, 8), half_factor, out + 8);
}

__attribute__((target("avx2,fma"))) void decode_mxfp4_rows(const QuantizedMatrix& w, int64_t row_begin,
                                                           int64_t row_end, float* out) {
  const int64_t blocks = w.cols / kMxfp4BlockSize;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* packed = w.data + r * w.data_row_bytes();
    const uint8_t* scales = w.scales + r * w.scales_per_row();
    float* row_out = out + (r - row_begin) * w.cols;
    for (int64_t b = 0; b < blocks; ++b) {
      // Halving a power of two is exact, so (2v)·(s/2) = v·s bit for bit.
      const __m256 half_factor = _mm256_set1_ps(e8m0_to_float(scales[b]) * 0.5f);
      decode_e2m1x32(packed + b * kMxfp4BlockSize / 2, half_factor, row_out + b * kMxfp4BlockSize);
    }
  }
}

__attribute__((target("avx2,fma"))) void decode_nvfp4_rows(const QuantizedMatrix& w, int64_t row_begin,
                                                           int64_t row_end, float* out) {
  const int64_t blocks = w.cols / kNvfp4BlockSize;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* packed = w.data + r * w.data_row_bytes();
    const uint8_t* scales = w.scales + r * w.scales_per_row();
    float* row_out = out + (r - row_begin) * w.cols;
    for (int64_t b = 0; b < blocks; ++b) {
      // The block factor e4m3 · global is formed once in float, as dequantize does; halving it is exact.
      const float factor = e4m3_to_float(scales[b]) * w.global_scale;
      decode_e2m1x16(packed + b * kNvfp4BlockSize / 2, _mm256_set1_ps(factor * 0.5f), row_out + b * kNvfp4BlockSize);
    }
  }
}

__attribute__((target("avx2,fma"))) void decode_bf16_rows(const QuantizedMatrix& w, int64_t row_begin,
                                                          int64_t row_end, float* out) {
  const uint8_t* bytes = w.data + row_begin * w.cols * 2;
  const int64_t count = (row_end - row_begin) * w.cols;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 2 * i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16)));
  }
  for (; i < count; ++i) {
    uint16_t bits;
    std::memcpy(&bits, bytes + 2 * i, 2);
    uint32_t wide = uint32_t(bits) << 16;
    std::memcpy(out + i, &wide, 4);
  }
}

bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

#endif

}  // namespace

void decode_weight_rows(const QuantizedMatrix& w, int64_t row_begin, int64_t row_end, float* out) {
#if DSV4_X86_64
  if (has_avx2()) {
    switch (w.format) {
      case WeightFormat::FP8_BLOCK128:
        if (w.cols % kFp8BlockSize == 0) return decode_fp8_rows(w, row_begin, row_end, out);
        break;
      case WeightFormat::MXFP4:
        if (w.cols % kMxfp4BlockSize == 0) return decode_mxfp4_rows(w, row_begin, row_end, out);
        break;
      case WeightFormat::NVFP4:
        if (w.cols % kNvfp4BlockSize == 0) return decode_nvfp4_rows(w, row_begin, row_end, out);
        break;
      case WeightFormat::BF16: return decode_bf16_rows(w, row_begin, row_end, out);
      case WeightFormat::F32: break;
    }
  }
#endif
  dequantize_rows(w, row_begin, row_end, out);
}

}  // namespace dsv4::cpu
