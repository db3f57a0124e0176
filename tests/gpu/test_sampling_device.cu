// The device sampler (kernels/sampling.hpp) against the CPU Sampler: for each option and combinations, on random
// logits of three shapes (typical, heavy ties, one dominant token) at the DSV4 vocabulary and odd sizes, a Sampler
// that samples on the CPU and a same-seed Sampler that feeds the device (device_step) must pick the same token on
// every draw; rows of one launch carry different parameters (batch > 1). Also: a seeded generation loop with
// penalties over 200 steps, the draw frequencies of a case with thousands of candidates, bad rows (NaN, +inf,
// all -inf) reporting the CPU's error, bad launch parameters named, and the per-step timing of device sampling
// against copying the logits back and sampling on the CPU. Results are poisoned before each launch.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/kernels/sampling.hpp"
#include "core/error.hpp"
#include "runtime/engine.hpp"
#include "runtime/sampler.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/tiny_checkpoint.hpp"
#include "support/tiny_tokenizer.hpp"

namespace dsv4::cuda {
namespace {

constexpr int64_t kDeepSeekVocab = 129280;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Rows of logits and per-row steps in, one launch, the results out. The results are poisoned (0xFF) first.
class DeviceSampler {
 public:
  std::vector<SampledToken> run(const std::vector<float>& logits, int64_t vocab,
                                const std::vector<sampling::SamplingStep>& steps, float* milliseconds = nullptr,
                                int repetitions = 1, int cluster_ctas = 0) {
    const int64_t rows = int64_t(steps.size());
    std::vector<sampling::RowParams> row_params;
    std::vector<sampling::LogitAdjustment> adjustments;
    for (const sampling::SamplingStep& step : steps) {
      sampling::RowParams row = step.row;
      row.adjustments_begin = int32_t(adjustments.size());
      row.adjustments_count = int32_t(step.adjustments.size());
      adjustments.insert(adjustments.end(), step.adjustments.begin(), step.adjustments.end());
      row_params.push_back(row);
    }
    const DeviceBuffer device_logits = to_device(logits, "logits");
    const DeviceBuffer device_rows = to_device(row_params, "row params");
    const DeviceBuffer device_adjustments = to_device(adjustments, "adjustments");
    DeviceBuffer results(size_t(rows) * sizeof(SampledToken), "results");
    results.fill_bytes(0xFF);
    SamplingLaunchParams p;
    p.logits = device_logits.as<float>();
    p.rows = rows;
    p.vocab = vocab;
    p.row_stride = vocab;
    p.row_params = device_rows.as<sampling::RowParams>();
    p.adjustments = device_adjustments.as<sampling::LogitAdjustment>();
    p.results = results.as<SampledToken>();
    p.cluster_ctas = cluster_ctas;
    p.any_top_p = std::any_of(steps.begin(), steps.end(), [](const auto& step) { return step.row.top_p < 1.0f; });
    cudaEvent_t start, stop;
    DSV4_CUDA_CHECK(cudaEventCreate(&start));
    DSV4_CUDA_CHECK(cudaEventCreate(&stop));
    run_sampling(p);  // warm-up (and the only run unless timed)
    if (milliseconds != nullptr) {
      DSV4_CUDA_CHECK(cudaEventRecord(start, p.stream));
      for (int i = 0; i < repetitions; ++i) run_sampling(p);
      DSV4_CUDA_CHECK(cudaEventRecord(stop, p.stream));
    }
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
    if (milliseconds != nullptr) {
      DSV4_CUDA_CHECK(cudaEventElapsedTime(milliseconds, start, stop));
      *milliseconds /= float(repetitions);
    }
    DSV4_CUDA_CHECK(cudaEventDestroy(start));
    DSV4_CUDA_CHECK(cudaEventDestroy(stop));
    std::vector<SampledToken> out(static_cast<size_t>(rows));
    results.download(out.data(), out.size() * sizeof(SampledToken));
    return out;
  }
};

enum class Shape { Typical, Ties, Dominant };

const char* name_of(Shape shape) {
  return shape == Shape::Typical ? "typical" : shape == Shape::Ties ? "ties" : "dominant";
}

// Typical: a normal bulk with a few dozen raised tokens; Ties: logits on a coarse grid (every weight shared by many
// tokens, so top_k / top_p cuts split equal weights); Dominant: one token far above the rest.
std::vector<float> make_logits(Shape shape, int64_t vocab, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int64_t> any_token(0, vocab - 1);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& logit : logits) {
    logit = shape == Shape::Ties ? -float(rng() % 12) / 4.0f : normal(rng);
  }
  if (shape == Shape::Typical) {
    for (int i = 0; i < 24; ++i) logits[size_t(any_token(rng))] = 8.0f + float(rng() % 600) / 100.0f;
  } else if (shape == Shape::Dominant) {
    logits[size_t(any_token(rng))] = 30.0f;
  }
  return logits;
}

std::vector<int32_t> random_ids(size_t count, int64_t range, std::mt19937& rng) {
  std::vector<int32_t> ids(count);
  for (int32_t& id : ids) id = int32_t(rng() % uint64_t(range));
  return ids;
}

struct NamedParams {
  std::string name;
  SamplingParams params;
};

std::vector<NamedParams> option_cases(int64_t vocab) {
  const auto make = [](float temperature, int32_t top_k, float top_p, float min_p) {
    SamplingParams p;
    p.temperature = temperature, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p;
    return p;
  };
  std::vector<NamedParams> cases = {
      {"greedy", make(0.0f, 0, 1.0f, 0.0f)},
      {"temperature 1", make(1.0f, 0, 1.0f, 0.0f)},
      {"temperature 0.6", make(0.6f, 0, 1.0f, 0.0f)},
      {"top_k 1", make(1.0f, 1, 1.0f, 0.0f)},
      {"top_k 40", make(1.0f, 40, 1.0f, 0.0f)},
      {"top_k 5000 T 1.5", make(1.5f, 5000, 1.0f, 0.0f)},
      {"top_k vocab-1", make(1.0f, int32_t(vocab - 1), 1.0f, 0.0f)},
      {"top_p 0.9", make(1.0f, 0, 0.9f, 0.0f)},
      {"top_p 0.3 T 2", make(2.0f, 0, 0.3f, 0.0f)},
      {"top_p 0.999", make(1.0f, 0, 0.999f, 0.0f)},
      {"min_p 0.1", make(1.0f, 0, 1.0f, 0.1f)},
      {"top_k 50 top_p 0.8 min_p 0.05", make(1.0f, 50, 0.8f, 0.05f)},
      {"top_k 3000 top_p 0.5 T 0.8", make(0.8f, 3000, 0.5f, 0.0f)},
  };
  SamplingParams p = make(1.0f, 0, 1.0f, 0.0f);
  p.repetition_penalty = 1.3f;
  cases.push_back({"repetition 1.3", p});
  p = make(1.0f, 0, 1.0f, 0.0f);
  p.presence_penalty = 0.7f, p.frequency_penalty = 0.4f;
  cases.push_back({"presence 0.7 frequency 0.4", p});
  p = make(1.0f, 0, 1.0f, 0.0f);
  p.logit_bias = {{int32_t(vocab / 2), 6.0f}, {int32_t(vocab - 1), -100.0f}, {0, 2.5f}};
  cases.push_back({"logit_bias", p});
  p = make(0.9f, 100, 0.95f, 0.01f);
  p.repetition_penalty = 1.1f, p.presence_penalty = -0.5f, p.frequency_penalty = 0.3f;
  p.logit_bias = {{int32_t(vocab / 3), 4.0f}};
  cases.push_back({"everything", p});
  p = make(0.0f, 0, 1.0f, 0.0f);
  p.repetition_penalty = 1.5f, p.frequency_penalty = 1.0f;
  p.logit_bias = {{int32_t(vocab - 1), 50.0f}};
  cases.push_back({"greedy with penalties and bias", p});
  return cases;
}

// Same-seed CPU and device samplers for `rows` rows over `rounds` draws each; every draw must agree.
void expect_same_tokens(const NamedParams& c, Shape shape, int64_t vocab, int rows, int rounds, uint32_t seed) {
  SCOPED_TRACE(c.name + ", " + name_of(shape) + " logits, vocab " + std::to_string(vocab));
  std::mt19937 rng(seed);
  std::vector<Sampler> cpu, device;
  std::vector<std::vector<int32_t>> prompts, generated;
  for (int r = 0; r < rows; ++r) {
    SamplingParams params = c.params;
    params.seed = seed * 1000 + uint64_t(r);
    cpu.emplace_back(params, int32_t(vocab));
    device.emplace_back(params, int32_t(vocab));
    prompts.push_back(random_ids(64, vocab, rng));
    generated.push_back(random_ids(16, std::min<int64_t>(vocab, 40), rng));  // repeats: counts above 1
  }
  DeviceSampler runner;
  for (int round = 0; round < rounds; ++round) {
    std::vector<float> logits;
    for (int r = 0; r < rows; ++r) {
      const std::vector<float> row = make_logits(shape, vocab, rng);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    std::vector<sampling::SamplingStep> steps;
    for (int r = 0; r < rows; ++r) {
      steps.push_back(device[size_t(r)].device_step(prompts[size_t(r)], generated[size_t(r)]));
    }
    const std::vector<SampledToken> got = runner.run(logits, vocab, steps);
    int mismatches = 0;
    for (int r = 0; r < rows; ++r) {
      std::vector<float> row(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
      const int32_t want = cpu[size_t(r)].sample(row, prompts[size_t(r)], generated[size_t(r)]);
      const SampledToken& g = got[size_t(r)];
      if (g.status != SamplingStatus::Ok || g.token != want) {
        if (++mismatches <= 4) {
          const bool valid = g.token >= 0 && g.token < vocab;
          ADD_FAILURE() << "round " << round << " row " << r << ": CPU token " << want << " (adjusted logit "
                        << row[size_t(want)] << "), device token " << g.token << " status " << int(g.status)
                        << (valid ? " (adjusted logit " + std::to_string(row[size_t(g.token)]) + ")" : std::string());
        }
      }
      generated[size_t(r)].push_back(want);
    }
    if (mismatches > 0) {
      ADD_FAILURE() << mismatches << " of " << rows << " rows differ in round " << round;
      return;
    }
  }
}

TEST(SamplingDevice, EveryOptionPicksTheCpuSamplersToken) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const int64_t vocab : {kDeepSeekVocab, int64_t(1003), int64_t(5)}) {
    for (const NamedParams& c : option_cases(vocab)) {
      for (const Shape shape : {Shape::Typical, Shape::Ties, Shape::Dominant}) {
        expect_same_tokens(c, shape, vocab, vocab == kDeepSeekVocab ? 8 : 32, 4, seed++);
        if (HasFailure()) return;
      }
    }
  }
}

TEST(SamplingDevice, RowsOfOneLaunchHaveTheirOwnParameters) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = kDeepSeekVocab;
  const std::vector<NamedParams> cases = option_cases(vocab);
  std::mt19937 rng(404);
  std::vector<Sampler> cpu, device;
  std::vector<std::vector<int32_t>> prompts;
  for (size_t r = 0; r < 64; ++r) {
    SamplingParams params = cases[r % cases.size()].params;
    params.seed = 7000 + r;
    cpu.emplace_back(params, int32_t(vocab));
    device.emplace_back(params, int32_t(vocab));
    prompts.push_back(random_ids(100, vocab, rng));
  }
  std::vector<float> logits;
  std::vector<sampling::SamplingStep> steps;
  const std::vector<int32_t> generated = {5, 5, 9, 77};
  for (size_t r = 0; r < cpu.size(); ++r) {
    const std::vector<float> row = make_logits(r % 2 ? Shape::Typical : Shape::Ties, vocab, rng);
    logits.insert(logits.end(), row.begin(), row.end());
    steps.push_back(device[r].device_step(prompts[r], generated));
  }
  std::vector<int32_t> want;
  for (size_t r = 0; r < cpu.size(); ++r) {
    std::vector<float> row(logits.begin() + int64_t(r) * vocab, logits.begin() + int64_t(r + 1) * vocab);
    want.push_back(cpu[r].sample(row, prompts[r], generated));
  }
  // The same steps (same draws) with the launcher's cluster size and each one forced.
  for (const int cluster_ctas : {0, 8, 16}) {
    const std::vector<SampledToken> got = DeviceSampler().run(logits, vocab, steps, nullptr, 1, cluster_ctas);
    for (size_t r = 0; r < cpu.size(); ++r) {
      EXPECT_EQ(got[r].token, want[r]) << "row " << r << " (" << cases[r % cases.size()].name << "), cluster_ctas "
                                       << cluster_ctas;
    }
  }
}

