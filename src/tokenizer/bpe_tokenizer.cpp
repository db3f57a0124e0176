#include "tokenizer/bpe_tokenizer.hpp"

#include "core/error.hpp"
#include "tokenizer/utf8.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <utility>

namespace dsv4 {
namespace {

using Json = nlohmann::json;

// ---------------------------------------------------------------------------------------------------------------
// JSON access that names the field at fault.

// `path` names `object` ("" for the top level).
const Json& field(const Json& object, const char* key, const std::string& path) {
  check(object.is_object(), path.empty() ? "the top level" : path, " must be a JSON object");
  const auto it = object.find(key);
  check(it != object.end(), path, path.empty() ? "" : ".", key, " is missing");
  return *it;
}

std::string as_string(const Json& value, const std::string& path) {
  check(value.is_string(), path, " must be a string");
  return value.get<std::string>();
}

bool as_bool(const Json& value, const std::string& path) {
  check(value.is_boolean(), path, " must be true or false");
  return value.get<bool>();
}

// Ids are bounded so that a corrupt file cannot make us allocate gigabytes for the id tables.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

int32_t as_token_id(const Json& value, const std::string& path) {
  check(value.is_number_integer(), path, " must be an integer token id");
  const int64_t id = value.get<int64_t>();
  check(id >= 0 && id <= kMaxTokenId, path, " = ", id, " is not a token id in [0, ", kMaxTokenId, "]");
  return static_cast<int32_t>(id);
}

bool is_null_or(const Json& object, const char* key, const std::function<bool(const Json&)>& accept) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() || accept(*it);
}

// ---------------------------------------------------------------------------------------------------------------
// GPT-2 byte alphabet: every byte maps to a printable code point, so BPE tokens are strings of those.

struct ByteAlphabet {
  std::array<std::string, 256> byte_to_utf8;  // byte -> UTF-8 of its code point
  std::array<int16_t, 324> code_point_to_byte;  // code point (all are < 324) -> byte, -1 if not in the alphabet

