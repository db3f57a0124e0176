// dsv4 bench: llama-bench style throughput of the whole model. Prefill (ppN: N prompt tokens into a fresh sequence)
// and greedy decode (tgN @ bB: N steps of B fresh sequences, one token each per step, the next tokens chosen by the
// argmax of the step's logits) in tokens/s, mean ± standard deviation over repetitions after one warm-up run.
//   dsv4 bench -m DIR      a checkpoint, on the CPU (through the runtime's LanguageModel) or the GPU (CudaModel);
//   dsv4 bench e2e         synthetic weights generated on the GPU at V4-Flash / V4-Pro widths (or a config file),
//                          as many layers as fit, with the per-layer cost extrapolated to the full depth.
#include "cli_options.hpp"
#include "command_registry.hpp"
#include "core/error.hpp"
#include "core/quantized_matrix.hpp"
#include "io/builtin_configs.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#if DSV4_HAVE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "backends/cuda/copy_bandwidth.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/cuda_model.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/kernels/argmax.hpp"
#include "backends/cuda/linear_dispatch.hpp"
#include "backends/cuda/stream_timing.hpp"
#include "backends/cuda/synthetic_weights.hpp"
#include "model/checkpoint_loader.hpp"
#endif

namespace dsv4::app {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// What to measure, shared by both forms of the command.
struct BenchPlan {
  std::vector<int64_t> prompts = {512};
  int64_t generate = 128;
  std::vector<int64_t> batches = {1};
  int reps = 3;
  int64_t ubatch = 512;  // prompt tokens per GPU prefill step (CudaModel's max_step_tokens)
  std::string json_path;
  uint64_t seed = 1;

  void add_to(CLI::App& sub, const char* prompts_help, const char* batches_help) {
    sub.add_option("-p,--n-prompt", prompts, prompts_help)->delimiter(',')->capture_default_str();
    sub.add_option("-n,--n-gen", generate, "Decode steps per tgN test (0 = no decode test)")->capture_default_str();
    sub.add_option("-b,--batch", batches, batches_help)->delimiter(',')->capture_default_str();
    sub.add_option("-r,--repetitions", reps, "Timed repetitions of each test (after one warm-up run)")
        ->capture_default_str();
    sub.add_option("-u,--ubatch", ubatch, "Prompt tokens per prefill step on the GPU (1-4096; longer prompts run in "
                   "chunks of this)")->capture_default_str();
    sub.add_option("--json", json_path, "Also write the results as JSON to this file");
    sub.add_option("--seed", seed, "Seed of the random prompt and first tokens (and of synthetic weights)")
        ->capture_default_str();
  }
  void validate() const {
    for (int64_t p : prompts) check(p >= 0, "-p: prompt length ", p, " must not be negative");
    check(generate >= 0, "-n: ", generate, " decode steps must not be negative");
    for (int64_t b : batches) check(b >= 1, "-b: batch ", b, " must be at least 1");
    check(reps >= 1, "-r: ", reps, " repetitions must be at least 1");
    check(ubatch >= 1 && ubatch <= 4096, "--ubatch: ", ubatch, " prompt tokens per step must be in 1..4096");
    check(std::any_of(prompts.begin(), prompts.end(), [](int64_t p) { return p > 0; }) || generate > 0,
          "nothing to measure: every -p is 0 and -n is 0");
  }
  std::vector<int64_t> prompt_tests() const {
    std::vector<int64_t> out;
    for (int64_t p : prompts)
      if (p > 0) out.push_back(p);
    return out;
  }
  std::vector<int64_t> decode_batches() const { return generate > 0 ? batches : std::vector<int64_t>{}; }
};

// One row of the table: a test's timed repetitions.
struct TestResult {
  std::string test;     // "pp512", "tg128"
  int64_t batch = 1;
  int64_t tokens = 0;   // tokens per repetition (prompt tokens, or steps × batch)
  std::vector<double> seconds;
  // Synthetic runs: the same test at the model's full depth, from the per-layer cost (an extrapolation).
  std::optional<double> extrapolated_tps;
  std::optional<double> layer_ms;  // per layer, per call (prefill) or per step (decode)
  std::optional<double> fixed_ms;  // outside the layers, per step (head, argmax); decode only
  std::optional<int> launches;     // GPU decode: kernel launches of one step (the CUDA graph's kernel nodes)
  std::vector<int> layer_launches; // GPU decode (synthetic runs): those of each layer

  std::vector<double> tps() const {
    std::vector<double> out;
    for (double s : seconds) out.push_back(double(tokens) / s);
    return out;
  }
  double mean_tps() const {
    const std::vector<double> v = tps();
    return std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
  }
  double stddev_tps() const {
    const std::vector<double> v = tps();
    if (v.size() < 2) return 0.0;
    const double mean = mean_tps();
    double sum = 0;
    for (double x : v) sum += (x - mean) * (x - mean);
    return std::sqrt(sum / double(v.size() - 1));
  }
  double mean_seconds() const { return std::accumulate(seconds.begin(), seconds.end(), 0.0) / double(seconds.size()); }
};

std::string test_name(const char* kind, int64_t tokens, int64_t batch) {
  return std::string(kind) + std::to_string(tokens) + (batch > 1 ? " @ b" + std::to_string(batch) : "");
}

// What a benchmark runs on. prefill() and decode() return wall seconds, the device work included.
class BenchRunner {
 public:
  virtual ~BenchRunner() = default;
  // Prefills `ids` into a fresh sequence (logits of the last position only), then frees it.
  virtual double prefill(std::span<const int32_t> ids) = 0;
  // `steps` greedy decode steps of first.size() fresh sequences started from `first`, then frees them.
  virtual double decode(std::span<const int32_t> first, int64_t steps) = 0;
  // Prompt tokens per prefill step: a longer prompt runs in steps of this many.
  virtual int64_t prefill_step_tokens() const = 0;
};

int32_t host_argmax(std::span<const float> row) {
  // The lowest id holding the maximum, as the sampler's greedy path.
  return int32_t(std::max_element(row.begin(), row.end()) - row.begin());
}

// Batch 1 through the runtime's model interface (the CPU backend, or the GPU through CudaLanguageModel).
class LanguageModelRunner final : public BenchRunner {
 public:
  LanguageModelRunner(LanguageModel& model, int64_t prefill_chunk) : model_(model), chunk_(prefill_chunk) {}

