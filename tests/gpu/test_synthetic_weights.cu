// Synthetic device weights (benchmarks): for V4-Flash cut to 4 layers (SWA, SWA, CSA, HCA; hash and scored routing)
// in each expert format, every tensor has the name, shape and format the checkpoint loader expects (weight_slots),
// the plan equals the pool memory taken, the decode byte count adds up, the MoE layers pass the device checks
// uploaded layers pass, values have the documented ranges (matrices of unit-ish gain, finite after dequantisation);
// generation is deterministic per seed; and a forward pass at Flash and Pro widths (prefill past an HCA window, then
// decode steps fed back through the device argmax) gives finite, non-degenerate logits, identical for two models of
// one seed.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/cuda_model.hpp"
#include "backends/cuda/kernels/argmax.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe_weights.hpp"
#include "backends/cuda/synthetic_weights.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "io/builtin_configs.hpp"
#include "model/weight_slots.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

constexpr WeightFormat kExpertFormats[] = {WeightFormat::NVFP4, WeightFormat::MXFP4, WeightFormat::FP8_BLOCK128};

ModelConfig flash_layers(int layers) { return first_layers(*builtin_config("flash"), layers); }

// One tensor of the device weights as the test reads it: a matrix view, or a vector's element count and pointer.
struct Tensor {
  const DeviceMatrixView* matrix = nullptr;
  int64_t count = 0;
  const void* data = nullptr;
  bool integer = false;
};

// Every tensor of `w` under its release checkpoint name (dsv4-model.md §6.1), written independently of the generator.
std::map<std::string, Tensor> tensors_of(const DeviceModelWeights& w) {
  std::map<std::string, Tensor> out;
  auto matrix = [&](const DeviceMatrix& m, const std::string& name) { out[name] = {&m.view(), 0, nullptr, false}; };
  auto floats = [&](const DeviceArray<float>& a, const std::string& name) {
    if (!a.empty()) out[name] = {nullptr, a.size(), a.data(), false};
  };
  auto hc = [&](const device_weights::HyperConnection& h, const std::string& p) {
    matrix(h.fn, p + "fn");
    floats(h.base, p + "base");
    floats(h.scale, p + "scale");
  };
  auto compressor = [&](const device_weights::Compressor& k, const std::string& p) {
    matrix(k.wkv, p + "wkv.weight");
    matrix(k.wgate, p + "wgate.weight");
    floats(k.ape, p + "ape");
    floats(k.norm, p + "norm.weight");
  };
  auto expert = [&](const device_weights::Expert& e, const std::string& p) {
    matrix(e.w1, p + "w1.weight");
    matrix(e.w2, p + "w2.weight");
    matrix(e.w3, p + "w3.weight");
  };
  matrix(w.embed, "embed.weight");
  matrix(w.head, "head.weight");
  floats(w.norm, "norm.weight");
  hc(w.hc_head, "hc_head_");
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const device_weights::Block& b = w.layers[i];
    const std::string p = "layers." + std::to_string(i) + ".";
    floats(b.attn_norm, p + "attn_norm.weight");
    floats(b.ffn_norm, p + "ffn_norm.weight");
    hc(b.hc_attn, p + "hc_attn_");
    hc(b.hc_ffn, p + "hc_ffn_");
    const device_weights::Attention& a = b.attn;
    matrix(a.wq_a, p + "attn.wq_a.weight");
    floats(a.q_norm, p + "attn.q_norm.weight");
    matrix(a.wq_b, p + "attn.wq_b.weight");
    matrix(a.wkv, p + "attn.wkv.weight");
    floats(a.kv_norm, p + "attn.kv_norm.weight");
    matrix(a.wo_a, p + "attn.wo_a.weight");
    matrix(a.wo_b, p + "attn.wo_b.weight");
    floats(a.sink, p + "attn.attn_sink");
    if (a.compressor) compressor(*a.compressor, p + "attn.compressor.");
    if (a.indexer) {
      matrix(a.indexer->wq_b, p + "attn.indexer.wq_b.weight");
      matrix(a.indexer->weights_proj, p + "attn.indexer.weights_proj.weight");
      compressor(a.indexer->compressor, p + "attn.indexer.compressor.");
    }
    const device_weights::Moe& f = b.ffn;
    matrix(f.gate, p + "ffn.gate.weight");
    floats(f.gate_bias, p + "ffn.gate.bias");
    if (!f.tid2eid.empty()) out[p + "ffn.gate.tid2eid"] = {nullptr, f.tid2eid.size(), f.tid2eid.data(), true};
    for (size_t e = 0; e < f.experts.size(); ++e) expert(f.experts[e], p + "ffn.experts." + std::to_string(e) + ".");
    expert(f.shared, p + "ffn.shared_experts.");
  }
  return out;
}

