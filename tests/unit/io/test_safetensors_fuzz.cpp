// Randomized corruption of a valid safetensors image: thousands of mutated headers and every truncation must either
// be rejected with a dsv4::Error naming the file, or open into tensors that lie wholly inside the image. Parsing runs
// on exact-size heap copies so AddressSanitizer flags any read past the end.
#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "io/safetensors.hpp"
#include "io/safetensors_writer.hpp"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;

constexpr const char* kLabel = "fuzzed.safetensors";

std::vector<uint8_t> valid_image() {
  std::mt19937 rng(11);
  SafetensorsWriter writer;
  auto add = [&](const std::string& name, DType dtype, std::vector<int64_t> shape) {
    std::vector<uint8_t> bytes(*tensor_byte_size(dtype, shape));
    for (uint8_t& byte : bytes) byte = static_cast<uint8_t>(rng());
    writer.add(name, dtype, std::move(shape), bytes.data(), bytes.size());
  };
  add("layers.0.attn.wq_a.weight", DType::F8_E4M3, {8, 16});
  add("layers.0.attn.wq_a.scale", DType::F8_E8M0, {1, 1});
  add("layers.0.ffn.experts.0.w1.weight", DType::I8, {8, 8});
  add("layers.0.ffn.experts.0.w1.scale", DType::F8_E8M0, {8, 1});
  add("norm.weight", DType::BF16, {16});
  add("embed.weight", DType::F32, {4, 4});
  add("packed", DType::F4, {6});
  add("empty", DType::F16, {0});
  writer.set_metadata("format", "pt");

  const fs::path path = fs::temp_directory_path() / ("dsv4-fuzz-seed-" + std::to_string(::getpid()) + ".safetensors");
  writer.write(path.string());
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  fs::remove(path);
  return bytes;
}

uint64_t read_length(const std::vector<uint8_t>& image) {
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | image[i];
  return length;
}

void write_length(std::vector<uint8_t>& image, uint64_t length) {
  for (int i = 0; i < 8; ++i) image[i] = static_cast<uint8_t>(length >> (8 * i));
}

struct Outcome {
  size_t accepted = 0;
  size_t rejected = 0;
  uint64_t checksum = 0;  // of every accepted byte, so the reads cannot be optimised away
};

// Opens the image and checks that whatever it accepts is safe to read.
void open_and_check(const std::vector<uint8_t>& mutated, Outcome& outcome) {
  // An exact-size allocation: one byte past it is a heap overflow ASan reports.
  std::vector<uint8_t> exact(mutated.begin(), mutated.end());
  const uint8_t* begin = exact.data();
  const uint8_t* end = begin + exact.size();
  std::shared_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::from_bytes(std::move(exact), kLabel);
  } catch (const Error& e) {
    ++outcome.rejected;
    ASSERT_NE(std::string(e.what()).find(kLabel), std::string::npos) << e.what();
    return;
  }
  ++outcome.accepted;
  const uint8_t* data_begin = begin + 8 + file->header_bytes();
  size_t covered = 0;
  for (const TensorView& view : file->tensors()) {
    ASSERT_EQ(tensor_byte_size(view.dtype, view.shape), view.bytes) << view.name;
    ASSERT_GE(view.data, data_begin) << view.name;
    ASSERT_LE(view.data + view.bytes, end) << view.name;
    for (size_t i = 0; i < view.bytes; ++i) outcome.checksum += view.data[i];
    covered += view.bytes;
  }
  ASSERT_EQ(covered, static_cast<size_t>(end - data_begin));
}

