#include "backends/cuda/cuda_model.hpp"

#include <algorithm>
#include <cmath>
#include <optional>

#include "backends/cpu/rope.hpp"
#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/kernels/attention_index.hpp"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kernels/embedding.hpp"
#include "backends/cuda/kernels/indexer.hpp"
#include "backends/cuda/kernels/kv_insert.hpp"
#include "backends/cuda/kernels/mhc.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/rope_apply.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kernels/to_bf16.hpp"
#include "backends/cuda/kernels/top_k.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/linear_dispatch.hpp"
#include "backends/cuda/moe.hpp"
#include "backends/cuda/moe_weights.hpp"
#include "core/bf16.hpp"
#include "core/dequantize.hpp"
#include "core/error.hpp"
#include "core/log.hpp"

namespace dsv4::cuda {

namespace {

using bf16 = __nv_bfloat16;

constexpr int64_t kFreeSlot = -1;
constexpr int64_t kFailedSlot = -2;  // a step failed on the device: refuses steps until released

// A BF16 copy of an F32 matrix: the GPU linear kernels read BF16, FP8 and FP4 weights only.
OwnedQuantizedMatrix to_bf16_matrix(const QuantizedMatrix& m) {
  OwnedQuantizedMatrix out = allocate_quantized_matrix(WeightFormat::BF16, m.rows, m.cols, ScaleType::NONE);
  const std::vector<float> values = dequantize(m);
  auto* bits = reinterpret_cast<uint16_t*>(out.storage->data.data());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = float_to_bf16(values[i]);
  return out;
}

// The host weights with every F32 matrix that feeds a linear kernel replaced by its BF16 rounding (the owners are
// kept in `owned`), after checking every such matrix's scales. The mHC projections, the embedding and the router keep F32: their kernels read it.
ModelWeights gpu_linear_formats(const ModelWeights& host, std::vector<OwnedQuantizedMatrix>& owned) {
  ModelWeights w = host;
  auto to_bf16 = [&](QuantizedMatrix& m) {
    if (m.format != WeightFormat::F32 || m.rows == 0) return;
    owned.push_back(to_bf16_matrix(m));
    m = owned.back().matrix;
  };
  // Dense matrices also get their scales checked against the range the tensor-core dequantisation is exact for
  // (MXFP4 codes <= 128); the experts' are checked on the device when their MoE layer is built.
  auto convert = [&](QuantizedMatrix& m) {
    if (m.rows > 0) check_quantized_linear_scales(m, "a linear-layer matrix");
    to_bf16(m);
  };
  auto convert_compressor = [&](CompressorWeights& c) {
    convert(c.wkv);
    convert(c.wgate);
  };
  auto convert_block = [&](BlockWeights& b) {
    AttentionWeights& a = b.attn;
    for (QuantizedMatrix* m : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) convert(*m);
    if (a.compressor) convert_compressor(*a.compressor);
    if (a.indexer) {
      convert(a.indexer->wq_b);
      convert(a.indexer->weights_proj);
      convert_compressor(a.indexer->compressor);
    }
    for (ExpertWeights& e : b.ffn.experts)
      for (QuantizedMatrix* m : {&e.w1, &e.w2, &e.w3}) to_bf16(*m);
    for (QuantizedMatrix* m : {&b.ffn.shared.w1, &b.ffn.shared.w2, &b.ffn.shared.w3}) to_bf16(*m);
  };
  convert(w.head);
  for (BlockWeights& b : w.layers) convert_block(b);
  for (MtpWeights& m : w.mtp) {
    convert_block(m.block);
    convert(m.e_proj);
    convert(m.h_proj);
  }
  if (!owned.empty())
    log_warning(owned.size(), " matrices stored as F32 are held as BF16 on the GPU (its linear kernels read BF16, "
                "FP8 and FP4): logits differ from the CPU backend's by that rounding");
  return w;
}

std::optional<cpu::YarnScaling> yarn_of(const ModelConfig& c) {
  if (!c.yarn) return std::nullopt;
  return cpu::YarnScaling{c.yarn->factor, c.yarn->original_max_position, c.yarn->beta_fast, c.yarn->beta_slow};
}

const float* floats(const DeviceArray<float>& a) { return a.empty() ? nullptr : a.data(); }
const float* floats(const DeviceMatrix& m) { return reinterpret_cast<const float*>(m.view().data); }

template <class T>
T* advance(void*& cursor, int64_t count) {
  T* p = static_cast<T*>(cursor);
  cursor = static_cast<uint8_t*>(cursor) + (size_t(count) * sizeof(T) + 255) / 256 * 256;
  return p;
}

// Device bytes of every sequence slot's state (about: allocation rounding aside): the KV page pool and its table,
// the compressor states (main and indexer) and the indexer keys, as the constructor sizes them.
size_t sequence_state_bytes(const ModelConfig& c, const KvCacheConfig& kv, int64_t max_context) {
  const KvEntryLayout layout = KvEntryLayout::make(kv.format, kv.head_dim, kv.rope_dim);
  size_t bytes = size_t(kv.pages) * size_t(kv.page_rows) * size_t(layout.entry_bytes);
  const int64_t table_rows = std::max(kv.window_capacity, kv.max_compressed_rows) / kv.page_rows + 1;
  bytes += size_t(kv.max_sequences) * size_t(kv.layers) * 2 * size_t(table_rows) * sizeof(int32_t);
  auto compressor_state = [](int64_t ratio, int64_t head_dim, bool overlapping) {
    const int64_t width = (overlapping ? 2 : 1) * head_dim;
    return size_t(ratio * width * 2 + (overlapping ? ratio * head_dim * 2 : 0)) * sizeof(float) + 256;
  };
  for (int i = 0; i < c.num_layers; ++i) {
    if (!c.has_compressor(i)) continue;
    const int64_t ratio = c.compress_ratio(i);
    size_t per_sequence = compressor_state(ratio, c.head_dim, c.has_indexer(i));
    if (c.has_indexer(i))
      per_sequence += compressor_state(ratio, c.indexer.head_dim, true) +
                      size_t(max_context / ratio) * size_t(c.indexer.head_dim) * 2;  // bf16 keys
    bytes += per_sequence * size_t(kv.max_sequences);
  }
  return bytes;
}

}  // namespace

struct CudaModel::Impl {
  // Per layer: the compressor states of every sequence slot (main and indexer) and the indexer keys.
  struct LayerState {
    std::vector<std::unique_ptr<DeviceCompressorState>> compressor;  // [slot]
    std::vector<std::unique_ptr<DeviceCompressorState>> indexer;     // [slot], CSA layers
    DeviceBuffer index_keys;                                          // bf16 [slots, max_keys, index_head_dim]
  };

