#include "runtime/sampler.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <utility>

#include "core/error.hpp"

// NOTES: the passes over the whole vocabulary are built for plain x86-64 and for AVX2, picked at load time. No clone
// enables FMA: a fused multiply-add rounds differently, and the probabilities must not depend on the machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSV4_VOCAB_PASS __attribute__((target_clones("default", "avx2")))
#else
#define DSV4_VOCAB_PASS
#endif

namespace dsv4 {
namespace {

constexpr float kInfinity = std::numeric_limits<float>::infinity();
// Tokens per block_mass_ entry: the full-vocabulary draw finds its block first, then walks at most one block.
constexpr size_t kBlock = 256;
// Weight histogram for top_p: a weight in (0, 1] falls in bucket (bits(1.0f) - bits(w)) >> kBucketShift, i.e.
// by exponent and top 3 mantissa bits (buckets 9% wide, most probable first). Bucket kBuckets - 1 holds weight 0.
constexpr uint32_t kOneBits = 0x3F800000u;
constexpr int kBucketShift = 20;
constexpr size_t kBuckets = (kOneBits >> kBucketShift) + 1;
// Tokens with at least this weight (within 6.9 * temperature of the top logit) are tried first for top_p.
constexpr float kLikelyWeight = 0x1.0p-10f;
// A nucleus search sorts its last range once it is this small; top_k's buffer holds at least this many extra.
constexpr size_t kNucleusSortSize = 1024;
// Interleaved copies of the histogram, so consecutive tokens in one bucket do not wait on each other's addition.
constexpr size_t kHistogramCopies = 4;

size_t weight_bucket(float weight) {
  return (kOneBits - std::min(std::bit_cast<uint32_t>(weight), kOneBits)) >> kBucketShift;
}

// The smallest weight in bucket `bucket` (0 for the last one).
float bucket_floor(size_t bucket) {
  if (bucket + 1 >= kBuckets) return 0.0f;
  return std::bit_cast<float>(kOneBits - ((static_cast<uint32_t>(bucket) + 1) << kBucketShift) + 1);
}

bool ranks_before(const auto& a, const auto& b) {
  return a.weight > b.weight || (a.weight == b.weight && a.token < b.token);
}

// exp(x) for x <= 0 (including -inf), relative error < 1e-7, written with plain float arithmetic so that it
// vectorises and gives the same bits everywhere. Results below e^-87 (near float's smallest normal) are 0.
// Range reduction: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for exactness), then Taylor to degree 7.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693145751953125f;  // few mantissa bits: n * kLn2High is exact
  constexpr float kLn2Low = 1.42860682030941723212e-6f;
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  constexpr float kUnderflow = -87.0f;
  const float shifted = x * kLog2e + kRoundingShift;
  const float n = shifted - kRoundingShift;
  const float r = (x - n * kLn2High) - n * kLn2Low;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  // 2^n from the integer in shifted's mantissa; garbage for x < kUnderflow (or -inf), which the mask zeroes.
  const int32_t two_to_n = (std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRoundingShift) + 127) << 23;
  const int32_t keep_mask = -static_cast<int32_t>(x >= kUnderflow);
  return std::bit_cast<float>(std::bit_cast<int32_t>(poly * std::bit_cast<float>(two_to_n)) & keep_mask);
}

struct LogitScan {
  float max;
  bool has_invalid;  // some logit is NaN or +inf
};

// Works on the bit patterns: integer compares vectorise where float compares (which may raise FP exceptions) do not.
// key() maps float order onto int32 order (negative floats get their magnitude bits flipped); it is its own inverse.
DSV4_VOCAB_PASS LogitScan scan_logits(const float* logits, size_t count) {
  constexpr uint32_t kPositiveInfinityBits = 0x7F800000u;
  const auto key = [](int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); };
  int32_t max_key = std::numeric_limits<int32_t>::min();
  uint32_t invalid = 0;
  for (size_t i = 0; i < count; ++i) {
    const int32_t bits = std::bit_cast<int32_t>(logits[i]);
    max_key = std::max(max_key, key(bits));
    const uint32_t magnitude = static_cast<uint32_t>(bits) & 0x7FFFFFFFu;
    invalid |= static_cast<uint32_t>(magnitude > kPositiveInfinityBits) |  // NaN
               static_cast<uint32_t>(static_cast<uint32_t>(bits) == kPositiveInfinityBits);
  }
  return {std::bit_cast<float>(key(max_key)), invalid != 0};
}

