// GpuBf16 numerics: the CPU model rounding to bf16 where the CUDA kernels do (numerics_mode.hpp). The ops' rounded
// paths against formulas written out here, and the whole model: close to Exact, independent of chunking.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <random>

#include "backends/cpu/attention.hpp"
#include "backends/cpu/cpu_backend.hpp"
#include "backends/cpu/linear.hpp"
#include "backends/cpu/moe.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/dsv4_model.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4 {
namespace {

namespace fs = std::filesystem;
using cpu::testing::random_vector;

constexpr float kLog2e = 1.4426950408889634f;

std::vector<float> rounded(std::vector<float> v) {
  for (float& x : v) x = round_to_bf16(x);
  return v;
}

TEST(NumericsMode, NamesRoundTrip) {
  for (NumericsMode mode : {NumericsMode::Exact, NumericsMode::Reference, NumericsMode::GpuBf16})
    EXPECT_EQ(parse_numerics_mode(to_string(mode)), mode);
  EXPECT_EQ(to_string(NumericsMode::GpuBf16), "gpu-bf16");
  EXPECT_FALSE(parse_numerics_mode("bf16").has_value());
  EXPECT_FALSE(parse_numerics_mode("").has_value());
}

// Two one-hot entries, so the output is the normalised weights themselves: o = (w0, w1) / (w0 + w1 + sink term).
struct TwoEntries {
  static constexpr int64_t D = 2;
  std::vector<float> q = {0.3f, 0.7f};        // scores 0.3 and 0.7 with softmax_scale 1
  std::vector<float> kv = {1, 0, 0, 1};       // rows 0 and 1
  std::vector<int32_t> window_index;
  float sink = 0.1f;

