#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/error.hpp"
#include "tokenizer/chat_encoding.hpp"
#include "support/expect_error.hpp"

namespace dsv4 {
namespace {

using testing::expect_error;

using nlohmann::ordered_json;
namespace tok = chat_tokens;

const std::string BOS(tok::BEGIN_OF_SENTENCE);
const std::string EOS(tok::END_OF_SENTENCE);
const std::string USER(tok::USER);
const std::string ASSISTANT(tok::ASSISTANT);
const std::string THINK(tok::THINK_START);
const std::string END_THINK(tok::THINK_END);

std::filesystem::path golden_dir() { return std::filesystem::path(DSV4_SHARED_DIR) / "data" / "chat-encoding"; }

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

ChatEncodeOptions mode_options(ChatMode mode) {
  ChatEncodeOptions options;
  options.mode = mode;
  return options;
}

// ---- Golden cases from DeepSeek's reference test suite ---------------------------------------------------------

class ChatEncodingGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(golden_dir() / "input_1.json")) GTEST_SKIP() << "no " << golden_dir();
  }
  static ordered_json input(int case_idx) {
    return ordered_json::parse(read_file(golden_dir() / ("input_" + std::to_string(case_idx) + ".json")));
  }
  static std::string output(int case_idx) {
    return read_file(golden_dir() / ("output_" + std::to_string(case_idx) + ".txt"));
  }
};

TEST_F(ChatEncodingGolden, Case1ToolsAttachedToSystemMessage) {
  EXPECT_EQ(encode_chat_request(input(1), mode_options(ChatMode::Thinking)), output(1));
}

TEST_F(ChatEncodingGolden, Case2EarlierReasoningDropped) {
  EXPECT_EQ(encode_chat(input(2), mode_options(ChatMode::Thinking)), output(2));
}

TEST_F(ChatEncodingGolden, Case3DeveloperToolsAndLatestReminder) {
  EXPECT_EQ(encode_chat(input(3), mode_options(ChatMode::Thinking)), output(3));
}

TEST_F(ChatEncodingGolden, Case4ActionTaskInChatMode) {
  EXPECT_EQ(encode_chat(input(4), mode_options(ChatMode::Chat)), output(4));
}

TEST_F(ChatEncodingGolden, Case1ThroughTheRequestMatchesManualAttachment) {
  ordered_json request = input(1);
  ordered_json messages = request["messages"];
  messages[0]["tools"] = request["tools"];
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Thinking)), output(1));
}

// ---- JSON text as Python's json.dumps(ensure_ascii=False) writes it --------------------------------------------

TEST(DumpJsonLikePython, SeparatorsKeyOrderAndUnicode) {
  const ordered_json value = ordered_json::parse(R"({"z": [1, true, null, "世界"], "a": {}, "m": []})");
  EXPECT_EQ(dump_json_like_python(value), R"({"z": [1, true, null, "世界"], "a": {}, "m": []})");
}

TEST(DumpJsonLikePython, StringEscapes) {
  const ordered_json value = std::string("q\"b\\n\n r\r t\t b\b f\f \x01\x1f \x7f / é");
  EXPECT_EQ(dump_json_like_python(value), "\"q\\\"b\\\\n\\n r\\r t\\t b\\b f\\f \\u0001\\u001f \x7f / é\"");
}

TEST(DumpJsonLikePython, FloatsUsePythonRepr) {
  const std::pair<double, const char*> cases[] = {
      {0.0, "0.0"},           {-0.0, "-0.0"},      {1.0, "1.0"},
      {0.1, "0.1"},           {-3.25, "-3.25"},    {1e15, "1000000000000000.0"},
      {1e16, "1e+16"},        {1.5e16, "1.5e+16"}, {123456789.125, "123456789.125"},
      {1e-4, "0.0001"},       {1e-5, "1e-05"},     {1.25e-7, "1.25e-07"},
      {2.5e-300, "2.5e-300"}, {5e-324, "5e-324"},  {1.7976931348623157e308, "1.7976931348623157e+308"},
  };
  for (const auto& [value, expected] : cases) EXPECT_EQ(dump_json_like_python(ordered_json(value)), expected);
}