WeightFormat expected_format(ReleaseStorage storage, WeightFormat expert_format) {
  switch (storage) {
    case ReleaseStorage::BF16: return WeightFormat::BF16;
    case ReleaseStorage::F32: return WeightFormat::F32;
    case ReleaseStorage::FP8_BLOCK128: return WeightFormat::FP8_BLOCK128;
    case ReleaseStorage::MXFP4: return expert_format;
    case ReleaseStorage::I64: break;
  }
  ADD_FAILURE() << "no matrix format for release storage " << int(storage);
  return WeightFormat::F32;
}

// Whether a tensor is an MoE expert matrix (its fp4 words in the kernels' DEVICE layout on the device).
bool is_expert(const std::string& name) {
  return name.find(".ffn.experts.") != std::string::npos || name.find(".ffn.shared_experts.") != std::string::npos;
}

// The first `rows` rows of a device matrix as a host matrix (rows a multiple of 128 or all of them for FP8 bands);
// an fp4 expert matrix's words back in the checkpoint layout (the inverse of tile::detail::fp4_device_word).
OwnedQuantizedMatrix download_rows(const DeviceMatrixView& v, int64_t rows, bool expert) {
  rows = std::min(rows, v.rows);
  OwnedQuantizedMatrix m = allocate_quantized_matrix(v.format, rows, v.cols, v.scale_type, v.global_scale);
  DSV4_CUDA_CHECK(cudaMemcpy(m.storage->data.data(), v.data, m.storage->data.size(), cudaMemcpyDeviceToHost));
  if (expert && (v.format == WeightFormat::MXFP4 || v.format == WeightFormat::NVFP4))
    for (size_t i = 0; i + 4 <= m.storage->data.size(); i += 4) {
      uint32_t device, stored = 0;
      std::memcpy(&device, m.storage->data.data() + i, 4);
      for (int bit = 0; bit < 32; ++bit)
        stored |= (device >> bit & 1u) << tile::detail::fp4_device_bit_source(bit);
      std::memcpy(m.storage->data.data() + i, &stored, 4);
    }
  if (!m.storage->scales.empty())
    DSV4_CUDA_CHECK(
        cudaMemcpy(m.storage->scales.data(), v.scales, m.storage->scales.size(), cudaMemcpyDeviceToHost));
  return m;
}

std::vector<float> download_floats(const Tensor& t) {
  std::vector<float> host(size_t(t.count));
  DSV4_CUDA_CHECK(cudaMemcpy(host.data(), t.data, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return host;
}

// Element std of the first rows of a matrix, after checking every value is finite.
double element_std(const DeviceMatrixView& v, int64_t rows, const std::string& name) {
  const std::vector<float> values = dequantize(download_rows(v, rows, is_expert(name)).matrix);
  double sum = 0, squares = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      ADD_FAILURE() << name << " element " << i << " is " << values[i];
      return NAN;
    }
    sum += values[i];
    squares += double(values[i]) * values[i];
  }
  const double n = double(values.size()), mean = sum / n;
  return std::sqrt(std::max(0.0, squares / n - mean * mean));
}

