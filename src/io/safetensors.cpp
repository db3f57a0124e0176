#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "core/error.hpp"

namespace dsv4 {
namespace {

using json = nlohmann::json;

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t bits;
};

constexpr std::array<DTypeInfo, 22> kDTypeTable = {{
    {DType::BOOL, "BOOL", 8},
    {DType::U8, "U8", 8},
    {DType::I8, "I8", 8},
    {DType::I16, "I16", 16},
    {DType::U16, "U16", 16},
    {DType::I32, "I32", 32},
    {DType::U32, "U32", 32},
    {DType::I64, "I64", 64},
    {DType::U64, "U64", 64},
    {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},
    {DType::F32, "F32", 32},
    {DType::F64, "F64", 64},
    {DType::F8_E4M3, "F8_E4M3", 8},
    {DType::F8_E5M2, "F8_E5M2", 8},
    {DType::F8_E8M0, "F8_E8M0", 8},
    {DType::F4, "F4", 4},
    {DType::F6_E2M3, "F6_E2M3", 6},
    {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {DType::C64, "C64", 64},
}};
// The table is indexed by the enum value.
static_assert([] {
  for (size_t i = 0; i < kDTypeTable.size(); ++i) {
    if (static_cast<size_t>(kDTypeTable[i].dtype) != i) return false;
  }
  return true;
}());

constexpr std::array<DType, kDTypeTable.size()> kAllDTypes = [] {
  std::array<DType, kDTypeTable.size()> all{};
  for (size_t i = 0; i < all.size(); ++i) all[i] = kDTypeTable[i].dtype;
  return all;
}();

const DTypeInfo& info_of(DType dtype) {
  const auto index = static_cast<size_t>(dtype);
  check(index < kDTypeTable.size(), "invalid DType value ", index);
  return kDTypeTable[index];
}

// The reference implementation refuses headers above 100 MB; a real checkpoint shard's header is a few MB at most.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Root object -> tensor entry -> shape/data_offsets array: nothing in a valid header nests deeper.
constexpr int kMaxJsonDepth = 2;

std::optional<uint64_t> checked_numel(std::span<const int64_t> shape) {
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (dim == 0) return 0;
  }
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel)) return std::nullopt;
  }
  return numel;
}

std::string shape_string(std::span<const int64_t> shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

std::string known_dtype_list() {
  std::string list;
  for (const DTypeInfo& entry : kDTypeTable) {
    if (!list.empty()) list += ' ';
    list += entry.name;
  }
  return list;
}

// A first, streaming pass over the header: reports syntax errors, duplicate keys (a DOM parse would silently keep the
// last one, hiding a second tensor of the same name) and nesting deeper than any valid header, before a DOM is built.
// nlohmann's callback parser would do the same in one pass but rescans the parent object at every object end, which
// is quadratic in the tensor count.
class HeaderStructureCheck final : public nlohmann::json_sax<json> {
 public:
  explicit HeaderStructureCheck(const std::string& path) : path_(path) {}

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    enter();
    keys_of_open_objects_.emplace_back();
    return true;
  }
  bool key(string_t& key) override {
    if (!keys_of_open_objects_.back().insert(key).second) {
      if (keys_of_open_objects_.size() == 1) fail(path_, ": duplicate tensor name '", key, "' in the header");
      fail(path_, ": duplicate key '", key, "' inside a header entry");
    }
    return true;
  }
  bool end_object() override {
    keys_of_open_objects_.pop_back();
    --open_containers_;
    return true;
  }
  bool start_array(std::size_t) override {
    enter();
    return true;
  }
  bool end_array() override {
    --open_containers_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const json::exception& error) override {
    fail(path_, ": header is not valid JSON: ", error.what());
  }

 private:
  void enter() {
    check(open_containers_ <= kMaxJsonDepth, path_, ": header nests JSON deeper than a safetensors header can");
    ++open_containers_;
  }

  const std::string& path_;
  int open_containers_ = 0;
  std::vector<std::set<std::string>> keys_of_open_objects_;
};

json parse_header_json(const std::string& path, const uint8_t* first, const uint8_t* last) {
  HeaderStructureCheck structure(path);
  json::sax_parse(first, last, &structure);
  try {
    return json::parse(first, last);
  } catch (const json::exception& e) {
    fail(path, ": header is not valid JSON: ", e.what());
  }
}

struct HeaderEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

