#include "backends/cuda/weight_upload.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/moe_weights.hpp"
#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4::cuda {

namespace {

// Reading the mmapped checkpoint into pinned memory runs at page-fault and memcpy speed per thread, far below the
// PCIe rate, so a staging buffer is filled by all host threads at once, in chunks of at least this size (smaller
// ones cost more to hand out than to copy).
constexpr size_t kMinStagingChunk = size_t(256) << 10;

size_t aligned(size_t bytes) {
  return (bytes + DeviceAllocator::kAlignment - 1) / DeviceAllocator::kAlignment * DeviceAllocator::kAlignment;
}

// Walks the host weights and their device mirror together, handing each matrix and vector with its name to the
// visitor: visitor.matrix(const QuantizedMatrix&, DeviceMatrix&, name), visitor.array(const std::vector<T>&,
// DeviceArray<T>&, name). Resizes the mirror's lists and optionals to match the host.
template <class Visitor>
class WeightWalker {
 public:
  explicit WeightWalker(Visitor& visitor) : visit_(visitor) {}

  void model(const ModelWeights& h, DeviceModelWeights& d) {
    visit_.matrix(h.embed, d.embed, "embed");
    visit_.matrix(h.head, d.head, "head");
    visit_.array(h.norm, d.norm, "norm");
    hyper_connection(h.hc_head, d.hc_head, "hc_head");
    d.layers.resize(h.layers.size());
    for (size_t i = 0; i < h.layers.size(); ++i) block(h.layers[i], d.layers[i], "layers." + std::to_string(i));
    d.mtp.resize(h.mtp.size());
    for (size_t i = 0; i < h.mtp.size(); ++i) {
      const MtpWeights& hm = h.mtp[i];
      device_weights::Mtp& dm = d.mtp[i];
      const std::string p = "mtp." + std::to_string(i);
      block(hm.block, dm.block, p);
      visit_.matrix(hm.e_proj, dm.e_proj, p + ".e_proj");
      visit_.matrix(hm.h_proj, dm.h_proj, p + ".h_proj");
      visit_.array(hm.enorm, dm.enorm, p + ".enorm");
      visit_.array(hm.hnorm, dm.hnorm, p + ".hnorm");
      visit_.array(hm.norm, dm.norm, p + ".norm");
      hyper_connection(hm.hc_head, dm.hc_head, p + ".hc_head");
    }
  }

 private:
  void hyper_connection(const HyperConnectionWeights& h, device_weights::HyperConnection& d, const std::string& p) {
    visit_.matrix(h.fn, d.fn, p + ".fn");
    visit_.array(h.base, d.base, p + ".base");
    visit_.array(h.scale, d.scale, p + ".scale");
  }

  void compressor(const CompressorWeights& h, device_weights::Compressor& d, const std::string& p) {
    visit_.matrix(h.wkv, d.wkv, p + ".wkv");
    visit_.matrix(h.wgate, d.wgate, p + ".wgate");
    visit_.array(h.ape, d.ape, p + ".ape");
    visit_.array(h.norm, d.norm, p + ".norm");
  }

  void expert(const ExpertWeights& h, device_weights::Expert& d, const std::string& p) {
    visit_.matrix(h.w1, d.w1, p + ".w1");
    visit_.matrix(h.w2, d.w2, p + ".w2");
    visit_.matrix(h.w3, d.w3, p + ".w3");
  }

