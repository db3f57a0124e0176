// The CUDA MoE sub-block (run_moe) against dsv4::cpu::moe_forward and the CPU ops it is built from: d = 4096,
// I = 2048, E = 32, top 6; routed experts MXFP4, NVFP4, FP8 (shared expert FP8, as in the release) and BF16; scored
// routing with a bias and hash routing; T ∈ {1, 3, 8, 17, 64, 300}, each through both expert kernel sets (register;
// streamed with the routing and combine fused into the router and down launches at T <= 8) and at T = 1 the
// streamed kernels unfused, the fused combine also through one workspace over many calls and graph replays; the
// streamed kernels with
// weight_tile_mma's fp4 decode instead of the default lean one (MoeRunParams::lean_expert_decode: the same bits); the
// streamed kernels with the shared expert never split and split at every T <= 8 (MoeRunParams::
// shared_expert_split, within one wave by default: the shared expert's sums in another order, so checked against the
// CPU, and run to run) and the down head start other than the default
// (MoeRunParams::down_head_start: the same bits, alone and with the split); at T <= 2 the fp4 column stages other
// than the default (MoeRunParams::column_stages: fp4 block sums in another order, checked against the CPU and run
// to run; the same bits as without them at T > 2); the down CTAs waiting for the whole gate/up grid instead of their
// own item's gate/up CTAs (MoeRunParams::down_waits_per_item other than the default: the same bits); a V4-Pro-width
// layer (d 7168, I 3072); experts with no token, every token on one expert; run-to-run bit equality; the upload's fp4
// repack (weight_tile_mma.cuh Fp4Layout::DEVICE) decoding to the checkpoint order's pairs.
// Fresh random weights and inputs (fixed seeds), the output and the workspace poisoned with NaN (plus a guard region
// past the output) before each run, every element checked, NaN never passes.
//
// What the GPU rounds, and the tolerances that follow:
// - u: the expert GEMMs read it as bf16. The test draws u bf16-representable, so that rounding is exact and the CPU
//   reference sees the same u (the router reads u in fp32 on both sides).
// - h = SwiGLU(w1 u, w3 u) is stored as bf16 between the two GEMMs (the CPU keeps fp32): checked per element
//   against the CPU's h within 2^-8·|h| (half an ulp is 2^-9) plus the fp32-order term below.
// - Every sum is fp32 in another order than the CPU's: bounded by 3e-5 · Σ|w|·|x| (tensor-core accumulation of
//   bf16 products in fp32 blocks; the bound is ~10× the typical error and far below any indexing or scale bug).
// - The routing (ids, weights), the expert-sorted row of every slot, each expert's down output (w2 applied to the
//   GPU's own h) and the combine are checked tightly on their own, so the end-to-end comparison with
//   cpu::moe_forward only has to absorb the h rounding: 2^-8 · Σ_k w_k Σ_j |w2_ij|·|h_kj| + the fp32 term.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/linear.hpp"
#include "backends/cpu/moe.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/moe.hpp"
#include "backends/cuda/moe_weights.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

struct Shape {
  int64_t hidden, intermediate, experts, top_k, vocab;
};
// V4-Flash sizes with fewer experts (the CPU reference holds every expert on the host).
constexpr Shape kFlashLike{.hidden = 4096, .intermediate = 2048, .experts = 32, .top_k = 6, .vocab = 1000};
constexpr float kScaling = 1.5f, kLimit = 10.0f;
constexpr double kOrderTolerance = 3e-5;        // fp32 summation in another order, relative to Σ|terms|
constexpr double kHRounding = 1.0 / 256.0;      // h stored as bf16: 2^-8 relative (twice the half-ulp)

MoeConfig test_config(const Shape& S) {
  return MoeConfig{.hidden = S.hidden,
                   .intermediate = S.intermediate,
                   .experts = S.experts,
                   .top_k = S.top_k,
                   .routed_scaling_factor = kScaling,
                   .swiglu_limit = kLimit};
}

cpu::MoeParams cpu_params(const Shape& S, int64_t tokens) {
  return cpu::MoeParams{.tokens = tokens,
                        .hidden = S.hidden,
                        .intermediate = S.intermediate,
                        .experts = S.experts,
                        .top_k = S.top_k,
                        .routed_scaling_factor = kScaling,
                        .swiglu_limit = kLimit};
}

// Random stored weights whose dot product with a unit-variance input has a standard deviation near `output_std`:
// valid codes of the format (no e4m3 NaN), per-block scales varying by ±1 binade so the scale handling matters.
OwnedQuantizedMatrix random_weight(WeightFormat format, int64_t rows, int64_t cols, double output_std,
                                   std::mt19937_64& rng) {
  const double per_weight_std = output_std / std::sqrt(double(cols));
  switch (format) {
    case WeightFormat::MXFP4:
    case WeightFormat::NVFP4: {
      const bool nv = format == WeightFormat::NVFP4;
      constexpr double kCodeRms = 2.93;  // rms of e2m1 over its 16 codes
      const double scale = per_weight_std / kCodeRms;
      const float global = nv ? float(scale / 1.1) : 1.0f;  // e4m3 block codes 0x30..0x3F average ≈ 1.1
      OwnedQuantizedMatrix m = allocate_quantized_matrix(format, rows, cols, nv ? ScaleType::E4M3 : ScaleType::E8M0,
                                                         global);
      for (size_t i = 0; i < m.storage->data.size(); i += 8) {
        const uint64_t r = rng();
        std::memcpy(m.storage->data.data() + i, &r, std::min<size_t>(8, m.storage->data.size() - i));
      }
      const int exponent = int(std::lround(std::log2(scale)));
      for (uint8_t& s : m.storage->scales)
        s = nv ? uint8_t(0x30 + rng() % 16) : uint8_t(127 + exponent + int(rng() % 3) - 1);
      return m;
    }
    case WeightFormat::FP8_BLOCK128: {
      // Codes with exponent field 5..9: |value| in [0.25, 3.75], rms ≈ 1.6.
      const int exponent = int(std::lround(std::log2(per_weight_std / 1.6)));
      OwnedQuantizedMatrix m = allocate_quantized_matrix(format, rows, cols, ScaleType::E8M0);
      std::vector<uint8_t>& data = m.storage->data;
      for (size_t i = 0; i < data.size(); i += 8) {
        const uint64_t r = rng();
        for (size_t j = 0; j < 8 && i + j < data.size(); ++j) {
          const uint32_t b = uint32_t(r >> (8 * j)) & 0xFF;
          data[i + j] = uint8_t((b & 0x80) | ((5 + ((b >> 3) & 15) % 5) << 3) | (b & 7));
        }
      }
      for (uint8_t& s : m.storage->scales) s = uint8_t(127 + exponent + int(rng() % 3) - 1);
      return m;
    }
    case WeightFormat::BF16: {
      OwnedQuantizedMatrix m = allocate_quantized_matrix(format, rows, cols, ScaleType::NONE);
      // Uniform in ±√3·std (the same variance), four values per draw.
      const float half_width = float(per_weight_std * std::sqrt(3.0));
      auto* values = reinterpret_cast<uint16_t*>(m.storage->data.data());
      for (int64_t i = 0; i < rows * cols; i += 4) {
        const uint64_t r = rng();
        for (int64_t j = 0; j < 4 && i + j < rows * cols; ++j)
          values[i + j] = float_to_bf16((float((r >> (16 * j)) & 0xFFFF) / 32767.5f - 1.0f) * half_width);
      }
      return m;
    }
    default: fail("test_moe: no random weights for ", to_string(format));
  }
}

