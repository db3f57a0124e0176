#include "backends/cpu/cpu_backend.hpp"

#include "backends/cpu/attention.hpp"
#include "backends/cpu/bf16_rounding.hpp"
#include "backends/cpu/compressor.hpp"
#include "backends/cpu/indexer.hpp"
#include "backends/cpu/linear.hpp"
#include "backends/cpu/mhc.hpp"
#include "backends/cpu/moe.hpp"
#include "backends/cpu/reference_rounding.hpp"
#include "backends/cpu/rms_norm.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"

#include <algorithm>
#include <cmath>
#include <optional>

namespace dsv4::cpu {

namespace {

// One layer's state for one sequence.
struct LayerCache {
  // Window ring: the KV vectors of the last `window` tokens, slot = position mod window.
  std::vector<float> ring;
  // Compressed KV entries [entries, D] and their compressor (CSA/HCA layers).
  std::vector<float> compressed;
  std::optional<CompressorState> compressor;
  // Indexer keys [keys, index_head_dim] and their compressor (CSA layers).
  std::vector<float> index_keys;
  std::optional<CompressorState> index_compressor;
};

class CpuSequenceCache final : public SequenceCache {
 public:
  int64_t length() const override { return length_; }
  std::vector<LayerCache> layers;
  int64_t length_ = 0;
  int layers_done = 0;  // layers that stored the current call's tokens; length_ advances after the last one
};

// The mHC projection as fp32 values: the stored bytes themselves when they are aligned fp32 (every known layout
// stores them so), else a decoded copy held in `scratch`.
const float* mhc_fn(const QuantizedMatrix& fn, std::vector<float>& scratch) {
  if (fn.format == WeightFormat::F32 && reinterpret_cast<uintptr_t>(fn.data) % alignof(float) == 0)
    return reinterpret_cast<const float*>(fn.data);
  scratch = dequantize(fn);
  return scratch.data();
}

MhcParams mhc_params(const ModelConfig& c, int64_t T) {
  return {T, c.hidden_size, c.mhc.hc_mult, c.mhc.sinkhorn_iters, float(c.mhc.eps), float(c.rms_norm_eps)};
}

std::optional<YarnScaling> yarn_of(const ModelConfig& c) {
  if (!c.yarn) return std::nullopt;
  return YarnScaling{c.yarn->factor, c.yarn->original_max_position, c.yarn->beta_fast, c.yarn->beta_slow};
}

// The CUDA sparse-attention kernel's tile of entries (kSparseAttentionTileEntries): the unit of its running max,
// which GpuBf16 numerics reproduces when rounding the softmax weights.
constexpr int64_t kGpuAttentionTile = 32;

}  // namespace

CpuBackend::CpuBackend(const ModelConfig& config, NumericsMode numerics) : config_(config), numerics_(numerics) {
  rope_.reserve(size_t(config.num_layers));
  for (int i = 0; i < config.num_layers; ++i) {
    if (config.has_compressor(i))
      rope_.emplace_back(config.compress_rope_theta, config.rope_head_dim, yarn_of(config));
    else
      rope_.emplace_back(config.rope_theta, config.rope_head_dim);
  }
}

std::unique_ptr<SequenceCache> CpuBackend::new_sequence() {
  auto cache = std::make_unique<CpuSequenceCache>();
  cache->layers.resize(size_t(config_.num_layers));
  for (int i = 0; i < config_.num_layers; ++i) {
    LayerCache& layer = cache->layers[size_t(i)];
    layer.ring.assign(size_t(config_.window_size) * config_.head_dim, 0.0f);
    // CSA layers pool overlapping windows, in the main compressor and the indexer's.
    const bool csa = config_.layer_kind(i) == LayerKind::CompressedSparse;
    if (config_.has_compressor(i)) layer.compressor.emplace(config_.compress_ratio(i), config_.head_dim, csa);
    if (csa) layer.index_compressor.emplace(config_.compress_ratio(i), config_.indexer.head_dim, true);
  }
  return cache;
}

const QuantizedMatrix& CpuBackend::linear_weight(const QuantizedMatrix& w) {
  if (!gpu_bf16() || w.format != WeightFormat::F32) return w;
  auto [it, added] = bf16_weights_.try_emplace(w.data);
  if (added) {
    it->second = allocate_quantized_matrix(WeightFormat::BF16, w.rows, w.cols, ScaleType::NONE);
    const std::vector<float> values = dequantize(w);
    auto* bits = reinterpret_cast<uint16_t*>(it->second.storage->data.data());
    for (size_t i = 0; i < values.size(); ++i) bits[i] = float_to_bf16(values[i]);
  }
  return it->second.matrix;
}

const float* CpuBackend::linear_input(const float* x, int64_t n, std::vector<float>& scratch) const {
  if (!gpu_bf16()) return x;
  scratch.assign(x, x + n);
  round_to_bf16_inplace(scratch.data(), n);
  return scratch.data();
}

void CpuBackend::embed(const QuantizedMatrix& table, const int32_t* ids, int64_t T, float* out) {
  for (int64_t t = 0; t < T; ++t) dequantize_rows(table, ids[t], ids[t] + 1, out + t * table.cols);
}

void CpuBackend::hc_pre(const HyperConnectionWeights& w, const float* X, int64_t T, float* y, float* post,
                        float* comb) {
  std::vector<float> scratch;
  cpu::hc_pre({mhc_fn(w.fn, scratch), w.base.data(), w.scale.data()}, X, mhc_params(config_, T), y, post, comb);
  if (numerics_ == NumericsMode::Reference) round_to_bf16_inplace(y, T * config_.hidden_size);
}

void CpuBackend::hc_post(const float* out, const float* X, const float* post, const float* comb, int64_t T,
                         float* X_out) {
  cpu::hc_post(out, X, post, comb, mhc_params(config_, T), X_out);
}

void CpuBackend::hc_head(const HyperConnectionWeights& w, const float* X, int64_t T, float* h) {
  std::vector<float> scratch;
  cpu::hc_head({mhc_fn(w.fn, scratch), w.base.data(), w.scale.data()}, X, mhc_params(config_, T), h);
  if (numerics_ == NumericsMode::Reference) round_to_bf16_inplace(h, T * config_.hidden_size);
}

void CpuBackend::rms_norm(const float* x, const std::vector<float>& weight, int64_t rows, float* y) {
  cpu::rms_norm(x, weight.data(), y, {rows, int64_t(weight.size()), float(config_.rms_norm_eps)});
}

void CpuBackend::linear(const QuantizedMatrix& w, const float* x, int64_t T, float* y) {
  std::vector<float> x_rounded;
  cpu::linear(linear_weight(w), linear_input(x, T * w.cols, x_rounded), T, y);
}

void CpuBackend::round_residual(float* x, int64_t n) {
  if (numerics_ == NumericsMode::Reference) round_to_bf16_inplace(x, n);
}

void CpuBackend::attention(int layer, const dsv4::AttentionWeights& w, SequenceCache& sequence, const float* x, int64_t T,
                           float* out) {
  auto& seq = dynamic_cast<CpuSequenceCache&>(sequence);
  LayerCache& cache = seq.layers[size_t(layer)];
  const ModelConfig& c = config_;
  const RopeTable& rope = rope_[size_t(layer)];
  const bool reference = numerics_ == NumericsMode::Reference, gpu = gpu_bf16();
  const int64_t d = c.hidden_size, H = c.num_heads, D = c.head_dim, W = c.window_size;
  // GpuBf16: rounds to bf16 where the CUDA kernels do (their linear inputs and stored vectors); else a no-op.
  auto round_like_gpu = [gpu](float* v, int64_t n) {
    if (gpu) round_to_bf16_inplace(v, n);
  };
  auto compressor_weights = [&](const dsv4::CompressorWeights& cw) {
    return cpu::CompressorWeights{&linear_weight(cw.wkv), &linear_weight(cw.wgate), cw.ape.data(), cw.norm.data()};
  };
  std::vector<float> x_rounded;
  x = linear_input(x, T * d, x_rounded);
  const int64_t p0 = seq.length_;
  std::vector<int64_t> positions(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) positions[size_t(t)] = p0 + t;

  // Queries: q = per-head-normalised (wq_b · q_norm(wq_a · x)), rotated. qr also feeds the indexer.
  std::vector<float> qr(size_t(T * c.q_lora_rank)), q(size_t(T * H * D));
  cpu::linear(linear_weight(w.wq_a), x, T, qr.data());
  cpu::rms_norm(qr.data(), w.q_norm.data(), qr.data(), {T, c.q_lora_rank, float(c.rms_norm_eps)});
  round_like_gpu(qr.data(), T * c.q_lora_rank);
  cpu::linear(linear_weight(w.wq_b), qr.data(), T, q.data());
  cpu::rms_norm(q.data(), nullptr, q.data(), {T * H, D, float(c.rms_norm_eps)});
  apply_rope(rope, q.data(), positions.data(), {T, H, D, false});
  round_like_gpu(q.data(), T * H * D);  // the attention kernel's MMA operand

  // The single K = V head of the new tokens, rounded as the reference stores it.
  std::vector<float> kv(size_t(T * D));
  cpu::linear(linear_weight(w.wkv), x, T, kv.data());
  cpu::rms_norm(kv.data(), w.kv_norm.data(), kv.data(), {T, D, float(c.rms_norm_eps)});
  apply_rope(rope, kv.data(), positions.data(), {T, 1, D, false});
  if (reference) round_kv_reference(kv.data(), T, D, c.rope_head_dim);
  round_like_gpu(kv.data(), T * D);  // the GPU's bf16 KV cache

  // Window rows: the ring's tokens still in reach of the first query, then the new tokens.
  const int64_t first_window = std::max<int64_t>(0, p0 - (W - 1));
  const int64_t carried = p0 - first_window;
  std::vector<float> window((size_t)((carried + T) * D));
  for (int64_t p = first_window; p < p0; ++p)
    std::copy_n(&cache.ring[size_t((p % W) * D)], D, &window[size_t((p - first_window) * D)]);
  std::copy_n(kv.data(), T * D, &window[size_t(carried * D)]);
  std::vector<int32_t> window_index(size_t(T * W), -1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = p0 + t, lo = std::max<int64_t>(0, p - (W - 1));
    for (int64_t s = 0; s <= p - lo; ++s) window_index[size_t(t * W + s)] = int32_t(lo + s - first_window);
  }

  // Compressed entries: emitted for the whole call first; each query then sees only those complete at its position.
  const int64_t ratio = c.compress_ratio(layer);
  int64_t compressed_slots = 0;
  std::vector<int32_t> compressed_index;
  if (w.compressor) {
    const int64_t before = int64_t(cache.compressed.size()) / D;
    const bool csa = w.indexer.has_value();
    CompressorParams params{d, D, ratio, csa, float(c.rms_norm_eps), reference};
    compressor_step(params, compressor_weights(*w.compressor), rope, *cache.compressor, x, T, cache.compressed);
    const int64_t entries = int64_t(cache.compressed.size()) / D;
    if (reference && entries > before) round_kv_reference(&cache.compressed[size_t(before * D)], entries - before, D,
                                                          c.rope_head_dim);
    round_like_gpu(&cache.compressed[size_t(before * D)], (entries - before) * D);

    if (w.indexer) {
      // CSA: the lightning indexer picks top-k of the visible entries.
      const IndexerWeights& ix = *w.indexer;
      const int64_t IH = c.indexer.num_heads, ID = c.indexer.head_dim;
      const int64_t keys_before = int64_t(cache.index_keys.size()) / ID;
      CompressorParams key_params{d, ID, ratio, true, float(c.rms_norm_eps), reference};
      compressor_step(key_params, compressor_weights(ix.compressor), rope, *cache.index_compressor, x, T,
                      cache.index_keys);
      const int64_t keys = int64_t(cache.index_keys.size()) / ID;
      if (reference && keys > keys_before) round_indexer_reference(&cache.index_keys[size_t(keys_before * ID)],
                                                                   keys - keys_before, ID);
      round_like_gpu(&cache.index_keys[size_t(keys_before * ID)], (keys - keys_before) * ID);
      std::vector<float> qi(size_t(T * IH * ID)), head_weights(size_t(T * IH));
      cpu::linear(linear_weight(ix.wq_b), qr.data(), T, qi.data());
      apply_rope(rope, qi.data(), positions.data(), {T, IH, ID, false});
      if (reference) round_indexer_reference(qi.data(), T * IH, ID);
      round_like_gpu(qi.data(), T * IH * ID);
      cpu::linear(linear_weight(ix.weights_proj), x, T, head_weights.data());
      compressed_slots = c.indexer.topk;
      compressed_index.assign(size_t(T * compressed_slots), -1);
      std::vector<int32_t> counts(static_cast<size_t>(T));
      indexer_select({qi.data(), head_weights.data(), cache.index_keys.data(), keys, positions.data()},
                     {T, IH, ID, ratio, compressed_slots}, compressed_index.data(), counts.data());
    } else {
      // HCA: every visible entry.
      compressed_slots = entries;
      compressed_index.assign(size_t(T * compressed_slots), -1);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t visible = std::min(entries, (p0 + t + 1) / ratio);
        for (int64_t e = 0; e < visible; ++e) compressed_index[size_t(t * compressed_slots + e)] = int32_t(e);
      }
    }
  }