  std::vector<float> run(int64_t tile, bool with_sink) const {
    std::vector<float> out(D, std::numeric_limits<float>::quiet_NaN());
    cpu::sparse_attention({.q = q.data(), .attn_sink = with_sink ? &sink : nullptr, .window_kv = kv.data(),
                           .window_rows = 2, .window_index = window_index.data()},
                          {.tokens = 1, .heads = 1, .head_dim = D, .softmax_scale = 1.0f,
                           .window_slots = int64_t(window_index.size()), .bf16_weight_tile = tile},
                          out.data());
    return out;
  }
};

TEST(Bf16AttentionWeights, RunningMaxOverTilesAsTheKernelKeepsIt) {
  const float s0 = 0.3f * kLog2e, s1 = 0.7f * kLog2e;  // log2 domain
  const float alpha = std::exp2(s0 - s1);              // e^-0.4: not a bf16 value
  ASSERT_NE(round_to_bf16(alpha), alpha);
  for (bool with_sink : {false, true}) {
    SCOPED_TRACE(with_sink ? "sink" : "no sink");
    TwoEntries p;
    p.window_index = {0, 1};
    // One tile: the max (entry 1) is known when entry 0 is weighted: w0 = bf16(e^-0.4).
    const float sink_term_1 = with_sink ? std::exp2(p.sink * kLog2e - s1) : 0.0f;
    const float w0 = round_to_bf16(alpha);
    const std::vector<float> one_tile = p.run(2, with_sink);
    EXPECT_FLOAT_EQ(one_tile[0], w0 / (w0 + 1 + sink_term_1));
    EXPECT_FLOAT_EQ(one_tile[1], 1 / (w0 + 1 + sink_term_1));
    // Tiles of one slot: entry 0 is weighted 1 against its own max, then rescaled by the fp32 e^-0.4.
    const std::vector<float> two_tiles = p.run(1, with_sink);
    EXPECT_FLOAT_EQ(two_tiles[0], alpha / (alpha + 1 + sink_term_1));
    EXPECT_FLOAT_EQ(two_tiles[1], 1 / (alpha + 1 + sink_term_1));
    EXPECT_NE(one_tile[0], two_tiles[0]);
    // Unused slots count for the tile boundaries: slots {0, −1, 1, −1} in tiles of 2 are the two-tile case.
    p.window_index = {0, -1, 1, -1};
    EXPECT_EQ(p.run(2, with_sink), two_tiles);
  }
}

TEST(Bf16AttentionWeights, OneTileMatchesRoundedSoftmaxAndStaysNearTheExactOne) {
  const int64_t T = 2, H = 3, D = 16, rows = 40;
  const std::vector<float> q = random_vector(T * H * D, 11, -1.5f, 1.5f);
  const std::vector<float> kv = random_vector(rows * D, 12, -1.5f, 1.5f);
  const std::vector<float> sink = random_vector(H, 13);
  std::mt19937 rng(14);
  std::vector<int32_t> index(size_t(T * rows));
  for (int32_t& i : index) i = rng() % 5 == 0 ? -1 : int32_t(rng() % rows);
  const float scale = 0.25f;
  auto run = [&](int64_t tile) {
    std::vector<float> out(size_t(T * H * D), std::numeric_limits<float>::quiet_NaN());
    cpu::sparse_attention({.q = q.data(), .attn_sink = sink.data(), .window_kv = kv.data(), .window_rows = rows,
                           .window_index = index.data()},
                          {.tokens = T, .heads = H, .head_dim = D, .softmax_scale = scale, .window_slots = rows,
                           .bf16_weight_tile = tile},
                          out.data());
    return out;
  };
  const std::vector<float> exact = run(0), one_tile = run(64);
  float worst_exact = 0, worst_rounded = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      // Scores in the log2 domain (double sums: the last fp32 bit rarely moves a bf16 rounding), then the weights.
      std::vector<float> s;
      std::vector<int32_t> used;
      for (int64_t j = 0; j < rows; ++j) {
        const int32_t r = index[size_t(t * rows + j)];
        if (r < 0) continue;
        double dot = 0;
        for (int64_t i = 0; i < D; ++i) dot += double(q[size_t((t * H + h) * D + i)]) * kv[size_t(r * D + i)];
        s.push_back(float(dot) * (scale * kLog2e));
        used.push_back(r);
      }
      const float max = *std::max_element(s.begin(), s.end());
      double denominator = std::exp2(sink[size_t(h)] * kLog2e - max);
      std::vector<double> w;
      for (float v : s) denominator += w.emplace_back(round_to_bf16(std::exp2(v - max)));
      for (int64_t i = 0; i < D; ++i) {
        double want = 0;
        for (size_t j = 0; j < w.size(); ++j) want += w[j] * kv[size_t(used[j] * D + i)];
        want /= denominator;
        const size_t at = size_t((t * H + h) * D + i);
        worst_rounded = std::max(worst_rounded, float(std::abs(one_tile[at] - want)));
        worst_exact = std::max(worst_exact, std::abs(exact[at] - one_tile[at]));
      }
    }
  EXPECT_LT(worst_rounded, 2e-6f);
  // The rounding shows (the case can tell the two apart) and stays within bf16's relative step.
  EXPECT_GT(worst_exact, 1e-5f);
  EXPECT_LT(worst_exact, 1e-2f);
  // Smaller tiles move weights by at most that rounding too.
  for (int64_t tile : {1, 4, 32}) EXPECT_LT(cpu::testing::max_abs_diff(run(tile).data(), exact.data(), T * H * D),
                                            1e-2) << "tile " << tile;
}

TEST(Bf16AttentionWeights, NegativeTileIsRefused) {
  const float q = 1, kv = 1;
  const int32_t index = 0;
  float out = 0;
  auto run = [&] {
    cpu::sparse_attention({.q = &q, .window_kv = &kv, .window_rows = 1, .window_index = &index},
                          {.tokens = 1, .heads = 1, .head_dim = 1, .softmax_scale = 1.0f, .window_slots = 1,
                           .bf16_weight_tile = -1},
                          &out);
  };
  EXPECT_THROW(run(), Error);
}