TEST(SamplingDevice, SeededGenerationLoopWithPenaltiesMatches) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = kDeepSeekVocab;
  SamplingParams params;
  params.temperature = 0.8f, params.top_p = 0.9f, params.top_k = 200, params.repetition_penalty = 1.2f;
  params.frequency_penalty = 0.5f, params.presence_penalty = 0.3f, params.seed = 2026;
  Sampler cpu(params, int32_t(vocab)), device(params, int32_t(vocab));
  std::mt19937 rng(99);
  const std::vector<int32_t> prompt = random_ids(300, vocab, rng);
  std::vector<int32_t> generated;
  DeviceSampler runner;
  for (int step = 0; step < 200; ++step) {
    std::vector<float> logits = make_logits(Shape::Typical, vocab, rng);
    // The generated tokens are likely again, so the penalties matter.
    for (const int32_t token : generated) logits[size_t(token)] += 6.0f;
    const std::vector<SampledToken> got = runner.run(logits, vocab, {device.device_step(prompt, generated)});
    const int32_t want = cpu.sample(logits, prompt, generated);
    ASSERT_EQ(got[0].token, want) << "step " << step;
    generated.push_back(want);
  }
}

TEST(SamplingDevice, FrequenciesFollowTheDistributionWithManyCandidates) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = 4096;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<float> row(static_cast<size_t>(vocab));
  for (float& logit : row) logit = normal(rng);
  SamplingParams params;
  params.top_p = 0.95f, params.temperature = 1.2f;
  std::vector<float> scratch = row;
  const std::vector<TokenProbability> expected = Sampler(params, int32_t(vocab)).distribution(scratch, {}, {});
  ASSERT_GT(expected.size(), 3000u);
  // 200 independent streams per launch (one Sampler each), 100 launches: 20,000 draws.
  const int rows = 200, launches = 100;
  std::vector<float> logits;
  for (int r = 0; r < rows; ++r) logits.insert(logits.end(), row.begin(), row.end());
  std::vector<Sampler> samplers;
  for (int r = 0; r < rows; ++r) {
    SamplingParams seeded = params;
    seeded.seed = 31 + uint64_t(r);
    samplers.emplace_back(seeded, int32_t(vocab));
  }
  std::vector<int> counts(size_t(vocab), 0);
  DeviceSampler runner;
  for (int launch = 0; launch < launches; ++launch) {
    std::vector<sampling::SamplingStep> steps;
    for (Sampler& s : samplers) steps.push_back(s.device_step({}, {}));
    for (const SampledToken& t : runner.run(logits, vocab, steps)) {
      ASSERT_EQ(t.status, SamplingStatus::Ok);
      ASSERT_TRUE(t.token >= 0 && t.token < vocab) << t.token;
      ++counts[size_t(t.token)];
    }
  }
  const double draws = double(rows) * launches;
  // Tokens grouped into 40 bins of consecutive ranks: each bin's frequency within 6 standard deviations.
  int in_distribution = 0;
  const size_t per_bin = (expected.size() + 39) / 40;
  for (size_t first = 0; first < expected.size(); first += per_bin) {
    double p = 0;
    int count = 0;
    for (size_t i = first; i < std::min(expected.size(), first + per_bin); ++i) {
      p += expected[i].probability;
      count += counts[size_t(expected[i].token)];
    }
    in_distribution += count;
    const double sigma = std::sqrt(p * (1 - p) / draws);
    EXPECT_NEAR(count / draws, p, 6 * sigma) << "ranks " << first << "..";
  }
  EXPECT_EQ(in_distribution, int(draws)) << "a token outside the top_p nucleus was drawn";
}

