// The decode router (run_moe_routing with fused_routing and decode_router, T <= 8) against the fused router kernel it
// replaces and the CPU: every output buffer (u in bf16, expert ids and weights, offsets, row tokens, slot rows, work
// items and their count) must be byte-identical to the fused router kernel's (the logits scratch, where the decode
// router leaves s = sqrt(softplus(logit)), must hold the fused kernel's logits so transformed, to fp32 rounding of the
// host's log1p/exp), on V4-Flash (E 256, d 4096) and V4-Pro (E 384, d 7168) routers in F32 and BF16, scored (with and
// without a bias) and hash-routed layers, odd shapes (E 40, d 264, top 5, 3 rows per work item; E 8, d 8, top 1), the
// largest supported shape (E 512, d 12288, top 32: 256 slots, rows staged in several CTAs per SM), exactly tied scores
// (duplicated router rows: ties go to the lower expert index) and a NaN router row; T = 1..8. Independently of the old
// kernel: the expert ids match cpu::moe_route where the top-k is clear of near-ties and the weights within fp32
// rounding (the CPU's log1p/exp differ from CUDA's by an ulp or so), and the bucketing is rebuilt on the host from the
// GPU's ids (stable counting sort, shared expert last, work items in row order). Outputs are poisoned (0xFF) before
// each run, so a missing or stray write changes the bytes; the ticket and status words must come back zero (or the
// first bad token + 1).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backends/cpu/moe.hpp"
#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/moe_routing.hpp"
#include "core/bf16.hpp"
#include "core/quantized_matrix.hpp"
#include "support/device_buffers.hpp"
#include "support/moe_routing_buffers.hpp"

