// UTF-8 validation and lossy repair for the tokenizer: prompts must be valid UTF-8 (the error names the byte
// offset), while decoded token bytes may be any bytes and are shown with U+FFFD for what is not UTF-8.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace dsv4::utf8 {

// How one UTF-8 sequence starting at some byte reads (Unicode 15, table 3-7 "well-formed byte sequences").
struct Sequence {
  enum class Kind {
    kValid,      // `length` bytes form one code point
    kInvalid,    // the first `length` bytes (>= 1) are a maximal ill-formed subpart: one U+FFFD replaces them
    kTruncated,  // the input ends after `length` bytes that are a proper prefix of a well-formed sequence
  };
  Kind kind;
  std::size_t length;
};

// Reads the sequence at the start of `bytes` (which must not be empty).
Sequence read_sequence(std::string_view bytes);

// Byte offset of the first byte that does not begin a well-formed sequence (a truncated tail counts), or nullopt.
std::optional<std::size_t> find_invalid(std::string_view bytes);

// Throws dsv4::Error "<what>: invalid UTF-8 at byte offset N (0xXX)" unless `bytes` is valid UTF-8.
void validate(std::string_view bytes, std::string_view what);

// Appends `bytes` to `out`, each maximal ill-formed subpart replaced by U+FFFD (what Rust's from_utf8_lossy and
// Python's errors="replace" produce).
void append_lossy(std::string_view bytes, std::string& out);
std::string to_lossy(std::string_view bytes);

// U+FFFD REPLACEMENT CHARACTER in UTF-8.
inline constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";

}  // namespace dsv4::utf8
