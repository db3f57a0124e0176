// dsv4 generate: one prompt in, streamed text out.
#include "cli_options.hpp"
#include "command_registry.hpp"
#include "generation_output.hpp"
#include "tokenizer/chat_encoding.hpp"

#include <csignal>

namespace dsv4::app {
namespace {

std::atomic<bool> g_cancel{false};

struct GenerateCli {
  EngineCli engine;
  SamplingCli sampling;
  std::string prompt;
  bool raw = false;
  bool think = false;
};

int run_generate(const GenerateCli& o) {
  check(!o.prompt.empty(), "the prompt is empty (-p TEXT)");
  const SamplingParams params = o.sampling.sampling();
  Engine engine(o.engine.options());
  const Tokenizer& tokenizer = engine.tokenizer();

  const ChatMode mode = o.think ? ChatMode::Thinking : ChatMode::Chat;
  std::vector<int32_t> ids;
  if (o.raw) {
    ids = tokenizer.encode_prompt(o.prompt);
  } else {
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    messages.push_back({{"role", "user"}, {"content", o.prompt}});
    ChatEncodeOptions options;
    options.mode = mode;
    ids = tokenizer.encode(encode_chat(messages, options));
  }

  std::signal(SIGINT, [](int) { g_cancel = true; });
  CompletionPrinter printer(mode, o.raw);
  const GenerationResult result =
      engine.generate(ids, params, [&](std::string_view text) { printer.feed(text); }, &g_cancel);
  printer.finish();
  print_generation_stats(result);
  return 0;
}

const CommandRegistration registration{{
    "generate",
    "Generate text for one prompt (chat-encoded unless --raw), streamed as it is produced",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<GenerateCli>();
      o->engine.add_to(sub);
      o->sampling.add_to(sub);
      sub.add_option("-p,--prompt", o->prompt, "Prompt text")->required();
      sub.add_flag("--raw", o->raw, "Use the prompt as it is, without the chat template");
      sub.add_flag("--think", o->think, "Thinking mode: the model reasons first (shown dimmed)");
      return [o] { return run_generate(*o); };
    },
}};

}  // namespace
}  // namespace dsv4::app
