#include "backends/cpu/mhc.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "backends/cpu/vector_math.hpp"
#include "core/error.hpp"
#include "core/rms_norm_math.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

void check_params(const MhcParams& p, const char* op) {
  check(p.tokens >= 0 && p.hidden > 0 && p.streams > 0, op, ": bad shape tokens=", p.tokens, " hidden=", p.hidden,
        " streams=", p.streams);
}

// mixes[t, r] = (fn[r] · xf_t) · rsqrt(mean(xf_t²) + eps) with xf_t the token's n·d values.
std::vector<float> stream_mixes(const float* fn, int64_t fn_rows, const float* X, const MhcParams& p) {
  const int64_t flat = p.streams * p.hidden;
  std::vector<float> inv_rms(p.tokens);
  std::vector<float> mixes(p.tokens * fn_rows);
  auto& pool = ThreadPool::global();
  pool.parallel_for(0, p.tokens, [&](int64_t t) {
    const float* xf = X + t * flat;
    inv_rms[t] = inverse_rms(dot(xf, xf, flat), static_cast<float>(flat), p.norm_eps);
  });
  // One item per (token, row) so a single decode token still spreads over the threads.
  pool.parallel_for(0, p.tokens * fn_rows, [&](int64_t item) {
    const int64_t t = item / fn_rows;
    const int64_t r = item % fn_rows;
    mixes[item] = dot(fn + r * flat, X + t * flat, flat) * inv_rms[t];
  });
  return mixes;
}

// y[i] = Σ_k weight[k]·X[k][i].
void weighted_stream_sum(const float* X, const float* weight, int64_t n, int64_t d, float* y) {
  std::fill(y, y + d, 0.0f);
  for (int64_t k = 0; k < n; ++k) axpy(weight[k], X + k * d, y, d);
}

}  // namespace

void sinkhorn(float* comb, int64_t n, int64_t iters, float eps) {
  check(n > 0 && iters >= 1, "sinkhorn: need n > 0 and at least one iteration, got n=", n, " iters=", iters);
  const auto normalise_rows = [&] {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += comb[j * n + k];
      for (int64_t k = 0; k < n; ++k) comb[j * n + k] /= sum + eps;
    }
  };
  const auto normalise_columns = [&] {
    for (int64_t k = 0; k < n; ++k) {
      float sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += comb[j * n + k];
      for (int64_t j = 0; j < n; ++j) comb[j * n + k] /= sum + eps;
    }
  };
  for (int64_t j = 0; j < n; ++j) {
    float* row = comb + j * n;
    const float max = *std::max_element(row, row + n);
    float sum = 0;
    for (int64_t k = 0; k < n; ++k) {
      row[k] = std::exp(row[k] - max);
      sum += row[k];
    }
    for (int64_t k = 0; k < n; ++k) row[k] = row[k] / sum + eps;
  }
  normalise_columns();
  for (int64_t i = 1; i < iters; ++i) {
    normalise_rows();
    normalise_columns();
  }
}

void hc_pre(const MhcSiteWeights& weights, const float* X, const MhcParams& p, float* y, float* post,
            float* comb) {
  check_params(p, "hc_pre");
  const int64_t n = p.streams;
  const int64_t rows = (2 + n) * n;
  const std::vector<float> mixes = stream_mixes(weights.fn, rows, X, p);
  const float pre_scale = weights.scale[0], post_scale = weights.scale[1], comb_scale = weights.scale[2];
  ThreadPool::global().parallel_for(0, p.tokens, [&](int64_t t) {
    const float* m = mixes.data() + t * rows;
    std::vector<float> pre(n);
    for (int64_t k = 0; k < n; ++k) {
      pre[k] = sigmoid(m[k] * pre_scale + weights.base[k]) + p.hc_eps;
      post[t * n + k] = 2.0f * sigmoid(m[n + k] * post_scale + weights.base[n + k]);
    }
    float* c = comb + t * n * n;
    for (int64_t jk = 0; jk < n * n; ++jk) c[jk] = m[2 * n + jk] * comb_scale + weights.base[2 * n + jk];
    sinkhorn(c, n, p.sinkhorn_iters, p.hc_eps);
    weighted_stream_sum(X + t * n * p.hidden, pre.data(), n, p.hidden, y + t * p.hidden);
  });
}

void hc_post(const float* out, const float* X, const float* post, const float* comb, const MhcParams& p,
             float* X_out) {
  check_params(p, "hc_post");
  const int64_t n = p.streams;
  const int64_t d = p.hidden;
  constexpr int64_t kChunk = 256;  // elements per stream copied aside so X_out may alias X
  const int64_t chunks_per_token = (d + kChunk - 1) / kChunk;
  ThreadPool::global().parallel_for(0, p.tokens * chunks_per_token, [&](int64_t item) {
    const int64_t t = item / chunks_per_token;
    const int64_t begin = (item % chunks_per_token) * kChunk;
    const int64_t len = std::min(kChunk, d - begin);
    const float* c = comb + t * n * n;
    std::vector<float> saved(n * len);
    for (int64_t j = 0; j < n; ++j) std::copy_n(X + (t * n + j) * d + begin, len, saved.data() + j * len);
    for (int64_t k = 0; k < n; ++k) {
      float* dst = X_out + (t * n + k) * d + begin;
      const float post_k = post[t * n + k];
      const float* o = out + t * d + begin;
      for (int64_t i = 0; i < len; ++i) dst[i] = post_k * o[i];
      for (int64_t j = 0; j < n; ++j) axpy(c[j * n + k], saved.data() + j * len, dst, len);
    }
  });
}

void hc_head(const MhcHeadWeights& weights, const float* X, const MhcParams& p, float* h) {
  check_params(p, "hc_head");
  const int64_t n = p.streams;
  const std::vector<float> mixes = stream_mixes(weights.fn, n, X, p);
  ThreadPool::global().parallel_for(0, p.tokens, [&](int64_t t) {
    std::vector<float> pre(n);
    for (int64_t k = 0; k < n; ++k)
      pre[k] = sigmoid(mixes[t * n + k] * weights.scale[0] + weights.base[k]) + p.hc_eps;
    weighted_stream_sum(X + t * n * p.hidden, pre.data(), n, p.hidden, h + t * p.hidden);
  });
}

}  // namespace dsv4::cpu
