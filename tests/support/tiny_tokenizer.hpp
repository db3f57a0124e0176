// A byte-level BPE tokenizer.json sized for the tiny test models (vocab 512): BOS = 0 and EOS = 1 as the models'
// configs say, the 256 bytes, the DSV4 chat special tokens, and merges of common letter pairs to fill the rest.
#pragma once

#include "support/byte_level.hpp"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>

namespace dsv4::testing {

inline void write_tiny_tokenizer(const std::filesystem::path& dir, int vocab_size = 512) {
  using Json = nlohmann::json;
  Json vocab = Json::object(), merges = Json::array(), added = Json::array();
  int next = 0;
  auto special = [&](const std::string& content) {
    added.push_back({{"id", next}, {"content", content}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
    vocab[content] = next++;
  };
  special("<｜begin▁of▁sentence｜>");
  special("<｜end▁of▁sentence｜>");
  for (int b = 0; b < 256; ++b) vocab[byte_level_spelling((unsigned char)b)] = next++;
  for (const char* s : {"<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"}) special(s);
  const std::string letters = "etaoinshrdlucmfwypvbgk ";
  for (char a : letters)
    for (char b : letters) {
      if (next >= vocab_size) break;
      const std::string left = byte_level_spelling((unsigned char)a), right = byte_level_spelling((unsigned char)b);
      if (vocab.contains(left + right)) continue;
      merges.push_back(left + " " + right);
      vocab[left + right] = next++;
    }
  const Json split = {{"type", "Split"},
                      {"pattern", {{"Regex", R"( ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+)"}}},
                      {"behavior", "Isolated"},
                      {"invert", false}};
  const Json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         Json::array({split, {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
                              {"use_regex", false}}})}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"vocab", vocab},
        {"merges", merges}}}};
  std::ofstream(dir / "tokenizer.json") << tokenizer.dump(1);
  std::ofstream(dir / "tokenizer_config.json")
      << Json{{"add_bos_token", true}, {"add_eos_token", false}, {"bos_token", "<｜begin▁of▁sentence｜>"},
              {"eos_token", "<｜end▁of▁sentence｜>"}}
             .dump(1);
}

}  // namespace dsv4::testing
