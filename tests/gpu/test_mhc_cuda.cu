// The CUDA mHC kernels (hc_pre, hc_head, hc_post, the fused hc_post_pre) against dsv4::cpu's mhc ops: V4-Flash
// (d 4096) and V4-Pro (d 7168) widths and odd ones (96, 260: a partial d-slice), T ∈ {1, 5, 64, 300, 1000} (partial
// token tiles, every slice width the launcher picks; at 1000 each persistent CTA walks more tiles than it has
// pipeline stages), both numerics modes, hc_post and hc_post_pre in place and out of place. Fresh random inputs per
// case, outputs poisoned with NaN plus a guard region past their end, every element checked. hc_post_pre (one fused
// launch up to kFusedPostPreMaxTokens = 128 tokens: T ∈ {1, 5, 64, 128}; hc_post then hc_pre above) is checked
// as the CPU's hc_post followed by its hc_pre on the GPU's updated residual (so a bf16 rounding of X_out that lands
// on the other side of a boundary does not count twice). The projection kernels run twice on one workspace without
// re-zeroing it: the counters must re-arm and the result must be bit-identical. One workspace also serves a mix of
// hc_pre, hc_head and hc_post_pre launches of different sizes (different slice widths, so different scratch
// layouts), and 40 back-to-back launches without a host synchronisation. Up to 16 tokens every case also runs the
// cluster decode kernel (CLUSTER_ASYNC) and the default (AUTO: the single-cluster kernel at V4-Flash's width, also
// checked at its own widths 256, 1024 and 2816, and at V4-Pro's at one token with two vectors per thread, also
// checked at 4608 (9 warps); the cluster kernel at the others); every hc_post_pre case also runs the warp-specialised
// persistent kernel (PERSISTENT_WARP_SPECIALIZED), which must give the persistent kernel's bits where that one takes
// 64-dim slices too. Above 16 tokens every case also runs AUTO (up to kAutoClusterPerTileMaxTokens the single-cluster
// kernel at its widths, a cluster per 16-token tile; the persistent kernel beyond).
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

#include "backends/cpu/bf16_rounding.hpp"
#include "backends/cpu/mhc.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/kernels/mhc.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"
#include "support/device_buffers.hpp"

