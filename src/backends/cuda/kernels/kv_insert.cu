#include "backends/cuda/kernels/kv_insert.cuh"

#include "backends/cuda/kernels/rms_norm.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

static_assert(kKvInsertFusedNormMaxHeadDim == 2 * rms::kThreads, "a fused launch has the norm's threads, a pair each");

// The RMSNorm riding in the launch: none, or rms_norm_rows<kGroupThreads, kRope>.
enum class FusedNorm { None, WarpRows, WarpRowsRope, CtaRows, CtaRowsRope };

struct KvInsertArgs {
  KvInsertParams p;
  int64_t x_row_stride;
  rms::RmsNormArgs norm;
};

// What a thread's pair reads that is a parameter, not a predecessor's output: loaded before the wait.
struct PairParameters {
  float norm_weight0 = 1.0f, norm_weight1 = 1.0f;
  float rope_frequency = 0.0f;
};

__device__ __forceinline__ PairParameters load_pair_parameters(const KvInsertParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  const int pair = threadIdx.x, dim = 2 * pair, rope_pair = pair - layout.nope_dim / 2;
  PairParameters out;
  if (dim < layout.head_dim && p.norm_weight != nullptr) {
    out.norm_weight0 = __ldg(p.norm_weight + dim);
    out.norm_weight1 = __ldg(p.norm_weight + dim + 1);
  }
  if (dim < layout.head_dim && p.rope_frequencies != nullptr && rope_pair >= 0)
    out.rope_frequency = __ldg(p.rope_frequencies + rope_pair);
  return out;
}

// One row's entry (after the wait). A decode step inserts one row per sequence, so the kernel's time is this chain of
// dependent loads: x, the row's destination, slot and position are loaded together, and the page-table read that
// they give is issued before the norm's reduction, which hides it.
__device__ __forceinline__ void insert_row(const KvInsertArgs& a, int64_t row, const PairParameters& parameters) {
  __shared__ float partials[kKvInsertMaxThreads / 32];
  const KvInsertParams& p = a.p;
  const KvEntryLayout& layout = p.cache.layout;
  const int pair = threadIdx.x;
  const int dim = 2 * pair;
  const bool active = dim < layout.head_dim;
  const bool rotates = active && p.rope_frequencies != nullptr && pair >= layout.nope_dim / 2;

  const int32_t dest_row = p.dest_rows[row];
  const int32_t slot = p.sequence_slots[row];
  const int64_t position = rotates ? p.positions[row] : 0;
  float x0 = 0.0f, x1 = 0.0f;
  if (active) {
    const float2 v = *reinterpret_cast<const float2*>(p.x + row * a.x_row_stride + dim);
    x0 = v.x;
    x1 = v.y;
  }
  if (dest_row < 0) return;  // uniform over the CTA: no barrier is skipped by part of it
  uint8_t* entry = p.cache.entry_address(p.cache.physical_entry(p.cache.pages_of(slot, p.layer, p.array), dest_row));
  if (p.round_input_to_bf16) {
    x0 = round_to_bf16(x0);
    x1 = round_to_bf16(x1);
  }
  if (p.norm_weight != nullptr) {  // uniform over the grid, so the block sum's barrier is reached by all or none
    const float mean_square = kv_insert_block_sum(x0 * x0 + x1 * x1, partials) / float(layout.head_dim);
    const float inv_rms = 1.0f / sqrtf(mean_square + p.eps);
    if (active) {
      x0 = x0 * inv_rms * parameters.norm_weight0;
      x1 = x1 * inv_rms * parameters.norm_weight1;
    }
  }
  if (rotates) rope_rotate_pair(x0, x1, rope_factors(position, parameters.rope_frequency), false);
  kv_store_pair(layout, entry, dim, active, x0, x1);
  kv_store_pad(layout, entry, threadIdx.x);
}

