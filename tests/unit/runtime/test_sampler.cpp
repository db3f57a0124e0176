#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/sampling_math.hpp"
#include "runtime/random.hpp"
#include "runtime/sampler.hpp"
#include "support/expect_error.hpp"

namespace dsv4 {
namespace {

using testing::expect_error;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int32_t kDeepSeekVocab = 129280;

std::vector<float> log_of(const std::vector<double>& probabilities) {
  std::vector<float> logits;
  for (const double p : probabilities) logits.push_back(static_cast<float>(std::log(p)));
  return logits;
}

std::vector<TokenProbability> distribution_of(const SamplingParams& params, std::vector<float> logits) {
  Sampler sampler(params, static_cast<int32_t>(logits.size()));
  return sampler.distribution(logits, {}, {});
}

// Checks the surviving tokens, in order, and their probabilities.
void expect_distribution(const std::vector<TokenProbability>& actual, const std::vector<TokenProbability>& expected,
                         double tolerance = 1e-6) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(actual[i].token, expected[i].token) << "rank " << i;
    EXPECT_NEAR(actual[i].probability, expected[i].probability, tolerance) << "token " << expected[i].token;
  }
}

SamplingParams with_seed(uint64_t seed) {
  SamplingParams params;
  params.seed = seed;
  return params;
}

// ----- parameters and inputs -----

TEST(SamplingParams, DefaultsMatchOpenAI) {
  const SamplingParams params;
  EXPECT_EQ(params.temperature, 1.0f);
  EXPECT_EQ(params.top_p, 1.0f);
  EXPECT_EQ(params.top_k, 0);
  EXPECT_EQ(params.min_p, 0.0f);
  EXPECT_EQ(params.repetition_penalty, 1.0f);
  EXPECT_EQ(params.presence_penalty, 0.0f);
  EXPECT_EQ(params.frequency_penalty, 0.0f);
  EXPECT_TRUE(params.logit_bias.empty());
  EXPECT_FALSE(params.seed);
  EXPECT_FALSE(params.max_tokens);
}

