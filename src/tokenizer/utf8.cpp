#include "tokenizer/utf8.hpp"

#include "core/error.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace dsv4::utf8 {
namespace {

bool is_continuation(unsigned char byte) { return (byte & 0xC0) == 0x80; }

// Sequence length announced by a lead byte, 0 when the byte cannot start a sequence (C0, C1, F5..FF, 80..BF).
std::size_t lead_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// The second byte's range is narrower after E0, ED, F0 and F4: that is what rules out overlong forms,
// surrogates and code points above U+10FFFF.
bool second_byte_ok(unsigned char lead, unsigned char second) {
  switch (lead) {
    case 0xE0: return second >= 0xA0 && second <= 0xBF;
    case 0xED: return second >= 0x80 && second <= 0x9F;
    case 0xF0: return second >= 0x90 && second <= 0xBF;
    case 0xF4: return second >= 0x80 && second <= 0x8F;
    default: return is_continuation(second);
  }
}

}  // namespace

Sequence read_sequence(std::string_view bytes) {
  const auto lead = static_cast<unsigned char>(bytes[0]);
  const std::size_t length = lead_length(lead);
  if (length == 0) return {Sequence::Kind::kInvalid, 1};
  if (length == 1) return {Sequence::Kind::kValid, 1};
  for (std::size_t i = 1; i < length; ++i) {
    if (i >= bytes.size()) return {Sequence::Kind::kTruncated, i};
    const auto byte = static_cast<unsigned char>(bytes[i]);
    const bool ok = i == 1 ? second_byte_ok(lead, byte) : is_continuation(byte);
    if (!ok) return {Sequence::Kind::kInvalid, i};
  }
  return {Sequence::Kind::kValid, length};
}

std::optional<std::size_t> find_invalid(std::string_view bytes) {
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    // Most prompts are mostly ASCII: skip 8 bytes at a time while no high bit is set.
    while (pos + 8 <= bytes.size()) {
      std::uint64_t word;
      std::memcpy(&word, bytes.data() + pos, 8);
      if (word & 0x8080808080808080ULL) break;
      pos += 8;
    }
    if (pos >= bytes.size()) break;
    const Sequence sequence = read_sequence(bytes.substr(pos));
    if (sequence.kind != Sequence::Kind::kValid) return pos;
    pos += sequence.length;
  }
  return std::nullopt;
}

void validate(std::string_view bytes, std::string_view what) {
  const std::optional<std::size_t> offset = find_invalid(bytes);
  if (!offset) return;
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(static_cast<unsigned char>(bytes[*offset])));
  const bool truncated = read_sequence(bytes.substr(*offset)).kind == Sequence::Kind::kTruncated;
  fail(what, ": invalid UTF-8 at byte offset ", *offset, " (", hex,
       truncated ? ", the text ends inside a multi-byte sequence)" : ")");
}

void append_lossy(std::string_view bytes, std::string& out) {
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    const Sequence sequence = read_sequence(bytes.substr(pos));
    if (sequence.kind == Sequence::Kind::kValid) {
      out.append(bytes.data() + pos, sequence.length);
    } else {
      out.append(kReplacementCharacter);
    }
    pos += sequence.length;
  }
}

std::string to_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  append_lossy(bytes, out);
  return out;
}

}  // namespace dsv4::utf8