// weights[t] = exp((logits[t] - max_logit) / temperature), and the weight sum of each kBlock-token block, each
// summed in a fixed order (8 double lanes, then pairwise) so the result does not depend on the clone.
DSV4_VOCAB_PASS void compute_weights(const float* logits, size_t count, float max_logit, float temperature,
                                     float* weights, double* block_mass) {
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t end = std::min(count, begin + kBlock);
    for (size_t i = begin; i < end; ++i) weights[i] = exp_nonpositive((logits[i] - max_logit) / temperature);
    constexpr size_t kLanes = 8;
    double lanes[kLanes] = {};
    size_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (size_t lane = 0; lane < kLanes; ++lane) lanes[lane] += weights[i + lane];
    }
    double mass = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (; i < end; ++i) mass += weights[i];
    block_mass[begin / kBlock] = mass;
  }
}

uint64_t nondeterministic_seed() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

// Greedy decoding's argmax: the lowest token id holding the maximum.
int32_t first_token_with(std::span<const float> logits, float value) {
  return static_cast<int32_t>(std::find(logits.begin(), logits.end(), value) - logits.begin());
}

void check_token_ids(std::span<const int32_t> ids, const char* name, int32_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    check(ids[i] >= 0 && ids[i] < vocab_size, "sampler: ", name, "[", i, "] = ", ids[i],
          " is outside the vocabulary [0, ", vocab_size, ")");
  }
}

}  // namespace

void validate(const SamplingParams& params, int32_t vocab_size) {
  check(vocab_size > 0, "sampler: vocabulary size ", vocab_size, " must be positive");
  // Comparisons are written so that NaN fails them.
  check(std::isfinite(params.temperature) && params.temperature >= 0.0f, "sampling parameter temperature = ",
        params.temperature, ": must be a finite number >= 0");
  check(params.top_p > 0.0f && params.top_p <= 1.0f, "sampling parameter top_p = ", params.top_p,
        ": must be in (0, 1]");
  check(params.top_k >= 0, "sampling parameter top_k = ", params.top_k, ": must be >= 0 (0 disables it)");
  check(params.min_p >= 0.0f && params.min_p <= 1.0f, "sampling parameter min_p = ", params.min_p,
        ": must be in [0, 1]");
  check(std::isfinite(params.repetition_penalty) && params.repetition_penalty > 0.0f,
        "sampling parameter repetition_penalty = ", params.repetition_penalty, ": must be a finite number > 0");
  check(params.presence_penalty >= -2.0f && params.presence_penalty <= 2.0f, "sampling parameter presence_penalty = ",
        params.presence_penalty, ": must be in [-2, 2]");
  check(params.frequency_penalty >= -2.0f && params.frequency_penalty <= 2.0f,
        "sampling parameter frequency_penalty = ", params.frequency_penalty, ": must be in [-2, 2]");
  for (const auto& [token, bias] : params.logit_bias) {
    check(token >= 0 && token < vocab_size, "sampling parameter logit_bias: token ", token,
          " is outside the vocabulary [0, ", vocab_size, ")");
    check(bias >= -100.0f && bias <= 100.0f, "sampling parameter logit_bias[", token, "] = ", bias,
          ": must be in [-100, 100]");
  }
  for (size_t i = 0; i < params.stop.size(); ++i) {
    check(!params.stop[i].empty(), "sampling parameter stop[", i, "] is an empty string");
  }
  for (size_t i = 0; i < params.stop_token_ids.size(); ++i) {
    const int32_t token = params.stop_token_ids[i];
    check(token >= 0 && token < vocab_size, "sampling parameter stop_token_ids[", i, "] = ", token,
          " is outside the vocabulary [0, ", vocab_size, ")");
  }
  if (params.max_tokens) {
    check(*params.max_tokens >= 1, "sampling parameter max_tokens = ", *params.max_tokens, ": must be >= 1");
  }
}

Sampler::Sampler(SamplingParams params, int32_t vocab_size)
    : params_((validate(params, vocab_size), std::move(params))),
      vocab_size_(vocab_size),
      top_k_on_(params_.top_k > 0 && params_.top_k < vocab_size),
      top_p_on_(params_.top_p < 1.0f),
      min_p_on_(params_.min_p > 0.0f),
      rng_(params_.seed ? *params_.seed : nondeterministic_seed()),
      weights_(static_cast<size_t>(vocab_size)),
      block_mass_((static_cast<size_t>(vocab_size) + kBlock - 1) / kBlock) {
  if (top_p_on_ && !top_k_on_) bucket_mass_.resize(kHistogramCopies * kBuckets);
  if (params_.repetition_penalty != 1.0f) seen_epoch_.assign(static_cast<size_t>(vocab_size), 0);
  if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) {
    output_counts_.assign(static_cast<size_t>(vocab_size), 0);
  }
}

