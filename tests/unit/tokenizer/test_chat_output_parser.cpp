#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tokenizer/chat_output_parser.hpp"

namespace dsv4 {

// Readable failure messages for tool-call comparisons (found by argument-dependent lookup, hence in dsv4).
std::ostream& operator<<(std::ostream& os, const ToolCall& call) { return os << call.name << call.arguments; }

namespace {

using nlohmann::ordered_json;
namespace tok = chat_tokens;

const std::string EOS(tok::END_OF_SENTENCE);

void expect_same(const ParsedCompletion& actual, const ParsedCompletion& expected) {
  EXPECT_EQ(actual.reasoning_content, expected.reasoning_content);
  EXPECT_EQ(actual.content, expected.content);
  EXPECT_EQ(actual.tool_calls, expected.tool_calls);
  EXPECT_EQ(actual.truncated, expected.truncated);
  EXPECT_EQ(actual.finished, expected.finished);
  EXPECT_EQ(actual.problems, expected.problems);
}

// Feeds `text` in pieces of the given sizes (cycled) and checks that the deltas add up to the final result.
ParsedCompletion parse_streamed(std::string_view text, ChatMode mode, const std::vector<size_t>& piece_sizes) {
  ChatStreamParser parser(mode);
  ChatStreamDelta total;
  const auto add = [&](const ChatStreamDelta& delta) {
    total.reasoning_content += delta.reasoning_content;
    total.content += delta.content;
    total.tool_calls.insert(total.tool_calls.end(), delta.tool_calls.begin(), delta.tool_calls.end());
  };
  size_t offset = 0;
  for (size_t piece_idx = 0; offset < text.size(); ++piece_idx) {
    const size_t size = std::min(piece_sizes[piece_idx % piece_sizes.size()], text.size() - offset);
    add(parser.feed(text.substr(offset, size)));
    offset += size;
  }
  add(parser.finish());
  EXPECT_EQ(total.reasoning_content, parser.result().reasoning_content);
  EXPECT_EQ(total.content, parser.result().content);
  EXPECT_EQ(total.tool_calls, parser.result().tool_calls);
  return parser.result();
}

std::string invoke(std::string_view name, std::string_view parameters) {
  return "<｜DSML｜invoke name=\"" + std::string(name) + "\">\n" + std::string(parameters) + "</｜DSML｜invoke>\n";
}

std::string parameter(std::string_view name, bool is_string, std::string_view value) {
  return "<｜DSML｜parameter name=\"" + std::string(name) + "\" string=\"" + (is_string ? "true" : "false") + "\">" +
         std::string(value) + "</｜DSML｜parameter>\n";
}

std::string tool_calls_block(std::string_view invokes) {
  return "\n\n<｜DSML｜tool_calls>\n" + std::string(invokes) + "</｜DSML｜tool_calls>";
}

// ---- Well-formed completions -----------------------------------------------------------------------------------

TEST(ParseCompletion, ThinkingModeSplitsReasoningAndContent) {
  const ParsedCompletion parsed = parse_completion("Let me think.</think>The answer is 4." + EOS, ChatMode::Thinking);
  EXPECT_EQ(parsed.reasoning_content, "Let me think.");
  EXPECT_EQ(parsed.content, "The answer is 4.");
  EXPECT_TRUE(parsed.tool_calls.empty());
  EXPECT_FALSE(parsed.truncated);
  EXPECT_TRUE(parsed.finished);
  EXPECT_TRUE(parsed.problems.empty());
}

TEST(ParseCompletion, ChatModeIsAllContentAndEndOfSentenceIsOptional) {
  const ParsedCompletion parsed = parse_completion("Plain <b>answer</b> </think>", ChatMode::Chat);
  EXPECT_EQ(parsed.reasoning_content, "");
  EXPECT_EQ(parsed.content, "Plain <b>answer</b> </think>");
  EXPECT_FALSE(parsed.truncated);
  EXPECT_FALSE(parsed.finished);
  EXPECT_TRUE(parsed.problems.empty());
}

TEST(ParseCompletion, ToolCallsBecomeJsonArguments) {
  const std::string text =
      "need data</think>Checking." +
      tool_calls_block(invoke("get_weather", parameter("location", true, "Bei\"jing\n") +
                                                 parameter("days", false, "3") +
                                                 parameter("opts", false, "{\"a\": [1, 2.5e-7]}")) +
                       invoke("now", "")) +
      EOS;
  const ParsedCompletion parsed = parse_completion(text, ChatMode::Thinking);
  EXPECT_EQ(parsed.reasoning_content, "need data");
  EXPECT_EQ(parsed.content, "Checking.");
  ASSERT_EQ(parsed.tool_calls.size(), 2U);
  EXPECT_EQ(parsed.tool_calls[0].name, "get_weather");
  EXPECT_EQ(parsed.tool_calls[0].arguments, R"({"location": "Bei\"jing\n", "days": 3, "opts": {"a": [1, 2.5e-7]}})");
  EXPECT_EQ(parsed.tool_calls[1], (ToolCall{.name = "now", .arguments = "{}"}));
  EXPECT_FALSE(parsed.truncated);
  EXPECT_TRUE(parsed.finished);
  EXPECT_TRUE(parsed.problems.empty()) << parsed.problems.front();
}

TEST(ParseCompletion, RoundTripsAnEncodedAssistantTurn) {
  const ordered_json messages = ordered_json::parse(R"([
    {"role": "user", "content": "Q"},
    {"role": "assistant", "reasoning_content": "Two calls <needed> \"here\".", "content": "On it:\n",
     "tool_calls": [
       {"type": "function", "function": {"name": "search",
        "arguments": "{\"queries\": \"a || b\", \"top_k\": 5, \"filters\": {\"lang\": [\"en\", \"中文\"], \"safe\": false}}"}},
       {"type": "function", "function": {"name": "open", "arguments": "{\"id\": -1.5, \"note\": null}"}}]}])");
  for (const ChatMode mode : {ChatMode::Thinking, ChatMode::Chat}) {
    ChatEncodeOptions options;
    options.mode = mode;
    options.drop_thinking = false;
    const std::string prompt = encode_chat(messages, options);
    const std::string turn_head =
        std::string(tok::ASSISTANT) + std::string(mode == ChatMode::Thinking ? tok::THINK_START : tok::THINK_END);
    const std::string completion = prompt.substr(prompt.find(turn_head) + turn_head.size());
    const ParsedCompletion parsed = parse_completion(completion, mode);
    EXPECT_EQ(parsed.reasoning_content, mode == ChatMode::Thinking ? "Two calls <needed> \"here\"." : "");
    EXPECT_EQ(parsed.content, "On it:\n");
    ASSERT_EQ(parsed.tool_calls.size(), 2U);
    EXPECT_EQ(parsed.tool_calls[0].name, "search");
    EXPECT_EQ(parsed.tool_calls[0].arguments, messages[1]["tool_calls"][0]["function"]["arguments"].get<std::string>());
    EXPECT_EQ(parsed.tool_calls[1].arguments, R"({"id": -1.5, "note": null})");
    EXPECT_TRUE(parsed.problems.empty());
    EXPECT_TRUE(parsed.finished);
  }
}

