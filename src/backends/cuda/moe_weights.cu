#include "backends/cuda/moe_weights.hpp"

#include <algorithm>
#include <string>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/moe_experts.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/shape_only_matrix.hpp"
#include "core/bf16.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

void check_moe_config(const MoeConfig& c) {
  check(c.hidden > 0 && c.intermediate > 0, "moe: hidden (", c.hidden, ") and intermediate (", c.intermediate,
        ") sizes must be positive");
  check(c.experts > 0 && c.experts <= kMoeMaxExperts, "moe: ", c.experts, " routed experts; the CUDA MoE takes 1 to ",
        kMoeMaxExperts);
  check(c.top_k >= 1 && c.top_k <= c.experts && c.top_k <= 32, "moe: top_k = ", c.top_k, " must lie in [1, min(",
        c.experts, " experts, 32)]");
  check(c.swiglu_limit > 0.0f, "moe: swiglu_limit must be positive, got ", c.swiglu_limit);
}

namespace {

// Every region starts on a 256-byte boundary: the kernels read 16-byte vectors, and whole cache lines keep
// one matrix's bytes apart from the next.
constexpr size_t kArenaAlignment = 256;

struct MatrixPlacement {
  QuantizedMatrix meta;  // format, shape, scale type, global scale (data pointers unused)
  size_t data_offset = 0, scales_offset = 0;
};

class ArenaPlan {
 public:
  size_t reserve(size_t bytes) {
    const size_t offset = (total_ + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
    total_ = offset + bytes;
    return offset;
  }
  MatrixPlacement place(const QuantizedMatrix& m) {
    MatrixPlacement p{.meta = m};
    p.meta.data = nullptr;
    p.meta.scales = nullptr;
    p.meta.keepalive = nullptr;
    p.data_offset = reserve(m.data_bytes());
    p.scales_offset = reserve(m.scale_bytes());
    return p;
  }
  size_t total() const { return std::max<size_t>(total_, 1); }

 private:
  size_t total_ = 0;
};

DeviceMatrixView make_view(const MatrixPlacement& p, uint8_t* base) {
  const QuantizedMatrix& m = p.meta;
  return DeviceMatrixView{
      .format = m.format,
      .scale_type = m.scale_type,
      .rows = m.rows,
      .cols = m.cols,
      .data = base != nullptr ? base + p.data_offset : nullptr,
      .scales = base != nullptr && m.scale_bytes() > 0 ? base + p.scales_offset : nullptr,
      .global_scale = m.global_scale,
      .data_row_bytes = m.data_row_bytes(),
      .scales_per_row = m.scales_per_row(),
      .stored_bytes = m.stored_bytes(),
  };
}

void copy_to(uint8_t* base, size_t offset, const void* host, size_t bytes, const std::string& what) {
  check(bytes == 0 || host != nullptr, "moe: ", what, " has no host bytes");
  if (bytes > 0) DSV4_CUDA_CHECK(cudaMemcpy(base + offset, host, bytes, cudaMemcpyHostToDevice));
}

bool expert_format_supported(WeightFormat f) {
  return f == WeightFormat::MXFP4 || f == WeightFormat::NVFP4 || f == WeightFormat::FP8_BLOCK128 ||
         f == WeightFormat::BF16;
}

const char* const kMatrixNames[3] = {"w1", "w3", "w2"};  // MoeExpertView order

// One expert's three views: [I, d], [I, d], [d, I], one supported format and scale type for all three.
void check_expert(const MoeExpertView& v, const MoeConfig& c, const std::string& what) {
  const DeviceMatrixView* parts[3] = {&v.w1, &v.w3, &v.w2};
  for (int m = 0; m < 3; ++m) {
    const DeviceMatrixView& w = *parts[m];
    const bool down = m == 2;
    const int64_t rows = down ? c.hidden : c.intermediate, cols = down ? c.intermediate : c.hidden;
    const std::string name = what + " " + kMatrixNames[m];
    check(w.rows == rows && w.cols == cols, "moe: ", name, " must be [", rows, ", ", cols, "], got [", w.rows, ", ",
          w.cols, "]");
    check(expert_format_supported(w.format), "moe: ", name, " is ", to_string(w.format),
          "; the CUDA MoE takes MXFP4, NVFP4, FP8_BLOCK128 or BF16 experts");
    check(w.format == v.w1.format && w.scale_type == v.w1.scale_type, "moe: ", name, " is ", to_string(w.format), "/",
          to_string(w.scale_type), " but ", what, " w1 is ", to_string(v.w1.format), "/", to_string(v.w1.scale_type),
          "; an expert's matrices must share one format");
    const int64_t granule = moe_expert_k_granularity(w.format);
    check(w.cols % granule == 0, "moe: ", name, " has K = ", w.cols, "; ", to_string(w.format),
          " experts need a multiple of ", granule, " (one 16-byte load of stored weights)");
  }
}

// Every routed expert like expert 0 and each expert well-formed; the router BF16/F32 [E, d].
void check_layer(const DeviceMatrixView& router, const std::vector<MoeExpertView>& views, const MoeConfig& c,
                 const std::string& layer) {
  check(router.format == WeightFormat::BF16 || router.format == WeightFormat::F32, "moe: ", layer, " router is ",
        to_string(router.format), "; the CUDA router takes BF16 or F32");
  check(router.rows == c.experts && router.cols == c.hidden, "moe: ", layer, " router must be [", c.experts, ", ",
        c.hidden, "], got [", router.rows, ", ", router.cols, "]");
  check(int64_t(views.size()) == c.experts + 1, "moe: ", layer, " has ", int64_t(views.size()) - 1,
        " routed experts, config says ", c.experts);
  for (int64_t e = 0; e < c.experts; ++e) {
    const std::string name = layer + " expert " + std::to_string(e);
    check_expert(views[size_t(e)], c, name);
    const DeviceMatrixView& first = views.front().w1;
    const DeviceMatrixView& mine = views[size_t(e)].w1;
    check(mine.format == first.format && mine.scale_type == first.scale_type, "moe: ", name, " is ",
          to_string(mine.format), "/", to_string(mine.scale_type), " but ", layer, " expert 0 is ",
          to_string(first.format), "/", to_string(first.scale_type), "; all routed experts must share one format");
  }
  check_expert(views.back(), c, layer + " shared expert");
}

// Device-side checks of what the kernels would otherwise trust: MXFP4 scale codes <= 128 (weight_tile_mma.cuh's
// exact dequantisation; larger scales overflow its bf16 factor) and hash-table entries that are expert indices.
// Each records the first offender as an atomic minimum of (matrix << 40 | position), or of the table index.
constexpr unsigned long long kNoOffender = ~0ull;

__global__ void validate_layer_kernel(const MoeExpertView* views, int matrices, const int32_t* tid2eid,
                                      int64_t tid2eid_count, int32_t experts, unsigned long long* first_offender) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  const size_t first = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (int(blockIdx.y) < matrices) {
    const MoeExpertView& v = views[blockIdx.y / 3];
    const int which = blockIdx.y % 3;
    const DeviceMatrixView& w = which == 0 ? v.w1 : which == 1 ? v.w3 : v.w2;
    if (w.format != WeightFormat::MXFP4) return;
    const size_t count = size_t(w.rows) * size_t(w.scales_per_row);
    for (size_t i = first; i < count; i += stride)
      if (w.scales[i] > 128)
        atomicMin(&first_offender[0], (static_cast<unsigned long long>(blockIdx.y) << 40) | i);
  } else {
    for (size_t i = first; i < size_t(tid2eid_count); i += stride)
      if (tid2eid[i] < 0 || tid2eid[i] >= experts) atomicMin(&first_offender[1], static_cast<unsigned long long>(i));
  }
}

__host__ __device__ bool is_fp4(WeightFormat f) { return f == WeightFormat::MXFP4 || f == WeightFormat::NVFP4; }

// Rewrites `count` 32-bit words of fp4 data, rows of row_words words every row_stride words, in the DEVICE layout
// (tile::detail::fp4_device_word), in place.
__global__ void fp4_device_layout_kernel(uint32_t* words, int64_t count, int64_t row_words, int64_t row_stride) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t& word = words[i / row_words * row_stride + i % row_words];
    word = tile::detail::fp4_device_word(word);
  }
}

