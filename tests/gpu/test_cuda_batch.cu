// Batched decode on the GPU model (CudaModel::decode): several sequences of different lengths decode together, one
// kernel pass per step, sequences joining (prefilled between steps) and leaving (their pages freed, the slot
// reused) midway; each sequence's logits are compared with the same sequence run alone (batch 1). Mixed steps
// (CudaModel::step): prefill chunks and decode tokens of several sequences in one pass, against each sequence's
// chunks run alone. Also: CUDA-graph replay against the same launches run eagerly (DSV4_DISABLE_CUDA_GRAPHS=1), bit
// for bit; greedy continuations of the trained tiny model batched and alone; the launch count of a decode step; the
// memory plan's refusal; bad calls. The decode, mixed and graph comparisons run with every op launched separately,
// with the fused launches (with them the KV insert reads the step's inputs at launch, the queries' per-head norm runs
// in CTA rows and, in reference numerics, the indexer keys are fp8; the separate launches keep bf16 keys), and with
// those plus the compressors and indexer on a branch stream.
#include "backends/cuda/cuda_model.hpp"
#include "backends/cuda/device_context.hpp"
#include "core/error.hpp"
#include "model/checkpoint_loader.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/model_fixtures.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

using namespace dsv4;

namespace {

using dsv4::testing::ModelFixture;
using dsv4::testing::random_tokens;

// One sequence of the schedule: its prompt, the tokens it decodes, and when it joins and leaves the batch.
struct Planned {
  std::vector<int32_t> prompt;
  std::vector<int32_t> decoded;  // one per step it takes part in
  int join_step;                 // prefilled before this step's decode
  int leave_step;                // released before this step's decode (steps beyond the schedule: never)
};

// Sequences of different prompt lengths (1 token to past one prefill chunk), two joining midway and one leaving
// early, so the step that follows reuses its slot for a newcomer.
std::vector<Planned> schedule(int64_t vocab, int steps, uint32_t seed) {
  std::mt19937 rng(seed);
  const struct {
    int64_t prompt;
    int join, leave;
  } shape[] = {{5, 0, steps}, {23, 0, 14}, {70, 0, steps}, {1, 9, steps}, {40, 16, steps}};
  std::vector<Planned> plan;
  for (const auto& s : shape) {
    Planned p;
    p.prompt = random_tokens(s.prompt, vocab, rng);
    p.decoded = random_tokens(s.leave - s.join, vocab, rng);
    p.join_step = s.join;
    p.leave_step = s.leave;
    plan.push_back(std::move(p));
  }
  return plan;
}

// Runs the schedule batched: per step, every live sequence's next token in one decode call. Returns each sequence's
// decode logits (rows in step order).
std::vector<std::vector<float>> run_batched(cuda::CudaModel& model, const std::vector<Planned>& plan, int steps) {
  const int64_t vocab = model.config().vocab_size;
  std::vector<std::vector<float>> logits(plan.size());
  std::vector<int> slot(plan.size(), -1);
  std::vector<float> prefill, step_logits;
  for (int step = 0; step < steps; ++step) {
    for (size_t q = 0; q < plan.size(); ++q) {
      if (plan[q].leave_step == step) {
        model.release_sequence(slot[q]);
        slot[q] = -1;
      }
    }
    for (size_t q = 0; q < plan.size(); ++q) {
      if (plan[q].join_step != step) continue;
      slot[q] = model.add_sequence();
      model.forward(slot[q], plan[q].prompt, LogitRows::Last, prefill);
    }
    std::vector<int> slots;
    std::vector<int32_t> ids;
    std::vector<size_t> members;
    for (size_t q = 0; q < plan.size(); ++q) {
      if (slot[q] < 0) continue;
      slots.push_back(slot[q]);
      ids.push_back(plan[q].decoded[size_t(step - plan[q].join_step)]);
      members.push_back(q);
    }
    model.decode(slots, ids, step_logits);
    EXPECT_EQ(step_logits.size(), members.size() * size_t(vocab));
    for (size_t i = 0; i < members.size(); ++i)
      logits[members[i]].insert(logits[members[i]].end(), step_logits.begin() + std::ptrdiff_t(i * size_t(vocab)),
                                step_logits.begin() + std::ptrdiff_t((i + 1) * size_t(vocab)));
  }
  for (size_t q = 0; q < plan.size(); ++q)
    if (slot[q] >= 0) model.release_sequence(slot[q]);
  return logits;
}

// The same sequence alone: prefill, then one decode step per token (batch 1).
std::vector<float> run_alone(cuda::CudaModel& model, const Planned& p) {
  std::vector<float> logits, row;
  const int slot = model.add_sequence();
  model.forward(slot, p.prompt, LogitRows::Last, row);
  for (const int32_t id : p.decoded) {
    model.decode(std::span(&slot, 1), std::span(&id, 1), row);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  model.release_sequence(slot);
  return logits;
}

struct Comparison {
  float worst = 0.0f;       // largest per-row max |a − b| / max |a|
  float median = 0.0f;
  int argmax_differs = 0;
  int rows = 0;
  std::vector<float> row_errors;  // in row order
};

Comparison compare_rows(const std::vector<float>& want, const std::vector<float>& got, int64_t vocab) {
  EXPECT_EQ(want.size(), got.size());
  Comparison c;
  std::vector<float> errors;
  for (size_t r = 0; (r + 1) * size_t(vocab) <= std::min(want.size(), got.size()); ++r) {
    const float* w = &want[r * size_t(vocab)];
    const float* g = &got[r * size_t(vocab)];
    float max_abs = 0.0f, max_diff = 0.0f;
    for (int64_t v = 0; v < vocab; ++v) {
      if (!std::isfinite(g[v])) {
        ADD_FAILURE() << "row " << r << " token " << v << " is " << g[v];
        max_diff = INFINITY;
      }
      max_abs = std::max(max_abs, std::fabs(w[v]));
      max_diff = std::max(max_diff, std::fabs(w[v] - g[v]));
    }
    errors.push_back(max_diff / max_abs);
    c.row_errors.push_back(errors.back());
    c.argmax_differs += (std::max_element(w, w + vocab) - w) != (std::max_element(g, g + vocab) - g) ? 1 : 0;
  }
  c.rows = int(errors.size());
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    c.worst = errors.back();
    c.median = errors[errors.size() / 2];
  }
  return c;
}

// How a test model launches a step: every op separately, the fused launches (stacked projections, the sub-block norms
// inside mHC's launches, the linear layers' norm prologue and bf16 output), or those with the compressors and the
// indexer on a branch stream beside the query path (parallel_compressors, parallel_indexer) and the indexer's top-k in
// its scores launch.
// FewestWithBranch: FusedWithBranch with the indexer's query preparation in the compressor pools' launch on the
// branch (indexer_prepare_in_compressors).
enum class Launches { Separate, Fused, FusedWithBranch, FewestWithBranch };
constexpr Launches kEveryLaunches[] = {Launches::Separate, Launches::Fused, Launches::FusedWithBranch,
                                       Launches::FewestWithBranch};

std::string launch_name(Launches launches) {
  switch (launches) {
    case Launches::Separate: return "separate launches";
    case Launches::Fused: return "fused launches";
    case Launches::FusedWithBranch: return "fused launches with a branch stream";
    case Launches::FewestWithBranch: return "fewest launches with a branch stream";
  }
  return "?";
}

cuda::CudaModelOptions batch_options(Launches launches = Launches::Separate) {
  const bool fused = launches != Launches::Separate;
  cuda::CudaModelOptions options;
  options.fuse_projections = fused;
  options.stack_indexer_projections = fused;
  options.fuse_compressor_pools = fused;
  options.norms_in_mhc = fused;
  options.bf16_wo_a = fused;
  options.q_norm_prologue = fused;
  const bool branch = launches == Launches::FusedWithBranch || launches == Launches::FewestWithBranch;
  options.parallel_compressors = branch;
  options.parallel_indexer = branch;
  options.indexer_top_k_in_scores = branch;
  options.indexer_prepare_in_compressors = launches == Launches::FewestWithBranch;
  options.fp8_indexer_keys = fused;  // reference numerics only (the default: on)
  options.q_norm_cta_rows = fused;
  options.max_sequences = 4;
  options.max_context = 256;
  options.max_step_tokens = 64;  // the 70-token prompt prefills in two chunks
  return options;
}

constexpr int kSteps = 36;

// Sets DSV4_DISABLE_CUDA_GRAPHS for this scope (read when a model is built).
class GraphsDisabled {
 public:
  GraphsDisabled() { setenv("DSV4_DISABLE_CUDA_GRAPHS", "1", 1); }
  ~GraphsDisabled() { unsetenv("DSV4_DISABLE_CUDA_GRAPHS"); }
};

const auto kFixtures = ::testing::Values("tests/golden/flash_like", "tests/golden/pro_like-release",
                                         "tests/golden/odd_sizes", "models/tiny-fortunes",
                                         "models/tiny-fortunes-nvfp4");

class CudaBatch : public ::testing::TestWithParam<std::string> {};

// Each sequence's batched logits against its batch-1 run, in both numerics modes. The kernels are the same; what
// differs with the batch size is how some of them split their work (the linear layers' split-K and token tiles,
// the attention's splits), i.e. the fp32 summation order, and so at times which way a bf16 rounding of an
// activation goes: one bf16 step (2^-8 relative) of one input moves a logit row by about that much at most, so
// every row stays within 1 % and the typical row within 1e-3 (a broken batch — another sequence's KV, state or
// keys — moves rows by O(1)). Measured on an H200: identical logits on every fixture (these widths split alike).
TEST_P(CudaBatch, BatchedDecodeEqualsEachSequenceAlone) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const int64_t vocab = f.ckpt.config.vocab_size;
  const std::vector<Planned> plan = schedule(vocab, kSteps, 11);
  for (const NumericsMode mode : {NumericsMode::Exact, NumericsMode::Reference}) {
    for (const Launches launches : kEveryLaunches) {
      // The branch stream changes where kernels run, not the numerics: one mode covers it.
      if (launches == Launches::FusedWithBranch && mode == NumericsMode::Reference) continue;
      SCOPED_TRACE(std::string(to_string(mode)) + ", " + launch_name(launches));
      cuda::CudaModelOptions options = batch_options(launches);
      options.numerics = mode;
      cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
      const std::vector<std::vector<float>> batched = run_batched(model, plan, kSteps);
      for (size_t q = 0; q < plan.size(); ++q) {
        const Comparison c = compare_rows(run_alone(model, plan[q]), batched[q], vocab);
        std::printf("%s %s, %s, sequence %zu (prompt %zu, %d steps): row error median %.3g, max %.3g, argmax "
                    "differs in %d rows\n",
                    GetParam().c_str(), std::string(to_string(mode)).c_str(), launch_name(launches).c_str(), q,
                    plan[q].prompt.size(), c.rows, c.median, c.worst, c.argmax_differs);
        EXPECT_LE(c.median, 1e-3f) << "sequence " << q;
        EXPECT_LE(c.worst, 1e-2f) << "sequence " << q;
      }
    }
  }
}