TEST(SamplingParams, BadValuesNameTheParameter) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto expect_rejected = [](const std::function<void(SamplingParams&)>& edit, const std::string& name) {
    SamplingParams params;
    edit(params);
    expect_error([&] { Sampler(params, 100); }, name);
  };
  expect_rejected([](SamplingParams& p) { p.temperature = -0.5f; }, "temperature");
  expect_rejected([&](SamplingParams& p) { p.temperature = nan; }, "temperature");
  expect_rejected([](SamplingParams& p) { p.temperature = INFINITY; }, "temperature");
  expect_rejected([](SamplingParams& p) { p.top_p = 0.0f; }, "top_p");
  expect_rejected([](SamplingParams& p) { p.top_p = 1.5f; }, "top_p");
  expect_rejected([&](SamplingParams& p) { p.top_p = nan; }, "top_p");
  expect_rejected([](SamplingParams& p) { p.top_k = -1; }, "top_k");
  expect_rejected([](SamplingParams& p) { p.min_p = -0.1f; }, "min_p");
  expect_rejected([](SamplingParams& p) { p.min_p = 1.1f; }, "min_p");
  expect_rejected([&](SamplingParams& p) { p.min_p = nan; }, "min_p");
  expect_rejected([](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty");
  expect_rejected([&](SamplingParams& p) { p.repetition_penalty = nan; }, "repetition_penalty");
  expect_rejected([](SamplingParams& p) { p.presence_penalty = 2.5f; }, "presence_penalty");
  expect_rejected([&](SamplingParams& p) { p.presence_penalty = nan; }, "presence_penalty");
  expect_rejected([](SamplingParams& p) { p.frequency_penalty = -3.0f; }, "frequency_penalty");
  expect_rejected([](SamplingParams& p) { p.logit_bias[100] = 1.0f; }, "logit_bias");
  expect_rejected([](SamplingParams& p) { p.logit_bias[-1] = 1.0f; }, "logit_bias");
  expect_rejected([](SamplingParams& p) { p.logit_bias[3] = 101.0f; }, "logit_bias[3]");
  expect_rejected([&](SamplingParams& p) { p.logit_bias[3] = nan; }, "logit_bias[3]");
  expect_rejected([](SamplingParams& p) { p.stop = {"ok", ""}; }, "stop[1]");
  expect_rejected([](SamplingParams& p) { p.stop_token_ids = {5, 100}; }, "stop_token_ids[1]");
  expect_rejected([](SamplingParams& p) { p.max_tokens = 0; }, "max_tokens");
  expect_error([] { Sampler(SamplingParams{}, 0); }, "vocabulary size");
}

TEST(Sampler, BadLogitsNameTheToken) {
  Sampler sampler(with_seed(1), 6);
  std::vector<float> logits = {0, 1, 2, std::numeric_limits<float>::quiet_NaN(), 0, 0};
  expect_error([&] { sampler.sample(logits, {}, {}); }, "token 3 is NaN");
  logits = {0, 1, 2, 3, 4, INFINITY};
  expect_error([&] { sampler.sample(logits, {}, {}); }, "token 5 is +inf");
  logits.assign(6, kNegInf);
  expect_error([&] { sampler.sample(logits, {}, {}); }, "every logit is -inf");
  logits.assign(5, 0.0f);
  expect_error([&] { sampler.sample(logits, {}, {}); }, "expected the vocabulary size 6");
}

TEST(Sampler, BadTokenIdsNameTheirPosition) {
  SamplingParams params = with_seed(1);
  params.repetition_penalty = 1.2f;
  params.frequency_penalty = 0.5f;
  Sampler sampler(params, 4);
  std::vector<float> logits(4, 0.0f);
  const std::vector<int32_t> prompt = {0, 7};
  const std::vector<int32_t> generated = {1, 2, -1};
  expect_error([&] { sampler.sample(logits, prompt, {}); }, "prompt_ids[1] = 7");
  expect_error([&] { sampler.sample(logits, {}, generated); }, "generated_ids[2] = -1");
  // The rejected calls left no counts behind: a clean call applies exactly one frequency penalty.
  const std::vector<int32_t> one = {1};
  logits.assign(4, 0.0f);
  sampler.sample(logits, {}, one);
  EXPECT_FLOAT_EQ(logits[1], -0.5f);
}

// ----- greedy -----

TEST(Sampler, GreedyTakesTheArgmaxAndTheLowestIdOnTies) {
  SamplingParams params;
  params.temperature = 0.0f;
  Sampler sampler(params, 6);
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, kNegInf};
  EXPECT_EQ(sampler.sample(logits, {}, {}), 1);
  logits = {kNegInf, kNegInf, kNegInf, kNegInf, -50.0f, kNegInf};
  EXPECT_EQ(sampler.sample(logits, {}, {}), 4);
  logits = {3.0f, 3.0f, 3.0f, 3.0f, 3.0f, 3.0f};
  EXPECT_EQ(sampler.sample(logits, {}, {}), 0);
  // Greedy ignores the truncation filters but not bias and penalties.
  params.top_k = 1;
  params.logit_bias[4] = 0.2f;
  Sampler biased(params, 6);
  logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 0.0f};
  EXPECT_EQ(biased.sample(logits, {}, {}), 4);
  EXPECT_EQ(biased.distribution(logits, {}, {}).size(), 1u);
}

// ----- logit adjustments (values checked exactly on the returned logits) -----

TEST(Sampler, PenaltiesFollowVllmExactly) {
  SamplingParams params = with_seed(3);
  params.repetition_penalty = 2.0f;
  params.frequency_penalty = 0.5f;
  params.presence_penalty = 0.25f;
  params.logit_bias = {{3, 1.5f}, {5, -4.0f}};
  Sampler sampler(params, 6);
  std::vector<float> logits = {2.0f, -2.0f, 1.0f, 0.0f, 3.0f, 6.0f};
  const std::vector<int32_t> prompt = {0, 1, 0};
  const std::vector<int32_t> generated = {1, 2, 2, 3};
  sampler.sample(logits, prompt, generated);
  // token 0: prompt only -> repetition: 2 / 2.
  EXPECT_EQ(logits[0], 1.0f);
  // token 1: negative -> -2 * 2, then generated once: -0.5 * 1 - 0.25.
  EXPECT_EQ(logits[1], -4.75f);
  // token 2: 1 / 2, generated twice: -0.5 * 2 - 0.25 (repetition applies once per distinct token).
  EXPECT_EQ(logits[2], -0.75f);
  // token 3: bias first (0 + 1.5), then 1.5 / 2, then -0.5 - 0.25.
  EXPECT_EQ(logits[3], 0.0f);
  // token 4: untouched.
  EXPECT_EQ(logits[4], 3.0f);
  // token 5: bias only.
  EXPECT_EQ(logits[5], 2.0f);
}