  // Step scratch, sized for max_step_tokens tokens.
  struct Scratch {
    int32_t* ids;
    int64_t* positions;
    int32_t* slots;
    int32_t* ring_rows;
    int32_t* compressed_rows;  // [layers, max_entries]: destination rows of each layer's new compressed entries
    float* X;                  // [T, n, d]
    float* y;                  // [T, d]
    float* post;               // [T, n]
    float* comb;               // [T, n, n]
    bf16* x_bf16;              // [T, d]: the normed sub-block input for the linear layers
    float* u;                  // [T, d]: ffn_norm output for the MoE
    float* qr;                 // [T, q_lora]
    bf16* qr_bf16;             // [T, q_lora]
    float* q;                  // [T, H·D]
    float* kv;                 // [T, D]
    bf16* o;                   // [T, H·D] attention output
    float* z;                  // [T, G·o_lora]
    bf16* z_bf16;
    float* out;                // [T, d]
    float* ckv;                // [T, 2·max(D, ID)] compressor projections
    float* cgate;
    float* entries;            // [max_entries, D]
    float* qi;                 // [T, IH·ID]
    bf16* qi_bf16;
    float* head_weights;       // [T, IH]
    float* scores;             // [T, max_keys]
    int32_t* selected;         // [T, topk]
    int32_t* counts;           // [T]
    int32_t* window_index;     // [T, W]
    int32_t* compressed_index; // [T, max_compressed_slots]
    float* h;                  // [T, d]
    bf16* h_bf16;
    float* logits;             // [T, vocab]
    int32_t* nan_flag;
  };

