#include "tokenizer/chat_output_parser.hpp"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

namespace dsv4 {
namespace {

namespace tok = chat_tokens;

// The encoder writes a blank line before the block; a block without it is accepted too.
constexpr std::string_view TOOL_CALLS_AFTER_BLANK_LINE = "\n\n<｜DSML｜tool_calls>";
// Any DSML tag, where parsing resumes after unexpected text inside a tool-call block.
constexpr std::string_view DSML_OPEN_TAG = "<｜DSML｜";
constexpr std::string_view DSML_CLOSE_TAG = "</｜DSML｜";

constexpr std::array<std::string_view, 4> REASONING_MARKERS = {tok::THINK_END, TOOL_CALLS_AFTER_BLANK_LINE,
                                                               tok::TOOL_CALLS_START, tok::END_OF_SENTENCE};
constexpr std::array<std::string_view, 3> CONTENT_MARKERS = {TOOL_CALLS_AFTER_BLANK_LINE, tok::TOOL_CALLS_START,
                                                             tok::END_OF_SENTENCE};
constexpr std::array<std::string_view, 3> TOOL_CALLS_BLOCK_TAGS = {tok::INVOKE_START, tok::TOOL_CALLS_END,
                                                                   tok::END_OF_SENTENCE};
constexpr std::array<std::string_view, 4> INVOKE_TAGS = {tok::PARAMETER_START, tok::INVOKE_END, tok::TOOL_CALLS_END,
                                                         tok::END_OF_SENTENCE};
constexpr std::array<std::string_view, 3> RESYNC_TAGS = {DSML_OPEN_TAG, DSML_CLOSE_TAG, tok::END_OF_SENTENCE};

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }

// Length of the longest tail of `text` that is a proper prefix of some marker (it may still become that marker).
template <size_t N>
size_t marker_prefix_tail(std::string_view text, const std::array<std::string_view, N>& markers) {
  size_t longest = 0;
  for (const std::string_view marker : markers) {
    for (size_t length = std::min(text.size(), marker.size() - 1); length > longest; --length) {
      if (text.substr(text.size() - length) == marker.substr(0, length)) {
        longest = length;
        break;
      }
    }
  }
  return longest;
}

// True when `text` is a proper prefix of some marker.
template <size_t N>
bool is_marker_prefix(std::string_view text, const std::array<std::string_view, N>& markers) {
  return std::any_of(markers.begin(), markers.end(), [&](std::string_view marker) {
    return text.size() < marker.size() && marker.substr(0, text.size()) == text;
  });
}

// Bytes at the end of `text` that start a UTF-8 character whose continuation bytes have not arrived yet.
size_t incomplete_utf8_tail(std::string_view text) {
  for (size_t back = 1; back <= std::min<size_t>(3, text.size()); ++back) {
    const auto byte = static_cast<unsigned char>(text[text.size() - back]);
    if ((byte & 0xC0) == 0x80) continue;  // continuation byte: look further back for the lead byte
    const size_t length = byte >= 0xF0 ? 4 : byte >= 0xE0 ? 3 : byte >= 0xC0 ? 2 : 1;
    return length > back ? back : 0;
  }
  return 0;
}

struct MarkerMatch {
  size_t position;
  std::string_view marker;
};

template <size_t N>
std::optional<MarkerMatch> find_first_marker(std::string_view text, const std::array<std::string_view, N>& markers) {
  std::optional<MarkerMatch> first;
  for (const std::string_view marker : markers) {
    const size_t position = text.find(marker);
    if (position != std::string_view::npos && (!first || position < first->position)) first = {position, marker};
  }
  return first;
}

// The value of key="…" in a tag's attribute text, e.g. read_attribute(` name="x" string="true"`, "name") == "x";
// the value runs to the last quote when it is the last attribute, so names may themselves hold quotes.
std::optional<std::string> read_attribute(std::string_view attributes, std::string_view key, bool is_last) {
  const std::string opening = std::string(key) + "=\"";
  for (size_t at = attributes.find(opening); at != std::string_view::npos; at = attributes.find(opening, at + 1)) {
    if (at > 0 && !is_space(attributes[at - 1])) continue;
    const size_t value_start = at + opening.size();
    const size_t value_end = is_last ? attributes.rfind('"') : attributes.find('"', value_start);
    if (value_end == std::string_view::npos || value_end < value_start) return std::nullopt;
    return std::string(attributes.substr(value_start, value_end - value_start));
  }
  return std::nullopt;
}

struct ParameterTag {
  std::optional<std::string> name;
  std::optional<std::string> string_flag;  // "true", "false" or whatever else was written
  std::string_view value;
};

// Splits the text between `<｜DSML｜parameter` and `</｜DSML｜parameter>`, normally
// ` name="NAME" string="true|false">VALUE`. The name ends where `" string="true|false">` first appears, so names
// and values may contain quotes and `>`; without that pattern the tag ends at the first `>`.
ParameterTag split_parameter(std::string_view text) {
  size_t flag_at = std::string_view::npos;
  std::string_view flag_pattern;
  for (const std::string_view pattern :
       {std::string_view("\" string=\"true\">"), std::string_view("\" string=\"false\">")}) {
    const size_t at = text.find(pattern);
    if (at < flag_at) {
      flag_at = at;
      flag_pattern = pattern;
    }
  }
  if (flag_at != std::string_view::npos) {
    const std::string_view attributes = text.substr(0, flag_at + 1);
    return {.name = read_attribute(attributes, "name", /*is_last=*/true),
            .string_flag = std::string(flag_pattern.substr(10, flag_pattern.size() - 12)),
            .value = text.substr(flag_at + flag_pattern.size())};
  }
  const size_t tag_end = std::min(text.find('>'), text.size());
  const std::string_view attributes = text.substr(0, tag_end);
  return {.name = read_attribute(attributes, "name", /*is_last=*/false),
          .string_flag = read_attribute(attributes, "string", /*is_last=*/false),
          .value = text.substr(std::min(tag_end + 1, text.size()))};
}

void append_json_string(std::string& out, std::string_view text) {
  out += dump_json_like_python(nlohmann::ordered_json(std::string(text)));
}

}  // namespace