TEST(ParseCompletion, GoldenAssistantTurnsParseBack) {
  const auto path = std::filesystem::path(DSV4_SHARED_DIR) / "data" / "chat-encoding" / "output_1.txt";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path;
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  const std::string prompt = text.str();
  const std::string marker = std::string(tok::ASSISTANT) + std::string(tok::THINK_START);
  const size_t first_start = prompt.find(marker) + marker.size();
  const size_t first_end = prompt.find(tok::USER, first_start);
  const ParsedCompletion first =
      parse_completion(std::string_view(prompt).substr(first_start, first_end - first_start), ChatMode::Thinking);
  EXPECT_EQ(first.reasoning_content,
            "The user wants to know the weather in Beijing. I should use the get_weather tool.");
  EXPECT_EQ(first.content, "");
  ASSERT_EQ(first.tool_calls.size(), 1U);
  EXPECT_EQ(first.tool_calls[0],
            (ToolCall{.name = "get_weather", .arguments = R"({"location": "Beijing", "unit": "celsius"})"}));

  const ParsedCompletion last =
      parse_completion(std::string_view(prompt).substr(prompt.rfind(marker) + marker.size()), ChatMode::Thinking);
  EXPECT_EQ(last.reasoning_content, "Got the weather data. Let me format a nice response.");
  EXPECT_EQ(last.content, "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.");
  EXPECT_TRUE(last.tool_calls.empty());
  EXPECT_TRUE(last.problems.empty());
}