template <FusedNorm kNorm>
__global__ void __launch_bounds__(kKvInsertMaxThreads) kv_insert_kernel(const __grid_constant__ KvInsertArgs a) {
  allow_dependents();  // the dependent's own wait still orders it after this grid's completion
  if constexpr (kNorm != FusedNorm::None) {
    const int64_t norm_cta = int64_t(blockIdx.x) - a.p.rows;
    if (norm_cta >= 0) {
      constexpr bool kRope = kNorm == FusedNorm::WarpRowsRope || kNorm == FusedNorm::CtaRowsRope;
      constexpr int kGroup = kNorm == FusedNorm::WarpRows || kNorm == FusedNorm::WarpRowsRope ? 32 : rms::kThreads;
      rms::rms_norm_rows<kGroup, kRope>(a.norm, norm_cta);  // waits for the prior grids itself
      return;
    }
  }
  const PairParameters parameters = load_pair_parameters(a.p);
  wait_for_prior_grids();  // x, the slots, positions and rows are written by earlier operations
  insert_row(a, blockIdx.x, parameters);
}

}  // namespace

void check_kv_insert_params(const KvInsertParams& p) {
  const KvEntryLayout& layout = p.cache.layout;
  check(p.cache.pool != nullptr && p.cache.page_table != nullptr, "kv_insert: the KV cache view has no pool/table");
  check(layout.head_dim > 0 && layout.head_dim <= 2 * kKvInsertMaxThreads, "kv_insert: head_dim ", layout.head_dim,
        " outside (0, ", 2 * kKvInsertMaxThreads, "]");
  check(p.layer >= 0 && p.layer < p.cache.layers, "kv_insert: layer ", p.layer, " outside [0, ", p.cache.layers, ")");
  check(p.rows >= 0 && p.rows < (int64_t(1) << 31), "kv_insert: row count ", p.rows, " out of range");
  check(p.rows == 0 || (p.x != nullptr && p.sequence_slots != nullptr && p.dest_rows != nullptr),
        "kv_insert: x, sequence_slots and dest_rows are required");
  check(p.rope_frequencies == nullptr || layout.rope_dim > 0, "kv_insert: rope_frequencies given but rope_dim is 0");
  check(p.rope_frequencies == nullptr || p.rows == 0 || p.positions != nullptr,
        "kv_insert: RoPE needs the positions");
  check(reinterpret_cast<uintptr_t>(p.x) % 8 == 0, "kv_insert: x must be 8-byte aligned");
  check(p.x_row_stride == 0 || (p.x_row_stride >= layout.head_dim && p.x_row_stride % 2 == 0),
        "kv_insert: x_row_stride ", p.x_row_stride, " must be even and at least head_dim ", layout.head_dim);
  if (p.fused_norm.rows > 0) {
    check(layout.head_dim <= kKvInsertFusedNormMaxHeadDim, "kv_insert: a fused RMSNorm needs head_dim ≤ ",
          kKvInsertFusedNormMaxHeadDim, ", got ", layout.head_dim);
    check_rms_norm_params(p.fused_norm);
  }
}

void run_kv_insert(const KvInsertParams& p) {
  check_kv_insert_params(p);
  KvInsertArgs args{
      .p = p, .x_row_stride = p.x_row_stride == 0 ? p.cache.layout.head_dim : p.x_row_stride, .norm = {}};
  int64_t ctas = p.rows;
  int threads = (p.cache.layout.head_dim / 2 + 31) / 32 * 32;
  auto kernel = kv_insert_kernel<FusedNorm::None>;
  if (p.fused_norm.rows > 0) {
    const rms::RmsNormLaunch norm = rms::rms_norm_launch(p.fused_norm);
    args.norm = norm.args;
    ctas += norm.ctas;
    threads = rms::kThreads;
    if (norm.warp_rows)
      kernel = norm.rope ? kv_insert_kernel<FusedNorm::WarpRowsRope> : kv_insert_kernel<FusedNorm::WarpRows>;
    else
      kernel = norm.rope ? kv_insert_kernel<FusedNorm::CtaRowsRope> : kv_insert_kernel<FusedNorm::CtaRows>;
  }
  if (ctas == 0) return;
  check(ctas <= 0x7FFFFFFF, "kv_insert: ", ctas, " CTAs exceed the launch limit");
  launch_chained(kernel, dim3(unsigned(ctas)), dim3(unsigned(threads)), 0, p.stream, args, "kv_insert");
}

}  // namespace dsv4::cuda
