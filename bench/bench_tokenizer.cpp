// Encoding and decoding throughput of the DeepSeek tokenizer on one core (target: >= 5 MB/s of English text).
// English text: the project's docs in ../shared/docs (prose with some markdown), repeated to 1 MiB; the BPE
// cache is warm after the first pass, as it is in a server. UniqueWords defeats the cache: every word is new,
// so it measures the PCRE2 pre-tokenizer plus the merge loop. Skips when ../shared is absent.
#include "tokenizer/bpe_tokenizer.hpp"
#include "tokenizer/streaming_decoder.hpp"

#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

const std::filesystem::path kShared = DSV4_SHARED_DIR;

const dsv4::Tokenizer* deepseek_tokenizer() {
  static const std::unique_ptr<dsv4::Tokenizer> tokenizer = []() -> std::unique_ptr<dsv4::Tokenizer> {
    const std::filesystem::path dir = kShared / "data/tokenizer-deepseek-v3";
    if (!std::filesystem::exists(dir / "tokenizer.json")) return nullptr;
    return std::make_unique<dsv4::Tokenizer>(dsv4::Tokenizer::from_file(dir));
  }();
  return tokenizer.get();
}

std::string english_text() {
  std::string docs;
  for (const char* name : {"dsv4-model.md", "design.md", "performance.md", "style.md"}) {
    std::ifstream file(kShared / "docs" / name);
    std::ostringstream contents;
    contents << file.rdbuf();
    docs += contents.str();
  }
  if (docs.empty()) return docs;
  std::string text;
  while (text.size() < (1 << 20)) text += docs;
  return text;
}

// Random lowercase "words" of 3-12 letters: almost none repeat, so every piece goes through BPE.
std::string unique_words_text() {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> length(3, 12);
  std::uniform_int_distribution<int> letter('a', 'z');
  std::string text;
  while (text.size() < (1 << 20)) {
    const int n = length(rng);
    for (int i = 0; i < n; ++i) text.push_back(static_cast<char>(letter(rng)));
    text.push_back(' ');
  }
  return text;
}

void run_encode(benchmark::State& state, const std::string& text) {
  const dsv4::Tokenizer* tokenizer = deepseek_tokenizer();
  if (tokenizer == nullptr || text.empty()) {
    state.SkipWithError("no tokenizer or text in ../shared");
    return;
  }
  std::size_t token_count = 0;
  for (auto _ : state) {
    const std::vector<int32_t> ids = tokenizer->encode(text);
    token_count = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.counters["tokens"] = static_cast<double>(token_count);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(token_count), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_EncodeEnglish(benchmark::State& state) {
  static const std::string text = english_text();
  run_encode(state, text);
}
BENCHMARK(BM_EncodeEnglish)->Unit(benchmark::kMillisecond);

void BM_EncodeUniqueWords(benchmark::State& state) {
  static const std::string text = unique_words_text();
  run_encode(state, text);
}
BENCHMARK(BM_EncodeUniqueWords)->Unit(benchmark::kMillisecond);

void BM_StreamingDecodeEnglish(benchmark::State& state) {
  const dsv4::Tokenizer* tokenizer = deepseek_tokenizer();
  static const std::string text = english_text();
  if (tokenizer == nullptr || text.empty()) {
    state.SkipWithError("no tokenizer or text in ../shared");
    return;
  }
  const std::vector<int32_t> ids = tokenizer->encode(text);
  for (auto _ : state) {
    dsv4::StreamingDecoder decoder(*tokenizer);
    std::size_t bytes = 0;
    for (const int32_t id : ids) bytes += decoder.push(id).size();
    benchmark::DoNotOptimize(bytes);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * ids.size()));
}
BENCHMARK(BM_StreamingDecodeEnglish)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
