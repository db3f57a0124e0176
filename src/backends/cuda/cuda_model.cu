#include "backends/cuda/cuda_model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cxxabi.h>
#include <map>
#include <optional>
#include <unordered_set>
#include <string_view>

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
#include "backends/cuda/kernels/rope.hpp"
#include "backends/cuda/kernels/mhc.hpp"
#include "backends/cuda/kernels/quantized_linear.hpp"
#include "backends/cuda/kernels/rms_norm.hpp"
#include "backends/cuda/kernels/sparse_attention.hpp"
#include "backends/cuda/kernels/to_bf16.hpp"
#include "backends/cuda/kernels/top_k.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/linear_dispatch.hpp"
#include "backends/cuda/moe.hpp"
#include "backends/cuda/moe_weights.hpp"
#include "backends/cuda/shape_only_matrix.hpp"
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
// kept in `owned`), after checking every such matrix's scales. The mHC projections, the embedding and the router
// keep F32: their kernels read it.
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

size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Hands out 256-byte-aligned pieces of one allocation; with a null base it only adds up the bytes (the dry run
// that sizes the allocation, so sizing and carving cannot disagree).
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<uint8_t*>(base)) {}
  template <class T>
  T* take(int64_t count) {
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + bytes_) : nullptr;
    bytes_ += round_up_256(size_t(std::max<int64_t>(count, 0)) * sizeof(T));
    return p;
  }
  size_t bytes() const { return bytes_; }

 private:
  uint8_t* base_;
  size_t bytes_ = 0;
};

// The view a DeviceMatrix of this host matrix would have, without its data: enough to size the linear workspace
// before anything is uploaded.
DeviceMatrixView shape_view(const QuantizedMatrix& m) {
  DeviceMatrixView v;
  v.format = m.format;
  v.scale_type = m.scale_type;
  v.rows = m.rows;
  v.cols = m.cols;
  return v;
}

// The matrix `parts` would make stacked (rows added up), as a shape: enough to size a linear workspace.
DeviceMatrixView stacked_shape(std::initializer_list<DeviceMatrixView> parts) {
  DeviceMatrixView v = *parts.begin();
  v.rows = 0;
  for (const DeviceMatrixView& part : parts) v.rows += part.rows;
  return v;
}

// The linear layers' largest workspace, over any weight tree (host or device) through `view_of`, stacked
// projections (CudaModelOptions::fuse_projections) included.
template <class Weights, class ViewOf>
size_t largest_linear_workspace(const Weights& w, int o_groups, ViewOf view_of) {
  size_t bytes = 0;
  auto note_view = [&](const DeviceMatrixView& v, int groups = 1) {
    if (v.rows > 0) bytes = std::max(bytes, linear_workspace_bytes(v, groups));
  };
  auto note = [&](const auto& m, int groups = 1) { note_view(view_of(m), groups); };
  note(w.head);
  for (const auto& b : w.layers) {
    note(b.attn.wq_a), note(b.attn.wq_b), note(b.attn.wkv), note(b.attn.wo_b), note(b.attn.wo_a, o_groups);
    note_view(stacked_shape({view_of(b.attn.wq_a), view_of(b.attn.wkv)}));
    if (b.attn.compressor) {
      note(b.attn.compressor->wkv), note(b.attn.compressor->wgate);
      note_view(stacked_shape({view_of(b.attn.compressor->wkv), view_of(b.attn.compressor->wgate)}));
    }
    if (b.attn.indexer) {
      const auto& ix = *b.attn.indexer;
      note(ix.wq_b), note(ix.weights_proj), note(ix.compressor.wkv), note(ix.compressor.wgate);
      note_view(stacked_shape({view_of(b.attn.wq_b), view_of(ix.wq_b)}));
      if (b.attn.compressor) {
        const auto& c = *b.attn.compressor;
        note_view(stacked_shape(
            {view_of(c.wkv), view_of(c.wgate), view_of(ix.compressor.wkv), view_of(ix.compressor.wgate)}));
        note_view(stacked_shape({view_of(c.wkv), view_of(c.wgate), view_of(ix.compressor.wkv),
                                 view_of(ix.compressor.wgate), view_of(ix.weights_proj)}));
      }
    }
  }
  return bytes;
}

// Device bytes of the stacked projections (CudaModelOptions::fuse_projections) over any weight tree through
// `bytes_of` (a part's data + scales): the stacked copies are allocated while their parts still hold theirs, and the
// parts' freed space is reused only where later pieces fit, so the plan counts them in full.
template <class Weights, class BytesOf>
size_t stacked_projection_bytes(const Weights& w, bool indexer_projections, bool indexer_queries, BytesOf bytes_of) {
  size_t bytes = 0;
  auto add = [&](const auto& m) { bytes += round_up_256(bytes_of(m)) + DeviceAllocator::kAlignment; };
  for (const auto& b : w.layers) {
    add(b.attn.wq_a), add(b.attn.wkv);
    if (b.attn.compressor) add(b.attn.compressor->wkv), add(b.attn.compressor->wgate);
    if (b.attn.indexer) {
      const auto& ix = *b.attn.indexer;
      add(ix.compressor.wkv), add(ix.compressor.wgate);
      if (indexer_projections) add(ix.weights_proj);
      if (indexer_projections && indexer_queries) add(b.attn.wq_b), add(ix.wq_b);
    }
  }
  return bytes;
}

// The rows of `parts` stacked into one matrix in `pool` (one linear launch for matrices that read the same input),
// copied on `stream`; an empty matrix when their formats, widths or scale layouts do not line up (FP8_BLOCK128
// parts other than the last must fill whole 128-row bands, so that their scale bands stack too).
DeviceMatrix stack_rows(const std::vector<const DeviceMatrix*>& parts, std::string_view what, DeviceAllocator& pool,
                        cudaStream_t stream) {
  const DeviceMatrixView& first = (*parts.begin())->view();
  int64_t rows = 0;
  size_t data_bytes = 0, scale_bytes = 0, index = 0;
  for (const DeviceMatrix* part : parts) {
    const DeviceMatrixView& v = part->view();
    const bool last = ++index == parts.size();
    if (v.rows == 0 || v.format != first.format || v.scale_type != first.scale_type || v.cols != first.cols ||
        v.global_scale != first.global_scale || v.data_row_bytes != first.data_row_bytes ||
        v.scales_per_row != first.scales_per_row ||
        (v.format == WeightFormat::FP8_BLOCK128 && !last && v.rows % kFp8BlockSize != 0))
      return {};
    rows += v.rows;
    data_bytes += part->data_buffer().bytes();
    scale_bytes += part->scales_buffer().bytes();
  }
  QuantizedMatrix layout = shape_only_matrix(first.format, rows, first.cols, first.global_scale);
  layout.scale_type = first.scale_type;
  DeviceMatrix stacked = DeviceMatrix::allocate(layout, what, pool);
  if (stacked.data_buffer().bytes() != data_bytes || stacked.scales_buffer().bytes() != scale_bytes) return {};
  auto* data = static_cast<uint8_t*>(stacked.data_buffer().data());
  auto* scales = static_cast<uint8_t*>(stacked.scales_buffer().data());
  for (const DeviceMatrix* part : parts) {
    const size_t part_data = part->data_buffer().bytes(), part_scales = part->scales_buffer().bytes();
    DSV4_CUDA_CHECK(cudaMemcpyAsync(data, part->data_buffer().data(), part_data, cudaMemcpyDeviceToDevice, stream));
    if (part_scales > 0)
      DSV4_CUDA_CHECK(
          cudaMemcpyAsync(scales, part->scales_buffer().data(), part_scales, cudaMemcpyDeviceToDevice, stream));
    data += part_data;
    scales += part_scales;
  }
  return stacked;
}

// Up to this many tokens q_norm runs as wq_b's RMSNorm prologue (q_norm_prologue): every CTA of the linear re-reads
// its tokens' whole rows for their sums of squares, which a few decode tokens pay less for than a launch.
constexpr int64_t kNormPrologueMaxTokens = 16;
// With q_norm_cta_rows, the queries' per-head norm runs a CTA per head up to this many rows (a decode step of up to
// 16 Flash tokens); beyond, the warp rows' fewer CTAs do the same work with less overhead.
constexpr int64_t kQNormCtaRowsMaxRows = 1024;

// Up to this many tokens (decode steps) the stacked [wq_b; indexer wq_b] runs as one launch into a buffer of its
// own (stack_indexer_projections); longer steps run its parts as row slices, so the buffer stays small.
constexpr int64_t kStackedQueryMaxTokens = 64;

// A kernel node's function, demangled, without its parameter list ("dsv4::cuda::foo_kernel<2>").
std::string kernel_node_name(cudaGraphNode_t node) {
  cudaGraphNodeType type{};
  DSV4_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
  check(type == cudaGraphNodeTypeKernel, "CUDA model: a decode graph node of type ", int(type),
        " is not a kernel: the launch listing expects kernel nodes only");
  cudaKernelNodeParams params{};
  DSV4_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &params));
  const char* mangled = nullptr;
  DSV4_CUDA_CHECK(cudaFuncGetName(&mangled, params.func));
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> demangled(abi::__cxa_demangle(mangled, nullptr, nullptr, &status),
                                                         &std::free);
  std::string name = status == 0 && demangled ? demangled.get() : mangled;
  if (name.starts_with("void ")) name.erase(0, 5);
  constexpr std::string_view kAnonymous = "(anonymous namespace)::";
  for (size_t at = name.find(kAnonymous); at != std::string::npos; at = name.find(kAnonymous))
    name.erase(at, kAnonymous.size());
  // The parameter list starts at the first '(' outside template arguments.
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '<') ++depth;
    if (name[i] == '>') --depth;
    if (name[i] == '(' && depth == 0) return name.substr(0, i);
  }
  return name;
}

// Each node's depth in `graph`: the edges of the longest dependency chain from a root to it. Listing a layer's
// kernels by depth gives their dependency order; kernels at one depth (the two streams' branches) have none.
std::map<cudaGraphNode_t, int> node_depths(cudaGraph_t graph) {
  size_t node_count = 0, edge_count = 0;
  DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &node_count));
  std::vector<cudaGraphNode_t> nodes(node_count);
  DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &node_count));
  DSV4_CUDA_CHECK(cudaGraphGetEdges(graph, nullptr, nullptr, nullptr, &edge_count));
  std::vector<cudaGraphNode_t> from(edge_count), to(edge_count);
  std::vector<cudaGraphEdgeData> data(edge_count);  // programmatic edges carry data: a query without it is refused
  DSV4_CUDA_CHECK(cudaGraphGetEdges(graph, from.data(), to.data(), data.data(), &edge_count));
  // Kahn's order: a node's depth is final once every edge into it has been counted.
  std::map<cudaGraphNode_t, int> depth, unresolved;
  std::map<cudaGraphNode_t, std::vector<cudaGraphNode_t>> successors;
  for (cudaGraphNode_t node : nodes) depth[node] = 0, unresolved[node] = 0;
  for (size_t e = 0; e < edge_count; ++e) {
    successors[from[e]].push_back(to[e]);
    ++unresolved[to[e]];
  }
  std::vector<cudaGraphNode_t> ready;
  for (cudaGraphNode_t node : nodes)
    if (unresolved[node] == 0) ready.push_back(node);
  size_t visited = 0;
  while (!ready.empty()) {
    const cudaGraphNode_t node = ready.back();
    ready.pop_back();
    ++visited;
    for (cudaGraphNode_t next : successors[node]) {
      depth[next] = std::max(depth[next], depth[node] + 1);
      if (--unresolved[next] == 0) ready.push_back(next);
    }
  }
  check(visited == nodes.size(), "CUDA model: the decode graph's dependencies form a cycle");
  return depth;
}

bool cuda_graphs_disabled() {
  const char* value = std::getenv("DSV4_DISABLE_CUDA_GRAPHS");
  return value != nullptr && std::string_view(value) != "" && std::string_view(value) != "0";
}

// One sequence's tokens in a step.
struct StepRun {
  int slot;
  int64_t start;   // position of the first token
  int64_t tokens;
};

