// The KV compressor step on the GPU (run_compressor / run_compressors) for the V4-Flash compressors (CSA main c 512
// ratio 4 with the fp8 KV rounding, CSA indexer c 128 with the fp4 indexer rounding, HCA c 512 ratio 128), each
// against its floor and a straightforward kernel in the same run (device named in the output):
// - decode: a step that only stores its token, one that completes a window, and a batch of 64 sequences completing
//   a window each in one launch; a prefill chunk of 4096 tokens and one of 512 (the model's default prefill step);
// - a CSA layer's two compressors (main + indexer) per step: two launches (baseline column) against one
//   run_compressors launch, for the same four steps;
// - floor = the step's bytes (projections read, state read and written, entries written) over the same-run copy
//   bandwidth: a decode step's is far below a launch, so its target is the latency (≤ 5 µs for a CSA layer's pair);
// - baseline = one CTA per entry, one thread per channel, two passes over the window's rows (max, then the weighted
//   sums), RMSNorm and RoPE: the same entries pooled from the projection rows alone (no state, no stored rounding);
//   "-" where a step completes no entry;
// - diagnostic rows: the decode steps that complete windows (and HCA's prefill chunk) with an entry's split over CTAs
//   forced (1 to 8);
// - the indexer compressor's decode steps storing per-slot keys as the model does: fp8 codes + scale against bf16;
// - the decode steps with the runs loaded before the kernel's wait (runs_ready_at_launch) against the same steps;
// - every step with the RoPE factors read from a per-position table (rope_table) against the default (frequencies and
//   a double-precision sincos);
// - every step with the slot loads forced the other way than the default (CompressorSlotLoads::Auto: lean for the CSA
//   compressors' prefill chunks, staged for HCA's, registers for decode steps): staged for the CSA chunks and decode
//   steps, registers for HCA's, against the default;
// - a CSA layer's decode pair with the indexer's query preparation in its launch against the two launches;
// - the decode steps and the CSA layer's decode pair with the instruction caches flushed before each call ("code
//   cold": a kernel of 280 KB of code on every SM, its own time taken off), as a model step's other kernels leave
//   them, against the same calls warm (a graph replaying one kernel keeps its code in the caches).
// Projections rotate over copies beyond the L2, so the prefill chunk streams them from HBM. Times are GPU time per
// call inside a CUDA graph (20 calls captured, the graph replayed), as a decode step runs them: no host launch cost;
// the compressor is a programmatic dependent launch, so one call's start overlaps the previous one's end.
// Usage: bench_cuda_compressor [--json PATH] [--only TEXT[|TEXT...]] [--trace] [--trace-prefill]: --only times just
// the rows whose "op, case" contains one of the '|'-separated TEXTs (every compressor's state is still filled
// first: 64 launches each, CSA main, CSA indexer, then HCA; a derived row's step is timed too, as its baseline, and
// not reported); a part that selects no row fails the run.
// --trace: instead of timing, the timeline of one batch-1 decode launch (a CSA layer's pair with the indexer's query
// preparation, and HCA; a step that stores its token and one that completes a window) from CompressorParams::trace,
// behind a 5 µs kernel that lets it launch at once and reads the step's inputs (as the kernels that wrote them leave
// them in L2), with the L2 hot (the same step just ran) or evicted first (weights and state cold, as in a model
// step): per CTA its SM and points, in µs after that kernel's end, and when a dependent kernel's wait returned.
// --trace-prefill: instead of timing, a traced prefill chunk of 4096 and of 512 tokens (the model's default prefill
// step) from position 0 (the CSA layer's pair, HCA) summarised per pool (trace_prefill).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/compressor_state.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/compressor.hpp"
#include "backends/cuda/kv_cache.hpp"
#include "backends/cuda/ptx/dependent_launch.cuh"
#include "core/error.hpp"

#include "cuda_bench_support.hpp"

namespace dsv4::cuda {
namespace {

// GPU microseconds per call of body(stream): `reps` calls captured in one CUDA graph and the graph replayed between
// two events, so no host launch cost is counted.
template <class Body>
double graph_us(cudaStream_t stream, int reps, Body&& body) {
  body(stream);
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  return graph_replay_us(stream, capture_calls(stream, reps, body), reps);
}

// The straightforward kernel: entry first_entry + blockIdx.x of a sequence whose projections are the rows of kv and
// gate ([tokens, coff·c]); thread = channel (blockDim = c); two passes over the window's slots; RMSNorm; RoPE on the
// last rope_dim channels at the window's start.
__global__ void straightforward_pool(const float* kv, const float* gate, const float* ape, const float* norm_weight,
                                     const float* frequencies, int c, int ratio, bool overlapping, int rope_dim,
                                     int64_t first_entry, float* entries) {
  __shared__ float warp_sums[32];
  __shared__ float pooled[1024];
  const int channel = int(threadIdx.x);
  const int64_t w = first_entry + blockIdx.x;
  const int width = overlapping ? 2 * c : c;
  const int slots = overlapping ? 2 * ratio : ratio;
  auto slot_of = [&](int s, int64_t& token, int& column, int& within) {
    const bool first_half = overlapping && s < ratio;
    within = overlapping && !first_half ? s - ratio : s;
    token = (first_half ? w - 1 : w) * ratio + within;
    column = channel + (overlapping && !first_half ? c : 0);
  };
  float max = -INFINITY;
  for (int s = 0; s < slots; ++s) {
    int64_t token;
    int column, within;
    slot_of(s, token, column, within);
    if (token >= 0) max = fmaxf(max, gate[token * width + column] + ape[within * width + column]);
  }
  float den = 0.0f, num = 0.0f;
  for (int s = 0; s < slots; ++s) {
    int64_t token;
    int column, within;
    slot_of(s, token, column, within);
    if (token < 0) continue;
    const float weight = expf(gate[token * width + column] + ape[within * width + column] - max);
    den += weight;
    num += weight * kv[token * width + column];
  }
  float v = num / den;
  float square = v * v;
  for (int m = 16; m > 0; m /= 2) square += __shfl_xor_sync(0xFFFFFFFFu, square, m);
  if (channel % 32 == 0) warp_sums[channel / 32] = square;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < c / 32; ++i) total += warp_sums[i];
  v = v * rsqrtf(total / float(c) + 1e-6f) * norm_weight[channel];
  pooled[channel] = v;
  __syncthreads();
  const int rope_begin = c - rope_dim;
  if (channel >= rope_begin) {
    const int pair = (channel - rope_begin) / 2;
    float sine, cosine;
    sincosf(float(w * ratio) * frequencies[pair], &sine, &cosine);
    const float x0 = pooled[rope_begin + 2 * pair], x1 = pooled[rope_begin + 2 * pair + 1];
    v = channel % 2 == 0 ? x0 * cosine - x1 * sine : x0 * sine + x1 * cosine;
  }
  entries[blockIdx.x * int64_t(c) + channel] = v;
}

// --trace's neighbours. The previous kernel: one warp that lets its dependents launch at once, reads `touch` (the
// step's inputs) and spins for `ns` nanoseconds, then stores its end time. The next kernel: one warp whose
// grid-dependency wait returns when the traced launch has completed; it stores that time.
struct Touch {
  const uint4* range[8] = {};
  int words[8] = {};
};
__global__ void prior_kernel(Touch touch, uint64_t ns, uint64_t* end, uint32_t* sink) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  uint32_t sum = 0;
  for (int r = 0; r < 8; ++r)
    for (int i = int(threadIdx.x); i < touch.words[r]; i += 32) sum ^= touch.range[r][i].x;
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
  if (sum == 0x9E3779B9u) *sink = sum;
  if (threadIdx.x == 0) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    *end = now;
  }
}
__global__ void next_kernel(uint64_t* released) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x == 0) {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    *released = now;
  }
}
__global__ void evict_l2_kernel(const uint4* data, size_t words, uint32_t* sink) {
  uint32_t sum = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words; i += size_t(gridDim.x) * blockDim.x)
    sum ^= __ldcs(data + i).x;
  if (sum == 0x9E3779B9u) *sink = sum;
}