namespace dsv4::cuda {
namespace {

constexpr int kN = kMhcStreams;
constexpr int kSiteRows = (2 + kN) * kN;
constexpr float kHcEps = 1e-6f, kNormEps = 1e-6f;
constexpr int kSinkhornIters = 20;

// Compares every element; tolerance(i) bounds |actual − expected|. NaN never passes. At most 8 reports.
template <class Tolerance>
void expect_close(const std::vector<float>& actual, const std::vector<float>& expected, Tolerance tolerance,
                  const std::string& what, int64_t row_length) {
  ASSERT_EQ(actual.size(), expected.size());
  int failures = 0;
  double max_error = 0.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double error = std::fabs(double(actual[i]) - double(expected[i]));
    const double limit = tolerance(i);
    if (!(error <= limit) && ++failures <= 8)
      ADD_FAILURE() << what << "[" << i / size_t(row_length) << ", " << i % size_t(row_length) << "] = " << actual[i]
                    << ", expected " << expected[i] << ", tolerance " << limit;
    if (!(error <= max_error)) max_error = error;  // NaN sticks
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << actual.size()
                         << " elements out of tolerance; largest error " << max_error;
}

void expect_bf16_exact(const std::vector<float>& values, const std::string& what) {
  for (size_t i = 0; i < values.size(); ++i)
    if (round_to_bf16(values[i]) != values[i] || std::isnan(values[i])) {
      ADD_FAILURE() << what << "[" << i << "] = " << values[i] << " is not a bf16 value";
      return;
    }
}

void expect_bf16_of(const DeviceBuffer& bf16, const std::vector<float>& fp32, const std::string& what) {
  std::vector<uint16_t> bits(fp32.size());
  bf16.download(bits.data(), bits.size() * sizeof(uint16_t));
  for (size_t i = 0; i < fp32.size(); ++i)
    if (bits[i] != float_to_bf16(fp32[i])) {
      ADD_FAILURE() << what << "[" << i << "] = bf16 0x" << std::hex << bits[i] << ", fp32 output " << std::dec
                    << fp32[i];
      return;
    }
}

struct Inputs {
  std::vector<float> X, fn, base, scale;
};

// X with per-token magnitudes spread over 2^±3; fn sized so the mixes are O(1) (what the sigmoids and Sinkhorn see
// in the model), so every output is sensitive to the projection.
Inputs random_inputs(int64_t T, int64_t d, int rows, int scales, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Inputs in;
  const int64_t flat = kN * d;
  in.X.resize(size_t(T * flat));
  for (int64_t t = 0; t < T; ++t) {
    const float magnitude = std::ldexp(1.0f, int(rng() % 7) - 3);
    for (int64_t i = 0; i < flat; ++i) in.X[size_t(t * flat + i)] = normal(rng) * magnitude;
  }
  in.fn.resize(size_t(rows * flat));
  const float fn_sigma = 2.0f / std::sqrt(float(flat));
  for (float& v : in.fn) v = normal(rng) * fn_sigma;
  in.base.resize(size_t(rows));
  for (float& v : in.base) v = normal(rng) * 0.5f;
  const float scale_values[3] = {0.8f, 1.1f, 1.5f};
  in.scale.assign(scale_values, scale_values + scales);
  return in;
}

// Per token and projection row: Σ|fn_r · x| · inv_rms, the magnitude that bounds the GPU's summation-order error
// of the mix (computed in double).
std::vector<double> mix_magnitudes(const Inputs& in, int64_t T, int64_t d, int rows) {
  const int64_t flat = kN * d;
  std::vector<double> magnitude(size_t(T * rows));
  for (int64_t t = 0; t < T; ++t) {
    const float* x = &in.X[size_t(t * flat)];
    double squares = 0;
    for (int64_t i = 0; i < flat; ++i) squares += double(x[i]) * x[i];
    const double inv_rms = 1.0 / std::sqrt(squares / double(flat) + kNormEps);
    for (int r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t i = 0; i < flat; ++i) sum += std::fabs(double(in.fn[size_t(r * flat + i)]) * x[i]);
      magnitude[size_t(t * rows + r)] = sum * inv_rms;
    }
  }
  return magnitude;
}

// A mix may differ from the CPU's by fp32 rounding in another summation order: bounded by 64 ulps of its magnitude.
constexpr double kMixRelativeError = 64 * 6e-8;

// A zero-filled workspace sized for `tokens` tokens of width d (it serves every launch with fewer tokens).
struct Workspace {
  DeviceBuffer buffer;
  size_t bytes = 0;
};

Workspace zeroed_workspace(int64_t tokens, int64_t d, const char* what) {
  const size_t bytes = hc_projection_workspace_bytes(tokens, d, list_devices().front().multiprocessors);
  Workspace workspace{DeviceBuffer(bytes, what), bytes};
  workspace.buffer.fill_bytes(0);
  return workspace;
}

// `shared` (a workspace used by earlier launches, not re-zeroed) when given, else `own`, zeroed here.
Workspace& shared_or_own_workspace(Workspace* shared, Workspace& own, int64_t tokens, int64_t d, const char* what) {
  if (shared != nullptr) return *shared;
  own = zeroed_workspace(tokens, d, what);
  return own;
}

// Bit-identical reruns on the same workspace: `current` of a later launch against `first` of the first one.
void expect_same_as_first_run(const std::vector<float>& first, const std::vector<float>& current, const char* what) {
  EXPECT_EQ(std::memcmp(first.data(), current.data(), current.size() * sizeof(float)), 0)
      << "the second launch on the same workspace differs from the first (" << what << ")";
}

// hc_pre's outputs (also the fused hc_post_pre's): poisoned fp32 y, post and comb, y_bf16 filled with 0xFF and a
// 16-byte guard past its end.
struct PreOutputBuffers {
  PreOutputBuffers(int64_t T, int64_t d)
      : y(poisoned(size_t(T * d), "y")),
        post(poisoned(size_t(T * kN), "post")),
        comb(poisoned(size_t(T * kN * kN), "comb")),
        y_bf16(size_t(T * d) * sizeof(uint16_t) + 16, "y_bf16") {
    y_bf16.fill_bytes(0xFF);
  }
  DeviceBuffer y, post, comb, y_bf16;
};

// A site's weights on the device.
struct DeviceSite {
  explicit DeviceSite(const Inputs& in)
      : fn(to_device(in.fn, "fn")), base(to_device(in.base, "base")), scale(to_device(in.scale, "scale")) {}
  DeviceBuffer fn, base, scale;
};

// hc_pre's parameters of a test launch of `site` over X into `outputs` (the tests' epsilons and Sinkhorn iterations).
HcPreParams pre_params(const float* X, const DeviceSite& site, int64_t T, int64_t d, bool round,
                       PreOutputBuffers& outputs, HcKernelChoice kernel, Workspace& workspace) {
  return {.X = X, .fn = site.fn.as<float>(), .base = site.base.as<float>(), .scale = site.scale.as<float>(),
          .tokens = T, .hidden = d, .sinkhorn_iters = kSinkhornIters, .hc_eps = kHcEps, .norm_eps = kNormEps,
          .round_to_bf16 = round, .y = outputs.y.as<float>(), .y_bf16 = outputs.y_bf16.as<__nv_bfloat16>(),
          .post = outputs.post.as<float>(), .comb = outputs.comb.as<float>(), .kernel = kernel,
          .workspace = workspace.buffer.data(), .workspace_bytes = workspace.bytes};
}

std::string case_name(const char* op, int64_t T, int64_t d, bool round,
                      HcKernelChoice kernel = HcKernelChoice::PERSISTENT) {
  return std::string(op) + " T=" + std::to_string(T) + " d=" + std::to_string(d) + (round ? " reference" : " exact") +
         (kernel == HcKernelChoice::AUTO ? " default kernel (single-cluster where it applies)"
          : kernel == HcKernelChoice::PERSISTENT_WARP_SPECIALIZED ? " warp-specialised persistent kernel"
          : kernel == HcKernelChoice::CLUSTER_ASYNC               ? " cluster decode kernel"
                                                                  : " persistent kernel");
}

// The CPU's hc_pre of in.X and the magnitudes that bound the GPU's error.
struct PreReference {
  std::vector<float> y, y_unrounded, post, comb;
  std::vector<double> magnitude;
};

PreReference hc_pre_reference(const Inputs& in, int64_t T, int64_t d, bool round) {
  PreReference ref{std::vector<float>(size_t(T * d)), {}, std::vector<float>(size_t(T * kN)),
                   std::vector<float>(size_t(T * kN * kN)), mix_magnitudes(in, T, d, kSiteRows)};
  const cpu::MhcParams cpu_params{T, d, kN, kSinkhornIters, kHcEps, kNormEps};
  cpu::hc_pre({in.fn.data(), in.base.data(), in.scale.data()}, in.X.data(), cpu_params, ref.y.data(),
              ref.post.data(), ref.comb.data());
  ref.y_unrounded = ref.y;
  if (round) cpu::round_to_bf16_inplace(ref.y.data(), int64_t(ref.y.size()));
  return ref;
}

// hc_pre's outputs on the GPU against the CPU op on the same X (in.X) and weights.
void expect_hc_pre_outputs(const Inputs& in, const PreReference& ref, int64_t T, int64_t d, bool round,
                           const std::vector<float>& y_gpu, const DeviceBuffer& y_bf16,
                           const std::vector<float>& post_gpu, const std::vector<float>& comb_gpu) {
  const int64_t flat = kN * d;
  // y = Σ pre_k X_k: each pre_k moves by at most sigmoid' (≤ 1/4) · scale · the mix error.
  expect_close(y_gpu, ref.y, [&](size_t e) {
    const int64_t t = int64_t(e) / d, i = int64_t(e) % d;
    double bound = 0;
    for (int k = 0; k < kN; ++k) {
      const double x = std::fabs(in.X[size_t(t * flat + k * d + i)]);
      bound += x * (0.25 * in.scale[0] * kMixRelativeError * ref.magnitude[size_t(t * kSiteRows + k)] + 8e-7);
    }
    // Reference mode: a value next to a bf16 rounding boundary may round the other way.
    if (round) bound += bf16_ulp(std::fabs(ref.y_unrounded[e]) + float(bound));
    return bound + 1e-30;
  }, "y", d);
  if (round) expect_bf16_exact(y_gpu, "y");
  expect_bf16_of(y_bf16, y_gpu, "y_bf16");
  expect_close(post_gpu, ref.post, [&](size_t e) {
    const int64_t t = int64_t(e) / kN, k = int64_t(e) % kN;
    return 2 * 0.25 * in.scale[1] * kMixRelativeError * ref.magnitude[size_t(t * kSiteRows + kN + k)] + 1e-6;
  }, "post", kN);
  // Sinkhorn moves a comb entry by about the logit error; 40 normalisations add a few ulps each.
  expect_close(comb_gpu, ref.comb, [&](size_t e) {
    const int64_t t = int64_t(e) / (kN * kN);
    double logit_error = 0;
    for (int r = 2 * kN; r < kSiteRows; ++r)
      logit_error = std::max(logit_error,
                             in.scale[2] * kMixRelativeError * ref.magnitude[size_t(t * kSiteRows + r)]);
    return 2 * logit_error + 1e-5;
  }, "comb", kN * kN);
}

// Each of `kernels` on the same inputs against one CPU reference. `shared` (optional): a workspace used by earlier
// launches, not re-zeroed.
void check_hc_pre(int64_t T, int64_t d, bool round, const std::vector<HcKernelChoice>& kernels, uint32_t seed,
                  Workspace* shared = nullptr) {
  const Inputs in = random_inputs(T, d, kSiteRows, 3, seed);
  const PreReference ref = hc_pre_reference(in, T, d, round);
  const DeviceBuffer X = to_device(in.X, "X");
  const DeviceSite site(in);
  for (const HcKernelChoice kernel : kernels) {
    SCOPED_TRACE(case_name("hc_pre", T, d, round, kernel));
    Workspace own;
    Workspace& workspace = shared_or_own_workspace(shared, own, T, d, "hc_pre workspace");

    std::vector<float> first_y;
    for (int run = 0; run < 2; ++run) {
      SCOPED_TRACE("run " + std::to_string(run));
      PreOutputBuffers outputs(T, d);
      run_hc_pre(pre_params(X.as<float>(), site, T, d, round, outputs, kernel, workspace));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> y_gpu = download(outputs.y, size_t(T * d));
      expect_hc_pre_outputs(in, ref, T, d, round, y_gpu, outputs.y_bf16, download(outputs.post, size_t(T * kN)),
                            download(outputs.comb, size_t(T * kN * kN)));
      if (run == 0)
        first_y = y_gpu;
      else
        expect_same_as_first_run(first_y, y_gpu, "y");
    }
  }
}

void check_hc_head(int64_t T, int64_t d, bool round, const std::vector<HcKernelChoice>& kernels, uint32_t seed,
                   Workspace* shared = nullptr) {
  const Inputs in = random_inputs(T, d, kN, 1, seed);
  const int64_t flat = kN * d;
  std::vector<float> h_ref(size_t(T * d));
  const cpu::MhcParams cpu_params{T, d, kN, kSinkhornIters, kHcEps, kNormEps};
  cpu::hc_head({in.fn.data(), in.base.data(), in.scale.data()}, in.X.data(), cpu_params, h_ref.data());
  std::vector<float> h_unrounded = h_ref;
  if (round) cpu::round_to_bf16_inplace(h_ref.data(), int64_t(h_ref.size()));
  const std::vector<double> magnitude = mix_magnitudes(in, T, d, kN);

  const DeviceBuffer X = to_device(in.X, "X"), fn = to_device(in.fn, "fn"), base = to_device(in.base, "base"),
                     scale = to_device(in.scale, "scale");
  for (const HcKernelChoice kernel : kernels) {
    SCOPED_TRACE(case_name("hc_head", T, d, round, kernel));
    Workspace own;
    Workspace& workspace = shared_or_own_workspace(shared, own, T, d, "hc_head workspace");
    std::vector<float> first_h;
    for (int run = 0; run < 2; ++run) {
      SCOPED_TRACE("run " + std::to_string(run));
      DeviceBuffer h = poisoned(size_t(T * d), "h");
      run_hc_head({.X = X.as<float>(),
                   .fn = fn.as<float>(),
                   .base = base.as<float>(),
                   .scale = scale.as<float>(),
                   .tokens = T,
                   .hidden = d,
                   .hc_eps = kHcEps,
                   .norm_eps = kNormEps,
                   .round_to_bf16 = round,
                   .h = h.as<float>(),
                   .kernel = kernel,
                   .workspace = workspace.buffer.data(),
                   .workspace_bytes = workspace.bytes});
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> h_gpu = download(h, size_t(T * d));
      expect_close(h_gpu, h_ref, [&](size_t e) {
        const int64_t t = int64_t(e) / d, i = int64_t(e) % d;
        double bound = 0;
        for (int k = 0; k < kN; ++k)
          bound += std::fabs(in.X[size_t(t * flat + k * d + i)]) *
                   (0.25 * in.scale[0] * kMixRelativeError * magnitude[size_t(t * kN + k)] + 8e-7);
        if (round) bound += bf16_ulp(std::fabs(h_unrounded[e]) + float(bound));
        return bound + 1e-30;
      }, "h", d);
      if (round) expect_bf16_exact(h_gpu, "h");
      if (run == 0)
        first_h = h_gpu;
      else
        expect_same_as_first_run(first_h, h_gpu, "h");
    }
  }
}

// hc_post's inputs: the sub-block output, the residual, post in (0, 2) and comb in (0, 1).
struct PostInputs {
  std::vector<float> out, X, post, comb;
};

PostInputs random_post_inputs(int64_t T, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  PostInputs in{std::vector<float>(size_t(T * d)), std::vector<float>(size_t(T * kN * d)),
                std::vector<float>(size_t(T * kN)), std::vector<float>(size_t(T * kN * kN))};
  for (float& v : in.out) v = normal(rng);
  for (float& v : in.X) v = normal(rng) * 4.0f;
  for (float& v : in.post) v = 2.0f * uniform(rng);
  for (float& v : in.comb) v = uniform(rng);
  return in;
}

// hc_post's inputs on the device (the residual X separately: the tests place it).
struct DevicePostInputs {
  explicit DevicePostInputs(const PostInputs& in)
      : out(to_device(in.out, "out")), post(to_device(in.post, "post")), comb(to_device(in.comb, "comb")) {}
  DeviceBuffer out, post, comb;
};

// hc_post_pre's parameters of a test launch: hc_post of `post_in` on X into X_out, then the next site's hc_pre into
// `outputs` (the tests' epsilons and Sinkhorn iterations).
HcPostPreParams post_pre_params(const DevicePostInputs& post_in, const float* X, float* X_out, const DeviceSite& next,
                                int64_t T, int64_t d, bool round, PreOutputBuffers& outputs, HcKernelChoice kernel,
                                Workspace& workspace) {
  return {.out = post_in.out.as<float>(), .X = X, .post = post_in.post.as<float>(), .comb = post_in.comb.as<float>(),
          .X_out = X_out, .next_fn = next.fn.as<float>(), .next_base = next.base.as<float>(),
          .next_scale = next.scale.as<float>(), .tokens = T, .hidden = d, .sinkhorn_iters = kSinkhornIters,
          .hc_eps = kHcEps, .norm_eps = kNormEps, .round_to_bf16 = round, .y = outputs.y.as<float>(),
          .y_bf16 = outputs.y_bf16.as<__nv_bfloat16>(), .next_post = outputs.post.as<float>(),
          .next_comb = outputs.comb.as<float>(), .kernel = kernel, .workspace = workspace.buffer.data(),
          .workspace_bytes = workspace.bytes};
}

// The updated residual on the GPU against the CPU's hc_post. Same operation order as the CPU; only a contracted vs
// separate multiply-add may differ: a few ulps of the terms.
void expect_hc_post_output(const PostInputs& in, int64_t T, int64_t d, bool round, const std::vector<float>& actual) {
  std::vector<float> expected(in.X.size());
  cpu::hc_post(in.out.data(), in.X.data(), in.post.data(), in.comb.data(),
               {T, d, kN, kSinkhornIters, kHcEps, kNormEps}, expected.data());
  const std::vector<float> unrounded = expected;
  if (round) cpu::round_to_bf16_inplace(expected.data(), int64_t(expected.size()));
  expect_close(actual, expected, [&](size_t e) {
    const int64_t t = int64_t(e) / (kN * d), k = (int64_t(e) / d) % kN, i = int64_t(e) % d;
    double terms = std::fabs(in.post[size_t(t * kN + k)] * in.out[size_t(t * d + i)]);
    for (int j = 0; j < kN; ++j)
      terms += std::fabs(in.comb[size_t((t * kN + j) * kN + k)] * in.X[size_t((t * kN + j) * d + i)]);
    double bound = 4 * 6e-8 * terms;
    if (round) bound += bf16_ulp(std::fabs(unrounded[e]) + float(bound));
    return bound + 1e-30;
  }, "X_out", d);
  if (round) expect_bf16_exact(actual, "X_out");
}

void check_hc_post(int64_t T, int64_t d, bool round, bool in_place, uint32_t seed) {
  SCOPED_TRACE(case_name("hc_post", T, d, round) + (in_place ? " in place" : ""));
  const PostInputs in = random_post_inputs(T, d, seed);
  const DeviceBuffer out_d = to_device(in.out, "out"), post_d = to_device(in.post, "post"),
                     comb_d = to_device(in.comb, "comb");
  DeviceBuffer X_d = poisoned(in.X.size(), "X");
  X_d.upload(in.X.data(), in.X.size() * sizeof(float));
  DeviceBuffer X_out_d = poisoned(in.X.size(), "X_out");
  float* X_out = in_place ? X_d.as<float>() : X_out_d.as<float>();
  run_hc_post({.out = out_d.as<float>(),
               .X = X_d.as<float>(),
               .post = post_d.as<float>(),
               .comb = comb_d.as<float>(),
               .tokens = T,
               .hidden = d,
               .round_to_bf16 = round,
               .X_out = X_out});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> actual = download(in_place ? X_d : X_out_d, in.X.size());
  if (!in_place) EXPECT_EQ(download(X_d, in.X.size()), in.X) << "X changed although X_out is another buffer";
  expect_hc_post_output(in, T, d, round, actual);
}

// The fused launch: X_out against the CPU's hc_post, then y/next_post/next_comb against the CPU's hc_pre of the
// GPU's X_out. In place, X is re-uploaded before the second run.
void check_hc_post_pre(int64_t T, int64_t d, bool round, bool in_place, HcKernelChoice kernel, uint32_t seed,
                       Workspace* shared = nullptr) {
  SCOPED_TRACE(case_name("hc_post_pre", T, d, round, kernel) + (in_place ? " in place" : ""));
  const PostInputs post_in = random_post_inputs(T, d, seed);
  Inputs next = random_inputs(T, d, kSiteRows, 3, seed + 7919);
  const DevicePostInputs post_d(post_in);
  const DeviceSite next_site(next);
  Workspace own;
  Workspace& workspace = shared_or_own_workspace(shared, own, T, d, "hc_post_pre workspace");

  PreReference reference;
  std::vector<float> first_y;
  for (int run = 0; run < 2; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    DeviceBuffer X_d = poisoned(post_in.X.size(), "X");
    X_d.upload(post_in.X.data(), post_in.X.size() * sizeof(float));
    DeviceBuffer X_out_d = poisoned(post_in.X.size(), "X_out");
    PreOutputBuffers outputs(T, d);
    run_hc_post_pre(post_pre_params(post_d, X_d.as<float>(), in_place ? X_d.as<float>() : X_out_d.as<float>(),
                                    next_site, T, d, round, outputs, kernel, workspace));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> X_gpu = download(in_place ? X_d : X_out_d, post_in.X.size());
    if (!in_place)
      EXPECT_EQ(download(X_d, post_in.X.size()), post_in.X) << "X changed although X_out is another buffer";
    expect_hc_post_output(post_in, T, d, round, X_gpu);
    const std::vector<float> y_gpu = download(outputs.y, size_t(T * d));
    if (run == 0) {
      next.X = X_gpu;
      reference = hc_pre_reference(next, T, d, round);
      first_y = y_gpu;
    } else {
      // Bit-identical reruns, so the first run's reference holds.
      ASSERT_EQ(std::memcmp(next.X.data(), X_gpu.data(), X_gpu.size() * sizeof(float)), 0)
          << "the second launch differs from the first (X_out)";
      expect_same_as_first_run(first_y, y_gpu, "y");
    }
    expect_hc_pre_outputs(next, reference, T, d, round, y_gpu, outputs.y_bf16, download(outputs.post, size_t(T * kN)),
                          download(outputs.comb, size_t(T * kN * kN)));
  }
}

// 16: the cluster decode kernel's largest launch (a full token tile).
const int64_t kTokenCounts[] = {1, 5, 16, 64, 300, 1000};
const int64_t kHiddenSizes[] = {4096, 7168, 96, 260};

// The kernels a launch of T tokens can take: the persistent one always, its warp-specialised variant for hc_post_pre,
// the cluster decode kernel, its asynchronous variant (CLUSTER_ASYNC) and the default (AUTO: the single-cluster kernel
// within its hidden-size limits) up to their token limit.
std::vector<HcKernelChoice> kernels_for(int64_t T, bool post_pre = false) {
  std::vector<HcKernelChoice> kernels = {HcKernelChoice::PERSISTENT};
  if (post_pre) kernels.push_back(HcKernelChoice::PERSISTENT_WARP_SPECIALIZED);
  if (T <= kHcDecodeMaxTokens)
    kernels.push_back(HcKernelChoice::CLUSTER_ASYNC);
  kernels.push_back(HcKernelChoice::AUTO);
  return kernels;
}

TEST(MhcGpu, HcPreMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1;
  for (const int64_t d : kHiddenSizes)
    for (const int64_t T : kTokenCounts)
      for (const bool round : {false, true})
        check_hc_pre(T, d, round, kernels_for(T), seed++);
}

TEST(MhcGpu, HcHeadMatchesCpu) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 100;
  for (const int64_t d : kHiddenSizes)
    for (const int64_t T : kTokenCounts)
      for (const bool round : {false, true})
        check_hc_head(T, d, round, kernels_for(T), seed++);
}

