// The lightning indexer on the GPU against the CPU ops: run_indexer_prepare vs RoPE + round_indexer_reference (bit
// for bit; its fp8 output vs the reference's fp8 block rounding, lossless on fp4-rounded vectors),
// run_indexer_scores with bf16 and fp8 keys vs cpu::indexer_scores on the same operands (visibility, −inf,
// summation-order tolerance; the automatic kernel choice bit for bit the kernel it picks), fp8 scores' top-k vs the
// CPU's (differences only among near-ties), the fused scores + top-k vs the two launches (identical), and run_top_k vs
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
#include "backends/cuda/kernels/rope.hpp"
#include "backends/cuda/kernels/top_k.cuh"
#include "backends/cuda/kernels/top_k.hpp"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"
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
  // Into d_out (poisoned first), RoPE by sincos or, given one, from `table`.
  const auto prepare = [&](const DeviceBuffer& at, const float2* table) {
    d_out.fill_bytes(0xFF);
    run_indexer_prepare({.input = d_x.as<float>(),
                         .output = d_out.as<__nv_bfloat16>(),
                         .tokens = tokens,
                         .heads = heads,
                         .head_dim = head_dim,
                         .positions = at.as<int64_t>(),
                         .rope_frequencies = rope_dim > 0 && !table ? d_freq.as<float>() : nullptr,
                         .rope_table = table,
                         .rope_dim = rope_dim,
                         .reference_rounding = reference});
  };
  prepare(d_positions, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = bf16_to_floats(from_device<uint16_t>(d_out, x.size()));
  if (rope_dim > 0) {
    // The factors from a RoPE table (rope.hpp) give the sincos path's bits, at positions below its rows.
    constexpr int64_t kTableRows = 8192;
    std::vector<int64_t> near = positions;
    for (auto& p : near) p %= kTableRows;
    const DeviceBuffer d_near = to_device(near, "positions below the table's rows");
    DeviceBuffer table(rope_table_bytes(rope_dim / 2, kTableRows), "RoPE table");
    run_rope_table({.table = table.as<float2>(), .frequencies = d_freq.as<float>(), .pairs = rope_dim / 2,
                    .positions = kTableRows});
    std::vector<uint16_t> outputs[2];
    for (const bool use_table : {false, true}) {
      prepare(d_near, use_table ? table.as<float2>() : nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      outputs[use_table] = from_device<uint16_t>(d_out, x.size());
    }
    EXPECT_EQ(outputs[0], outputs[1]) << "the RoPE table's prepared vectors differ from the sincos ones";
  }
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

enum class KeyFormat { Bf16, Fp8 };

// indexer.hpp's fp8 operand rule, on the host: the bf16 operand quantised with one power-of-two scale for the row,
// s = 2^ceil(log2(max(amax, 1e-4) / 448)), codes e4m3(x / s). Returns s.
float quantize_fp8_row(const float* x, int64_t n, uint8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(round_to_bf16(x[i])));
  const float scale = e8m0_to_float(float_to_e8m0_ceil(std::max(amax, 1e-4f) * (1.0f / kE4m3Max)));
  for (int64_t i = 0; i < n; ++i) codes[i] = float_to_e4m3(round_to_bf16(x[i]) / scale);
  return scale;
}

TEST(IndexerPrepare, Fp8OutputIsTheReferenceFp8RoundingOfTheBf16Operand) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    int64_t tokens, heads, head_dim, rope_dim;
  };
  uint32_t seed = 50;
  for (const bool reference : {false, true}) {
    for (const Shape& c : {Shape{3, 64, 128, 64}, Shape{37, 1, 128, 64}, Shape{4, 8, 64, 32}, Shape{7, 3, 32, 16},
                           Shape{6, 12, 32, 0}}) {
      SCOPED_TRACE("fp8 prepare tokens=" + std::to_string(c.tokens) + " heads=" + std::to_string(c.heads) +
                   " head_dim=" + std::to_string(c.head_dim) + (reference ? " reference" : " exact"));
      std::mt19937 rng(seed++);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      const int64_t rows = c.tokens * c.heads;
      std::vector<float> x(size_t(rows * c.head_dim));
      for (int64_t r = 0; r < rows; ++r) {
        const float scale = std::ldexp(1.0f, int(rng() % 17) - 8);
        for (int64_t d = 0; d < c.head_dim; ++d) x[size_t(r * c.head_dim + d)] = normal(rng) * scale;
      }
      x[0] = 0.0f;  // a zero and a tiny row: the 1e-4 floor of amax
      if (rows > 1)
        for (int64_t d = 0; d < c.head_dim; ++d) x[size_t(c.head_dim + d)] *= 1e-7f;
      std::vector<int64_t> positions(static_cast<size_t>(c.tokens));
      for (auto& p : positions) p = int64_t(rng() % 1000000);
      const cpu::RopeTable rope(160000.0, std::max<int64_t>(c.rope_dim, 2), cpu::YarnScaling{});
      std::vector<float> operand = x;
      if (c.rope_dim > 0)
        cpu::apply_rope(rope, operand.data(), positions.data(), {c.tokens, c.heads, c.head_dim, false});
      if (reference) cpu::round_indexer_reference(operand.data(), rows, c.head_dim);
      for (float& v : operand) v = round_to_bf16(v);  // the bf16 operand (unchanged in reference numerics)
      // The reference's own fp8 rounding of each row as one block: what codes · scale must give.
      std::vector<float> fp8_rounded = operand;
      for (int64_t r = 0; r < rows; ++r) cpu::round_fp8_blocks_ue8m0(fp8_rounded.data() + r * c.head_dim, c.head_dim,
                                                                     c.head_dim);

      DeviceBuffer d_x = to_device(x, "x"), d_positions = to_device(positions, "positions");
      DeviceBuffer d_freq = to_device(rope.frequencies(), "frequencies");
      DeviceBuffer d_codes(x.size() + 16, "codes"), d_scales(size_t(rows) * 4 + 16, "scales");
      d_codes.fill_bytes(0xFF);
      d_scales.fill_bytes(0xFF);
      run_indexer_prepare({.input = d_x.as<float>(),
                           .output_fp8 = d_codes.as<uint8_t>(),
                           .output_scales = d_scales.as<float>(),
                           .tokens = c.tokens,
                           .heads = c.heads,
                           .head_dim = c.head_dim,
                           .positions = d_positions.as<int64_t>(),
                           .rope_frequencies = c.rope_dim > 0 ? d_freq.as<float>() : nullptr,
                           .rope_dim = c.rope_dim,
                           .reference_rounding = reference});
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<uint8_t> codes = from_device<uint8_t>(d_codes, x.size() + 16);
      const std::vector<float> scales = from_device<float>(d_scales, size_t(rows) + 4);
      int failures = 0;
      for (int64_t r = 0; r < rows && failures < 10; ++r) {
        std::vector<uint8_t> want_codes(size_t(c.head_dim));
        const float want_scale = quantize_fp8_row(operand.data() + r * c.head_dim, c.head_dim, want_codes.data());
        float amax = 0.0f;
        for (int64_t d = 0; d < c.head_dim; ++d) amax = std::max(amax, std::fabs(operand[size_t(r * c.head_dim + d)]));
        const bool floored = amax < 1e-4f;  // the scale's floor, not amax, sets the scale: small values may flush
        if (float_bits(scales[size_t(r)]) != float_bits(want_scale)) {
          ++failures;
          ADD_FAILURE() << "row " << r << ": scale " << scales[size_t(r)] << ", want " << want_scale;
        }
        for (int64_t d = 0; d < c.head_dim && failures < 10; ++d) {
          const size_t i = size_t(r * c.head_dim + d);
          const float value = round_to_bf16(e4m3_to_float(codes[i]) * scales[size_t(r)]);
          if (codes[i] != want_codes[size_t(d)] || float_bits(value) != float_bits(fp8_rounded[i])) {
            ++failures;
            ADD_FAILURE() << "row " << r << " dim " << d << ": code 0x" << std::hex << int(codes[i]) << " want 0x"
                          << int(want_codes[size_t(d)]) << std::dec << " (value " << value << ", reference fp8 "
                          << fp8_rounded[i] << ", operand " << operand[i] << ")";
          }
          // Reference numerics: fp4 with per-32 power-of-two scales fits e4m3 under one scale, so fp8 loses nothing.
          if (reference && !floored && float_bits(value) != float_bits(operand[i]) && failures < 10) {
            ++failures;
            ADD_FAILURE() << "row " << r << " dim " << d << ": fp8 " << value << " is not the fp4 operand "
                          << operand[i];
          }
        }
      }
      for (size_t i = x.size(); i < codes.size(); ++i) ASSERT_EQ(codes[i], 0xFF) << "write past the codes at " << i;
      for (size_t i = size_t(rows); i < scales.size(); ++i)
        ASSERT_EQ(float_bits(scales[i]), 0xFFFFFFFFu) << "write past the scales at " << i;
    }
  }
}

