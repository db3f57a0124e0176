// Kernels behind run_hc_pre / run_hc_head / run_hc_post_pre / run_hc_post (mhc.hpp holds the contract).
//
// NOTES:
// - hc_pre's cost is the projection m[T, R] = X[T, n·d] · fnᵀ (R = 24 rows, 4 for hc_head), a skinny GEMM of 24
//   MACs per X value: as fp32 FMAs that is as long as streaming X itself, so it runs on the tensor cores in 3xTF32
//   (x = big + small, big tf32-rounded, small the exact rest, truncated to tf32 by the tensor core; big·big +
//   big·small + small·big keeps ≈ 2⁻²⁰ of each product, fp32-class, against the tests' 64-ulp (≈ 2⁻¹⁸) budget).
//   Per warp the K chains are 32 columns long; warps, slices and tokens are summed in fp32 in a fixed order, so
//   reruns are bit-identical.
// - Measured (H200, session 11): a tile costs a CTA ≈ 3-5 µs whatever its bytes (33 or 17 KB), its pipeline slack
//   (1-4 iterations), its copy mechanism (64 bulk copies or per-thread cp.async) or how early the other CTAs' words
//   are read (2-3 iterations ahead: no gain); what tracked the time was the size of the per-tile loop's code (17-38
//   KB of SASS, cold at decode sizes): cutting it from 27 to 17 KB took hc_pre at 4096 tokens from 331 to 279 µs.
//   So the loop is kept short: fixed per-thread copy offsets, no per-tile integer division, the re-poll of a stale
//   word out of line, one tf32 rounding per split. Not profiled (no Nsight on the lent machines): the rest of the
//   per-tile cost is unexplained; the HMMA/shuffle/barrier latency chain per tile is the next suspect.
// - Persistent CTAs: CTA (slice s, group g) owns dims [s·ds, (s+1)·ds) of all 4 streams and keeps its columns of fn
//   in registers as MMA B fragments, then walks the token tiles g, g + G, … of 16 tokens. X tiles stream in kStages
//   deep by TMA: one thread issues a tile's boxes (32 dims × the tile's 64 (token, stream) rows each) onto the
//   stage's mbarrier; rows past the tokens and columns past the hidden size arrive as zeros. (Per-thread 16-byte
//   cp.async copies until session 17: 4 per thread per tile and their address arithmetic in every thread. H200,
//   V4-Flash, against the session 14-16 runs: 4096 tokens hc_pre 284.4 → 256.4 µs (31 % of copy), hc_post_pre 409.1 →
//   390.1 (41 %), hc_head 197.4 → 172.3 (46 %); 64 tokens hc_pre 13.1 → 12.8.) Session 18: the stages addressed as
//   shared memory (they had been generic loads and stores with 64-bit address arithmetic), two barriers a tile
//   instead of four, 32-bit workspace offsets: 4096 tokens hc_pre 256.4 → 212.5 µs (37 %), hc_post_pre 385.7 →
//   353.9 (45 %), hc_head 172.4 → 156.6 (50 %) (H200). Still ≈ 500 instructions per thread and tile, and a tile
//   ≈ 3.3 µs of a CTA: latency-bound.
// - Profiled in session 19 (ncu, H200, V4-Flash hc_pre at 4096 tokens): 0.40 instructions issued per scheduler and
//   cycle at 3.8 warps per scheduler, 9.4 cycles per instruction (barrier 2.1, fixed-latency dependencies 2.2, shared
//   memory / MUFU 1.6, global 0.5); 17 % of the samples wait at the collapse's barrier. The time is linear in the tiles
//   per CTA: at most 2 or 3 groups of CTAs (1 or 1.5 CTAs per SM) took 416.6 / 284.3 µs against 221.1 at 2 per SM, so
//   each CTA's chain through a tile, not the SM or HBM, sets the pace; the cross-CTA words do not (taking them as
//   read, never waited for: 237 µs), nor the projection's MMAs (skipped: 205 µs). Tried and removed (same bits, same
//   runs, hc_pre / hc_head at 4096 tokens against 227.8 / 171.2 µs): the collapse reading its tile again by TMA into
//   a 2-stage ring beside a 4-stage X ring, so the lags are free of the ring (259.4 / 197.2); that loop at 3 CTAs per
//   SM, 80 registers, X ring of 2 and a one-stage re-read (315.5 / 180.2: register spills, the re-reads partly
//   from HBM; with L2 evict_last / evict_first hints 295.4 / 181.8); pre by shuffles within each token's threads and
//   no barrier before the collapse, the publication guarded by its own (282.0 / 228.5); V4-Pro alike.
// - Session 21 (H200, V4-Flash 4096 tokens, graph µs, same jobs, same bits): the slice sums check the tags of the
//   words they read early all at once (a stale word takes the whole sum out of line) and the publication issues all
//   its loads before adding; in kShared the slice sums run after the collapse (the partials' hop gets half an
//   iteration more); in kRoles the bf16 rounding of Reference numerics and the slice sums' later passes are out of
//   line (its code 2816 -> 2648 instructions). hc_pre 204.1 -> 193.4 (39 -> 41 % of copy), hc_head 129.7 -> 126.7
//   (61 -> 62 %), the warp-specialised hc_post_pre 343.3 / 341.4 -> 312.8 (46 -> 50 %). kShared with the rounding
//   out of line instead (the slice sums before the collapse): hc_pre 206.5 (at its 128-register cap), hc_head 124.7;
//   the two together were not measured. Tried and removed: the collapse's pre formed an iteration early by the last
//   warp (the sums' hop then had one iteration of slack: hc_pre 247, hc_head 204; a stale word costs a round trip
//   through L2, so both hops keep two iterations); with it the collapse at the top of its iteration and its stage
//   refilled at once, so X tiles are asked for two iterations ahead (an empty mbarrier per stage: 260 / 200; the
//   refill past the projection's barrier: 249 / 212; the X tiles' lead is not what binds); two MMA accumulator
//   chains (other bits; hc_post_pre 322).
// - Session 22 (H200, V4-Flash 4096 tokens, graph µs, same process, outputs byte-identical): kShared's slice sums
//   through one word pointer and stride per lane and a butterfly without a branch per level: hc_pre 195.2 -> 189.2
//   (41 -> 42 % of copy), hc_head 127.2 -> 122.6 (62 -> 65 %). Tried and removed: pre formed once by the CTA summing
//   its mix row (its token's Σx² summed alongside), each thread collapsing from its token's four pre words between
//   the projection and the one barrier a tile (no pre barrier; the collapsed stage refilled 1.5 iterations ahead;
//   warp_sums released by an mbarrier): hc_pre 193.0 -> 223.7, hc_head 126.6 -> 174.2, with the collapse an iteration
//   later 245.4 / 166.8, the warp-specialised hc_post_pre's finisher on pre words 313.6 -> 334.9 (ncu: 21 % of the
//   stall samples at the one barrier, long scoreboard 9.7 %: the pre words wanted right after the projection wait for
//   their L2 round trip or a stale re-read); X tiles asked of L2 two or four iterations before their TMA load (a
//   cp.async.bulk.prefetch.tensor by the loading thread): hc_pre +1.6 / +3 %, hc_head +2 %.
// - Session 23's trace (bench_cuda_mhc --trace-persistent; numbers and removed variants in bench/NOTES.md): the
//   sums' hop to the pre readers has no slack left, so stale pre words, not X tiles, bind hc_pre's iteration.
// - The fused hc_post + hc_pre (kPost) also stages the tile's `out` rows and its 16 tokens' post/comb in a ring of
//   kPostSlots (they die at the update, the X stage lives on until the collapse), applies the residual update to the
//   staged X in place, writes it to X_out, and projects and collapses the updated X: X is read once.
// - The collapse y = Σ_k pre_k·X_k needs each token's full projection. Every CTA publishes its slice's partial sums
//   [Σx², m_0 … m_{R-1}] × 16 tokens; the sums over the slices are spread over the tile's CTAs (item i of the tile's
//   rows × tokens by slice i mod S, one warp per item, slices in a fixed order then a butterfly: deterministic); every
//   CTA then reads the Σx² and pre rows of its tile and collapses its still-staged slice. Software pipelining over
//   the tiles: projection of tile j, collapse of tile j − kCollapseLag, sums of tile j − kSumLag, as deep as the
//   staged tiles allow, so no CTA waits for another's work of the same or the previous iteration.
// - Every value one CTA hands another is a 64-bit word (value, launch tag) written and read with single-copy-atomic
//   relaxed accesses: a reader checks the tag and needs no counter, fence or flag, and nothing has to be reset. The
//   tag is the workspace's launch epoch + 1; the last CTA to finish advances the epoch. Every thread reads the epoch
//   itself after issuing its first copies, so that read's latency overlaps them. Reads of other CTAs' words are
//   issued before the projection and checked after it, so their latency hides behind it; a stale tag is re-read.
// - post/comb (sigmoids and Sinkhorn, off the collapse's critical path) are computed after the tile loop, the tokens
//   of tile j by slice j mod S, two tokens per warp.
// - The two rows a quarter-warp's 16-byte fragment loads touch (tokens g and g + 1) must land in other banks
//   (conflict-free): the persistent kernel's stages hold the TMA's 128-byte-swizzled boxes (staged_offset: the 16-byte
//   chunk c of a 32-float row r stored at c ^ (r mod 8); rows 4·token + stream), unpadded, so a 64-dim stage is 16 KB
//   and hc_pre's 2 CTAs per SM stage 6 tiles (a 16-float row pad: 17 KB, 5 tiles, one iteration of slack per
//   cross-CTA hop); the decode kernel's single tile keeps the 16-float pad.
// - Sinkhorn on 4×4: lane = 4·j + k of a half-warp holds comb[j][k]; row sums are xor-1/2 butterflies, column sums
//   xor-4/8. Divisions are IEEE (no fast math), like the CPU reference. (A row per lane, tried in session 11, was
//   2 µs slower at T = 1: four IEEE divisions per lane per normalisation cost more than the shuffles they save.)
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backends/cuda/ptx/cluster.cuh"
#include "backends/cuda/ptx/cp_async.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/mbarrier.cuh"
#include "backends/cuda/ptx/tma.cuh"
#include "backends/cuda/ptx/wgmma.cuh"
#include "core/bf16.hpp"
#include "core/rms_norm_math.hpp"

namespace dsv4::cuda::mhc {

inline constexpr int kStreams = 4;
inline constexpr int kTileTokens = 16;  // one m16 MMA tile
inline constexpr int kRowPad = 16;      // floats of padding per staged token row of the decode kernel
inline constexpr int kPostThreads = 256;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr int kMixFloats = kStreams + kStreams * kStreams;  // one token's post and comb
inline constexpr int kPostSlots = 3;  // fused variant: out/post/comb of the tiles being loaded and updated
inline constexpr int kMaxStages = 12;

// Workspace: a header (launch epoch, finished-CTA counter), then tagged words only: the tiles' summed rows
// [tiles][kPartialRows][16], then the slices' partial sums [tiles][S][partial rows][16]. Launches of other sizes
// place these differently, but every word there is always a tagged word, and stale tags never match.
inline constexpr int kHeaderBytes = 256;
inline constexpr int kMaxSliceWords = 4;  // slices per lane when a warp sums one item (S ≤ 128 in one pass)

template <bool kHead>
inline constexpr int kProjectionRows = kHead ? kStreams : (2 + kStreams) * kStreams;
template <bool kHead>
inline constexpr int kPartialRows = kProjectionRows<kHead> + 1;  // row 0: Σx²; rows 1..R: the projections

// How the persistent kernel's CTAs sit on the SMs. kShared (HcKernelChoice::PERSISTENT): one warp per 32 columns of
// the CTA's 4·ds; 128 / ds CTAs per SM at the 128-register cap; the fused variant (64-dim slices at most) one CTA
// per SM (two at 32-dim slices): ~150 registers, no spills, and room for its out/post/comb ring beside a 10-11 deep
// X ring (hc_pre and hc_head: 6). kRoles (PERSISTENT_WARP_SPECIALIZED, 64-dim slices, hc_post_pre at any token
// count): one CTA per SM of two warp groups, the projection group (the fused update, projection and
// publication, as kShared's warps) and the finisher group (X loads, sums over the slices, collapse), each on its own
// barrier, so neither waits for the other's phase of a tile: the 12-deep ring is the only coupling. (A one-CTA-per-SM
// variant of the plain loop, fn's tf32 pairs in registers and half its 12 stages loading, was slower at every size:
// H200, Flash hc_pre T = 64 / 4096 13.5 / 377 µs against 13.1 / 298, session 15; removed.)
enum class ProjectionVariant { kShared, kRoles };

__host__ __device__ constexpr int projection_threads(int slice_dims) { return kStreams * slice_dims; }
__host__ __device__ constexpr int projection_cta_threads(int slice_dims, ProjectionVariant variant) {
  return projection_threads(slice_dims) * (variant == ProjectionVariant::kRoles ? 2 : 1);
}
__host__ __device__ constexpr int projection_ctas_per_sm(int slice_dims, bool post,
                                                        ProjectionVariant variant = ProjectionVariant::kShared) {
  return variant != ProjectionVariant::kShared ? 1 : post ? (slice_dims >= 64 ? 1 : 2) : 128 / slice_dims;
}
// The persistent kernel's staged tile: [slice_dims / 32 column blocks][64 rows][32 floats], row = 4·token + stream (the
// TMA's boxes, 128-byte swizzled: see the notes), and where (token, stream, column) sits in it.
__host__ __device__ constexpr int staged_row_floats(int slice_dims) { return kStreams * slice_dims; }
inline constexpr int kStagedBoxFloats = 32;                         // columns per TMA box (128 bytes)
inline constexpr int kStagedBoxRows = kTileTokens * kStreams;       // 64
inline constexpr int kStageAlignment = 1024;  // the 128-byte swizzle repeats every 8 rows of 128 bytes
__host__ __device__ constexpr int staged_offset(int token, int stream, int column) {
  const int row = kStreams * token + stream, chunk = (column % kStagedBoxFloats) / 4;
  return (column / kStagedBoxFloats) * kStagedBoxRows * kStagedBoxFloats + row * kStagedBoxFloats +
         4 * (chunk ^ (row % 8)) + column % 4;
}

__host__ __device__ constexpr int stage_bytes(int slice_dims) {
  return kTileTokens * staged_row_floats(slice_dims) * 4;
}
__host__ __device__ constexpr int warp_sums_bytes(int slice_dims, int partial_rows) {
  return projection_threads(slice_dims) / 32 * partial_rows * kTileTokens * 4;
}
// One slot of the fused variant's ring: the tile's out rows [16][ds], then its tokens' post and comb [16][20].
__host__ __device__ constexpr int post_slot_floats(int slice_dims) { return kTileTokens * (slice_dims + kMixFloats); }
__host__ __device__ constexpr int post_ring_bytes(int slice_dims, bool post) {
  return post ? kPostSlots * post_slot_floats(slice_dims) * 4 : 0;
}

// Staged X tiles: as many as the SM's 228 KB hold for its resident CTAs (each also holds 1 KB reserved by the
// driver and ~0.5 KB of static shared memory); a CTA block may use at most 227 KB. The stages start at the first
// kStageAlignment boundary of the dynamic shared memory (up to that much is skipped).
__host__ __device__ constexpr int projection_stages(int slice_dims, int partial_rows, bool post,
                                                   ProjectionVariant variant = ProjectionVariant::kShared) {
  const int budget = 228 * 1024 / projection_ctas_per_sm(slice_dims, post, variant) - 1024 - 512;
  const int fixed =
      warp_sums_bytes(slice_dims, partial_rows) + post_ring_bytes(slice_dims, post) + kStageAlignment;
  const int fit = (budget - fixed) / stage_bytes(slice_dims);
  const int capped = fit < kMaxStages ? fit : kMaxStages;
  return capped * stage_bytes(slice_dims) + fixed <= 227 * 1024 ? capped : capped - 1;
}

__host__ __device__ constexpr int projection_smem_bytes(int slice_dims, int partial_rows, bool post,
                                                       ProjectionVariant variant = ProjectionVariant::kShared) {
  return projection_stages(slice_dims, partial_rows, post, variant) * stage_bytes(slice_dims) +
         warp_sums_bytes(slice_dims, partial_rows) + post_ring_bytes(slice_dims, post) + kStageAlignment;
}

// One persistent kernel instance's launch shape and software pipeline, for the kernel, its launcher and
// bench_cuda_mhc --trace-persistent: CTA threads, X stages and dynamic shared memory; tile j is projected in iteration
// j, its slices summed in j + kSumLag and collapsed in j + kCollapseLag. The stages hold the tiles from
// j − kCollapseLag on, the rest loading: one (hc_pre, hc_head: tile j + 1 is asked for past tile j's projection
// barrier) or two (the fused variant). More stages, more slack for each cross-CTA hop. (hc_pre / hc_head with two
// loading, lags 2 and 3: H200, V4-Flash, session 19, same runs: hc_head 4096 tokens 161.6 / 171.2 µs against 150.6 /
// 163.9, 1000 tokens 49.2 vs 47.1, 256 16.7 vs 15.6; hc_pre 4096 221.1 / 227.8 vs 218.6 / 225.7.)
template <bool kHead, bool kPost, int kSliceDims, ProjectionVariant kVariant = ProjectionVariant::kShared>
struct ProjectionShape {
  static constexpr int kThreads = projection_cta_threads(kSliceDims, kVariant);
  static constexpr int kStages = projection_stages(kSliceDims, kPartialRows<kHead>, kPost, kVariant);
  static constexpr int kSmemBytes = projection_smem_bytes(kSliceDims, kPartialRows<kHead>, kPost, kVariant);
  static constexpr int kCollapseLag = kStages - (kPost ? 3 : 2);
  static constexpr int kSumLag = (kCollapseLag + 1) / 2;  // the slack split between the two hops
};

// One site's inputs and outputs, as every projection kernel takes them (hc_head: no post/comb; only the fused
// hc_post + hc_pre variants read out/post_in/comb_in and write X_out).
struct SiteArgs {
  const float* X;
  const float* fn;
  const float* base;
  const float* scale;
  int64_t tokens;
  int hidden;
  int sinkhorn_iters;
  float hc_eps;
  float norm_eps;
  bool round_to_bf16;
  float* y;
  __nv_bfloat16* y_bf16;
  float* post;
  float* comb;
  // The fused variant's hc_post inputs and its updated residual.
  const float* out;
  const float* post_in;
  const float* comb_in;
  float* X_out;
};

struct ProjectionArgs : SiteArgs {
  CUtensorMap x_map;  // X as [4·tokens rows, hidden columns], boxes of 64 rows × 32 columns, 128-byte swizzle
  int slices;   // S: CTAs per token tile
  int groups;   // G: CTAs per slice; group g takes tiles g, g + G, …
  int tiles;
  unsigned* header;                // [0] launch epoch, [1] finished CTAs
  unsigned long long* sums;        // [tiles][partial rows][16] tagged: Σ over the slices
  unsigned long long* partials;    // [tiles][S][partial rows][16] tagged
};

// A tile's words in the workspace (hc_head uses the same strides, with fewer rows filled).
inline constexpr size_t kTileWords = size_t(kPartialRows<false>) * kTileTokens;

// The persistent kernel's launch arguments past the site's: `slices` and `tiles`, the workspace's header, sums and
// partials, and X's tensor map (mhc.cu's launcher and the bench's traced launch).
inline void place_projection_launch(ProjectionArgs& args, void* workspace, int slices, int tiles, const char* op) {
  args.slices = slices;
  args.tiles = tiles;
  auto* base = static_cast<unsigned char*>(workspace);
  args.header = reinterpret_cast<unsigned*>(base);
  args.sums = reinterpret_cast<unsigned long long*>(base + kHeaderBytes);
  args.partials = args.sums + size_t(tiles) * kTileWords;
  args.x_map = sm90::encode_tensor_map_2d({.type = CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                                           .base = args.X,
                                           .cols = uint64_t(args.hidden),
                                           .rows = uint64_t(args.tokens) * kStreams,
                                           .row_stride_bytes = uint64_t(args.hidden) * sizeof(float),
                                           .box_cols = kStagedBoxFloats,
                                           .box_rows = kStagedBoxRows,
                                           .swizzle = CU_TENSOR_MAP_SWIZZLE_128B},
                                          op);
}

// Sizes a persistent launch's grid (mhc.cu's launcher and bench_cuda_mhc's traced launch): raises `kernel`'s
// shared-memory limit and carveout (once per kernel and device), refuses the launch unless a tile's args.slices CTAs
// can be resident together (they wait for each other), and sets args.groups to the tile groups the card holds at once,
// at most one per tile. `kernel`: an hc_projection_kernel instance (or the bench's traced copy of one) launched with
// its ProjectionShape's threads and shared memory.
void size_projection_grid(ProjectionArgs& args, const void* kernel, int threads, size_t smem_bytes, int multiprocessors,
                          const char* op);

// Trace hooks of the persistent kernel (no code unless a file defines them before including this one, as
// bench_cuda_mhc.cu does for its traced copy, which it also renames): a mark per phase of each loop iteration `j`,
// and a count per slow path taken: a stale word re-read (a collapse's pre or Σx² word, or a post/comb word after the
// loop), a slice sum taken out of line (once per sum, whatever its stale words), an X tile not yet landed.
enum class ProjectionPhase : int {
  kTop,          // iteration start (CTA thread 0, as every mark but kPreStored)
  kTileLanded,   // tile j's X stage waited for
  kProjected,    // the warp's MMAs done and its partials stored to shared memory
  kPublished,    // the CTA's partials of tile j stored to the workspace
  kPreStored,    // the collapse's pre of tile j − kCollapseLag in shared memory (the group's last thread)
  kPreReady,     // past the collapse's barrier
  kCollapsed,    // the thread's collapsed vector stored
  kSummed,       // this CTA's slice sums of tile j − kSumLag stored
  kCount
};
// The CTA's start (its first instruction) and end (past post/comb and its last barrier), marked in the slot past its
// last iteration (j = tiles of its group + kCollapseLag; kShared).
inline constexpr ProjectionPhase kCtaStartMark = ProjectionPhase::kTop, kCtaEndMark = ProjectionPhase::kTileLanded;
enum class ProjectionSlowPath : int { kStaleWord, kStaleSliceSum, kTileNotLanded, kCount };
#ifndef DSV4_MHC_PROJECTION_MARK
#define DSV4_MHC_PROJECTION_MARK(phase, j)
#endif
#ifndef DSV4_MHC_PROJECTION_SLOW
#define DSV4_MHC_PROJECTION_SLOW(path)
#endif

__device__ inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ inline unsigned load_relaxed_u32(const unsigned* address) {
  unsigned value;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(address));
  return value;
}

