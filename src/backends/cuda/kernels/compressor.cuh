// Device code behind compressor.hpp (the contract is there).
//
// NOTES:
// - A CTA pools one entry: thread (group, pair) owns channels 2·pair, 2·pair + 1 (the RoPE pair) and a strided share
//   of the window's slots; each keeps an online softmax (max, denominator, numerator) per channel, and group 0 merges
//   the groups' partials through shared memory. Several slot groups per channel keep enough loads in flight when
//   the window is long (HCA: 128 slots) and entries are few.
// - Each slot's source follows from its position q: the chunk (q ≥ start), the state's incomplete window
//   (q ≥ ratio·(start div ratio)), or for CSA's first halves of the window before the chunk's first, the state's
//   previous halves.
// - The state update must not race with the CTAs still reading the state, so the CTA that finishes last (ticket in
//   the state, after a fence) writes it: CSA's previous halves first (they may come from the old window slots), then
//   the new incomplete window's slots.
// - Few entries (decode, HCA) would leave most SMs idle and one SM streaming a whole 128-slot window, so an entry's
//   channels are split over a cluster of CTAs (slices of whole 64-channel fp8 blocks); the RMSNorm's sum of squares
//   is then added over the cluster through distributed shared memory, in rank order (the same sum in every CTA).
// - Pairs are padded to whole warps so that an fp8 block of 64 channels is exactly one warp of group 0.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <limits>

#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kernels/indexer.cuh"
#include "backends/cuda/kernels/kv_insert.cuh"
#include "backends/cuda/kernels/rope.cuh"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/bf16.hpp"
#include "core/e8m0.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda::compressor {

inline constexpr int kMaxThreads = 1024;
inline constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();

struct PoolArgs {
  int c;
  int64_t ratio;
  bool overlapping;
  float norm_eps;
  bool round_pooled_to_bf16;
  CompressorStoredRounding stored_rounding;
  const float* kv;        // the launch's rows; within a CTA, the run's first row
  const float* gate;
  int64_t row_stride;     // elements from one token's kv / gate row to the next
  int64_t tokens;         // within a CTA: the run's
  int64_t start_position; // within a CTA: the run's
  const CompressorRun* runs;
  const float* ape;
  const float* norm_weight;
  const float* rope_frequencies;
  int rope_dim;
  CompressorStateView state;  // every slot's; within a CTA, the run's slot
  float* entries;
  int32_t* entry_rows;
  int32_t* entry_slots;
  __nv_bfloat16* slot_entries_bf16;
  int64_t slot_entry_stride;
  int64_t slot_entry_capacity;
  KvCacheView cache;
  int cache_layer;
  int64_t entries_per_run;
  int cluster_ctas;      // CTAs per entry, each pooling channels_per_cta channels
  int channels_per_cta;
  int pairs_padded;      // threads per slot group (channels_per_cta / 2 rounded up to 32)
  int groups;            // slot groups
};

// Shared memory: per group and channel the partial (max, denominator, numerator), then the CTA's channels of one entry.
inline size_t pool_smem_bytes(int channels, int groups) { return (size_t(3) * groups * channels + channels) * sizeof(float); }

struct SlotValue {
  float2 value;
  float2 score;
};

// Channels (column, column + 1) of the token at position q, with ape added to the score.
__device__ __forceinline__ SlotValue load_slot(const PoolArgs& a, int64_t q, int column) {
  const int64_t width = a.overlapping ? 2 * a.c : a.c;
  const int64_t slot = q % a.ratio;
  const int64_t window_start = a.start_position / a.ratio * a.ratio;
  if (q >= a.start_position) {
    const int64_t offset = (q - a.start_position) * a.row_stride + column;
    const float2 v = *reinterpret_cast<const float2*>(a.kv + offset);
    const float2 g = *reinterpret_cast<const float2*>(a.gate + offset);
    const float2 bias = *reinterpret_cast<const float2*>(a.ape + slot * width + column);
    return {v, make_float2(g.x + bias.x, g.y + bias.y)};
  }
  if (q >= window_start) {
    const int64_t offset = slot * width + column;
    return {*reinterpret_cast<const float2*>(a.state.window_kv + offset),
            *reinterpret_cast<const float2*>(a.state.window_score + offset)};
  }
  // CSA only: the first halves (column < c) of the window before the chunk's first.
  const int64_t offset = slot * a.c + column;
  return {*reinterpret_cast<const float2*>(a.state.previous_kv + offset),
          *reinterpret_cast<const float2*>(a.state.previous_score + offset)};
}

