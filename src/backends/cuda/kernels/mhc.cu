#include "backends/cuda/kernels/mhc.hpp"

#include <algorithm>
#include <mutex>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/mhc.cuh"
#include "core/error.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kMaxPartialRows = mhc::kProjectionRows<false> + 1;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto* pa = static_cast<const char*>(a);
  const auto* pb = static_cast<const char*>(b);
  return pa < pb + b_bytes && pb < pa + a_bytes;
}

int current_multiprocessors() {
  int device = 0, count = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  DSV4_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

void check_shape(const char* op, int64_t tokens, int64_t hidden, int streams) {
  check(streams == kMhcStreams, op, ": ", streams, " streams; the kernels are built for n = ", kMhcStreams);
  check(tokens >= 0, op, ": negative token count ", tokens);
  check(hidden > 0 && hidden % 4 == 0, op, ": hidden size ", hidden, " must be a positive multiple of 4");
  check(hidden <= (int64_t(1) << 24), op, ": hidden size ", hidden, " is beyond the supported 2^24");
}

size_t counter_bytes(int64_t token_tiles) {
  return size_t(ceil_div(int64_t(mhc::kCounterHeader + 2 * token_tiles) * 4, 256) * 256);
}

// Common checks of hc_pre and hc_head: the projection inputs, the output pair and the workspace.
void check_projection(const char* op, const float* X, const float* fn, const float* base, const float* scale,
                      int64_t tokens, int64_t hidden, int streams, const float* out, const void* out_bf16,
                      const void* workspace, size_t workspace_bytes) {
  check_shape(op, tokens, hidden, streams);
  check(X != nullptr && fn != nullptr && base != nullptr && scale != nullptr, op, ": null ",
        X == nullptr ? "X" : fn == nullptr ? "fn" : base == nullptr ? "base" : "scale");
  check(aligned16(X) && aligned16(fn), op, ": ", aligned16(X) ? "fn" : "X", " must be 16-byte aligned");
  check(out != nullptr || out_bf16 != nullptr, op, ": no output (both the fp32 and the bf16 pointer are null)");
  const size_t x_bytes = size_t(tokens) * size_t(streams) * size_t(hidden) * sizeof(float);
  const size_t out_elements = size_t(tokens) * size_t(hidden);
  check(out == nullptr || !overlaps(out, out_elements * 4, X, x_bytes), op, ": the fp32 output overlaps X");
  check(out_bf16 == nullptr || !overlaps(out_bf16, out_elements * 2, X, x_bytes), op,
        ": the bf16 output overlaps X");
  const size_t needed = hc_projection_workspace_bytes(tokens, hidden, current_multiprocessors());
  check(workspace != nullptr && workspace_bytes >= needed, op, ": workspace of ", workspace_bytes,
        " bytes; this launch needs ", needed, " (hc_projection_workspace_bytes)");
  check(aligned16(workspace), op, ": workspace must be 16-byte aligned");
}

// CTAs of `kernel` resident per SM with `smem_bytes` of dynamic shared memory, after raising the kernel's shared
// memory limits on the current device. Cached per (kernel, device, size): the attribute and occupancy queries cost
// microseconds of host time, more than a decode-sized launch.
int prepare_resident_ctas(const void* kernel, size_t smem_bytes) {
  struct Entry {
    const void* kernel;
    int device;
    size_t smem_bytes;
    int resident;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  DSV4_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard lock(mutex);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device && e.smem_bytes == smem_bytes) return e.resident;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
  // The whole unified L1/shared array as shared memory: the occupancy the wait between CTAs relies on, and the
  // latency hiding of several CTAs per SM.
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                       int(cudaSharedmemCarveoutMaxShared)));
  int resident = 0;
  DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, mhc::kThreads, smem_bytes));
  cache.push_back({kernel, device, smem_bytes, resident});
  return resident;
}

