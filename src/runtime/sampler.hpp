// Next-token sampling with the parameters of the OpenAI / vLLM / llama.cpp APIs.
//
// One Sampler per sequence (it owns that sequence's random stream). sample() runs these steps in this order,
// which is vLLM's order for the logit adjustments and llama.cpp's order for the truncation filters:
//   1. logit_bias        logit[t] += bias[t]                                   (OpenAI; vLLM applies it first too)
//   2. repetition        over the distinct tokens of prompt + generated (CTRL, as vLLM):
//                        logit > 0 ? logit / r : logit * r
//   3. frequency         logit[t] -= frequency_penalty * count[t]             (counts over generated tokens only,
//   4. presence          logit[t] -= presence_penalty * (count[t] > 0)         OpenAI's formula, vLLM's order)
//   5. temperature == 0  greedy: argmax of the adjusted logits, ties go to the lowest token id; 6-10 are skipped
//   6. temperature       weight[t] = exp((logit[t] - max_logit) * (1 / temperature)); mass[t] = round(weight * 2^s),
//                        an integer (core/sampling_math.hpp: s = 46 for 129,280 tokens); p[t] = mass[t] / sum of masses
//   7. top_k             keep the k most probable tokens (exactly k: ties go to the lower token id)
//   8. top_p             nucleus over the masses renormalised after top_k: keep the smallest prefix of the tokens
//                        sorted by probability whose mass reaches ceil(top_p * mass) (a token stays when the mass
//                        ranked strictly above it is below that); the most probable token always stays
//   9. min_p             keep tokens with weight[t] >= min_p (p[t] >= min_p * max_t p[t])
//  10. draw              53 random bits u from the sequence's xoshiro256** stream; the first survivor in token id
//                        order whose running mass exceeds floor(u * 2^-53 * surviving mass)
// "Sorted by probability" means descending weight with ties broken by the lower token id, so every filter keeps
// a prefix of one fixed order and the result never depends on the sort algorithm. vLLM applies min_p before top_k /
// top_p; we follow llama.cpp, where min_p comes last (it is relative to the maximum, so renormalisation after
// top_k / top_p does not move its threshold).
//
// Determinism: the same seed, parameters and logits give the same tokens with any standard library, and on the GPU:
// device_step() hands a device sampler (backends/cuda/kernels/sampling.hpp) the same adjustments and the same draw,
// and both sides share core/sampling_math.hpp. The weights are bit-identical wherever the compiler emits no FMA for
// them: true for x86-64 builds without -march flags (the AVX2 clone omits FMA on purpose) and on the device (_rn
// intrinsics). Where a*b+c may be fused (-march=native, aarch64), build with -ffp-contract=off to keep the same bits.
// Masses are integers, so no sum depends on its order.
//
// Cost per token (vocabulary V): a few vectorised passes over V (scan, exponentials, block sums) and, for top_k /
// top_p, one or two scalar passes. Nothing sorts the vocabulary: top_k keeps a buffer of candidates above a rising
// bar (nth_element when full); top_p first tries the tokens within a factor 2^-10 of the most probable one, else a
// weight histogram keeps whole buckets, and the exact cut is found by repeated halving with nth_element, so even a
// flat distribution costs O(V). The survivors are sorted by token id for the draw.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/sampling_math.hpp"
#include "runtime/random.hpp"

namespace dsv4 {

// Defaults match the OpenAI API: sampling at temperature 1 with every filter and penalty off.
struct SamplingParams {
  float temperature = 1.0f;         // >= 0; 0 selects greedy decoding
  float top_p = 1.0f;               // (0, 1]; 1 = off
  int32_t top_k = 0;                // >= 0; 0 = off
  float min_p = 0.0f;               // [0, 1]; 0 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off; > 1 discourages tokens already in prompt or output
  float presence_penalty = 0.0f;    // [-2, 2] (OpenAI range); 0 = off
  float frequency_penalty = 0.0f;   // [-2, 2] (OpenAI range); 0 = off
  std::map<int32_t, float> logit_bias;  // token id -> bias in [-100, 100] (OpenAI range)
  std::optional<uint64_t> seed;         // none: a nondeterministic seed
  std::vector<std::string> stop;        // stop strings (see StopStringMatcher in stop_condition.hpp)
  std::vector<int32_t> stop_token_ids;  // generation ends after any of these (in addition to the model's EOS)
  std::optional<int32_t> max_tokens;    // >= 1; none: until the context is full
};

// Throws dsv4::Error naming the first parameter that is out of range or NaN, or a logit_bias / stop token id outside
// [0, vocab_size). Sampler's constructor calls it; servers may call it early to reject a request.
void validate(const SamplingParams& params, int32_t vocab_size);

struct TokenProbability {
  int32_t token = 0;
  double probability = 0.0;
};

class Sampler {
 public:
  Sampler(SamplingParams params, int32_t vocab_size);