  ByteAlphabet() {
    code_point_to_byte.fill(-1);
    int next_extra = 256;
    for (int byte = 0; byte < 256; ++byte) {
      const bool printable = (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
      const int code_point = printable ? byte : next_extra++;
      code_point_to_byte[code_point] = static_cast<int16_t>(byte);
      std::string& utf8 = byte_to_utf8[byte];
      if (code_point < 0x80) {
        utf8 = std::string(1, static_cast<char>(code_point));
      } else {
        utf8 = {static_cast<char>(0xC0 | (code_point >> 6)), static_cast<char>(0x80 | (code_point & 0x3F))};
      }
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// The bytes a token stands for, as HF's ByteLevel decoder computes them: every character mapped back through the
// byte alphabet, or the token's own UTF-8 when some character is outside the alphabet (added tokens like "<｜User｜>").
std::string token_to_bytes(const std::string& token) {
  const ByteAlphabet& alphabet = byte_alphabet();
  std::string bytes;
  for (std::size_t pos = 0; pos < token.size();) {
    const auto lead = static_cast<unsigned char>(token[pos]);
    int code_point = -1;
    if (lead < 0x80) {
      code_point = lead;
      pos += 1;
    } else if ((lead & 0xE0) == 0xC0 && pos + 1 < token.size()) {
      code_point = ((lead & 0x1F) << 6) | (static_cast<unsigned char>(token[pos + 1]) & 0x3F);
      pos += 2;
    } else {
      return token;
    }
    if (code_point >= static_cast<int>(alphabet.code_point_to_byte.size()) ||
        alphabet.code_point_to_byte[code_point] < 0) {
      return token;
    }
    bytes.push_back(static_cast<char>(alphabet.code_point_to_byte[code_point]));
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------------------------
// One pre-tokenizer Split regex (behavior Isolated): every match is a piece and so is every gap between matches.

// GPT-2's pattern, which ByteLevel(use_regex = true) applies before mapping bytes.
constexpr std::string_view kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class SplitRegex {
 public:
  SplitRegex(const std::string& pattern, bool literal, const std::string& where) : pattern_(pattern) {
    int error_code = 0;
    PCRE2_SIZE error_offset = 0;
    const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &error_code,
                          &error_offset, nullptr);
    if (code_ == nullptr) {
      fail(where, ": regex ", pattern, " does not compile at offset ", error_offset, ": ", error_message(error_code));
    }
    const int jit_status = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);
    jit_ = jit_status == 0;
    if (!jit_) {
      std::fprintf(stderr, "dsv4 tokenizer: note: PCRE2 JIT unavailable for %s (%s); using the interpreter\n",
                   where.c_str(), error_message(jit_status).c_str());
    }
  }
  SplitRegex(const SplitRegex&) = delete;
  SplitRegex& operator=(const SplitRegex&) = delete;
  ~SplitRegex() { pcre2_code_free(code_); }

  bool jit() const { return jit_; }
  pcre2_match_data* new_match_data() const { return pcre2_match_data_create_from_pattern(code_, nullptr); }

  // Calls on_piece(piece) for each non-empty piece of `text`, in order. `text` must be valid UTF-8.
  template <typename OnPiece>
  void split(std::string_view text, pcre2_match_data* match_data, OnPiece&& on_piece) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    PCRE2_SIZE*const ovector = pcre2_get_ovector_pointer(match_data);
    std::size_t piece_begin = 0;
    std::size_t search_from = 0;
    while (search_from < text.size()) {
      // The text was validated once up front, so PCRE2 need not re-check UTF-8 on every call.
      const int rc = jit_ ? pcre2_jit_match(code_, subject, text.size(), search_from, PCRE2_NO_UTF_CHECK,
                                            match_data, nullptr)
                          : pcre2_match(code_, subject, text.size(), search_from, PCRE2_NO_UTF_CHECK, match_data,
                                        nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail("pre-tokenizer regex ", pattern_, ": matching failed: ", error_message(rc));
      const std::size_t match_begin = ovector[0];
      const std::size_t match_end = ovector[1];
      if (match_end == match_begin) {
        // An empty match makes no piece (HF drops empty splits); step over one character and search again.
        search_from = match_end + utf8::read_sequence(text.substr(match_end)).length;
        continue;
      }
      if (match_begin > piece_begin) on_piece(text.substr(piece_begin, match_begin - piece_begin));
      on_piece(text.substr(match_begin, match_end - match_begin));
      piece_begin = search_from = match_end;
    }
    if (piece_begin < text.size()) on_piece(text.substr(piece_begin));
  }

 private:
  static std::string error_message(int code) {
    PCRE2_UCHAR buffer[256];
    return pcre2_get_error_message(code, buffer, sizeof buffer) < 0 ? "unknown PCRE2 error"
                                                                    : reinterpret_cast<const char*>(buffer);
  }

  std::string pattern_;
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// ---------------------------------------------------------------------------------------------------------------
// Added-token matcher: a byte trie searched leftmost-longest (what HF's Aho-Corasick matcher returns).

class AddedTokenMatcher {
 public:
  void add(std::string_view content, int32_t id) {
    int32_t node = 0;
    for (const char c : content) {
      const auto byte = static_cast<unsigned char>(c);
      int32_t child = find_child(node, byte);
      if (child < 0) {
        child = static_cast<int32_t>(nodes_.size());
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].token_id = id;
    first_byte_[static_cast<unsigned char>(content[0])] = true;
    empty_ = false;
  }

  bool empty() const { return empty_; }

  // The longest token starting at `pos`: {length, id}, or {0, -1}.
  std::pair<std::size_t, int32_t> longest_at(std::string_view text, std::size_t pos) const {
    std::pair<std::size_t, int32_t> best{0, -1};
    if (!first_byte_[static_cast<unsigned char>(text[pos])]) return best;
    int32_t node = 0;
    for (std::size_t i = pos; i < text.size(); ++i) {
      node = find_child(node, static_cast<unsigned char>(text[i]));
      if (node < 0) break;
      if (nodes_[node].token_id >= 0) best = {i + 1 - pos, nodes_[node].token_id};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token_id = -1;
  };

  int32_t find_child(int32_t node, unsigned char byte) const {
    for (const auto& [child_byte, child] : nodes_[node].children) {
      if (child_byte == byte) return child;
    }
    return -1;
  }

  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

// A stretch of the input: either plain text (token_id < 0) or one added token.
struct Segment {
  std::string_view text;
  int32_t token_id;
};

// Splits `text` on the matcher's tokens, leftmost-longest, appending the pieces to `out`.
void split_on_added_tokens(std::string_view text, const AddedTokenMatcher& matcher, std::vector<Segment>& out) {
  if (matcher.empty()) {
    if (!text.empty()) out.push_back({text, -1});
    return;
  }
  std::size_t text_begin = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const auto [length, id] = matcher.longest_at(text, pos);
    if (length == 0) {
      ++pos;
      continue;
    }
    if (pos > text_begin) out.push_back({text.substr(text_begin, pos - text_begin), -1});
    out.push_back({text.substr(pos, length), id});
    pos += length;
    text_begin = pos;
  }
  if (text_begin < text.size()) out.push_back({text.substr(text_begin), -1});
}

struct MergeRule {
  int32_t rank;
  int32_t merged_id;
};

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Merge rules keyed by the pair of token ids: open addressing with linear probing, because the merge loop does
// one lookup per candidate pair and std::unordered_map's node chasing costs several cache misses per lookup.
class MergeTable {
 public:
  void reserve(std::size_t count) {
    std::size_t capacity = 16;
    while (capacity < 2 * count) capacity *= 2;
    if (capacity > slots_.size()) rehash(capacity);
  }

  void insert_or_assign(uint64_t key, MergeRule rule) {
    if (2 * (size_ + 1) > slots_.size()) rehash(std::max<std::size_t>(16, 2 * slots_.size()));
    Slot& slot = slots_[probe(key)];
    if (slot.key == kEmptyKey) ++size_;
    slot = {key, rule};
  }

  const MergeRule* find(uint64_t key) const {
    if (slots_.empty()) return nullptr;
    const Slot& slot = slots_[probe(key)];
    return slot.key == key ? &slot.rule : nullptr;
  }

 private:
  // Token ids are below 2^24, so no real pair has this key.
  static constexpr uint64_t kEmptyKey = ~uint64_t{0};
  struct Slot {
    uint64_t key = kEmptyKey;
    MergeRule rule{};
  };

  // Index of the slot holding `key`, or of the empty slot where it would go.
  std::size_t probe(uint64_t key) const {
    const std::size_t mask = slots_.size() - 1;
    std::size_t idx = static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ULL) >> 32) & mask;
    while (slots_[idx].key != key && slots_[idx].key != kEmptyKey) idx = (idx + 1) & mask;
    return idx;
  }

  void rehash(std::size_t capacity) {
    std::vector<Slot> old = std::exchange(slots_, std::vector<Slot>(capacity));
    for (const Slot& slot : old) {
      if (slot.key != kEmptyKey) slots_[probe(slot.key)] = slot;
    }
  }

  std::vector<Slot> slots_;
  std::size_t size_ = 0;
};

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view text) const { return std::hash<std::string_view>{}(text); }
};

using StringToId = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  check(file.good(), "cannot open ", path.string());
  std::ostringstream contents;
  contents << file.rdbuf();
  check(!file.bad(), "cannot read ", path.string());
  return std::move(contents).str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string origin;

  // Id tables (index = id). A gap in the ids has an empty spelling and assigned = false.
  std::vector<std::string> spelling;
  std::vector<std::string> bytes;
  std::vector<uint8_t> assigned;
  std::vector<uint8_t> special;

  StringToId vocab;        // model vocab: byte-alphabet spelling -> id
  StringToId added_by_content;
  AddedTokenMatcher raw_added;         // added tokens with normalized = false: matched on the raw text
  AddedTokenMatcher normalized_added;  // normalized = true: matched afterwards, in the gaps

  std::vector<std::unique_ptr<SplitRegex>> splits;
  std::array<int32_t, 256> byte_token{};  // id of each byte's single-character token, -1 if the vocab lacks it
  MergeTable merges;
  bool ignore_merges = false;

  std::vector<int32_t> prefix_ids;  // what encode_prompt puts before and after the text
  std::vector<int32_t> suffix_ids;
  std::optional<int32_t> bos;
  std::optional<int32_t> eos;

  // BPE results per pre-token piece. Bounded: cleared when full, which keeps the hot words of a steady workload.
  static constexpr std::size_t kCacheCapacity = 1 << 16;
  static constexpr std::size_t kMaxCachedPieceBytes = 256;
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache;

  void set_token(int32_t id, const std::string& token) {
    if (static_cast<std::size_t>(id) >= spelling.size()) {
      spelling.resize(id + 1);
      bytes.resize(id + 1);
      assigned.resize(id + 1, 0);
      special.resize(id + 1, 0);
    }
    spelling[id] = token;
    bytes[id] = token_to_bytes(token);
    assigned[id] = 1;
  }

  void check_id(int32_t id) const {
    check(id >= 0 && static_cast<std::size_t>(id) < spelling.size(), "token id ", id, " is out of range (",
          origin, " has ", spelling.size(), " ids)");
    check(assigned[id] != 0, "token id ", id, " has no token in ", origin);
  }

  void load_model(const Json& model);
  void load_added_tokens(const Json& added_tokens);
  void load_normalizer(const Json& normalizer, const std::string& path) const;
  void load_pre_tokenizer(const Json& pre_tokenizer, const std::string& path, bool& saw_byte_level);
  void load_post_processor(const Json& post_processor, const std::string& path);
  void load_config(const Json& config, const std::string& config_origin);

  // Runs splits[split_idx..] over `piece` (each split on every piece of the one before, as HF's Sequence does)
  // and appends the BPE ids of the final pieces. match_data[i] is this call's PCRE2 scratch for splits[i].
  void split_from(std::string_view piece, std::size_t split_idx, std::vector<pcre2_match_data*>& match_data,
                  std::vector<int32_t>& out) const;
  // BPE of one final piece, through the cache.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
  void merge_piece(std::string_view piece, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::load_model(const Json& model) {
  const std::string type = as_string(field(model, "type", "model"), "model.type");
  check(type == "BPE", "model.type '", type, "' is not supported (only BPE)");
  check(is_null_or(model, "dropout", [](const Json& v) { return v.is_number() && v.get<double>() == 0.0; }),
        "model.dropout is not supported (it must be null)");
  check(is_null_or(model, "unk_token", [](const Json&) { return false; }),
        "model.unk_token is not supported (a byte-level BPE needs none; it must be null)");
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    check(is_null_or(model, affix, [](const Json& v) { return v.is_string() && v.get<std::string>().empty(); }),
          "model.", affix, " is not supported (it must be null)");
  }
  check(is_null_or(model, "byte_fallback", [](const Json& v) { return v.is_boolean() && !v.get<bool>(); }),
        "model.byte_fallback = true is not supported");
  if (model.contains("ignore_merges")) ignore_merges = as_bool(model["ignore_merges"], "model.ignore_merges");

  const Json& vocab_json = field(model, "vocab", "model");
  check(vocab_json.is_object(), "model.vocab must be an object of token -> id");
  vocab.reserve(vocab_json.size());
  for (const auto& [token, id_json] : vocab_json.items()) {
    const int32_t id = as_token_id(id_json, "model.vocab[\"" + token + "\"]");
    if (static_cast<std::size_t>(id) < assigned.size() && assigned[id] != 0) {
      fail("model.vocab gives id ", id, " to both \"", spelling[id], "\" and \"", token, "\"");
    }
    set_token(id, token);
    vocab.emplace(token, id);
  }

  const ByteAlphabet& alphabet = byte_alphabet();
  for (int byte = 0; byte < 256; ++byte) {
    const auto it = vocab.find(alphabet.byte_to_utf8[byte]);
    byte_token[byte] = it == vocab.end() ? -1 : it->second;
  }

  const Json& merges_json = field(model, "merges", "model");
  check(merges_json.is_array(), "model.merges must be an array");
  merges.reserve(merges_json.size());
  for (std::size_t rank = 0; rank < merges_json.size(); ++rank) {
    const Json& merge = merges_json[rank];
    std::string left;
    std::string right;
    if (merge.is_string()) {
      const std::string line = merge.get<std::string>();
      const std::size_t space = line.find(' ');
      check(space != std::string::npos && line.find(' ', space + 1) == std::string::npos, "model.merges[",
            rank, "] = \"", line, "\" is not two tokens separated by one space");
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else {
      check(merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string(),
            "model.merges[", rank, "] must be \"a b\" or [\"a\", \"b\"]");
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    }
    const auto left_it = vocab.find(left);
    const auto right_it = vocab.find(right);
    const auto merged_it = vocab.find(left + right);
    check(left_it != vocab.end() && right_it != vocab.end(), "model.merges[", rank, "] (\"", left,
          "\" \"", right, "\") uses a token that is not in model.vocab");
    check(merged_it != vocab.end(), "model.merges[", rank, "]: the merged token \"", left + right,
          "\" is not in model.vocab");
    // A repeated pair keeps its last rank, as HF's merge map does.
    merges.insert_or_assign(pair_key(left_it->second, right_it->second), {static_cast<int32_t>(rank), merged_it->second});
  }
}

void Tokenizer::Impl::load_added_tokens(const Json& added_tokens) {
  if (added_tokens.is_null()) return;
  check(added_tokens.is_array(), "added_tokens must be an array");
  for (std::size_t i = 0; i < added_tokens.size(); ++i) {
    const Json& token = added_tokens[i];
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const int32_t id = as_token_id(field(token, "id", path), path + ".id");
    const std::string content = as_string(field(token, "content", path), path + ".content");
    check(!content.empty(), path, ".content is empty");
    utf8::validate(content, path + ".content");
    const bool is_special = token.contains("special") && as_bool(token["special"], path + ".special");
    for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
      check(!token.contains(flag) || !as_bool(token[flag], path + "." + flag), path, " (\"", content,
            "\") sets ", flag, " = true, which is not supported");
    }
    // HF's default: special tokens match the raw text, others the normalized text.
    const bool normalized =
        token.contains("normalized") ? as_bool(token["normalized"], path + ".normalized") : !is_special;
    set_token(id, content);
    special[id] = is_special ? 1 : 0;
    added_by_content[content] = id;
    (normalized ? normalized_added : raw_added).add(content, id);
  }
}

void Tokenizer::Impl::load_normalizer(const Json& normalizer, const std::string& path) const {
  if (normalizer.is_null()) return;
  const std::string type = as_string(field(normalizer, "type", path), path + ".type");
  check(type == "Sequence", path, ".type '", type,
        "' is not supported (only null or a Sequence of supported normalizers)");
  const Json& steps = field(normalizer, "normalizers", path);
  check(steps.is_array(), path, ".normalizers must be an array");
  for (std::size_t i = 0; i < steps.size(); ++i) load_normalizer(steps[i], path + ".normalizers[" + std::to_string(i) + "]");
}

void Tokenizer::Impl::load_pre_tokenizer(const Json& pre_tokenizer, const std::string& path, bool& saw_byte_level) {
  if (pre_tokenizer.is_null()) return;
  const std::string type = as_string(field(pre_tokenizer, "type", path), path + ".type");
  check(!saw_byte_level, path, " (", type,
        ") comes after ByteLevel; only a final ByteLevel step is supported");
  if (type == "Sequence") {
    const Json& steps = field(pre_tokenizer, "pretokenizers", path);
    check(steps.is_array(), path, ".pretokenizers must be an array");
    for (std::size_t i = 0; i < steps.size(); ++i) {
      load_pre_tokenizer(steps[i], path + ".pretokenizers[" + std::to_string(i) + "]", saw_byte_level);
    }
  } else if (type == "Split") {
    const std::string behavior = as_string(field(pre_tokenizer, "behavior", path), path + ".behavior");
    check(behavior == "Isolated", path, ".behavior '", behavior,
          "' is not supported (only Isolated)");
    check(!pre_tokenizer.contains("invert") || !as_bool(pre_tokenizer["invert"], path + ".invert"), "",
          path, ".invert = true is not supported");
    const Json& pattern = field(pre_tokenizer, "pattern", path);
    if (pattern.contains("Regex")) {
      splits.push_back(std::make_unique<SplitRegex>(as_string(pattern["Regex"], path + ".pattern.Regex"), false,
                                                    path));
    } else if (pattern.contains("String")) {
      splits.push_back(std::make_unique<SplitRegex>(as_string(pattern["String"], path + ".pattern.String"), true,
                                                    path));
    } else {
      fail(path, ".pattern must hold \"Regex\" or \"String\"");
    }
  } else if (type == "ByteLevel") {
    check(!pre_tokenizer.contains("add_prefix_space") ||
              !as_bool(pre_tokenizer["add_prefix_space"], path + ".add_prefix_space"),
          path, ".add_prefix_space = true is not supported");
    const bool use_regex =
        !pre_tokenizer.contains("use_regex") || as_bool(pre_tokenizer["use_regex"], path + ".use_regex");
    if (use_regex) {
      splits.push_back(std::make_unique<SplitRegex>(std::string(kByteLevelPattern), false, path));
    }
    saw_byte_level = true;
  } else {
    fail(path, ".type '", type, "' is not supported (only Sequence, Split and ByteLevel)");
  }
}

void Tokenizer::Impl::load_post_processor(const Json& post_processor, const std::string& path) {
  if (post_processor.is_null()) return;
  const std::string type = as_string(field(post_processor, "type", path), path + ".type");
  if (type == "ByteLevel") return;  // it only adjusts offsets, never ids
  if (type == "Sequence") {
    const Json& steps = field(post_processor, "processors", path);
    check(steps.is_array(), path, ".processors must be an array");
    for (std::size_t i = 0; i < steps.size(); ++i) {
      load_post_processor(steps[i], path + ".processors[" + std::to_string(i) + "]");
    }
    return;
  }
  check(type == "TemplateProcessing", path, ".type '", type,
        "' is not supported (only ByteLevel, TemplateProcessing or a Sequence of them)");
  const Json& single = field(post_processor, "single", path);
  const Json& special_tokens = field(post_processor, "special_tokens", path);
  check(single.is_array(), path, ".single must be an array");
  bool after_sequence = false;
  for (std::size_t i = 0; i < single.size(); ++i) {
    const std::string item_path = path + ".single[" + std::to_string(i) + "]";
    const Json& item = single[i];
    if (item.contains("Sequence")) {
      after_sequence = true;
      continue;
    }
    const std::string name = as_string(field(field(item, "SpecialToken", item_path), "id", item_path + ".SpecialToken"),
                                       item_path + ".SpecialToken.id");
    const Json& entry = field(special_tokens, name.c_str(), path + ".special_tokens");
    const Json& ids = field(entry, "ids", path + ".special_tokens." + name);
    check(ids.is_array(), path, ".special_tokens.", name, ".ids must be an array");
    for (const Json& id_json : ids) {
      const int32_t id = as_token_id(id_json, path + ".special_tokens." + name + ".ids[]");
      check(static_cast<std::size_t>(id) < assigned.size() && assigned[id] != 0, path,
            ".special_tokens.", name, " uses id ", id, ", which has no token");
      (after_sequence ? suffix_ids : prefix_ids).push_back(id);
    }
  }
}

void Tokenizer::Impl::load_config(const Json& config, const std::string& config_origin) {
  check(config.is_object(), config_origin, " must be a JSON object");
  // bos_token / eos_token are a string or an AddedToken object {"content": ...}.
  const auto token_named = [&](const char* key) -> std::optional<int32_t> {
    const auto it = config.find(key);
    if (it == config.end() || it->is_null()) return std::nullopt;
    const std::string content = it->is_object() ? as_string(field(*it, "content", key), std::string(key) + ".content")
                                                : as_string(*it, key);
    const auto added = added_by_content.find(content);
    if (added != added_by_content.end()) return added->second;
    const auto in_vocab = vocab.find(content);
    check(in_vocab != vocab.end(), config_origin, ": ", key, " \"", content, "\" is not a token of ", origin);
    return in_vocab->second;
  };
  if (auto id = token_named("bos_token")) bos = id;
  if (auto id = token_named("eos_token")) eos = id;
  if (config.contains("add_bos_token")) {
    prefix_ids.clear();
    if (as_bool(config["add_bos_token"], "add_bos_token")) {
      check(bos.has_value(), config_origin, ": add_bos_token is true but no bos_token is given");
      prefix_ids.push_back(*bos);
    }
  }
  if (config.contains("add_eos_token")) {
    suffix_ids.clear();
    if (as_bool(config["add_eos_token"], "add_eos_token")) {
      check(eos.has_value(), config_origin, ": add_eos_token is true but no eos_token is given");
      suffix_ids.push_back(*eos);
    }
  }
}

void Tokenizer::Impl::split_from(std::string_view piece, std::size_t split_idx,
                                 std::vector<pcre2_match_data*>& match_data, std::vector<int32_t>& out) const {
  if (split_idx == splits.size()) {
    encode_piece(piece, out);
    return;
  }
  splits[split_idx]->split(piece, match_data[split_idx], [&](std::string_view sub_piece) {
    split_from(sub_piece, split_idx + 1, match_data, out);
  });
}

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.size() == 1) {
    merge_piece(piece, out);
    return;
  }
  const bool cacheable = piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    const std::lock_guard lock(cache_mutex);
    const auto it = cache.find(piece);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const std::size_t first = out.size();
  merge_piece(piece, out);
  if (cacheable) {
    const std::lock_guard lock(cache_mutex);
    if (cache.size() >= kCacheCapacity) cache.clear();
    cache.emplace(std::string(piece), std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
  }
}

// BPE on one piece: start from one symbol per byte and repeatedly apply the lowest-rank merge among adjacent
// symbols (leftmost on ties), using a linked list over the symbols and a min-heap of candidate pairs.
void Tokenizer::Impl::merge_piece(std::string_view piece, std::vector<int32_t>& out) const {
  struct Candidate {
    int32_t rank;
    int32_t left_idx;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : left_idx > other.left_idx;
    }
  };
  // Per-thread scratch: a cache miss then costs no allocation beyond the result.
  struct Scratch {
    std::vector<int32_t> symbol;
    std::vector<int32_t> next;
    std::vector<int32_t> prev;
    std::vector<uint8_t> removed;
    std::vector<Candidate> heap;
  };
  thread_local Scratch scratch;

  const std::size_t count = piece.size();
  std::vector<int32_t>& symbol = scratch.symbol;
  symbol.resize(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto byte = static_cast<unsigned char>(piece[i]);
    symbol[i] = byte_token[byte];
    if (symbol[i] < 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(byte));
      fail(origin, ": byte ", hex, " has no token in model.vocab (its byte-level spelling \"",
           byte_alphabet().byte_to_utf8[byte], "\" is missing)");
    }
  }
  if (count == 1) {
    out.push_back(symbol[0]);
    return;
  }
  if (ignore_merges) {
    std::string spelled;
    for (const char c : piece) spelled += byte_alphabet().byte_to_utf8[static_cast<unsigned char>(c)];
    const auto it = vocab.find(spelled);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }

