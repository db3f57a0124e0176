// UTF-8 validation (exhaustive over all 1-3 byte inputs and every code point) and the streaming decoder, which
// must emit only complete UTF-8 and add up to exactly what Tokenizer::decode returns.
#include "tokenizer/streaming_decoder.hpp"

#include "core/error.hpp"
#include "tokenizer/bpe_tokenizer.hpp"
#include "tokenizer/utf8.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {

using Ids = std::vector<int32_t>;

std::string encode_code_point(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// Reference validity: decode each sequence by its bit pattern, then reject overlong forms, surrogates and
// values above U+10FFFF.
bool reference_valid(const std::string& bytes) {
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    const auto lead = static_cast<unsigned char>(bytes[pos]);
    int length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
    if (length == 0 || pos + length > bytes.size()) return false;
    uint32_t cp = length == 1 ? lead : lead & (0x7F >> length);
    for (int i = 1; i < length; ++i) {
      const auto byte = static_cast<unsigned char>(bytes[pos + i]);
      if ((byte & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (byte & 0x3F);
    }
    const uint32_t min_for_length[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for_length[length] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    pos += length;
  }
  return true;
}

TEST(Utf8, EveryCodePointIsValidAndSurrogatesAreNot) {
  for (uint32_t cp = 0; cp <= 0x10FFFF; ++cp) {
    const std::string bytes = encode_code_point(cp);
    const bool surrogate = cp >= 0xD800 && cp <= 0xDFFF;
    ASSERT_EQ(dsv4::utf8::find_invalid(bytes).has_value(), surrogate) << "U+" << std::hex << cp;
  }
}

TEST(Utf8, AllShortByteStringsAgreeWithTheReference) {
  std::string bytes;
  for (uint32_t value = 0; value < (1u << 24); ++value) {
    for (int length = 1; length <= 3; ++length) {
      if (length < 3 && (value >> (8 * length)) != 0) continue;
      bytes.clear();
      for (int i = length - 1; i >= 0; --i) bytes += static_cast<char>((value >> (8 * i)) & 0xFF);
      const bool valid = !dsv4::utf8::find_invalid(bytes).has_value();
      if (valid != reference_valid(bytes)) {
        FAIL() << "length " << length << " value 0x" << std::hex << value << ": got valid=" << valid;
      }
    }
  }
}

TEST(Utf8, LossyReplacesEachMaximalIllFormedSubpart) {
  // Unicode's "U+FFFD substitution of maximal subparts" examples (also what Python and Rust produce).
  EXPECT_EQ(dsv4::utf8::to_lossy("a\x80" "b"), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(dsv4::utf8::to_lossy("\xE2\x82"), "\xEF\xBF\xBD");                 // truncated: one U+FFFD
  EXPECT_EQ(dsv4::utf8::to_lossy("\xE2\x82" "A"), "\xEF\xBF\xBD" "A");
  EXPECT_EQ(dsv4::utf8::to_lossy("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");    // C0 never starts a sequence
  EXPECT_EQ(dsv4::utf8::to_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(dsv4::utf8::to_lossy("\xF0\x9F\x98" "\xF0\x9F\x98\x80"), "\xEF\xBF\xBD\xF0\x9F\x98\x80");
  const std::string message = [] {
    try {
      dsv4::utf8::validate("abc\xFF", "prompt");
    } catch (const dsv4::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_EQ(message, "prompt: invalid UTF-8 at byte offset 3 (0xFF)");
}

// Byte-level tokenizer whose id b is the single byte b: random ids are then random bytes.
dsv4::Tokenizer byte_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  int extra = 0x100;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    vocab[encode_code_point(printable ? b : extra++)] = b;
  }
  const nlohmann::json json = {
      {"added_tokens", {{{"id", 256}, {"content", "<eos>"}, {"special", true}}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return dsv4::Tokenizer::from_json(json.dump());
}

TEST(StreamingDecoder, HoldsSplitCharactersUntilComplete) {
  const dsv4::Tokenizer tokenizer = byte_tokenizer();
  dsv4::StreamingDecoder decoder(tokenizer);
  EXPECT_EQ(decoder.push('h'), "h");
  EXPECT_EQ(decoder.push(0xF0), "");  // U+1F600 arrives one byte at a time
  EXPECT_EQ(decoder.push(0x9F), "");
  EXPECT_EQ(decoder.push(0x98), "");
  EXPECT_EQ(decoder.pending_bytes(), 3u);
  EXPECT_EQ(decoder.push(0x80), "\xF0\x9F\x98\x80");
  EXPECT_EQ(decoder.push(0xE4), "");
  EXPECT_EQ(decoder.push('x'), "\xEF\xBF\xBDx");  // the sequence broke off: U+FFFD, then the ASCII
  EXPECT_EQ(decoder.push(0xE4), "");
  EXPECT_EQ(decoder.finish(), "\xEF\xBF\xBD");  // unfinished at the end
  EXPECT_EQ(decoder.pending_bytes(), 0u);
  EXPECT_THROW(decoder.push(257), dsv4::Error);
  EXPECT_THROW(decoder.push(Ids{'a', -3}), dsv4::Error);
  EXPECT_EQ(decoder.push(Ids{'o', 'k', 256}), "ok<eos>");
  dsv4::StreamingDecoder skipping(tokenizer, /*skip_special=*/true);
  EXPECT_EQ(skipping.push(Ids{'o', 256, 'k'}), "ok");
}

TEST(StreamingDecoder, RandomStreamsAddUpToDecode) {
  const dsv4::Tokenizer tokenizer = byte_tokenizer();
  std::mt19937 rng(7);
  // Bytes drawn mostly from UTF-8 lead and continuation ranges, so sequences often complete, break or truncate.
  const std::vector<int32_t> pool = {'a', ' ', 0x80, 0x9F, 0xBF, 0xC2, 0xC3, 0xE0, 0xE4, 0xED, 0xEF, 0xF0, 0xF4,
                                     0xF5, 0xFF, 0xA0, 0x8F, 0x90, 256};
  for (int trial = 0; trial < 5000; ++trial) {
    Ids ids(rng() % 16);
    for (int32_t& id : ids) id = pool[rng() % pool.size()];
    dsv4::StreamingDecoder decoder(tokenizer);
    std::string streamed;
    for (const int32_t id : ids) {
      const std::string piece = decoder.push(id);
      ASSERT_FALSE(dsv4::utf8::find_invalid(piece).has_value());
      EXPECT_LE(decoder.pending_bytes(), 3u);
      streamed += piece;
    }
    streamed += decoder.finish();
    ASSERT_EQ(streamed, tokenizer.decode(ids)) << "trial " << trial;
  }
}

}  // namespace
