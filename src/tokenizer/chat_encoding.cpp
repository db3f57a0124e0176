#include "tokenizer/chat_encoding.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string_view>
#include <vector>

#include "core/error.hpp"

namespace dsv4 {
namespace {

using nlohmann::ordered_json;
namespace tok = chat_tokens;

// Fixed texts of the format, as the reference encoder writes them.
constexpr std::string_view REASONING_EFFORT_MAX_PREFIX =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

constexpr std::string_view TOOLS_BLOCK_HEAD =
    "## Tools\n"
    "\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<｜DSML｜tool_calls>\" block like the following:\n"
    "\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n"
    "\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n"
    "\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n"
    "\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n"
    "\n"
    "### Available Tool Schemas\n"
    "\n";

constexpr std::string_view TOOLS_BLOCK_TAIL =
    "\n"
    "\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

constexpr std::string_view RESPONSE_FORMAT_HEAD =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

constexpr std::array<std::pair<std::string_view, std::string_view>, 6> TASK_TOKENS = {{
    {"action", "<｜action｜>"},
    {"query", "<｜query｜>"},
    {"authority", "<｜authority｜>"},
    {"domain", "<｜domain｜>"},
    {"title", "<｜title｜>"},
    {"read_url", "<｜read_url｜>"},
}};

std::string_view task_token(std::string_view task) {
  for (const auto& [name, token] : TASK_TOKENS) {
    if (name == task) return token;
  }
  return {};
}

// ---- Python-compatible JSON text -------------------------------------------------------------------------------

void append_python_string(std::string& out, std::string_view text) {
  out += '"';
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          std::array<char, 8> escaped{};
          std::snprintf(escaped.data(), escaped.size(), "\\u%04x", static_cast<unsigned>(c));
          out += escaped.data();
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

// Python's float repr: the shortest round-trip digits, positional when the decimal exponent is in [-4, 16),
// scientific otherwise with a signed exponent of at least two digits.
void append_python_float(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "NaN";
    return;
  }
  if (std::isinf(value)) {
    out += value < 0 ? "-Infinity" : "Infinity";
    return;
  }
  std::array<char, 64> buffer{};
  const auto result = std::to_chars(buffer.data(), buffer.data() + buffer.size(), value, std::chars_format::scientific);
  const std::string_view scientific(buffer.data(), static_cast<size_t>(result.ptr - buffer.data()));
  const size_t e_pos = scientific.find('e');
  std::string_view mantissa = scientific.substr(0, e_pos);
  int exponent = 0;
  std::from_chars(scientific.data() + e_pos + 1 + (scientific[e_pos + 1] == '+' ? 1 : 0),
                  scientific.data() + scientific.size(), exponent);
  if (!mantissa.empty() && mantissa.front() == '-') {
    out += '-';
    mantissa.remove_prefix(1);
  }
  std::string digits;
  for (const char c : mantissa) {
    if (c != '.') digits += c;
  }
  if (exponent < -4 || exponent >= 16) {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out.append(digits, 1);
    }
    std::array<char, 16> exponent_text{};
    std::snprintf(exponent_text.data(), exponent_text.size(), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exponent_text.data();
  } else if (exponent < 0) {
    out += "0.";
    out.append(static_cast<size_t>(-exponent - 1), '0');
    out += digits;
  } else {
    const size_t integer_digits = static_cast<size_t>(exponent) + 1;
    if (digits.size() <= integer_digits) {
      out += digits;
      out.append(integer_digits - digits.size(), '0');
      out += ".0";
    } else {
      out.append(digits, 0, integer_digits);
      out += '.';
      out.append(digits, integer_digits);
    }
  }
}

void append_python_json(std::string& out, const ordered_json& value) {
  switch (value.type()) {
    case ordered_json::value_t::null: out += "null"; break;
    case ordered_json::value_t::boolean: out += value.get<bool>() ? "true" : "false"; break;
    case ordered_json::value_t::number_integer: out += std::to_string(value.get<std::int64_t>()); break;
    case ordered_json::value_t::number_unsigned: out += std::to_string(value.get<std::uint64_t>()); break;
    case ordered_json::value_t::number_float: append_python_float(out, value.get<double>()); break;
    case ordered_json::value_t::string: append_python_string(out, value.get_ref<const std::string&>()); break;
    case ordered_json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& element : value) {
        if (!first) out += ", ";
        first = false;
        append_python_json(out, element);
      }
      out += ']';
      break;
    }
    case ordered_json::value_t::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, element] : value.items()) {
        if (!first) out += ", ";
        first = false;
        append_python_string(out, key);
        out += ": ";
        append_python_json(out, element);
      }
      out += '}';
      break;
    }
    case ordered_json::value_t::binary:
    case ordered_json::value_t::discarded:
      fail("dump_json_like_python: binary/discarded JSON values have no text form");
  }
}