  std::vector<int32_t>& next = scratch.next;
  std::vector<int32_t>& prev = scratch.prev;
  next.resize(count);
  prev.resize(count);
  for (std::size_t i = 0; i < count; ++i) {
    next[i] = i + 1 < count ? static_cast<int32_t>(i + 1) : -1;
    prev[i] = static_cast<int32_t>(i) - 1;
  }
  std::vector<Candidate>& heap = scratch.heap;
  heap.clear();
  const auto push_candidate = [&](int32_t left_idx) {
    if (left_idx < 0 || next[left_idx] < 0) return;
    const MergeRule* rule = merges.find(pair_key(symbol[left_idx], symbol[next[left_idx]]));
    if (rule == nullptr) return;
    heap.push_back({rule->rank, left_idx});
    std::push_heap(heap.begin(), heap.end(), std::greater<>{});
  };
  for (std::size_t i = 0; i + 1 < count; ++i) push_candidate(static_cast<int32_t>(i));

  std::vector<uint8_t>& removed = scratch.removed;
  removed.assign(count, 0);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    const Candidate candidate = heap.back();
    heap.pop_back();
    const int32_t left_idx = candidate.left_idx;
    const int32_t right_idx = next[left_idx];
    // Stale when either side was merged away since the candidate was pushed.
    if (removed[left_idx] || right_idx < 0) continue;
    const MergeRule* rule = merges.find(pair_key(symbol[left_idx], symbol[right_idx]));
    if (rule == nullptr || rule->rank != candidate.rank) continue;
    symbol[left_idx] = rule->merged_id;
    removed[right_idx] = 1;
    next[left_idx] = next[right_idx];
    if (next[left_idx] >= 0) prev[next[left_idx]] = left_idx;
    push_candidate(prev[left_idx]);
    push_candidate(left_idx);
  }
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(symbol[i]);
}