// A mixed-step schedule: per sequence, the step it joins and its token counts from then on (a prefill chunk, or
// one decode token), one count per step until it is done.
struct MixedPlan {
  int join_step;
  std::vector<int64_t> counts;
  std::vector<int32_t> tokens;  // all of them, in order
};

// Prefill chunks and decode tokens of several sequences in one pass per step (each step's tokens ≤ 64, each chunk
// ≤ max_step_tokens; odd steps through step_on_device, their logits read from the device): every sequence's
// last-token logits of every step against the same chunks of it run alone
// (forward, one sequence per step). A step's token count here differs from the alone runs' (57 against 17 and 40),
// so the linear layers split their sums differently (token tiles, split-K) and a bf16 rounding of an activation may
// go the other way; on the golden fixtures' random weights one such flip moves a row by up to ~0.45 from then on
// (test_cuda_model's measurements against the CPU). Hence test_cuda_model's flip bounds over all rows: the typical
// row within 1e-2, every row within 0.6; a broken step (another sequence's KV, state, keys or rows) moves most rows
// by O(1).
TEST_P(CudaBatch, MixedPrefillAndDecodeStepsEqualEachSequenceAlone) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const int64_t vocab = f.ckpt.config.vocab_size;
  std::mt19937 rng(21);
  std::vector<MixedPlan> plan = {{0, {13, 17, 1, 1, 1, 1, 1, 1, 1, 1}},
                                 {1, {40, 7, 1, 1, 1, 1, 1, 1}},
                                 {2, {9, 1, 1, 1, 30, 1, 1}},
                                 {4, {1, 1, 1, 1, 1}}};
  int steps = 0;
  for (MixedPlan& p : plan) {
    int64_t total = 0;
    for (const int64_t n : p.counts) total += n;
    p.tokens = random_tokens(total, vocab, rng);
    steps = std::max(steps, p.join_step + int(p.counts.size()));
  }
  for (const Launches launches : kEveryLaunches) {
    SCOPED_TRACE(launch_name(launches));
    cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, batch_options(launches));
    // Mixed: per sequence, the rows of its steps in order.
    std::vector<std::vector<float>> mixed(plan.size());
    std::vector<int> slot(plan.size(), -1);
    std::vector<int64_t> done(plan.size(), 0);
    std::vector<float> logits;
    for (int step = 0; step < steps; ++step) {
      std::vector<cuda::StepSequence> sequences;
      std::vector<size_t> members;
      for (size_t q = 0; q < plan.size(); ++q) {
        const int index = step - plan[q].join_step;
        if (index < 0 || index >= int(plan[q].counts.size())) continue;
        if (index == 0) slot[q] = model.add_sequence();
        const int64_t n = plan[q].counts[size_t(index)];
        sequences.push_back({slot[q], std::span(plan[q].tokens).subspan(size_t(done[q]), size_t(n))});
        members.push_back(q);
        done[q] += n;
      }
      if (step % 2 == 0) {
        model.step(sequences, logits);
      } else {
        const float* on_device = model.step_on_device(sequences);
        logits.assign(members.size() * size_t(vocab), NAN);
        ASSERT_EQ(cudaStreamSynchronize(model.stream()), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(logits.data(), on_device, logits.size() * sizeof(float), cudaMemcpyDeviceToHost),
                  cudaSuccess);
      }
      ASSERT_EQ(logits.size(), members.size() * size_t(vocab)) << "step " << step;
      for (size_t i = 0; i < members.size(); ++i)
        mixed[members[i]].insert(mixed[members[i]].end(), logits.begin() + std::ptrdiff_t(i * size_t(vocab)),
                                 logits.begin() + std::ptrdiff_t((i + 1) * size_t(vocab)));
    }
    for (size_t q = 0; q < plan.size(); ++q) {
      ASSERT_EQ(model.length(slot[q]), int64_t(plan[q].tokens.size()));
      model.release_sequence(slot[q]);
    }
    // Alone: the same chunks through forward, the last row of each.
    std::vector<float> all_want, all_mixed;
    for (size_t q = 0; q < plan.size(); ++q) {
      const int alone = model.add_sequence();
      std::vector<float> want, row;
      int64_t at = 0;
      for (const int64_t n : plan[q].counts) {
        model.forward(alone, std::span(plan[q].tokens).subspan(size_t(at), size_t(n)), LogitRows::Last, row);
        want.insert(want.end(), row.begin(), row.end());
        at += n;
      }
      model.release_sequence(alone);
      const Comparison c = compare_rows(want, mixed[q], vocab);
      std::printf("%s %s, mixed steps, sequence %zu (%zu steps): row error median %.3g, max %.3g, argmax differs "
                  "in %d rows; rows:",
                  GetParam().c_str(), launch_name(launches).c_str(), q, plan[q].counts.size(), c.median, c.worst,
                  c.argmax_differs);
      for (const float e : c.row_errors) std::printf(" %.2g", e);
      std::printf("\n");
      all_want.insert(all_want.end(), want.begin(), want.end());
      all_mixed.insert(all_mixed.end(), mixed[q].begin(), mixed[q].end());
    }
    const Comparison all = compare_rows(all_want, all_mixed, vocab);
    EXPECT_LE(all.median, 1e-2f);
    EXPECT_LE(all.worst, 0.6f);
  }
}

