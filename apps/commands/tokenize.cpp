// dsv4 tokenize / dsv4 detokenize: text <-> token ids with the model's own tokenizer.json.
//   dsv4 tokenize (-m DIR | --tokenizer FILE) (--text T | --file F) [--json] [--bos] [--no-special]
//   dsv4 detokenize (-m DIR | --tokenizer FILE) --ids 1,2,3 [--skip-special]
// The ids print comma-separated, so they paste straight into --ids.
#include "command_registry.hpp"
#include "core/error.hpp"
#include "tokenizer/bpe_tokenizer.hpp"
#include "tokenizer/chat_encoding.hpp"
#include "tokenizer/utf8.hpp"

#include <nlohmann/json.hpp>

#include <charconv>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace dsv4::app {
namespace {

// Where the tokenizer comes from: a model folder (its tokenizer.json and tokenizer_config.json) or one file.
struct TokenizerSource {
  std::string model_dir;
  std::string tokenizer_file;
};

void add_tokenizer_options(CLI::App& sub, TokenizerSource& source) {
  CLI::Option* model = sub.add_option("-m,--model", source.model_dir, "Model folder holding tokenizer.json");
  CLI::Option* file = sub.add_option("--tokenizer", source.tokenizer_file, "A tokenizer.json file");
  model->excludes(file);
}

Tokenizer load_tokenizer(const TokenizerSource& source) {
  check(!source.model_dir.empty() || !source.tokenizer_file.empty(),
        "no tokenizer given: pass -m DIR (a model folder) or --tokenizer FILE (a tokenizer.json)");
  return Tokenizer::from_file(source.model_dir.empty() ? source.tokenizer_file : source.model_dir);
}

// What to tokenize: text, a file, or a chat (messages encoded with the DSV4 chat format first).
struct TokenizeInput {
  std::string text;
  std::string file;  // "-" reads standard input
  std::string chat;  // a JSON file: a list of messages, or {"messages": [...], "tools": [...]}
  std::string chat_mode = "thinking";
  bool has_text = false;
  bool add_bos = false;
  bool no_special = false;
};

std::string read_input_file(const std::string& path) {
  if (path == "-") return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  std::ifstream file(path, std::ios::binary);
  check(file.good(), "--file: cannot open ", path);
  std::ostringstream contents;
  contents << file.rdbuf();
  return std::move(contents).str();
}

// The prompt string of a --chat file.
std::string encode_chat_file(const TokenizeInput& input) {
  ChatEncodeOptions options;
  check(input.chat_mode == "thinking" || input.chat_mode == "chat", "--mode: '", input.chat_mode,
        "' is not a chat mode (thinking or chat)");
  options.mode = input.chat_mode == "thinking" ? ChatMode::Thinking : ChatMode::Chat;
  nlohmann::ordered_json messages;
  try {
    messages = nlohmann::ordered_json::parse(read_input_file(input.chat));
  } catch (const nlohmann::json::parse_error& e) {
    fail("--chat ", input.chat, ": not valid JSON: ", e.what());
  }
  if (messages.is_object()) return encode_chat_request(messages, options);
  check(messages.is_array(), "--chat ", input.chat, ": expected a list of messages or {\"messages\": [...]}");
  return encode_chat(messages, options);
}

std::vector<int32_t> encode_input(const Tokenizer& tokenizer, const TokenizeInput& input) {
  if (!input.chat.empty()) return tokenizer.encode(encode_chat_file(input));
  check(input.has_text || !input.file.empty(), "nothing to tokenize: pass --text T, --file F or --chat F");
  const std::string text = input.has_text ? input.text : read_input_file(input.file);
  utf8::validate(text, input.has_text ? std::string("--text") : "--file " + input.file);
  const bool allow_special = !input.no_special;
  return input.add_bos ? tokenizer.encode_prompt(text, allow_special) : tokenizer.encode(text, allow_special);
}

int run_tokenize(const TokenizerSource& source, const TokenizeInput& input, bool as_json) {
  const Tokenizer tokenizer = load_tokenizer(source);
  const std::vector<int32_t> ids = encode_input(tokenizer, input);
  // A chat prints the prompt text it encoded: what the model sees, special tokens spelled out.
  const std::string prompt = input.chat.empty() ? std::string() : encode_chat_file(input);
  if (as_json) {
    nlohmann::json tokens = nlohmann::json::array();
    for (const int32_t id : ids) tokens.push_back(tokenizer.id_to_token(id));
    nlohmann::json out = {{"count", ids.size()}, {"ids", ids}, {"tokens", tokens}};
    if (!input.chat.empty()) out["prompt"] = prompt;
    std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return 0;
  }
  if (!input.chat.empty()) std::printf("%s\n\n", prompt.c_str());
  std::string line;
  for (const int32_t id : ids) line += (line.empty() ? "" : ",") + std::to_string(id);
  std::printf("%s\n", line.c_str());
  return 0;
}

// "1,2,3" or "1 2 3": decimal ids separated by commas and/or whitespace.
std::vector<int32_t> parse_ids(const std::string& list) {
  std::vector<int32_t> ids;
  std::size_t pos = 0;
  while (pos < list.size()) {
    const std::size_t end = list.find_first_of(", \t\n", pos);
    const std::string item = list.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    pos = end == std::string::npos ? list.size() : end + 1;
    if (item.empty()) continue;
    int32_t id = 0;
    const auto [last, error] = std::from_chars(item.data(), item.data() + item.size(), id);
    check(error == std::errc() && last == item.data() + item.size(), "--ids: '", item,
          "' is not a token id (expected integers such as 1,2,3)");
    ids.push_back(id);
  }
  return ids;
}

int run_detokenize(const TokenizerSource& source, const std::string& id_list, bool skip_special) {
  const Tokenizer tokenizer = load_tokenizer(source);
  const std::vector<int32_t> ids = parse_ids(id_list);
  const std::string text = tokenizer.decode(ids, skip_special);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

const CommandRegistration tokenize_registration{{
    "tokenize",
    "Print the token ids of a text (--json: with the token strings)",
    [](CLI::App& sub) -> std::function<int()> {
      auto source = std::make_shared<TokenizerSource>();
      auto input = std::make_shared<TokenizeInput>();
      auto as_json = std::make_shared<bool>(false);
      add_tokenizer_options(sub, *source);
      CLI::Option* text = sub.add_option("--text", input->text, "Text to tokenize");
      CLI::Option* file = sub.add_option("--file", input->file, "File to tokenize ('-' reads standard input)");
      CLI::Option* chat = sub.add_option("--chat", input->chat,
                                         "Chat messages (JSON list, or {\"messages\", \"tools\"}) to encode and tokenize");
      sub.add_option("--mode", input->chat_mode, "Chat mode for --chat: thinking or chat")->capture_default_str();
      text->excludes(file);
      chat->excludes(text)->excludes(file);
      sub.add_flag("--json", *as_json, "Print a JSON object with the ids and the token strings");
      sub.add_flag("--bos", input->add_bos, "Add what the tokenizer puts around a prompt (BOS for DeepSeek)");
      sub.add_flag("--no-special", input->no_special, "Treat special-token text as plain text");
      return [=] {
        input->has_text = text->count() > 0;
        return run_tokenize(*source, *input, *as_json);
      };
    },
}};

const CommandRegistration detokenize_registration{{
    "detokenize",
    "Print the text of token ids",
    [](CLI::App& sub) -> std::function<int()> {
      auto source = std::make_shared<TokenizerSource>();
      auto ids = std::make_shared<std::string>();
      auto skip_special = std::make_shared<bool>(false);
      add_tokenizer_options(sub, *source);
      sub.add_option("--ids", *ids, "Token ids, e.g. 1,2,3")->required();
      sub.add_flag("--skip-special", *skip_special, "Leave out special tokens (BOS, EOS, ...)");
      return [=] { return run_detokenize(*source, *ids, *skip_special); };
    },
}};

}  // namespace
}  // namespace dsv4::app
