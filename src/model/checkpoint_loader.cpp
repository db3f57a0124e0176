#include "model/checkpoint_loader.hpp"

#include "core/bf16.hpp"
#include "core/error.hpp"
#include "io/checkpoint_names.hpp"
#include "model/weight_slots.hpp"

#include <cstring>
#include <filesystem>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace dsv4 {

std::string_view to_string(CheckpointIssue::Kind kind) {
  switch (kind) {
    case CheckpointIssue::Kind::Missing: return "missing";
    case CheckpointIssue::Kind::Unexpected: return "unexpected";
    case CheckpointIssue::Kind::BadShape: return "bad shape";
    case CheckpointIssue::Kind::BadFormat: return "bad format";
  }
  return "unknown";
}

bool LoadedCheckpoint::loadable() const {
  for (const CheckpointIssue& issue : issues)
    if (issue.kind != CheckpointIssue::Kind::Unexpected) return false;
  return true;
}

void LoadedCheckpoint::require_loadable() const {
  if (loadable()) return;
  std::ostringstream os;
  int shown = 0, problems = 0;
  for (const CheckpointIssue& issue : issues) {
    if (issue.kind == CheckpointIssue::Kind::Unexpected) continue;
    ++problems;
    if (shown++ < 20) os << "\n  " << to_string(issue.kind) << ": " << issue.tensor << ": " << issue.message;
  }
  if (problems > shown) os << "\n  ... and " << problems - shown << " more";
  fail("checkpoint ", config.origin, " is not loadable (", problems, " problems):", os.str());
}

size_t LoadedCheckpoint::weight_bytes() const {
  size_t bytes = 0;
  for (const auto& [format, t] : totals) bytes += t.bytes;
  return bytes;
}

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The stored tensors that make up one weight.
struct WeightParts {
  const TensorView* weight = nullptr;
  const TensorView* block_scale = nullptr;
  const TensorView* nvfp4_scale = nullptr;
  const TensorView* nvfp4_global = nullptr;
  const TensorView* input_scale = nullptr;
};

class SlotFiller {
 public:
  explicit SlotFiller(LoadedCheckpoint& out) : out_(out), slots_(weight_slots(out.config)) {
    for (const WeightSlot& slot : slots_) slot_by_name_[slot.name] = &slot;
    for (const TensorView* view : out_.store.all()) {
      CanonicalName canonical = canonicalize_tensor_name(view->name);
      WeightParts& parts = parts_[canonical.weight];
      const TensorView** slot = nullptr;
      switch (canonical.role) {
        case TensorRole::Weight: slot = &parts.weight; break;
        case TensorRole::BlockScale: slot = &parts.block_scale; break;
        case TensorRole::Nvfp4Scale: slot = &parts.nvfp4_scale; break;
        case TensorRole::Nvfp4Global: slot = &parts.nvfp4_global; break;
        case TensorRole::InputScale: slot = &parts.input_scale; break;
      }
      if (*slot) {
        issue(CheckpointIssue::Kind::BadFormat, canonical.weight,
              "stored twice, as '" + (*slot)->name + "' and '" + view->name + "'");
        continue;
      }
      *slot = view;
      if (canonical.role == TensorRole::Nvfp4Scale) saw_nvfp4_ = true;
      if (view->name.starts_with("model.")) saw_hf_prefix_ = true;
    }
  }

  std::string layout() const {
    if (saw_nvfp4_) return "ModelOpt NVFP4";
    return saw_hf_prefix_ ? "HuggingFace" : "DeepSeek release";
  }

  bool has(const std::string& name) const {
    auto it = parts_.find(name);
    return it != parts_.end() && it->second.weight;
  }