  // Exactly one of `host` (uploaded here) and `device` (weights already on the device, moved in) is given.
  Impl(const ModelConfig& c, const ModelWeights* host, DeviceModelWeights* device, const CudaModelOptions& o)
      : config(c), options(o), context(DeviceContext::open(o.device)), pool(context.index()) {
    check(o.max_sequences >= 1 && o.max_context >= 1 && o.max_step_tokens >= 1, "CUDA model: max_sequences ",
          o.max_sequences, ", max_context ", o.max_context, ", max_step_tokens ", o.max_step_tokens,
          " must be positive");
    check(o.max_step_tokens <= 4096, "CUDA model: max_step_tokens ", o.max_step_tokens, " exceeds 4096");
    stream = context.compute_stream();
    const int L = c.num_layers;

    for (int i = 0; i < L; ++i)
      rope.emplace_back(c.has_compressor(i) ? c.compress_rope_theta : c.rope_theta, c.rope_head_dim,
                        c.has_compressor(i) ? yarn_of(c) : std::nullopt);

    // KV cache: the window ring holds a window plus a step's tokens (a prefill chunk's first query still finds its
    // window); compressed arrays hold max_context / ratio entries.
    KvCacheConfig kv;
    kv.format = o.numerics == NumericsMode::Reference ? KvEntryFormat::Fp8Reference : KvEntryFormat::Bf16;
    kv.head_dim = c.head_dim;
    kv.rope_dim = c.rope_head_dim;
    kv.layers = L;
    kv.max_sequences = o.max_sequences;
    kv.window_capacity = c.window_size + o.max_step_tokens - 1;
    kv.page_rows = 64;
    int64_t pages_per_sequence = 0;
    for (int i = 0; i < L; ++i) {
      pages_per_sequence += (kv.window_capacity + kv.page_rows - 1) / kv.page_rows;
      if (c.has_compressor(i)) {
        const int64_t rows = o.max_context / c.compress_ratio(i);
        kv.max_compressed_rows = std::max(kv.max_compressed_rows, rows);
        pages_per_sequence += (rows + kv.page_rows - 1) / kv.page_rows;
      }
    }
    kv.pages = pages_per_sequence * o.max_sequences;

    // Sizes the step buffers need.
    const int64_t T = o.max_step_tokens, d = c.hidden_size, n = c.mhc.hc_mult, H = c.num_heads, D = c.head_dim;
    const int64_t IH = c.indexer.num_heads, ID = c.indexer.head_dim;
    max_entries = 0;
    max_keys = 0;
    max_compressed_slots = 0;
    for (int i = 0; i < L; ++i) {
      if (!c.has_compressor(i)) continue;
      const int64_t ratio = c.compress_ratio(i);
      max_entries = std::max(max_entries, T / ratio + 1);
      if (c.has_indexer(i)) {
        max_keys = std::max(max_keys, o.max_context / ratio);
        max_compressed_slots = std::max<int64_t>(max_compressed_slots, c.indexer.topk);
      } else {
        max_compressed_slots = std::max(max_compressed_slots, o.max_context / ratio);
      }
    }

    // Weights: F32 linear matrices as BF16, then one upload; each MoE layer's experts are also published as a
    // device table of views (DeviceMoeWeights borrows the upload), which its grouped kernels index by expert id.
    // The sequences' state is allocated after the weights: the upload keeps room for it, so a context or sequence
    // count that does not fit is refused before the (long) upload starts, not after it.
    const size_t state_bytes = sequence_state_bytes(c, kv, o.max_context);
    const DeviceMemoryInfo memory = context.memory();
    if (host != nullptr) {
      std::vector<OwnedQuantizedMatrix> converted;
      const ModelWeights w = gpu_linear_formats(*host, converted);
      WeightUploadOptions upload;
      upload.progress = o.progress;
      upload.keep_free_bytes = state_bytes;
      const size_t weight_bytes = plan_weight_upload(w).device_bytes;
      check(weight_bytes + state_bytes <= memory.free_bytes, "the model needs ", format_bytes(weight_bytes),
            " of weights plus ", format_bytes(state_bytes), " for the KV cache and state of ", o.max_sequences,
            " sequence(s) of up to ", o.max_context, " tokens, but ", context.describe(), " has ",
            format_bytes(memory.free_bytes), " free: lower --ctx, or use a larger GPU");
      weights = upload_model_weights(w, pool, context.copy_stream(), upload);
    } else {
      check(state_bytes <= memory.free_bytes, "the model's weights are on the device; the KV cache and state of ",
            o.max_sequences, " sequence(s) of up to ", o.max_context, " tokens need ", format_bytes(state_bytes),
            ", but ", context.describe(), " has ", format_bytes(memory.free_bytes),
            " free: lower --ctx or the sequence count");
      weights = std::move(*device);
      check(weights.layers.size() == size_t(L), "CUDA model: the device weights have ", weights.layers.size(),
            " layers, the config ", L);
    }
    moe_config = {d, c.moe.intermediate_size, c.moe.num_routed_experts, c.moe.experts_per_token,
                  float(c.moe.routed_scaling_factor), float(c.moe.swiglu_limit)};
    for (int i = 0; i < L; ++i)
      moe.push_back(std::make_unique<DeviceMoeWeights>(weights.layers[size_t(i)].ffn, moe_config,
                                                       "layer " + std::to_string(i) + " ffn"));

    kv_cache = std::make_unique<KvCache>(kv);
    layers.resize(size_t(L));
    for (int i = 0; i < L; ++i) {
      if (!c.has_compressor(i)) continue;
      LayerState& s = layers[size_t(i)];
      const int64_t ratio = c.compress_ratio(i);
      for (int slot = 0; slot < o.max_sequences; ++slot) {
        s.compressor.push_back(std::make_unique<DeviceCompressorState>(ratio, D, c.has_indexer(i)));
        if (c.has_indexer(i)) s.indexer.push_back(std::make_unique<DeviceCompressorState>(ratio, ID, true));
      }
      if (c.has_indexer(i))
        s.index_keys = DeviceBuffer(size_t(o.max_sequences) * size_t(o.max_context / ratio) * size_t(ID) * 2,
                                    "layer " + std::to_string(i) + " indexer keys");
    }
    frequencies.reserve(size_t(L));
    for (int i = 0; i < L; ++i) {
      const std::vector<float>& f = rope[size_t(i)].frequencies();
      frequencies.emplace_back(f.size() * sizeof(float), "rope frequencies");
      frequencies.back().upload(f.data(), f.size() * sizeof(float));
    }

    // Step scratch: one allocation carved into the buffers.
    const int64_t cw = 2 * std::max<int64_t>(D, ID);
    attention_splits_max = 1;
    for (int64_t t = 1; t <= T; t = t < 64 ? t + 1 : t * 2)
      attention_splits_max = std::max(
          attention_splits_max, choose_sparse_attention_splits(t, int(H), int(D), kv.format,
                                                               c.window_size + max_compressed_slots,
                                                               context.info().multiprocessors));
    attention_workspace_bytes = 0;
    for (int64_t t = 1; t <= T; t = t < 64 ? t + 1 : t * 2)
      attention_workspace_bytes = std::max(attention_workspace_bytes,
                                           sparse_attention_workspace_bytes(t, int(H), int(D), attention_splits_max));
    linear_workspace = 0;
    auto note_linear = [&](const DeviceMatrix& m, int groups = 1) {
      linear_workspace = std::max(linear_workspace, linear_workspace_bytes(m.view(), groups));
    };
    note_linear(weights.head);
    for (const device_weights::Block& b : weights.layers) {
      for (const DeviceMatrix* m : {&b.attn.wq_a, &b.attn.wq_b, &b.attn.wkv, &b.attn.wo_b}) note_linear(*m);
      note_linear(b.attn.wo_a, c.o_groups);
      if (b.attn.compressor) note_linear(b.attn.compressor->wkv), note_linear(b.attn.compressor->wgate);
      if (b.attn.indexer) {
        note_linear(b.attn.indexer->wq_b), note_linear(b.attn.indexer->weights_proj);
        note_linear(b.attn.indexer->compressor.wkv), note_linear(b.attn.indexer->compressor.wgate);
      }
    }
    hc_workspace_bytes = hc_projection_workspace_bytes(T, d, context.info().multiprocessors);
    moe_workspace_size = moe_workspace_bytes(moe_config, T);
    top_k_workspace_size = top_k_workspace_bytes(int(T));

    size_t bytes = 0;
    auto add = [&](size_t elems, size_t elem_bytes) { bytes += (elems * elem_bytes + 255) / 256 * 256; };
    add(T, 4), add(T, 8), add(T, 4), add(T, 4), add(size_t(L) * size_t(max_entries), 4);
    add(T * n * d, 4), add(T * d, 4), add(T * n, 4), add(T * n * n, 4), add(T * d, 2), add(T * d, 4);
    add(T * c.q_lora_rank, 4), add(T * c.q_lora_rank, 2), add(T * H * D, 4), add(T * D, 4), add(T * H * D, 2);
    add(T * c.o_proj_dim(), 4), add(T * c.o_proj_dim(), 2), add(T * d, 4);
    add(T * cw, 4), add(T * cw, 4), add(size_t(max_entries) * D, 4);
    add(T * IH * ID, 4), add(T * IH * ID, 2), add(T * IH, 4), add(T * std::max<int64_t>(max_keys, 1), 4);
    add(T * std::max(c.indexer.topk, 1), 4), add(T, 4), add(T * c.window_size, 4);
    add(T * std::max<int64_t>(max_compressed_slots, 1), 4), add(T * d, 4), add(T * d, 2), add(T * c.vocab_size, 4);
    add(1, 4);
    for (size_t ws : {attention_workspace_bytes, linear_workspace, hc_workspace_bytes, moe_workspace_size,
                      top_k_workspace_size})
      add(ws, 1);
    scratch_buffer = DeviceBuffer(bytes, "CUDA model step scratch");
    void* cursor = scratch_buffer.data();
    Scratch& s = scratch;
    s.ids = advance<int32_t>(cursor, T), s.positions = advance<int64_t>(cursor, T);
    s.slots = advance<int32_t>(cursor, T), s.ring_rows = advance<int32_t>(cursor, T);
    s.compressed_rows = advance<int32_t>(cursor, L * max_entries);
    s.X = advance<float>(cursor, T * n * d), s.y = advance<float>(cursor, T * d);
    s.post = advance<float>(cursor, T * n), s.comb = advance<float>(cursor, T * n * n);
    s.x_bf16 = advance<bf16>(cursor, T * d), s.u = advance<float>(cursor, T * d);
    s.qr = advance<float>(cursor, T * c.q_lora_rank), s.qr_bf16 = advance<bf16>(cursor, T * c.q_lora_rank);
    s.q = advance<float>(cursor, T * H * D), s.kv = advance<float>(cursor, T * D), s.o = advance<bf16>(cursor, T * H * D);
    s.z = advance<float>(cursor, T * c.o_proj_dim()), s.z_bf16 = advance<bf16>(cursor, T * c.o_proj_dim());
    s.out = advance<float>(cursor, T * d);
    s.ckv = advance<float>(cursor, T * cw), s.cgate = advance<float>(cursor, T * cw);
    s.entries = advance<float>(cursor, max_entries * D);
    s.qi = advance<float>(cursor, T * IH * ID), s.qi_bf16 = advance<bf16>(cursor, T * IH * ID);
    s.head_weights = advance<float>(cursor, T * IH);
    s.scores = advance<float>(cursor, T * std::max<int64_t>(max_keys, 1));
    s.selected = advance<int32_t>(cursor, T * std::max(c.indexer.topk, 1)), s.counts = advance<int32_t>(cursor, T);
    s.window_index = advance<int32_t>(cursor, T * c.window_size);
    s.compressed_index = advance<int32_t>(cursor, T * std::max<int64_t>(max_compressed_slots, 1));
    s.h = advance<float>(cursor, T * d), s.h_bf16 = advance<bf16>(cursor, T * d);
    s.logits = advance<float>(cursor, T * c.vocab_size), s.nan_flag = advance<int32_t>(cursor, 1);
    attention_workspace = advance<uint8_t>(cursor, int64_t(attention_workspace_bytes));
    linear_ws = advance<uint8_t>(cursor, int64_t(linear_workspace));
    hc_workspace = advance<uint8_t>(cursor, int64_t(hc_workspace_bytes));
    moe_workspace = advance<uint8_t>(cursor, int64_t(moe_workspace_size));
    top_k_workspace = advance<uint8_t>(cursor, int64_t(top_k_workspace_size));
    // Counters and tickets the kernels expect zero once (they leave them zero).
    DSV4_CUDA_CHECK(cudaMemsetAsync(scratch_buffer.data(), 0, bytes, stream));
    prepare_moe_workspace(moe_workspace, moe_workspace_size, stream);

    decode_logits = DeviceBuffer(size_t(o.max_sequences) * size_t(c.vocab_size) * sizeof(float), "decode logits");
    DSV4_CUDA_CHECK(cudaHostAlloc(&staging, staging_bytes(), cudaHostAllocDefault));
    slot_length.assign(size_t(o.max_sequences), kFreeSlot);
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  ~Impl() {
    if (staging) cudaFreeHost(staging);
  }

  size_t staging_bytes() const {
    return size_t(options.max_step_tokens) * (4 + 8 + 4 + 4) + 8 + size_t(config.num_layers * max_entries) * 4;
  }

  void reset_slot_state(int slot) {
    for (LayerState& s : layers) {
      if (!s.compressor.empty()) s.compressor[size_t(slot)]->reset(stream);
      if (!s.indexer.empty()) s.indexer[size_t(slot)]->reset(stream);
    }
  }

  void linear(const DeviceMatrix& w, std::string_view what, const bf16* x, int64_t x_stride, int64_t T, float* y,
              int64_t y_stride, int groups = 1) {
    LinearCall call;
    call.weight = w.view();
    call.what = what;
    call.x = x;
    call.x_row_stride = x_stride;
    call.y = y;
    call.y_row_stride = y_stride;
    call.tokens = T;
    call.groups = groups;
    call.workspace = linear_ws;
    call.workspace_bytes = linear_workspace;
    call.stream = stream;
    run_linear(call);
  }

  void rms_norm(const float* x, const float* weight, int64_t rows, int64_t width, float* y, bf16* y_bf16) {
    RmsNormParams p;
    p.x = x, p.weight = weight, p.rows = rows, p.width = width, p.eps = float(config.rms_norm_eps);
    p.y = y, p.y_bf16 = y_bf16, p.stream = stream;
    run_rms_norm(p);
  }

  void hc_pre(const device_weights::HyperConnection& w, int64_t T, float* y) {
    HcPreParams p;
    p.X = scratch.X, p.fn = floats(w.fn), p.base = floats(w.base), p.scale = floats(w.scale);
    p.tokens = T, p.hidden = config.hidden_size, p.streams = config.mhc.hc_mult;
    p.sinkhorn_iters = config.mhc.sinkhorn_iters, p.hc_eps = float(config.mhc.eps);
    p.norm_eps = float(config.rms_norm_eps), p.round_to_bf16 = reference();
    p.y = y, p.post = scratch.post, p.comb = scratch.comb;
    p.workspace = hc_workspace, p.workspace_bytes = hc_workspace_bytes, p.stream = stream;
    run_hc_pre(p);
  }

  void hc_post(int64_t T) {
    HcPostParams p;
    p.out = scratch.out, p.X = scratch.X, p.post = scratch.post, p.comb = scratch.comb;
    p.tokens = T, p.hidden = config.hidden_size, p.streams = config.mhc.hc_mult, p.round_to_bf16 = reference();
    p.X_out = scratch.X, p.stream = stream;
    run_hc_post(p);
  }

  bool reference() const { return options.numerics == NumericsMode::Reference; }

  // One compressor (main or indexer) over the step's tokens: projections, then the pooling kernel.
  void compress(const device_weights::Compressor& w, const DeviceCompressorState& state, int layer, int64_t head_dim,
                int64_t T, int64_t p0, CompressorStoredRounding rounding, float* entries, bf16* entries_bf16,
                const char* what) {
    const int64_t width = (config.has_indexer(layer) ? 2 : 1) * head_dim;
    const std::string name = "layer " + std::to_string(layer) + " " + what;
    linear(w.wkv, name + " wkv", scratch.x_bf16, config.hidden_size, T, scratch.ckv, width);
    linear(w.wgate, name + " wgate", scratch.x_bf16, config.hidden_size, T, scratch.cgate, width);
    CompressorParams p;
    p.head_dim = head_dim, p.ratio = config.compress_ratio(layer), p.overlapping = config.has_indexer(layer);
    p.norm_eps = float(config.rms_norm_eps), p.round_pooled_to_bf16 = reference(), p.stored_rounding = rounding;
    p.kv = scratch.ckv, p.gate = scratch.cgate, p.tokens = T, p.start_position = p0;
    p.ape = floats(w.ape), p.norm_weight = floats(w.norm);
    p.rope_frequencies = frequencies[size_t(layer)].as<float>(), p.rope_dim = config.rope_head_dim;
    p.state = state.view(), p.entries = entries, p.entries_bf16 = entries_bf16, p.stream = stream;
    run_compressor(p);
  }

  void attention(int layer, int slot, int64_t T, int64_t p0) {
    const ModelConfig& c = config;
    const device_weights::Attention& w = weights.layers[size_t(layer)].attn;
    const int64_t d = c.hidden_size, H = c.num_heads, D = c.head_dim, ql = c.q_lora_rank;
    const std::string name = "layer " + std::to_string(layer);
    const float* freqs = frequencies[size_t(layer)].as<float>();
    Scratch& s = scratch;

    // Queries: per-head-normalised wq_b · q_norm(wq_a · x), rotated.
    linear(w.wq_a, name + " wq_a", s.x_bf16, d, T, s.qr, ql);
    rms_norm(s.qr, floats(w.q_norm), T, ql, nullptr, s.qr_bf16);
    linear(w.wq_b, name + " wq_b", s.qr_bf16, ql, T, s.q, H * D);
    rms_norm(s.q, nullptr, T * H, D, s.q, nullptr);
    RopeApplyParams rope_q;
    rope_q.x = s.q, rope_q.tokens = T, rope_q.heads = H, rope_q.head_dim = D, rope_q.rope_dim = c.rope_head_dim;
    rope_q.frequencies = freqs, rope_q.positions = s.positions, rope_q.stream = stream;
    run_rope_apply(rope_q);

    // The new tokens' K = V vectors into the window ring (norm, RoPE, stored rounding in one kernel).
    linear(w.wkv, name + " wkv", s.x_bf16, d, T, s.kv, D);
    KvInsertParams insert;
    insert.cache = kv_cache->view(), insert.array = KvArray::Window, insert.layer = layer, insert.rows = T;
    insert.x = s.kv, insert.norm_weight = floats(w.kv_norm), insert.eps = float(c.rms_norm_eps);
    insert.rope_frequencies = freqs, insert.sequence_slots = s.slots, insert.positions = s.positions;
    insert.dest_rows = s.ring_rows, insert.stream = stream;
    run_kv_insert(insert);

    WindowIndexParams window;
    window.positions = s.positions, window.tokens = T, window.window = c.window_size;
    window.ring_rows = kv_cache->config().window_capacity, window.index = s.window_index, window.stream = stream;
    run_window_index(window);

    // Compressed entries of the step (emitted first; each query sees only those complete at its position).
    int compressed_slots = 0;
    const int32_t* compressed_index = nullptr;
    if (w.compressor) {
      const int64_t ratio = c.compress_ratio(layer);
      const int64_t first = compressor_first_entry(p0, ratio), emitted = compressor_entries_emitted(p0, T, ratio);
      const int64_t entries = first + emitted;
      compress(*w.compressor, *layers[size_t(layer)].compressor[size_t(slot)], layer, D, T, p0,
               CompressorStoredRounding::None, s.entries, nullptr, "compressor");
      if (emitted > 0) {
        // Already normalised and rotated by the compressor: the insert only stores (and quantises) them.
        KvInsertParams store;
        store.cache = kv_cache->view(), store.array = KvArray::Compressed, store.layer = layer;
        store.rows = emitted, store.x = s.entries, store.sequence_slots = s.slots, store.dest_rows = s.compressed_rows + layer * max_entries;
        store.stream = stream;
        run_kv_insert(store);
      }
      bf16* keys = nullptr;
      if (w.indexer) {
        // The indexer's own compressor runs every step (its state advances) even before the first key exists.
        const int64_t ID = c.indexer.head_dim;
        keys = layers[size_t(layer)].index_keys.as<bf16>() + size_t(slot) * size_t(max_keys_of(layer) * ID);
        compress(w.indexer->compressor, *layers[size_t(layer)].indexer[size_t(slot)], layer, ID, T, p0,
                 reference() ? CompressorStoredRounding::IndexerFp4 : CompressorStoredRounding::None, nullptr,
                 keys + first * ID, "indexer compressor");
      }
      if (w.indexer && entries > 0) {
        const device_weights::Indexer& ix = *w.indexer;
        const int64_t IH = c.indexer.num_heads, ID = c.indexer.head_dim;
        linear(ix.wq_b, name + " indexer wq_b", s.qr_bf16, ql, T, s.qi, IH * ID);
        IndexerPrepareParams prepare;
        prepare.input = s.qi, prepare.output = s.qi_bf16, prepare.tokens = T, prepare.heads = IH;
        prepare.head_dim = ID, prepare.positions = s.positions, prepare.rope_frequencies = freqs;
        prepare.rope_dim = c.rope_head_dim, prepare.reference_rounding = reference(), prepare.stream = stream;
        run_indexer_prepare(prepare);
        linear(ix.weights_proj, name + " indexer weights_proj", s.x_bf16, d, T, s.head_weights, IH);
        IndexerScoresParams scores;
        scores.q = s.qi_bf16, scores.head_weights = s.head_weights, scores.keys = keys, scores.key_count = entries;
        scores.positions = s.positions, scores.tokens = T, scores.heads = IH, scores.head_dim = ID;
        scores.ratio = ratio, scores.scores = s.scores, scores.score_stride = max_keys, scores.stream = stream;
        run_indexer_scores(scores);
        TopKParams top;
        top.scores = s.scores, top.row_stride = max_keys, top.candidates = entries, top.queries = int(T);
        top.k = c.indexer.topk, top.positions = s.positions, top.ratio = ratio, top.selected = s.selected;
        top.counts = s.counts, top.nan_flag = s.nan_flag, top.workspace = top_k_workspace;
        top.workspace_bytes = top_k_workspace_size, top.stream = stream;
        run_top_k(top);
        compressed_slots = c.indexer.topk;
        compressed_index = s.selected;
      } else if (!w.indexer && entries > 0) {
        VisibleEntriesIndexParams visible;
        visible.positions = s.positions, visible.tokens = T, visible.entries = entries, visible.ratio = ratio;
        visible.index = s.compressed_index, visible.stream = stream;
        run_visible_entries_index(visible);
        compressed_slots = int(entries);
        compressed_index = s.compressed_index;
      }
    }

    SparseAttentionParams a;
    a.cache = kv_cache->view(), a.layer = layer, a.tokens = T, a.heads = int(H);
    a.softmax_scale = 1.0f / std::sqrt(float(D)), a.q = s.q, a.q_dtype = AttentionDtype::F32;
    a.attn_sink = floats(w.sink), a.sequence_slots = s.slots, a.positions = s.positions, a.rope_frequencies = freqs;
    a.window_index = s.window_index, a.window_slots = c.window_size;
    a.compressed_index = compressed_index, a.compressed_slots = compressed_slots;
    a.out = s.o, a.out_dtype = AttentionDtype::Bf16;
    a.splits = std::min(attention_splits_max,
                        choose_sparse_attention_splits(T, int(H), int(D), kv_cache->layout().format,
                                                       c.window_size + compressed_slots,
                                                       context.info().multiprocessors));
    a.workspace = attention_workspace, a.workspace_bytes = attention_workspace_bytes, a.stream = stream;
    run_sparse_attention(a);

    // Grouped output projection: heads of a group are contiguous, so o [T, H·D] is already [T, G, (H/G)·D].
    linear(w.wo_a, name + " wo_a", s.o, H * D, T, s.z, c.o_proj_dim(), c.o_groups);
    run_to_bf16(s.z, T * c.o_proj_dim(), s.z_bf16, stream);
    linear(w.wo_b, name + " wo_b", s.z_bf16, c.o_proj_dim(), T, s.out, d);
  }

  int64_t max_keys_of(int layer) const { return options.max_context / config.compress_ratio(layer); }

  // One pass of at most max_step_tokens tokens; logits of rows [first, T) into `logits` at `logits_offset` rows.
  void step(int slot, std::span<const int32_t> ids, int64_t first, std::vector<float>& logits, int64_t row_offset) {
    const ModelConfig& c = config;
    const int64_t T = int64_t(ids.size()), p0 = slot_length[size_t(slot)], d = c.hidden_size;
    const int64_t n = c.mhc.hc_mult;

    // Pages for the step's rows, then the per-token inputs in one transfer.
    for (int i = 0; i < c.num_layers; ++i) {
      kv_cache->ensure_rows(slot, i, KvArray::Window, std::min(kv_cache->config().window_capacity, p0 + T));
      if (c.has_compressor(i) && (p0 + T) / c.compress_ratio(i) > 0)
        kv_cache->ensure_rows(slot, i, KvArray::Compressed, (p0 + T) / c.compress_ratio(i));
    }
    kv_cache->upload_page_table(stream);

    uint8_t* host = staging;
    auto* h_ids = reinterpret_cast<int32_t*>(host);
    auto* h_positions = reinterpret_cast<int64_t*>(host + 8 * ((4 * T + 7) / 8));
    auto* h_slots = reinterpret_cast<int32_t*>(h_positions + T);
    auto* h_ring = h_slots + T;
    for (int64_t t = 0; t < T; ++t) {
      h_ids[t] = ids[size_t(t)];
      h_positions[t] = p0 + t;
      h_slots[t] = slot;
      h_ring[t] = int32_t((p0 + t) % kv_cache->config().window_capacity);
    }
    // Destination rows of the compressed entries each layer's compressor completes in this step.
    auto* h_compressed = h_ring + T;
    for (int i = 0; i < c.num_layers; ++i) {
      if (!c.has_compressor(i)) continue;
      const int64_t ratio = c.compress_ratio(i), first_entry = compressor_first_entry(p0, ratio);
      for (int64_t e = 0; e < compressor_entries_emitted(p0, T, ratio); ++e)
        h_compressed[i * max_entries + e] = int32_t(first_entry + e);
    }
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.ids, h_ids, size_t(T) * 4, cudaMemcpyHostToDevice, stream));
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.positions, h_positions, size_t(T) * 8, cudaMemcpyHostToDevice, stream));
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.slots, h_slots, size_t(T) * 4, cudaMemcpyHostToDevice, stream));
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.ring_rows, h_ring, size_t(T) * 4, cudaMemcpyHostToDevice, stream));
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.compressed_rows, h_compressed, size_t(c.num_layers * max_entries) * 4,
                                    cudaMemcpyHostToDevice, stream));

    EmbeddingParams embed;
    embed.table = weights.embed.view(), embed.ids = scratch.ids, embed.tokens = T, embed.streams = int(n);
    embed.round_to_bf16 = reference(), embed.X = scratch.X, embed.stream = stream;
    run_embedding(embed);

    for (int layer = 0; layer < c.num_layers; ++layer) {
      const device_weights::Block& b = weights.layers[size_t(layer)];
      hc_pre(b.hc_attn, T, scratch.y);
      rms_norm(scratch.y, floats(b.attn_norm), T, d, nullptr, scratch.x_bf16);
      attention(layer, slot, T, p0);
      hc_post(T);

      hc_pre(b.hc_ffn, T, scratch.y);
      rms_norm(scratch.y, floats(b.ffn_norm), T, d, scratch.u, nullptr);
      MoeRunParams m;
      m.u = scratch.u, m.token_ids = scratch.ids, m.out = scratch.out, m.tokens = int(T);
      m.workspace = moe_workspace, m.workspace_bytes = moe_workspace_size, m.stream = stream;
      run_moe(*moe[size_t(layer)], m);
      hc_post(T);
    }

    const int64_t count = T - first;
    HcHeadParams head;
    head.X = scratch.X + first * n * d, head.fn = floats(weights.hc_head.fn), head.base = floats(weights.hc_head.base);
    head.scale = floats(weights.hc_head.scale), head.tokens = count, head.hidden = d, head.streams = int(n);
    head.hc_eps = float(c.mhc.eps), head.norm_eps = float(c.rms_norm_eps), head.round_to_bf16 = reference();
    head.h = scratch.h, head.workspace = hc_workspace, head.workspace_bytes = hc_workspace_bytes, head.stream = stream;
    run_hc_head(head);
    rms_norm(scratch.h, floats(weights.norm), count, d, nullptr, scratch.h_bf16);
    linear(weights.head, "head", scratch.h_bf16, d, count, scratch.logits, c.vocab_size);

    int32_t nan_flag = 0;
    DSV4_CUDA_CHECK(cudaMemcpyAsync(logits.data() + row_offset * c.vocab_size, scratch.logits,
                                    size_t(count * c.vocab_size) * sizeof(float), cudaMemcpyDeviceToHost, stream));
    DSV4_CUDA_CHECK(cudaMemcpyAsync(&nan_flag, scratch.nan_flag, 4, cudaMemcpyDeviceToHost, stream));
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (nan_flag != 0) DSV4_CUDA_CHECK(cudaMemset(scratch.nan_flag, 0, 4));
    check(nan_flag == 0, "CUDA model: the indexer produced NaN scores (a weight or activation is not finite)");
    slot_length[size_t(slot)] = p0 + T;
  }

  const ModelConfig config;
  CudaModelOptions options;
  DeviceContext context;
  DeviceAllocator pool;
  cudaStream_t stream = nullptr;
  std::vector<cpu::RopeTable> rope;
  std::vector<DeviceBuffer> frequencies;  // per layer, [rope_dim / 2]
  DeviceModelWeights weights;
  MoeConfig moe_config;
  std::vector<std::unique_ptr<DeviceMoeWeights>> moe;
  std::unique_ptr<KvCache> kv_cache;
  std::vector<LayerState> layers;
  int64_t max_entries = 0, max_keys = 0, max_compressed_slots = 0;
  int attention_splits_max = 1;
  size_t attention_workspace_bytes = 0, linear_workspace = 0, hc_workspace_bytes = 0, moe_workspace_size = 0,
         top_k_workspace_size = 0;
  DeviceBuffer scratch_buffer;
  DeviceBuffer decode_logits;  // [max_sequences, vocab]
  Scratch scratch{};
  void* attention_workspace = nullptr;
  void* linear_ws = nullptr;
  void* hc_workspace = nullptr;
  void* moe_workspace = nullptr;
  void* top_k_workspace = nullptr;
  uint8_t* staging = nullptr;  // pinned: the step's per-token inputs
  std::vector<int64_t> slot_length;  // tokens held, or kFreeSlot / kFailedSlot
};