  // No compressed entry exists yet (the sequence is shorter than one window): attend to the window alone.
  if (cache.compressed.empty()) compressed_slots = 0;

  std::vector<float> o(size_t(T * H * D));
  SparseAttentionInputs inputs;
  inputs.q = q.data();
  inputs.attn_sink = w.sink.data();
  inputs.window_kv = window.data();
  inputs.window_rows = carried + T;
  inputs.window_index = window_index.data();
  inputs.compressed_kv = cache.compressed.data();
  inputs.compressed_rows = int64_t(cache.compressed.size()) / D;
  inputs.compressed_index = compressed_slots ? compressed_index.data() : nullptr;
  inputs.positions = positions.data();
  inputs.rope = &rope;
  sparse_attention(inputs, {T, H, D, 1.0f / std::sqrt(float(D)), W, compressed_slots, gpu ? kGpuAttentionTile : 0},
                   o.data());
  round_like_gpu(o.data(), T * H * D);

  // Grouped output projection: heads of a group are contiguous, so o [T, H·D] is already [T, G, (H/G)·D].
  std::vector<float> z(size_t(T * c.o_proj_dim()));
  grouped_linear(linear_weight(w.wo_a), c.o_groups, o.data(), T, z.data());
  round_like_gpu(z.data(), T * c.o_proj_dim());
  cpu::linear(linear_weight(w.wo_b), z.data(), T, out);