  // A [rows, cols] matrix in whatever format the checkpoint stores it.
  QuantizedMatrix matrix(const std::string& name) {
    const WeightSlot& slot = slot_of(name);
    const int64_t rows = slot.shape[0], cols = slot.shape[1];
    QuantizedMatrix m;
    m.rows = rows;
    m.cols = cols;
    const WeightParts* parts = take(name);
    if (!parts) return m;
    const TensorView& w = *parts->weight;
    const std::vector<int64_t> expected{rows, cols};
    auto bad_shape = [&](const TensorView& t, const std::vector<int64_t>& want) {
      issue(CheckpointIssue::Kind::BadShape, name,
            "'" + t.name + "' in " + t.file + " has shape " + shape_string(t.shape) + ", the config implies " +
                shape_string(want));
    };
    m.data = w.data;
    m.keepalive = out_.store.keepalive(w);
    switch (w.dtype) {
      case DType::F32:
      case DType::BF16:
        if (w.shape != expected) return bad_shape(w, expected), m;
        m.format = w.dtype == DType::F32 ? WeightFormat::F32 : WeightFormat::BF16;
        break;
      case DType::F8_E4M3: {
        if (w.shape != expected) return bad_shape(w, expected), m;
        const TensorView* s = parts->block_scale;
        if (!s) return issue(CheckpointIssue::Kind::Missing, name, "fp8 weight '" + w.name + "' has no block scale"), m;
        std::vector<int64_t> want{ceil_div(rows, 128), ceil_div(cols, 128)};
        if (s->shape != want) return bad_shape(*s, want), m;
        if (s->dtype == DType::F8_E8M0 || s->dtype == DType::U8) m.scale_type = ScaleType::E8M0;
        else if (s->dtype == DType::F32) m.scale_type = ScaleType::F32;
        else return bad_dtype(name, *s, "F8_E8M0 or F32 block scales"), m;
        m.format = WeightFormat::FP8_BLOCK128;
        m.scales = s->data;
        break;
      }
      case DType::I8:
      case DType::U8:
      case DType::F4: {
        // Packed e2m1, two per byte along K. F4 counts elements, the byte dtypes count bytes.
        std::vector<int64_t> want = w.dtype == DType::F4 ? expected : std::vector<int64_t>{rows, ceil_div(cols, 2)};
        if (w.shape != want) return bad_shape(w, want), m;
        if (parts->nvfp4_scale) {
          const TensorView& s = *parts->nvfp4_scale;
          std::vector<int64_t> want_scale{rows, ceil_div(cols, 16)};
          if (s.shape != want_scale) return bad_shape(s, want_scale), m;
          if (s.dtype != DType::F8_E4M3) return bad_dtype(name, s, "F8_E4M3 NVFP4 block scales"), m;
          if (!parts->nvfp4_global)
            return issue(CheckpointIssue::Kind::Missing, name, "NVFP4 weight '" + w.name + "' has no weight_scale_2"), m;
          const TensorView& g = *parts->nvfp4_global;
          if (g.dtype != DType::F32 || g.numel() != 1) return bad_dtype(name, g, "one F32 value (weight_scale_2)"), m;
          std::memcpy(&m.global_scale, g.data, sizeof(float));
          m.format = WeightFormat::NVFP4;
          m.scale_type = ScaleType::E4M3;
          m.scales = s.data;
        } else if (parts->block_scale) {
          const TensorView& s = *parts->block_scale;
          std::vector<int64_t> want_scale{rows, ceil_div(cols, 32)};
          if (s.shape != want_scale) return bad_shape(s, want_scale), m;
          if (s.dtype != DType::F8_E8M0 && s.dtype != DType::U8) return bad_dtype(name, s, "F8_E8M0 MXFP4 scales"), m;
          m.format = WeightFormat::MXFP4;
          m.scale_type = ScaleType::E8M0;
          m.scales = s.data;
        } else {
          return issue(CheckpointIssue::Kind::Missing, name, "packed fp4 weight '" + w.name + "' has no scales"), m;
        }
        break;
      }
      default:
        return bad_dtype(name, w, "F32, BF16, F8_E4M3 (+ block scale) or packed e2m1 (I8/U8/F4 + scales)"), m;
    }
    count(std::string(to_string(m.format)), m.parameters(), m.stored_bytes());
    return m;
  }

