// The lightning indexer on the GPU against the CPU ops: run_indexer_prepare vs RoPE + round_indexer_reference (bit
// for bit), run_indexer_scores vs cpu::indexer_scores (visibility, −inf, summation-order tolerance), and run_top_k vs
// cpu::select_top_k (exact indices and order) on distinct, tied, concentrated, signed-zero and infinite scores and
// NaNs (ranked below every number, the flag raised), fewer visible than k, k = 0, 1024 and 2048, 262,144 candidates,
// one CTA and many CTAs per query (ranges cached in shared memory and streamed; final sort and parallel ranking).
// Outputs are poisoned (NaN / 0xFF) before every run and every element is checked.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/indexer.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rope.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/indexer.hpp"
#include "backends/cuda/kernels/top_k.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

template <class T>
std::vector<T> from_device(const DeviceBuffer& buffer, size_t count) {
  std::vector<T> host(count);
  if (count > 0) buffer.download(host.data(), count * sizeof(T));
  return host;
}

std::vector<float> bf16_to_floats(const std::vector<uint16_t>& bits) {
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_float(bits[i]);
  return out;
}

uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// ---------------------------------------------------------------------------------------------- query preparation

void check_prepare(int64_t tokens, int64_t heads, int64_t head_dim, int64_t rope_dim, bool reference, uint32_t seed) {
  SCOPED_TRACE("prepare tokens=" + std::to_string(tokens) + " heads=" + std::to_string(heads) + " head_dim=" +
               std::to_string(head_dim) + " rope_dim=" + std::to_string(rope_dim) +
               (reference ? " reference" : " exact"));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(tokens * heads * head_dim));
  // Magnitudes over 2^±8 per row so the fp4 scales differ.
  for (int64_t r = 0; r < tokens * heads; ++r) {
    const float scale = std::ldexp(1.0f, int(rng() % 17) - 8);
    for (int64_t d = 0; d < head_dim; ++d) x[size_t(r * head_dim + d)] = normal(rng) * scale;
  }
  std::vector<int64_t> positions(static_cast<size_t>(tokens));
  for (auto& p : positions) p = int64_t(rng() % 1000000);
  const cpu::RopeTable rope(160000.0, std::max<int64_t>(rope_dim, 2), cpu::YarnScaling{});

  std::vector<float> expected = x;
  if (rope_dim > 0) cpu::apply_rope(rope, expected.data(), positions.data(), {tokens, heads, head_dim, false});
  if (reference) cpu::round_indexer_reference(expected.data(), tokens * heads, head_dim);

  DeviceBuffer d_x = to_device(x, "x"), d_positions = to_device(positions, "positions");
  DeviceBuffer d_freq = to_device(rope.frequencies(), "frequencies");
  DeviceBuffer d_out(x.size() * 2, "prepared");
  d_out.fill_bytes(0xFF);
  run_indexer_prepare({.input = d_x.as<float>(),
                       .output = d_out.as<__nv_bfloat16>(),
                       .tokens = tokens,
                       .heads = heads,
                       .head_dim = head_dim,
                       .positions = d_positions.as<int64_t>(),
                       .rope_frequencies = rope_dim > 0 ? d_freq.as<float>() : nullptr,
                       .rope_dim = rope_dim,
                       .reference_rounding = reference});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = bf16_to_floats(from_device<uint16_t>(d_out, x.size()));
  int failures = 0;
  for (size_t i = 0; i < got.size() && failures < 10; ++i) {
    // Reference rounding leaves bf16 values (exact); exact mode is the bf16 of the CPU's fp32 result.
    const float want = reference ? expected[i] : round_to_bf16(expected[i]);
    if (float_bits(got[i]) != float_bits(want)) {
      ++failures;
      ADD_FAILURE() << "element " << i << " (row " << i / size_t(head_dim) << ", dim " << i % size_t(head_dim)
                    << "): got " << got[i] << ", want " << want;
    }
  }
}

TEST(IndexerPrepare, MatchesRopeAndReferenceRoundingBitForBit) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const bool reference : {false, true}) {
    check_prepare(3, 64, 128, 64, reference, seed++);  // V4 indexer q: 64 heads × 128, rope 64
    check_prepare(37, 1, 128, 64, reference, seed++);  // new keys
    check_prepare(5, 64, 128, 0, reference, seed++);   // no RoPE
    check_prepare(4, 8, 64, 32, reference, seed++);
    check_prepare(7, 3, 32, 16, reference, seed++);
    check_prepare(6, 12, 32, 16, reference, seed++);  // the golden fixtures' indexer: 12 heads × 32, rope 16
  }
}

