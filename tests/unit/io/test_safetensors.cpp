// SafetensorsFile and SafetensorsWriter: dtype table, round trips, and one crafted file per rejected input.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "io/safetensors.hpp"
#include "io/safetensors_writer.hpp"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

// A u64 length, the header text as given (no padding), then the data bytes.
std::vector<uint8_t> raw_file(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> bytes(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
  std::copy(header.begin(), header.end(), bytes.begin() + 8);
  for (size_t i = 0; i < data_bytes; ++i) bytes[8 + header.size() + i] = static_cast<uint8_t>(i * 7 + 1);
  return bytes;
}

std::vector<uint8_t> read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dsv4-test-safetensors-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write_bytes(const std::string& name, const std::vector<uint8_t>& bytes) {
    const fs::path path = dir_ / name;
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return path.string();
  }

  // Opening must throw dsv4::Error whose message names the file and contains every expected fragment.
  void expect_rejected(const std::vector<uint8_t>& bytes, std::initializer_list<std::string> fragments) {
    const std::string path = write_bytes("bad.safetensors", bytes);
    try {
      SafetensorsFile::open(path);
      ADD_FAILURE() << "accepted a bad file";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(path), std::string::npos) << message;
      for (const std::string& fragment : fragments) EXPECT_NE(message.find(fragment), std::string::npos) << message;
    }
  }
  void expect_header_rejected(const std::string& header, size_t data_bytes,
                              std::initializer_list<std::string> fragments) {
    SCOPED_TRACE(header);
    expect_rejected(raw_file(header, data_bytes), fragments);
  }

  fs::path dir_;
};

TEST(DTypeTable, NamesRoundTripAndAreDistinct) {
  std::set<std::string_view> names;
  for (DType dtype : all_dtypes()) {
    const std::string_view name = to_string(dtype);
    EXPECT_TRUE(names.insert(name).second) << name;
    ASSERT_TRUE(parse_dtype(name).has_value()) << name;
    EXPECT_EQ(*parse_dtype(name), dtype) << name;
  }
  EXPECT_EQ(names.size(), 22u);
}

TEST(DTypeTable, BitsPerElement) {
  EXPECT_EQ(dtype_bits(DType::F4), 4u);
  EXPECT_EQ(dtype_bits(DType::F6_E2M3), 6u);
  EXPECT_EQ(dtype_bits(DType::F6_E3M2), 6u);
  for (DType dtype : {DType::BOOL, DType::U8, DType::I8, DType::F8_E4M3, DType::F8_E5M2, DType::F8_E8M0,
                      DType::F8_E4M3FNUZ, DType::F8_E5M2FNUZ}) {
    EXPECT_EQ(dtype_bits(dtype), 8u) << to_string(dtype);
  }
  for (DType dtype : {DType::I16, DType::U16, DType::F16, DType::BF16}) EXPECT_EQ(dtype_bits(dtype), 16u);
  for (DType dtype : {DType::I32, DType::U32, DType::F32}) EXPECT_EQ(dtype_bits(dtype), 32u);
  for (DType dtype : {DType::I64, DType::U64, DType::F64, DType::C64}) EXPECT_EQ(dtype_bits(dtype), 64u);
}

TEST(DTypeTable, RejectsUnknownSpellings) {
  for (const char* text : {"", "f32", "FP32", "F8_E4M3FN", "FP4", "E2M1", "INT8", "BF16 ", "F8"}) {
    EXPECT_FALSE(parse_dtype(text).has_value()) << text;
  }
}

