// Manifold-constrained hyper-connections (dsv4-model.md §2): the residual is n streams per token; each sub-block
// site mixes them in (hc_pre), and writes back (hc_post); hc_head collapses them before the final norm.
// All math is fp32. DeepSeek's reference rounds y (hc_pre), X' (hc_post) and h (hc_head) to bf16; the model
// applies round_to_bf16_inplace to those outputs when it reproduces that (exact mode keeps fp32).
#pragma once

#include <cstdint>

namespace dsv4::cpu {

struct MhcParams {
  int64_t tokens = 0;         // T
  int64_t hidden = 0;         // d
  int64_t streams = 4;        // n (hc_mult)
  int64_t sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;     // rms_norm_eps, used by the rsqrt over all n·d values
};

// One site's parameters (hc_attn_* or hc_ffn_*), fp32.
struct MhcSiteWeights {
  const float* fn = nullptr;     // [(2+n)·n, n·d]
  const float* base = nullptr;   // [(2+n)·n]
  const float* scale = nullptr;  // [3]: pre, post, comb
};

// hc_head_* parameters, fp32.
struct MhcHeadWeights {
  const float* fn = nullptr;     // [n, n·d]
  const float* base = nullptr;   // [n]
  const float* scale = nullptr;  // [1]
};

// X: [T, n, d] → y: [T, d] = Σ_k pre[k]·X[k] (pre not normalised), post: [T, n] (carries the factor 2),
// comb: [T, n, n] row-major comb[j][k], doubly stochastic after Sinkhorn.
void hc_pre(const MhcSiteWeights& weights, const float* X, const MhcParams& params, float* y, float* post,
            float* comb);

// X_out[k] = post[k]·out + Σ_j comb[j][k]·X[j] — the sum runs over comb's FIRST index.
// out: [T, d]; X, X_out: [T, n, d] (X_out may alias X); post: [T, n]; comb: [T, n, n].
void hc_post(const float* out, const float* X, const float* post, const float* comb, const MhcParams& params,
             float* X_out);

// X: [T, n, d] → h: [T, d] = Σ_k (sigmoid(m[k]·scale + base[k]) + hc_eps)·X[k].
void hc_head(const MhcHeadWeights& weights, const float* X, const MhcParams& params, float* h);

// comb: [n, n] logits (m·scale + base), in place: row softmax + eps, column normalisation, then iters−1 rounds of
// (row, column) normalisation, each dividing by (sum + eps).
void sinkhorn(float* comb, int64_t n, int64_t iters, float eps);

}  // namespace dsv4::cpu