  double prefill(std::span<const int32_t> ids) override {
    auto sequence = model_.new_sequence();
    const Clock::time_point start = Clock::now();
    for (size_t at = 0; at < ids.size(); at += size_t(chunk_))
      model_.forward(*sequence, ids.subspan(at, std::min(ids.size() - at, size_t(chunk_))), LogitRows::Last, logits_);
    return seconds_since(start);
  }
  double decode(std::span<const int32_t> first, int64_t steps) override {
    check(first.size() == 1, "-b ", first.size(), ": batched decode needs the GPU (--device cuda)");
    auto sequence = model_.new_sequence();
    int32_t token = first[0];
    const Clock::time_point start = Clock::now();
    for (int64_t s = 0; s < steps; ++s) {
      model_.forward(*sequence, std::span<const int32_t>(&token, 1), LogitRows::Last, logits_);
      token = host_argmax(logits_);
    }
    return seconds_since(start);
  }
  int64_t prefill_step_tokens() const override { return chunk_; }

 private:
  LanguageModel& model_;
  int64_t chunk_;
  std::vector<float> logits_;
};

std::vector<int32_t> random_ids(int64_t count, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, int32_t(vocab - 1));
  std::vector<int32_t> ids(static_cast<size_t>(count));
  for (int32_t& id : ids) id = pick(rng);
  return ids;
}

// One warm-up run of the test's first prefill step (min(prompt, step tokens): the first call of each step-sized
// kernel pays lazy module loading and initialisation, which a shorter warm-up left in the first repetition), then
// the repetitions.
TestResult measure_prefill(BenchRunner& runner, int64_t prompt, int64_t vocab, const BenchPlan& plan) {
  TestResult r{test_name("pp", prompt, 1), 1, prompt, {}, {}, {}, {}, {}, {}};
  runner.prefill(random_ids(std::min(prompt, runner.prefill_step_tokens()), vocab, plan.seed + 99));
  for (int rep = 0; rep < plan.reps; ++rep)
    r.seconds.push_back(runner.prefill(random_ids(prompt, vocab, plan.seed + uint64_t(rep))));
  return r;
}

// Decode steps of the warm-up run before a tgN test's repetitions.
constexpr int64_t kWarmupSteps = 2;

TestResult measure_decode(BenchRunner& runner, int64_t batch, int64_t vocab, const BenchPlan& plan) {
  TestResult r{test_name("tg", plan.generate, batch), batch, plan.generate * batch, {}, {}, {}, {}, {}, {}};
  runner.decode(random_ids(batch, vocab, plan.seed + 99), kWarmupSteps);
  for (int rep = 0; rep < plan.reps; ++rep)
    r.seconds.push_back(runner.decode(random_ids(batch, vocab, plan.seed + uint64_t(rep)), plan.generate));
  return r;
}

// What the report says about the run besides the rows.
struct BenchReport {
  std::string model;        // "flash", "pro", a config path or a checkpoint directory
  std::string device;       // "cpu" or the GPU's description
  nlohmann::json device_json;
  int layers = 0;
  int full_layers = 0;      // the model's depth (synthetic runs measure `layers` of them)
  std::string format;       // expert format (synthetic) or "checkpoint"
  std::string numerics;     // the numerics mode's name (exact, reference; gpu-bf16 only for a checkpoint)
  std::string layer_kinds;  // describe_layer_kinds of the measured layers
  std::vector<TestResult> results;
  nlohmann::json extra = nlohmann::json::object();  // GPU figures: bandwidth floor, memory, launches
  bool storage_recorded = false;                     // GPU: record_storage has run (every shape's model stores alike)
  std::vector<std::string> notes;                    // printed under the table
  bool extrapolated = false;                         // rows carry a full-depth extrapolation (synthetic runs)
};

// The table is printed a row at a time, as the tests finish (a run cut short still shows what it measured).
void print_header(const BenchReport& r) {
  std::printf("device: %s\n", r.device.c_str());
  std::printf("model: %s, %s\n\n", r.model.c_str(), r.layer_kinds.c_str());
  std::printf("| model | layers | format | numerics | test | t/s |%s\n", r.extrapolated ? " extrapolated t/s |" : "");
  std::printf("| ----- | -----: | ------ | -------- | ---: | --: |%s\n", r.extrapolated ? " --: |" : "");
  std::fflush(stdout);
}

void print_row(const BenchReport& r, const TestResult& t) {
  std::printf("| %s | %d | %s | %s | %s | %.2f ± %.2f |", r.model.c_str(), r.layers, r.format.c_str(),
              r.numerics.c_str(), t.test.c_str(), t.mean_tps(), t.stddev_tps());
  if (r.extrapolated) {
    if (t.extrapolated_tps)
      std::printf(" %.2f (%d layers) |", *t.extrapolated_tps, r.full_layers);
    else
      std::printf(" - |");
  }
  std::printf("\n");
  std::fflush(stdout);
}

void print_notes(const BenchReport& r) {
  if (!r.notes.empty()) std::printf("\n");
  for (const std::string& note : r.notes) std::printf("%s\n", note.c_str());
}