void Sampler::apply_repetition_penalty(std::span<float> logits, std::span<const int32_t> prompt_ids,
                                       std::span<const int32_t> generated_ids) {
  // A new epoch marks every token unseen without clearing the array.
  if (++epoch_ == 0) {
    std::fill(seen_epoch_.begin(), seen_epoch_.end(), 0u);
    epoch_ = 1;
  }
  const float penalty = params_.repetition_penalty;
  for (const std::span<const int32_t> ids : {prompt_ids, generated_ids}) {
    for (const int32_t token : ids) {
      if (seen_epoch_[token] == epoch_) continue;
      seen_epoch_[token] = epoch_;
      float& logit = logits[token];
      logit = logit > 0.0f ? logit / penalty : logit * penalty;
    }
  }
}

void Sampler::apply_frequency_presence_penalties(std::span<float> logits, std::span<const int32_t> generated_ids) {
  for (const int32_t token : generated_ids) {
    if (output_counts_[token]++ == 0) counted_tokens_.push_back(token);
  }
  for (const int32_t token : counted_tokens_) {
    float& logit = logits[token];
    logit -= params_.frequency_penalty * static_cast<float>(output_counts_[token]);
    logit -= params_.presence_penalty;
    output_counts_[token] = 0;
  }
  counted_tokens_.clear();
}

float Sampler::adjust_logits(std::span<float> logits, std::span<const int32_t> prompt_ids,
                             std::span<const int32_t> generated_ids) {
  check(logits.size() == static_cast<size_t>(vocab_size_), "sampler: got ", logits.size(),
        " logits, expected the vocabulary size ", vocab_size_);
  LogitScan scan = scan_logits(logits.data(), logits.size());
  if (scan.has_invalid) {
    for (size_t token = 0; token < logits.size(); ++token) {
      check(!std::isnan(logits[token]), "sampler: the logit of token ", token, " is NaN");
      check(logits[token] != kInfinity, "sampler: the logit of token ", token, " is +inf");
    }
  }
  const bool repetition_on = params_.repetition_penalty != 1.0f;
  const bool frequency_presence_on = params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f;
  // Ids are checked before any state changes, so a bad id leaves the sampler as it was.
  if (repetition_on) check_token_ids(prompt_ids, "prompt_ids", vocab_size_);
  if (repetition_on || frequency_presence_on) check_token_ids(generated_ids, "generated_ids", vocab_size_);

  for (const auto& [token, bias] : params_.logit_bias) logits[token] += bias;
  if (repetition_on) apply_repetition_penalty(logits, prompt_ids, generated_ids);
  if (frequency_presence_on) apply_frequency_presence_penalties(logits, generated_ids);
  if (!params_.logit_bias.empty() || repetition_on || frequency_presence_on) {
    scan = scan_logits(logits.data(), logits.size());
  }
  check(scan.max > -kInfinity, "sampler: every logit is -inf, there is no token to sample");
  return scan.max;
}

double Sampler::gather(float lower) {
  double mass = 0.0;
  for (int32_t token = 0; token < vocab_size_; ++token) {
    const float weight = weights_[token];
    if (weight >= lower && weight > 0.0f) {
      candidates_.push_back({token, weight});
      mass += weight;
    }
  }
  return mass;
}

void Sampler::build_mass_histogram() {
  std::fill(bucket_mass_.begin(), bucket_mass_.end(), 0.0);
  for (size_t token = 0; token < weights_.size(); ++token) {
    bucket_mass_[(token % kHistogramCopies) * kBuckets + weight_bucket(weights_[token])] += weights_[token];
  }
  for (size_t copy = 1; copy < kHistogramCopies; ++copy) {
    for (size_t bucket = 0; bucket < kBuckets; ++bucket) bucket_mass_[bucket] += bucket_mass_[copy * kBuckets + bucket];
  }
}