struct ExpertPlacement {
  MatrixPlacement w1, w3, w2;
};

// ---- synthetic weights -------------------------------------------------------------------------------------

enum class RandomCode : uint8_t { ANY_BYTE, E4M3, E8M0_WEIGHT_SCALE, E4M3_WEIGHT_SCALE, BF16_WEIGHT, F32_WEIGHT,
                                  F32_BIAS, EXPERT_ID };

__device__ uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1).
__device__ float uniform_signed(uint64_t bits) { return float(int64_t(bits >> 40) - (int64_t(1) << 23)) * 0x1p-23f; }

// Fills `count` elements of the given kind. Scales are chosen so that a 4096-long dot product of the weights with
// O(1) activations stays O(1..10): the SwiGLU clamp is exercised without saturating everything.
__global__ void fill_random_kernel(uint8_t* bytes, size_t count, uint64_t seed, RandomCode code, int32_t experts,
                                   int32_t top_k) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t r = splitmix64(seed ^ (i * 0xD1B54A32D192ED03ull));
    switch (code) {
      case RandomCode::ANY_BYTE: bytes[i] = uint8_t(r); break;
      case RandomCode::E4M3: {
        const uint8_t b = uint8_t(r);
        bytes[i] = (b & 0x7F) == 0x7F ? uint8_t(b ^ 1) : b;  // 0x7F / 0xFF are NaN
        break;
      }
      case RandomCode::E8M0_WEIGHT_SCALE: bytes[i] = uint8_t(119 + r % 3); break;  // 2^-8 .. 2^-6
      case RandomCode::E4M3_WEIGHT_SCALE: bytes[i] = uint8_t(0x30 + r % 16); break;  // 0.125 .. 0.23
      case RandomCode::BF16_WEIGHT:
        reinterpret_cast<uint16_t*>(bytes)[i] = float_to_bf16(uniform_signed(r) * 0.03f);
        break;
      case RandomCode::F32_WEIGHT: reinterpret_cast<float*>(bytes)[i] = uniform_signed(r) * 0.03f; break;
      case RandomCode::F32_BIAS: reinterpret_cast<float*>(bytes)[i] = uniform_signed(r) * 0.1f; break;
      case RandomCode::EXPERT_ID: {
        // Row t holds top_k distinct experts spaced E / top_k apart from a random start.
        const size_t row = i / size_t(top_k), k = i % size_t(top_k);
        const uint64_t start = splitmix64(seed ^ row) % uint64_t(experts);
        reinterpret_cast<int32_t*>(bytes)[i] = int32_t((start + k * uint64_t(experts / top_k)) % uint64_t(experts));
        break;
      }
    }
  }
}