__device__ inline unsigned long long load_relaxed_u64(const unsigned long long* address) {
  unsigned long long value;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(address));
  return value;
}

__device__ inline void store_relaxed_u64(unsigned long long* address, unsigned long long value) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
}

__device__ inline unsigned long long tagged(float value, unsigned tag) {
  return (static_cast<unsigned long long>(tag) << 32) | __float_as_uint(value);
}

// Re-reads a tagged word until the writer's store has landed: out of line, so the per-tile loop stays short.
static __device__ __noinline__ float wait_for_tag(const unsigned long long* address, unsigned tag) {
  unsigned long long word;
  do {
    __nanosleep(32);
    word = load_relaxed_u64(address);
  } while (unsigned(word >> 32) != tag);
  return __uint_as_float(unsigned(word));
}

// The value of a tagged word once it carries `tag`: `word` was read earlier (its latency hidden). Uncounted: for
// callers that the trace counts otherwise.
__device__ __forceinline__ float tagged_value_uncounted(unsigned long long word, const unsigned long long* address,
                                                        unsigned tag) {
  return unsigned(word >> 32) == tag ? __uint_as_float(unsigned(word)) : wait_for_tag(address, tag);
}

// tagged_value_uncounted's value; the trace counts each re-read here as a stale word.
__device__ __forceinline__ float tagged_value(unsigned long long word, const unsigned long long* address,
                                              unsigned tag) {
  if (unsigned(word >> 32) != tag) DSV4_MHC_PROJECTION_SLOW(ProjectionSlowPath::kStaleWord);
  return tagged_value_uncounted(word, address, tag);
}

// The end of a CTA of a kernel that counts its finished CTAs: once all its threads are done, the launch's last CTA
// resets the counter and advances the epoch to `tag` (the next launch tags its words one higher).
__device__ __forceinline__ void finish_cta(unsigned* header, unsigned tag) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(header + 1, 1u) == gridDim.x - 1) {
    header[1] = 0;
    header[0] = tag;
  }
}

// A staged X tile still missing after this long means its TMA never completed (a broken launch): the kernel traps (a
// launch error) instead of hanging the device.
inline constexpr uint64_t kTileTimeoutNs = 2'000'000'000;

// Reports a tile that never landed and ends the launch with an error (out of line: never taken).
[[noreturn]] static __device__ __noinline__ void tile_timed_out() {
  printf("mHC: CTA %d of the launch waited 2 s for an X tile: its TMA never completed\n", int(blockIdx.x));
  __trap();
}

// wait_for_tile's polling after its first try: out of line, so the per-tile loop stays short.
static __device__ __noinline__ void wait_for_tile_slowly(uint64_t* barrier, uint32_t parity) {
  DSV4_MHC_PROJECTION_SLOW(ProjectionSlowPath::kTileNotLanded);
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  while (!::cuda::ptx::mbarrier_try_wait_parity(barrier, parity)) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > kTileTimeoutNs) tile_timed_out();
  }
}

// Waits for the stage barrier's phase of `parity` (an X tile landed).
__device__ __forceinline__ void wait_for_tile(uint64_t* barrier, uint32_t parity) {
  if (!::cuda::ptx::mbarrier_try_wait_parity(barrier, parity)) wait_for_tile_slowly(barrier, parity);
}

// One X tile's TMA boxes (kBoxes boxes of 32 columns from `column`, the 64 rows from `row`) into `stage`, completing
// on `barrier`: out of line, as only a CTA's loading thread runs it (in the per-tile loop every thread's code passes).
template <int kBoxes>
__device__ __noinline__ void load_x_tile(float* stage, uint64_t* barrier, const CUtensorMap* map, int column, int row,
                                         uint32_t bytes) {
  sm90::mbarrier_arrive_expect_tx(barrier, bytes);
#pragma unroll
  for (int box = 0; box < kBoxes; ++box)
    sm90::tma_load_2d(stage + box * kStagedBoxRows * kStagedBoxFloats, map, barrier, column + box * kStagedBoxFloats,
                      row);
}

// 16 bytes global → shared by cp.async (L2 only: X is streamed once).
__device__ inline void copy16_to_shared(float* shared_dst, const float* global_src) {
  ptx::cp_async_or_zero<16>(static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst)), global_src, true);
}

// One arrival on `barrier` once every cp.async this thread issued so far has landed.
__device__ inline void arrive_when_copies_land(uint64_t* barrier) {
  ptx::cp_async_mbarrier_arrive_noinc(static_cast<uint32_t>(__cvta_generic_to_shared(barrier)));
}

// Round to nearest tf32, ties away from zero (the low 13 bits of the result are zero): half a tf32 ulp added to the
// magnitude bits, then truncated. For every finite x these are cvt.rna.tf32.f32's bits; ptxas emulates that
// instruction with an extra infinity/NaN guard (4 instructions against these 2). An infinite or NaN x still gives a
// NaN small part (inf − inf, NaN − anything), so the MMA's sums stay NaN as before.
__device__ inline uint32_t to_tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xFFFFE000u; }

// x ≈ big + small: big = x rounded to tf32 (its top 11 significant bits), small = x − big (exact) passed as it is:
// the tensor core reads a tf32 operand's top 19 bits, so small loses at most 2⁻¹⁰ of itself, ≤ 2⁻²¹·|x|. 3
// instructions per split, and 40 splits run per thread per tile.
__device__ inline void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = __float_as_uint(x - __uint_as_float(big));
}

// D += A·B on the tensor cores, tf32 inputs, fp32 accumulators (PTX "mma.m16n8k8" .tf32). With g = lane / 4 and
// t = lane % 4: a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]; b = B[t][g], B[t+4][g];
// d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
__device__ inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Each lane of v rounded to bf16 (kept as fp32).
__device__ __forceinline__ float4 round4_to_bf16(float4 v) {
  return make_float4(round_to_bf16(v.x), round_to_bf16(v.y), round_to_bf16(v.z), round_to_bf16(v.w));
}

// round4_to_bf16 out of line (Reference numerics only): the warp-specialised kernel's per-tile code stays shorter
// (with its later slice-sum passes out of line: hc_post_pre at 4096 tokens 329.7 -> 312.8 µs, H200, session 21; the
// plain persistent kernel keeps it inline: hc_pre at its register cap 199.8 -> 206.5).
static __device__ __noinline__ float4 round4_to_bf16_call(float4 v) { return round4_to_bf16(v); }

// Token t's post (4 floats) then its comb rows (4 × 4) into mix, one 16-byte load each. `t` keeps its caller's
// integer type (the index arithmetic is the caller's).
__device__ __forceinline__ void load_mix(const float* post, const float* comb, auto t, float (&mix)[kMixFloats]) {
#pragma unroll
  for (int q = 0; q < kMixFloats / 4; ++q) {
    const float4 m =
        *reinterpret_cast<const float4*>(q == 0 ? post + t * kStreams : comb + (t * kStreams + q - 1) * kStreams);
    mix[4 * q] = m.x;
    mix[4 * q + 1] = m.y;
    mix[4 * q + 2] = m.z;
    mix[4 * q + 3] = m.w;
  }
}

// hc_post of one 4-dim vector of a token, output stream k: post_k·o + Σ_j comb[j][k]·x[j], the CPU's operation
// order (product, then one multiply-add per stream), rounded to bf16 when the residual is kept in bf16.
__device__ inline float4 residual_update(int k, const float4 o, const float4 (&x)[kStreams], const float* post,
                                         const float* comb, bool round_output) {
  float4 r = make_float4(post[k] * o.x, post[k] * o.y, post[k] * o.z, post[k] * o.w);
#pragma unroll
  for (int j = 0; j < kStreams; ++j) {
    const float w = comb[j * kStreams + k];
    r.x = fmaf(w, x[j].x, r.x);
    r.y = fmaf(w, x[j].y, r.y);
    r.z = fmaf(w, x[j].z, r.z);
    r.w = fmaf(w, x[j].w, r.w);
  }
  if (round_output) r = round4_to_bf16(r);
  return r;
}

// The collapse of one 4-dim vector of a token: Σ_k pre_k·x_k over its streams' vectors (pre_0 times x_0 first, then
// one multiply-add per stream), rounded to bf16 when the output is kept in bf16.
__device__ __forceinline__ float4 collapse_streams(const float4 (&x)[kStreams], const float* pre, bool round_output) {
  const float p0 = pre[0];
  float4 value = make_float4(p0 * x[0].x, p0 * x[0].y, p0 * x[0].z, p0 * x[0].w);
#pragma unroll
  for (int k = 1; k < kStreams; ++k) {
    const float pk = pre[k];
    value = make_float4(fmaf(pk, x[k].x, value.x), fmaf(pk, x[k].y, value.y), fmaf(pk, x[k].z, value.z),
                        fmaf(pk, x[k].w, value.w));
  }
  if (round_output) value = round4_to_bf16(value);
  return value;
}

// The same of the staged streams at x, x + stride, …
__device__ __forceinline__ float4 collapse_vector(const float* x, int stride, const float* pre, bool round_output) {
  float4 streams[kStreams];
#pragma unroll
  for (int k = 0; k < kStreams; ++k) streams[k] = *reinterpret_cast<const float4*>(x + k * stride);
  return collapse_streams(streams, pre, round_output);
}

// Stores one output vector at `offset` into y (fp32) and/or y_bf16, whichever is not null.
__device__ __forceinline__ void store_output(float* y, __nv_bfloat16* y_bf16, int64_t offset, float4 value) {
  if (y != nullptr) *reinterpret_cast<float4*>(y + offset) = value;
  if (y_bf16 != nullptr) {
    const __nv_bfloat162 low = __floats2bfloat162_rn(value.x, value.y);
    const __nv_bfloat162 high = __floats2bfloat162_rn(value.z, value.w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&low);
    packed.y = *reinterpret_cast<const uint32_t*>(&high);
    *reinterpret_cast<uint2*>(y_bf16 + offset) = packed;
  }
}

// Item `item` of a CTA's partial block: the warps' blocks (`stride` floats apart) summed in warp order.
template <int kWarps>
__device__ __forceinline__ float sum_warp_partials(const float* warp_sums, int item, int stride) {
  float sum = warp_sums[item];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) sum += warp_sums[w * stride + item];
  return sum;
}

// Lanes that sum one item over `slices` slices: the smallest power of two ≥ slices, at most a warp. Depends on the
// slice count only, so the summation order (lane-strided slices, then a butterfly) is fixed.
__device__ inline int slice_sum_lanes(int slices) {
  int lanes = 1;
  while (lanes < 32 && lanes < slices) lanes <<= 1;
  return lanes;
}

// v summed over aligned groups of `lanes` lanes (a power of two ≤ 32) by an xor butterfly, offsets lanes / 2 down to 1:
// unrolled over the five possible levels, each skipped uniformly past the group (as a loop over a runtime count it
// was 7 instructions a level, 35 per tile and warp in the persistent kernel's slice sums; ncu, H200).
__device__ __forceinline__ float butterfly_sum(float v, int lanes) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    if (offset < lanes) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// butterfly_sum's value, bit for bit, with every level's shuffle issued and its add selected: no branch, so no
// divergence check per level (the persistent kernel's slice sums; see hc_projection_kernel's kLean).
__device__ __forceinline__ float butterfly_sum_unbranched(float v, int lanes) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, v, offset);
    v = offset < lanes ? v + other : v;
  }
  return v;
}

// (v₀ + v₁) + (v₂ + v₃) over the 4 lanes first + m·stride (m < 4) of the half-warp: the xor butterfly's sum,
// bit for bit, with the three fetches independent (one shuffle latency per sum instead of two in a chain).
__device__ inline float sum_of_four_lanes(float v, int first, int stride) {
  const float a0 = __shfl_sync(kFullMask, v, first), a1 = __shfl_sync(kFullMask, v, first + stride);
  const float a2 = __shfl_sync(kFullMask, v, first + 2 * stride), a3 = __shfl_sync(kFullMask, v, first + 3 * stride);
  return (a0 + a1) + (a2 + a3);
}