const char* method_name(IndexerTopKMethod m) {
  return m == IndexerTopKMethod::LastCta ? "LastCta" : m == IndexerTopKMethod::TopKKernel ? "TopKKernel" : "Auto";
}
const char* kernel_name(IndexerScoresKernel k) {
  return k == IndexerScoresKernel::Warp                ? "Warp"
         : k == IndexerScoresKernel::Warpgroup         ? "Warpgroup"
         : k == IndexerScoresKernel::WarpgroupStreamed ? "WarpgroupStreamed"
                                                       : "Auto";
}

// The device operands of a score launch: the queries run_indexer_prepare made (bf16, or fp8 codes and scales) and the
// keys (bf16, or fp8 codes and per-key scales).
struct ScoreOperands {
  const DeviceBuffer &q, &q_scales, &keys, &key_scales;
};

// Points p at its prepared queries and at its keys in the tested format (fp8: the scales slot_rows apart, as the
// keys).
void set_score_operands(IndexerScoresParams& p, const ScoreOperands& d, bool fp8, int64_t slot_rows) {
  if (fp8) {
    p.q_fp8 = d.q.as<uint8_t>(), p.q_scales = d.q_scales.as<float>();
  } else {
    p.q = d.q.as<__nv_bfloat16>();
  }
  if (fp8) {
    p.keys_fp8 = d.keys.as<uint8_t>(), p.key_scales = d.key_scales.as<float>(), p.key_scales_slot_stride = slot_rows;
  } else {
    p.keys = d.keys.as<__nv_bfloat16>();
  }
}

struct ScoresCase {
  int64_t tokens, heads, head_dim, key_count, ratio;
  bool reference;     // q and keys fp4-rounded (bf16 holds them exactly) vs plain bf16-rounded
  int sequences = 1;  // > 1: queries of different sequences (slots) in one launch, each with its own keys
  bool strided = false;  // token rows of the unprepared q and the head weights padded (NaN in the gaps), as in stacked
                         // outputs
  int64_t visible_limit = 0;  // > 0: positions see about this many keys at most (a short context in a large buffer)
  bool slot_count_unknown = false;  // with sequences > 1: slot_count 0 (Auto's fp8 keys then take the register-fed
                                    // kernel, with a warning; the staged kernel refuses them)
};

// Relative to Σ_h |w_h|·Σ_d |q_hd·K_jd|: the operands are the CPU's, so only the fp32 summation order differs. For fp8
// that includes the tensor core's own accumulation of e4m3 products, which PTX leaves unspecified; an H200 measured
// the same ≤ 5e-8 as bf16 (round 4), so both get the same bound.
constexpr double kScoreTolerance = 2e-5;
// The e4m3 warpgroup MMA keeps about 14 bits of each k32 step's sum of products before its fp32 accumulate (the
// behaviour DeepSeek reported for Hopper's fp8 tensor cores): plain e4m3 operands measured up to 4.5e-5 of the
// magnitude on an H200 (5 heads; ~1e-5 at 64), reference numerics' fp4-rounded ones 1e-8. 2^-12 still fails any
// layout or indexing error by orders of magnitude.
constexpr double kWarpgroupFp8Tolerance = 0x1p-12;

struct ScoresRun {
  std::vector<float> scores;         // [tokens, stride] as the GPU wrote them
  std::vector<float> expected;       // [tokens, key_count] CPU scores of the same operands
  std::vector<double> tolerance;     // [tokens, key_count]
  std::vector<int64_t> positions;
  int64_t stride = 0;
};

