#include "runtime/generation_stream.hpp"

#include <algorithm>

namespace dsv4 {

namespace {

std::vector<int32_t> merged_stop_ids(const SamplingParams& params, std::span<const int32_t> eos_ids) {
  std::vector<int32_t> ids = params.stop_token_ids;
  ids.insert(ids.end(), eos_ids.begin(), eos_ids.end());
  std::sort(ids.begin(), ids.end());
  return ids;
}

}  // namespace

GenerationStream::GenerationStream(const Tokenizer& tokenizer, const SamplingParams& params,
                                   std::span<const int32_t> eos_ids, int32_t vocab_size, TextCallback on_text)
    : stop_ids_(merged_stop_ids(params, eos_ids)),
      stop_(stop_ids_, params.max_tokens),
      stop_strings_(params.stop),
      decoder_(tokenizer),
      sampler_(params, vocab_size),
      on_text_(std::move(on_text)) {}

void GenerationStream::emit(const std::string& text) {
  if (text.empty()) return;
  result_.text += text;
  if (on_text_) on_text_(text);
}

std::optional<FinishReason> GenerationStream::push(int32_t token) {
  result_.tokens.push_back(token);
  // A stop token ends the text without being shown; any other token is text first.
  if (!std::binary_search(stop_ids_.begin(), stop_ids_.end(), token)) {
    StopStringMatcher::Output out = stop_strings_.push(decoder_.push(token));
    emit(out.text);
    if (out.matched_stop) return FinishReason::Stop;
  }
  return stop_.check(token, int64_t(result_.tokens.size()));
}

void GenerationStream::finish(FinishReason reason) {
  if (!stop_strings_.matched()) {
    StopStringMatcher::Output out = stop_strings_.push(decoder_.finish());
    emit(out.text);
    if (out.matched_stop) reason = FinishReason::Stop;
    else emit(stop_strings_.flush());
  }
  result_.finish = reason;
}

}  // namespace dsv4