// The experts read bf16(u) and bf16(h); the router reads u in fp32: the routed sum written out with those roundings.
TEST(Bf16ExpertInputs, ExpertsReadRoundedInputsAndHiddenStates) {
  const int64_t T = 4, d = 16, I = 8, E = 4, K = 2;
  const float limit = 1.5f;
  std::vector<OwnedQuantizedMatrix> owned;
  owned.reserve(3 * (E + 1));
  std::vector<std::vector<float>> values;
  auto add = [&](int64_t rows, int64_t cols, uint32_t seed) {
    values.push_back(random_vector(rows * cols, seed, -0.6f, 0.6f));
    owned.push_back(cpu::testing::f32_matrix(values.back(), rows, cols));
    return &owned.back().matrix;
  };
  std::vector<cpu::ExpertWeights> experts;
  for (int64_t e = 0; e <= E; ++e) {
    const uint32_t seed = uint32_t(100 + 10 * e);
    cpu::ExpertWeights x;
    x.w1 = add(I, d, seed), x.w2 = add(d, I, seed + 1), x.w3 = add(I, d, seed + 2);
    experts.push_back(x);
  }
  const std::vector<float> gate_values = random_vector(E * d, 7);
  const OwnedQuantizedMatrix gate = cpu::testing::f32_matrix(gate_values, E, d);
  cpu::MoeWeights w;
  w.gate = &gate.matrix, w.experts = experts.data(), w.shared = experts[size_t(E)];
  cpu::MoeParams p{.tokens = T, .hidden = d, .intermediate = I, .experts = E, .top_k = K,
                   .routed_scaling_factor = 1.5f, .swiglu_limit = limit, .bf16_expert_inputs = true};
  const std::vector<float> u = random_vector(T * d, 8, -2.0f, 2.0f);
  std::vector<float> got(size_t(T * d));
  cpu::moe_forward(w, p, u.data(), nullptr, got.data());

  std::vector<int32_t> ids(size_t(T * K));
  std::vector<float> weights(size_t(T * K));
  cpu::moe_route(w, p, u.data(), nullptr, ids.data(), weights.data());
  const std::vector<float> u_bf16 = rounded(u);
  // expert(u) = w2 · bf16(silu(min(w1·u, limit)) · clamp(w3·u, ±limit)), sums in double.
  auto expert = [&](int64_t e, int64_t t, std::vector<double>& out, double weight) {
    const std::vector<float>& w1 = values[size_t(3 * e)];
    const std::vector<float>& w2 = values[size_t(3 * e + 1)];
    const std::vector<float>& w3 = values[size_t(3 * e + 2)];
    std::vector<float> h(static_cast<size_t>(I));
    for (int64_t i = 0; i < I; ++i) {
      double g = 0, v = 0;
      for (int64_t k = 0; k < d; ++k) {
        g += double(w1[size_t(i * d + k)]) * u_bf16[size_t(t * d + k)];
        v += double(w3[size_t(i * d + k)]) * u_bf16[size_t(t * d + k)];
      }
      const float gc = std::min(float(g), limit), vc = std::clamp(float(v), -limit, limit);
      h[size_t(i)] = round_to_bf16(gc / (1.0f + std::exp(-gc)) * vc);
    }
    for (int64_t j = 0; j < d; ++j) {
      double y = 0;
      for (int64_t i = 0; i < I; ++i) y += double(w2[size_t(j * I + i)]) * h[size_t(i)];
      out[size_t(j)] += weight * y;
    }
  };
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> want(size_t(d), 0.0);
    expert(E, t, want, 1.0);
    for (int64_t k = 0; k < K; ++k) expert(ids[size_t(t * K + k)], t, want, weights[size_t(t * K + k)]);
    for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(got[size_t(t * d + j)], want[size_t(j)], 2e-5) << t << "," << j;
  }
  p.bf16_expert_inputs = false;
  std::vector<float> plain(size_t(T * d));
  cpu::moe_forward(w, p, u.data(), nullptr, plain.data());
  EXPECT_GT(cpu::testing::max_abs_diff(plain.data(), got.data(), T * d), 1e-4);  // the case tells them apart
}

