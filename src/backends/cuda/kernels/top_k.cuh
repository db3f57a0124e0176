// Device code behind top_k.hpp (the contract and the method are there).
//
// NOTES:
// - Keys: the fp32 bits made order-preserving as unsigned (negative: all bits flipped; positive: sign bit set; −0
//   first made +0; NaN 0, below −inf), shifted up 32, with the inverted index below: descending keys = descending
//   scores, ties to the lower index, and no two keys equal, so the radix passes always end (at the latest when all 64
//   bits are fixed).
// - A CTA holds its range's order-preserving score bits in shared memory (the cache) when they fit: the passes and
//   the collect then read no global memory after the first load. Larger ranges (many queries, few CTAs each) are
//   streamed from global memory (L2) on every pass.
// - Pass p histograms digit p (widths 12, 10, 10 over the score bits, then 11, 11, 10 over the index) of the keys
//   that match the prefix fixed so far. The first digit is wide (sign, exponent and 3 mantissa bits) so that one
//   pass usually leaves a boundary bin of O(k) keys. Every CTA of a query adds its shared histogram into the pass's
//   own global histogram, meets the others at a barrier, and picks the same boundary bin from the sum.
// - The barrier counts arrivals on one word per query, monotonic within a launch (target participants · barriers),
//   so no reset is needed between passes; the query's last CTA to finish zeroes it, the used histograms and the list
//   count for the next launch. The CTAs are co-resident: the launcher caps the grid at the resident capacity, and
//   with programmatic launch a dependent grid starts only once every CTA of this one is running (allow_dependents at
//   entry).
// - Global histograms and the list are read with ld.global.cg (L2): other CTAs wrote them through L2 atomics and
//   stores, and this SM's L1 is not coherent with them.
// - The final CTA of a query (the last to finish, by ticket) sorts the listed keys (the chosen and the boundary bin's,
//   ≤ max(2k, kSmallSort)) with a bitonic sort whose strides below 64 run in registers (shuffles) and writes the
//   first k. When a split query's listed² / CTAs ≤ kRankComparesPerCta, its CTAs instead meet at one more barrier,
//   each loads the whole list and writes the keys of its slice at their ranks (keys are unique, so the ranks are a
//   permutation); the last to finish (ticket) resets the workspace. (Ranking inside one CTA was slower than its sort.)
#pragma once

#include <cstdint>
#include <cstdio>

#include "backends/cuda/kernels/top_k.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "backends/cuda/ptx/memory_order.cuh"

