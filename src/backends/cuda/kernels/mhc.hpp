// Manifold-constrained hyper-connections on the GPU (dsv4-model.md §2; CPU reference: backends/cpu/mhc.hpp):
// hc_pre and hc_head are one launch each (norm + projection + Sinkhorn + collapse), hc_post one launch, and
// hc_post_pre one launch for a sub-block's hc_post followed by the next site's hc_pre (X read once).
//
// Dispatch contract:
// - n = 4 streams (hc_mult of every DSV4 model) and hidden d a multiple of 4 (16-byte vectors); anything else is
//   refused with an error naming the field. All activations fp32, 16-byte aligned (bf16 outputs 8-byte aligned);
//   fn/base/scale fp32 on the device.
// - hc_pre / hc_head / hc_post_pre run persistent CTAs: each owns a d-slice (all n streams) with its columns of fn
//   held in registers, and walks its group's token tiles (16 tokens) with the X tiles streamed in several stages ahead.
//   The projection runs on the tensor cores in 3xTF32 (fp32-class accuracy). The slices' partial sums of a tile are
//   summed in slice order by the tile's CTAs (deterministic: bit-identical across runs; the bits depend on the slice
//   width the launch takes, choose_hc_projection_config); every CTA then collapses its own slice, still in shared
//   memory. The CTAs of a tile wait for each other: the launcher sizes the grid to
//   what the card holds at once.
// - Programmatic dependent launch (ptx/dependent_launch.cuh) in every mHC kernel: only the weights are read before
//   the grid-dependency wait (the persistent hc_pre / hc_head's fn fragments, the decode kernels' fn columns), so the
//   kernels chained before an mHC launch must not write fn.
// - Scratch: `hc_projection_workspace_bytes` bytes, zero-filled ONCE after allocation (cudaMemsetAsync). The CTAs
//   hand each other values tagged with a launch epoch kept in the workspace (advanced by every launch), so the
//   buffer is reused without re-zeroing (graph-capturable). One workspace serves one launch at a time (not two
//   streams concurrently). A workspace sized for T tokens serves any launch with fewer tokens, hc_pre, hc_head and
//   hc_post_pre alike. The persistent kernel indexes the words in 32 bits: a launch needing more (V4-Flash: about
//   1.3M tokens in one launch, 2.6M for hc_pre on 128-dim slices; V4-Pro about 760K, 1.5M) is refused.
// - Single-cluster decode kernel (kernel = AUTO, the default; T ≤ kAutoClusterPerTileMaxTokens (hc_head:
//   kAutoClusterPerTileMaxHeadTokens) and hidden a multiple of kHcSingleClusterHiddenQuantum up to
//   kHcSingleClusterMaxHidden, or T = 1 and hidden a multiple of kHcSingleClusterWideHiddenQuantum up to
//   kHcSingleClusterWideMaxHidden (V4-Pro's 7168: each thread two vectors per stream), on a card that holds a 16-CTA
//   cluster of it): one cluster of 16 CTAs per 16-token tile (independent of each other; below), each CTA a 1/16 slice
//   of the hidden size (all n streams) with its fn columns bulk-copied into
//   shared memory before the grid-dependency wait; every sum over the slices is one DSMEM exchange (no global hop, no
//   workspace words), the fused output norm one more. Its sums run in another fixed order than the other kernels';
//   Sinkhorn as the asynchronous cluster decode kernel's.
// - Cluster decode kernel (kernel = CLUSTER_ASYNC, and AUTO where the single-cluster kernel does not apply;
//   T ≤ kHcDecodeMaxTokens, hidden ≤ kHcDecodeMaxHidden): one CTA per 64-dim slice in clusters of 8 CTAs (plus one
//   cluster for hc_pre's post/comb) projects its slice once; each sum over the slices is one cluster (DSMEM) step and
//   one global hop, no pipeline. Its sums run in another order than the persistent kernel's (a launch's results depend
//   on which kernel served it, not on T otherwise), and its Sinkhorn scales by hardware reciprocals instead of dividing
//   (a few ulps; in scaling form). Same workspace as the persistent kernel. Its cluster steps run through st.async and
//   mbarriers (no cluster barriers).
// - Fused output norm (out_norm_weight set): y (then required; h for hc_head) and y_bf16 hold, instead of y,
//   z = y · rsqrt(mean over d of y² + norm_eps) · out_norm_weight (y as above, so rounded to bf16 first in Reference
//   numerics), rounded to bf16 in the fp32 buffer when out_norm_round_to_bf16: what run_rms_norm({.x = y, .weight =
//   out_norm_weight, .width = hidden, .eps = norm_eps, .round_to_bf16 = out_norm_round_to_bf16, .y = y, .y_bf16 =
//   y_bf16}) gives after the op (up to the order of the Σy² summation). In one launch for the decode kernels; the
//   persistent path runs that rms_norm after its own launch.
// - round_to_bf16 reproduces the Reference numerics mode: y (hc_pre), h (hc_head) and X_out (hc_post) are stored
//   rounded to bf16 (round to nearest even) in their fp32 buffers, as the CPU backend does after its ops;
//   hc_post_pre rounds X_out, projects the rounded X_out and rounds y, as the two ops in a row do.
// - Asynchronous on `stream`; no allocation, no host synchronisation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dsv4::cuda {