// ------------------------------------------------------------------------------------------------------ scores

struct ScoresCase {
  int64_t tokens, heads, head_dim, key_count, ratio;
  bool reference;     // q and keys fp4-rounded (bf16 holds them exactly) vs plain bf16-rounded
  int sequences = 1;  // > 1: queries of different sequences (slots) in one launch, each with its own keys
};

void check_scores(const ScoresCase& c, uint32_t seed) {
  SCOPED_TRACE("scores T=" + std::to_string(c.tokens) + " heads=" + std::to_string(c.heads) + " head_dim=" +
               std::to_string(c.head_dim) + " keys=" + std::to_string(c.key_count) +
               (c.reference ? " reference" : " exact") + " sequences=" + std::to_string(c.sequences));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Slot s's keys start at s·slot_stride (a padded stride); query t is of slot query_slot[t].
  const int64_t slot_stride = c.sequences > 1 ? (c.key_count + 3) * c.head_dim : 0;
  const int64_t key_rows = c.sequences > 1 ? c.sequences * (c.key_count + 3) : c.key_count;
  std::vector<float> q(size_t(c.tokens * c.heads * c.head_dim)), keys(size_t(key_rows * c.head_dim));
  std::vector<int32_t> query_slot(size_t(c.tokens));
  for (int32_t& slot : query_slot) slot = int32_t(rng() % uint32_t(c.sequences));
  std::vector<float> weights(size_t(c.tokens * c.heads));
  for (float& v : q) v = normal(rng);
  for (float& v : keys) v = normal(rng);
  for (float& v : weights) v = normal(rng);
  // The GPU multiplies bf16 operands: give the CPU the same values, so the tolerance measures summation order only.
  if (c.reference) {
    cpu::round_indexer_reference(q.data(), c.tokens * c.heads, c.head_dim);
    cpu::round_indexer_reference(keys.data(), key_rows, c.head_dim);
  } else {
    for (float& v : q) v = round_to_bf16(v);
    for (float& v : keys) v = round_to_bf16(v);
  }
  // Positions: the last query sees every key; the others fewer (including none and a window boundary ± 1).
  std::vector<int64_t> positions(static_cast<size_t>(c.tokens));
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t full = c.key_count * c.ratio + int64_t(rng() % 7);
    const int64_t options[] = {full, 0, c.ratio - 1, c.key_count / 2 * c.ratio, c.key_count / 2 * c.ratio - 1,
                               int64_t(rng() % uint32_t(full + 1))};
    positions[size_t(t)] = t == c.tokens - 1 ? full : options[rng() % 6];
  }
  // The CPU scores of each query against its own sequence's keys.
  std::vector<float> expected(size_t(c.tokens * c.key_count));
  auto keys_of = [&](int64_t t) { return keys.data() + query_slot[size_t(t)] * slot_stride; };
  for (int64_t t = 0; t < c.tokens; ++t)
    cpu::indexer_scores({q.data() + t * c.heads * c.head_dim, weights.data() + t * c.heads, keys_of(t), c.key_count,
                         positions.data() + t},
                        {1, c.heads, c.head_dim, c.ratio, 512}, expected.data() + t * c.key_count);

  std::vector<uint16_t> q_bf16(q.size()), keys_bf16(keys.size());
  for (size_t i = 0; i < q.size(); ++i) q_bf16[i] = float_to_bf16(q[i]);
  for (size_t i = 0; i < keys.size(); ++i) keys_bf16[i] = float_to_bf16(keys[i]);
  DeviceBuffer d_q = to_device(q_bf16, "q"), d_keys = to_device(keys_bf16, "keys");
  DeviceBuffer d_w = to_device(weights, "head weights"), d_pos = to_device(positions, "positions");
  DeviceBuffer d_slots = to_device(query_slot, "sequence slots");
  const int64_t stride = c.key_count + 5;  // a padded row: columns past key_count must stay untouched
  DeviceBuffer d_scores(size_t(c.tokens * stride) * 4, "scores");
  d_scores.fill_bytes(0xFF);
  run_indexer_scores({.q = d_q.as<__nv_bfloat16>(),
                      .head_weights = d_w.as<float>(),
                      .keys = d_keys.as<__nv_bfloat16>(),
                      .key_count = c.key_count,
                      .sequence_slots = c.sequences > 1 ? d_slots.as<int32_t>() : nullptr,
                      .keys_slot_stride = slot_stride,
                      .positions = d_pos.as<int64_t>(),
                      .tokens = c.tokens,
                      .heads = c.heads,
                      .head_dim = c.head_dim,
                      .ratio = c.ratio,
                      .scores = d_scores.as<float>(),
                      .score_stride = stride});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = from_device<float>(d_scores, size_t(c.tokens * stride));

  const float weight_scale = 1.0f / std::sqrt(float(c.head_dim)) / std::sqrt(float(c.heads));
  int failures = 0;
  double max_error = 0.0;
  for (int64_t t = 0; t < c.tokens && failures < 10; ++t) {
    for (int64_t j = 0; j < stride && failures < 10; ++j) {
      const float g = got[size_t(t * stride + j)];
      if (j >= c.key_count) {
        if (float_bits(g) != 0xFFFFFFFFu) {
          ++failures;
          ADD_FAILURE() << "query " << t << " wrote column " << j << " past key_count";
        }
        continue;
      }
      const float e = expected[size_t(t * c.key_count + j)];
      if (std::isinf(e)) {
        // Invisible: −inf, or left as it was (the contract lets the kernel skip columns past the visible keys).
        if (!(std::isinf(g) && g < 0) && float_bits(g) != 0xFFFFFFFFu) {
          ++failures;
          ADD_FAILURE() << "score[" << t << ", " << j << "] = " << g << ", want -inf or untouched (invisible; "
                        << "position " << positions[size_t(t)] << ")";
        }
        continue;
      }
      // fp32 sums over head_dim and heads in another order: a multiple of eps × Σ_h |w_h|·Σ_d |q_hd·K_jd|.
      double magnitude = 0.0;
      for (int64_t h = 0; h < c.heads; ++h) {
        double dot = 0.0;
        for (int64_t d = 0; d < c.head_dim; ++d)
          dot += std::fabs(double(q[size_t((t * c.heads + h) * c.head_dim + d)]) * keys_of(t)[j * c.head_dim + d]);
        magnitude += std::fabs(double(weights[size_t(t * c.heads + h)]) * weight_scale) * dot;
      }
      const double tolerance = 2e-5 * magnitude + 1e-30;
      const double error = std::fabs(double(g) - e);
      max_error = std::max(max_error, std::isfinite(g) ? error : INFINITY);
      if (!std::isfinite(g) || error > tolerance) {
        ++failures;
        ADD_FAILURE() << "score[" << t << ", " << j << "] = " << g << ", want " << e << " (tolerance " << tolerance
                      << ")";
      }
    }
  }
  std::printf("scores T=%lld heads=%lld head_dim=%lld keys=%lld %s: max error %.3g\n", (long long)c.tokens,
              (long long)c.heads, (long long)c.head_dim, (long long)c.key_count, c.reference ? "reference" : "exact",
              max_error);
}