TEST(Sampler, NegativePresenceAndFrequencyEncourageRepeats) {
  SamplingParams params = with_seed(3);
  params.frequency_penalty = -1.0f;
  params.presence_penalty = -2.0f;
  Sampler sampler(params, 3);
  std::vector<float> logits = {0.0f, 0.0f, 0.0f};
  const std::vector<int32_t> generated = {2, 2, 2};
  sampler.sample(logits, {}, generated);
  EXPECT_EQ(logits[2], 5.0f);
  EXPECT_EQ(logits[0], 0.0f);
}

TEST(Sampler, RepetitionPenaltyBelowOneFavoursSeenTokens) {
  SamplingParams params = with_seed(3);
  params.repetition_penalty = 0.5f;
  Sampler sampler(params, 3);
  std::vector<float> logits = {1.0f, -1.0f, 1.0f};
  const std::vector<int32_t> prompt = {0, 1};
  sampler.sample(logits, prompt, {});
  EXPECT_EQ(logits[0], 2.0f);
  EXPECT_EQ(logits[1], -0.5f);
  EXPECT_EQ(logits[2], 1.0f);
}

TEST(Sampler, LogitBiasShiftsTheDistribution) {
  SamplingParams params;
  params.logit_bias[1] = std::log(2.0f);
  expect_distribution(distribution_of(params, {0.0f, 0.0f, 0.0f}), {{1, 0.5}, {0, 0.25}, {2, 0.25}});
  params.logit_bias[1] = -100.0f;
  const auto banned = distribution_of(params, {0.0f, 0.0f, 0.0f});
  ASSERT_EQ(banned.size(), 2u);  // exp(-100) is below float range: the token cannot be drawn
}

// ----- temperature and the filters, against hand-computed distributions -----

TEST(Sampler, TemperatureScalesLogits) {
  SamplingParams params;
  params.temperature = 2.0f;
  const double root2 = std::sqrt(2.0);
  expect_distribution(distribution_of(params, {0.0f, static_cast<float>(std::log(2.0))}),
                      {{1, root2 / (1 + root2)}, {0, 1 / (1 + root2)}});
  params.temperature = 0.5f;
  // p ∝ p0^2: 0.25, 0.09, 0.04.
  expect_distribution(distribution_of(params, log_of({0.5, 0.3, 0.2})),
                      {{0, 0.25 / 0.38}, {1, 0.09 / 0.38}, {2, 0.04 / 0.38}});
}

TEST(Sampler, TopKKeepsExactlyKWithTiesToTheLowerId) {
  SamplingParams params;
  params.top_k = 2;
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 0.0f};
  expect_distribution(distribution_of(params, logits), {{1, 0.5}, {3, 0.5}});
  params.top_k = 1;
  expect_distribution(distribution_of(params, logits), {{1, 1.0}});
  params.top_k = 3;
  const double e = std::exp(1.0);
  expect_distribution(distribution_of(params, logits), {{1, e / (2 * e + 1)}, {3, e / (2 * e + 1)}, {2, 1 / (2 * e + 1)}});
  params.top_k = 2;
  expect_distribution(distribution_of(params, {3.0f, 2.0f, 2.0f, 2.0f, 1.0f}),
                      {{0, e / (e + 1)}, {1, 1 / (e + 1)}});
  // k at or beyond the vocabulary keeps everything.
  params.top_k = 5;
  EXPECT_EQ(distribution_of(params, logits).size(), 5u);
  params.top_k = 1000;
  EXPECT_EQ(distribution_of(params, logits).size(), 5u);
}

