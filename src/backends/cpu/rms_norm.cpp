#include "backends/cpu/rms_norm.hpp"

#include <cmath>

#include "backends/cpu/vector_math.hpp"
#include "core/error.hpp"
#include "core/rms_norm_math.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

void rms_norm(const float* x, const float* weight, float* y, const RmsNormParams& params) {
  check(params.rows >= 0 && params.dim > 0, "rms_norm: bad shape rows=", params.rows, " dim=", params.dim);
  const int64_t dim = params.dim;
  ThreadPool::global().parallel_for(0, params.rows, [&](int64_t row) {
    const float* in = x + row * dim;
    float* out = y + row * dim;
    const float inv_rms = inverse_rms(dot(in, in, dim), static_cast<float>(dim), params.eps);
    if (weight != nullptr) {
      for (int64_t i = 0; i < dim; ++i) out[i] = in[i] * inv_rms * weight[i];
    } else {
      for (int64_t i = 0; i < dim; ++i) out[i] = in[i] * inv_rms;
    }
  });
}

}  // namespace dsv4::cpu