void write_json(const BenchReport& r, const BenchPlan& plan, const std::string& path) {
  nlohmann::json results = nlohmann::json::array();
  for (const TestResult& t : r.results) {
    nlohmann::json row = {{"test", t.test},          {"batch", t.batch},
                          {"tokens", t.tokens},      {"seconds", t.seconds},
                          {"tokens_per_second", t.tps()}, {"mean_tps", t.mean_tps()},
                          {"stddev_tps", t.stddev_tps()}};
    if (t.extrapolated_tps) row["extrapolated_tps"] = *t.extrapolated_tps;
    if (t.layer_ms) row["layer_ms"] = *t.layer_ms;
    if (t.fixed_ms) row["fixed_ms"] = *t.fixed_ms;
    if (t.launches) {
      row["launches_per_step"] = *t.launches;
      row["launches_per_layer"] = double(*t.launches) / r.layers;
    }
    if (!t.layer_launches.empty()) row["launches_by_layer"] = t.layer_launches;
    results.push_back(row);
  }
  nlohmann::json out = {{"model", r.model},   {"device", r.device_json}, {"layers", r.layers},
                        {"full_layers", r.full_layers}, {"format", r.format}, {"numerics", r.numerics},
                        {"layer_kinds", r.layer_kinds}, {"results", results}};
  out["plan"] = {{"prompts", plan.prompts}, {"generate", plan.generate}, {"batches", plan.batches},
                 {"repetitions", plan.reps}, {"ubatch", plan.ubatch}, {"seed", plan.seed}};
  for (const auto& [key, value] : r.extra.items()) out[key] = value;
  std::ofstream file(path);
  check(file.good(), "--json: cannot write '", path, "'");
  file << out.dump(2) << "\n";
  check(file.good(), "--json: writing '", path, "' failed");
}

// Adds a finished test: its table row now, and the JSON so far (rewritten after every test, so a run cut short
// leaves its results).
void record(BenchReport& report, const BenchPlan& plan, TestResult result) {
  report.results.push_back(std::move(result));
  print_row(report, report.results.back());
  if (!plan.json_path.empty()) write_json(report, plan, plan.json_path);
}

WeightFormat parse_expert_format(const std::string& name) {
  if (name == "nvfp4") return WeightFormat::NVFP4;
  if (name == "mxfp4") return WeightFormat::MXFP4;
  if (name == "fp8") return WeightFormat::FP8_BLOCK128;
  fail("--format: '", name, "' is not an expert format (nvfp4, mxfp4 or fp8)");
}

// bench e2e --numerics: the engine's mode names; gpu-bf16 is the CUDA backend's exact mode under a CPU-side name.
NumericsMode parse_e2e_numerics(const std::string& text) {
  const std::optional<NumericsMode> mode = parse_numerics_mode(text);
  check(mode.has_value() && *mode != NumericsMode::GpuBf16, "--numerics: '", text,
        "' is not a numerics mode of bench e2e (exact or reference)");
  return *mode;
}

// One --fusion setting of bench e2e (the name is checked against the model's switches where they exist).
struct FusionSetting {
  std::string name;
  bool on = false;
};

FusionSetting parse_fusion(const std::string& text) {
  const size_t equals = text.find('=');
  check(equals != std::string::npos && equals > 0, "--fusion '", text, "': expected NAME=on or NAME=off");
  const std::string value = text.substr(equals + 1);
  check(value == "on" || value == "off", "--fusion '", text, "': the value must be on or off, not '", value, "'");
  return {text.substr(0, equals), value == "on"};
}

std::string resolve_device(const std::string& device) {
#if DSV4_HAVE_CUDA
  if (device == "auto") return cuda::list_devices().empty() ? "cpu" : "cuda";
#else
  if (device == "auto") return "cpu";
#endif
  check(device == "cpu" || device == "cuda" || device.starts_with("cuda:"), "--device: '", device,
        "' is not a device (cpu, cuda, cuda:N or auto)");
  return device;
}

#if DSV4_HAVE_CUDA

// Batch 1 and batched steps on a CudaModel; the next tokens come from the device argmax, so only the ids (4 bytes
// per sequence) cross to the host between steps.
class CudaModelRunner final : public BenchRunner {
 public:
  explicit CudaModelRunner(cuda::CudaModel& model)
      : model_(model),
        ids_(size_t(model.options().max_sequences) * sizeof(int32_t), "bench next ids"),
        nan_flag_(sizeof(int32_t), "bench NaN flag") {
    nan_flag_.fill_bytes(0);
  }

  double prefill(std::span<const int32_t> ids) override {
    const int slot = model_.add_sequence();
    const Clock::time_point start = Clock::now();
    try {
      model_.forward(slot, ids, LogitRows::Last, logits_);
    } catch (...) {
      model_.release_sequence(slot);
      throw;
    }
    const double seconds = seconds_since(start);
    model_.release_sequence(slot);
    return seconds;
  }

  ~CudaModelRunner() override {
    for (int slot : held_) model_.release_sequence(slot);
  }

  // Decode tests at a depth: `batch` sequences of `depth` random tokens each, prefilled here (untimed); every later
  // decode() continues them (first.size() must be `batch`) instead of starting fresh sequences.
  void hold_sequences(int64_t batch, int64_t depth, int64_t vocab, uint64_t seed) {
    check(held_.empty(), "bench: the decode sequences are already held");
    for (int64_t i = 0; i < batch; ++i) {
      held_.push_back(model_.add_sequence());
      model_.forward(held_.back(), random_ids(depth, vocab, seed + uint64_t(i)), LogitRows::Last, logits_);
    }
  }

  double decode(std::span<const int32_t> first, int64_t steps) override {
    if (!held_.empty()) {
      check(first.size() == held_.size(), "bench: ", first.size(), " first tokens for ", held_.size(),
            " held sequences");
      return timed_steps(held_, first, steps);
    }
    std::vector<int> slots;
    try {
      for (size_t i = 0; i < first.size(); ++i) slots.push_back(model_.add_sequence());
      const double seconds = timed_steps(slots, first, steps);
      for (int slot : slots) model_.release_sequence(slot);
      return seconds;
    } catch (...) {
      for (int slot : slots) model_.release_sequence(slot);
      throw;
    }
  }
  int64_t prefill_step_tokens() const override { return model_.options().max_step_tokens; }