// ---- Normalized messages ---------------------------------------------------------------------------------------

enum class Role { System, User, Assistant, Developer, LatestReminder };

// One part of a user turn: text, or the result of a tool call (a `tool` message merged into the turn).
struct UserPart {
  bool is_tool_result = false;
  std::string text;
  std::string tool_call_id;
};

struct ToolCallToEncode {
  std::string id;
  std::string name;
  ordered_json arguments;  // an object: parameter name -> value
};

struct Message {
  Role role = Role::User;
  std::string content;          // all roles but user
  std::vector<UserPart> parts;  // user turns only
  std::string reasoning;
  std::vector<ToolCallToEncode> tool_calls;
  std::vector<const ordered_json*> tool_functions;  // the "function" objects of the tools
  const ordered_json* response_format = nullptr;
  std::optional<std::string> task;
  bool without_eos = false;
};

// Reads a content-like field: absent/null -> "", string, or an array of text parts joined by a blank line.
std::string read_text_field(const ordered_json& message, const char* field, size_t index) {
  const auto it = message.find(field);
  if (it == message.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  check(it->is_array(), "chat message ", index, ": '", field,
        "' must be a string, null or an array of text parts, got ", it->type_name());
  std::string joined;
  for (size_t part_idx = 0; part_idx < it->size(); ++part_idx) {
    const auto& part = (*it)[part_idx];
    const bool is_text_part = part.is_object() && part.value("type", std::string{}) == "text" &&
                              part.contains("text") && part["text"].is_string();
    check(is_text_part, "chat message ", index, ": ", field, "[", part_idx,
          "] is not a text part {\"type\":\"text\",\"text\":…} (only text content is supported)");
    if (part_idx > 0) joined += "\n\n";
    joined += part["text"].get<std::string>();
  }
  return joined;
}

std::optional<std::string> read_optional_string(const ordered_json& message, const char* field, size_t index) {
  const auto it = message.find(field);
  if (it == message.end() || it->is_null()) return std::nullopt;
  check(it->is_string(), "chat message ", index, ": '", field, "' must be a string, got ", it->type_name());
  return it->get<std::string>();
}

std::vector<const ordered_json*> read_tools(const ordered_json& tools, size_t index) {
  check(tools.is_array(), "chat message ", index, ": 'tools' must be an array, got ", tools.type_name());
  std::vector<const ordered_json*> functions;
  for (size_t tool_idx = 0; tool_idx < tools.size(); ++tool_idx) {
    const auto& tool = tools[tool_idx];
    const bool has_function = tool.is_object() && tool.contains("function") && tool["function"].is_object();
    check(has_function, "chat message ", index, ": tools[", tool_idx,
          "] must be {\"type\":\"function\",\"function\":{…}}");
    functions.push_back(&tool["function"]);
  }
  return functions;
}

// Arguments as the reference reads them: a JSON object, or a string holding one; a string that is not JSON at all
// becomes the single parameter "arguments".
ordered_json read_tool_arguments(const ordered_json& arguments, size_t index, size_t call_idx) {
  if (arguments.is_object()) return arguments;
  check(arguments.is_string(), "chat message ", index, ": tool_calls[", call_idx,
        "].function.arguments must be a JSON string or an object, got ", arguments.type_name());
  const std::string& text = arguments.get_ref<const std::string&>();
  ordered_json parsed = ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return ordered_json{{"arguments", text}};
  check(parsed.is_object(), "chat message ", index, ": tool_calls[", call_idx,
        "].function.arguments must encode a JSON object, got ", parsed.type_name());
  return parsed;
}

std::vector<ToolCallToEncode> read_tool_calls(const ordered_json& tool_calls, size_t index) {
  check(tool_calls.is_array(), "chat message ", index, ": 'tool_calls' must be an array, got ", tool_calls.type_name());
  std::vector<ToolCallToEncode> calls;
  for (size_t call_idx = 0; call_idx < tool_calls.size(); ++call_idx) {
    const auto& call = tool_calls[call_idx];
    check(call.is_object() && call.contains("function") && call["function"].is_object(), "chat message ", index,
          ": tool_calls[", call_idx, "] must have a 'function' object");
    const auto& function = call["function"];
    check(function.contains("name") && function["name"].is_string(), "chat message ", index, ": tool_calls[", call_idx,
          "].function.name must be a string");
    check(function.contains("arguments"), "chat message ", index, ": tool_calls[", call_idx,
          "].function.arguments is missing");
    ToolCallToEncode encoded;
    if (call.contains("id") && call["id"].is_string()) {
      encoded.id = call["id"].get<std::string>();
    } else if (function.contains("id") && function["id"].is_string()) {
      encoded.id = function["id"].get<std::string>();
    }
    encoded.name = function["name"].get<std::string>();
    encoded.arguments = read_tool_arguments(function["arguments"], index, call_idx);
    calls.push_back(std::move(encoded));
  }
  return calls;
}

Role parse_role(std::string_view role, size_t index) {
  if (role == "system") return Role::System;
  if (role == "user") return Role::User;
  if (role == "assistant") return Role::Assistant;
  if (role == "developer") return Role::Developer;
  if (role == "latest_reminder") return Role::LatestReminder;
  fail("chat message ", index, ": unknown role '", role,
       "' (expected system, user, assistant, tool, developer or latest_reminder)");
}

void check_only_on(const ordered_json& message, const char* field, bool allowed, std::string_view role, size_t index) {
  const auto it = message.find(field);
  check(allowed || it == message.end() || it->is_null(), "chat message ", index, ": '", field, "' is not allowed on a ",
        role, " message");
}

// Validates the messages and converts them, merging `tool` messages (and consecutive user messages) into user
// turns the way the reference encoder does.
std::vector<Message> normalize_messages(const ordered_json& messages) {
  check(messages.is_array(), "chat messages must be an array, got ", messages.type_name());
  check(!messages.empty(), "chat messages are empty");
  std::vector<Message> merged;
  // The most recent assistant message if it has tool calls (an index into merged), for checking tool results.
  std::optional<size_t> calling_assistant;
  for (size_t index = 0; index < messages.size(); ++index) {
    const auto& source = messages[index];
    check(source.is_object(), "chat message ", index, ": must be an object, got ", source.type_name());
    check(source.contains("role") && source["role"].is_string(), "chat message ", index, ": 'role' must be a string");
    const std::string role_name = source["role"].get<std::string>();
    const bool is_tool = role_name == "tool";
    const Role role = is_tool ? Role::User : parse_role(role_name, index);
    const bool is_assistant = role == Role::Assistant;
    const bool can_carry_tools = role == Role::System || role == Role::Developer;
    check_only_on(source, "tools", can_carry_tools, role_name, index);
    check_only_on(source, "response_format", can_carry_tools, role_name, index);
    check_only_on(source, "tool_calls", is_assistant, role_name, index);
    check_only_on(source, "reasoning_content", is_assistant, role_name, index);
    check_only_on(source, "tool_call_id", is_tool, role_name, index);

    std::optional<std::string> task = read_optional_string(source, "task", index);
    check(!task || !task_token(*task).empty(), "chat message ", index, ": unknown task '", task.value_or(""),
          "' (expected action, query, authority, domain, title or read_url)");
    const auto wo_eos = source.find("wo_eos");
    check(wo_eos == source.end() || wo_eos->is_null() || wo_eos->is_boolean(), "chat message ", index,
          ": 'wo_eos' must be a boolean");
    const bool without_eos = wo_eos != source.end() && wo_eos->is_boolean() && wo_eos->get<bool>();
    std::string content = read_text_field(source, "content", index);

    if (is_tool) {
      check(calling_assistant.has_value(), "chat message ", index,
            ": tool message without a preceding assistant message with tool_calls");
      const std::vector<ToolCallToEncode>& calls = merged[*calling_assistant].tool_calls;
      UserPart part{.is_tool_result = true,
                    .text = std::move(content),
                    .tool_call_id = read_optional_string(source, "tool_call_id", index).value_or("")};
      const bool calls_have_ids =
          std::any_of(calls.begin(), calls.end(), [](const ToolCallToEncode& call) { return !call.id.empty(); });
      const bool id_matches = std::any_of(calls.begin(), calls.end(),
                                          [&](const ToolCallToEncode& call) { return call.id == part.tool_call_id; });
      check(part.tool_call_id.empty() || !calls_have_ids || id_matches, "chat message ", index, ": tool_call_id '",
            part.tool_call_id, "' matches no tool call of the preceding assistant message");
      if (!merged.empty() && merged.back().role == Role::User) {
        merged.back().parts.push_back(std::move(part));
      } else {
        Message turn;
        turn.role = Role::User;
        turn.parts.push_back(std::move(part));
        merged.push_back(std::move(turn));
      }
      continue;
    }

    if (role == Role::User) {
      UserPart part{.is_tool_result = false, .text = std::move(content), .tool_call_id = {}};
      // Like the reference, a user message continues the previous user turn unless that turn ends in a task.
      if (!merged.empty() && merged.back().role == Role::User && !merged.back().task) {
        merged.back().parts.push_back(std::move(part));
        continue;
      }
      Message turn;
      turn.role = Role::User;
      turn.parts.push_back(std::move(part));
      turn.task = std::move(task);
      turn.without_eos = without_eos;
      merged.push_back(std::move(turn));
      continue;
    }

    Message message;
    message.role = role;
    message.content = std::move(content);
    message.task = std::move(task);
    message.without_eos = without_eos;
    if (role == Role::Developer) {
      check(!message.content.empty(), "chat message ", index, ": developer message needs non-empty content");
    }
    if (can_carry_tools) {
      if (const auto tools = source.find("tools"); tools != source.end() && !tools->is_null()) {
        message.tool_functions = read_tools(*tools, index);
      }
      if (const auto format = source.find("response_format"); format != source.end() && !format->is_null()) {
        message.response_format = &*format;
      }
    }
    if (is_assistant) {
      message.reasoning = read_optional_string(source, "reasoning_content", index).value_or("");
      if (const auto calls = source.find("tool_calls"); calls != source.end() && !calls->is_null()) {
        message.tool_calls = read_tool_calls(*calls, index);
      }
    }
    merged.push_back(std::move(message));
    if (is_assistant) {
      calling_assistant = merged.back().tool_calls.empty() ? std::nullopt : std::optional(merged.size() - 1);
    }
  }
  return merged;
}

// Orders the tool results of each user turn like the calls of the latest assistant message with tool calls
// (results whose id is unknown sort as if they answered the first call); text parts keep their slots.
void sort_tool_results_by_call_order(std::vector<Message>& messages) {
  std::map<std::string, size_t> call_order;
  for (Message& message : messages) {
    if (message.role == Role::Assistant && !message.tool_calls.empty()) {
      call_order.clear();
      for (size_t call_idx = 0; call_idx < message.tool_calls.size(); ++call_idx) {
        const std::string& id = message.tool_calls[call_idx].id;
        if (!id.empty()) call_order.emplace(id, call_idx);
      }
      continue;
    }
    if (message.role != Role::User || call_order.empty()) continue;
    std::vector<UserPart> results;
    for (const UserPart& part : message.parts) {
      if (part.is_tool_result) results.push_back(part);
    }
    if (results.size() < 2) continue;
    const auto order_of = [&](const UserPart& part) {
      const auto it = call_order.find(part.tool_call_id);
      return it == call_order.end() ? size_t{0} : it->second;
    };
    std::stable_sort(results.begin(), results.end(),
                     [&](const UserPart& a, const UserPart& b) { return order_of(a) < order_of(b); });
    size_t result_idx = 0;
    for (UserPart& part : message.parts) {
      if (part.is_tool_result) part = std::move(results[result_idx++]);
    }
  }
}

// Index of the last user or developer turn; -1 when there is none.
std::ptrdiff_t last_user_index(const std::vector<Message>& messages) {
  for (std::ptrdiff_t idx = static_cast<std::ptrdiff_t>(messages.size()) - 1; idx >= 0; --idx) {
    const Role role = messages[static_cast<size_t>(idx)].role;
    if (role == Role::User || role == Role::Developer) return idx;
  }
  return -1;
}

// Before the last user turn: assistant turns lose their reasoning and developer messages go away entirely.
std::vector<Message> drop_earlier_thinking(std::vector<Message> messages) {
  const std::ptrdiff_t last_user = last_user_index(messages);
  std::vector<Message> kept;
  for (std::ptrdiff_t idx = 0; idx < static_cast<std::ptrdiff_t>(messages.size()); ++idx) {
    Message& message = messages[static_cast<size_t>(idx)];
    if (idx < last_user && message.role == Role::Developer) continue;
    if (idx < last_user && message.role == Role::Assistant) message.reasoning.clear();
    kept.push_back(std::move(message));
  }
  return kept;
}

// ---- Rendering -------------------------------------------------------------------------------------------------

void append_tools_block(std::string& out, const std::vector<const ordered_json*>& functions) {
  out += TOOLS_BLOCK_HEAD;
  for (size_t idx = 0; idx < functions.size(); ++idx) {
    if (idx > 0) out += '\n';
    append_python_json(out, *functions[idx]);
  }
  out += TOOLS_BLOCK_TAIL;
}

// The "\n\n## Tools…" and "\n\n## Response Format…" sections of a system or developer message.
void append_instruction_sections(std::string& out, const Message& message) {
  if (!message.tool_functions.empty()) {
    out += "\n\n";
    append_tools_block(out, message.tool_functions);
  }
  if (message.response_format != nullptr) {
    out += "\n\n";
    out += RESPONSE_FORMAT_HEAD;
    append_python_json(out, *message.response_format);
  }
}

void append_tool_calls(std::string& out, const std::vector<ToolCallToEncode>& calls) {
  out += "\n\n";
  out += tok::TOOL_CALLS_START;
  out += '\n';
  for (size_t call_idx = 0; call_idx < calls.size(); ++call_idx) {
    if (call_idx > 0) out += '\n';
    out += tok::INVOKE_START;
    out += " name=\"" + calls[call_idx].name + "\">\n";
    bool first = true;
    for (const auto& [key, value] : calls[call_idx].arguments.items()) {
      if (!first) out += '\n';
      first = false;
      out += tok::PARAMETER_START;
      out += " name=\"" + key + "\" string=\"" + (value.is_string() ? "true" : "false") + "\">";
      if (value.is_string()) {
        out += value.get_ref<const std::string&>();
      } else {
        append_python_json(out, value);
      }
      out += tok::PARAMETER_END;
    }
    out += '\n';
    out += tok::INVOKE_END;
  }
  out += '\n';
  out += tok::TOOL_CALLS_END;
}

struct RenderContext {
  const std::vector<Message>& messages;
  std::ptrdiff_t last_user;
  bool thinking;
  bool drop_thinking;
  bool add_generation_prompt;
};

void render_message(std::string& out, const RenderContext& context, size_t index) {
  const Message& message = context.messages[index];
  switch (message.role) {
    case Role::System:
      out += message.content;
      append_instruction_sections(out, message);
      break;
    case Role::Developer:
      out += tok::USER;
      out += message.content;
      append_instruction_sections(out, message);
      break;
    case Role::User:
      out += tok::USER;
      for (size_t part_idx = 0; part_idx < message.parts.size(); ++part_idx) {
        if (part_idx > 0) out += "\n\n";
        const UserPart& part = message.parts[part_idx];
        out += part.is_tool_result ? "<tool_result>" + part.text + "</tool_result>" : part.text;
      }
      break;
    case Role::LatestReminder:
      out += tok::LATEST_REMINDER;
      out += message.content;
      break;
    case Role::Assistant: {
      // A task's answer carries no thinking. An earlier turn whose reasoning was dropped has no `</think>` here:
      // its turn was opened with `<｜Assistant｜></think>`.
      const bool answers_task = index > 0 && context.messages[index - 1].task.has_value();
      const bool keeps_thinking = !context.drop_thinking || static_cast<std::ptrdiff_t>(index) > context.last_user;
      if (context.thinking && !answers_task && keeps_thinking) {
        out += message.reasoning;
        out += tok::THINK_END;
      }
      out += message.content;
      if (!message.tool_calls.empty()) append_tool_calls(out, message.tool_calls);
      if (!message.without_eos) out += tok::END_OF_SENTENCE;
      break;
    }
  }

  // What opens the next assistant turn: only when this message is the last one or an assistant or a
  // latest_reminder follows (other roles open their own turn).
  const bool is_last = index + 1 == context.messages.size();
  if (is_last && !context.add_generation_prompt) return;
  if (!is_last) {
    const Role next = context.messages[index + 1].role;
    if (next != Role::Assistant && next != Role::LatestReminder) return;
  }
  if (message.task) {
    if (*message.task == "action") {
      out += tok::ASSISTANT;
      out += context.thinking ? tok::THINK_START : tok::THINK_END;
    }
    out += task_token(*message.task);
  } else if (message.role == Role::User || message.role == Role::Developer) {
    out += tok::ASSISTANT;
    // Thinking opens only in the turn being answered now, or in every turn when earlier thinking is kept.
    const bool opens_thinking =
        context.thinking && (!context.drop_thinking || static_cast<std::ptrdiff_t>(index) >= context.last_user);
    out += opens_thinking ? tok::THINK_START : tok::THINK_END;
  }
}

}  // namespace

