// The CPU backend: the model's operations composed from the fp32 reference ops of this folder. It is both the
// numerical reference for every other backend and a usable engine (threaded over the cores, vectorised GEMV).
// In GpuBf16 numerics it rounds where the CUDA kernels round (numerics_mode.hpp), so that the GPU can be tested
// against it to fp32 summation order.
#pragma once

#include "backends/cpu/rope.hpp"
#include "io/model_config.hpp"
#include "model/backend.hpp"

#include <unordered_map>
#include <vector>

namespace dsv4::cpu {

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, NumericsMode numerics);

  std::string_view name() const override { return "cpu"; }
  NumericsMode numerics() const override { return numerics_; }
  std::unique_ptr<SequenceCache> new_sequence() override;

  void embed(const QuantizedMatrix& table, const int32_t* ids, int64_t T, float* out) override;
  void hc_pre(const HyperConnectionWeights& w, const float* X, int64_t T, float* y, float* post,
              float* comb) override;
  void hc_post(const float* out, const float* X, const float* post, const float* comb, int64_t T,
               float* X_out) override;
  void hc_head(const HyperConnectionWeights& w, const float* X, int64_t T, float* h) override;
  void rms_norm(const float* x, const std::vector<float>& weight, int64_t rows, float* y) override;
  void linear(const QuantizedMatrix& w, const float* x, int64_t T, float* y) override;
  void attention(int layer, const AttentionWeights& w, SequenceCache& cache, const float* x, int64_t T,
                 float* out) override;
  void moe(const dsv4::MoeWeights& w, const float* u, const int32_t* token_ids, int64_t T, float* out) override;
  void round_residual(float* x, int64_t n) override;

 private:
  bool gpu_bf16() const { return numerics_ == NumericsMode::GpuBf16; }
  // The matrix a linear layer multiplies with: in GpuBf16 numerics an F32 matrix is replaced by its bf16 rounding
  // (the GPU's linear kernels read BF16, FP8 and FP4), made once and kept in bf16_weights_.
  const QuantizedMatrix& linear_weight(const QuantizedMatrix& w);
  // x [n] as a linear layer's input: in GpuBf16 numerics a copy in `scratch` rounded to bf16, else x itself.
  const float* linear_input(const float* x, int64_t n, std::vector<float>& scratch) const;

  const ModelConfig& config_;
  NumericsMode numerics_;
  std::unordered_map<const uint8_t*, OwnedQuantizedMatrix> bf16_weights_;  // by the F32 matrix's data
  std::vector<RopeTable> rope_;  // one table per layer: θ 10000 on SWA layers, compress θ + YaRN elsewhere
};

}  // namespace dsv4::cpu