// ---- Truncated and malformed output ----------------------------------------------------------------------------

TEST(ParseCompletion, TruncatedReasoning) {
  const ParsedCompletion parsed = parse_completion("still thinking <", ChatMode::Thinking);
  EXPECT_EQ(parsed.reasoning_content, "still thinking <");
  EXPECT_TRUE(parsed.truncated);
  EXPECT_FALSE(parsed.finished);
}

TEST(ParseCompletion, TruncatedToolCallsKeepOnlyCompletedCalls) {
  const std::string complete_call = invoke("a", parameter("x", false, "1"));
  const std::string block_head = "done</think>\n\n<｜DSML｜tool_calls>\n" + complete_call;
  const std::string cuts[] = {
      "<｜DSML｜invo",
      "<｜DSML｜invoke name=\"b\"",
      "<｜DSML｜invoke name=\"b\">\n<｜DSML｜parameter name=\"y\" string=\"true\">partial val",
      "<｜DSML｜invoke name=\"b\">\n" + parameter("y", true, "whole"),
      "",
  };
  for (const std::string& cut : cuts) {
    SCOPED_TRACE(cut);
    const ParsedCompletion parsed = parse_completion(block_head + cut, ChatMode::Thinking);
    EXPECT_EQ(parsed.reasoning_content, "done");
    EXPECT_EQ(parsed.content, "");
    ASSERT_EQ(parsed.tool_calls.size(), 1U);
    EXPECT_EQ(parsed.tool_calls[0], (ToolCall{.name = "a", .arguments = R"({"x": 1})"}));
    EXPECT_TRUE(parsed.truncated);
  }
}

TEST(ParseCompletion, MalformedParametersAreRecoveredAndReported) {
  const std::string text =
      "</think>" +
      tool_calls_block(invoke("f", parameter("bad_json", false, "{not json") +
                                       "<｜DSML｜parameter name=\"no_flag\">v</｜DSML｜parameter>\n" +
                                       parameter("dup", true, "first") + parameter("dup", true, "second") +
                                       "<｜DSML｜parameter string=\"true\">nameless</｜DSML｜parameter>\n" +
                                       parameter("q\"uoted>", true, "a \" string=\"x\">b"))) +
      EOS;
  const ParsedCompletion parsed = parse_completion(text, ChatMode::Thinking);
  ASSERT_EQ(parsed.tool_calls.size(), 1U);
  EXPECT_EQ(parsed.tool_calls[0].arguments,
            R"({"bad_json": "{not json", "no_flag": "v", "dup": "first", "q\"uoted>": "a \" string=\"x\">b"})");
  EXPECT_FALSE(parsed.truncated);
  EXPECT_EQ(parsed.problems.size(), 4U);
  for (const std::string& problem : parsed.problems) EXPECT_FALSE(problem.empty());
}

