#include "runtime/stop_condition.hpp"

#include <algorithm>
#include <utility>

#include "core/error.hpp"

namespace dsv4 {

std::string_view to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
  }
  fail("FinishReason: unknown value ", static_cast<int>(reason));
}

StopCondition::StopCondition(std::vector<int32_t> stop_token_ids, std::optional<int32_t> max_tokens)
    : stop_token_ids_(std::move(stop_token_ids)), max_tokens_(max_tokens) {
  if (max_tokens_) dsv4::check(*max_tokens_ >= 1, "StopCondition: max_tokens = ", *max_tokens_, " must be >= 1");
  std::sort(stop_token_ids_.begin(), stop_token_ids_.end());
}

std::optional<FinishReason> StopCondition::check(int32_t token, int64_t generated_count) const {
  if (std::binary_search(stop_token_ids_.begin(), stop_token_ids_.end(), token)) return FinishReason::Stop;
  if (max_tokens_ && generated_count >= *max_tokens_) return FinishReason::Length;
  return std::nullopt;
}

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings) : stop_strings_(std::move(stop_strings)) {
  for (size_t i = 0; i < stop_strings_.size(); ++i) {
    dsv4::check(!stop_strings_[i].empty(), "StopStringMatcher: stop string ", i, " is empty");
  }
}

StopStringMatcher::Output StopStringMatcher::push(std::string_view delta) {
  dsv4::check(!matched_, "StopStringMatcher: push() after a stop string already ended the stream");
  std::string text = std::move(held_);
  held_.clear();
  text.append(delta);

  // held_ never holds a complete stop string, so any occurrence found here ends inside the new text; the first
  // occurrence of each string is also its earliest-ending one.
  size_t best_start = std::string::npos;
  size_t best_end = std::string::npos;
  std::optional<size_t> best_stop;
  for (size_t i = 0; i < stop_strings_.size(); ++i) {
    const size_t start = text.find(stop_strings_[i]);
    if (start == std::string::npos) continue;
    const size_t end = start + stop_strings_[i].size();
    if (end < best_end || (end == best_end && start < best_start)) {
      best_start = start;
      best_end = end;
      best_stop = i;
    }
  }
  if (best_stop) {
    matched_ = true;
    text.resize(best_start);
    return {std::move(text), best_stop};
  }

  // Hold back the longest suffix that is a proper prefix of some stop string: later text may complete it.
  size_t hold = 0;
  const std::string_view view = text;
  for (const std::string& stop : stop_strings_) {
    for (size_t length = std::min(stop.size() - 1, view.size()); length > hold; --length) {
      if (view.ends_with(std::string_view(stop).substr(0, length))) {
        hold = length;
        break;
      }
    }
  }
  held_.assign(view.substr(view.size() - hold));
  text.resize(text.size() - hold);
  return {std::move(text), std::nullopt};
}

std::string StopStringMatcher::flush() { return std::exchange(held_, std::string()); }

}  // namespace dsv4