// The captured decode steps (kernel nodes only, chained by programmatic dependent launches) replay exactly what the
// eager launches compute; with the fused launches too, in fewer launches, and with the compressors and indexer on a
// branch stream (fork and join captured as graph edges).
TEST_P(CudaBatch, GraphReplayEqualsEagerLaunchesBitForBit) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f(GetParam());
  const std::vector<Planned> plan = schedule(f.ckpt.config.vocab_size, kSteps, 12);
  int separate_launches = 0, branch_launches = 0;  // batch 1, without the fused launches; FusedWithBranch
  bool sparse = false;  // a CSA layer
  for (int i = 0; i < f.ckpt.config.num_layers; ++i) sparse = sparse || f.ckpt.config.has_indexer(i);
  for (const Launches kind : kEveryLaunches) {
    SCOPED_TRACE(launch_name(kind));
    cuda::CudaModel graphs(f.ckpt.config, f.ckpt.weights, batch_options(kind));
    EXPECT_NE(graphs.describe().find("CUDA graphs"), std::string::npos) << graphs.describe();
    const std::vector<std::vector<float>> replayed = run_batched(graphs, plan, kSteps);
    std::vector<std::vector<float>> eager;
    {
      const GraphsDisabled disabled;
      cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, batch_options(kind));
      EXPECT_NE(model.describe().find("eager"), std::string::npos) << model.describe();
      eager = run_batched(model, plan, kSteps);
    }
    for (size_t q = 0; q < plan.size(); ++q) {
      ASSERT_EQ(replayed[q].size(), eager[q].size());
      size_t differ = 0, first = replayed[q].size();
      for (size_t i = 0; i < replayed[q].size(); ++i)
        if (std::memcmp(&replayed[q][i], &eager[q][i], sizeof(float)) != 0) {
          first = std::min(first, i);
          ++differ;
        }
      EXPECT_EQ(differ, 0u) << "sequence " << q << ": " << differ << " logits differ, the first at row "
                            << first / size_t(f.ckpt.config.vocab_size) << " token "
                            << first % size_t(f.ckpt.config.vocab_size);
    }
    for (const int batch : {1, 2, 4}) {
      const int launches = graphs.decode_launches(batch);
      std::printf("%s %s: a decode step of %d sequence(s) is %d kernel launches (%.1f per layer over %d layers)\n",
                  GetParam().c_str(), launch_name(kind).c_str(), batch, launches,
                  double(launches) / f.ckpt.config.num_layers, f.ckpt.config.num_layers);
      EXPECT_GT(launches, 4 * f.ckpt.config.num_layers);
      if (batch == 1 && kind == Launches::Separate) separate_launches = launches;
      if (batch == 1 && kind != Launches::Separate) EXPECT_LT(launches, separate_launches);
      if (batch == 1 && kind == Launches::FusedWithBranch) branch_launches = launches;
      // One launch fewer per CSA layer (the preparation).
      if (batch == 1 && kind == Launches::FewestWithBranch && sparse) EXPECT_LT(launches, branch_launches);
      // Per layer: every layer launches its attention, FFN and mHC kernels; layers of one kind and routing launch
      // alike (but the last, whose mHC launch opens no next layer); the embedding, the first hc_pre and the head are
      // outside the layers.
      const ModelConfig& config = f.ckpt.config;
      const std::vector<int> per_layer = graphs.decode_layer_launches(batch);
      ASSERT_EQ(per_layer.size(), size_t(config.num_layers));
      std::map<std::pair<LayerKind, bool>, int> of_kind;
      int inside = 0;
      std::printf("  per layer:");
      for (int i = 0; i < config.num_layers; ++i) {
        const int n = per_layer[size_t(i)];
        std::printf(" %s %d", std::string(to_string(config.layer_kind(i))).c_str(), n);
        inside += n;
        EXPECT_GE(n, 5) << "layer " << i;
        if (i + 1 == config.num_layers) continue;
        const auto [it, first] = of_kind.emplace(std::pair(config.layer_kind(i), config.is_hash_routed(i)), n);
        EXPECT_TRUE(first || it->second == n) << "layer " << i << " launches " << n << ", an earlier layer of its "
                                              << "kind and routing " << it->second;
      }
      std::printf("; outside the layers %d\n", launches - inside);
      EXPECT_GE(launches - inside, 4) << "embedding, hc_pre, hc_head, head";
      // The listing names each layer's own kernels in dependency order: what the attention reads (the KV insert,
      // the compressors and the indexer, on either stream) before it, the FFN after it, the mHC launch that closes
      // the layer after the FFN (then its norm where the norms have launches of their own); layers of one kind and
      // routing list the same kernels.
      const std::vector<std::vector<std::string>> names = graphs.decode_layer_kernel_names(batch);
      ASSERT_EQ(names.size(), size_t(config.num_layers));
      std::map<std::pair<LayerKind, bool>, std::vector<std::string>> listed;
      for (int i = 0; i < config.num_layers; ++i) {
        const std::vector<std::string>& layer = names[size_t(i)];
        ASSERT_EQ(layer.size(), size_t(per_layer[size_t(i)])) << "layer " << i;
        auto first_of = [&](std::string_view part) {
          for (size_t k = 0; k < layer.size(); ++k)
            if (layer[k].find(part) != std::string::npos) return k;
          return layer.size();
        };
        auto last_of = [&](std::string_view part) {
          for (size_t k = layer.size(); k-- > 0;)
            if (layer[k].find(part) != std::string::npos) return int64_t(k);
          return int64_t(-1);
        };
        std::string joined;
        for (const std::string& name : layer) joined += " " + name;
        const size_t attention = first_of("sparse_attention");
        ASSERT_LT(attention, layer.size()) << "layer " << i << ":" << joined;
        for (const std::string_view before : {"kv_insert", "compressor::", "indexer::"})
          EXPECT_LT(last_of(before), int64_t(attention)) << "layer " << i << ", " << before << ":" << joined;
        EXPECT_GT(int64_t(first_of("moe::")), int64_t(attention)) << "layer " << i << ":" << joined;
        EXPECT_GT(last_of("mhc::"), last_of("moe::")) << "layer " << i << ":" << joined;
        if (i + 1 == config.num_layers) continue;
        const auto [it, first] = listed.emplace(std::pair(config.layer_kind(i), config.is_hash_routed(i)), layer);
        EXPECT_TRUE(first || it->second == layer) << "layer " << i << " lists" << joined;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaBatch, kFixtures, dsv4::testing::fixture_param_name);

// Greedy continuations of the trained model: three prompts decoded together for 64 steps give, token for token,
// what each gives alone, with CUDA graphs and without.
TEST(CudaBatchGreedy, TrainedModelContinuesEachPromptAsAlone) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("models/tiny-fortunes");
  const int64_t vocab = f.ckpt.config.vocab_size;
  std::mt19937 rng(5);
  const std::vector<std::vector<int32_t>> prompts = {random_tokens(12, vocab, rng), random_tokens(3, vocab, rng),
                                                     random_tokens(30, vocab, rng)};
  auto argmax = [&](const float* row) { return int32_t(std::max_element(row, row + vocab) - row); };
  constexpr int kGreedySteps = 64;
  for (const bool disable : {false, true}) {
    SCOPED_TRACE(disable ? "eager" : "graphs");
    std::unique_ptr<GraphsDisabled> switch_off;
    if (disable) switch_off = std::make_unique<GraphsDisabled>();
    cuda::CudaModelOptions options;
    options.max_sequences = 3;
    options.max_context = 128;
    cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
    std::vector<std::vector<int32_t>> alone(prompts.size());
    std::vector<float> row;
    for (size_t q = 0; q < prompts.size(); ++q) {
      const int slot = model.add_sequence();
      model.forward(slot, prompts[q], LogitRows::Last, row);
      for (int step = 0; step < kGreedySteps; ++step) {
        alone[q].push_back(argmax(row.data()));
        model.forward(slot, std::span(&alone[q].back(), 1), LogitRows::Last, row);
      }
      model.release_sequence(slot);
    }
    std::vector<int> slots;
    std::vector<int32_t> next;
    for (const auto& prompt : prompts) {
      slots.push_back(model.add_sequence());
      model.forward(slots.back(), prompt, LogitRows::Last, row);
      next.push_back(argmax(row.data()));
    }
    std::vector<float> logits;
    for (int step = 0; step < kGreedySteps; ++step) {
      for (size_t q = 0; q < prompts.size(); ++q) ASSERT_EQ(next[q], alone[q][size_t(step)]) << "prompt " << q
                                                                                              << " step " << step;
      model.decode(slots, next, logits);
      for (size_t q = 0; q < prompts.size(); ++q) next[q] = argmax(&logits[q * size_t(vocab)]);
    }
  }
}