// Byte-level noise on the header and the length field.
void mutate_bytes(std::vector<uint8_t>& image, std::mt19937_64& rng) {
  static constexpr std::string_view kInteresting = "{}[]\",:0123456789-+.eE \\u\xff\x7f";
  const int mutations = 1 + static_cast<int>(rng() % 4);
  for (int m = 0; m < mutations; ++m) {
    const size_t header_end = 8 + std::min<uint64_t>(read_length(image), image.size() - 8);
    const size_t position = rng() % header_end;
    switch (rng() % 7) {
      case 0:
        image[position] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1:
        image[position] = static_cast<uint8_t>(rng());
        break;
      case 2:
        image[position] = static_cast<uint8_t>(kInteresting[rng() % kInteresting.size()]);
        break;
      case 3:  // insert or delete a header byte, keeping the length field in step
        if (rng() % 2 == 0) {
          image.insert(image.begin() + static_cast<ptrdiff_t>(std::max<size_t>(position, 8)),
                       static_cast<uint8_t>(kInteresting[rng() % kInteresting.size()]));
          write_length(image, read_length(image) + 1);
        } else if (position >= 8 && image.size() > 9) {
          image.erase(image.begin() + static_cast<ptrdiff_t>(position));
          write_length(image, read_length(image) - 1);
        }
        break;
      case 4: {
        static constexpr std::array<uint64_t, 8> kLengths = {0, 1, 2, 7, 8, 0x7fffffffffffffff, ~uint64_t{0},
                                                             uint64_t{1} << 32};
        write_length(image, rng() % 2 ? kLengths[rng() % kLengths.size()] : image.size() - 8 - rng() % 16);
        break;
      }
      case 5:
        write_length(image, read_length(image) + (rng() % 2 ? 1 : -1) * static_cast<int64_t>(rng() % 9));
        break;
      default:  // truncate anywhere
        image.resize(rng() % (image.size() + 1));
        if (image.size() < 8) return;
        break;
    }
  }
}

// Token-level edits that keep the JSON mostly well-formed, so mutations reach the span and size checks.
void mutate_tokens(std::vector<uint8_t>& image, std::mt19937_64& rng) {
  static const std::array<std::string, 16> kNumbers = {"0",  "1", "3", "4", "8", "-1", "1.5", "1e3", "65536", "256",
                                                       "18446744073709551615", "18446744073709551616",
                                                       "9223372036854775807", "4294967296", "07", "true"};
  static const std::array<std::string, 9> kStrings = {"\"F4\"", "\"F6_E2M3\"", "\"F64\"",  "\"BOOL\"", "\"F8_E8M0\"",
                                                      "\"C64\"", "\"X\"",        "\"\"",     "\"__metadata__\""};
  const uint64_t length = read_length(image);
  std::string header(image.begin() + 8, image.begin() + 8 + static_cast<ptrdiff_t>(length));
  std::vector<uint8_t> data(image.begin() + 8 + static_cast<ptrdiff_t>(length), image.end());
  const int edits = 1 + static_cast<int>(rng() % 3);
  for (int e = 0; e < edits; ++e) {
    const size_t start = rng() % header.size();
    if (rng() % 3 != 0) {  // replace the number at or after `start`
      const size_t digit = header.find_first_of("0123456789", start);
      if (digit == std::string::npos) continue;
      const size_t digits_end = header.find_first_not_of("0123456789", digit);
      header.replace(digit, digits_end - digit, kNumbers[rng() % kNumbers.size()]);
    } else {  // replace the quoted string at or after `start`
      const size_t open = header.find('"', start);
      if (open == std::string::npos) continue;
      const size_t close = header.find('"', open + 1);
      if (close == std::string::npos) continue;
      header.replace(open, close - open + 1, kStrings[rng() % kStrings.size()]);
    }
  }
  if (rng() % 4 == 0) {
    for (size_t extra = rng() % 9; extra > 0; --extra) data.push_back(0x5a);
  }
  if (rng() % 4 == 0) data.resize(data.size() - std::min<size_t>(data.size(), rng() % 9));
  image.assign(8, 0);
  write_length(image, header.size());
  image.insert(image.end(), header.begin(), header.end());
  image.insert(image.end(), data.begin(), data.end());
}

