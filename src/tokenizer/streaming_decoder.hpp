// Incremental detokenization for streaming output: feed ids one at a time, get back only complete UTF-8.
// A character split across tokens (common for CJK and emoji in byte-level BPE) is held until its last byte
// arrives, so a terminal or an SSE client never sees half a code point. Bytes that can no longer become valid
// UTF-8 come out as U+FFFD, exactly as Tokenizer::decode would show them: the concatenation of everything
// push() and finish() return equals decode() of all the ids.
#pragma once

#include "tokenizer/bpe_tokenizer.hpp"

#include <cstdint>
#include <span>
#include <string>

namespace dsv4 {

class StreamingDecoder {
 public:
  // `tokenizer` must outlive the decoder. skip_special drops added tokens marked special, as decode() does.
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special = false);

  // Text completed by `id` (possibly empty). dsv4::Error for an id without a token; the state is then unchanged.
  std::string push(int32_t id);
  std::string push(std::span<const int32_t> ids);  // all ids are checked before any is consumed
  // Flushes what is left at the end of the stream: an unfinished character becomes U+FFFD. Resets the decoder.
  std::string finish();
  // Bytes held back waiting for the rest of a character (at most 3).
  std::size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace dsv4
