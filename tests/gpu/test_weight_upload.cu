// Weight upload: tiny checkpoints (release FP8/MXFP4 and ModelOpt NVFP4 layouts) loaded by the checkpoint loader,
// uploaded through the pinned double-buffered path with staging buffers small enough that tensors span many buffer
// turns, then every matrix and vector downloaded and compared byte for byte (the fp4 experts' words in the MoE
// kernels' DEVICE layout, the upload's last step), walked field by field here (not with
// the uploader's own walk, so a slot it skipped would show). Also the StagedUploader alone, progress reports, the
// refusal when the weights do not fit, malformed matrices, and the progress bar's output.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/kernels/weight_tile_mma.cuh"
#include "backends/cuda/upload_progress.hpp"
#include "backends/cuda/weight_upload.hpp"
#include "model/checkpoint_loader.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"
#include "support/tiny_checkpoint.hpp"

namespace dsv4::cuda {
namespace {

using dsv4::testing::expect_error;
using dsv4::testing::TempDir;
using dsv4::testing::write_tiny_checkpoint;

std::vector<uint8_t> download(const void* device, size_t bytes) {
  std::vector<uint8_t> host(bytes);
  if (bytes > 0) DSV4_CUDA_CHECK(cudaMemcpy(host.data(), device, bytes, cudaMemcpyDeviceToHost));
  return host;
}

bool same_bytes(const std::vector<uint8_t>& device, const void* host, size_t bytes) {
  return device.size() == bytes && (bytes == 0 || std::memcmp(device.data(), host, bytes) == 0);
}

// The data bytes an upload of `h` holds: the checkpoint's, or for an fp4 expert matrix every 32-bit word in the MoE
// kernels' DEVICE layout (tile::detail::fp4_device_word).
std::vector<uint8_t> uploaded_data(const QuantizedMatrix& h, bool expert) {
  std::vector<uint8_t> bytes(h.data, h.data + h.data_bytes());
  if (!expert || (h.format != WeightFormat::MXFP4 && h.format != WeightFormat::NVFP4)) return bytes;
  for (size_t i = 0; i + 4 <= bytes.size(); i += 4) {
    uint32_t word;
    std::memcpy(&word, bytes.data() + i, 4);
    word = tile::detail::fp4_device_word(word);
    std::memcpy(bytes.data() + i, &word, 4);
  }
  return bytes;
}

// Compares a host model with its device copy, field by field; counts what it compared.
struct Comparer {
  int64_t tensors = 0;

  void matrix(const QuantizedMatrix& h, const DeviceMatrix& d, const std::string& name, bool expert = false) {
    SCOPED_TRACE(name);
    ++tensors;
    const DeviceMatrixView& v = d.view();
    EXPECT_EQ(v.format, h.format);
    EXPECT_EQ(v.scale_type, h.scale_type);
    EXPECT_EQ(v.rows, h.rows);
    EXPECT_EQ(v.cols, h.cols);
    EXPECT_EQ(v.global_scale, h.global_scale);
    EXPECT_EQ(v.stored_bytes, h.stored_bytes());
    EXPECT_EQ(v.data_row_bytes, h.data_row_bytes());
    EXPECT_EQ(v.scales_per_row, h.scales_per_row());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data) % DeviceAllocator::kAlignment, 0u);
    const std::vector<uint8_t> want = uploaded_data(h, expert);
    EXPECT_TRUE(same_bytes(download(v.data, h.data_bytes()), want.data(), want.size())) << "data differs";
    if (h.scale_bytes() > 0) {
      ASSERT_NE(v.scales, nullptr);
      EXPECT_TRUE(same_bytes(download(v.scales, h.scale_bytes()), h.scales, h.scale_bytes())) << "scales differ";
    } else {
      EXPECT_EQ(v.scales, nullptr);
    }
  }