// |W|: the same matrix with every sign bit cleared (scales are positive), for Σ|w|·|x| bounds through cpu::linear.
OwnedQuantizedMatrix absolute(const QuantizedMatrix& w) {
  OwnedQuantizedMatrix m = allocate_quantized_matrix(w.format, w.rows, w.cols, w.scale_type, w.global_scale);
  std::memcpy(m.storage->data.data(), w.data, w.data_bytes());
  std::memcpy(m.storage->scales.data(), w.scales, w.scale_bytes());
  uint8_t* data = m.storage->data.data();
  for (size_t i = 0; i < w.data_bytes(); ++i) {
    switch (w.format) {
      case WeightFormat::MXFP4:
      case WeightFormat::NVFP4: data[i] &= 0x77; break;         // both nibbles' sign bits
      case WeightFormat::FP8_BLOCK128: data[i] &= 0x7F; break;
      case WeightFormat::BF16: if (i % 2 == 1) data[i] &= 0x7F; break;  // little-endian high byte
      default: fail("test_moe: no |W| for ", to_string(w.format));
    }
  }
  return m;
}

// The expert weights of one format (routed) plus an FP8 shared expert, and |w2| of each for the bounds.
struct ExpertSet {
  Shape shape;
  std::vector<ExpertWeights> experts;
  ExpertWeights shared;
  std::vector<OwnedQuantizedMatrix> abs_w2;  // [E + 1], [E] = shared
  std::vector<std::vector<float>> l1_w1, l1_w3;  // [E + 1][I]: Σ_j |w_ij| per row, for the fp32-order bound of h
};

ExpertWeights random_expert(WeightFormat format, const Shape& S, std::mt19937_64& rng) {
  // w1/w3 outputs ≈ N(0, 6²): a fair share beyond ±10 exercises the clamps; w2 keeps the output O(1).
  return ExpertWeights{.w1 = random_weight(format, S.intermediate, S.hidden, 6.0, rng).matrix,
                       .w2 = random_weight(format, S.hidden, S.intermediate, 0.1, rng).matrix,
                       .w3 = random_weight(format, S.intermediate, S.hidden, 6.0, rng).matrix};
}

ExpertSet make_experts(WeightFormat routed_format, const Shape& S, uint64_t seed) {
  std::mt19937_64 rng(seed);
  ExpertSet set{.shape = S};
  for (int64_t e = 0; e < S.experts; ++e) set.experts.push_back(random_expert(routed_format, S, rng));
  set.shared = random_expert(routed_format == WeightFormat::BF16 ? WeightFormat::BF16 : WeightFormat::FP8_BLOCK128,
                             S, rng);
  const std::vector<float> ones(static_cast<size_t>(S.hidden), 1.0f);
  auto row_l1 = [&](const QuantizedMatrix& w) {
    std::vector<float> l1(static_cast<size_t>(w.rows));
    cpu::linear(absolute(w).matrix, ones.data(), 1, l1.data());
    return l1;
  };
  for (int64_t e = 0; e <= S.experts; ++e) {
    const ExpertWeights& x = e < S.experts ? set.experts[size_t(e)] : set.shared;
    set.abs_w2.push_back(absolute(x.w2));
    set.l1_w1.push_back(row_l1(x.w1));
    set.l1_w3.push_back(row_l1(x.w3));
  }
  return set;
}

enum class Routing { SCORED, HASH };

struct Layer {
  Shape shape;
  MoeWeights model;
  OwnedQuantizedMatrix router;
  std::vector<cpu::ExpertWeights> cpu_experts;
  cpu::MoeWeights cpu;
};

// Builds the layer around `experts` (shared, not copied: QuantizedMatrix borrows the bytes).
void make_layer(Layer& layer, const ExpertSet& experts, Routing routing, uint64_t seed,
                const std::function<void(std::vector<float>& bias, std::vector<int32_t>& tid2eid)>& adjust) {
  const Shape& S = experts.shape;
  layer.shape = S;
  std::mt19937_64 rng(seed);
  layer.router = random_weight(WeightFormat::BF16, S.experts, S.hidden, 2.0, rng);
  layer.model.gate = layer.router.matrix;
  layer.model.experts = experts.experts;
  layer.model.shared = experts.shared;
  layer.model.gate_bias.clear();
  layer.model.tid2eid.clear();
  if (routing == Routing::SCORED) {
    std::normal_distribution<float> normal(0.0f, 0.1f);
    for (int64_t e = 0; e < S.experts; ++e) layer.model.gate_bias.push_back(normal(rng));
  } else {
    for (int64_t v = 0; v < S.vocab; ++v) {
      std::vector<int32_t> ids(S.experts);
      for (int32_t e = 0; e < S.experts; ++e) ids[size_t(e)] = e;
      std::shuffle(ids.begin(), ids.end(), rng);
      layer.model.tid2eid.insert(layer.model.tid2eid.end(), ids.begin(), ids.begin() + S.top_k);
    }
  }
  adjust(layer.model.gate_bias, layer.model.tid2eid);
  layer.cpu_experts.clear();
  for (const ExpertWeights& e : layer.model.experts) layer.cpu_experts.push_back({&e.w1, &e.w2, &e.w3});
  layer.cpu = cpu::MoeWeights{
      .gate = &layer.model.gate,
      .gate_bias = layer.model.gate_bias.empty() ? nullptr : layer.model.gate_bias.data(),
      .tid2eid = layer.model.tid2eid.empty() ? nullptr : layer.model.tid2eid.data(),
      .vocab = layer.model.tid2eid.empty() ? 0 : S.vocab,
      .experts = layer.cpu_experts.data(),
      .shared = {&layer.model.shared.w1, &layer.model.shared.w2, &layer.model.shared.w3},
  };
}