// Doubly stochastic 4×4 from logits held by lanes 0..15 of each half-warp (lane = 4·j + k): the persistent kernel's
// mix step. Sinkhorn's 40 normalisations are a serial chain.
__device__ inline float sinkhorn_4x4(float logit, int iters, float eps) {
  const int lane = threadIdx.x & 31;
  const int row_first = lane & ~3, column_first = (lane & 16) | (lane & 3);
  float row_max = fmaxf(logit, __shfl_xor_sync(kFullMask, logit, 1));
  row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, 2));
  const float e = expf(logit - row_max);
  float v = e / sum_of_four_lanes(e, row_first, 1) + eps;
  v = v / (sum_of_four_lanes(v, column_first, 4) + eps);
  // Not unrolled: one copy of the body keeps the decode-sized tail's code (cold in the instruction cache) short.
#pragma unroll 1
  for (int it = 1; it < iters; ++it) {
    v = v / (sum_of_four_lanes(v, row_first, 1) + eps);
    v = v / (sum_of_four_lanes(v, column_first, 4) + eps);
  }
  return v;
}

// The decode kernels' Sinkhorn (single-thread forms below) scales a row or column by a reciprocal of (sum + eps)
// rather than dividing by it (a few ulps from the CPU's quotients over the 40 steps, inside the tests' comb
// tolerance): no division's branch. (With the correctly rounded reciprocal, __frcp_rn, the 19 later iterations took
// 7.2 µs instead of the half-warp shuffle version's 2.2, H200, V4-Flash T = 1.) This one is the MUFU's
// (rcp.approx.ftz, ≤ 1 ulp; div.approx of 1 / x adds a multiply by 1; the sums are ≥ eps, never subnormal, so ftz
// changes nothing).
__device__ inline float fast_reciprocal(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Sinkhorn's first row normalisation on one token's 4×4 held by one thread (the cluster decode kernel's mix CTAs):
// each row's softmax, scaled by the MUFU reciprocal of its sum, plus eps.
__device__ inline void softmax_rows_plus_eps(float (&c)[kStreams * kStreams], float eps) {
#pragma unroll
  for (int j = 0; j < kStreams; ++j) {
    float* const row = c + 4 * j;
    const float row_max = fmaxf(fmaxf(row[0], row[1]), fmaxf(row[2], row[3]));
#pragma unroll
    for (int k = 0; k < kStreams; ++k) row[k] = expf(row[k] - row_max);
    const float r = fast_reciprocal((row[0] + row[1]) + (row[2] + row[3]));
#pragma unroll
    for (int k = 0; k < kStreams; ++k) row[k] = row[k] * r + eps;
  }
}

// The same with each row's four entries held by an aligned quad of lanes (entry k by the quad's lane k; every lane of
// the warp calls it): softmax_rows_plus_eps's value bit for bit (the same max, exponentials, sum order and
// reciprocal), its 16 exponentials and 4 reciprocals spread over the lanes instead of queued in one thread's MUFU.
__device__ inline float softmax_row_plus_eps_lanes(float logit, float eps) {
  const int row_first = (threadIdx.x & 31) & ~3;
  float row_max = fmaxf(logit, __shfl_xor_sync(kFullMask, logit, 1));
  row_max = fmaxf(row_max, __shfl_xor_sync(kFullMask, row_max, 2));
  const float e = expf(logit - row_max);
  return e * fast_reciprocal(sum_of_four_lanes(e, row_first, 1)) + eps;
}

// Sinkhorn on one token's 4×4 held by one thread, in scaling form, from A = c after its first row normalisation
// (softmax + eps): from then on c = diag(u)·A·diag(v). Normalising row j, c_j ← c_j / (Σ_k c_jk + eps), is u_j ←
// 1 / D_j with D_j ← Σ_k A_jk·v_k + eps·D_j (D_j = 1 / u_j, 1 at first); a column alike. c is formed once at the end.
// Per normalisation 4 reciprocals (MUFU) of 3-deep FMA trees (eps·D is ready early) and no rescaling of the 16
// entries: 28 instructions and a chain of three FMAs and the MUFU, against 36 instructions and a chain of a multiply,
// three adds and the MUFU. The CPU's rounding after every step is not reproduced: a few ulps. (The reciprocals by
// three Newton steps on the FMA pipe instead, session 18, were slower: 48 instructions a normalisation, ≈ 88 cycles
// in the trace against ≈ 60; Sinkhorn's share of Flash T = 1 hc_pre 1.4 µs against 1.2, H200. The four scales from
// one reciprocal of the denominators' product, session 21, were slower too: hc_pre + norm 4.0 → 4.2 µs, hc_post_pre +
// norm 4.5 → 4.7, behind a full-card kernel 9.0 → 9.2 / 9.3 → 9.5.)
__device__ inline void sinkhorn_4x4_scaled_iterations(float (&c)[kStreams * kStreams], int iters, float eps) {
  float u[kStreams], v[kStreams], row_d[kStreams], column_d[kStreams];
#pragma unroll
  for (int i = 0; i < kStreams; ++i) u[i] = v[i] = row_d[i] = column_d[i] = 1.0f;
  // D ← Σ_m a_m·s_m + eps·D over the four entries a_m = c[first + m·stride] and scales s, then the scale 1 / D.
  const auto normalise = [&](int first, int stride, const float (&s)[kStreams], float& denominator, float& scale) {
    const float even = fmaf(c[first], s[0], eps * denominator);
    const float odd = c[first + stride] * s[1];
    denominator = fmaf(c[first + 2 * stride], s[2], even) + fmaf(c[first + 3 * stride], s[3], odd);
    scale = fast_reciprocal(denominator);
  };
#pragma unroll
  for (int k = 0; k < kStreams; ++k) normalise(k, 4, u, column_d[k], v[k]);
#pragma unroll 1
  for (int it = 1; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < kStreams; ++j) normalise(4 * j, 1, v, row_d[j], u[j]);
#pragma unroll
    for (int k = 0; k < kStreams; ++k) normalise(k, 4, u, column_d[k], v[k]);
  }
#pragma unroll
  for (int j = 0; j < kStreams; ++j)
#pragma unroll
    for (int k = 0; k < kStreams; ++k) c[4 * j + k] = c[4 * j + k] * u[j] * v[k];
}

// The whole of it from one token's logits held by one thread.
__device__ inline void sinkhorn_4x4_scaled(float (&c)[kStreams * kStreams], int iters, float eps) {
  softmax_rows_plus_eps(c, eps);
  sinkhorn_4x4_scaled_iterations(c, iters, eps);
}

// kHead: hc_head (4 rows, no post/comb); kPost: hc_post of the finished sub-block fused in front of hc_pre.
// A warp's B fragments of fn for one slice (fn_slice: row 0, this stream, the slice's first column; rows `flat`
// apart): thread (g, t4) takes columns column0 + 16p .. + 3 of rows 8·nt + g, zeros past kRows or the slice's width.
template <int kRows, int kNTiles = (kRows + 7) / 8>
__device__ __forceinline__ void load_fn_fragments(float (&fn_frag)[2][kNTiles][4], const float* fn_slice,
                                                  int64_t flat, int column0, int width, int g) {
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int row = 8 * nt + g, column = column0 + 16 * p;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < kRows && column < width) f = __ldg(reinterpret_cast<const float4*>(fn_slice + row * flat + column));
      fn_frag[p][nt][0] = f.x;
      fn_frag[p][nt][1] = f.y;
      fn_frag[p][nt][2] = f.z;
      fn_frag[p][nt][3] = f.w;
    }
}

// One warp's 3xTF32 projection of a 16-token tile: 32 columns of the staged tile, thread (g, t4)'s 4 of each
// 16-column half p at x_lo[p] (token g) and x_lo[p] + hi_offset (token g + 8), against the projection rows whose B
// fragments fn_pair(p, nt, e, big, small) gives as tf32 pairs (entry e of fn_frag[p][nt] in load_fn_fragments'
// layout). Writes, into the warp's partial block `mine`, Σx² of each token over those columns (entries 0-15) and each
// row's dot product (row r, token t at (1 + r) · kTileTokens + t). kChains accumulators per column tile (the
// 16-column halves p round-robin, summed at the end): 2 halves the dependent MMA chain.
template <int kRows, int kChains, class FnPair, int kNTiles = (kRows + 7) / 8>
__device__ __forceinline__ void project_tile_3xtf32(const float* const (&x_lo)[2], int hi_offset, FnPair fn_pair,
                                                    int g, int t4, float* mine) {
  static_assert(kChains == 1 || kChains == 2, "one accumulator per column tile, or one per 16-column half");
  float acc[kChains][kNTiles][4] = {};
  float squares_lo = 0.f, squares_hi = 0.f;  // Σx² of tokens g and g + 8 over this thread's columns
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float4 lo = *reinterpret_cast<const float4*>(x_lo[p]);
    const float4 hi = *reinterpret_cast<const float4*>(x_lo[p] + hi_offset);
    const float x_lo[4] = {lo.x, lo.y, lo.z, lo.w}, x_hi[4] = {hi.x, hi.y, hi.z, hi.w};
    uint32_t lo_big[4], lo_small[4], hi_big[4], hi_small[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      squares_lo = fmaf(x_lo[q], x_lo[q], squares_lo);
      squares_hi = fmaf(x_hi[q], x_hi[q], squares_hi);
      split_tf32(x_lo[q], lo_big[q], lo_small[q]);
      split_tf32(x_hi[q], hi_big[q], hi_small[q]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a_big[4] = {lo_big[2 * h], hi_big[2 * h], lo_big[2 * h + 1], hi_big[2 * h + 1]};
      const uint32_t a_small[4] = {lo_small[2 * h], hi_small[2 * h], lo_small[2 * h + 1], hi_small[2 * h + 1]};
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        uint32_t b_big[2], b_small[2];
        fn_pair(p, nt, 2 * h, b_big[0], b_small[0]);
        fn_pair(p, nt, 2 * h + 1, b_big[1], b_small[1]);
        float (&chain)[4] = acc[p % kChains][nt];
        // The two correction terms first, while the sum is small.
        mma_tf32(chain, a_small, b_big[0], b_big[1]);
        mma_tf32(chain, a_big, b_small[0], b_small[1]);
        mma_tf32(chain, a_big, b_big[0], b_big[1]);
      }
    }
  }
  squares_lo += __shfl_xor_sync(kFullMask, squares_lo, 1);
  squares_lo += __shfl_xor_sync(kFullMask, squares_lo, 2);
  squares_hi += __shfl_xor_sync(kFullMask, squares_hi, 1);
  squares_hi += __shfl_xor_sync(kFullMask, squares_hi, 2);
  if (t4 == 0) {
    mine[g] = squares_lo;
    mine[g + 8] = squares_hi;
  }
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 8 * nt + 2 * t4 + (e & 1);
      const float sum = kChains == 1 ? acc[0][nt][e] : acc[0][nt][e] + acc[kChains - 1][nt][e];
      if (row < kRows) mine[(1 + row) * kTileTokens + g + 8 * (e >> 1)] = sum;
    }
}

// fn_pair for project_tile_3xtf32 from unsplit fragments: splits each entry as the MMA needs it. (ptxas, nvcc 13,
// sm_90a, hoists these splits out of the persistent kernel's tile loop in every instance, hc_pre at its 128-register
// cap included: the loop's tf32 splits are X's 16 per thread. Splitting once into a pair of arrays gave the same
// loop.)
template <int kNTiles>
struct SplitOnUse {
  const float (&fn_frag)[2][kNTiles][4];
  __device__ __forceinline__ void operator()(int p, int nt, int e, uint32_t& big, uint32_t& small) const {
    split_tf32(fn_frag[p][nt][e], big, small);
  }
};

// Σ over slices part, part + lanes, … < slices of the tagged words at source (kPartialFloats apart), each waited for
// until it carries `tag`, summed in that order from 0: sum_slices' value when a word it read early was stale (out of
// line, so the per-tile loop stays short). The trace counts it once, as a stale slice sum, not its words as stale
// words.
static __device__ __noinline__ float sum_slice_words_slowly(const unsigned long long* source, int part, int lanes,
                                                            int slices, int stride, unsigned tag) {
  DSV4_MHC_PROJECTION_SLOW(ProjectionSlowPath::kStaleSliceSum);
  float sum = 0.f;
  for (int s = part; s < slices; s += lanes) {
    const unsigned long long* const address = source + s * stride;
    sum += tagged_value_uncounted(load_relaxed_u64(address), address, tag);
  }
  return sum;
}

