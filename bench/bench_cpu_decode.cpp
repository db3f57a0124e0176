// CPU decode speed at batch 1: the tiny golden model (tests/golden/flash_like), and one V4-Flash-sized CSA layer
// with synthetic release-format weights (fp8 projections, MXFP4 experts). The Flash layer materialises 8 of its 256
// routed experts: a decode step touches 6 plus the shared one whatever the expert count, so the per-token cost is
// that of the real layer; its vocabulary is cut to 1024 so the LM head does not dominate. Each iteration decodes one
// token at a context of `prefill` tokens (prefilled outside the timing). Threads: DSV4_THREADS or all cores.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "backends/cpu/cpu_backend.hpp"
#include "core/thread_pool.hpp"
#include "model/checkpoint_loader.hpp"
#include "model/checkpoint_writer.hpp"
#include "model/dsv4_model.hpp"

namespace {

namespace fs = std::filesystem;
using namespace dsv4;

struct LoadedModel {
  LoadedCheckpoint ckpt;
  cpu::CpuBackend backend;
  Dsv4Model model;
  explicit LoadedModel(const fs::path& dir)
      : ckpt(load_checkpoint(dir.string())), backend(ckpt.config, NumericsMode::Exact),
        model(ckpt.config, ckpt.weights, backend) {
    ckpt.require_loadable();
  }
};

// Weight bytes one decode token reads: every matrix of the blocks except the routed experts it does not select
// (top-k of them counted), plus the LM head.
double bytes_per_token(const LoadedCheckpoint& c) {
  double bytes = double(c.weights.head.stored_bytes());
  for (const BlockWeights& b : c.weights.layers) {
    const AttentionWeights& a = b.attn;
    for (const QuantizedMatrix* m : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b, &b.hc_attn.fn, &b.hc_ffn.fn,
                                     &b.ffn.gate, &b.ffn.shared.w1, &b.ffn.shared.w2, &b.ffn.shared.w3})
      bytes += double(m->stored_bytes());
    if (a.compressor) bytes += double(a.compressor->wkv.stored_bytes() + a.compressor->wgate.stored_bytes());
    if (a.indexer)
      bytes += double(a.indexer->wq_b.stored_bytes() + a.indexer->weights_proj.stored_bytes() +
                      a.indexer->compressor.wkv.stored_bytes() + a.indexer->compressor.wgate.stored_bytes());
    const ExpertWeights& e = b.ffn.experts.front();
    bytes += double(c.config.moe.experts_per_token) *
             double(e.w1.stored_bytes() + e.w2.stored_bytes() + e.w3.stored_bytes());
  }
  return bytes;
}

void decode(benchmark::State& state, LoadedModel& m) {
  const int64_t prefill = state.range(0);
  std::vector<int32_t> prompt(static_cast<size_t>(prefill));
  for (int64_t i = 0; i < prefill; ++i) prompt[size_t(i)] = int32_t((i * 7919 + 13) % m.ckpt.config.vocab_size);
  auto sequence = m.model.new_sequence();
  std::vector<float> logits;
  m.model.forward(*sequence, prompt, LogitRows::Last, logits);
  int32_t token = 3;
  int64_t tokens = 0;
  for (auto _ : state) {
    m.model.forward(*sequence, std::span(&token, 1), LogitRows::Last, logits);
    ++tokens;
  }
  const double bytes = bytes_per_token(m.ckpt);
  state.counters["tok/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsRate);
  state.counters["weight_GB/s"] = benchmark::Counter(double(tokens) * bytes / 1e9, benchmark::Counter::kIsRate);
  state.counters["MB/token"] = bytes / 1e6;
  state.SetLabel(std::to_string(ThreadPool::global().size()) + " threads");
}

void BM_TinyGoldenModelDecode(benchmark::State& state) {
  static LoadedModel model(fs::path(DSV4_SOURCE_DIR) / "tests/golden/flash_like");
  decode(state, model);
}

void BM_FlashCsaLayerDecode(benchmark::State& state) {
  static LoadedModel model = [] {
    nlohmann::json json = nlohmann::json::parse(
        std::ifstream(fs::path(DSV4_SOURCE_DIR) / "tests/unit/io/configs/flash_release_config.json"));
    json["num_hidden_layers"] = 1;
    json["compress_ratios"] = {4, 0};
    json["num_hash_layers"] = 0;
    json["n_routed_experts"] = 8;
    json["vocab_size"] = 1024;
    json["num_nextn_predict_layers"] = 0;
    const ModelConfig config = ModelConfig::from_json(json, "flash one-layer bench");
    const fs::path dir = fs::temp_directory_path() / "dsv4-bench-flash-layer";
    if (!fs::exists(dir / "model.safetensors")) {
      CheckpointWriteOptions options;
      options.include_mtp = false;
      write_checkpoint(dir.string(), config, json,
                       [](const WeightSlot& slot, float* values) {
                         std::mt19937 rng(uint32_t(std::hash<std::string>{}(slot.name)));
                         std::normal_distribution<float> normal(0.0f, slot.kind == SlotKind::Matrix ? 0.02f : 1.0f);
                         int64_t n = 1;
                         for (int64_t extent : slot.shape) n *= extent;
                         for (int64_t i = 0; i < n; ++i) values[i] = normal(rng);
                       },
                       options);
    }
    return LoadedModel(dir);
  }();
  decode(state, model);
}

BENCHMARK(BM_TinyGoldenModelDecode)->Arg(32)->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_FlashCsaLayerDecode)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

}  // namespace

BENCHMARK_MAIN();