// Byte offsets of one step's per-token inputs, packed for (tokens, runs) so that one copy moves them all.
struct StepInputLayout {
  size_t positions = 0, ids = 0, slots = 0, ring_rows = 0, runs = 0, last_rows = 0, bytes = 0;
  StepInputLayout(int64_t tokens, int64_t run_count) {
    positions = 0;
    ids = positions + size_t(tokens) * 8;
    slots = ids + size_t(tokens) * 4;
    ring_rows = slots + size_t(tokens) * 4;
    runs = (ring_rows + size_t(tokens) * 4 + 7) / 8 * 8;
    last_rows = runs + size_t(run_count) * sizeof(CompressorRun);
    bytes = last_rows + size_t(run_count) * 4;
  }
};

// The device pointers of one step's inputs.
struct StepInputs {
  int64_t* positions;
  int32_t* ids;
  int32_t* slots;
  int32_t* ring_rows;
  CompressorRun* runs;
  int32_t* last_rows;  // [runs]: each run's last token

  StepInputs(uint8_t* base, const StepInputLayout& l)
      : positions(reinterpret_cast<int64_t*>(base + l.positions)),
        ids(reinterpret_cast<int32_t*>(base + l.ids)),
        slots(reinterpret_cast<int32_t*>(base + l.slots)),
        ring_rows(reinterpret_cast<int32_t*>(base + l.ring_rows)),
        runs(reinterpret_cast<CompressorRun*>(base + l.runs)),
        last_rows(reinterpret_cast<int32_t*>(base + l.last_rows)) {}
};

// What the launches of a step depend on: a captured graph is valid for every step of the same shape.
struct StepShape {
  int64_t tokens = 0;
  int runs = 0;
  int64_t max_run_tokens = 0;
  int64_t first_logit_row = 0;  // logits for rows [first_logit_row, tokens)
  bool run_last_rows = false;    // instead: logits for each run's last token (a mixed step)
  // −1: every query finds its sequence's indexer keys through its slot (decode, batches; graph-safe). Otherwise the
  // one sequence's slot, baked into the launch (prefill chunks: queries then share key loads).
  int single_slot = -1;
};

}  // namespace

struct CudaModel::Impl {
  // Per layer: the compressor states of every sequence slot (main and indexer) and the indexer keys.
  struct LayerState {
    std::unique_ptr<DeviceCompressorState> compressor;  // [slots]
    std::unique_ptr<DeviceCompressorState> indexer;     // [slots], CSA layers
    // [slots, max_keys, index_head_dim]: bf16, or with fp8_index_keys() e4m3 codes, then fp32 scales [slots,
    // max_keys] (from index_key_scales_offset()).
    DeviceBuffer index_keys;
  };

  // Step scratch, sized for step_capacity tokens.
  struct Scratch {
    uint8_t* inputs;           // StepInputLayout(step_capacity, max_sequences) bytes
    float* X;                  // [T, n, d]
    float* y;                  // [T, d]
    float* post[2];            // [T, n]: the current site's, and the next one's while hc_post_pre writes them
    float* comb[2];            // [T, n, n]
    bf16* x_bf16;              // [T, d]: the normed sub-block input for the linear layers
    float* u;                  // [T, d]: ffn_norm output for the MoE
    float* qr;                 // [T, q_lora]
    bf16* qr_bf16;             // [T, q_lora]
    float* q;                  // [T, H·D]: wq_b's output where it is not stacked
    bf16* q_bf16;              // [T, H·D]: the normed, rotated queries the attention reads (its operand type)
    float* stacked_queries;    // [min(T, kStackedQueryMaxTokens), H·D + IH·ID]: the stacked [wq_b; indexer wq_b]
    float* kv;                 // [T, D]
    float* qr_kv;              // [T, q_lora + D]: the stacked [wq_a; wkv] projection's output
    float* compressor_projections;  // [T, stacked compressor rows]: the stacked compressors' output
    bf16* o;                   // [T, H·D] attention output
    float* z;                  // [T, G·o_lora]
    bf16* z_bf16;
    float* out;                // [T, d]
    float* ckv;                // [T, 2·max(D, ID)] compressor projections
    float* cgate;
    float* qi;                 // [T, IH·ID]
    bf16* qi_bf16;
    uint8_t* qi_fp8;           // [T, IH, ID] with fp8_index_keys(): the prepared queries in the keys' format
    float* qi_scales;          // [T, IH]
    float* head_weights;       // [T, IH]
    float* scores;             // [T, max_keys]
    int32_t* selected;         // [T, topk]
    int32_t* counts;           // [T]
    int32_t* window_index;     // [T, W]
    float* X_last;             // [max_sequences, n, d]: the residual rows of the runs' last tokens (mixed steps)
    float* h;                  // [T, d]
    bf16* h_bf16;
    float* logits;             // [T, vocab]
    int32_t* nan_flag;
    void* attention_workspace;
    void* linear_workspace;
    void* branch_linear_workspace;  // the compressors' branch's (parallel_compressors)
    void* hc_workspace;
    void* moe_workspace;
    void* top_k_workspace;
  };

  // The visible compressed entries of every token of a step, for the HCA layers of one ratio.
  struct VisibleEntries {
    int32_t* index = nullptr;   // [T, max_context / ratio]
    int32_t* counts = nullptr;  // [T]
  };

  // Per layer with CudaModelOptions::fuse_projections: the stacked matrices that replaced the separate ones (empty
  // where the parts do not stack; the layer then runs them separately).
  struct StackedProjections {
    DeviceMatrix qr_kv;        // [wq_a; wkv]
    // [wkv; wgate] of the compressor, then of the indexer's compressor and the indexer's weights_proj (CSA; the
    // latter where its format stacks)
    DeviceMatrix compressors;
    int64_t head_weights_row = -1;  // the weights_proj rows' first row in `compressors`, or −1
    DeviceMatrix queries;           // [wq_b; indexer wq_b] (CSA)
  };

  struct StepGraph {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    int kernels = 0;
    // Per layer, the nodes its launches added while capturing (a capture-time record: cudaGraphGetNodes promises
    // no order, so slicing its list would not say which layer a node belongs to).
    std::vector<std::vector<cudaGraphNode_t>> layer_nodes;
  };

