// NumPy .npy files of float32 arrays (format version 1.0/2.0, little-endian, C order): what `dsv4 logits` writes and
// what the golden fixtures hold.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv4 {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> values;  // row-major
};

// Throws dsv4::Error naming the file when it is not a little-endian float32 C-order array.
NpyArray read_npy_f32(const std::string& path);
// Written atomically (temporary file, then rename).
void write_npy_f32(const std::string& path, const std::vector<int64_t>& shape, const float* values);

}  // namespace dsv4