 private:
  // `steps` greedy steps of `slots` from the tokens `first`; the argmax stays on the device.
  double timed_steps(std::span<const int> slots, std::span<const int32_t> first, int64_t steps) {
    std::vector<int32_t> tokens(first.begin(), first.end());
    const Clock::time_point start = Clock::now();
    for (int64_t s = 0; s < steps; ++s) {
      cuda::ArgmaxParams a;
      a.logits = model_.decode_on_device(slots, tokens);
      a.rows = int64_t(tokens.size()), a.vocab = model_.config().vocab_size, a.row_stride = a.vocab;
      a.ids = ids_.as<int32_t>(), a.nan_flag = nan_flag_.as<int32_t>(), a.stream = model_.stream();
      cuda::run_argmax(a);
      DSV4_CUDA_CHECK(cudaMemcpyAsync(tokens.data(), ids_.data(), tokens.size() * sizeof(int32_t),
                                      cudaMemcpyDeviceToHost, model_.stream()));
      DSV4_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
    }
    const double seconds = seconds_since(start);
    int32_t nan = 0;
    nan_flag_.download(&nan, sizeof nan);
    check(nan == 0, "bench: a decode step produced NaN logits");
    return seconds;
  }

  cuda::CudaModel& model_;
  cuda::DeviceBuffer ids_, nan_flag_;
  std::vector<float> logits_;
  std::vector<int> held_;  // hold_sequences
};

// Tests grouped by the model buffers they need: prefill runs one sequence of the longest prompt; each decode batch
// its own sequence count at a short context, or with a decode depth at that depth plus every step the warm-up and
// the repetitions add (the KV cache is sized for sequences × context up front), prefilled in ubatch-token steps.
struct ModelShape {
  int sequences = 1;
  int64_t context = 0;
  int64_t step_tokens = 0;
  std::vector<int64_t> prompts;  // prefill tests of this shape
  int64_t batch = 0;             // decode test of this shape (0 = none)
};

std::vector<ModelShape> model_shapes(const BenchPlan& plan, int64_t depth = 0) {
  std::vector<ModelShape> shapes;
  const std::vector<int64_t> prompts = plan.prompt_tests();
  if (!prompts.empty()) {
    const int64_t longest = *std::max_element(prompts.begin(), prompts.end());
    shapes.push_back({1, longest, std::min(plan.ubatch, longest), prompts, 0});
  }
  for (int64_t b : plan.decode_batches()) {
    if (depth == 0)
      shapes.push_back({int(b), kWarmupSteps + plan.generate, std::max<int64_t>(b, 16), {}, b});
    else
      shapes.push_back({int(b), depth + kWarmupSteps + plan.reps * plan.generate,
                        std::max({b, int64_t(16), std::min(plan.ubatch, depth)}), {}, b});
  }
  return shapes;
}

cuda::CudaModelOptions model_options(const std::string& device, NumericsMode numerics, const ModelShape& shape) {
  cuda::CudaModelOptions o;
  o.device = device;
  o.numerics = numerics;
  o.max_sequences = shape.sequences;
  o.max_context = shape.context;
  o.max_step_tokens = std::min<int64_t>(shape.step_tokens, 4096);
  return o;
}

// "kernel launches per layer kind (...): b1 sliding_window 12, csa 19, hca 13, 5 outside the layers; the full 43
// layers: 15.4 per layer; b64 ...": the measured layers' counts by kind (a mean where layers of a kind differ) and
// the full depth's mix of them (counted from the kinds, not captured).
std::string layer_kind_launches_note(const BenchReport& r, const ModelConfig& measured, const ModelConfig& full) {
  constexpr LayerKind kKinds[] = {LayerKind::SlidingWindow, LayerKind::CompressedSparse, LayerKind::HeavilyCompressed};
  std::string note;
  for (const TestResult& t : r.results) {
    if (!t.launches || t.layer_launches.size() != size_t(measured.num_layers)) continue;
    char part[160];
    std::snprintf(part, sizeof part, "%sb%lld", note.empty() ? "" : "; ", (long long)t.batch);
    note += part;
    int inside = 0;
    double full_launches = 0;
    bool every_kind_measured = true;
    for (const LayerKind kind : kKinds) {
      int sum = 0, count = 0;
      for (int i = 0; i < measured.num_layers; ++i)
        if (measured.layer_kind(i) == kind) sum += t.layer_launches[size_t(i)], ++count;
      inside += sum;
      if (count == 0) {
        every_kind_measured = every_kind_measured && full.num_layers_of_kind(kind) == 0;
        continue;
      }
      const double mean = double(sum) / count;
      full_launches += mean * full.num_layers_of_kind(kind);
      std::snprintf(part, sizeof part, " %s %.4g,", std::string(to_string(kind)).c_str(), mean);
      note += part;
    }
    std::snprintf(part, sizeof part, " %d outside the layers", *t.launches - inside);
    note += part;
    if (every_kind_measured) {
      full_launches += *t.launches - inside;
      std::snprintf(part, sizeof part, "; the full %d layers: %.1f per layer", full.num_layers,
                    full_launches / full.num_layers);
      note += part;
    }
  }
  return "kernel launches per layer kind (decode steps' CUDA graphs; the full depth counted from the measured kinds "
         "and its layer mix " + describe_layer_kinds(full) + "): " + note;
}

// What the model stores its KV entries and indexer keys in (CudaModel::storage), in the notes and the JSON; once per
// report, from its first model (every test group's model stores alike).
void record_storage(BenchReport& report, const cuda::CudaModel& model) {
  if (report.storage_recorded) return;
  report.storage_recorded = true;
  const cuda::StorageFormats s = model.storage();
  report.extra["kv_entries"] = cuda::to_string(s.kv_entry.format);
  report.extra["kv_entry_bytes"] = s.kv_entry.entry_bytes;
  report.extra["indexer_keys"] = cuda::to_string(s.indexer_keys);
  report.extra["indexer_key_bytes"] = s.indexer_key_bytes;
  report.notes.push_back("numerics " + report.numerics + ": " + cuda::describe(s));
}

double used_gib(const cuda::DeviceMemoryInfo& m) { return double(m.total_bytes - m.free_bytes) / double(1 << 30); }

