// When generation ends and what text may be streamed: stop token ids and max_tokens (StopCondition), stop strings
// over the detokenized stream (StopStringMatcher), and the OpenAI finish_reason they produce.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

enum class FinishReason : uint8_t {
  Stop,    // a stop token id (the model's EOS included) or a stop string
  Length,  // max_tokens generated, or the context is full
  Abort,   // the client cancelled the request
};

// The OpenAI / vLLM spelling: "stop", "length", "abort".
std::string_view to_string(FinishReason reason);

// Stop token ids and the token budget. The caller adds the model's EOS ids to the request's stop_token_ids.
class StopCondition {
 public:
  // max_tokens: none = no limit here (the context limit still applies); otherwise >= 1.
  StopCondition(std::vector<int32_t> stop_token_ids, std::optional<int32_t> max_tokens);

  // Call after appending each generated token; generated_count counts it. A stop token wins over the length limit
  // when both hold (as in vLLM). The stop token itself stays in the output ids; it is not detokenized as text.
  std::optional<FinishReason> check(int32_t token, int64_t generated_count) const;

 private:
  std::vector<int32_t> stop_token_ids_;  // sorted, for binary search
  std::optional<int32_t> max_tokens_;
};

// Finds stop strings in streamed text. push() takes each new piece of detokenized text and returns what may be sent
// to the client now: text that cannot be part of a stop string. A suffix that is still the start of some stop string
// is held back until later text decides it. On a match, the text is cut just before the stop string (OpenAI: the
// stop string is not returned) and the matcher reports which one matched.
//
// The match is the one that ends earliest in the stream; among stop strings ending at the same byte, the one that
// starts earliest (the longest). This depends only on the text, never on how it was split into pieces. Matching is
// on bytes, so any UTF-8 stop string works; held-back text always starts at a character boundary because a UTF-8
// stop string starts with a lead byte.
class StopStringMatcher {
 public:
  struct Output {
    std::string text;                    // safe to emit now
    std::optional<size_t> matched_stop;  // index into the stop strings when one matched; the stream then ends
  };

  // Throws dsv4::Error on an empty stop string. With no stop strings every push() returns its input.
  explicit StopStringMatcher(std::vector<std::string> stop_strings);

  // Throws dsv4::Error when called after a match.
  Output push(std::string_view delta);
  // At the end of generation without a match: the held-back text, which is now final.
  std::string flush();

  bool matched() const { return matched_; }
  const std::vector<std::string>& stop_strings() const { return stop_strings_; }

 private:
  std::vector<std::string> stop_strings_;
  std::string held_;  // text withheld because it may begin a stop string; never contains a complete one
  bool matched_ = false;
};

}  // namespace dsv4