// hc_pre takes 128-dim slices from kWideSliceMinTiles token tiles (hc_head and hc_post_pre keep 64): the last launch
// below the threshold and the first on it, V4-Flash and V4-Pro widths (HcPreMatchesCpu covers 1000 tokens at every
// width, on 128-dim slices too).
TEST(MhcGpu, HcPreTakesWideSlicesFromItsThreshold) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int multiprocessors = list_devices().front().multiprocessors;
  constexpr int64_t kEdge = kWideSliceMinTiles * 16;
  uint32_t seed = 2100;
  for (const int64_t d : {int64_t(4096), int64_t(7168)}) {
    SCOPED_TRACE("d=" + std::to_string(d));
    ASSERT_EQ(choose_hc_projection_config(kEdge - 16, d, multiprocessors).slice_dims, 64);
    ASSERT_EQ(choose_hc_projection_config(kEdge, d, multiprocessors).slice_dims, 128);
    ASSERT_EQ(choose_hc_projection_config(kEdge, d, multiprocessors, HcProjectionOp::HEAD).slice_dims, 64);
    ASSERT_EQ(choose_hc_projection_config(kEdge, d, multiprocessors, HcProjectionOp::POST_PRE).slice_dims, 64);
    for (const bool round : {false, true})
      for (const int64_t T : {kEdge - 16, kEdge, kEdge + 5}) check_hc_pre(T, d, round, kernels_for(T), seed++);
  }
}