  // Exactly one of `host` (uploaded here) and `device` (weights already on the device, moved in) is given.
  Impl(const ModelConfig& c, const ModelWeights* host, DeviceModelWeights* device, const CudaModelOptions& o)
      : config(c), options(o), context(DeviceContext::open(o.device)), pool(context.index()) {
    check(o.max_sequences >= 1 && o.max_context >= 1 && o.max_step_tokens >= 1, "CUDA model: max_sequences ",
          o.max_sequences, ", max_context ", o.max_context, ", max_step_tokens ", o.max_step_tokens,
          " must be positive");
    check(o.max_step_tokens <= 4096, "CUDA model: max_step_tokens ", o.max_step_tokens, " exceeds 4096");
    check(o.max_sequences <= 4096, "CUDA model: max_sequences ", o.max_sequences, " exceeds 4096");
    // A row's adjustments_begin is an int32 index into them.
    check(o.sampling_adjustments >= 0 && o.sampling_adjustments <= INT32_MAX, "CUDA model: --sampling-buffer (sampling_adjustments) ",
          o.sampling_adjustments, " outside [0, ", INT32_MAX, "]");
    stream = context.compute_stream();
    graphs_enabled = !cuda_graphs_disabled();
    const int L = c.num_layers;
    // A decode step of every sequence is one kernel pass too.
    step_capacity = std::max<int64_t>(o.max_step_tokens, o.max_sequences);

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

    // Sizes the step buffers need: indexer keys and attention slots bounded by the context (fixed, so a captured
    // step replays).
    const int64_t D = c.head_dim, H = c.num_heads;
    for (int i = 0; i < L; ++i) {
      if (!c.has_compressor(i)) continue;
      const int64_t ratio = c.compress_ratio(i);
      if (c.has_indexer(i)) {
        max_keys = std::max(max_keys, max_keys_of(i));
        max_compressed_slots = std::max<int64_t>(max_compressed_slots, c.indexer.topk);
      } else {
        max_compressed_slots = std::max(max_compressed_slots, o.max_context / ratio);
        if (o.max_context / ratio > 0) visible_entries[ratio] = VisibleEntries{};
      }
    }
    check(visible_entries.size() <= size_t(kMaxVisibleEntryLists), "CUDA model: ", visible_entries.size(),
          " HCA compression ratios; the attention index launch builds at most ", kMaxVisibleEntryLists);

    // Workspace sizes of the kernels over any step up to step_capacity tokens.
    attention_splits_max = 1;
    for (int64_t t = 1; t <= step_capacity; t = t < 64 ? t + 1 : t * 2)
      attention_splits_max = std::max(
          attention_splits_max, choose_sparse_attention_splits(t, int(H), int(D), kv.format,
                                                               c.window_size + max_compressed_slots,
                                                               context.info().multiprocessors));
    attention_workspace_bytes = 0;
    for (int64_t t = 1; t <= step_capacity; t = t < 64 ? t + 1 : t * 2)
      attention_workspace_bytes = std::max(attention_workspace_bytes,
                                           sparse_attention_workspace_bytes(t, int(H), int(D), attention_splits_max));
    hc_workspace_bytes = hc_projection_workspace_bytes(step_capacity, c.hidden_size, context.info().multiprocessors);
    moe_config = {c.hidden_size, c.moe.intermediate_size, c.moe.num_routed_experts, c.moe.experts_per_token,
                  float(c.moe.routed_scaling_factor), float(c.moe.swiglu_limit)};
    moe_workspace_size = moe_workspace_bytes(moe_config, step_capacity);
    top_k_workspace_size = top_k_workspace_bytes(int(step_capacity));

    // Memory plan: weights (unless resident already), KV cache, sequence state and step scratch, all known before
    // the first allocation; refused as a whole, naming each part, when it does not fit.
    std::vector<OwnedQuantizedMatrix> converted;
    std::optional<ModelWeights> host_weights;
    if (host != nullptr) {
      host_weights.emplace(gpu_linear_formats(*host, converted));
      plan.weights = plan_weight_upload(*host_weights).device_bytes;
      if (o.fuse_projections)
        plan.stacked = stacked_projection_bytes(*host_weights, o.stack_indexer_projections, stacks_indexer_queries(),
                                                [](const QuantizedMatrix& m) {
                                                  return m.rows > 0 ? m.stored_bytes() : 0;
                                                });
      linear_workspace_size = largest_linear_workspace(*host_weights, int(c.o_groups),
                                                       [](const QuantizedMatrix& m) { return shape_view(m); });
    } else {
      check(device->layers.size() == size_t(L), "CUDA model: the device weights have ", device->layers.size(),
            " layers, the config ", L);
      linear_workspace_size = largest_linear_workspace(*device, int(c.o_groups),
                                                       [](const DeviceMatrix& m) { return m.view(); });
      if (o.fuse_projections)
        plan.stacked = stacked_projection_bytes(*device, o.stack_indexer_projections, stacks_indexer_queries(),
                                                [](const DeviceMatrix& m) { return m.view().stored_bytes; });
    }
    plan.kv_cache = kv_cache_bytes(kv);
    plan.state = sequence_state_bytes(kv);
    plan.rope_tables = distinct_rope_sets() * round_up_256(rope_table_bytes(c.rope_head_dim / 2, o.max_context));
    plan.scratch = carve_scratch(nullptr);
    plan.sampling = carve_sampling(nullptr);
    plan.free = context.memory().free_bytes;
    check(plan.needed() <= plan.free, "the model needs ", plan.describe(), " on ", context.describe(), ": ",
          format_bytes(plan.needed() - plan.free), " short; lower --ctx (", o.max_context,
          " tokens per sequence) or the sequence count (", o.max_sequences, ")",
          host == nullptr ? "" : ", or use a larger GPU");

    if (host != nullptr) {
      WeightUploadOptions upload;
      upload.progress = o.progress;
      upload.keep_free_bytes =
          plan.stacked + plan.kv_cache + plan.state + plan.rope_tables + plan.scratch + plan.sampling;
      weights = upload_model_weights(*host_weights, pool, context.copy_stream(), upload);
    } else {
      weights = std::move(*device);
    }
    if (o.fuse_projections) stack_projections();
    for (int i = 0; i < L; ++i)
      moe.push_back(std::make_unique<DeviceMoeWeights>(weights.layers[size_t(i)].ffn, moe_config,
                                                       "layer " + std::to_string(i) + " ffn"));

    kv_cache = std::make_unique<KvCache>(kv);
    layers.resize(size_t(L));
    for (int i = 0; i < L; ++i) {
      if (!c.has_compressor(i)) continue;
      LayerState& s = layers[size_t(i)];
      const int64_t ratio = c.compress_ratio(i);
      s.compressor = std::make_unique<DeviceCompressorState>(ratio, D, c.has_indexer(i), o.max_sequences);
      if (c.has_indexer(i)) {
        s.indexer = std::make_unique<DeviceCompressorState>(ratio, c.indexer.head_dim, true, o.max_sequences);
        s.index_keys = DeviceBuffer(index_keys_bytes(i), "layer " + std::to_string(i) + " indexer keys");
      }
    }
    frequencies.reserve(size_t(L));
    for (int i = 0; i < L; ++i) {
      const std::vector<float>& f = rope[size_t(i)].frequencies();
      frequencies.emplace_back(f.size() * sizeof(float), "rope frequencies");
      frequencies.back().upload(f.data(), f.size() * sizeof(float));
    }
    build_rope_tables();

    scratch_buffer = DeviceBuffer(plan.scratch, "CUDA model step scratch");
    carve_scratch(scratch_buffer.data());
    // Counters and tickets the kernels expect zero once (they leave them zero).
    DSV4_CUDA_CHECK(cudaMemsetAsync(scratch_buffer.data(), 0, plan.scratch, stream));
    prepare_moe_workspace(scratch.moe_workspace, moe_workspace_size, stream);
    if (plan.sampling > 0) {
      sampling_buffer = DeviceBuffer(plan.sampling, "sampling buffers");
      carve_sampling(sampling_buffer.data());
    }

    DSV4_CUDA_CHECK(cudaHostAlloc(&staging, StepInputLayout(step_capacity, o.max_sequences).bytes,
                                  cudaHostAllocDefault));
    DSV4_CUDA_CHECK(cudaHostAlloc(&host_nan_flag, sizeof(int32_t), cudaHostAllocDefault));
    *host_nan_flag = 0;
    DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&inputs_copied, cudaEventDisableTiming));
    DSV4_CUDA_CHECK(cudaEventCreateWithFlags(&flag_copied, cudaEventDisableTiming));
    if (o.parallel_compressors) {
      branch_stream.emplace("compressor branch");
      for (cudaEvent_t* e : {&branch_forked, &qr_written, &branch_joined})
        DSV4_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    }
    slot_length.assign(size_t(o.max_sequences), kFreeSlot);
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // Builds `stacked` from the resident weights and releases the matrices it replaces, a layer at a time (so the
  // extra memory is one layer's stacked matrices at most).
  void stack_projections() {
    stacked.resize(size_t(config.num_layers));
    for (int i = 0; i < config.num_layers; ++i) {
      device_weights::Attention& a = weights.layers[size_t(i)].attn;
      StackedProjections& out = stacked[size_t(i)];
      const std::string name = "layer " + std::to_string(i);
      out.qr_kv = stack_rows({&a.wq_a, &a.wkv}, name + " [wq_a; wkv]", pool, stream);
      if (a.compressor) out.compressors = stack_compressors(a, out, name + " compressors");
      if (a.indexer && stacks_indexer_queries())
        out.queries = stack_rows({&a.wq_b, &a.indexer->wq_b}, name + " [wq_b; indexer wq_b]", pool, stream);
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));  // the copies have read the parts
      if (out.qr_kv.view().rows > 0) a.wq_a = DeviceMatrix(), a.wkv = DeviceMatrix();
      if (out.compressors.view().rows > 0) {
        a.compressor->wkv = DeviceMatrix(), a.compressor->wgate = DeviceMatrix();
        if (a.indexer) a.indexer->compressor.wkv = DeviceMatrix(), a.indexer->compressor.wgate = DeviceMatrix();
        if (out.head_weights_row >= 0) a.indexer->weights_proj = DeviceMatrix();
      }
      if (out.queries.view().rows > 0) a.wq_b = DeviceMatrix(), a.indexer->wq_b = DeviceMatrix();
    }
  }

  // The layer's compressor projections stacked: [wkv; wgate], in a CSA layer then the indexer compressor's and
  // (stack_indexer_projections, where its format stacks) the indexer's weights_proj, whose first row goes to
  // out.head_weights_row. An empty matrix where the parts do not stack.
  DeviceMatrix stack_compressors(const device_weights::Attention& a, StackedProjections& out, const std::string& what) {
    std::vector<const DeviceMatrix*> parts = {&a.compressor->wkv, &a.compressor->wgate};
    if (a.indexer) parts.insert(parts.end(), {&a.indexer->compressor.wkv, &a.indexer->compressor.wgate});
    if (a.indexer && options.stack_indexer_projections) {
      parts.push_back(&a.indexer->weights_proj);
      DeviceMatrix with_head_weights = stack_rows(parts, what + " with indexer weights_proj", pool, stream);
      if (with_head_weights.view().rows > 0) {
        out.head_weights_row = with_head_weights.view().rows - a.indexer->weights_proj.view().rows;
        return with_head_weights;
      }
      parts.pop_back();
    }
    return stack_rows(parts, what, pool, stream);
  }

  ~Impl() {
    // Destructors cannot throw; a failure here means the context is broken and later checked calls report it.
    cudaStreamSynchronize(stream);
    for (auto& [batch, g] : graphs) {
      if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
      if (g.graph != nullptr) cudaGraphDestroy(g.graph);
    }
    if (inputs_copied != nullptr) cudaEventDestroy(inputs_copied);
    if (flag_copied != nullptr) cudaEventDestroy(flag_copied);
    for (cudaEvent_t e : {branch_forked, qr_written, branch_joined})
      if (e != nullptr) cudaEventDestroy(e);
    if (host_nan_flag != nullptr) cudaFreeHost(host_nan_flag);
    if (staging != nullptr) cudaFreeHost(staging);
  }

  // Device memory the model takes, by part.
  struct MemoryPlan {
    size_t weights = 0;   // to upload (0 when the weights came resident)
    size_t stacked = 0;   // stacked projections (fuse_projections)
    size_t kv_cache = 0;  // page pool and table
    size_t state = 0;     // compressor states and indexer keys of every slot
    size_t rope_tables = 0;  // RoPE factors of every position below max_context, per distinct frequency set
    size_t scratch = 0;   // step activations and kernel workspaces
    size_t sampling = 0;  // the sampling kernel's inputs and results (sampling_adjustments)
    size_t free = 0;      // device memory free before the model allocated anything
    size_t needed() const { return weights + stacked + kv_cache + state + rope_tables + scratch + sampling; }
    std::string describe() const {
      return (weights > 0 ? format_bytes(weights) + " of weights + " : std::string()) +
             (stacked > 0 ? format_bytes(stacked) + " of stacked projections + " : std::string()) +
             format_bytes(kv_cache) + " of KV cache + " + format_bytes(state) + " of compressor and indexer state + " +
             format_bytes(rope_tables) + " of RoPE tables + " + format_bytes(scratch) + " of step workspace" +
             (sampling > 0 ? " + " + format_bytes(sampling) + " of sampling buffers" : std::string()) + " = " +
             format_bytes(needed()) + ", " + format_bytes(free) + " free";
    }
  };

  size_t kv_cache_bytes(const KvCacheConfig& kv) const {
    const KvEntryLayout layout = KvEntryLayout::make(kv.format, kv.head_dim, kv.rope_dim);
    const int64_t pages_per_array =
        std::max((kv.window_capacity + kv.page_rows - 1) / kv.page_rows,
                 (kv.max_compressed_rows + kv.page_rows - 1) / kv.page_rows);
    return round_up_256(size_t(kv.pages) * size_t(kv.page_rows) * size_t(layout.entry_bytes)) +
           round_up_256(size_t(kv.max_sequences) * size_t(kv.layers) * 2 * size_t(pages_per_array) * 4);
  }

  // The layers' frequency sets without repeats (SWA layers share one, CSA/HCA layers another): the first layer of
  // each set per layer.
  std::vector<int> rope_set_owner() const {
    std::vector<int> owner(rope.size());
    for (size_t i = 0; i < rope.size(); ++i) {
      owner[i] = int(i);
      for (size_t j = 0; j < i; ++j)
        if (rope[j].frequencies() == rope[i].frequencies()) {
          owner[i] = int(j);
          break;
        }
    }
    return owner;
  }

  size_t distinct_rope_sets() const {
    const std::vector<int> owner = rope_set_owner();
    size_t sets = 0;
    for (size_t i = 0; i < owner.size(); ++i) sets += owner[i] == int(i) ? 1 : 0;
    return sets;
  }

  // One RoPE table (rope.hpp) per distinct frequency set, max_context rows: the small kernels of a step read their
  // factors there instead of taking a double sincos per pair (the same values).
  void build_rope_tables() {
    const std::vector<int> owner = rope_set_owner();
    const int64_t pairs = config.rope_head_dim / 2;
    layer_rope_table.assign(owner.size(), nullptr);
    if (pairs == 0) return;  // no rotated dims: the kernels take no table
    for (size_t i = 0; i < owner.size(); ++i) {
      if (owner[i] != int(i)) {
        layer_rope_table[i] = layer_rope_table[size_t(owner[i])];
        continue;
      }
      rope_tables.emplace_back(rope_table_bytes(pairs, options.max_context), "RoPE table");
      float2* table = rope_tables.back().as<float2>();
      run_rope_table({.table = table, .frequencies = frequencies[i].as<float>(), .pairs = pairs,
                      .positions = options.max_context, .stream = stream});
      layer_rope_table[i] = table;
    }
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // The indexer keys stay fp8 (e4m3 + an fp32 scale per key) where the reference stores them so (its fp4-rounded
  // keys are exact in that format, indexer.hpp): half the bytes of bf16 keys.
  bool fp8_index_keys() const { return reference() && options.fp8_indexer_keys; }

  // Bytes of one indexer key as stored: bf16 values, or e4m3 values and an fp32 scale.
  size_t index_key_bytes() const {
    const size_t dim = size_t(config.indexer.head_dim);
    return fp8_index_keys() ? dim + sizeof(float) : dim * 2;
  }
  // Bytes of a layer's indexer keys of every slot: the keys, then (fp8) their scales from index_key_scales_offset.
  size_t index_keys_bytes(int layer) const {
    const size_t keys = size_t(options.max_sequences) * size_t(max_keys_of(layer));
    if (!fp8_index_keys()) return keys * index_key_bytes();
    return index_key_scales_offset(layer) + keys * sizeof(float);
  }
  size_t index_key_scales_offset(int layer) const {
    return round_up_256(size_t(options.max_sequences) * size_t(max_keys_of(layer)) * size_t(config.indexer.head_dim));
  }

  size_t sequence_state_bytes(const KvCacheConfig& kv) const {
    size_t bytes = 0;
    for (int i = 0; i < config.num_layers; ++i) {
      if (!config.has_compressor(i)) continue;
      const int64_t ratio = config.compress_ratio(i);
      bytes += round_up_256(
          DeviceCompressorState::bytes_for(ratio, config.head_dim, config.has_indexer(i), kv.max_sequences));
      if (config.has_indexer(i))
        bytes += round_up_256(DeviceCompressorState::bytes_for(ratio, config.indexer.head_dim, true,
                                                               kv.max_sequences)) +
                 round_up_256(index_keys_bytes(i));
    }
    return bytes;
  }

  // Lays the step scratch out from `base` (null: a dry run); returns its bytes.
  size_t carve_scratch(void* base) {
    const ModelConfig& c = config;
    const int64_t T = step_capacity, d = c.hidden_size, n = c.mhc.hc_mult, H = c.num_heads, D = c.head_dim;
    const int64_t IH = c.indexer.num_heads, ID = c.indexer.head_dim, cw = 2 * std::max<int64_t>(D, ID);
    Carver k(base);
    Scratch& s = scratch;
    s.inputs = k.take<uint8_t>(int64_t(StepInputLayout(T, options.max_sequences).bytes));
    s.X = k.take<float>(T * n * d), s.y = k.take<float>(T * d);
    for (int i = 0; i < 2; ++i) s.post[i] = k.take<float>(T * n), s.comb[i] = k.take<float>(T * n * n);
    s.x_bf16 = k.take<bf16>(T * d), s.u = k.take<float>(T * d);
    s.qr = k.take<float>(T * c.q_lora_rank), s.qr_bf16 = k.take<bf16>(T * c.q_lora_rank);
    s.q = k.take<float>(T * H * D), s.q_bf16 = k.take<bf16>(T * H * D);
    s.kv = k.take<float>(T * D), s.o = k.take<bf16>(T * H * D);
    const bool stacks_queries = stacks_indexer_queries() && c.indexer.num_heads > 0;
    s.stacked_queries = k.take<float>(stacks_queries ? std::min(T, kStackedQueryMaxTokens) * (H * D + IH * ID) : 0);
    s.qr_kv = k.take<float>(options.fuse_projections ? T * (c.q_lora_rank + D) : 0);
    s.compressor_projections = k.take<float>(options.fuse_projections ? T * stacked_compressor_rows() : 0);
    s.z = k.take<float>(T * c.o_proj_dim()), s.z_bf16 = k.take<bf16>(T * c.o_proj_dim());
    s.out = k.take<float>(T * d);
    s.ckv = k.take<float>(T * cw), s.cgate = k.take<float>(T * cw);
    s.qi = k.take<float>(T * IH * ID), s.qi_bf16 = k.take<bf16>(T * IH * ID);
    s.qi_fp8 = k.take<uint8_t>(fp8_index_keys() ? T * IH * ID : 0);
    s.qi_scales = k.take<float>(fp8_index_keys() ? T * IH : 0);
    s.head_weights = k.take<float>(T * IH);
    s.scores = k.take<float>(T * std::max<int64_t>(max_keys, 1));
    s.selected = k.take<int32_t>(T * std::max(c.indexer.topk, 1)), s.counts = k.take<int32_t>(T);
    s.window_index = k.take<int32_t>(T * c.window_size);
    for (auto& [ratio, lists] : visible_entries) {
      lists.index = k.take<int32_t>(T * (options.max_context / ratio));
      lists.counts = k.take<int32_t>(T);
    }
    s.X_last = k.take<float>(options.max_sequences * n * d);
    s.h = k.take<float>(T * d), s.h_bf16 = k.take<bf16>(T * d);
    s.logits = k.take<float>(T * c.vocab_size), s.nan_flag = k.take<int32_t>(1);
    s.attention_workspace = k.take<uint8_t>(int64_t(attention_workspace_bytes));
    s.linear_workspace = k.take<uint8_t>(int64_t(linear_workspace_size));
    s.branch_linear_workspace = k.take<uint8_t>(options.parallel_compressors ? int64_t(linear_workspace_size) : 0);
    s.hc_workspace = k.take<uint8_t>(int64_t(hc_workspace_bytes));
    s.moe_workspace = k.take<uint8_t>(int64_t(moe_workspace_size));
    s.top_k_workspace = k.take<uint8_t>(int64_t(top_k_workspace_size));
    return k.bytes();
  }

  // Lays the sampling buffers out from `base` (null: a dry run); returns their bytes (0 without
  // sampling_adjustments).
  size_t carve_sampling(void* base) {
    if (options.sampling_adjustments == 0) return 0;
    Carver k(base);
    const int64_t rows = options.max_sequences;
    sampling.inputs_bytes = size_t(rows) * sizeof(sampling::RowParams) +
                            size_t(options.sampling_adjustments) * sizeof(sampling::LogitAdjustment);
    sampling.inputs = k.take<uint8_t>(int64_t(sampling.inputs_bytes));
    sampling.results = k.take<SampledToken>(rows);
    return k.bytes();
  }

  // The widest stacked compressor projection: [wkv; wgate] of width coff·c each, twice in CSA layers (the indexer's)
  // and then the indexer's weights_proj (stack_indexer_projections).
  int64_t stacked_compressor_rows() const {
    int64_t rows = 0;
    for (int i = 0; i < config.num_layers; ++i) {
      if (!config.has_compressor(i)) continue;
      const int64_t D = config.head_dim, ID = config.indexer.head_dim;
      const int64_t head_weights = options.stack_indexer_projections ? config.indexer.num_heads : 0;
      rows = std::max(rows, config.has_indexer(i) ? 2 * (2 * D) + 2 * (2 * ID) + head_weights : 2 * D);
    }
    return rows;
  }

  void reset_slot_state(int slot) {
    for (LayerState& s : layers) {
      if (s.compressor) s.compressor->reset(slot, stream);
      if (s.indexer) s.indexer->reset(slot, stream);
    }
  }

  // Where a launch goes: the step's stream, or the compressors' branch (parallel_compressors), whose linear launches
  // take a workspace of their own as they may run beside the step stream's.
  struct Lane {
    cudaStream_t stream;
    void* linear_workspace;
  };
  Lane main_lane() const { return {stream, scratch.linear_workspace}; }
  Lane branch_lane() const { return {branch_stream->get(), scratch.branch_linear_workspace}; }

  // A linear call of `w` over T tokens without its input and output.
  LinearCall linear_call(const DeviceMatrixView& w, std::string_view what, int64_t T, const Lane& lane) {
    LinearCall call;
    call.weight = w;
    call.what = what;
    call.tokens = T;
    call.workspace = lane.linear_workspace;
    call.workspace_bytes = linear_workspace_size;
    call.stream = lane.stream;
    return call;
  }

  void linear_on(const Lane& lane, const DeviceMatrixView& w, std::string_view what, const bf16* x, int64_t x_stride,
                 int64_t T, float* y, int64_t y_stride, int groups = 1) {
    LinearCall call = linear_call(w, what, T, lane);
    call.x = x, call.x_row_stride = x_stride, call.y = y, call.y_row_stride = y_stride, call.groups = groups;
    run_linear(call);
  }

  void linear(const DeviceMatrixView& w, std::string_view what, const bf16* x, int64_t x_stride, int64_t T, float* y,
              int64_t y_stride, int groups = 1) {
    linear_on(main_lane(), w, what, x, x_stride, T, y, y_stride, groups);
  }

  // A linear layer reading q_norm(qr): through its RMSNorm prologue when `prologue`, else qr_bf16 (run_rms_norm's).
  void linear_of_normed_qr(const Lane& lane, const DeviceMatrixView& w, std::string_view what, bool prologue,
                           const float* qr, int64_t qr_stride, const float* q_norm_weight, int64_t T, float* y,
                           int64_t y_stride) {
    if (!prologue) return linear_on(lane, w, what, scratch.qr_bf16, config.q_lora_rank, T, y, y_stride);
    LinearCall call = linear_call(w, what, T, lane);
    call.norm_x = qr, call.x_row_stride = qr_stride, call.norm_weight = q_norm_weight;
    call.norm_eps = float(config.rms_norm_eps), call.y = y, call.y_row_stride = y_stride;
    run_linear(call);
  }

  void rms_norm(const float* x, const float* weight, int64_t rows, int64_t width, float* y, bf16* y_bf16) {
    RmsNormParams p;
    p.x = x, p.weight = weight, p.rows = rows, p.width = width, p.eps = float(config.rms_norm_eps);
    p.y = y, p.y_bf16 = y_bf16, p.stream = stream;
    run_rms_norm(p);
  }

  // The RMSNorm of a site's output y for its sub-block: attn_norm into the linear layers' bf16 input, ffn_norm into
  // the MoE's fp32 input.
  struct SiteNorm {
    const float* weight;
    float* y;      // or null
    bf16* y_bf16;  // or null
  };

  SiteNorm attn_norm_of(int layer) {
    return {floats(weights.layers[size_t(layer)].attn_norm), nullptr, scratch.x_bf16};
  }

  // The site's projection writes y (scratch.y), or with norms_in_mhc the normed y straight into the norm's outputs.
  template <class SiteParams>
  void direct_site_output(SiteParams& p, const SiteNorm& norm) {
    p.y = scratch.y;
    if (!options.norms_in_mhc) return;
    p.out_norm_weight = norm.weight;
    p.y = norm.y != nullptr ? norm.y : scratch.y, p.y_bf16 = norm.y_bf16;
  }

  // The norm of a site's y, unless its launch applied it already.
  void finish_site_norm(int64_t T, const SiteNorm& norm) {
    if (!options.norms_in_mhc) rms_norm(scratch.y, norm.weight, T, config.hidden_size, norm.y, norm.y_bf16);
  }

  // hc_pre of the first site, then its norm; its post and comb go to set 0.
  void hc_pre(const device_weights::HyperConnection& w, int64_t T, const SiteNorm& norm) {
    HcPreParams p;
    p.X = scratch.X, p.fn = floats(w.fn), p.base = floats(w.base), p.scale = floats(w.scale);
    p.tokens = T, p.hidden = config.hidden_size, p.streams = config.mhc.hc_mult;
    p.sinkhorn_iters = config.mhc.sinkhorn_iters, p.hc_eps = float(config.mhc.eps);
    p.norm_eps = float(config.rms_norm_eps), p.round_to_bf16 = reference();
    p.post = scratch.post[0], p.comb = scratch.comb[0];
    direct_site_output(p, norm);
    p.workspace = scratch.hc_workspace, p.workspace_bytes = hc_workspace_bytes, p.stream = stream;
    run_hc_pre(p);
    finish_site_norm(T, norm);
  }

  // hc_post of the sub-block that read post/comb set `set`, fused with the next site's hc_pre (into the other set)
  // and followed by its norm when there is one.
  void hc_post(int64_t T, int set, const device_weights::HyperConnection* next, const SiteNorm& norm) {
    if (next == nullptr) {
      HcPostParams p;
      p.out = scratch.out, p.X = scratch.X, p.post = scratch.post[set], p.comb = scratch.comb[set];
      p.tokens = T, p.hidden = config.hidden_size, p.streams = config.mhc.hc_mult, p.round_to_bf16 = reference();
      p.X_out = scratch.X, p.stream = stream;
      run_hc_post(p);
      return;
    }
    HcPostPreParams p;
    p.out = scratch.out, p.X = scratch.X, p.post = scratch.post[set], p.comb = scratch.comb[set];
    p.X_out = scratch.X;
    p.next_fn = floats(next->fn), p.next_base = floats(next->base), p.next_scale = floats(next->scale);
    p.tokens = T, p.hidden = config.hidden_size, p.streams = config.mhc.hc_mult;
    p.sinkhorn_iters = config.mhc.sinkhorn_iters, p.hc_eps = float(config.mhc.eps);
    p.norm_eps = float(config.rms_norm_eps), p.round_to_bf16 = reference();
    p.next_post = scratch.post[1 - set], p.next_comb = scratch.comb[1 - set];
    direct_site_output(p, norm);
    p.workspace = scratch.hc_workspace, p.workspace_bytes = hc_workspace_bytes, p.stream = stream;
    run_hc_post_pre(p);
    finish_site_norm(T, norm);
  }

  bool reference() const { return options.numerics == NumericsMode::Reference; }

  // [wq_b; indexer wq_b] stacked (stack_indexer_projections), unless the indexer's wq_b runs on the compressors'
  // branch (parallel_indexer).
  bool stacks_indexer_queries() const {
    return options.fuse_projections && options.stack_indexer_projections &&
           !(options.parallel_compressors && options.parallel_indexer);
  }

  // Compressed entries a sequence may hold. An indexer layer keeps at least one key slot: a context shorter than the
  // ratio never completes a key, but the indexer's compressor still writes to an addressable key array.
  int64_t max_keys_of(int layer) const {
    const int64_t keys = options.max_context / config.compress_ratio(layer);
    return config.has_indexer(layer) ? std::max<int64_t>(1, keys) : keys;
  }

  // One compressor (main or indexer) over the step's runs on `lane`: projections (unless `projections` holds them
  // already: the stacked compressors' output, this compressor's kv and gate from column `column`), then the pooling
  // kernel's parameters.
  CompressorParams compress(const device_weights::Compressor& w, const DeviceCompressorState& state, int layer,
                            int64_t head_dim, const StepShape& shape, const StepInputs& in, const char* what,
                            const Lane& lane, const float* projections = nullptr, int64_t column = 0,
                            int64_t row_stride = 0) {
    const int64_t width = (config.has_indexer(layer) ? 2 : 1) * head_dim;
    CompressorParams p;
    if (projections != nullptr) {
      p.kv = projections + column, p.gate = projections + column + width, p.row_stride = row_stride;
    } else {
      const std::string name = "layer " + std::to_string(layer) + " " + what;
      linear_on(lane, w.wkv.view(), name + " wkv", scratch.x_bf16, config.hidden_size, shape.tokens, scratch.ckv,
                width);
      linear_on(lane, w.wgate.view(), name + " wgate", scratch.x_bf16, config.hidden_size, shape.tokens,
                scratch.cgate, width);
      p.kv = scratch.ckv, p.gate = scratch.cgate;
    }
    p.head_dim = head_dim, p.ratio = config.compress_ratio(layer), p.overlapping = config.has_indexer(layer);
    p.norm_eps = float(config.rms_norm_eps), p.round_pooled_to_bf16 = reference();
    p.runs = in.runs, p.runs_ready_at_launch = options.compressor_runs_at_launch, p.run_count = shape.runs;
    p.max_run_tokens = shape.max_run_tokens, p.ape = floats(w.ape), p.norm_weight = floats(w.norm);
    p.rope_table = layer_rope_table[size_t(layer)], p.rope_dim = config.rope_head_dim;
    p.state = state.view(), p.stream = lane.stream;
    return p;
  }

  // What a layer's compressor pools read and a CSA layer's indexer reads from its compressors' launches: the stacked
  // projections (null: separate matrices, which the pools' caller projects itself); the head weights, where the
  // indexer's weights_proj is stacked under the compressors' projections (else null: the indexer runs weights_proj
  // itself).
  struct CompressorOutputs {
    const float* projections = nullptr;  // [main kv | main gate | indexer kv | indexer gate], coff·c each
    int64_t projection_stride = 0;
    const float* head_weights = nullptr;
    int64_t head_weights_stride = 0;
    bool queries_prepared = false;  // the indexer's query preparation ran in the compressors' launch
  };

  // The indexer's query preparation (RoPE, rounding) of `qi` (rows of `qi_row_stride`) into scratch.qi_bf16, or
  // qi_fp8 + qi_scales (the keys' format).
  IndexerPrepareParams indexer_prepare(int layer, const StepShape& shape, const StepInputs& in, const Lane& lane,
                                       const float* qi, int64_t qi_row_stride) {
    const ModelConfig& c = config;
    IndexerPrepareParams prepare;
    prepare.input = qi, prepare.input_row_stride = qi_row_stride;
    if (fp8_index_keys())
      prepare.output_fp8 = scratch.qi_fp8, prepare.output_scales = scratch.qi_scales;
    else
      prepare.output = scratch.qi_bf16;
    prepare.tokens = shape.tokens, prepare.heads = c.indexer.num_heads, prepare.head_dim = c.indexer.head_dim;
    prepare.positions = in.positions, prepare.rope_table = layer_rope_table[size_t(layer)];
    prepare.rope_dim = c.rope_head_dim, prepare.reference_rounding = reference(), prepare.stream = lane.stream;
    return prepare;
  }

  // The layer's stacked compressor projections over the step, one launch on `lane`; none where fuse_projections did
  // not stack them (the pools' caller then projects each compressor itself).
  CompressorOutputs compressor_projections(int layer, const StepShape& shape, const Lane& lane) {
    const StackedProjections* stack = stacked.empty() ? nullptr : &stacked[size_t(layer)];
    CompressorOutputs out;
    if (stack != nullptr && stack->compressors.view().rows > 0) {
      out.projection_stride = stack->compressors.view().rows;
      linear_on(lane, stack->compressors.view(), "layer " + std::to_string(layer) + " compressors", scratch.x_bf16,
                config.hidden_size, shape.tokens, scratch.compressor_projections, out.projection_stride);
      out.projections = scratch.compressor_projections;
      if (stack->head_weights_row >= 0) out.head_weights = out.projections + stack->head_weights_row;
    }
    out.head_weights_stride = out.projection_stride;
    return out;
  }

  // The layer's compressor pools over the step on `lane`, after compressor_projections (`out`; separate projections
  // are launched here), whose epilogue writes the new entries straight into the compressed KV arrays (stored, and in
  // reference numerics quantised) and, in a CSA layer, the indexer's keys. With `prepare` (its queries written
  // already), the indexer's query preparation rides in the pools' launch where the two pools share one
  // (out.queries_prepared).
  void pool_compressors(int layer, const StepShape& shape, const StepInputs& in, const Lane& lane,
                        CompressorOutputs& out, const IndexerPrepareParams* prepare = nullptr) {
    const ModelConfig& c = config;
    const device_weights::Attention& w = weights.layers[size_t(layer)].attn;
    const int64_t D = c.head_dim, ID = c.indexer.head_dim;
    LayerState& state = layers[size_t(layer)];
    const float* projections = out.projections;
    const int64_t projection_stride = out.projection_stride;
    CompressorParams main = compress(*w.compressor, *state.compressor, layer, D, shape, in, "compressor", lane,
                                     projections, 0, projection_stride);
    main.cache = kv_cache->view(), main.cache_layer = layer;
    // Both compressors of a CSA layer in one launch when they read the stacked projections (the separate ones
    // share the projection buffers, so each pool must run before the next compressor's projections).
    const bool one_pool_launch = options.fuse_compressor_pools && w.indexer && projections != nullptr;
    if (!one_pool_launch) run_compressor(main);
    if (!w.indexer) return;
    const int64_t coff = 2, keys = max_keys_of(layer);
    CompressorParams index = compress(w.indexer->compressor, *state.indexer, layer, ID, shape, in,
                                      "indexer compressor", lane, projections, 2 * coff * D, projection_stride);
    index.stored_rounding = reference() ? CompressorStoredRounding::IndexerFp4 : CompressorStoredRounding::None;
    if (fp8_index_keys()) {
      index.slot_entries_fp8 = state.index_keys.as<uint8_t>(), index.slot_entry_stride = keys * ID;
      index.slot_entry_scales = reinterpret_cast<float*>(state.index_keys.as<uint8_t>() +
                                                         index_key_scales_offset(layer));
      index.slot_scale_stride = keys;
    } else {
      index.slot_entries_bf16 = state.index_keys.as<bf16>(), index.slot_entry_stride = keys * ID;
    }
    index.slot_entry_capacity = keys;
    if (one_pool_launch) {
      const CompressorParams both[] = {main, index};
      if (prepare != nullptr) {
        run_compressors(both, *prepare);
        out.queries_prepared = true;
      } else {
        run_compressors(both);
      }
    } else {
      run_compressor(index);
    }
  }

  // A CSA layer's indexer on `lane`, after its compressors (which wrote the keys): the queries `qi` (rows of
  // `qi_row_stride`) rotated and rounded, scored against the keys, and each query's top-k compressed entries
  // selected into scratch.selected / counts.
  void index_layer(int layer, const StepShape& shape, const StepInputs& in, const Lane& lane, const float* qi,
                   int64_t qi_row_stride, const CompressorOutputs& compressors) {
    const ModelConfig& c = config;
    const device_weights::Indexer& ix = *weights.layers[size_t(layer)].attn.indexer;
    const int64_t T = shape.tokens, IH = c.indexer.num_heads, ID = c.indexer.head_dim, keys = max_keys_of(layer);
    Scratch& s = scratch;
    IndexerScoresParams scores;
    if (!compressors.queries_prepared)
      run_indexer_prepare(indexer_prepare(layer, shape, in, lane, qi, qi_row_stride));
    if (fp8_index_keys())
      scores.q_fp8 = s.qi_fp8, scores.q_scales = s.qi_scales;
    else
      scores.q = s.qi_bf16;
    scores.head_weights = compressors.head_weights, scores.head_weights_row_stride = compressors.head_weights_stride;
    if (compressors.head_weights == nullptr) {
      linear_on(lane, ix.weights_proj.view(), "layer " + std::to_string(layer) + " indexer weights_proj", s.x_bf16,
                c.hidden_size, T, s.head_weights, IH);
      scores.head_weights = s.head_weights, scores.head_weights_row_stride = IH;
    }
    // The keys of the step's one sequence (a prefill chunk: queries share key loads), or each query's through its slot.
    const DeviceBuffer& key_buffer = layers[size_t(layer)].index_keys;
    const int64_t first_slot = shape.single_slot >= 0 ? shape.single_slot : 0;
    if (shape.single_slot < 0)
      scores.sequence_slots = in.slots, scores.keys_slot_stride = keys * ID, scores.slot_count = options.max_sequences;
    if (fp8_index_keys()) {
      const auto* scales = reinterpret_cast<const float*>(key_buffer.as<uint8_t>() + index_key_scales_offset(layer));
      scores.keys_fp8 = key_buffer.as<uint8_t>() + size_t(first_slot) * size_t(keys * ID);
      scores.key_scales = scales + size_t(first_slot) * size_t(keys);
      if (shape.single_slot < 0) scores.key_scales_slot_stride = keys;
    } else {
      scores.keys = key_buffer.as<bf16>() + size_t(first_slot) * size_t(keys * ID);
    }
    scores.key_count = keys;
    scores.positions = in.positions, scores.tokens = T, scores.heads = IH, scores.head_dim = ID;
    scores.ratio = c.compress_ratio(layer), scores.scores = s.scores, scores.score_stride = max_keys;
    scores.stream = lane.stream;
    TopKParams top;
    top.scores = s.scores, top.row_stride = max_keys, top.candidates = keys, top.queries = int(T);
    top.k = c.indexer.topk, top.positions = in.positions, top.ratio = c.compress_ratio(layer);
    top.selected = s.selected, top.counts = s.counts, top.nan_flag = s.nan_flag, top.workspace = s.top_k_workspace;
    top.workspace_bytes = top_k_workspace_size, top.stream = lane.stream;
    if (options.indexer_top_k_in_scores) {
      run_indexer_scores_top_k(scores, top);
    } else {
      run_indexer_scores(scores);
      run_top_k(top);
    }
  }

  // The compressed entries a layer's attention reads (bounds fixed by the buffers; what a query sees follows from
  // its position on the device): a CSA layer's top-k, an HCA layer's visible entries of its ratio.
  struct CompressedEntries {
    int slots = 0;
    const int32_t* index = nullptr;
    const int32_t* counts = nullptr;  // per query: the slots it reads
  };

  CompressedEntries compressed_entries(int layer) const {
    if (config.has_indexer(layer)) return {config.indexer.topk, scratch.selected, scratch.counts};
    const int64_t keys = max_keys_of(layer);
    if (keys == 0) return {};
    const VisibleEntries& visible = visible_entries.at(config.compress_ratio(layer));
    return {int(keys), visible.index, visible.counts};
  }

  void attention(int layer, const StepShape& shape, const StepInputs& in) {
    const ModelConfig& c = config;
    const device_weights::Attention& w = weights.layers[size_t(layer)].attn;
    const int64_t T = shape.tokens, d = c.hidden_size, H = c.num_heads, D = c.head_dim, ql = c.q_lora_rank;
    const std::string name = "layer " + std::to_string(layer);
    const float* freqs = frequencies[size_t(layer)].as<float>();
    Scratch& s = scratch;
    const int64_t IH = c.indexer.num_heads, ID = c.indexer.head_dim;
    const float* q_norm_weight = floats(w.q_norm);

    // With parallel_compressors the compressors (with parallel_indexer also a CSA layer's indexer) run on the branch
    // stream forked here, beside the query path; the attention waits for the branch (events in a captured step
    // become graph edges). Every kernel waits for its prior grids before reading what they wrote, so a programmatic
    // edge that the capture makes across streams still orders the data.
    // With indexer_prepare_in_compressors on the branch, the pools wait there for the indexer's queries.
    const bool branch = options.parallel_compressors && w.compressor;
    const bool index_on_branch = branch && options.parallel_indexer && w.indexer;
    const bool prepare_in_branch_pools = index_on_branch && options.indexer_prepare_in_compressors;
    std::optional<CompressorOutputs> compressors;
    if (branch) {
      DSV4_CUDA_CHECK(cudaEventRecord(branch_forked, stream));
      DSV4_CUDA_CHECK(cudaStreamWaitEvent(branch_stream->get(), branch_forked));
      compressors = compressor_projections(layer, shape, branch_lane());
      if (!prepare_in_branch_pools) pool_compressors(layer, shape, in, branch_lane(), *compressors);
    }

    // Queries: per-head-normalised wq_b · q_norm(wq_a · x), rotated. The new tokens' K = V vectors go into the window
    // ring (norm, RoPE, stored rounding in one kernel). With the stacked [wq_a; wkv] one projection gives qr and kv,
    // and one norm rides in the insert's launch: q_norm, or with wq_b's norm prologue the queries' per-head norm.
    const StackedProjections* stack = stacked.empty() ? nullptr : &stacked[size_t(layer)];
    const bool prologue = options.q_norm_prologue && T <= kNormPrologueMaxTokens;
    KvInsertParams insert;
    insert.cache = kv_cache->view(), insert.array = KvArray::Window, insert.layer = layer, insert.rows = T;
    insert.norm_weight = floats(w.kv_norm), insert.eps = float(c.rms_norm_eps);
    insert.rope_table = layer_rope_table[size_t(layer)], insert.sequence_slots = in.slots;
    insert.positions = in.positions, insert.dest_rows = in.ring_rows, insert.stream = stream;
    const float* qr = s.qr;
    int64_t qr_stride = ql;
    if (stack != nullptr && stack->qr_kv.view().rows > 0) {
      linear_on(main_lane(), stack->qr_kv.view(), name + " [wq_a; wkv]", s.x_bf16, d, T, s.qr_kv, ql + D);
      qr = s.qr_kv, qr_stride = ql + D;
      insert.x = s.qr_kv + ql, insert.x_row_stride = ql + D;
    } else {
      linear(w.wq_a.view(), name + " wq_a", s.x_bf16, d, T, s.qr, ql);
    }
    const bool insert_carries_a_norm = insert.x != nullptr && D <= kKvInsertFusedNormMaxHeadDim;
    bool inserted = false;
    if (!prologue) {
      RmsNormParams qr_norm;
      qr_norm.x = qr, qr_norm.x_row_stride = qr_stride, qr_norm.weight = floats(w.q_norm), qr_norm.rows = T;
      qr_norm.width = ql, qr_norm.eps = float(c.rms_norm_eps), qr_norm.y_bf16 = s.qr_bf16, qr_norm.stream = stream;
      if (insert_carries_a_norm) {
        insert.fused_norm = qr_norm;
        run_kv_insert(insert);
        inserted = true;
      } else {
        run_rms_norm(qr_norm);
      }
    }
    if (index_on_branch) {
      // The indexer's queries read q_norm(qr): its wq_b joins the branch once qr (or its norm) is written.
      DSV4_CUDA_CHECK(cudaEventRecord(qr_written, stream));
      DSV4_CUDA_CHECK(cudaStreamWaitEvent(branch_stream->get(), qr_written));
      const Lane lane = branch_lane();
      linear_of_normed_qr(lane, w.indexer->wq_b.view(), name + " indexer wq_b", prologue, qr, qr_stride,
                          q_norm_weight, T, s.qi, IH * ID);
      if (prepare_in_branch_pools) {
        const IndexerPrepareParams prepare = indexer_prepare(layer, shape, in, lane, s.qi, IH * ID);
        pool_compressors(layer, shape, in, lane, *compressors, &prepare);
      }
      index_layer(layer, shape, in, lane, s.qi, IH * ID, *compressors);
    }
    // The query projections: wq_b and, in CSA layers, the indexer's wq_b (the same input) into q and qi; one launch
    // where they are stacked (up to kStackedQueryMaxTokens tokens: q's per-head norm and the indexer then read their
    // slices of the stacked rows in place).
    const float* q_projected = s.q;  // the per-head norm's input, rows of q_row_stride
    int64_t q_row_stride = H * D;
    float* qi = s.qi;
    int64_t qi_row_stride = IH * ID;
    if (stack != nullptr && stack->queries.view().rows > 0) {
      const DeviceMatrixView queries = stack->queries.view();
      if (T <= kStackedQueryMaxTokens) {
        linear_of_normed_qr(main_lane(), queries, name + " [wq_b; indexer wq_b]", prologue, qr, qr_stride,
                            q_norm_weight, T, s.stacked_queries, queries.rows);
        q_projected = s.stacked_queries, q_row_stride = queries.rows;
        qi = s.stacked_queries + H * D, qi_row_stride = queries.rows;
      } else {
        linear_of_normed_qr(main_lane(), row_slice(queries, 0, H * D), name + " wq_b", prologue, qr, qr_stride,
                            q_norm_weight, T, s.q, H * D);
        linear_of_normed_qr(main_lane(), row_slice(queries, H * D, IH * ID), name + " indexer wq_b", prologue, qr,
                            qr_stride, q_norm_weight, T, s.qi, IH * ID);
      }
    } else {
      linear_of_normed_qr(main_lane(), w.wq_b.view(), name + " wq_b", prologue, qr, qr_stride, q_norm_weight, T, s.q,
                          H * D);
      if (w.indexer && !index_on_branch)
        linear_of_normed_qr(main_lane(), w.indexer->wq_b.view(), name + " indexer wq_b", prologue, qr, qr_stride,
                            q_norm_weight, T, s.qi, IH * ID);
    }
    RmsNormParams q_norm;  // per head, no weight, then RoPE: one launch
    q_norm.x = q_projected, q_norm.x_group_stride = q_row_stride, q_norm.rows = T * H, q_norm.width = D;
    q_norm.eps = float(c.rms_norm_eps), q_norm.y_bf16 = s.q_bf16;
    q_norm.rope_table = layer_rope_table[size_t(layer)], q_norm.positions = in.positions;
    q_norm.rope_dim = c.rope_head_dim;
    q_norm.rows_per_position = H, q_norm.stream = stream;
    q_norm.cta_rows = options.q_norm_cta_rows && T * H <= kQNormCtaRowsMaxRows;
    if (!inserted && insert_carries_a_norm) {
      insert.fused_norm = q_norm;
      run_kv_insert(insert);
      inserted = true;
    } else {
      run_rms_norm(q_norm);
    }
    if (!inserted) {
      if (insert.x == nullptr) {
        linear(w.wkv.view(), name + " wkv", s.x_bf16, d, T, s.kv, D);
        insert.x = s.kv;
      }
      run_kv_insert(insert);
    }

    if (branch) {
      // The branch joins: the indexer (where it stayed on this stream) and the attention read what it wrote.
      DSV4_CUDA_CHECK(cudaEventRecord(branch_joined, branch_stream->get()));
      DSV4_CUDA_CHECK(cudaStreamWaitEvent(stream, branch_joined));
    }

    // Compressed entries of the step (emitted first; each query sees only those complete at its position).
    CompressedEntries compressed;
    if (w.compressor) {
      if (!branch) {
        std::optional<IndexerPrepareParams> prepare;
        if (w.indexer && options.indexer_prepare_in_compressors)
          prepare = indexer_prepare(layer, shape, in, main_lane(), qi, qi_row_stride);
        compressors = compressor_projections(layer, shape, main_lane());
        pool_compressors(layer, shape, in, main_lane(), *compressors, prepare ? &*prepare : nullptr);
      }
      if (w.indexer && !index_on_branch) index_layer(layer, shape, in, main_lane(), qi, qi_row_stride, *compressors);
      compressed = compressed_entries(layer);
    }

    SparseAttentionParams a;
    a.cache = kv_cache->view(), a.layer = layer, a.tokens = T, a.heads = int(H);
    a.softmax_scale = 1.0f / std::sqrt(float(D)), a.q = s.q_bf16, a.q_dtype = AttentionDtype::Bf16;
    a.attn_sink = floats(w.sink), a.sequence_slots = in.slots, a.positions = in.positions, a.rope_frequencies = freqs;
    a.window_index = s.window_index, a.window_slots = c.window_size;
    a.compressed_index = compressed.index, a.compressed_slots = compressed.slots;
    a.compressed_counts = compressed.counts;
    a.out = s.o, a.out_dtype = AttentionDtype::Bf16;
    a.splits = std::min(attention_splits_max,
                        choose_sparse_attention_splits(T, int(H), int(D), kv_cache->layout().format,
                                                       c.window_size + compressed.slots,
                                                       context.info().multiprocessors));
    a.workspace = s.attention_workspace, a.workspace_bytes = attention_workspace_bytes, a.stream = stream;
    run_sparse_attention(a);

    // Grouped output projection: heads of a group are contiguous, so o [T, H·D] is already [T, G, (H/G)·D].
    if (options.bf16_wo_a) {
      LinearCall wo_a = linear_call(w.wo_a.view(), name + " wo_a", T, main_lane());
      wo_a.x = s.o, wo_a.x_row_stride = H * D, wo_a.groups = int(c.o_groups);
      wo_a.y_bf16 = s.z_bf16, wo_a.y_row_stride = c.o_proj_dim();
      LinearCall wo_b = linear_call(w.wo_b.view(), name + " wo_b", T, main_lane());
      wo_b.x = s.z_bf16, wo_b.x_row_stride = c.o_proj_dim(), wo_b.y = s.out, wo_b.y_row_stride = d;
      run_linear(wo_a);
      run_linear(wo_b);
    } else {
      linear(w.wo_a.view(), name + " wo_a", s.o, H * D, T, s.z, c.o_proj_dim(), c.o_groups);
      run_to_bf16(s.z, T * c.o_proj_dim(), s.z_bf16, stream);
      linear(w.wo_b.view(), name + " wo_b", s.z_bf16, c.o_proj_dim(), T, s.out, d);
    }
  }

  // Nodes of the graph `stream` is capturing that `seen` does not hold yet (added to it): what the launches since
  // the last call captured, in no particular order.
  std::vector<cudaGraphNode_t> newly_captured_nodes(std::unordered_set<cudaGraphNode_t>& seen) {
    cudaStreamCaptureStatus status{};
    cudaGraph_t graph = nullptr;
    DSV4_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
    check(status == cudaStreamCaptureStatusActive && graph != nullptr, "CUDA model: the step is not being captured");
    size_t count = 0;
    DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    DSV4_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
    std::vector<cudaGraphNode_t> fresh;
    for (cudaGraphNode_t node : nodes)
      if (seen.insert(node).second) fresh.push_back(node);
    return fresh;
  }

  // Every launch of a step, from the embedding to the logits of rows [first_logit_row, T); reads the step's inputs
  // from their fixed device buffers only, so the same launches serve a CUDA graph. While capturing, `captured` (if
  // given) receives the nodes each layer added.
  void enqueue_step(const StepShape& shape, StepGraph* captured = nullptr) {
    const ModelConfig& c = config;
    const int64_t T = shape.tokens, d = c.hidden_size, n = c.mhc.hc_mult;
    const StepInputs in(scratch.inputs, StepInputLayout(T, shape.runs));

    // What a query sees depends on its position only, not on the layer: the window lists, and per HCA ratio the
    // visible compressed entries, once per step (in the embedding's launch).
    AttentionIndexParams index;
    index.positions = in.positions, index.tokens = T, index.window = c.window_size;
    index.ring_rows = kv_cache->config().window_capacity, index.window_index = scratch.window_index;
    for (const auto& [ratio, lists] : visible_entries)
      index.visible[index.visible_lists++] = VisibleEntriesList{
          .entries = options.max_context / ratio, .ratio = ratio, .index = lists.index, .counts = lists.counts};

    EmbeddingParams embed;
    embed.table = weights.embed.view(), embed.ids = in.ids, embed.tokens = T, embed.streams = int(n);
    embed.round_to_bf16 = reference(), embed.X = scratch.X, embed.stream = stream, embed.attention_lists = &index;
    run_embedding(embed);

    // Each sub-block's hc_post runs fused with the next site's hc_pre (the residual read once); the mixing
    // weights alternate between two sets, the attention's in set 0 and the FFN's in set 1.
    hc_pre(weights.layers[0].hc_attn, T, attn_norm_of(0));
    std::unordered_set<cudaGraphNode_t> seen;  // while capturing: the nodes outside the layers so far, and theirs
    if (captured != nullptr) newly_captured_nodes(seen);
    for (int layer = 0; layer < c.num_layers; ++layer) {
      const device_weights::Block& b = weights.layers[size_t(layer)];
      attention(layer, shape, in);
      hc_post(T, 0, &b.hc_ffn, SiteNorm{floats(b.ffn_norm), scratch.u, nullptr});

      MoeRunParams m;
      m.u = scratch.u, m.token_ids = in.ids, m.out = scratch.out, m.tokens = int(T);
      m.workspace = scratch.moe_workspace, m.workspace_bytes = moe_workspace_size, m.stream = stream;
      run_moe(*moe[size_t(layer)], m);
      if (layer + 1 < c.num_layers)
        hc_post(T, 1, &weights.layers[size_t(layer) + 1].hc_attn, attn_norm_of(layer + 1));
      else
        hc_post(T, 1, nullptr, {});
      if (captured != nullptr) captured->layer_nodes.push_back(newly_captured_nodes(seen));
    }

    const int64_t first = shape.first_logit_row, count = shape.run_last_rows ? shape.runs : T - first;
    HcHeadParams head;
    head.X = scratch.X + first * n * d;
    if (shape.run_last_rows) {
      // The runs' last rows gathered: the embedding kernel over X as an F32 table of T rows.
      EmbeddingParams gather;
      gather.table.format = WeightFormat::F32, gather.table.rows = T, gather.table.cols = n * d;
      gather.table.data = reinterpret_cast<const uint8_t*>(scratch.X), gather.table.data_row_bytes = size_t(n * d) * 4;
      gather.ids = in.last_rows, gather.tokens = shape.runs, gather.streams = 1, gather.X = scratch.X_last;
      gather.stream = stream;
      run_embedding(gather);
      head.X = scratch.X_last;
    }
    head.fn = floats(weights.hc_head.fn), head.base = floats(weights.hc_head.base);
    head.scale = floats(weights.hc_head.scale), head.tokens = count, head.hidden = d, head.streams = int(n);
    head.hc_eps = float(c.mhc.eps), head.norm_eps = float(c.rms_norm_eps), head.round_to_bf16 = reference();
    head.h = scratch.h, head.workspace = scratch.hc_workspace, head.workspace_bytes = hc_workspace_bytes;
    head.stream = stream;
    if (options.norms_in_mhc) {
      head.out_norm_weight = floats(weights.norm), head.h_bf16 = scratch.h_bf16;
      run_hc_head(head);
    } else {
      run_hc_head(head);
      rms_norm(scratch.h, floats(weights.norm), count, d, nullptr, scratch.h_bf16);
    }
    linear(weights.head.view(), "head", scratch.h_bf16, d, count, scratch.logits, c.vocab_size);
  }

  // The captured decode step of `batch` sequences (one token each), captured on first use.
  StepGraph& decode_graph(int batch) {
    auto it = graphs.find(batch);
    if (it != graphs.end()) return it->second;
    StepGraph g;
    // Relaxed: a kernel launcher's first use may set a function attribute, which is not a stream operation.
    DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    try {
      enqueue_step(decode_shape(batch), &g);
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);
      if (broken != nullptr) cudaGraphDestroy(broken);
      throw;
    }
    DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &g.graph));
    DSV4_CUDA_CHECK(cudaGraphInstantiate(&g.exec, g.graph, 0));
    size_t count = 0;
    DSV4_CUDA_CHECK(cudaGraphGetNodes(g.graph, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    DSV4_CUDA_CHECK(cudaGraphGetNodes(g.graph, nodes.data(), &count));
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType type{};
      DSV4_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
      // A memset or copy node would break the chain of programmatic dependent launches (each kernel overlapping
      // its predecessor's tail): a step is kernels only.
      if (type != cudaGraphNodeTypeKernel) {
        cudaGraphExecDestroy(g.exec);
        cudaGraphDestroy(g.graph);
        fail("CUDA model: the captured decode step of batch ", batch, " holds a graph node of type ", int(type),
             " (not a kernel): a step must launch kernels only");
      }
      ++g.kernels;
    }
    return graphs.emplace(batch, g).first->second;
  }

  StepShape decode_shape(int batch) const {
    StepShape shape;
    shape.tokens = batch, shape.runs = batch, shape.max_run_tokens = 1;
    return shape;
  }

  // Pages for the runs' new rows, then the step's inputs to the device in one copy (the page table in its own).
  void stage_inputs(std::span<const StepRun> runs, std::span<const int32_t> ids, int64_t T) {
    const ModelConfig& c = config;
    for (const StepRun& r : runs) {
      const int64_t end = r.start + r.tokens;
      for (int i = 0; i < c.num_layers; ++i) {
        kv_cache->ensure_rows(r.slot, i, KvArray::Window, std::min(kv_cache->config().window_capacity, end));
        if (c.has_compressor(i) && end / c.compress_ratio(i) > 0)
          kv_cache->ensure_rows(r.slot, i, KvArray::Compressed, end / c.compress_ratio(i));
      }
    }
    kv_cache->upload_page_table(stream);

    // The previous step's copy must have left the pinned staging before it is rewritten.
    DSV4_CUDA_CHECK(cudaEventSynchronize(inputs_copied));
    const StepInputLayout layout(T, int64_t(runs.size()));
    auto* positions = reinterpret_cast<int64_t*>(staging + layout.positions);
    auto* h_ids = reinterpret_cast<int32_t*>(staging + layout.ids);
    auto* slots = reinterpret_cast<int32_t*>(staging + layout.slots);
    auto* ring = reinterpret_cast<int32_t*>(staging + layout.ring_rows);
    auto* run_table = reinterpret_cast<CompressorRun*>(staging + layout.runs);
    auto* last_rows = reinterpret_cast<int32_t*>(staging + layout.last_rows);
    int64_t t = 0;
    for (size_t r = 0; r < runs.size(); ++r) {
      const StepRun& run = runs[r];
      run_table[r] = CompressorRun{.start_position = run.start,
                                   .slot = run.slot,
                                   .first_token = int32_t(t),
                                   .tokens = int32_t(run.tokens)};
      last_rows[r] = int32_t(t + run.tokens - 1);
      for (int64_t i = 0; i < run.tokens; ++i, ++t) {
        h_ids[t] = ids[size_t(t)];
        positions[t] = run.start + i;
        slots[t] = run.slot;
        ring[t] = int32_t((run.start + i) % kv_cache->config().window_capacity);
      }
    }
    DSV4_CUDA_CHECK(cudaMemcpyAsync(scratch.inputs, staging, layout.bytes, cudaMemcpyHostToDevice, stream));
    DSV4_CUDA_CHECK(cudaEventRecord(inputs_copied, stream));
  }

  // Queues the NaN flag's copy; a set flag is reported by check_nan_flag once the copy has landed.
  void queue_nan_flag_copy() {
    DSV4_CUDA_CHECK(cudaMemcpyAsync(host_nan_flag, scratch.nan_flag, sizeof(int32_t), cudaMemcpyDeviceToHost,
                                    stream));
    DSV4_CUDA_CHECK(cudaEventRecord(flag_copied, stream));
    flag_pending = true;
  }

  // Throws when the indexer met a NaN score in a step since the last check whose flag copy has landed (wait: block
  // until it has), marking the slots stepped since then failed (one flag serves a whole step; released slots are
  // out of the list, and with none left the flag is only cleared).
  void check_nan_flag(bool wait) {
    if (!flag_pending) return;
    if (wait) {
      DSV4_CUDA_CHECK(cudaEventSynchronize(flag_copied));
    } else {
      const cudaError_t status = cudaEventQuery(flag_copied);
      if (status == cudaErrorNotReady) return;
      DSV4_CUDA_CHECK(status);
    }
    flag_pending = false;
    const bool nan = *host_nan_flag != 0;
    std::vector<int> stepped;
    stepped.swap(unchecked_slots);
    if (!nan) return;
    *host_nan_flag = 0;
    DSV4_CUDA_CHECK(cudaMemsetAsync(scratch.nan_flag, 0, sizeof(int32_t), stream));
    if (stepped.empty()) return;
    for (int slot : stepped)
      if (slot_length[size_t(slot)] >= 0) slot_length[size_t(slot)] = kFailedSlot;
    fail("CUDA model: the indexer produced NaN scores (a weight or activation is not finite); sequence slot(s) of ",
         "that step refuse further steps until released");
  }

  // One prefill chunk of one sequence (at most max_step_tokens tokens), eagerly; logits of rows [first, T) into
  // `logits` at `row_offset` rows.
  void prefill_step(int slot, std::span<const int32_t> ids, int64_t first, std::vector<float>& logits,
                    int64_t row_offset) {
    const int64_t T = int64_t(ids.size()), p0 = slot_length[size_t(slot)];
    const StepRun run{slot, p0, T};
    stage_inputs(std::span(&run, 1), ids, T);
    StepShape shape;
    shape.tokens = T, shape.runs = 1, shape.max_run_tokens = T, shape.first_logit_row = first;
    // A one-token step is a decode step: the same launches as a batch of one (its logits match a batched run's).
    shape.single_slot = T > 1 ? slot : -1;
    if (T == 1 && graphs_enabled) {
      DSV4_CUDA_CHECK(cudaGraphLaunch(decode_graph(1).exec, stream));
    } else {
      enqueue_step(shape);
    }
    slot_length[size_t(slot)] = p0 + T;
    unchecked_slots.push_back(slot);
    const int64_t count = T - first;
    DSV4_CUDA_CHECK(cudaMemcpyAsync(logits.data() + row_offset * config.vocab_size, scratch.logits,
                                    size_t(count * config.vocab_size) * sizeof(float), cudaMemcpyDeviceToHost,
                                    stream));
    queue_nan_flag_copy();
    check_nan_flag(true);
  }

  // One kernel pass over several sequences' runs (CudaModel::step), eagerly; the logits of each run's last token stay
  // in scratch.logits. No host synchronisation.
  void mixed_step(std::span<const StepRun> runs, std::span<const int32_t> ids) {
    const int64_t T = int64_t(ids.size());
    stage_inputs(runs, ids, T);
    StepShape shape;
    shape.tokens = T, shape.runs = int(runs.size()), shape.run_last_rows = true;
    for (const StepRun& r : runs) shape.max_run_tokens = std::max(shape.max_run_tokens, r.tokens);
    shape.single_slot = runs.size() == 1 && T > 1 ? runs[0].slot : -1;
    enqueue_step(shape);
    for (const StepRun& r : runs) {
      slot_length[size_t(r.slot)] = r.start + r.tokens;
      unchecked_slots.push_back(r.slot);
    }
    queue_nan_flag_copy();
  }

  // Tokens a slot in use holds; throws for a free or failed slot.
  int64_t held_length(int slot) const {
    check(slot >= 0 && slot < int(slot_length.size()) && slot_length[size_t(slot)] != kFreeSlot,
          "CUDA model: sequence slot ", slot, " is not in use");
    check(slot_length[size_t(slot)] != kFailedSlot, "CUDA model: sequence slot ", slot,
          " failed in an earlier step; release it");
    return slot_length[size_t(slot)];
  }

  void plan_mixed_step(std::span<const StepSequence> sequences, std::vector<StepRun>& runs,
                       std::vector<int32_t>& ids);
  void run_mixed_step(std::span<const StepRun> runs, std::span<const int32_t> ids);
  void queue_mixed_step(std::span<const StepSequence> sequences, bool wait_for_flag);

  // One decode step of several sequences; logits stay in scratch.logits. No host synchronisation.
  void decode_step(std::span<const int> slots, std::span<const int32_t> ids) {
    const int batch = int(slots.size());
    std::vector<StepRun> runs(slots.size());
    for (size_t i = 0; i < slots.size(); ++i) runs[i] = StepRun{slots[i], slot_length[size_t(slots[i])], 1};
    stage_inputs(runs, ids, batch);
    if (graphs_enabled) {
      DSV4_CUDA_CHECK(cudaGraphLaunch(decode_graph(batch).exec, stream));
    } else {
      enqueue_step(decode_shape(batch));
    }
    for (const int slot : slots) {
      ++slot_length[size_t(slot)];
      unchecked_slots.push_back(slot);
    }
    queue_nan_flag_copy();
  }

  const ModelConfig config;
  CudaModelOptions options;
  DeviceContext context;
  DeviceAllocator pool;
  cudaStream_t stream = nullptr;
  bool graphs_enabled = true;
  int64_t step_capacity = 0;  // tokens per kernel pass
  std::vector<cpu::RopeTable> rope;
  std::vector<DeviceBuffer> frequencies;  // per layer, [rope_dim / 2]
  std::vector<DeviceBuffer> rope_tables;  // per distinct frequency set, [max_context, rope_dim / 2] (cos, sin)
  std::vector<const float2*> layer_rope_table;  // per layer, into rope_tables
  DeviceModelWeights weights;
  MoeConfig moe_config;
  std::vector<std::unique_ptr<DeviceMoeWeights>> moe;
  std::vector<StackedProjections> stacked;  // per layer, with fuse_projections
  std::unique_ptr<KvCache> kv_cache;
  std::vector<LayerState> layers;
  int64_t max_keys = 0, max_compressed_slots = 0;
  int attention_splits_max = 1;
  size_t attention_workspace_bytes = 0, linear_workspace_size = 0, hc_workspace_bytes = 0, moe_workspace_size = 0,
         top_k_workspace_size = 0;
  MemoryPlan plan;
  DeviceBuffer scratch_buffer;
  DeviceBuffer sampling_buffer;  // with sampling_adjustments
  SamplingBuffers sampling;
  Scratch scratch{};
  std::map<int64_t, VisibleEntries> visible_entries;  // by HCA ratio
  std::map<int, StepGraph> graphs;  // decode steps by batch size
  uint8_t* staging = nullptr;       // pinned: the step's per-token inputs
  int32_t* host_nan_flag = nullptr; // pinned
  cudaEvent_t inputs_copied = nullptr, flag_copied = nullptr;
  // The compressors' branch of a step (parallel_compressors): its stream, and the events that fork it from the step
  // stream, hand it qr (parallel_indexer) and join it back.
  std::optional<Stream> branch_stream;
  cudaEvent_t branch_forked = nullptr, qr_written = nullptr, branch_joined = nullptr;
  std::vector<int> unchecked_slots;  // slots stepped since the NaN flag was last read
  bool flag_pending = false;         // a NaN flag copy was queued since the flag was last read
  std::vector<int64_t> slot_length;  // tokens held, or kFreeSlot / kFailedSlot
};

