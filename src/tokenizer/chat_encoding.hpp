// DeepSeek-V4 chat encoding: OpenAI-style messages -> the prompt string the model was trained on.
//
// The output is text with the special tokens spelled out (`<｜User｜>`, `<｜DSML｜`...); the BPE tokenizer turns it
// into ids, matching special tokens first. The rules follow DeepSeek's reference encoder (encoding_dsv4.py) so the
// golden prompts in shared/data/chat-encoding/ come out byte-exact:
//   - `tool` messages become `<tool_result>…</tool_result>` blocks of a user turn, ordered like the calls;
//     consecutive user messages merge into one turn, their parts joined by a blank line.
//   - Thinking mode drops the reasoning of assistant turns before the last user turn (and developer messages
//     before it), unless any message carries tools or drop_thinking is off.
//   - Tool schemas on system/developer messages inject a fixed "## Tools" block; tool calls are written in DSML.
//   - A `task` on a message appends its task token (`action` also opens the assistant turn).
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

namespace dsv4 {

// Special tokens and markers of the DeepSeek-V4 chat format.
namespace chat_tokens {
inline constexpr std::string_view BEGIN_OF_SENTENCE = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view END_OF_SENTENCE = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view USER = "<｜User｜>";
inline constexpr std::string_view ASSISTANT = "<｜Assistant｜>";
inline constexpr std::string_view LATEST_REMINDER = "<｜latest_reminder｜>";
inline constexpr std::string_view THINK_START = "<think>";
inline constexpr std::string_view THINK_END = "</think>";
inline constexpr std::string_view DSML = "｜DSML｜";
inline constexpr std::string_view TOOL_CALLS_START = "<｜DSML｜tool_calls>";
inline constexpr std::string_view TOOL_CALLS_END = "</｜DSML｜tool_calls>";
inline constexpr std::string_view INVOKE_START = "<｜DSML｜invoke";
inline constexpr std::string_view INVOKE_END = "</｜DSML｜invoke>";
inline constexpr std::string_view PARAMETER_START = "<｜DSML｜parameter";
inline constexpr std::string_view PARAMETER_END = "</｜DSML｜parameter>";
}  // namespace chat_tokens

enum class ChatMode { Thinking, Chat };

struct ChatEncodeOptions {
  ChatMode mode = ChatMode::Thinking;
  // nullopt, "high" (adds nothing) or "max" (prepends the maximum-effort instructions; thinking mode only).
  std::optional<std::string> reasoning_effort;
  // Open the assistant turn after a final user/developer message (`<｜Assistant｜><think>` or `…</think>`) and
  // append a final message's task token. Off: the prompt ends with the last message itself.
  bool add_generation_prompt = true;
  // Thinking mode: drop reasoning of assistant turns before the last user turn (ignored when tools are present).
  bool drop_thinking = true;
  // Start with `<｜begin▁of▁sentence｜>`; off when appending to an already encoded conversation.
  bool add_bos_token = true;
};

// Encodes a list of messages. Objects keep their key order (tool schemas and arguments are written in that
// order), hence ordered_json: parse requests with nlohmann::ordered_json::parse.
// Message fields: role (system|user|assistant|tool|developer|latest_reminder), content (string, null, or an array
// of {"type":"text","text":…} parts joined by a blank line), reasoning_content, tool_calls
// [{id?, type?, function{name, arguments (JSON string or object)}}], tool_call_id, tools (system/developer only),
// response_format (system/developer only), task (action|query|authority|domain|title|read_url), wo_eos (assistant:
// leave the turn open, for prefilling). Throws dsv4::Error naming the message index and field on malformed input.
std::string encode_chat(const nlohmann::ordered_json& messages, const ChatEncodeOptions& options = {});

// Encodes a request object {"messages": [...], "tools": [...]?}: top-level tools are attached to the first
// system message (appended to tools it already has), or to a new empty system message inserted first.
std::string encode_chat_request(const nlohmann::ordered_json& request, const ChatEncodeOptions& options = {});

// json.dumps(value, ensure_ascii=False) as Python writes it: ", " and ": " separators, key order kept, non-ASCII
// kept as UTF-8, floats in Python repr form (1.0, 1e-05, 1e+16). The format of tool schemas and DSML values.
std::string dump_json_like_python(const nlohmann::ordered_json& value);

}  // namespace dsv4