TEST(IndexerScores, MatchesCpuScoresWithVisibility) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 100;
  for (const bool reference : {true, false}) {
    check_scores({1, 64, 128, 1000, 4, reference}, seed++);  // V4 decode, a partial last warp tile
    check_scores({3, 64, 128, 777, 4, reference}, seed++);   // one query group of 3
    check_scores({9, 64, 128, 300, 4, reference}, seed++);   // three query groups, the last partial
    check_scores({2, 8, 64, 129, 4, reference}, seed++);     // small test-model shapes
    check_scores({5, 16, 32, 40, 128, reference}, seed++);   // HCA-like ratio
    check_scores({2, 128, 128, 64, 4, reference}, seed++);   // the most heads
    check_scores({3, 12, 32, 50, 4, reference}, seed++);     // golden fixtures: 12 index heads × 32 (padded to 16)
    check_scores({2, 16, 32, 17, 4, reference}, seed++);     // golden fixtures: 16 × 32
    check_scores({5, 1, 64, 70, 4, reference}, seed++);      // one head
    check_scores({4, 5, 128, 90, 4, reference}, seed++);     // a partial n-tile in the real head size
  }
}

// A batched decode step: one query per sequence, each sequence its own keys and length (the key count a bound).
TEST(IndexerScores, SequencesOfDifferentLengthsInOneLaunch) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  for (const bool reference : {true, false}) {
    check_scores({8, 64, 128, 1000, 4, reference, 8}, seed++);   // V4 decode batch of 8
    check_scores({5, 12, 32, 50, 4, reference, 3}, seed++);      // golden fixture shape, slots repeat
    check_scores({33, 16, 32, 17, 4, reference, 33}, seed++);    // many sequences, few keys
    check_scores({6, 64, 128, 300, 128, reference, 4}, seed++);  // HCA-like ratio
  }
}

