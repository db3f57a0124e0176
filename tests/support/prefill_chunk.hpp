// The prefill chunk the sparse attention benches time: `tokens` queries at the end of a `context`-token sequence
// (sequence slot 0, layer 0) with CSA slots, on a cache whose window ring holds the window plus the chunk.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "backends/cuda/kv_cache.hpp"

namespace dsv4::cuda {

// One sequence on one layer with all `capacity` window rows and context / 4 compressed rows allocated and the page
// table uploaded; the entries are left to the caller.
inline std::unique_ptr<KvCache> prefill_chunk_cache(KvEntryFormat format, int head_dim, int rope_dim, int page_rows,
                                                    int64_t context, int64_t capacity) {
  const int64_t compressed_rows = context / 4;
  auto cache = std::make_unique<KvCache>(
      KvCacheConfig{.format = format, .head_dim = head_dim, .rope_dim = rope_dim, .layers = 1, .max_sequences = 1,
                    .window_capacity = capacity, .max_compressed_rows = compressed_rows, .page_rows = page_rows,
                    .pages = (compressed_rows + capacity) / page_rows});
  cache->add_sequence();
  cache->ensure_rows(0, 0, KvArray::Window, capacity);
  cache->ensure_rows(0, 0, KvArray::Compressed, compressed_rows);
  cache->upload_page_table(nullptr);
  return cache;
}

// The chunk's per-query inputs: window slots = the `window` ring rows up to each query (−1 before the sequence
// starts), compressed slots = `top_k` random visible rows (causal: row < (pos + 1) / 4; −1 past the visible count).
struct PrefillChunkSlots {
  std::vector<int32_t> slots, window_index, compressed_index;
  std::vector<int64_t> positions;
  int64_t used_slots = 0;  // slots that name an entry, over all queries (the flop count's)
};

inline PrefillChunkSlots prefill_chunk_slots(int64_t context, int64_t tokens, int window, int top_k, int64_t capacity,
                                             std::mt19937& rng) {
  const int64_t T = tokens;
  PrefillChunkSlots chunk;
  chunk.slots.assign(size_t(T), 0);
  chunk.window_index.resize(size_t(T) * window);
  chunk.compressed_index.resize(size_t(T) * top_k);
  chunk.positions.resize(size_t(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = context - T + t;
    chunk.positions[size_t(t)] = pos;
    for (int w = 0; w < window; ++w) {
      const int64_t p = pos - (window - 1) + w;
      chunk.window_index[size_t(t * window + w)] = p >= 0 ? int32_t(p % capacity) : -1;
      chunk.used_slots += p >= 0;
    }
    const int64_t visible = (pos + 1) / 4;
    for (int s = 0; s < top_k; ++s) {
      const bool used = s < visible;
      chunk.compressed_index[size_t(t * top_k + s)] = used ? int32_t(rng() % uint64_t(visible)) : -1;
      chunk.used_slots += used;
    }
  }
  return chunk;
}

}  // namespace dsv4::cuda