void fill_random(uint8_t* bytes, size_t count, uint64_t seed, RandomCode code, const MoeConfig& c) {
  if (count == 0) return;
  const unsigned blocks = unsigned(std::min<size_t>((count + 255) / 256, 4096));
  fill_random_kernel<<<blocks, 256>>>(bytes, count, seed, code, int32_t(c.experts), int32_t(c.top_k));
  DSV4_CUDA_CHECK_LAUNCH("moe synthetic weights: fill_random_kernel");
}

void fill_random_matrix(const DeviceMatrixView& v, uint64_t seed, const MoeConfig& c) {
  auto* data = const_cast<uint8_t*>(v.data);
  auto* scales = const_cast<uint8_t*>(v.scales);
  const size_t elements = size_t(v.rows) * size_t(v.cols);
  switch (v.format) {
    case WeightFormat::F32: fill_random(data, elements, seed, RandomCode::F32_WEIGHT, c); return;
    case WeightFormat::BF16: fill_random(data, elements, seed, RandomCode::BF16_WEIGHT, c); return;
    case WeightFormat::FP8_BLOCK128:
      fill_random(data, size_t(v.rows) * v.data_row_bytes, seed, RandomCode::E4M3, c);
      fill_random(scales, size_t((v.rows + 127) / 128) * size_t(v.scales_per_row), seed + 1,
                  RandomCode::E8M0_WEIGHT_SCALE, c);
      return;
    case WeightFormat::MXFP4:
      fill_random(data, size_t(v.rows) * v.data_row_bytes, seed, RandomCode::ANY_BYTE, c);
      fill_random(scales, size_t(v.rows) * size_t(v.scales_per_row), seed + 1, RandomCode::E8M0_WEIGHT_SCALE, c);
      return;
    case WeightFormat::NVFP4:
      fill_random(data, size_t(v.rows) * v.data_row_bytes, seed, RandomCode::ANY_BYTE, c);
      fill_random(scales, size_t(v.rows) * size_t(v.scales_per_row), seed + 1, RandomCode::E4M3_WEIGHT_SCALE, c);
      return;
  }
}

// A synthetic matrix's shape for the arena plan; random NVFP4 weights are given global scale 0.05.
QuantizedMatrix shape_only(WeightFormat format, int64_t rows, int64_t cols) {
  return shape_only_matrix(format, rows, cols, format == WeightFormat::NVFP4 ? 0.05f : 1.0f);
}

}  // namespace