  // A small parameter held as fp32 (norm weights, biases, sinks, mHC parameters), `numel` values in any shape.
  std::vector<float> vector(const std::string& name) {
    int64_t numel = 1;
    for (int64_t extent : slot_of(name).shape) numel *= extent;
    std::vector<float> values;
    const WeightParts* parts = take(name);
    if (!parts) return values;
    const TensorView& t = *parts->weight;
    if (t.numel() != numel) {
      issue(CheckpointIssue::Kind::BadShape, name,
            "'" + t.name + "' in " + t.file + " has shape " + shape_string(t.shape) + " (" +
                std::to_string(t.numel()) + " values), the config implies " + std::to_string(numel));
      return values;
    }
    values.resize(size_t(numel));
    if (t.dtype == DType::F32) {
      std::memcpy(values.data(), t.data, size_t(numel) * sizeof(float));
    } else if (t.dtype == DType::BF16) {
      for (int64_t i = 0; i < numel; ++i) {
        uint16_t bits;
        std::memcpy(&bits, t.data + 2 * i, 2);
        values[size_t(i)] = bf16_to_float(bits);
      }
    } else {
      bad_dtype(name, t, "F32 or BF16");
      return {};
    }
    count(t.dtype == DType::F32 ? "f32" : "bf16", numel, t.bytes);
    return values;
  }

  // tid2eid: [vocab, top_k] expert ids in [0, experts).
  std::vector<int32_t> expert_table(const std::string& name, int64_t experts) {
    const WeightSlot& slot = slot_of(name);
    const int64_t rows = slot.shape[0], cols = slot.shape[1];
    std::vector<int32_t> ids;
    const WeightParts* parts = take(name);
    if (!parts) return ids;
    const TensorView& t = *parts->weight;
    if (t.shape != std::vector<int64_t>{rows, cols}) {
      issue(CheckpointIssue::Kind::BadShape, name,
            "'" + t.name + "' has shape " + shape_string(t.shape) + ", the config implies " +
                shape_string({rows, cols}));
      return ids;
    }
    if (t.dtype != DType::I64 && t.dtype != DType::I32) {
      bad_dtype(name, t, "I64 or I32 expert ids");
      return ids;
    }
    ids.resize(size_t(rows * cols));
    for (int64_t i = 0; i < rows * cols; ++i) {
      int64_t id;
      if (t.dtype == DType::I64) {
        std::memcpy(&id, t.data + 8 * i, 8);
      } else {
        int32_t v;
        std::memcpy(&v, t.data + 4 * i, 4);
        id = v;
      }
      if (id < 0 || id >= experts) {
        issue(CheckpointIssue::Kind::BadFormat, name,
              "token " + std::to_string(i / cols) + " routes to expert " + std::to_string(id) + ", outside [0, " +
                  std::to_string(experts) + ")");
        return {};
      }
      ids[size_t(i)] = int32_t(id);
    }
    count("i32", rows * cols, ids.size() * sizeof(int32_t));
    return ids;
  }

