// Parsing DeepSeek-V4 completions back into reasoning_content / content / tool_calls, in one go or while
// streaming.
//
// A completion (the text generated after the prompt of chat_encoding.hpp) reads, in thinking mode,
//   reasoning `</think>` content [`\n\n<｜DSML｜tool_calls>` …DSML invokes… `</｜DSML｜tool_calls>`]
//   [`<｜end▁of▁sentence｜>`]
// and the same without `reasoning </think>` in chat mode (the prompt already closed the thinking).
// The parser never throws: malformed or truncated output yields what could be recovered plus a note in
// `problems`; a tool call is reported only once its `</｜DSML｜invoke>` (or the closing of the block) was seen.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/chat_encoding.hpp"

namespace dsv4 {

struct ToolCall {
  std::string name;
  std::string arguments;  // a JSON object as text, e.g. {"location": "Beijing", "days": 3}

  bool operator==(const ToolCall&) const = default;
};

struct ParsedCompletion {
  std::string reasoning_content;
  std::string content;
  std::vector<ToolCall> tool_calls;
  // The text ended inside the reasoning (no `</think>` in thinking mode) or inside a tool-call block.
  bool truncated = false;
  // `<｜end▁of▁sentence｜>` was seen; anything after it is ignored.
  bool finished = false;
  // Format problems found (empty for well-formed output), each naming what was wrong.
  std::vector<std::string> problems;
};

// Parses a whole completion. In thinking mode the prompt ended with `<think>`, so the text starts inside the
// reasoning.
ParsedCompletion parse_completion(std::string_view text, ChatMode mode);

// What one feed() releases: text that can no longer turn out to be part of a marker, and completed tool calls.
struct ChatStreamDelta {
  std::string reasoning_content;
  std::string content;
  std::vector<ToolCall> tool_calls;

  bool empty() const { return reasoning_content.empty() && content.empty() && tool_calls.empty(); }
};

// Incremental parser: feed text deltas as they are detokenized (any split, even inside a UTF-8 character or a
// marker); it holds back only a tail that may still become a marker (`</think>`, `\n\n<｜DSML｜tool_calls>`,
// `<｜end▁of▁sentence｜>`), an incomplete UTF-8 character, and the inside of a tool-call block until each call
// completes. The concatenated deltas and result() equal parse_completion() of the concatenated text, however the
// text was split.
class ChatStreamParser {
 public:
  explicit ChatStreamParser(ChatMode mode);

  ChatStreamDelta feed(std::string_view text);
  // End of the stream: releases the held-back tail and marks an unfinished reasoning or tool block as truncated.
  ChatStreamDelta finish();

  // Everything parsed so far (complete after finish()).
  const ParsedCompletion& result() const { return result_; }
  // `<｜end▁of▁sentence｜>` was seen; later text is ignored.
  bool finished() const { return result_.finished; }

 private:
  enum class State { Reasoning, Content, ToolCallsBlock, Invoke, AfterToolCalls, Done };

  // Each step consumes from pending_ and returns true, or returns false when it needs more text to decide
  // (at_end: there is no more text, so it decides with what it has).
  void run(ChatStreamDelta& delta, bool at_end);
  bool step_text(ChatStreamDelta& delta, bool at_end);
  bool step_after_tool_calls(bool at_end);
  bool step_tool_calls_block(bool at_end);
  bool step_invoke(ChatStreamDelta& delta, bool at_end);
  bool skip_unexpected_text(bool at_end);
  void add_parameter(const std::optional<std::string>& name, const std::optional<std::string>& string_flag,
                     std::string_view value);
  void complete_invoke(ChatStreamDelta& delta);
  void end_of_sentence(std::string_view problem);
  void note(std::string problem);

  State state_;
  std::string pending_;  // received text not yet consumed
  // While a parameter value is incomplete: how far into pending_ its end has been searched for.
  size_t parameter_scanned_ = 0;
  // The invoke being read.
  std::string invoke_name_;
  bool invoke_named_ = false;
  std::vector<std::string> invoke_parameter_names_;
  std::string invoke_arguments_;  // JSON object members written so far, without the braces
  ParsedCompletion result_;
};

}  // namespace dsv4