TEST(MhcGpu, HcPostMatchesCpuInPlaceAndOutOfPlace) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 200;
  for (const int64_t d : kHiddenSizes)
    for (const int64_t T : kTokenCounts)
      for (const bool round : {false, true})
        for (const bool in_place : {false, true}) check_hc_post(T, d, round, in_place, seed++);
}

TEST(MhcGpu, HcPostPreMatchesCpuPostThenPre) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  // 128 tokens: the largest fused launch (several tiles per CTA, its out/post/comb ring refilled); 300: two launches.
  const int64_t token_counts[] = {1, 5, 16, 64, kFusedPostPreMaxTokens, 300};
  uint32_t seed = 400;
  for (const int64_t d : kHiddenSizes)
    for (size_t n = 0; n < std::size(token_counts); ++n)
      for (const bool round : {false, true})
        for (const HcKernelChoice kernel : kernels_for(token_counts[n], true)) {
          const bool in_place = (n % 2 == 0) != round;  // both placements in both numerics modes
          check_hc_post_pre(token_counts[n], d, round, in_place, kernel, seed++);
        }
}

// AUTO's one-cluster-per-16-token-tile range at its edges (V4-Flash's width): a partial last tile (17, 100), the
// largest launch it takes (128; hc_head 64) and the first it leaves to the persistent kernel (129; hc_head 65).
TEST(MhcGpu, ClusterPerTileRangeMatchesCpuAtItsEdges) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t d = 4096;
  uint32_t seed = 1700;
  for (const int64_t T : {17, 100, 128, 129})
    for (const bool round : {false, true}) {
      check_hc_pre(T, d, round, kernels_for(T), seed++);
      for (const HcKernelChoice kernel : kernels_for(T, true)) check_hc_post_pre(T, d, round, T % 2 == 0, kernel, seed++);
    }
  for (const int64_t T : {17, 64, 65})
    for (const bool round : {false, true}) check_hc_head(T, d, round, kernels_for(T), seed++);
}