DeviceMoeWeights::DeviceMoeWeights(const MoeWeights& host, const MoeConfig& config, std::string_view what,
                                   DeviceAllocator* pool)
    : config_(config) {
  const std::string layer(what);
  check_moe_config(config);
  const int64_t E = config.experts;
  check(int64_t(host.experts.size()) == E, "moe: ", layer, " has ", host.experts.size(),
        " routed experts, config says ", E);
  host.gate.check_layout(layer + " router");
  for (int64_t e = 0; e <= E; ++e) {
    const ExpertWeights& x = e < E ? host.experts[size_t(e)] : host.shared;
    const std::string name = e < E ? layer + " expert " + std::to_string(e) : layer + " shared expert";
    x.w1.check_layout(name + " w1");
    x.w3.check_layout(name + " w3");
    x.w2.check_layout(name + " w2");
  }

  ArenaPlan plan;
  const MatrixPlacement router = plan.place(host.gate);
  std::vector<ExpertPlacement> placements;
  placements.reserve(size_t(E) + 1);
  for (int64_t e = 0; e <= E; ++e) {
    const ExpertWeights& x = e < E ? host.experts[size_t(e)] : host.shared;
    placements.push_back({plan.place(x.w1), plan.place(x.w3), plan.place(x.w2)});
  }
  // Shapes and formats are checked on the views before anything is allocated.
  router_ = make_view(router, nullptr);
  for (const ExpertPlacement& p : placements)
    host_views_.push_back({make_view(p.w1, nullptr), make_view(p.w3, nullptr), make_view(p.w2, nullptr)});
  check_layer(router_, host_views_, config, layer);
  const bool hashed = !host.tid2eid.empty();
  const bool has_bias = !hashed && !host.gate_bias.empty();
  check_routing_tables(hashed ? int64_t(host.tid2eid.size()) : 0, has_bias ? int64_t(host.gate_bias.size()) : 0,
                       layer);
  const size_t bias_offset = plan.reserve(has_bias ? host.gate_bias.size() * sizeof(float) : 0);
  const size_t tid2eid_offset = plan.reserve(hashed ? host.tid2eid.size() * sizeof(int32_t) : 0);

  arena_ = pool != nullptr ? DeviceBuffer(*pool, plan.total(), layer + " weights")
                           : DeviceBuffer(plan.total(), layer + " weights");
  auto* base = arena_.as<uint8_t>();
  auto upload = [&](const MatrixPlacement& p, const QuantizedMatrix& m, const std::string& name) {
    copy_to(base, p.data_offset, m.data, m.data_bytes(), name + " data");
    copy_to(base, p.scales_offset, m.scales, m.scale_bytes(), name + " scales");
  };
  upload(router, host.gate, layer + " router");
  router_ = make_view(router, base);
  for (int64_t e = 0; e <= E; ++e) {
    const ExpertWeights& x = e < E ? host.experts[size_t(e)] : host.shared;
    const std::string name = e < E ? layer + " expert " + std::to_string(e) : layer + " shared expert";
    const ExpertPlacement& p = placements[size_t(e)];
    upload(p.w1, x.w1, name + " w1");
    upload(p.w3, x.w3, name + " w3");
    upload(p.w2, x.w2, name + " w2");
    host_views_[size_t(e)] = {make_view(p.w1, base), make_view(p.w3, base), make_view(p.w2, base)};
    for (const DeviceMatrixView* w : {&host_views_[size_t(e)].w1, &host_views_[size_t(e)].w3,
                                      &host_views_[size_t(e)].w2})
      write_fp4_device_layout(*w, nullptr, name);
  }
  if (has_bias) {
    copy_to(base, bias_offset, host.gate_bias.data(), host.gate_bias.size() * sizeof(float), layer + " gate bias");
    bias_ = reinterpret_cast<const float*>(base + bias_offset);
  }
  if (hashed) {
    copy_to(base, tid2eid_offset, host.tid2eid.data(), host.tid2eid.size() * sizeof(int32_t), layer + " tid2eid");
    tid2eid_ = reinterpret_cast<const int32_t*>(base + tid2eid_offset);
    vocab_ = int64_t(host.tid2eid.size()) / config.top_k;
  }
  publish_views(layer);
}