struct OnlineSoftmax {
  float max = kNegativeInfinity;
  float denominator = 0.0f;
  float numerator = 0.0f;

  __device__ __forceinline__ void add(float value, float score) {
    if (score == kNegativeInfinity) return;  // weight exactly 0, as on the CPU
    if (score > max) {
      const float rescale = expf(max - score);
      denominator = denominator * rescale + 1.0f;
      numerator = numerator * rescale + value;
      max = score;
    } else {
      const float weight = expf(score - max);
      denominator += weight;
      numerator += weight * value;
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, m));
  return v;
}

template <int kPerLane>
__device__ __forceinline__ void round_indexer_row(float* row, int lane) {
  float v[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) v[i] = row[kPerLane * lane + i];
  indexer::warp_round_indexer_reference<kPerLane>(v, lane);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) row[kPerLane * lane + i] = v[i];
}

// The last CTA of the launch: CSA's previous halves, then the new incomplete window's slots.
__device__ void update_state(const PoolArgs& a) {
  const int64_t width = a.overlapping ? 2 * a.c : a.c;
  const int64_t end = a.start_position + a.tokens;
  const int64_t first_window = a.start_position / a.ratio, end_window = end / a.ratio;
  if (a.overlapping && end_window > first_window) {
    const int64_t base = (end_window - 1) * a.ratio;
    for (int64_t idx = threadIdx.x; idx < a.ratio * a.c; idx += blockDim.x) {
      const int64_t slot = idx / a.c, channel = idx % a.c, q = base + slot;
      float value, score;
      if (q >= a.start_position) {
        const int64_t offset = (q - a.start_position) * a.row_stride + channel;
        value = a.kv[offset];
        score = a.gate[offset] + a.ape[slot * width + channel];
      } else {
        value = a.state.window_kv[slot * width + channel];
        score = a.state.window_score[slot * width + channel];
      }
      a.state.previous_kv[idx] = value;
      a.state.previous_score[idx] = score;
    }
    __syncthreads();
  }
  const int64_t from = max(a.start_position, end_window * a.ratio);
  for (int64_t idx = threadIdx.x; idx < (end - from) * width; idx += blockDim.x) {
    const int64_t q = from + idx / width, column = idx % width, slot = q % a.ratio;
    const int64_t offset = (q - a.start_position) * a.row_stride + column;
    a.state.window_kv[slot * width + column] = a.kv[offset];
    a.state.window_score[slot * width + column] = a.gate[offset] + a.ape[slot * width + column];
  }
}