// decode_on_device leaves the logits on the device: the same values decode copies back.
TEST(CudaBatchDevice, LogitsOnTheDeviceAreTheDecodeLogits) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("tests/golden/flash_like");
  const int64_t vocab = f.ckpt.config.vocab_size;
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = random_tokens(9, vocab, rng), ids = random_tokens(2, vocab, rng);
  std::vector<std::vector<float>> results;
  for (const bool on_device : {false, true}) {
    cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, batch_options());
    std::vector<int> slots;
    std::vector<float> row;
    for (int q = 0; q < 2; ++q) {
      slots.push_back(model.add_sequence());
      model.forward(slots.back(), std::span(prompt).first(size_t(4 + q)), LogitRows::Last, row);
    }
    std::vector<float> logits(2 * size_t(vocab));
    if (on_device) {
      const float* device_logits = model.decode_on_device(slots, ids);
      ASSERT_EQ(cudaMemcpyAsync(logits.data(), device_logits, logits.size() * 4, cudaMemcpyDeviceToHost,
                                model.stream()),
                cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(model.stream()), cudaSuccess);
    } else {
      model.decode(slots, ids, logits);
    }
    EXPECT_EQ(model.length(slots[0]), 5);
    EXPECT_EQ(model.length(slots[1]), 6);
    results.push_back(logits);
  }
  // Bitwise equality alone would pass two NaN rows, or two rows left at their initial zeros.
  ASSERT_TRUE(std::all_of(results[0].begin(), results[0].end(), [](float v) { return std::isfinite(v); }));
  EXPECT_NE(*std::min_element(results[0].begin(), results[0].end()),
            *std::max_element(results[0].begin(), results[0].end()));
  EXPECT_EQ(std::memcmp(results[0].data(), results[1].data(), results[0].size() * 4), 0);
}

