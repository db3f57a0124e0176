// dsv4 logits: run the model on given token ids and write every position's logits (the debugging tool for
// comparing against other implementations).
#include "cli_options.hpp"
#include "command_registry.hpp"
#include "io/npy.hpp"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <sstream>

namespace dsv4::app {
namespace {

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    check(used == item.size() && !item.empty() && value >= 0 && value <= INT32_MAX, "--tokens: '", item,
          "' is not a token id (expected comma-separated non-negative integers)");
    ids.push_back(int32_t(value));
  }
  check(!ids.empty(), "--tokens: no token ids given");
  return ids;
}

struct LogitsOptions {
  EngineCli engine;
  std::string tokens, out;
  int64_t chunk = 0;
  int top = 5;
};

int run_logits(const LogitsOptions& o) {
  check(o.chunk >= 0, "--chunk must be positive");
  const std::vector<int32_t> ids = parse_ids(o.tokens);
  EngineOptions options = o.engine.options();
  options.progress = false;
  Engine engine(options);
  LanguageModel& model = engine.model();
  const int64_t vocab = engine.config().vocab_size, T = int64_t(ids.size());
  const int64_t chunk = o.chunk > 0 ? o.chunk : T;

  auto sequence = model.new_sequence();
  std::vector<float> logits, part;
  logits.reserve(size_t(T * vocab));
  for (int64_t at = 0; at < T; at += chunk) {
    const int64_t n = std::min(chunk, T - at);
    model.forward(*sequence, std::span(ids).subspan(size_t(at), size_t(n)), LogitRows::All, part);
    logits.insert(logits.end(), part.begin(), part.end());
  }

  if (!o.out.empty()) {
    write_npy_f32(o.out, {T, vocab}, logits.data());
    std::fprintf(stderr, "wrote %s: float32 [%lld, %lld]\n", o.out.c_str(), (long long)T, (long long)vocab);
    return 0;
  }
  const int top = int(std::min<int64_t>(o.top, vocab));
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  for (int64_t t = 0; t < T; ++t) {
    const float* row = &logits[size_t(t * vocab)];
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top, order.end(),
                      [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    std::printf("position %lld (token %d):", (long long)t, ids[size_t(t)]);
    for (int k = 0; k < top; ++k) std::printf("  %d:%.4f", order[size_t(k)], row[order[size_t(k)]]);
    std::printf("\n");
  }
  return 0;
}

const CommandRegistration registration{{
    "logits",
    "Run the model on token ids and print the top logits per position, or write them all as .npy",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<LogitsOptions>();
      o->engine.add_to(sub, false);
      sub.add_option("--tokens", o->tokens, "Comma-separated token ids, e.g. 0,1234,56")->required();
      sub.add_option("--chunk", o->chunk, "Prefill in chunks of this many tokens (0 = one call)");
      sub.add_option("--out", o->out, "Write float32 logits [T, vocab] to this .npy file");
      sub.add_option("--top", o->top, "Logits shown per position without --out")->capture_default_str();
      return [o] { return run_logits(*o); };
    },
}};

}  // namespace
}  // namespace dsv4::app