// The code-cold rows' flusher: ≈ 17K distinct instructions (280 KB of code, more than an SM's instruction caches
// hold) run by a warp on every SM, so that the next kernel starts with cold instruction caches, as a compressor launch
// does in a model step between other kernels (a graph replaying one kernel keeps its code warm).
constexpr int kFlushSteps = 2048;
__global__ void flush_instruction_cache(float* sink) {
  float x[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) x[j] = float(threadIdx.x + j);
#pragma unroll
  for (int i = 0; i < kFlushSteps; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = fmaf(x[j], 1.0f - float(i * 8 + j) * 1e-8f, float(i + j));
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) sum += x[j];
  if (sum == 0.123f) *sink = sum;
}

// What the code-cold rows need: the SM count (the flusher's grid, two warps' CTAs per SM) and its sink.
struct ColdCode {
  int sms = 0;
  float* sink = nullptr;
};

// GPU microseconds per call of body(stream) with the flusher before each call (code cold), less the flusher's own.
template <class Body>
double cold_graph_us(cudaStream_t stream, const ColdCode& cold, Body&& body) {
  const auto flush = [&](cudaStream_t on) {
    flush_instruction_cache<<<unsigned(2 * cold.sms), 32, 0, on>>>(cold.sink);
    DSV4_CUDA_CHECK_LAUNCH("flush_instruction_cache");
  };
  const double both = graph_us(stream, 20, [&](cudaStream_t on) {
    flush(on);
    body(on);
  });
  return both - graph_us(stream, 20, flush);
}

struct Row {
  std::string op, variant;
  double us = 0, floor_us = 0, baseline_us = 0;
  double bytes = 0;
  std::string note;
};

// One compressor's operands: projection copies, weights, a state of kBatch slots filled by a prefill from 0.
struct Compressor {
  static constexpr int64_t kPrefill = 4096;
  static constexpr int kBatch = 64;
  static constexpr int kCopies = 4;  // projections rotate over copies beyond the L2

  const char* name;
  int64_t c, ratio;
  bool overlapping;
  CompressorStoredRounding rounding;
  std::vector<DeviceBuffer> kv, gate;
  DeviceBuffer ape, norm, frequencies, rope_table, entries;
  DeviceCompressorState state;
  int rotation = 0;

  Compressor(const char* name_, int64_t c_, int64_t ratio_, bool overlapping_, CompressorStoredRounding rounding_,
             std::mt19937& rng)
      : name(name_), c(c_), ratio(ratio_), overlapping(overlapping_), rounding(rounding_),
        state(ratio_, c_, overlapping_, kBatch) {
    for (int i = 0; i < kCopies; ++i) {
      kv.push_back(to_device(normal_floats(size_t(rows() * width()), 1.0f, rng), "kv"));
      gate.push_back(to_device(normal_floats(size_t(rows() * width()), 1.0f, rng), "gate"));
    }
    ape = to_device(normal_floats(size_t(ratio * width()), 1.0f, rng), "ape");
    norm = to_device(std::vector<float>(size_t(c), 1.0f), "norm");
    // RoPE frequencies θ^(−2i/64) (the YaRN shaping does not change the cost).
    std::vector<float> f(32);
    for (int i = 0; i < 32; ++i) f[size_t(i)] = float(std::pow(160000.0, -2.0 * i / 64.0));
    frequencies = to_device(f, "frequencies");
    // The factors of every position a step here reaches, as rope_factors forms them (fp32 angle, double sincos).
    std::vector<float> table;
    for (int64_t position = 0; position < kPrefill + 2 * ratio; ++position)
      for (const float frequency : f) {
        const double angle = double(float(position) * frequency);
        table.push_back(float(std::cos(angle)));
        table.push_back(float(std::sin(angle)));
      }
    rope_table = to_device(table, "rope table");
    entries = DeviceBuffer(size_t(kPrefill) * size_t(c) * 4, "entries");
  }

  int64_t width() const { return overlapping ? 2 * c : c; }
  // Projection rows: a prefill chunk, or the windows of kBatch entries for the straightforward kernel.
  int64_t rows() const { return std::max(kPrefill, kBatch * ratio); }

  // The projection copy a call reads next (each call its own, so that a captured run of calls streams from HBM).
  int next_copy() { return rotation++ % kCopies; }

  // The step's parameters reading projection copy `copy` (next_copy(), or 0 where only the launch's shape matters).
  CompressorParams params(int copy, const DeviceBuffer& runs, int count, int64_t tokens, cudaStream_t stream) {
    return CompressorParams{.head_dim = c,
                            .ratio = ratio,
                            .overlapping = overlapping,
                            .round_pooled_to_bf16 = rounding != CompressorStoredRounding::None,
                            .stored_rounding = rounding,
                            .kv = kv[size_t(copy)].as<float>(),
                            .gate = gate[size_t(copy)].as<float>(),
                            .runs = runs.as<CompressorRun>(),
                            .run_count = count,
                            .max_run_tokens = tokens,
                            .ape = ape.as<float>(),
                            .norm_weight = norm.as<float>(),
                            .rope_frequencies = frequencies.as<float>(),
                            .rope_dim = 64,
                            .state = state.view(),
                            .entries = entries.as<float>(),
                            .stream = stream};
  }