// The memory plan refuses a context or sequence count that does not fit before allocating, naming the parts and
// the shortfall; the model then builds at a size that fits on the same device.
TEST(CudaBatchMemory, RefusesWhatDoesNotFitNamingTheShortfall) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("tests/golden/flash_like");
  for (const auto [context, sequences] : {std::pair{int64_t(1) << 36, 4}, std::pair{int64_t(1) << 22, 4096}}) {
    cuda::CudaModelOptions options;
    options.max_context = context;
    options.max_sequences = sequences;
    try {
      cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
      ADD_FAILURE() << "a context of " << context << " tokens for " << sequences << " sequences was accepted";
    } catch (const Error& e) {
      const std::string message = e.what();
      std::printf("refusal: %s\n", message.c_str());
      for (const char* part : {"of weights", "of KV cache", "of compressor and indexer state", "of RoPE tables",
                               "of step workspace", "short", "--ctx"})
        EXPECT_NE(message.find(part), std::string::npos) << part << " missing from: " << message;
    }
  }
  cuda::CudaModel fits(f.ckpt.config, f.ckpt.weights, batch_options());
  EXPECT_NE(fits.describe().find("step workspace"), std::string::npos) << fits.describe();
}

// The sampling buffers (CudaModelOptions::sampling_adjustments) are a part of the plan, named with their bytes in a
// refusal and in describe(); a model without them has none to hand out.
TEST(CudaBatchMemory, PlanCountsTheSamplingBuffers) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("tests/golden/flash_like");
  cuda::CudaModelOptions options = batch_options();
  options.sampling_adjustments = 100000;
  // Rows' parameters and adjustments in one buffer, then the results, each rounded up to 256 bytes.
  auto round_up = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t bytes = round_up(size_t(options.max_sequences) * sizeof(sampling::RowParams) +
                                100000 * sizeof(sampling::LogitAdjustment)) +
                       round_up(size_t(options.max_sequences) * sizeof(cuda::SampledToken));
  const std::string named = cuda::format_bytes(bytes) + " of sampling buffers";
  cuda::CudaModelOptions too_long = options;
  too_long.max_context = int64_t(1) << 36;
  try {
    cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, too_long);
    ADD_FAILURE() << "a context of 2^36 tokens was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(named), std::string::npos) << named << " missing from: " << e.what();
  }
  cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
  EXPECT_NE(model.describe().find("sampling buffers " + cuda::format_bytes(bytes)), std::string::npos)
      << model.describe();
  const cuda::SamplingBuffers& buffers = model.sampling_buffers();
  EXPECT_NE(buffers.inputs, nullptr);
  EXPECT_NE(buffers.results, nullptr);
  EXPECT_EQ(buffers.inputs_bytes, size_t(options.max_sequences) * sizeof(sampling::RowParams) +
                                      100000 * sizeof(sampling::LogitAdjustment));
  cuda::CudaModel without(f.ckpt.config, f.ckpt.weights, batch_options());
  EXPECT_EQ(without.describe().find("sampling"), std::string::npos) << without.describe();
  EXPECT_THROW(without.sampling_buffers(), Error);
}