TEST(DTypeTable, TensorByteSize) {
  const std::vector<int64_t> scalar;
  EXPECT_EQ(tensor_byte_size(DType::F32, scalar), 4u);
  EXPECT_EQ(tensor_byte_size(DType::BF16, std::vector<int64_t>{3, 5}), 30u);
  EXPECT_EQ(tensor_byte_size(DType::F4, std::vector<int64_t>{4}), 2u);
  EXPECT_EQ(tensor_byte_size(DType::F4, std::vector<int64_t>{3}), std::nullopt);
  EXPECT_EQ(tensor_byte_size(DType::F6_E2M3, std::vector<int64_t>{4}), 3u);
  EXPECT_EQ(tensor_byte_size(DType::F6_E2M3, std::vector<int64_t>{2}), std::nullopt);
  EXPECT_EQ(tensor_byte_size(DType::F32, std::vector<int64_t>{2, -1}), std::nullopt);
  EXPECT_EQ(tensor_byte_size(DType::U8, std::vector<int64_t>{int64_t{1} << 40, int64_t{1} << 40}), std::nullopt);
  EXPECT_EQ(tensor_byte_size(DType::F64, std::vector<int64_t>{int64_t{1} << 61}), std::nullopt);
  // A zero extent makes the tensor empty whatever the other extents are.
  EXPECT_EQ(tensor_byte_size(DType::F64, std::vector<int64_t>{int64_t{1} << 62, int64_t{1} << 62, 0}), 0u);
}

TEST_F(SafetensorsTest, WriterRoundTripKeepsEveryTensorAndAlignsData) {
  std::mt19937 rng(7);
  struct Spec {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Spec> specs = {
      {"layers.0.attn.wq_a.weight", DType::F8_E4M3, {6, 10}},
      {"layers.0.attn.wq_a.scale", DType::F8_E8M0, {1, 1}},
      {"layers.0.ffn.experts.0.w1.weight", DType::I8, {4, 3}},
      {"norm.weight", DType::BF16, {5}},
      {"embed.weight", DType::F32, {3, 3}},
      {"counts", DType::I64, {3}},
      {"scalar", DType::F64, {}},
      {"empty", DType::F16, {0, 4}},
      {"packed", DType::F4, {2, 6}},
      {"six_bit", DType::F6_E3M2, {8}},
      {"complex", DType::C64, {2}},
      {"flags", DType::BOOL, {7}},
  };
  SafetensorsWriter writer;
  std::vector<std::vector<uint8_t>> payloads;
  for (const Spec& spec : specs) {
    std::vector<uint8_t> bytes(*tensor_byte_size(spec.dtype, spec.shape));
    for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng());
    writer.add(spec.name, spec.dtype, spec.shape, bytes.data(), bytes.size());
    payloads.push_back(std::move(bytes));
  }
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "ünïcode ✓");
  EXPECT_EQ(writer.size(), specs.size());
  const std::string path = (dir_ / "model.safetensors").string();
  writer.write(path);

  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->path(), path);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(file->metadata().at("note"), "ünïcode ✓");
  EXPECT_EQ(file->header_bytes() % 8, 0u);
  ASSERT_EQ(file->tensors().size(), specs.size());
  EXPECT_TRUE(std::is_sorted(file->tensors().begin(), file->tensors().end(),
                             [](const TensorView& a, const TensorView& b) { return a.name < b.name; }));
  const uint8_t* base = file->tensors().front().data;
  for (const TensorView& view : file->tensors()) base = std::min(base, view.data);
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorView* view = file->find(specs[i].name);
    ASSERT_NE(view, nullptr) << specs[i].name;
    EXPECT_EQ(view->name, specs[i].name);
    EXPECT_EQ(view->dtype, specs[i].dtype);
    EXPECT_EQ(view->shape, specs[i].shape);
    EXPECT_EQ(view->file, path);
    EXPECT_EQ(view->bytes, payloads[i].size());
    EXPECT_EQ(view->numel(), std::accumulate(specs[i].shape.begin(), specs[i].shape.end(), int64_t{1},
                                             std::multiplies<int64_t>()));
    EXPECT_TRUE(std::equal(payloads[i].begin(), payloads[i].end(), view->data)) << specs[i].name;
    // The mapping is page aligned and the header padded to 8, so byte-or-wider tensors land on their element size.
    const size_t element_bytes = std::max<size_t>(1, dtype_bits(view->dtype) / 8);
    if (dtype_bits(view->dtype) >= 8) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(view->data) % element_bytes, 0u) << specs[i].name;
    }
  }
  EXPECT_EQ(file->find("missing"), nullptr);
  EXPECT_EQ(file->find("layers.0"), nullptr);

  // The same image parsed from memory gives the same tensors.
  const auto in_memory = SafetensorsFile::from_bytes(read_all(path), "memory");
  ASSERT_EQ(in_memory->tensors().size(), specs.size());
  for (const TensorView& view : in_memory->tensors()) {
    const TensorView* mapped = file->find(view.name);
    ASSERT_NE(mapped, nullptr);
    EXPECT_EQ(view.file, "memory");
    EXPECT_TRUE(std::equal(view.data, view.data + view.bytes, mapped->data)) << view.name;
  }
}