std::string dump_json_like_python(const ordered_json& value) {
  std::string out;
  append_python_json(out, value);
  return out;
}

std::string encode_chat(const ordered_json& messages, const ChatEncodeOptions& options) {
  const bool thinking = options.mode == ChatMode::Thinking;
  const std::string effort = options.reasoning_effort.value_or("");
  check(!options.reasoning_effort || effort == "max" || effort == "high", "reasoning_effort '", effort,
        "' is not supported (expected \"max\", \"high\" or none)");

  std::vector<Message> normalized = normalize_messages(messages);
  sort_tool_results_by_call_order(normalized);
  // Tool-using conversations keep every turn's reasoning: the model was trained to see why it called each tool.
  const bool has_tools = std::any_of(normalized.begin(), normalized.end(),
                                     [](const Message& message) { return !message.tool_functions.empty(); });
  const bool drop_thinking = options.drop_thinking && !has_tools;
  if (thinking && drop_thinking) normalized = drop_earlier_thinking(std::move(normalized));

  std::string prompt;
  if (options.add_bos_token) prompt += tok::BEGIN_OF_SENTENCE;
  if (thinking && effort == "max") prompt += REASONING_EFFORT_MAX_PREFIX;
  const RenderContext context{.messages = normalized,
                              .last_user = last_user_index(normalized),
                              .thinking = thinking,
                              .drop_thinking = drop_thinking,
                              .add_generation_prompt = options.add_generation_prompt};
  for (size_t index = 0; index < normalized.size(); ++index) render_message(prompt, context, index);
  return prompt;
}