// Biased scores of one token in double; true when the top_k + 1 best are each at least `margin` apart (no
// near-tie can flip the GPU's choice or order against the CPU's).
bool clear_top_k(const Layer& layer, const float* u, double margin) {
  const Shape& S = layer.shape;
  std::vector<float> logits(S.experts);
  cpu::linear(layer.model.gate, u, 1, logits.data());
  std::vector<double> biased(S.experts);
  for (int64_t e = 0; e < S.experts; ++e) {
    const double v = logits[size_t(e)];
    const double s = std::sqrt(v > 20.0 ? v : std::log1p(std::exp(v)));
    biased[size_t(e)] = s + (layer.model.gate_bias.empty() ? 0.0 : layer.model.gate_bias[size_t(e)]);
  }
  std::sort(biased.begin(), biased.end(), std::greater<>());
  for (int64_t k = 0; k < S.top_k; ++k)
    if (biased[size_t(k)] - biased[size_t(k + 1)] < margin) return false;
  return true;
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

template <class T>
std::vector<T> download(const T* device, size_t count) {
  std::vector<T> host(count);
  DSV4_CUDA_CHECK(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

bool close(double actual, double expected, double tolerance) {
  return std::isfinite(actual) && std::fabs(actual - expected) <= tolerance;
}

// The kernel choices of a run (MoeRunParams fields).
struct Kernels {
  MoeExpertKernels experts = MoeExpertKernels::AUTO;
  bool fused_small_batches = false;
  bool lean = MoeRunParams{}.lean_expert_decode;
  MoeSharedExpertSplit split = MoeRunParams{}.shared_expert_split;
  bool down_head_start = MoeRunParams{}.down_head_start;
  bool columns = MoeRunParams{}.column_stages;
  bool per_item = MoeRunParams{}.down_waits_per_item;
  std::string name() const {
    const char* path = experts == MoeExpertKernels::STREAMED   ? "streamed"
                       : experts == MoeExpertKernels::REGISTER ? "register"
                                                               : "auto";
    return std::string(path) + " experts" + (fused_small_batches ? ", fused routing and combine" : "") +
           (lean ? ", lean decode" : ", weight_tile_mma decode") +
           (split == MoeSharedExpertSplit::NEVER    ? ", shared expert never split"
            : split == MoeSharedExpertSplit::ALWAYS ? ", shared expert always split"
                                                     : ", shared expert split within one wave") +
           (down_head_start ? ", down head start" : "") + (columns ? ", column stages" : "") +
           (per_item ? ", down waits per item" : "");
  }
  MoeRunParams params() const {
    MoeRunParams p;
    p.expert_kernels = experts, p.fused_small_batches = fused_small_batches;
    p.lean_expert_decode = lean, p.shared_expert_split = split;
    p.down_head_start = down_head_start, p.column_stages = columns, p.down_waits_per_item = per_item;
    return p;
  }
  // These choices with one option other than here, or with the shared expert's split.
  constexpr Kernels other(bool Kernels::*option) const {
    Kernels k = *this;
    k.*option = !(k.*option);
    return k;
  }
  constexpr Kernels with(MoeSharedExpertSplit s) const {
    Kernels k = *this;
    k.split = s;
    return k;
  }
};
// Both expert kernel sets, the streamed one with the fused routing and combine (which apply at few tokens).
constexpr Kernels kRegisterKernels{.experts = MoeExpertKernels::REGISTER};
// The register kernels with the fused routing and combine (T <= 8): the down kernel's fenced combine
// (combine_band_if_last_fenced), which production takes where the streamed kernels do not apply.
constexpr Kernels kRegisterFused = kRegisterKernels.other(&Kernels::fused_small_batches);
constexpr Kernels kStreamedKernels{.experts = MoeExpertKernels::STREAMED, .fused_small_batches = true};
// The streamed kernels with the decode other than the default.
constexpr Kernels kStreamedOtherDecode = kStreamedKernels.other(&Kernels::lean);
// The streamed kernels with the shared expert never split and without the column stages, and split at every T <= 8
// (MoeRunParams::shared_expert_split).
constexpr Kernels kStreamedUnsplit{.experts = MoeExpertKernels::STREAMED, .fused_small_batches = true,
                                   .split = MoeSharedExpertSplit::NEVER, .columns = false};
constexpr Kernels kStreamedSplitAll = kStreamedKernels.with(MoeSharedExpertSplit::ALWAYS);
// The streamed kernels with the down head start other than the default (MoeRunParams::down_head_start: the same
// bits), alone and with the split at every T <= 8.
constexpr Kernels kStreamedOtherHeadStart = kStreamedKernels.other(&Kernels::down_head_start);
constexpr Kernels kStreamedSplitAllOtherHeadStart = kStreamedSplitAll.other(&Kernels::down_head_start);
// The streamed kernels with the fp4 column stages other than the default (MoeRunParams::column_stages: at T <= 2
// fp4 block sums in another order, checked against the CPU and run to run; no effect at larger T: the same bits),
// also with the shared expert never split and split, and unfused.
constexpr Kernels kStreamedOtherColumns = kStreamedKernels.other(&Kernels::columns);
constexpr Kernels kStreamedOtherColumnsUnsplit = kStreamedOtherColumns.with(MoeSharedExpertSplit::NEVER);
constexpr Kernels kStreamedOtherColumnsSplitAll = kStreamedOtherColumns.with(MoeSharedExpertSplit::ALWAYS);
constexpr Kernels kStreamedOtherColumnsUnfused = kStreamedOtherColumns.other(&Kernels::fused_small_batches);
// The down CTAs waiting for the whole gate/up grid, not their own item's gate/up CTAs (MoeRunParams::
// down_waits_per_item other than the default: the same bits), also with the shared expert split at every T <= 8.
constexpr Kernels kStreamedOtherWait = kStreamedKernels.other(&Kernels::per_item);
constexpr Kernels kStreamedSplitAllOtherWait = kStreamedSplitAll.other(&Kernels::per_item);

// Runs one case and checks every stage; `failures` caps the messages per case.
void check_case(const Layer& layer, const ExpertSet& experts, const DeviceMoeWeights& device_weights, int64_t T,
                uint64_t seed, const std::function<int32_t(int64_t t, std::mt19937_64&)>& token_of,
                Kernels kernels = {}) {
  SCOPED_TRACE("T = " + std::to_string(T) + ", seed " + std::to_string(seed) + ", " + kernels.name());
  const Shape& S = layer.shape;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> u(size_t(T * S.hidden));
  std::vector<int32_t> tokens(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    float* row = u.data() + t * S.hidden;
    do {
      for (int64_t j = 0; j < S.hidden; ++j) row[j] = round_to_bf16(normal(rng));  // see the header comment
    } while (layer.cpu.tid2eid == nullptr && !clear_top_k(layer, row, 1e-3));
    tokens[size_t(t)] = token_of(t, rng);
  }

  // GPU run on poisoned buffers.
  const MoeConfig config = test_config(S);
  const size_t out_floats = size_t(T * S.hidden), guard_floats = 64;
  DeviceBuffer d_u(u.size() * sizeof(float), "u"), d_tokens(tokens.size() * sizeof(int32_t), "token ids");
  DeviceBuffer d_out((out_floats + guard_floats) * sizeof(float), "out");
  const size_t workspace_bytes = moe_workspace_bytes(config, T);
  DeviceBuffer workspace(workspace_bytes, "moe workspace");
  d_u.upload(u.data(), u.size() * sizeof(float));
  d_tokens.upload(tokens.data(), tokens.size() * sizeof(int32_t));
  d_out.fill_bytes(0xFF);
  workspace.fill_bytes(0xFF);
  prepare_moe_workspace(workspace.data(), workspace_bytes, nullptr);
  MoeRunParams params = kernels.params();
  params.u = d_u.as<float>(), params.token_ids = d_tokens.as<int32_t>(), params.out = d_out.as<float>();
  params.tokens = int(T), params.workspace = workspace.data(), params.workspace_bytes = workspace_bytes;
  run_moe(device_weights, params);
  check_moe_status(params);
  const MoeWorkspaceView view = moe_workspace_view(config, T, workspace.data());
  const size_t slots = size_t(T * S.top_k), rows = slots + size_t(T);
  const std::vector<float> out = download(d_out.as<float>(), out_floats + guard_floats);
  const std::vector<int32_t> ids = download(view.expert_ids, slots);
  const std::vector<float> weights = download(view.expert_weights, slots);
  const std::vector<int32_t> slot_rows = download(view.slot_rows, slots);
  const std::vector<uint16_t> h_bits = download(view.h_bf16, rows * S.intermediate);
  const std::vector<float> down = download(view.down, rows * S.hidden);

  // Routing: exact ids (inputs have no near-ties), weights to fp32 rounding.
  std::vector<int32_t> ref_ids(slots);
  std::vector<float> ref_weights(slots);
  cpu::moe_route(layer.cpu, cpu_params(S, T), u.data(), tokens.data(), ref_ids.data(), ref_weights.data());
  for (size_t s = 0; s < slots; ++s) {
    ASSERT_EQ(ids[s], ref_ids[s]) << "expert id of token " << s / S.top_k << " choice " << s % S.top_k;
    ASSERT_TRUE(close(weights[s], ref_weights[s], 1e-5 * std::fabs(ref_weights[s])))
        << "weight of token " << s / S.top_k << " choice " << s % S.top_k << ": " << weights[s] << " vs "
        << ref_weights[s];
  }
  // Bucketing: a stable counting sort by expert id, the shared expert's rows after all routed ones.
  std::vector<std::vector<size_t>> slots_of(S.experts);
  for (size_t s = 0; s < slots; ++s) slots_of[size_t(ref_ids[s])].push_back(s);
  std::vector<std::vector<int64_t>> rows_of(S.experts + 1), tokens_of(S.experts + 1);
  for (int64_t e = 0, row = 0; e < S.experts; ++e)
    for (const size_t s : slots_of[size_t(e)]) {
      ASSERT_EQ(slot_rows[s], row) << "row of slot " << s << " (expert " << e << ")";
      rows_of[size_t(e)].push_back(row++);
      tokens_of[size_t(e)].push_back(int64_t(s / S.top_k));
    }
  for (int64_t t = 0; t < T; ++t) rows_of[S.experts].push_back(int64_t(slots) + t), tokens_of[S.experts].push_back(t);

  // Per expert: h against the CPU's SwiGLU, and the down output against cpu::linear(w2) on the GPU's own h.
  std::vector<float> abs_w2_h(rows * S.hidden);  // Σ_j |w2_ij|·|h_j| per row, for the end-to-end bound
  int failures = 0;
  for (int64_t e = 0; e <= S.experts; ++e) {
    const auto& my_rows = rows_of[size_t(e)];
    if (my_rows.empty()) continue;
    const ExpertWeights& w = e < S.experts ? layer.model.experts[size_t(e)] : layer.model.shared;
    const int64_t n = int64_t(my_rows.size());
    std::vector<float> x(size_t(n * S.hidden));
    float u_max = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float* src = u.data() + tokens_of[size_t(e)][size_t(i)] * S.hidden;
      std::copy_n(src, S.hidden, x.data() + i * S.hidden);
      for (int64_t j = 0; j < S.hidden; ++j) u_max = std::max(u_max, std::fabs(src[j]));
    }
    std::vector<float> gate(size_t(n * S.intermediate)), up(gate.size());
    const std::vector<float>& l1_w1 = experts.l1_w1[size_t(e)];
    const std::vector<float>& l1_w3 = experts.l1_w3[size_t(e)];
    cpu::linear(w.w1, x.data(), n, gate.data());
    cpu::linear(w.w3, x.data(), n, up.data());
    std::vector<float> h_gpu(size_t(n * S.intermediate));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < S.intermediate; ++j) {
        const size_t at = size_t(i * S.intermediate + j);
        const float g = std::min(gate[at], kLimit), v = std::clamp(up[at], -kLimit, kLimit);
        const double expected = double(silu(g)) * v;
        const float actual = bf16_to_float(h_bits[size_t(my_rows[size_t(i)]) * S.intermediate + j]);
        h_gpu[at] = actual;
        // fp32 order term: |Δg| ≤ ε Σ|w1||u| moves h by ≤ 1.1 |v| |Δg| (silu' ≤ 1.1); |Δv| moves it by
        // |silu(g)|.
        const double order =
            kOrderTolerance * u_max * (1.1 * std::fabs(v) * l1_w1[size_t(j)] + std::fabs(silu(g)) * l1_w3[size_t(j)]);
        if (!close(actual, expected, kHRounding * std::fabs(expected) + order) && failures++ < 10)
          ADD_FAILURE() << "h of expert " << e << " token " << tokens_of[size_t(e)][size_t(i)] << " [" << j
                        << "] = " << actual << ", CPU " << expected;
      }
    std::vector<float> ref_down(size_t(n * S.hidden)), bound(size_t(n * S.hidden)), abs_h(h_gpu.size());
    for (size_t i = 0; i < h_gpu.size(); ++i) abs_h[i] = std::fabs(h_gpu[i]);
    cpu::linear(w.w2, h_gpu.data(), n, ref_down.data());
    cpu::linear(experts.abs_w2[size_t(e)].matrix, abs_h.data(), n, bound.data());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < S.hidden; ++j) {
        const size_t at = size_t(i * S.hidden + j), row = size_t(my_rows[size_t(i)]);
        abs_w2_h[row * S.hidden + j] = bound[at];
        const float actual = down[row * S.hidden + j];
        if (!close(actual, ref_down[at], kOrderTolerance * bound[at] + 1e-30) && failures++ < 10)
          ADD_FAILURE() << "down of expert " << e << " token " << tokens_of[size_t(e)][size_t(i)] << " [" << j
                        << "] = " << actual << ", CPU " << ref_down[at] << " (bound " << bound[at] << ")";
      }
  }
  ASSERT_EQ(failures, 0);

  // End to end: the combine of the GPU's own down rows (same order, exact fma), and cpu::moe_forward.
  std::vector<float> reference(out_floats);
  cpu::moe_forward(layer.cpu, cpu_params(S, T), u.data(), tokens.data(), reference.data());
  for (int64_t t = 0; t < T && failures < 10; ++t)
    for (int64_t j = 0; j < S.hidden; ++j) {
      const size_t shared_row = slots + size_t(t);
      float combined = down[shared_row * S.hidden + j];
      double magnitude = abs_w2_h[shared_row * S.hidden + j];
      for (int64_t k = 0; k < S.top_k; ++k) {
        const size_t s = size_t(t * S.top_k + k), row = size_t(slot_rows[s]);
        combined = std::fma(weights[s], down[row * S.hidden + j], combined);
        magnitude += double(weights[s]) * abs_w2_h[row * S.hidden + j];
      }
      const size_t at = size_t(t * S.hidden + j);
      const double tolerance = (kHRounding + kOrderTolerance) * magnitude + 1e-30;
      if (!close(out[at], combined, 1e-6 * std::fabs(combined) + 1e-30) && failures++ < 10)
        ADD_FAILURE() << "out[" << t << ", " << j << "] = " << out[at] << ", combine of the GPU rows " << combined;
      if (!close(out[at], reference[at], tolerance) && failures++ < 10)
        ADD_FAILURE() << "out[" << t << ", " << j << "] = " << out[at] << ", cpu::moe_forward " << reference[at]
                      << ", tolerance " << tolerance;
    }
  for (size_t i = out_floats; i < out.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &out[i], sizeof bits);
    ASSERT_EQ(bits, 0xFFFFFFFFu) << "write past the end of out at float " << i;
  }
}

