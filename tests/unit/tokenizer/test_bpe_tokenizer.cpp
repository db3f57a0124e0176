// Byte-level BPE on small tokenizers built here: the byte alphabet, merge order against a brute-force reference,
// added-token matching, pre-tokenizer splits, prompts, and every kind of bad input.
#include "tokenizer/bpe_tokenizer.hpp"

#include "core/error.hpp"
#include "support/byte_level.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using Json = nlohmann::json;
using Ids = std::vector<int32_t>;
using Merges = std::vector<std::pair<std::string, std::string>>;

using dsv4::testing::byte_level_spelling;

std::string spell(std::string_view bytes) {
  std::string out;
  for (const char c : bytes) out += byte_level_spelling(static_cast<unsigned char>(c));
  return out;
}

// A byte-level BPE tokenizer.json: ids 0..255 are the single bytes (id = byte value), then one id per merge
// result in merge order. Merges are given as raw byte strings.
struct SmallTokenizer {
  Json json;
  std::map<std::string, int32_t> ids;  // raw bytes -> id

  explicit SmallTokenizer(const Merges& merges = {},
                          bool merges_as_pairs = false) {
    Json vocab = Json::object();
    for (int b = 0; b < 256; ++b) {
      vocab[byte_level_spelling(static_cast<unsigned char>(b))] = b;
      ids[std::string(1, static_cast<char>(b))] = b;
    }
    Json merge_list = Json::array();
    for (const auto& [left, right] : merges) {
      const std::string merged = left + right;
      if (!ids.contains(merged)) {
        const auto id = static_cast<int32_t>(ids.size());
        ids[merged] = id;
        vocab[spell(merged)] = id;
      }
      if (merges_as_pairs) {
        merge_list.push_back(Json::array({spell(left), spell(right)}));
      } else {
        merge_list.push_back(spell(left) + " " + spell(right));
      }
    }
    json = {{"version", "1.0"},
            {"truncation", nullptr},
            {"padding", nullptr},
            {"added_tokens", Json::array()},
            {"normalizer", nullptr},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers", Json::array({{{"type", "ByteLevel"}, {"add_prefix_space", false},
                                               {"trim_offsets", true}, {"use_regex", false}}})}}},
            {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
            {"model",
             {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
              {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
              {"vocab", vocab}, {"merges", merge_list}}}};
  }

  void add_token(const std::string& content, int32_t id, bool special, bool normalized) {
    json["added_tokens"].push_back(Json{{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
                                    {"rstrip", false}, {"normalized", normalized}, {"special", special}});
  }

  // Inserts a Split(Regex, Isolated) before the ByteLevel step.
  void add_split(const std::string& regex) {
    const Json split = {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"},
                        {"invert", false}};
    Json& steps = json["pre_tokenizer"]["pretokenizers"];
    steps.insert(steps.end() - 1, split);
  }

  dsv4::Tokenizer build(const std::string& config = {}) const {
    return dsv4::Tokenizer::from_json(json.dump(), config, "small/tokenizer.json");
  }
};

// Brute-force BPE: repeatedly merge the adjacent pair with the lowest rank, leftmost first.
Ids reference_bpe(std::string_view text, const Merges& merges,
                  const std::map<std::string, int32_t>& ids) {
  std::map<std::pair<std::string, std::string>, int> rank;
  for (int r = 0; r < static_cast<int>(merges.size()); ++r) rank[merges[r]] = r;  // a repeat keeps its last rank
  std::vector<std::string> symbols;
  for (const char c : text) symbols.emplace_back(1, c);
  while (true) {
    int best = INT_MAX;
    std::size_t best_idx = 0;
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = rank.find({symbols[i], symbols[i + 1]});
      if (it != rank.end() && it->second < best) {
        best = it->second;
        best_idx = i;
      }
    }
    if (best == INT_MAX) break;
    symbols[best_idx] += symbols[best_idx + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best_idx) + 1);
  }
  Ids out;
  for (const std::string& symbol : symbols) out.push_back(ids.at(symbol));
  return out;
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const dsv4::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(BpeTokenizer, EveryByteRoundTrips) {
  const dsv4::Tokenizer tokenizer = SmallTokenizer().build();
  EXPECT_EQ(tokenizer.vocab_size(), 256);
  for (int b = 0; b < 128; ++b) {  // single bytes that are valid UTF-8 by themselves
    const std::string text(1, static_cast<char>(b));
    EXPECT_EQ(tokenizer.encode(text), Ids{b});
  }
  for (int b = 0; b < 256; ++b) {
    const std::string bytes(1, static_cast<char>(b));
    EXPECT_EQ(tokenizer.token_bytes(b), bytes);
    EXPECT_EQ(tokenizer.id_to_token(b), byte_level_spelling(static_cast<unsigned char>(b)));
    EXPECT_EQ(tokenizer.token_to_id(byte_level_spelling(static_cast<unsigned char>(b))), b);
  }
  EXPECT_EQ(tokenizer.encode("é"), (Ids{0xC3, 0xA9}));
  EXPECT_EQ(tokenizer.decode(Ids{0xC3, 0xA9}), "é");
  EXPECT_EQ(tokenizer.encode(""), Ids{});
}