// Scores of `format` keys for random queries prepared by run_indexer_prepare (RoPE on the last half of head_dim, the
// rounding, bf16 or fp8): the CPU's scores of the prepared operands (every element, visibility, −inf). Where the
// shape allows it (head_dim 128, ≤ 64 heads), the warpgroup-MMA kernels (IndexerScoresKernel::Warpgroup and
// WarpgroupStreamed) too: the CPU's scores within the same tolerance (their tensor-core summation order is their own);
// and IndexerScoresKernel::Auto, bit for bit the kernel it should pick (WarpgroupStreamed there for fp8 keys, through
// slots too, and for bf16 keys of one query over ≥ 16384 keys of one sequence, else Warpgroup for bf16 keys from 2^20
// (query, key) pairs of one sequence, else Warp).
ScoresRun check_scores(const ScoresCase& c, KeyFormat format, uint32_t seed) {
  const bool fp8 = format == KeyFormat::Fp8;
  SCOPED_TRACE("scores T=" + std::to_string(c.tokens) + " heads=" + std::to_string(c.heads) + " head_dim=" +
               std::to_string(c.head_dim) + " keys=" + std::to_string(c.key_count) +
               (c.reference ? " reference" : " exact") + (fp8 ? " fp8" : " bf16") + " sequences=" +
               std::to_string(c.sequences));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Slot s's keys start at row s·slot_rows (a padded stride); query t is of slot query_slot[t].
  const int64_t slot_rows = c.sequences > 1 ? c.key_count + 3 : 0;
  const int64_t key_rows = c.sequences > 1 ? c.sequences * slot_rows : c.key_count;
  std::vector<float> q_raw(size_t(c.tokens * c.heads * c.head_dim)), keys(size_t(key_rows * c.head_dim));
  std::vector<int32_t> query_slot(size_t(c.tokens));
  for (int32_t& slot : query_slot) slot = int32_t(rng() % uint32_t(c.sequences));
  std::vector<float> weights(size_t(c.tokens * c.heads));
  for (float& v : q_raw) v = normal(rng);
  for (float& v : keys) v = normal(rng);
  for (float& v : weights) v = normal(rng);
  // Keys as the model stores them: rounded (reference) or bf16, then for fp8 quantised per key on the host.
  if (c.reference) {
    cpu::round_indexer_reference(keys.data(), key_rows, c.head_dim);
  } else {
    for (float& v : keys) v = round_to_bf16(v);
  }
  std::vector<uint8_t> key_codes(keys.size());
  std::vector<float> key_scales(static_cast<size_t>(key_rows));
  if (fp8) {
    for (int64_t r = 0; r < key_rows; ++r) {
      key_scales[size_t(r)] =
          quantize_fp8_row(keys.data() + r * c.head_dim, c.head_dim, key_codes.data() + r * c.head_dim);
      for (int64_t d = 0; d < c.head_dim; ++d)
        keys[size_t(r * c.head_dim + d)] = e4m3_to_float(key_codes[size_t(r * c.head_dim + d)]) * key_scales[size_t(r)];
    }
  }
  // Positions: the last query sees every key (or visible_limit of them); the others fewer (including none and a
  // window boundary ± 1).
  std::vector<int64_t> positions(static_cast<size_t>(c.tokens));
  const int64_t seen = c.visible_limit > 0 ? c.visible_limit : c.key_count;
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t full = seen * c.ratio + int64_t(rng() % 7);
    const int64_t options[] = {full, 0, c.ratio - 1, seen / 2 * c.ratio, seen / 2 * c.ratio - 1,
                               int64_t(rng() % uint32_t(full + 1))};
    positions[size_t(t)] = t == c.tokens - 1 ? full : options[rng() % 6];
  }

  // The queries prepared on the device (run_indexer_prepare is checked bit for bit against the CPU above).
  const int64_t rope_dim = c.head_dim / 2;
  const cpu::RopeTable rope(160000.0, rope_dim, cpu::YarnScaling{});
  // Strided: each token's row sits in a wider row (the rest NaN, which must never be read).
  const int64_t q_row = c.heads * c.head_dim, q_stride = c.strided ? q_row + 40 : q_row;
  const int64_t w_stride = c.strided ? c.heads + 3 : c.heads;
  std::vector<float> q_rows(size_t(c.tokens * q_stride), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> w_rows(size_t(c.tokens * w_stride), std::numeric_limits<float>::quiet_NaN());
  for (int64_t t = 0; t < c.tokens; ++t) {
    std::copy_n(q_raw.begin() + t * q_row, q_row, q_rows.begin() + t * q_stride);
    std::copy_n(weights.begin() + t * c.heads, c.heads, w_rows.begin() + t * w_stride);
  }
  DeviceBuffer d_q_raw = to_device(q_rows, "raw q"), d_pos = to_device(positions, "positions");
  DeviceBuffer d_freq = to_device(rope.frequencies(), "frequencies");
  DeviceBuffer d_q(q_raw.size() * (fp8 ? 1 : 2) + 16, "prepared q"), d_q_scales(size_t(c.tokens * c.heads) * 4 + 16,
                                                                              "q scales");
  run_indexer_prepare({.input = d_q_raw.as<float>(),
                       .input_row_stride = c.strided ? q_stride : 0,
                       .output = fp8 ? nullptr : d_q.as<__nv_bfloat16>(),
                       .output_fp8 = fp8 ? d_q.as<uint8_t>() : nullptr,
                       .output_scales = fp8 ? d_q_scales.as<float>() : nullptr,
                       .tokens = c.tokens,
                       .heads = c.heads,
                       .head_dim = c.head_dim,
                       .positions = d_pos.as<int64_t>(),
                       .rope_frequencies = d_freq.as<float>(),
                       .rope_dim = rope_dim,
                       .reference_rounding = c.reference});
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> q(q_raw.size());
  if (fp8) {
    const std::vector<uint8_t> codes = from_device<uint8_t>(d_q, q.size());
    const std::vector<float> scales = from_device<float>(d_q_scales, size_t(c.tokens * c.heads));
    for (size_t i = 0; i < q.size(); ++i) q[i] = e4m3_to_float(codes[i]) * scales[i / size_t(c.head_dim)];
  } else {
    q = bf16_to_floats(from_device<uint16_t>(d_q, q.size()));
  }

  // The CPU scores of each query against its own sequence's keys.
  ScoresRun run;
  run.positions = positions;
  run.expected.resize(size_t(c.tokens * c.key_count));
  auto keys_of = [&](int64_t t) { return keys.data() + query_slot[size_t(t)] * slot_rows * c.head_dim; };
  for (int64_t t = 0; t < c.tokens; ++t)
    cpu::indexer_scores({q.data() + t * c.heads * c.head_dim, weights.data() + t * c.heads, keys_of(t), c.key_count,
                         positions.data() + t},
                        {1, c.heads, c.head_dim, c.ratio, 512}, run.expected.data() + t * c.key_count);
  const float weight_scale = 1.0f / std::sqrt(float(c.head_dim)) / std::sqrt(float(c.heads));
  run.tolerance.resize(run.expected.size());
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int64_t j = 0; j < c.key_count; ++j) {
      if (std::isinf(run.expected[size_t(t * c.key_count + j)])) continue;  // invisible: no tolerance needed
      double magnitude = 0.0;
      for (int64_t h = 0; h < c.heads; ++h) {
        double dot = 0.0;
        for (int64_t d = 0; d < c.head_dim; ++d)
          dot += std::fabs(double(q[size_t((t * c.heads + h) * c.head_dim + d)]) * keys_of(t)[j * c.head_dim + d]);
        magnitude += std::fabs(double(weights[size_t(t * c.heads + h)]) * weight_scale) * dot;
      }
      run.tolerance[size_t(t * c.key_count + j)] = kScoreTolerance * magnitude + 1e-30;
    }

  std::vector<uint16_t> keys_bf16(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) keys_bf16[i] = float_to_bf16(keys[i]);
  if (c.visible_limit > 0) {
    // The rows no query sees hold NaN on the device: a kernel that let one reach a visible score would show.
    int64_t most_seen = 0;
    for (const int64_t position : positions)
      most_seen = std::max(most_seen, std::min(c.key_count, (position + 1) / c.ratio));
    for (int64_t slot = 0; slot < c.sequences; ++slot)
      for (int64_t j = most_seen; j < c.key_count; ++j) {
        const size_t row = size_t(slot * slot_rows + j);
        std::fill_n(keys_bf16.begin() + row * size_t(c.head_dim), c.head_dim, uint16_t(0xFFFF));
        std::fill_n(key_codes.begin() + row * size_t(c.head_dim), c.head_dim, uint8_t(0xFF));
        key_scales[row] = std::numeric_limits<float>::quiet_NaN();
      }
  }
  DeviceBuffer d_keys = fp8 ? to_device(key_codes, "fp8 keys") : to_device(keys_bf16, "keys");
  DeviceBuffer d_key_scales = to_device(key_scales, "key scales");
  DeviceBuffer d_w = to_device(w_rows, "head weights");
  DeviceBuffer d_slots = to_device(query_slot, "sequence slots");
  run.stride = c.key_count + 5;  // a padded row: columns past key_count must stay untouched
  const int64_t stride = run.stride;
  DeviceBuffer d_scores(size_t(c.tokens * stride) * 4, "scores");

  std::vector<float> prepared_scores, warpgroup_scores;
  const bool warpgroup_shape = c.head_dim == 128 && c.heads <= 64;
  const bool slots_staged = c.sequences == 1 || !c.slot_count_unknown;
  const bool auto_streamed =
      warpgroup_shape && ((fp8 && slots_staged) || (c.sequences == 1 && c.tokens == 1 && c.key_count >= 16384));
  const bool auto_warpgroup = !auto_streamed && warpgroup_shape &&
                              (fp8 || (c.sequences == 1 && c.tokens * c.key_count >= (int64_t(1) << 20)));
  std::vector<float> streamed_scores;
  // Variant 0: the mma.sync kernel, 1: the warpgroup kernel, 3: the streamed warpgroup kernel (fp8 keys: the staged
  // kernel), 2: the automatic choice (last: it must equal one of them).
  for (const int variant : {0, 1, 3, 2}) {
    const bool streamed = variant == 3, warpgroup = variant == 1 || streamed, automatic = variant == 2;
    if ((warpgroup && !warpgroup_shape) || (streamed && fp8 && !slots_staged)) continue;
    const std::string name = streamed    ? "streamed warpgroup MMA"
                             : warpgroup ? "warpgroup MMA"
                             : automatic ? "auto"
                                         : "mma.sync";
    SCOPED_TRACE(name);
    d_scores.fill_bytes(0xFF);
    IndexerScoresParams p{.head_weights = d_w.as<float>(),
                          .head_weights_row_stride = c.strided ? w_stride : 0,
                          .key_count = c.key_count,
                          .sequence_slots = c.sequences > 1 ? d_slots.as<int32_t>() : nullptr,
                          .keys_slot_stride = slot_rows * c.head_dim,
                          .slot_count = c.sequences > 1 && !c.slot_count_unknown ? c.sequences : 0,
                          .positions = d_pos.as<int64_t>(),
                          .tokens = c.tokens,
                          .heads = c.heads,
                          .head_dim = c.head_dim,
                          .ratio = c.ratio,
                          .scores = d_scores.as<float>(),
                          .score_stride = stride};
    set_score_operands(p, {d_q, d_q_scales, d_keys, d_key_scales}, fp8, slot_rows);
    p.kernel = streamed    ? IndexerScoresKernel::WarpgroupStreamed
               : warpgroup ? IndexerScoresKernel::Warpgroup
               : automatic ? IndexerScoresKernel::Auto
                           : IndexerScoresKernel::Warp;
    run_indexer_scores(p);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got = from_device<float>(d_scores, size_t(c.tokens * stride));
    const bool warpgroup_fp8 = fp8 && (warpgroup || (automatic && (auto_warpgroup || auto_streamed)));
    const double tolerance_scale = warpgroup_fp8 ? kWarpgroupFp8Tolerance / kScoreTolerance : 1.0;

    int failures = 0;
    double max_ratio = 0.0;  // error / (tolerance / kScoreTolerance): the error relative to the magnitude
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
        const float e = run.expected[size_t(t * c.key_count + j)];
        if (std::isinf(e)) {
          // Invisible: −inf, or left as it was (the contract lets the kernel skip columns past the visible keys).
          if (!(std::isinf(g) && g < 0) && float_bits(g) != 0xFFFFFFFFu) {
            ++failures;
            ADD_FAILURE() << "score[" << t << ", " << j << "] = " << g << ", want -inf or untouched (invisible; "
                          << "position " << positions[size_t(t)] << ")";
          }
          continue;
        }
        const double tolerance = run.tolerance[size_t(t * c.key_count + j)] * tolerance_scale;
        const double error = std::fabs(double(g) - e);
        max_ratio = std::max(max_ratio, std::isfinite(g) ? error / tolerance * kScoreTolerance * tolerance_scale
                                                         : INFINITY);
        if (!std::isfinite(g) || error > tolerance) {
          ++failures;
          ADD_FAILURE() << "score[" << t << ", " << j << "] = " << g << ", want " << e << " (tolerance " << tolerance
                        << ")";
        }
      }
    }
    std::printf("scores T=%lld heads=%lld head_dim=%lld keys=%lld %s %s %s: max error / magnitude %.3g\n",
                (long long)c.tokens, (long long)c.heads, (long long)c.head_dim, (long long)c.key_count,
                c.reference ? "reference" : "exact", fp8 ? "fp8" : "bf16", name.c_str(), max_ratio);
    if (variant == 0) {
      prepared_scores = got;
      run.scores = got;
    } else if (variant == 1) {
      warpgroup_scores = got;
    } else if (variant == 3) {
      streamed_scores = got;
      if (fp8 && warpgroup_shape) {
        // The staged kernel sums head_dim in its natural order, the register-fed one in its fragments' permutation,
        // so the e4m3 MMA's per-step rounding may differ in exact numerics; in reference numerics (the fp8 keys the
        // model stores) every sum is exact and the bits agree.
        size_t differing = 0;
        for (size_t i = 0; i < got.size(); ++i) differing += float_bits(got[i]) != float_bits(warpgroup_scores[i]);
        std::printf("  staged vs register-fed warpgroup kernel: %zu of %zu scores' bits differ\n", differing,
                    got.size());
        if (c.reference) EXPECT_EQ(differing, 0u) << "staged and register-fed kernels in reference numerics";
        // The traced launch (bench --trace): the same bits, and each warpgroup's marks in order.
        const size_t warps = size_t(c.tokens) * 16 * 132 * 8;
        DeviceBuffer trace(warps * kIndexerTracePoints * 8, "trace");
        trace.fill_bytes(0);
        d_scores.fill_bytes(0xFF);
        p.trace = trace.as<uint64_t>();
        run_indexer_scores(p);
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<float> traced = from_device<float>(d_scores, size_t(c.tokens * stride));
        EXPECT_EQ(std::memcmp(traced.data(), got.data(), got.size() * 4), 0) << "traced staged kernel's scores";
        const std::vector<uint64_t> marks = from_device<uint64_t>(trace, warps * kIndexerTracePoints);
        int recorded = 0;
        for (size_t w = 0; w < warps; ++w) {
          const uint64_t* r = marks.data() + w * kIndexerTracePoints;
          if (r[kIndexerTraceStart] == 0) continue;
          ++recorded;
          EXPECT_TRUE(r[kIndexerTraceStart] <= r[kIndexerTraceWaited] &&
                      r[kIndexerTraceWaited] <= r[kIndexerTraceReady] && r[kIndexerTraceReady] <= r[kIndexerTraceEnd])
              << "warp " << w << "'s marks out of order";
        }
        EXPECT_GT(recorded, 0) << "no warpgroup marked the trace";
      }
    } else {
      // Auto: the bits of the kernel it must have picked.
      const std::vector<float>& same = auto_streamed    ? streamed_scores
                                       : auto_warpgroup ? warpgroup_scores
                                                        : prepared_scores;
      int mismatches = 0;
      for (size_t i = 0; i < got.size() && mismatches < 5; ++i)
        if (float_bits(got[i]) != float_bits(same[i])) {
          ++mismatches;
          ADD_FAILURE() << name << " score " << i << " = " << got[i] << " differs from " << same[i]
                        << (auto_streamed    ? " (streamed warpgroup MMA)"
                            : auto_warpgroup ? " (warpgroup MMA)"
                                             : " (mma.sync)");
        }
    }
  }
  return run;
}