std::function<int32_t(int64_t, std::mt19937_64&)> random_tokens(const Shape& S) {
  return [vocab = S.vocab](int64_t, std::mt19937_64& rng) { return int32_t(rng() % uint64_t(vocab)); };
}

void keep_routing(std::vector<float>&, std::vector<int32_t>&) {}

// T tokens of N(0, 1) input.
std::vector<float> random_input(int T, const Shape& S, uint64_t seed) {
  std::vector<float> u(size_t(T * S.hidden));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : u) v = normal(rng);
  return u;
}

// run_moe's output for `u` on a fresh workspace and a NaN-poisoned output (a run that writes nothing cannot match
// another by reusing its memory); `token_ids` (host, T entries) for hash layers.
std::vector<float> run_output(const DeviceMoeWeights& weights, const std::vector<float>& u, int T, Kernels kernels,
                              const std::vector<int32_t>& token_ids = {}) {
  DeviceBuffer d_u(u.size() * sizeof(float), "u"), d_tokens(std::max<size_t>(1, token_ids.size()) * 4, "tokens");
  d_u.upload(u.data(), u.size() * sizeof(float));
  if (!token_ids.empty()) d_tokens.upload(token_ids.data(), token_ids.size() * sizeof(int32_t));
  const size_t bytes = moe_workspace_bytes(weights.config(), T);
  DeviceBuffer workspace(bytes, "workspace"), out(u.size() * sizeof(float), "out");
  out.fill_bytes(0xFF);
  prepare_moe_workspace(workspace.data(), bytes, nullptr);
  MoeRunParams params = kernels.params();
  params.u = d_u.as<float>(), params.out = out.as<float>(), params.tokens = T;
  params.token_ids = token_ids.empty() ? nullptr : d_tokens.as<int32_t>();
  params.workspace = workspace.data(), params.workspace_bytes = bytes;
  run_moe(weights, params);
  check_moe_status(params);
  return download(out.as<float>(), u.size());
}