TEST(IndexerScores, LongContext) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_scores({1, 64, 128, 65536, 4, true}, 7);
}

// ------------------------------------------------------------------------------------------------------- top-k

enum class Distribution { Distinct, FewValues, AllEqual, Concentrated, SignedZerosAndInfinities, NansAmongDistinct };

const char* distribution_name(Distribution d) {
  switch (d) {
    case Distribution::Distinct: return "distinct";
    case Distribution::FewValues: return "few values";
    case Distribution::AllEqual: return "all equal";
    case Distribution::Concentrated: return "concentrated";
    case Distribution::SignedZerosAndInfinities: return "signed zeros and infinities";
    case Distribution::NansAmongDistinct: return "NaNs among distinct";
  }
  return "?";
}

std::vector<float> make_scores(Distribution d, size_t n, std::mt19937& rng) {
  std::vector<float> s(n);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : s) {
    switch (d) {
      case Distribution::Distinct: v = normal(rng) * 100.0f; break;
      case Distribution::FewValues: v = float(int(rng() % 9) - 4) * 0.5f; break;
      case Distribution::AllEqual: v = 1.5f; break;
      // Many scores within one binade: the first 11-bit digit cannot separate them.
      case Distribution::Concentrated: v = 10.0f + normal(rng) * 0.01f; break;
      case Distribution::SignedZerosAndInfinities: {
        const uint32_t r = rng() % 8;
        v = r == 0 ? 0.0f : r == 1 ? -0.0f : r == 2 ? -kInf : r == 3 ? kInf : r == 4 ? -1.0f : normal(rng);
        break;
      }
      // A third NaN (both signs): they rank below every number, so they fill only rows with too few numbers.
      case Distribution::NansAmongDistinct: {
        const uint32_t r = rng() % 6;
        v = r == 0 ? std::numeric_limits<float>::quiet_NaN() : r == 1 ? -std::numeric_limits<float>::quiet_NaN()
                                                                     : normal(rng) * 100.0f;
        break;
      }
    }
  }
  return s;
}

struct TopKCase {
  int queries;
  int64_t candidates;
  int k;
  Distribution distribution;
  bool with_positions;
  int max_ctas_per_query = 0;
};