TEST(BpeTokenizer, MergesApplyByRankNotPosition) {
  // "b c" outranks "a b", so "abc" becomes a|bc and then abc through "a bc", never through "ab c".
  const Merges merges = {{"b", "c"}, {"a", "b"}, {"ab", "c"}, {"a", "bc"}};
  const SmallTokenizer small(merges);
  const dsv4::Tokenizer tokenizer = small.build();
  EXPECT_EQ(tokenizer.encode("abc"), Ids{small.ids.at("abc")});
  EXPECT_EQ(tokenizer.encode("ab"), Ids{small.ids.at("ab")});
  EXPECT_EQ(tokenizer.encode("abab"), (Ids{small.ids.at("ab"), small.ids.at("ab")}));
  EXPECT_EQ(tokenizer.encode("cab"), (Ids{'c', small.ids.at("ab")}));
  // Equal pairs merge leftmost first.
  const SmallTokenizer repeats(Merges{{"a", "a"}});
  EXPECT_EQ(repeats.build().encode("aaa"), (Ids{repeats.ids.at("aa"), 'a'}));
}

TEST(BpeTokenizer, RandomMergeTablesMatchBruteForce) {
  std::mt19937 rng(42);
  const std::string alphabet = "abc d\xC3\xA9";
  for (int table = 0; table < 12; ++table) {
    // Random merges over tokens that already exist, so each is reachable.
    std::vector<std::string> tokens = {"a", "b", "c", " ", "d", "\xC3", "\xA9"};
    Merges merges;
    for (int m = 0; m < 60; ++m) {
      const std::string& left = tokens[rng() % tokens.size()];
      const std::string& right = tokens[rng() % tokens.size()];
      merges.emplace_back(left, right);
      tokens.push_back(left + right);
    }
    const SmallTokenizer small(merges, /*merges_as_pairs=*/table % 2 == 1);
    const dsv4::Tokenizer tokenizer = small.build();
    for (int sample = 0; sample < 300; ++sample) {
      std::string text;
      const int length = static_cast<int>(rng() % 40);
      for (int i = 0; i < length; ++i) {
        const char c = alphabet[rng() % 5];
        text += c == 'd' && rng() % 3 == 0 ? "\xC3\xA9" : std::string(1, c);
      }
      ASSERT_EQ(tokenizer.encode(text), reference_bpe(text, merges, small.ids)) << "table " << table << " text '"
                                                                                  << text << "'";
      // Twice: the second answer comes from the word cache.
      ASSERT_EQ(tokenizer.encode(text), reference_bpe(text, merges, small.ids));
      ASSERT_EQ(tokenizer.decode(tokenizer.encode(text)), text);
    }
  }
}

TEST(BpeTokenizer, SplitRegexesIsolatePiecesInOrder) {
  SmallTokenizer small(Merges{{"3", "4"}, {" ", "x"}});
  EXPECT_EQ(small.build().encode("1234"), (Ids{'1', '2', small.ids.at("34")}));
  // Digits in groups of three: "34" straddles the "123"|"4" boundary and must not merge.
  small.add_split("\\p{N}{1,3}");
  EXPECT_EQ(small.build().encode("1234"), (Ids{'1', '2', '3', '4'}));
  // A second split runs on each piece of the first: " x" survives only where both keep it whole.
  small.add_split("x+");
  EXPECT_EQ(small.build().encode("a xx"), (Ids{'a', ' ', 'x', 'x'}));
  SmallTokenizer spaces(Merges{{" ", "x"}});
  spaces.add_split(" ?x+");
  EXPECT_EQ(spaces.build().encode("a xx"), (Ids{'a', spaces.ids.at(" x"), 'x'}));
  // ByteLevel(use_regex = true) applies GPT-2's pattern: "'s" splits off.
  SmallTokenizer gpt2(Merges{{"t", "'"}});
  gpt2.json["pre_tokenizer"]["pretokenizers"][0]["use_regex"] = true;
  EXPECT_EQ(gpt2.build().encode("it's"), (Ids{'i', 't', '\'', 's'}));
  gpt2.json["pre_tokenizer"]["pretokenizers"][0]["use_regex"] = false;
  EXPECT_EQ(gpt2.build().encode("it's"), (Ids{'i', gpt2.ids.at("t'"), 's'}));
}