DeviceMoeWeights::DeviceMoeWeights(const device_weights::Moe& uploaded, const MoeConfig& config,
                                   std::string_view what)
    : config_(config) {
  const std::string layer(what);
  check_moe_config(config);
  const int64_t E = config.experts;
  check(int64_t(uploaded.experts.size()) == E, "moe: ", layer, " has ", uploaded.experts.size(),
        " routed experts, config says ", E);
  router_ = uploaded.gate.view();
  for (int64_t e = 0; e <= E; ++e) {
    const device_weights::Expert& x = e < E ? uploaded.experts[size_t(e)] : uploaded.shared;
    host_views_.push_back({x.w1.view(), x.w3.view(), x.w2.view()});
  }
  check_layer(router_, host_views_, config, layer);
  const bool hashed = !uploaded.tid2eid.empty();
  const bool has_bias = !hashed && !uploaded.gate_bias.empty();
  check_routing_tables(hashed ? uploaded.tid2eid.size() : 0, has_bias ? uploaded.gate_bias.size() : 0, layer);
  if (has_bias) bias_ = uploaded.gate_bias.data();
  if (hashed) {
    tid2eid_ = uploaded.tid2eid.data();
    vocab_ = uploaded.tid2eid.size() / config.top_k;
  }
  publish_views(layer);
}

void DeviceMoeWeights::check_routing_tables(int64_t tid2eid_entries, int64_t bias_entries,
                                            const std::string& layer) const {
  check(tid2eid_entries % config_.top_k == 0, "moe: ", layer, " tid2eid holds ", tid2eid_entries,
        " entries, not a whole number of rows of top_k = ", config_.top_k);
  check(bias_entries == 0 || bias_entries == config_.experts, "moe: ", layer, " gate bias holds ", bias_entries,
        " values, expected ", config_.experts);
}

DeviceMoeWeights DeviceMoeWeights::synthetic(const MoeConfig& config, const MoeSyntheticSpec& spec, uint64_t seed) {
  check_moe_config(config);
  check(spec.router_format == WeightFormat::BF16 || spec.router_format == WeightFormat::F32,
        "moe synthetic weights: router format ", to_string(spec.router_format), " is not BF16 or F32");
  check(expert_format_supported(spec.routed_format) && expert_format_supported(spec.shared_format),
        "moe synthetic weights: expert formats ", to_string(spec.routed_format), " / ", to_string(spec.shared_format),
        " are not among MXFP4, NVFP4, FP8_BLOCK128, BF16");
  check(!spec.hashed || spec.vocab > 0, "moe synthetic weights: hash routing needs a vocab, got ", spec.vocab);
  const int64_t E = config.experts, d = config.hidden, I = config.intermediate;
  check(!spec.hashed || spec.vocab <= (int64_t(1) << 31) / config.top_k, "moe synthetic weights: vocab ", spec.vocab,
        " too large");

  DeviceMoeWeights w;
  w.config_ = config;
  ArenaPlan plan;
  const MatrixPlacement router = plan.place(shape_only(spec.router_format, E, d));
  std::vector<ExpertPlacement> placements;
  for (int64_t e = 0; e <= E; ++e) {
    const WeightFormat f = e < E ? spec.routed_format : spec.shared_format;
    placements.push_back({plan.place(shape_only(f, I, d)), plan.place(shape_only(f, I, d)),
                          plan.place(shape_only(f, d, I))});
  }
  const size_t bias_offset = plan.reserve(spec.hashed ? 0 : size_t(E) * sizeof(float));
  const size_t tid2eid_offset = plan.reserve(spec.hashed ? size_t(spec.vocab * config.top_k) * sizeof(int32_t) : 0);
  w.arena_ = DeviceBuffer(plan.total(), "synthetic moe weights");
  auto* base = w.arena_.as<uint8_t>();

  w.router_ = make_view(router, base);
  fill_random_matrix(w.router_, seed, config);
  for (int64_t e = 0; e <= E; ++e) {
    const ExpertPlacement& p = placements[size_t(e)];
    w.host_views_.push_back({make_view(p.w1, base), make_view(p.w3, base), make_view(p.w2, base)});
    const uint64_t expert_seed = seed + 16 * uint64_t(e + 1);
    fill_random_matrix(w.host_views_.back().w1, expert_seed, config);
    fill_random_matrix(w.host_views_.back().w3, expert_seed + 4, config);
    fill_random_matrix(w.host_views_.back().w2, expert_seed + 8, config);
    for (const DeviceMatrixView* m : {&w.host_views_.back().w1, &w.host_views_.back().w3, &w.host_views_.back().w2})
      write_fp4_device_layout(*m, nullptr, "synthetic moe expert");
  }
  if (spec.hashed) {
    w.vocab_ = spec.vocab;
    fill_random(base + tid2eid_offset, size_t(spec.vocab * config.top_k), seed + 3, RandomCode::EXPERT_ID, config);
    w.tid2eid_ = reinterpret_cast<const int32_t*>(base + tid2eid_offset);
  } else {
    fill_random(base + bias_offset, size_t(E), seed + 5, RandomCode::F32_BIAS, config);
    w.bias_ = reinterpret_cast<const float*>(base + bias_offset);
  }
  check_layer(w.router_, w.host_views_, config, "synthetic moe");
  w.publish_views("synthetic moe");
  return w;
}

