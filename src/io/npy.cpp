#include "io/npy.hpp"

#include "core/error.hpp"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace dsv4 {

namespace {
constexpr char kMagic[] = "\x93NUMPY";
}

NpyArray read_npy_f32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(bool(in), path, ": cannot open");
  char magic[8];
  in.read(magic, 8);
  check(in && std::memcmp(magic, kMagic, 6) == 0, path, ": not a .npy file");
  const int major = uint8_t(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    uint8_t b[2];
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (uint32_t(b[1]) << 8);
  } else {
    check(major == 2 || major == 3, path, ": unsupported .npy version ", major);
    uint8_t b[4];
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
  }
  check(bool(in) && header_len < (1u << 20), path, ": bad header length");
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  check(bool(in), path, ": truncated header");
  check(header.find("'descr': '<f4'") != std::string::npos, path, ": not little-endian float32 (header ", header, ")");
  check(header.find("'fortran_order': False") != std::string::npos, path, ": Fortran order is not supported");
  // 'shape': (d0, d1, ...): the integers between the parentheses.
  const size_t key = header.find("'shape'");
  const size_t open = header.find('(', key), close = header.find(')', open);
  check(key != std::string::npos && open != std::string::npos && close != std::string::npos, path,
        ": no shape in header");
  NpyArray array;
  int64_t count = 1;
  for (size_t i = open + 1; i < close;) {
    if (header[i] < '0' || header[i] > '9') {
      ++i;
      continue;
    }
    int64_t extent = 0;
    for (; i < close && header[i] >= '0' && header[i] <= '9'; ++i) extent = extent * 10 + (header[i] - '0');
    check(extent < (int64_t(1) << 40), path, ": shape extent too large");
    array.shape.push_back(extent);
    count *= extent;
  }
  check(count < (int64_t(1) << 34), path, ": too many values");
  array.values.resize(size_t(count));
  in.read(reinterpret_cast<char*>(array.values.data()), std::streamsize(count * 4));
  check(bool(in), path, ": holds fewer than the ", count, " values its header declares");
  return array;
}

void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* values) {
  std::string dims;  // a Python tuple: "(3,)" for one dimension, "(2, 3)" otherwise
  int64_t count = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    count *= shape[i];
  }
  if (shape.size() == 1) dims += ",";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Magic (6) + version (2) + length (2) + header + newline, padded with spaces to a multiple of 64.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';

  const std::string temp = path + ".tmp";
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    check(bool(out), path, ": cannot write");
    out.write(kMagic, 6);
    const char version[2] = {1, 0};
    out.write(version, 2);
    const uint8_t len[2] = {uint8_t(header.size() & 0xFF), uint8_t(header.size() >> 8)};
    out.write(reinterpret_cast<const char*>(len), 2);
    out.write(header.data(), std::streamsize(header.size()));
    out.write(reinterpret_cast<const char*>(values), std::streamsize(count * 4));
    check(bool(out), path, ": write failed (disk full?)");
  }
  std::filesystem::rename(temp, path);
}

}  // namespace dsv4