template <bool kHead, int kTokensPerThread>
void launch_projection(mhc::ProjectionArgs args, const HcProjectionConfig& config, int multiprocessors,
                       cudaStream_t stream, const char* op) {
  const auto kernel = mhc::hc_projection_kernel<kHead, kTokensPerThread>;
  const int resident = prepare_resident_ctas(reinterpret_cast<const void*>(kernel), config.smem_bytes);
  // The CTAs of one token tile wait for each other: all of them must fit on the card at once.
  check(int64_t(resident) * multiprocessors >= config.slices, op, ": ", config.slices,
        " CTAs per token tile cannot be resident together (", resident, " per SM × ", multiprocessors, " SMs)");
  const int64_t ctas = config.token_tiles * config.slices;
  check(ctas <= 0x7FFFFFFF, op, ": ", ctas, " CTAs exceed the launch limit");
  kernel<<<unsigned(ctas), mhc::kThreads, config.smem_bytes, stream>>>(args);
  DSV4_CUDA_CHECK_LAUNCH(op);
}

template <bool kHead>
void run_projection(mhc::ProjectionArgs args, void* workspace, cudaStream_t stream, const char* op) {
  const int multiprocessors = current_multiprocessors();
  const HcProjectionConfig config = choose_hc_projection_config(args.tokens, args.hidden, multiprocessors);
  args.slice_dims = config.slice_dims;
  args.slices = int(config.slices);
  args.counters = static_cast<unsigned*>(workspace);
  args.partials = reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes(config.token_tiles));
  if (config.token_tile == 8)
    launch_projection<kHead, 1>(args, config, multiprocessors, stream, op);
  else
    launch_projection<kHead, 2>(args, config, multiprocessors, stream, op);
}

}  // namespace

HcProjectionConfig choose_hc_projection_config(int64_t tokens, int64_t hidden, int multiprocessors) {
  check(tokens >= 0 && hidden > 0 && hidden % 4 == 0, "hc projection: bad shape tokens=", tokens,
        " hidden=", hidden);
  HcProjectionConfig config;
  // 16-token tiles keep a CTA at 45 KB of shared memory (4 per SM: their load, compute and wait phases overlap)
  // while fn, re-read from L2 per tile, stays below 1.5× the X bytes; decode batches of up to 8 use 8-token tiles.
  config.token_tile = tokens <= 8 ? 8 : 16;
  config.token_tiles = ceil_div(tokens, config.token_tile);
  // Narrow slices give few tokens enough CTAs to stream fn from every SM; wide slices keep the per-CTA reduction
  // over the slices (each CTA reads 5·token_tile partials per slice) small against the X it owns.
  config.slice_dims = 128;
  for (const int dims : {32, 64, 128}) {
    if (config.token_tiles * ceil_div(hidden, dims) <= int64_t(multiprocessors) * 5 / 4) {
      config.slice_dims = dims;
      break;
    }
  }
  config.slices = ceil_div(hidden, config.slice_dims);
  config.smem_bytes = size_t(mhc::projection_smem_floats(config.token_tile, config.slice_dims,
                                                         mhc::kProjectionRows<false>)) * sizeof(float);
  return config;
}

size_t hc_projection_workspace_bytes(int64_t tokens, int64_t hidden, int multiprocessors) {
  const HcProjectionConfig config = choose_hc_projection_config(tokens, hidden, multiprocessors);
  const size_t partials =
      size_t(config.token_tiles * config.slices) * kMaxPartialRows * size_t(config.token_tile) * sizeof(float);
  return counter_bytes(config.token_tiles) + partials;
}

void check_hc_pre_params(const HcPreParams& p) {
  check_projection("hc_pre", p.X, p.fn, p.base, p.scale, p.tokens, p.hidden, p.streams, p.y, p.y_bf16, p.workspace,
                   p.workspace_bytes);
  check(p.post != nullptr && p.comb != nullptr, "hc_pre: null ", p.post == nullptr ? "post" : "comb");
  check(p.sinkhorn_iters >= 1, "hc_pre: sinkhorn_iters = ", p.sinkhorn_iters, "; at least one is needed");
}

