#include "backends/cuda/synthetic_weights.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/shape_only_matrix.hpp"
#include "core/error.hpp"
#include "core/fp8_e4m3.hpp"

namespace dsv4::cuda {

namespace {

// ---- device generators: every element is a hash of (tensor seed, element index), so the result does not depend on
// the launch shape.

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from the top 24 bits.
__device__ __forceinline__ float uniform_signed(uint64_t bits) {
  return float(int32_t(bits >> 40) - (1 << 23)) * 0x1p-23f;
}

__global__ void fill_uniform_f32_kernel(float* out, size_t count, uint64_t seed, float center, float half_width) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    out[i] = center + half_width * uniform_signed(splitmix64(seed ^ i));
}

__global__ void fill_uniform_bf16_kernel(__nv_bfloat16* out, size_t count, uint64_t seed, float amplitude) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(amplitude * uniform_signed(splitmix64(seed ^ i)));
}

// e4m3 codes of uniform values in [-amplitude, amplitude) (amplitude < 448, so nothing saturates).
__global__ void fill_uniform_e4m3_kernel(uint8_t* out, size_t count, uint64_t seed, float amplitude) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    out[i] = float_to_e4m3(amplitude * uniform_signed(splitmix64(seed ^ i)));
}

// Random packed e2m1 pairs, eight bytes per hash; a row's padding nibble (odd K: the high nibble of its last byte) is
// written as 0, as the format requires.
__global__ void fill_e2m1_kernel(uint8_t* out, size_t count, size_t row_bytes, bool odd_cols, uint64_t seed) {
  for (size_t w = blockIdx.x * size_t(blockDim.x) + threadIdx.x; w * 8 < count; w += size_t(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed ^ w);
    for (int j = 0; j < 8; ++j) {
      const size_t i = w * 8 + size_t(j);
      if (i >= count) break;
      uint8_t byte = uint8_t(r >> (8 * j));
      if (odd_cols && i % row_bytes == row_bytes - 1) byte &= 0x0F;
      out[i] = byte;
    }
  }
}

// Codes first .. first + span - 1, uniformly (NVFP4's e4m3 block scales).
__global__ void fill_code_range_kernel(uint8_t* out, size_t count, uint64_t seed, uint8_t first, uint8_t span) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    out[i] = uint8_t(first + splitmix64(seed ^ i) % span);
}

// Row t: top_k distinct experts spaced experts / top_k apart from a random start, so every expert is chosen equally
// often over the vocabulary.
__global__ void fill_expert_ids_kernel(int32_t* out, int64_t rows, int32_t top_k, int32_t experts, uint64_t seed) {
  const int64_t count = rows * top_k;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / top_k, k = i % top_k;
    const uint64_t start = splitmix64(seed ^ uint64_t(row)) % uint64_t(experts);
    out[i] = int32_t((start + uint64_t(k) * uint64_t(experts / top_k)) % uint64_t(experts));
  }
}

unsigned grid_for(size_t count) { return unsigned(std::clamp<size_t>((count + 255) / 256, 1, 8192)); }

size_t aligned(size_t bytes) {
  return (bytes + DeviceAllocator::kAlignment - 1) / DeviceAllocator::kAlignment * DeviceAllocator::kAlignment;
}

// ---- value ranges

// Uniform on [-a, a) has std a / sqrt(3).
constexpr float kSqrt3 = 1.7320508f;
// RMS of a uniformly random e2m1 code: sqrt(mean of 0, .25, 1, 2.25, 4, 9, 16, 36).
const float kE2m1Rms = std::sqrt(68.5f / 8.0f);
// NVFP4 block scales: e4m3 codes 0x38..0x3F, the values 1, 1.125, ..., 1.875.
constexpr uint8_t kNvfp4ScaleFirst = 0x38, kNvfp4ScaleSpan = 8;
const float kNvfp4ScaleRms = [] {
  float sum = 0.0f;
  for (int k = 0; k < kNvfp4ScaleSpan; ++k) sum += (1.0f + float(k) / 8.0f) * (1.0f + float(k) / 8.0f);
  return std::sqrt(sum / kNvfp4ScaleSpan);
}();

int e8m0_exponent_floor(float x) { return int(std::floor(std::log2(x))); }
int e8m0_exponent_nearest(float x) { return int(std::lround(std::log2(x))); }

