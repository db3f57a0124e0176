#include "backends/cuda/kernels/kv_insert.cuh"

#include "backends/cuda/kernels/rms_norm.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"
#include "core/rms_norm_math.hpp"

namespace dsv4::cuda {

namespace {

static_assert(kKvInsertFusedNormMaxHeadDim == 2 * rms::kThreads, "a fused launch has the norm's threads, a pair each");

struct KvInsertArgs {
  KvInsertParams p;
  int64_t x_row_stride;
  rms::RmsNormArgs norm;
};

// The kv_norm weights of a thread's pair: parameters, loaded before the wait.
struct PairWeights {
  float w0 = 1.0f, w1 = 1.0f;
};

__device__ __forceinline__ PairWeights load_pair_weights(const KvInsertParams& p) {
  const int dim = 2 * int(threadIdx.x);
  PairWeights out;
  if (dim < p.cache.layout.head_dim && p.norm_weight != nullptr) {
    out.w0 = __ldg(p.norm_weight + dim);
    out.w1 = __ldg(p.norm_weight + dim + 1);
  }
  return out;
}

// Where a row goes and how its pair rotates: from the step's inputs (destination row, slot, position) and the two
// tables they index (the page table, the RoPE table). entry is null for a row without a destination (uniform over
// the CTA).
struct RowTarget {
  uint8_t* entry = nullptr;
  RopeFactors rope{1.0f, 0.0f};
};

__device__ __forceinline__ bool pair_rotates(const KvInsertParams& p) {
  const int pair = threadIdx.x;
  return 2 * pair < p.cache.layout.head_dim && p.rope_table != nullptr && pair >= p.cache.layout.nope_dim / 2;
}

// The two lookups (page table by slot, RoPE table by position) are issued together, one round trip after the row's
// inputs: the destination is tested only when both are in flight (a row without one reads its slot's first page
// entry, which exists, and discards it).
__device__ __forceinline__ RowTarget load_row_target(const KvInsertParams& p, int64_t row) {
  const KvEntryLayout& layout = p.cache.layout;
  const bool rotates = pair_rotates(p);
  const int32_t dest_row = p.dest_rows[row];
  const int32_t slot = p.sequence_slots[row];
  const int64_t position = rotates ? p.positions[row] : 0;
  const int64_t logical_row = max(dest_row, 0);
  uint8_t* entry =
      p.cache.entry_address(p.cache.physical_entry(p.cache.pages_of(slot, p.layer, p.array), logical_row));
  RowTarget target;
  if (rotates)
    target.rope =
        rope_table_factors(p.rope_table, layout.rope_dim / 2, position, int(threadIdx.x) - layout.nope_dim / 2);
  target.entry = dest_row < 0 ? nullptr : entry;
  return target;
}

// The thread's pair of the row's x (zeros past head_dim).
__device__ __forceinline__ float2 load_row_pair(const KvInsertArgs& a, int64_t row) {
  const int dim = 2 * int(threadIdx.x);
  if (dim >= a.p.cache.layout.head_dim) return make_float2(0.0f, 0.0f);
  return *reinterpret_cast<const float2*>(a.p.x + row * a.x_row_stride + dim);
}

// One row's entry (after the wait): the norm's block sum, the rotation and the stores.
__device__ __forceinline__ void insert_row(const KvInsertArgs& a, const PairWeights& weights, const RowTarget& target,
                                           float2 x) {
  __shared__ float partials[kKvInsertMaxThreads / 32];
  const KvInsertParams& p = a.p;
  const KvEntryLayout& layout = p.cache.layout;
  const int dim = 2 * int(threadIdx.x);
  const bool active = dim < layout.head_dim;
  float x0 = x.x, x1 = x.y;
  if (p.round_input_to_bf16) {
    x0 = round_to_bf16(x0);
    x1 = round_to_bf16(x1);
  }
  if (p.norm_weight != nullptr) {  // uniform over the grid, so the block sum's barrier is reached by all or none
    const float inv_rms = inverse_rms(kv_insert_block_sum(x0 * x0 + x1 * x1, partials), float(layout.head_dim), p.eps);
    if (active) {
      x0 = x0 * inv_rms * weights.w0;
      x1 = x1 * inv_rms * weights.w1;
    }
  }
  if (pair_rotates(p)) rope_rotate_pair(x0, x1, target.rope, false);
  kv_store_dims<2>(layout, target.entry, dim, active, {x0, x1});
  kv_store_pad(layout, target.entry, threadIdx.x);
}

// The RMSNorm riding in the launch: rms_norm_rows<kNormGroup, kNormRope, kNormValues> in the CTAs after the rows',
// none where kNormGroup is 0.
template <int kNormGroup, bool kNormRope, int kNormValues>
__global__ void __launch_bounds__(kKvInsertMaxThreads) kv_insert_kernel(const __grid_constant__ KvInsertArgs a) {
  allow_dependents();  // the dependent's own wait still orders it after this grid's completion
  if constexpr (kNormGroup != 0) {
    const int64_t norm_cta = int64_t(blockIdx.x) - a.p.rows;
    if (norm_cta >= 0) {
      rms::rms_norm_rows<kNormGroup, kNormRope, kNormValues>(a.norm, norm_cta);  // waits for the prior grids itself
      return;
    }
  }
  const int64_t row = blockIdx.x;
  const PairWeights weights = load_pair_weights(a.p);
  wait_for_prior_grids();  // x and the step's inputs come from earlier operations
  // x is loaded before the target's lookups, so that its load and the row's inputs' share one round trip.
  const float2 x = load_row_pair(a, row);
  const RowTarget target = load_row_target(a.p, row);
  // A row without a destination leaves (uniformly over the CTA) before any barrier, writing nothing.
  if (target.entry == nullptr) return;
  insert_row(a, weights, target, x);
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
  check(p.rope_table == nullptr || layout.rope_dim > 0, "kv_insert: rope_table given but rope_dim is 0");
  check(p.rope_table == nullptr || p.rows == 0 || p.positions != nullptr, "kv_insert: RoPE needs the positions");
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
  using Kernel = void (*)(KvInsertArgs);
  Kernel kernel = kv_insert_kernel<0, false, 0>;
  if (p.fused_norm.rows > 0) {
    const rms::RmsNormLaunch norm = rms::rms_norm_launch(p.fused_norm);
    args.norm = norm.args;
    ctas += norm.ctas;
    threads = rms::kThreads;
    constexpr int kLong = rms::kValuesPerThread, kShort = rms::kShortRowValues, kTiny = rms::kTinyRowValues;
    constexpr int kCta = rms::kThreads;
    // [warp rows][rope][values: tiny, short, long]
    constexpr Kernel kFused[2][2][3] = {
        {{kv_insert_kernel<kCta, false, kTiny>, kv_insert_kernel<kCta, false, kShort>,
          kv_insert_kernel<kCta, false, kLong>},
         {kv_insert_kernel<kCta, true, kTiny>, kv_insert_kernel<kCta, true, kShort>,
          kv_insert_kernel<kCta, true, kLong>}},
        {{kv_insert_kernel<32, false, kTiny>, kv_insert_kernel<32, false, kShort>, kv_insert_kernel<32, false, kLong>},
         {kv_insert_kernel<32, true, kTiny>, kv_insert_kernel<32, true, kShort>, kv_insert_kernel<32, true, kLong>}}};
    kernel = kFused[norm.warp_rows][norm.rope][norm.values == kTiny ? 0 : norm.values == kShort ? 1 : 2];
  }
  if (ctas == 0) return;
  check(ctas <= 0x7FFFFFFF, "kv_insert: ", ctas, " CTAs exceed the launch limit");
  launch_chained(kernel, dim3(unsigned(ctas)), dim3(unsigned(threads)), 0, p.stream, args, "kv_insert");
}

}  // namespace dsv4::cuda