template <bool kHead, bool kPost, int kSliceDims, ProjectionVariant kVariant = ProjectionVariant::kShared>
__global__ void __launch_bounds__(projection_cta_threads(kSliceDims, kVariant),
                                  projection_ctas_per_sm(kSliceDims, kPost, kVariant))
    hc_projection_kernel(const __grid_constant__ ProjectionArgs args) {
  constexpr bool kRoles = kVariant == ProjectionVariant::kRoles;
  // kShared's slice sums run their butterfly without a branch per level (same bits). H200, 4096 tokens, session 22,
  // same process against the session start's kernels, together with the words read through one pointer and stride
  // per lane: V4-Flash hc_pre 195.2 -> 189.2 µs, hc_head 127.2 -> 122.6; V4-Pro hc_pre 373.0 -> 369.4 / 372.4, hc_head
  // 242.9 -> 233.4. On kRoles, at its 128-register cap, slower (hc_post_pre 316.1 / 317.4 -> 321.0, V4-Pro 581.7 /
  // 577.8 -> 587.0): it keeps the branching butterfly. The two word-address forms alone measured level (session 23,
  // same process, V4-Flash 4096 tokens, default / other form / default: hc_pre 187.6 / 187.7 / 187.8 µs, hc_head 122.0
  // / 121.1 / 121.9, the warp-specialised hc_post_pre 314.3 / 314.0 / 314.9): both variants take the pointer form.
  constexpr bool kLean = !kRoles;
  using Shape = ProjectionShape<kHead, kPost, kSliceDims, kVariant>;
  constexpr int kThreads = projection_threads(kSliceDims);  // kRoles: per warp group
  constexpr int kWarps = kThreads / 32;
  constexpr int kCtaThreads = Shape::kThreads;
  constexpr int kWarpsPerStream = kSliceDims / 32;
  constexpr int kRows = kProjectionRows<kHead>;
  constexpr int kPartial = kPartialRows<kHead>;
  constexpr int kNTiles = (kRows + 7) / 8;  // 8-row MMA column tiles covering the projection rows
  constexpr int kStageFloats = kTileTokens * staged_row_floats(kSliceDims);
  constexpr int kBoxes = kSliceDims / kStagedBoxFloats;  // TMA boxes per stage
  constexpr int kPartialFloats = kPartial * kTileTokens;  // one slice's partial block of a tile
  constexpr int kStages = Shape::kStages;
  constexpr int kVectorsPerRow = kSliceDims / 4;  // 16-byte vectors per (token, stream) row of the slice
  constexpr int kCollapseLag = Shape::kCollapseLag;  // the software pipeline's lags (ProjectionShape)
  constexpr int kSumLag = Shape::kSumLag;
  // kRoles: the finisher sums tile i and collapses tile i − kFinisherLag in its iteration i; the projection group runs
  // ahead as far as the loaded stages allow. At a lag of 2 the finishers waited for each other's sums (ncu, H200,
  // Flash 4096: 27 % of the stall samples in the projection group waiting for stages, the finisher at 2.7 µs a tile).
  constexpr int kFinisherLag = 5;
  static_assert(!(kHead && kPost), "hc_head has no residual update in front of it");
  // hc_pre and hc_head (kShared without the fused update): fn's fragments (weights) loaded before the grid-dependency
  // wait, so a CTA started while the previous kernel drains has them; the X tiles issued by the first thread of the
  // third warp from the end instead of thread 0, whose warp publishes and sums right after each refill (on 64- and
  // 128-dim slices that thread has no hc_head publication item, no slice sum and is not a pre reader). Same bits.
  constexpr bool kLeanStart = !kPost && !kRoles;
  static_assert(kVariant == ProjectionVariant::kShared || kSliceDims == 64, "one CTA per SM runs 64-dim slices");
  static_assert(kVariant == ProjectionVariant::kShared || kPost, "the warp-specialised variant runs hc_post_pre");
  static_assert(kCollapseLag >= 2, "a cross-CTA hop needs an iteration of slack each");
  static_assert(kSliceDims == 32 || kSliceDims == 64 || (kSliceDims == 128 && !kHead && !kPost && !kRoles),
                "a warp covers 32 columns of one stream; 128-dim slices (one CTA per SM) for hc_pre alone");
  static_assert(kThreads == kTileTokens * kVectorsPerRow, "the update and the collapse give each thread one vector");

  extern __shared__ float4 dynamic_smem[];
  // [kStages][staged tile] from the first kStageAlignment boundary (the swizzle's period). The skip is added to
  // dynamic_smem as an offset, not by rounding its address as an integer: the integer round trip hid from the compiler
  // that the pointer is shared memory, so every stage, warp-sum and ring access became a generic load or store with
  // 64-bit address arithmetic (≈ 80 instructions for the 14 partial-sum stores per thread and tile).
  const uint32_t misalignment =
      static_cast<uint32_t>(__cvta_generic_to_shared(dynamic_smem)) & uint32_t(kStageAlignment - 1);
  float* const stages = reinterpret_cast<float*>(dynamic_smem) +
                        ((uint32_t(kStageAlignment) - misalignment) & uint32_t(kStageAlignment - 1)) / 4;
  float* const warp_sums = stages + kStages * kStageFloats;      // [kWarps][kPartial][16]
  float* const post_ring = warp_sums + kWarps * kPartialFloats;  // kPost: [kPostSlots][post_slot_floats]
  __shared__ uint64_t full[kStages];
  __shared__ uint64_t post_full[kPost ? kPostSlots : 1];
  // kRoles: the projection group has updated stage b's tile (the finisher collapses the updated values).
  __shared__ uint64_t updated_stage[kRoles ? kStages : 1];
  __shared__ float pre_s[kTileTokens][kStreams];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // kRoles: threads from kThreads on are the finisher group; `ltid` numbers the threads within their group.
  const bool finisher = kRoles && tid >= kThreads;
  const int ltid = tid & (kThreads - 1);
  const int slices = args.slices, groups = args.groups;
  const int slice = int(blockIdx.x % unsigned(slices)), group = int(blockIdx.x / unsigned(slices));
  const int count = (args.tiles - group + groups - 1) / groups;  // ≥ 1: the launcher keeps groups ≤ tiles
  DSV4_MHC_PROJECTION_MARK(kCtaStartMark, count + kCollapseLag);
  const int d = args.hidden;
  const int64_t flat = int64_t(kStreams) * d;
  const int i0 = slice * kSliceDims;
  const int width = min(kSliceDims, d - i0);

  // Tile and workspace-word indices in 32 bits (the launcher checks that every word index fits): 64-bit index
  // arithmetic was a third of the slice sums' instructions. Token and element indices stay 64-bit.
  const auto tile_of = [&](int j) { return group + j * groups; };
  const auto first_token_of = [&](int j) { return int64_t(tile_of(j)) * kTileTokens; };
  // Tokens of tile j: 16 but in the last tile.
  const int last_tile_tokens = int(args.tokens - int64_t(args.tiles - 1) * kTileTokens);
  const auto valid_of = [&](int j) { return tile_of(j) < args.tiles - 1 ? kTileTokens : last_tile_tokens; };
  // Word offsets unsigned: pointer + unsigned is one wide multiply-add, no sign extension.
  const auto sums_of = [&](int j) { return args.sums + unsigned(tile_of(j) * kPartialFloats); };  // [kPartial][16]
  const auto partials_of = [&](int j) { return args.partials + unsigned(tile_of(j) * slices * kPartialFloats); };

  // The TMA writes zeros in the columns past a partial slice's width (fn is zero there too, and 0 · NaN would not be)
  // and in the rows of tokens past the last tile's end (they reach only those tokens' rows of the MMA and partials,
  // never read back or collapsed).
  if (tid == 0) {
    for (int b = 0; b < kStages; ++b) sm90::mbarrier_init(&full[b], 1);
    if constexpr (kPost)
      for (int b = 0; b < kPostSlots; ++b) sm90::mbarrier_init(&post_full[b], kThreads);
    if constexpr (kRoles)
      for (int b = 0; b < kStages; ++b) sm90::mbarrier_init(&updated_stage[b], kThreads);
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  // Thread (vt, vi) of a group updates and collapses token vt's dims vi .. vi + 3 of every stream: stream k's vector
  // at stage offset staged[k] (fixed per thread).
  const int vt = ltid / kVectorsPerRow, vi = (ltid % kVectorsPerRow) * 4;
  int staged[kStreams];
#pragma unroll
  for (int k = 0; k < kStreams; ++k) staged[k] = staged_offset(vt, k, vi);
  // The CTA's j-th X tile into its stage by the loading group's first thread: the boxes of its 64 (token, stream) rows
  // at the slice's columns. The stage's earlier reads are done (the callers passed a barrier); the fused update's
  // writes were fenced for the TMA's proxy by their threads.
  constexpr int kLoader = kLeanStart ? 32 * (kWarps - 3) : 0;
  const bool tile_loader = ltid == kLoader && (!kRoles || finisher);
  if (tile_loader) sm90::prefetch_tensor_map(&args.x_map);
  const auto load_tile = [&](int j) {
    if (!tile_loader) return;
    const int b = j % kStages;
    load_x_tile<kBoxes>(stages + b * kStageFloats, &full[b], &args.x_map, i0, tile_of(j) * kStagedBoxRows,
                        uint32_t(kStageFloats) * 4u);
  };
  // The fused variant's out rows and post/comb of tile j, into ring slot j mod kPostSlots: one out vector per thread
  // (the update's thread → vector map), one post or comb-row vector for each of the first 16 × 5 threads.
  const auto load_post_inputs = [&](int j) {
    float* const slot = post_ring + (j % kPostSlots) * post_slot_floats(kSliceDims);
    const int64_t t0 = first_token_of(j);
    const int valid = valid_of(j);
    if (vt < valid && vi < width) copy16_to_shared(slot + vt * kSliceDims + vi, args.out + (t0 + vt) * d + i0 + vi);
    constexpr int kMixVectors = kMixFloats / 4;  // post, then the 4 rows of comb
    static_assert(kTileTokens * kMixVectors <= kThreads, "one thread per post/comb vector");
    const int t = ltid / kMixVectors, q = ltid % kMixVectors;
    if (t < valid) {
      const float* const source = q == 0 ? args.post_in + (t0 + t) * kStreams
                                         : args.comb_in + ((t0 + t) * kStreams + q - 1) * kStreams;
      copy16_to_shared(slot + kTileTokens * kSliceDims + t * kMixFloats + 4 * q, source);
    }
    arrive_when_copies_land(&post_full[j % kPostSlots]);
  };
  float fn_frag[2][kNTiles][4] = {};  // this warp's columns of fn (below)
  if constexpr (kLeanStart)  // before the wait: the fragments below, their (stream, column0, g) spelled out here
    load_fn_fragments<kRows>(fn_frag, args.fn + int64_t(warp / kWarpsPerStream) * d + i0, flat,
                             (warp % kWarpsPerStream) * 32 + 4 * (lane & 3), width, lane >> 2);
  // Programmatic dependent launch: the dependents are released at once; X, out, post/comb and the workspace's
  // epoch are read only after the previous kernel has completed.
  allow_dependents();
  wait_for_prior_grids();
  // kRoles: the finisher group loads the X tiles, the projection group (which applies the update) its post inputs.
  for (int j = 0; j < min(count, kStages); ++j) {
    load_tile(j);
    if constexpr (kPost)
      if (j < kPostSlots && !finisher) load_post_inputs(j);
  }
  // Read after the first copies are issued, so its latency overlaps theirs.
  const unsigned tag = load_relaxed_u32(args.header) + 1u;

  // This warp's 32 columns of fn for the B fragments. Thread (g, t4) takes columns 16p + 4·t4 .. +3 of rows
  // 8·nt + g: k-step (p, h) maps logical k = t4 to column 16p + 4·t4 + 2h and k = t4 + 4 to the next one, so one
  // 16-byte load feeds two k-steps (the A side uses the same permutation). Kept unsplit here; SplitOnUse's splits
  // are hoisted out of the tile loop by ptxas.
  const int g = lane >> 2, t4 = lane & 3;
  const int stream = warp / kWarpsPerStream;
  const int column0 = (warp % kWarpsPerStream) * 32 + 4 * t4;
  if (!kLeanStart && !finisher)  // a finisher warp's `stream` is past the 4 streams
    load_fn_fragments<kRows>(fn_frag, args.fn + int64_t(stream) * d + i0, flat, column0, width, g);
  // The thread's A fragments of each 16-column half p: token g at stage offset projected[p] (token g + 8 eight tokens'
  // rows on).
  const int projected[2] = {staged_offset(g, stream, column0), staged_offset(g, stream, column0 + 16)};

  // Sums over the slices: item i = 16·row + token of a tile's kPartial × 16 belongs to slice i mod S (tokens past
  // the tile's end are skipped); `lanes` (a power of two) aligned lanes per item, lane `part` taking slices part,
  // part + lanes, … (kMaxSliceWords of them read early). Every count here is fixed per CTA: no division per tile.
  const int lanes = slice_sum_lanes(slices);
  const int lane_shift = __ffs(lanes) - 1;
  const int items_per_pass = kThreads >> lane_shift;
  const int part = ltid & (lanes - 1);
  const int my_items = slice < kPartialFloats ? (kPartialFloats - slice + slices - 1) / slices : 0;
  const int my_passes = (my_items + items_per_pass - 1) / items_per_pass;
  const auto sum_item_of = [&](int pass) { return pass * items_per_pass + (ltid >> lane_shift); };  // this CTA's m-th
  const auto load_slice_words = [&](int j, int pass, unsigned long long (&words)[kMaxSliceWords]) {
    const int m = sum_item_of(pass), item = slice + m * slices;
    if (m >= my_items || (item & (kTileTokens - 1)) >= valid_of(j)) return;
    const unsigned long long* const first = partials_of(j) + item + part * kPartialFloats;
    const int stride = lanes * kPartialFloats;
#pragma unroll
    for (int w = 0; w < kMaxSliceWords; ++w)
      if (part + w * lanes < slices) words[w] = load_relaxed_u64(first + w * stride);
  };
  const auto sum_slices = [&](int j, int pass, const unsigned long long (&words)[kMaxSliceWords], bool early) {
    const int m = sum_item_of(pass), item = slice + m * slices;
    const bool active = m < my_items && (item & (kTileTokens - 1)) < valid_of(j);
    const unsigned long long* source = partials_of(j) + item;
    // Every tag checked at once, summed in slice order; a stale word (more slices than were read early, or none read:
    // `early` false) takes the whole sum out of line. (A branch and a call site per word until session 21.)
    float sum = 0.f;
    if (active) {
      bool fresh = early && slices <= kMaxSliceWords * lanes;
#pragma unroll
      for (int w = 0; w < kMaxSliceWords; ++w)
        if (part + w * lanes < slices) fresh &= unsigned(words[w] >> 32) == tag;
      if (fresh) {
#pragma unroll
        for (int w = 0; w < kMaxSliceWords; ++w)
          if (part + w * lanes < slices) sum += __uint_as_float(unsigned(words[w]));
      } else {
        sum = sum_slice_words_slowly(source, part, lanes, slices, kPartialFloats, tag);
      }
    }
    sum = kLean ? butterfly_sum_unbranched(sum, lanes) : butterfly_sum(sum, lanes);
    if (active && part == 0) store_relaxed_u64(sums_of(j) + item, tagged(sum, tag));
  };

  // The collapse's Σx² and pre sums: thread 4·t + k of the collapsing threads reads token t's Σx² and row 1 + k.
  // Counted from the group's last thread: the last warps have the fewest publication items and slice sums (against the
  // first 64 threads, session 20, H200, V4-Flash 4096 tokens, same run: hc_pre 214.4 -> 208.5 µs, hc_post_pre 359.2 ->
  // 347.4, hc_head 147.4 -> 130.9; same bits).
  const int pre_index = kThreads - 1 - ltid;
  const int pre_t = pre_index / kStreams, pre_k = pre_index % kStreams;
  // Read once: loaded per tile they were a dependent global load on every collapse's chain.
  const float pre_scale = args.scale[0], pre_base = args.base[pre_k];
  const unsigned pre_squares_word = pre_t, pre_mix_word = (1 + pre_k) * kTileTokens + pre_t;  // in a tile's sums
  const auto is_pre_reader = [&](int jc) { return jc >= 0 && pre_index < kStreams * valid_of(jc); };
  // The pre words of tile jc for the collapse (read early).
  const auto load_pre_words = [&](int jc, unsigned long long& squares_word, unsigned long long& mix_word) {
    squares_word = load_relaxed_u64(sums_of(jc) + pre_squares_word);
    mix_word = load_relaxed_u64(sums_of(jc) + pre_mix_word);
  };

  // kPost: X ← post·out + combᵀ·X on tile j's staged slice (stage b), written back to X_out; the projection then sees
  // the update.
  const auto update_tile = [&](int j, int b) {
    if (vt < valid_of(j) && vi < width) {
      const float* const slot = post_ring + (j % kPostSlots) * post_slot_floats(kSliceDims);
      const float* const mix = slot + kTileTokens * kSliceDims + vt * kMixFloats;
      float* const x = stages + b * kStageFloats;
      const float4 o = *reinterpret_cast<const float4*>(slot + vt * kSliceDims + vi);
      float4 xs[kStreams];
#pragma unroll
      for (int k = 0; k < kStreams; ++k) xs[k] = *reinterpret_cast<const float4*>(x + staged[k]);
      float* const x_out = args.X_out + (first_token_of(j) + vt) * flat + i0 + vi;
#pragma unroll
      for (int k = 0; k < kStreams; ++k) {
        float4 updated = residual_update(k, o, xs, mix, mix + kStreams, !kRoles && args.round_to_bf16);
        if constexpr (kRoles)
          if (args.round_to_bf16) updated = round4_to_bf16_call(updated);
        *reinterpret_cast<float4*>(x + staged[k]) = updated;
        *reinterpret_cast<float4*>(x_out + int64_t(k) * d) = updated;
      }
      sm90::fence_proxy_async_shared();  // the stage's next tile comes by TMA (another proxy) over these writes
    }
  };
  // Project tile j (in stage b) and publish the slice's partials, warps summed in order. `sync` is the barrier of
  // the projecting threads; past it the loader refills the stage of tile `refill` - kStages (≥ 0: its collapse, by
  // these threads, is done). `publication_sync`: a barrier after the publication, where no other barrier of these
  // threads comes before the next projection overwrites warp_sums (a collapse's, or the fused update's).
  const auto project_and_publish = [&](int j, int b, auto sync, int refill, bool publication_sync) {
    const float* const stage = stages + b * kStageFloats;
    const float* const x_lo[2] = {stage + projected[0], stage + projected[1]};
    float* const mine = warp_sums + warp * kPartialFloats;
    project_tile_3xtf32<kRows, 1>(x_lo, kTileTokens / 2 * kStreams * kStagedBoxFloats, SplitOnUse<kNTiles>{fn_frag},
                                  g, t4, mine);
    DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kProjected, j);
    sync();
    if (refill >= 0) load_tile(refill);
    unsigned long long* const out = partials_of(j) + slice * kPartialFloats;
    // Every item's loads before the first sum's adds (a loop over the items waited for each item's loads).
    constexpr int kItemsPerThread = (kPartialFloats + kThreads - 1) / kThreads;
    float sums[kItemsPerThread];
#pragma unroll
    for (int p = 0; p < kItemsPerThread; ++p) {
      const int item = ltid + p * kThreads;
      sums[p] = item < kPartialFloats ? sum_warp_partials<kWarps>(warp_sums, item, kPartialFloats) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < kItemsPerThread; ++p)
      if (ltid + p * kThreads < kPartialFloats) store_relaxed_u64(out + ltid + p * kThreads, tagged(sums[p], tag));
    DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kPublished, j);
    if (publication_sync) sync();  // warp_sums is free for the next projection
  };
  // Collapse the staged slice of tile jc, y[t][i0 + i] = Σ_k pre_k·X_k[i0 + i], from the sums' words read earlier.
  // `sync` is the barrier of the collapsing threads. `release`: then a barrier and the stage's refill (else the
  // caller refills it past its next barrier, before which nothing writes pre_s).
  const auto collapse_and_refill = [&](int jc, bool pre_reader, unsigned long long squares_word,
                                       unsigned long long mix_word, auto sync, bool release) {
    const int valid = valid_of(jc);
    if (pre_reader) {
      const float squares = tagged_value(squares_word, sums_of(jc) + pre_squares_word, tag);
      const float mix = tagged_value(mix_word, sums_of(jc) + pre_mix_word, tag);
      const float inv_rms = inverse_rms(squares, float(flat), args.norm_eps);
      pre_s[pre_t][pre_k] = sigmoid(mix * inv_rms * pre_scale + pre_base) + args.hc_eps;
      DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kPreStored, jc + kCollapseLag);
    }
    sync();
    DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kPreReady, jc + kCollapseLag);
    if (vt < valid && vi < width) {
      const float* const x = stages + (jc % kStages) * kStageFloats;
      float4 streams[kStreams];
#pragma unroll
      for (int k = 0; k < kStreams; ++k) streams[k] = *reinterpret_cast<const float4*>(x + staged[k]);
      float4 value = collapse_streams(streams, pre_s[vt], !kRoles && args.round_to_bf16);
      if constexpr (kRoles)
        if (args.round_to_bf16) value = round4_to_bf16_call(value);
      store_output(args.y, args.y_bf16, (first_token_of(jc) + vt) * d + i0 + vi, value);
    }
    DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kCollapsed, jc + kCollapseLag);
    if (!release) return;
    sync();  // the stage and pre_s are free: refill the stage
    if (jc + kStages < count) load_tile(jc + kStages);
  };
  const auto block_sync = [] { __syncthreads(); };

  if constexpr (kRoles) {
    // Each group on its own hardware barrier (0 is __syncthreads).
    if (!finisher) {
      for (int j = 0; j < count; ++j) {
        const int b = j % kStages;
        wait_for_tile(&full[b], uint32_t(j / kStages) & 1u);
        sm90::mbarrier_wait(&post_full[j % kPostSlots], uint32_t(j / kPostSlots) & 1u);
        update_tile(j, b);
        sm90::mbarrier_arrive(&updated_stage[b]);
        sm90::named_barrier_sync<kThreads>(1);  // the tile is updated, and its ring slot free for j + kPostSlots
        if (j + kPostSlots < count) load_post_inputs(j + kPostSlots);
        // The next iteration's barrier after its update orders this publication before the next projection.
        project_and_publish(j, b, [] { sm90::named_barrier_sync<kThreads>(1); }, -1, false);
      }
    } else {
      // Iteration i: sum this CTA's items of tile i, collapse tile i − kFinisherLag. The words both read are loaded
      // an iteration ahead (the projection group runs ahead, so they are normally there; a stale one is re-read).
      struct Words {
        unsigned long long slices[kMaxSliceWords], squares, mix;
      };
      const auto read_words = [&](int i, Words& w) {
        const int jc = i - kFinisherLag;
        w = Words{};
        if (i < count && my_passes > 0) load_slice_words(i, 0, w.slices);
        if (is_pre_reader(jc)) load_pre_words(jc, w.squares, w.mix);
      };
      Words next;
      read_words(0, next);
      for (int i = 0; i < count + kFinisherLag; ++i) {
        Words now = next;
        read_words(i + 1, next);
        const int jc = i - kFinisherLag;
        const int passes = i < count ? my_passes : 0;
        for (int pass = 0; pass < passes; ++pass) sum_slices(i, pass, now.slices, pass == 0);
        if (jc >= 0) {
          sm90::mbarrier_wait(&updated_stage[jc % kStages], uint32_t(jc / kStages) & 1u);
          collapse_and_refill(jc, is_pre_reader(jc), now.squares, now.mix,
                              [] { sm90::named_barrier_sync<kThreads>(2); }, true);
        }
      }
    }
  } else {
    // Iteration j: project tile j, collapse tile j − kCollapseLag, sum this CTA's items of tile j − kSumLag.
    for (int j = 0; j < count + kCollapseLag; ++j) {
      DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kTop, j);
      const int jr = j - kSumLag, jc = j - kCollapseLag;
      const int passes = jr >= 0 && jr < count ? my_passes : 0;
      const bool pre_reader = is_pre_reader(jc);
      unsigned long long words[kMaxSliceWords] = {};
      unsigned long long squares_word = 0, mix_word = 0;
      const auto read_early = [&] {
        if (passes > 0) load_slice_words(jr, 0, words);
        if (pre_reader) load_pre_words(jc, squares_word, mix_word);
      };
      // The fused update holds a tile vector in registers: its reads start after it, within the 128-register cap.
      if (!kPost || j >= count) read_early();

      if (j < count) {
        const int b = j % kStages;
        wait_for_tile(&full[b], uint32_t(j / kStages) & 1u);
        DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kTileLanded, j);
        if constexpr (kPost) {
          sm90::mbarrier_wait(&post_full[j % kPostSlots], uint32_t(j / kPostSlots) & 1u);
          update_tile(j, b);
          read_early();
          __syncthreads();  // the updated tile is complete, and this ring slot is free for tile j + kPostSlots
          if (j + kPostSlots < count) load_post_inputs(j + kPostSlots);
        }
        // Two barriers a tile (the projection's, the collapse's first) where there were four: the stage collapsed in
        // the previous iteration is refilled past this projection's barrier, and the publication needs its own only
        // where neither a collapse nor the fused update's barrier follows it.
        const int jc_before = jc - 1;
        project_and_publish(j, b, block_sync, jc_before >= 0 && jc_before + kStages < count ? jc_before + kStages : -1,
                            !kPost && jc < 0);
      }

      // The collapse, then the slice sums: half an iteration more for the partials' hop (session 21: hc_pre 199.8 ->
      // 193.4 µs, hc_head 128.8 -> 126.7, H200). Later passes reload their words here (out of line, as in kRoles, was
      // measured only beside the out-of-line rounding).
      if (jc >= 0) collapse_and_refill(jc, pre_reader, squares_word, mix_word, block_sync, j + 1 >= count);
      for (int pass = 0; pass < passes; ++pass) {
        if (pass > 0) load_slice_words(jr, pass, words);
        sum_slices(jr, pass, words, true);
      }
      DSV4_MHC_PROJECTION_MARK(ProjectionPhase::kSummed, j);
    }
  }

  if constexpr (!kHead) {
    // post and comb of the tokens of tile j (j mod S = this slice), two tokens per warp (a half-warp each):
    // lane l of a half takes comb[l / 4][l % 4], lanes 0..3 also post[l]. A lane's three words are all read before
    // the first is waited for.
    const int owned_tiles = slice < count ? (count - slice + slices - 1) / slices : 0;
    const int pairs = owned_tiles * kTileTokens;
    const int half = lane >> 4, l = lane & 15;
    constexpr int kCtaWarps = kCtaThreads / 32;
    for (int first = 0; first < pairs; first += 2 * kCtaWarps) {
      const int pair = first + 2 * warp + half;
      const int jt = slice + (pair / kTileTokens) * slices, t = pair % kTileTokens;
      const bool active = pair < pairs && t < valid_of(jt);
      float logit = 0.0f;
      if (active) {
        const unsigned long long* const sums = sums_of(jt) + t;
        const unsigned long long* const post_word = sums + (1 + kStreams + (l % kStreams)) * kTileTokens;
        const unsigned long long* const comb_word = sums + (1 + 2 * kStreams + l) * kTileTokens;
        const unsigned long long squares_read = load_relaxed_u64(sums);
        const unsigned long long post_read = l < kStreams ? load_relaxed_u64(post_word) : 0;
        const unsigned long long comb_read = load_relaxed_u64(comb_word);
        const float inv_rms = inverse_rms(tagged_value(squares_read, sums, tag), float(flat), args.norm_eps);
        const int64_t token = first_token_of(jt) + t;
        if (l < kStreams) {
          const float mix = tagged_value(post_read, post_word, tag) * inv_rms;
          args.post[token * kStreams + l] = 2.0f * sigmoid(mix * args.scale[1] + args.base[kStreams + l]);
        }
        const float mix = tagged_value(comb_read, comb_word, tag) * inv_rms;
        logit = mix * args.scale[2] + args.base[2 * kStreams + l];
      }
      const float comb = sinkhorn_4x4(logit, args.sinkhorn_iters, args.hc_eps);
      if (active) args.comb[(first_token_of(jt) + t) * kStreams * kStreams + l] = comb;
    }
  }

  finish_cta(args.header, tag);
  DSV4_MHC_PROJECTION_MARK(kCtaEndMark, count + kCollapseLag);
}