TEST(ParseCompletion, MalformedBlockStructure) {
  // Missing </think>: the tool block still ends the reasoning.
  ParsedCompletion parsed = parse_completion("thinking" + tool_calls_block(invoke("f", "")) + EOS, ChatMode::Thinking);
  EXPECT_EQ(parsed.reasoning_content, "thinking");
  EXPECT_EQ(parsed.tool_calls.size(), 1U);
  EXPECT_EQ(parsed.problems.size(), 1U);

  // Stray text between tags is skipped; an invoke without a name is dropped; a missing </invoke> is tolerated.
  parsed = parse_completion(
      "</think>\n\n<｜DSML｜tool_calls>\njunk<｜DSML｜invoke>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n" +
          parameter("k", true, "v") + "</｜DSML｜tool_calls>" + EOS,
      ChatMode::Thinking);
  EXPECT_EQ(parsed.tool_calls, (std::vector<ToolCall>{{.name = "g", .arguments = R"({"k": "v"})"}}));
  EXPECT_EQ(parsed.problems.size(), 3U);
  EXPECT_TRUE(parsed.finished);

  // Text after the block is kept as content; text after the end of sentence is ignored.
  parsed =
      parse_completion("</think>A" + tool_calls_block(invoke("f", "")) + "\nB" + EOS + "ignored", ChatMode::Thinking);
  EXPECT_EQ(parsed.content, "AB");
  EXPECT_EQ(parsed.tool_calls.size(), 1U);
  EXPECT_EQ(parsed.problems.size(), 2U);

  // The end of sentence inside the reasoning ends everything.
  parsed = parse_completion("cut short" + EOS, ChatMode::Thinking);
  EXPECT_EQ(parsed.reasoning_content, "cut short");
  EXPECT_TRUE(parsed.finished);
  EXPECT_FALSE(parsed.truncated);
  EXPECT_EQ(parsed.problems.size(), 1U);
}

TEST(ParseCompletion, BlockWithoutBlankLineAndNewlinesInContent) {
  const ParsedCompletion parsed =
      parse_completion("a\n\nb\n<｜DSML｜tool_calls>\n" + invoke("f", "") + "</｜DSML｜tool_calls>", ChatMode::Chat);
  EXPECT_EQ(parsed.content, "a\n\nb\n");
  EXPECT_EQ(parsed.tool_calls.size(), 1U);
  EXPECT_TRUE(parsed.problems.empty());
}

// ---- Streaming -------------------------------------------------------------------------------------------------

TEST(ChatStreamParser, HoldsBackOnlyPossibleMarkerStarts) {
  ChatStreamParser parser(ChatMode::Thinking);
  EXPECT_EQ(parser.feed("Thinking </thi").reasoning_content, "Thinking ");
  EXPECT_EQ(parser.feed("s is not it<").reasoning_content, "</this is not it");
  ChatStreamDelta delta = parser.feed("/think>Answer\n");
  EXPECT_EQ(delta.reasoning_content, "");  // the held-back "<" was the start of </think>
  EXPECT_EQ(delta.content, "Answer");      // "\n" may start "\n\n<｜DSML｜tool_calls>"
  EXPECT_EQ(parser.feed("\nmore ").content, "\n\nmore ");
  // A UTF-8 character split across deltas is released whole.
  EXPECT_EQ(parser.feed("\xE4\xB8").content, "");
  EXPECT_EQ(parser.feed("\x96 <｜end▁of").content, "世 ");
  EXPECT_EQ(parser.feed("▁sentence｜>").content, "");
  EXPECT_TRUE(parser.finished());
  EXPECT_TRUE(parser.finish().empty());
  EXPECT_EQ(parser.result().content, "Answer\n\nmore 世 ");
}

TEST(ChatStreamParser, EmitsEachToolCallWhenItCloses) {
  ChatStreamParser parser(ChatMode::Chat);
  EXPECT_EQ(parser.feed("Calling.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\">\n").content, "Calling.");
  EXPECT_TRUE(parser.feed(parameter("x", true, "1")).empty());
  ChatStreamDelta delta = parser.feed("</｜DSML｜invoke>\n<｜DSML｜invoke name=\"b\">\n</｜DSML｜in");
  ASSERT_EQ(delta.tool_calls.size(), 1U);
  EXPECT_EQ(delta.tool_calls[0], (ToolCall{.name = "a", .arguments = R"({"x": "1"})"}));
  delta = parser.feed("voke>\n</｜DSML｜tool_calls>" + EOS);
  ASSERT_EQ(delta.tool_calls.size(), 1U);
  EXPECT_EQ(delta.tool_calls[0].name, "b");
  EXPECT_TRUE(parser.finished());
}