TEST(IndexerScores, MatchesCpuScoresWithVisibility) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 100;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8})
    for (const bool reference : {true, false}) {
      check_scores({1, 64, 128, 1000, 4, reference}, format, seed++);  // V4 decode, a partial last warp tile
      check_scores({3, 64, 128, 777, 4, reference}, format, seed++);   // one query group of 3
      check_scores({9, 64, 128, 300, 4, reference}, format, seed++);   // three query groups, the last partial
      check_scores({2, 8, 64, 129, 4, reference}, format, seed++);     // small test-model shapes
      check_scores({5, 16, 32, 40, 128, reference}, format, seed++);   // HCA-like ratio
      check_scores({2, 128, 128, 64, 4, reference}, format, seed++);   // the most heads
      check_scores({3, 12, 32, 50, 4, reference}, format, seed++);     // golden fixtures: 12 index heads × 32
      check_scores({2, 16, 32, 17, 4, reference}, format, seed++);     // golden fixtures: 16 × 32
      check_scores({5, 1, 64, 70, 4, reference}, format, seed++);      // one head
      check_scores({4, 5, 128, 90, 4, reference}, format, seed++);     // a partial n-tile in the real head size
      check_scores({3, 64, 128, 500, 4, reference, 1, true}, format, seed++);  // strided q and head weights
      check_scores({2, 12, 32, 50, 4, reference, 1, true}, format, seed++);
    }
}