TEST(DumpJsonLikePython, Integers) {
  EXPECT_EQ(dump_json_like_python(ordered_json::parse("[-7, 9223372036854775807, 12345678901234567890]")),
            "[-7, 9223372036854775807, 12345678901234567890]");
}

// ---- Rules, one case each --------------------------------------------------------------------------------------

TEST(ChatEncoding, ThinkingModeOpensThinkingForTheLastUserTurn) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "Hi"}])");
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Thinking)), BOS + USER + "Hi" + ASSISTANT + THINK);
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Chat)), BOS + USER + "Hi" + ASSISTANT + END_THINK);
}

TEST(ChatEncoding, ChatModeWritesNoReasoning) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "hidden", "content": "A"},
    {"role": "user", "content": "Q2"}])");
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Chat)),
            BOS + USER + "Q" + ASSISTANT + END_THINK + "A" + EOS + USER + "Q2" + ASSISTANT + END_THINK);
}

TEST(ChatEncoding, DropThinkingOffKeepsEveryTurnsReasoning) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A"},
    {"role": "user", "content": "Q2"}])");
  ChatEncodeOptions options;
  EXPECT_EQ(encode_chat(messages, options),
            BOS + USER + "Q" + ASSISTANT + END_THINK + "A" + EOS + USER + "Q2" + ASSISTANT + THINK);
  options.drop_thinking = false;
  EXPECT_EQ(encode_chat(messages, options),
            BOS + USER + "Q" + ASSISTANT + THINK + "R1" + END_THINK + "A" + EOS + USER + "Q2" + ASSISTANT + THINK);
}

TEST(ChatEncoding, DeveloperMessagesBeforeTheLastUserTurnAreDropped) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "developer", "content": "old instructions"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "Q"}])");
  EXPECT_EQ(encode_chat(messages), BOS + "A" + EOS + USER + "Q" + ASSISTANT + THINK);
  // In chat mode nothing is dropped.
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Chat)),
            BOS + USER + "old instructions" + ASSISTANT + END_THINK + "A" + EOS + USER + "Q" + ASSISTANT + END_THINK);
}

TEST(ChatEncoding, ReasoningEffortMaxPrefixesThinkingPrompts) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "system", "content": "S"}])");
  ChatEncodeOptions options;
  options.reasoning_effort = "max";
  const std::string max_effort_prefix =
      "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
      "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
      "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
      "scenarios.\n"
      "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
      "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";
  EXPECT_EQ(encode_chat(messages, options), BOS + max_effort_prefix + "S");

  options.reasoning_effort = "high";
  EXPECT_EQ(encode_chat(messages, options), BOS + "S");
  options.reasoning_effort = "max";
  options.mode = ChatMode::Chat;
  EXPECT_EQ(encode_chat(messages, options), BOS + "S");
  options.reasoning_effort = "medium";
  expect_error([&] { encode_chat(messages, options); }, {"reasoning_effort", "medium"});
}

TEST(ChatEncoding, GenerationPromptAndBosCanBeLeftOut) {
  const ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "Hi", "task": "title"}])");
  ChatEncodeOptions options;
  EXPECT_EQ(encode_chat(messages, options), BOS + USER + "Hi<｜title｜>");
  options.add_generation_prompt = false;
  options.add_bos_token = false;
  EXPECT_EQ(encode_chat(messages, options), USER + "Hi");
}

TEST(ChatEncoding, TaskTokens) {
  // A non-action task token follows the message directly; the answer carries no thinking even in thinking mode.
  const ordered_json title = ordered_json::parse(R"([
    {"role": "user", "content": "text", "task": "title"},
    {"role": "assistant", "reasoning_content": "unused", "content": "Title"}])");
  EXPECT_EQ(encode_chat(title), BOS + USER + "text<｜title｜>Title" + EOS);
  // action opens the assistant turn; thinking mode writes <think> before the task token.
  const ordered_json action = ordered_json::parse(R"([{"role": "user", "content": "q", "task": "action"}])");
  EXPECT_EQ(encode_chat(action), BOS + USER + "q" + ASSISTANT + THINK + "<｜action｜>");
  EXPECT_EQ(encode_chat(action, mode_options(ChatMode::Chat)),
            BOS + USER + "q" + ASSISTANT + END_THINK + "<｜action｜>");
  for (const char* task : {"query", "authority", "domain", "read_url"}) {
    ordered_json messages = ordered_json::parse(R"([{"role": "user", "content": "x"}])");
    messages[0]["task"] = task;
    EXPECT_EQ(encode_chat(messages), BOS + USER + "x<｜" + task + "｜>");
  }
}