  void block(const BlockWeights& h, device_weights::Block& d, const std::string& p) {
    visit_.array(h.attn_norm, d.attn_norm, p + ".attn_norm");
    visit_.array(h.ffn_norm, d.ffn_norm, p + ".ffn_norm");
    hyper_connection(h.hc_attn, d.hc_attn, p + ".hc_attn");
    hyper_connection(h.hc_ffn, d.hc_ffn, p + ".hc_ffn");

    const AttentionWeights& ha = h.attn;
    device_weights::Attention& da = d.attn;
    const std::string a = p + ".attn";
    visit_.matrix(ha.wq_a, da.wq_a, a + ".wq_a");
    visit_.array(ha.q_norm, da.q_norm, a + ".q_norm");
    visit_.matrix(ha.wq_b, da.wq_b, a + ".wq_b");
    visit_.matrix(ha.wkv, da.wkv, a + ".wkv");
    visit_.array(ha.kv_norm, da.kv_norm, a + ".kv_norm");
    visit_.matrix(ha.wo_a, da.wo_a, a + ".wo_a");
    visit_.matrix(ha.wo_b, da.wo_b, a + ".wo_b");
    visit_.array(ha.sink, da.sink, a + ".sink");
    if (ha.compressor) compressor(*ha.compressor, da.compressor.emplace(), a + ".compressor");
    if (ha.indexer) {
      device_weights::Indexer& di = da.indexer.emplace();
      visit_.matrix(ha.indexer->wq_b, di.wq_b, a + ".indexer.wq_b");
      visit_.matrix(ha.indexer->weights_proj, di.weights_proj, a + ".indexer.weights_proj");
      compressor(ha.indexer->compressor, di.compressor, a + ".indexer.compressor");
    }

    const MoeWeights& hf = h.ffn;
    device_weights::Moe& df = d.ffn;
    const std::string f = p + ".ffn";
    visit_.matrix(hf.gate, df.gate, f + ".gate");
    visit_.array(hf.gate_bias, df.gate_bias, f + ".gate.bias");
    visit_.array(hf.tid2eid, df.tid2eid, f + ".gate.tid2eid");
    df.experts.resize(hf.experts.size());
    for (size_t e = 0; e < hf.experts.size(); ++e)
      expert(hf.experts[e], df.experts[e], f + ".experts." + std::to_string(e));
    expert(hf.shared, df.shared, f + ".shared_experts");
  }

  Visitor& visit_;
};

struct PlanVisitor {
  WeightUploadPlan plan;

  void matrix(const QuantizedMatrix& h, DeviceMatrix&, const std::string& name) {
    h.check_layout(name);
    ++plan.tensors;
    plan.bytes += h.stored_bytes();
    plan.device_bytes += aligned(h.data_bytes()) + aligned(h.scale_bytes());
  }
  template <class T>
  void array(const std::vector<T>& h, DeviceArray<T>&, const std::string&) {
    if (h.empty()) return;
    ++plan.tensors;
    plan.bytes += h.size() * sizeof(T);
    plan.device_bytes += aligned(h.size() * sizeof(T));
  }
};

struct UploadVisitor {
  DeviceAllocator& pool;
  StagedUploader& uploader;
  int64_t tensors = 0;

  void matrix(const QuantizedMatrix& h, DeviceMatrix& d, const std::string& name) {
    d = DeviceMatrix::allocate(h, name, pool);
    uploader.copy(d.data_buffer().data(), h.data, h.data_bytes(), name);
    uploader.copy(d.scales_buffer().data(), h.scales, h.scale_bytes(), name);
    ++tensors;
  }
  template <class T>
  void array(const std::vector<T>& h, DeviceArray<T>& d, const std::string& name) {
    if (h.empty()) return;
    const size_t bytes = h.size() * sizeof(T);
    d = DeviceArray<T>(DeviceBuffer(pool, bytes, name), int64_t(h.size()));
    uploader.copy(d.buffer().data(), h.data(), bytes, name);
    ++tensors;
  }
};

}  // namespace

StagedUploader::StagedUploader(cudaStream_t stream, size_t total_bytes, UploadProgress progress, size_t staging_bytes)
    : stream_(stream), total_bytes_(total_bytes), progress_(std::move(progress)),
      staging_bytes_(std::min(staging_bytes, total_bytes)) {
  check(staging_bytes > 0, "staged upload: the staging buffer size must be positive");
  if (staging_bytes_ == 0) return;
  for (StagingBuffer& buffer : buffers_) {
    cudaError_t status = cudaHostAlloc(reinterpret_cast<void**>(&buffer.host), staging_bytes_, cudaHostAllocDefault);
    if (status == cudaSuccess) status = cudaEventCreateWithFlags(&buffer.sent, cudaEventDisableTiming);
    if (status != cudaSuccess) {
      cudaGetLastError();  // allocation failures are not sticky; clear it so later calls report their own
      release();
      fail("staged upload: allocating a ", format_bytes(staging_bytes_), " pinned staging buffer failed: ",
           cudaGetErrorName(status), ": ", cudaGetErrorString(status));
    }
  }
}

