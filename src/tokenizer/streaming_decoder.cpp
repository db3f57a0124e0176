#include "tokenizer/streaming_decoder.hpp"

#include "tokenizer/utf8.hpp"

namespace dsv4 {

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(&tokenizer), skip_special_(skip_special) {}

std::string StreamingDecoder::push(int32_t id) {
  const std::string& bytes = tokenizer_->token_bytes(id);
  if (skip_special_ && tokenizer_->is_special(id)) return {};
  pending_ += bytes;
  std::string out;
  std::string_view rest = pending_;
  while (!rest.empty()) {
    const utf8::Sequence sequence = utf8::read_sequence(rest);
    // A truncated tail may still be completed by the next token: keep it.
    if (sequence.kind == utf8::Sequence::Kind::kTruncated) break;
    if (sequence.kind == utf8::Sequence::Kind::kValid) {
      out.append(rest.data(), sequence.length);
    } else {
      out.append(utf8::kReplacementCharacter);
    }
    rest.remove_prefix(sequence.length);
  }
  pending_.assign(rest);
  return out;
}

std::string StreamingDecoder::push(std::span<const int32_t> ids) {
  for (const int32_t id : ids) tokenizer_->token_bytes(id);  // reject a bad id before consuming any
  std::string out;
  for (const int32_t id : ids) out += push(id);
  return out;
}

std::string StreamingDecoder::finish() {
  std::string out = utf8::to_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace dsv4