  // Every slot's state as after a prefill from 0 (the timed steps then rewrite it at fixed positions).
  void fill_state(cudaStream_t stream) {
    for (int r = 0; r < kBatch; ++r) {
      const std::vector<CompressorRun> one{
          {.start_position = 0, .slot = r, .first_token = 0, .tokens = int32_t(kPrefill)}};
      const DeviceBuffer run = to_device(one, "runs");
      run_compressor(params(next_copy(), run, 1, kPrefill, stream));
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
  }

  // The straightforward kernel over `count` ≤ rows() / ratio entries from entry 0 of projection copy `copy`.
  void baseline(int copy, int64_t count, cudaStream_t stream) {
    straightforward_pool<<<unsigned(count), unsigned(c), 0, stream>>>(
        kv[size_t(copy)].as<float>(), gate[size_t(copy)].as<float>(), ape.as<float>(), norm.as<float>(),
        frequencies.as<float>(), int(c), int(ratio), overlapping, 64, 0, entries.as<float>());
    DSV4_CUDA_CHECK_LAUNCH("straightforward_pool");
  }
};

// The runs of a step: `count` sequences (slots 0 ..) of `tokens` tokens each from `start`.
DeviceBuffer runs_of(int64_t start, int64_t tokens, int count) {
  std::vector<CompressorRun> runs(static_cast<size_t>(count));
  for (int r = 0; r < count; ++r)
    runs[size_t(r)] = {
        .start_position = start, .slot = r, .first_token = int32_t(r * tokens), .tokens = int32_t(tokens)};
  return to_device(runs, "runs");
}

struct Step {
  const char* variant;
  int64_t start_in_window;  // position within its window of the step's first token (−1: start 0, a prefill)
  int64_t tokens;
  int sequences;
};

constexpr Step kSteps[] = {{"decode, stores its token", 1, 1, 1},
                           {"decode, completes a window", -2, 1, 1},
                           {"decode batch 64, each completes a window", -2, 1, Compressor::kBatch},
                           {"prefill chunk of 4096", -1, Compressor::kPrefill, 1},
                           {"prefill chunk of 512", -1, 512, 1}};  // the model's default prefill step

// The step's first position (after the state's prefill), its entries and its bytes.
int64_t start_of(const Step& s, const Compressor& k) {
  if (s.start_in_window == -1) return 0;
  return Compressor::kPrefill + (s.start_in_window == -2 ? k.ratio - 1 : s.start_in_window);
}

int64_t entries_of(const Step& s, const Compressor& k) {
  return s.sequences * compressor_entries_emitted(start_of(s, k), s.tokens, k.ratio);
}

double bytes_of(const Step& s, const Compressor& k) {
  const double slot_bytes = double(k.width()) * 8;  // kv + score of one token
  const double entry_bytes = double(k.c) * 4;
  const double window_bytes = double(k.ratio) * slot_bytes + (k.overlapping ? double(k.ratio * k.c) * 8 : 0.0);
  if (s.start_in_window == -1)  // projections in, entries out, the last window's slots stored
    return double(s.tokens) * slot_bytes + double(s.tokens / k.ratio) * entry_bytes + window_bytes;
  if (entries_of(s, k) == 0) return 2.0 * slot_bytes;  // the token's projections in, one slot stored
  return s.sequences * (window_bytes + slot_bytes + entry_bytes);  // the stored window in, one entry out
}

// Whether the row "op, variant" is timed (--only).
bool selected(OnlySelection& only, const std::string& op, const std::string& variant) {
  return only.selects(op + ", " + variant);
}

// Whether any of the rows "op, variant" is timed (every matching --only item marked used).
bool any_selected(OnlySelection& only, const std::string& op, const std::vector<std::string>& variants) {
  bool any = false;
  for (const std::string& variant : variants) any = selected(only, op, variant) || any;
  return any;
}

// The variants of the rows timed against a step's own row (their baseline column).
std::string cold_variant(const Step& s) { return std::string(s.variant) + ", code cold"; }
std::string runs_ready_variant(const Step& s) { return std::string(s.variant) + ", runs ready at launch"; }
std::string slot_loads_variant(const Step& s, CompressorSlotLoads other) {
  return std::string(s.variant) + (other == CompressorSlotLoads::Staged ? ", staged slot loads"
                                   : other == CompressorSlotLoads::Lean ? ", lean slot loads"
                                                                        : ", register slot loads");
}
// The step's derived rows: add_cold_row's, add_runs_ready_row's and add_slot_loads_row's, and `extra` (the caller's).
std::vector<std::string> derived_variants(const Step& s, CompressorSlotLoads other, std::vector<std::string> extra) {
  extra.push_back(slot_loads_variant(s, other));
  if (s.start_in_window != -1) {  // the decode steps only
    extra.push_back(cold_variant(s));
    extra.push_back(runs_ready_variant(s));
  }
  return extra;
}

// The decode steps again with the runs loaded before the kernel's wait (runs_ready_at_launch, as the model's step
// inputs allow): against the same step without (baseline column).
void add_runs_ready_row(const Step& s, const std::string& op, double default_us, double bytes, double copy_gbps,
                        OnlySelection& only, cudaStream_t stream, std::vector<Row>& rows,
                        const std::function<void(cudaStream_t)>& body) {
  const std::string variant = runs_ready_variant(s);
  if (s.start_in_window == -1 || !selected(only, op, variant)) return;
  rows.push_back({op, variant, graph_us(stream, 20, body), bytes / (copy_gbps * 1e3), default_us, bytes,
                  "runs loaded before the wait; baseline: the same step with the runs after it"});
}

// The decode steps again with the instruction caches flushed before each call (cold_graph_us): against the same calls
// warm. Not the prefill chunks: their projections stream through L2 and evict the flusher's code, whose own time then
// grows (GPU round s24-1, H200: the CSA pair's 4096-token chunk 72.7 µs "cold" against 20.8 warm, 21.6 with the rows
// loaded evict-first).
void add_cold_row(const Step& s, const std::string& op, double warm_us, double bytes, double copy_gbps,
                  OnlySelection& only, const ColdCode& cold, cudaStream_t stream, std::vector<Row>& rows,
                  const std::function<void(cudaStream_t)>& body) {
  const std::string variant = cold_variant(s);
  if (s.start_in_window == -1 || !selected(only, op, variant)) return;
  rows.push_back({op, variant, cold_graph_us(stream, cold, body), bytes / (copy_gbps * 1e3), warm_us, bytes,
                  "instruction caches flushed before each call (its time taken off; no overlap with the previous "
                  "call); baseline: warm"});
}

// The slot loads Auto does not pick for the step (auto_loads: its choice for the step's prefill chunk): staged for a
// lean prefill chunk, lean for a staged CSA one, registers for HCA's; staged for decode steps (registers).
CompressorSlotLoads other_slot_loads(const Step& s, bool overlapping, CompressorSlotLoads auto_loads) {
  if (s.start_in_window != -1) return CompressorSlotLoads::Staged;
  if (auto_loads == CompressorSlotLoads::Lean) return CompressorSlotLoads::Staged;
  return overlapping ? CompressorSlotLoads::Lean : CompressorSlotLoads::Registers;
}

// Every step again with its slot loads forced to other_slot_loads: against the default (baseline column).
void add_slot_loads_row(const Step& s, CompressorSlotLoads other, const std::string& op, double default_us,
                        double bytes, double copy_gbps, OnlySelection& only, cudaStream_t stream,
                        std::vector<Row>& rows, const std::function<void(cudaStream_t)>& body) {
  const bool prefill = s.start_in_window == -1;
  const std::string variant = slot_loads_variant(s, other);
  if (!selected(only, op, variant)) return;
  const char* note = other == CompressorSlotLoads::Lean ? "lean loads, 128-thread CTAs; baseline: the default (staged)"
                     : other == CompressorSlotLoads::Registers ? "loads into registers; baseline: the default (staged)"
                     : prefill ? "cp.async ring in shared memory, 256-thread CTAs; baseline: the default (lean loads)"
                               : "cp.async ring in shared memory, 256-thread CTAs; baseline: the default (registers)";
  rows.push_back({op, variant, graph_us(stream, 20, body), bytes / (copy_gbps * 1e3), default_us, bytes, note});
}

void bench_compressor(Compressor& k, double copy_gbps, OnlySelection& only, const ColdCode& cold,
                      cudaStream_t stream, std::vector<Row>& rows) {
  for (const Step& s : kSteps) {
    // The step's own row is timed when it or a row derived from it is selected (their baseline).
    const std::string table_variant = std::string(s.variant) + ", RoPE table";
    const DeviceBuffer runs = runs_of(start_of(s, k), s.tokens, s.sequences);
    const CompressorParams alone = k.params(0, runs, s.sequences, s.tokens, stream);
    const CompressorSlotLoads other = other_slot_loads(s, k.overlapping, compressor_slot_loads({&alone, 1}));
    const bool own = selected(only, std::string("compressor ") + k.name, s.variant);
    if (!any_selected(only, std::string("compressor ") + k.name, derived_variants(s, other, {table_variant})) && !own)
      continue;
    const double us = graph_us(stream, 20, [&](cudaStream_t on) {
      run_compressor(k.params(k.next_copy(), runs, s.sequences, s.tokens, on));
    });
    const double bytes = bytes_of(s, k);
    if (own) {
      const int64_t entries = entries_of(s, k);
      const double baseline_us =
          entries == 0 ? 0.0
                       : graph_us(stream, 20, [&](cudaStream_t on) { k.baseline(k.next_copy(), entries, on); });
      rows.push_back({std::string("compressor ") + k.name, s.variant, us, bytes / (copy_gbps * 1e3), baseline_us,
                      bytes, entries == 0 ? "" : "baseline: straightforward kernel, the entries from the rows alone"});
    }
    add_cold_row(s, std::string("compressor ") + k.name, us, bytes, copy_gbps, only, cold, stream, rows,
                 [&](cudaStream_t on) { run_compressor(k.params(k.next_copy(), runs, s.sequences, s.tokens, on)); });
    add_runs_ready_row(s, std::string("compressor ") + k.name, us, bytes, copy_gbps, only, stream, rows,
                       [&](cudaStream_t on) {
                         CompressorParams p = k.params(k.next_copy(), runs, s.sequences, s.tokens, on);
                         p.runs_ready_at_launch = true;
                         run_compressor(p);
                       });
    if (selected(only, std::string("compressor ") + k.name, table_variant))
      rows.push_back({std::string("compressor ") + k.name, table_variant, graph_us(stream, 20, [&](cudaStream_t on) {
                        CompressorParams p = k.params(k.next_copy(), runs, s.sequences, s.tokens, on);
                        p.rope_frequencies = nullptr, p.rope_table = k.rope_table.as<float2>();
                        run_compressor(p);
                      }),
                      bytes / (copy_gbps * 1e3), us, bytes,
                      "factors loaded from a per-position table; baseline: the default (double sincos)"});
    add_slot_loads_row(s, other, std::string("compressor ") + k.name, us, bytes, copy_gbps, only, stream, rows,
                       [&](cudaStream_t on) {
                         CompressorParams p = k.params(k.next_copy(), runs, s.sequences, s.tokens, on);
                         p.slot_loads = other;
                         run_compressor(p);
                       });
  }
}

// Diagnostic: the decode steps that complete windows with every split of an entry over CTAs forced.
void bench_splits(Compressor& k, double copy_gbps, OnlySelection& only, cudaStream_t stream,
                  std::vector<Row>& rows) {
  if (k.rounding == CompressorStoredRounding::IndexerFp4) return;  // no split with the indexer rounding
  // HCA's prefill chunk too (32 entries of 128 slots: the default splits them 8 ways, 256 CTAs).
  const std::vector<Step> steps =
      k.overlapping ? std::vector<Step>{kSteps[1], kSteps[2]} : std::vector<Step>{kSteps[1], kSteps[2], kSteps[3]};
  for (const Step& s : steps)
    for (const int ctas : {1, 2, 4, 8}) {
      const std::string variant = std::string(s.variant) + ", " + std::to_string(ctas) + " CTAs per entry";
      if (k.c % (64 * ctas) != 0 || !selected(only, std::string("compressor ") + k.name, variant)) continue;
      const DeviceBuffer runs = runs_of(start_of(s, k), s.tokens, s.sequences);
      const double us = graph_us(stream, 20, [&](cudaStream_t on) {
        CompressorParams p = k.params(k.next_copy(), runs, s.sequences, s.tokens, on);
        p.cluster_ctas = ctas;
        run_compressor(p);
      });
      const double bytes = bytes_of(s, k);
      rows.push_back({std::string("compressor ") + k.name, variant, us, bytes / (copy_gbps * 1e3), 0.0, bytes,
                      "diagnostic: cluster_ctas forced"});
    }
}

std::string prepare_variant(const Step& s) { return std::string(s.variant) + ", + indexer prepare"; }

// A decode step's CSA pair with the indexer's query preparation (64 heads × 128 per token, RoPE, reference rounding,
// bf16 out) in the same launch, against the pair's launch then run_indexer_prepare's (baseline).
void bench_with_prepare(Compressor& main, Compressor& index, const Step& s, const DeviceBuffer& runs, double pair_us,
                        OnlySelection& only, cudaStream_t stream, std::vector<Row>& rows) {
  const std::string op = "compressor CSA layer main + indexer";
  const std::string variant = prepare_variant(s);
  if (!selected(only, op, variant)) return;
  constexpr int64_t kHeads = 64, kHeadDim = 128;
  std::mt19937 rng(7);
  const DeviceBuffer q = to_device(normal_floats(size_t(s.sequences * kHeads * kHeadDim), 1.0f, rng), "raw q");
  const DeviceBuffer positions = to_device(std::vector<int64_t>(size_t(s.sequences), start_of(s, main)), "positions");
  DeviceBuffer prepared(size_t(s.sequences * kHeads * kHeadDim) * 2, "prepared q");
  const auto prepare = [&](cudaStream_t on) {
    return IndexerPrepareParams{.input = q.as<float>(),
                                .output = prepared.as<__nv_bfloat16>(),
                                .tokens = s.sequences,
                                .heads = kHeads,
                                .head_dim = kHeadDim,
                                .positions = positions.as<int64_t>(),
                                .rope_frequencies = main.frequencies.as<float>(),
                                .rope_dim = 64,
                                .reference_rounding = true,
                                .stream = on};
  };
  const auto pair = [&](cudaStream_t on, int i) {
    Compressor& k = i == 0 ? main : index;
    return k.params(k.next_copy(), runs, s.sequences, s.tokens, on);
  };
  const double one_us = graph_us(stream, 20, [&](cudaStream_t on) {
    const CompressorParams both[2] = {pair(on, 0), pair(on, 1)};
    run_compressors(both, prepare(on));
  });
  const double two_us = graph_us(stream, 20, [&](cudaStream_t on) {
    const CompressorParams both[2] = {pair(on, 0), pair(on, 1)};
    run_compressors(both);
    run_indexer_prepare(prepare(on));
  });
  rows.push_back({op, variant, one_us, 0.0, two_us, 0.0,
                  "one launch; baseline: the pair's launch + indexer_prepare (the pair alone: " +
                      std::to_string(pair_us).substr(0, 5) + " us)"});
}

// A CSA layer's two compressors per step: two launches (the baseline) against one run_compressors launch.
void bench_csa_layer(Compressor& main, Compressor& index, double copy_gbps, OnlySelection& only,
                     const ColdCode& cold, cudaStream_t stream, std::vector<Row>& rows) {
  for (const Step& s : kSteps) {
    // The step's own row is timed when it or a row derived from it is selected (their baseline).
    const DeviceBuffer runs = runs_of(start_of(s, main), s.tokens, s.sequences);
    const CompressorParams pair[2] = {main.params(0, runs, s.sequences, s.tokens, stream),
                                      index.params(0, runs, s.sequences, s.tokens, stream)};
    const CompressorSlotLoads other = other_slot_loads(s, true, compressor_slot_loads(pair));
    const bool own = selected(only, "compressor CSA layer main + indexer", s.variant);
    const std::vector<std::string> derived =
        derived_variants(s, other, s.start_in_window != -1 ? std::vector<std::string>{prepare_variant(s)}
                                                           : std::vector<std::string>{});
    if (!any_selected(only, "compressor CSA layer main + indexer", derived) && !own) continue;
    const double fused_us = graph_us(stream, 20, [&](cudaStream_t on) {
      const CompressorParams both[2] = {main.params(main.next_copy(), runs, s.sequences, s.tokens, on),
                                        index.params(index.next_copy(), runs, s.sequences, s.tokens, on)};
      run_compressors(both);
    });
    const double bytes = bytes_of(s, main) + bytes_of(s, index);
    if (own) {
      const double separate_us = graph_us(stream, 20, [&](cudaStream_t on) {
        run_compressor(main.params(main.next_copy(), runs, s.sequences, s.tokens, on));
        run_compressor(index.params(index.next_copy(), runs, s.sequences, s.tokens, on));
      });
      rows.push_back({"compressor CSA layer main + indexer", s.variant, fused_us, bytes / (copy_gbps * 1e3),
                      separate_us, bytes, "one run_compressors launch; baseline: two run_compressor launches"});
    }
    add_cold_row(s, "compressor CSA layer main + indexer", fused_us, bytes, copy_gbps, only, cold, stream, rows,
                 [&](cudaStream_t on) {
                   const CompressorParams both[2] = {main.params(main.next_copy(), runs, s.sequences, s.tokens, on),
                                                     index.params(index.next_copy(), runs, s.sequences, s.tokens, on)};
                   run_compressors(both);
                 });
    add_runs_ready_row(s, "compressor CSA layer main + indexer", fused_us, bytes, copy_gbps, only, stream, rows,
                       [&](cudaStream_t on) {
                         CompressorParams both[2] = {main.params(main.next_copy(), runs, s.sequences, s.tokens, on),
                                                     index.params(index.next_copy(), runs, s.sequences, s.tokens, on)};
                         both[0].runs_ready_at_launch = both[1].runs_ready_at_launch = true;
                         run_compressors(both);
                       });
    add_slot_loads_row(s, other, "compressor CSA layer main + indexer", fused_us, bytes, copy_gbps, only, stream, rows,
                       [&](cudaStream_t on) {
                         CompressorParams both[2] = {main.params(main.next_copy(), runs, s.sequences, s.tokens, on),
                                                     index.params(index.next_copy(), runs, s.sequences, s.tokens, on)};
                         both[0].slot_loads = both[1].slot_loads = other;
                         run_compressors(both);
                       });
    if (s.start_in_window != -1) bench_with_prepare(main, index, s, runs, fused_us, only, stream, rows);
  }
}

// The indexer compressor's key outputs as the model stores them, per slot: bf16 (the baseline) against e4m3 codes
// with a scale per key (slot_entries_fp8), for the decode steps.
void bench_key_outputs(Compressor& index, double copy_gbps, OnlySelection& only, cudaStream_t stream,
                       std::vector<Row>& rows) {
  const int64_t capacity = Compressor::kPrefill / index.ratio + 2, per_slot = capacity * index.c;
  DeviceBuffer bf16_keys(size_t(Compressor::kBatch * per_slot) * 2, "bf16 keys");
  DeviceBuffer fp8_keys(size_t(Compressor::kBatch * per_slot), "fp8 keys");
  DeviceBuffer scales(size_t(Compressor::kBatch * capacity) * 4, "key scales");
  for (const Step& s : {kSteps[0], kSteps[1], kSteps[2]}) {
    const std::string variant = std::string(s.variant) + ", fp8 keys + scale per slot";
    if (!selected(only, std::string("compressor ") + index.name, variant)) continue;
    const DeviceBuffer runs = runs_of(start_of(s, index), s.tokens, s.sequences);
    const auto keyed = [&](cudaStream_t on, bool fp8) {
      CompressorParams p = index.params(index.next_copy(), runs, s.sequences, s.tokens, on);
      p.entries = nullptr, p.slot_entry_capacity = capacity, p.slot_entry_stride = per_slot;
      if (fp8) {
        p.slot_entries_fp8 = fp8_keys.as<uint8_t>();
        p.slot_entry_scales = scales.as<float>(), p.slot_scale_stride = capacity;
      } else {
        p.slot_entries_bf16 = bf16_keys.as<__nv_bfloat16>();
      }
      return p;
    };
    const double fp8_us = graph_us(stream, 20, [&](cudaStream_t on) { run_compressor(keyed(on, true)); });
    const double bf16_us = graph_us(stream, 20, [&](cudaStream_t on) { run_compressor(keyed(on, false)); });
    const double bytes = bytes_of(s, index);
    rows.push_back({std::string("compressor ") + index.name, variant, fp8_us, bytes / (copy_gbps * 1e3), bf16_us,
                    bytes, "baseline: the same step storing bf16 keys per slot"});
  }
}

// --trace: one traced launch `launch(on, trace)` between prior_kernel (touching `touch`) and next_kernel, after an L2
// eviction when `cold`; kRepeats times, the last one's timeline printed per CTA (µs after the prior kernel's end),
// and every repeat's release of the next kernel.
template <class Launch>
void print_trace(const std::string& title, const Touch& touch, bool cold, size_t l2_bytes, cudaStream_t stream,
                 bool table, Launch&& launch) {
  constexpr int kRepeats = 5;
  constexpr int ctas = 64;  // the trace's room (the launcher refuses a launch of more CTAs; those that started print)
  DeviceBuffer trace(size_t(ctas) * kCompressorTracePoints * 8, "trace"), times(16, "times"), sink(16, "sink");
  DeviceBuffer flush(cold ? 2 * l2_bytes : 16, "L2 eviction buffer");
  flush.fill_bytes(0x5A);
  std::vector<uint64_t> host(size_t(ctas) * kCompressorTracePoints);
  std::string released;
  for (int repeat = 0; repeat < kRepeats; ++repeat) {
    trace.fill_bytes(0);
    if (cold) {
      evict_l2_kernel<<<1024, 256, 0, stream>>>(flush.as<uint4>(), flush.bytes() / 16, sink.as<uint32_t>());
      DSV4_CUDA_CHECK_LAUNCH("evict_l2_kernel");
    }
    prior_kernel<<<1, 32, 0, stream>>>(touch, 5000, times.as<uint64_t>(), sink.as<uint32_t>());
    DSV4_CUDA_CHECK_LAUNCH("prior_kernel");
    launch(stream, trace.as<uint64_t>(), ctas);
    launch_chained(next_kernel, dim3(1), dim3(32), 0, stream, times.as<uint64_t>() + 1, "next_kernel");
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
    uint64_t t[2];
    times.download(t, 16);
    trace.download(host.data(), trace.bytes());
    char text[32];
    std::snprintf(text, sizeof text, "%s%.2f", repeat == 0 ? "" : " / ", 1e-3 * double(int64_t(t[1] - t[0])));
    released += text;
    if (repeat + 1 < kRepeats) continue;
    std::printf("trace %s, %s: next kernel released %s µs after the prior kernel's end\n", title.c_str(),
                cold ? "L2 evicted" : "L2 hot", released.c_str());
    if (!table) return;
    std::printf("| CTA |");
    for (int point = 0; point < kCompressorTracePoints; ++point)
      std::printf(" %s |", compressor_trace_point_name(point));
    std::printf("\n|---|");
    for (int point = 0; point < kCompressorTracePoints; ++point) std::printf("---|");
    std::printf("\n");
    for (int c = 0; c < ctas; ++c) {
      const uint64_t* r = host.data() + size_t(c) * kCompressorTracePoints;
      if (r[COMPRESSOR_TRACE_START] == 0) continue;
      std::printf("| %d | %llu |", c, (unsigned long long)r[COMPRESSOR_TRACE_SM]);
      for (int point = COMPRESSOR_TRACE_START; point < kCompressorTracePoints; ++point) {
        if (r[point] == 0)
          std::printf(" - |");
        else
          std::printf(" %.2f |", 1e-3 * double(int64_t(r[point] - t[0])));
      }
      std::printf("\n");
    }
  }
}

// The step's row (row 0) of a compressor's first projection copy (the one traced calls read), for prior_kernel.
void touch_row(Touch& touch, int& n, const Compressor& k) {
  const int words = int(k.width() * 4 / 16);
  touch.range[n] = k.kv[0].as<uint4>(), touch.words[n++] = words;
  touch.range[n] = k.gate[0].as<uint4>(), touch.words[n++] = words;
}

// The model's outputs for a traced decode launch (sequence slot 0): the main compressors' entries into a paged fp8
// KV cache (layer 0 CSA, layer 1 HCA), the indexer's keys as e4m3 codes + a scale per key, RoPE factors from the
// per-position table.
struct ModelOutputs {
  static constexpr int64_t kRows = Compressor::kPrefill / 4 + 2;
  KvCache cache;
  DeviceBuffer keys, scales;

