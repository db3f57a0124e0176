// All tensors of a checkpoint: one or many safetensors shards, found by name across them.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.hpp"

namespace dsv4 {

class TensorStore {
 public:
  // `path` is a checkpoint directory or a single .safetensors file. A directory with model.safetensors.index.json
  // opens exactly the shards its weight_map names and checks each listed tensor is in its shard (and that no shard
  // holds a tensor the index does not list); without an index it opens every *.safetensors in the directory.
  // A tensor name found in two shards is an error. Throws dsv4::Error naming the file and tensor at fault.
  static TensorStore open(const std::string& path);

  const TensorView* find(std::string_view name) const;
  // Every tensor, sorted by name.
  std::vector<const TensorView*> all() const;
  // The owner of the tensor's bytes (its shard's mapping); the view stays valid while this is held.
  std::shared_ptr<const void> keepalive(const TensorView& view) const;
  size_t total_bytes() const;
  size_t size() const { return entries_.size(); }
  const std::vector<std::shared_ptr<SafetensorsFile>>& shards() const { return shards_; }

 private:
  struct Entry {
    const TensorView* view;
    size_t shard_index;
  };
  void add_shard(std::shared_ptr<SafetensorsFile> shard);
  void sort_and_check_unique();
  const Entry* find_entry(std::string_view name) const;

  std::vector<std::shared_ptr<SafetensorsFile>> shards_;
  std::vector<Entry> entries_;  // sorted by name
};

}  // namespace dsv4