const char* to_string(IndexerKeyFormat format) {
  switch (format) {
    case IndexerKeyFormat::None: return "none";
    case IndexerKeyFormat::Bf16: return "bf16";
    case IndexerKeyFormat::Fp8: return "fp8";
  }
  return "unknown";
}

std::string describe(const StorageFormats& formats) {
  const KvEntryLayout& e = formats.kv_entry;
  std::string text = std::string("KV cache entries ") + to_string(e.format) + " (";
  if (e.format == KvEntryFormat::Fp8Reference)
    text += std::to_string(e.nope_dim) + " e4m3 values with a ue8m0 scale per " + std::to_string(kKvFp8BlockSize) +
            ", " + std::to_string(e.rope_dim) + " rope dims bf16: ";
  text += std::to_string(e.entry_bytes) + " B), ";
  switch (formats.indexer_keys) {
    case IndexerKeyFormat::None: return text + "no indexer keys (no CSA layer)";
    case IndexerKeyFormat::Bf16: text += "indexer keys bf16"; break;
    case IndexerKeyFormat::Fp8: text += "indexer keys fp8 e4m3 + an fp32 scale per key"; break;
  }
  return text + " (" + std::to_string(formats.indexer_key_bytes) + " B)";
}

CudaModel::CudaModel(const ModelConfig& config, const ModelWeights& weights, const CudaModelOptions& options)
    : impl_(std::make_unique<Impl>(config, &weights, nullptr, options)) {}