StagedUploader::~StagedUploader() { release(); }

void StagedUploader::release() noexcept {
  // Cannot throw (destructor, or a constructor already failing): errors of the transfers were reported by finish(),
  // or an exception is on its way.
  for (StagingBuffer& buffer : buffers_)
    if (buffer.in_flight > 0) cudaEventSynchronize(buffer.sent);
  for (StagingBuffer& buffer : buffers_) {
    if (buffer.host != nullptr) cudaFreeHost(buffer.host);
    if (buffer.sent != nullptr) cudaEventDestroy(buffer.sent);
    buffer = StagingBuffer{};
  }
}

void StagedUploader::copy(void* device, const void* host, size_t bytes, std::string_view what) {
  if (bytes == 0) return;
  check(device != nullptr && host != nullptr, "staged upload of '", what, "': null ", device ? "host" : "device",
        " pointer");
  check(bytes <= total_bytes_ - bytes_queued_, "staged upload of '", what, "': ", bytes, " bytes exceed the ",
        total_bytes_ - bytes_queued_, " bytes left of the declared total ", total_bytes_);
  bytes_queued_ += bytes;
  auto* destination = static_cast<uint8_t*>(device);
  const auto* source = static_cast<const uint8_t*>(host);
  while (bytes > 0) {
    StagingBuffer& buffer = buffers_[current_];
    const size_t n = std::min(bytes, staging_bytes_ - buffer.used);
    // One piece (and one transfer) for bytes that continue the previous piece on both sides.
    Piece* last = buffer.pieces.empty() ? nullptr : &buffer.pieces.back();
    if (last != nullptr && last->staging_offset + last->bytes == buffer.used && last->host + last->bytes == source &&
        last->device + last->bytes == destination)
      last->bytes += n;
    else
      buffer.pieces.push_back({buffer.used, source, destination, n});
    buffer.used += n;
    destination += n;
    source += n;
    bytes -= n;
    if (buffer.used == staging_bytes_) send_current();
  }
}

void StagedUploader::stage(StagingBuffer& buffer) const {
  const std::vector<Piece>& pieces = buffer.pieces;
  // Copies the part of the pieces that falls in [begin, end) of the buffer; pieces are sorted by staging offset.
  const auto copy_range = [&](size_t begin, size_t end) {
    auto piece = std::upper_bound(pieces.begin(), pieces.end(), begin,
                                  [](size_t offset, const Piece& p) { return offset < p.staging_offset; });
    for (--piece; piece != pieces.end() && piece->staging_offset < end; ++piece) {
      const size_t lo = std::max(begin, piece->staging_offset);
      const size_t hi = std::min(end, piece->staging_offset + piece->bytes);
      if (lo < hi) std::memcpy(buffer.host + lo, piece->host + (lo - piece->staging_offset), hi - lo);
    }
  };
  ThreadPool& pool = ThreadPool::global();
  const int64_t chunks = std::clamp<int64_t>(int64_t(buffer.used / kMinStagingChunk), 1, 4 * int64_t(pool.size()));
  if (chunks == 1) {
    copy_range(0, buffer.used);
    return;
  }
  const size_t chunk_bytes = (buffer.used + size_t(chunks) - 1) / size_t(chunks);
  pool.parallel_for(0, chunks, [&](int64_t chunk) {
    const size_t begin = size_t(chunk) * chunk_bytes;
    copy_range(begin, std::min(buffer.used, begin + chunk_bytes));
  });
}