// ---- The cluster decode kernel (T ≤ kDecodeMaxTokens): one token tile, one projection per 64-dim slice CTA. ----
//
// NOTES:
// - Grid: clusters of kClusterCtas CTAs. hc_pre / hc_post_pre: cluster 0 holds the mix CTAs (CTA r: tokens r and
//   r + 8, post and Sinkhorn), then Q slice clusters; CTA r of slice cluster q owns the 64-dim slice 8·q + r of all 4
//   streams (slices past the hidden size are idle and contribute zeros). Every CTA is resident at once (the launcher
//   checks), so CTAs may wait for each other.
// - A slice CTA loads its columns of fn as MMA B fragments before the grid-dependency wait (they stream in while the
//   previous kernel drains), stages its X slice in shared memory (applying the fused hc_post first), projects it
//   (3xTF32 MMA, as the persistent kernel), and every sum over the slices takes one cluster step and one global hop:
//   each CTA stores its partial of item (row, token t) into the shared memory of the cluster's CTA t mod 8 (DSMEM), a
//   cluster barrier, that CTA sums the 8 in rank order and publishes the cluster's sum as a tagged word [row][t][q];
//   the CTAs that need a total read the Q words (a group of lanes per item, summed by a butterfly: a fixed order).
//   Each slice cluster forms the Σx² and pre totals itself (its CTA t mod 8 reads them, then pushes them into every
//   CTA of the cluster before the next cluster barrier) and collapses its slices; the mix CTAs read the Σx², post and
//   comb words of their tokens, and one thread per token runs Sinkhorn, in parallel with the collapses. Every DSMEM
//   access is a store counted by the receiver's mbarrier, which it waits for (below), so no CTA reads a peer's
//   shared memory and none may exit while a peer still writes to it. (Every CTA reading every
//   slice's words itself was 3-15 µs at T = 8: the same L2 lines for all. The session-12 decode kernel, two global
//   hops and no clusters, measured the same at Flash T = 1 and 1.5 µs slower at T = 8 and 16 and at Pro T = 1:
//   removed.)
// - Fused output norm (out_norm_weight): Σy² of each slice per token takes the projection's path (a cluster step,
//   one global hop, the totals pushed into the cluster's CTAs), then rms_norm's arithmetic per element (y·inv_rms,
//   ·w, rounding). (Σy² from the streams' Gram matrix, summed in the projection's hop, measured slower in session 14:
//   Flash T = 1 hc_pre + norm 7.3 vs 6.6 µs, dropped.)
// - Asynchronous cluster steps (session 14): each receiving CTA arms an mbarrier with the bytes it will receive and its
//   peers store with st.async, which completes them there (a cluster barrier's barrier.cluster.arrive.release is a
//   GPU-scope fence: it waits for the CTA's outstanding global stores, and its ERRBAR and barrier waits took ≈ 25 % of
//   the stall samples, ncu, Flash T = 1). Sinkhorn in scaling form (sinkhorn_4x4_scaled), fn split into tf32 pairs
//   before the wait, two accumulator chains in the MMA. Session 14 (H200, graph, Flash T = 1, with its Gram-matrix
//   norm; the session-13 kernel with cluster barriers → this one): hc_pre 6.4 → 5.9 µs, hc_head 3.7 → 3.2,
//   hc_post_pre 6.4 → 6.1.
// - The launch epoch (the words' tag) is advanced without a counter: by the CTA that has seen words carrying it from
//   every slice cluster (each CTA reads the epoch before it publishes) once the mix cluster's barrier shows that the
//   mix CTAs have read it too.
// - Measured (H200, session 13, CUDA graph, µs, session-12 decode kernel → the session-13 one): V4-Flash T = 1
//   hc_pre + norm 6.7 → 6.7, hc_post_pre + norm 6.9 → 6.8, hc_head 4.1 → 3.7; T = 8 8.8 → 7.3, 9.1 → 7.7; T = 16
//   9.6 → 8.1, 10.8 → 8.7; V4-Pro T = 1 9.4 → 7.4, 8.4 → 7.6; T = 8 10.7 → 8.1, 10.3 → 8.5. At Flash T = 1 the mix
//   CTAs' Sinkhorn is the tail: hc_pre 6.5-6.7 with 20 iterations, 5.1 with one (≈ 80 cycles per normalisation);
//   hc_head (no mix, no norm) 3.7. One MUFU per normalisation instead of four measured the same (6.7 / 5.1).
inline constexpr int kDecodeMaxTokens = kTileTokens;
inline constexpr int kDecodeSliceDims = 64;
inline constexpr int kDecodeThreads = projection_threads(kDecodeSliceDims);  // 256: 2 warps per stream
inline constexpr int kDecodeMaxSlices = 128;                                 // hidden ≤ 8192
inline constexpr int kDecodeLdx = kStreams * kDecodeSliceDims + kRowPad;
// Shared memory: the staged X tile, then the per-warp partial sums.
inline constexpr int kDecodeWarpSumFloats = (kDecodeThreads / 32) * kPartialRows<false> * kTileTokens;
inline constexpr int kDecodeSmemBytes = (kTileTokens * kDecodeLdx + kDecodeWarpSumFloats) * 4;
inline constexpr int kClusterCtas = 8;
// Items a CTA sums over the clusters, at most kGatherPasses per lane (a mix CTA: 21 items for each of 2 tokens, 16
// items per pass when Q > 8).
inline constexpr int kGatherPasses = 3;

// The decode kernels' arguments (the single-cluster kernel takes these): a site with the optional fused output norm.
struct DecodeSiteArgs : SiteArgs {
  const float* norm_weight;
  bool norm_round_to_bf16;
};

struct ClusterDecodeArgs : DecodeSiteArgs {
  int clusters;  // Q: slice clusters
  unsigned* header;                  // [0] launch epoch
  unsigned long long* row_words;     // [partial rows][16][Q] tagged: each slice cluster's partial sums
  unsigned long long* square_words;  // [16][Q] tagged: each slice cluster's Σy²
};

// Thread (vt, vi) of a slice CTA stages token vt's dims i0 + vi .. + 3 of all streams in the tile (row stride
// kDecodeLdx): X, updated first by the fused hc_post (kPost; written to X_out too: this thread is the only reader and
// writer of these positions). Zeros outside the tokens and the slice's width (`owner` false): the MMA reads every
// row and column (fn is zero there, and 0 · NaN would not be).
template <bool kPost>
__device__ __forceinline__ void stage_decode_vectors(const ClusterDecodeArgs& args, float* tile, int vt, int vi,
                                                     int i0, bool owner, int d, int64_t flat) {
  float4 x[kStreams];
  const float* const source = args.X + int64_t(vt) * flat + i0 + vi;
#pragma unroll
  for (int k = 0; k < kStreams; ++k)
    x[k] = owner ? *reinterpret_cast<const float4*>(source + int64_t(k) * d) : make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kPost) {
    if (owner) {
      const float4 o = *reinterpret_cast<const float4*>(args.out + int64_t(vt) * d + i0 + vi);
      float mix[kMixFloats];
      load_mix(args.post_in, args.comb_in, vt, mix);
      float4 updated[kStreams];
#pragma unroll
      for (int k = 0; k < kStreams; ++k)
        updated[k] = residual_update(k, o, x, mix, mix + kStreams, args.round_to_bf16);
      float* const x_out = args.X_out + int64_t(vt) * flat + i0 + vi;
#pragma unroll
      for (int k = 0; k < kStreams; ++k) {
        x[k] = updated[k];
        *reinterpret_cast<float4*>(x_out + int64_t(k) * d) = updated[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kStreams; ++k)
    *reinterpret_cast<float4*>(tile + vt * kDecodeLdx + k * kDecodeSliceDims + vi) = x[k];
}

// Σy² of one token over a slice: the token's 16 vectors are 16 aligned lanes of one warp.
__device__ __forceinline__ float slice_squares(float4 value) {
  float squares = fmaf(value.x, value.x, 0.0f);
  squares = fmaf(value.y, value.y, squares);
  squares = fmaf(value.z, value.z, squares);
  squares = fmaf(value.w, value.w, squares);
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) squares += __shfl_xor_sync(kFullMask, squares, offset);
  return squares;
}

// The cluster steps (see the notes): the receiving CTA's mbarrier counts the bytes its peers store into it.
// One thread arms `barrier` for `bytes` (its only arrival), then one fence_mbarrier_init for all of them, before the
// CTA's first cluster arrive; every reader waits for phase 0; the stores (PTX st.async) complete their bytes on the
// receiver's barrier: no cluster barrier, so no GPU-scope fence (barrier.cluster.arrive.release waits for the CTA's
// outstanding global stores).
__device__ inline void arm_exchange(uint64_t* barrier, uint32_t bytes) {
  sm90::mbarrier_init(barrier, 1);
  sm90::mbarrier_arrive_expect_tx(barrier, bytes);
}

// The wait acquires at CTA scope, as for TMA copies into this CTA (what it reads is this CTA's shared memory): at
// cluster scope every poll invalidated the L1 (CCTL.IVALL, ≈ 17 % of the single-cluster kernel's stall samples, ncu,
// H100, Flash T = 1).
__device__ __forceinline__ bool exchange_done(uint64_t* barrier) {
  return ::cuda::ptx::mbarrier_try_wait_parity(barrier, 0u);
}

// An exchange still open after this long means a peer never stores its bytes (a broken launch): the kernel traps (a
// launch error) instead of hanging the device.
inline constexpr uint64_t kExchangeTimeoutNs = 2'000'000'000;

// The rest of wait_exchange once the first poll failed: out of line, so the waits stay short.
static __device__ __noinline__ void wait_exchange_slowly(uint64_t* barrier) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  while (!exchange_done(barrier)) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > kExchangeTimeoutNs) {
      printf("mHC: CTA %d of the launch waited 2 s for a cluster exchange: its peers never stored their bytes\n",
             int(blockIdx.x));
      __trap();
    }
  }
}

__device__ inline void wait_exchange(uint64_t* barrier) {
  if (!exchange_done(barrier)) wait_exchange_slowly(barrier);
}

// Stores `value` at `local`'s counterpart in cluster CTA `rank` and completes its 4 bytes on that CTA's counterpart
// of `barrier`.
__device__ inline void send_to_cluster_cta(float* local, uint64_t* barrier, unsigned rank, float value) {
  ::cuda::ptx::st_async(static_cast<float*>(__cluster_map_shared_rank(local, rank)), value,
                        static_cast<uint64_t*>(__cluster_map_shared_rank(barrier, rank)));
}