TEST(BpeTokenizer, IgnoreMergesTakesWholeWordsFromTheVocab) {
  SmallTokenizer small(Merges{{"a", "b"}});
  small.json["model"]["vocab"][spell("abc")] = 300;
  EXPECT_EQ(small.build().encode("abc"), (Ids{small.ids.at("ab"), 'c'}));
  small.json["model"]["ignore_merges"] = true;
  EXPECT_EQ(small.build().encode("abc"), Ids{300});
}

TEST(BpeTokenizer, AddedTokensMatchLeftmostLongestBeforeBpe) {
  // Ids follow the vocab without gaps, as HF assigns them (the expected ids here are what HF returns).
  SmallTokenizer small(Merges{{"<", "a"}});
  small.add_token("<a>", 257, true, false);
  small.add_token("<a><b>", 258, true, false);
  small.add_token("b>", 259, false, true);
  small.add_token("<ctl>", 260, false, true);
  const dsv4::Tokenizer tokenizer = small.build();
  EXPECT_EQ(tokenizer.vocab_size(), 261);
  EXPECT_EQ(tokenizer.encode("<a><b>"), Ids{258});
  EXPECT_EQ(tokenizer.encode("x<a><b"), (Ids{'x', 257, '<', 'b'}));
  EXPECT_EQ(tokenizer.encode("<a>b>"), (Ids{257, 259}));
  // normalized = false tokens are found first, so "<a>" wins over the earlier-starting "b<a".
  small.json["added_tokens"].clear();
  small.add_token("b<a", 257, false, true);
  small.add_token("<a>", 258, true, false);
  EXPECT_EQ(small.build().encode("b<a>"), (Ids{'b', 258}));
  // allow_special = false: every added token is plain text for BPE.
  EXPECT_EQ(tokenizer.encode("<a><ctl>", /*allow_special=*/false),
            (Ids{small.ids.at("<a"), '>', '<', 'c', 't', 'l', '>'}));
  EXPECT_EQ(tokenizer.token_to_id("<ctl>"), 260);
  EXPECT_TRUE(tokenizer.is_special(257));
  EXPECT_FALSE(tokenizer.is_special(260));
  EXPECT_EQ(tokenizer.decode(Ids{'x', 257, 260}), "x<a><ctl>");
  EXPECT_EQ(tokenizer.decode(Ids{'x', 257, 260}, /*skip_special=*/true), "x<ctl>");
}

TEST(BpeTokenizer, PromptsAddWhatTheConfigOrTemplateSays) {
  SmallTokenizer small;
  small.add_token("<s>", 256, true, false);
  small.add_token("</s>", 257, true, false);
  const Ids hi = {'h', 'i'};
  EXPECT_EQ(small.build().encode_prompt("hi"), hi);
  EXPECT_FALSE(small.build().has_bos());
  EXPECT_NE(error_of([&] { (void)small.build().bos_id(); }).find("no BOS token"), std::string::npos);

  const std::string config = R"({"add_bos_token": true, "add_eos_token": false,
      "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>"})";
  const dsv4::Tokenizer configured = small.build(config);
  EXPECT_EQ(configured.bos_id(), 256);
  EXPECT_EQ(configured.eos_id(), 257);
  EXPECT_EQ(configured.encode_prompt("hi"), (Ids{256, 'h', 'i'}));
  EXPECT_EQ(configured.encode("hi"), hi);

  small.json["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", Json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
      {"pair", Json::array()},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {256}}, {"tokens", {"<s>"}}}},
                          {"</s>", {{"id", "</s>"}, {"ids", {257}}, {"tokens", {"</s>"}}}}}}};
  const dsv4::Tokenizer templated = small.build();
  EXPECT_EQ(templated.encode_prompt("hi"), (Ids{256, 'h', 'i', 257}));
  EXPECT_EQ(templated.bos_id(), 256);
  EXPECT_EQ(templated.eos_id(), 257);
  // The config's add_* flags override the template (the transformers convention).
  EXPECT_EQ(small.build(R"({"add_eos_token": false})").encode_prompt("hi"), (Ids{256, 'h', 'i'}));
}