namespace dsv4::cuda {
namespace {

struct RouterShape {
  const char* name;
  int64_t experts, hidden;
  int top_k, rows_per_item;
  WeightFormat format;
};

enum class Scoring { BIAS, NO_BIAS, HASH };

constexpr int64_t kVocab = 1000;
constexpr float kScaling = 2.5f;

// A layer's routing weights on the host and the device.
struct RouterLayer {
  RouterShape shape;
  OwnedQuantizedMatrix router;
  DeviceMatrix device_router;
  std::vector<float> bias;
  std::vector<int32_t> tid2eid;
  DeviceBuffer device_bias, device_tid2eid;
  bool cpu_comparable = true;  // false with a NaN row (the CPU reference does not order NaN scores)
};

// Router rows of N(0, (2/√d)²) (logits of about unit size); `duplicate_pairs` copies row 2i into row 2i + 1 (exact
// ties), `nan_row` >= 0 fills that row with NaN.
RouterLayer make_layer(const RouterShape& s, Scoring scoring, uint64_t seed, bool duplicate_pairs = false,
                       int64_t nan_row = -1) {
  RouterLayer layer;
  layer.shape = s;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f / std::sqrt(float(s.hidden)));
  layer.router = allocate_quantized_matrix(s.format, s.experts, s.hidden, ScaleType::NONE);
  uint8_t* data = layer.router.storage->data.data();
  for (int64_t e = 0; e < s.experts; ++e)
    for (int64_t k = 0; k < s.hidden; ++k) {
      const int64_t source = duplicate_pairs ? e / 2 * 2 : e;
      float w = normal(rng);
      if (source != e) {
        if (s.format == WeightFormat::BF16) {
          uint16_t bits;
          std::memcpy(&bits, data + (source * s.hidden + k) * 2, 2);
          w = bf16_to_float(bits);
        } else {
          std::memcpy(&w, data + (source * s.hidden + k) * 4, 4);
        }
      }
      if (e == nan_row) w = std::nanf("");
      if (s.format == WeightFormat::BF16) {
        const uint16_t bits = float_to_bf16(w);
        std::memcpy(data + (e * s.hidden + k) * 2, &bits, 2);
      } else {
        std::memcpy(data + (e * s.hidden + k) * 4, &w, 4);
      }
    }
  layer.device_router = DeviceMatrix(layer.router.matrix, "router");
  layer.cpu_comparable = nan_row < 0;
  if (scoring == Scoring::BIAS) {
    std::normal_distribution<float> bias(0.0f, 0.1f);
    for (int64_t e = 0; e < s.experts; ++e) layer.bias.push_back(duplicate_pairs ? 0.0f : bias(rng));
  }
  if (scoring == Scoring::HASH)
    for (int64_t v = 0; v < kVocab; ++v) {
      std::vector<int32_t> ids(size_t(s.experts));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      layer.tid2eid.insert(layer.tid2eid.end(), ids.begin(), ids.begin() + s.top_k);
    }
  layer.device_bias = to_device(layer.bias, "bias");
  layer.device_tid2eid = to_device(layer.tid2eid, "tid2eid");
  return layer;
}

// The host copy of everything a routing call writes.
struct RoutingOutputs {
  std::vector<uint8_t> logits, u_bf16, ids, weights, offsets, row_tokens, slot_rows, work_items;
  int32_t work_item_count = 0;
  uint32_t finished_ctas = 0;
  int32_t status = 0;
};

// The device buffers of one routing call, outputs poisoned.
struct RoutingRun : MoeRoutingRunBuffers {
  RoutingRun(const RouterShape& s, int tokens)
      : MoeRoutingRunBuffers(s.experts, s.hidden, s.top_k, s.rows_per_item, tokens) {
    poison();
  }
  // Every output but the ticket, status and count words (which calls hand on to the next).
  void poison() {
    for (DeviceBuffer* b : {&logits, &u_bf16, &ids, &weights, &offsets, &row_tokens, &slot_rows, &work_items})
      b->fill_bytes(0xFF);
  }
  RoutingOutputs download() const {
    auto bytes = [](const DeviceBuffer& b) {
      std::vector<uint8_t> host(b.bytes());
      b.download(host.data(), host.size());
      return host;
    };
    RoutingOutputs o{bytes(logits),  bytes(u_bf16),     bytes(ids),       bytes(weights),
                     bytes(offsets), bytes(row_tokens), bytes(slot_rows), bytes(work_items)};
    uint32_t w[4];
    words.download(w, sizeof w);
    o.finished_ctas = w[0], o.status = int32_t(w[1]), o.work_item_count = int32_t(w[2]);
    return o;
  }
};

template <class T>
std::vector<T> as(const std::vector<uint8_t>& bytes) {
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

// Runs the routing of `u` (and `tokens` on hash layers) with the decode router or the fused router kernel.
RoutingOutputs route(const RouterLayer& layer, const DeviceBuffer& u, const DeviceBuffer& tokens, int T,
                     bool decode_router, int calls = 1) {
  const RouterShape& s = layer.shape;
  RoutingRun run(s, T);
  MoeRoutingParams p{
      .router = layer.device_router.view(),
      .bias = layer.bias.empty() ? nullptr : layer.device_bias.as<float>(),
      .tid2eid = layer.tid2eid.empty() ? nullptr : layer.device_tid2eid.as<int32_t>(),
      .vocab = layer.tid2eid.empty() ? 0 : kVocab,
      .u = u.as<float>(),
      .token_ids = tokens.as<int32_t>(),
      .tokens = T,
      .top_k = s.top_k,
      .routed_scaling_factor = kScaling,
      .rows_per_item = s.rows_per_item,
      .out = run.view(),
      .stream = nullptr,
      .fused_routing = true,
      .decode_router = decode_router,
  };
  // Repeated calls: outputs poisoned again before each, so only the last call's writes are read back.
  for (int c = 0; c < calls; ++c) {
    if (c > 0) run.poison();
    run_moe_routing(p);
  }
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
  return run.download();
}

// The first differing element of two byte images of `what` (as 32-bit words), or "" when equal.
std::string first_difference(const std::vector<uint8_t>& expected, const std::vector<uint8_t>& actual,
                             const char* what) {
  if (expected.size() != actual.size()) return std::string(what) + ": sizes differ";
  for (size_t i = 0; i + 4 <= expected.size(); i += 4)
    if (std::memcmp(expected.data() + i, actual.data() + i, 4) != 0) {
      uint32_t e, a;
      std::memcpy(&e, expected.data() + i, 4);
      std::memcpy(&a, actual.data() + i, 4);
      char text[160];
      std::snprintf(text, sizeof text, "%s word %zu: fused kernel 0x%08x (%g), decode router 0x%08x (%g)", what, i / 4,
                    e, bits_to_float(e), a, bits_to_float(a));
      return text;
    }
  return std::memcmp(expected.data(), actual.data(), expected.size()) == 0 ? "" : std::string(what) + ": tail differs";
}

// Whether token t's biased scores (double) keep the top_k + 1 best at least `margin` apart.
bool clear_top_k(const RouterLayer& layer, const std::vector<float>& u, int64_t t, double margin) {
  const RouterShape& s = layer.shape;
  std::vector<double> biased;
  const uint8_t* data = layer.router.storage->data.data();
  for (int64_t e = 0; e < s.experts; ++e) {
    double logit = 0;
    for (int64_t k = 0; k < s.hidden; ++k) {
      float w;
      if (s.format == WeightFormat::BF16) {
        uint16_t bits;
        std::memcpy(&bits, data + (e * s.hidden + k) * 2, 2);
        w = bf16_to_float(bits);
      } else {
        std::memcpy(&w, data + (e * s.hidden + k) * 4, 4);
      }
      logit += double(w) * u[size_t(t * s.hidden + k)];
    }
    const double score = std::sqrt(logit > 20.0 ? logit : std::log1p(std::exp(logit)));
    biased.push_back(score + (layer.bias.empty() ? 0.0 : layer.bias[size_t(e)]));
  }
  std::sort(biased.begin(), biased.end(), std::greater<>());
  for (int k = 0; k < s.top_k && k + 1 < s.experts; ++k)
    if (biased[size_t(k)] - biased[size_t(k + 1)] < margin) return false;
  return true;
}

// Rebuilds the bucketing from the GPU's ids and checks the decode router's buffers against it.
void check_bucketing(const RouterShape& s, int T, const RoutingOutputs& o) {
  const int K = s.top_k, E = int(s.experts), R = s.rows_per_item, slots = T * K;
  const std::vector<int32_t> ids = as<int32_t>(o.ids);
  std::vector<int32_t> offsets(static_cast<size_t>(E + 2)), row_tokens(static_cast<size_t>(slots + T)),
      slot_rows(static_cast<size_t>(slots));
  std::vector<MoeWorkItem> items;
  for (int j = 0; j * R < T; ++j) items.push_back({E, slots + j * R, std::min(R, T - j * R)});
  int row = 0;
  for (int e = 0; e < E; ++e) {
    offsets[size_t(e)] = row;
    const int first = row;
    for (int slot = 0; slot < slots; ++slot)
      if (ids[size_t(slot)] == e) {
        row_tokens[size_t(row)] = slot / K;
        slot_rows[size_t(slot)] = row++;
      }
    for (int r = first; r < row; r += R) items.push_back({e, r, std::min(R, row - r)});
  }
  ASSERT_EQ(row, slots) << "an expert id outside [0, " << E << ")";
  offsets[size_t(E)] = slots, offsets[size_t(E + 1)] = slots + T;
  for (int t = 0; t < T; ++t) row_tokens[size_t(slots + t)] = t;
  EXPECT_EQ(as<int32_t>(o.offsets), offsets);
  EXPECT_EQ(as<int32_t>(o.row_tokens), row_tokens);
  EXPECT_EQ(as<int32_t>(o.slot_rows), slot_rows);
  ASSERT_EQ(o.work_item_count, int(items.size()));
  const std::vector<MoeWorkItem> got = as<MoeWorkItem>(o.work_items);
  for (size_t i = 0; i < items.size(); ++i)
    EXPECT_TRUE(got[i].expert == items[i].expert && got[i].row_begin == items[i].row_begin &&
                got[i].row_count == items[i].row_count)
        << "work item " << i << ": got {" << got[i].expert << ", " << got[i].row_begin << ", " << got[i].row_count
        << "}, expected {" << items[i].expert << ", " << items[i].row_begin << ", " << items[i].row_count << "}";
}

// One case: fresh u (and token ids), both kernels, every check of the file comment.
void check_case(const RouterLayer& layer, int T, uint64_t seed, int bad_token = -1) {
  const RouterShape& s = layer.shape;
  SCOPED_TRACE(std::string(s.name) + " " + std::string(to_string(s.format)) + (layer.tid2eid.empty() ? "" : " hash") +
               (layer.bias.empty() ? " no bias" : "") + ", T = " + std::to_string(T) + ", seed " +
               std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> u(static_cast<size_t>(T * s.hidden));
  for (float& x : u) x = normal(rng);
  std::vector<int32_t> tokens(static_cast<size_t>(T));
  for (int32_t& token : tokens) token = int32_t(rng() % kVocab);
  if (bad_token >= 0) tokens[size_t(bad_token)] = int32_t(kVocab + 7);
  const DeviceBuffer d_u = to_device(u, "u"), d_tokens = to_device(tokens, "token ids");

  const RoutingOutputs expected = route(layer, d_u, d_tokens, T, false);
  const RoutingOutputs actual = route(layer, d_u, d_tokens, T, true);
  using Image = std::vector<uint8_t> RoutingOutputs::*;
  const std::pair<Image, const char*> images[] = {
      {&RoutingOutputs::u_bf16, "u_bf16"},
      {&RoutingOutputs::ids, "expert_ids"},        {&RoutingOutputs::weights, "expert_weights"},
      {&RoutingOutputs::offsets, "expert_offsets"}, {&RoutingOutputs::row_tokens, "row_tokens"},
      {&RoutingOutputs::slot_rows, "slot_rows"},   {&RoutingOutputs::work_items, "work_items"}};
  for (const auto& [image, what] : images) EXPECT_EQ(first_difference(expected.*image, actual.*image, what), "");
  const std::vector<float> logits = as<float>(expected.logits), scores = as<float>(actual.logits);
  for (size_t i = 0; i < logits.size(); ++i) {
    const double v = logits[i], s = std::sqrt(v > 20.0 ? v : std::log1p(std::exp(v)));
    if (std::isnan(v) ? !std::isnan(scores[i]) : !(std::fabs(scores[i] - s) <= 4e-7 * s + 1e-18)) {
      ADD_FAILURE() << "score " << i << ": " << scores[i] << " for logit " << v << " (expected " << s << ")";
      break;
    }
  }
  EXPECT_EQ(actual.work_item_count, expected.work_item_count);
  EXPECT_EQ(actual.finished_ctas, 0u) << "the ticket must be left at zero";
  EXPECT_EQ(actual.status, bad_token >= 0 ? bad_token + 1 : 0);
  check_bucketing(s, T, actual);

  if (!layer.cpu_comparable) return;
  // The CPU reference (hash layers: the bad token's row is routed as token 0 on the GPU).
  if (bad_token >= 0) tokens[size_t(bad_token)] = 0;
  cpu::MoeWeights cpu_weights{
      .gate = &layer.router.matrix,
      .gate_bias = layer.bias.empty() ? nullptr : layer.bias.data(),
      .tid2eid = layer.tid2eid.empty() ? nullptr : layer.tid2eid.data(),
      .vocab = layer.tid2eid.empty() ? 0 : kVocab,
  };
  const cpu::MoeParams params{.tokens = T, .hidden = s.hidden, .experts = s.experts, .top_k = s.top_k,
                              .routed_scaling_factor = kScaling};
  std::vector<int32_t> ref_ids(static_cast<size_t>(T * s.top_k));
  std::vector<float> ref_weights(ref_ids.size());
  cpu::moe_route(cpu_weights, params, u.data(), tokens.data(), ref_ids.data(), ref_weights.data());
  const std::vector<int32_t> ids = as<int32_t>(actual.ids);
  const std::vector<float> weights = as<float>(actual.weights);
  for (int t = 0; t < T; ++t) {
    if (layer.tid2eid.empty() && !clear_top_k(layer, u, t, 1e-4)) continue;
    for (int k = 0; k < s.top_k; ++k) {
      const size_t i = size_t(t * s.top_k + k);
      EXPECT_EQ(ids[i], ref_ids[i]) << "token " << t << " choice " << k;
      // fp32 rounding of log1p/exp/sqrt and of the router sum in another order: a few ulps of the weight.
      EXPECT_TRUE(std::isfinite(weights[i]) && std::fabs(weights[i] - ref_weights[i]) <= 1e-5f * kScaling)
          << "token " << t << " choice " << k << ": " << weights[i] << " vs " << ref_weights[i];
    }
  }
}

constexpr RouterShape kFlash{"flash", 256, 4096, 6, 64, WeightFormat::F32};
constexpr RouterShape kFlashBf16{"flash", 256, 4096, 6, 64, WeightFormat::BF16};
constexpr RouterShape kPro{"pro", 384, 7168, 6, 64, WeightFormat::F32};
constexpr RouterShape kOdd{"odd", 40, 264, 5, 3, WeightFormat::BF16};
constexpr RouterShape kTiny{"tiny", 8, 8, 1, 1, WeightFormat::F32};
constexpr RouterShape kLargest{"largest", 512, 12288, 32, 5, WeightFormat::F32};

TEST(MoeDecodeRouter, FlashScoredMatchesTheFusedKernelAndTheCpuAtEveryTokenCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer layer = make_layer(kFlash, Scoring::BIAS, 1);
  for (int T = 1; T <= kMoeFusedRoutingMaxTokens; ++T) check_case(layer, T, 100 + T);
}

TEST(MoeDecodeRouter, Bf16RouterAndNoBias) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer bf16 = make_layer(kFlashBf16, Scoring::BIAS, 2);
  for (const int T : {1, 5, 8}) check_case(bf16, T, 200 + T);
  const RouterLayer no_bias = make_layer(kFlash, Scoring::NO_BIAS, 3);
  for (const int T : {1, 4}) check_case(no_bias, T, 300 + T);
}

TEST(MoeDecodeRouter, ProWidth) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer layer = make_layer(kPro, Scoring::BIAS, 4);
  for (const int T : {1, 3, 8}) check_case(layer, T, 400 + T);
}

TEST(MoeDecodeRouter, HashRoutingAndATokenOutsideTheVocabulary) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer layer = make_layer(kFlash, Scoring::HASH, 5);
  for (int T = 1; T <= kMoeFusedRoutingMaxTokens; ++T) check_case(layer, T, 500 + T);
  check_case(layer, 6, 520, 3);
  check_case(layer, 1, 521, 0);
}