// Sums over the Q = `clusters` tagged words of each of `count` items (item i's words at word_base(i)[0 .. Q)), by the
// CTA's threads: `lanes` (the power of two ≥ Q) aligned lanes per item, lane l reading word l, items i = pass ·
// (threads / lanes) + thread / lanes. Every word is read before any stale one is re-read. Each lane of an item's group
// then calls deliver(i, sum, l) with the same sum (a butterfly: one fixed order).
template <class WordBase, class Deliver>
__device__ __forceinline__ void sum_cluster_words(int count, int clusters, unsigned tag, WordBase word_base,
                                                  Deliver deliver) {
  const int lanes = slice_sum_lanes(clusters);
  const int per_pass = kDecodeThreads / lanes;
  const int l = threadIdx.x & (lanes - 1);
  const auto item_of = [&](int pass) { return pass * per_pass + int(threadIdx.x) / lanes; };
  const auto reads = [&](int pass) { return item_of(pass) < count && l < clusters; };
  unsigned long long words[kGatherPasses] = {};
#pragma unroll
  for (int p = 0; p < kGatherPasses; ++p)
    if (reads(p)) words[p] = load_relaxed_u64(word_base(item_of(p)) + l);
  while (true) {
    bool stale = false;
#pragma unroll
    for (int p = 0; p < kGatherPasses; ++p) stale |= reads(p) && unsigned(words[p] >> 32) != tag;
    if (!stale) break;
    __nanosleep(32);
#pragma unroll
    for (int p = 0; p < kGatherPasses; ++p)
      if (reads(p) && unsigned(words[p] >> 32) != tag) words[p] = load_relaxed_u64(word_base(item_of(p)) + l);
  }
#pragma unroll
  for (int p = 0; p < kGatherPasses; ++p) {
    if (p * per_pass >= count) break;  // uniform: every lane leaves together
    float sum = reads(p) ? __uint_as_float(unsigned(words[p])) : 0.0f;
    sum = butterfly_sum(sum, lanes);
    if (item_of(p) < count) deliver(item_of(p), sum, l);
  }
}

// A mix CTA of the cluster decode kernel (cluster 0, CTA `rank`): post and comb of tokens rank and rank + 8 from the
// slice clusters' words of Σx², the post rows and the comb rows.
__device__ inline void cluster_decode_mix(const ClusterDecodeArgs& args, unsigned rank, int tokens_here) {
  constexpr int kMixItems = 1 + (kPartialRows<false> - 1 - kStreams);  // Σx², post ×4, comb ×16
  static_assert(kTileTokens / kClusterCtas * kMixItems <= kGatherPasses * (kDecodeThreads / 16),
                "a mix CTA's items fit the passes");
  __shared__ float totals[kPartialRows<false>][kTileTokens];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Q = args.clusters;
  const int64_t flat = int64_t(kStreams) * args.hidden;
  // The parameters before the grid-dependency wait (they do not depend on the previous kernel): a warp's lanes 0..3
  // take post's, lane 0 comb's.
  const bool runs_mix = warp < tokens_here;
  const float post_scale = runs_mix ? args.scale[1] : 0.0f, comb_scale = runs_mix ? args.scale[2] : 0.0f;
  const float post_base = runs_mix && lane < kStreams ? args.base[kStreams + lane] : 0.0f;
  float comb_base[kStreams * kStreams] = {};
  if (runs_mix && lane == 0)
#pragma unroll
    for (int l = 0; l < kStreams * kStreams; ++l) comb_base[l] = args.base[2 * kStreams + l];
  wait_for_prior_grids();
  const unsigned tag = load_relaxed_u32(args.header) + 1u;
  sm90::cluster_arrive_relaxed();  // this CTA has read the epoch
  // Item i: token rank + 8·(i / kMixItems), mix item i mod kMixItems (partial row 0, then rows 5..24).
  const auto row_of = [](int item) { return item == 0 ? 0 : kStreams + item; };
  sum_cluster_words(
      tokens_here * kMixItems, Q, tag,
      [&](int i) {
        const int t = int(rank) + kClusterCtas * (i / kMixItems);
        return args.row_words + int64_t(row_of(i % kMixItems) * kTileTokens + t) * Q;
      },
      [&](int i, float sum, int l) {
        if (l == 0) totals[row_of(i % kMixItems)][int(rank) + kClusterCtas * (i / kMixItems)] = sum;
      });
  __syncthreads();
  if (runs_mix) {
    const int t = int(rank) + kClusterCtas * warp;
    const float inv_rms = inverse_rms(totals[0][t], float(flat), args.norm_eps);
    if (lane < kStreams)
      args.post[t * kStreams + lane] =
          2.0f * sigmoid(totals[1 + kStreams + lane][t] * inv_rms * post_scale + post_base);
    if (lane == 0) {
      float c[kStreams * kStreams];
#pragma unroll
      for (int l = 0; l < kStreams * kStreams; ++l)
        c[l] = totals[1 + 2 * kStreams + l][t] * inv_rms * comb_scale + comb_base[l];
      sinkhorn_4x4_scaled(c, args.sinkhorn_iters, args.hc_eps);
#pragma unroll
      for (int l = 0; l < kStreams * kStreams; ++l) args.comb[t * kStreams * kStreams + l] = c[l];
    }
  }
  sm90::cluster_wait_acquire();
  // Mix CTA 0 has read token 0's words from every slice cluster, and the barrier shows every mix CTA has read the
  // epoch: no CTA of this launch reads it any more.
  if (rank == 0 && tid == 0) args.header[0] = tag;
}

// kHead: hc_head (4 rows, no post/comb); kPost: hc_post of the finished sub-block fused in front of hc_pre.
template <bool kHead, bool kPost>
__global__ void __launch_bounds__(kDecodeThreads, 2) hc_cluster_decode_kernel(const ClusterDecodeArgs args) {
  constexpr int kRows = kProjectionRows<kHead>;
  constexpr int kPartial = kPartialRows<kHead>;
  constexpr int kNTiles = (kRows + 7) / 8;
  constexpr int kWarps = kDecodeThreads / 32;
  constexpr int kWarpsPerStream = kDecodeSliceDims / 32;
  constexpr int kPartialFloats = kPartial * kTileTokens;
  constexpr int kCollapseRows = 1 + kStreams;                  // Σx² and the pre rows
  constexpr int kTokensPerCta = kTileTokens / kClusterCtas;    // tokens t = rank + 8m a CTA sums for its cluster
  static_assert(!(kHead && kPost), "hc_head has no residual update in front of it");
  static_assert(kDecodeThreads == kTileTokens * (kDecodeSliceDims / 4), "one thread per token vector");

  extern __shared__ float4 dynamic_smem[];
  float* const tile = reinterpret_cast<float*>(dynamic_smem);  // [16][kDecodeLdx]
  float* const warp_sums = tile + kTileTokens * kDecodeLdx;     // [warp][partial rows][16]
  // Written by the cluster's CTAs (DSMEM): partials [source rank][row][m] of this CTA's tokens, then totals.
  __shared__ float gathered[kClusterCtas][kPartial][kTokensPerCta];
  __shared__ float totals[kCollapseRows][kTileTokens];
  __shared__ float square_gathered[kClusterCtas][kTokensPerCta];
  __shared__ float square_totals[kTileTokens];
  __shared__ float pre_s[kTileTokens][kStreams];
  // The bytes stored here by [0] the partials' step, [1] the totals' push, [2] the Σy² step, [3] its push.
  __shared__ uint64_t exchange[4];

  allow_dependents();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int d = args.hidden, T = int(args.tokens), Q = args.clusters;
  const int64_t flat = int64_t(kStreams) * d;
  const unsigned rank = blockIdx.x % kClusterCtas;  // 1-D clusters of kClusterCtas consecutive CTAs
  const int cluster = int(blockIdx.x / kClusterCtas);
  constexpr int kMixClusters = kHead ? 0 : 1;  // cluster 0 of hc_pre / hc_post_pre: the mix CTAs

  // Tokens t = rank + 8m (m < tokens_here) whose sums this CTA forms for its cluster (mix CTA: whose mix it runs).
  const int tokens_here = T > int(rank) ? (T - int(rank) + kClusterCtas - 1) / kClusterCtas : 0;
  if constexpr (!kHead) {
    if (cluster == 0) return cluster_decode_mix(args, rank, tokens_here);
  }

  const int q = cluster - kMixClusters;
  const int slice = q * kClusterCtas + int(rank);
  const int i0 = slice * kDecodeSliceDims;
  const int width = min(kDecodeSliceDims, d - i0);  // ≤ 0: an idle slice past the hidden size

  // Weights first (they do not depend on the previous kernel). Thread (g, t4) of a warp holds its columns of fn.
  const int g = lane >> 2, t4 = lane & 3;
  const int stream = warp / kWarpsPerStream;
  const int column0 = (warp % kWarpsPerStream) * 32 + 4 * t4;
  float fn_frag[2][kNTiles][4];
  load_fn_fragments<kRows>(fn_frag, args.fn + int64_t(stream) * d + min(i0, d), flat, column0, width, g);
  // The tf32 pairs split here, off the path after the wait (48 registers; one tile, no cap pressure).
  uint32_t fn_big[2][kNTiles][4], fn_small[2][kNTiles][4];
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) split_tf32(fn_frag[p][nt][e], fn_big[p][nt][e], fn_small[p][nt][e]);
  const int vt = tid / (kDecodeSliceDims / 4), vi = (tid % (kDecodeSliceDims / 4)) * 4;
  const bool owner = vt < T && vi < width;
  float4 norm_weight = make_float4(0.f, 0.f, 0.f, 0.f);
  if (args.norm_weight != nullptr && owner)
    norm_weight = __ldg(reinterpret_cast<const float4*>(args.norm_weight + i0 + vi));
  // pre's parameters, for thread 4·t + k.
  const float pre_scale = args.scale[0], pre_base = args.base[tid % kStreams];
  // Armed before the cluster arrive: no peer stores into this CTA before its wait below has seen the arrive. This CTA
  // receives every rank's partials of its tokens and the totals of all T tokens (the Σy² alike, one row).
  if (tid == 0) {
    arm_exchange(&exchange[0], uint32_t(kClusterCtas * kPartial * tokens_here) * 4u);
    arm_exchange(&exchange[1], uint32_t(kCollapseRows * T) * 4u);
    if (args.norm_weight != nullptr) {
      arm_exchange(&exchange[2], uint32_t(kClusterCtas * tokens_here) * 4u);
      arm_exchange(&exchange[3], uint32_t(T) * 4u);
    }
    sm90::fence_mbarrier_init();
  }
  sm90::cluster_arrive_relaxed();  // this CTA has started: its shared memory may be written once every peer's has

  wait_for_prior_grids();
  const unsigned tag = load_relaxed_u32(args.header) + 1u;
  stage_decode_vectors<kPost>(args, tile, vt, vi, i0, owner, d, flat);
  __syncthreads();
  float* const mine = warp_sums + warp * kPartialFloats;
  const float* const xw = tile + g * kDecodeLdx + stream * kDecodeSliceDims + column0;
  const float* const x_lo[2] = {xw, xw + 16};
  project_tile_3xtf32<kRows, 2>(
      x_lo, 8 * kDecodeLdx,
      [&](int p, int nt, int e, uint32_t& big, uint32_t& small) {
        big = fn_big[p][nt][e];
        small = fn_small[p][nt][e];
      },
      g, t4, mine);
  __syncthreads();

  // Cluster step: the slice's partial of item (row, t), warps summed in order, to CTA t mod 8.
  sm90::cluster_wait_acquire();
  for (int item = tid; item < kPartialFloats; item += kDecodeThreads) {
    const int row = item / kTileTokens, t = item % kTileTokens;
    if (t >= T) continue;
    const float sum = sum_warp_partials<kWarps>(warp_sums, item, kPartialFloats);
    send_to_cluster_cta(&gathered[rank][row][t / kClusterCtas], &exchange[0], t % kClusterCtas, sum);
  }
  wait_exchange(&exchange[0]);
  // This CTA's items (row, t = rank + 8m): the cluster's sum, ranks in order, published for the other clusters.
  if (tid < kPartial * kTokensPerCta) {
    const int row = tid / kTokensPerCta, m = tid % kTokensPerCta, t = int(rank) + kClusterCtas * m;
    if (t < T) {
      float sum = gathered[0][row][m];
#pragma unroll
      for (int r = 1; r < kClusterCtas; ++r) sum += gathered[r][row][m];
      store_relaxed_u64(args.row_words + int64_t(row * kTileTokens + t) * Q + q, tagged(sum, tag));
    }
  }
  // Global hop: the Σx² and pre totals of this CTA's tokens, pushed into every CTA of the cluster.
  // The lanes of an item's group push its total into the cluster's CTAs, lane l into CTAs l, l + lanes, ….
  const int group_lanes = slice_sum_lanes(Q);
  const auto push_to_cluster = [&](float* local, uint64_t* exchange_barrier, float value, int l) {
    for (int r = l; r < kClusterCtas; r += group_lanes)
      send_to_cluster_cta(local, exchange_barrier, unsigned(r), value);
  };
  // Item i: row i / tokens_here, token rank + 8·(i mod tokens_here).
  const auto token_of = [&](int i) { return int(rank) + kClusterCtas * (i % tokens_here); };
  sum_cluster_words(
      kCollapseRows * tokens_here, Q, tag,
      [&](int i) { return args.row_words + int64_t((i / tokens_here) * kTileTokens + token_of(i)) * Q; },
      [&](int i, float sum, int l) { push_to_cluster(&totals[i / tokens_here][token_of(i)], &exchange[1], sum, l); });
  if constexpr (kHead) {
    // No mix cluster: CTA 0 of slice cluster 0 has read token 0's words from every slice cluster.
    if (q == 0 && rank == 0 && tid == 0) args.header[0] = tag;
  }
  wait_exchange(&exchange[1]);

  if (tid < kStreams * T) {
    const int t = tid / kStreams, k = tid % kStreams;
    const float inv_rms = inverse_rms(totals[0][t], float(flat), args.norm_eps);
    pre_s[t][k] = sigmoid(totals[1 + k][t] * inv_rms * pre_scale + pre_base) + args.hc_eps;
  }
  __syncthreads();

  // Collapse: y[t][i0 + i] = Σ_k pre_k·X_k[i0 + i].
  float4 value = make_float4(0.f, 0.f, 0.f, 0.f);
  if (owner) value = collapse_vector(tile + vt * kDecodeLdx + vi, kDecodeSliceDims, pre_s[vt], args.round_to_bf16);
  if (args.norm_weight != nullptr) {
    // Σy² of the slice per token (a token's 16 vectors are 16 aligned lanes of one warp), then the same path.
    const float squares = slice_squares(value);
    if (vi == 0 && vt < T)
      send_to_cluster_cta(&square_gathered[rank][vt / kClusterCtas], &exchange[2], vt % kClusterCtas, squares);
    wait_exchange(&exchange[2]);
    if (tid < kTokensPerCta) {
      const int t = int(rank) + kClusterCtas * tid;
      if (t < T) {
        float sum = square_gathered[0][tid];
#pragma unroll
        for (int r = 1; r < kClusterCtas; ++r) sum += square_gathered[r][tid];
        store_relaxed_u64(args.square_words + int64_t(t) * Q + q, tagged(sum, tag));
      }
    }
    sum_cluster_words(
        tokens_here, Q, tag, [&](int m) { return args.square_words + int64_t(token_of(m)) * Q; },
        [&](int m, float sum, int l) { push_to_cluster(&square_totals[token_of(m)], &exchange[3], sum, l); });
    wait_exchange(&exchange[3]);
    if (owner) {
      // rms_norm's arithmetic: (y · inv_rms) · w, then the optional rounding.
      const float inv_rms = inverse_rms(square_totals[vt], float(d), args.norm_eps);
      value = make_float4(value.x * inv_rms * norm_weight.x, value.y * inv_rms * norm_weight.y,
                          value.z * inv_rms * norm_weight.z, value.w * inv_rms * norm_weight.w);
      if (args.norm_round_to_bf16) value = round4_to_bf16(value);
    }
  }
  if (owner) store_output(args.y, args.y_bf16, int64_t(vt) * d + i0 + vi, value);
}