TEST(BpeTokenizer, InvalidUtf8IsRejectedWithItsOffset) {
  const dsv4::Tokenizer tokenizer = SmallTokenizer().build();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"ab\x80", "byte offset 2 (0x80)"},          // lone continuation byte
      {"\xC0\xAF", "byte offset 0 (0xC0)"},        // overlong "/"
      {"ok \xED\xA0\x80", "byte offset 3 (0xED)"},  // UTF-16 surrogate
      {"\xF5\x80\x80\x80", "byte offset 0 (0xF5)"},  // above U+10FFFF
      {"abc\xE4\xBD", "byte offset 3 (0xE4, the text ends inside"}};
  for (const auto& [text, expected] : cases) {
    const std::string message = error_of([&] { (void)tokenizer.encode(text); });
    EXPECT_NE(message.find("invalid UTF-8 at " + expected), std::string::npos) << message;
  }
}

TEST(BpeTokenizer, BadIdsAreErrorsNotCrashes) {
  SmallTokenizer small;
  small.add_token("<gap-after>", 300, true, false);  // ids 256..299 are unassigned
  const dsv4::Tokenizer tokenizer = small.build();
  EXPECT_NE(error_of([&] { (void)tokenizer.decode(Ids{'a', 301}); }).find("token id 301 is out of range"),
            std::string::npos);
  EXPECT_NE(error_of([&] { (void)tokenizer.decode(Ids{-1}); }).find("token id -1 is out of range"),
            std::string::npos);
  EXPECT_NE(error_of([&] { (void)tokenizer.decode(Ids{280}); }).find("token id 280 has no token"),
            std::string::npos);
  EXPECT_NE(error_of([&] { (void)tokenizer.id_to_token(INT32_MAX); }).find("out of range"), std::string::npos);
  EXPECT_EQ(tokenizer.token_to_id("no such token"), std::nullopt);
}

TEST(BpeTokenizer, MissingByteTokenIsAnError) {
  SmallTokenizer small;
  small.json["model"]["vocab"].erase(byte_level_spelling('z'));
  const dsv4::Tokenizer tokenizer = small.build();
  EXPECT_EQ(tokenizer.encode("ab"), (Ids{'a', 'b'}));
  EXPECT_NE(error_of([&] { (void)tokenizer.encode("az"); }).find("byte 0x7A has no token"), std::string::npos);
}

