#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backends/cpu/moe.hpp"
#include "core/error.hpp"
#include "unit/backend_cpu/op_test_support.hpp"

namespace dsv4::cpu {
namespace {

using testing::random_vector;

struct NaiveExpert {
  std::vector<float> w1, w2, w3;
};

class MoeTest : public ::testing::Test {
 protected:
  static constexpr int64_t T = 5, d = 16, I = 12, E = 8, K = 3, vocab = 10;
  MoeParams params{.tokens = T, .hidden = d, .intermediate = I, .experts = E, .top_k = K,
                   .routed_scaling_factor = 1.5f, .swiglu_limit = 1.0f};  // a low limit so the clamps bite
  std::vector<float> gate_values = random_vector(E * d, 1);
  std::vector<float> bias = random_vector(E, 2, -0.5f, 0.5f);
  std::vector<NaiveExpert> naive_experts;
  NaiveExpert naive_shared;
  std::vector<OwnedQuantizedMatrix> owned;
  std::vector<ExpertWeights> experts;
  ExpertWeights shared;
  OwnedQuantizedMatrix gate;
  std::vector<int32_t> tid2eid;
  std::vector<float> u = random_vector(T * d, 3, -2.0f, 2.0f);
  std::vector<int32_t> tokens = {0, 3, 9, 3, 7};

  ExpertWeights add_expert(NaiveExpert& naive, uint32_t seed) {
    naive.w1 = random_vector(I * d, seed, -0.8f, 0.8f);
    naive.w3 = random_vector(I * d, seed + 1, -0.8f, 0.8f);
    naive.w2 = random_vector(d * I, seed + 2, -0.8f, 0.8f);
    owned.push_back(testing::f32_matrix(naive.w1, I, d));
    owned.push_back(testing::f32_matrix(naive.w2, d, I));
    owned.push_back(testing::f32_matrix(naive.w3, I, d));
    const size_t n = owned.size();
    return {&owned[n - 3].matrix, &owned[n - 2].matrix, &owned[n - 1].matrix};
  }

  void SetUp() override {
    owned.reserve(3 * (E + 1));
    naive_experts.resize(E);
    for (int64_t e = 0; e < E; ++e) experts.push_back(add_expert(naive_experts[e], 100 + 10 * e));
    shared = add_expert(naive_shared, 999);
    gate = testing::f32_matrix(gate_values, E, d);
    for (int64_t t = 0; t < vocab; ++t)
      for (int64_t k = 0; k < K; ++k) tid2eid.push_back(int32_t((t * 5 + k * 3) % E));
  }

  MoeWeights weights(bool hashed) const {
    MoeWeights w{.gate = &gate.matrix, .experts = experts.data(), .shared = shared};
    if (hashed) {
      w.tid2eid = tid2eid.data();
      w.vocab = vocab;
    } else {
      w.gate_bias = bias.data();
    }
    return w;
  }

  std::vector<double> naive_expert(const NaiveExpert& e, const float* x) const {
    std::vector<double> h(I), y(d, 0.0);
    for (int64_t i = 0; i < I; ++i) {
      double g = 0, v = 0;
      for (int64_t j = 0; j < d; ++j) {
        g += double(e.w1[i * d + j]) * x[j];
        v += double(e.w3[i * d + j]) * x[j];
      }
      g = std::min(g, 1.0);
      v = std::clamp(v, -1.0, 1.0);
      h[i] = g / (1 + std::exp(-g)) * v;
    }
    for (int64_t j = 0; j < d; ++j)
      for (int64_t i = 0; i < I; ++i) y[j] += double(e.w2[j * I + i]) * h[i];
    return y;
  }