TEST(Sampler, TopPBoundaries) {
  // Four equal tokens, 0.25 each, exactly representable: the boundary cases are exact.
  const std::vector<float> flat = {0.0f, 0.0f, 0.0f, 0.0f};
  SamplingParams params;
  params.top_p = 0.5f;  // two tokens reach exactly 0.5: the third has 0.5 above it and goes
  expect_distribution(distribution_of(params, flat), {{0, 0.5}, {1, 0.5}});
  params.top_p = 0.50001f;
  expect_distribution(distribution_of(params, flat), {{0, 1 / 3.0}, {1, 1 / 3.0}, {2, 1 / 3.0}});
  params.top_p = 0.25f;
  expect_distribution(distribution_of(params, flat), {{0, 1.0}});
  params.top_p = 0.01f;  // the most probable token always stays
  expect_distribution(distribution_of(params, flat), {{0, 1.0}});
  params.top_p = 1.0f;
  EXPECT_EQ(distribution_of(params, flat).size(), 4u);

  const std::vector<float> skewed = log_of({0.5, 0.25, 0.125, 0.125});
  params.top_p = 0.7f;
  expect_distribution(distribution_of(params, skewed), {{0, 2 / 3.0}, {1, 1 / 3.0}});
  params.top_p = 0.8f;
  expect_distribution(distribution_of(params, skewed), {{0, 4 / 7.0}, {1, 2 / 7.0}, {2, 1 / 7.0}});
}

TEST(Sampler, TopPIsOverTheTopKRenormalisedMass) {
  const std::vector<float> logits = log_of({0.4, 0.3, 0.2, 0.1});
  SamplingParams params;
  params.top_p = 0.55f;
  // Alone: token 1 has 0.4 above it, < 0.55.
  expect_distribution(distribution_of(params, logits), {{0, 4 / 7.0}, {1, 3 / 7.0}});
  // After top_k = 2 the reference mass is 0.7: 0.4 >= 0.55 * 0.7 = 0.385, so token 1 goes.
  params.top_k = 2;
  expect_distribution(distribution_of(params, logits), {{0, 1.0}});
}

TEST(Sampler, MinPIsRelativeToTheMaximum) {
  const std::vector<float> logits = log_of({0.5, 0.25, 0.2, 0.05});
  SamplingParams params;
  params.min_p = 0.45f;  // threshold 0.225
  expect_distribution(distribution_of(params, logits), {{0, 2 / 3.0}, {1, 1 / 3.0}});
  params.min_p = 0.35f;  // threshold 0.175
  expect_distribution(distribution_of(params, logits), {{0, 0.5 / 0.95}, {1, 0.25 / 0.95}, {2, 0.2 / 0.95}});
  params.min_p = 1.0f;  // only the maximum, with its ties (exactly at the threshold)
  expect_distribution(distribution_of(params, {1.0f, 2.0f, kNegInf, 2.0f}), {{1, 0.5}, {3, 0.5}});
}

TEST(Sampler, MinPComesAfterTopP) {
  const std::vector<float> logits = log_of({0.4, 0.3, 0.2, 0.1});
  SamplingParams params;
  params.top_p = 0.65f;  // keeps {0, 1}
  params.min_p = 0.8f;   // 0.3 < 0.8 * 0.4
  expect_distribution(distribution_of(params, logits), {{0, 1.0}});
  params.min_p = 0.7f;
  expect_distribution(distribution_of(params, logits), {{0, 4 / 7.0}, {1, 3 / 7.0}});
  // The order matters: top_p = 0.75 keeps {0, 1, 2} (0.7 above token 2), then min_p = 0.45 (threshold 0.18) keeps
  // them all. min_p first (vLLM's order) would leave 0.9 of mass and top_p would drop token 2 (0.7 >= 0.675).
  params.top_p = 0.75f;
  params.min_p = 0.45f;
  expect_distribution(distribution_of(params, logits), {{0, 0.4 / 0.9}, {1, 0.3 / 0.9}, {2, 0.2 / 0.9}});
}

TEST(Sampler, MaskedTokensAreNeverDrawn) {
  Sampler sampler(with_seed(9), 4);
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> logits = {kNegInf, 0.0f, kNegInf, 0.0f};
    const int32_t token = sampler.sample(logits, {}, {});
    ASSERT_TRUE(token == 1 || token == 3) << token;
  }
}

// ----- against a straightforward reference on vocabulary-sized inputs -----