void expect_identical_outputs(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_TRUE(std::all_of(a.begin(), a.end(), [](float v) { return std::isfinite(v); }));
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

// Token ids for hash layers: T ids in [0, vocab).
std::vector<int32_t> token_ids(int T, const Shape& S, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (int32_t& id : ids) id = int32_t(rng() % uint64_t(S.vocab));
  return ids;
}

// Two runs of the same input through the same kernels: the same bits.
void expect_repeatable(const DeviceMoeWeights& weights, const Shape& S, int T, uint64_t seed, Kernels kernels) {
  SCOPED_TRACE("run to run, " + kernels.name() + ", T = " + std::to_string(T));
  const std::vector<float> u = random_input(T, S, seed);
  const std::vector<int32_t> ids = token_ids(T, S, seed + 1);
  expect_identical_outputs(run_output(weights, u, T, kernels, ids), run_output(weights, u, T, kernels, ids));
}

// Two kernel choices that compute the same sums in the same order: the same bits.
void expect_same_bits(const DeviceMoeWeights& weights, const Shape& S, int T, uint64_t seed, Kernels kernels,
                      Kernels reference) {
  SCOPED_TRACE(kernels.name() + " against " + reference.name() + ", T = " + std::to_string(T));
  const std::vector<float> u = random_input(T, S, seed);
  const std::vector<int32_t> ids = token_ids(T, S, seed + 1);
  expect_identical_outputs(run_output(weights, u, T, kernels, ids), run_output(weights, u, T, reference, ids));
}

// The streamed kernels with the other fp4 decode against the default ones (each warp computes the same rows from
// the same operands in the same order: the same bits), the fused combine included at T <= 8.
void expect_other_decode_bits(const DeviceMoeWeights& weights, const Shape& S, int T, uint64_t seed) {
  const std::vector<float> u = random_input(T, S, seed);
  const std::vector<int32_t> ids = token_ids(T, S, seed + 1);
  const std::vector<float> expected = run_output(weights, u, T, kStreamedKernels, ids);
  SCOPED_TRACE("the other fp4 decode against the default, T = " + std::to_string(T));
  expect_identical_outputs(run_output(weights, u, T, kStreamedOtherDecode, ids), expected);
}

class MoeFormats : public ::testing::TestWithParam<WeightFormat> {};

TEST_P(MoeFormats, ScoredAndHashRoutingMatchTheCpuForEveryTokenCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const WeightFormat format = GetParam();
  const ExpertSet experts = make_experts(format, kFlashLike, 100 + uint64_t(format));
  uint64_t seed = 1000 * uint64_t(format);
  for (const Routing routing : {Routing::SCORED, Routing::HASH}) {
    SCOPED_TRACE(std::string(to_string(format)) + (routing == Routing::SCORED ? " scored" : " hash"));
    Layer layer;
    make_layer(layer, experts, routing, seed++, keep_routing);
    const DeviceMoeWeights device_weights(layer.model, test_config(kFlashLike), "test layer");
    ASSERT_TRUE(device_weights.streamed_tiles()) << "the Flash-like layer must take the streamed kernels";
    // 17 and more: items of 9-16 rows (two token tiles) and of more than 16 (several passes), e.g. the shared
    // expert's 64-row items.
    for (const int64_t T : {1, 3, 8, 17, 64, 300})
      for (const Kernels kernels : {kRegisterKernels, kStreamedKernels})
        check_case(layer, experts, device_weights, T, seed++, random_tokens(kFlashLike), kernels);
    for (const int64_t T : {1, 3, 8})
      check_case(layer, experts, device_weights, T, seed++, random_tokens(kFlashLike), kRegisterFused);
    const Kernels streamed_unfused{.experts = MoeExpertKernels::STREAMED};
    check_case(layer, experts, device_weights, 1, seed++, random_tokens(kFlashLike), streamed_unfused);
    for (const int64_t T : {1, 8, 17})
      check_case(layer, experts, device_weights, T, seed++, random_tokens(kFlashLike), kStreamedOtherDecode);
    for (const int T : {1, 2, 5, 8, 17}) expect_other_decode_bits(device_weights, kFlashLike, T, seed++);
    for (const int64_t T : {2, 8})
      check_case(layer, experts, device_weights, T, seed++, random_tokens(kFlashLike), kStreamedSplitAll);
    check_case(layer, experts, device_weights, 1, seed++, random_tokens(kFlashLike), kStreamedUnsplit);
    expect_repeatable(device_weights, kFlashLike, 1, seed++, kStreamedKernels);
    expect_repeatable(device_weights, kFlashLike, 8, seed++, kStreamedSplitAll);
    check_case(layer, experts, device_weights, 5, seed++, random_tokens(kFlashLike), kStreamedSplitAllOtherHeadStart);
    for (const int T : {1, 3, 8, 9}) {
      expect_same_bits(device_weights, kFlashLike, T, seed++, kStreamedOtherHeadStart, kStreamedKernels);
      expect_same_bits(device_weights, kFlashLike, T, seed++, kStreamedSplitAllOtherHeadStart, kStreamedSplitAll);
    }
    for (const int64_t T : {1, 2})
      for (const Kernels kernels : {kStreamedOtherColumns, kStreamedOtherColumnsUnsplit,
                                    kStreamedOtherColumnsSplitAll, kStreamedOtherColumnsUnfused})
        check_case(layer, experts, device_weights, T, seed++, random_tokens(kFlashLike), kernels);
    // Both tokens with one id: on the hash layer every routed item has two rows (the shared expert's always has).
    check_case(layer, experts, device_weights, 2, seed++, [](int64_t, std::mt19937_64&) { return 0; },
               kStreamedOtherColumns);
    for (const int T : {1, 2}) expect_repeatable(device_weights, kFlashLike, T, seed++, kStreamedOtherColumns);
    for (const int T : {3, 8, 17}) expect_same_bits(device_weights, kFlashLike, T, seed++, kStreamedOtherColumns,
                                                    kStreamedKernels);
    if (routing == Routing::HASH) continue;  // the options below route alike
    // The down CTAs' other wait (the same bits).
    check_case(layer, experts, device_weights, 3, seed++, random_tokens(kFlashLike), kStreamedOtherWait);
    for (const int T : {1, 2}) expect_same_bits(device_weights, kFlashLike, T, seed++, kStreamedOtherWait,
                                                kStreamedKernels);
    expect_same_bits(device_weights, kFlashLike, 8, seed++, kStreamedSplitAllOtherWait, kStreamedSplitAll);
  }
}

// Where the shared expert's CTAs split (MoeExpertGemmParams::shared_expert_split): the FP8 shared expert beside fp4
// routed experts at T <= 8, within one wave for ONE_WAVE (V4-Flash at T = 1 on 132 SMs: 32 bands × 8 CTAs; not
// V4-Pro's 48-56 bands, nor V4-Flash at T = 2), not beside FP8 or BF16 ones, not at T = 9, not when NEVER, and not
// on layers of too few stages (tiny test models).
TEST(MoeSharedExpertSplit, AppliesWhereTheSharedExpertHasMoreStagesPerRow) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int kFlashE = 256, kProE = 384, kTopK = 6;
  auto splits = [](WeightFormat routed, int hidden, int intermediate, int experts, int tokens,
                   MoeSharedExpertSplit split, int multiprocessors = 132) {
    MoeExpertGemmParams p;
    p.routed_format = routed, p.shared_format = WeightFormat::FP8_BLOCK128, p.experts_count = experts;
    p.hidden = hidden, p.intermediate = intermediate, p.tokens = tokens, p.streamed = true;
    p.max_work_items = int(moe_max_work_items(tokens, experts, kTopK, kMoeRowsPerWorkItem));
    p.shared_expert_split = split;
    return moe_shared_expert_splits(p, multiprocessors);
  };
  constexpr auto kOneWave = MoeSharedExpertSplit::ONE_WAVE, kAlways = MoeSharedExpertSplit::ALWAYS;
  for (const WeightFormat routed : {WeightFormat::MXFP4, WeightFormat::NVFP4}) {
    EXPECT_TRUE(splits(routed, 4096, 2048, kFlashE, 1, kOneWave));
    EXPECT_FALSE(splits(routed, 4096, 2048, kFlashE, 1, kOneWave, 114));  // 256 CTAs past two per SM
    EXPECT_FALSE(splits(routed, 4096, 2048, kFlashE, 2, kOneWave));
    EXPECT_FALSE(splits(routed, 7168, 3072, kProE, 1, kOneWave));
    EXPECT_TRUE(splits(routed, 4096, 2048, kFlashE, 8, kOneWave, 1000));
    EXPECT_TRUE(splits(routed, 7168, 3072, kProE, 8, kAlways));
    EXPECT_FALSE(splits(routed, 4096, 2048, kFlashE, 9, kAlways));
    EXPECT_FALSE(splits(routed, 4096, 2048, kFlashE, 1, MoeSharedExpertSplit::NEVER));
    EXPECT_FALSE(splits(routed, 4096, 512, kFlashE, 1, kAlways));  // 2 FP8 stages per row of w2
  }
  EXPECT_FALSE(splits(WeightFormat::FP8_BLOCK128, 4096, 2048, kFlashE, 1, kAlways));
  EXPECT_FALSE(splits(WeightFormat::BF16, 4096, 2048, kFlashE, 1, kAlways));
}