CudaModel::CudaModel(const ModelConfig& config, DeviceModelWeights&& weights, const CudaModelOptions& options)
    : impl_(std::make_unique<Impl>(config, nullptr, &weights, options)) {}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return impl_->config; }
const CudaModelOptions& CudaModel::options() const { return impl_->options; }

StorageFormats CudaModel::storage() const {
  const Impl& m = *impl_;
  StorageFormats formats;
  formats.kv_entry = m.kv_cache->layout();
  for (int i = 0; i < m.config.num_layers; ++i)
    if (m.config.has_indexer(i)) {
      formats.indexer_keys = m.fp8_index_keys() ? IndexerKeyFormat::Fp8 : IndexerKeyFormat::Bf16;
      formats.indexer_key_bytes = int(m.index_key_bytes());
      break;
    }
  return formats;
}

std::string CudaModel::describe() const {
  const Impl& m = *impl_;
  return m.context.describe() + ", weights " + format_bytes(m.weights.bytes) + ", KV cache " +
         format_bytes(m.plan.kv_cache) + " (" + std::to_string(m.kv_cache->config().pages) + " pages), state " +
         format_bytes(m.plan.state) + ", RoPE tables " + format_bytes(m.plan.rope_tables) + ", step workspace " +
         format_bytes(m.plan.scratch) +
         (m.plan.sampling > 0 ? ", sampling buffers " + format_bytes(m.plan.sampling) : std::string()) + ", decode " +
         (m.graphs_enabled ? "CUDA graphs" : "eager (DSV4_DISABLE_CUDA_GRAPHS)");
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
  // No wait for queued steps: a freed page is only written again by a later step, ordered after them on the stream.
  // A NaN check still pending for the slot is dropped with it (the slot may be reused at once).
  std::erase(impl_->unchecked_slots, slot);
  impl_->kv_cache->release_sequence(slot);
  impl_->slot_length[size_t(slot)] = kFreeSlot;
}