// Sort everything by probability (double precision) and apply the documented filters one by one.
std::vector<TokenProbability> reference_distribution(const SamplingParams& params, const std::vector<float>& logits) {
  const double max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<TokenProbability> tokens;
  // A token can be drawn when its weight rounds to a positive integer mass (and is above exp's underflow).
  const double half_unit = std::ldexp(1.0, -sampling::mass_shift(static_cast<int64_t>(logits.size())) - 1);
  for (size_t t = 0; t < logits.size(); ++t) {
    const double scaled = (logits[t] - max_logit) / params.temperature;
    if (scaled >= -87.0 && std::exp(scaled) > half_unit) {
      tokens.push_back({static_cast<int32_t>(t), std::exp(scaled)});
    }
  }
  std::sort(tokens.begin(), tokens.end(), [](const TokenProbability& a, const TokenProbability& b) {
    return a.probability > b.probability || (a.probability == b.probability && a.token < b.token);
  });
  const auto mass = [&tokens] {
    double sum = 0;
    for (const TokenProbability& t : tokens) sum += t.probability;
    return sum;
  };
  if (params.top_k > 0 && static_cast<size_t>(params.top_k) < tokens.size()) tokens.resize(params.top_k);
  if (params.top_p < 1.0f) {
    const double target = params.top_p * mass();
    double above = 0;
    size_t keep = 0;
    while (keep < tokens.size() && above < target) above += tokens[keep++].probability;
    tokens.resize(keep);
  }
  std::erase_if(tokens, [&](const TokenProbability& t) { return t.probability < params.min_p; });
  const double total = mass();
  for (TokenProbability& t : tokens) t.probability /= total;
  return tokens;
}

TEST(Sampler, FiltersMatchTheReferenceOnFullVocabularies) {
  // Logits on a 1/64 grid from our own generator: the inputs are the same on every platform, equal logits give exact
  // ties (broken by token id in both implementations) and distinct ones differ far beyond rounding.
  struct Shape {
    const char* name;
    int32_t grid_steps;  // logits are -k / 64 for k uniform in [0, grid_steps)
  };
  // Peaked (a few tokens hold the mass), typical, and nearly flat with heavy ties (the nucleus spans most of the
  // vocabulary).
  const Shape shapes[] = {{"peaked", 64 * 40}, {"typical", 64 * 8}, {"flat", 16}};
  struct Filters {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
  };
  const Filters filters[] = {{1.0f, 40, 1.0f, 0.0f},  {0.7f, 0, 0.9f, 0.0f},   {1.3f, 100, 0.8f, 0.0f},
                             {1.0f, 0, 1.0f, 0.05f},  {0.8f, 0, 0.95f, 0.01f}, {1.0f, 50, 0.9f, 0.02f},
                             {1.0f, 5000, 0.5f, 0.0f}, {2.0f, 0, 0.999f, 0.0f}, {1.0f, 0, 1.0f, 1e-4f},
                             {1.0f, 0, 0.9f, 1e-5f},  {1.0f, 200, 1.0f, 1e-3f}, {0.5f, 20000, 1.0f, 0.0f},
                             {3.0f, 0, 0.9999f, 0.0f}, {1.0f, 3000, 0.99f, 0.0f},  {2.0f, 0, 0.99f, 1e-6f}};
  Xoshiro256 rng(77);
  for (const int32_t vocab : {1000, kDeepSeekVocab}) {
    for (const Shape& shape : shapes) {
      std::vector<float> logits(vocab);
      for (float& logit : logits) logit = -static_cast<float>(rng.next() % shape.grid_steps) / 64.0f;
      for (const Filters& f : filters) {
        SamplingParams params;
        params.temperature = f.temperature;
        params.top_k = f.top_k;
        params.top_p = f.top_p;
        params.min_p = f.min_p;
        const std::vector<TokenProbability> expected = reference_distribution(params, logits);
        std::vector<float> scratch = logits;
        Sampler sampler(params, vocab);
        const std::vector<TokenProbability> actual = sampler.distribution(scratch, {}, {});
        SCOPED_TRACE(std::string(shape.name) + " vocab " + std::to_string(vocab) + " T " +
                     std::to_string(f.temperature) + " k " + std::to_string(f.top_k) + " p " +
                     std::to_string(f.top_p) + " min_p " + std::to_string(f.min_p));
        expect_distribution(actual, expected, 1e-6);
        if (HasFailure()) return;
      }
    }
  }
}