__global__ void __launch_bounds__(kMaxThreads) compressor_kernel(const __grid_constant__ PoolArgs args) {
  extern __shared__ __align__(16) float smem[];
  const int c = args.c, channels = args.channels_per_cta;
  float* part_max = smem;
  float* part_den = part_max + args.groups * channels;
  float* part_num = part_den + args.groups * channels;
  float* entry_vector = part_num + args.groups * channels;
  __shared__ float warp_partials[32];
  __shared__ float cta_square_sum;
  __shared__ bool is_last_cta;
  allow_dependents();      // the dependent's own wait still orders it after this grid's completion
  wait_for_prior_grids();  // the runs, the projections and the state are earlier operations' outputs

  // CTAs are [run][entry of the run][cluster rank]; the run's fields replace the launch's in this CTA's copy.
  const int64_t entry_row = blockIdx.x / args.cluster_ctas;  // row of the compact fp32 output
  const int64_t run_index = entry_row / args.entries_per_run, entry = entry_row % args.entries_per_run;
  const CompressorRun run = args.runs[run_index];
  PoolArgs a = args;
  a.kv += int64_t(run.first_token) * a.row_stride;
  a.gate += int64_t(run.first_token) * a.row_stride;
  a.tokens = run.tokens;
  a.start_position = run.start_position;
  a.state = args.state.of_slot(run.slot);
  const int64_t emitted = compressor_entries_emitted(run.start_position, run.tokens, a.ratio);

  const int pair = threadIdx.x % a.pairs_padded, group = threadIdx.x / a.pairs_padded;
  const bool active = 2 * pair < channels;
  const bool emitting = entry < emitted;
  const int64_t w = a.start_position / a.ratio + entry;
  if (blockIdx.x % a.cluster_ctas == 0 && threadIdx.x == 0) {
    if (a.entry_rows != nullptr) a.entry_rows[entry_row] = emitting ? int32_t(w) : -1;
    if (a.entry_slots != nullptr) a.entry_slots[entry_row] = run.slot;
  }
  const int channel = int(blockIdx.x % a.cluster_ctas) * channels + 2 * pair;  // this thread's first channel
  const int slots = a.overlapping ? 2 * int(a.ratio) : int(a.ratio);

  if (emitting && active) {
    OnlineSoftmax channel0, channel1;
#pragma unroll 4
    for (int s = group; s < slots; s += a.groups) {
      // CSA: slots [0, m) are window w−1's first halves, [m, 2m) window w's second halves.
      const bool first_half = a.overlapping && s < a.ratio;
      const int64_t q = a.overlapping ? (first_half ? (w - 1) * a.ratio + s : w * a.ratio + (s - a.ratio))
                                      : w * a.ratio + s;
      if (q < 0) continue;
      const SlotValue slot = load_slot(a, q, channel + (a.overlapping && !first_half ? c : 0));
      channel0.add(slot.value.x, slot.score.x);
      channel1.add(slot.value.y, slot.score.y);
    }
    const int local = group * channels + 2 * pair;
    part_max[local] = channel0.max;
    part_max[local + 1] = channel1.max;
    part_den[local] = channel0.denominator;
    part_den[local + 1] = channel1.denominator;
    part_num[local] = channel0.numerator;
    part_num[local + 1] = channel1.numerator;
  }
  __syncthreads();

  if (emitting) {
    const bool owner = group == 0 && active;
    float v[2] = {0.0f, 0.0f};
    if (owner) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int local = 2 * pair + j;
        float m = kNegativeInfinity;
        for (int g = 0; g < a.groups; ++g) m = fmaxf(m, part_max[g * channels + local]);
        float den = 0.0f, num = 0.0f;
        for (int g = 0; g < a.groups; ++g) {
          const float gm = part_max[g * channels + local];
          if (gm == kNegativeInfinity) continue;
          const float scale = expf(gm - m);
          den += part_den[g * channels + local] * scale;
          num += part_num[g * channels + local] * scale;
        }
        v[j] = num / den;
        if (a.round_pooled_to_bf16) v[j] = round_to_bf16(v[j]);
      }
    }
    // RMSNorm over all c channels: group 0's warps (0 .. pairs_padded / 32 − 1), then the cluster's CTAs.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float square_sum = warp_sum(v[0] * v[0] + v[1] * v[1]);
    if (group == 0 && lane == 0) warp_partials[warp] = square_sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      float cta_sum = 0.0f;
      for (int i = 0; i < a.pairs_padded / 32; ++i) cta_sum += warp_partials[i];
      cta_square_sum = cta_sum;
    }
    float total = 0.0f;
    if (a.cluster_ctas > 1) {
      cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
      cluster.sync();
      for (int r = 0; r < a.cluster_ctas; ++r) total += *cluster.map_shared_rank(&cta_square_sum, r);
      cluster.sync();  // no CTA leaves (freeing its shared memory) while another still reads it
    } else {
      __syncthreads();
      total = cta_square_sum;
    }
    const float inv_rms = 1.0f / sqrtf(total / static_cast<float>(c) + a.norm_eps);
    if (owner) {
      v[0] = v[0] * inv_rms * a.norm_weight[channel];
      v[1] = v[1] * inv_rms * a.norm_weight[channel + 1];
      const int rope_begin = c - a.rope_dim;
      if (channel >= rope_begin)
        rope_rotate_pair(v[0], v[1], rope_factors(w * a.ratio, a.rope_frequencies[(channel - rope_begin) / 2]), false);
    }
    if (a.stored_rounding == CompressorStoredRounding::KvFp8) {
      // One fp8 block of 64 non-rope channels = one warp of group 0; rope channels stay bf16.
      const bool nope = owner && channel < c - a.rope_dim;
      const float amax = warp_max(nope ? fmaxf(fabsf(v[0]), fabsf(v[1])) : 0.0f);
      const float scale = e8m0_to_float(float_to_e8m0_ceil(fmaxf(amax, 1e-4f) * (1.0f / kE4m3Max)));
#pragma unroll
      for (int j = 0; j < 2; ++j)
        v[j] = nope ? round_to_bf16(e4m3_to_float(float_to_e4m3(v[j] / scale)) * scale) : round_to_bf16(v[j]);
    } else if (a.stored_rounding == CompressorStoredRounding::IndexerFp4) {
      // The whole vector is in this CTA (no cluster split with this rounding).
      if (owner) {
        entry_vector[2 * pair] = v[0];
        entry_vector[2 * pair + 1] = v[1];
      }
      __syncthreads();
      if (warp == 0) {
        switch (c) {
          case 32: round_indexer_row<1>(entry_vector, lane); break;
          case 64: round_indexer_row<2>(entry_vector, lane); break;
          default: round_indexer_row<4>(entry_vector, lane); break;
        }
      }
      __syncthreads();
      if (owner) {
        v[0] = entry_vector[2 * pair];
        v[1] = entry_vector[2 * pair + 1];
      }
    }
    if (a.cache.pool != nullptr) {
      // Group 0's warps, each one 64-channel block of the entry (warp-uniform: every lane takes part).
      if (group == 0) {
        const KvCacheView& cache = a.cache;
        uint8_t* stored =
            cache.entry_address(cache.physical_entry(cache.pages_of(run.slot, a.cache_layer, KvArray::Compressed), w));
        kv_store_pair(cache.layout, stored, channel, owner, v[0], v[1]);
        if (blockIdx.x % a.cluster_ctas == 0) kv_store_pad(cache.layout, stored, pair);
      }
    } else if (owner) {
      if (a.entries != nullptr) {
        *reinterpret_cast<float2*>(a.entries + entry_row * c + channel) = make_float2(v[0], v[1]);
      } else if (w < a.slot_entry_capacity) {
        __nv_bfloat16* out = a.slot_entries_bf16 + run.slot * a.slot_entry_stride + w * c + channel;
        out[0] = __float2bfloat16_rn(v[0]);
        out[1] = __float2bfloat16_rn(v[1]);
      }
    }
  }

  // Every CTA's reads of the state are done before its ticket; the last one may now overwrite it.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    is_last_cta = atomicAdd(a.state.finished_ctas, 1u) == unsigned(a.entries_per_run * a.cluster_ctas) - 1;
  }
  __syncthreads();
  if (!is_last_cta) return;
  __threadfence();
  update_state(a);
  if (threadIdx.x == 0) *a.state.finished_ctas = 0;
}

}  // namespace dsv4::cuda::compressor