// Edits of whole entries that keep each one self-consistent (span length = shape x dtype), so the mutations reach
// the overlap, gap and tail checks that come after the per-entry ones.
void mutate_entries(std::vector<uint8_t>& image, std::mt19937_64& rng) {
  const uint64_t length = read_length(image);
  nlohmann::ordered_json header = nlohmann::ordered_json::parse(image.begin() + 8, image.begin() + 8 + length);
  std::vector<uint8_t> data(image.begin() + 8 + static_cast<ptrdiff_t>(length), image.end());
  std::vector<std::string> names;
  for (const auto& [name, _] : header.items()) {
    if (name != "__metadata__") names.push_back(name);
  }
  const int edits = 1 + static_cast<int>(rng() % 2);
  for (int e = 0; e < edits; ++e) {
    auto& entry = header[names[rng() % names.size()]];
    auto& other = header[names[rng() % names.size()]];
    const uint64_t begin = entry["data_offsets"][0];
    const uint64_t end = entry["data_offsets"][1];
    switch (rng() % 5) {
      case 0: {  // slide the span, keeping its length
        const int64_t shift = static_cast<int64_t>(rng() % 17) - 8;
        const uint64_t new_begin = shift < 0 && static_cast<uint64_t>(-shift) > begin ? 0 : begin + shift;
        entry["data_offsets"] = {new_begin, new_begin + (end - begin)};
        break;
      }
      case 1:  // two entries trade places
        std::swap(entry["data_offsets"], other["data_offsets"]);
        break;
      case 2:  // alias another tensor's bytes
        entry["data_offsets"] = other["data_offsets"];
        entry["shape"] = other["shape"];
        entry["dtype"] = other["dtype"];
        break;
      case 3:  // same bytes, another layout
        entry["shape"] = {(end - begin)};
        entry["dtype"] = "U8";
        break;
      default: {  // a second name for an existing tensor (copied first: inserting may move `entry`)
        const nlohmann::ordered_json copy = entry;
        header["alias." + std::to_string(rng() % 4)] = copy;
        break;
      }
    }
  }
  if (rng() % 3 == 0) data.resize(data.size() - std::min<size_t>(data.size(), rng() % 9));
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  image.assign(8, 0);
  write_length(image, text.size());
  image.insert(image.end(), text.begin(), text.end());
  image.insert(image.end(), data.begin(), data.end());
}

TEST(SafetensorsFuzz, CorruptedImagesNeverCrashOrReadOutOfBounds) {
  const auto started = std::chrono::steady_clock::now();
  const std::vector<uint8_t> image = valid_image();
  Outcome outcome;
  open_and_check(image, outcome);
  ASSERT_EQ(outcome.accepted, 1u) << "the unmutated image must open";

  Outcome truncations;
  for (size_t size = 0; size < image.size(); ++size) {
    open_and_check(std::vector<uint8_t>(image.begin(), image.begin() + static_cast<ptrdiff_t>(size)), truncations);
  }
  EXPECT_EQ(truncations.accepted, 0u) << "every proper prefix of a file is missing bytes";

  std::mt19937_64 rng(20240531);
  Outcome byte_mutations;
  for (int i = 0; i < 4000; ++i) {
    std::vector<uint8_t> mutated = image;
    mutate_bytes(mutated, rng);
    open_and_check(mutated, byte_mutations);
  }
  Outcome token_mutations;
  for (int i = 0; i < 4000; ++i) {
    std::vector<uint8_t> mutated = image;
    mutate_tokens(mutated, rng);
    open_and_check(mutated, token_mutations);
  }
  Outcome entry_mutations;
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> mutated = image;
    mutate_entries(mutated, rng);
    open_and_check(mutated, entry_mutations);
  }
  // Both outcomes must occur, or the mutations are not exercising the validator.
  EXPECT_GT(byte_mutations.rejected, 1000u);
  EXPECT_GT(token_mutations.rejected, 1000u);
  EXPECT_GT(entry_mutations.rejected, 1000u);
  EXPECT_GT(byte_mutations.accepted + token_mutations.accepted + entry_mutations.accepted, 10u);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::printf("truncations: %zu rejected; accepted / rejected: bytes %zu / %zu, tokens %zu / %zu, entries %zu / %zu;"
              " %.2f s\n",
              truncations.rejected, byte_mutations.accepted, byte_mutations.rejected, token_mutations.accepted,
              token_mutations.rejected, entry_mutations.accepted, entry_mutations.rejected, seconds);
}

TEST(SafetensorsFuzz, MappedTruncationsAreRejected) {
  const std::vector<uint8_t> image = valid_image();
  const fs::path path = fs::temp_directory_path() / ("dsv4-fuzz-mapped-" + std::to_string(::getpid()) + ".safetensors");
  for (size_t size = 0; size < image.size(); size += 13) {
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(size));
    }
    try {
      SafetensorsFile::open(path.string());
      ADD_FAILURE() << "accepted a file truncated to " << size << " bytes";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    }
  }
  fs::remove(path);
}

}  // namespace
}  // namespace dsv4