void check_hc_head_params(const HcHeadParams& p) {
  check_projection("hc_head", p.X, p.fn, p.base, p.scale, p.tokens, p.hidden, p.streams, p.h, p.h_bf16,
                   p.workspace, p.workspace_bytes);
}

void check_hc_post_params(const HcPostParams& p) {
  check_shape("hc_post", p.tokens, p.hidden, p.streams);
  check(p.out != nullptr && p.X != nullptr && p.post != nullptr && p.comb != nullptr && p.X_out != nullptr,
        "hc_post: null ",
        p.out == nullptr    ? "out"
        : p.X == nullptr    ? "X"
        : p.post == nullptr ? "post"
        : p.comb == nullptr ? "comb"
                            : "X_out");
  check(aligned16(p.out) && aligned16(p.X) && aligned16(p.post) && aligned16(p.comb) && aligned16(p.X_out),
        "hc_post: out, X, post, comb and X_out must be 16-byte aligned");
  const size_t x_bytes = size_t(p.tokens) * kMhcStreams * size_t(p.hidden) * sizeof(float);
  check(p.X_out == p.X || !overlaps(p.X_out, x_bytes, p.X, x_bytes),
        "hc_post: X_out must be X itself or not overlap it");
  check(!overlaps(p.X_out, x_bytes, p.out, size_t(p.tokens) * size_t(p.hidden) * sizeof(float)),
        "hc_post: X_out overlaps out");
}

void run_hc_pre(const HcPreParams& p) {
  check_hc_pre_params(p);
  if (p.tokens == 0) return;
  mhc::ProjectionArgs args{};
  args.X = p.X;
  args.fn = p.fn;
  args.base = p.base;
  args.scale = p.scale;
  args.tokens = p.tokens;
  args.hidden = int(p.hidden);
  args.sinkhorn_iters = p.sinkhorn_iters;
  args.hc_eps = p.hc_eps;
  args.norm_eps = p.norm_eps;
  args.round_to_bf16 = p.round_to_bf16;
  args.y = p.y;
  args.y_bf16 = p.y_bf16;
  args.post = p.post;
  args.comb = p.comb;
  run_projection<false>(args, p.workspace, p.stream, "hc_pre");
}

void run_hc_head(const HcHeadParams& p) {
  check_hc_head_params(p);
  if (p.tokens == 0) return;
  mhc::ProjectionArgs args{};
  args.X = p.X;
  args.fn = p.fn;
  args.base = p.base;
  args.scale = p.scale;
  args.tokens = p.tokens;
  args.hidden = int(p.hidden);
  args.sinkhorn_iters = 1;
  args.hc_eps = p.hc_eps;
  args.norm_eps = p.norm_eps;
  args.round_to_bf16 = p.round_to_bf16;
  args.y = p.h;
  args.y_bf16 = p.h_bf16;
  run_projection<true>(args, p.workspace, p.stream, "hc_head");
}

void run_hc_post(const HcPostParams& p) {
  check_hc_post_params(p);
  if (p.tokens == 0) return;
  const int64_t vectors = p.tokens * (p.hidden / 4);
  const int64_t blocks = ceil_div(vectors, mhc::kThreads);
  check(blocks <= 0x7FFFFFFF, "hc_post: ", p.tokens, " tokens × ", p.hidden, " exceed the launch limit");
  mhc::hc_post_kernel<<<unsigned(blocks), mhc::kThreads, 0, p.stream>>>(p.out, p.X, p.post, p.comb, p.tokens,
                                                                       int(p.hidden), p.round_to_bf16, p.X_out);
  DSV4_CUDA_CHECK_LAUNCH("hc_post");
}

}  // namespace dsv4::cuda
