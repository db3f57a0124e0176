// Device code of the sampler (sampling.hpp). One cluster of 8 or 16 CTAs per row; CTA `rank` holds the row's
// tokens [rank * slice, (rank + 1) * slice) in shared memory, first as logits, then as weights in place.
//
// Phases (every CTA of a cluster takes the same branches: they decide on the same exchanged values):
//   A. load the slice, note NaN / +inf, apply the row's adjustments, max (value, then lowest id) -> exchange.
//      Bad row, all -inf or temperature 0: the result is known.
//   B. weights in place.
//   C. top_k, then top_p: radix selection over the weights' bits (< 2^30 for weights in [0, 1]) in three 10-bit digits,
//      most significant first; each pass builds a histogram of counts and integer masses of the tokens that match
//      the digits chosen so far, sums it over the cluster, and scans it from the top bin for the bin holding the k-th
//      token (top_k) or the nucleus mass (top_p). The result is a cut in rank order: weight bits > cut, or equal and
//      among the first `keep` such tokens by id. When the cut splits equal weights, the CTAs count theirs to find
//      the last surviving id.
//   D. draw: survivors' masses summed per CTA -> exchange -> the CTA where the running mass crosses the target finds
//      the token (per-warp sums, then one warp's scan).
// NOTES: histogram masses are kept as two 32-bit words (shared-memory 64-bit atomic adds compile to a CAS loop);
// a thread adds a run of equal bins once, which keeps the atomics few on flat distributions (one hot bin).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/kernels/sampling.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/sampling_math.hpp"