// A batched decode step: one query per sequence, each sequence its own keys and length (the key count a bound).
TEST(IndexerScores, SequencesOfDifferentLengthsInOneLaunch) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 300;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8})
    for (const bool reference : {true, false}) {
      check_scores({8, 64, 128, 1000, 4, reference, 8}, format, seed++);   // V4 decode batch of 8
      check_scores({5, 12, 32, 50, 4, reference, 3}, format, seed++);      // golden fixture shape, slots repeat
      check_scores({33, 16, 32, 17, 4, reference, 33}, format, seed++);    // many sequences, few keys
      check_scores({6, 64, 128, 300, 128, reference, 4}, format, seed++);  // HCA-like ratio
      check_scores({4, 64, 128, 200, 4, reference, 4, true}, format, seed++);  // strided q and head weights
    }
}

// Auto's fp8 keys through slots the staged kernel cannot take: the register-fed kernel's bits, and a warning naming
// the case (no silent slow path).
TEST(IndexerScores, AutoWarnsWhenSlotsCannotBeStaged) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  reset_indexer_warnings_for_tests();  // an earlier case (or repeat) of this process may have had the warning
  ::testing::internal::CaptureStderr();
  check_scores({8, 64, 128, 1000, 4, true, 8, false, 0, true}, KeyFormat::Fp8, 320);
  const std::string warnings = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(warnings.find("fp8 keys through sequence_slots with slot_count 0"), std::string::npos) << warnings;
  EXPECT_NE(warnings.find("register-fed warpgroup kernel (slower)"), std::string::npos) << warnings;
}

TEST(IndexerScores, LongContext) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  check_scores({1, 64, 128, 65536, 4, true}, KeyFormat::Bf16, 7);
  check_scores({1, 64, 128, 65536, 4, true}, KeyFormat::Fp8, 8);
  // 16 queries × 65536 keys: 2^20 (query, key) pairs, where Auto takes the warpgroup kernel for bf16 keys too (8
  // heads keep the CPU's side short).
  check_scores({16, 8, 128, 65536, 4, false}, KeyFormat::Bf16, 9);
  // The same with fp8 keys (the mma.sync, warpgroup and staged kernels).
  check_scores({16, 8, 128, 65536, 4, false}, KeyFormat::Fp8, 10);
  // fp8 keys at a 1M context and at 200000 keys: each warpgroup of the register-fed kernel loops over 5 to 8 tiles
  // (one wave of CTAs on 132 SMs), its tiles in flight carried from iteration to iteration.
  check_scores({1, 8, 128, 262144, 4, true}, KeyFormat::Fp8, 11);
  check_scores({3, 8, 128, 200000, 4, false}, KeyFormat::Fp8, 12);
}

// A short context in a large key buffer, as the model launches its decode steps (key_count the buffer's capacity,
// the grid sized by it): the kernels bound every key load by the visible keys, the first tiles' included; rows past
// them stay −inf or untouched, and the rows no query sees (NaN on the device) reach no visible score.
TEST(IndexerScores, ShortContextInALargeBuffer) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 400;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8}) {
    check_scores({1, 64, 128, 65536, 4, true, 1, false, 1000}, format, seed++);  // streamed (bf16) / warpgroup
    check_scores({3, 8, 128, 262144, 4, false, 1, false, 3000}, format, seed++);  // one query group of 3
    check_scores({4, 64, 128, 20000, 4, true, 4, false, 700}, format, seed++);    // sequence slots
    check_scores({2, 8, 64, 5000, 4, false, 1, false, 100}, format, seed++);     // the mma.sync kernel alone
  }
}

// fp8 scores then the device top-k against the CPU's top-k of the CPU scores. The two score sets differ by the
// summation order (within the tolerance), so the selections may differ only by swapping keys whose CPU scores lie
// within that tolerance of the k-th best (near-ties; reference numerics' fp4 operands make exact ties common, and
// exact ties go to the lower index on both sides).
TEST(IndexerScores, Fp8TopKAgreesWithCpuUpToNearTies) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int kTopK = 512;
  uint32_t seed = 700;
  for (const bool reference : {true, false}) {
    const ScoresCase c{3, 64, 128, 4000, 4, reference};
    const ScoresRun run = check_scores(c, KeyFormat::Fp8, seed++);
    DeviceBuffer d_scores = to_device(run.scores, "scores"), d_pos = to_device(run.positions, "positions");
    DeviceBuffer d_selected(size_t(c.tokens) * kTopK * 4, "selected"), d_counts(size_t(c.tokens) * 4, "counts");
    DeviceBuffer d_flag(4, "nan flag");
    DeviceBuffer workspace(top_k_workspace_bytes(int(c.tokens)), "top-k workspace");
    workspace.fill_bytes(0);
    d_flag.fill_bytes(0);
    d_selected.fill_bytes(0xAB);
    d_counts.fill_bytes(0xAB);
    run_top_k({.scores = d_scores.as<float>(),
               .row_stride = run.stride,
               .candidates = c.key_count,
               .queries = int(c.tokens),
               .k = kTopK,
               .positions = d_pos.as<int64_t>(),
               .ratio = c.ratio,
               .selected = d_selected.as<int32_t>(),
               .counts = d_counts.as<int32_t>(),
               .nan_flag = d_flag.as<int32_t>(),
               .workspace = workspace.data(),
               .workspace_bytes = workspace.bytes()});
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(from_device<int32_t>(d_flag, 1)[0], 0);
    const std::vector<int32_t> selected = from_device<int32_t>(d_selected, size_t(c.tokens) * kTopK);
    const std::vector<int32_t> counts = from_device<int32_t>(d_counts, size_t(c.tokens));
    for (int64_t t = 0; t < c.tokens; ++t) {
      const float* expected = run.expected.data() + t * c.key_count;
      const double* tolerance = run.tolerance.data() + t * c.key_count;
      const int64_t visible = cpu::visible_key_count(run.positions[size_t(t)], c.ratio, c.key_count);
      std::vector<int32_t> want(kTopK);
      const int64_t count = cpu::select_top_k(expected, visible, kTopK, want.data());
      ASSERT_EQ(counts[size_t(t)], count) << "query " << t;
      if (count == 0) continue;
      const float threshold = expected[want[size_t(count - 1)]];  // the CPU's k-th best score
      // Two scores' errors apart at most (the GPU ranks i above j only if gpu_i ≥ gpu_j).
      double slack = 0.0;
      for (int64_t j = 0; j < visible; ++j) slack = std::max(slack, 2 * tolerance[j]);
      std::vector<char> in_gpu(size_t(c.key_count), 0), in_cpu(size_t(c.key_count), 0);
      for (int64_t i = 0; i < count; ++i) in_cpu[size_t(want[size_t(i)])] = 1;
      int differences = 0;
      for (int64_t i = 0; i < count; ++i) {
        const int32_t j = selected[size_t(t * kTopK + i)];
        ASSERT_TRUE(j >= 0 && j < visible) << "query " << t << " rank " << i << ": index " << j << " not visible";
        ASSERT_FALSE(in_gpu[size_t(j)]) << "query " << t << ": index " << j << " selected twice";
        in_gpu[size_t(j)] = 1;
        if (!in_cpu[size_t(j)]) {
          ++differences;
          EXPECT_GE(double(expected[j]) + slack, double(threshold))
              << "query " << t << ": the GPU selected " << j << " (CPU score " << expected[j]
              << ") well below the CPU's k-th score " << threshold;
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        const int32_t j = want[size_t(i)];
        if (!in_gpu[size_t(j)])
          EXPECT_LE(double(expected[j]) - slack, double(threshold))
              << "query " << t << ": the GPU dropped " << j << " (CPU score " << expected[j]
              << ") well above the CPU's k-th score " << threshold;
      }
      std::printf("fp8 top-%d %s query %lld: %lld selected, %d differ from the CPU's (near-ties)\n", kTopK,
                  reference ? "reference" : "exact", (long long)t, (long long)count, differences);
    }
  }
}

