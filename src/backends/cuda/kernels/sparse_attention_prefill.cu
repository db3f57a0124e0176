#include "backends/cuda/kernels/sparse_attention_prefill.cuh"

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/sparse_attention_input_checks.hpp"
#include "backends/cuda/per_device_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

using namespace sparse_attention_prefill_detail;

// 64-head blocks per query: the grid is tokens × head_blocks CTAs.
int64_t head_blocks_of(const SparseAttentionParams& p) { return (p.heads + kHeads - 1) / kHeads; }

template <bool kFp8, bool kTrace>
void launch(const SparseAttentionParams& p, int head_blocks, const SparseAttentionPrefillOptions& options) {
  const auto kernel = sparse_attention_prefill_kernel<kFp8, kTrace>;
  const int limit = max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel));
  check(kAllocationBytes <= limit, "sparse_attention_prefill: ", kAllocationBytes,
        " bytes of shared memory per CTA exceed the device's ", limit);
  const int64_t ctas = sparse_attention_prefill_ctas(p), sms = device_multiprocessors();
  const bool prefetch = options.prefetch_resolved == PrefetchResolved::On ||
                        (options.prefetch_resolved == PrefetchResolved::Auto &&
                         ctas <= int64_t(kSparseAttentionPrefillPrefetchWaves) * sms);
  launch_chained(kernel, dim3(unsigned(ctas)), dim3(unsigned(kThreads)), kAllocationBytes, p.stream, dim3(1, 1, 1),
                 "sparse_attention_prefill", p, head_blocks, int(sms), prefetch, options.trace);
}

}  // namespace

bool sparse_attention_prefill_supports(const KvEntryLayout& layout, int page_shift, int heads) {
  if (layout.head_dim != kHeadDim || heads < 1) return false;
  if (layout.format == KvEntryFormat::Bf16) return true;
  // fp8: DeepSeek's layout, whose 8-byte groups the producer reads in place.
  return layout.nope_dim == kFp8NopeDim && layout.rope_offset == kFp8RopeOffset &&
         layout.scale_offset == kFp8ScaleOffset && layout.entry_bytes == kFp8EntryBytes && page_shift >= 0;
}

void check_sparse_attention_prefill_params(const SparseAttentionParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  check(p.cache.pool != nullptr && p.cache.page_table != nullptr,
        "sparse_attention_prefill: the KV cache view is empty");
  check(sparse_attention_prefill_supports(layout, p.cache.page_shift, p.heads), "sparse_attention_prefill: head_dim ",
        layout.head_dim, " (", to_string(layout.format), " entries of ", layout.entry_bytes, " bytes), heads ", p.heads,
        ": only head_dim ", kHeadDim, " with bf16 entries or fp8 entries in the ", kFp8EntryBytes,
        "-byte layout is served");
  check(p.layer >= 0 && p.layer < p.cache.layers, "sparse_attention_prefill: layer ", p.layer, " outside [0, ",
        p.cache.layers, ")");
  check(p.tokens >= 0, "sparse_attention_prefill: negative tokens ", p.tokens);
  check(p.window_slots >= 0 && p.compressed_slots >= 0, "sparse_attention_prefill: negative slot count (window ",
        p.window_slots, ", compressed ", p.compressed_slots, ")");
  check(p.splits == 1, "sparse_attention_prefill: splits ", p.splits, " (the prefill kernel does not split)");
  const int64_t head_blocks = head_blocks_of(p);
  check(p.tokens * head_blocks < (int64_t(1) << 31), "sparse_attention_prefill: too many CTAs for one launch (tokens ",
        p.tokens, ", heads ", p.heads, ")");
  if (p.tokens == 0) return;
  check_sparse_attention_inputs(p, "sparse_attention_prefill");
}

int64_t sparse_attention_prefill_ctas(const SparseAttentionParams& p) {
  return p.tokens * head_blocks_of(p);
}

void run_sparse_attention_prefill(const SparseAttentionParams& p, const SparseAttentionPrefillOptions& options) {
  check_sparse_attention_prefill_params(p);
  if (p.tokens == 0) return;
  const int head_blocks = int(head_blocks_of(p));
  const bool fp8 = p.cache.layout.format == KvEntryFormat::Fp8Reference;
  if (options.trace != nullptr)
    fp8 ? launch<true, true>(p, head_blocks, options) : launch<false, true>(p, head_blocks, options);
  else
    fp8 ? launch<true, false>(p, head_blocks, options) : launch<false, false>(p, head_blocks, options);
}

}  // namespace dsv4::cuda