// Real shards hold thousands of entries; header handling must stay linear (a quadratic step took minutes here).
TEST_F(SafetensorsTest, ManyTensorsRoundTrip) {
  constexpr int kTensors = 20000;
  SafetensorsWriter writer;
  for (int i = 0; i < kTensors; ++i) {
    const uint16_t value = static_cast<uint16_t>(i);
    writer.add("layers." + std::to_string(i / 256) + ".ffn.experts." + std::to_string(i % 256) + ".w1.weight",
               DType::BF16, {1}, &value, sizeof(value));
  }
  const std::string path = (dir_ / "many.safetensors").string();
  writer.write(path);
  const auto file = SafetensorsFile::open(path);
  ASSERT_EQ(file->tensors().size(), static_cast<size_t>(kTensors));
  for (int i = 0; i < kTensors; i += 997) {
    const TensorView* view = file->find("layers." + std::to_string(i / 256) + ".ffn.experts." +
                                        std::to_string(i % 256) + ".w1.weight");
    ASSERT_NE(view, nullptr) << i;
    uint16_t value = 0;
    std::memcpy(&value, view->data, sizeof(value));
    EXPECT_EQ(value, i);
  }
}

TEST_F(SafetensorsTest, WriterPadsHeaderWithSpacesAndLeavesNoTemporaryFiles) {
  for (size_t name_length = 1; name_length <= 9; ++name_length) {
    SafetensorsWriter writer;
    const float value = 1.5f;
    writer.add(std::string(name_length, 'w'), DType::F32, {1}, &value, sizeof(value));
    const fs::path path = dir_ / "one.safetensors";
    writer.write(path.string());  // overwrites the previous iteration's file
    const std::vector<uint8_t> bytes = read_all(path);
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | bytes[i];
    EXPECT_EQ(header_length % 8, 0u);
    ASSERT_EQ(bytes.size(), 8 + header_length + sizeof(value));
    EXPECT_EQ(bytes[8], '{');
    const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<ptrdiff_t>(header_length));
    const size_t closing = header.rfind('}');
    EXPECT_EQ(header.find_first_not_of(' ', closing + 1), std::string::npos) << header;
    float read_back = 0;
    std::memcpy(&read_back, bytes.data() + 8 + header_length, sizeof(read_back));
    EXPECT_EQ(read_back, value);
  }
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    ++files;
    EXPECT_EQ(entry.path().filename(), "one.safetensors");
  }
  EXPECT_EQ(files, 1u);
}

TEST_F(SafetensorsTest, EmptyWriterWritesAValidFile) {
  SafetensorsWriter writer;
  const std::string path = (dir_ / "empty.safetensors").string();
  writer.write(path);
  const auto file = SafetensorsFile::open(path);
  EXPECT_TRUE(file->tensors().empty());
  EXPECT_TRUE(file->metadata().empty());
}

TEST_F(SafetensorsTest, AcceptsUnpaddedHeadersFromOtherWriters) {
  const auto file = SafetensorsFile::open(write_bytes(
      "plain.safetensors", raw_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", 16)));
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].dtype, DType::I32);
  EXPECT_EQ(file->tensors()[0].bytes, 16u);
  EXPECT_EQ(file->tensors()[0].data[0], 1);
}

TEST_F(SafetensorsTest, ZeroSizeTensorsMayShareAnOffset) {
  const auto file = SafetensorsFile::open(write_bytes(
      "zeros.safetensors",
      raw_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
               R"("b":{"dtype":"F16","shape":[2,0],"data_offsets":[0,0]},)"
               R"("c":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
               2)));
  EXPECT_EQ(file->tensors().size(), 3u);
}