TEST(BpeTokenizer, UnsupportedOrBrokenFilesNameTheProblem) {
  struct Case {
    std::string what;
    std::function<void(Json&)> edit;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"no model", [](Json& j) { j.erase("model"); }, "model is missing"},
      {"no vocab", [](Json& j) { j["model"].erase("vocab"); }, "model.vocab is missing"},
      {"no merges", [](Json& j) { j["model"].erase("merges"); }, "model.merges is missing"},
      {"WordPiece", [](Json& j) { j["model"]["type"] = "WordPiece"; }, "model.type 'WordPiece' is not supported"},
      {"byte fallback", [](Json& j) { j["model"]["byte_fallback"] = true; }, "byte_fallback = true"},
      {"dropout", [](Json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout"},
      {"negative id", [](Json& j) { j["model"]["vocab"]["a"] = -5; }, "model.vocab[\"a\"] = -5"},
      {"duplicate id", [](Json& j) { j["model"]["vocab"]["zz"] = 1; }, "gives id 1 to both"},
      {"merge of unknown token", [](Json& j) { j["model"]["merges"].push_back("q @@"); }, "model.merges[0]"},
      {"merge without its result",
       [](Json& j) { j["model"]["merges"].push_back("a b"); }, "the merged token \"ab\" is not in model.vocab"},
      {"merge with three parts", [](Json& j) { j["model"]["merges"].push_back("a b c"); }, "one space"},
      {"NFC normalizer", [](Json& j) { j["normalizer"] = {{"type", "NFC"}}; }, "normalizer.type 'NFC'"},
      {"nested normalizer",
       [](Json& j) { j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "Lowercase"}}}}}; },
       "normalizer.normalizers[0].type 'Lowercase'"},
      {"Whitespace pre-tokenizer",
       [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Whitespace"}}; },
       "pre_tokenizer.pretokenizers[0].type 'Whitespace' is not supported"},
      {"no ByteLevel", [](Json& j) { j["pre_tokenizer"] = nullptr; }, "no ByteLevel step"},
      {"prefix space",
       [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["add_prefix_space"] = true; }, "add_prefix_space"},
      {"Removed behavior",
       [](Json& j) {
         const Json split = {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Removed"}};
         j["pre_tokenizer"]["pretokenizers"].insert(j["pre_tokenizer"]["pretokenizers"].begin(), split);
       },
       "behavior 'Removed' is not supported"},
      {"bad regex",
       [](Json& j) {
         const Json split = {{"type", "Split"}, {"pattern", {{"Regex", "(a"}}}, {"behavior", "Isolated"}};
         j["pre_tokenizer"]["pretokenizers"].insert(j["pre_tokenizer"]["pretokenizers"].begin(), split);
       },
       "regex (a does not compile"},
      {"WordPiece decoder", [](Json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, "decoder type 'WordPiece'"},
      {"no decoder", [](Json& j) { j["decoder"] = nullptr; }, "decoder type 'null'"},
      {"Bert post-processor", [](Json& j) { j["post_processor"] = {{"type", "BertProcessing"}}; },
       "post_processor.type 'BertProcessing'"},
      {"lstrip",
       [](Json& j) {
         j["added_tokens"].push_back(Json{{"id", 300}, {"content", "<x>"}, {"lstrip", true}, {"special", true}});
       },
       "added_tokens[0] (\"<x>\") sets lstrip = true"},
      {"added token without id",
       [](Json& j) { j["added_tokens"].push_back(Json{{"content", "<x>"}, {"special", true}}); },
       "added_tokens[0].id is missing"},
      {"truncation", [](Json& j) { j["truncation"] = {{"max_length", 8}}; }, "truncation is not supported"},
      {"string vocab", [](Json& j) { j["model"]["vocab"] = "abc"; }, "model.vocab must be an object"},
  };
  for (const Case& c : cases) {
    SmallTokenizer small;
    c.edit(small.json);
    const std::string message = error_of([&] { (void)small.build(); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.what << ": got \"" << message << "\"";
    EXPECT_EQ(message.rfind("small/tokenizer.json: ", 0), 0u) << c.what << ": got \"" << message << "\"";
  }
  EXPECT_NE(error_of([] { (void)dsv4::Tokenizer::from_json("{\"model\": ", ""); }).find("parse error"),
            std::string::npos);
  EXPECT_NE(error_of([] { (void)SmallTokenizer().build(R"({"bos_token": "<nope>"})"); })
                .find("bos_token \"<nope>\" is not a token"),
            std::string::npos);
}

TEST(BpeTokenizer, FromFileTakesAFileOrItsFolder) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "dsv4_test_bpe_tokenizer";
  std::filesystem::create_directories(dir);
  SmallTokenizer small;
  small.add_token("<s>", 256, true, false);
  std::ofstream(dir / "tokenizer.json") << small.json.dump();
  std::ofstream(dir / "tokenizer_config.json") << R"({"bos_token": "<s>", "add_bos_token": true})";
  EXPECT_EQ(dsv4::Tokenizer::from_file(dir).encode_prompt("a"), (Ids{256, 'a'}));
  EXPECT_EQ(dsv4::Tokenizer::from_file(dir / "tokenizer.json").bos_id(), 256);
  EXPECT_NE(error_of([&] { (void)dsv4::Tokenizer::from_file(dir / "missing.json"); })
                .find("tokenizer file not found"),
            std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST(BpeTokenizer, LongInputsAndManyThreads) {
  SmallTokenizer small(Merges{{" ", " "}, {"  ", "  "}, {"a", "b"}});
  small.add_split("\\s+(?!\\S)|\\s+");
  const dsv4::Tokenizer tokenizer = small.build();
  const std::string spaces(1 << 20, ' ');
  const Ids ids = tokenizer.encode(spaces);
  EXPECT_EQ(ids.size(), std::size_t{1} << 18);
  EXPECT_EQ(tokenizer.decode(ids), spaces);
  std::string words;
  for (int i = 0; i < 20000; ++i) words += "ab" + std::to_string(i % 97) + "  \n";
  const Ids expected = tokenizer.encode(words);
  std::vector<std::thread> threads;
  std::vector<Ids> results(4);
  for (int t = 0; t < 4; ++t) threads.emplace_back([&, t] { results[t] = tokenizer.encode(words); });
  for (std::thread& thread : threads) thread.join();
  for (const Ids& result : results) EXPECT_EQ(result, expected);
}

}  // namespace
