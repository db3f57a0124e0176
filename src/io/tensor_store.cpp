#include "io/tensor_store.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.hpp"
#include "io/safetensors_writer.hpp"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

// weight_map of model.safetensors.index.json: tensor name -> shard file name.
std::map<std::string, std::string> read_weight_map(const fs::path& index_path) {
  const std::string index = index_path.string();
  std::ifstream in(index_path, std::ios::binary);
  check(in.good(), index, ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  const std::string content = text.str();
  // nlohmann's parser takes a NUL for the end of input; refuse it rather than ignore what follows.
  const size_t nul = content.find('\0');
  if (nul != std::string::npos) fail(index, ": holds a NUL byte at offset ", nul);
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(content);
  } catch (const nlohmann::json::exception& e) {
    fail(index, ": not valid JSON: ", e.what());
  }
  check(root.is_object(), index, ": expected a JSON object");
  const auto weight_map = root.find("weight_map");
  check(weight_map != root.end(), index, ": missing 'weight_map'");
  check(weight_map->is_object(), index, ": 'weight_map' is ", weight_map->type_name(), ", expected an object");

  std::map<std::string, std::string> result;
  for (const auto& [tensor, shard] : weight_map->items()) {
    if (!shard.is_string()) fail(index, ": tensor '", tensor, "' maps to ", shard.dump(), ", expected a file name");
    const auto& shard_name = shard.get_ref<const std::string&>();
    // Shards live beside the index; refusing paths keeps a hostile index from opening files elsewhere.
    check(!shard_name.empty() && shard_name.find('/') == std::string::npos && shard_name != "." && shard_name != "..",
          index, ": tensor '", tensor, "' maps to '", shard_name, "', expected a file name in the same directory");
    result.emplace(tensor, shard_name);
  }
  return result;
}

}  // namespace

TensorStore TensorStore::open(const std::string& path) {
  TensorStore store;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  check(fs::exists(status), path, ": no such file or directory");

  if (!fs::is_directory(status)) {
    store.add_shard(SafetensorsFile::open(path));
    store.sort_and_check_unique();
    return store;
  }

  const fs::path dir(path);
  const fs::path index_path = dir / kSafetensorsIndexName;
  if (fs::exists(index_path, error)) {
    const std::string index = index_path.string();
    const std::map<std::string, std::string> weight_map = read_weight_map(index_path);
    check(!weight_map.empty(), index, ": 'weight_map' lists no tensors");

    // One representative tensor per shard, so a missing shard's error names a tensor that needed it.
    std::map<std::string, std::string> first_tensor_of_shard;
    for (const auto& [tensor, shard] : weight_map) first_tensor_of_shard.emplace(shard, tensor);
    std::map<std::string, size_t> shard_index;
    for (const auto& [shard, tensor] : first_tensor_of_shard) {
      const fs::path shard_path = dir / shard;
      if (!fs::is_regular_file(shard_path, error)) {
        fail(index, ": shard '", shard, "' (holding tensor '", tensor, "') is missing: ", shard_path.string());
      }
      shard_index.emplace(shard, store.shards_.size());
      store.add_shard(SafetensorsFile::open(shard_path.string()));
    }
    for (const auto& [tensor, shard] : weight_map) {
      if (store.shards_[shard_index.at(shard)]->find(tensor) == nullptr) {
        fail(index, ": tensor '", tensor, "' is listed in shard '", shard, "' but ", (dir / shard).string(),
             " does not hold it");
      }
    }
    for (const auto& [shard, position] : shard_index) {
      for (const TensorView& view : store.shards_[position]->tensors()) {
        const auto listed = weight_map.find(view.name);
        if (listed == weight_map.end()) fail(view.file, ": holds tensor '", view.name, "' which ", index, " does not list");
        if (listed->second != shard) {
          fail(view.file, ": holds tensor '", view.name, "' which ", index, " lists in shard '", listed->second, "'");
        }
      }
    }
  } else {
    std::vector<fs::path> files;
    for (const fs::directory_entry& entry : fs::directory_iterator(dir, error)) {
      if (entry.path().extension() == ".safetensors" && entry.is_regular_file()) files.push_back(entry.path());
    }
    check(!error, path, ": cannot list directory: ", error.message());
    check(!files.empty(), path, ": no ", kSafetensorsIndexName, " and no *.safetensors files");
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) store.add_shard(SafetensorsFile::open(file.string()));
  }
  store.sort_and_check_unique();
  return store;
}

void TensorStore::add_shard(std::shared_ptr<SafetensorsFile> shard) {
  for (const TensorView& view : shard->tensors()) entries_.push_back(Entry{.view = &view, .shard_index = shards_.size()});
  shards_.push_back(std::move(shard));
}

void TensorStore::sort_and_check_unique() {
  std::stable_sort(entries_.begin(), entries_.end(),
                   [](const Entry& a, const Entry& b) { return a.view->name < b.view->name; });
  const auto duplicate = std::adjacent_find(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) {
    return a.view->name == b.view->name;
  });
  if (duplicate != entries_.end()) {
    fail("tensor '", duplicate->view->name, "' appears in both ", duplicate->view->file, " and ",
         (duplicate + 1)->view->file);
  }
}

const TensorStore::Entry* TensorStore::find_entry(std::string_view name) const {
  const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                   [](const Entry& entry, std::string_view key) { return entry.view->name < key; });
  return it != entries_.end() && it->view->name == name ? &*it : nullptr;
}

const TensorView* TensorStore::find(std::string_view name) const {
  const Entry* entry = find_entry(name);
  return entry ? entry->view : nullptr;
}

std::vector<const TensorView*> TensorStore::all() const {
  std::vector<const TensorView*> views;
  views.reserve(entries_.size());
  for (const Entry& entry : entries_) views.push_back(entry.view);
  return views;
}

std::shared_ptr<const void> TensorStore::keepalive(const TensorView& view) const {
  const Entry* entry = find_entry(view.name);
  check(entry != nullptr && entry->view == &view, "tensor '", view.name, "' (", view.file,
        ") does not belong to this TensorStore");
  return shards_[entry->shard_index];
}

size_t TensorStore::total_bytes() const {
  size_t total = 0;
  for (const Entry& entry : entries_) total += entry.view->bytes;
  return total;
}

}  // namespace dsv4