TEST(SamplingDevice, BadRowsReportTheCpuSamplersError) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = 1000;
  std::mt19937 rng(8);
  std::vector<float> good = make_logits(Shape::Typical, vocab, rng);
  std::vector<float> nan_row = good, inf_row = good, all_minus_inf(size_t(vocab), -kInf);
  nan_row[700] = std::numeric_limits<float>::quiet_NaN();
  nan_row[900] = kInf;
  inf_row[123] = kInf;
  inf_row[124] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::vector<float>> rows = {good, nan_row, good, inf_row, all_minus_inf};
  std::vector<float> logits;
  for (const auto& row : rows) logits.insert(logits.end(), row.begin(), row.end());
  for (const float temperature : {1.0f, 0.0f}) {
    SamplingParams params;
    params.temperature = temperature, params.seed = 3;
    params.logit_bias = {{700, 1.0f}, {123, -5.0f}};
    std::vector<Sampler> device;
    std::vector<sampling::SamplingStep> steps;
    for (size_t r = 0; r < rows.size(); ++r) device.emplace_back(params, int32_t(vocab));
    for (Sampler& s : device) steps.push_back(s.device_step({}, {}));
    const std::vector<SampledToken> got = DeviceSampler().run(logits, vocab, steps);
    for (size_t r = 0; r < rows.size(); ++r) {
      SCOPED_TRACE("row " + std::to_string(r) + " temperature " + std::to_string(temperature));
      std::vector<float> row = rows[r];
      std::string cpu_error;
      int32_t cpu_token = -1;
      try {
        cpu_token = Sampler(params, int32_t(vocab)).sample(row, {}, {});
      } catch (const Error& e) {
        cpu_error = e.what();
      }
      if (cpu_error.empty()) {
        EXPECT_EQ(got[r].status, SamplingStatus::Ok);
        EXPECT_EQ(got[r].token, cpu_token);
      } else {
        EXPECT_EQ(got[r].token, -1);
        testing::expect_error([&] { check_sampled_token(got[r]); }, cpu_error);
      }
    }
  }
}

