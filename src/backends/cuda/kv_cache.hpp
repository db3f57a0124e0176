// The paged KV cache on the device (dsv4-model.md §3.4, §3.5). One cudaMalloc'ed pool of fixed-size pages holds the
// KV entries of every sequence; each (sequence slot, layer) owns two logical arrays of entries:
//  - Window: the ring of the last tokens' KV vectors, row = position mod window_capacity. The capacity may exceed the
//    model's window so that a prefill chunk's queries still find the window entries of the chunk's earliest tokens
//    (a chunk of T tokens needs window_capacity >= window + T - 1);
//  - Compressed: the compressor's entries, row = entry number w (CSA/HCA layers).
// A page table [slots, layers, 2, max_pages_per_array] (int32 page ids, −1 = not allocated) maps logical rows to
// pages. The host-side allocator hands out pages on demand (ensure_rows) and takes back all pages of a finished
// sequence (release_sequence); upload_page_table publishes the host table to the device asynchronously.
//
// Entry formats (one per cache):
//  - Bf16: head_dim bf16 values (exact numerics mode);
//  - Fp8Reference: DeepSeek's stored layout, lossless for the reference rounding (round_kv_reference):
//    [nope e4m3 bytes | rope_dim bf16 | ceil(nope/64) e8m0 scales | pad to 8 B], nope = head_dim − rope_dim.
//    For head_dim 512 / rope 64: 448 + 128 + 7 + 1 = 584 B.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "backends/cuda/device_matrix.hpp"
#include "core/host_device.hpp"

namespace dsv4::cuda {

enum class KvEntryFormat : uint8_t { Bf16, Fp8Reference };

const char* to_string(KvEntryFormat format);

// Values per fp8 scale block of a stored KV vector (dsv4-model.md §3.5).
inline constexpr int kKvFp8BlockSize = 64;

// Byte layout of one stored entry.
struct KvEntryLayout {
  KvEntryFormat format = KvEntryFormat::Bf16;
  int head_dim = 0;      // D
  int rope_dim = 0;      // trailing dims that stay bf16 in the fp8 layout (and carry RoPE)
  int nope_dim = 0;      // D − rope_dim
  int scale_blocks = 0;  // ceil(nope_dim / 64) e8m0 scales (fp8 only)
  int rope_offset = 0;   // byte offset of the bf16 rope values (fp8 only)
  int scale_offset = 0;  // byte offset of the scales (fp8 only)
  int entry_bytes = 0;   // bytes per entry, a multiple of 8 (fp8) or 16 (bf16)

  // Throws unless the shape is supported: head_dim a positive multiple of 8, rope_dim even, a multiple of 4 and at
  // most head_dim, nope_dim a multiple of 8 (whole 8-byte groups of fp8 values).
  static KvEntryLayout make(KvEntryFormat format, int head_dim, int rope_dim);
};

enum class KvArray : int { Window = 0, Compressed = 1 };

struct KvCacheConfig {
  KvEntryFormat format = KvEntryFormat::Bf16;
  int head_dim = 512;
  int rope_dim = 64;
  int layers = 1;
  int max_sequences = 1;              // sequence slots
  int64_t window_capacity = 128;      // rows of each window ring
  int64_t max_compressed_rows = 0;    // rows each compressed array may grow to (0: no compressed entries)
  int page_rows = 64;                 // entries per page, a power of two
  int64_t pages = 0;                  // pages in the pool
};

// What kernels need to address entries; plain data, passed by value.
struct KvCacheView {
  uint8_t* pool = nullptr;
  const int32_t* page_table = nullptr;  // device [max_sequences, layers, 2, max_pages_per_array]
  KvEntryLayout layout;
  int layers = 0;
  int page_shift = 0;                   // log2(page_rows)
  int max_pages_per_array = 0;
  int64_t window_capacity = 0;

  // The page-table row of one logical array.
  DSV4_HD const int32_t* pages_of(int slot, int layer, KvArray array) const {
    return page_table + ((int64_t(slot) * layers + layer) * 2 + int(array)) * max_pages_per_array;
  }
  // The physical entry number of a logical row whose page is allocated.
  DSV4_HD int64_t physical_entry(const int32_t* pages, int64_t row) const {
    return (int64_t(pages[row >> page_shift]) << page_shift) + (row & ((int64_t(1) << page_shift) - 1));
  }
  DSV4_HD uint8_t* entry_address(int64_t physical) const { return pool + physical * layout.entry_bytes; }
};

class KvCache {
 public:
  explicit KvCache(const KvCacheConfig& config);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheConfig& config() const { return config_; }
  const KvEntryLayout& layout() const { return layout_; }
  // The device view; its page table is current after the last upload_page_table.
  KvCacheView view() const;

  // Claims a free sequence slot (no pages yet); throws when every slot is taken.
  int add_sequence();
  // Returns all pages of the slot to the pool and frees the slot.
  void release_sequence(int slot);
  // Backs logical rows [0, rows) of one array with pages, allocating the missing ones. Throws (naming the slot, layer,
  // array and counts) when rows exceed the array's capacity or the pool has too few free pages; then nothing changes.
  void ensure_rows(int slot, int layer, KvArray array, int64_t rows);
  // Rows of the array that are backed by pages.
  int64_t backed_rows(int slot, int layer, KvArray array) const;
  int64_t free_pages() const { return int64_t(free_pages_.size()); }

  // Copies the changed part of the host page table to the device, asynchronously on `stream`, through a pinned
  // staging buffer (the previous upload must have left it: waited for with an event, normally long done).
  void upload_page_table(cudaStream_t stream);

 private:
  int64_t table_index(int slot, int layer, KvArray array) const;
  void check_slot(int slot, const char* what) const;

  KvCacheConfig config_;
  KvEntryLayout layout_;
  int max_pages_per_array_ = 0;
  DeviceBuffer pool_;
  DeviceBuffer device_table_;
  std::vector<int32_t> table_;          // host copy, authoritative
  std::vector<int32_t> free_pages_;     // stack of free page ids
  std::vector<bool> slot_in_use_;
  int64_t dirty_begin_ = 0, dirty_end_ = 0;  // element range of table_ not yet uploaded
  int32_t* staging_ = nullptr;          // pinned, same size as table_
  cudaEvent_t staging_free_ = nullptr;
};

}  // namespace dsv4::cuda
