// Device code behind top_k.hpp (the contract and the method are there).
//
// NOTES:
// - Keys: the fp32 bits made order-preserving as unsigned (negative: all bits flipped; positive: sign bit set; −0
//   first made +0), shifted up 32, with the inverted index below: descending keys = descending scores, ties to the
//   lower index, and no two keys equal, so the radix passes always end (at the latest when all 64 bits are fixed).
// - Pass p histograms digit p (11 bits, the last 9) of the keys that match the prefix fixed so far; every CTA of the
//   query then picks the same boundary bin from the summed histogram. Histograms rotate over three buffers: buffer
//   (p+1) mod 3 is zeroed during pass p, after every CTA has read it (pass p−2) and before anyone adds to it (p+1).
// - Global histograms and lists are read with ld.global.cg (L2): other CTAs wrote them through L2 atomics and
//   stores, and this SM's L1 may hold an older copy from an earlier pass.
// - The final CTA of a query (the last to finish, by ticket) sorts the chosen keys and the boundary bin's keys
//   together (≤ max(2k, kSmallSort) ≤ kSortCapacity) with a shared-memory bitonic sort and writes the first k.
#pragma once

#include <cstdint>

#include "backends/cuda/kernels/top_k.hpp"

namespace dsv4::cuda::topk {

inline constexpr int kThreads = 512;
inline constexpr int kDigitBits = 11;
inline constexpr int kBins = 1 << kDigitBits;
inline constexpr int kSortCapacity = 8192;  // ≥ 2 · kTopKMax
inline constexpr int kSmallSort = 2048;
inline constexpr int kScanUnroll = 4;  // scores loaded per thread before use: loads in flight, not one at a time
inline constexpr int64_t kMinCandidatesPerCta = 4096;

// What one query's CTAs share (global memory when split over CTAs, shared memory with one CTA per query).
struct QueryWorkspace {
  uint32_t histogram[3][kBins];
  uint32_t chosen_count;        // keys above the boundary prefix
  uint32_t boundary_count;      // keys in the boundary bin
  uint32_t finished_ctas;       // the ticket that elects the final CTA
  uint32_t barrier_arrived;
  uint32_t barrier_generation;  // only ever increases
  uint32_t padding[3];
  uint64_t chosen[kTopKMax];
  uint64_t boundary[kSortCapacity];
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
};

// Shared memory: the sort buffer, the CTA's own histogram (split mode), the query workspace (single mode).
inline constexpr size_t kSplitSmemBytes = kSortCapacity * sizeof(uint64_t) + kBins * sizeof(uint32_t);
inline constexpr size_t kSingleSmemBytes = kSplitSmemBytes + sizeof(QueryWorkspace);

__device__ __forceinline__ uint64_t sort_key(float x, uint32_t index) {
  uint32_t bits = __float_as_uint(x);
  if (x == 0.0f) bits = 0;
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(ordered) << 32) | uint32_t(~index);
}

template <class T>
__device__ __forceinline__ T load_l2(const T* p) {
  return __ldcg(p);
}