TEST(SamplingDevice, BadLaunchParametersAreNamed) {
  SamplingLaunchParams p;
  float logits = 0;
  sampling::RowParams row;
  SampledToken result;
  p.logits = &logits, p.rows = 1, p.vocab = 1, p.row_stride = 1, p.row_params = &row, p.results = &result;
  EXPECT_NO_THROW(check_sampling_params(p));
  using testing::expect_error;
  auto with = [&](auto change) {
    SamplingLaunchParams q = p;
    change(q);
    return [q] { check_sampling_params(q); };
  };
  expect_error(with([](auto& q) { q.rows = 0; }), "rows 0");
  expect_error(with([](auto& q) { q.vocab = 0; }), "vocab 0");
  expect_error(with([](auto& q) { q.vocab = q.row_stride = max_sampling_vocab() + 1; }), "shared memory");
  expect_error(with([](auto& q) { q.vocab = 10; }), "row_stride 1");
  expect_error(with([](auto& q) { q.logits = nullptr; }), "logits");
  expect_error(with([](auto& q) { q.row_params = nullptr; }), "row_params");
  expect_error(with([](auto& q) { q.results = nullptr; }), "results");
  expect_error(with([](auto& q) { q.cluster_ctas = 4; }), "cluster_ctas 4");
  EXPECT_GE(max_sampling_vocab(), kDeepSeekVocab);
}