// run_indexer_scores_top_k against run_indexer_scores then run_top_k on the same score kernel: the same scores bits,
// so the same selection (indices, order, counts, NaN flag) and the same scores written (LastCta: all of them;
// TopKKernel: where a CTA's range exceeds its cache). Both key formats, every method and
// score kernel, one and many CTAs per query, short contexts, sequence slots; 262,144 keys at batch 1 (TopKKernel).
struct FusedCase {
  int64_t tokens, heads, head_dim, key_count;
  int k;
  int sequences = 1;
  int max_ctas_per_query = 0;
  IndexerTopKMethod method = IndexerTopKMethod::TopKKernel;
  IndexerScoresKernel kernel = IndexerScoresKernel::Warp;
  bool nan_weight = false;  // one head weight of query 0 NaN: its scores all NaN (the flag, NaN ranked last)
};

void check_fused_scores_top_k(const FusedCase& c, KeyFormat format, uint32_t seed) {
  const bool fp8 = format == KeyFormat::Fp8;
  SCOPED_TRACE("fused T=" + std::to_string(c.tokens) + " heads=" + std::to_string(c.heads) + " head_dim=" +
               std::to_string(c.head_dim) + " keys=" + std::to_string(c.key_count) + " k=" + std::to_string(c.k) +
               (fp8 ? " fp8" : " bf16") + " sequences=" +
               std::to_string(c.sequences) + " ctas cap=" + std::to_string(c.max_ctas_per_query) + " method " +
               method_name(c.method) + " kernel " + kernel_name(c.kernel) + (c.nan_weight ? " NaN weight" : ""));
  constexpr int64_t kRatio = 4;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t slot_rows = c.key_count + 3;
  const int64_t key_rows = c.sequences * slot_rows;
  std::vector<float> q_raw(size_t(c.tokens * c.heads * c.head_dim)), keys(size_t(key_rows * c.head_dim));
  std::vector<float> weights(size_t(c.tokens * c.heads));
  for (float& v : q_raw) v = normal(rng);
  for (float& v : keys) v = normal(rng);
  for (float& v : weights) v = normal(rng);
  if (c.nan_weight) weights[size_t(std::min<int64_t>(5, c.heads - 1))] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int32_t> query_slot(size_t(c.tokens));
  for (int32_t& slot : query_slot) slot = int32_t(rng() % uint32_t(c.sequences));
  std::vector<int64_t> positions(static_cast<size_t>(c.tokens));
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t full = c.key_count * kRatio + int64_t(rng() % 4);
    const int64_t options[] = {full, 0, int64_t(c.k) * kRatio, int64_t(c.k - 1) * kRatio,
                               int64_t(rng() % uint32_t(full + 1))};
    positions[size_t(t)] = t == 0 ? full : options[rng() % 5];
  }
  std::vector<uint16_t> keys_bf16(keys.size());
  std::vector<uint8_t> key_codes(keys.size());
  std::vector<float> key_scales(static_cast<size_t>(key_rows));
  for (size_t i = 0; i < keys.size(); ++i) keys_bf16[i] = float_to_bf16(keys[i]);
  for (int64_t r = 0; r < key_rows; ++r)
    key_scales[size_t(r)] =
        quantize_fp8_row(keys.data() + r * c.head_dim, c.head_dim, key_codes.data() + r * c.head_dim);

  const int64_t rope_dim = c.head_dim / 2;
  const cpu::RopeTable rope(160000.0, rope_dim, cpu::YarnScaling{});
  DeviceBuffer d_q_raw = to_device(q_raw, "raw q"), d_pos = to_device(positions, "positions");
  DeviceBuffer d_freq = to_device(rope.frequencies(), "frequencies"), d_w = to_device(weights, "head weights");
  DeviceBuffer d_slots = to_device(query_slot, "sequence slots");
  DeviceBuffer d_keys = fp8 ? to_device(key_codes, "fp8 keys") : to_device(keys_bf16, "keys");
  DeviceBuffer d_key_scales = to_device(key_scales, "key scales");
  DeviceBuffer d_q(q_raw.size() * 2 + 16, "prepared q"), d_q_scales(size_t(c.tokens * c.heads) * 4 + 16, "q scales");
  run_indexer_prepare({.input = d_q_raw.as<float>(),
                       .output = fp8 ? nullptr : d_q.as<__nv_bfloat16>(),
                       .output_fp8 = fp8 ? d_q.as<uint8_t>() : nullptr,
                       .output_scales = fp8 ? d_q_scales.as<float>() : nullptr,
                       .tokens = c.tokens,
                       .heads = c.heads,
                       .head_dim = c.head_dim,
                       .positions = d_pos.as<int64_t>(),
                       .rope_frequencies = d_freq.as<float>(),
                       .rope_dim = rope_dim,
                       .reference_rounding = true});

  IndexerScoresParams p{.head_weights = d_w.as<float>(),
                        .key_count = c.key_count,
                        .sequence_slots = c.sequences > 1 ? d_slots.as<int32_t>() : nullptr,
                        .keys_slot_stride = slot_rows * c.head_dim,
                        .slot_count = c.sequences,
                        .positions = d_pos.as<int64_t>(),
                        .tokens = c.tokens,
                        .heads = c.heads,
                        .head_dim = c.head_dim,
                        .ratio = kRatio,
                        .score_stride = c.key_count + 5};
  set_score_operands(p, {d_q, d_q_scales, d_keys, d_key_scales}, fp8, slot_rows);
  const size_t score_count = size_t(c.tokens * p.score_stride);
  const size_t k_alloc = size_t(std::max(c.k, 1));
  DeviceBuffer workspace(std::max<size_t>(top_k_workspace_bytes(int(c.tokens)), 16), "top-k workspace");
  workspace.fill_bytes(0);
  struct Selection {
    std::vector<float> scores;
    std::vector<int32_t> selected, counts;
    int32_t nan_flag;
  };
  // fused: the call under test, `launches` times in a row (the workspace's tickets must be zero again after each).
  const auto select = [&](bool fused, int launches) {
    DeviceBuffer d_scores(score_count * 4, "scores"), d_selected(size_t(c.tokens) * k_alloc * 4, "selected");
    DeviceBuffer d_counts(size_t(c.tokens) * 4, "counts"), d_flag(4, "nan flag");
    d_flag.fill_bytes(0);
    IndexerScoresParams scores = p;
    scores.scores = d_scores.as<float>();
    // The two-launch reference scores on the same kernel (TopKKernel's score code is the mma.sync kernels').
    scores.kernel = c.kernel;
    scores.top_k_method = c.method;
    const TopKParams top{.scores = d_scores.as<float>(),
                         .row_stride = p.score_stride,
                         .candidates = c.key_count,
                         .queries = int(c.tokens),
                         .k = c.k,
                         .positions = d_pos.as<int64_t>(),
                         .ratio = kRatio,
                         .selected = d_selected.as<int32_t>(),
                         .counts = d_counts.as<int32_t>(),
                         .nan_flag = d_flag.as<int32_t>(),
                         .workspace = workspace.data(),
                         .workspace_bytes = workspace.bytes(),
                         .max_ctas_per_query = c.max_ctas_per_query};
    for (int launch = 0; launch < launches; ++launch) {
      // Poisoned before each launch: every output must be written again.
      d_scores.fill_bytes(0xFF);
      d_selected.fill_bytes(0xAB);
      d_counts.fill_bytes(0xAB);
      if (fused) {
        run_indexer_scores_top_k(scores, top);
      } else {
        run_indexer_scores(scores);
        run_top_k(top);
      }
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
    return Selection{from_device<float>(d_scores, score_count),
                     from_device<int32_t>(d_selected, size_t(c.tokens) * k_alloc),
                     from_device<int32_t>(d_counts, size_t(c.tokens)), from_device<int32_t>(d_flag, 1)[0]};
  };
  const Selection want = select(false, 1), got = select(true, 3);
  EXPECT_EQ(got.nan_flag, want.nan_flag);
  if (c.nan_weight) EXPECT_EQ(want.nan_flag, 1) << "a NaN head weight must raise the flag";
  int failures = 0;
  for (int64_t t = 0; t < c.tokens && failures < 10; ++t) {
    if (got.counts[size_t(t)] != want.counts[size_t(t)]) {
      ++failures;
      ADD_FAILURE() << "query " << t << ": count " << got.counts[size_t(t)] << ", want " << want.counts[size_t(t)];
    }
    for (int i = 0; i < c.k && failures < 10; ++i) {
      const size_t at = size_t(t) * size_t(c.k) + size_t(i);
      if (got.selected[at] != want.selected[at]) {
        ++failures;
        ADD_FAILURE() << "query " << t << " rank " << i << ": index " << got.selected[at] << ", want "
                      << want.selected[at];
      }
    }
  }
  // Scores the fused kernel wrote (ranges beyond a CTA's cache) are the score kernel's bits.
  int written = 0;
  for (size_t i = 0; i < score_count && failures < 10; ++i) {
    if (float_bits(got.scores[i]) == 0xFFFFFFFFu) continue;
    ++written;
    if (float_bits(got.scores[i]) != float_bits(want.scores[i])) {
      ++failures;
      ADD_FAILURE() << "fused score " << i << " = " << got.scores[i] << ", want " << want.scores[i];
    }
  }
  std::printf("fused scores + top-%d T=%lld keys=%lld %s %s %s: %d scores written\n", c.k, (long long)c.tokens,
              (long long)c.key_count, fp8 ? "fp8" : "bf16", method_name(c.method), kernel_name(c.kernel), written);
  if (c.method != IndexerTopKMethod::TopKKernel) {
    // The scores launch's own writes: every score bit of the two-launch run.
    int unwritten = 0;
    for (size_t i = 0; i < score_count; ++i) unwritten += float_bits(got.scores[i]) != float_bits(want.scores[i]);
    EXPECT_EQ(unwritten, 0) << "scores differ from run_indexer_scores'";
  } else if (c.key_count <= topk::kCachedKeys) {
    // Ranges that fit a CTA's cache leave the scores unwritten; one CTA for query 0's full row streams all of it.
    EXPECT_EQ(written, 0) << "the fused kernel wrote scores of ranges that fit its cache";
  } else if (c.max_ctas_per_query == 1 && c.k > 0) {
    EXPECT_GE(written, c.key_count) << "query 0's streamed range was not written to the scores";
  }
}