TEST(MhcGpu, OneWorkspaceServesLaunchesOfEverySize) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t d = 4096;
  Workspace workspace = zeroed_workspace(600, d, "shared mHC workspace");
  uint32_t seed = 300;
  for (const int64_t T : {600, 1, 64, 600, 5, 1, 16}) {
    check_hc_pre(T, d, false, kernels_for(T), seed++, &workspace);
    check_hc_head(T, d, false, kernels_for(T), seed++, &workspace);
    for (const HcKernelChoice kernel : kernels_for(T, true))
      check_hc_post_pre(T, d, false, true, kernel, seed++, &workspace);
  }
}

// Back-to-back launches in one stream, no host synchronisation in between (as in a decode step): the cluster decode
// kernel (CLUSTER_ASYNC), the default (AUTO: at one token the single-cluster kernel, which uses no workspace; at 9
// tokens V4-Flash's single-cluster kernel and V4-Pro's cluster kernel) and the persistent kernel alternate on one
// workspace; each launch's tag must come from the epoch its predecessor left. Every launch of a kernel gives the same
// bits as that kernel's first (deterministic sums), the first checked against the CPU.
TEST(MhcGpu, BackToBackLaunchesOnOneWorkspaceRepeatTheirResults) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 900;
  for (const int64_t d : {int64_t(4096), int64_t(7168)})
    for (const int64_t T : {int64_t(1), int64_t(9)}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " d=" + std::to_string(d));
      const Inputs in = random_inputs(T, d, kSiteRows, 3, seed++);
      const PreReference ref = hc_pre_reference(in, T, d, false);
      const DeviceBuffer X = to_device(in.X, "X");
      const DeviceSite site(in);
      Workspace workspace = zeroed_workspace(T, d, "workspace");
      constexpr int kLaunches = 40;
      std::vector<PreOutputBuffers> outputs;
      for (int i = 0; i < kLaunches; ++i) outputs.emplace_back(T, d);
      const auto kernel_of = [](int i) {
        return i % 4 == 1   ? HcKernelChoice::AUTO
               : i % 4 == 2 ? HcKernelChoice::PERSISTENT
                            : HcKernelChoice::CLUSTER_ASYNC;
      };
      for (int i = 0; i < kLaunches; ++i)
        run_hc_pre(pre_params(X.as<float>(), site, T, d, false, outputs[size_t(i)], kernel_of(i), workspace));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      for (const int first : {0, 1, 2}) {
        const std::vector<float> first_y = download(outputs[size_t(first)].y, size_t(T * d));
        const std::vector<float> first_post = download(outputs[size_t(first)].post, size_t(T * kN));
        const std::vector<float> first_comb = download(outputs[size_t(first)].comb, size_t(T * kN * kN));
        expect_hc_pre_outputs(in, ref, T, d, false, first_y, outputs[size_t(first)].y_bf16, first_post, first_comb);
        for (int i = first + 1; i < kLaunches; ++i) {
          if (kernel_of(i) != kernel_of(first)) continue;
          SCOPED_TRACE("launch " + std::to_string(i));
          expect_same_as_first_run(first_y, download(outputs[size_t(i)].y, size_t(T * d)), "y");
          expect_same_as_first_run(first_post, download(outputs[size_t(i)].post, size_t(T * kN)), "post");
          expect_same_as_first_run(first_comb, download(outputs[size_t(i)].comb, size_t(T * kN * kN)), "comb");
        }
      }
    }
}

