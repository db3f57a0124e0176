#include "backends/cuda/kv_cache.hpp"

#include <algorithm>
#include <bit>
#include <cstring>

#include "backends/cuda/cuda_check.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

const char* to_string(KvEntryFormat format) {
  switch (format) {
    case KvEntryFormat::Bf16: return "bf16";
    case KvEntryFormat::Fp8Reference: return "fp8-reference";
  }
  return "unknown";
}

namespace {

const char* to_string(KvArray array) { return array == KvArray::Window ? "window" : "compressed"; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

KvEntryLayout KvEntryLayout::make(KvEntryFormat format, int head_dim, int rope_dim) {
  check(head_dim > 0 && head_dim % 8 == 0, "KV entry layout: head_dim ", head_dim, " must be a positive multiple of 8");
  check(rope_dim >= 0 && rope_dim % 4 == 0 && rope_dim <= head_dim, "KV entry layout: rope_dim ", rope_dim,
        " must be a multiple of 4 in [0, head_dim = ", head_dim, "]");
  KvEntryLayout layout;
  layout.format = format;
  layout.head_dim = head_dim;
  layout.rope_dim = rope_dim;
  layout.nope_dim = head_dim - rope_dim;
  if (format == KvEntryFormat::Bf16) {
    layout.entry_bytes = head_dim * 2;  // a multiple of 16 since head_dim % 8 == 0
    return layout;
  }
  check(layout.nope_dim % 8 == 0, "KV entry layout: the fp8 part (head_dim − rope_dim = ", layout.nope_dim,
        ") must be a multiple of 8");
  layout.scale_blocks = int(ceil_div(layout.nope_dim, kKvFp8BlockSize));
  layout.rope_offset = layout.nope_dim;
  layout.scale_offset = layout.rope_offset + 2 * rope_dim;
  layout.entry_bytes = int(ceil_div(layout.scale_offset + layout.scale_blocks, 8) * 8);
  return layout;
}

KvCache::KvCache(const KvCacheConfig& config)
    : config_(config), layout_(KvEntryLayout::make(config.format, config.head_dim, config.rope_dim)) {
  check(config.layers > 0 && config.max_sequences > 0, "KvCache: layers (", config.layers, ") and max_sequences (",
        config.max_sequences, ") must be positive");
  check(config.page_rows > 0 && std::has_single_bit(unsigned(config.page_rows)), "KvCache: page_rows ",
        config.page_rows, " must be a power of two");
  check(config.window_capacity > 0 && config.max_compressed_rows >= 0, "KvCache: window_capacity (",
        config.window_capacity, ") must be positive and max_compressed_rows (", config.max_compressed_rows,
        ") non-negative");
  check(config.pages > 0 && config.pages * config.page_rows < (int64_t(1) << 31), "KvCache: pages ", config.pages,
        " × page_rows ", config.page_rows, " must be positive and below 2^31 entries");
  max_pages_per_array_ = int(std::max(ceil_div(config.window_capacity, config.page_rows),
                                      ceil_div(config.max_compressed_rows, config.page_rows)));
  pool_ = DeviceBuffer(size_t(config.pages) * config.page_rows * layout_.entry_bytes, "KV cache pool");
  const size_t table_elements = size_t(config.max_sequences) * config.layers * 2 * max_pages_per_array_;
  device_table_ = DeviceBuffer(table_elements * sizeof(int32_t), "KV cache page table");
  table_.assign(table_elements, -1);
  device_table_.fill_bytes(0xFF);  // every entry −1
  // Construction is not on any stream's path: finish the fill before a caller's non-blocking stream can read it.
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  free_pages_.resize(size_t(config.pages));
  // Stack order: page 0 is handed out first.
  for (int64_t p = 0; p < config.pages; ++p) free_pages_[size_t(p)] = int32_t(config.pages - 1 - p);
  slot_in_use_.assign(size_t(config.max_sequences), false);
  DSV4_CUDA_CHECK(cudaMallocHost(&staging_, table_elements * sizeof(int32_t)));
  DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming));
}

KvCache::~KvCache() {
  // Destructors cannot throw; a failure here means the context is broken and later checked calls report it.
  if (staging_free_ != nullptr) {
    cudaEventSynchronize(staging_free_);
    cudaEventDestroy(staging_free_);
  }
  if (staging_ != nullptr) cudaFreeHost(staging_);
}

KvCacheView KvCache::view() const {
  KvCacheView v;
  v.pool = const_cast<uint8_t*>(static_cast<const uint8_t*>(pool_.data()));
  v.page_table = device_table_.as<int32_t>();
  v.layout = layout_;
  v.layers = config_.layers;
  v.page_shift = std::countr_zero(unsigned(config_.page_rows));
  v.max_pages_per_array = max_pages_per_array_;
  v.window_capacity = config_.window_capacity;
  return v;
}

