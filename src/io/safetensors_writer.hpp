// Writes safetensors files (one file, or shards plus model.safetensors.index.json) that SafetensorsFile accepts.
// Files are written atomically: to a temporary file beside the target, flushed, then renamed over it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "io/safetensors.hpp"

namespace dsv4 {

class SafetensorsWriter {
 public:
  // Copies the bytes. Throws when the name is empty, reserved or already added, or when nbytes differs from what
  // shape x dtype needs.
  void add(std::string name, DType dtype, std::vector<int64_t> shape, const void* bytes, size_t nbytes);
  // Borrows the bytes instead of copying them; `owner` keeps them alive until the writer is destroyed (pass
  // TensorStore::keepalive(view) to re-emit a mapped checkpoint tensor without reading it into memory).
  void add(std::string name, DType dtype, std::vector<int64_t> shape, const void* bytes, size_t nbytes,
           std::shared_ptr<const void> owner);
  void set_metadata(std::string key, std::string value);

  // One file holding every tensor added.
  void write(const std::string& path) const;
  // Shards named model-0000i-of-0000n.safetensors in `dir` (created if missing), filled in the order tensors were
  // added and cut before a tensor would push a shard's data past max_shard_bytes (a larger tensor gets a shard of its
  // own), then model.safetensors.index.json mapping every tensor to its shard. Returns the shard file names.
  std::vector<std::string> write_sharded(const std::string& dir, size_t max_shard_bytes) const;

  size_t size() const { return tensors_.size(); }
  size_t total_bytes() const;

 private:
  struct PendingTensor {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t* data;
    size_t bytes;
  };
  void write_file(const std::string& path, const std::vector<const PendingTensor*>& tensors) const;

  std::vector<PendingTensor> tensors_;               // in the order added
  std::set<std::string> names_;                      // to refuse a second tensor of the same name
  std::vector<std::shared_ptr<const void>> owners_;  // keep borrowed and copied bytes alive
  std::map<std::string, std::string> metadata_;
};

// The name a sharded checkpoint uses for its index file.
inline constexpr const char* kSafetensorsIndexName = "model.safetensors.index.json";

}  // namespace dsv4