TEST(IndexerScoresTopK, FusedEqualsScoresThenTopK) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1500;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8}) {
    check_fused_scores_top_k({1, 64, 128, 262144, 512}, format, seed++);           // V4-Flash at 1M, batch 1
    check_fused_scores_top_k({4, 64, 128, 70000, 1024, 4}, format, seed++);        // slots, V4-Pro's k
    check_fused_scores_top_k({2, 64, 128, 40000, 512, 1, 1}, format, seed++);      // one CTA: streamed range
    check_fused_scores_top_k({64, 64, 128, 40000, 512, 64}, format, seed++);       // batch 64: streamed ranges
    check_fused_scores_top_k({3, 64, 128, 300, 512}, format, seed++);              // fewer visible than k
    check_fused_scores_top_k({70, 16, 64, 3000, 512, 70}, format, seed++);         // one CTA per query
    check_fused_scores_top_k({5, 12, 32, 2000, 64, 2}, format, seed++);            // golden fixtures' head shape
    check_fused_scores_top_k({2, 64, 128, 5000, 0}, format, seed++);               // k = 0
  }
}

// The top-k in the scores launch's last CTA (IndexerTopKMethod::LastCta) on every score kernel, and Auto's choice.
TEST(IndexerScoresTopK, LastCtaEqualsScoresThenTopK) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr IndexerTopKMethod LastCta = IndexerTopKMethod::LastCta, Auto = IndexerTopKMethod::Auto;
  uint32_t seed = 1700;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8})
    for (const IndexerScoresKernel kernel :
         {IndexerScoresKernel::Warp, IndexerScoresKernel::Warpgroup, IndexerScoresKernel::Auto}) {
      // V4-Flash decode at a 4K-token context bound: 1024 keys over several CTAs (tickets), ties of fp4 keys.
      check_fused_scores_top_k({1, 64, 128, 1024, 512, 1, 0, LastCta, kernel}, format, seed++);
      // The e2e bench's bound (a 66-token context): 16 keys, one CTA, fewer visible than k.
      check_fused_scores_top_k({1, 64, 128, 16, 512, 1, 0, LastCta, kernel}, format, seed++);
      // The most keys, and a batch of 8 of one sequence (two query groups of 4) or of 8 sequences.
      check_fused_scores_top_k({1, 64, 128, 2048, 512, 1, 0, LastCta, kernel}, format, seed++);
      check_fused_scores_top_k({8, 64, 128, 700, 512, 1, 0, LastCta, kernel}, format, seed++);
      check_fused_scores_top_k({8, 64, 128, 1500, 512, 8, 0, LastCta, kernel}, format, seed++);
      // NaN scores: the flag, NaN ranked below every number; V4-Pro's k.
      check_fused_scores_top_k({2, 64, 128, 900, 1024, 1, 0, LastCta, kernel, true}, format, seed++);
    }
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8}) {
    // Mma.sync-only shapes: head_dim 32/64, few heads; k = 0; a prefill-sized batch over one CTA per group.
    check_fused_scores_top_k({5, 12, 32, 300, 64, 2, 0, LastCta}, format, seed++);
    check_fused_scores_top_k({3, 8, 64, 129, 100, 1, 0, LastCta}, format, seed++);
    check_fused_scores_top_k({2, 64, 128, 500, 0, 1, 0, LastCta}, format, seed++);
    check_fused_scores_top_k({200, 16, 64, 40, 512, 1, 0, LastCta}, format, seed++);
    // Auto: LastCta here, two launches past kIndexerLastCtaMaxKeys or with several queries per CTA.
    check_fused_scores_top_k({1, 64, 128, 1000, 512, 1, 0, Auto, IndexerScoresKernel::Auto}, format, seed++);
    check_fused_scores_top_k({8, 64, 128, 700, 512, 1, 0, Auto, IndexerScoresKernel::Auto}, format, seed++);
    check_fused_scores_top_k({8, 64, 128, 700, 512, 8, 0, Auto, IndexerScoresKernel::Auto}, format, seed++);
    check_fused_scores_top_k({1, 64, 128, 5000, 512, 1, 0, Auto, IndexerScoresKernel::Auto}, format, seed++);
  }
  // The streamed warpgroup kernels' last CTA: several CTAs per query (tickets), one CTA, groups of several queries;
  // both formats also through slots (fp8 keys: the staged kernel).
  constexpr IndexerScoresKernel kStreamed = IndexerScoresKernel::WarpgroupStreamed;
  for (const KeyFormat format : {KeyFormat::Bf16, KeyFormat::Fp8}) {
    check_fused_scores_top_k({1, 64, 128, 1024, 512, 1, 0, LastCta, kStreamed}, format, seed++);
    check_fused_scores_top_k({1, 64, 128, 16, 512, 1, 0, LastCta, kStreamed}, format, seed++);
    check_fused_scores_top_k({8, 64, 128, 700, 512, 1, 0, LastCta, kStreamed}, format, seed++);
    check_fused_scores_top_k({8, 64, 128, 1500, 512, 8, 0, LastCta, kStreamed}, format, seed++);
  }
}