namespace dsv4::cuda::sampling_detail {

namespace cg = cooperative_groups;

constexpr int kClusterCtas = 8;        // portable cluster size: any row count
constexpr int kWideClusterCtas = 16;   // few rows: twice the SMs per row, where the GPU schedules such clusters
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 10;
constexpr int kBins = 1 << kDigitBits;
constexpr int kDigits = 3;  // 30 bits: weights in [0, 1] have bits <= 0x3F800000 < 2^30
constexpr int kMaxSharedBytes = 227 * 1024;
constexpr uint32_t kNoCut = 0;          // cut bits 0: every positive weight survives
constexpr uint64_t kAllTies = ~uint64_t(0);
static_assert(kBins == kThreads, "the bin scans give each thread one bin");
static_assert(kDigits * kDigitBits == 30, "three digits cover the weight bits");

struct Histogram {
  uint32_t count[kBins];
  uint32_t mass_low[kBins];  // the 64-bit mass sum as two words (see NOTES)
  uint32_t mass_high[kBins];
};

// What a CTA publishes to the others; one field per phase, each written once, so no phase overwrites a value that
// another CTA may still be reading.
struct CtaSummary {
  unsigned long long max_key;
  int32_t bad_token;
  uint32_t ties;
  uint64_t survivor_mass;
};

struct SharedPlan {
  Histogram histogram[2];  // alternate passes use alternate buffers: one cluster barrier per pass suffices
  CtaSummary summary;
  uint64_t scratch_a[kWarps];
  uint64_t scratch_b[kWarps];
  uint64_t warp_sums[kWarps];  // warp_range_sums' results, which locate() reads
  unsigned long long cluster_key;
  int32_t cluster_bad;
  // The bin a radix pass selected, and the running sums above it.
  uint32_t selected_bin;
  uint32_t selected_count;
  uint64_t selected_above_count;
  uint64_t selected_above_mass;
  uint64_t total_count;
  uint64_t total_mass;
  // locate(): the warp holding the target and the residual target in it; the index found.
  int32_t located_warp;
  uint64_t located_residual;
  int32_t located_index;
  // Broadcasts of the exchanges.
  uint64_t ties_before;
  int32_t draw_rank;
  uint64_t draw_residual;
  int64_t tie_limit;
};

__host__ __device__ inline int64_t slice_tokens(int64_t vocab, int cluster_ctas) {
  return (vocab + cluster_ctas - 1) / cluster_ctas;
}
inline size_t shared_bytes(int64_t vocab, int cluster_ctas) {
  return sizeof(SharedPlan) + size_t(slice_tokens(vocab, cluster_ctas)) * sizeof(float);
}

// Float order as an unsigned key (-0 and +0 equal), the complement of the id below it: the largest key is the
// largest value at its lowest id.
__device__ __forceinline__ unsigned long long order_key(float value, uint32_t id) {
  const uint32_t bits = float_to_bits(value);
  uint32_t order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (value == 0.0f) order = 0x80000000u;
  return (static_cast<unsigned long long>(order) << 32) | (0xFFFFFFFFu - id);
}

__device__ __forceinline__ float key_value(unsigned long long key) {
  const uint32_t order = uint32_t(key >> 32);
  return bits_to_float((order & 0x80000000u) ? (order & 0x7FFFFFFFu) : ~order);
}

__device__ __forceinline__ uint32_t key_token(unsigned long long key) { return 0xFFFFFFFFu - uint32_t(key); }

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_inclusive_sum(T v, int lane) {
  for (int offset = 1; offset < 32; offset *= 2) {
    const T other = __shfl_up_sync(0xFFFFFFFFu, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// Inclusive scan of (a, b) over the CTA's threads in thread order; also returns the CTA totals.
__device__ __forceinline__ void block_inclusive_sum(uint64_t& a, uint64_t& b, uint64_t& total_a, uint64_t& total_b,
                                                    SharedPlan& s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  a = warp_inclusive_sum(a, lane);
  b = warp_inclusive_sum(b, lane);
  if (lane == 31) s.scratch_a[warp] = a, s.scratch_b[warp] = b;
  __syncthreads();
  uint64_t before_a = 0, before_b = 0;
  total_a = 0, total_b = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before_a = total_a, before_b = total_b;
    total_a += s.scratch_a[w];
    total_b += s.scratch_b[w];
  }
  a += before_a;
  b += before_b;
  __syncthreads();
}

// One radix pass: the cluster's histogram, for the tokens whose weight bits match `prefix` above bit
// shift + kDigitBits, of digit (bits >> shift) % kBins. Thread t gets bin kBins - 1 - t (the top bin first).
__device__ __forceinline__ void cluster_histogram(const float* values, int64_t n, int shift, uint32_t prefix,
                                                  bool with_mass, int mass_shift, int parity, uint64_t& bin_count,
                                                  uint64_t& bin_mass, SharedPlan& s, const cg::cluster_group& cluster) {
  Histogram& own = s.histogram[parity];
  own.count[threadIdx.x] = 0;
  own.mass_low[threadIdx.x] = 0;
  own.mass_high[threadIdx.x] = 0;
  __syncthreads();
  const int match_shift = shift + kDigitBits;
  int run_bin = -1;
  uint32_t run_count = 0;
  uint64_t run_mass = 0;
  const auto flush = [&] {
    if (run_count == 0) return;
    atomicAdd(&own.count[run_bin], run_count);
    if (!with_mass) return;
    const uint32_t low = uint32_t(run_mass);
    const uint32_t old = atomicAdd(&own.mass_low[run_bin], low);
    atomicAdd(&own.mass_high[run_bin], uint32_t(run_mass >> 32) + (old + low < old ? 1u : 0u));
  };
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const uint32_t bits = float_to_bits(values[i]);
    if (bits == 0 || (bits >> match_shift) != (prefix >> match_shift)) continue;
    const int bin = int((bits >> shift) % kBins);
    if (bin != run_bin) {
      flush();
      run_bin = bin, run_count = 0, run_mass = 0;
    }
    ++run_count;
    if (with_mass) run_mass += sampling::weight_mass(values[i], mass_shift);
  }
  flush();
  cluster.sync();
  const int bin = kBins - 1 - int(threadIdx.x);
  bin_count = 0, bin_mass = 0;
  // Unrolled, so the remote loads of several CTAs are in flight together (each costs a round trip).
  const int cluster_ctas = int(cluster.num_blocks());
#pragma unroll 4
  for (int rank = 0; rank < cluster_ctas; ++rank) {
    const Histogram* other = cluster.map_shared_rank(&own, rank);
    bin_count += other->count[bin];
    if (with_mass) bin_mass += (uint64_t(other->mass_high[bin]) << 32) | other->mass_low[bin];
  }
}

// A cut in rank order: survivors have weight bits > bits, or == bits and are among the first `keep` such tokens.
struct Cut {
  uint32_t bits = kNoCut;
  uint64_t keep = kAllTies;
  uint64_t ties = 0;       // tokens with weight bits == bits in the row
  uint64_t mass = 0;       // the survivors' mass
};

// The first radix pass's histogram (prefix none), which the top_k and the top_p selections share: thread t holds
// bin kBins - 1 - t, and every thread the totals.
struct FirstPass {
  uint64_t count = 0, mass = 0;
  uint64_t total_count = 0, total_mass = 0;
};

// Radix selection of the token where the running count (by_mass false) or mass (true), in rank order, reaches
// `target` (in [1, the total]), from the first pass on. Masses are summed only when with_mass (then Cut::mass is
// valid). Every thread of the cluster calls it.
__device__ Cut radix_select(const float* values, int64_t n, const FirstPass& first, bool by_mass, bool with_mass,
                            uint64_t target, int mass_shift, int& parity, SharedPlan& s,
                            const cg::cluster_group& cluster) {
  uint32_t prefix = 0;
  uint64_t above_mass = 0;
  for (int digit = 0; digit < kDigits; ++digit) {
    const int shift = (kDigits - 1 - digit) * kDigitBits;
    uint64_t count = first.count, mass = first.mass;
    if (digit > 0) {
      cluster_histogram(values, n, shift, prefix, with_mass, mass_shift, parity, count, mass, s, cluster);
      parity ^= 1;
    }
    uint64_t incl_count = count, incl_mass = mass, total_count = 0, total_mass = 0;
    block_inclusive_sum(incl_count, incl_mass, total_count, total_mass, s);
    const uint64_t excl = by_mass ? incl_mass - mass : incl_count - count;
    const uint64_t incl = by_mass ? incl_mass : incl_count;
    if (excl < target && target <= incl) {
      s.selected_bin = uint32_t(kBins - 1 - int(threadIdx.x));
      s.selected_count = uint32_t(count);
      s.selected_above_count = incl_count - count;
      s.selected_above_mass = incl_mass - mass;
    }
    __syncthreads();
    prefix |= s.selected_bin << shift;
    above_mass += s.selected_above_mass;
    target -= by_mass ? s.selected_above_mass : s.selected_above_count;
    // No thread writes the selection again before the next pass's cluster barrier, or the next block scan's barrier.
  }
  Cut cut;
  cut.bits = prefix;
  cut.ties = s.selected_count;
  const uint64_t unit = sampling::weight_mass(bits_to_float(prefix), mass_shift);  // > 0 when by_mass: the bin has mass
  cut.keep = by_mass ? (target + unit - 1) / unit : target;
  cut.mass = above_mass + cut.keep * unit;
  return cut;
}

// Warp w's range of the CTA's slice: a contiguous 1/kWarps of it, so that the warps' sums are in token id order.
__device__ __forceinline__ void warp_range(int64_t n, int warp, int64_t& begin, int64_t& end) {
  const int64_t per_warp = (n + kWarps - 1) / kWarps;
  begin = min(n, warp * per_warp);
  end = min(n, begin + per_warp);
}

// s.warp_sums[w] = the sum of value(i) over warp w's range; returns the CTA's total (every thread).
template <class Value>
__device__ uint64_t warp_range_sums(int64_t n, Value value, SharedPlan& s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t begin, end;
  warp_range(n, warp, begin, end);
  uint64_t sum = 0;
  for (int64_t i = begin + lane; i < end; i += 32) sum += value(i);
  sum = warp_sum(sum);
  if (lane == 0) s.warp_sums[warp] = sum;
  __syncthreads();
  uint64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += s.warp_sums[w];
  return total;
}

// The first index i in [0, n) where the running sum of value(i), in index order, exceeds `target` (< the CTA's
// total), given warp_range_sums(n, value) in s.warp_sums. Every thread of the CTA calls it. Two more scans: the
// lanes' contiguous pieces of the chosen warp's range, then the chosen lane's elements one by one.
template <class Value>
__device__ int64_t locate(int64_t n, uint64_t target, Value value, SharedPlan& s) {
  static_assert(kWarps == 32, "one lane per warp range in the first scan");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) s.located_index = int32_t(n - 1);
  if (warp == 0) {
    const uint64_t own = s.warp_sums[lane];
    const uint64_t inclusive = warp_inclusive_sum(own, lane);
    const unsigned crossed = __ballot_sync(0xFFFFFFFFu, target < inclusive);
    if (lane == (crossed != 0 ? __ffs(crossed) - 1 : 31)) {
      s.located_warp = lane;
      s.located_residual = target - (inclusive - own);
    }
  }
  __syncthreads();
  if (warp == s.located_warp) {
    int64_t begin, end;
    warp_range(n, warp, begin, end);
    const uint64_t residual = s.located_residual;
    const int64_t per_lane = (end - begin + 31) / 32;
    const int64_t lane_begin = min(end, begin + lane * per_lane), lane_end = min(end, lane_begin + per_lane);
    uint64_t lane_sum = 0;
    for (int64_t i = lane_begin; i < lane_end; ++i) lane_sum += value(i);
    const uint64_t inclusive = warp_inclusive_sum(lane_sum, lane);
    const unsigned crossed = __ballot_sync(0xFFFFFFFFu, residual < inclusive);
    if (crossed != 0 && lane == __ffs(crossed) - 1) {
      uint64_t before = inclusive - lane_sum;
      for (int64_t i = lane_begin; i < lane_end; ++i) {
        before += value(i);
        if (residual < before) {
          s.located_index = int32_t(i);
          break;
        }
      }
    }
  }
  __syncthreads();
  return s.located_index;
}

__global__ void __launch_bounds__(kThreads, 1) sample_rows_kernel(SamplingLaunchParams p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  SharedPlan& s = *reinterpret_cast<SharedPlan*>(shared_raw);
  float* values = reinterpret_cast<float*>(shared_raw + sizeof(SharedPlan));
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const int cluster_ctas = int(cluster.num_blocks());
  const int64_t row = blockIdx.x / cluster_ctas;
  const int64_t slice = slice_tokens(p.vocab, cluster_ctas);
  const int64_t begin = rank * slice;
  const int64_t n = max(int64_t(0), min(slice, p.vocab - begin));
  const int mass_shift = sampling::mass_shift(p.vocab);
  allow_dependents();
  wait_for_prior_grids();

  // A. Load, check, adjust, max.
  const sampling::RowParams rp = p.row_params[row];
  const float* logits = p.logits + row * p.row_stride + begin;
  int32_t bad = INT32_MAX;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float v = logits[i];
    values[i] = v;
    if (v != v || v == __int_as_float(0x7F800000)) bad = min(bad, int32_t(begin + i));
  }
  __syncthreads();
  for (int32_t a = threadIdx.x; a < rp.adjustments_count; a += kThreads) {
    const sampling::LogitAdjustment adjustment = p.adjustments[rp.adjustments_begin + a];
    const int64_t local = int64_t(adjustment.token) - begin;
    if (local >= 0 && local < n) values[local] = sampling::adjust_logit(values[local], adjustment, rp);
  }
  __syncthreads();
  unsigned long long key = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const unsigned long long k = order_key(values[i], uint32_t(begin + i));
    key = k > key ? k : key;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const unsigned long long other_key = __shfl_xor_sync(0xFFFFFFFFu, key, offset);
    key = other_key > key ? other_key : key;
    bad = min(bad, __shfl_xor_sync(0xFFFFFFFFu, bad, offset));
  }
  if (threadIdx.x % 32 == 0) s.scratch_a[threadIdx.x / 32] = key, s.scratch_b[threadIdx.x / 32] = uint64_t(bad);
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) {
      key = s.scratch_a[w] > key ? s.scratch_a[w] : key;
      bad = min(bad, int32_t(s.scratch_b[w]));
    }
    s.summary.max_key = key;
    s.summary.bad_token = bad;
  }
  cluster.sync();
  // Lane r of warp 0 reads CTA r's summary: one remote round trip for the whole exchange.
  if (threadIdx.x < 32) {
    const int lane = int(threadIdx.x);
    key = 0, bad = INT32_MAX;
    if (lane < cluster_ctas) {
      const CtaSummary* summary = cluster.map_shared_rank(&s.summary, lane);
      key = summary->max_key;
      bad = summary->bad_token;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const unsigned long long other_key = __shfl_xor_sync(0xFFFFFFFFu, key, offset);
      key = other_key > key ? other_key : key;
      bad = min(bad, __shfl_xor_sync(0xFFFFFFFFu, bad, offset));
    }
    if (lane == 0) s.cluster_key = key, s.cluster_bad = bad;
  }
  __syncthreads();
  const unsigned long long row_key = s.cluster_key;
  const int32_t row_bad = s.cluster_bad;
  const float max_logit = key_value(row_key);
  SampledToken& result = p.results[row];
  if (row_bad != INT32_MAX || max_logit == -__int_as_float(0x7F800000) || rp.temperature == 0.0f) {
    if (row_bad != INT32_MAX) {
      // The CTA holding the bad token tells NaN from +inf (adjustments keep both as they are).
      if (threadIdx.x == 0 && row_bad >= begin && row_bad < begin + n) {
        const float v = values[row_bad - begin];
        result = {-1, v != v ? SamplingStatus::NanLogit : SamplingStatus::InfiniteLogit, row_bad, 0};
      }
    } else if (rank == 0 && threadIdx.x == 0) {
      if (max_logit == -__int_as_float(0x7F800000))
        result = {-1, SamplingStatus::AllMinusInfinity, -1, 0};
      else
        result = {int32_t(key_token(row_key)), SamplingStatus::Ok, -1, 0};
    }
    cluster.sync();  // no CTA leaves while another may still read its summary
    return;
  }

  // B. Weights in place.
  const float inverse_temperature = sampling::div_rn(1.0f, rp.temperature);
  for (int64_t i = threadIdx.x; i < n; i += kThreads)
    values[i] = sampling::tempered_weight(values[i], max_logit, inverse_temperature);
  __syncthreads();

  // C. top_k, then top_p over the top_k set's mass; the earlier cut in rank order wins.
  int parity = 0;
  Cut cut;
  const bool top_p_on = rp.top_p < 1.0f;
  if (rp.top_k > 0 || top_p_on) {
    FirstPass first;
    cluster_histogram(values, n, (kDigits - 1) * kDigitBits, 0, top_p_on, mass_shift, parity, first.count,
                      first.mass, s, cluster);
    parity ^= 1;
    uint64_t incl_count = first.count, incl_mass = first.mass;
    block_inclusive_sum(incl_count, incl_mass, first.total_count, first.total_mass, s);
    if (rp.top_k > 0 && uint64_t(rp.top_k) < first.total_count) {
      cut = radix_select(values, n, first, false, top_p_on, uint64_t(rp.top_k), mass_shift, parity, s, cluster);
    }
    if (top_p_on) {
      const uint64_t nucleus = sampling::nucleus_mass(rp.top_p, cut.bits != kNoCut ? cut.mass : first.total_mass);
      const Cut top_p_cut = radix_select(values, n, first, true, true, nucleus, mass_shift, parity, s, cluster);
      if (cut.bits == kNoCut || top_p_cut.bits > cut.bits || (top_p_cut.bits == cut.bits && top_p_cut.keep < cut.keep))
        cut = top_p_cut;
    }
  }
  // Equal weights split by the cut: the survivors among them are the lowest ids, so find the last one in this slice.
  int64_t tie_limit = INT64_MAX;
  if (cut.bits != kNoCut && cut.keep < cut.ties) {
    const uint32_t bits = cut.bits;
    const auto is_tie = [&](int64_t i) { return uint64_t(float_to_bits(values[i]) == bits ? 1 : 0); };
    const uint64_t ties = warp_range_sums(n, is_tie, s);
    if (threadIdx.x == 0) s.summary.ties = uint32_t(ties);
    cluster.sync();
    if (threadIdx.x < 32) {
      const int lane = int(threadIdx.x);
      const uint64_t own = lane < cluster_ctas ? cluster.map_shared_rank(&s.summary, lane)->ties : 0;
      const uint64_t inclusive = warp_inclusive_sum(own, lane);
      if (lane == rank) s.ties_before = inclusive - own;
    }
    __syncthreads();
    const uint64_t before = s.ties_before;
    const uint64_t keep_here = cut.keep > before ? min(cut.keep - before, ties) : 0;
    if (keep_here == 0) {
      tie_limit = -1;
    } else if (keep_here < ties) {
      tie_limit = begin + locate(n, keep_here - 1, is_tie, s);
    }
  }

  // D. The draw: survivors in token id order.
  const uint32_t cut_bits = cut.bits;
  const float min_p = rp.min_p;
  const auto survivor_mass = [&](int64_t i) -> uint64_t {
    const float w = values[i];
    const uint32_t bits = float_to_bits(w);
    const bool survives = bits != 0 && (bits > cut_bits || (bits == cut_bits && begin + i <= tie_limit)) &&
                          (min_p <= 0.0f || w >= min_p);
    return survives ? sampling::weight_mass(w, mass_shift) : 0;
  };
  const uint64_t local_mass = warp_range_sums(n, survivor_mass, s);
  if (threadIdx.x == 0) s.summary.survivor_mass = local_mass;
  cluster.sync();
  if (threadIdx.x < 32) {
    const int lane = int(threadIdx.x);
    const uint64_t own = lane < cluster_ctas ? cluster.map_shared_rank(&s.summary, lane)->survivor_mass : 0;
    const uint64_t inclusive = warp_inclusive_sum(own, lane);
    const uint64_t target = sampling::draw_target(rp.draw, __shfl_sync(0xFFFFFFFFu, inclusive, 31));
    const unsigned crossed = __ballot_sync(0xFFFFFFFFu, target < inclusive);
    if (lane == 0) s.draw_rank = -1;
    __syncwarp();
    if (crossed != 0 && lane == __ffs(crossed) - 1) {
      s.draw_rank = lane;
      s.draw_residual = target - (inclusive - own);
    }
  }
  cluster.sync();  // every remote read is done: from here on each CTA works alone and may leave
  if (s.draw_rank == rank) {
    const int64_t index = locate(n, s.draw_residual, survivor_mass, s);
    if (threadIdx.x == 0) result = {int32_t(begin + index), SamplingStatus::Ok, -1, 0};
  }
}

}  // namespace dsv4::cuda::sampling_detail