  // transformers' fused expert tensors: gate_up_proj [E, 2I, d] (gate rows first) and down_proj [E, d, I].
  // Returns false when the layer has no fused tensors.
  bool fused_experts(const std::string& prefix, int64_t experts, int64_t inter, int64_t hidden,
                     std::vector<ExpertWeights>& out) {
    const std::string gate_up = prefix + "gate_up_proj", down = prefix + "down_proj";
    if (!has(gate_up) && !has(down)) return false;
    const WeightParts* gu = take(gate_up);
    const WeightParts* dn = take(down);
    if (!gu || !dn) return true;
    const TensorView& a = *gu->weight;
    const TensorView& b = *dn->weight;
    for (const auto& [t, want] : {std::pair{&a, std::vector<int64_t>{experts, 2 * inter, hidden}},
                                  std::pair{&b, std::vector<int64_t>{experts, hidden, inter}}}) {
      if (t->shape != want) {
        issue(CheckpointIssue::Kind::BadShape, t->name,
              "shape " + shape_string(t->shape) + ", the config implies " + shape_string(want));
        return true;
      }
      if (t->dtype != DType::F32 && t->dtype != DType::BF16) {
        bad_dtype(t->name, *t, "F32 or BF16 (fused experts)");
        return true;
      }
    }
    const WeightFormat format = a.dtype == DType::F32 ? WeightFormat::F32 : WeightFormat::BF16;
    const size_t elem = a.dtype == DType::F32 ? 4 : 2;
    auto view = [&](const TensorView& t, size_t offset_elems, int64_t rows, int64_t cols) {
      QuantizedMatrix m;
      m.format = format;
      m.rows = rows;
      m.cols = cols;
      m.data = t.data + offset_elems * elem;
      m.keepalive = out_.store.keepalive(t);
      count(std::string(to_string(format)), m.parameters(), m.stored_bytes());
      return m;
    };
    out.resize(size_t(experts));
    for (int64_t e = 0; e < experts; ++e) {
      const size_t base = size_t(e * 2 * inter * hidden);
      out[size_t(e)].w1 = view(a, base, inter, hidden);
      out[size_t(e)].w3 = view(a, base + size_t(inter * hidden), inter, hidden);
      out[size_t(e)].w2 = view(b, size_t(e * hidden * inter), hidden, inter);
    }
    return true;
  }

  // Whatever no slot took.
  void report_unexpected() {
    for (const auto& [name, parts] : parts_) {
      if (taken_.contains(name)) continue;
      for (const TensorView* t : {parts.weight, parts.block_scale, parts.nvfp4_scale, parts.nvfp4_global,
                                  parts.input_scale})
        if (t) issue(CheckpointIssue::Kind::Unexpected, t->name, "in " + t->file + " fills no weight slot");
    }
  }

 private:
  const WeightSlot& slot_of(const std::string& name) const {
    auto it = slot_by_name_.find(name);
    check(it != slot_by_name_.end(), "internal: no weight slot named ", name);
    return *it->second;
  }

  const WeightParts* take(const std::string& name) {
    auto it = parts_.find(name);
    if (it == parts_.end() || !it->second.weight) {
      issue(CheckpointIssue::Kind::Missing, name, "no tensor in the checkpoint");
      return nullptr;
    }
    taken_.insert(name);
    if (it->second.input_scale) out_.ignored.push_back(it->second.input_scale->name);
    return &it->second;
  }

  void bad_dtype(const std::string& name, const TensorView& t, const std::string& wanted) {
    issue(CheckpointIssue::Kind::BadFormat, name,
          "'" + t.name + "' in " + t.file + " has dtype " + std::string(to_string(t.dtype)) + ", expected " + wanted);
  }

  void issue(CheckpointIssue::Kind kind, const std::string& tensor, std::string message) {
    out_.issues.push_back({kind, tensor, std::move(message)});
  }

  void count(const std::string& format, int64_t parameters, size_t bytes) {
    FormatTotals& t = out_.totals[format];
    ++t.tensors;
    t.parameters += parameters;
    t.bytes += bytes;
  }

  LoadedCheckpoint& out_;
  std::vector<WeightSlot> slots_;
  std::unordered_map<std::string, const WeightSlot*> slot_by_name_;
  std::unordered_map<std::string, WeightParts> parts_;
  std::unordered_set<std::string> taken_;
  bool saw_nvfp4_ = false;
  bool saw_hf_prefix_ = false;
};

HyperConnectionWeights hyper_connection(SlotFiller& f, const std::string& prefix) {
  return {f.matrix(prefix + "fn"), f.vector(prefix + "base"), f.vector(prefix + "scale")};
}

CompressorWeights compressor(SlotFiller& f, const std::string& p) {
  return {f.matrix(p + "wkv.weight"), f.matrix(p + "wgate.weight"), f.vector(p + "ape"), f.vector(p + "norm.weight")};
}

ExpertWeights expert(SlotFiller& f, const std::string& p) {
  return {f.matrix(p + "w1.weight"), f.matrix(p + "w2.weight"), f.matrix(p + "w3.weight")};
}