TEST(MoeDecodeRouter, OddShapesTiesAndNaN) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer odd = make_layer(kOdd, Scoring::BIAS, 6);
  for (int T = 1; T <= kMoeFusedRoutingMaxTokens; ++T) check_case(odd, T, 600 + T);
  const RouterLayer tiny = make_layer(kTiny, Scoring::BIAS, 7);
  for (const int T : {1, 2, 7, 8}) check_case(tiny, T, 700 + T);
  const RouterLayer tied = make_layer(kOdd, Scoring::BIAS, 8, true);
  for (const int T : {1, 8}) check_case(tied, T, 800 + T);
  const RouterLayer tied_f32 = make_layer(kFlash, Scoring::BIAS, 9, true);
  check_case(tied_f32, 3, 900);
  const RouterLayer nan_row = make_layer(kFlash, Scoring::BIAS, 10, false, 17);
  for (const int T : {1, 8}) check_case(nan_row, T, 1000 + T);
}

TEST(MoeDecodeRouter, LargestSupportedShape) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer layer = make_layer(kLargest, Scoring::BIAS, 11);
  for (const int T : {1, 8}) check_case(layer, T, 1100 + T);
}

TEST(MoeDecodeRouter, RepeatedCallsReuseTheTicket) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const RouterLayer layer = make_layer(kFlash, Scoring::BIAS, 12);
  std::mt19937_64 rng(1200);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> u(static_cast<size_t>(4 * kFlash.hidden));
  for (float& x : u) x = normal(rng);
  const DeviceBuffer d_u = to_device(u, "u"), d_tokens = to_device(std::vector<int32_t>(4, 0), "token ids");
  const RoutingOutputs once = route(layer, d_u, d_tokens, 4, true);
  const RoutingOutputs thrice = route(layer, d_u, d_tokens, 4, true, 3);
  EXPECT_EQ(first_difference(once.weights, thrice.weights, "expert_weights"), "");
  EXPECT_EQ(first_difference(once.work_items, thrice.work_items, "work_items"), "");
  EXPECT_EQ(thrice.finished_ctas, 0u);
}

}  // namespace
}  // namespace dsv4::cuda