// NVFP4's global scale: the element std over (e2m1 rms × block-scale rms).
float nvfp4_global_scale(float element_std) { return element_std / (kE2m1Rms * kNvfp4ScaleRms); }

// ---- the model's tensors, walked once for the plan and once for the generation

// Sink: matrix(DeviceMatrix&, format, rows, cols, element_std, name); uniform(DeviceArray<float>&, count, center,
// half_width, name); expert_ids(DeviceArray<int32_t>&, rows, name); section(layer or -1).
template <class Sink>
void walk_model(const ModelConfig& c, WeightFormat expert_format, DeviceModelWeights& w, Sink& sink) {
  const int64_t d = c.hidden_size, n = c.mhc.hc_mult;
  const float unit = 1.0f / std::sqrt(float(d));
  auto ones = [&](DeviceArray<float>& a, int64_t count, const std::string& name) {
    sink.uniform(a, count, 1.0f, 0.0f, name);
  };
  auto std1 = [&](DeviceArray<float>& a, int64_t count, const std::string& name) {
    sink.uniform(a, count, 0.0f, kSqrt3, name);
  };
  auto hyper_connection = [&](device_weights::HyperConnection& h, int64_t outputs, int64_t scales,
                              const std::string& p) {
    sink.matrix(h.fn, WeightFormat::F32, outputs, c.hc_dim(), 1.0f / std::sqrt(float(c.hc_dim())), p + "fn");
    std1(h.base, outputs, p + "base");
    sink.uniform(h.scale, scales, 0.9f, 0.6f, p + "scale");  // [0.3, 1.5]
  };
  auto compressor = [&](device_weights::Compressor& k, int64_t width, int64_t overlap, int64_t ratio,
                        const std::string& p) {
    sink.matrix(k.wkv, WeightFormat::BF16, overlap * width, d, unit, p + "wkv.weight");
    sink.matrix(k.wgate, WeightFormat::BF16, overlap * width, d, unit, p + "wgate.weight");
    std1(k.ape, ratio * overlap * width, p + "ape");
    ones(k.norm, width, p + "norm.weight");
  };
  auto expert = [&](device_weights::Expert& e, WeightFormat format, int64_t inter, const std::string& p) {
    sink.matrix(e.w1, format, inter, d, unit, p + "w1.weight");
    sink.matrix(e.w2, format, d, inter, 1.0f / std::sqrt(float(inter)), p + "w2.weight");
    sink.matrix(e.w3, format, inter, d, unit, p + "w3.weight");
  };
  auto fp8 = [&](DeviceMatrix& m, int64_t rows, int64_t cols, const std::string& name) {
    sink.matrix(m, WeightFormat::FP8_BLOCK128, rows, cols, 1.0f / std::sqrt(float(cols)), name);
  };

  sink.section(-1);
  sink.matrix(w.embed, WeightFormat::BF16, c.vocab_size, d, 1.0f, "embed.weight");
  sink.matrix(w.head, WeightFormat::BF16, c.vocab_size, d, unit, "head.weight");
  ones(w.norm, d, "norm.weight");
  hyper_connection(w.hc_head, n, 1, "hc_head_");
  w.layers.resize(size_t(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i) {
    sink.section(i);
    device_weights::Block& b = w.layers[size_t(i)];
    const std::string p = "layers." + std::to_string(i) + ".";
    ones(b.attn_norm, d, p + "attn_norm.weight");
    ones(b.ffn_norm, d, p + "ffn_norm.weight");
    hyper_connection(b.hc_attn, (2 + n) * n, 3, p + "hc_attn_");
    hyper_connection(b.hc_ffn, (2 + n) * n, 3, p + "hc_ffn_");

    device_weights::Attention& a = b.attn;
    const std::string ap = p + "attn.";
    fp8(a.wq_a, c.q_lora_rank, d, ap + "wq_a.weight");
    ones(a.q_norm, c.q_lora_rank, ap + "q_norm.weight");
    fp8(a.wq_b, c.q_dim(), c.q_lora_rank, ap + "wq_b.weight");
    fp8(a.wkv, c.head_dim, d, ap + "wkv.weight");
    ones(a.kv_norm, c.head_dim, ap + "kv_norm.weight");
    fp8(a.wo_a, c.o_proj_dim(), c.o_group_input_dim(), ap + "wo_a.weight");
    fp8(a.wo_b, d, c.o_proj_dim(), ap + "wo_b.weight");
    std1(a.sink, c.num_heads, ap + "attn_sink");
    a.compressor.reset();
    a.indexer.reset();
    if (c.has_compressor(i))
      compressor(a.compressor.emplace(), c.head_dim, c.has_indexer(i) ? 2 : 1, c.compress_ratio(i),
                 ap + "compressor.");
    if (c.has_indexer(i)) {
      device_weights::Indexer& x = a.indexer.emplace();
      fp8(x.wq_b, int64_t{c.indexer.num_heads} * c.indexer.head_dim, c.q_lora_rank, ap + "indexer.wq_b.weight");
      sink.matrix(x.weights_proj, WeightFormat::BF16, c.indexer.num_heads, d, unit,
                  ap + "indexer.weights_proj.weight");
      compressor(x.compressor, c.indexer.head_dim, 2, c.compress_ratio(i), ap + "indexer.compressor.");
    }

    device_weights::Moe& f = b.ffn;
    const std::string fp = p + "ffn.";
    const int64_t experts = c.moe.num_routed_experts, inter = c.moe.intermediate_size;
    sink.matrix(f.gate, WeightFormat::BF16, experts, d, 2.0f * unit, fp + "gate.weight");
    f.gate_bias = {};
    f.tid2eid = {};
    if (c.is_hash_routed(i))
      sink.expert_ids(f.tid2eid, c.vocab_size, fp + "gate.tid2eid");
    else
      sink.uniform(f.gate_bias, experts, 0.0f, 0.3f * kSqrt3, fp + "gate.bias");
    f.experts.resize(size_t(experts));
    for (int64_t e = 0; e < experts; ++e)
      expert(f.experts[size_t(e)], expert_format, inter, fp + "experts." + std::to_string(e) + ".");
    expert(f.shared, WeightFormat::FP8_BLOCK128, inter * c.moe.num_shared_experts, fp + "shared_experts.");
  }
  w.mtp.clear();
}

struct PlanSink {
  SyntheticWeightsPlan plan;
  size_t* bucket = nullptr;

  void section(int layer) {
    if (layer < 0) {
      bucket = &plan.model_bytes;
    } else {
      plan.layer_bytes.push_back(0);
      bucket = &plan.layer_bytes.back();
    }
  }
  void matrix(DeviceMatrix&, WeightFormat format, int64_t rows, int64_t cols, float, const std::string& name) {
    const QuantizedMatrix m = shape_only_matrix(format, rows, cols, 1.0f);
    m.check_layout(name);
    *bucket += aligned(m.data_bytes()) + aligned(m.scale_bytes());
    ++plan.tensors;
  }
  void uniform(DeviceArray<float>&, int64_t count, float, float, const std::string&) { add(size_t(count) * 4); }
  void expert_ids(DeviceArray<int32_t>&, int64_t rows, const std::string&) { add(size_t(rows) * size_t(top_k) * 4); }
  void add(size_t bytes) {
    if (bytes == 0) return;
    *bucket += aligned(bytes);
    ++plan.tensors;
  }
  int64_t top_k = 0;
};

struct GenerateSink {
  const ModelConfig& config;
  DeviceAllocator& pool;
  cudaStream_t stream;
  uint64_t seed;
  int64_t tensors = 0;
  size_t bytes = 0;

  // A seed of its own for every tensor, from the model seed and the tensor's position in the walk.
  uint64_t next_seed() {
    uint64_t x = seed + 0x9E3779B97F4A7C15ull * uint64_t(++tensors);
    x = (x ^ (x >> 31)) * 0xD6E8FEB86659FD93ull;
    return x ^ (x >> 32);
  }

  void section(int) {}

  void matrix(DeviceMatrix& m, WeightFormat format, int64_t rows, int64_t cols, float element_std,
              const std::string& name) {
    const float global = format == WeightFormat::NVFP4 ? nvfp4_global_scale(element_std) : 1.0f;
    m = DeviceMatrix::allocate(shape_only_matrix(format, rows, cols, global), name, pool);
    const DeviceMatrixView& v = m.view();
    const uint64_t s = next_seed();
    auto* data = static_cast<uint8_t*>(m.data_buffer().data());
    auto* scales = static_cast<uint8_t*>(m.scales_buffer().data());
    const size_t data_bytes = m.data_buffer().bytes(), scale_bytes = m.scales_buffer().bytes();
    const size_t elements = size_t(rows) * size_t(cols);
    switch (format) {
      case WeightFormat::F32:
        fill_uniform_f32_kernel<<<grid_for(elements), 256, 0, stream>>>(reinterpret_cast<float*>(data), elements, s,
                                                                        0.0f, element_std * kSqrt3);
        break;
      case WeightFormat::BF16:
        fill_uniform_bf16_kernel<<<grid_for(elements), 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(data),
                                                                         elements, s, element_std * kSqrt3);
        break;
      case WeightFormat::FP8_BLOCK128: {
        // One power-of-two scale 2^e for every block; codes uniform in [-A, A) with A = std·√3 / 2^e in [32, 64).
        const int e = e8m0_exponent_floor(element_std * kSqrt3 / 32.0f);
        fill_uniform_e4m3_kernel<<<grid_for(data_bytes), 256, 0, stream>>>(data, data_bytes, s,
                                                                           element_std * kSqrt3 / std::ldexp(1.0f, e));
        DSV4_CUDA_CHECK(cudaMemsetAsync(scales, 127 + e, scale_bytes, stream));
        break;
      }
      case WeightFormat::MXFP4: {
        // Scale codes stay <= 128 (the tensor-core dequantisation's exact range) for any std <= 2 × e2m1 rms.
        const int e = e8m0_exponent_nearest(element_std / kE2m1Rms);
        check(127 + e <= 128 && 127 + e >= 1, "synthetic weights: ", name, " needs an MXFP4 scale 2^", e,
              " outside the supported codes");
        fill_e2m1_kernel<<<grid_for((data_bytes + 7) / 8), 256, 0, stream>>>(data, data_bytes, v.data_row_bytes,
                                                                              cols % 2 != 0, s);
        DSV4_CUDA_CHECK(cudaMemsetAsync(scales, 127 + e, scale_bytes, stream));
        break;
      }
      case WeightFormat::NVFP4:
        fill_e2m1_kernel<<<grid_for((data_bytes + 7) / 8), 256, 0, stream>>>(data, data_bytes, v.data_row_bytes,
                                                                              cols % 2 != 0, s);
        fill_code_range_kernel<<<grid_for(scale_bytes), 256, 0, stream>>>(scales, scale_bytes, s + 1,
                                                                          kNvfp4ScaleFirst, kNvfp4ScaleSpan);
        break;
    }
    DSV4_CUDA_CHECK_LAUNCH("synthetic weights: fill matrix");
    bytes += data_bytes + scale_bytes;
  }

  void uniform(DeviceArray<float>& a, int64_t count, float center, float half_width, const std::string& name) {
    a = DeviceArray<float>(DeviceBuffer(pool, size_t(count) * sizeof(float), name), count);
    fill_uniform_f32_kernel<<<grid_for(size_t(count)), 256, 0, stream>>>(
        static_cast<float*>(a.buffer().data()), size_t(count), next_seed(), center, half_width);
    DSV4_CUDA_CHECK_LAUNCH("synthetic weights: fill vector");
    bytes += size_t(count) * sizeof(float);
  }

  void expert_ids(DeviceArray<int32_t>& a, int64_t rows, const std::string& name) {
    const int32_t top_k = config.moe.experts_per_token;
    const int64_t count = rows * top_k;
    a = DeviceArray<int32_t>(DeviceBuffer(pool, size_t(count) * sizeof(int32_t), name), count);
    fill_expert_ids_kernel<<<grid_for(size_t(count)), 256, 0, stream>>>(static_cast<int32_t*>(a.buffer().data()),
                                                                       rows, top_k, config.moe.num_routed_experts,
                                                                       next_seed());
    DSV4_CUDA_CHECK_LAUNCH("synthetic weights: fill hash table");
    bytes += size_t(count) * sizeof(int32_t);
  }
};

}  // namespace