// One block: `p` is "layers.N." or "mtp.N.".
BlockWeights block(SlotFiller& f, const ModelConfig& c, const std::string& p, LayerKind kind, bool hash) {
  BlockWeights b;
  b.attn_norm = f.vector(p + "attn_norm.weight");
  b.ffn_norm = f.vector(p + "ffn_norm.weight");
  b.hc_attn = hyper_connection(f, p + "hc_attn_");
  b.hc_ffn = hyper_connection(f, p + "hc_ffn_");

  const std::string a = p + "attn.";
  AttentionWeights& at = b.attn;
  at.wq_a = f.matrix(a + "wq_a.weight");
  at.q_norm = f.vector(a + "q_norm.weight");
  at.wq_b = f.matrix(a + "wq_b.weight");
  at.wkv = f.matrix(a + "wkv.weight");
  at.kv_norm = f.vector(a + "kv_norm.weight");
  at.wo_a = f.matrix(a + "wo_a.weight");
  at.wo_b = f.matrix(a + "wo_b.weight");
  at.sink = f.vector(a + "attn_sink");
  if (kind != LayerKind::SlidingWindow) at.compressor = compressor(f, a + "compressor.");
  if (kind == LayerKind::CompressedSparse)
    at.indexer = IndexerWeights{f.matrix(a + "indexer.wq_b.weight"), f.matrix(a + "indexer.weights_proj.weight"),
                                compressor(f, a + "indexer.compressor.")};

  const std::string m = p + "ffn.";
  MoeWeights& moe = b.ffn;
  moe.gate = f.matrix(m + "gate.weight");
  if (hash)
    moe.tid2eid = f.expert_table(m + "gate.tid2eid", c.moe.num_routed_experts);
  else
    moe.gate_bias = f.vector(m + "gate.bias");
  if (!f.fused_experts(m + "experts.", c.moe.num_routed_experts, c.moe.intermediate_size, c.hidden_size,
                       moe.experts)) {
    moe.experts.reserve(size_t(c.moe.num_routed_experts));
    for (int e = 0; e < c.moe.num_routed_experts; ++e)
      moe.experts.push_back(expert(f, m + "experts." + std::to_string(e) + "."));
  }
  moe.shared = expert(f, m + "shared_experts.");
  return b;
}

}  // namespace

LoadedCheckpoint load_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  check(fs::is_directory(dir), "checkpoint directory '", dir, "' does not exist or is not a directory");
  LoadedCheckpoint out{ModelConfig::from_dir(dir), TensorStore::open(dir), {}, {}, {}, {}, {}};
  const ModelConfig& c = out.config;
  SlotFiller f(out);
  out.layout = f.layout();

  ModelWeights& w = out.weights;
  w.embed = f.matrix("embed.weight");
  w.head = !f.has("head.weight") && c.tie_word_embeddings ? w.embed : f.matrix("head.weight");
  w.norm = f.vector("norm.weight");
  w.hc_head = hyper_connection(f, "hc_head_");

  w.layers.reserve(size_t(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i)
    w.layers.push_back(block(f, c, "layers." + std::to_string(i) + ".", c.layer_kind(i), c.is_hash_routed(i)));

  // MTP modules are optional: transformers does not save them; without them speculative decoding is unavailable.
  for (int i = 0; i < c.num_mtp_layers; ++i) {
    const std::string p = "mtp." + std::to_string(i) + ".";
    if (!f.has(p + "e_proj.weight")) continue;
    MtpWeights mtp;
    mtp.block = block(f, c, p, LayerKind::SlidingWindow, false);
    mtp.e_proj = f.matrix(p + "e_proj.weight");
    mtp.h_proj = f.matrix(p + "h_proj.weight");
    mtp.enorm = f.vector(p + "enorm.weight");
    mtp.hnorm = f.vector(p + "hnorm.weight");
    mtp.norm = f.vector(p + "norm.weight");
    mtp.hc_head = hyper_connection(f, p + "hc_head_");
    w.mtp.push_back(std::move(mtp));
  }
  f.report_unexpected();
  return out;
}

}  // namespace dsv4