// All CTAs of one query wait here (they are co-resident: cooperative launch).
__device__ __forceinline__ void query_barrier(QueryWorkspace* ws, int participants) {
  __syncthreads();
  if (participants > 1 && threadIdx.x == 0) {
    volatile uint32_t* generation = &ws->barrier_generation;
    const uint32_t seen = *generation;
    __threadfence();
    if (atomicAdd(&ws->barrier_arrived, 1u) == uint32_t(participants - 1)) {
      atomicExch(&ws->barrier_arrived, 0u);
      __threadfence();
      atomicAdd(&ws->barrier_generation, 1u);
    } else {
      while (*generation == seen) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

// Exclusive prefix sum of `value` over the CTA's threads (in thread order); `scratch` holds kThreads / 32 words.
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t value, uint32_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t other = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
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

// The bin holding the remaining-th largest key of the histogram (counted from the top bin down).
__device__ BoundaryBin choose_boundary_bin(const uint32_t* histogram, bool global, int bins, uint32_t remaining) {
  __shared__ uint32_t scratch[kThreads / 32];
  __shared__ BoundaryBin result;
  const int per_thread = bins / kThreads;  // 4 for 11-bit digits, 1 for the last 9-bit digit
  const int top = bins - threadIdx.x * per_thread;
  uint32_t counts[kBins / kThreads];
  uint32_t local = 0;
#pragma unroll
  for (int j = 0; j < kBins / kThreads; ++j) {
    counts[j] = j < per_thread ? (global ? load_l2(histogram + top - 1 - j) : histogram[top - 1 - j]) : 0u;
    local += counts[j];
  }
  const uint32_t before = block_exclusive_sum(local, scratch);
  if (before < remaining && remaining <= before + local) {
    uint32_t running = before;
#pragma unroll
    for (int j = 0; j < kBins / kThreads; ++j) {
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

// Appends `key` to list[] where `take`, one atomic per warp: the counter is shared by every CTA of the query, and
// one atomic per key would serialise on its address.
__device__ __forceinline__ void append_warp_aggregated(bool take, uint64_t key, uint32_t* count, uint64_t* list) {
  const unsigned active = __activemask();
  const unsigned takers = __ballot_sync(active, take);
  if (takers == 0) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(takers) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(count, uint32_t(__popc(takers)));
  base = __shfl_sync(active, base, leader);
  if (take) list[base + __popc(takers & ((1u << lane) - 1u))] = key;
}

// Descending bitonic sort of keys[0, n), n a power of two.
__device__ void bitonic_sort_descending(uint64_t* keys, int n) {
  for (int size = 2; size <= n; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < n / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));  // 2·stride·(i div stride) + i mod stride (stride a power of 2)
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == descending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// The kScanUnroll scores a thread handles from `base` (CTA-strided), all loads issued before any is used; 0 past
// the end of the row.
__device__ __forceinline__ void load_score_batch(const float* row, int64_t base, int64_t end,
                                                 float (&x)[kScanUnroll]) {
#pragma unroll
  for (int u = 0; u < kScanUnroll; ++u) {
    const int64_t i = base + u * kThreads;
    x[u] = i < end ? row[i] : 0.0f;
  }
}

template <bool kSplit>
__global__ void __launch_bounds__(kThreads) top_k_kernel(TopKArgs args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint64_t* sort_keys = reinterpret_cast<uint64_t*>(smem_raw);
  uint32_t* local_histogram = reinterpret_cast<uint32_t*>(sort_keys + kSortCapacity);
  __shared__ bool is_final_cta;

  const int ctas = kSplit ? args.ctas_per_query : 1;
  const int64_t query = blockIdx.x / ctas;
  const int part = blockIdx.x % ctas;
  if (args.k == 0) {
    if (part == 0 && threadIdx.x == 0) args.counts[query] = 0;
    return;
  }
  QueryWorkspace* ws = kSplit ? args.workspace + query : reinterpret_cast<QueryWorkspace*>(local_histogram + kBins);
  if (!kSplit) {
    auto* words = reinterpret_cast<uint32_t*>(ws);
    for (int i = threadIdx.x; i < int(offsetof(QueryWorkspace, chosen) / 4); i += kThreads) words[i] = 0;
    __syncthreads();
  }

  const int64_t visible =
      args.positions == nullptr ? args.candidates
                                : max(int64_t(0), min(args.candidates, (args.positions[query] + 1) / args.ratio));
  const int k = args.k;
  const float* row = args.scores + query * args.row_stride;
  const int64_t per_cta = (visible + ctas - 1) / ctas;
  const int64_t begin = part * per_cta;
  const int64_t end = min(visible, begin + per_cta);
  // Passes go on until the chosen and the boundary keys together fit a small final sort (its cost grows as
  // n log² n); the last pass fixes all 64 bits, leaving one boundary key.
  const uint32_t sort_target = uint32_t(min(kSortCapacity, max(2 * k, kSmallSort)));

  // Calls visit(in_range, x, key) for each score of this CTA's range with its sort key, kScanUnroll loads in flight
  // per thread; slots past the end are visited too (in_range false) so that warp-collective visitors see every lane.
  auto scan_scores = [&](auto&& visit) {
    for (int64_t base = begin + threadIdx.x; base < end; base += kScanUnroll * kThreads) {
      float x[kScanUnroll];
      load_score_batch(row, base, end, x);
#pragma unroll
      for (int u = 0; u < kScanUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        visit(i < end, x[u], sort_key(x[u], uint32_t(i)));
      }
    }
  };

  uint64_t prefix = 0;
  int consumed = 0;  // key bits fixed by the passes so far
  if (visible > k) {
    uint32_t remaining = uint32_t(k);
    for (int pass = 0;; ++pass) {
      const int shift = max(0, 64 - kDigitBits * (pass + 1));
      const int width = 64 - consumed - shift;
      uint32_t* histogram = ws->histogram[pass % 3];
      uint32_t* target = kSplit ? local_histogram : histogram;
      if (kSplit) {
        for (int b = threadIdx.x; b < kBins; b += kThreads) local_histogram[b] = 0;
        if (pass >= 2 && part == 0)
          for (int b = threadIdx.x; b < kBins; b += kThreads) ws->histogram[(pass + 1) % 3][b] = 0;
      } else if (pass >= 2) {
        for (int b = threadIdx.x; b < kBins; b += kThreads) ws->histogram[(pass + 1) % 3][b] = 0;
      }
      __syncthreads();
      const uint32_t digit_mask = (1u << width) - 1u;
      scan_scores([&](bool in_range, float, uint64_t key) {
        if (in_range && (consumed == 0 || (key >> (64 - consumed)) == prefix))
          atomicAdd(&target[uint32_t(key >> shift) & digit_mask], 1u);
      });
      if (kSplit) {
        __syncthreads();
        for (int b = threadIdx.x; b < (1 << width); b += kThreads)
          if (local_histogram[b] != 0) atomicAdd(&histogram[b], local_histogram[b]);
      }
      query_barrier(ws, ctas);
      const BoundaryBin boundary = choose_boundary_bin(histogram, kSplit, 1 << width, remaining);
      prefix = (prefix << width) | boundary.bin;
      consumed += width;
      remaining -= boundary.above;
      if (uint32_t(k) - remaining + boundary.size <= sort_target) break;
    }
  }

  // Collect: keys above the prefix are chosen; keys in the boundary bin wait for the final sort.
  bool saw_nan = false;
  scan_scores([&](bool in_range, float x, uint64_t key) {
    saw_nan |= in_range && isnan(x);
    const uint64_t top = consumed == 0 ? 1 : key >> (64 - consumed);
    const uint64_t fixed = consumed == 0 ? 0 : prefix;
    append_warp_aggregated(in_range && top > fixed, key, &ws->chosen_count, ws->chosen);
    append_warp_aggregated(in_range && top == fixed, key, &ws->boundary_count, ws->boundary);
  });
  if (saw_nan && args.nan_flag != nullptr) atomicExch(args.nan_flag, 1);

  __syncthreads();
  if (kSplit) {
    if (threadIdx.x == 0) {
      __threadfence();
      is_final_cta = atomicAdd(&ws->finished_ctas, 1u) == uint32_t(ctas - 1);
    }
    __syncthreads();
    if (!is_final_cta) return;
    __threadfence();
  }

  const uint32_t chosen = kSplit ? load_l2(&ws->chosen_count) : ws->chosen_count;
  const uint32_t in_boundary = kSplit ? load_l2(&ws->boundary_count) : ws->boundary_count;
  const int n = int(chosen + in_boundary);
  int padded = 2;
  while (padded < n) padded *= 2;
  for (int i = threadIdx.x; i < padded; i += kThreads) {
    uint64_t key = 0;  // below every real key (its score bits would be a NaN pattern with index 2^32 − 1)
    if (i < int(chosen)) key = kSplit ? load_l2(ws->chosen + i) : ws->chosen[i];
    else if (i < n) key = kSplit ? load_l2(ws->boundary + (i - chosen)) : ws->boundary[i - chosen];
    sort_keys[i] = key;
  }
  __syncthreads();
  bitonic_sort_descending(sort_keys, padded);
  const int count = int(min(int64_t(k), visible));
  int32_t* out = args.selected + query * k;
  for (int i = threadIdx.x; i < k; i += kThreads) out[i] = i < count ? int32_t(~uint32_t(sort_keys[i])) : -1;
  if (threadIdx.x == 0) args.counts[query] = count;

  if (kSplit) {
    // Leave the workspace zeroed for the next launch (every other CTA of the query is done with it).
    for (int i = threadIdx.x; i < 3 * kBins; i += kThreads) (&ws->histogram[0][0])[i] = 0;
    if (threadIdx.x == 0) {
      ws->chosen_count = 0;
      ws->boundary_count = 0;
      ws->finished_ctas = 0;
    }
  }
}

}  // namespace dsv4::cuda::topk
