// Interleaved partial RoPE (dsv4-model.md §3): pairs (x[2i], x[2i+1]) of the LAST rope_dim dims of a head rotate by
// θ = p·f_i, f_i = theta^(−2i/rope_dim). Compressed layers use YaRN-scaled frequencies; there is no mscale.
// One table per layer serves its q/kv, its compressor keys and its indexer.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace dsv4::cpu {

// YaRN frequency interpolation (config `rope_scaling`): dims below `low` keep f_i, dims above `high` use
// f_i / factor, a linear ramp in between. low/high come from beta_fast/beta_slow (Flash: 15 and 25).
struct YarnScaling {
  double factor = 16.0;
  int64_t original_max_position = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

class RopeTable {
 public:
  // rope_dim: rotated dims per head (even, > 0). Pass yarn only for CSA/HCA layers (θ 160000); SWA layers use
  // θ 10000 without it.
  RopeTable(double theta, int64_t rope_dim, std::optional<YarnScaling> yarn = std::nullopt);

  int64_t rope_dim() const { return rope_dim_; }
  // f_i for i < rope_dim/2, fp32 as the reference computes them.
  const std::vector<float>& frequencies() const { return frequencies_; }

  // cos and sin of the fp32 angle p·f_i, [rope_dim/2] each.
  void angles(int64_t position, float* cos_out, float* sin_out) const;
  // Rotates one [rope_dim] interleaved slice by +θ (rotate) or −θ (rotate_inverse) at `position`.
  void rotate(float* x, int64_t position) const;
  void rotate_inverse(float* x, int64_t position) const;

  // The YaRN ramp bounds [low, high] in dims 0..rope_dim/2: floor/ceil of
  // rope_dim·ln(original/(beta·2π)) / (2·ln theta), clamped to [0, rope_dim−1].
  static std::pair<int64_t, int64_t> yarn_ramp_bounds(double theta, int64_t rope_dim, const YarnScaling& yarn);

 private:
  int64_t rope_dim_;
  std::vector<float> frequencies_;
};

struct RopeApplyParams {
  int64_t tokens = 0;    // T
  int64_t heads = 1;     // vectors per token
  int64_t head_dim = 0;  // elements per vector; the rope slice is its last table.rope_dim() elements
  bool inverse = false;  // rotate by −θ (the attention output's de-rotation)
};

// x: [tokens, heads, head_dim], rotated in place; positions: [tokens] absolute positions.
void apply_rope(const RopeTable& table, float* x, const int64_t* positions, const RopeApplyParams& params);

}  // namespace dsv4::cpu
