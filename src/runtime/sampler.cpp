#include "runtime/sampler.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <utility>

#include "core/error.hpp"
#include "core/sampling_math.hpp"

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

// weights[t] = exp((logits[t] - max_logit) * (1 / temperature)) and the integer mass of each kBlock-token block.
DSV4_VOCAB_PASS void compute_weights(const float* logits, size_t count, float max_logit, float temperature,
                                     int mass_shift, float* weights, uint64_t* block_mass) {
  const float inverse_temperature = 1.0f / temperature;
  for (size_t begin = 0; begin < count; begin += kBlock) {
    const size_t end = std::min(count, begin + kBlock);
    for (size_t i = begin; i < end; ++i)
      weights[i] = sampling::tempered_weight(logits[i], max_logit, inverse_temperature);
    uint64_t mass = 0;
    for (size_t i = begin; i < end; ++i) mass += sampling::weight_mass(weights[i], mass_shift);
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
      repetition_on_(params_.repetition_penalty != 1.0f),
      frequency_presence_on_(params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f),
      mass_shift_(sampling::mass_shift(vocab_size)),
      rng_(params_.seed ? *params_.seed : nondeterministic_seed()),
      weights_(static_cast<size_t>(vocab_size)),
      block_mass_((static_cast<size_t>(vocab_size) + kBlock - 1) / kBlock) {
  if (top_p_on_ && !top_k_on_) bucket_mass_.resize(kHistogramCopies * kBuckets);
  if (!params_.logit_bias.empty() || repetition_on_ || frequency_presence_on_) {
    adjustment_epoch_.assign(static_cast<size_t>(vocab_size), 0);
    adjustment_index_.assign(static_cast<size_t>(vocab_size), 0);
  }
}

sampling::LogitAdjustment& Sampler::adjustment_of(int32_t token) {
  if (adjustment_epoch_[token] != epoch_) {
    adjustment_epoch_[token] = epoch_;
    adjustment_index_[token] = static_cast<int32_t>(adjustments_.size());
    adjustments_.push_back({token, 0.0f, 0, 0});
  }
  return adjustments_[static_cast<size_t>(adjustment_index_[token])];
}

void Sampler::build_adjustments(std::span<const int32_t> prompt_ids, std::span<const int32_t> generated_ids) {
  // Ids are checked before any state changes, so a bad id leaves the sampler as it was.
  if (repetition_on_) check_token_ids(prompt_ids, "prompt_ids", vocab_size_);
  if (repetition_on_ || frequency_presence_on_) check_token_ids(generated_ids, "generated_ids", vocab_size_);
  adjustments_.clear();
  if (adjustment_epoch_.empty()) return;
  // A new epoch marks every token unadjusted without clearing the array.
  if (++epoch_ == 0) {
    std::fill(adjustment_epoch_.begin(), adjustment_epoch_.end(), 0u);
    epoch_ = 1;
  }
  for (const auto& [token, bias] : params_.logit_bias) adjustment_of(token).bias = bias;
  if (repetition_on_) {
    for (const std::span<const int32_t> ids : {prompt_ids, generated_ids}) {
      for (const int32_t token : ids) adjustment_of(token).repeated = 1;
    }
  }
  if (frequency_presence_on_) {
    for (const int32_t token : generated_ids) ++adjustment_of(token).count;
  }
}

sampling::RowParams Sampler::row_params() const {
  sampling::RowParams row;
  row.temperature = params_.temperature;
  row.top_p = params_.top_p;
  row.top_k = top_k_on_ ? params_.top_k : 0;
  row.min_p = params_.min_p;
  row.repetition_penalty = params_.repetition_penalty;
  row.frequency_penalty = params_.frequency_penalty;
  row.presence_penalty = params_.presence_penalty;
  return row;
}

sampling::SamplingStep Sampler::device_step(std::span<const int32_t> prompt_ids,
                                            std::span<const int32_t> generated_ids) {
  build_adjustments(prompt_ids, generated_ids);
  sampling::RowParams row = row_params();
  row.adjustments_count = static_cast<int32_t>(adjustments_.size());
  if (params_.temperature != 0.0f) row.draw = next_draw();
  return {row, adjustments_};
}

float Sampler::adjust_logits(std::span<float> logits, std::span<const int32_t> prompt_ids,
                             std::span<const int32_t> generated_ids) {
  check(logits.size() == static_cast<size_t>(vocab_size_), "sampler: got ", logits.size(),
        " logits, expected the vocabulary size ", vocab_size_);
  LogitScan scan = scan_logits(logits.data(), logits.size());
  if (scan.has_invalid) {
    for (size_t token = 0; token < logits.size(); ++token) {
      check(!std::isnan(logits[token]) && logits[token] != kInfinity,
            sampling::bad_logit_message(int64_t(token), std::isnan(logits[token])));
    }
  }
  build_adjustments(prompt_ids, generated_ids);
  if (!adjustments_.empty()) {
    const sampling::RowParams row = row_params();
    for (const sampling::LogitAdjustment& a : adjustments_) {
      logits[a.token] = sampling::adjust_logit(logits[a.token], a, row);
    }
    scan = scan_logits(logits.data(), logits.size());
  }
  check(scan.max > -kInfinity, "sampler: every logit is -inf, there is no token to sample");
  return scan.max;
}

uint64_t Sampler::gather(float lower) {
  uint64_t total = 0;
  for (int32_t token = 0; token < vocab_size_; ++token) {
    const float weight = weights_[token];
    if (weight >= lower && weight > 0.0f) {
      candidates_.push_back({token, weight});
      total += mass(weight);
    }
  }
  return total;
}

void Sampler::build_mass_histogram() {
  std::fill(bucket_mass_.begin(), bucket_mass_.end(), 0);
  for (size_t token = 0; token < weights_.size(); ++token) {
    bucket_mass_[(token % kHistogramCopies) * kBuckets + weight_bucket(weights_[token])] += mass(weights_[token]);
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

void Sampler::append_nucleus(std::vector<Candidate>& pool, uint64_t mass_above, uint64_t target) {
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
    uint64_t upper_half_mass = 0;
    for (size_t i = first; i < middle; ++i) upper_half_mass += mass(pool_scratch_[i].weight);
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
    mass_above += mass(pool_scratch_[i].weight);
    cut = i;
  }
  // Survivors in the pool's own (token id) order, which does not depend on how nth_element arranged the scratch.
  const Candidate last_survivor = pool_scratch_[cut];
  for (const Candidate& candidate : pool) {
    if (!ranks_before(last_survivor, candidate)) candidates_.push_back(candidate);
  }
}

bool Sampler::select_candidates(std::span<const float> logits, float max_logit) {
  compute_weights(logits.data(), logits.size(), max_logit, params_.temperature, mass_shift_, weights_.data(),
                  block_mass_.data());
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
      uint64_t top_k_mass = 0;
      for (const Candidate& candidate : candidates_) top_k_mass += mass(candidate.weight);
      const uint64_t target = sampling::nucleus_mass(params_.top_p, top_k_mass);
      size_t keep = 0;
      uint64_t mass_above = 0;
      while (keep < candidates_.size() && mass_above < target) mass_above += mass(candidates_[keep++].weight);
      candidates_.resize(keep);
    }
  } else {
    uint64_t total_mass = 0;
    for (const uint64_t block : block_mass_) total_mass += block;
    const uint64_t target = sampling::nucleus_mass(params_.top_p, total_mass);
    // First the tokens near the top: cheap, and usually they hold the nucleus.
    const float likely_floor = std::max(kLikelyWeight, min_p);
    const uint64_t likely_mass = gather(likely_floor);
    nucleus_pool_.swap(candidates_);
    candidates_.clear();
    if (likely_mass >= target || likely_floor <= min_p) {
      append_nucleus(nucleus_pool_, 0, target);
    } else {
      // Buckets above the one where the mass crosses top_p survive whole (less than top_p lies above any of their
      // tokens), buckets below it do not, and only the boundary bucket is searched for the exact cut.
      build_mass_histogram();
      size_t boundary = 0;
      uint64_t mass_above_boundary = 0;
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
  uint64_t total_mass = 0;
  for (const uint64_t block : block_mass_) total_mass += block;
  const uint64_t target = sampling::draw_target(next_draw(), total_mass);
  uint64_t mass_before = 0;
  for (size_t block = 0; block < block_mass_.size(); ++block) {
    if (target >= mass_before + block_mass_[block]) {
      mass_before += block_mass_[block];
      continue;
    }
    // Exact integer sums: the running mass crosses the target inside this block.
    const size_t end = std::min(weights_.size(), (block + 1) * kBlock);
    for (size_t token = block * kBlock; token < end; ++token) {
      mass_before += mass(weights_[token]);
      if (target < mass_before) return static_cast<int32_t>(token);
    }
  }
  fail("sampler: the draw found no token (total mass ", total_mass, ", target ", target, ")");
}

int32_t Sampler::draw_from_candidates() {
  check(!candidates_.empty(), "sampler: no token survived the filters");
  // The draw walks the survivors in token id order, as the device sampler does.
  const auto by_token = [](const Candidate& a, const Candidate& b) { return a.token < b.token; };
  if (!std::is_sorted(candidates_.begin(), candidates_.end(), by_token)) {
    std::sort(candidates_.begin(), candidates_.end(), by_token);
  }
  uint64_t total_mass = 0;
  for (const Candidate& candidate : candidates_) total_mass += mass(candidate.weight);
  const uint64_t target = sampling::draw_target(next_draw(), total_mass);
  uint64_t cumulative = 0;
  for (const Candidate& candidate : candidates_) {
    cumulative += mass(candidate.weight);
    if (target < cumulative) return candidate.token;
  }
  fail("sampler: the draw found no survivor (mass ", total_mass, ", target ", target, ")");
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
  uint64_t total_mass = 0;
  for (const Candidate& candidate : candidates_) total_mass += mass(candidate.weight);
  std::vector<TokenProbability> result;
  result.reserve(candidates_.size());
  for (const Candidate& candidate : candidates_) {
    const uint64_t token_mass = mass(candidate.weight);
    if (token_mass == 0) break;  // never drawn; every later candidate has no more weight
    result.push_back({candidate.token, static_cast<double>(token_mass) / static_cast<double>(total_mass)});
  }
  return result;
}

}  // namespace dsv4