// "kernel launches per decode step (...): b1 412 = 11.1 per layer, b8 ...", from the decode rows.
std::string launches_note(const BenchReport& r) {
  std::string note;
  for (const TestResult& t : r.results) {
    if (!t.launches) continue;
    char part[96];
    std::snprintf(part, sizeof part, "%sb%lld %d = %.1f per layer", note.empty() ? "" : ", ", (long long)t.batch,
                  *t.launches, double(*t.launches) / r.layers);
    note += part;
  }
  return "kernel launches per decode step (kernel nodes of its CUDA graph, plus one argmax launch not counted; the "
         "per-layer share counts the embedding, final norm and head in): " + note;
}

// Seconds per call of the head's linear layer and the argmax for `batch` rows: the per-step cost outside the layers
// (the final norm and hc_head are a few KB).
double head_seconds(const cuda::DeviceMatrixView& head, int64_t batch, cudaStream_t stream) {
  const int64_t d = head.cols, vocab = head.rows;
  cuda::DeviceBuffer x(size_t(batch * d) * 2, "bench head input"), y(size_t(batch * vocab) * 4, "bench logits");
  cuda::DeviceBuffer ids(size_t(batch) * 4, "bench head ids");
  cuda::DeviceBuffer workspace(std::max<size_t>(cuda::linear_workspace_bytes(head), 16), "bench head workspace");
  x.fill_bytes(0x3C);  // bf16 0x3C3C ≈ 0.0115: any finite input times the same weights
  workspace.fill_bytes(0);
  cuda::LinearCall call;
  call.weight = head, call.what = "head", call.x = x.as<__nv_bfloat16>(), call.x_row_stride = d;
  call.y = y.as<float>(), call.y_row_stride = vocab, call.tokens = batch, call.workspace = workspace.data();
  call.workspace_bytes = workspace.bytes(), call.stream = stream;
  cuda::ArgmaxParams a;
  a.logits = y.as<float>(), a.rows = batch, a.vocab = vocab, a.row_stride = vocab, a.ids = ids.as<int32_t>();
  a.stream = stream;
  constexpr int kWarmup = 3, kIterations = 20;
  for (int i = 0; i < kWarmup; ++i) cuda::run_linear(call), cuda::run_argmax(a);
  const float ms = cuda::stream_elapsed_ms(stream, [&] {
    for (int i = 0; i < kIterations; ++i) cuda::run_linear(call), cuda::run_argmax(a);
  });
  return double(ms) / 1e3 / kIterations;
}

// Device bytes of a sequence's state per layer kind at `context` tokens, for choosing how many layers fit (the
// model checks the exact figure itself): window ring and compressed entries of bf16 K=V vectors, the indexer keys,
// plus a margin for the compressor states. Returns bytes for `sequences` sequences of the first `layers` layers.
size_t state_estimate(const ModelConfig& c, int layers, int sequences, int64_t context, int64_t step_tokens) {
  size_t per_sequence = 0;
  const size_t entry = size_t(c.head_dim) * 2;
  for (int i = 0; i < layers; ++i) {
    per_sequence += size_t(c.window_size + step_tokens + 64) * entry;
    if (c.has_compressor(i)) per_sequence += size_t(context / c.compress_ratio(i) + 64) * entry;
    if (c.has_indexer(i)) per_sequence += size_t(context / c.compress_ratio(i)) * size_t(c.indexer.head_dim) * 2;
    if (c.has_compressor(i)) per_sequence += size_t(c.compress_ratio(i)) * size_t(c.head_dim) * 64;
  }
  return per_sequence * size_t(sequences);
}

// Step buffers (activations, logits, workspaces) and the allocator's slack, beyond the weights and the state.
constexpr size_t kScratchReserve = size_t(3) << 30;

struct E2eOptions {
  std::string config = "flash";
  int layers = 0;  // 0 = as many as fit
  std::string format = "nvfp4";
  std::string device = "cuda";
  NumericsMode numerics = NumericsMode::Exact;
  std::vector<FusionSetting> fusions;  // CudaModelOptions switches away from their defaults
  bool list_launches = false;          // notes naming the kernels of one decode layer of each kind
  int64_t depth = 0;                   // tokens each decode sequence holds before its tgN test
};

// "decode launches of layer 2 (csa) at batch 1, 16: a, b, ...": the kernels of the first measured layer of each kind
// in the captured decode graph of `batch`, in dependency order (main and branch stream).
std::vector<std::string> layer_launch_lists(cuda::CudaModel& model, const ModelConfig& config, int batch) {
  const std::vector<std::vector<std::string>> names = model.decode_layer_kernel_names(batch);
  std::vector<std::string> notes;
  std::vector<LayerKind> listed;
  for (int i = 0; i < config.num_layers && size_t(i) < names.size(); ++i) {
    const LayerKind kind = config.layer_kind(i);
    if (std::find(listed.begin(), listed.end(), kind) != listed.end()) continue;
    listed.push_back(kind);
    std::string note = "decode launches of layer " + std::to_string(i) + " (" + std::string(to_string(kind)) +
                       ") at batch " + std::to_string(batch) + ", " + std::to_string(names[size_t(i)].size()) + ":";
    for (size_t k = 0; k < names[size_t(i)].size(); ++k) note += (k == 0 ? " " : ", ") + names[size_t(i)][k];
    notes.push_back(note);
  }
  return notes;
}