  // The naive loop of dsv4-model.md §4.
  std::vector<double> naive_moe(bool hashed, std::vector<int32_t>* chosen) const {
    std::vector<double> out(T * d);
    for (int64_t t = 0; t < T; ++t) {
      const float* x = u.data() + t * d;
      std::vector<double> s(E);
      for (int64_t e = 0; e < E; ++e) {
        double logit = 0;
        for (int64_t j = 0; j < d; ++j) logit += double(gate_values[e * d + j]) * x[j];
        s[e] = std::sqrt(std::log1p(std::exp(logit)));
      }
      std::vector<int32_t> idx(K);
      if (hashed) {
        for (int64_t k = 0; k < K; ++k) idx[k] = int32_t(tid2eid[tokens[t] * K + k]);
      } else {
        std::vector<int32_t> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] + bias[a] > s[b] + bias[b]; });
        std::copy_n(order.begin(), K, idx.begin());
      }
      chosen->insert(chosen->end(), idx.begin(), idx.end());
      double sum = 0;
      for (int32_t e : idx) sum += s[e];
      const auto shared = naive_expert(naive_shared, x);
      for (int64_t j = 0; j < d; ++j) out[t * d + j] = shared[j];
      for (int32_t e : idx) {
        const auto y = naive_expert(naive_experts[e], x);
        for (int64_t j = 0; j < d; ++j) out[t * d + j] += s[e] / sum * 1.5 * y[j];
      }
    }
    return out;
  }
};

TEST_F(MoeTest, ScoredRoutingMatchesNaiveLoop) {
  const MoeWeights w = weights(false);
  std::vector<int32_t> expected_ids;
  const auto expected = naive_moe(false, &expected_ids);
  std::vector<int32_t> ids(T * K);
  std::vector<float> route_weights(T * K);
  moe_route(w, params, u.data(), nullptr, ids.data(), route_weights.data());
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + t * K, ids.begin() + (t + 1) * K),
              std::vector<int32_t>(expected_ids.begin() + t * K, expected_ids.begin() + (t + 1) * K));
    EXPECT_NEAR(route_weights[t * K] + route_weights[t * K + 1] + route_weights[t * K + 2], 1.5, 1e-5);
  }
  std::vector<float> out(T * d);
  moe_forward(w, params, u.data(), nullptr, out.data());
  EXPECT_LT(testing::max_abs_diff(out, expected), 1e-5);
}

TEST_F(MoeTest, HashRoutingMatchesNaiveLoop) {
  const MoeWeights w = weights(true);
  std::vector<int32_t> expected_ids;
  const auto expected = naive_moe(true, &expected_ids);
  std::vector<int32_t> ids(T * K);
  std::vector<float> route_weights(T * K);
  moe_route(w, params, u.data(), tokens.data(), ids.data(), route_weights.data());
  EXPECT_EQ(ids, expected_ids);
  std::vector<float> out(T * d);
  moe_forward(w, params, u.data(), tokens.data(), out.data());
  EXPECT_LT(testing::max_abs_diff(out, expected), 1e-5);
}

TEST_F(MoeTest, BiasOnlySelects) {
  // A huge bias on expert 6 forces it into every token's set, but its weight still comes from the unbiased score.
  bias.assign(E, 0.0f);
  bias[6] = 100.0f;
  const MoeWeights w = weights(false);
  std::vector<int32_t> ids(T * K);
  std::vector<float> route_weights(T * K);
  moe_route(w, params, u.data(), nullptr, ids.data(), route_weights.data());
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(ids[t * K], 6);
    EXPECT_LT(route_weights[t * K], 1.5f);
  }
}

TEST_F(MoeTest, RejectsBadHashInput) {
  const MoeWeights w = weights(true);
  std::vector<int32_t> ids(T * K);
  std::vector<float> route_weights(T * K);
  EXPECT_THROW(moe_route(w, params, u.data(), nullptr, ids.data(), route_weights.data()), Error);
  tokens[2] = int32_t(vocab);
  EXPECT_THROW(moe_route(w, params, u.data(), tokens.data(), ids.data(), route_weights.data()), Error);
  tokens[2] = 1;
  tid2eid[1 * K + 1] = E;
  EXPECT_THROW(moe_route(w, params, u.data(), tokens.data(), ids.data(), route_weights.data()), Error);
}

}  // namespace
}  // namespace dsv4::cpu