int64_t CudaModel::length(int slot) const { return impl_->held_length(slot); }

void CudaModel::forward(int slot, std::span<const int32_t> ids, LogitRows rows, std::vector<float>& logits) {
  Impl& m = *impl_;
  const int64_t T = int64_t(ids.size()), p0 = length(slot);
  check(T > 0, "forward: no tokens");
  check_embedding_ids(ids.data(), T, m.config.vocab_size);
  check(p0 + T <= m.options.max_context, "sequence of ", p0 + T, " tokens exceeds the context of ",
        m.options.max_context, " tokens this GPU model was sized for");
  const int64_t vocab = m.config.vocab_size;
  logits.resize(size_t((rows == LogitRows::All ? T : 1) * vocab));
  m.check_nan_flag(true);
  try {
    for (int64_t t0 = 0; t0 < T; t0 += m.options.max_step_tokens) {
      const int64_t chunk = std::min(m.options.max_step_tokens, T - t0);
      const bool last = t0 + chunk == T;
      // Logits: every row (All), or the call's last row only, which lies in its last chunk.
      const int64_t first = rows == LogitRows::All ? 0 : last ? chunk - 1 : chunk;
      if (first == chunk) {
        // No logits wanted from this chunk: run it with the final row's head only to keep one code path cheap.
        std::vector<float> discard(static_cast<size_t>(vocab));
        m.prefill_step(slot, ids.subspan(size_t(t0), size_t(chunk)), chunk - 1, discard, 0);
      } else {
        m.prefill_step(slot, ids.subspan(size_t(t0), size_t(chunk)), first, logits, rows == LogitRows::All ? t0 : 0);
      }
    }
  } catch (...) {
    // A failed step leaves the slot's device state undefined: it refuses further steps until released.
    m.slot_length[size_t(slot)] = kFailedSlot;
    throw;
  }
}

