// Byte-level BPE tokenizer read from a HuggingFace tokenizer.json (the format DeepSeek publishes).
//
// Encoding follows the `tokenizers` library step by step, so ids match it exactly:
//   1. added tokens (special or not) are matched first, leftmost-longest: those with normalized=false on the raw
//      text, then those with normalized=true in the gaps; they never go through BPE;
//   2. the pre-tokenizer's Split regexes run in order, each on every piece the previous one produced (PCRE2 with
//      UTF + UCP, JIT-compiled), then ByteLevel maps each piece's bytes onto the GPT-2 byte alphabet;
//   3. BPE merges each piece by rank (lowest rank first, leftmost on ties).
// What the file may contain is checked on load; anything this implementation does not do (another normalizer,
// lstrip on an added token, a Split behavior other than Isolated, ...) is rejected with an error naming it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv4 {

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a folder that holds one. A tokenizer_config.json beside it, when present,
  // supplies bos_token / eos_token and add_bos_token / add_eos_token (the transformers convention).
  static Tokenizer from_file(const std::filesystem::path& path);
  // The same from in-memory JSON texts; `config_json` may be empty. `origin` names the source in error messages.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view config_json = {},
                             std::string origin = "tokenizer.json");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`, which must be valid UTF-8 (else dsv4::Error naming the byte offset). Adds no BOS/EOS.
  // allow_special = false matches no added token at all, so text from an untrusted user can never produce a
  // control token (stricter than HF's encode_special_tokens, which still matches non-special added tokens).
  // Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  // encode() plus what the tokenizer puts around a single sequence: the ids of tokenizer_config.json's
  // add_bos_token / add_eos_token when it sets them, else those of a TemplateProcessing post-processor.
  std::vector<int32_t> encode_prompt(std::string_view text, bool allow_special = true) const;

  // Text of `ids` (dsv4::Error for an id without a token). Bytes that are not UTF-8 become U+FFFD, as in HF.
  // skip_special drops added tokens marked special (HF's skip_special_tokens).
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The raw bytes of `ids`, possibly not UTF-8 (a multi-byte character may be split across tokens).
  std::string decode_bytes(std::span<const int32_t> ids) const;
  // Raw bytes of one token (dsv4::Error for an id without a token).
  const std::string& token_bytes(int32_t id) const;

  // Id of a token spelled as in the file (added-token content, or a vocab entry in byte-alphabet form).
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token's spelling as in the file; dsv4::Error when the id has no token.
  const std::string& id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;  // an added token flagged "special"
  // One past the largest id (vocab and added tokens); ids below it may still be unassigned gaps.
  int32_t vocab_size() const;

  bool has_bos() const;
  bool has_eos() const;
  int32_t bos_id() const;  // dsv4::Error when the tokenizer files define no BOS token
  int32_t eos_id() const;  // dsv4::Error when the tokenizer files define no EOS token

  // Whether the pre-tokenizer regexes run JIT-compiled (false only where PCRE2 lacks JIT support).
  bool uses_jit() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4
