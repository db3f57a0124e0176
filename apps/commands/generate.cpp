// dsv4 generate: one prompt in, streamed text out; or a file of prompts generated concurrently (continuous batching,
// runtime/batch_generator.hpp), each result printed in input order.
#include "cli_options.hpp"
#include "command_registry.hpp"
#include "generation_output.hpp"
#include "runtime/batch_generator.hpp"
#include "tokenizer/chat_encoding.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <csignal>
#include <fstream>

namespace dsv4::app {
namespace {

std::atomic<bool> g_cancel{false};

struct GenerateCli {
  EngineCli engine;
  SamplingCli sampling;
  std::string prompt;
  bool has_prompt = false;  // -p given (an empty -p '' is an error of its own)
  std::string prompt_file;
  int batch = 8;
  bool json = false;
  bool raw = false;
  bool think = false;
};

std::vector<int32_t> encode_prompt(const Tokenizer& tokenizer, const std::string& text, bool raw, ChatMode mode) {
  if (raw) return tokenizer.encode_prompt(text);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "user"}, {"content", text}});
  ChatEncodeOptions options;
  options.mode = mode;
  return tokenizer.encode(encode_chat(messages, options));
}

int run_single(const GenerateCli& o) {
  check(!o.prompt.empty(), "the prompt is empty (-p TEXT)");
  const SamplingParams params = o.sampling.sampling();
  Engine engine(o.engine.options());
  const ChatMode mode = o.think ? ChatMode::Thinking : ChatMode::Chat;
  const std::vector<int32_t> ids = encode_prompt(engine.tokenizer(), o.prompt, o.raw, mode);

  std::signal(SIGINT, [](int) { g_cancel = true; });
  CompletionPrinter printer(mode, o.raw);
  const GenerationResult result =
      engine.generate(ids, params, [&](std::string_view text) { printer.feed(text); }, &g_cancel);
  printer.finish();
  print_generation_stats(result);
  return 0;
}

// One line of a prompt file: its text and how to generate it.
struct FilePrompt {
  int64_t line = 0;
  std::string text;
  SamplingParams params;
  bool raw = false;
  bool think = false;
  std::string error;  // the line could not be read as a request
};

// A line is the prompt itself, or (starting with '{') a JSON object with "prompt" and any of the per-request
// settings below, which override the command line's.
FilePrompt parse_prompt_line(const std::string& line, int64_t number, const GenerateCli& o) {
  FilePrompt p;
  p.line = number;
  p.params = o.sampling.sampling();
  p.raw = o.raw;
  p.think = o.think;
  if (!line.starts_with("{")) {
    p.text = line;
    return p;
  }
  try {
    const nlohmann::json j = nlohmann::json::parse(line);
    // The prompt first, so that a line failing on another key still reports its prompt.
    if (j.contains("prompt") && j["prompt"].is_string()) p.text = j["prompt"].get<std::string>();
    for (const auto& [key, value] : j.items()) {
      // Each key's value read with its type checked, so a wrong one is named instead of nlohmann's bare message.
      const auto integer = [&](int64_t min) {
        check(value.is_number_integer(), "'", key, "' must be an integer");
        const int64_t v = value.get<int64_t>();
        check(v >= min, "'", key, "' must be at least ", min);
        return v;
      };
      const auto number = [&] {
        check(value.is_number(), "'", key, "' must be a number");
        return value.get<float>();
      };
      const auto flag = [&] {
        check(value.is_boolean(), "'", key, "' must be true or false");
        return value.get<bool>();
      };
      if (key == "prompt") {
        check(value.is_string(), "'prompt' must be a string");
        p.text = value.get<std::string>();
      } else if (key == "max_tokens") {
        p.params.max_tokens = int32_t(std::min<int64_t>(integer(1), INT32_MAX));
      } else if (key == "temperature") {
        p.params.temperature = number();
      } else if (key == "top_p") {
        p.params.top_p = number();
      } else if (key == "top_k") {
        p.params.top_k = int32_t(std::min<int64_t>(integer(0), INT32_MAX));
      } else if (key == "min_p") {
        p.params.min_p = number();
      } else if (key == "repetition_penalty") {
        p.params.repetition_penalty = number();
      } else if (key == "presence_penalty") {
        p.params.presence_penalty = number();
      } else if (key == "frequency_penalty") {
        p.params.frequency_penalty = number();
      } else if (key == "seed") {
        check(value.is_number_unsigned() || (value.is_number_integer() && value.get<int64_t>() >= 0),
              "'seed' must be a non-negative integer");
        p.params.seed = value.get<uint64_t>();
      } else if (key == "stop") {
        const auto is_string = [](const nlohmann::json& v) { return v.is_string(); };
        const bool strings =
            value.is_string() || (value.is_array() && std::all_of(value.begin(), value.end(), is_string));
        check(strings, "'stop' must be a string or an array of strings");
        p.params.stop = value.is_string() ? std::vector<std::string>{value.get<std::string>()}
                                          : value.get<std::vector<std::string>>();
      } else if (key == "raw") {
        p.raw = flag();
      } else if (key == "think") {
        p.think = flag();
      } else {
        fail("unknown key '", key, "'");
      }
    }
    check(j.contains("prompt"), "no \"prompt\"");
  } catch (const std::exception& e) {
    p.error = "line " + std::to_string(number) + ": " + e.what();
  }
  return p;
}

