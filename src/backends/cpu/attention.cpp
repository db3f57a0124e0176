#include "backends/cpu/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/vector_math.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cpu {

namespace {

// The KV rows one query attends to, validated against the buffers they index, with their slot numbers in the
// query's window ∪ compressed list (the tiled weights group entries by slot).
struct QueryEntries {
  std::vector<const float*> rows;
  std::vector<int64_t> slots;
};

QueryEntries gather_entries(const SparseAttentionInputs& in, const SparseAttentionParams& p, int64_t t) {
  QueryEntries entries;
  entries.rows.reserve(p.window_slots + p.compressed_slots);
  entries.slots.reserve(p.window_slots + p.compressed_slots);
  for (int64_t s = 0; s < p.window_slots; ++s) {
    const int32_t row = in.window_index[t * p.window_slots + s];
    if (row < 0) continue;
    check(row < in.window_rows, "sparse_attention: query ", t, " window index ", row, " is outside the ",
          in.window_rows, " window rows");
    entries.rows.push_back(in.window_kv + row * p.head_dim);
    entries.slots.push_back(s);
  }
  for (int64_t s = 0; s < p.compressed_slots; ++s) {
    const int32_t row = in.compressed_index[t * p.compressed_slots + s];
    if (row < 0) continue;
    check(row < in.compressed_rows, "sparse_attention: query ", t, " compressed index ", row, " is outside the ",
          in.compressed_rows, " compressed rows");
    entries.rows.push_back(in.compressed_kv + row * p.head_dim);
    entries.slots.push_back(p.window_slots + s);
  }
  return entries;
}

// One head of one query with the CUDA kernel's weights (SparseAttentionParams::bf16_weight_tile): o = Σ w_j kv_j /
// (Σ w_j + sink), in the log2 domain like the kernel, so that every exp(s − m) is rounded from the same argument.
void attend_with_bf16_weights(const float* q, const QueryEntries& kv, const SparseAttentionParams& p,
                              const float* sink, float* o) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t D = p.head_dim, tile = p.bf16_weight_tile;
  const float scale_log2 = p.softmax_scale * kLog2e;
  float row_max = -std::numeric_limits<float>::infinity(), row_sum = 0.0f;
  std::vector<float> score;
  for (size_t begin = 0; begin < kv.rows.size();) {
    const int64_t tile_end = (kv.slots[begin] / tile + 1) * tile;
    size_t end = begin;
    score.clear();
    float tile_max = -std::numeric_limits<float>::infinity();
    for (; end < kv.rows.size() && kv.slots[end] < tile_end; ++end) {
      score.push_back(dot(q, kv.rows[end], D) * scale_log2);
      tile_max = std::max(tile_max, score.back());
    }
    // A larger max rescales what the earlier tiles accumulated, as the kernel's online softmax does.
    const float new_max = std::max(row_max, tile_max);
    const float alpha = std::exp2(row_max - new_max);
    row_sum *= alpha;
    for (int64_t i = 0; i < D; ++i) o[i] *= alpha;
    row_max = new_max;
    for (size_t j = begin; j < end; ++j) {
      const float w = round_to_bf16(std::exp2(score[j - begin] - row_max));
      row_sum += w;
      axpy(w, kv.rows[j], o, D);
    }
    begin = end;
  }
  if (kv.rows.empty()) return;
  const float denominator = row_sum + (sink != nullptr ? std::exp2(*sink * kLog2e - row_max) : 0.0f);
  const float inverse = 1.0f / denominator;
  for (int64_t i = 0; i < D; ++i) o[i] *= inverse;
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
  check(p.bf16_weight_tile >= 0, "sparse_attention: negative bf16_weight_tile ", p.bf16_weight_tile);
  const int64_t D = p.head_dim;
  // Validate every query's indices before any work, so a bad index fails the same way on any thread count.
  std::vector<QueryEntries> entries(p.tokens);
  ThreadPool::global().parallel_for(0, p.tokens, [&](int64_t t) { entries[t] = gather_entries(in, p, t); });

  ThreadPool::global().parallel_for(0, p.tokens * p.heads, [&](int64_t item) {
    const int64_t t = item / p.heads;
    const int64_t h = item % p.heads;
    const float* q = in.q + item * D;
    float* o = out + item * D;
    std::fill(o, o + D, 0.0f);
    if (p.bf16_weight_tile > 0) {
      attend_with_bf16_weights(q, entries[t], p, in.attn_sink != nullptr ? &in.attn_sink[h] : nullptr, o);
    } else if (const std::vector<const float*>& kv = entries[t].rows; !kv.empty()) {
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