void KvCache::check_slot(int slot, const char* what) const {
  check(slot >= 0 && slot < config_.max_sequences && slot_in_use_[size_t(slot)], "KvCache::", what,
        ": sequence slot ", slot, " is not in use");
}

int64_t KvCache::table_index(int slot, int layer, KvArray array) const {
  return ((int64_t(slot) * config_.layers + layer) * 2 + int(array)) * max_pages_per_array_;
}

int KvCache::add_sequence() {
  const auto it = std::find(slot_in_use_.begin(), slot_in_use_.end(), false);
  check(it != slot_in_use_.end(), "KvCache::add_sequence: all ", config_.max_sequences, " sequence slots are in use");
  *it = true;
  return int(it - slot_in_use_.begin());
}

void KvCache::release_sequence(int slot) {
  check_slot(slot, "release_sequence");
  const int64_t begin = table_index(slot, 0, KvArray::Window);
  const int64_t end = table_index(slot + 1, 0, KvArray::Window);
  for (int64_t i = begin; i < end; ++i) {
    if (table_[size_t(i)] < 0) continue;
    free_pages_.push_back(table_[size_t(i)]);
    table_[size_t(i)] = -1;
  }
  dirty_begin_ = dirty_begin_ == dirty_end_ ? begin : std::min(dirty_begin_, begin);
  dirty_end_ = std::max(dirty_end_, end);
  slot_in_use_[size_t(slot)] = false;
}

int64_t KvCache::backed_rows(int slot, int layer, KvArray array) const {
  check_slot(slot, "backed_rows");
  check(layer >= 0 && layer < config_.layers, "KvCache::backed_rows: layer ", layer, " outside [0, ", config_.layers,
        ")");
  const int32_t* pages = &table_[size_t(table_index(slot, layer, array))];
  int64_t n = 0;
  while (n < max_pages_per_array_ && pages[n] >= 0) ++n;
  const int64_t capacity = array == KvArray::Window ? config_.window_capacity : config_.max_compressed_rows;
  return std::min(n * config_.page_rows, capacity);
}

void KvCache::ensure_rows(int slot, int layer, KvArray array, int64_t rows) {
  check_slot(slot, "ensure_rows");
  check(layer >= 0 && layer < config_.layers, "KvCache::ensure_rows: layer ", layer, " outside [0, ", config_.layers,
        ")");
  const int64_t capacity = array == KvArray::Window ? config_.window_capacity : config_.max_compressed_rows;
  check(rows >= 0 && rows <= capacity, "KvCache::ensure_rows: ", rows, " rows of the ", to_string(array),
        " array of slot ", slot, " layer ", layer, " exceed its capacity of ", capacity);
  const int64_t needed_pages = ceil_div(rows, config_.page_rows);
  const int64_t begin = table_index(slot, layer, array);
  int32_t* pages = &table_[size_t(begin)];
  int64_t missing = 0;
  for (int64_t p = 0; p < needed_pages; ++p) missing += pages[p] < 0 ? 1 : 0;
  if (missing == 0) return;
  check(missing <= free_pages(), "KvCache::ensure_rows: the pool has ", free_pages(), " free pages, ", missing,
        " needed for ", rows, " rows of the ", to_string(array), " array of slot ", slot, " layer ", layer);
  for (int64_t p = 0; p < needed_pages; ++p) {
    if (pages[p] >= 0) continue;
    pages[p] = free_pages_.back();
    free_pages_.pop_back();
  }
  dirty_begin_ = dirty_begin_ == dirty_end_ ? begin : std::min(dirty_begin_, begin);
  dirty_end_ = std::max(dirty_end_, begin + needed_pages);
}

void KvCache::upload_page_table(cudaStream_t stream) {
  if (dirty_begin_ == dirty_end_) return;
  DSV4_CUDA_CHECK(cudaEventSynchronize(staging_free_));
  const size_t count = size_t(dirty_end_ - dirty_begin_);
  std::memcpy(staging_ + dirty_begin_, &table_[size_t(dirty_begin_)], count * sizeof(int32_t));
  DSV4_CUDA_CHECK(cudaMemcpyAsync(device_table_.as<int32_t>() + dirty_begin_, staging_ + dirty_begin_,
                                  count * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  DSV4_CUDA_CHECK(cudaEventRecord(staging_free_, stream));
  dirty_begin_ = dirty_end_ = 0;
}

}  // namespace dsv4::cuda