// ---- The single-cluster decode kernel (T ≤ kDecodeMaxTokens; hidden a multiple of 256 up to 4096, or of 512 up to
// 7168). ----
//
// NOTES:
// - One cluster of kSingleClusterCtas CTAs covers the whole projection, so every sum over the hidden size is one
//   DSMEM exchange and none takes a global hop (the cluster decode kernel above needs a global hop per sum: Flash
//   T = 1 hc_head + norm 4.6 µs against 3.2 without the norm's hop, session 14). CTA r owns the dims [r·ds,
//   (r+1)·ds), ds = hidden / 16, of all 4 streams; its warp w the 16·V dims 16·V·w .. 16·V·(w + 1) − 1 of the slice,
//   all streams, where V (kVectors) is 1 up to 4096 and 2 above (V4-Pro: 14 warps of 32 dims; 28 warps of 16 left
//   a thread 64 registers and spilled), each thread V 4-dim vectors 16 dims apart per stream and token. Two vectors
//   serve one token: H200, V4-Pro T = 1, against the cluster decode kernel (session 17): hc_pre + norm 6.8 → 4.8 µs,
//   hc_post_pre + norm 7.1 → 6.0, hc_head + norm 5.6 → 3.4; behind a full-card kernel 11.8 → 10.2 and 12.2 → 10.6.
//   At T = 8 their MMA variants lost (hc_pre 8.9 vs 6.5 µs, hc_post_pre + norm 11.0 vs 7.9).
// - fn's slice (24 rows × 4·ds floats, ≈ 98 KB for V4-Flash) is bulk-copied into shared memory before the
//   grid-dependency wait. After it each thread loads its X values straight into registers as MMA A fragments
//   (tokens g and g + 8, dims 4·t4 .. + 3 of each 16 of its warp's, all 4 streams: the collapse and the fused hc_post
//   need no shared-memory staging either), projects them (3xTF32 MMA, as the kernels above), and the warps' partial
//   sums are summed in warp order.
// - Exchange 1: every CTA stores its partials of Σx² and the pre rows (5 × T values) into every CTA, and its mix rows
//   of token t into CTA t (st.async into mbarrier-armed peers, as the asynchronous cluster decode kernel); each CTA
//   sums what it received in rank order, so all of them hold the same totals. Collapse in registers; with the fused
//   output norm, exchange 2 hands the slices' Σy² around the same way. The mix warp of CTA t (hc_pre, hc_post_pre)
//   turns token t's totals into post and comb (Sinkhorn in scaling form, sinkhorn_4x4_scaled) beside the collapse.
// - The MMA takes the projection rows as its M and the tokens as its N (kTokenTiles tiles of 8): hc_pre's 24 rows are
//   2 MMAs per k-step at T ≤ 8 (3 with the tokens as M), as one cluster's 16 SMs do all the products (≈ 0.9 µs of
//   each tensor pipe for hc_pre's 3xTF32 at 3 per k-step). One token (kTokenTiles = 0) projects by FMAs instead: lane
//   (g, t4) takes rows g, g + 8, g + 16 of its 16 columns, so all 32 lanes work. Exact fp32 products: a one-token
//   launch sums in another order than a launch of more tokens, both within the tests' bounds.
// - No workspace words: nothing leaves the cluster but the outputs. Sums in another fixed order than the other
//   kernels' (deterministic).
// - More than 16 tokens (AUTO up to kAutoClusterPerTileMaxTokens): a cluster per 16-token tile, each on its own (every
//   cluster reads all of fn, from L2 after the first), in as many waves as the card needs; no cross-tile hop, unlike
//   the persistent kernel's two global hops per tile (V4-Flash 64 tokens with the output norm: 9.7 µs against
//   17.4 for the persistent kernel + rms_norm, H200, session 17).
// - Session 20 (H200, bench_cuda_mhc --trace, V4-Flash T = 1 hc_post_pre + norm, CTA 0's cycles after the
//   grid-dependency wait): the CTA starts ≈ 2,900 cycles before it (its fn copies issued ≈ 2,700 after its start,
//   however many warps issue them), X loaded and updated +1,100, fn landed +1,300, projected +2,100, exchange 1 in
//   +3,500, pre +4,300, exchange 2 in +5,900, outputs +7,000; the mix warp's first rows +4,800, comb +7,700 (the tail).
//   A cluster exchange itself takes 100-300 ns; the phases between them the rest. ncu (caches flushed): 12.8 cycles per
//   issued instruction, of them long scoreboard 4.0, wait 1.5, barrier 1.5, short scoreboard 1.2, no instruction 0.8,
//   constant cache misses 0.7. Tried and removed (same bits; bench T = 1 graph µs, hc_pre + norm / hc_post_pre + norm,
//   alone and behind a full-card kernel, against 4.4 / 4.9 and 9.5 / 9.8): fn's copies by one lane of every warp (4.4 /
//   5.0, 9.5 / 10.2), fn into registers from shared memory before the grid-dependency wait (4.0 alone, 9.9 behind), fn
//   straight from global memory into registers with no bulk copies (3.9 / 4.5 alone but 11.1 / 11.2 behind), a barrier
//   per 8 fn rows (level), the cluster wait right after the grid-dependency wait (level; behind: 10.1, Pro 11.5 vs
//   10.7), Sinkhorn's reciprocals one per lane with shuffles (4.5 / 5.1), Σy² formed by every CTA from the whole token
//   staged by TMA instead of exchange 2 (5.1 / 5.9: 16 SMs read the same 64 KB).
inline constexpr int kSingleClusterCtas = 16;

// Where the single-cluster kernel marks its phases for bench_cuda_mhc --trace, which defines
// DSV4_MHC_SINGLE_CLUSTER_MARK(phase) to record a timestamp (and renames the kernel) before including this file (so
// every function defined here is a template, inline or static: the bench's copy must not clash with the library's
// at link time). The projection warps' marks, then the mix warp's.
enum class SingleClusterPhase : int {
  kEntry,            // started (its weights' copies not yet issued)
  kArmed,            // thread 0: the CTA's barriers armed
  kStarted,          // past the CTA barrier after the arming
  kCopiesIssued,     // its share of fn's copies issued
  kGridWait,         // past the grid-dependency wait
  kXLoaded,          // its X values in registers (updated by the fused hc_post)
  kFnLoaded,         // fn's copies landed
  kProjected,        // its partial sums in shared memory, the CTA's warps synchronised
  kExchangeSent,     // its exchange-1 stores issued
  kExchanged,        // exchange 1 received
  kPreReady,         // pre of every token in shared memory
  kNormSent,         // its exchange-2 stores issued (fused output norm)
  kNormExchanged,    // exchange 2 received (fused output norm)
  kStored,           // outputs stored
  kMixExchanged,     // mix warp: exchange 1 received
  kMixFirstRows,     // mix warp: post stored, Sinkhorn's first row normalisation gathered
  kMixStored,        // mix warp: comb stored
  kCount
};
#ifndef DSV4_MHC_SINGLE_CLUSTER_MARK
#define DSV4_MHC_SINGLE_CLUSTER_MARK(phase)
#endif
// The same once `value` (a float register) is available: the mark waits for the loads behind it.
#ifndef DSV4_MHC_SINGLE_CLUSTER_MARK_AFTER
#define DSV4_MHC_SINGLE_CLUSTER_MARK_AFTER(phase, value)
#endif
inline constexpr int kSingleWarpDims = 16;  // dims per warp and vector (all 4 streams)
inline constexpr int kSingleMaxWarps = 16;  // projection warps per CTA
inline constexpr int kSingleFnPad = 16;     // floats past each fn row: rows g, g + 1 of a B load 16 banks apart
inline constexpr int kSingleMixItems = kPartialRows<false> - 1 - kStreams;  // post ×4, comb ×16

// Projection warps per CTA at most with `vectors` vectors per thread (one: 16 × 32 + 32 threads at ≤ 120 registers;
// two: 14 × 32 + 32 at ≤ 136, as V4-Pro's 7168 needs).
__host__ __device__ constexpr int single_cluster_max_warps(int vectors) { return vectors == 1 ? kSingleMaxWarps : 14; }
// Vectors per thread for `hidden` (0: the kernel does not serve it): each CTA's slice a whole number of warps.
__host__ __device__ constexpr int single_cluster_vectors(int64_t hidden) {
  for (int vectors = 1; vectors <= 2; ++vectors) {
    const int64_t quantum = int64_t(kSingleClusterCtas) * kSingleWarpDims * vectors;
    if (hidden > 0 && hidden % quantum == 0 && hidden <= quantum * single_cluster_max_warps(vectors)) return vectors;
  }
  return 0;
}
__host__ __device__ constexpr int single_cluster_warps(int hidden) {
  return hidden / kSingleClusterCtas / (kSingleWarpDims * single_cluster_vectors(hidden));
}
__host__ __device__ constexpr int single_cluster_threads(int hidden, bool head) {
  return 32 * single_cluster_warps(hidden) + (head ? 0 : 32);  // + the mix warp
}
// fn's rows in shared memory ([rows][4·ds + pad]), then the warps' partial blocks ([warps][partial rows][16]).
__host__ __device__ constexpr int single_cluster_fn_stride(int hidden) {
  return kStreams * (hidden / kSingleClusterCtas) + kSingleFnPad;
}
__host__ __device__ constexpr int single_cluster_smem_bytes(int hidden, bool head) {
  const int rows = head ? kProjectionRows<true> : kProjectionRows<false>;
  const int partial = head ? kPartialRows<true> : kPartialRows<false>;
  return 4 * (rows * single_cluster_fn_stride(hidden) + single_cluster_warps(hidden) * partial * kTileTokens);
}

// Sums `count` ≤ kMax floats at `values`, `stride` apart, in order: all loads issued before the first add (a loop over
// a run-time count would wait a shared-memory round trip per term).
template <int kMax>
__device__ __forceinline__ float sum_in_order(const float* values, int count, int stride) {
  float terms[kMax];
#pragma unroll
  for (int i = 0; i < kMax; ++i) terms[i] = i < count ? values[i * stride] : 0.0f;
  float sum = terms[0];
#pragma unroll
  for (int i = 1; i < kMax; ++i)
    if (i < count) sum += terms[i];
  return sum;
}

// Cluster c of a launch of several serves the tokens 16c .. 16c + 15 of `site`: its arguments with every per-token
// pointer moved to token 16c (a null one stays null) and the count of its tokens.
__device__ inline DecodeSiteArgs cluster_tile_args(const DecodeSiteArgs& site, int cluster) {
  const int64_t t0 = int64_t(cluster) * kTileTokens, d = site.hidden, flat = kStreams * d;
  const auto moved = [&](auto* pointer, int64_t per_token) {
    return pointer == nullptr ? pointer : pointer + t0 * per_token;
  };
  DecodeSiteArgs args = site;
  args.tokens = min(int64_t(kTileTokens), site.tokens - t0);
  args.X = moved(site.X, flat);
  args.y = moved(site.y, d);
  args.y_bf16 = moved(site.y_bf16, d);
  args.post = moved(site.post, kStreams);
  args.comb = moved(site.comb, kStreams * kStreams);
  args.out = moved(site.out, d);
  args.post_in = moved(site.post_in, kStreams);
  args.comb_in = moved(site.comb_in, kStreams * kStreams);
  args.X_out = moved(site.X_out, flat);
  return args;
}

// kTokenTiles: 0 for T = 1 (projected by FMAs), else the MMA's 8-token tiles covering T; kVectors: per thread, stream
// and token (see the notes). A launch of more than 16 tokens runs a cluster per 16-token tile (kTokenTiles = 2), each
// on its own (cluster_tile_args).
template <bool kHead, bool kPost, int kTokenTiles, int kVectors>
__global__ void __launch_bounds__(32 * single_cluster_max_warps(kVectors) + 32)
    hc_single_cluster_kernel(const DecodeSiteArgs site) {
  constexpr int kRows = kProjectionRows<kHead>;
  constexpr int kPartial = kPartialRows<kHead>;
  constexpr int kNTiles = (kRows + 7) / 8;
  constexpr int kCollapseRows = 1 + kStreams;  // Σx² and the pre rows: every CTA needs their totals
  constexpr int kCtas = kSingleClusterCtas;
  constexpr bool kSingleToken = kTokenTiles == 0;
  static_assert(!(kHead && kPost), "hc_head has no residual update in front of it");
  static_assert(kCollapseRows == kPartialRows<true>, "hc_head's partials are exactly the collapse rows");
  static_assert(kTokenTiles >= 0 && kTokenTiles <= 2, "up to 16 tokens");
  static_assert(kVectors == 1 || (kVectors == 2 && kTokenTiles == 0), "16 dims per warp, or 32 for one token");

  extern __shared__ float4 dynamic_smem[];
  const DecodeSiteArgs args = cluster_tile_args(site, int(blockIdx.x) / kCtas);
  const int d = args.hidden, T = int(args.tokens);
  const int ds = d / kCtas;
  const int warps = single_cluster_warps(d);
  const int fn_stride = single_cluster_fn_stride(d);
  float* const fn_s = reinterpret_cast<float*>(dynamic_smem);  // [kRows][fn_stride]
  float* const warp_sums = fn_s + kRows * fn_stride;           // [warps][kPartial][16]
  // Written by the cluster's CTAs: [source rank][row][token] of the collapse rows, [source rank][item] of this CTA's
  // token's mix rows, [source rank][token] of Σy².
  __shared__ float collapse_in[kCtas][kCollapseRows][kTileTokens];
  __shared__ float mix_in[kCtas][kSingleMixItems];
  __shared__ float squares_in[kCtas][kTileTokens];
  __shared__ float pre_s[kTileTokens][kStreams];
  __shared__ float warp_squares[kSingleMaxWarps][kTileTokens];
  // [0] fn's bulk copies, [1] exchange 1's collapse rows, [2] its mix rows, [3] exchange 2.
  __shared__ uint64_t barriers[4];

  allow_dependents();
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kEntry);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned rank = blockIdx.x % kCtas;  // 1-D clusters of kCtas consecutive CTAs
  const int i0 = int(rank) * ds;
  const int64_t flat = int64_t(kStreams) * d;
  const bool mixer = !kHead && warp == warps;  // hc_pre / hc_post_pre: the last warp runs token `rank`'s mix
  const int projection_threads = 32 * warps;

  if (tid == 0) {
    const uint32_t fn_bytes = uint32_t(kRows * kStreams * ds) * 4u;
    arm_exchange(&barriers[0], fn_bytes);
    arm_exchange(&barriers[1], uint32_t(kCtas * kCollapseRows * T) * 4u);
    if (!kHead && int(rank) < T) arm_exchange(&barriers[2], uint32_t(kCtas * kSingleMixItems) * 4u);
    if (args.norm_weight != nullptr) arm_exchange(&barriers[3], uint32_t(kCtas * T) * 4u);
    sm90::fence_mbarrier_init();
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kArmed);
  }
  __syncthreads();  // fn's barrier is armed before any copy completes on it
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kStarted);
  // fn's slice: row r, stream k is ds contiguous floats; one bulk copy each (weights: before the wait).
  for (int c = tid; c < kRows * kStreams; c += int(blockDim.x)) {
    const int r = c / kStreams, k = c % kStreams;
    ptx::cp_async_bulk_global_to_shared(
        static_cast<uint32_t>(__cvta_generic_to_shared(fn_s + r * fn_stride + k * ds)),
        args.fn + int64_t(r) * flat + int64_t(k) * d + i0, uint32_t(ds) * 4u,
        static_cast<uint32_t>(__cvta_generic_to_shared(&barriers[0])));
  }
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kCopiesIssued);
  sm90::cluster_arrive_relaxed();  // this CTA's exchange barriers are armed: its peers may store into it

  const int g = lane >> 2, t4 = lane & 3;
  if (mixer) {
    // Parameters first; lanes 0..3 take post's, lanes 4..19 comb's.
    const float mix_scale = lane < kStreams ? args.scale[1] : args.scale[2];
    const float mix_base = lane < kSingleMixItems ? args.base[kStreams + lane] : 0.0f;
    wait_for_prior_grids();
    sm90::cluster_wait_acquire();
    if (int(rank) >= T) return;
    const int t = int(rank);
    wait_exchange(&barriers[1]);
    wait_exchange(&barriers[2]);
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kMixExchanged);
    // Every lane sums a mix item (lanes past the items repeat some: unused) beside Σx², and computes post's sigmoid
    // (stored by lanes 0..3) beside comb's first rows: no divergent branch on the chain (Σx², then the mix sums, then
    // post in a branch until session 20).
    const float mix = sum_in_order<kCtas>(&mix_in[0][lane % kSingleMixItems], kCtas, kSingleMixItems);
    const float squares = sum_in_order<kCtas>(&collapse_in[0][0][t], kCtas, kCollapseRows * kTileTokens);
    const float inv_rms = inverse_rms(squares, float(flat), args.norm_eps);
    const float logit = (lane < kSingleMixItems ? mix * inv_rms : 0.0f) * mix_scale + mix_base;
    const float post = 2.0f * sigmoid(logit);
    if (lane < kStreams) args.post[t * kStreams + lane] = post;
    // Lanes 4..19 hold comb's logits (row j at lanes 4 + 4j ..): the first row normalisation there, the rest in lane 0.
    const float first_rows = softmax_row_plus_eps_lanes(logit, args.hc_eps);
    float c[kStreams * kStreams];
#pragma unroll
    for (int l = 0; l < kStreams * kStreams; ++l) c[l] = __shfl_sync(kFullMask, first_rows, kStreams + l);
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kMixFirstRows);
    if (lane == 0) {
      sinkhorn_4x4_scaled_iterations(c, args.sinkhorn_iters, args.hc_eps);
#pragma unroll
      for (int l = 0; l < kStreams * kStreams; ++l) args.comb[t * kStreams * kStreams + l] = c[l];
    }
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kMixStored);
    return;
  }

  // Projection warps. Thread (g, t4) of warp w: dims dim0 + 16v .. + 3 (v < kVectors), dim0 = i0 + 16·V·w + 4·t4, of
  // tokens g and g + 8 (kSingleToken: every g loads token 0's; the g = 0 lanes own its outputs).
  constexpr int kWarpDims = kSingleWarpDims * kVectors;
  const int dim0 = i0 + kWarpDims * warp + 4 * t4;
  const int token_lo = kSingleToken ? 0 : g;
  const bool loads_lo = kSingleToken || g < T;
  const bool has_lo = kSingleToken ? g == 0 : g < T, has_hi = kTokenTiles == 2 && g + 8 < T;
  float4 norm_weight[kVectors];