  template <class T>
  void array(const std::vector<T>& h, const DeviceArray<T>& d, const std::string& name) {
    SCOPED_TRACE(name);
    ASSERT_EQ(d.size(), int64_t(h.size()));
    if (h.empty()) return;
    ++tensors;
    EXPECT_TRUE(same_bytes(download(d.data(), h.size() * sizeof(T)), h.data(), h.size() * sizeof(T)))
        << "values differ";
  }

  void hyper_connection(const HyperConnectionWeights& h, const device_weights::HyperConnection& d,
                        const std::string& p) {
    matrix(h.fn, d.fn, p + " fn");
    array(h.base, d.base, p + " base");
    array(h.scale, d.scale, p + " scale");
  }

  void compressor(const CompressorWeights& h, const device_weights::Compressor& d, const std::string& p) {
    matrix(h.wkv, d.wkv, p + " wkv");
    matrix(h.wgate, d.wgate, p + " wgate");
    array(h.ape, d.ape, p + " ape");
    array(h.norm, d.norm, p + " norm");
  }

  void expert(const ExpertWeights& h, const device_weights::Expert& d, const std::string& p) {
    matrix(h.w1, d.w1, p + " w1", true);
    matrix(h.w2, d.w2, p + " w2", true);
    matrix(h.w3, d.w3, p + " w3", true);
  }

  void block(const BlockWeights& h, const device_weights::Block& d, const std::string& p) {
    array(h.attn_norm, d.attn_norm, p + " attn_norm");
    array(h.ffn_norm, d.ffn_norm, p + " ffn_norm");
    hyper_connection(h.hc_attn, d.hc_attn, p + " hc_attn");
    hyper_connection(h.hc_ffn, d.hc_ffn, p + " hc_ffn");
    matrix(h.attn.wq_a, d.attn.wq_a, p + " wq_a");
    array(h.attn.q_norm, d.attn.q_norm, p + " q_norm");
    matrix(h.attn.wq_b, d.attn.wq_b, p + " wq_b");
    matrix(h.attn.wkv, d.attn.wkv, p + " wkv");
    array(h.attn.kv_norm, d.attn.kv_norm, p + " kv_norm");
    matrix(h.attn.wo_a, d.attn.wo_a, p + " wo_a");
    matrix(h.attn.wo_b, d.attn.wo_b, p + " wo_b");
    array(h.attn.sink, d.attn.sink, p + " sink");
    ASSERT_EQ(h.attn.compressor.has_value(), d.attn.compressor.has_value()) << p;
    if (h.attn.compressor) compressor(*h.attn.compressor, *d.attn.compressor, p + " compressor");
    ASSERT_EQ(h.attn.indexer.has_value(), d.attn.indexer.has_value()) << p;
    if (h.attn.indexer) {
      matrix(h.attn.indexer->wq_b, d.attn.indexer->wq_b, p + " indexer wq_b");
      matrix(h.attn.indexer->weights_proj, d.attn.indexer->weights_proj, p + " indexer weights_proj");
      compressor(h.attn.indexer->compressor, d.attn.indexer->compressor, p + " indexer compressor");
    }
    matrix(h.ffn.gate, d.ffn.gate, p + " gate");
    array(h.ffn.gate_bias, d.ffn.gate_bias, p + " gate_bias");
    array(h.ffn.tid2eid, d.ffn.tid2eid, p + " tid2eid");
    ASSERT_EQ(h.ffn.experts.size(), d.ffn.experts.size()) << p;
    for (size_t e = 0; e < h.ffn.experts.size(); ++e)
      expert(h.ffn.experts[e], d.ffn.experts[e], p + " expert " + std::to_string(e));
    expert(h.ffn.shared, d.ffn.shared, p + " shared expert");
  }