TEST(SyntheticWeights, LayoutMatchesTheCheckpointSlotsInEveryExpertFormat) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig config = flash_layers(4);
  for (WeightFormat format : kExpertFormats) {
    SCOPED_TRACE(std::string("experts ") + std::string(to_string(format)));
    DeviceAllocator pool(0);
    const SyntheticWeightsPlan plan = plan_synthetic_weights(config, format);
    ASSERT_EQ(plan.layer_bytes.size(), 4u);
    const DeviceModelWeights w = make_synthetic_weights(config, format, pool, 11, nullptr);
    EXPECT_EQ(pool.stats().in_use_bytes, plan.total_bytes());
    EXPECT_EQ(w.tensors, plan.tensors);

    const std::map<std::string, Tensor> tensors = tensors_of(w);
    std::set<std::string> seen;
    int mismatches = 0;
    for (const WeightSlot& slot : weight_slots(config)) {
      const auto it = tensors.find(slot.name);
      if (it == tensors.end()) {
        if (++mismatches < 10) ADD_FAILURE() << "missing " << slot.name;
        continue;
      }
      seen.insert(slot.name);
      const Tensor& t = it->second;
      if (slot.kind == SlotKind::Matrix) {
        ASSERT_NE(t.matrix, nullptr) << slot.name;
        const bool ok = t.matrix->rows == slot.shape[0] && t.matrix->cols == slot.shape[1] &&
                        t.matrix->format == expected_format(slot.release_storage, format);
        if (!ok && ++mismatches < 10)
          ADD_FAILURE() << slot.name << ": [" << t.matrix->rows << ", " << t.matrix->cols << "] "
                        << to_string(t.matrix->format) << ", expected [" << slot.shape[0] << ", " << slot.shape[1]
                        << "] " << to_string(expected_format(slot.release_storage, format));
      } else {
        const int64_t count = std::accumulate(slot.shape.begin(), slot.shape.end(), int64_t{1}, std::multiplies<>());
        EXPECT_EQ(t.matrix, nullptr) << slot.name;
        EXPECT_EQ(t.count, count) << slot.name;
        EXPECT_EQ(t.integer, slot.kind == SlotKind::ExpertTable) << slot.name;
      }
    }
    EXPECT_EQ(mismatches, 0);
    for (const auto& [name, tensor] : tensors) EXPECT_TRUE(seen.count(name)) << "unexpected tensor " << name;

    // Decode bytes: every tensor of a layer once, except the routed experts (top_k of them) and the hash table (one
    // row); outside the layers the head, norm, hc_head and one embedding row.
    const DecodeStepWeightBytes step = decode_step_weight_bytes(config, w);
    ASSERT_EQ(step.layer_bytes.size(), 4u);
    const int64_t k = config.moe.experts_per_token;
    std::vector<size_t> want_layers(4);
    size_t want_model = size_t(config.hidden_size) * 2;
    for (const auto& [name, tensor] : tensors) {
      const size_t bytes = tensor.matrix ? tensor.matrix->stored_bytes : size_t(tensor.count) * 4;
      if (name == "embed.weight") continue;
      if (!name.starts_with("layers.")) {
        want_model += bytes;
        continue;
      }
      const size_t layer = std::stoul(name.substr(7));
      if (name.find(".ffn.experts.") != std::string::npos)
        want_layers[layer] += name.find(".ffn.experts.0.") != std::string::npos ? bytes * size_t(k) : 0;
      else if (name.ends_with("tid2eid"))
        want_layers[layer] += size_t(k) * 4;
      else
        want_layers[layer] += bytes;
    }
    EXPECT_EQ(step.model_bytes, want_model);
    for (size_t i = 0; i < 4; ++i) EXPECT_EQ(step.layer_bytes[i], want_layers[i]) << "layer " << i;

    // The device checks an uploaded MoE layer passes (expert shapes and formats, MXFP4 scale range, hash entries).
    const MoeConfig moe{config.hidden_size, config.moe.intermediate_size, config.moe.num_routed_experts,
                        config.moe.experts_per_token, float(config.moe.routed_scaling_factor),
                        float(config.moe.swiglu_limit)};
    for (int i = 0; i < config.num_layers; ++i)
      EXPECT_NO_THROW(DeviceMoeWeights(w.layers[size_t(i)].ffn, moe, "layer " + std::to_string(i) + " ffn"));
  }
}