std::string encode_chat_request(const ordered_json& request, const ChatEncodeOptions& options) {
  check(request.is_object(), "chat request must be an object with 'messages', got ", request.type_name());
  check(request.contains("messages"), "chat request has no 'messages'");
  const auto tools = request.find("tools");
  if (tools == request.end() || tools->is_null()) return encode_chat(request["messages"], options);
  check(tools->is_array(), "chat request: 'tools' must be an array, got ", tools->type_name());
  check(request["messages"].is_array(), "chat request: 'messages' must be an array, got ",
        request["messages"].type_name());

  ordered_json messages = request["messages"];
  const auto system = std::find_if(messages.begin(), messages.end(), [](const ordered_json& message) {
    return message.is_object() && message.value("role", std::string{}) == "system";
  });
  if (system == messages.end()) {
    messages.insert(messages.begin(), ordered_json{{"role", "system"}, {"content", ""}, {"tools", *tools}});
  } else if (!system->contains("tools") || (*system)["tools"].is_null()) {
    (*system)["tools"] = *tools;
  } else {
    check((*system)["tools"].is_array(), "chat request: the system message's 'tools' must be an array");
    for (const auto& tool : *tools) (*system)["tools"].push_back(tool);
  }
  return encode_chat(messages, options);
}

}  // namespace dsv4