size_t SyntheticWeightsPlan::total_bytes() const {
  size_t total = model_bytes;
  for (size_t b : layer_bytes) total += b;
  return total;
}

void check_synthetic_expert_format(WeightFormat expert_format) {
  check(expert_format == WeightFormat::NVFP4 || expert_format == WeightFormat::MXFP4 ||
            expert_format == WeightFormat::FP8_BLOCK128,
        "synthetic weights: expert format ", to_string(expert_format), " is not nvfp4, mxfp4 or fp8");
}

SyntheticWeightsPlan plan_synthetic_weights(const ModelConfig& config, WeightFormat expert_format) {
  check_synthetic_expert_format(expert_format);
  config.validate();
  PlanSink sink;
  sink.top_k = config.moe.experts_per_token;
  DeviceModelWeights shape_only;  // the walk's mirror; the plan allocates nothing in it
  walk_model(config, expert_format, shape_only, sink);
  return sink.plan;
}

DeviceModelWeights make_synthetic_weights(const ModelConfig& config, WeightFormat expert_format, DeviceAllocator& pool,
                                          uint64_t seed, cudaStream_t stream) {
  const SyntheticWeightsPlan plan = plan_synthetic_weights(config, expert_format);
  int current = -1;
  DSV4_CUDA_CHECK(cudaGetDevice(&current));
  check(current == pool.device_index(), "synthetic weights: the pool is on cuda:", pool.device_index(),
        " but the current device is cuda:", current);
  const DeviceMemoryInfo memory = current_device_memory();
  check(plan.total_bytes() <= memory.free_bytes, "synthetic weights of ", config.num_layers, " layers (",
        to_string(expert_format), " experts) need ", format_bytes(plan.total_bytes()), " on cuda:", current,
        " but the device has ", format_bytes(memory.free_bytes), " free of ", format_bytes(memory.total_bytes));
  pool.reserve(plan.total_bytes(), "synthetic weights");

  DeviceModelWeights weights;
  GenerateSink sink{config, pool, stream, seed};
  walk_model(config, expert_format, weights, sink);
  for (size_t i = 0; i < weights.layers.size(); ++i)
    write_expert_device_layout(weights.layers[i].ffn, stream, "layers." + std::to_string(i) + ".ffn");
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  weights.tensors = sink.tensors;
  weights.bytes = sink.bytes;
  return weights;
}