void Sampler::select_top_k(size_t top_k, float floor) {
  // One pass with a rising bar: candidates collect in a buffer; when it is full, nth_element keeps the best top_k
  // and the bar becomes the k-th weight. Later tokens have higher ids, so one equal to the bar ranks below it.
  const size_t capacity = top_k + std::max(top_k, kNucleusSortSize);
  const auto keep_best = [this, top_k] {
    std::nth_element(candidates_.begin(), candidates_.begin() + static_cast<ptrdiff_t>(top_k - 1),
                     candidates_.end(), ranks_before<Candidate, Candidate>);
    candidates_.resize(top_k);
  };
  float bar = floor;
  bool bar_admits_equal = true;
  for (int32_t token = 0; token < vocab_size_; ++token) {
    const float weight = weights_[token];
    if (!(weight > bar || (bar_admits_equal && weight == bar && weight > 0.0f))) continue;
    candidates_.push_back({token, weight});
    if (candidates_.size() == capacity) {
      keep_best();
      bar = candidates_[top_k - 1].weight;
      bar_admits_equal = false;
    }
  }
  if (candidates_.size() > top_k) keep_best();
}

void Sampler::append_nucleus(std::vector<Candidate>& pool, double mass_above, double target) {
  if (pool.empty() || mass_above >= target) return;
  // Narrow [first, last) to a small range holding the cut: each step splits the range at its middle rank
  // (nth_element) and keeps the half where the running mass crosses the target. Expected O(pool) in total.
  pool_scratch_.assign(pool.begin(), pool.end());
  size_t first = 0;
  size_t last = pool_scratch_.size();
  while (last - first > kNucleusSortSize) {
    const size_t middle = first + (last - first) / 2;
    const auto begin = pool_scratch_.begin();
    std::nth_element(begin + static_cast<ptrdiff_t>(first), begin + static_cast<ptrdiff_t>(middle),
                     begin + static_cast<ptrdiff_t>(last), ranks_before<Candidate, Candidate>);
    double upper_half_mass = 0.0;
    for (size_t i = first; i < middle; ++i) upper_half_mass += pool_scratch_[i].weight;
    if (mass_above + upper_half_mass < target) {
      mass_above += upper_half_mass;  // the whole upper half survives, and so does the candidate at `middle`
      first = middle;
    } else {
      last = middle;  // the cut is in the upper half: everything from `middle` on has >= target above it
    }
  }
  const auto begin = pool_scratch_.begin();
  std::sort(begin + static_cast<ptrdiff_t>(first), begin + static_cast<ptrdiff_t>(last),
            ranks_before<Candidate, Candidate>);
  size_t cut = first;  // the last survivor; `first` always survives (less than target lies above it)
  for (size_t i = first; i < last && mass_above < target; ++i) {
    mass_above += pool_scratch_[i].weight;
    cut = i;
  }
  // Survivors in the pool's own (token id) order, which does not depend on how nth_element arranged the scratch.
  const Candidate last_survivor = pool_scratch_[cut];
  for (const Candidate& candidate : pool) {
    if (!ranks_before(last_survivor, candidate)) candidates_.push_back(candidate);
  }
}

bool Sampler::select_candidates(std::span<const float> logits, float max_logit) {
  compute_weights(logits.data(), logits.size(), max_logit, params_.temperature, weights_.data(), block_mass_.data());
  if (!top_k_on_ && !top_p_on_ && !min_p_on_) return false;
  candidates_.clear();
  // The most probable token has weight exp(0) = 1, so "p >= min_p * p_max" reads weight >= min_p. Nothing below
  // min_p survives, so no filter needs to look below it, except to complete the top_k set's mass for top_p.
  const float min_p = min_p_on_ ? params_.min_p : 0.0f;
  if (!top_k_on_ && !top_p_on_) {
    gather(min_p);
    return true;
  }
  // Every filter keeps a prefix of the probability order, so no path sorts the vocabulary.
  if (top_k_on_) {
    const auto top_k = static_cast<size_t>(params_.top_k);
    // With top_p on, its reference mass is that of the whole top_k set, so min_p must not cut the selection.
    select_top_k(top_k, top_p_on_ ? 0.0f : min_p);
    std::sort(candidates_.begin(), candidates_.end(), ranks_before<Candidate, Candidate>);
    if (top_p_on_) {
      double top_k_mass = 0.0;
      for (const Candidate& candidate : candidates_) top_k_mass += candidate.weight;
      const double target = static_cast<double>(params_.top_p) * top_k_mass;
      size_t keep = 0;
      double mass_above = 0.0;
      while (keep < candidates_.size() && mass_above < target) mass_above += candidates_[keep++].weight;
      candidates_.resize(keep);
    }
  } else {
    double total_mass = 0.0;
    for (const double mass : block_mass_) total_mass += mass;
    const double target = static_cast<double>(params_.top_p) * total_mass;
    // First the tokens near the top: cheap, and usually they hold the nucleus.
    const float likely_floor = std::max(kLikelyWeight, min_p);
    const double likely_mass = gather(likely_floor);
    nucleus_pool_.swap(candidates_);
    candidates_.clear();
    if (likely_mass >= target || likely_floor <= min_p) {
      append_nucleus(nucleus_pool_, 0.0, target);
    } else {
      // Buckets above the one where the mass crosses top_p survive whole (less than top_p lies above any of their
      // tokens), buckets below it do not, and only the boundary bucket is searched for the exact cut.
      build_mass_histogram();
      size_t boundary = 0;
      double mass_above_boundary = 0.0;
      for (; boundary + 1 < kBuckets; ++boundary) {
        if (mass_above_boundary + bucket_mass_[boundary] >= target) break;
        mass_above_boundary += bucket_mass_[boundary];
      }
      nucleus_pool_.clear();
      const float lower = std::max(bucket_floor(boundary), min_p);
      for (int32_t token = 0; token < vocab_size_; ++token) {
        const float weight = weights_[token];
        if (weight < lower || weight == 0.0f) continue;
        (weight_bucket(weight) < boundary ? candidates_ : nucleus_pool_).push_back({token, weight});
      }
      append_nucleus(nucleus_pool_, mass_above_boundary, target);
    }
  }
  if (min_p_on_) std::erase_if(candidates_, [min_p](const Candidate& c) { return c.weight < min_p; });
  return true;
}