// The backend's linear (the LM head) reads bf16(x) and the bf16 rounding of an F32 matrix.
TEST(GpuBf16Backend, LinearRoundsInputAndF32Weights) {
  const fs::path dir = fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like";
  const LoadedCheckpoint ckpt = load_checkpoint(dir.string());
  const int64_t N = 24, K = 40, T = 3;
  const std::vector<float> w_values = random_vector(N * K, 21), x = random_vector(T * K, 22);
  const OwnedQuantizedMatrix w = cpu::testing::f32_matrix(w_values, N, K);
  const OwnedQuantizedMatrix w_bf16 = cpu::testing::f32_matrix(rounded(w_values), N, K);
  cpu::CpuBackend backend(ckpt.config, NumericsMode::GpuBf16);
  std::vector<float> got(size_t(T * N)), want(size_t(T * N)), exact(size_t(T * N));
  backend.linear(w.matrix, x.data(), T, got.data());
  cpu::linear(w_bf16.matrix, rounded(x).data(), T, want.data());
  EXPECT_EQ(got, want);
  cpu::CpuBackend exact_backend(ckpt.config, NumericsMode::Exact);
  exact_backend.linear(w.matrix, x.data(), T, exact.data());
  EXPECT_NE(got, exact);
}

std::vector<int32_t> random_tokens(int64_t count, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(count));
  for (int32_t& t : tokens) t = int32_t(rng() % uint32_t(vocab));
  return tokens;
}

// Row errors, sorted: max |a − b| over a row relative to the row's largest |a|.
std::vector<float> sorted_row_errors(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  EXPECT_EQ(a.size(), b.size());
  std::vector<float> errors;
  for (size_t r = 0; r * size_t(vocab) < a.size(); ++r) {
    float max_abs = 0, max_diff = 0;
    for (size_t v = r * size_t(vocab); v < (r + 1) * size_t(vocab); ++v) {
      max_abs = std::max(max_abs, std::abs(a[v]));
      max_diff = std::max(max_diff, std::abs(a[v] - b[v]));
    }
    errors.push_back(max_diff / max_abs);
  }
  std::sort(errors.begin(), errors.end());
  return errors;
}

class GpuBf16Model : public ::testing::TestWithParam<std::string> {};

// The roundings move a typical row by bf16's scale (a row whose indexer top-k they flip moves more), and any split
// of the sequence gives the same rows up to the summation order (which now and then flips a bf16 rounding).
TEST_P(GpuBf16Model, CloseToExactAndIndependentOfChunking) {
  const LoadedCheckpoint ckpt = load_checkpoint((fs::path(DSV4_SOURCE_DIR) / GetParam()).string());
  ckpt.require_loadable();
  const int64_t vocab = ckpt.config.vocab_size;
  const std::vector<int32_t> tokens = random_tokens(70, vocab, 5);
  auto run = [&](NumericsMode mode, int64_t chunk) {
    cpu::CpuBackend backend(ckpt.config, mode);
    Dsv4Model model(ckpt.config, ckpt.weights, backend);
    auto seq = model.new_sequence();
    std::vector<float> all, part;
    for (size_t at = 0; at < tokens.size(); at += size_t(chunk)) {
      model.forward(*seq, std::span(tokens).subspan(at, std::min(size_t(chunk), tokens.size() - at)),
                    LogitRows::All, part);
      all.insert(all.end(), part.begin(), part.end());
    }
    return all;
  };
  const std::vector<float> like_gpu = run(NumericsMode::GpuBf16, 70), exact = run(NumericsMode::Exact, 70);
  const std::vector<float> from_exact = sorted_row_errors(exact, like_gpu, vocab);
  const float median = from_exact[from_exact.size() / 2];
  EXPECT_GT(median, 1e-4f);
  EXPECT_LT(median, 1e-2f);
  for (int64_t chunk : {1, 9})
    EXPECT_LE(sorted_row_errors(like_gpu, run(NumericsMode::GpuBf16, chunk), vocab).back(), 2e-3f)
        << "chunks of " << chunk;
}