  void model(const ModelWeights& h, const DeviceModelWeights& d) {
    matrix(h.embed, d.embed, "embed");
    matrix(h.head, d.head, "head");
    array(h.norm, d.norm, "norm");
    hyper_connection(h.hc_head, d.hc_head, "hc_head");
    ASSERT_EQ(h.layers.size(), d.layers.size());
    for (size_t i = 0; i < h.layers.size(); ++i) block(h.layers[i], d.layers[i], "layer " + std::to_string(i));
    ASSERT_EQ(h.mtp.size(), d.mtp.size());
    for (size_t i = 0; i < h.mtp.size(); ++i) {
      const std::string p = "mtp " + std::to_string(i);
      block(h.mtp[i].block, d.mtp[i].block, p);
      matrix(h.mtp[i].e_proj, d.mtp[i].e_proj, p + " e_proj");
      matrix(h.mtp[i].h_proj, d.mtp[i].h_proj, p + " h_proj");
      array(h.mtp[i].enorm, d.mtp[i].enorm, p + " enorm");
      array(h.mtp[i].hnorm, d.mtp[i].hnorm, p + " hnorm");
      array(h.mtp[i].norm, d.mtp[i].norm, p + " norm");
      hyper_connection(h.mtp[i].hc_head, d.mtp[i].hc_head, p + " hc_head");
    }
  }
};

std::string issue_list(const LoadedCheckpoint& c) {
  std::string s;
  for (const CheckpointIssue& i : c.issues) s += std::string(to_string(i.kind)) + " " + i.tensor + ": " + i.message + "\n";
  return s;
}

void upload_and_compare(CheckpointLayout layout, size_t staging_bytes) {
  SCOPED_TRACE(std::string(to_string(layout)) + ", staging " + std::to_string(staging_bytes) + " bytes");
  TempDir dir("weight-upload");
  write_tiny_checkpoint(dir.path(), layout);
  const LoadedCheckpoint checkpoint = load_checkpoint(dir.path().string());
  ASSERT_TRUE(checkpoint.loadable()) << issue_list(checkpoint);

  const WeightUploadPlan plan = plan_weight_upload(checkpoint.weights);
  int64_t slot_tensors = 0;
  for (const auto& [format, totals] : checkpoint.totals) slot_tensors += totals.tensors;
  EXPECT_EQ(plan.tensors, slot_tensors) << "the plan must visit every slot the loader filled";
  EXPECT_GE(plan.device_bytes, plan.bytes);

  const DeviceContext context(0);
  DeviceAllocator pool(0);
  std::vector<std::pair<size_t, size_t>> reports;
  WeightUploadOptions options;
  options.staging_bytes = staging_bytes;
  options.progress = [&](size_t done, size_t total) { reports.emplace_back(done, total); };
  const DeviceModelWeights device = upload_model_weights(checkpoint.weights, pool, context.copy_stream(), options);

  EXPECT_EQ(device.tensors, plan.tensors);
  EXPECT_EQ(device.bytes, plan.bytes);
  // One slab, reserved for exactly the plan (rounded to the driver's 2 MiB), filled without a second cudaMalloc.
  const DeviceAllocatorStats stats = pool.stats();
  EXPECT_EQ(stats.slabs, 1u);
  EXPECT_EQ(stats.in_use_bytes, plan.device_bytes);
  EXPECT_EQ(stats.reserved_bytes, (plan.device_bytes + (size_t(2) << 20) - 1) / (size_t(2) << 20) * (size_t(2) << 20));

  ASSERT_FALSE(reports.empty());
  for (size_t i = 0; i < reports.size(); ++i) {
    EXPECT_EQ(reports[i].second, plan.bytes);
    if (i > 0) EXPECT_GT(reports[i].first, reports[i - 1].first) << "progress report " << i;
  }
  EXPECT_EQ(reports.back().first, plan.bytes);
  if (staging_bytes < plan.bytes) EXPECT_GE(reports.size(), plan.bytes / staging_bytes);

  Comparer comparer;
  comparer.model(checkpoint.weights, device);
  EXPECT_EQ(comparer.tensors, plan.tensors);
}