int32_t Sampler::draw_from_all_tokens() {
  double total_mass = 0.0;
  for (const double mass : block_mass_) total_mass += mass;
  const double target = rng_.uniform() * total_mass;
  double mass_before = 0.0;
  for (size_t block = 0; block < block_mass_.size(); ++block) {
    if (target >= mass_before + block_mass_[block]) {
      mass_before += block_mass_[block];
      continue;
    }
    const size_t begin = block * kBlock;
    const size_t end = std::min(weights_.size(), begin + kBlock);
    int32_t last_positive = -1;
    for (size_t token = begin; token < end; ++token) {
      if (weights_[token] == 0.0f) continue;
      mass_before += weights_[token];
      last_positive = static_cast<int32_t>(token);
      if (target < mass_before) return last_positive;
    }
    // The block sum was added in another order; the rounding difference lands on the block's last token.
    if (last_positive >= 0) return last_positive;
  }
  // target rounded up to total_mass: the last token that has any weight.
  for (size_t token = weights_.size(); token-- > 0;) {
    if (weights_[token] > 0.0f) return static_cast<int32_t>(token);
  }
  fail("sampler: no token has a nonzero probability");
}

int32_t Sampler::draw_from_candidates() {
  check(!candidates_.empty(), "sampler: no token survived the filters");
  double total_mass = 0.0;
  for (const Candidate& candidate : candidates_) total_mass += candidate.weight;
  const double target = rng_.uniform() * total_mass;
  double cumulative = 0.0;
  for (const Candidate& candidate : candidates_) {
    cumulative += candidate.weight;
    if (target < cumulative) return candidate.token;
  }
  return candidates_.back().token;
}

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> prompt_ids,
                        std::span<const int32_t> generated_ids) {
  const float max_logit = adjust_logits(logits, prompt_ids, generated_ids);
  if (params_.temperature == 0.0f) return first_token_with(logits, max_logit);
  if (!select_candidates(logits, max_logit)) return draw_from_all_tokens();
  return draw_from_candidates();
}

std::vector<TokenProbability> Sampler::distribution(std::span<float> logits, std::span<const int32_t> prompt_ids,
                                                    std::span<const int32_t> generated_ids) {
  const float max_logit = adjust_logits(logits, prompt_ids, generated_ids);
  if (params_.temperature == 0.0f) return {{first_token_with(logits, max_logit), 1.0}};
  if (!select_candidates(logits, max_logit)) {
    candidates_.clear();
    gather(0.0f);
  }
  std::sort(candidates_.begin(), candidates_.end(), ranks_before<Candidate, Candidate>);
  double total_mass = 0.0;
  for (const Candidate& candidate : candidates_) total_mass += candidate.weight;
  std::vector<TokenProbability> result;
  result.reserve(candidates_.size());
  for (const Candidate& candidate : candidates_) {
    result.push_back({candidate.token, static_cast<double>(candidate.weight) / total_mass});
  }
  return result;
}

}  // namespace dsv4