namespace dsv4::cuda::topk {

inline constexpr int kThreads = 512;
inline constexpr int kWarps = kThreads / 32;
inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr int kFirstDigitBins = 1 << 12;
inline constexpr int kListCapacity = 2 * kTopKMax;  // ≥ max(2k, kSmallSort): the final sort's keys
inline constexpr int kSmallSort = 2048;
inline constexpr int kCachedKeys = 16384;  // a CTA's range cached in shared memory up to this many scores
inline constexpr int kStreamUnroll = 4;    // scores loaded per thread before use when streaming
inline constexpr int kCacheUnroll = 8;     // the same for the first load into the cache
inline constexpr int64_t kMinCandidatesPerCta = 2048;
// A split query's listed keys are placed by rank (listed² comparisons over its CTAs) instead of sorted by one CTA
// when each CTA's share is at most this many comparisons (H200: 262,144 candidates, 128 CTAs, ~1500 listed: ranking
// 0.9 µs where the one-CTA bitonic sort took 11.8 µs).
inline constexpr uint64_t kRankComparesPerCta = uint64_t(1) << 17;

struct Digit {
  int bits;    // width of the pass's digit
  int offset;  // of its histogram in QueryWorkspace::histogram
};

// Digits of the 64-bit key, most significant first (see NOTES): widths 12, 10, 10, 11, 11, 10 (sum 64), and the
// offset of each pass's histogram (the sum of the earlier ones' bins). Conditionals rather than a table: a table
// indexed by the run-time pass would live in local memory.
__host__ __device__ constexpr Digit digit_of_pass(int pass) {
  const int bits = pass == 0 ? 12 : pass <= 2 ? 10 : pass <= 4 ? 11 : pass == 5 ? 10 : 0;
  const int offset = pass == 0   ? 0
                     : pass <= 3 ? 4096 + 1024 * (pass - 1)
                     : pass <= 5 ? 6144 + 2048 * (pass - 3)
                                 : 11264;
  return Digit{bits, offset};
}
inline constexpr int kPasses = 6;
inline constexpr int kHistogramWords = digit_of_pass(kPasses).offset;

constexpr bool digits_tile_the_key() {
  int bits = 0, offset = 0;
  for (int pass = 0; pass < kPasses; ++pass) {
    if (digit_of_pass(pass).offset != offset || (1 << digit_of_pass(pass).bits) < kThreads) return false;
    bits += digit_of_pass(pass).bits;
    offset += 1 << digit_of_pass(pass).bits;
  }
  return bits == 64 && offset == kHistogramWords && (1 << digit_of_pass(0).bits) == kFirstDigitBins;
}
static_assert(digits_tile_the_key(), "the passes' digits must cover the 64-bit key, each with ≥ kThreads bins");

// What one query's CTAs share in global memory when it is split over several.
struct QueryWorkspace {
  uint32_t histogram[kHistogramWords];  // one per pass, each zero outside a launch
  uint32_t list_count;                  // keys appended to `list`
  uint32_t finished_ctas;               // the ticket that elects the final CTA
  uint32_t barrier_arrivals;            // monotonic within a launch
  uint32_t padding;
  uint64_t list[kListCapacity];         // the chosen keys and the boundary bin's, unordered
};

struct TopKArgs {
  const float* scores;
  int64_t row_stride;
  int64_t candidates;
  int k;
  const int64_t* positions;
  int64_t ratio;
  int32_t* selected;
  int32_t* counts;
  int32_t* nan_flag;
  QueryWorkspace* workspace;  // split mode only
  int ctas_per_query;
  int64_t* trace;             // TopKParams::trace
};

// The kernel's arguments for `params` over `ctas` CTAs per query, after checking the split's workspace (top_k.cu):
// run_top_k's launch and the indexer's fused scores + top-k share them.
TopKArgs kernel_args(const TopKParams& params, int ctas);

// Shared memory: the CTA's histogram, the score cache, the sort buffer (also the list when it stays in the CTA).
inline constexpr size_t kSmemBytes =
    kFirstDigitBins * sizeof(uint32_t) + kCachedKeys * sizeof(uint32_t) + kListCapacity * sizeof(uint64_t);

__device__ __forceinline__ uint32_t ordered_score(float x) {
  if (isnan(x)) return 0;
  uint32_t bits = __float_as_uint(x);
  if (x == 0.0f) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ uint64_t make_key(uint32_t ordered, int64_t index) {
  return (uint64_t(ordered) << 32) | uint32_t(~uint32_t(index));
}

// x[u] = row[begin + i] for the thread's i = base + u·kThreads + threadIdx.x (0 past n): kUnroll loads in flight.
template <int kUnroll>
__device__ __forceinline__ void load_scores(float (&x)[kUnroll], const float* row, int64_t begin, int64_t base,
                                            int64_t n) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = base + u * kThreads + threadIdx.x;
    x[u] = i < n ? row[begin + i] : 0.0f;
  }
}

__device__ __forceinline__ uint64_t global_nanoseconds() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A barrier still open after this long means the query's CTAs are not all resident (a broken launch bound): the
// kernel traps (a launch error) instead of hanging the device.
inline constexpr uint64_t kBarrierTimeoutNs = 2'000'000'000;

