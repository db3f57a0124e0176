// Next-token sampling on the device with the CPU Sampler's semantics (runtime/sampler.hpp): logit_bias and the
// repetition / frequency / presence penalties, NaN / +inf / all -inf checks, greedy at temperature 0, temperature,
// top_k, top_p, min_p, and the inverse-CDF draw over integer masses (core/sampling_math.hpp). Given the adjustments
// and the 53-bit draw that Sampler::device_step() produces, a row picks exactly the token Sampler::sample() picks.
//
// Contract:
// - logits: device fp32 [rows, row_stride] (read only); row_params: device [rows]; adjustments: device entries, row r
//   uses [row_params[r].adjustments_begin, + adjustments_count) (tokens distinct within a row, inside the
//   vocabulary; entries outside it are ignored); results: device [rows].
// - One cluster of 8 CTAs per row (16 when no row has top_p, rows * 16 CTAs fit the SMs and the GPU schedules such
//   clusters) holds the row in shared memory (a slice per CTA): one read of the logits, then every pass (max,
//   weights, the radix selections of top_k and top_p, the draw) runs on shared memory, with the CTAs exchanging
//   histograms and sums through distributed shared memory. No workspace, no allocation, no synchronisation;
//   asynchronous on `stream`, CUDA-graph capturable (the first launch on a device sets the kernel's attributes,
//   once); a programmatic dependent launch (the logits are read after wait_for_prior_grids).
// - vocab up to max_sampling_vocab() (the row must fit the cluster's shared memory).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/sampling_math.hpp"

namespace dsv4::cuda {

// What a row's sampling gave: the token, or why there is none (then token = -1).
enum class SamplingStatus : int32_t { Ok = 0, NanLogit = 1, InfiniteLogit = 2, AllMinusInfinity = 3 };

struct SampledToken {
  int32_t token = -1;
  SamplingStatus status = SamplingStatus::Ok;
  int32_t bad_token = -1;  // NanLogit / InfiniteLogit: the lowest token id whose logit is NaN or +inf
  int32_t reserved = 0;
};

struct SamplingLaunchParams {
  const float* logits = nullptr;                          // device [rows, row_stride]
  int64_t rows = 0;                                       // >= 1
  int64_t vocab = 0;                                      // 1 .. max_sampling_vocab()
  int64_t row_stride = 0;                                 // elements between rows, >= vocab
  const sampling::RowParams* row_params = nullptr;        // device [rows]
  const sampling::LogitAdjustment* adjustments = nullptr;  // device; may be null when no row has adjustments
  SampledToken* results = nullptr;                        // device [rows]
  int cluster_ctas = 0;  // CTAs per row: 0 = the launcher's choice (above); 8 or 16 to force one (benchmarks)
  // Whether some row has top_p < 1: the launcher's choice is then 8 CTAs per row, as the mass histograms' exchange
  // grows with the cluster (H200, batch 1: top_p 0.9 46 us over 8 CTAs, 64 us over 16; temperature alone 15 / 11 us).
  bool any_top_p = true;
  cudaStream_t stream = nullptr;
};

// The largest vocabulary a row's cluster holds in shared memory.
int64_t max_sampling_vocab();

// Throws naming the field at fault unless run_sampling supports the call (the device data is not inspected).
void check_sampling_params(const SamplingLaunchParams& params);

void run_sampling(const SamplingLaunchParams& params);

// Throws dsv4::Error with the CPU Sampler's message when `result` reports a bad row.
void check_sampled_token(const SampledToken& result);

}  // namespace dsv4::cuda