// ----- the draw -----

TEST(Sampler, SameSeedSameTokensAndDifferentSeedsDiffer) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(1000);
  for (float& logit : logits) logit = normal(rng);
  const auto run = [&](uint64_t seed, int32_t top_k) {
    SamplingParams params = with_seed(seed);
    params.top_k = top_k;
    Sampler sampler(params, 1000);
    std::vector<int32_t> tokens;
    for (int i = 0; i < 200; ++i) {
      std::vector<float> scratch = logits;
      tokens.push_back(sampler.sample(scratch, {}, {}));
    }
    return tokens;
  };
  for (const int32_t top_k : {0, 50}) {
    EXPECT_EQ(run(42, top_k), run(42, top_k));
    EXPECT_NE(run(42, top_k), run(43, top_k));
  }
}

// ----- the device's share (device_step) -----

TEST(Sampler, DeviceStepCarriesTheAdjustmentsSampleMakes) {
  SamplingParams params = with_seed(4);
  params.repetition_penalty = 1.3f;
  params.presence_penalty = 0.5f;
  params.frequency_penalty = 0.25f;
  params.logit_bias = {{2, 3.0f}, {9, -1.0f}};
  const std::vector<int32_t> prompt = {1, 2, 2, 5};
  const std::vector<int32_t> generated = {5, 7, 7, 7};
  const std::vector<float> logits = {0.5f, -1.25f, 2.0f, 0.0f, 1.0f, 3.5f, -0.75f, 1.5f, 0.25f, -2.0f, 0.125f, 4.0f};
  Sampler host(params, 12);
  Sampler device(params, 12);
  std::vector<float> adjusted = logits;
  host.sample(adjusted, prompt, generated);
  const sampling::SamplingStep step = device.device_step(prompt, generated);
  std::vector<float> applied = logits;
  std::vector<int32_t> tokens;
  for (const sampling::LogitAdjustment& a : step.adjustments) {
    applied[a.token] = sampling::adjust_logit(applied[a.token], a, step.row);
    tokens.push_back(a.token);
    EXPECT_EQ(a.count, std::count(generated.begin(), generated.end(), a.token)) << "token " << a.token;
    EXPECT_EQ(a.repeated, a.token == 9 ? 0 : 1) << "token " << a.token;
  }
  for (size_t t = 0; t < logits.size(); ++t) EXPECT_EQ(applied[t], adjusted[t]) << "token " << t;  // bit for bit
  std::sort(tokens.begin(), tokens.end());
  EXPECT_EQ(tokens, (std::vector<int32_t>{1, 2, 5, 7, 9}));
  EXPECT_EQ(step.row.repetition_penalty, 1.3f);
  EXPECT_EQ(step.row.presence_penalty, 0.5f);
  EXPECT_EQ(step.row.frequency_penalty, 0.25f);
  EXPECT_EQ(step.row.adjustments_count, 5);
}

TEST(Sampler, DeviceStepTakesTheDrawSampleWouldTake) {
  SamplingParams params = with_seed(77);
  params.top_k = 3;
  Sampler sampler(params, 10);
  Xoshiro256 stream(77);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(sampler.device_step({}, {}).row.draw, stream.next() >> 11);
  EXPECT_EQ(sampler.device_step({}, {}).row.top_k, 3);
  // Alternating sample() and device_step() consumes one draw per step, like sample() alone.
  const std::vector<float> logits = log_of({0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05});
  Sampler alone(with_seed(9), 7);
  Sampler alternating(with_seed(9), 7);
  for (int i = 0; i < 50; ++i) {
    std::vector<float> a = logits, b = logits;
    const int32_t want = alone.sample(a, {}, {});
    if (i % 2 == 0) {
      alternating.device_step({}, {});
    } else {
      EXPECT_EQ(alternating.sample(b, {}, {}), want) << "step " << i;
    }
  }
  // Greedy takes no draw; top_k at or above the vocabulary is off.
  params.temperature = 0.0f;
  params.top_k = 10;
  Sampler greedy(params, 10);
  EXPECT_EQ(greedy.device_step({}, {}).row.draw, 0u);
  EXPECT_EQ(greedy.device_step({}, {}).row.top_k, 0);
}