TEST(ChatEncoding, LatestReminderAfterSystem) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "system", "content": "S"},
    {"role": "latest_reminder", "content": "2026-01-01"},
    {"role": "user", "content": "Q"}])");
  EXPECT_EQ(encode_chat(messages), BOS + "S<｜latest_reminder｜>2026-01-01" + USER + "Q" + ASSISTANT + THINK);
}

TEST(ChatEncoding, ToolCallsWithNonStringParameters) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
      {"id": "a", "type": "function", "function": {"name": "f",
       "arguments": "{\"n\":3,\"x\":1.5,\"flag\":true,\"none\":null,\"list\":[1,\"é\"],\"obj\":{\"k\":\"v\"},\"s\":\"raw \\\"text\\\"\"}"}},
      {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"z": 1, "a": "2"}}},
      {"id": "c", "type": "function", "function": {"name": "h", "arguments": "{}"}},
      {"id": "d", "type": "function", "function": {"name": "k", "arguments": "not json"}}]}])");
  const std::string expected_calls =
      "\n\n<｜DSML｜tool_calls>\n"
      "<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"n\" string=\"false\">3</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"x\" string=\"false\">1.5</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"flag\" string=\"false\">true</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"none\" string=\"false\">null</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"list\" string=\"false\">[1, \"é\"]</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"obj\" string=\"false\">{\"k\": \"v\"}</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"s\" string=\"true\">raw \"text\"</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"g\">\n"
      "<｜DSML｜parameter name=\"z\" string=\"false\">1</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"h\">\n"
      "\n"
      "</｜DSML｜invoke>\n"
      "<｜DSML｜invoke name=\"k\">\n"
      "<｜DSML｜parameter name=\"arguments\" string=\"true\">not json</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls>";
  EXPECT_EQ(encode_chat(messages),
            BOS + USER + "Q" + ASSISTANT + THINK + END_THINK + "Let me check." + expected_calls + EOS);
}

TEST(ChatEncoding, ToolResultsMergeIntoOneUserTurnInCallOrder) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "R", "tool_calls": [
      {"id": "first", "type": "function", "function": {"name": "f", "arguments": "{}"}},
      {"id": "second", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "second", "content": "2"},
    {"role": "tool", "tool_call_id": "first", "content": [{"type": "text", "text": "1a"}, {"type": "text", "text": "1b"}]},
    {"role": "user", "content": "and then?"}])");
  const std::string prompt = encode_chat(messages);
  const std::string expected_turn =
      USER + "<tool_result>1a\n\n1b</tool_result>\n\n<tool_result>2</tool_result>\n\nand then?" + ASSISTANT + THINK;
  ASSERT_GE(prompt.size(), expected_turn.size());
  EXPECT_EQ(prompt.substr(prompt.size() - expected_turn.size()), expected_turn);
  // The tool-calling turn is before the last user turn and has no tools in the conversation: reasoning dropped.
  EXPECT_EQ(prompt.find("R</think>"), std::string::npos);
}

TEST(ChatEncoding, ToolsOnAnyMessageKeepAllReasoning) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "system", "content": "S", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A"},
    {"role": "user", "content": "Q2"}])");
  const std::string prompt = encode_chat(messages);
  EXPECT_NE(prompt.find("### Available Tool Schemas\n\n{\"name\": \"f\", \"parameters\": {}}\n\nYou MUST"),
            std::string::npos);
  EXPECT_NE(prompt.find(USER + "Q" + ASSISTANT + THINK + "R1" + END_THINK + "A" + EOS), std::string::npos);
}

TEST(ChatEncoding, ResponseFormatSection) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "system", "content": "S", "response_format": {"type": "json_object"}}])");
  EXPECT_EQ(encode_chat(messages), BOS +
                                       "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
                                       "schema to reply:\n{\"type\": \"json_object\"}");
}