std::vector<FilePrompt> read_prompt_file(const GenerateCli& o) {
  std::ifstream in(o.prompt_file, std::ios::binary);
  check(in.good(), "--prompt-file: cannot open ", o.prompt_file);
  std::vector<FilePrompt> prompts;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.ends_with('\r')) line.pop_back();
    if (line.empty()) continue;  // blank lines separate nothing and ask nothing
    prompts.push_back(parse_prompt_line(line, number, o));
  }
  check(!prompts.empty(), "--prompt-file ", o.prompt_file, " holds no prompt");
  return prompts;
}

// One request's result: a JSON line, or a header line and the text.
void print_outcome(const FilePrompt& p, size_t index, const BatchOutcome& outcome, bool json) {
  const ChatMode mode = p.think ? ChatMode::Thinking : ChatMode::Chat;
  if (json) {
    nlohmann::ordered_json j;
    j["index"] = index;
    j["line"] = p.line;
    j["prompt"] = p.text;
    if (!outcome.ok()) {
      j["error"] = outcome.error;
    } else if (p.raw) {
      j["text"] = outcome.result.text;
    } else {
      const ParsedCompletion parsed = parse_completion(outcome.result.text, mode);
      j["text"] = parsed.content;
      if (!parsed.reasoning_content.empty()) j["reasoning"] = parsed.reasoning_content;
    }
    if (outcome.ok()) j["finish_reason"] = std::string(to_string(outcome.result.finish));
    j["prompt_tokens"] = outcome.result.prompt_tokens;
    j["completion_tokens"] = outcome.result.tokens.size();
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else if (!outcome.ok()) {
    std::printf("### %zu (line %lld): error: %s\n", index + 1, (long long)p.line, outcome.error.c_str());
  } else {
    std::printf("### %zu (line %lld, %zu tokens, finish: %s)\n", index + 1, (long long)p.line,
                outcome.result.tokens.size(), std::string(to_string(outcome.result.finish)).c_str());
    if (p.raw) {
      std::printf("%s\n", outcome.result.text.c_str());
    } else {
      const ParsedCompletion parsed = parse_completion(outcome.result.text, mode);
      if (!parsed.reasoning_content.empty()) std::printf("[reasoning] %s\n", parsed.reasoning_content.c_str());
      std::printf("%s\n", parsed.content.c_str());
    }
  }
  std::fflush(stdout);
}

int run_batch(GenerateCli o) {
  check(o.batch >= 1, "--batch must be at least 1, got ", o.batch);
  const std::vector<FilePrompt> prompts = read_prompt_file(o);
  o.engine.engine.max_batch = std::min<int>(o.batch, int(prompts.size()));
  Engine engine(o.engine.options());
  BatchGenerator generator(engine, BatchGeneratorOptions::from(engine.options()));

  // Requests that cannot be made (a bad line, text the tokenizer refuses) keep their error and their place.
  std::vector<std::optional<uint64_t>> ids(prompts.size());
  std::vector<std::optional<BatchOutcome>> outcomes(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const FilePrompt& p = prompts[i];
    try {
      check(p.error.empty(), p.error);
      check(!p.text.empty(), "line ", p.line, ": the prompt is empty");
      BatchRequest request;
      request.prompt = encode_prompt(engine.tokenizer(), p.text, p.raw, p.think ? ChatMode::Thinking : ChatMode::Chat);
      request.params = p.params;
      request.cancel = &g_cancel;
      ids[i] = generator.submit(std::move(request));
    } catch (const std::exception& e) {
      outcomes[i] = BatchOutcome{{}, e.what()};
    }
  }

  std::signal(SIGINT, [](int) { g_cancel = true; });
  const auto start = std::chrono::steady_clock::now();
  size_t printed = 0, failed = 0;
  int64_t prompt_tokens = 0;
  // Results go out in input order, each as soon as it and those before it are done.
  auto print_ready = [&] {
    for (; printed < prompts.size(); ++printed) {
      std::optional<BatchOutcome>& outcome = outcomes[printed];
      if (!outcome) outcome = generator.take(*ids[printed]);
      if (!outcome) break;
      failed += !outcome->ok();
      prompt_tokens += outcome->result.prompt_tokens;
      print_outcome(prompts[printed], printed, *outcome, o.json);
    }
  };
  bool more = true;
  while (more) {
    more = generator.step();
    print_ready();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const BatchStats& stats = generator.stats();
  std::fprintf(stderr,
               "[batch: %zu prompts (%lld tokens, %lld run) | generated %lld tokens in %.2f s, %.1f tok/s | "
               "%lld steps, up to %d sequences | %zu failed]\n",
               prompts.size(), (long long)prompt_tokens, (long long)stats.prompt_tokens,
               (long long)stats.generated_tokens, seconds, seconds > 0 ? double(stats.generated_tokens) / seconds : 0,
               (long long)stats.steps, stats.max_running, failed);
  return failed == 0 ? 0 : 1;
}

int run_generate(const GenerateCli& o) {
  check(o.has_prompt != !o.prompt_file.empty(), "give either a prompt (-p TEXT) or --prompt-file FILE");
  return o.prompt_file.empty() ? run_single(o) : run_batch(o);
}

const CommandRegistration registration{{
    "generate",
    "Generate text for one prompt (chat-encoded unless --raw), streamed as it is produced; or for every line of "
    "--prompt-file, --batch at a time",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<GenerateCli>();
      o->engine.add_to(sub);
      o->sampling.add_to(sub);
      sub.add_option("-p,--prompt", o->prompt, "Prompt text")->each([o](const std::string&) { o->has_prompt = true; });
      CLI::Option* prompt_file = sub.add_option(
          "--prompt-file", o->prompt_file,
          "Prompts, one per line: the text, or a JSON object {\"prompt\": ..., and any of max_tokens, "
          "temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, "
          "seed, stop, raw, think}; generated concurrently, printed in input order");
      sub.add_option("--batch", o->batch, "With --prompt-file: sequences generated at once")
          ->capture_default_str()
          ->needs(prompt_file);
      sub.add_flag("--json", o->json, "With --prompt-file: one JSON object per prompt (text, finish_reason, tokens)")
          ->needs(prompt_file);
      sub.add_flag("--raw", o->raw, "Use the prompt as it is, without the chat template");
      sub.add_flag("--think", o->think, "Thinking mode: the model reasons first (shown dimmed)");
      return [o] { return run_generate(*o); };
    },
}};

}  // namespace
}  // namespace dsv4::app
