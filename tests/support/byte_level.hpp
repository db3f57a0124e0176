// The GPT-2 byte alphabet that byte-level BPE vocabularies are spelled in, written independently of
// src/tokenizer so the tests check the implementation against a second reading of the rule.
#pragma once

#include <array>
#include <string>

namespace dsv4::testing {

// Printable Latin-1 bytes stand for themselves; the other 68 bytes map to U+0100.. in byte order.
inline const std::string& byte_level_spelling(unsigned char byte) {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> spellings;
    int extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const int code = printable ? b : extra++;
      spellings[b] = code < 0x80 ? std::string(1, static_cast<char>(code))
                                 : std::string{static_cast<char>(0xC0 | (code >> 6)),
                                               static_cast<char>(0x80 | (code & 0x3F))};
    }
    return spellings;
  }();
  return table[byte];
}

}  // namespace dsv4::testing