// Messages are built only on failure: headers of real checkpoints hold tens of thousands of entries.
HeaderEntry parse_entry(const std::string& path, const std::string& name, const json& entry, uint64_t data_bytes) {
  auto reject = [&](const auto&... parts) { fail(path, ": tensor '", name, "': ", parts...); };
  if (name.empty()) fail(path, ": a tensor has an empty name");
  if (!entry.is_object()) reject("entry is ", entry.type_name(), ", expected an object");
  for (const auto& [field, _] : entry.items()) {
    if (field != "dtype" && field != "shape" && field != "data_offsets") {
      reject("unexpected field '", field, "' (expected dtype, shape, data_offsets)");
    }
  }
  auto require = [&](const char* field) -> const json& {
    const auto it = entry.find(field);
    if (it == entry.end()) reject("missing field '", field, "'");
    return *it;
  };
  auto unsigned_value = [&](std::string_view field, const json& value) {
    if (!value.is_number_unsigned()) reject(field, " holds ", value.dump(), ", expected a non-negative integer");
    return value.get<uint64_t>();
  };

  HeaderEntry result{.name = name, .dtype = DType::U8, .shape = {}, .begin = 0, .end = 0};
  const json& dtype_value = require("dtype");
  if (!dtype_value.is_string()) reject("dtype holds ", dtype_value.dump(), ", expected a string");
  const auto& dtype_text = dtype_value.get_ref<const std::string&>();
  const auto dtype = parse_dtype(dtype_text);
  if (!dtype) reject("unknown dtype '", dtype_text, "' (known: ", known_dtype_list(), ")");
  result.dtype = *dtype;

  const json& shape_value = require("shape");
  if (!shape_value.is_array()) reject("shape holds ", shape_value.dump(), ", expected an array");
  for (const json& dim : shape_value) {
    const uint64_t extent = unsigned_value("shape", dim);
    if (extent > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      reject("shape dimension ", extent, " is too large");
    }
    result.shape.push_back(static_cast<int64_t>(extent));
  }

  const json& offsets = require("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) reject("data_offsets holds ", offsets.dump(), ", expected [begin, end]");
  result.begin = unsigned_value("data_offsets", offsets[0]);
  result.end = unsigned_value("data_offsets", offsets[1]);
  if (result.begin > result.end) reject("data_offsets [", result.begin, ", ", result.end, "] end before they begin");
  if (result.end > data_bytes) {
    reject("data_offsets [", result.begin, ", ", result.end, "] run past the end of the data section (", data_bytes,
           " bytes; is the file truncated?)");
  }

  const auto numel = checked_numel(result.shape);
  if (!numel) reject("element count of shape ", shape_string(result.shape), " overflows");
  const size_t bits = dtype_bits(result.dtype);
  if (*numel > std::numeric_limits<uint64_t>::max() / bits) {
    reject("byte size of shape ", shape_string(result.shape), " overflows");
  }
  if (*numel * bits % 8 != 0) reject(*numel, " elements of ", dtype_text, " do not fill whole bytes");
  const uint64_t expected_bytes = *numel * bits / 8;
  if (result.end - result.begin != expected_bytes) {
    reject("data_offsets [", result.begin, ", ", result.end, "] span ", result.end - result.begin, " bytes but shape ",
           shape_string(result.shape), " of ", dtype_text, " needs ", expected_bytes);
  }
  return result;
}

// The spans must tile [0, data_bytes) exactly, as the format's reference reader demands: any overlap would alias two
// tensors, and any gap or tail means the header and the data disagree.
void check_spans_tile_data(const std::string& path, std::vector<HeaderEntry>& entries, uint64_t data_bytes) {
  std::sort(entries.begin(), entries.end(), [](const HeaderEntry& a, const HeaderEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t cursor = 0;
  const HeaderEntry* previous = nullptr;
  for (const HeaderEntry& entry : entries) {
    if (entry.begin < cursor) {
      fail(path, ": tensor '", entry.name, "' (data_offsets [", entry.begin, ", ", entry.end, "]) overlaps tensor '",
           previous->name, "' (data_offsets [", previous->begin, ", ", previous->end, "])");
    }
    check(entry.begin == cursor, path, ": bytes [", cursor, ", ", entry.begin,
          ") of the data section belong to no tensor (gap before tensor '", entry.name, "')");
    cursor = entry.end;
    previous = &entry;
  }
  check(cursor == data_bytes, path, ": the last ", data_bytes - cursor,
        " bytes of the data section belong to no tensor (header and file size disagree)");
}

}  // namespace

std::string_view to_string(DType dtype) { return info_of(dtype).name; }

std::optional<DType> parse_dtype(std::string_view text) {
  for (const DTypeInfo& entry : kDTypeTable) {
    if (entry.name == text) return entry.dtype;
  }
  return std::nullopt;
}

size_t dtype_bits(DType dtype) { return info_of(dtype).bits; }

std::span<const DType> all_dtypes() { return kAllDTypes; }

std::optional<size_t> tensor_byte_size(DType dtype, std::span<const int64_t> shape) {
  const auto numel = checked_numel(shape);
  if (!numel) return std::nullopt;
  uint64_t bits = 0;
  if (__builtin_mul_overflow(*numel, static_cast<uint64_t>(dtype_bits(dtype)), &bits)) return std::nullopt;
  if (bits % 8 != 0) return std::nullopt;
  return static_cast<size_t>(bits / 8);
}

int64_t TensorView::numel() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;

  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, path, ": cannot open: ", std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(error));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  file->size_ = static_cast<size_t>(info.st_size);
  if (file->size_ > 0) {
    // MAP_PRIVATE + PROT_READ: pages come straight from the page cache and nothing can write through the view.
    void* mapping = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int error = errno;
    ::close(fd);
    check(mapping != MAP_FAILED, path, ": mmap of ", file->size_, " bytes failed: ", std::strerror(error));
    file->mapping_ = mapping;
    file->base_ = static_cast<const uint8_t*>(mapping);
  } else {
    ::close(fd);
  }
  file->parse();
  return file;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_bytes(std::vector<uint8_t> bytes, std::string label) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::move(label);
  file->owned_bytes_ = std::move(bytes);
  file->base_ = file->owned_bytes_.data();
  file->size_ = file->owned_bytes_.size();
  file->parse();
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

void SafetensorsFile::parse() {
  check(size_ >= 8, path_, ": truncated: ", size_, " bytes, too short for the 8-byte header length");
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | base_[i];
  const uint64_t after_length = size_ - 8;
  check(header_length <= after_length, path_, ": header length ", header_length, " runs past the end of the file (",
        after_length, " bytes follow the length field; is the file truncated?)");
  check(header_length <= kMaxHeaderBytes, path_, ": header length ", header_length, " exceeds the ", kMaxHeaderBytes,
        "-byte limit");
  header_bytes_ = static_cast<size_t>(header_length);

  const uint8_t* header_begin = base_ + 8;
  // nlohmann's parser stops at a NUL as if the input ended, which would let bytes after it go unchecked.
  if (const void* nul = std::memchr(header_begin, 0, header_bytes_)) {
    fail(path_, ": header holds a NUL byte at header offset ", static_cast<const uint8_t*>(nul) - header_begin);
  }
  const json header = parse_header_json(path_, header_begin, header_begin + header_bytes_);
  check(header.is_object(), path_, ": header is a JSON ", header.type_name(), ", expected an object");

  const uint8_t* data_begin = header_begin + header_bytes_;
  const uint64_t data_bytes = size_ - 8 - header_bytes_;
  std::vector<HeaderEntry> entries;
  entries.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      check(value.is_object(), path_, ": __metadata__ is ", value.type_name(), ", expected an object of strings");
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          fail(path_, ": __metadata__ entry '", meta_key, "' holds ", meta_value.dump(), ", expected a string");
        }
        metadata_.emplace(meta_key, meta_value.get<std::string>());
      }
      continue;
    }
    entries.push_back(parse_entry(path_, key, value, data_bytes));
  }
  check_spans_tile_data(path_, entries, data_bytes);

  tensors_.reserve(entries.size());
  for (HeaderEntry& entry : entries) {
    tensors_.push_back(TensorView{.name = std::move(entry.name),
                                  .dtype = entry.dtype,
                                  .shape = std::move(entry.shape),
                                  .data = data_begin + entry.begin,
                                  .bytes = static_cast<size_t>(entry.end - entry.begin),
                                  .file = path_});
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
}

const TensorView* SafetensorsFile::find(std::string_view name) const {
  const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                   [](const TensorView& view, std::string_view key) { return view.name < key; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

}  // namespace dsv4
