#include "backends/cpu/indexer.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "backends/cpu/vector_math.hpp"
#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

constexpr int64_t kKeysPerItem = 64;  // keys scored per work item: one matmul tile of [64 keys] × [heads]

void check_inputs(const IndexerInputs& in, const IndexerParams& p) {
  check(p.tokens >= 0 && p.heads > 0 && p.head_dim > 0 && p.ratio > 0 && p.top_k >= 0,
        "indexer: bad parameters tokens=", p.tokens, " heads=", p.heads, " head_dim=", p.head_dim,
        " ratio=", p.ratio, " top_k=", p.top_k);
  check(in.key_count >= 0 && (in.key_count == 0 || in.keys != nullptr), "indexer: missing keys");
  check(p.tokens == 0 || (in.q != nullptr && in.head_weights != nullptr && in.positions != nullptr),
        "indexer: q, head_weights and positions are required");
  for (int64_t t = 0; t < p.tokens; ++t)
    check(in.positions[t] >= 0, "indexer: negative position ", in.positions[t], " at token ", t);
}

}  // namespace

int64_t visible_key_count(int64_t position, int64_t ratio, int64_t key_count) {
  return std::min(key_count, (position + 1) / ratio);
}

void indexer_scores(const IndexerInputs& in, const IndexerParams& p, float* scores) {
  check_inputs(in, p);
  const int64_t blocks = (in.key_count + kKeysPerItem - 1) / kKeysPerItem;
  const float weight_scale = 1.0f / std::sqrt(static_cast<float>(p.head_dim)) / std::sqrt(static_cast<float>(p.heads));
  ThreadPool::global().parallel_for(0, p.tokens * blocks, [&](int64_t item) {
    const int64_t t = item / blocks;
    const int64_t key_begin = (item % blocks) * kKeysPerItem;
    const int64_t key_end = std::min(in.key_count, key_begin + kKeysPerItem);
    const int64_t visible = visible_key_count(in.positions[t], p.ratio, in.key_count);
    float* row = scores + t * in.key_count;
    const int64_t scored_end = std::min(key_end, std::max(visible, key_begin));
    std::fill(row + scored_end, row + key_end, -std::numeric_limits<float>::infinity());
    const int64_t n = scored_end - key_begin;
    if (n <= 0) return;
    // dots[h, j] = q_h · K_j for the block's visible keys.
    std::vector<float> dots(p.heads * n);
    matmul_tile(in.keys + key_begin * p.head_dim, n, p.head_dim, in.q + t * p.heads * p.head_dim, p.head_dim,
                p.heads, dots.data(), n);
    const float* w = in.head_weights + t * p.heads;
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t h = 0; h < p.heads; ++h) sum += w[h] * weight_scale * std::max(dots[h * n + j], 0.0f);
      row[key_begin + j] = sum;
    }
  });
}

int64_t select_top_k(const float* scores, int64_t visible, int64_t k, int32_t* selected) {
  check(visible >= 0 && k >= 0, "select_top_k: negative count visible=", visible, " k=", k);
  for (int64_t j = 0; j < visible; ++j) check(!std::isnan(scores[j]), "select_top_k: score ", j, " is NaN");
  const int64_t count = std::min(k, visible);
  std::vector<int32_t> order(visible);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + count, order.end(), [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  std::copy_n(order.begin(), count, selected);
  return count;
}

void indexer_select(const IndexerInputs& in, const IndexerParams& p, int32_t* selected, int32_t* counts) {
  check_inputs(in, p);
  std::vector<float> scores(p.tokens * in.key_count);
  indexer_scores(in, p, scores.data());
  ThreadPool::global().parallel_for(0, p.tokens, [&](int64_t t) {
    const int64_t visible = visible_key_count(in.positions[t], p.ratio, in.key_count);
    int32_t* out = selected + t * p.top_k;
    const int64_t count = select_top_k(scores.data() + t * in.key_count, visible, p.top_k, out);
    std::fill(out + count, out + p.top_k, -1);
    counts[t] = static_cast<int32_t>(count);
  });
}

}  // namespace dsv4::cpu
