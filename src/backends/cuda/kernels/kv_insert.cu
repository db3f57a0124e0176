#include "backends/cuda/kernels/kv_insert.cuh"

#include "backends/cuda/kernels/quantized_linear.cuh"
#include "backends/cuda/kernels/rms_norm.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

static_assert(kKvInsertFusedNormMaxHeadDim == 2 * rms::kThreads, "a fused launch has the norm's threads, a pair each");
static_assert(kKvInsertSideThreads == linear::kThreadsPerCta, "a linear's side CTAs have its threads");
static_assert(kQueryNormGroupThreads == rms::kThreads && kQueryNormValues == rms::kTinyRowValues,
              "the queries' norm in a linear's CTAs stands in for run_rms_norm's CTA rows");
static_assert(KvInsertLinearSide::kPairs * kKvInsertSideThreads * 2 == kKvInsertSideMaxHeadDim);

struct KvInsertArgs {
  KvInsertParams p;
  int64_t x_row_stride;
  rms::RmsNormArgs norm;
};

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
  kv_insert_row<1>(a.p, a.x_row_stride, blockIdx.x);  // a pair per thread
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

void check_linear_with_kv_insert_params(const LinearWithKvInsertParams& p) {
  const KvInsertParams& insert = p.insert;
  const QueryHeadNormParams& q = p.q_norm;
  const int tokens = p.linear.tokens;
  check_kv_insert_params(insert);
  check(insert.fused_norm.rows == 0, "linear_with_kv_insert: the KV insert carries no fused norm here (the queries' ",
        "norm is the linear's epilogue)");
  check(insert.cache.layout.head_dim <= kKvInsertSideMaxHeadDim, "linear_with_kv_insert: KV head_dim ",
        insert.cache.layout.head_dim, " exceeds ", kKvInsertSideMaxHeadDim);
  check(insert.rows == tokens && q.tokens == tokens, "linear_with_kv_insert: ", insert.rows, " KV rows and ",
        q.tokens, " query rows for a linear of ", tokens, " tokens");
  check(insert.stream == p.linear.stream, "linear_with_kv_insert: the KV insert's stream is not the linear's");
  check(q.q != nullptr && q.q == p.linear.y && q.q_row_stride == p.linear.y_row_stride,
        "linear_with_kv_insert: the queries' norm reads the linear's fp32 output y with its row stride");
  check(q.heads >= 1 && q.head_dim >= 2 && q.head_dim % 2 == 0 && q.head_dim <= kQueryHeadNormMaxHeadDim,
        "linear_with_kv_insert: ", q.heads, " query heads of head_dim ", q.head_dim, " (heads >= 1, head_dim even, ",
        "2 to ", kQueryHeadNormMaxHeadDim, ")");
  check(int64_t(q.heads) * q.head_dim <= p.linear.weight.rows, "linear_with_kv_insert: ", q.heads, " heads of ",
        q.head_dim, " exceed the linear's ", p.linear.weight.rows, " rows");
  check(q.rope_table == nullptr || (q.positions != nullptr && q.rope_dim >= 2 && q.rope_dim % 2 == 0 &&
                                    q.rope_dim <= q.head_dim && q.rope_dim / 2 <= kRmsNormMaxRopePairs),
        "linear_with_kv_insert: query RoPE of rope_dim ", q.rope_dim, " needs the positions, an even rope_dim ",
        "within head_dim and at most ", 2 * kRmsNormMaxRopePairs);
  check(q.q_bf16 != nullptr && q.head_tickets != nullptr,
        "linear_with_kv_insert: the queries' norm needs q_bf16 and head_tickets");
}

void run_linear_with_kv_insert(const LinearWithKvInsertParams& p) {
  check_linear_with_kv_insert_params(p);
  const KvInsertLinearSide::Args side{
      .insert = p.insert,
      .x_row_stride = p.insert.x_row_stride == 0 ? p.insert.cache.layout.head_dim : p.insert.x_row_stride,
      .q_norm = p.q_norm};
  run_quantized_linear_with<KvInsertLinearSide>(p.linear, side, p.insert.rows);
}

}  // namespace dsv4::cuda