TEST(WeightUpload, ReleaseLayoutRoundTripsThroughSmallStagingBuffers) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  upload_and_compare(CheckpointLayout::DeepSeekRelease, 4096);
  upload_and_compare(CheckpointLayout::DeepSeekRelease, 1000);  // pieces never aligned to anything
}

TEST(WeightUpload, Nvfp4LayoutRoundTripsWithTheDefaultStaging) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  upload_and_compare(CheckpointLayout::ModelOptNvfp4, StagedUploader::kDefaultStagingBytes);
  upload_and_compare(CheckpointLayout::ModelOptNvfp4, 64 * 1024);
}

TEST(WeightUpload, RefusesWeightsThatDoNotFit) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  TempDir dir("weight-upload-full");
  write_tiny_checkpoint(dir.path(), CheckpointLayout::DeepSeekRelease);
  const LoadedCheckpoint checkpoint = load_checkpoint(dir.path().string());
  const DeviceContext context(0);
  DeviceAllocator pool(0);
  WeightUploadOptions options;
  options.keep_free_bytes = context.memory().total_bytes;  // nothing can leave that much free
  const WeightUploadPlan plan = plan_weight_upload(checkpoint.weights);
  expect_error([&] { upload_model_weights(checkpoint.weights, pool, context.copy_stream(), options); },
               {"the model's weights need", std::to_string(plan.device_bytes) + " bytes",
                std::to_string(plan.tensors) + " tensors", "kept free", "free of"});
  EXPECT_EQ(pool.stats().reserved_bytes, 0u) << "nothing is allocated before the check";
}

TEST(WeightUpload, MalformedMatrixIsNamedBeforeAnyAllocation) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  ModelWeights weights;
  weights.embed = QuantizedMatrix{.format = WeightFormat::BF16, .rows = 8, .cols = 8};  // no data
  const DeviceContext context(0);
  DeviceAllocator pool(0);
  expect_error([&] { upload_model_weights(weights, pool, context.copy_stream()); }, {"embed", "has no data"});
  EXPECT_EQ(pool.stats().reserved_bytes, 0u);
}

// Pieces of random sizes in a shuffled order (so consecutive staged bytes are not always consecutive on the device)
// into one device buffer, through staging buffers of `staging_bytes`.
void upload_pieces(size_t staging_bytes, uint32_t seed) {
  SCOPED_TRACE("staging " + std::to_string(staging_bytes) + " bytes");
  const DeviceContext context(0);
  std::mt19937 rng(seed);
  std::vector<size_t> sizes;
  for (int i = 0; i < 300; ++i)  // mostly small, a few larger than a small staging buffer, several empty
    sizes.push_back(i % 37 == 0 ? 0 : i % 29 == 0 ? 20000 + rng() % 9000 : 1 + rng() % 3000);
  sizes.push_back(size_t(9) << 20);  // large enough for the multi-threaded host copy when staging allows
  std::vector<size_t> offsets(sizes.size());
  for (size_t i = 1; i < sizes.size(); ++i) offsets[i] = offsets[i - 1] + sizes[i - 1];
  const size_t total = offsets.back() + sizes.back();
  std::vector<uint8_t> host(total);
  for (uint8_t& b : host) b = uint8_t(rng());
  DeviceBuffer device(total, "uploader target");
  device.fill_bytes(0xFF);
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());

  size_t last_done = 0;
  int reports = 0;
  {
    StagedUploader uploader(
        context.copy_stream(), total,
        [&](size_t done, size_t reported_total) {
          EXPECT_EQ(reported_total, total);
          EXPECT_GT(done, last_done);
          last_done = done;
          ++reports;
        },
        staging_bytes);
    std::vector<size_t> order(sizes.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    for (const size_t i : order)
      uploader.copy(device.as<uint8_t>() + offsets[i], host.data() + offsets[i], sizes[i], "piece");
    expect_error([&] { uploader.copy(device.data(), host.data(), 1, "one too many"); }, {"'one too many'", "exceed"});
    uploader.finish();
    EXPECT_EQ(uploader.bytes_done(), total);
  }
  EXPECT_EQ(last_done, total);
  EXPECT_GE(size_t(reports), std::min<size_t>(total / staging_bytes, 100));
  const std::vector<uint8_t> back = download(device.data(), total);
  size_t first_wrong = total;
  for (size_t i = 0; i < total && first_wrong == total; ++i)
    if (back[i] != host[i]) first_wrong = i;
  ASSERT_EQ(first_wrong, total) << "byte " << first_wrong << " is " << int(back[first_wrong]) << ", expected "
                                << int(host[first_wrong]);
}

