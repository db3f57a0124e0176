#include <gtest/gtest.h>

#include <algorithm>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "runtime/stop_condition.hpp"

namespace dsv4 {
namespace {

struct ExpectedStop {
  std::string text;                    // everything the client should see
  std::optional<size_t> matched_stop;  // which stop string ended the stream
};

// The definition, by brute force: scan end positions left to right; the first end position where some stop string
// ends wins, and among those the one starting earliest (the longest).
ExpectedStop reference_stop(const std::string& text, const std::vector<std::string>& stops) {
  for (size_t end = 1; end <= text.size(); ++end) {
    std::optional<size_t> best;
    for (size_t i = 0; i < stops.size(); ++i) {
      if (std::string_view(text).substr(0, end).ends_with(stops[i]) &&
          (!best || stops[i].size() > stops[*best].size())) {
        best = i;
      }
    }
    if (best) return {text.substr(0, end - stops[*best].size()), best};
  }
  return {text, std::nullopt};
}

// Longest suffix of `text` that is a proper prefix of a stop string: what the matcher must be holding back.
size_t reference_hold(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& stop : stops) {
    for (size_t length = 1; length < stop.size() && length <= text.size(); ++length) {
      if (std::string_view(text).ends_with(std::string_view(stop).substr(0, length))) hold = std::max(hold, length);
    }
  }
  return hold;
}

// Streams `text` cut at `cuts` (sorted byte offsets) and checks the result and every intermediate state.
void check_stream(const std::string& text, const std::vector<std::string>& stops, const std::vector<size_t>& cuts) {
  const ExpectedStop expected = reference_stop(text, stops);
  StopStringMatcher matcher(stops);
  std::string emitted;
  std::optional<size_t> matched;
  size_t begin = 0;
  std::vector<size_t> ends = cuts;
  ends.push_back(text.size());
  for (const size_t end : ends) {
    const StopStringMatcher::Output out = matcher.push(std::string_view(text).substr(begin, end - begin));
    emitted += out.text;
    begin = end;
    if (out.matched_stop) {
      matched = out.matched_stop;
      break;
    }
    // Nothing is held longer than necessary: all but the undecided suffix has been emitted.
    const std::string consumed = text.substr(0, end);
    ASSERT_EQ(emitted.size(), consumed.size() - reference_hold(consumed, stops))
        << "text '" << text << "' after " << end << " bytes";
  }
  if (!matched) emitted += matcher.flush();
  std::string cut_list;
  for (const size_t cut : cuts) cut_list += std::to_string(cut) + " ";
  ASSERT_EQ(emitted, expected.text) << "text '" << text << "' cut at " << cut_list;
  ASSERT_EQ(matched, expected.matched_stop) << "text '" << text << "' cut at " << cut_list;
}

// Every way of cutting `text` into pieces (all 2^(n-1) cut sets), so a stop string is split at every byte and across
// any number of deltas.
void check_every_split(const std::string& text, const std::vector<std::string>& stops) {
  ASSERT_LE(text.size(), 16u) << "exhaustive splitting is for short texts";
  const size_t gaps = text.empty() ? 0 : text.size() - 1;
  for (uint32_t mask = 0; mask < (1u << gaps); ++mask) {
    std::vector<size_t> cuts;
    for (size_t gap = 0; gap < gaps; ++gap) {
      if (mask & (1u << gap)) cuts.push_back(gap + 1);
    }
    check_stream(text, stops, cuts);
  }
}

TEST(FinishReason, OpenAISpelling) {
  EXPECT_EQ(to_string(FinishReason::Stop), "stop");
  EXPECT_EQ(to_string(FinishReason::Length), "length");
  EXPECT_EQ(to_string(FinishReason::Abort), "abort");
}

TEST(StopCondition, StopTokenIdsAndMaxTokens) {
  const StopCondition condition({7, 2, 99}, 5);
  EXPECT_EQ(condition.check(2, 1), FinishReason::Stop);
  EXPECT_EQ(condition.check(99, 3), FinishReason::Stop);
  EXPECT_EQ(condition.check(7, 4), FinishReason::Stop);
  EXPECT_EQ(condition.check(3, 1), std::nullopt);
  EXPECT_EQ(condition.check(3, 4), std::nullopt);
  EXPECT_EQ(condition.check(3, 5), FinishReason::Length);
  // A stop token on the last allowed token reports Stop, as vLLM does.
  EXPECT_EQ(condition.check(7, 5), FinishReason::Stop);
}

TEST(StopCondition, NoLimit) {
  const StopCondition condition({}, std::nullopt);
  EXPECT_EQ(condition.check(0, 1), std::nullopt);
  EXPECT_EQ(condition.check(5, 1'000'000), std::nullopt);
}

TEST(StopCondition, RejectsNonPositiveMaxTokens) {
  EXPECT_THROW(StopCondition({}, 0), Error);
  EXPECT_THROW(StopCondition({}, -3), Error);
}

TEST(StopStringMatcher, CutsBeforeTheStopString) {
  StopStringMatcher matcher({"</end>"});
  StopStringMatcher::Output out = matcher.push("Hello wor");
  EXPECT_EQ(out.text, "Hello wor");
  out = matcher.push("ld</e");
  EXPECT_EQ(out.text, "ld");
  EXPECT_FALSE(out.matched_stop);
  out = matcher.push("nd> and more");
  EXPECT_EQ(out.text, "");
  EXPECT_EQ(out.matched_stop, 0u);
  EXPECT_TRUE(matcher.matched());
  EXPECT_EQ(matcher.flush(), "");
}

TEST(StopStringMatcher, ReleasesAHeldPrefixThatDidNotComplete) {
  StopStringMatcher matcher({"STOP"});
  EXPECT_EQ(matcher.push("go ST").text, "go ");
  EXPECT_EQ(matcher.push("O").text, "");
  EXPECT_EQ(matcher.push("P").matched_stop, 0u);

  StopStringMatcher other({"STOP"});
  EXPECT_EQ(other.push("go STO").text, "go ");
  EXPECT_EQ(other.push("NE").text, "STONE");
  EXPECT_EQ(other.push("ST").text, "");
  EXPECT_EQ(other.flush(), "ST");
}

TEST(StopStringMatcher, WithoutStopStringsPassesEverythingThrough) {
  StopStringMatcher matcher({});
  EXPECT_EQ(matcher.push("abc").text, "abc");
  EXPECT_EQ(matcher.push("").text, "");
  EXPECT_EQ(matcher.flush(), "");
}

TEST(StopStringMatcher, EverySplitOfASingleStopString) {
  check_every_split("Hello world!", {"world"});
  check_every_split("worldwide", {"world"});
  check_every_split("no match here", {"world"});
  check_every_split("wowor worl", {"world"});
  check_every_split("aaaaab", {"aab"});
}

TEST(StopStringMatcher, EverySplitWithOverlappingStopStrings) {
  // Shared prefixes: the one that completes decides.
  check_every_split("xxabdyy", {"abc", "abd"});
  // A shorter stop string that ends first wins over a longer one that would end later.
  check_every_split("xxabcdyy", {"abcd", "bc"});
  check_every_split("abcdef", {"bcd", "abcde"});
  // Two stop strings ending at the same byte: the longer (earlier-starting) one wins.
  check_every_split("abcde", {"cd", "bcd"});
  check_every_split("abcde", {"bcd", "cd"});
  // A stop string that is a prefix of another.
  check_every_split("1 <|end|> 2", {"<|end|>", "<|"});
  check_every_split("ab ab abc", {"abc", "abx", "b a"});
}

TEST(StopStringMatcher, EverySplitOfUnicodeText) {
  const std::vector<std::string> stops = {"世界", "é!"};
  check_every_split("你好世界!", stops);  // 13 bytes: every cut, including inside a character
  check_every_split("café!", stops);
  // "中" (E4 B8 AD) shares two bytes with "世" (E4 B8 96): those bytes are held back, then released.
  check_every_split("中文中文", stops);
}

TEST(StopStringMatcher, CharacterAlignedDeltasGiveValidUtf8) {
  // Pieces cut at character boundaries, as a detokenizer emits them: held-back text starts at a lead byte, so every
  // emitted piece ends on a character boundary too.
  const std::vector<std::string> characters = {"中", "文", "世", "é", "a", "界"};
  StopStringMatcher matcher({"世界"});
  std::string emitted;
  for (const std::string& character : characters) {
    const StopStringMatcher::Output out = matcher.push(character);
    ASSERT_FALSE(out.matched_stop);
    if (!out.text.empty()) {
      EXPECT_NE(static_cast<unsigned char>(out.text.front()) & 0xC0, 0x80) << "piece starts mid-character";
    }
    emitted += out.text;
  }
  emitted += matcher.flush();
  EXPECT_EQ(emitted, "中文世éa界");
}

TEST(StopStringMatcher, RandomTextsAgainstTheDefinition) {
  // Small alphabet, so partial matches, overlaps and repeats are frequent.
  std::mt19937 rng(20240611);
  const auto random_string = [&rng](size_t min_length, size_t max_length) {
    std::string s(std::uniform_int_distribution<size_t>(min_length, max_length)(rng), ' ');
    for (char& c : s) c = "abc"[std::uniform_int_distribution<int>(0, 2)(rng)];
    return s;
  };
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::string> stops(std::uniform_int_distribution<size_t>(1, 3)(rng));
    for (std::string& stop : stops) stop = random_string(1, 4);
    const std::string text = random_string(0, 30);
    std::vector<size_t> cuts;
    for (size_t position = 1; position < text.size(); ++position) {
      if (rng() % 3 == 0) cuts.push_back(position);
    }
    check_stream(text, stops, cuts);
    if (HasFatalFailure()) return;
  }
}

TEST(StopStringMatcher, RejectsBadUse) {
  EXPECT_THROW(StopStringMatcher({"ok", ""}), Error);
  StopStringMatcher matcher({"x"});
  EXPECT_EQ(matcher.push("ax").matched_stop, 0u);
  EXPECT_THROW(matcher.push("more"), Error);
}

}  // namespace
}  // namespace dsv4