// --fusion NAME=on|off: the CudaModelOptions switch of that name. One run builds one model; an A/B of a fusion is two
// runs, with and without the setting, whose synthetic weights are the same because they come from the same --seed.
void apply_fusion(cuda::CudaModelOptions& o, const FusionSetting& f) {
  const std::pair<const char*, bool cuda::CudaModelOptions::*> switches[] = {
      {"fuse_projections", &cuda::CudaModelOptions::fuse_projections},
      {"stack_indexer_projections", &cuda::CudaModelOptions::stack_indexer_projections},
      {"fuse_compressor_pools", &cuda::CudaModelOptions::fuse_compressor_pools},
      {"indexer_top_k_in_scores", &cuda::CudaModelOptions::indexer_top_k_in_scores},
      {"norms_in_mhc", &cuda::CudaModelOptions::norms_in_mhc},
      {"bf16_wo_a", &cuda::CudaModelOptions::bf16_wo_a},
      {"q_norm_prologue", &cuda::CudaModelOptions::q_norm_prologue},
      {"parallel_compressors", &cuda::CudaModelOptions::parallel_compressors},
      {"parallel_indexer", &cuda::CudaModelOptions::parallel_indexer},
      {"compressor_runs_at_launch", &cuda::CudaModelOptions::compressor_runs_at_launch},
      {"fp8_indexer_keys", &cuda::CudaModelOptions::fp8_indexer_keys},
      {"q_norm_cta_rows", &cuda::CudaModelOptions::q_norm_cta_rows},
      {"indexer_prepare_in_compressors", &cuda::CudaModelOptions::indexer_prepare_in_compressors}};
  std::string names;
  for (const auto& [name, member] : switches) {
    if (f.name == name) {
      o.*member = f.on;
      return;
    }
    names += std::string(names.empty() ? "" : ", ") + name;
  }
  fail("--fusion ", f.name, ": no such switch (", names, ")");
}

int run_e2e(const E2eOptions& o, const BenchPlan& plan) {
  plan.validate();
  const ModelConfig full = resolve_model_config(o.config);
  const WeightFormat format = parse_expert_format(o.format);
  cuda::check_synthetic_expert_format(format);
  if (o.layers != 0) first_layers(full, o.layers);  // range check before touching the GPU
  cuda::CudaModelOptions checked;
  for (const FusionSetting& f : o.fusions) apply_fusion(checked, f);  // an unknown name too
  check(!cuda::list_devices().empty(), "bench e2e needs a GPU: no CUDA device is visible");
  const std::string device = resolve_device(o.device == "auto" ? "cuda" : o.device);
  check(device != "cpu", "bench e2e runs on the GPU only (--device cuda or cuda:N)");
  const cuda::DeviceContext context = cuda::DeviceContext::open(device);
  const double copy_gbps = cuda::measure_copy_bandwidth_gbps(context.compute_stream());
  const std::vector<ModelShape> shapes = model_shapes(plan, o.depth);

  // Layers: what the user asked, or as many as fit next to the most demanding shape's state and the step buffers.
  const cuda::SyntheticWeightsPlan weights_plan = cuda::plan_synthetic_weights(full, format);
  const size_t free_bytes = context.memory().free_bytes;
  auto needed = [&](int layers) {
    size_t bytes = weights_plan.model_bytes + kScratchReserve, state = 0;
    for (int i = 0; i < layers; ++i) bytes += weights_plan.layer_bytes[size_t(i)];
    for (const ModelShape& s : shapes)
      state = std::max(state, state_estimate(full, layers, s.sequences, s.context, s.step_tokens));
    return bytes + state;
  };
  int fit = 0;
  while (fit < full.num_layers && needed(fit + 1) <= free_bytes) ++fit;
  check(fit >= 1 || o.layers != 0, "bench e2e: not even one layer of ", o.config, " (", o.format,
        " experts) fits: it needs about ", cuda::format_bytes(needed(1)), " and ", context.describe(), " has ",
        cuda::format_bytes(free_bytes), " free");
  check(o.layers <= fit, "bench e2e: --layers ", o.layers, " of ", o.config, " (", o.format, " experts) needs about ",
        cuda::format_bytes(needed(o.layers)), " (weights, KV state, step buffers) but ", context.describe(), " has ",
        cuda::format_bytes(free_bytes), " free; at most ", fit, " layers fit");
  const int layers = o.layers != 0 ? o.layers : fit;
  const ModelConfig config = first_layers(full, layers);
  std::fprintf(stderr, "bench e2e: %s with %s (%s experts); the full model has %d layers\n", o.config.c_str(),
               describe_layer_kinds(config).c_str(), o.format.c_str(), full.num_layers);

  BenchReport report;
  report.model = o.config;
  report.device = context.describe();
  report.device_json = nlohmann::json::parse(context.json());
  report.layers = layers;
  report.full_layers = full.num_layers;
  report.format = o.format;
  report.numerics = std::string(to_string(o.numerics));
  report.layer_kinds = describe_layer_kinds(config);
  report.extrapolated = true;
  report.extra["copy_bandwidth_gbps"] = copy_gbps;
  if (!o.fusions.empty()) {
    std::string fusions;
    for (const FusionSetting& f : o.fusions)
      fusions += (fusions.empty() ? "" : ", ") + f.name + (f.on ? "=on" : "=off");
    report.extra["fusions"] = fusions;
    report.notes.push_back("CudaModelOptions changed from their defaults: " + fusions);
  }
  report.extra["extrapolation"] =
      "per-layer cost of the measured layers x the full layer count + the cost outside the layers (decode: head "
      "linear and argmax timed alone); an estimate, not a measurement";
  double peak_used = 0;
  nlohmann::json memory = nlohmann::json::array();
  print_header(report);

  for (const ModelShape& shape : shapes) {
    cuda::DeviceAllocator pool(context.index());
    cuda::DeviceModelWeights weights =
        cuda::make_synthetic_weights(config, format, pool, plan.seed, context.compute_stream());
    const cuda::DecodeStepWeightBytes step_bytes = cuda::decode_step_weight_bytes(config, weights);
    const double fixed = shape.batch > 0 ? head_seconds(weights.head.view(), shape.batch, context.compute_stream()) : 0;
    cuda::CudaModelOptions options = model_options(device, o.numerics, shape);
    for (const FusionSetting& f : o.fusions) apply_fusion(options, f);
    cuda::CudaModel model(config, std::move(weights), options);
    record_storage(report, model);
    CudaModelRunner runner(model);
    for (int64_t p : shape.prompts) {
      TestResult t = measure_prefill(runner, p, config.vocab_size, plan);
      const double per_layer = t.mean_seconds() / layers;
      t.layer_ms = per_layer * 1e3;
      t.extrapolated_tps = double(p) / (per_layer * full.num_layers);
      record(report, plan, std::move(t));
    }
    if (shape.batch > 0) {
      if (o.depth > 0) runner.hold_sequences(shape.batch, o.depth, config.vocab_size, plan.seed + 1000);
      TestResult t = measure_decode(runner, shape.batch, config.vocab_size, plan);
      if (o.depth > 0) t.test += " @ d" + std::to_string(o.depth);
      t.launches = model.decode_launches(int(shape.batch));
      t.layer_launches = model.decode_layer_launches(int(shape.batch));
      if (o.list_launches)
        for (std::string& note : layer_launch_lists(model, config, int(shape.batch))) report.notes.push_back(note);
      const double step = t.mean_seconds() / double(plan.generate);
      const double per_layer = std::max(0.0, step - fixed) / layers;
      t.layer_ms = per_layer * 1e3;
      t.fixed_ms = fixed * 1e3;
      t.extrapolated_tps = double(shape.batch) / (fixed + per_layer * full.num_layers);
      if (shape.batch == 1) {
        // Batch 1: the weights a step reads over the step time, against the measured copy bandwidth.
        const double bytes = double(step_bytes.total_bytes());
        const double mean_layer = double(step_bytes.total_bytes() - step_bytes.model_bytes) / layers;
        const double full_bytes = double(step_bytes.model_bytes) + mean_layer * full.num_layers;
        const double full_step = fixed + per_layer * full.num_layers;
        report.extra["decode_b1_weight_bytes"] = step_bytes.total_bytes();
        report.extra["decode_b1_weight_gbps"] = bytes / step / 1e9;
        report.extra["decode_b1_floor_fraction"] = bytes / step / 1e9 / copy_gbps;
        report.extra["decode_b1_floor_fraction_extrapolated"] = full_bytes / full_step / 1e9 / copy_gbps;
        report.notes.push_back(
            "tg @ b1 weight bandwidth: " + cuda::format_bytes(step_bytes.total_bytes()) + " of weights per step in " +
            std::to_string(step * 1e3) + " ms = " + std::to_string(bytes / step / 1e9) + " GB/s, " +
            std::to_string(100.0 * bytes / step / 1e9 / copy_gbps) + " % of the measured copy bandwidth (" +
            std::to_string(copy_gbps) + " GB/s); extrapolated to " + std::to_string(full.num_layers) + " layers (" +
            cuda::format_bytes(size_t(full_bytes)) + "/step): " +
            std::to_string(100.0 * full_bytes / full_step / 1e9 / copy_gbps) + " %");
      }
      record(report, plan, std::move(t));
    }
    const double used = used_gib(context.memory());
    peak_used = std::max(peak_used, used);
    memory.push_back({{"sequences", shape.sequences}, {"context", shape.context}, {"gpu_memory_used_gib", used}});
  }
  report.extra["gpu_memory"] = memory;
  report.extra["gpu_memory_used_gib"] = peak_used;
  report.notes.push_back("GPU memory used (whole device, peak over the test groups): " + std::to_string(peak_used) +
                         " GiB");
  if (!plan.decode_batches().empty()) {
    report.notes.push_back(launches_note(report));
    report.notes.push_back(layer_kind_launches_note(report, config, full));
  }
  report.notes.push_back("extrapolated t/s: per-layer cost of the " + std::to_string(layers) +
                         " measured layers x " + std::to_string(full.num_layers) +
                         " layers + the cost outside the layers; an extrapolation, not a measurement");
  print_notes(report);
  if (!plan.json_path.empty()) write_json(report, plan, plan.json_path);
  return 0;
}

