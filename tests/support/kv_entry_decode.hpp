// Host decode of one stored KV-cache entry, for the GPU tests that read entries back from a device pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backends/cuda/kv_cache.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda {

// The head_dim fp32 values of one entry (bf16, or the fp8 layout: e4m3 nope values times their block's e8m0 scale,
// then the bf16 rope values): what a kernel reading the entry sees.
inline std::vector<float> decode_kv_entry(const KvEntryLayout& layout, const uint8_t* entry) {
  std::vector<float> v(size_t(layout.head_dim));
  if (layout.format == KvEntryFormat::Bf16) {
    for (int d = 0; d < layout.head_dim; ++d) {
      uint16_t bits;
      std::memcpy(&bits, entry + 2 * d, 2);
      v[size_t(d)] = bf16_to_float(bits);
    }
    return v;
  }
  for (int d = 0; d < layout.nope_dim; ++d)
    v[size_t(d)] = e4m3_to_float(entry[d]) * e8m0_to_float(entry[layout.scale_offset + d / kKvFp8BlockSize]);
  for (int d = 0; d < layout.rope_dim; ++d) {
    uint16_t bits;
    std::memcpy(&bits, entry + layout.rope_offset + 2 * d, 2);
    v[size_t(layout.nope_dim + d)] = bf16_to_float(bits);
  }
  return v;
}

}  // namespace dsv4::cuda