// ---------------------------------------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::filesystem::path& path) {
  std::filesystem::path file = path;
  if (std::filesystem::is_directory(file)) file /= "tokenizer.json";
  check(std::filesystem::is_regular_file(file), "tokenizer file not found: ", file.string());
  const std::filesystem::path config_file = file.parent_path() / "tokenizer_config.json";
  const std::string config_text =
      std::filesystem::is_regular_file(config_file) ? read_text_file(config_file) : std::string();
  return from_json(read_text_file(file), config_text, file.string());
}

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view config_json, std::string origin) {
  auto impl = std::make_unique<Impl>();
  impl->origin = std::move(origin);
  const std::string& name = impl->origin;
  const std::string config_origin =
      (std::filesystem::path(name).parent_path() / "tokenizer_config.json").string();
  try {
    const Json root = Json::parse(tokenizer_json.begin(), tokenizer_json.end());
    check(root.is_object(), "the top level must be a JSON object");
    for (const char* key : {"truncation", "padding"}) {
      check(!root.contains(key) || root[key].is_null(), key, " is not supported (it must be null)");
    }
    impl->load_model(field(root, "model", ""));
    impl->load_added_tokens(root.value("added_tokens", Json()));
    impl->load_normalizer(root.value("normalizer", Json()), "normalizer");
    bool saw_byte_level = false;
    impl->load_pre_tokenizer(root.value("pre_tokenizer", Json()), "pre_tokenizer", saw_byte_level);
    check(saw_byte_level, "pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
    const Json& decoder = root.value("decoder", Json());
    const std::string decoder_type = decoder.is_object() && decoder.contains("type") && decoder["type"].is_string()
                                         ? decoder["type"].get<std::string>()
                                         : std::string(decoder.is_null() ? "null" : decoder.dump());
    check(decoder_type == "ByteLevel", "decoder type '", decoder_type,
          "' is not supported (only ByteLevel)");
    impl->load_post_processor(root.value("post_processor", Json()), "post_processor");
    // Without a tokenizer_config.json the template's own tokens are the best word on BOS and EOS.
    if (!impl->prefix_ids.empty()) impl->bos = impl->prefix_ids.front();
    if (!impl->suffix_ids.empty()) impl->eos = impl->suffix_ids.back();
  } catch (const nlohmann::json::exception& e) {
    fail(name, ": ", e.what());
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
  if (!config_json.empty()) {
    try {
      impl->load_config(Json::parse(config_json.begin(), config_json.end()), config_origin);
    } catch (const nlohmann::json::exception& e) {
      fail(config_origin, ": ", e.what());
    }
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  utf8::validate(text, "text to encode");
  const Impl& impl = *impl_;
  std::vector<Segment> raw_segments;
  std::vector<Segment> segments;
  if (allow_special) {
    split_on_added_tokens(text, impl.raw_added, raw_segments);
    for (const Segment& segment : raw_segments) {
      if (segment.token_id >= 0) {
        segments.push_back(segment);
      } else {
        split_on_added_tokens(segment.text, impl.normalized_added, segments);
      }
    }
  } else if (!text.empty()) {
    segments.push_back({text, -1});
  }

  std::vector<pcre2_match_data*> match_data;
  match_data.reserve(impl.splits.size());
  struct MatchDataFree {
    std::vector<pcre2_match_data*>& all;
    ~MatchDataFree() {
      for (pcre2_match_data* data : all) pcre2_match_data_free(data);
    }
  } free_match_data{match_data};
  for (const auto& split : impl.splits) {
    match_data.push_back(split->new_match_data());
    check(match_data.back() != nullptr, "out of memory for PCRE2 match data");
  }

  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const Segment& segment : segments) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
    } else {
      impl.split_from(segment.text, 0, match_data, ids);
    }
  }
  return ids;
}