// A context shorter than a compression ratio (bench e2e's tg1 sizes the context to 3 tokens): no compressed entry
// ever completes, yet every layer kind runs. The logits are those of the same tokens in a model with a long context.
TEST(CudaBatchCalls, ContextShorterThanTheCompressionRatio) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  for (const char* fixture : {"tests/golden/flash_like", "tests/golden/pro_like-release"}) {
    const ModelFixture f(fixture);
    const int64_t vocab = f.ckpt.config.vocab_size;
    const std::vector<int32_t> ids = {1, 2, 3};
    std::vector<std::vector<float>> results;
    for (const int64_t context : {int64_t(3), int64_t(256)}) {
      cuda::CudaModelOptions options = batch_options(Launches::Fused);
      options.max_context = context;
      cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
      const int slot = model.add_sequence();
      std::vector<float> logits, row;
      model.forward(slot, std::span(ids).first(1), LogitRows::Last, row);
      logits.insert(logits.end(), row.begin(), row.end());
      for (size_t i = 1; i < ids.size(); ++i) {
        model.decode(std::span(&slot, 1), std::span(&ids[i], 1), row);
        logits.insert(logits.end(), row.begin(), row.end());
      }
      results.push_back(logits);
    }
    const Comparison c = compare_rows(results[1], results[0], vocab);
    EXPECT_EQ(c.rows, 3) << fixture;
    EXPECT_LE(c.worst, 1e-2f) << fixture;
  }
}