size_t DecodeStepWeightBytes::total_bytes() const {
  size_t total = model_bytes;
  for (size_t b : layer_bytes) total += b;
  return total;
}

DecodeStepWeightBytes decode_step_weight_bytes(const ModelConfig& config, const DeviceModelWeights& w) {
  auto array_bytes = [](const auto& a) { return size_t(a.size()) * sizeof(*a.data()); };
  auto hc = [&](const device_weights::HyperConnection& h) {
    return h.fn.view().stored_bytes + array_bytes(h.base) + array_bytes(h.scale);
  };
  auto compressor = [&](const device_weights::Compressor& k) {
    return k.wkv.view().stored_bytes + k.wgate.view().stored_bytes + array_bytes(k.ape) + array_bytes(k.norm);
  };
  auto expert = [](const device_weights::Expert& e) {
    return e.w1.view().stored_bytes + e.w2.view().stored_bytes + e.w3.view().stored_bytes;
  };
  DecodeStepWeightBytes out;
  out.model_bytes = w.head.view().stored_bytes + w.embed.view().data_row_bytes + array_bytes(w.norm) + hc(w.hc_head);
  for (const device_weights::Block& b : w.layers) {
    const device_weights::Attention& a = b.attn;
    size_t bytes = array_bytes(b.attn_norm) + array_bytes(b.ffn_norm) + hc(b.hc_attn) + hc(b.hc_ffn);
    for (const DeviceMatrix* m : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) bytes += m->view().stored_bytes;
    bytes += array_bytes(a.q_norm) + array_bytes(a.kv_norm) + array_bytes(a.sink);
    if (a.compressor) bytes += compressor(*a.compressor);
    if (a.indexer)
      bytes += a.indexer->wq_b.view().stored_bytes + a.indexer->weights_proj.view().stored_bytes +
               compressor(a.indexer->compressor);
    const device_weights::Moe& f = b.ffn;
    const size_t top_k = size_t(config.moe.experts_per_token);
    bytes += f.gate.view().stored_bytes + array_bytes(f.gate_bias) + (f.tid2eid.empty() ? 0 : top_k * 4) +
             expert(f.shared) + (f.experts.empty() ? 0 : top_k * expert(f.experts.front()));
    out.layer_bytes.push_back(bytes);
  }
  return out;
}

}  // namespace dsv4::cuda