// Why the GPU cannot match the CPU to 2e-3 on every row with bf16 activations (test_cuda_model.cu): the model's own
// sensitivity. Every fp32 norm weight moved by one ulp (random direction), a change of the size fp32 summation order
// makes: Exact logits move by ~1e-6, but in GpuBf16 numerics the change flips a bf16 rounding now and then, whose
// 2^-8 step lives on in the KV window, the compressed entries and the top-k choices: rows move at bf16 scale.
TEST_P(GpuBf16Model, OneUlpNudgesMoveRowsAtBf16ScaleWhileExactStays) {
  const LoadedCheckpoint ckpt = load_checkpoint((fs::path(DSV4_SOURCE_DIR) / GetParam()).string());
  ckpt.require_loadable();
  const int64_t vocab = ckpt.config.vocab_size;
  const std::vector<int32_t> tokens = random_tokens(150, vocab, 7);
  // The model with its fp32 norm weights moved by one ulp in the directions `seed` picks.
  auto nudged = [&](uint32_t seed) {
    ModelWeights w = ckpt.weights;
    std::mt19937 rng(seed);
    auto nudge = [&](std::vector<float>& v) {
      for (float& x : v) x = std::nextafter(x, rng() % 2 ? INFINITY : -INFINITY);
    };
    nudge(w.norm);
    for (BlockWeights& b : w.layers) {
      nudge(b.attn_norm), nudge(b.ffn_norm), nudge(b.attn.q_norm), nudge(b.attn.kv_norm);
      if (b.attn.compressor) nudge(b.attn.compressor->norm);
      if (b.attn.indexer) nudge(b.attn.indexer->compressor.norm);
    }
    return w;
  };
  auto run = [&](NumericsMode mode, const ModelWeights& weights) {
    cpu::CpuBackend backend(ckpt.config, mode);
    Dsv4Model model(ckpt.config, weights, backend);
    auto seq = model.new_sequence();
    std::vector<float> logits;
    model.forward(*seq, tokens, LogitRows::All, logits);
    return logits;
  };
  const std::vector<float> exact = run(NumericsMode::Exact, ckpt.weights);
  const std::vector<float> like_gpu = run(NumericsMode::GpuBf16, ckpt.weights);
  // Flips are chance events (a model with few bf16 roundings near a boundary may see none in one run): three nudges.
  float exact_worst = 0, like_gpu_worst = 0;
  for (uint32_t seed : {1u, 2u, 3u}) {
    const ModelWeights w = nudged(seed);
    exact_worst = std::max(exact_worst, sorted_row_errors(exact, run(NumericsMode::Exact, w), vocab).back());
    const std::vector<float> e = sorted_row_errors(like_gpu, run(NumericsMode::GpuBf16, w), vocab);
    like_gpu_worst = std::max(like_gpu_worst, e.back());
    std::printf("%s, one-ulp nudged norm weights (seed %u): gpu-bf16 row error median %.3g, 90th percentile %.3g, "
                "max %.3g\n", GetParam().c_str(), seed, e[e.size() / 2], e[e.size() * 9 / 10], e.back());
  }
  EXPECT_LT(exact_worst, 1e-5f);
  EXPECT_GT(like_gpu_worst, 5e-4f);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuBf16Model,
                         ::testing::Values("tests/golden/flash_like", "tests/golden/pro_like-release",
                                           "tests/golden/odd_sizes", "models/tiny-fortunes"),
                         [](const auto& info) {
                           std::string name = fs::path(info.param).filename().string();
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

}  // namespace
}  // namespace dsv4