  // Picks the next token. `logits` (size vocab_size) is adjusted in place: on return it holds the logits after
  // logit_bias and the penalties (steps 1-4), before temperature. prompt_ids / generated_ids feed the penalties and
  // are only read when a penalty is on. Throws dsv4::Error when a logit is NaN or +inf (naming the token id), when
  // every logit is -inf, or when a token id is outside the vocabulary.
  int32_t sample(std::span<float> logits, std::span<const int32_t> prompt_ids,
                 std::span<const int32_t> generated_ids);

  // The distribution sample() would draw from, without drawing: the surviving tokens that can be drawn (mass > 0),
  // most probable first (ties: lower id first), probabilities summing to 1. For tests, logprobs and debugging; it
  // sorts every survivor.
  std::vector<TokenProbability> distribution(std::span<float> logits, std::span<const int32_t> prompt_ids,
                                             std::span<const int32_t> generated_ids);

  // sample() for a device that holds the logits: the row parameters, the logit adjustments steps 1-4 make for these
  // ids, and the draw, taken from the random stream exactly as sample() would (none at temperature 0), so a device
  // that follows core/sampling_math.hpp picks the token sample() would. The adjustments stay valid until the next
  // call. Throws like sample() for a token id outside the vocabulary.
  sampling::SamplingStep device_step(std::span<const int32_t> prompt_ids, std::span<const int32_t> generated_ids);

  const SamplingParams& params() const { return params_; }
  int32_t vocab_size() const { return vocab_size_; }

 private:
  struct Candidate {
    int32_t token;
    float weight;  // exp((logit - max_logit) / temperature), in (0, 1]
  };

  // Steps 1-4 with input checks; returns the largest adjusted logit.
  float adjust_logits(std::span<float> logits, std::span<const int32_t> prompt_ids,
                      std::span<const int32_t> generated_ids);
  // Checks the ids, then fills adjustments_ with one entry per token that steps 1-4 change.
  void build_adjustments(std::span<const int32_t> prompt_ids, std::span<const int32_t> generated_ids);
  sampling::LogitAdjustment& adjustment_of(int32_t token);
  sampling::RowParams row_params() const;
  uint64_t mass(float weight) const { return sampling::weight_mass(weight, mass_shift_); }
  uint64_t next_draw() { return rng_.next() >> 11; }
  // Steps 6-9: fills weights_ and, unless no filter is on (returns false), candidates_ with the survivors.
  bool select_candidates(std::span<const float> logits, float max_logit);
  // Appends the tokens with weight >= lower (and > 0) to candidates_, in token id order; returns their mass.
  uint64_t gather(float lower);
  // Appends to candidates_ the tokens of `pool` that survive top_p, given the mass ranked above the whole pool and
  // the nucleus mass `target`; keeps the pool's order.
  void append_nucleus(std::vector<Candidate>& pool, uint64_t mass_above, uint64_t target);
  // Sums the weights per weight bucket into bucket_mass_[0, kBuckets).
  void build_mass_histogram();
  // Fills candidates_ with the top_k best-ranked tokens of weight >= floor (fewer if fewer qualify), unordered.
  void select_top_k(size_t top_k, float floor);
  int32_t draw_from_all_tokens();
  int32_t draw_from_candidates();

  SamplingParams params_;
  int32_t vocab_size_;
  bool top_k_on_;
  bool top_p_on_;
  bool min_p_on_;
  bool repetition_on_;
  bool frequency_presence_on_;
  int mass_shift_;
  Xoshiro256 rng_;
  // Scratch reused across calls so a token costs no allocation.
  std::vector<float> weights_;           // [vocab]
  std::vector<uint64_t> block_mass_;     // [ceil(vocab / kBlock)]: mass sums of consecutive token blocks
  std::vector<Candidate> candidates_;
  std::vector<Candidate> nucleus_pool_;         // top_p: the candidates among which the nucleus ends
  std::vector<Candidate> pool_scratch_;
  std::vector<uint64_t> bucket_mass_;           // top_p: mass histogram (see sampler.cpp), interleaved copies
  std::vector<sampling::LogitAdjustment> adjustments_;  // this step's, one per adjusted token
  std::vector<uint32_t> adjustment_epoch_;  // [vocab]: == epoch_ when adjustment_index_ is this step's
  std::vector<int32_t> adjustment_index_;   // [vocab]: the token's entry in adjustments_
  uint32_t epoch_ = 0;
};

}  // namespace dsv4