TEST(ChatStreamParser, AnySplitGivesTheOneShotResult) {
  const std::string calls =
      tool_calls_block(invoke("search", parameter("q", true, "世界 </think> \n\n<｜DSML｜tool_calls>") +
                                            parameter("n", false, "[1, 2]")) +
                       invoke("f", parameter("bad", false, "nope") + "junk"));
  const std::vector<std::pair<std::string, ChatMode>> completions = {
      {"r\n\n<think>é</think>c\n\n" + calls + EOS + "tail", ChatMode::Thinking},
      {"reasoning only, cut", ChatMode::Thinking},
      {"</think>x" + calls.substr(0, calls.size() / 2), ChatMode::Thinking},
      {"content < <｜ <｜DSML｜ \n\n\n" + calls + " after" + EOS, ChatMode::Chat},
      {"end inside reasoning <｜end▁of▁sentence" + EOS, ChatMode::Thinking},
      {"a" + calls.substr(0, calls.find("nope")) + EOS, ChatMode::Chat},
  };
  std::mt19937 rng(20240611);
  for (const auto& [text, mode] : completions) {
    SCOPED_TRACE(text);
    const ParsedCompletion one_shot = parse_completion(text, mode);
    expect_same(parse_streamed(text, mode, {1}), one_shot);
    expect_same(parse_streamed(text, mode, {2, 3, 5}), one_shot);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<size_t> sizes(8);
      for (size_t& size : sizes) size = std::uniform_int_distribution<size_t>(1, 12)(rng);
      expect_same(parse_streamed(text, mode, sizes), one_shot);
    }
  }
}

TEST(ChatStreamParser, LongParameterValueStreamsInLinearTime) {
  // A tool call writing a large file: 1 MB in 3-byte deltas would take minutes if each delta rescanned the value.
  std::string value;
  while (value.size() < (1U << 20)) value += "line of code < > \" \n";
  const std::string text = "</think>" + tool_calls_block(invoke("write", parameter("body", true, value))) + EOS;
  const ParsedCompletion parsed = parse_streamed(text, ChatMode::Thinking, {3});
  ASSERT_EQ(parsed.tool_calls.size(), 1U);
  EXPECT_EQ(ordered_json::parse(parsed.tool_calls[0].arguments)["body"], value);
  EXPECT_TRUE(parsed.problems.empty());
}

TEST(ChatStreamParser, RandomMarkupSoupIsSplitInvariant) {
  // Texts assembled from markers, pieces of markers and plain text, so that every state meets every input.
  const std::vector<std::string> fragments = {"</think>",
                                              "<think>",
                                              "</thi",
                                              "\n",
                                              "\n\n",
                                              " ",
                                              "text",
                                              "世",
                                              "\"",
                                              ">",
                                              "<",
                                              "｜",
                                              EOS,
                                              "<｜end▁of",
                                              "<｜DSML｜tool_calls>",
                                              "</｜DSML｜tool_calls>",
                                              "<｜DSML｜",
                                              "</｜DSML｜",
                                              "<｜DSML｜invoke name=\"f\">",
                                              "<｜DSML｜invoke",
                                              "</｜DSML｜invoke>",
                                              " name=\"p\"",
                                              " string=\"true\">",
                                              " string=\"false\">",
                                              "<｜DSML｜parameter name=\"k\" string=\"false\">",
                                              "</｜DSML｜parameter>",
                                              "[1, 2]",
                                              "<｜DSML｜parameter"};
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::string text;
    const int length = std::uniform_int_distribution<int>(0, 40)(rng);
    for (int piece = 0; piece < length; ++piece) {
      text += fragments[std::uniform_int_distribution<size_t>(0, fragments.size() - 1)(rng)];
    }
    const ChatMode mode = trial % 2 == 0 ? ChatMode::Thinking : ChatMode::Chat;
    SCOPED_TRACE(text);
    const ParsedCompletion one_shot = parse_completion(text, mode);
    expect_same(parse_streamed(text, mode, {1}), one_shot);
    std::vector<size_t> sizes(5);
    for (size_t& size : sizes) size = std::uniform_int_distribution<size_t>(1, 30)(rng);
    expect_same(parse_streamed(text, mode, sizes), one_shot);
  }
}

}  // namespace
}  // namespace dsv4
