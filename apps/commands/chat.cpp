// dsv4 chat: an interactive terminal conversation. The history is re-encoded each turn; the engine reuses the
// cached sequence wherever the new prompt extends the last one.
#include "cli_options.hpp"
#include "command_registry.hpp"
#include "generation_output.hpp"
#include "tokenizer/chat_encoding.hpp"

#include <csignal>
#include <iostream>

namespace dsv4::app {
namespace {

std::atomic<bool> g_generating{false};
std::atomic<bool> g_cancel{false};

void on_sigint(int) {
  // Ctrl-C stops the answer being generated; at the prompt it only interrupts the read.
  if (g_generating) g_cancel = true;
}

struct ChatCli {
  EngineCli engine;
  SamplingCli sampling;
  std::string think = "off";
  std::string system;
};

bool parse_on_off(const std::string& value, const char* what) {
  if (value == "on") return true;
  if (value == "off") return false;
  fail(what, ": expected on or off, got '", value, "'");
}

int run_chat(const ChatCli& o) {
  const SamplingParams params = o.sampling.sampling();
  bool thinking = parse_on_off(o.think, "--think");
  Engine engine(o.engine.options());
  const Tokenizer& tokenizer = engine.tokenizer();

  struct sigaction action {};
  action.sa_handler = on_sigint;  // no SA_RESTART: a Ctrl-C at the prompt returns from the read
  sigaction(SIGINT, &action, nullptr);

  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  auto reset = [&] {
    messages = nlohmann::ordered_json::array();
    if (!o.system.empty()) messages.push_back({{"role", "system"}, {"content", o.system}});
  };
  reset();
  std::fprintf(stderr, "Chat with %s. /reset clears the history, /think on|off, /quit exits; Ctrl-C stops an answer.\n",
               o.engine.engine.model_dir.c_str());
  std::string line;
  while (true) {
    std::fputs("> ", stdout);
    std::fflush(stdout);
    if (!std::getline(std::cin, line)) {
      if (std::cin.eof()) break;
      std::cin.clear();  // interrupted by Ctrl-C
      std::fputs("\n", stdout);
      continue;
    }
    if (line.empty()) continue;
    if (line == "/quit" || line == "/exit") break;
    if (line == "/reset") {
      reset();
      engine.reset();
      std::fputs("(history cleared)\n", stdout);
      continue;
    }
    if (line.starts_with("/think")) {
      try {
        thinking = parse_on_off(line.size() > 7 ? line.substr(7) : "", "/think");
        std::printf("(thinking %s)\n", thinking ? "on" : "off");
      } catch (const Error& e) {
        std::printf("(%s)\n", e.what());
      }
      continue;
    }
    if (line.starts_with("/")) {
      std::printf("(unknown command %s: /reset, /think on|off, /quit)\n", line.c_str());
      continue;
    }

    messages.push_back({{"role", "user"}, {"content", line}});
    const ChatMode mode = thinking ? ChatMode::Thinking : ChatMode::Chat;
    ChatEncodeOptions options;
    options.mode = mode;
    try {
      const std::vector<int32_t> ids = tokenizer.encode(encode_chat(messages, options));
      CompletionPrinter printer(mode, false);
      g_cancel = false;
      g_generating = true;
      const GenerationResult result =
          engine.generate(ids, params, [&](std::string_view text) { printer.feed(text); }, &g_cancel);
      g_generating = false;
      const ParsedCompletion reply = printer.finish();
      print_generation_stats(result);
      nlohmann::ordered_json assistant = {{"role", "assistant"}, {"content", reply.content}};
      if (!reply.reasoning_content.empty()) assistant["reasoning_content"] = reply.reasoning_content;
      messages.push_back(assistant);
    } catch (const Error& e) {
      g_generating = false;
      messages.erase(messages.end() - 1);  // the turn failed: forget its question
      std::printf("\n(error: %s)\n", e.what());
    }
  }
  return 0;
}

const CommandRegistration registration{{
    "chat",
    "Interactive chat in the terminal (history, thinking on/off, /reset, /quit)",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<ChatCli>();
      o->engine.add_to(sub);
      o->sampling.add_to(sub);
      sub.add_option("--think", o->think, "Thinking mode: on or off")->capture_default_str();
      sub.add_option("--system", o->system, "System prompt");
      return [o] { return run_chat(*o); };
    },
}};

}  // namespace
}  // namespace dsv4::app
