// The DeepSeek-V4 forward pass on one GPU (dsv4-model.md §2), the same function as Dsv4Model over the CPU backend:
// weights resident in their stored formats, the paged KV cache, the compressor and indexer state of every sequence
// on the device, and every op a kernel of src/backends/cuda/kernels. A step is one kernel pass over its tokens: a
// prefill chunk of one sequence, one decode token of each of several sequences, or both mixed (per-token slots and
// positions, from which every kernel derives what its token sees on the device), with no host synchronisation until
// the logits are copied back. Every kernel of a step is a programmatic dependent launch (ptx/dependent_launch.cuh),
// so each one's launch and weight prefetch overlap its predecessor's tail; a captured decode step holds kernel nodes
// only.
//
// Numerics: activations between ops are fp32; the inputs of linear layers are rounded to bf16 (the tensor cores'
// operand type), KV entries are bf16 (exact mode) or DeepSeek's fp8 layout (reference mode), the indexer keys bf16
// (or in reference mode with fp8_indexer_keys e4m3 + a scale per key).
// Matrices stored as F32 (HuggingFace-layout fixtures) are held as BF16 on the device, with a warning.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "backends/cuda/kernels/sampling.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/weight_upload.hpp"
#include "io/model_config.hpp"
#include "model/dsv4_model.hpp"
#include "model/model_weights.hpp"
#include "model/numerics_mode.hpp"