TEST(SyntheticWeights, ValuesHaveTheDocumentedRanges) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig config = flash_layers(3);  // layer 2: CSA, scored routing
  for (WeightFormat format : kExpertFormats) {
    SCOPED_TRACE(std::string("experts ") + std::string(to_string(format)));
    DeviceAllocator pool(0);
    const DeviceModelWeights w = make_synthetic_weights(config, format, pool, 3, nullptr);
    const std::map<std::string, Tensor> t = tensors_of(w);
    // Matrices: element std 1/sqrt(cols) within the power-of-two scale rounding (√2) and sampling slack.
    for (const char* name :
         {"head.weight", "layers.2.attn.wq_a.weight", "layers.2.attn.wq_b.weight", "layers.2.attn.wo_a.weight",
          "layers.2.attn.wo_b.weight", "layers.2.attn.compressor.wkv.weight", "layers.2.attn.indexer.wq_b.weight",
          "layers.2.ffn.shared_experts.w2.weight", "layers.2.ffn.experts.0.w1.weight",
          "layers.2.ffn.experts.255.w2.weight", "layers.0.hc_attn_fn"}) {
      const DeviceMatrixView& v = *t.at(name).matrix;
      const double ratio = element_std(v, 256, name) * std::sqrt(double(v.cols));
      EXPECT_GT(ratio, 0.65) << name;
      EXPECT_LT(ratio, 1.5) << name;
    }
    const double router = element_std(*t.at("layers.2.ffn.gate.weight").matrix, 256, "router") * 64.0;
    EXPECT_NEAR(router, 2.0, 0.1);
    EXPECT_NEAR(element_std(*t.at("embed.weight").matrix, 256, "embed"), 1.0, 0.05);

    for (const char* name : {"norm.weight", "layers.2.attn_norm.weight", "layers.2.attn.q_norm.weight",
                             "layers.2.attn.indexer.compressor.norm.weight"})
      for (float x : download_floats(t.at(name))) ASSERT_EQ(x, 1.0f) << name;
    for (float x : download_floats(t.at("layers.1.hc_ffn_scale"))) {
      EXPECT_GE(x, 0.3f);
      EXPECT_LE(x, 1.5f);
    }
    for (const char* name : {"layers.2.attn.attn_sink", "layers.2.attn.compressor.ape", "hc_head_base"})
      for (float x : download_floats(t.at(name))) {
        ASSERT_TRUE(std::isfinite(x)) << name;
        ASSERT_LE(std::abs(x), 1.7320508f) << name;
      }

    // Hash tables: top_k distinct expert ids per token.
    const Tensor& table = t.at("layers.0.ffn.gate.tid2eid");
    std::vector<int32_t> ids(size_t(table.count));
    DSV4_CUDA_CHECK(cudaMemcpy(ids.data(), table.data, ids.size() * 4, cudaMemcpyDeviceToHost));
    const int k = config.moe.experts_per_token;
    std::vector<int64_t> load(size_t(config.moe.num_routed_experts));
    for (int64_t row = 0; row < config.vocab_size; ++row) {
      std::set<int32_t> distinct;
      for (int j = 0; j < k; ++j) {
        const int32_t e = ids[size_t(row * k + j)];
        ASSERT_TRUE(e >= 0 && e < config.moe.num_routed_experts) << "token " << row << " expert " << e;
        distinct.insert(e);
        ++load[size_t(e)];
      }
      ASSERT_EQ(distinct.size(), size_t(k)) << "token " << row;
    }
    // Every expert serves about vocab · k / E tokens.
    const double mean = double(config.vocab_size) * k / config.moe.num_routed_experts;
    for (int64_t l : load) EXPECT_NEAR(double(l), mean, 0.2 * mean);
  }
}

TEST(SyntheticWeights, DeterministicPerSeed) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig config = flash_layers(2);
  const char* samples[] = {"embed.weight", "layers.1.attn.wq_b.weight", "layers.0.ffn.experts.17.w2.weight",
                           "layers.1.ffn.shared_experts.w1.weight", "layers.1.hc_ffn_fn"};
  auto snapshot = [&](uint64_t seed) {
    DeviceAllocator pool(0);
    const DeviceModelWeights w = make_synthetic_weights(config, WeightFormat::NVFP4, pool, seed, nullptr);
    const std::map<std::string, Tensor> t = tensors_of(w);
    std::vector<std::vector<uint8_t>> bytes;
    for (const char* name : samples) {
      const OwnedQuantizedMatrix m = download_rows(*t.at(name).matrix, 512, is_expert(name));
      bytes.push_back(m.storage->data);
      bytes.push_back(m.storage->scales);
    }
    const Tensor& table = t.at("layers.0.ffn.gate.tid2eid");
    bytes.emplace_back(size_t(table.count) * 4);
    DSV4_CUDA_CHECK(cudaMemcpy(bytes.back().data(), table.data, bytes.back().size(), cudaMemcpyDeviceToHost));
    return bytes;
  };
  const auto a = snapshot(5), b = snapshot(5), c = snapshot(6);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "sample " << i / 2;
  for (size_t i = 0; i < a.size(); i += 2) EXPECT_NE(a[i], c[i]) << "sample " << i / 2 << " ignores the seed";
}