TEST(CudaBatchCalls, RefusesBadBatchesAndKeepsTheSequences) {
  if (!cuda::has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelFixture f("tests/golden/odd_sizes");
  cuda::CudaModelOptions options = batch_options();
  options.max_context = 8;
  cuda::CudaModel model(f.ckpt.config, f.ckpt.weights, options);
  const int a = model.add_sequence(), b = model.add_sequence();
  std::vector<float> logits;
  const std::vector<int32_t> prompt = {1, 2, 3};
  model.forward(a, prompt, LogitRows::Last, logits);
  model.forward(b, std::span(prompt).first(1), LogitRows::Last, logits);
  auto expect_error = [&](std::vector<int> slots, std::vector<int32_t> ids, const std::string& needle) {
    dsv4::testing::expect_error([&] { model.decode(slots, ids, logits); }, needle);
  };
  expect_error({a, a}, {1, 2}, "appears twice");
  expect_error({a, b}, {1}, "2 slots for 1 ids");
  expect_error({a, 3}, {1, 2}, "slot 3 is not in use");
  expect_error({a, b}, {1, int32_t(f.ckpt.config.vocab_size)},
               "token id " + std::to_string(f.ckpt.config.vocab_size) + " at position 1");
  expect_error({}, {}, "0 slots");
  EXPECT_EQ(model.length(a), 3);
  EXPECT_EQ(model.length(b), 1);
  // A mixed step refuses a slot twice, an empty or oversized chunk and a chunk past the context, before any change.
  const std::vector<int32_t> one(1, 1), six(6, 1), long_chunk(65, 1);
  auto expect_step_error = [&](std::vector<cuda::StepSequence> sequences, const std::string& needle) {
    dsv4::testing::expect_error([&] { model.step(sequences, logits); }, needle);
  };
  expect_step_error({{a, one}, {a, one}}, "appears twice");
  expect_step_error({{a, {}}}, "brings 0 tokens");
  expect_step_error({{b, long_chunk}}, "brings 65 tokens");
  expect_step_error({{b, one}, {a, six}}, "would hold 9 tokens");
  EXPECT_EQ(model.length(a), 3);
  EXPECT_EQ(model.length(b), 1);
  // Sequence a reaches the context (8 tokens): a batch holding it is refused, the other sequence still decodes.
  const std::vector<int32_t> fill = {4, 5, 6, 7, 8};
  model.forward(a, fill, LogitRows::Last, logits);
  expect_error({b, a}, {1, 2}, "holds 8 tokens");
  model.decode(std::vector<int>{b}, std::vector<int32_t>{9}, logits);
  EXPECT_EQ(model.length(b), 2);
  EXPECT_EQ(model.length(a), 8);
}

}  // namespace
