#include "backends/cpu/moe.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "backends/cpu/bf16_rounding.hpp"
#include "backends/cpu/linear.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"

namespace dsv4::cpu {

namespace {

float softplus(float v) {
  // log1p(exp(v)) without overflow for large v.
  return v > 20.0f ? v : std::log1p(std::exp(v));
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

void check_matrix(const QuantizedMatrix* m, int64_t rows, int64_t cols, const char* what) {
  check(m != nullptr, "moe: ", what, " weight is missing");
  check(m->rows == rows && m->cols == cols, "moe: ", what, " must be [", rows, ", ", cols, "], got [", m->rows, ", ",
        m->cols, "]");
}

}  // namespace

void moe_route(const MoeWeights& w, const MoeParams& p, const float* u, const int32_t* token_ids, int32_t* expert_ids,
               float* expert_weights) {
  check(p.tokens >= 0 && p.experts > 0 && p.top_k > 0 && p.top_k <= p.experts, "moe: bad routing shape tokens=",
        p.tokens, " experts=", p.experts, " top_k=", p.top_k);
  check_matrix(w.gate, p.experts, p.hidden, "router gate");
  const bool hashed = w.tid2eid != nullptr;
  check(!hashed || token_ids != nullptr, "moe: hash routing needs token ids");
  std::vector<float> logits(p.tokens * p.experts);
  linear(*w.gate, u, p.tokens, logits.data());
  std::vector<int32_t> order(p.experts);
  std::vector<float> biased(p.experts);
  for (int64_t t = 0; t < p.tokens; ++t) {
    float* s = logits.data() + t * p.experts;
    for (int64_t e = 0; e < p.experts; ++e) s[e] = std::sqrt(softplus(s[e]));
    int32_t* ids = expert_ids + t * p.top_k;
    if (hashed) {
      const int32_t token = token_ids[t];
      check(token >= 0 && token < w.vocab, "moe: token id ", token, " is outside the hash table's ", w.vocab,
            " rows");
      for (int64_t k = 0; k < p.top_k; ++k) {
        const int64_t e = w.tid2eid[token * p.top_k + k];
        check(e >= 0 && e < p.experts, "moe: tid2eid[", token, "][", k, "] = ", e, " is not an expert index");
        ids[k] = static_cast<int32_t>(e);
      }
    } else {
      for (int64_t e = 0; e < p.experts; ++e) biased[e] = s[e] + (w.gate_bias != nullptr ? w.gate_bias[e] : 0.0f);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + p.top_k, order.end(), [&](int32_t a, int32_t b) {
        return biased[a] > biased[b] || (biased[a] == biased[b] && a < b);
      });
      std::copy_n(order.begin(), p.top_k, ids);
    }
    // The bias only selects; the weights come from the unbiased scores.
    float sum = 0.0f;
    for (int64_t k = 0; k < p.top_k; ++k) sum += s[ids[k]];
    for (int64_t k = 0; k < p.top_k; ++k)
      expert_weights[t * p.top_k + k] = s[ids[k]] / sum * p.routed_scaling_factor;
  }
}

void swiglu_expert(const ExpertWeights& expert, const MoeParams& p, const float* u, int64_t T, float* out) {
  check_matrix(expert.w1, p.intermediate, p.hidden, "expert w1");
  check_matrix(expert.w3, p.intermediate, p.hidden, "expert w3");
  check_matrix(expert.w2, p.hidden, p.intermediate, "expert w2");
  std::vector<float> gate(T * p.intermediate), up(T * p.intermediate);
  linear(*expert.w1, u, T, gate.data());
  linear(*expert.w3, u, T, up.data());
  for (size_t i = 0; i < gate.size(); ++i) {
    const float g = std::min(gate[i], p.swiglu_limit);
    const float v = std::clamp(up[i], -p.swiglu_limit, p.swiglu_limit);
    gate[i] = p.bf16_expert_inputs ? round_to_bf16(silu(g) * v) : silu(g) * v;
  }
  linear(*expert.w2, gate.data(), T, out);
}

void moe_forward(const MoeWeights& w, const MoeParams& p, const float* u, const int32_t* token_ids, float* out) {
  check(w.experts != nullptr, "moe: routed expert weights are missing");
  const int64_t d = p.hidden;
  std::vector<int32_t> ids(p.tokens * p.top_k);
  std::vector<float> route_weights(p.tokens * p.top_k);
  moe_route(w, p, u, token_ids, ids.data(), route_weights.data());
  std::vector<float> u_bf16;
  if (p.bf16_expert_inputs) {
    u_bf16.assign(u, u + p.tokens * d);
    round_to_bf16_inplace(u_bf16.data(), int64_t(u_bf16.size()));
    u = u_bf16.data();
  }

  // The shared expert initialises the output; each routed expert then runs once on all the tokens routed to it,
  // so its weights are read once per call.
  swiglu_expert(w.shared, p, u, p.tokens, out);
  std::vector<std::vector<int64_t>> routed_slots(p.experts);  // per expert: indices t·top_k + k
  for (int64_t slot = 0; slot < p.tokens * p.top_k; ++slot) routed_slots[ids[slot]].push_back(slot);
  std::vector<float> gathered, expert_out;
  for (int64_t e = 0; e < p.experts; ++e) {
    const std::vector<int64_t>& slots = routed_slots[e];
    if (slots.empty()) continue;
    const auto n = static_cast<int64_t>(slots.size());
    gathered.resize(n * d);
    expert_out.resize(n * d);
    for (int64_t i = 0; i < n; ++i) std::copy_n(u + (slots[i] / p.top_k) * d, d, gathered.data() + i * d);
    swiglu_expert(w.experts[e], p, gathered.data(), n, expert_out.data());
    for (int64_t i = 0; i < n; ++i) {
      float* dst = out + (slots[i] / p.top_k) * d;
      const float weight = route_weights[slots[i]];
      for (int64_t j = 0; j < d; ++j) dst[j] += weight * expert_out[i * d + j];
    }
  }
}

}  // namespace dsv4::cpu