void StagedUploader::send_current() {
  StagingBuffer& buffer = buffers_[current_];
  if (buffer.used == 0) return;
  stage(buffer);
  for (const Piece& piece : buffer.pieces)
    DSV4_CUDA_CHECK(cudaMemcpyAsync(piece.device, buffer.host + piece.staging_offset, piece.bytes,
                                    cudaMemcpyHostToDevice, stream_));
  DSV4_CUDA_CHECK(cudaEventRecord(buffer.sent, stream_));
  buffer.in_flight = buffer.used;
  buffer.used = 0;
  buffer.pieces.clear();
  current_ ^= 1;
  // The other buffer is laid out and filled next: its previous transfer must be done first.
  wait_for(buffers_[current_]);
}

void StagedUploader::wait_for(StagingBuffer& buffer) {
  if (buffer.in_flight == 0) return;
  DSV4_CUDA_CHECK(cudaEventSynchronize(buffer.sent));
  bytes_done_ += buffer.in_flight;
  buffer.in_flight = 0;
  if (progress_) progress_(bytes_done_, total_bytes_);
}

void StagedUploader::finish() {
  check(bytes_queued_ == total_bytes_, "staged upload: ", bytes_queued_, " bytes copied of the ", total_bytes_,
        " declared");
  send_current();
  wait_for(buffers_[0]);
  wait_for(buffers_[1]);
  if (total_bytes_ == 0 && progress_) progress_(0, 0);
}

void write_expert_device_layout(const device_weights::Moe& moe, cudaStream_t stream, std::string_view what) {
  const std::string layer(what);
  for (size_t e = 0; e <= moe.experts.size(); ++e) {
    const device_weights::Expert& x = e < moe.experts.size() ? moe.experts[e] : moe.shared;
    const std::string name = layer + (e < moe.experts.size() ? ".experts." + std::to_string(e) : ".shared_experts");
    write_fp4_device_layout(x.w1.view(), stream, name + ".w1");
    write_fp4_device_layout(x.w2.view(), stream, name + ".w2");
    write_fp4_device_layout(x.w3.view(), stream, name + ".w3");
  }
}

WeightUploadPlan plan_weight_upload(const ModelWeights& host) {
  PlanVisitor visitor;
  DeviceModelWeights scratch;  // the walker's mirror; nothing is allocated in it
  WeightWalker(visitor).model(host, scratch);
  return visitor.plan;
}

DeviceModelWeights upload_model_weights(const ModelWeights& host, DeviceAllocator& pool, cudaStream_t stream,
                                        const WeightUploadOptions& options) {
  const WeightUploadPlan plan = plan_weight_upload(host);
  int current = -1;
  DSV4_CUDA_CHECK(cudaGetDevice(&current));
  check(current == pool.device_index(), "weight upload: the pool is on cuda:", pool.device_index(),
        " but the current device is cuda:", current);
  const DeviceMemoryInfo memory = current_device_memory();
  const bool fits = plan.device_bytes <= memory.free_bytes &&
                    options.keep_free_bytes <= memory.free_bytes - plan.device_bytes;
  if (!fits)
    fail("the model's weights need ", format_bytes(plan.device_bytes), " (", plan.device_bytes, " bytes, ",
         plan.tensors, " tensors) on cuda:", current,
         options.keep_free_bytes > 0 ? " plus " + format_bytes(options.keep_free_bytes) + " kept free" : "",
         " but the device has ", format_bytes(memory.free_bytes), " free of ", format_bytes(memory.total_bytes));
  pool.reserve(plan.device_bytes, "model weights");

  // Declared before the uploader so that, when an error unwinds, the uploader first waits for the transfers still
  // writing into this memory.
  DeviceModelWeights device;
  StagedUploader uploader(stream, plan.bytes, options.progress, options.staging_bytes);
  UploadVisitor visitor{pool, uploader};
  WeightWalker(visitor).model(host, device);
  uploader.finish();
  for (size_t i = 0; i < device.layers.size(); ++i)
    write_expert_device_layout(device.layers[i].ffn, stream, "layers." + std::to_string(i) + ".ffn");
  for (size_t i = 0; i < device.mtp.size(); ++i)
    write_expert_device_layout(device.mtp[i].block.ffn, stream, "mtp." + std::to_string(i) + ".ffn");
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
  device.tensors = visitor.tensors;
  device.bytes = uploader.bytes_done();
  return device;
}

}  // namespace dsv4::cuda