namespace dsv4::cuda {

struct CudaModelOptions {
  std::string device = "cuda";                 // "cuda" or "cuda:N"
  NumericsMode numerics = NumericsMode::Exact;
  int max_sequences = 1;                       // sequences that may hold KV state at once (and decode together)
  int64_t max_context = 4096;                  // tokens per sequence the KV cache and indexer buffers hold
  int64_t max_step_tokens = 512;               // tokens per kernel pass; longer calls run in chunks of this
  // Fewer launches per layer: the linear layers that read the same input run as one matrix of their stacked rows
  // ([wq_a; wkv], the compressors' [wkv; wgate]; built on the device at load, replacing the separate matrices), and
  // a norm rides in the KV insert's launch. Same math; a stacked matrix may split its sums differently.
  bool fuse_projections = true;
  // With fuse_projections, CSA layers also stack the indexer's wq_b under wq_b (both read q_norm(qr)) and the
  // indexer's weights_proj under the compressors' projections: two launches fewer per CSA layer (wq_b's stack in
  // steps of up to 64 tokens; longer steps run its parts as row slices).
  bool stack_indexer_projections = true;
  // The indexer's top-k inside its scores launch (run_indexer_scores_top_k, IndexerTopKMethod::Auto: where a
  // layer's keys are at most kIndexerLastCtaMaxKeys, each CTA scores one query (decode steps) and the tickets fit, the
  // scores kernel's last CTA per query group selects; otherwise the two launches): one launch fewer per CSA layer,
  // the same selections. H200, Flash 8 layers NVFP4 b1 (session 16 round 3, -r 2): 730.9 ± 0.2
  // t/s against 729.1 ± 0.6 off.
  bool indexer_top_k_in_scores = true;
  // A CSA layer's two compressor pools (main and indexer) in one launch where they read the stacked projections
  // (fuse_projections): one launch fewer per CSA layer, the same math.
  bool fuse_compressor_pools = true;
  // The RMSNorm after each mHC site (attn_norm, ffn_norm, the final norm) inside the site's own launch (hc_pre,
  // hc_post_pre, hc_head with their fused output norm and mHC's decode kernel): two launches fewer per layer. The
  // norm's sum of squares then runs in mHC's order.
  bool norms_in_mhc = true;
  // wo_a writes its output in bf16 for wo_b (no conversion launch).
  bool bf16_wo_a = true;
  // q_norm as the RMSNorm prologue of wq_b and the indexer's wq_b in steps of up to 16 tokens (the queries' per-head
  // norm then rides in the KV insert's launch with fuse_projections): one launch fewer per layer. H200, Flash T = 1:
  // wq_b 13.1 µs with the prologue against 13.7 µs for rms_norm + wq_b (round 4, graph); the 8-layer e2e within
  // its noise (round 2: 574.7 ± 1.9 against 576.3 ± 4.1 t/s).
  bool q_norm_prologue = true;
  // Compressed-KV layers' compressors (their projections and pooling: CSA's both, HCA's one) on a second stream, a
  // branch of the step beside the query path (wq_a, wq_b, the KV insert) that joins before the attention: in a
  // captured step the fork and join are graph edges, so the latency-bound pooling overlaps the memory-bound wq_b.
  // The same launches and bits. H200, Flash 8 layers NVFP4 (session 14 round 3, one run each): b1 600.9 t/s against
  // 580.4 off, b64 7334 against 7313.
  bool parallel_compressors = true;
  // With parallel_compressors, a CSA layer's whole indexer on that branch too: its wq_b (then a launch of its own,
  // not stacked under wq_b), query preparation, scores and top-k, after the compressors and once qr is ready. One
  // launch more per CSA layer; the branch runs about as long as the query path instead of the indexer's kernels
  // following it. The same math (the indexer's wq_b alone may split its sums unlike the stacked matrix). Round 3 as
  // above, both on: b1 606.0 t/s, b64 7309 (within the b64 noise of 7313 ± 13).
  bool parallel_indexer = true;
  // The compressors load the step's runs before their grid-dependency wait (CompressorParams::runs_ready_at_launch:
  // the runs are step inputs, copied before the step's first kernel). The same bits.
  bool compressor_runs_at_launch = false;
  // The queries' per-head norm (in the KV insert's launch or its own) with a CTA per head instead of a warp per head
  // in decode-sized steps (up to 1024 head rows: RmsNormParams::cta_rows): 64 CTAs of 2 values per thread instead
  // of 8 CTAs of 16 at T = 1 (Flash); the sum of squares in another fp32 order. H200, Flash 8 layers NVFP4 (session
  // 15 round 3, one run each): b1 717.5 t/s against 708.8 off (KV insert + q norm, ncu: 6.6 → 4.7 µs).
  bool q_norm_cta_rows = true;
  // Reference numerics: the CSA layers' indexer keys stored as e4m3 codes + an fp32 scale per key (DeepSeek's layout)
  // instead of bf16, and the indexer's queries prepared in that format: half the key bytes the scores read and hold.
  // The keys and queries are the same values (the reference's fp4-rounded operands are exact in fp8); the scores'
  // fp32 sums run on the fp8 tensor-core path. No effect in exact numerics. Off: bf16 keys, twice the bytes (the
  // scores' speed is the same: H200, 64K keys 5.8 vs 6.2 µs, 1M 25.3 vs 24.3, bench/NOTES.md session 14).
  bool fp8_indexer_keys = true;
  // A CSA layer's indexer query preparation in its compressors' pools' launch (run_compressors with the prepare),
  // where the pools share one launch (fuse_projections, fuse_compressor_pools): one launch fewer per CSA layer, the
  // same bits. The pools then run after the indexer's queries: on the main stream after the query projections, or
  // with parallel_compressors and parallel_indexer on the branch after the indexer's wq_b (with parallel_compressors
  // alone the pools run before the queries exist, and the preparation keeps its launch). H200, Flash 8 layers NVFP4
  // (session 17, -r 3): b1 745.6 ± 1.4 t/s against 732.1 ± 2.7 / 735.5 ± 2.4 off (round 1), 745.9 ± 5.1 against
  // 725.7 ± 0.7 (round 2); b64 7900 against 7888.
  bool indexer_prepare_in_compressors = true;
  // Device buffers for sampling a step's rows on the device (CudaModel::sampling_buffers), in the memory plan: the
  // parameters of max_sequences rows and this many logit adjustments per sampling launch; 0: none.
  int64_t sampling_adjustments = 0;
  UploadProgress progress;                     // weight upload progress (optional)
};

// Device memory for the sampling kernel (kernels/sampling.hpp) over a step's logits
// (CudaModelOptions::sampling_adjustments).
struct SamplingBuffers {
  void* inputs = nullptr;           // a launch's sampling::RowParams [rows], then its sampling::LogitAdjustments
  size_t inputs_bytes = 0;          // max_sequences rows' parameters + sampling_adjustments adjustments
  SampledToken* results = nullptr;  // [max_sequences]
};

// The CSA layers' indexer keys as a model stores them; None where no layer has an indexer.
enum class IndexerKeyFormat : uint8_t { None, Bf16, Fp8 };

const char* to_string(IndexerKeyFormat format);

// What a model stores its per-token state in (CudaModel::storage), as it chose at construction from the numerics mode
// and fp8_indexer_keys: reports name this instead of restating the choice.
struct StorageFormats {
  KvEntryLayout kv_entry;                                  // every KV cache entry (window and compressed)
  IndexerKeyFormat indexer_keys = IndexerKeyFormat::None;
  int indexer_key_bytes = 0;                               // per key, its fp8 scale included; 0 for None
};

// "KV cache entries bf16 (1024 B), indexer keys bf16 (256 B)" or "KV cache entries fp8-reference (448 e4m3 values
// with a ue8m0 scale per 64, 64 rope dims bf16: 584 B), indexer keys fp8 e4m3 + an fp32 scale per key (132 B)".
std::string describe(const StorageFormats& formats);

// One sequence's tokens in a mixed step (CudaModel::step): `ids` at the slot's next positions.
struct StepSequence {
  int slot = 0;
  std::span<const int32_t> ids;
};

class CudaModel {
 public:
  // Uploads the weights (borrowed only during construction) and sizes every buffer. Throws naming what does not fit
  // or what a kernel does not support before any step runs.
  CudaModel(const ModelConfig& config, const ModelWeights& weights, const CudaModelOptions& options);
  // A model over weights already on the device (e.g. synthetic benchmark weights built there), taken over; the
  // memory check then covers the sequences' state and the step buffers only.
  CudaModel(const ModelConfig& config, DeviceModelWeights&& weights, const CudaModelOptions& options);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const;
  const CudaModelOptions& options() const;
  // The formats of the KV cache entries and indexer keys this model stores.
  StorageFormats storage() const;
  // "cuda:0 NVIDIA H200 (...), weights 1.23 GiB, KV cache 0.50 GiB (...), state ..., RoPE tables ...,
  // step workspace ..., decode ..."
  std::string describe() const;