ParsedCompletion parse_completion(std::string_view text, ChatMode mode) {
  ChatStreamParser parser(mode);
  parser.feed(text);
  parser.finish();
  return parser.result();
}

ChatStreamParser::ChatStreamParser(ChatMode mode)
    : state_(mode == ChatMode::Thinking ? State::Reasoning : State::Content) {}

ChatStreamDelta ChatStreamParser::feed(std::string_view text) {
  ChatStreamDelta delta;
  if (state_ == State::Done) {
    if (result_.finished && !text.empty()) note("text after <｜end▁of▁sentence｜> was ignored");
    return delta;
  }
  pending_ += text;
  run(delta, /*at_end=*/false);
  return delta;
}

ChatStreamDelta ChatStreamParser::finish() {
  ChatStreamDelta delta;
  if (state_ == State::Done) return delta;
  run(delta, /*at_end=*/true);
  if (state_ == State::Reasoning || state_ == State::ToolCallsBlock || state_ == State::Invoke) {
    result_.truncated = true;
    note(state_ == State::Reasoning ? "the reasoning never ended (no </think>)"
                                    : "the tool-call block never ended (no </｜DSML｜tool_calls>)");
  }
  pending_.clear();
  state_ = State::Done;
  return delta;
}

void ChatStreamParser::run(ChatStreamDelta& delta, bool at_end) {
  for (bool progressed = true; progressed;) {
    switch (state_) {
      case State::Reasoning:
      case State::Content: progressed = step_text(delta, at_end); break;
      case State::AfterToolCalls: progressed = step_after_tool_calls(at_end); break;
      case State::ToolCallsBlock: progressed = step_tool_calls_block(at_end); break;
      case State::Invoke: progressed = step_invoke(delta, at_end); break;
      case State::Done:
        if (!pending_.empty()) note("text after <｜end▁of▁sentence｜> was ignored");
        pending_.clear();
        progressed = false;
        break;
    }
  }
}

bool ChatStreamParser::step_text(ChatStreamDelta& delta, bool at_end) {
  const bool reasoning = state_ == State::Reasoning;
  const std::optional<MarkerMatch> match =
      reasoning ? find_first_marker(pending_, REASONING_MARKERS) : find_first_marker(pending_, CONTENT_MARKERS);
  size_t emit_length = pending_.size();
  if (match) {
    emit_length = match->position;
  } else if (!at_end) {
    const size_t marker_tail =
        reasoning ? marker_prefix_tail(pending_, REASONING_MARKERS) : marker_prefix_tail(pending_, CONTENT_MARKERS);
    emit_length -= std::max(marker_tail, incomplete_utf8_tail(pending_));
  }
  const std::string_view emitted = std::string_view(pending_).substr(0, emit_length);
  (reasoning ? delta.reasoning_content : delta.content) += emitted;
  (reasoning ? result_.reasoning_content : result_.content) += emitted;
  if (!match) {
    pending_.erase(0, emit_length);
    return false;
  }
  pending_.erase(0, match->position + match->marker.size());
  if (match->marker == tok::THINK_END) {
    state_ = State::Content;
  } else if (match->marker == tok::END_OF_SENTENCE) {
    end_of_sentence(reasoning ? "the completion ended inside the reasoning (no </think>)" : "");
  } else {
    if (reasoning) note("tool calls started inside the reasoning (no </think>)");
    state_ = State::ToolCallsBlock;
  }
  return true;
}