const float* CudaModel::decode_on_device(std::span<const int> slots, std::span<const int32_t> ids) {
  Impl& m = *impl_;
  const int64_t n = int64_t(slots.size());
  check(n > 0 && slots.size() == ids.size(), "decode: ", slots.size(), " slots for ", ids.size(), " ids");
  check(n <= m.options.max_sequences, "decode: ", n, " sequences exceed max_sequences ", m.options.max_sequences);
  check_embedding_ids(ids.data(), n, m.config.vocab_size);
  std::vector<bool> seen(m.slot_length.size(), false);
  for (const int slot : slots) {
    const int64_t p = length(slot);
    check(!seen[size_t(slot)], "decode: sequence slot ", slot, " appears twice in one step");
    seen[size_t(slot)] = true;
    check(p + 1 <= m.options.max_context, "decode: sequence slot ", slot, " holds ", p,
          " tokens, the context this GPU model was sized for (", m.options.max_context, ")");
  }
  m.check_nan_flag(false);
  try {
    m.decode_step(slots, ids);
  } catch (...) {
    // A failed step leaves the slots' device state undefined: they refuse further steps until released.
    for (const int slot : slots) m.slot_length[size_t(slot)] = kFailedSlot;
    throw;
  }
  return m.scratch.logits;
}