void write_fp4_device_layout(const DeviceMatrixView& w, cudaStream_t stream, std::string_view what) {
  if (!is_fp4(w.format) || w.rows == 0) return;
  check((reinterpret_cast<uintptr_t>(w.data) | uintptr_t(w.data_row_bytes)) % 4 == 0 && w.cols % 8 == 0, what, ": ",
        to_string(w.format), " expert data with rows of ", w.cols, " values at ", w.data_row_bytes,
        "-byte strides is not in whole 4-byte words (the MoE kernels' fp4 layout rewrites whole 32-bit words)");
  const int64_t row_words = w.cols / 8, count = w.rows * row_words;
  const unsigned blocks = unsigned(std::min<int64_t>((count + 255) / 256, 1024));
  fp4_device_layout_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<uint32_t*>(const_cast<uint8_t*>(w.data)),
                                                       count, row_words, int64_t(w.data_row_bytes) / 4);
  DSV4_CUDA_CHECK_LAUNCH("moe fp4_device_layout_kernel");
}

void DeviceMoeWeights::publish_views(const std::string& what) {
  streamed_tiles_ = moe_streamed_tiles_apply(host_views_);
  if (streamed_tiles_) stream_maps_ = encode_moe_stream_maps(host_views_, what);
  device_views_ = DeviceBuffer(host_views_.size() * sizeof(MoeExpertView), what + " expert views");
  device_views_.upload(host_views_.data(), host_views_.size() * sizeof(MoeExpertView));
  const int matrices = 3 * int(host_views_.size());

  DeviceBuffer offenders(2 * sizeof(unsigned long long), what + " validation");
  offenders.fill_bytes(0xFF);
  const int64_t table = tid2eid_ != nullptr ? vocab_ * config_.top_k : 0;
  validate_layer_kernel<<<dim3(16, unsigned(matrices + 1)), 256>>>(device_views_.as<MoeExpertView>(), matrices,
                                                                    tid2eid_, table, int32_t(config_.experts),
                                                                    offenders.as<unsigned long long>());
  DSV4_CUDA_CHECK_LAUNCH("moe validate_layer_kernel");
  unsigned long long first[2];
  offenders.download(first, sizeof first);
  if (first[0] != kNoOffender) {
    const int matrix = int(first[0] >> 40);
    const size_t position = size_t(first[0] & ((1ull << 40) - 1));
    const int64_t e = matrix / 3;
    const MoeExpertView& v = host_views_[size_t(e)];
    const DeviceMatrixView& w = matrix % 3 == 0 ? v.w1 : matrix % 3 == 1 ? v.w3 : v.w2;
    uint8_t code = 0;
    DSV4_CUDA_CHECK(cudaMemcpy(&code, w.scales + position, 1, cudaMemcpyDeviceToHost));
    fail("moe: ", what, e < config_.experts ? " expert " + std::to_string(e) : std::string(" shared expert"), " ",
         kMatrixNames[matrix % 3], " MXFP4 scale code ", int(code), " at row ", position / size_t(w.scales_per_row),
         ", block ", position % size_t(w.scales_per_row),
         " is beyond the tensor-core path's range (codes <= 128, scales <= 2)");
  }
  if (first[1] != kNoOffender) {
    int32_t id = 0;
    DSV4_CUDA_CHECK(cudaMemcpy(&id, tid2eid_ + first[1], sizeof id, cudaMemcpyDeviceToHost));
    fail("moe: ", what, " tid2eid[", first[1] / uint64_t(config_.top_k), "][", first[1] % uint64_t(config_.top_k),
         "] = ", id, " is not an expert index below ", config_.experts);
  }
}

}  // namespace dsv4::cuda