CudaModel::CudaModel(const ModelConfig& config, const ModelWeights& weights, const CudaModelOptions& options)
    : impl_(std::make_unique<Impl>(config, &weights, nullptr, options)) {}

CudaModel::CudaModel(const ModelConfig& config, DeviceModelWeights&& weights, const CudaModelOptions& options)
    : impl_(std::make_unique<Impl>(config, nullptr, &weights, options)) {}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return impl_->config; }
const CudaModelOptions& CudaModel::options() const { return impl_->options; }

std::string CudaModel::describe() const {
  return impl_->context.describe() + ", weights " + format_bytes(impl_->weights.bytes) + ", KV pool " +
         std::to_string(impl_->kv_cache->config().pages) + " pages, step scratch " +
         format_bytes(impl_->scratch_buffer.bytes());
}

int CudaModel::add_sequence() {
  check(std::count(impl_->slot_length.begin(), impl_->slot_length.end(), kFreeSlot) > 0, "CUDA model: all ",
        impl_->options.max_sequences, " sequence slots (max_sequences) are in use");
  const int slot = impl_->kv_cache->add_sequence();
  impl_->reset_slot_state(slot);
  impl_->slot_length[size_t(slot)] = 0;
  return slot;
}

void CudaModel::release_sequence(int slot) {
  check(slot >= 0 && slot < int(impl_->slot_length.size()) && impl_->slot_length[size_t(slot)] != kFreeSlot,
        "CUDA model: sequence slot ", slot, " is not in use");
  impl_->kv_cache->release_sequence(slot);
  impl_->slot_length[size_t(slot)] = kFreeSlot;
}