TEST(SyntheticWeights, RefusesWhatItCannotBuild) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0);
  testing::expect_error([&] { make_synthetic_weights(flash_layers(1), WeightFormat::BF16, pool, 1, nullptr); },
                        "expert format bf16 is not nvfp4, mxfp4 or fp8");
  testing::expect_error(  // ~870 GB
      [&] { make_synthetic_weights(*builtin_config("pro"), WeightFormat::MXFP4, pool, 1, nullptr); },
      "synthetic weights of 61 layers (mxfp4 experts) need");
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
}

// Prefill `prompt` tokens, then `steps` decode steps whose tokens come from the device argmax; returns the prefill's
// last logit row followed by the chosen ids.
struct ForwardResult {
  std::vector<float> last_logits;
  std::vector<int32_t> tokens;
};

ForwardResult run_forward(const ModelConfig& config, WeightFormat format, uint64_t seed, int64_t prompt, int steps) {
  DeviceAllocator pool(0);
  CudaModelOptions options;
  options.max_sequences = 2;
  options.max_context = 1024;
  CudaModel model(config, make_synthetic_weights(config, format, pool, seed, nullptr), options);
  const int slot = model.add_sequence();
  std::vector<int32_t> ids(static_cast<size_t>(prompt));
  for (int64_t i = 0; i < prompt; ++i) ids[size_t(i)] = int32_t((i * 7919 + 13) % config.vocab_size);
  ForwardResult r;
  model.forward(slot, ids, LogitRows::Last, r.last_logits);
  int finite = 0;
  for (float x : r.last_logits) finite += std::isfinite(x) ? 1 : 0;
  EXPECT_EQ(finite, config.vocab_size) << "non-finite prefill logits";
  const auto [lo, hi] = std::minmax_element(r.last_logits.begin(), r.last_logits.end());
  EXPECT_GT(*hi - *lo, 1e-2f) << "degenerate logits";
  EXPECT_LT(*hi - *lo, 1e4f) << "exploding logits";

  DeviceBuffer next(sizeof(int32_t), "next id"), flag(sizeof(int32_t), "nan flag");
  flag.fill_bytes(0);
  int32_t token = ids.back();
  const int slots[] = {slot};
  for (int s = 0; s < steps; ++s) {
    const float* logits = model.decode_on_device(slots, std::span<const int32_t>(&token, 1));
    ArgmaxParams a;
    a.logits = logits, a.rows = 1, a.vocab = config.vocab_size, a.row_stride = config.vocab_size;
    a.ids = next.as<int32_t>(), a.nan_flag = flag.as<int32_t>(), a.stream = model.stream();
    run_argmax(a);
    DSV4_CUDA_CHECK(cudaMemcpyAsync(&token, next.data(), 4, cudaMemcpyDeviceToHost, model.stream()));
    DSV4_CUDA_CHECK(cudaStreamSynchronize(model.stream()));
    EXPECT_TRUE(token >= 0 && token < config.vocab_size) << "step " << s << " id " << token;
    r.tokens.push_back(token);
  }
  int32_t nan_flag = -1;
  flag.download(&nan_flag, 4);
  EXPECT_EQ(nan_flag, 0) << "NaN decode logits";
  EXPECT_EQ(model.length(slot), prompt + steps);
  return r;
}

TEST(SyntheticWeights, FlashWidthForwardIsFiniteAndDeterministic) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const ModelConfig config = flash_layers(4);  // SWA, SWA, CSA, HCA: 300 tokens complete two HCA windows
  for (WeightFormat format : kExpertFormats) {
    SCOPED_TRACE(std::string("experts ") + std::string(to_string(format)));
    const ForwardResult a = run_forward(config, format, 21, 300, 6);
    if (format == WeightFormat::NVFP4) {
      const ForwardResult b = run_forward(config, format, 21, 300, 6);
      EXPECT_EQ(a.last_logits, b.last_logits);
      EXPECT_EQ(a.tokens, b.tokens);
    }
  }
}

TEST(SyntheticWeights, ProWidthForwardIsFinite) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  run_forward(first_layers(*builtin_config("pro"), 3), WeightFormat::NVFP4, 8, 300, 4);  // HCA, HCA, CSA
}

}  // namespace
}  // namespace dsv4::cuda