  // A sequence slot with empty state; throws when all max_sequences are in use.
  int add_sequence();
  // Frees the slot's KV pages and state (also a slot whose step failed).
  void release_sequence(int slot);
  // Tokens the slot holds (the position of its next token).
  int64_t length(int slot) const;

  // Runs `ids` at the slot's next positions; fp32 logits [rows, vocab] for every position (All) or the last (Last).
  // Throws for an empty call, an id outside the vocabulary, or a sequence past max_context, leaving the slot as it
  // was; after an error while the kernels run (NaN scores, a fault) the slot refuses steps until released.
  void forward(int slot, std::span<const int32_t> ids, LogitRows rows, std::vector<float>& logits);

  // One decode step of several sequences, one kernel pass over all of them: ids[i] is the next token of slot
  // slots[i] (slots distinct, each in use, any lengths); fp32 logits [n, vocab], row i for slots[i]. Throws like
  // forward before any slot changes; a failure while its kernels are queued marks every slot of the step failed (a
  // kernel fault found later is sticky: every later CUDA call of the process fails with it). Steps are
  // CUDA graphs captured per batch size n on first use and replayed after (DSV4_DISABLE_CUDA_GRAPHS=1: the same
  // launches, eagerly); a one-token forward is the batch-1 decode step.
  void decode(std::span<const int> slots, std::span<const int32_t> ids, std::vector<float>& logits);
  // The same step leaving the logits [n, vocab] fp32 in device memory, valid until the next call, with no host
  // synchronisation: the caller may run its own kernels on stream() to read them. NaN indexer scores of such a step
  // are reported by a later call (which then throws and marks the slots stepped since the last check failed).
  const float* decode_on_device(std::span<const int> slots, std::span<const int32_t> ids);
  // One kernel pass over the tokens of several sequences, prefill chunks and decode tokens mixed (what a
  // continuous-batching server runs each iteration): fp32 logits [sequences, vocab], row i for the last token of
  // sequences[i]. Slots distinct and in use; each sequence 1 to max_step_tokens tokens, all of them together at most
  // max(max_step_tokens, max_sequences). Throws like forward before any slot changes; a failure while the kernels
  // run marks every slot of the step failed. Eager launches (the shape changes from step to step).
  void step(std::span<const StepSequence> sequences, std::vector<float>& logits);
  // The same step leaving the logits [sequences, vocab] fp32 in device memory, valid until the next call, with no
  // host synchronisation (as decode_on_device: NaN indexer scores are reported by a later call).
  const float* step_on_device(std::span<const StepSequence> sequences);
  // The sampling buffers of the memory plan; throws when CudaModelOptions::sampling_adjustments is 0.
  const SamplingBuffers& sampling_buffers() const;
  // The stream every step runs on.
  cudaStream_t stream() const;
  // Kernel launches of a decode step of `batch` sequences (the captured graph's kernel nodes; captures it if needed).
  int decode_launches(int batch);
  // The same per layer: [num_layers] counts of the launches from a layer's first attention kernel to the mHC launch
  // that closes its FFN (the rest of decode_launches is outside the layers: embedding, first hc_pre, head).
  std::vector<int> decode_layer_launches(int batch);
  // The same launches' kernels, per layer in dependency order (by depth in the graph; kernels at one depth, the two
  // streams' branches, by name), demangled without their parameters.
  std::vector<std::vector<std::string>> decode_layer_kernel_names(int batch);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv4::cuda