INSTANTIATE_TEST_SUITE_P(ExpertFormats, MoeFormats,
                         ::testing::Values(WeightFormat::MXFP4, WeightFormat::NVFP4, WeightFormat::FP8_BLOCK128,
                                           WeightFormat::BF16),
                         [](const ::testing::TestParamInfo<WeightFormat>& info) {
                           return std::string(to_string(info.param));
                         });

TEST(MoeTinyShapes, TestModelSizesWithKTailsAndPartialRowBands) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // The golden fixtures' and tiny-fortunes' sizes: K below or not a multiple of 128, fewer rows than a CTA band.
  const Shape shapes[] = {{.hidden = 64, .intermediate = 32, .experts = 4, .top_k = 2, .vocab = 50},
                          {.hidden = 96, .intermediate = 32, .experts = 6, .top_k = 2, .vocab = 50},
                          {.hidden = 128, .intermediate = 64, .experts = 8, .top_k = 2, .vocab = 50}};
  uint64_t seed = 5000;
  for (const Shape& shape : shapes)
    for (const WeightFormat format :
         {WeightFormat::MXFP4, WeightFormat::NVFP4, WeightFormat::FP8_BLOCK128, WeightFormat::BF16}) {
      SCOPED_TRACE(std::string(to_string(format)) + " d = " + std::to_string(shape.hidden) + " I = " +
                   std::to_string(shape.intermediate) + " E = " + std::to_string(shape.experts));
      const ExpertSet experts = make_experts(format, shape, seed++);
      for (const Routing routing : {Routing::SCORED, Routing::HASH}) {
        Layer layer;
        make_layer(layer, experts, routing, seed++, keep_routing);
        const DeviceMoeWeights device_weights(layer.model, test_config(shape), "tiny layer");
        // These layers cannot stream (K below a stage): STREAMED must fall back to the register kernels.
        for (const int64_t T : {1, 5, 40}) {
          check_case(layer, experts, device_weights, T, seed++, random_tokens(shape));
          check_case(layer, experts, device_weights, T, seed++, random_tokens(shape), kStreamedKernels);
        }
      }
    }
}

TEST(MoeBorrowedWeights, ALayerFromTheModelUploadMatchesItsOwnUpload) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const Shape shape{.hidden = 128, .intermediate = 64, .experts = 8, .top_k = 2, .vocab = 50};
  const ExpertSet experts = make_experts(WeightFormat::MXFP4, shape, 77);
  Layer layer;
  make_layer(layer, experts, Routing::SCORED, 78, keep_routing);
  device_weights::Moe uploaded;
  uploaded.gate = DeviceMatrix(layer.model.gate, "router");
  DeviceBuffer bias(layer.model.gate_bias.size() * sizeof(float), "bias");
  bias.upload(layer.model.gate_bias.data(), layer.model.gate_bias.size() * sizeof(float));
  uploaded.gate_bias = DeviceArray<float>(std::move(bias), int64_t(layer.model.gate_bias.size()));
  auto upload_expert = [](const ExpertWeights& e) {
    return device_weights::Expert{.w1 = DeviceMatrix(e.w1, "w1"), .w2 = DeviceMatrix(e.w2, "w2"),
                                  .w3 = DeviceMatrix(e.w3, "w3")};
  };
  for (const ExpertWeights& e : layer.model.experts) uploaded.experts.push_back(upload_expert(e));
  uploaded.shared = upload_expert(layer.model.shared);
  write_expert_device_layout(uploaded, nullptr, "uploaded layer");  // upload_model_weights' last step
  const DeviceMoeWeights borrowed(uploaded, test_config(shape), "borrowed layer");
  const DeviceMoeWeights own(layer.model, test_config(shape), "own layer");
  check_case(layer, experts, borrowed, 9, 79, random_tokens(shape));

  // Same inputs through both: bit-identical outputs (the kernels are deterministic). A second borrower of the same
  // upload reads the same words (borrowers rewrite nothing).
  const DeviceMoeWeights again(uploaded, test_config(shape), "borrowed again");
  const std::vector<float> u = random_input(9, shape, 80);
  const std::vector<float> want = run_output(own, u, 9, {});
  expect_identical_outputs(run_output(borrowed, u, 9, {}), want);
  expect_identical_outputs(run_output(again, u, 9, {}), want);
}

