#include "backends/cpu/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/vector_math.hpp"
#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

// The KV rows one query attends to, validated against the buffers they index.
std::vector<const float*> gather_entries(const SparseAttentionInputs& in, const SparseAttentionParams& p, int64_t t) {
  std::vector<const float*> rows;
  rows.reserve(p.window_slots + p.compressed_slots);
  for (int64_t s = 0; s < p.window_slots; ++s) {
    const int32_t row = in.window_index[t * p.window_slots + s];
    if (row < 0) continue;
    check(row < in.window_rows, "sparse_attention: query ", t, " window index ", row, " is outside the ",
          in.window_rows, " window rows");
    rows.push_back(in.window_kv + row * p.head_dim);
  }
  for (int64_t s = 0; s < p.compressed_slots; ++s) {
    const int32_t row = in.compressed_index[t * p.compressed_slots + s];
    if (row < 0) continue;
    check(row < in.compressed_rows, "sparse_attention: query ", t, " compressed index ", row, " is outside the ",
          in.compressed_rows, " compressed rows");
    rows.push_back(in.compressed_kv + row * p.head_dim);
  }
  return rows;
}

}  // namespace

void sparse_attention(const SparseAttentionInputs& in, const SparseAttentionParams& p, float* out) {
  check(p.tokens >= 0 && p.heads > 0 && p.head_dim > 0, "sparse_attention: bad shape tokens=", p.tokens,
        " heads=", p.heads, " head_dim=", p.head_dim);
  check(p.window_slots >= 0 && p.compressed_slots >= 0, "sparse_attention: negative slot count");
  check(p.window_slots == 0 || (in.window_kv != nullptr && in.window_index != nullptr),
        "sparse_attention: window_slots > 0 needs window_kv and window_index");
  check(p.compressed_slots == 0 || (in.compressed_kv != nullptr && in.compressed_index != nullptr),
        "sparse_attention: compressed_slots > 0 needs compressed_kv and compressed_index");
  check(in.rope == nullptr || (in.positions != nullptr && in.rope->rope_dim() <= p.head_dim),
        "sparse_attention: the inverse RoPE needs positions and a rope_dim <= head_dim");
  const int64_t D = p.head_dim;
  // Validate every query's indices before any work, so a bad index fails the same way on any thread count.
  std::vector<std::vector<const float*>> entries(p.tokens);
  ThreadPool::global().parallel_for(0, p.tokens, [&](int64_t t) { entries[t] = gather_entries(in, p, t); });

  ThreadPool::global().parallel_for(0, p.tokens * p.heads, [&](int64_t item) {
    const int64_t t = item / p.heads;
    const int64_t h = item % p.heads;
    const float* q = in.q + item * D;
    float* o = out + item * D;
    std::fill(o, o + D, 0.0f);
    const std::vector<const float*>& kv = entries[t];
    if (!kv.empty()) {
      std::vector<float> score(kv.size());
      float max_score = -std::numeric_limits<float>::infinity();
      for (size_t j = 0; j < kv.size(); ++j) {
        score[j] = p.softmax_scale * dot(q, kv[j], D);
        max_score = std::max(max_score, score[j]);
      }
      float denominator = 0.0f;
      for (size_t j = 0; j < kv.size(); ++j) {
        score[j] = std::exp(score[j] - max_score);
        denominator += score[j];
      }
      // The sink only enlarges the denominator; exp(−inf) = 0 makes it plain softmax.
      if (in.attn_sink != nullptr) denominator += std::exp(in.attn_sink[h] - max_score);
      for (size_t j = 0; j < kv.size(); ++j) axpy(score[j] / denominator, kv[j], o, D);
    }
    if (in.rope != nullptr) in.rope->rotate_inverse(o + (D - in.rope->rope_dim()), in.positions[t]);
  });
}

}  // namespace dsv4::cpu