TEST(IndexerScores, RefusesMismatchedOperands) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer buffer(4096, "operands");
  const IndexerScoresParams base{.head_weights = buffer.as<float>(),
                                 .key_count = 8,
                                 .positions = buffer.as<int64_t>(),
                                 .tokens = 1,
                                 .heads = 8,
                                 .head_dim = 64,
                                 .scores = buffer.as<float>(),
                                 .score_stride = 8};
  IndexerScoresParams p = base;
  p.q = buffer.as<__nv_bfloat16>(), p.keys = buffer.as<__nv_bfloat16>(), p.keys_fp8 = buffer.as<uint8_t>();
  testing::expect_error([&] { run_indexer_scores(p); }, "not both");
  p = base;
  p.q = buffer.as<__nv_bfloat16>(), p.keys_fp8 = buffer.as<uint8_t>(), p.key_scales = buffer.as<float>();
  testing::expect_error([&] { run_indexer_scores(p); }, "fp8 keys need fp8 queries");
  p = base;
  p.q_fp8 = buffer.as<uint8_t>(), p.q_scales = buffer.as<float>(), p.keys = buffer.as<__nv_bfloat16>();
  testing::expect_error([&] { run_indexer_scores(p); }, "need fp8 keys");
  p = base;
  p.q_fp8 = buffer.as<uint8_t>(), p.keys_fp8 = buffer.as<uint8_t>();
  testing::expect_error([&] { run_indexer_scores(p); }, "q_scales");
  p.q_scales = buffer.as<float>();
  testing::expect_error([&] { run_indexer_scores(p); }, "key_scales");
  p = base;
  p.q = buffer.as<__nv_bfloat16>(), p.q_fp8 = buffer.as<uint8_t>(), p.keys = buffer.as<__nv_bfloat16>();
  testing::expect_error([&] { run_indexer_scores(p); }, "give q (bf16) or q_fp8, not both");
  p = base;
  p.q = buffer.as<__nv_bfloat16>(), p.keys = buffer.as<__nv_bfloat16>(), p.head_weights_row_stride = 3;
  testing::expect_error([&] { run_indexer_scores(p); }, "head_weights_row_stride 3");
  // The warpgroup kernels: head_dim 128, at most 64 heads, prepared queries; not in the fused scores + top-k.
  p = base;
  p.q = buffer.as<__nv_bfloat16>(), p.keys = buffer.as<__nv_bfloat16>(), p.kernel = IndexerScoresKernel::Warpgroup;
  testing::expect_error([&] { run_indexer_scores(p); }, "the Warpgroup kernel needs head_dim 128 (got 64)");
  p.kernel = IndexerScoresKernel::WarpgroupStreamed;
  testing::expect_error([&] { run_indexer_scores(p); }, "the WarpgroupStreamed kernel needs head_dim 128 (got 64)");
  p.kernel = IndexerScoresKernel::Warpgroup;
  p.head_dim = 128, p.heads = 65;
  testing::expect_error([&] { run_indexer_scores(p); }, "at most 64 heads (got 65)");
  // The staged kernel takes fp8 keys through slots only with their count and whole 128-byte rows between slots.
  IndexerScoresParams streamed_fp8 = base;
  streamed_fp8.head_dim = 128, streamed_fp8.kernel = IndexerScoresKernel::WarpgroupStreamed;
  streamed_fp8.q_fp8 = buffer.as<uint8_t>(), streamed_fp8.q_scales = buffer.as<float>();
  streamed_fp8.keys_fp8 = buffer.as<uint8_t>(), streamed_fp8.key_scales = buffer.as<float>();
  streamed_fp8.sequence_slots = buffer.as<int32_t>(), streamed_fp8.keys_slot_stride = 1024;
  streamed_fp8.key_scales_slot_stride = 8;
  testing::expect_error([&] { run_indexer_scores(streamed_fp8); }, "with slot_count > 0 (got 0)");
  streamed_fp8.slot_count = 2, streamed_fp8.keys_slot_stride = 1040;
  testing::expect_error([&] { run_indexer_scores(streamed_fp8); }, "a multiple of 128 (got 1040)");
  p.heads = 64, p.top_k_method = IndexerTopKMethod::TopKKernel;
  int32_t* outputs = buffer.as<int32_t>() + 512;
  testing::expect_error(
      [&] { run_indexer_scores_top_k(p, TopKParams{.k = 4, .selected = outputs, .counts = outputs}); },
      "mma.sync kernels only");
  p.top_k_method = IndexerTopKMethod::LastCta, p.key_count = 3000, p.score_stride = 3000;
  testing::expect_error(
      [&] { run_indexer_scores_top_k(p, TopKParams{.k = 4, .selected = outputs, .counts = outputs}); },
      "LastCta needs key_count ≤ 2048 (got 3000)");
  IndexerPrepareParams prepare{.input = buffer.as<float>(), .tokens = 1, .heads = 1, .head_dim = 64};
  testing::expect_error([&] { run_indexer_prepare(prepare); }, "exactly one of output");
  prepare.output_fp8 = buffer.as<uint8_t>() + 2048;
  testing::expect_error([&] { run_indexer_prepare(prepare); }, "output_scales");
  prepare.output_scales = buffer.as<float>() + 900, prepare.input_row_stride = 10;
  testing::expect_error([&] { run_indexer_prepare(prepare); }, "input_row_stride 10");
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