// The four bf16x2 pairs of each word: the checkpoint decode of `stored` ([8 i + J]) and the DEVICE decode of its
// repack ([8 i + 4 + J]).
__global__ void fp4_layout_pairs_kernel(const uint32_t* stored, int count, uint32_t* pairs) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const uint32_t w = stored[i], d = tile::detail::fp4_device_word(w);
    uint32_t* out = pairs + 8 * size_t(i);
    out[0] = tile::detail::e2m1_pair_bits<0>(w), out[1] = tile::detail::e2m1_pair_bits<1>(w);
    out[2] = tile::detail::e2m1_pair_bits<2>(w), out[3] = tile::detail::e2m1_pair_bits<3>(w);
    out[4] = tile::detail::e2m1_device_pair_bits<0>(d), out[5] = tile::detail::e2m1_device_pair_bits<1>(d);
    out[6] = tile::detail::e2m1_device_pair_bits<2>(d), out[7] = tile::detail::e2m1_device_pair_bits<3>(d);
  }
}

// The upload's fp4 repack (weight_tile_mma.cuh Fp4Layout::DEVICE): every word decodes to the checkpoint decode's
// pairs, on the device, for each single bit, every code in every place and random words.
TEST(MoeFp4DeviceLayout, RepackedWordsDecodeToTheCheckpointPairs) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<uint32_t> words;
  for (int bit = 0; bit < 32; ++bit) words.push_back(1u << bit);
  for (int place = 0; place < 8; ++place)
    for (uint32_t code = 0; code < 16; ++code) words.push_back(code << (4 * place) | (0x96969696u & ~(0xFu << (4 * place))));
  std::mt19937 rng(31);
  for (int i = 0; i < 1 << 16; ++i) words.push_back(rng());
  DeviceBuffer d_words(words.size() * 4, "words"), d_pairs(words.size() * 32, "pairs");
  d_words.upload(words.data(), words.size() * 4);
  d_pairs.fill_bytes(0xFF);
  fp4_layout_pairs_kernel<<<64, 256>>>(d_words.as<uint32_t>(), int(words.size()), d_pairs.as<uint32_t>());
  DSV4_CUDA_CHECK_LAUNCH("fp4_layout_pairs_kernel");
  const std::vector<uint32_t> pairs = download(d_pairs.as<uint32_t>(), words.size() * 8);
  for (size_t i = 0; i < words.size(); ++i)
    for (int j = 0; j < 4; ++j)
      ASSERT_EQ(pairs[8 * i + 4 + size_t(j)], pairs[8 * i + size_t(j)]) << "word " << std::hex << words[i] << " pair "
                                                                         << j;
}

TEST(MoeProShape, BothKernelSetsMatchTheCpuAndRepeatBitForBit) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // V4-Pro widths (d 7168, I 3072: at 16 rows the gate/up input takes 14 x chunks) with few experts so that the
  // CPU reference stays cheap; T = 20 gives items of 9-16 rows and more (two passes), the shared expert 16 + 4.
  constexpr Shape kProLike{.hidden = 7168, .intermediate = 3072, .experts = 8, .top_k = 6, .vocab = 100};
  const ExpertSet experts = make_experts(WeightFormat::MXFP4, kProLike, 900);
  Layer layer;
  make_layer(layer, experts, Routing::SCORED, 901, keep_routing);
  const DeviceMoeWeights device_weights(layer.model, test_config(kProLike), "Pro-like layer");
  ASSERT_TRUE(device_weights.streamed_tiles()) << "the Pro-like layer must take the streamed kernels";
  uint64_t seed = 902;
  for (const int64_t T : {1, 20})
    for (const Kernels kernels : {kRegisterKernels, kStreamedKernels})
      check_case(layer, experts, device_weights, T, seed++, random_tokens(kProLike), kernels);
  for (const int T : {1, 20}) {
    const std::vector<float> u = random_input(T, kProLike, seed++);
    expect_identical_outputs(run_output(device_weights, u, T, kStreamedKernels),
                             run_output(device_weights, u, T, kStreamedKernels));
  }
  for (const int T : {1, 8, 20}) expect_other_decode_bits(device_weights, kProLike, T, seed++);
  check_case(layer, experts, device_weights, 1, seed++, random_tokens(kProLike), kStreamedOtherDecode);
  check_case(layer, experts, device_weights, 1, seed++, random_tokens(kProLike), kStreamedUnsplit);
  check_case(layer, experts, device_weights, 8, seed++, random_tokens(kProLike), kStreamedSplitAll);
  expect_repeatable(device_weights, kProLike, 8, seed++, kStreamedSplitAll);
  check_case(layer, experts, device_weights, 8, seed++, random_tokens(kProLike), kStreamedSplitAllOtherHeadStart);
  expect_same_bits(device_weights, kProLike, 1, seed++, kStreamedOtherHeadStart, kStreamedKernels);
  expect_same_bits(device_weights, kProLike, 8, seed++, kStreamedSplitAllOtherWait, kStreamedSplitAll);
  // T = 2: the down GEMM takes the column stages, the gate/up GEMM (d 7168) the lean ones.
  for (const int64_t T : {1, 2})
    check_case(layer, experts, device_weights, T, seed++, random_tokens(kProLike), kStreamedOtherColumns);
  expect_repeatable(device_weights, kProLike, 1, seed++, kStreamedOtherColumns);
}

// One MXFP4 expert set shared by the tests below, made on first use (after the device check).
class MoeRoutingExtremes : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_device()) GTEST_SKIP() << "no CUDA device";
    static const ExpertSet experts = make_experts(WeightFormat::MXFP4, kFlashLike, 7);
    experts_ = &experts;
  }
  const ExpertSet* experts_ = nullptr;
};

TEST_F(MoeRoutingExtremes, ExpertsWithoutTokens) {
  // Hash rows drawn from experts 0, 3, ..., 30 only: 21 experts (among them the last) get no token at any T.
  Layer layer;
  make_layer(layer, *experts_, Routing::HASH, 11, [](std::vector<float>&, std::vector<int32_t>& tid2eid) {
    const size_t k = size_t(kFlashLike.top_k);
    for (size_t i = 0; i < tid2eid.size(); ++i) tid2eid[i] = int32_t((i % k + 2 * (i / k)) % 11 * 3);
  });
  const DeviceMoeWeights device_weights(layer.model, test_config(kFlashLike), "sparse layer");
  for (const int64_t T : {1, 5, 64})
    for (const Kernels kernels :
         {kRegisterKernels, kStreamedKernels, kStreamedOtherDecode, kStreamedUnsplit,
          kStreamedSplitAllOtherHeadStart})
      check_case(layer, *experts_, device_weights, T, 50 + uint64_t(T), random_tokens(kFlashLike), kernels);
}

TEST_F(MoeRoutingExtremes, EveryTokenOnOneExpert) {
  {
    // Scored: a bias of +100 puts the last expert first for every token (300 rows: several work items).
    Layer layer;
    make_layer(layer, *experts_, Routing::SCORED, 12,
               [](std::vector<float>& bias, std::vector<int32_t>&) { bias.back() = 100.0f; });
    const DeviceMoeWeights device_weights(layer.model, test_config(kFlashLike), "biased layer");
    for (const Kernels kernels : {kRegisterKernels, kStreamedKernels})
      check_case(layer, *experts_, device_weights, 300, 60, random_tokens(kFlashLike), kernels);
  }
  {
    // Hash: every token has the same id, so all of them pick the same six experts.
    Layer layer;
    make_layer(layer, *experts_, Routing::HASH, 13, keep_routing);
    const DeviceMoeWeights device_weights(layer.model, test_config(kFlashLike), "hash layer");
    for (const Kernels kernels : {kRegisterKernels, kStreamedKernels, kStreamedOtherDecode})
      check_case(layer, *experts_, device_weights, 300, 61, [](int64_t, std::mt19937_64&) { return int32_t(42); },
                 kernels);
    // At T = 8 through the one-tile streamed kernels: one routed expert item of 8 rows per chosen expert.
    check_case(layer, *experts_, device_weights, 8, 62, [](int64_t, std::mt19937_64&) { return int32_t(42); },
               kStreamedKernels);
  }
}