int64_t CudaModel::length(int slot) const {
  check(slot >= 0 && slot < int(impl_->slot_length.size()) && impl_->slot_length[size_t(slot)] != kFreeSlot,
        "CUDA model: sequence slot ", slot, " is not in use");
  check(impl_->slot_length[size_t(slot)] != kFailedSlot, "CUDA model: sequence slot ", slot,
        " failed in an earlier step; release it");
  return impl_->slot_length[size_t(slot)];
}

void CudaModel::forward(int slot, std::span<const int32_t> ids, LogitRows rows, std::vector<float>& logits) {
  Impl& m = *impl_;
  const int64_t T = int64_t(ids.size()), p0 = length(slot);
  check(T > 0, "forward: no tokens");
  check_embedding_ids(ids.data(), T, m.config.vocab_size);
  check(p0 + T <= m.options.max_context, "sequence of ", p0 + T, " tokens exceeds the context of ",
        m.options.max_context, " tokens this GPU model was sized for");
  const int64_t vocab = m.config.vocab_size;
  logits.resize(size_t((rows == LogitRows::All ? T : 1) * vocab));
  try {
    for (int64_t t0 = 0; t0 < T; t0 += m.options.max_step_tokens) {
      const int64_t chunk = std::min(m.options.max_step_tokens, T - t0);
      const bool last = t0 + chunk == T;
      // Logits: every row (All), or the call's last row only, which lies in its last chunk.
      const int64_t first = rows == LogitRows::All ? 0 : last ? chunk - 1 : chunk;
      if (first == chunk) {
        // No logits wanted from this chunk: run it with the final row's head only to keep one code path cheap.
        std::vector<float> discard(static_cast<size_t>(vocab));
        m.step(slot, ids.subspan(size_t(t0), size_t(chunk)), chunk - 1, discard, 0);
      } else {
        m.step(slot, ids.subspan(size_t(t0), size_t(chunk)), first, logits, rows == LogitRows::All ? t0 : 0);
      }
    }
  } catch (...) {
    // A failed step leaves the slot's device state undefined: it refuses further steps until released.
    m.slot_length[size_t(slot)] = kFailedSlot;
    throw;
  }
}

}  // namespace dsv4::cuda