  ModelOutputs()
      : cache(KvCacheConfig{.format = KvEntryFormat::Fp8Reference, .head_dim = 512, .rope_dim = 64, .layers = 2,
                            .max_sequences = 1, .max_compressed_rows = kRows, .page_rows = 64, .pages = 64}),
        keys(size_t(kRows * 128), "fp8 keys"), scales(size_t(kRows * 4), "key scales") {
    check(cache.add_sequence() == 0, "bench_cuda_compressor: the trace's cache slot");
    for (int layer = 0; layer < 2; ++layer) cache.ensure_rows(0, layer, KvArray::Compressed, kRows);
    cache.upload_page_table(nullptr);
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // k's params for the runs (one token of slot 0) with the model's output: the cache's `layer`, or the fp8 keys.
  CompressorParams params(Compressor& k, const DeviceBuffer& runs, int layer, cudaStream_t on) {
    CompressorParams p = k.params(0, runs, 1, 1, on);  // the first projection copy (touch_row)
    p.entries = nullptr, p.rope_frequencies = nullptr, p.rope_table = k.rope_table.as<float2>();
    if (k.rounding == CompressorStoredRounding::IndexerFp4) {
      p.slot_entries_fp8 = keys.as<uint8_t>(), p.slot_entry_scales = scales.as<float>();
      p.slot_entry_capacity = kRows, p.slot_entry_stride = kRows * k.c, p.slot_scale_stride = kRows;
    } else {
      p.stored_rounding = CompressorStoredRounding::None, p.cache = cache.view(), p.cache_layer = layer;
    }
    return p;
  }
};

void trace_decode(Compressor& main, Compressor& index, Compressor& hca, size_t l2_bytes, cudaStream_t stream) {
  constexpr int64_t kHeads = 64, kHeadDim = 128;
  std::mt19937 rng(7);
  const DeviceBuffer q = to_device(normal_floats(size_t(kHeads * kHeadDim), 1.0f, rng), "raw q");
  DeviceBuffer prepared(size_t(kHeads * kHeadDim), "prepared fp8 q"), prepared_scales(size_t(kHeads) * 4, "q scales");
  ModelOutputs out;
  for (const Step& s : {kSteps[0], kSteps[1]}) {
    for (const bool cold : {false, true}) {
      const DeviceBuffer runs = runs_of(start_of(s, main), s.tokens, s.sequences);
      const DeviceBuffer positions = to_device(std::vector<int64_t>(1, start_of(s, main)), "positions");
      bool runs_at_launch = false;
      const auto csa = [&](cudaStream_t on, uint64_t* trace, int64_t trace_ctas) {
        CompressorParams both[2] = {out.params(main, runs, 0, on), out.params(index, runs, 0, on)};
        both[0].trace = both[1].trace = trace;
        both[0].trace_ctas = both[1].trace_ctas = trace_ctas;
        both[0].runs_ready_at_launch = both[1].runs_ready_at_launch = runs_at_launch;
        run_compressors(both, IndexerPrepareParams{.input = q.as<float>(),
                                                   .output_fp8 = prepared.as<uint8_t>(),
                                                   .output_scales = prepared_scales.as<float>(),
                                                   .tokens = 1,
                                                   .heads = kHeads,
                                                   .head_dim = kHeadDim,
                                                   .positions = positions.as<int64_t>(),
                                                   .rope_frequencies = main.frequencies.as<float>(),
                                                   .rope_dim = 64,
                                                   .reference_rounding = true,
                                                   .stream = on});
      };
      Touch touch;
      int n = 0;
      touch_row(touch, n, main);
      touch_row(touch, n, index);
      touch.range[n] = runs.as<uint4>(), touch.words[n++] = 1;  // the run's 32-byte sector
      touch.range[n] = q.as<uint4>(), touch.words[n++] = int(kHeads * kHeadDim * 4 / 16);
      touch.range[n] = positions.as<uint4>(), touch.words[n++] = 1;
      const std::string title = std::string("CSA layer main + indexer + indexer prepare, ") + s.variant;
      print_trace(title, touch, cold, l2_bytes, stream, true, csa);
      runs_at_launch = true;
      print_trace(title + ", runs ready at launch", touch, cold, l2_bytes, stream, false, csa);
    }
    for (const bool cold : {false, true}) {
      const DeviceBuffer runs = runs_of(start_of(s, hca), s.tokens, s.sequences);
      Touch touch;
      int n = 0;
      touch_row(touch, n, hca);
      touch.range[n] = runs.as<uint4>(), touch.words[n++] = 1;  // the run's 32-byte sector
      print_trace(std::string("HCA, ") + s.variant, touch, cold, l2_bytes, stream, true,
                  [&](cudaStream_t on, uint64_t* trace, int64_t trace_ctas) {
                    CompressorParams p = out.params(hca, runs, 1, on);
                    p.trace = trace;
                    p.trace_ctas = trace_ctas;
                    run_compressor(p);
                  });
    }
  }
}

// --trace-prefill: a prefill chunk traced (the CSA layer's pair, lean; HCA, staged), launched
// right behind an untraced launch of the same chunk (as a graph replays it); per pool a summary of its CTAs' points:
// when they start and end (µs after the launch's first CTA started), the lifetimes and each phase between points
// (median / p90 / max over the CTAs), the CTAs resident per SM (time-averaged over the launch, and the most), and the
// points of the CTA that ended last.
void print_prefill_trace(const std::string& title, const std::vector<uint64_t>& host,
                         const std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>>& pools) {
  const auto at = [&](int64_t cta, int point) { return host[size_t(cta) * kCompressorTracePoints + size_t(point)]; };
  uint64_t origin = ~uint64_t(0), last = 0;
  for (const auto& pool : pools)
    for (int64_t c = pool.second.first; c < pool.second.second; ++c)
      if (at(c, COMPRESSOR_TRACE_START) != 0) {
        origin = std::min(origin, at(c, COMPRESSOR_TRACE_START));
        last = std::max(last, at(c, COMPRESSOR_TRACE_END));
      }
  const auto us = [&](uint64_t t) { return 1e-3 * double(int64_t(t - origin)); };
  std::printf("trace prefill %s: launch span %.2f µs (first CTA start to last CTA end)\n", title.c_str(),
              us(last));
  const auto percentile = [](std::vector<double> v, double q) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(q * double(v.size())))];
  };
  for (const auto& pool : pools) {
    std::vector<double> starts, ends, lifetimes;
    std::vector<std::vector<double>> phases(kCompressorTracePoints);
    std::map<uint64_t, std::vector<std::pair<uint64_t, int>>> sm_events;
    for (int64_t c = pool.second.first; c < pool.second.second; ++c) {
      if (at(c, COMPRESSOR_TRACE_START) == 0 || at(c, COMPRESSOR_TRACE_END) == 0) continue;
      starts.push_back(us(at(c, COMPRESSOR_TRACE_START)));
      ends.push_back(us(at(c, COMPRESSOR_TRACE_END)));
      lifetimes.push_back(ends.back() - starts.back());
      int previous = COMPRESSOR_TRACE_START;
      for (int point = COMPRESSOR_TRACE_START + 1; point < kCompressorTracePoints; ++point) {
        if (at(c, point) == 0) continue;
        phases[size_t(point)].push_back(1e-3 * double(int64_t(at(c, point) - at(c, previous))));
        previous = point;
      }
      sm_events[at(c, COMPRESSOR_TRACE_SM)].push_back({at(c, COMPRESSOR_TRACE_START), 1});
      sm_events[at(c, COMPRESSOR_TRACE_SM)].push_back({at(c, COMPRESSOR_TRACE_END), -1});
    }
    int most = 0;
    double resident_ns = 0;
    for (auto& [sm, events] : sm_events) {
      std::sort(events.begin(), events.end());
      int now = 0;
      for (size_t i = 0; i < events.size(); ++i) {
        if (i > 0) resident_ns += double(now) * double(events[i].first - events[i - 1].first);
        now += events[i].second;
        most = std::max(most, now);
      }
    }
    std::printf("  %s: %zu CTAs on %zu SMs; start p0/p50/p100 %.2f / %.2f / %.2f µs, end %.2f / %.2f / %.2f; "
                "lifetime p50 %.2f p90 %.2f; resident per SM %.2f (time-averaged over the span), most %d\n",
                pool.first.c_str(), starts.size(), sm_events.size(), percentile(starts, 0), percentile(starts, 0.5),
                percentile(starts, 1), percentile(ends, 0), percentile(ends, 0.5), percentile(ends, 1),
                percentile(lifetimes, 0.5), percentile(lifetimes, 0.9),
                resident_ns / (1e3 * us(last)) / double(std::max<size_t>(sm_events.size(), 1)), most);
    std::printf("   phases (µs from the previous point, p50 / p90 / max):");
    for (int point = COMPRESSOR_TRACE_START + 1; point < kCompressorTracePoints; ++point)
      if (!phases[size_t(point)].empty())
        std::printf(" %s %.2f / %.2f / %.2f;", compressor_trace_point_name(point),
                    percentile(phases[size_t(point)], 0.5), percentile(phases[size_t(point)], 0.9),
                    percentile(phases[size_t(point)], 1.0));
    std::printf("\n");
    // The CTA that ended last: its points (µs after the launch's first start).
    int64_t last_cta = -1;
    for (int64_t c = pool.second.first; c < pool.second.second; ++c)
      if (at(c, COMPRESSOR_TRACE_END) != 0 &&
          (last_cta < 0 || at(c, COMPRESSOR_TRACE_END) > at(last_cta, COMPRESSOR_TRACE_END)))
        last_cta = c;
    if (last_cta < 0) continue;
    std::printf("   last to end: CTA %lld on SM %llu:", (long long)last_cta,
                (unsigned long long)at(last_cta, COMPRESSOR_TRACE_SM));
    for (int point = COMPRESSOR_TRACE_START; point < kCompressorTracePoints; ++point)
      if (at(last_cta, point) != 0)
        std::printf(" %s %.2f;", compressor_trace_point_name(point), us(at(last_cta, point)));
    std::printf("\n");
  }
}

