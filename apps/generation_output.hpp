// Terminal output of a generation: the completion split into reasoning (dimmed on a terminal) and answer by the
// DSV4 completion parser, and the closing speed line.
#pragma once

#include "runtime/engine.hpp"
#include "tokenizer/chat_output_parser.hpp"

#include <cstdio>
#include <string_view>
#include <unistd.h>

namespace dsv4::app {

class CompletionPrinter {
 public:
  // raw: print the text as it comes (no chat parsing).
  CompletionPrinter(ChatMode mode, bool raw) : parser_(mode), raw_(raw), color_(isatty(fileno(stdout))) {}

  void feed(std::string_view text) {
    if (raw_) return print(text, false);
    const ChatStreamDelta delta = parser_.feed(text);
    print(delta.reasoning_content, true);
    print(delta.content, false);
  }
  // Returns the parsed completion (empty for raw output).
  ParsedCompletion finish() {
    if (!raw_) {
      const ChatStreamDelta delta = parser_.finish();
      print(delta.reasoning_content, true);
      print(delta.content, false);
    }
    if (in_reasoning_ && color_) std::fputs("\033[0m", stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    return raw_ ? ParsedCompletion{} : parser_.result();
  }

 private:
  void print(std::string_view text, bool reasoning) {
    if (text.empty()) return;
    if (reasoning != in_reasoning_) {
      if (color_) std::fputs(reasoning ? "\033[2m" : "\033[0m", stdout);
      if (!reasoning && !color_) std::fputs("\n", stdout);  // without colour, a line break marks the answer
      in_reasoning_ = reasoning;
    }
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }

  ChatStreamParser parser_;
  bool raw_;
  bool color_;
  bool in_reasoning_ = false;
};

inline void print_generation_stats(const GenerationResult& r) {
  const double prompt_rate = r.prefill_seconds > 0 ? double(r.prefilled_tokens) / r.prefill_seconds : 0;
  const double decode_rate = r.decode_seconds > 0 ? double(r.tokens.size()) / r.decode_seconds : 0;
  std::fprintf(stderr, "[prompt %lld tokens (%lld run) %.1f tok/s | generated %zu tokens %.1f tok/s | finish: %s]\n",
               (long long)r.prompt_tokens, (long long)r.prefilled_tokens, prompt_rate, r.tokens.size(), decode_rate,
               std::string(to_string(r.finish)).c_str());
}

}  // namespace dsv4::app