bool ChatStreamParser::step_after_tool_calls(bool at_end) {
  const size_t spaces = std::find_if_not(pending_.begin(), pending_.end(), is_space) - pending_.begin();
  pending_.erase(0, spaces);
  if (pending_.empty()) return false;
  if (pending_.starts_with(tok::END_OF_SENTENCE)) {
    pending_.erase(0, tok::END_OF_SENTENCE.size());
    end_of_sentence("");
    return true;
  }
  if (pending_.starts_with(tok::TOOL_CALLS_START)) {
    pending_.erase(0, tok::TOOL_CALLS_START.size());
    state_ = State::ToolCallsBlock;
    return true;
  }
  constexpr std::array<std::string_view, 2> expected = {tok::END_OF_SENTENCE, tok::TOOL_CALLS_START};
  if (is_marker_prefix(pending_, expected)) {
    if (at_end) pending_.clear();  // a tag cut off by the end of the text
    return false;
  }
  note("text after the tool-call block was kept as content");
  state_ = State::Content;
  return true;
}

bool ChatStreamParser::step_tool_calls_block(bool at_end) {
  const size_t spaces = std::find_if_not(pending_.begin(), pending_.end(), is_space) - pending_.begin();
  pending_.erase(0, spaces);
  if (pending_.empty()) return false;
  if (pending_.starts_with(tok::INVOKE_START)) {
    const size_t tag_end = pending_.find('>', tok::INVOKE_START.size());
    if (tag_end == std::string::npos) return false;
    const std::string_view attributes =
        std::string_view(pending_).substr(tok::INVOKE_START.size(), tag_end - tok::INVOKE_START.size());
    std::optional<std::string> name = read_attribute(attributes, "name", /*is_last=*/true);
    if (!name) note("a tool call without name=\"…\" was skipped");
    invoke_named_ = name.has_value();
    invoke_name_ = name.value_or("");
    invoke_parameter_names_.clear();
    invoke_arguments_.clear();
    pending_.erase(0, tag_end + 1);
    state_ = State::Invoke;
    return true;
  }
  if (pending_.starts_with(tok::TOOL_CALLS_END)) {
    pending_.erase(0, tok::TOOL_CALLS_END.size());
    state_ = State::AfterToolCalls;
    return true;
  }
  if (pending_.starts_with(tok::END_OF_SENTENCE)) {
    pending_.erase(0, tok::END_OF_SENTENCE.size());
    end_of_sentence("the completion ended inside the tool-call block");
    return true;
  }
  if (is_marker_prefix(pending_, TOOL_CALLS_BLOCK_TAGS)) {
    if (at_end) pending_.clear();  // a tag cut off by the end of the text
    return false;
  }
  return skip_unexpected_text(at_end);
}