void trace_prefill(Compressor& main, Compressor& index, Compressor& hca, int64_t tokens, cudaStream_t stream) {
  constexpr int64_t kRoom = 4096;
  DeviceBuffer trace(size_t(kRoom) * kCompressorTracePoints * 8, "trace");
  std::vector<uint64_t> host(size_t(kRoom) * kCompressorTracePoints);
  const Step s{"prefill chunk", -1, tokens, 1};
  const DeviceBuffer runs = runs_of(start_of(s, main), s.tokens, s.sequences);
  const auto traced = [&](const std::function<void(uint64_t*)>& launch) {
    launch(nullptr);
    trace.fill_bytes(0);
    launch(nullptr);
    launch(trace.as<uint64_t>());
    DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
    trace.download(host.data(), trace.bytes());
  };
  // The pools' CTA ranges as the launcher plans them.
  const auto range = [](const CompressorCtaRange& r) {
    return std::pair<int64_t, int64_t>{r.first_cta, r.first_cta + r.ctas};
  };
  const CompressorParams planned[2] = {main.params(0, runs, 1, s.tokens, stream),
                                       index.params(0, runs, 1, s.tokens, stream)};
  const CompressorLaunchShape pair = compressor_launch_shape(planned);
  traced([&](uint64_t* t) {
    CompressorParams both[2] = {main.params(main.next_copy(), runs, 1, s.tokens, stream),
                                index.params(index.next_copy(), runs, 1, s.tokens, stream)};
    both[0].trace = both[1].trace = t;
    both[0].trace_ctas = both[1].trace_ctas = kRoom;
    run_compressors(both);
  });
  const std::string chunk = ", chunk of " + std::to_string(tokens);
  print_prefill_trace("CSA layer main + indexer (lean)" + chunk, host,
                      {{"main", range(pair.pools[0])}, {"indexer", range(pair.pools[1])}});
  const DeviceBuffer hca_runs = runs_of(start_of(s, hca), s.tokens, s.sequences);
  const CompressorParams hca_planned = hca.params(0, hca_runs, 1, s.tokens, stream);
  const CompressorLaunchShape alone = compressor_launch_shape({&hca_planned, 1});
  traced([&](uint64_t* t) {
    CompressorParams p = hca.params(hca.next_copy(), hca_runs, 1, s.tokens, stream);
    p.trace = t, p.trace_ctas = kRoom;
    run_compressor(p);
  });
  print_prefill_trace("HCA (staged)" + chunk, host, {{"HCA", range(alone.pools[0])}});
}