#pragma unroll
  for (int v = 0; v < kVectors; ++v)
    norm_weight[v] = args.norm_weight != nullptr
                         ? __ldg(reinterpret_cast<const float4*>(args.norm_weight + dim0 + kSingleWarpDims * v))
                         : make_float4(0.f, 0.f, 0.f, 0.f);
  const float pre_scale = args.scale[0], pre_base = args.base[tid % kStreams];
  wait_for_prior_grids();
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kGridWait);

  using TokenVectors = float4[kVectors][kStreams];
  TokenVectors x_lo, x_hi;
  const auto load_token = [&](int t, bool valid, TokenVectors& x) {
    const float* const source = args.X + int64_t(t) * flat + dim0;
#pragma unroll
    for (int v = 0; v < kVectors; ++v)
#pragma unroll
      for (int k = 0; k < kStreams; ++k)
        x[v][k] = valid ? *reinterpret_cast<const float4*>(source + int64_t(k) * d + kSingleWarpDims * v)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  load_token(token_lo, loads_lo, x_lo);
  load_token(g + 8, has_hi, x_hi);
  if constexpr (kPost) {
    // kSingleToken: every g has read token 0's vectors before the g = 0 lanes overwrite them (X_out may be X).
    if constexpr (kSingleToken) __syncwarp();
    // hc_post of the finished sub-block on this thread's vectors (the owner is their only reader and writer;
    // kSingleToken: the other g update their copies too).
    const auto update_token = [&](int t, bool valid, bool owner, TokenVectors& x) {
      if (!valid) return;
      float mix[kMixFloats];
      load_mix(args.post_in, args.comb_in, t, mix);
#pragma unroll
      for (int v = 0; v < kVectors; ++v) {
        const int dim = dim0 + kSingleWarpDims * v;
        const float4 o = *reinterpret_cast<const float4*>(args.out + int64_t(t) * d + dim);
        float4 updated[kStreams];
#pragma unroll
        for (int k = 0; k < kStreams; ++k)
          updated[k] = residual_update(k, o, x[v], mix, mix + kStreams, args.round_to_bf16);
        float* const x_out = args.X_out + int64_t(t) * flat + dim;
#pragma unroll
        for (int k = 0; k < kStreams; ++k) {
          x[v][k] = updated[k];
          if (owner) *reinterpret_cast<float4*>(x_out + int64_t(k) * d) = updated[k];
        }
      }
    };
    update_token(token_lo, loads_lo, has_lo, x_lo);
    update_token(g + 8, has_hi, has_hi, x_hi);
  }
  DSV4_MHC_SINGLE_CLUSTER_MARK_AFTER(SingleClusterPhase::kXLoaded, x_lo[kVectors - 1][kStreams - 1].w);

  float* const mine = warp_sums + warp * kPartial * kTileTokens;
  // fn's columns of this thread's first vector in row 0 (vector v 16 floats on, stream k ds on).
  const float* const fn_thread = fn_s + kWarpDims * warp + 4 * t4;
  if constexpr (kSingleToken) {
    // One token (see the notes): lane (g, t4) takes projection rows g + 8·nt of its 16·V columns (4 streams × the 4
    // dims of each vector), then the quad (t4) sums its columns: row r of the warp's 64·V columns.
    float part[kNTiles] = {};
    float squares = 0.f;
    wait_exchange(&barriers[0]);
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kFnLoaded);
#pragma unroll
    for (int v = 0; v < kVectors; ++v)
#pragma unroll
      for (int k = 0; k < kStreams; ++k) {
        squares = fmaf(x_lo[v][k].x, x_lo[v][k].x, squares);
        squares = fmaf(x_lo[v][k].y, x_lo[v][k].y, squares);
        squares = fmaf(x_lo[v][k].z, x_lo[v][k].z, squares);
        squares = fmaf(x_lo[v][k].w, x_lo[v][k].w, squares);
      }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      if (8 * nt + g >= kRows) continue;
      const float* const fn_row = fn_thread + (8 * nt + g) * fn_stride;
#pragma unroll
      for (int v = 0; v < kVectors; ++v)
#pragma unroll
        for (int k = 0; k < kStreams; ++k) {
          const float4 f = *reinterpret_cast<const float4*>(fn_row + k * ds + kSingleWarpDims * v);
          part[nt] = fmaf(f.x, x_lo[v][k].x, part[nt]);
          part[nt] = fmaf(f.y, x_lo[v][k].y, part[nt]);
          part[nt] = fmaf(f.z, x_lo[v][k].z, part[nt]);
          part[nt] = fmaf(f.w, x_lo[v][k].w, part[nt]);
        }
    }
    squares += __shfl_xor_sync(kFullMask, squares, 1);
    squares += __shfl_xor_sync(kFullMask, squares, 2);
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      part[nt] += __shfl_xor_sync(kFullMask, part[nt], 1);
      part[nt] += __shfl_xor_sync(kFullMask, part[nt], 2);
      if (t4 == 0 && 8 * nt + g < kRows) mine[(1 + 8 * nt + g) * kTileTokens] = part[nt];
    }
    if (lane == 0) mine[0] = squares;
  } else {
    // 3xTF32 projection with the projection rows as the MMA's M (16-row tiles: hc_pre's 24 in 2, not 3 tiles of 8)
    // and the tokens as its N (tile nn: tokens 8·nn + g; the thread's own x is its B fragment). For vector v and
    // stream k, k-step h maps logical k = t4 to dim 4·t4 + 2h and k = t4 + 4 to the next one (load_fn_fragments'
    // permutation); two accumulator chains per tile pair, by stream parity (one with two token tiles: their
    // accumulators spilled).
    constexpr int kMTiles = (kRows + 15) / 16;
    constexpr int kChains = kTokenTiles == 1 ? 2 : 1;
    float acc[kChains][kMTiles][kTokenTiles][4] = {};
    float squares_lo = 0.f, squares_hi = 0.f;
    wait_exchange(&barriers[0]);
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kFnLoaded);
#pragma unroll
    for (int v = 0; v < kVectors; ++v)
#pragma unroll
      for (int k = 0; k < kStreams; ++k) {
        const float lo[4] = {x_lo[v][k].x, x_lo[v][k].y, x_lo[v][k].z, x_lo[v][k].w};
        const float hi[4] = {x_hi[v][k].x, x_hi[v][k].y, x_hi[v][k].z, x_hi[v][k].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          squares_lo = fmaf(lo[e], lo[e], squares_lo);
          if constexpr (kTokenTiles == 2) squares_hi = fmaf(hi[e], hi[e], squares_hi);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t b_big[kTokenTiles][2], b_small[kTokenTiles][2];
#pragma unroll
          for (int nn = 0; nn < kTokenTiles; ++nn) {
            const float* const x = nn == 0 ? lo : hi;
            split_tf32(x[2 * h], b_big[nn][0], b_small[nn][0]);
            split_tf32(x[2 * h + 1], b_big[nn][1], b_small[nn][1]);
          }
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            // fn rows 16·mt + g and + 8 at dims 2h, 2h + 1 of the vector's 4 (rows past kRows: zero).
            const auto fn_pair = [&](int row) {
              return row < kRows ? *reinterpret_cast<const float2*>(fn_thread + row * fn_stride + k * ds +
                                                                    kSingleWarpDims * v + 2 * h)
                                 : make_float2(0.f, 0.f);
            };
            const float2 top = fn_pair(16 * mt + g), bottom = fn_pair(16 * mt + g + 8);
            uint32_t a_big[4], a_small[4];
            split_tf32(top.x, a_big[0], a_small[0]);
            split_tf32(bottom.x, a_big[1], a_small[1]);
            split_tf32(top.y, a_big[2], a_small[2]);
            split_tf32(bottom.y, a_big[3], a_small[3]);
#pragma unroll
            for (int nn = 0; nn < kTokenTiles; ++nn) {
              float (&chain)[4] = acc[k % kChains][mt][nn];
              mma_tf32(chain, a_small, b_big[nn][0], b_big[nn][1]);
              mma_tf32(chain, a_big, b_small[nn][0], b_small[nn][1]);
              mma_tf32(chain, a_big, b_big[nn][0], b_big[nn][1]);
            }
          }
        }
      }
    squares_lo += __shfl_xor_sync(kFullMask, squares_lo, 1);
    squares_lo += __shfl_xor_sync(kFullMask, squares_lo, 2);
    squares_hi += __shfl_xor_sync(kFullMask, squares_hi, 1);
    squares_hi += __shfl_xor_sync(kFullMask, squares_hi, 2);
    if (t4 == 0) {
      mine[g] = squares_lo;
      mine[g + 8] = squares_hi;
    }
    // D of tile (mt, nn): rows 16·mt + g (+ 8 for e ≥ 2), tokens 8·nn + 2·t4 (+ 1 for odd e).
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nn = 0; nn < kTokenTiles; ++nn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * mt + g + 8 * (e >> 1);
          if (row < kRows)
            mine[(1 + row) * kTileTokens + 8 * nn + 2 * t4 + (e & 1)] =
                kChains == 1 ? acc[0][mt][nn][e] : acc[0][mt][nn][e] + acc[kChains - 1][mt][nn][e];
        }
  }
  const auto sync_projection_warps = [&] { asm volatile("bar.sync 1, %0;" ::"r"(projection_threads) : "memory"); };
  sync_projection_warps();
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kProjected);

  // Exchange 1: pair p < 16·5·T sends collapse item (row, t) to CTA p mod 16; the next 20·T pairs send mix item
  // (row, t) to CTA t. Each pair sums the warps' partials of its item in warp order.
  sm90::cluster_wait_acquire();
  const int broadcast_pairs = kCtas * kCollapseRows * T;
  const int pairs = broadcast_pairs + (kHead ? 0 : kSingleMixItems * T);
  for (int p = tid; p < pairs; p += projection_threads) {
    if (p < broadcast_pairs) {
      const int destination = p % kCtas, item = p / kCtas;  // item = row·T + t
      const int row = item / T, t = item % T;
      const float sum =
          sum_in_order<kSingleMaxWarps>(warp_sums + row * kTileTokens + t, warps, kPartial * kTileTokens);
      send_to_cluster_cta(&collapse_in[rank][row][t], &barriers[1], unsigned(destination), sum);
    } else {
      const int item = p - broadcast_pairs;
      const int m = item / T, t = item % T;  // mix row kCollapseRows + m
      const float sum = sum_in_order<kSingleMaxWarps>(warp_sums + (kCollapseRows + m) * kTileTokens + t, warps,
                                                      kPartial * kTileTokens);
      send_to_cluster_cta(&mix_in[rank][m], &barriers[2], unsigned(t), sum);
    }
  }
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kExchangeSent);
  wait_exchange(&barriers[1]);
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kExchanged);
  // k = tid mod 4 in every pass (the stride is a multiple of 4): pre_base is this thread's.
  for (int i = tid; i < kStreams * T; i += projection_threads) {
    const int t = i / kStreams, k = i % kStreams;
    const float squares = sum_in_order<kCtas>(&collapse_in[0][0][t], kCtas, kCollapseRows * kTileTokens);
    const float mix = sum_in_order<kCtas>(&collapse_in[0][1 + k][t], kCtas, kCollapseRows * kTileTokens);
    pre_s[t][k] = sigmoid(mix * inverse_rms(squares, float(flat), args.norm_eps) * pre_scale + pre_base) +
                  args.hc_eps;
  }
  sync_projection_warps();
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kPreReady);

  // Collapse in registers: y = Σ_k pre_k·X_k (pre_0·x_0 first, then one multiply-add per stream).
  using OutputVectors = float4[kVectors];
  const auto collapse = [&](int t, const TokenVectors& x, OutputVectors& y) {
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      const float p0 = pre_s[t][0];
      float4 value = make_float4(p0 * x[v][0].x, p0 * x[v][0].y, p0 * x[v][0].z, p0 * x[v][0].w);
#pragma unroll
      for (int k = 1; k < kStreams; ++k) {
        const float pk = pre_s[t][k];
        value = make_float4(fmaf(pk, x[v][k].x, value.x), fmaf(pk, x[v][k].y, value.y),
                            fmaf(pk, x[v][k].z, value.z), fmaf(pk, x[v][k].w, value.w));
      }
      y[v] = args.round_to_bf16 ? round4_to_bf16(value) : value;
    }
  };
  OutputVectors y_lo = {}, y_hi = {};
  if (has_lo) collapse(g, x_lo, y_lo);
  if (has_hi) collapse(g + 8, x_hi, y_hi);
  if (args.norm_weight != nullptr) {
    // Exchange 2: Σy² of the slice per token (the thread's vectors in order, its quad, then the warps in order), to
    // every CTA; the totals in rank order.
    const auto token_squares = [](const OutputVectors& y) {
      float s = 0.0f;
#pragma unroll
      for (int v = 0; v < kVectors; ++v) {
        s = fmaf(y[v].x, y[v].x, s);
        s = fmaf(y[v].y, y[v].y, s);
        s = fmaf(y[v].z, y[v].z, s);
        s = fmaf(y[v].w, y[v].w, s);
      }
      s += __shfl_xor_sync(kFullMask, s, 1);
      return s + __shfl_xor_sync(kFullMask, s, 2);
    };
    const float sq_lo = token_squares(y_lo), sq_hi = token_squares(y_hi);
    if (t4 == 0) {
      warp_squares[warp][g] = sq_lo;
      warp_squares[warp][g + 8] = sq_hi;
    }
    sync_projection_warps();
    for (int i = tid; i < kCtas * T; i += projection_threads) {
      const int destination = i % kCtas, t = i / kCtas;
      send_to_cluster_cta(&squares_in[rank][t], &barriers[3], unsigned(destination),
                          sum_in_order<kSingleMaxWarps>(&warp_squares[0][t], warps, kTileTokens));
    }
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kNormSent);
    wait_exchange(&barriers[3]);
    DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kNormExchanged);
    // rms_norm's arithmetic: (y · inv_rms) · w, then the optional rounding.
    const auto normalise = [&](int t, OutputVectors& y) {
      const float squares = sum_in_order<kCtas>(&squares_in[0][t], kCtas, kTileTokens);
      const float inv_rms = inverse_rms(squares, float(d), args.norm_eps);
#pragma unroll
      for (int v = 0; v < kVectors; ++v) {
        const float4 w = norm_weight[v];
        const float4 value = make_float4(y[v].x * inv_rms * w.x, y[v].y * inv_rms * w.y, y[v].z * inv_rms * w.z,
                                         y[v].w * inv_rms * w.w);
        y[v] = args.norm_round_to_bf16 ? round4_to_bf16(value) : value;
      }
    };
    if (has_lo) normalise(g, y_lo);
    if (has_hi) normalise(g + 8, y_hi);
  }
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {
    const int dim = dim0 + kSingleWarpDims * v;
    if (has_lo) store_output(args.y, args.y_bf16, int64_t(g) * d + dim, y_lo[v]);
    if (has_hi) store_output(args.y, args.y_bf16, int64_t(g + 8) * d + dim, y_hi[v]);
  }
  DSV4_MHC_SINGLE_CLUSTER_MARK(SingleClusterPhase::kStored);
}

struct PostArgs {
  const float* out;
  const float* X;
  const float* post;
  const float* comb;
  int64_t tokens;
  int hidden;
  bool round_output;
  float* X_out;
};

// X_out[t][k][i] = post[t][k]·out[t][i] + Σ_j comb[t][j][k]·X[t][j][i]; one thread per 4 consecutive i of a token.
// Every X value a thread reads is read before it writes, and no other thread touches those positions, so X_out
// may be X itself. Programmatic dependent launch: everything it reads comes from earlier kernels.
static __global__ void __launch_bounds__(kPostThreads) hc_post_kernel(const PostArgs args) {
  allow_dependents();
  wait_for_prior_grids();
  const int vectors_per_token = args.hidden / 4;
  const int64_t v = int64_t(blockIdx.x) * kPostThreads + threadIdx.x;
  if (v >= args.tokens * vectors_per_token) return;
  const int64_t t = v / vectors_per_token;
  const int64_t hidden = args.hidden;
  const int i = int(v - t * vectors_per_token) * 4;
  const float4 o = *reinterpret_cast<const float4*>(args.out + t * hidden + i);
  float4 x[kStreams];
#pragma unroll
  for (int j = 0; j < kStreams; ++j)
    x[j] = *reinterpret_cast<const float4*>(args.X + (t * kStreams + j) * hidden + i);
  float mix[kMixFloats];
  load_mix(args.post, args.comb, t, mix);
#pragma unroll
  for (int k = 0; k < kStreams; ++k)
    *reinterpret_cast<float4*>(args.X_out + (t * kStreams + k) * hidden + i) =
        residual_update(k, o, x, mix, mix + kStreams, args.round_output);
}

}  // namespace dsv4::cuda::mhc