// The warp-specialised persistent kernel sums the same values in the same order as the persistent kernel where that
// one takes 64-dim slices too (64 tokens and more at these widths, below kWideSliceMinTiles tiles for hc_pre): every
// output of hc_post_pre bit for bit (at 496 tokens, more tiles per CTA than pipeline stages, the warp-specialised
// kernel fuses it, the persistent path runs hc_post then hc_pre: the same arithmetic).
TEST(MhcGpu, WarpSpecializedKernelRepeatsThePersistentKernelsBits) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 1200;
  for (const int64_t d : {int64_t(4096), int64_t(7168)})
    for (const int64_t T : {int64_t(64), kWideSliceMinTiles * 16 - 16}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " d=" + std::to_string(d));
      ASSERT_EQ(choose_hc_projection_config(T, d, list_devices().front().multiprocessors).slice_dims, 64);
      const Inputs in = random_inputs(T, d, kSiteRows, 3, seed++);
      const DeviceSite site(in);
      Workspace workspace = zeroed_workspace(T, d, "workspace");
      const PostInputs post_in = random_post_inputs(T, d, seed++);
      const DevicePostInputs post_d(post_in);
      const DeviceBuffer residual = to_device(post_in.X, "residual");
      std::vector<PreOutputBuffers> post_pre;
      std::vector<DeviceBuffer> X_out;
      const HcKernelChoice kernels[2] = {HcKernelChoice::PERSISTENT, HcKernelChoice::PERSISTENT_WARP_SPECIALIZED};
      for (const HcKernelChoice kernel : kernels) {
        PreOutputBuffers& next = post_pre.emplace_back(T, d);
        DeviceBuffer& updated = X_out.emplace_back(poisoned(post_in.X.size(), "X_out"));
        run_hc_post_pre(post_pre_params(post_d, residual.as<float>(), updated.as<float>(), site, T, d, false, next,
                                        kernel, workspace));
      }
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto same = [](const DeviceBuffer& persistent, const DeviceBuffer& specialized, size_t floats,
                           const char* what) {
        const std::vector<float> expected = download(persistent, floats), actual = download(specialized, floats);
        EXPECT_EQ(std::memcmp(expected.data(), actual.data(), floats * sizeof(float)), 0)
            << "the warp-specialised kernel's " << what << " differs from the persistent kernel's";
      };
      const std::vector<float> y = download(post_pre[0].y, size_t(T * d));
      for (const float v : y) ASSERT_FALSE(std::isnan(v)) << "the persistent kernel left y unwritten";
      same(X_out[0], X_out[1], post_in.X.size(), "hc_post_pre X_out");
      same(post_pre[0].y, post_pre[1].y, size_t(T * d), "hc_post_pre y");
      same(post_pre[0].post, post_pre[1].post, size_t(T * kN), "hc_post_pre post");
      same(post_pre[0].comb, post_pre[1].comb, size_t(T * kN * kN), "hc_post_pre comb");
    }
}

enum class ProjectionOp { HcPre, HcHead, HcPostPre };