int run(int argc, char** argv) {
  std::string json_path;
  OnlySelection only;  // --only's '|'-separated parts of row names
  bool trace = false, trace_chunk = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc)
      json_path = argv[++i];
    else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc)
      only = OnlySelection(argv[++i], '|', OnlyMatch::Substring);
    else if (std::strcmp(argv[i], "--trace") == 0)
      trace = true;
    else if (std::strcmp(argv[i], "--trace-prefill") == 0)
      trace_chunk = true;
    else
      fail("unknown argument ", argv[i],
           " (usage: bench_cuda_compressor [--json PATH] [--only TEXT[|TEXT...]] [--trace] [--trace-prefill])");
  }
  const std::vector<DeviceInfo> devices = list_devices();
  if (devices.empty()) {
    std::fprintf(stderr, "bench_cuda_compressor: no CUDA device\n");
    return 1;
  }
  const DeviceInfo& device = devices.front();
  const double copy_gbps = copy_bandwidth_gbps();
  std::printf("device: %s (%d SMs); copy bandwidth %.0f GB/s\n", device.name.c_str(), device.multiprocessors,
              copy_gbps);
  cudaStream_t stream;
  DSV4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::mt19937 rng(42);
  std::vector<Row> rows;
  DeviceBuffer flush_sink(16, "flusher sink");
  const ColdCode cold{.sms = device.multiprocessors, .sink = flush_sink.as<float>()};
  if (trace || trace_chunk) {
    check(only.all(), "--only selects timed rows; --trace and --trace-prefill take none");
    Compressor main("CSA main c=512 m=4", 512, 4, true, CompressorStoredRounding::KvFp8, rng);
    Compressor index("CSA indexer c=128 m=4", 128, 4, true, CompressorStoredRounding::IndexerFp4, rng);
    Compressor hca("HCA c=512 m=128", 512, 128, false, CompressorStoredRounding::KvFp8, rng);
    for (Compressor* k : {&main, &index, &hca}) k->fill_state(stream);
    if (trace) trace_decode(main, index, hca, device.l2_bytes, stream);
    if (trace_chunk)
      for (const int64_t tokens : {Compressor::kPrefill, int64_t(512)}) trace_prefill(main, index, hca, tokens, stream);
    DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
  }
  {
    Compressor main("CSA main c=512 m=4", 512, 4, true, CompressorStoredRounding::KvFp8, rng);
    Compressor index("CSA indexer c=128 m=4", 128, 4, true, CompressorStoredRounding::IndexerFp4, rng);
    main.fill_state(stream);
    index.fill_state(stream);
    bench_compressor(main, copy_gbps, only, cold, stream, rows);
    bench_compressor(index, copy_gbps, only, cold, stream, rows);
    bench_csa_layer(main, index, copy_gbps, only, cold, stream, rows);
    bench_key_outputs(index, copy_gbps, only, stream, rows);
    bench_splits(main, copy_gbps, only, stream, rows);
  }
  {
    Compressor hca("HCA c=512 m=128", 512, 128, false, CompressorStoredRounding::KvFp8, rng);
    hca.fill_state(stream);
    bench_compressor(hca, copy_gbps, only, cold, stream, rows);
    bench_splits(hca, copy_gbps, only, stream, rows);
  }
  DSV4_CUDA_CHECK(cudaStreamDestroy(stream));

  std::printf("| op | case | µs | floor µs | %% of floor | baseline µs | × baseline | note |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    char baseline[32] = "-", speedup[32] = "-";
    if (r.baseline_us > 0) {
      std::snprintf(baseline, sizeof baseline, "%.2f", r.baseline_us);
      std::snprintf(speedup, sizeof speedup, "%.2f×", r.baseline_us / r.us);
    }
    std::printf("| %s | %s | %.2f | %.2f | %.0f %% | %s | %s | %s |\n", r.op.c_str(), r.variant.c_str(), r.us,
                r.floor_us, r.us > 0 ? 100.0 * r.floor_us / r.us : 0.0, baseline, speedup, r.note.c_str());
  }
  if (!json_path.empty()) {
    FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_compressor: cannot write ", json_path);
    std::fprintf(out,
                 "{\n  \"benchmark\": \"bench_cuda_compressor\",\n  \"device\": \"%s\",\n  \"multiprocessors\": %d,\n"
                 "  \"copy_bandwidth_gbps\": %.1f,\n  \"results\": [\n",
                 device.name.c_str(), device.multiprocessors, copy_gbps);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(out,
                   "    {\"op\": \"%s\", \"case\": \"%s\", \"us\": %.3f, \"floor_us\": %.3f, "
                   "\"percent_of_floor\": %.1f, \"baseline_us\": %.3f, \"bytes\": %.0f, \"note\": \"%s\"}%s\n",
                   r.op.c_str(), r.variant.c_str(), r.us, r.floor_us, r.us > 0 ? 100.0 * r.floor_us / r.us : 0.0,
                   r.baseline_us, r.bytes, r.note.c_str(), i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  }
  only.require_all_used();
  return 0;
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  return dsv4::cuda::run_benchmark_main("bench_cuda_compressor", dsv4::cuda::run, argc, argv);
}
