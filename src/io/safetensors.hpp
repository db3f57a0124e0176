// safetensors: the dtype table and a read-only, mmap'd reader that validates the whole header at open.
// Layout: u64 little-endian N, then N bytes of JSON header, then the data section. Each tensor entry is
// {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative to the data section start; the optional
// "__metadata__" entry maps strings to strings. A file that opens is safe to read: every span lies inside the data
// section, matches shape x dtype exactly, and the spans tile the data section without overlaps or gaps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

// Every dtype string the safetensors format defines. Packed e2m1 weights ship under I8 (DeepSeek) or U8 (ModelOpt);
// F4 is the format's own name for e2m1 and packs two elements per byte, low nibble first.
enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  I16,
  U16,
  I32,
  U32,
  I64,
  U64,
  F16,
  BF16,
  F32,
  F64,
  F8_E4M3,
  F8_E5M2,
  F8_E8M0,  // power-of-two scale byte: 2^(b - 127)
  F4,       // e2m1
  F6_E2M3,
  F6_E3M2,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  C64,  // complex64: two f32
};

// The spelling used in safetensors headers ("BF16", "F8_E4M3", ...).
std::string_view to_string(DType dtype);
// Exact, case-sensitive match of a header dtype string; nullopt for anything the format does not define.
std::optional<DType> parse_dtype(std::string_view text);
// Bits per element: 4 for F4, 6 for F6_*, 8 * bytes otherwise.
size_t dtype_bits(DType dtype);
// Every DType, in declaration order (for tests and tables).
std::span<const DType> all_dtypes();

// Bytes a tensor of this dtype and shape occupies, or nullopt when a dimension is negative, the size overflows, or a
// sub-byte dtype does not fill whole bytes (the format forbids partial bytes).
std::optional<size_t> tensor_byte_size(DType dtype, std::span<const int64_t> shape);

struct TensorView {
  std::string name;
  DType dtype = DType::U8;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the owning file's mapping; valid while the file (or its keepalive) lives
  size_t bytes = 0;
  std::string file;  // path of the file holding the tensor

  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps the file read-only and validates it. Throws dsv4::Error naming the file (and the tensor) at fault.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Validates an in-memory image; `label` stands in for the path in messages and TensorView::file. Tests use it to
  // fuzz under AddressSanitizer, which checks heap bounds exactly where a mapping would hide a stray read.
  static std::shared_ptr<SafetensorsFile> from_bytes(std::vector<uint8_t> bytes, std::string label);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Sorted by name.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  // Whole file size and header length N (the data section starts at 8 + N).
  size_t file_bytes() const { return size_; }
  size_t header_bytes() const { return header_bytes_; }

 private:
  SafetensorsFile() = default;
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  size_t header_bytes_ = 0;
  void* mapping_ = nullptr;          // non-null when base_ is an mmap we must unmap
  std::vector<uint8_t> owned_bytes_;  // backing store for from_bytes
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dsv4