// The fused output norm: the op's y with the norm against the same launch's y without it (deterministic, so the same
// values), normalised on the CPU in double. Left: the Σy² summation order (a few ulps of inv_rms) and, with the
// norm's rounding, a value next to a bf16 boundary rounding the other way. hc_post_pre writes X_out to another
// buffer, so both launches see the same X.
void check_output_norm(ProjectionOp op, int64_t T, int64_t d, bool round, bool norm_round, HcKernelChoice kernel,
                       uint32_t seed) {
  const char* names[] = {"hc_pre", "hc_head", "hc_post_pre"};
  SCOPED_TRACE(case_name(names[int(op)], T, d, round, kernel) + " with the output norm" +
               (norm_round ? " rounded" : ""));
  const int rows = op == ProjectionOp::HcHead ? kN : kSiteRows;
  const Inputs in = random_inputs(T, d, rows, op == ProjectionOp::HcHead ? 1 : 3, seed);
  const PostInputs post_in = random_post_inputs(T, d, seed + 1);
  std::mt19937 rng(seed + 2);
  std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
  std::vector<float> weight(static_cast<size_t>(d));
  for (float& w : weight) w = uniform(rng);
  const DeviceBuffer X = to_device(in.X, "X"), norm_weight = to_device(weight, "norm weight"),
                     post_X = to_device(post_in.X, "post X");
  const DeviceSite site(in);
  const DevicePostInputs post_d(post_in);
  Workspace workspace = zeroed_workspace(T, d, "workspace");
  DeviceBuffer X_out(post_in.X.size() * sizeof(float), "X_out");
  const auto launch = [&](const float* weight_d, PreOutputBuffers& outputs) {
    if (op == ProjectionOp::HcPre) {
      HcPreParams params = pre_params(X.as<float>(), site, T, d, round, outputs, kernel, workspace);
      params.out_norm_weight = weight_d;
      params.out_norm_round_to_bf16 = norm_round;
      run_hc_pre(params);
    } else if (op == ProjectionOp::HcHead) {
      run_hc_head({.X = X.as<float>(), .fn = site.fn.as<float>(), .base = site.base.as<float>(),
                   .scale = site.scale.as<float>(), .tokens = T, .hidden = d, .round_to_bf16 = round,
                   .h = outputs.y.as<float>(), .h_bf16 = outputs.y_bf16.as<__nv_bfloat16>(),
                   .out_norm_weight = weight_d, .out_norm_round_to_bf16 = norm_round, .kernel = kernel,
                   .workspace = workspace.buffer.data(), .workspace_bytes = workspace.bytes});
    } else {
      HcPostPreParams params = post_pre_params(post_d, post_X.as<float>(), X_out.as<float>(), site, T, d, round,
                                               outputs, kernel, workspace);
      params.out_norm_weight = weight_d;
      params.out_norm_round_to_bf16 = norm_round;
      run_hc_post_pre(params);
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  };
  PreOutputBuffers plain(T, d), normed(T, d);
  launch(nullptr, plain);
  launch(norm_weight.as<float>(), normed);
  const std::vector<float> y = download(plain.y, size_t(T * d)), z = download(normed.y, size_t(T * d));
  std::vector<float> expected(y.size());
  for (int64_t t = 0; t < T; ++t) {
    double squares = 0;
    for (int64_t i = 0; i < d; ++i) squares += double(y[size_t(t * d + i)]) * y[size_t(t * d + i)];
    const double inv_rms = 1.0 / std::sqrt(squares / double(d) + kNormEps);
    for (int64_t i = 0; i < d; ++i) {
      const double value = double(y[size_t(t * d + i)]) * inv_rms * weight[size_t(i)];
      expected[size_t(t * d + i)] = norm_round ? round_to_bf16(float(value)) : float(value);
    }
  }
  expect_close(z, expected, [&](size_t e) {
    const double bound = 2e-6 * std::fabs(expected[e]);
    return bound + (norm_round ? bf16_ulp(std::fabs(expected[e]) + float(bound)) : 0.0) + 1e-30;
  }, "normalised y", d);
  if (norm_round) expect_bf16_exact(z, "normalised y");
  expect_bf16_of(normed.y_bf16, z, "normalised y_bf16");
  if (op != ProjectionOp::HcHead) {
    EXPECT_EQ(download(normed.post, size_t(T * kN)), download(plain.post, size_t(T * kN))) << "post changed";
    EXPECT_EQ(download(normed.comb, size_t(T * kN * kN)), download(plain.comb, size_t(T * kN * kN)))
        << "comb changed";
  }
}

TEST(MhcGpu, FusedOutputNormMatchesRmsNormOfTheOutput) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  uint32_t seed = 600;
  for (const ProjectionOp op : {ProjectionOp::HcPre, ProjectionOp::HcHead, ProjectionOp::HcPostPre})
    for (const int64_t d : {int64_t(4096), int64_t(7168), int64_t(260)})
      for (const int64_t T : {1, 5, 16, 64})
        for (const HcKernelChoice kernel : kernels_for(T, op == ProjectionOp::HcPostPre)) {
          const bool round = seed % 2 == 0;
          check_output_norm(op, T, d, round, !round, kernel, seed++);
          check_output_norm(op, T, d, round, round, kernel, seed++);
        }
}

// The single-cluster kernel (AUTO) at the widths that give its CTAs 1, 4 and 11 warps (V4-Flash's 16 run above), token
// counts for each of its projections (1: FMAs; 8: one MMA token tile; 9 and 16: two), every op with and without the
// output norm; its two-vector variant at 4608 and 7168 (9 and 14 warps) at one token (at 2 the cluster decode kernel
// takes over).
TEST(MhcGpu, SingleClusterKernelMatchesCpuAtEveryWarpCount) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const std::vector<HcKernelChoice> single = {HcKernelChoice::AUTO};
  uint32_t seed = 1500;
  const auto check_every_site = [&](int64_t d, int64_t T) {
    for (const bool round : {false, true}) {
      check_hc_pre(T, d, round, single, seed++);
      check_hc_head(T, d, round, single, seed++);
      check_hc_post_pre(T, d, round, T % 2 == 0, HcKernelChoice::AUTO, seed++);
      for (const ProjectionOp op : {ProjectionOp::HcPre, ProjectionOp::HcHead, ProjectionOp::HcPostPre})
        check_output_norm(op, T, d, round, !round, HcKernelChoice::AUTO, seed++);
    }
  };
  for (const int64_t d : {int64_t(256), int64_t(1024), int64_t(2816)})
    for (const int64_t T : {1, 8, 9, 16}) check_every_site(d, T);
  for (const int64_t d : {int64_t(4608), int64_t(7168)})
    for (const int64_t T : {1, 2}) check_every_site(d, T);
}