bool ChatStreamParser::step_invoke(ChatStreamDelta& delta, bool at_end) {
  const size_t spaces = std::find_if_not(pending_.begin(), pending_.end(), is_space) - pending_.begin();
  pending_.erase(0, spaces);
  if (pending_.empty()) return false;
  if (pending_.starts_with(tok::PARAMETER_START)) {
    // Long values arrive over many deltas: resume the search where the last one stopped.
    const size_t scan_from = std::max(tok::PARAMETER_START.size(), parameter_scanned_);
    const size_t value_end = pending_.find(tok::PARAMETER_END, scan_from);
    const size_t sentence_end = pending_.find(tok::END_OF_SENTENCE, scan_from);
    if (sentence_end != std::string::npos && (value_end == std::string::npos || sentence_end < value_end)) {
      pending_.erase(0, sentence_end + tok::END_OF_SENTENCE.size());
      parameter_scanned_ = 0;
      end_of_sentence("the completion ended inside a tool-call parameter");
      return true;
    }
    if (value_end == std::string::npos) {
      const size_t longest_marker = std::max(tok::PARAMETER_END.size(), tok::END_OF_SENTENCE.size());
      parameter_scanned_ = std::max(scan_from, pending_.size() - std::min(pending_.size(), longest_marker - 1));
      return false;
    }
    parameter_scanned_ = 0;
    const ParameterTag parameter = split_parameter(
        std::string_view(pending_).substr(tok::PARAMETER_START.size(), value_end - tok::PARAMETER_START.size()));
    add_parameter(parameter.name, parameter.string_flag, parameter.value);
    pending_.erase(0, value_end + tok::PARAMETER_END.size());
    return true;
  }
  if (pending_.starts_with(tok::INVOKE_END)) {
    pending_.erase(0, tok::INVOKE_END.size());
    complete_invoke(delta);
    state_ = State::ToolCallsBlock;
    return true;
  }
  if (pending_.starts_with(tok::TOOL_CALLS_END)) {
    pending_.erase(0, tok::TOOL_CALLS_END.size());
    note("a tool call was closed by </｜DSML｜tool_calls> without </｜DSML｜invoke>");
    complete_invoke(delta);
    state_ = State::AfterToolCalls;
    return true;
  }
  if (pending_.starts_with(tok::END_OF_SENTENCE)) {
    pending_.erase(0, tok::END_OF_SENTENCE.size());
    end_of_sentence("the completion ended inside a tool call");
    return true;
  }
  if (is_marker_prefix(pending_, INVOKE_TAGS)) {
    if (at_end) pending_.clear();  // a tag cut off by the end of the text
    return false;
  }
  return skip_unexpected_text(at_end);
}

// Drops text that fits no tag of the tool-call grammar, up to the next DSML tag (or end of sentence).
bool ChatStreamParser::skip_unexpected_text(bool at_end) {
  note("unexpected text inside the tool-call block was skipped");
  const std::optional<MarkerMatch> next = find_first_marker(std::string_view(pending_).substr(1), RESYNC_TAGS);
  size_t skipped = pending_.size();
  if (next) {
    skipped = next->position + 1;
  } else if (!at_end) {
    skipped -= marker_prefix_tail(pending_, RESYNC_TAGS);
  }
  pending_.erase(0, skipped);
  return skipped > 0;
}

void ChatStreamParser::add_parameter(const std::optional<std::string>& name,
                                     const std::optional<std::string>& string_flag, std::string_view value) {
  if (!name) {
    note("a tool-call parameter without name=\"…\" was skipped");
    return;
  }
  if (std::find(invoke_parameter_names_.begin(), invoke_parameter_names_.end(), *name) !=
      invoke_parameter_names_.end()) {
    note("duplicate tool-call parameter '" + *name + "': the first value was kept");
    return;
  }
  if (string_flag != "true" && string_flag != "false") {
    note("tool-call parameter '" + *name + "' lacks string=\"true|false\": read as a string");
  }
  if (!invoke_arguments_.empty()) invoke_arguments_ += ", ";
  append_json_string(invoke_arguments_, *name);
  invoke_arguments_ += ": ";
  // string="false" values are JSON already and are kept as written (as the reference decoder does).
  const bool json_value = string_flag == "false";
  if (json_value && !nlohmann::ordered_json::accept(value)) {
    note("tool-call parameter '" + *name + "' is marked string=\"false\" but is not JSON: read as a string");
    append_json_string(invoke_arguments_, value);
  } else if (json_value) {
    invoke_arguments_ += value;
  } else {
    append_json_string(invoke_arguments_, value);
  }
  invoke_parameter_names_.push_back(*name);
}

void ChatStreamParser::complete_invoke(ChatStreamDelta& delta) {
  if (!invoke_named_) return;
  ToolCall call{.name = std::move(invoke_name_), .arguments = "{" + invoke_arguments_ + "}"};
  delta.tool_calls.push_back(call);
  result_.tool_calls.push_back(std::move(call));
  invoke_named_ = false;
}

void ChatStreamParser::end_of_sentence(std::string_view problem) {
  if (!problem.empty()) note(std::string(problem));
  result_.finished = true;
  state_ = State::Done;
}

// Problems are recorded once each, so the list does not depend on how the text was split into deltas.
void ChatStreamParser::note(std::string problem) {
  if (std::find(result_.problems.begin(), result_.problems.end(), problem) == result_.problems.end()) {
    result_.problems.push_back(std::move(problem));
  }
}

}  // namespace dsv4