std::vector<int32_t> Tokenizer::encode_prompt(std::string_view text, bool allow_special) const {
  std::vector<int32_t> ids = impl_->prefix_ids;
  const std::vector<int32_t> body = encode(text, allow_special);
  ids.insert(ids.end(), body.begin(), body.end());
  ids.insert(ids.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode_bytes(std::span<const int32_t> ids) const {
  std::string out;
  for (const int32_t id : ids) out += token_bytes(id);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string raw;
  for (const int32_t id : ids) {
    const std::string& piece = token_bytes(id);
    if (!(skip_special && impl_->special[id])) raw += piece;
  }
  return utf8::to_lossy(raw);
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  impl_->check_id(id);
  return impl_->bytes[id];
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
  if (const auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
  impl_->check_id(id);
  return impl_->spelling[id];
}

bool Tokenizer::is_special(int32_t id) const {
  impl_->check_id(id);
  return impl_->special[id] != 0;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->spelling.size()); }

bool Tokenizer::has_bos() const { return impl_->bos.has_value(); }
bool Tokenizer::has_eos() const { return impl_->eos.has_value(); }

int32_t Tokenizer::bos_id() const {
  check(impl_->bos.has_value(), impl_->origin,
        ": no BOS token is defined (tokenizer_config.json bos_token or a TemplateProcessing post-processor)");
  return *impl_->bos;
}

int32_t Tokenizer::eos_id() const {
  check(impl_->eos.has_value(), impl_->origin,
        ": no EOS token is defined (tokenizer_config.json eos_token or a TemplateProcessing post-processor)");
  return *impl_->eos;
}

bool Tokenizer::uses_jit() const {
  return std::all_of(impl_->splits.begin(), impl_->splits.end(), [](const auto& split) { return split->jit(); });
}

}  // namespace dsv4