inline constexpr int kMhcStreams = 4;
inline constexpr int64_t kHcDecodeMaxTokens = 16;
inline constexpr int64_t kHcDecodeMaxHidden = 8192;

// Which projection kernel serves hc_pre / hc_head / hc_post_pre. AUTO: the single-cluster decode kernel where it
// applies, else the asynchronous cluster decode kernel where that applies (above), hc_post_pre of
// kAutoWarpSpecializedPostPreMinTokens tokens and more on PERSISTENT_WARP_SPECIALIZED, the persistent kernel elsewhere;
// PERSISTENT: the persistent kernel always (the comparison baseline); CLUSTER_ASYNC: the asynchronous cluster decode
// kernel where it applies (AUTO before session 16), the persistent kernel elsewhere;
// PERSISTENT_WARP_SPECIALIZED: hc_post_pre on the persistent kernel at one CTA per SM in two warp groups, one applying
// the update and projecting and publishing the tiles, the other loading, summing over the slices and collapsing, each
// at its own pace along a 12-deep X ring (same sums, same order: the same bits as the persistent kernel at 64-dim
// slices), fused at every token count (X read once), where the card holds a CTA per 64-dim slice; wider launches,
// hc_pre and hc_head take the persistent kernel.
enum class HcKernelChoice : uint8_t { AUTO, PERSISTENT, CLUSTER_ASYNC, PERSISTENT_WARP_SPECIALIZED };

// AUTO runs hc_pre and hc_post_pre of up to this many tokens (hc_head: kAutoClusterPerTileMaxHeadTokens) at the
// single-cluster kernel's one-vector hidden sizes on that kernel, one independent cluster per 16-token tile (each reads
// all of fn; output norm fused; hc_post_pre fused). H200, V4-Flash, session 17, with the output norm, against the
// persistent kernel + rms_norm: 32 tokens hc_pre 8.7 vs 15.7 µs, hc_post_pre 11.1 vs 16.1, hc_head 7.6 vs 10.5; 64:
// 9.7 vs 17.4, 12.1 vs 20.2, 8.3 vs 12.5; 128: 18.9 vs 21.3, 23.4 vs 28.9, hc_head 15.6 vs 15.2; 256: 29.9 vs 30.7,
// 36.8 vs 38.8, 24.1 vs 22.2.
inline constexpr int64_t kAutoClusterPerTileMaxTokens = 128;
inline constexpr int64_t kAutoClusterPerTileMaxHeadTokens = 64;

// The single-cluster decode kernel's hidden sizes (AUTO; above), one vector per thread and two.
inline constexpr int64_t kHcSingleClusterHiddenQuantum = 256;
inline constexpr int64_t kHcSingleClusterMaxHidden = 4096;
inline constexpr int64_t kHcSingleClusterWideHiddenQuantum = 512;
inline constexpr int64_t kHcSingleClusterWideMaxHidden = 7168;