TEST(Sampler, DeviceStepRefusesIdsOutsideTheVocabulary) {
  SamplingParams params = with_seed(1);
  params.repetition_penalty = 1.1f;
  Sampler sampler(params, 6);
  expect_error([&] { sampler.device_step(std::vector<int32_t>{1, 6}, {}); }, "prompt_ids[1] = 6");
  expect_error([&] { sampler.device_step({}, std::vector<int32_t>{-1}); }, "generated_ids[0] = -1");
}

TEST(Random, KnownValuesAndRange) {
  // splitmix64's published first output for seed 0.
  SplitMix64 mixer(0);
  EXPECT_EQ(mixer.next(), 0xE220A8397B1DCDAFull);
  Xoshiro256 a(123);
  Xoshiro256 b(123);
  Xoshiro256 c(124);
  int equal_to_other_seed = 0;
  for (int i = 0; i < 1000; ++i) {
    const double u = a.uniform();
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
    EXPECT_EQ(u, b.uniform());
    equal_to_other_seed += u == c.uniform();
  }
  EXPECT_EQ(equal_to_other_seed, 0);
}

// Draws `draws` tokens and checks each frequency against the distribution within 6 standard deviations.
void expect_frequencies_match(const SamplingParams& params, const std::vector<float>& logits, int draws) {
  Sampler sampler(params, static_cast<int32_t>(logits.size()));
  std::vector<float> scratch = logits;
  const std::vector<TokenProbability> expected = sampler.distribution(scratch, {}, {});
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    scratch = logits;
    ++counts[sampler.sample(scratch, {}, {})];
  }
  int drawn_from_distribution = 0;
  for (const TokenProbability& t : expected) {
    const double p = t.probability;
    const double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(static_cast<double>(counts[t.token]) / draws, p, 6 * sigma + 1e-9) << "token " << t.token;
    drawn_from_distribution += counts[t.token];
  }
  EXPECT_EQ(drawn_from_distribution, draws) << "a token outside the distribution was drawn";
}

TEST(Sampler, FrequenciesFollowTheTemperedDistribution) {
  SamplingParams params = with_seed(2024);
  expect_frequencies_match(params, log_of({0.5, 0.3, 0.15, 0.05}), 100000);
  params.temperature = 0.5f;
  expect_frequencies_match(params, log_of({0.5, 0.3, 0.15, 0.05}), 100000);
  params.temperature = 1.0f;
  params.top_k = 3;
  params.top_p = 0.9f;
  expect_frequencies_match(params, log_of({0.4, 0.25, 0.2, 0.1, 0.05}), 100000);
}

TEST(Sampler, FrequenciesOnAFullVocabulary) {
  // Most mass on a handful of tokens scattered through the vocabulary (so the block-wise draw is exercised), the
  // rest spread thinly over all the others.
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(kDeepSeekVocab);
  for (float& logit : logits) logit = normal(rng);
  for (const int32_t token : {3, 70000, 70001, 129279}) logits[token] = 13.0f - static_cast<float>(token % 3);
  SamplingParams params = with_seed(99);
  Sampler sampler(params, kDeepSeekVocab);
  std::vector<float> scratch = logits;
  const std::vector<TokenProbability> expected = sampler.distribution(scratch, {}, {});
  const int draws = 4000;
  std::vector<int> counts(kDeepSeekVocab, 0);
  for (int i = 0; i < draws; ++i) ++counts[sampler.sample(logits, {}, {})];
  double tail_probability = 1.0;
  int tail_count = draws;
  for (size_t rank = 0; rank < 4; ++rank) {
    const TokenProbability& t = expected[rank];
    const double sigma = std::sqrt(t.probability * (1 - t.probability) / draws);
    EXPECT_NEAR(static_cast<double>(counts[t.token]) / draws, t.probability, 6 * sigma) << "token " << t.token;
    tail_probability -= t.probability;
    tail_count -= counts[t.token];
  }
  const double sigma = std::sqrt(tail_probability * (1 - tail_probability) / draws);
  EXPECT_NEAR(static_cast<double>(tail_count) / draws, tail_probability, 6 * sigma);
}

}  // namespace
}  // namespace dsv4