// All `participants` CTAs of one query wait here until each has arrived `target / participants` times.
__device__ __forceinline__ void query_barrier(uint32_t* arrivals, uint32_t target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrivals, 1u);
    const uint64_t start = global_nanoseconds();
    while (load_acquire(arrivals) < target) {
      if (global_nanoseconds() - start > kBarrierTimeoutNs) {
        printf("top_k: CTA %d waited 2 s at a barrier (%u of %u arrivals): CTAs not co-resident\n", int(blockIdx.x),
               load_acquire(arrivals), target);
        __trap();
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Exclusive prefix sum of `value` over the CTA's threads (in thread order); `scratch` holds kWarps words.
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t value, uint32_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  uint32_t warp_offset = 0;
  for (int w = 0; w < warp; ++w) warp_offset += scratch[w];
  __syncthreads();
  return warp_offset + inclusive - value;
}

struct BoundaryBin {
  uint32_t bin;    // the digit of the remaining-th largest key
  uint32_t above;  // keys in higher bins
  uint32_t size;   // keys in the bin
};

// The bin holding the remaining-th largest key of the histogram (counted from the top bin down); `global`: the
// histogram is another CTA's writing, read through L2.
__device__ inline BoundaryBin choose_boundary_bin(const uint32_t* histogram, bool global, int bins,
                                                  uint32_t remaining) {
  constexpr int kMaxPerThread = kFirstDigitBins / kThreads;
  __shared__ uint32_t scratch[kWarps];
  __shared__ BoundaryBin result;
  const int per_thread = bins / kThreads;  // every digit has ≥ kThreads bins
  const int top = bins - threadIdx.x * per_thread;
  uint32_t counts[kMaxPerThread];
  uint32_t local = 0;
#pragma unroll
  for (int j = 0; j < kMaxPerThread; ++j) {
    counts[j] = j < per_thread ? (global ? __ldcg(histogram + top - 1 - j) : histogram[top - 1 - j]) : 0u;
    local += counts[j];
  }
  const uint32_t before = block_exclusive_sum(local, scratch);
  if (before < remaining && remaining <= before + local) {
    uint32_t running = before;
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      if (j < per_thread && running < remaining && remaining <= running + counts[j])
        result = BoundaryBin{uint32_t(top - 1 - j), running, counts[j]};
      running += counts[j];
    }
  }
  __syncthreads();
  const BoundaryBin chosen = result;
  __syncthreads();
  return chosen;
}

// Appends `key` to list[] where `take`, one atomic per warp (the counter may be shared by every CTA of the query).
// All lanes of the warp call it together.
__device__ __forceinline__ void append_warp_aggregated(bool take, uint64_t key, uint32_t* count, uint64_t* list) {
  const unsigned takers = __ballot_sync(kFullMask, take);
  if (takers == 0) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(takers) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(count, uint32_t(__popc(takers)));
  base = __shfl_sync(kFullMask, base, leader);
  if (take) list[base + __popc(takers & ((1u << lane) - 1u))] = key;
}

// One compare-exchange of the bitonic network for the key of `element`, its partner element ^ stride in lane ^ stride
// (stride < 32): the lower element of a pair keeps the larger key in a descending block (element & size == 0).
__device__ __forceinline__ uint64_t exchange_across_lanes(uint64_t key, int element, int stride, int size) {
  const uint64_t partner = __shfl_xor_sync(kFullMask, key, stride);
  const bool keep_larger = ((element & stride) == 0) == ((element & size) == 0);
  return keep_larger ? max(key, partner) : min(key, partner);
}

// The network's stages of block size `size` from stride `first_stride` (≤ 32) down to 1 on one 64-key chunk: lane l
// holds elements e = chunk·64 + l (in a) and e + 32 (in b), so stride 32 stays within the thread.
__device__ __forceinline__ void chunk_stages(uint64_t& a, uint64_t& b, int element, int size, int first_stride) {
#pragma unroll
  for (int stride = 32; stride > 0; stride /= 2) {
    if (stride > first_stride) continue;
    if (stride == 32) {
      const bool descending = (element & size) == 0;
      const uint64_t larger = max(a, b), smaller = min(a, b);
      a = descending ? larger : smaller;
      b = descending ? smaller : larger;
    } else {
      a = exchange_across_lanes(a, element, stride, size);
      b = exchange_across_lanes(b, element + 32, stride, size);
    }
  }
}