void CudaModel::decode(std::span<const int> slots, std::span<const int32_t> ids, std::vector<float>& logits) {
  Impl& m = *impl_;
  const float* device_logits = decode_on_device(slots, ids);
  logits.resize(slots.size() * size_t(m.config.vocab_size));
  DSV4_CUDA_CHECK(cudaMemcpyAsync(logits.data(), device_logits, logits.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost, m.stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.check_nan_flag(true);
}

// Checks a mixed step's sequences (throwing before any slot changes) into its runs and ids.
void CudaModel::Impl::plan_mixed_step(std::span<const StepSequence> sequences, std::vector<StepRun>& runs,
                                      std::vector<int32_t>& ids) {
  check(!sequences.empty(), "step: no sequences");
  check(int64_t(sequences.size()) <= options.max_sequences, "step: ", sequences.size(),
        " sequences exceed max_sequences ", options.max_sequences);
  std::vector<bool> seen(slot_length.size(), false);
  for (const StepSequence& s : sequences) {
    const int64_t p = held_length(s.slot), n = int64_t(s.ids.size());
    check(!seen[size_t(s.slot)], "step: sequence slot ", s.slot, " appears twice in one step");
    seen[size_t(s.slot)] = true;
    check(n >= 1 && n <= options.max_step_tokens, "step: sequence slot ", s.slot, " brings ", n,
          " tokens; a step takes 1 to max_step_tokens (", options.max_step_tokens, ") of a sequence");
    check(p + n <= options.max_context, "step: sequence slot ", s.slot, " would hold ", p + n,
          " tokens, more than the context this GPU model was sized for (", options.max_context, ")");
    check_embedding_ids(s.ids.data(), n, config.vocab_size);
    runs.push_back(StepRun{s.slot, p, n});
    ids.insert(ids.end(), s.ids.begin(), s.ids.end());
  }
  check(int64_t(ids.size()) <= step_capacity, "step: ", ids.size(), " tokens exceed the ", step_capacity,
        " a step holds (max(max_step_tokens, max_sequences))");
}

// Runs a checked mixed step; a failure while queueing marks its slots failed.
void CudaModel::Impl::run_mixed_step(std::span<const StepRun> runs, std::span<const int32_t> ids) {
  try {
    mixed_step(runs, ids);
  } catch (...) {
    // A failed step leaves the slots' device state undefined: they refuse further steps until released.
    for (const StepRun& r : runs) slot_length[size_t(r.slot)] = kFailedSlot;
    throw;
  }
}

// Checks and queues a mixed step: its logits, one row per sequence, land in scratch.logits. `wait_for_flag` as in
// check_nan_flag (the host copy waits anyway; the device-sampling form does not).
void CudaModel::Impl::queue_mixed_step(std::span<const StepSequence> sequences, bool wait_for_flag) {
  std::vector<StepRun> runs;
  std::vector<int32_t> ids;
  plan_mixed_step(sequences, runs, ids);
  check_nan_flag(wait_for_flag);
  run_mixed_step(runs, ids);
}

void CudaModel::step(std::span<const StepSequence> sequences, std::vector<float>& logits) {
  Impl& m = *impl_;
  m.queue_mixed_step(sequences, true);
  logits.resize(sequences.size() * size_t(m.config.vocab_size));
  DSV4_CUDA_CHECK(cudaMemcpyAsync(logits.data(), m.scratch.logits, logits.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost, m.stream));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  m.check_nan_flag(true);
}

const float* CudaModel::step_on_device(std::span<const StepSequence> sequences) {
  impl_->queue_mixed_step(sequences, false);
  return impl_->scratch.logits;
}

const SamplingBuffers& CudaModel::sampling_buffers() const {
  check(impl_->options.sampling_adjustments > 0,
        "CUDA model: no sampling buffers (CudaModelOptions::sampling_adjustments is 0)");
  return impl_->sampling;
}

cudaStream_t CudaModel::stream() const { return impl_->stream; }

int CudaModel::decode_launches(int batch) {
  Impl& m = *impl_;
  check(batch >= 1 && batch <= m.options.max_sequences, "decode_launches: batch ", batch, " outside [1, ",
        m.options.max_sequences, "] (max_sequences)");
  return m.decode_graph(batch).kernels;
}

std::vector<int> CudaModel::decode_layer_launches(int batch) {
  decode_launches(batch);
  std::vector<int> counts;
  for (const std::vector<cudaGraphNode_t>& layer : impl_->graphs.at(batch).layer_nodes)
    counts.push_back(int(layer.size()));
  return counts;
}

std::vector<std::vector<std::string>> CudaModel::decode_layer_kernel_names(int batch) {
  decode_launches(batch);
  const Impl::StepGraph& g = impl_->graphs.at(batch);
  const std::map<cudaGraphNode_t, int> depth = node_depths(g.graph);
  std::vector<std::vector<std::string>> names;
  for (const std::vector<cudaGraphNode_t>& nodes : g.layer_nodes) {
    std::vector<std::pair<int, std::string>> ordered;
    for (cudaGraphNode_t node : nodes) ordered.emplace_back(depth.at(node), kernel_node_name(node));
    std::sort(ordered.begin(), ordered.end());
    std::vector<std::string>& layer = names.emplace_back();
    for (auto& [node_depth, name] : ordered) layer.push_back(std::move(name));
  }
  return names;
}

}  // namespace dsv4::cuda