TEST_F(SafetensorsTest, RejectsTruncatedAndMissingFiles) {
  expect_rejected({}, {"truncated", "0 bytes"});
  expect_rejected({1, 2, 3, 4, 5}, {"truncated", "5 bytes"});
}

TEST_F(SafetensorsTest, RejectsWhatItMustAndNamesTheProblem) {
  // Header length and size.
  {
    std::vector<uint8_t> bytes = raw_file("{}", 0);
    bytes[0] = 200;
    expect_rejected(bytes, {"header length 200 runs past the end of the file", "2 bytes follow"});
  }
  {
    std::vector<uint8_t> bytes = raw_file("{}", 0);
    for (int i = 0; i < 8; ++i) bytes[i] = 0xff;
    expect_rejected(bytes, {"header length 18446744073709551615 runs past the end"});
  }
  // JSON syntax and shape of the header.
  expect_header_rejected("", 0, {"not valid JSON"});
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", 4, {"not valid JSON"});
  expect_header_rejected("{\"a\xff\":1}", 0, {"not valid JSON"});
  expect_header_rejected(std::string("{}\0\0", 4), 0, {"NUL byte at header offset 2"});
  expect_header_rejected("[1, 2]", 0, {"header is a JSON array, expected an object"});
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[[[1]]],"data_offsets":[0,4]}})", 4, {"nests JSON deeper"});
  expect_header_rejected(R"({"a":{"x":{"y":{}}}})", 0, {"nests JSON deeper"});
  expect_header_rejected(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      8, {"duplicate tensor name 'a'"});
  expect_header_rejected(R"({"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})", 4,
                         {"duplicate key 'dtype'"});
  // __metadata__.
  expect_header_rejected(R"({"__metadata__":{"k":1}})", 0, {"__metadata__ entry 'k' holds 1, expected a string"});
  expect_header_rejected(R"({"__metadata__":["k"]})", 0, {"__metadata__ is array"});
  // Entry fields.
  expect_header_rejected(R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4, {"empty name"});
  expect_header_rejected(R"({"w":[1,2]})", 0, {"tensor 'w'", "entry is array"});
  expect_header_rejected(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4, {"tensor 'w'", "missing field 'dtype'"});
  expect_header_rejected(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4, {"tensor 'w'", "missing field 'shape'"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1]}})", 4, {"tensor 'w'", "missing field 'data_offsets'"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":0}})", 4,
                         {"tensor 'w'", "unexpected field 'extra'"});
  expect_header_rejected(R"({"w":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", 4,
                         {"tensor 'w'", "unknown dtype 'F33'", "F8_E4M3"});
  expect_header_rejected(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4, {"unknown dtype 'f32'"});
  expect_header_rejected(R"({"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", 4, {"dtype holds 32"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":4,"data_offsets":[0,16]}})", 16, {"shape holds 4"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4,
                         {"tensor 'w'", "shape holds -1, expected a non-negative integer"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4, {"shape holds 1.0"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})", 4,
                         {"shape dimension 9223372036854775808 is too large"});
  expect_header_rejected(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4,
                         {"element count of shape [4294967296, 4294967296] overflows"});
  expect_header_rejected(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,4]}})", 4,
                         {"byte size of shape [4611686018427387904] overflows"});
  expect_header_rejected(R"({"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2,
                         {"tensor 'w'", "3 elements of F4 do not fill whole bytes"});
  // Spans.
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4,
                         {"tensor 'w'", "data_offsets holds [0], expected [begin, end]"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,-4]}})", 4, {"data_offsets holds -4"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4,
                         {"tensor 'w'", "data_offsets [4, 0] end before they begin"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4,
                         {"tensor 'w'", "data_offsets [0, 8] run past the end of the data section (4 bytes"});
  expect_header_rejected(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12,
                         {"tensor 'w'", "span 12 bytes but shape [2, 2] of F32 needs 16"});
  expect_header_rejected(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      12, {"tensor 'b' (data_offsets [4, 12]) overlaps tensor 'a' (data_offsets [0, 8])"});
  expect_header_rejected(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      8, {"overlaps"});
  expect_header_rejected(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
      12, {"bytes [4, 8) of the data section belong to no tensor (gap before tensor 'b')"});
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8,
                         {"bytes [0, 4)", "gap before tensor 'a'"});
  expect_header_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8,
                         {"the last 4 bytes of the data section belong to no tensor"});
}