TEST(ChatEncoding, ConsecutiveUserMessagesShareATurn) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    {"role": "user", "content": "c"}])");
  EXPECT_EQ(encode_chat(messages, mode_options(ChatMode::Chat)), BOS + USER + "a\n\nb\n\nc" + ASSISTANT + END_THINK);
}

TEST(ChatEncoding, AssistantPrefillWithoutEndOfSentence) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "R", "content": "Partial", "wo_eos": true}])");
  EXPECT_EQ(encode_chat(messages), BOS + USER + "Q" + ASSISTANT + THINK + "R" + END_THINK + "Partial");
}

TEST(ChatEncodingRequest, ToolsGoToTheFirstSystemMessageOrANewOne) {
  const ordered_json tool = ordered_json::parse(R"({"type": "function", "function": {"name": "f"}})");
  ordered_json request = {{"messages", ordered_json::parse(R"([{"role": "user", "content": "Q"}])")},
                          {"tools", ordered_json::array({tool})}};
  const std::string inserted = encode_chat_request(request);
  EXPECT_TRUE(inserted.starts_with(BOS + "\n\n## Tools\n")) << inserted;

  request["messages"] = ordered_json::parse(R"([
    {"role": "latest_reminder", "content": "r"},
    {"role": "system", "content": "S", "tools": [{"type": "function", "function": {"name": "existing"}}]},
    {"role": "user", "content": "Q"}])");
  const std::string appended = encode_chat_request(request);
  EXPECT_NE(appended.find("{\"name\": \"existing\"}\n{\"name\": \"f\"}\n"), std::string::npos);
  EXPECT_TRUE(appended.starts_with(BOS + "<｜latest_reminder｜>rS\n\n## Tools\n")) << appended;

  expect_error([] { encode_chat_request(ordered_json::array()); }, {"chat request"});
  expect_error(
      [] {
        encode_chat_request(ordered_json{{"messages", ordered_json::array()}, {"tools", 3}});
      },
      {"'tools' must be an array"});
}

// ---- Malformed input -------------------------------------------------------------------------------------------

TEST(ChatEncodingErrors, NameTheMessageAndTheProblem) {
  const auto fails = [](const char* json, std::initializer_list<std::string_view> fragments) {
    SCOPED_TRACE(json);
    expect_error([&] { encode_chat(ordered_json::parse(json)); }, fragments);
  };
  fails(R"({"role": "user"})", {"must be an array"});
  fails(R"([])", {"empty"});
  fails(R"([{"role": "user", "content": "a"}, 7])", {"chat message 1", "object"});
  fails(R"([{"content": "a"}])", {"chat message 0", "'role'"});
  fails(R"([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])", {"chat message 1", "robot"});
  fails(R"([{"role": "user", "content": 5}])", {"chat message 0", "'content'", "number"});
  fails(R"([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])",
        {"chat message 0", "content[0]", "text"});
  fails(R"([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}])",
        {"chat message 1", "tool message without a preceding"});
  fails(R"([{"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "y", "content": "r"}])",
        {"chat message 2", "'y'"});
  fails(R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "no calls"},
            {"role": "tool", "content": "r"}])",
        {"chat message 2", "tool message"});
  fails(R"([{"role": "developer", "content": ""}])", {"chat message 0", "developer"});
  fails(R"([{"role": "user", "content": "a", "task": "summarize"}])", {"chat message 0", "summarize"});
  fails(R"([{"role": "user", "content": "a", "tools": []}])", {"chat message 0", "'tools'", "user"});
  fails(R"([{"role": "user", "content": "a", "reasoning_content": "r"}])", {"chat message 0", "reasoning_content"});
  fails(R"([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}])",
        {"chat message 0", "tool_calls[0].function.name"});
  fails(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}])", {"chat message 0", "arguments"});
  fails(R"([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}])",
        {"chat message 0", "JSON object"});
  fails(R"([{"role": "system", "content": "s", "tools": [{"name": "bare"}]}])", {"chat message 0", "tools[0]"});
  fails(R"([{"role": "assistant", "content": "a", "wo_eos": "yes"}])", {"chat message 0", "wo_eos"});
}

}  // namespace
}  // namespace dsv4
