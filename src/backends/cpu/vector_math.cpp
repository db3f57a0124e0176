#include "backends/cpu/vector_math.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DSV4_X86 1
#endif

namespace dsv4::cpu {

namespace {

float dot_portable(const float* a, const float* b, int64_t n) {
  // Four partial sums shorten the dependency chain, like the vector variant.
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

void axpy_portable(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void matmul_tile_portable(const float* w, int64_t rows, int64_t k_len, const float* x, int64_t x_stride,
                          int64_t tokens, float* y, int64_t y_stride) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) y[t * y_stride + r] = dot_portable(w + r * k_len, x + t * x_stride, k_len);
}

#if DSV4_X86
__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
         acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// 4 weight rows × 2 tokens per pass: each loaded weight vector feeds two FMAs and each x vector four, which keeps
// the loop on the FMA units rather than on loads.
__attribute__((target("avx2,fma"))) void matmul_tile_avx2(const float* w, int64_t rows, int64_t k_len,
                                                          const float* x, int64_t x_stride, int64_t tokens, float* y,
                                                          int64_t y_stride) {
  const int64_t k_vec = k_len & ~int64_t{7};
  int64_t t = 0;
  for (; t + 2 <= tokens; t += 2) {
    const float* x0 = x + t * x_stride;
    const float* x1 = x0 + x_stride;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const float* w0 = w + r * k_len;
      const float* w1 = w0 + k_len;
      const float* w2 = w1 + k_len;
      const float* w3 = w2 + k_len;
      __m256 a00 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(),
             a30 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(),
             a21 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
      for (int64_t k = 0; k < k_vec; k += 8) {
        const __m256 xv0 = _mm256_loadu_ps(x0 + k), xv1 = _mm256_loadu_ps(x1 + k);
        const __m256 wv0 = _mm256_loadu_ps(w0 + k), wv1 = _mm256_loadu_ps(w1 + k);
        const __m256 wv2 = _mm256_loadu_ps(w2 + k), wv3 = _mm256_loadu_ps(w3 + k);
        a00 = _mm256_fmadd_ps(wv0, xv0, a00);
        a10 = _mm256_fmadd_ps(wv1, xv0, a10);
        a20 = _mm256_fmadd_ps(wv2, xv0, a20);
        a30 = _mm256_fmadd_ps(wv3, xv0, a30);
        a01 = _mm256_fmadd_ps(wv0, xv1, a01);
        a11 = _mm256_fmadd_ps(wv1, xv1, a11);
        a21 = _mm256_fmadd_ps(wv2, xv1, a21);
        a31 = _mm256_fmadd_ps(wv3, xv1, a31);
      }
      float s[2][4] = {{horizontal_sum(a00), horizontal_sum(a10), horizontal_sum(a20), horizontal_sum(a30)},
                       {horizontal_sum(a01), horizontal_sum(a11), horizontal_sum(a21), horizontal_sum(a31)}};
      for (int64_t k = k_vec; k < k_len; ++k) {
        for (int j = 0; j < 4; ++j) {
          s[0][j] += w[(r + j) * k_len + k] * x0[k];
          s[1][j] += w[(r + j) * k_len + k] * x1[k];
        }
      }
      for (int j = 0; j < 4; ++j) {
        y[t * y_stride + r + j] = s[0][j];
        y[(t + 1) * y_stride + r + j] = s[1][j];
      }
    }
    for (; r < rows; ++r) {
      y[t * y_stride + r] = dot_avx2(w + r * k_len, x0, k_len);
      y[(t + 1) * y_stride + r] = dot_avx2(w + r * k_len, x1, k_len);
    }
  }
  for (; t < tokens; ++t) {
    const float* x0 = x + t * x_stride;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const float* w0 = w + r * k_len;
      const float* w1 = w0 + k_len;
      const float* w2 = w1 + k_len;
      const float* w3 = w2 + k_len;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
             a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < k_vec; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
      }
      float s[4] = {horizontal_sum(a0), horizontal_sum(a1), horizontal_sum(a2), horizontal_sum(a3)};
      for (int64_t k = k_vec; k < k_len; ++k)
        for (int j = 0; j < 4; ++j) s[j] += w[(r + j) * k_len + k] * x0[k];
      for (int j = 0; j < 4; ++j) y[t * y_stride + r + j] = s[j];
    }
    for (; r < rows; ++r) y[t * y_stride + r] = dot_avx2(w + r * k_len, x0, k_len);
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace

bool vector_math_uses_avx2() { return cpu_has_avx2_fma(); }

float dot(const float* a, const float* b, int64_t n) {
#if DSV4_X86
  if (cpu_has_avx2_fma()) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
#if DSV4_X86
  if (cpu_has_avx2_fma()) return axpy_avx2(alpha, x, y, n);
#endif
  axpy_portable(alpha, x, y, n);
}

void matmul_tile(const float* w, int64_t rows, int64_t k_len, const float* x, int64_t x_stride, int64_t tokens,
                 float* y, int64_t y_stride) {
#if DSV4_X86
  if (cpu_has_avx2_fma()) return matmul_tile_avx2(w, rows, k_len, x, x_stride, tokens, y, y_stride);
#endif
  matmul_tile_portable(w, rows, k_len, x, x_stride, tokens, y, y_stride);
}

}  // namespace dsv4::cpu