void check_top_k(const TopKCase& c, DeviceBuffer& workspace, uint32_t seed) {
  SCOPED_TRACE("top_k queries=" + std::to_string(c.queries) + " candidates=" + std::to_string(c.candidates) +
               " k=" + std::to_string(c.k) + " " + distribution_name(c.distribution) +
               (c.with_positions ? " with positions" : "") + " ctas/query=" +
               std::to_string(top_k_ctas_per_query(c.queries, c.candidates, c.max_ctas_per_query)));
  std::mt19937 rng(seed);
  const int64_t stride = c.candidates + 3;
  const std::vector<float> scores = make_scores(c.distribution, size_t(c.queries * stride), rng);
  constexpr int64_t kRatio = 4;
  std::vector<int64_t> positions(static_cast<size_t>(c.queries));
  for (int t = 0; t < c.queries; ++t) {
    // Fewer visible than k, none, exactly k, all, and random counts.
    const int64_t visible_options[] = {c.candidates, 0, std::min<int64_t>(c.k, c.candidates),
                                       std::max<int64_t>(0, c.k - 1), int64_t(rng() % uint32_t(c.candidates + 1))};
    const int64_t visible = t == 0 ? c.candidates : visible_options[rng() % 5];
    positions[size_t(t)] = visible * kRatio + int64_t(rng() % (kRatio - 1));  // (p + 1) div 4 = visible
  }

  DeviceBuffer d_scores = to_device(scores, "scores"), d_pos = to_device(positions, "positions");
  const size_t k_alloc = size_t(std::max(c.k, 1));
  DeviceBuffer d_selected(size_t(c.queries) * k_alloc * 4 + 64, "selected"), d_counts(size_t(c.queries) * 4, "counts");
  DeviceBuffer d_flag(4, "nan flag");
  d_selected.fill_bytes(0xAB);
  d_counts.fill_bytes(0xAB);
  d_flag.fill_bytes(0);
  const size_t ws_bytes = top_k_workspace_bytes(c.queries);
  ASSERT_LE(ws_bytes, workspace.bytes());
  run_top_k({.scores = d_scores.as<float>(),
             .row_stride = stride,
             .candidates = c.candidates,
             .queries = c.queries,
             .k = c.k,
             .positions = c.with_positions ? d_pos.as<int64_t>() : nullptr,
             .ratio = kRatio,
             .selected = d_selected.as<int32_t>(),
             .counts = d_counts.as<int32_t>(),
             .nan_flag = d_flag.as<int32_t>(),
             .workspace = workspace.data(),
             .workspace_bytes = workspace.bytes(),
             .max_ctas_per_query = c.max_ctas_per_query});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<int32_t> selected = from_device<int32_t>(d_selected, size_t(c.queries) * k_alloc + 16);
  const std::vector<int32_t> counts = from_device<int32_t>(d_counts, size_t(c.queries));

  // The CPU op refuses NaN; −inf in its place ranks the same (that distribution has no real −inf), ties by index.
  std::vector<float> cpu_scores = scores;
  bool visible_nan = false;
  for (int t = 0; t < c.queries; ++t) {
    const int64_t visible = c.with_positions ? cpu::visible_key_count(positions[size_t(t)], kRatio, c.candidates)
                                             : c.candidates;
    for (int64_t j = 0; j < c.candidates; ++j) {
      float& v = cpu_scores[size_t(t * stride + j)];
      if (std::isnan(v)) {
        visible_nan |= j < visible;
        v = -kInf;
      }
    }
  }
  EXPECT_EQ(from_device<int32_t>(d_flag, 1)[0], (visible_nan && c.k > 0) ? 1 : 0);

  int failures = 0;
  std::vector<int32_t> want(size_t(c.k));
  for (int t = 0; t < c.queries && failures < 5; ++t) {
    const int64_t visible = c.with_positions ? cpu::visible_key_count(positions[size_t(t)], kRatio, c.candidates)
                                             : c.candidates;
    const int64_t count = cpu::select_top_k(cpu_scores.data() + t * stride, visible, c.k, want.data());
    std::fill(want.begin() + count, want.end(), -1);
    if (counts[size_t(t)] != count) {
      ++failures;
      ADD_FAILURE() << "query " << t << ": count " << counts[size_t(t)] << ", want " << count << " (visible "
                    << visible << ")";
    }
    for (int i = 0; i < c.k; ++i) {
      const int32_t g = selected[size_t(t) * size_t(c.k) + size_t(i)];
      if (g != want[size_t(i)]) {
        ++failures;
        const float* row = scores.data() + t * stride;
        ADD_FAILURE() << "query " << t << " (visible " << visible << ") rank " << i << ": index " << g
                      << " (score " << (g >= 0 && g < c.candidates ? row[g] : NAN) << "), want " << want[size_t(i)]
                      << " (score " << (want[size_t(i)] >= 0 ? row[want[size_t(i)]] : NAN) << ")";
        if (failures >= 5) break;
      }
    }
  }
  // Nothing written past the last row.
  for (size_t i = size_t(c.queries) * size_t(c.k); i < selected.size(); ++i)
    ASSERT_EQ(uint32_t(selected[i]), 0xABABABABu) << "write past selected at " << i;
}


class TopKTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_device()) GTEST_SKIP() << "no CUDA device";
    workspace_ = DeviceBuffer(top_k_workspace_bytes(kTopKMaxSplitQueries), "top-k workspace");
    workspace_.fill_bytes(0);
  }
  DeviceBuffer workspace_;
};