namespace dsv4::cuda {

void CudaModel::decode(std::span<const int> slots, std::span<const int32_t> ids, std::vector<float>& logits) {
  Impl& m = *impl_;
  check(slots.size() == ids.size() && !slots.empty(), "decode: ", slots.size(), " slots for ", ids.size(), " ids");
  const int64_t vocab = m.config.vocab_size;
  logits.resize(slots.size() * size_t(vocab));
  std::vector<float> row;
  for (size_t i = 0; i < slots.size(); ++i) {
    forward(slots[i], ids.subspan(i, 1), LogitRows::Last, row);
    std::copy(row.begin(), row.end(), logits.begin() + std::ptrdiff_t(i * size_t(vocab)));
  }
}

const float* CudaModel::decode_on_device(std::span<const int> slots, std::span<const int32_t> ids) {
  Impl& m = *impl_;
  check(slots.size() <= size_t(m.options.max_sequences), "decode_on_device: ", slots.size(),
        " sequences exceed max_sequences ", m.options.max_sequences);
  std::vector<float> logits;
  decode(slots, ids, logits);
  DSV4_CUDA_CHECK(cudaMemcpyAsync(m.decode_logits.data(), logits.data(), logits.size() * sizeof(float),
                                  cudaMemcpyHostToDevice, m.stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  return m.decode_logits.as<float>();
}

cudaStream_t CudaModel::stream() const { return impl_->stream; }

}  // namespace dsv4::cuda