// hc_pre of one site: X [T, n, d] -> y [T, d] = Σ_k pre_k·X_k, post [T, n], comb [T, n, n] (row-major comb[j][k]).
struct HcPreParams {
  const float* X = nullptr;      // [tokens, n, hidden]
  const float* fn = nullptr;     // [(2+n)·n, n·hidden]
  const float* base = nullptr;   // [(2+n)·n]
  const float* scale = nullptr;  // [3]: pre, post, comb
  int64_t tokens = 0;
  int64_t hidden = 0;
  int streams = kMhcStreams;
  int sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;
  bool round_to_bf16 = false;      // Reference numerics: y rounded to bf16 (both outputs)
  float* y = nullptr;              // [tokens, hidden] fp32; may be null when y_bf16 is set
  __nv_bfloat16* y_bf16 = nullptr; // optional [tokens, hidden]: y for the next linear layer
  float* post = nullptr;           // [tokens, n]
  float* comb = nullptr;           // [tokens, n, n]
  const float* out_norm_weight = nullptr;  // optional [hidden]: the fused output norm (see above)
  bool out_norm_round_to_bf16 = false;
  HcKernelChoice kernel = HcKernelChoice::AUTO;
  void* workspace = nullptr;       // hc_projection_workspace_bytes(tokens, hidden, SMs), zeroed once
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// hc_head: X [T, n, d] -> h [T, d] = Σ_k (sigmoid(m_k·scale + base_k) + hc_eps)·X_k.
struct HcHeadParams {
  const float* X = nullptr;      // [tokens, n, hidden]
  const float* fn = nullptr;     // [n, n·hidden]
  const float* base = nullptr;   // [n]
  const float* scale = nullptr;  // [1]
  int64_t tokens = 0;
  int64_t hidden = 0;
  int streams = kMhcStreams;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;
  bool round_to_bf16 = false;
  float* h = nullptr;              // [tokens, hidden] fp32; may be null when h_bf16 is set
  __nv_bfloat16* h_bf16 = nullptr; // optional [tokens, hidden]
  const float* out_norm_weight = nullptr;  // optional [hidden]: the fused output norm (see above)
  bool out_norm_round_to_bf16 = false;
  HcKernelChoice kernel = HcKernelChoice::AUTO;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// hc_post: X_out[k] = post_k·out + Σ_j comb[j][k]·X[j]. X_out may alias X exactly (in place); no other overlap.
struct HcPostParams {
  const float* out = nullptr;   // [tokens, hidden]: the sub-block's output
  const float* X = nullptr;     // [tokens, n, hidden]
  const float* post = nullptr;  // [tokens, n]
  const float* comb = nullptr;  // [tokens, n, n]
  int64_t tokens = 0;
  int64_t hidden = 0;
  int streams = kMhcStreams;
  bool round_to_bf16 = false;   // Reference numerics: the residual streams are kept in bf16
  float* X_out = nullptr;       // [tokens, n, hidden]
  cudaStream_t stream = nullptr;
};

// Up to this many tokens run_hc_post_pre is one fused launch; above it, unless the warp-specialised kernel serves the
// launch (below), run_hc_post (at copy bandwidth) then run_hc_pre are faster than the persistent kernel's fused
// variant, whose 64-dim CTAs run one per SM (H200, session 11: V4-Flash 4096 tokens 424 vs 526 µs; 64 tokens 25.8 vs
// 22.1 µs, 1 token 17.8 vs 14.9 µs).
inline constexpr int64_t kFusedPostPreMaxTokens = 128;

// From this many tokens AUTO runs hc_post_pre fused on the warp-specialised kernel (X read once), which beat hc_post
// then hc_pre at 4096 tokens and lost at 256 (H200, V4-Flash, session 15: 410.8 vs 430.9 µs; 35.2 vs 34.3 µs).
inline constexpr int64_t kAutoWarpSpecializedPostPreMinTokens = 2048;

// hc_post of one sub-block, then hc_pre of the next site on the updated residual, in one launch (see above):
// X_out[k] = post_k·out + Σ_j comb[j][k]·X[j] (as run_hc_post), then y = Σ_k next_pre_k·X_out_k, next_post and
// next_comb from X_out and the next site's weights (as run_hc_pre). X_out may alias X exactly; next_post/next_comb
// must not overlap post/comb (the launch reads a tile's post/comb while it writes other tiles' next ones).
struct HcPostPreParams {
  // hc_post of the finished sub-block
  const float* out = nullptr;   // [tokens, hidden]: the sub-block's output
  const float* X = nullptr;     // [tokens, n, hidden]
  const float* post = nullptr;  // [tokens, n]
  const float* comb = nullptr;  // [tokens, n, n]
  float* X_out = nullptr;       // [tokens, n, hidden]: the updated residual
  // hc_pre of the next site
  const float* next_fn = nullptr;     // [(2+n)·n, n·hidden]
  const float* next_base = nullptr;   // [(2+n)·n]
  const float* next_scale = nullptr;  // [3]: pre, post, comb
  int64_t tokens = 0;
  int64_t hidden = 0;
  int streams = kMhcStreams;
  int sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;
  bool round_to_bf16 = false;      // Reference numerics: X_out and y rounded to bf16
  float* y = nullptr;              // [tokens, hidden] fp32; may be null when y_bf16 is set
  __nv_bfloat16* y_bf16 = nullptr; // optional [tokens, hidden]
  float* next_post = nullptr;      // [tokens, n]
  float* next_comb = nullptr;      // [tokens, n, n]
  const float* out_norm_weight = nullptr;  // optional [hidden]: the fused output norm (see above)
  bool out_norm_round_to_bf16 = false;
  HcKernelChoice kernel = HcKernelChoice::AUTO;
  void* workspace = nullptr;       // hc_projection_workspace_bytes(tokens, hidden, SMs), zeroed once
  size_t workspace_bytes = 0;
  cudaStream_t stream = nullptr;
};

// The op a persistent launch serves: its slices and stages depend on it.
enum class HcProjectionOp : uint8_t { PRE, HEAD, POST_PRE };

// From this many token tiles (512 tokens) hc_pre takes 128-dim slices where 64 would be taken: one CTA of 512
// threads per SM and half the slices per tile, so half the cross-CTA words (faster from 512 tokens, slower below and
// for hc_head). Other bits than 64-dim slices (another summation order).
inline constexpr int64_t kWideSliceMinTiles = 32;

// How `op` covers [T, n·d]: tiles of `token_tile` tokens × slices of `slice_dims` dims (all n streams).
struct HcProjectionConfig {
  int token_tile = 0;      // 16
  int slice_dims = 0;      // 32 or 64: the widest that still gives about every SM a CTA; 128 (kWideSliceMinTiles)
  int64_t token_tiles = 0;
  int64_t slices = 0;      // CTAs per token tile (must be resident together)
  int threads = 0;         // per CTA: a warp per 32 of the slice's n·slice_dims columns
  int stages = 0;          // X tiles staged per CTA
  size_t smem_bytes = 0;
};

HcProjectionConfig choose_hc_projection_config(int64_t tokens, int64_t hidden, int multiprocessors,
                                               HcProjectionOp op = HcProjectionOp::PRE);
size_t hc_projection_workspace_bytes(int64_t tokens, int64_t hidden, int multiprocessors);

// Throw (naming the field at fault) unless the launch is supported.
void check_hc_pre_params(const HcPreParams& params);
void check_hc_head_params(const HcHeadParams& params);
void check_hc_post_params(const HcPostParams& params);
void check_hc_post_pre_params(const HcPostPreParams& params);

void run_hc_pre(const HcPreParams& params);
void run_hc_head(const HcHeadParams& params);
void run_hc_post(const HcPostParams& params);
void run_hc_post_pre(const HcPostPreParams& params);

}  // namespace dsv4::cuda