void expect_error_containing(const std::function<void()>& action, const std::string& needle) {
  try {
    action();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(MhcGpu, RefusesUnsupportedCallsNamingTheProblem) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t T = 2, d = 64;
  DeviceBuffer X(T * kN * d * 4, "X"), fn(kSiteRows * kN * d * 4, "fn"), base(kSiteRows * 4, "base"),
      scale(16, "scale"), y(T * d * 4, "y"), post(T * kN * 4, "post"), comb(T * kN * kN * 4, "comb");
  const size_t bytes = hc_projection_workspace_bytes(T, d, list_devices().front().multiprocessors);
  DeviceBuffer workspace(bytes, "workspace");
  const HcPreParams good{.X = X.as<float>(), .fn = fn.as<float>(), .base = base.as<float>(),
                         .scale = scale.as<float>(), .tokens = T, .hidden = d, .y = y.as<float>(),
                         .post = post.as<float>(), .comb = comb.as<float>(), .workspace = workspace.data(),
                         .workspace_bytes = bytes};
  HcPreParams p = good;
  p.streams = 2;
  expect_error_containing([&] { run_hc_pre(p); }, "2 streams");
  p = good;
  p.hidden = 62;
  expect_error_containing([&] { run_hc_pre(p); }, "hidden size 62");
  p = good;
  p.workspace_bytes = bytes - 4;
  expect_error_containing([&] { run_hc_pre(p); }, "hc_projection_workspace_bytes");
  p = good;
  p.y = X.as<float>();
  expect_error_containing([&] { run_hc_pre(p); }, "overlaps X");
  p = good;
  p.X = X.as<float>() + 1;
  expect_error_containing([&] { run_hc_pre(p); }, "16-byte aligned");
  p = good;
  p.sinkhorn_iters = 0;
  expect_error_containing([&] { run_hc_pre(p); }, "sinkhorn_iters");
  DeviceBuffer norm_weight(d * 4 + 16, "norm weight"), y_bf16(T * d * 2, "y_bf16");
  p = good;
  p.out_norm_weight = norm_weight.as<float>() + 1;
  expect_error_containing([&] { run_hc_pre(p); }, "out_norm_weight must be 16-byte aligned");
  p = good;
  p.out_norm_weight = norm_weight.as<float>();
  p.y = nullptr;
  p.y_bf16 = y_bf16.as<__nv_bfloat16>();
  expect_error_containing([&] { run_hc_pre(p); }, "needs the fp32 output");

  const HcPostParams post_good{.out = y.as<float>(), .X = X.as<float>(), .post = post.as<float>(),
                               .comb = comb.as<float>(), .tokens = T, .hidden = d, .X_out = X.as<float>()};
  HcPostParams q = post_good;
  q.X_out = X.as<float>() + 4;
  expect_error_containing([&] { run_hc_post(q); }, "X_out must be X itself");
  q = post_good;
  q.comb = nullptr;
  expect_error_containing([&] { run_hc_post(q); }, "null comb");

  DeviceBuffer out(T * d * 4, "out"), next_post(T * kN * 4, "next post"), next_comb(T * kN * kN * 4, "next comb");
  const HcPostPreParams fused_good{.out = out.as<float>(), .X = X.as<float>(), .post = post.as<float>(),
                                   .comb = comb.as<float>(), .X_out = X.as<float>(), .next_fn = fn.as<float>(),
                                   .next_base = base.as<float>(), .next_scale = scale.as<float>(), .tokens = T,
                                   .hidden = d, .y = y.as<float>(), .next_post = next_post.as<float>(),
                                   .next_comb = next_comb.as<float>(), .workspace = workspace.data(),
                                   .workspace_bytes = bytes};
  HcPostPreParams f = fused_good;
  f.next_post = post.as<float>();
  expect_error_containing([&] { run_hc_post_pre(f); }, "next_post overlaps post or comb");
  f = fused_good;
  f.X_out = X.as<float>() + 4;
  expect_error_containing([&] { run_hc_post_pre(f); }, "X_out must be X itself");
  f = fused_good;
  f.y = X.as<float>();
  expect_error_containing([&] { run_hc_post_pre(f); }, "overlaps X");
  f = fused_good;
  f.next_fn = nullptr;
  expect_error_containing([&] { run_hc_post_pre(f); }, "null next_fn");
  f = fused_good;
  f.workspace_bytes = bytes - 4;
  expect_error_containing([&] { run_hc_post_pre(f); }, "hc_projection_workspace_bytes");
}

// The persistent kernel indexes its workspace words in 32 bits: a launch past that is refused before anything is read.
// The pointers are distinct, aligned and never dereferenced (terabytes apart, as buffers of 4M tokens would be).
TEST(MhcGpu, RefusesLaunchesPastTheWorkspacesWordIndex) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t T = int64_t(1) << 22, d = 4096;  // hc_pre on 128-dim slices: past about 2.6M tokens
  const auto region = [](int i) { return reinterpret_cast<float*>(uintptr_t(i) << 44); };
  const size_t bytes = hc_projection_workspace_bytes(T, d, list_devices().front().multiprocessors);
  const HcPreParams p{.X = region(1), .fn = region(2), .base = region(3), .scale = region(4), .tokens = T,
                      .hidden = d, .y = region(5), .post = region(6), .comb = region(7), .workspace = region(8),
                      .workspace_bytes = bytes};
  expect_error_containing([&] { run_hc_pre(p); }, "exceed the workspace words a launch can index");
}

}  // namespace
}  // namespace dsv4::cuda