// The generation loop on a GPU model (a golden tiny checkpoint): sampling on the device gives the tokens that copying
// the logits back and sampling on the CPU gives, for greedy and seeded sampling with every option.
TEST(SamplingDevice, EngineGeneratesTheSameTokensSamplingOnTheDevice) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  namespace fs = std::filesystem;
  testing::TempDir dir("device_sampling");
  for (const auto& entry : fs::directory_iterator(fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like"))
    fs::copy(entry.path(), dir.path() / entry.path().filename());
  testing::write_tiny_tokenizer(dir.path());
  EngineOptions options;
  options.model_dir = dir.path().string();
  options.progress = false;
  options.device = "cuda";
  options.max_context = 256;
  options.sample_on_device = false;
  Engine on_host(options);
  options.sample_on_device = true;
  Engine on_device(options);
  const std::vector<int32_t> prompt = on_host.tokenizer().encode_prompt("the cat sat on the mat");
  std::vector<SamplingParams> cases(3);
  cases[0].temperature = 0.0f;
  cases[1].temperature = 0.9f, cases[1].top_k = 50, cases[1].top_p = 0.9f, cases[1].repetition_penalty = 1.2f;
  cases[1].presence_penalty = 0.3f, cases[1].seed = 5;
  cases[2].temperature = 1.3f, cases[2].min_p = 0.02f, cases[2].frequency_penalty = 0.5f, cases[2].seed = 6;
  cases[2].logit_bias = {{7, 3.0f}};
  for (size_t i = 0; i < cases.size(); ++i) {
    cases[i].max_tokens = 40;
    const GenerationResult want = on_host.generate(prompt, cases[i], {});
    const GenerationResult got = on_device.generate(prompt, cases[i], {});
    EXPECT_EQ(got.tokens, want.tokens) << "case " << i;
    EXPECT_GE(want.tokens.size(), 2u) << "case " << i << ": too short to decode on the device";
  }
}

// Per-step cost at the DSV4 vocabulary: the device sampler's kernel time against what the runtime did before (copy
// the logits rows back into a std::vector, then Sampler::sample per row). Printed, not asserted.
TEST(SamplingDevice, TimingAgainstCopyAndCpuSampling) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int64_t vocab = kDeepSeekVocab;
  std::vector<NamedParams> cases = option_cases(vocab);
  const std::vector<std::string> timed = {"greedy", "temperature 1", "top_k 40", "top_p 0.9",
                                          "top_k 50 top_p 0.8 min_p 0.05", "everything"};
  std::mt19937 rng(12);
  std::printf("%-32s %6s %10s %10s %10s %14s\n", "parameters", "batch", "device us", "8-CTA us", "16-CTA us",
              "copy + cpu us");
  for (const int rows : {1, 64, 256}) {
    std::vector<float> logits;
    for (int r = 0; r < rows; ++r) {
      const std::vector<float> row = make_logits(Shape::Typical, vocab, rng);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const DeviceBuffer device_logits = to_device(logits, "logits");
    for (const NamedParams& c : cases) {
      if (std::find(timed.begin(), timed.end(), c.name) == timed.end()) continue;
      std::vector<Sampler> samplers;
      for (int r = 0; r < rows; ++r) {
        SamplingParams params = c.params;
        params.seed = uint64_t(r);
        samplers.emplace_back(params, int32_t(vocab));
      }
      const std::vector<int32_t> prompt = random_ids(512, vocab, rng), generated = random_ids(64, vocab, rng);
      std::vector<sampling::SamplingStep> steps;
      for (Sampler& s : samplers) steps.push_back(s.device_step(prompt, generated));
      // The launcher's choice, then each cluster size forced (16 only where the batch fits the SMs).
      float device_ms = 0, narrow_ms = 0, wide_ms = 0;
      // Every cluster size takes the same draws, so it must pick the same tokens (the timing's own check).
      const std::vector<SampledToken> chosen = DeviceSampler().run(logits, vocab, steps, &device_ms, 20);
      const auto expect_same = [&](const std::vector<SampledToken>& other, int ctas) {
        ASSERT_EQ(other.size(), chosen.size());
        for (size_t r = 0; r < chosen.size(); ++r) {
          EXPECT_EQ(chosen[r].status, SamplingStatus::Ok) << c.name << " row " << r;
          EXPECT_TRUE(chosen[r].token >= 0 && chosen[r].token < vocab) << c.name << " row " << r;
          EXPECT_EQ(other[r].token, chosen[r].token) << c.name << " row " << r << ", " << ctas << "-CTA clusters";
        }
      };
      expect_same(DeviceSampler().run(logits, vocab, steps, &narrow_ms, 20, 8), 8);
      if (rows * 16 <= current_multiprocessors())
        expect_same(DeviceSampler().run(logits, vocab, steps, &wide_ms, 20, 16), 16);
      // The old path: a pageable copy of every row, then the CPU sampler per row.
      std::vector<float> host(logits.size());
      const int repetitions = rows >= 256 ? 1 : 3;
      const auto copy_start = std::chrono::steady_clock::now();
      for (int i = 0; i < repetitions; ++i) device_logits.download(host.data(), host.size() * sizeof(float));
      const auto micros_since = [](auto start) {
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      };
      const double copy_us = micros_since(copy_start) / repetitions;
      // sample() adjusts its row in place: every repetition gets fresh copies, made before the clock starts.
      std::vector<std::vector<float>> copies(size_t(repetitions), logits);
      const auto cpu_start = std::chrono::steady_clock::now();
      for (std::vector<float>& copy : copies) {
        for (int r = 0; r < rows; ++r) {
          samplers[size_t(r)].sample(std::span(copy).subspan(size_t(r) * size_t(vocab), size_t(vocab)), prompt,
                                     generated);
        }
      }
      const double cpu_us = micros_since(cpu_start) / repetitions;
      std::printf("%-32s %6d %10.1f %10.1f %10.1f %14.1f (copy %.1f)\n", c.name.c_str(), rows, device_ms * 1000.0,
                  narrow_ms * 1000.0, wide_ms * 1000.0, copy_us + cpu_us, copy_us);
    }
  }
}

}  // namespace
}  // namespace dsv4::cuda