TEST_F(SafetensorsTest, TruncatedDataNamesTheTensorThatRunsPastTheEnd) {
  SafetensorsWriter writer;
  const std::vector<float> values(64, 2.0f);
  writer.add("first", DType::F32, {32}, values.data(), 32 * sizeof(float));
  writer.add("second", DType::F32, {32}, values.data(), 32 * sizeof(float));
  const fs::path path = dir_ / "whole.safetensors";
  writer.write(path.string());
  std::vector<uint8_t> bytes = read_all(path);
  bytes.resize(bytes.size() - 1);
  expect_rejected(bytes, {"tensor 'second'", "run past the end of the data section", "truncated"});
  bytes.resize(bytes.size() - 200);
  expect_rejected(bytes, {"run past the end of the data section"});
  bytes.resize(20);
  expect_rejected(bytes, {"runs past the end of the file", "truncated"});
}

TEST_F(SafetensorsTest, RejectsOversizedHeaderInASparseFile) {
  // A 100 MB+ header would be legal JSON space padding; the limit keeps a bogus length from costing a 100 MB parse.
  const fs::path path = dir_ / "huge.safetensors";
  {
    std::vector<uint8_t> head = raw_file("{}", 0);
    const uint64_t length = 100'000'008;
    for (int i = 0; i < 8; ++i) head[i] = static_cast<uint8_t>(length >> (8 * i));
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
  }
  fs::resize_file(path, 8 + 100'000'008);
  try {
    SafetensorsFile::open(path.string());
    ADD_FAILURE() << "accepted an oversized header";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the 100000000-byte limit"), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsTest, RejectsPathsThatAreNotReadableFiles) {
  try {
    SafetensorsFile::open((dir_ / "absent.safetensors").string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("absent.safetensors: cannot open"), std::string::npos) << e.what();
  }
  try {
    SafetensorsFile::open(dir_.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsWriter, RejectsBadTensors) {
  const std::vector<uint8_t> bytes(64, 0);
  auto expect_error = [&](auto&& action, const std::string& fragment) {
    try {
      action();
      ADD_FAILURE() << "expected an error containing " << fragment;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  SafetensorsWriter writer;
  writer.add("w", DType::F32, {2, 2}, bytes.data(), 16);
  expect_error([&] { writer.add("w", DType::F32, {2, 2}, bytes.data(), 16); }, "tensor 'w' added twice");
  expect_error([&] { writer.add("", DType::U8, {1}, bytes.data(), 1); }, "needs a name");
  expect_error([&] { writer.add("__metadata__", DType::U8, {1}, bytes.data(), 1); }, "reserved");
  expect_error([&] { writer.add("x", DType::F32, {2, 2}, bytes.data(), 12); }, "12 bytes given but");
  expect_error([&] { writer.add("x", DType::F4, {3}, bytes.data(), 2); }, "partial byte of F4");
  expect_error([&] { writer.add("x", DType::F32, {-1}, bytes.data(), 0); }, "tensor 'x'");
  expect_error([&] { writer.add("x", DType::F32, {1}, nullptr, 4); }, "null data");
  expect_error([&] { writer.write_sharded("/nonexistent-dsv4-dir/sub", 0); }, "max_shard_bytes must be positive");
  expect_error([&] { writer.write("/nonexistent-dsv4-dir/x.safetensors"); }, "cannot create a temporary file");
  EXPECT_EQ(writer.size(), 1u);
  EXPECT_EQ(writer.total_bytes(), 16u);
}

TEST_F(SafetensorsTest, WriterRejectsNamesThatAreNotUtf8) {
  SafetensorsWriter writer;
  const uint8_t byte = 1;
  writer.add("bad\xff", DType::U8, {1}, &byte, 1);
  const fs::path path = dir_ / "bad.safetensors";
  try {
    writer.write(path.string());
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("UTF-8"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace dsv4