// The workspace's counters (the decode router's finished CTAs, the fused combine's band tickets) come back to zero
// after every call, and the per-item counts of the down CTAs' waits (left as counted) are zeroed by the next call's
// routing: calls through one workspace, with new inputs (a new routing) each time, eagerly and as replays of one CUDA
// graph, at T = 8 and then T = 1, 9 (no fused combine) and 3 on the same workspace, each equal to a run on a fresh
// workspace; with the defaults and the other down wait. Every other call finds the per-item counts poisoned (past any
// item's gate/up CTAs): a routing that no longer zeroes them lets the down CTAs read h before it is written.
TEST_F(MoeRoutingExtremes, CallsRepeatThroughOneWorkspaceAndGraphReplays) {
  constexpr size_t kFirstItemCountWord = kMoeItemCountersOffset / sizeof(uint32_t);
  for (const Kernels kernels : {kStreamedKernels, kStreamedOtherWait}) {
    SCOPED_TRACE(kernels.name());
    constexpr int graph_tokens = 8;
    const Shape& S = kFlashLike;
    Layer layer;
    make_layer(layer, *experts_, Routing::SCORED, 15, keep_routing);
    const DeviceMoeWeights weights(layer.model, test_config(S), "scored layer");
    constexpr int kMaxT = 9;
    const size_t bytes = moe_workspace_bytes(test_config(S), kMaxT);
    DeviceBuffer workspace(bytes, "workspace"), d_u(size_t(kMaxT * S.hidden) * sizeof(float), "u"),
        out(size_t(kMaxT * S.hidden) * sizeof(float), "out");
    prepare_moe_workspace(workspace.data(), bytes, nullptr);
    cudaStream_t stream;
    DSV4_CUDA_CHECK(cudaStreamCreate(&stream));  // ordered after the default stream's uploads and fills
    auto params_for = [&](int T) {
      MoeRunParams p = kernels.params();
      p.u = d_u.as<float>(), p.out = out.as<float>(), p.tokens = T, p.stream = stream;
      p.workspace = workspace.data(), p.workspace_bytes = bytes;
      return p;
    };
    uint64_t seed = 300;
    auto check_call = [&](int T, const std::function<void()>& call) {
      const std::vector<float> u = random_input(T, S, seed++);
      d_u.upload(u.data(), u.size() * sizeof(float));
      out.fill_bytes(0xFF);
      if (seed % 2 == 0)
        DSV4_CUDA_CHECK(cudaMemsetAsync(workspace.as<uint8_t>() + kMoeItemCountersOffset, 0xFF,
                                        kMoeCountedItemsMax * sizeof(uint32_t), stream));
      call();
      DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
      expect_identical_outputs(download(out.as<float>(), u.size()), run_output(weights, u, T, kStreamedKernels));
      // The counters (moe.hpp: the workspace's first 1 KB; word 1 is the hash status, word 2 the work item count,
      // words 128-191 the per-item counts) are back to zero, or the next call would start from stale counts.
      const std::vector<uint32_t> counters = download(workspace.as<uint32_t>(), 256);
      for (size_t word = 0; word < counters.size(); ++word)
        if (word != 1 && word != 2 &&
            (word < kFirstItemCountWord || word >= kFirstItemCountWord + kMoeCountedItemsMax))
          EXPECT_EQ(counters[word], 0u) << "T = " << T << ", counter word " << word;
    };
    for (int i = 0; i < 3; ++i) check_call(graph_tokens, [&] { run_moe(weights, params_for(graph_tokens)); });
    cudaGraph_t graph;
    DSV4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    run_moe(weights, params_for(graph_tokens));
    DSV4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec;
    DSV4_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; ++i) check_call(graph_tokens, [&] { DSV4_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
    DSV4_CUDA_CHECK(cudaGraphExecDestroy(exec));
    DSV4_CUDA_CHECK(cudaGraphDestroy(graph));
    for (const int T : {1, 9, 3}) check_call(T, [&] { run_moe(weights, params_for(T)); });
    DSV4_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

TEST_F(MoeRoutingExtremes, BadInputIsRefusedNamingTheProblem) {
  const Shape& S = kFlashLike;
  Layer layer;
  make_layer(layer, *experts_, Routing::HASH, 14, keep_routing);
  {
    std::mt19937_64 rng(1);
    MoeWeights mixed = layer.model;
    mixed.experts[5] = random_expert(WeightFormat::NVFP4, S, rng);
    testing::expect_error([&] { DeviceMoeWeights(mixed, test_config(S), "mixed layer"); }, "expert 5");
    MoeWeights short_table = layer.model;
    short_table.tid2eid[7] = int32_t(S.experts);
    testing::expect_error([&] { DeviceMoeWeights(short_table, test_config(S), "bad table"); }, "tid2eid[1][1]");
    MoeWeights big_scale = layer.model;
    OwnedQuantizedMatrix w3 = absolute(big_scale.experts[2].w3);  // a copy whose bytes this test may change
    w3.storage->scales[3 * size_t(w3.matrix.scales_per_row()) + 5] = 130;
    big_scale.experts[2].w3 = w3.matrix;
    testing::expect_error([&] { DeviceMoeWeights(big_scale, test_config(S), "scaled layer"); },
                          "expert 2 w3 MXFP4 scale code 130 at row 3, block 5");
  }
  const DeviceMoeWeights device_weights(layer.model, test_config(S), "hash layer");
  const int T = 3;
  const std::vector<int32_t> tokens = {5, int32_t(S.vocab) + 9, 7};
  std::vector<float> u(size_t(T * S.hidden), 0.5f);
  DeviceBuffer d_u(u.size() * sizeof(float), "u"), d_tokens(tokens.size() * sizeof(int32_t), "token ids"),
      d_out(u.size() * sizeof(float), "out");
  d_u.upload(u.data(), u.size() * sizeof(float));
  d_tokens.upload(tokens.data(), tokens.size() * sizeof(int32_t));
  const size_t bytes = moe_workspace_bytes(test_config(S), T);
  DeviceBuffer workspace(bytes, "workspace");
  prepare_moe_workspace(workspace.data(), bytes, nullptr);
  MoeRunParams params{.u = d_u.as<float>(),
                      .token_ids = d_tokens.as<int32_t>(),
                      .out = d_out.as<float>(),
                      .tokens = T,
                      .workspace = workspace.data(),
                      .workspace_bytes = bytes};
  run_moe(device_weights, params);
  testing::expect_error([&] { check_moe_status(params); }, "token id 1009 at position 1");
  check_moe_status(params);  // the record was cleared
  MoeRunParams small = params;
  small.workspace_bytes = bytes - 1;
  testing::expect_error([&] { run_moe(device_weights, small); }, "moe_workspace_bytes");
  MoeRunParams no_tokens = params;
  no_tokens.token_ids = nullptr;
  testing::expect_error([&] { run_moe(device_weights, no_tokens); }, "needs token ids");
  MoeRunParams aliased = params;
  aliased.out = const_cast<float*>(params.u);
  testing::expect_error([&] { run_moe(device_weights, aliased); }, "alias");
}

}  // namespace
}  // namespace dsv4::cuda