TEST(StagedUploader, CopiesPiecesOfEverySize) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  upload_pieces(4093, 7);  // odd: pieces straddle buffer ends
  upload_pieces(StagedUploader::kDefaultStagingBytes, 8);
}

TEST(StagedUploader, ChecksTheDeclaredTotal) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const DeviceContext context(0);
  DeviceBuffer device(16, "short target");
  const std::vector<uint8_t> host(16, 1);
  StagedUploader short_of_total(context.copy_stream(), 10);
  short_of_total.copy(device.data(), host.data(), 4, "partial");
  expect_error([&] { short_of_total.finish(); }, {"4 bytes copied of the 10 declared"});
  StagedUploader empty(context.copy_stream(), 0);
  empty.finish();
  EXPECT_EQ(empty.bytes_done(), 0u);
}

std::string read_all(std::FILE* file) {
  std::rewind(file);
  std::string text;
  char chunk[512];
  for (size_t n; (n = std::fread(chunk, 1, sizeof chunk, file)) > 0;) text.append(chunk, n);
  return text;
}

TEST(UploadProgressBar, PrintsAFewLinesToAFile) {
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  {
    UploadProgressBar bar("uploading", file, false, std::chrono::milliseconds(0));
    const size_t total = 3'000'000'000;
    for (int step = 0; step <= 100; ++step) bar.update(total / 100 * size_t(step), total);
    bar.update(total, total);  // after the end: nothing more
  }
  const std::string text = read_all(file);
  std::fclose(file);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 4) << text;  // 25 %, 50 %, 75 %, the end
  EXPECT_EQ(text.find('\r'), std::string::npos) << text;
  EXPECT_NE(text.find("uploading: 3.00 GB in "), std::string::npos) << text;
  EXPECT_NE(text.find("0.75 / 3.00 GB (25%)"), std::string::npos) << text;
}

TEST(UploadProgressBar, RewritesOneLineOnATerminal) {
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  {
    UploadProgressBar bar("weights", file, true, std::chrono::milliseconds(0));
    for (int step = 0; step <= 10; ++step) bar.update(size_t(step) * 100'000'000, 1'000'000'000);
  }
  const std::string text = read_all(file);
  std::fclose(file);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1) << text;
  EXPECT_EQ(std::count(text.begin(), text.end(), '\r'), 11) << text;
  EXPECT_EQ(text.back(), '\n');
  EXPECT_NE(text.find("[##############################] 1.00 / 1.00 GB 100.0%"), std::string::npos) << text;

  // Throttled: updates closer together than the interval print nothing (the end always prints).
  std::FILE* throttled_file = std::tmpfile();
  {
    UploadProgressBar bar("weights", throttled_file, true, std::chrono::hours(1));
    for (int step = 0; step <= 10; ++step) bar.update(size_t(step) * 100'000'000, 1'000'000'000);
  }
  const std::string throttled = read_all(throttled_file);
  std::fclose(throttled_file);
  EXPECT_EQ(std::count(throttled.begin(), throttled.end(), '\r'), 2) << throttled;  // the first update and the end
}

}  // namespace
}  // namespace dsv4::cuda