// A checkpoint on the GPU: CudaModel built once per test group from the loaded weights.
void run_checkpoint_cuda(const std::string& device, const EngineCli& cli, const BenchPlan& plan, BenchReport& report) {
  const EngineOptions options = cli.options();
  const LoadedCheckpoint checkpoint = load_checkpoint(options.model_dir);
  checkpoint.require_loadable();
  const ModelConfig& config = checkpoint.config;
  const cuda::DeviceContext context = cuda::DeviceContext::open(device);
  report.layers = report.full_layers = config.num_layers;
  report.layer_kinds = describe_layer_kinds(config);
  report.device = context.describe();
  report.device_json = nlohmann::json::parse(context.json());
  print_header(report);
  double peak_used = 0;
  for (const ModelShape& shape : model_shapes(plan)) {
    cuda::CudaModel model(config, checkpoint.weights, model_options(device, options.numerics, shape));
    record_storage(report, model);
    CudaModelRunner runner(model);
    for (int64_t p : shape.prompts) {
      record(report, plan, measure_prefill(runner, p, config.vocab_size, plan));
    }
    if (shape.batch > 0) {
      TestResult t = measure_decode(runner, shape.batch, config.vocab_size, plan);
      t.launches = model.decode_launches(int(shape.batch));
      record(report, plan, std::move(t));
    }
    peak_used = std::max(peak_used, used_gib(context.memory()));
  }
  report.extra["gpu_memory_used_gib"] = peak_used;
  report.notes.push_back("GPU memory used (whole device, peak over the test groups): " + std::to_string(peak_used) +
                         " GiB");
  if (!plan.decode_batches().empty()) report.notes.push_back(launches_note(report));
}

#endif  // DSV4_HAVE_CUDA