// Descending bitonic sort of keys[0, n), n a power of two ≥ 64, by a CTA of kSortThreads threads (the top-k's, or
// the indexer's score kernels' when they select). Strides ≥ 64 go through shared memory (one barrier each); the
// smaller ones run in registers on 64-key chunks, one warp per chunk.
template <int kSortThreads = kThreads>
__device__ inline void bitonic_sort_descending(uint64_t* keys, int n) {
  constexpr int kSortWarps = kSortThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunks = n / 64;
  for (int c = warp; c < chunks; c += kSortWarps) {
    const int element = 64 * c + lane;
    uint64_t a = keys[element], b = keys[element + 32];
#pragma unroll
    for (int size = 2; size <= 64; size *= 2) chunk_stages(a, b, element, size, size / 2);
    keys[element] = a;
    keys[element + 32] = b;
  }
  __syncthreads();
  for (int size = 128; size <= n; size *= 2) {
    for (int stride = size / 2; stride >= 64; stride /= 2) {
      for (int i = threadIdx.x; i < n / 2; i += kSortThreads) {
        const int lo = 2 * i - (i & (stride - 1));  // 2·stride·(i div stride) + i mod stride (stride a power of 2)
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t x = keys[lo], y = keys[hi];
        if ((x < y) == descending) {
          keys[lo] = y;
          keys[hi] = x;
        }
      }
      __syncthreads();
    }
    for (int c = warp; c < chunks; c += kSortWarps) {
      const int element = 64 * c + lane;
      uint64_t a = keys[element], b = keys[element + 32];
      chunk_stages(a, b, element, size, 32);
      keys[element] = a;
      keys[element + 32] = b;
    }
    __syncthreads();
  }
}

// Where a CTA's scores come from: the scores array (run_top_k), or the CTA computes them itself (the indexer's fused
// scores + top-k, indexer.cuh). fill() runs after the dependency wait with every thread of the CTA: it leaves the
// ordered scores of [begin, begin + n) in `cache` when `cached`, else in the global row (which the passes stream);
// `scratch` is the sort buffer's shared memory (kListCapacity keys), free until the collect.
struct StoredScores {
  static constexpr int kMinCtasPerSm = 2;
  __device__ __forceinline__ void fill(const float* row, int64_t /*query*/, int64_t begin, int64_t n, bool cached,
                                       uint32_t* cache, unsigned char* /*scratch*/) const {
    if (!cached) return;
    for (int64_t base = 0; base < n; base += kCacheUnroll * kThreads) {
      float x[kCacheUnroll];
      load_scores(x, row, begin, base, n);
#pragma unroll
      for (int u = 0; u < kCacheUnroll; ++u) {
        const int64_t i = base + u * kThreads + threadIdx.x;
        if (i < n) cache[i] = ordered_score(x[u]);
      }
    }
  }
};

template <class Source>
struct TopKLaunch {
  TopKArgs top;
  Source source;
};

