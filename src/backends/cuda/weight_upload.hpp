// The whole model resident on the device in its stored formats: every QuantizedMatrix becomes a DeviceMatrix (data and
// scales as in the checkpoint), every fp32 vector (and the int32 hash-routing table) a device array, all in pool
// memory. The upload reads the host bytes (usually the mmapped checkpoint, so this is where the disk is read) into
// two pinned staging buffers in turn while the other one's asynchronous copy runs, so disk reads and PCIe transfers
// overlap, and reports progress in bytes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "model/model_weights.hpp"

namespace dsv4::cuda {

// Bytes done and the total, called from the uploading thread.
using UploadProgress = std::function<void(size_t done, size_t total)>;

// Host-to-device copies through two pinned staging buffers: copy() lays pieces out in the current buffer; when it is
// full, all host threads copy the whole buffer's pieces in (from pageable or mmapped memory: page faults in
// parallel), and its cudaMemcpyAsync runs on `stream` while the other buffer is filled. Small pieces share a buffer;
// large ones span several. Sources and destinations must stay valid until finish() returns.
class StagedUploader {
 public:
  // bench_cuda_upload on an H200 host: 16-64 MiB all reach 96-98 % of pinned cudaMemcpy, 8 MiB 38 %, 128 MiB 81 %.
  static constexpr size_t kDefaultStagingBytes = size_t(32) << 20;

  // `total_bytes` is what the copies will add up to (the progress total; finish() checks it). Each staging buffer
  // takes min(staging_bytes, total_bytes) of pinned host memory.
  StagedUploader(cudaStream_t stream, size_t total_bytes, UploadProgress progress = {},
                 size_t staging_bytes = kDefaultStagingBytes);
  // Waits for transfers still in flight (the pinned buffers may not go while the copy engine reads them).
  ~StagedUploader();
  StagedUploader(const StagedUploader&) = delete;
  StagedUploader& operator=(const StagedUploader&) = delete;

  // Queues `bytes` from `host` to `device` (read and sent when their staging buffer fills, or by finish()). `what`
  // names the tensor in errors.
  void copy(void* device, const void* host, size_t bytes, std::string_view what);
  // Sends what is staged and waits until every transfer has completed; progress then reports the total.
  void finish();
  size_t bytes_done() const { return bytes_done_; }

 private:
  struct Piece {
    size_t staging_offset;
    const uint8_t* host;
    uint8_t* device;
    size_t bytes;
  };
  struct StagingBuffer {
    uint8_t* host = nullptr;  // pinned
    size_t used = 0;
    std::vector<Piece> pieces;
    cudaEvent_t sent = nullptr;  // recorded after the buffer's copies
    size_t in_flight = 0;        // bytes of the last send not yet known to be complete
  };

  void stage(StagingBuffer& buffer) const;
  void send_current();
  void wait_for(StagingBuffer& buffer);
  void release() noexcept;

  cudaStream_t stream_;
  size_t total_bytes_;
  UploadProgress progress_;
  size_t staging_bytes_;
  StagingBuffer buffers_[2];
  int current_ = 0;
  size_t bytes_queued_ = 0;
  size_t bytes_done_ = 0;
};

// A host vector's copy in device memory.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(DeviceBuffer buffer, int64_t size) : buffer_(std::move(buffer)), size_(size) {}

  const T* data() const { return static_cast<const T*>(buffer_.data()); }
  int64_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  DeviceBuffer& buffer() { return buffer_; }
  const DeviceBuffer& buffer() const { return buffer_; }

 private:
  DeviceBuffer buffer_;
  int64_t size_ = 0;
};

// Device mirrors of model/model_weights.hpp, field for field.
namespace device_weights {

struct Compressor {
  DeviceMatrix wkv, wgate;
  DeviceArray<float> ape, norm;
};

struct Indexer {
  DeviceMatrix wq_b, weights_proj;
  Compressor compressor;
};

struct Attention {
  DeviceMatrix wq_a;
  DeviceArray<float> q_norm;
  DeviceMatrix wq_b, wkv;
  DeviceArray<float> kv_norm;
  DeviceMatrix wo_a, wo_b;
  DeviceArray<float> sink;
  std::optional<Compressor> compressor;
  std::optional<Indexer> indexer;
};

struct Expert {
  DeviceMatrix w1, w2, w3;
};

struct Moe {
  DeviceMatrix gate;
  DeviceArray<float> gate_bias;   // empty on hash-routed layers
  DeviceArray<int32_t> tid2eid;   // [vocab, top_k]; empty on scored layers
  // fp4 (MXFP4, NVFP4) expert matrices hold their data in the MoE kernels' DEVICE layout (moe_weights.hpp
  // write_fp4_device_layout), not the checkpoint's: write_expert_device_layout, by whoever fills them.
  std::vector<Expert> experts;
  Expert shared;
};

struct HyperConnection {
  DeviceMatrix fn;
  DeviceArray<float> base, scale;
};

struct Block {
  DeviceArray<float> attn_norm, ffn_norm;
  HyperConnection hc_attn, hc_ffn;
  Attention attn;
  Moe ffn;
};

struct Mtp {
  Block block;
  DeviceMatrix e_proj, h_proj;
  DeviceArray<float> enorm, hnorm, norm;
  HyperConnection hc_head;
};

}  // namespace device_weights

struct DeviceModelWeights {
  DeviceMatrix embed, head;
  DeviceArray<float> norm;
  device_weights::HyperConnection hc_head;
  std::vector<device_weights::Block> layers;
  std::vector<device_weights::Mtp> mtp;
  int64_t tensors = 0;  // matrices and non-empty vectors uploaded
  size_t bytes = 0;     // bytes copied (stored formats; vectors as held on the host)
};

// What an upload of `host` takes.
struct WeightUploadPlan {
  int64_t tensors = 0;      // matrices and non-empty vectors
  size_t bytes = 0;         // bytes copied
  size_t device_bytes = 0;  // pool memory: each buffer rounded up to DeviceAllocator::kAlignment
};

WeightUploadPlan plan_weight_upload(const ModelWeights& host);

// Rewrites every fp4 routed and shared expert matrix of `moe` (uploaded in the checkpoint's layout) into the MoE
// kernels' DEVICE layout, asynchronously on `stream` (the last step of upload_model_weights and
// make_synthetic_weights for each MoE layer).
void write_expert_device_layout(const device_weights::Moe& moe, cudaStream_t stream, std::string_view what);

struct WeightUploadOptions {
  size_t staging_bytes = StagedUploader::kDefaultStagingBytes;  // per staging buffer (two are used)
  size_t keep_free_bytes = 0;  // device memory to leave free after the upload (KV cache, workspaces)
  UploadProgress progress;     // optional
};

// Copies every weight of `host` into `pool` (one slab reserved for the plan's device_bytes; the MoE layers' fp4
// experts in the kernels' DEVICE layout) and returns when all transfers have completed. Before allocating anything,
// throws naming the bytes needed and the device's free memory when the weights plus keep_free_bytes do not fit;
// malformed matrices throw naming the tensor.
DeviceModelWeights upload_model_weights(const ModelWeights& host, DeviceAllocator& pool, cudaStream_t stream,
                                        const WeightUploadOptions& options = {});

}  // namespace dsv4::cuda