  for (int64_t t = std::max<int64_t>(0, T - W); t < T; ++t)
    std::copy_n(&kv[size_t(t * D)], D, &cache.ring[size_t(((p0 + t) % W) * D)]);
  if (++seq.layers_done == config_.num_layers) {
    seq.layers_done = 0;
    seq.length_ += T;
  }
}

void CpuBackend::moe(const dsv4::MoeWeights& w, const float* u, const int32_t* token_ids, int64_t T, float* out) {
  const ModelConfig& c = config_;
  std::vector<cpu::ExpertWeights> experts;
  experts.reserve(w.experts.size());
  for (const dsv4::ExpertWeights& e : w.experts)
    experts.push_back({&linear_weight(e.w1), &linear_weight(e.w2), &linear_weight(e.w3)});
  cpu::MoeWeights weights;
  weights.gate = &w.gate;
  weights.gate_bias = w.gate_bias.empty() ? nullptr : w.gate_bias.data();
  weights.tid2eid = w.tid2eid.empty() ? nullptr : w.tid2eid.data();
  weights.vocab = c.vocab_size;
  weights.experts = experts.data();
  weights.shared = {&linear_weight(w.shared.w1), &linear_weight(w.shared.w2), &linear_weight(w.shared.w3)};
  MoeParams params{T, c.hidden_size, c.moe.intermediate_size, c.moe.num_routed_experts, c.moe.experts_per_token,
                   float(c.moe.routed_scaling_factor), float(c.moe.swiglu_limit), gpu_bf16()};
  moe_forward(weights, params, u, token_ids, out);
}

}  // namespace dsv4::cpu
