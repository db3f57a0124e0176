#include "io/safetensors_writer.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace dsv4 {
namespace {

// A file written under a temporary name beside its target and renamed over it on commit(), so readers never see a
// half-written file; dropped without commit(), the temporary file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path) : path_(std::move(path)), temp_path_(path_ + ".tmp-XXXXXX") {
    fd_ = ::mkstemp(temp_path_.data());
    check(fd_ >= 0, path_, ": cannot create a temporary file beside it: ", std::strerror(errno));
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(temp_path_.c_str());
    }
  }

  void write(const void* data, size_t bytes) {
    const auto* cursor = static_cast<const uint8_t*>(data);
    while (bytes > 0) {
      const ssize_t written = ::write(fd_, cursor, bytes);
      if (written < 0 && errno == EINTR) continue;
      check(written > 0, path_, ": write failed: ", std::strerror(errno));
      cursor += written;
      bytes -= static_cast<size_t>(written);
    }
  }

  void commit() {
    // mkstemp creates mode 0600; checkpoints are shared read-only data.
    check(::fchmod(fd_, 0644) == 0, path_, ": chmod failed: ", std::strerror(errno));
    check(::fsync(fd_) == 0, path_, ": fsync failed: ", std::strerror(errno));
    const int result = ::close(fd_);
    fd_ = -1;
    if (result != 0 || std::rename(temp_path_.c_str(), path_.c_str()) != 0) {
      const int error = errno;
      ::unlink(temp_path_.c_str());
      fail(path_, ": cannot finish writing: ", std::strerror(error));
    }
  }

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
};

std::string shard_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

}  // namespace

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, const void* bytes,
                            size_t nbytes) {
  auto copy = std::make_shared<std::vector<uint8_t>>(nbytes);
  if (nbytes > 0) {
    check(bytes != nullptr, "safetensors writer: tensor '", name, "': null data for ", nbytes, " bytes");
    std::memcpy(copy->data(), bytes, nbytes);
  }
  const uint8_t* data = copy->data();
  add(std::move(name), dtype, std::move(shape), data, nbytes, std::move(copy));
}

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, const void* bytes,
                            size_t nbytes, std::shared_ptr<const void> owner) {
  check(!name.empty(), "safetensors writer: a tensor needs a name");
  check(name != "__metadata__", "safetensors writer: '__metadata__' is reserved and cannot name a tensor");
  check(!names_.contains(name), "safetensors writer: tensor '", name, "' added twice");
  const auto expected = tensor_byte_size(dtype, shape);
  check(expected.has_value(), "safetensors writer: tensor '", name, "': shape of ", shape.size(),
        " dims is negative, overflows, or leaves a partial byte of ", to_string(dtype));
  check(*expected == nbytes, "safetensors writer: tensor '", name, "': ", nbytes, " bytes given but its shape of ",
        to_string(dtype), " needs ", *expected);
  check(nbytes == 0 || bytes != nullptr, "safetensors writer: tensor '", name, "': null data for ", nbytes, " bytes");
  names_.insert(name);
  tensors_.push_back(PendingTensor{.name = std::move(name),
                                   .dtype = dtype,
                                   .shape = std::move(shape),
                                   .data = static_cast<const uint8_t*>(bytes),
                                   .bytes = nbytes});
  owners_.push_back(std::move(owner));
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

size_t SafetensorsWriter::total_bytes() const {
  size_t total = 0;
  for (const PendingTensor& tensor : tensors_) total += tensor.bytes;
  return total;
}

void SafetensorsWriter::write_file(const std::string& path, const std::vector<const PendingTensor*>& tensors) const {
  // Widest elements first, then by name: every tensor then starts at a multiple of its element size (the header is
  // padded to 8 bytes), so mapped data can be read in place; sub-byte dtypes go last.
  std::vector<const PendingTensor*> ordered = tensors;
  std::stable_sort(ordered.begin(), ordered.end(), [](const PendingTensor* a, const PendingTensor* b) {
    const size_t a_bits = dtype_bits(a->dtype);
    const size_t b_bits = dtype_bits(b->dtype);
    return a_bits != b_bits ? a_bits > b_bits : a->name < b->name;
  });

  // Assembled by hand in offset order: nlohmann's ordered_json looks keys up linearly, quadratic in the tensor count.
  // Its dump() still escapes each name and throws on invalid UTF-8.
  std::string header_text = "{";
  try {
    if (!metadata_.empty()) header_text += "\"__metadata__\":" + nlohmann::json(metadata_).dump();
    size_t offset = 0;
    for (const PendingTensor* tensor : ordered) {
      if (header_text.size() > 1) header_text += ',';
      header_text += nlohmann::json(tensor->name).dump();
      header_text += ":{\"dtype\":\"";
      header_text += to_string(tensor->dtype);
      header_text += "\",\"shape\":" + nlohmann::json(tensor->shape).dump();
      header_text += ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + tensor->bytes) + "]}";
      offset += tensor->bytes;
    }
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": cannot encode the header (tensor names and metadata must be UTF-8): ", e.what());
  }
  header_text += '}';
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  uint8_t length_field[8];
  uint64_t header_length = header_text.size();
  for (uint8_t& byte : length_field) {
    byte = static_cast<uint8_t>(header_length & 0xff);
    header_length >>= 8;
  }

  AtomicFile file(path);
  file.write(length_field, sizeof(length_field));
  file.write(header_text.data(), header_text.size());
  for (const PendingTensor* tensor : ordered) file.write(tensor->data, tensor->bytes);
  file.commit();
}

void SafetensorsWriter::write(const std::string& path) const {
  std::vector<const PendingTensor*> all;
  all.reserve(tensors_.size());
  for (const PendingTensor& tensor : tensors_) all.push_back(&tensor);
  write_file(path, all);
}

std::vector<std::string> SafetensorsWriter::write_sharded(const std::string& dir, size_t max_shard_bytes) const {
  check(max_shard_bytes > 0, dir, ": max_shard_bytes must be positive");
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  check(!error, dir, ": cannot create directory: ", error.message());

  std::vector<std::vector<const PendingTensor*>> shards(1);
  size_t shard_bytes = 0;
  for (const PendingTensor& tensor : tensors_) {
    if (!shards.back().empty() && shard_bytes + tensor.bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&tensor);
    shard_bytes += tensor.bytes;
  }

  const std::filesystem::path root(dir);
  std::vector<std::string> names;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    names.push_back(shard_name(i, shards.size()));
    write_file((root / names.back()).string(), shards[i]);
    for (const PendingTensor* tensor : shards[i]) weight_map[tensor->name] = names.back();
  }
  // Written last, so an interrupted write never leaves an index naming shards that do not exist yet.
  const nlohmann::json index = {{"metadata", {{"total_size", total_bytes()}}}, {"weight_map", weight_map}};
  const std::string index_text = index.dump(2) + "\n";
  AtomicFile index_file((root / kSafetensorsIndexName).string());
  index_file.write(index_text.data(), index_text.size());
  index_file.commit();
  return names;
}

}  // namespace dsv4