TEST_F(TopKTest, MatchesSelectTopKOnEveryDistribution) {
  uint32_t seed = 500;
  const Distribution distributions[] = {Distribution::Distinct,     Distribution::FewValues,
                                        Distribution::AllEqual,     Distribution::Concentrated,
                                        Distribution::SignedZerosAndInfinities, Distribution::NansAmongDistinct};
  for (const Distribution d : distributions) {
    check_top_k({1, 262144, 512, d, false}, workspace_, seed++);   // the real size, split over CTAs
    check_top_k({8, 65536, 512, d, true}, workspace_, seed++);     // batch 8 with visibility
    check_top_k({3, 5000, 2048, d, true}, workspace_, seed++);     // the largest k
    check_top_k({2, 1000, 512, d, true}, workspace_, seed++);      // fewer candidates than one CTA's share
    check_top_k({70, 20000, 512, d, true}, workspace_, seed++);    // > kTopKMaxSplitQueries: one CTA per query
    check_top_k({3, 262144, 1024, d, true}, workspace_, seed++);   // V4-Pro's k; short and long contexts
  }
}

TEST_F(TopKTest, OddSizesAndSmallK) {
  uint32_t seed = 900;
  for (const int k : {0, 1, 7, 513, 1000})
    for (const int64_t n : {int64_t(1), int64_t(13), int64_t(4099), int64_t(100003)})
      check_top_k({2, n, k, Distribution::Distinct, true}, workspace_, seed++);
  check_top_k({1, 262144, 2048, Distribution::FewValues, false}, workspace_, seed++);
  // A capped split: one CTA for the whole 262,144 (the path of large batches) and an odd count of CTAs.
  check_top_k({1, 262144, 512, Distribution::Concentrated, false, 1}, workspace_, seed++);
  check_top_k({2, 262144, 512, Distribution::Distinct, true, 3}, workspace_, seed++);
}

// The split path's CTA ranges around the shared-memory score cache (16,384 per CTA): cached at batch 16 of 262,144
// (16,384 each), streamed from global memory at batch 40 of 100,000 and batch 64 of 262,144 (a few CTAs per query).
TEST_F(TopKTest, CachedAndStreamedRanges) {
  uint32_t seed = 1300;
  for (const Distribution d : {Distribution::Distinct, Distribution::Concentrated}) {
    check_top_k({16, 262144, 512, d, false}, workspace_, seed++);
    check_top_k({40, 100000, 512, d, true}, workspace_, seed++);
    check_top_k({64, 262144, 512, d, true}, workspace_, seed++);
  }
}

TEST_F(TopKTest, RepeatedLaunchesReuseTheWorkspace) {
  for (int i = 0; i < 5; ++i) check_top_k({4, 131072, 512, Distribution::Concentrated, false}, workspace_, 7000 + i);
}

TEST_F(TopKTest, NanScoresRaiseTheFlag) {
  std::vector<float> scores(262144, 1.0f);
  scores[12345] = std::numeric_limits<float>::quiet_NaN();
  DeviceBuffer d_scores = to_device(scores, "scores");
  DeviceBuffer d_selected(512 * 4, "selected"), d_counts(4, "counts"), d_flag(4, "flag");
  // One query's flag after a launch; `positions` null means every score is visible. The count, poisoned first,
  // shows the launch ran, so a flag left at 0 by a launch that never happened cannot pass.
  const auto nan_flag_after_top_k = [&](const int64_t* positions) {
    d_flag.fill_bytes(0);
    d_counts.fill_bytes(0xAB);
    run_top_k({.scores = d_scores.as<float>(),
               .row_stride = 262144,
               .candidates = 262144,
               .queries = 1,
               .k = 512,
               .positions = positions,
               .ratio = 4,
               .selected = d_selected.as<int32_t>(),
               .counts = d_counts.as<int32_t>(),
               .nan_flag = d_flag.as<int32_t>(),
               .workspace = workspace_.data(),
               .workspace_bytes = workspace_.bytes()});
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(from_device<int32_t>(d_counts, 1)[0], 512);
    return from_device<int32_t>(d_flag, 1)[0];
  };
  // A NaN before the visible end only: invisible NaNs are never looked at.
  std::vector<int64_t> position{4 * 12000};
  DeviceBuffer d_pos = to_device(position, "position");
  EXPECT_EQ(nan_flag_after_top_k(nullptr), 1);
  EXPECT_EQ(nan_flag_after_top_k(d_pos.as<int64_t>()), 0);
}

TEST_F(TopKTest, RefusesBadCalls) {
  const TopKParams p{.scores = nullptr, .row_stride = 10, .candidates = 10, .queries = 1, .k = 4096};
  testing::expect_error([&] { run_top_k(p); }, "k = 4096");
}

}  // namespace
}  // namespace dsv4::cuda