template <bool kSplit, class Source>
__global__ void __launch_bounds__(kThreads, Source::kMinCtasPerSm) top_k_kernel(TopKLaunch<Source> launch) {
  const TopKArgs& args = launch.top;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* local_histogram = reinterpret_cast<uint32_t*>(smem_raw);
  uint32_t* cache = local_histogram + kFirstDigitBins;
  uint64_t* sort_keys = reinterpret_cast<uint64_t*>(cache + kCachedKeys);
  __shared__ uint32_t local_list_count;
  __shared__ bool is_final_cta;

  // Nothing here reads a weight: every input (scores, positions) is an earlier kernel's output.
  const auto trace = [&](TopKTracePoint point) {
    if (args.trace != nullptr && threadIdx.x == 0)
      args.trace[int64_t(blockIdx.x) * kTopKTracePoints + point] = clock64();
  };
  trace(kTraceEntry);
  allow_dependents();
  wait_for_prior_grids();
  trace(kTraceInputsReady);

  const int ctas = kSplit ? args.ctas_per_query : 1;
  const int64_t query = blockIdx.x / ctas;
  const int part = int(blockIdx.x % ctas);
  const int k = args.k;
  if (k == 0) {
    if (part == 0 && threadIdx.x == 0) args.counts[query] = 0;
    return;
  }
  const int64_t visible =
      args.positions == nullptr ? args.candidates
                                : max(int64_t(0), min(args.candidates, (args.positions[query] + 1) / args.ratio));
  // The CTAs that share the visible keys (≥ kMinCandidatesPerCta each); the rest of the query's CTAs leave at once,
  // so a short context costs one CTA and no barrier even when the grid was sized for the longest.
  const int participants =
      kSplit ? int(min(int64_t(ctas), max(int64_t(1), (visible + kMinCandidatesPerCta - 1) / kMinCandidatesPerCta)))
             : 1;
  if (part >= participants) return;
  const bool shared_list = participants == 1;  // the list stays in this CTA's shared memory
  QueryWorkspace* ws = kSplit ? args.workspace + query : nullptr;
  if (threadIdx.x == 0) local_list_count = 0;

  const float* row = args.scores + query * args.row_stride;
  const int64_t per_cta = (visible + participants - 1) / participants;
  const int64_t begin = min(visible, int64_t(part) * per_cta);
  const int64_t n = min(visible, begin + per_cta) - begin;
  const bool cached = n <= kCachedKeys;
  launch.source.fill(row, query, begin, n, cached, cache, reinterpret_cast<unsigned char*>(sort_keys));
  __syncthreads();
  trace(kTraceCached);

  // Calls visit(valid, key) for every key of this CTA's range, from the cache or streamed kStreamUnroll loads in
  // flight per thread; every thread makes the same number of calls (valid false past the end), so warp-collective
  // visitors see all lanes.
  auto scan_keys = [&](auto&& visit) {
    if (cached) {
      for (int64_t base = 0; base < n; base += kThreads) {
        const int64_t i = base + threadIdx.x;
        const bool valid = i < n;
        visit(valid, valid ? make_key(cache[i], begin + i) : 0);
      }
      return;
    }
    for (int64_t base = 0; base < n; base += kStreamUnroll * kThreads) {
      float x[kStreamUnroll];
      load_scores(x, row, begin, base, n);
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int64_t i = base + u * kThreads + threadIdx.x;
        visit(i < n, make_key(ordered_score(x[u]), begin + i));
      }
    }
  };

  // Radix passes until the chosen keys and the boundary bin's fit a small final sort (its cost grows as n log² n);
  // none when every visible key fits it (a short context: the sort of them all is cheaper than a pass, whose
  // histogram, barriers and bin choice cost ≈ 4 µs at 1024 keys on an H200).
  const uint32_t sort_target = uint32_t(min(kListCapacity, max(2 * k, kSmallSort)));
  uint64_t prefix = 0;
  int consumed = 0;  // key bits fixed by the passes so far
  int passes = 0;
  uint32_t listed = uint32_t(visible);  // keys the collect appends (all of them without a pass)
  if (visible > sort_target) {
    uint32_t remaining = uint32_t(k);
    for (;;) {
      const Digit digit = digit_of_pass(passes);
      const int bins = 1 << digit.bits;
      const int shift = 64 - consumed - digit.bits;
      for (int b = threadIdx.x; b < bins; b += kThreads) local_histogram[b] = 0;
      __syncthreads();
      scan_keys([&](bool valid, uint64_t key) {
        if (valid && (consumed == 0 || (key >> (64 - consumed)) == prefix))
          atomicAdd(&local_histogram[uint32_t(key >> shift) & uint32_t(bins - 1)], 1u);
      });
      __syncthreads();
      if (passes == 0) trace(kTraceHistogram);
      const uint32_t* histogram = local_histogram;
      if (!shared_list) {
        uint32_t* global_histogram = ws->histogram + digit.offset;
        for (int b = threadIdx.x; b < bins; b += kThreads)
          if (local_histogram[b] != 0) atomicAdd(&global_histogram[b], local_histogram[b]);
        if (passes == 0) trace(kTraceFlushed);
        query_barrier(&ws->barrier_arrivals, uint32_t(participants * (passes + 1)));
        if (passes == 0) trace(kTraceBarrier);
        histogram = global_histogram;
      }
      const BoundaryBin boundary = choose_boundary_bin(histogram, !shared_list, bins, remaining);
      prefix = (prefix << digit.bits) | boundary.bin;
      consumed += digit.bits;
      remaining -= boundary.above;
      ++passes;
      listed = uint32_t(k) - remaining + boundary.size;
      if (listed <= sort_target) break;
    }
  }
  trace(kTracePassesDone);

  // Collect: keys above the prefix (chosen) and in the boundary bin, for the final sort.
  uint32_t* list_count = shared_list ? &local_list_count : &ws->list_count;
  uint64_t* list = shared_list ? sort_keys : ws->list;
  bool saw_nan = false;
  scan_keys([&](bool valid, uint64_t key) {
    saw_nan |= valid && (key >> 32) == 0;
    const uint64_t top = consumed == 0 ? 0 : consumed == 64 ? key : key >> (64 - consumed);
    append_warp_aggregated(valid && top >= prefix, key, list_count, list);
  });
  if (__syncthreads_or(saw_nan) && threadIdx.x == 0 && args.nan_flag != nullptr) atomicExch(args.nan_flag, 1);
  trace(kTraceCollected);

  // Leaves the workspace zeroed for the next launch; only once every other CTA of the query is done with it.
  const auto reset_workspace = [&] {
    for (int i = threadIdx.x; i < digit_of_pass(passes).offset; i += kThreads) ws->histogram[i] = 0;
    if (threadIdx.x == 0) {
      ws->list_count = 0;
      ws->finished_ctas = 0;
      ws->barrier_arrivals = 0;
    }
  };
  const int count = int(min(int64_t(k), visible));
  int32_t* out = args.selected + query * k;

  if (!shared_list && uint64_t(listed) * listed <= kRankComparesPerCta * uint64_t(participants)) {
    query_barrier(&ws->barrier_arrivals, uint32_t(participants * (passes + 1)));
    trace(kTraceFinal);
    for (int i = threadIdx.x; i < int(listed); i += kThreads) sort_keys[i] = __ldcg(ws->list + i);
    __syncthreads();
    trace(kTraceListLoaded);
    // This CTA's slice of the list, one key per warp at a time: its rank is the count of larger listed keys.
    const int lane = threadIdx.x & 31;
    const uint32_t share = (listed + participants - 1) / participants;
    const uint32_t first = min(listed, part * share), last = min(listed, first + share);
    for (uint32_t j = first + (threadIdx.x >> 5); j < last; j += kWarps) {
      const uint64_t key = sort_keys[j];
      uint32_t larger = 0;
#pragma unroll 8  // 8 shared-memory loads in flight (rolled, the loop waited on each load)
      for (uint32_t i = lane; i < listed; i += 32) larger += sort_keys[i] > key ? 1u : 0u;
      larger = __reduce_add_sync(kFullMask, larger);
      if (lane == 0 && larger < uint32_t(count)) out[larger] = int32_t(~uint32_t(key));
    }
    trace(kTraceSorted);
    if (part == 0) {
      for (int i = count + threadIdx.x; i < k; i += kThreads) out[i] = -1;
      if (threadIdx.x == 0) args.counts[query] = count;
    }
    trace(kTraceWritten);
    __syncthreads();
    if (threadIdx.x == 0) is_final_cta = atomicAdd(&ws->finished_ctas, 1u) == uint32_t(participants - 1);
    __syncthreads();
    if (is_final_cta) reset_workspace();
    return;
  }

  if (!shared_list) {
    if (threadIdx.x == 0) {
      __threadfence();
      is_final_cta = atomicAdd(&ws->finished_ctas, 1u) == uint32_t(participants - 1);
    }
    __syncthreads();
    if (!is_final_cta) return;
    __threadfence();
  }
  trace(kTraceFinal);

  const int appended = int(shared_list ? local_list_count : __ldcg(&ws->list_count));  // = listed
  int padded = 64;
  while (padded < appended) padded *= 2;
  for (int i = threadIdx.x; i < padded; i += kThreads) {
    // 0 is below every real key (whose low word, an inverted index < 2^31, has its top bit set).
    uint64_t key = 0;
    if (i < appended) key = shared_list ? sort_keys[i] : __ldcg(ws->list + i);
    sort_keys[i] = key;
  }
  __syncthreads();
  trace(kTraceListLoaded);
  bitonic_sort_descending(sort_keys, padded);
  trace(kTraceSorted);
  for (int i = threadIdx.x; i < k; i += kThreads) out[i] = i < count ? int32_t(~uint32_t(sort_keys[i])) : -1;
  if (threadIdx.x == 0) args.counts[query] = count;
  trace(kTraceWritten);
  if (!shared_list) reset_workspace();
}

}  // namespace dsv4::cuda::topk