int run_checkpoint(const EngineCli& cli, const BenchPlan& plan) {
  check(!cli.engine.model_dir.empty(), "bench: -m DIR (a checkpoint) is required, or use 'dsv4 bench e2e'");
  plan.validate();
  const std::string device = resolve_device(cli.engine.device);
  BenchReport report;
  report.model = std::filesystem::path(cli.engine.model_dir).filename().string();
  if (report.model.empty()) report.model = cli.engine.model_dir;
  report.format = "checkpoint";
  report.numerics = std::string(to_string(cli.options().numerics));
  if (device == "cpu") {
    EngineOptions options = cli.options();
    options.device = "cpu";
    options.progress = false;
    const int64_t longest = plan.prompt_tests().empty() ? 0 : *std::max_element(plan.prompts.begin(),
                                                                                   plan.prompts.end());
    for (int64_t b : plan.decode_batches())
      check(b == 1, "-b ", b, ": batched decode needs the GPU (--device cuda); the CPU measures batch 1");
    Engine engine(options);
    check(longest + plan.generate <= engine.model().context_length(), "bench: ", longest, " prompt tokens or ",
          plan.generate, " decode steps exceed the model's context of ", engine.model().context_length());
    report.device = engine.model().device();
    report.device_json = {{"name", "cpu"}};
    report.layers = report.full_layers = engine.config().num_layers;
    report.layer_kinds = describe_layer_kinds(engine.config());
    print_header(report);
    LanguageModelRunner runner(engine.model(), options.prefill_chunk);
    for (int64_t p : plan.prompt_tests()) {
      record(report, plan, measure_prefill(runner, p, engine.config().vocab_size, plan));
    }
    for (int64_t b : plan.decode_batches()) {
      record(report, plan, measure_decode(runner, b, engine.config().vocab_size, plan));
    }
  } else {
#if DSV4_HAVE_CUDA
    run_checkpoint_cuda(device, cli, plan, report);
#else
    fail("--device ", device, ": this build has no CUDA backend (configure with the cuda preset)");
#endif
  }
  print_notes(report);
  if (!plan.json_path.empty()) write_json(report, plan, plan.json_path);
  return 0;
}

struct BenchOptions {
  std::vector<std::string> fusions;
  EngineCli engine;
  BenchPlan plan;
  BenchPlan e2e_plan;
  std::string config = "flash";
  int layers = 0;
  std::string format = "nvfp4";
  std::string e2e_device = "cuda";
  std::string e2e_numerics = "exact";
  bool list_launches = false;
  int64_t depth = 0;
};

const CommandRegistration registration{{
    "bench",
    "Measure prefill and decode tokens/s (llama-bench style) on a checkpoint, or 'bench e2e' on synthetic weights",
    [](CLI::App& sub) -> std::function<int()> {
      auto o = std::make_shared<BenchOptions>();
      sub.add_option("-m,--model", o->engine.engine.model_dir,
                     "Checkpoint directory (config.json, safetensors, tokenizer.json)");
      sub.add_option("--mode", o->engine.numerics, "Numerics: exact or reference")->capture_default_str();
      sub.add_option("--device", o->engine.engine.device, "cpu, cuda, cuda:N, or auto (a GPU when there is one)")
          ->capture_default_str();
      sub.add_option("--prefill-chunk", o->engine.engine.prefill_chunk, "Prompt tokens per prefill call (CPU)")
          ->capture_default_str();
      o->plan.add_to(sub, "Prompt lengths of the ppN tests, comma-separated (0 = none)",
                     "Decode batch sizes, comma-separated (above 1: GPU only)");

      CLI::App* e2e = sub.add_subcommand(
          "e2e", "Synthetic weights generated on the GPU at a model's real widths: as many layers as fit, per-layer "
                 "cost extrapolated to the full depth");
      e2e->add_option("--config", o->config, "flash, pro, or a config.json path / checkpoint directory")
          ->capture_default_str();
      e2e->add_option("--layers", o->layers, "Main layers to build (0 = as many as fit)")->capture_default_str();
      e2e->add_option("--format", o->format, "Routed expert format: nvfp4, mxfp4 or fp8")->capture_default_str();
      e2e->add_option("--device", o->e2e_device, "cuda or cuda:N")->capture_default_str();
      e2e->add_option("--numerics", o->e2e_numerics,
                      "exact (bf16 KV cache entries and indexer keys) or reference (DeepSeek's fp8 KV cache entries "
                      "and, with fp8_indexer_keys, fp8 indexer keys)")
          ->capture_default_str();
      e2e->add_option("--fusion", o->fusions,
                      "NAME=on|off: set a CudaModelOptions switch (fuse_projections, stack_indexer_projections, "
                      "fuse_compressor_pools, indexer_top_k_in_scores, norms_in_mhc, bf16_wo_a, q_norm_prologue, "
                      "parallel_compressors, parallel_indexer, compressor_runs_at_launch, fp8_indexer_keys, "
                      "q_norm_cta_rows, indexer_prepare_in_compressors); repeatable");
      e2e->add_option("-d,--depth", o->depth,
                      "Tokens each decode sequence holds before its tgN test (random, prefilled untimed; the "
                      "repetitions continue the same sequences)")
          ->capture_default_str();
      e2e->add_flag("--list-launches", o->list_launches,
                    "Name the kernels of a decode step's first layer of each kind (CUDA graph nodes) in the notes");
      o->e2e_plan.prompts = {512, 4096};
      o->e2e_plan.batches = {1, 8, 64};
      o->e2e_plan.add_to(*e2e, "Prompt lengths of the ppN tests, comma-separated (0 = none)",
                         "Decode batch sizes, comma-separated");
      return [o, e2e] {
        if (!e2e->parsed()) return run_checkpoint(o->engine, o->plan);
        check(o->engine.engine.model_dir.empty(), "bench e2e builds synthetic weights; -m does not apply");
        check(o->layers >= 0, "--layers: ", o->layers, " must not be negative (0 = as many as fit)");
        check(o->depth >= 0, "-d: decode depth ", o->depth, " must not be negative");
        [[maybe_unused]] const NumericsMode numerics = parse_e2e_numerics(o->e2e_numerics);  // also without CUDA
        std::vector<FusionSetting> fusions;
        for (const std::string& text : o->fusions) fusions.push_back(parse_fusion(text));
#if DSV4_HAVE_CUDA
        return run_e2e(
            {o->config, o->layers, o->format, o->e2e_device, numerics, fusions, o->list_launches, o->depth},
            o->e2e_plan);
#else
        // Check what can be checked without a GPU first, so a typo is reported as such.
        const ModelConfig full = resolve_model_config(o->config);
        if (o->layers != 0) first_layers(full, o->layers);
        parse_expert_format(o->format);
        fail("bench e2e needs the CUDA build (configure with the cuda preset) and a GPU");
#endif
      };
    },
}};

}  // namespace
}  // namespace dsv4::app
