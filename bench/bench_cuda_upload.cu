// Weight upload bandwidth: a synthetic set of MXFP4 expert matrices ([2048, 4096] each, data + e8m0 scales; 4 GiB by
// default) copied to the device
//   - pageable: one synchronous cudaMemcpy per buffer from pageable memory (DeviceMatrix's plain constructor);
//   - staged: StagedUploader, the double-buffered pinned path the weight upload uses, at several staging sizes, from
//     pageable memory and from an mmapped file (the checkpoint case; the file was just written, so it is read from
//     the page cache and this measures page faults + copies, not the disk);
// against the same-run ceiling: cudaMemcpy from one pinned 1 GiB buffer. Each mode runs 3 times; the best counts.
// Staged times exclude pinning the two staging buffers (reported apart as setup): a real checkpoint is 25-40× this
// set, so the one-time cudaHostAlloc does not decide the staging size; the steady transfer rate does.
// Usage: bench_cuda_upload [--json PATH] [--gib N] [--file-dir DIR]
#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "backends/cuda/weight_upload.hpp"
#include "core/error.hpp"
#include "core/quantized_matrix.hpp"

namespace dsv4::cuda {
namespace {

constexpr size_t kMiB = size_t(1) << 20;
constexpr int kRepeats = 3;
constexpr int64_t kRows = 2048, kCols = 4096;  // a V4-Flash expert's w1

struct Result {
  std::string mode;
  size_t staging_mib = 0;
  double best_seconds = 0, mean_seconds = 0;
  double gbps = 0;           // from the best run
  double setup_seconds = 0;  // staged modes: pinning the staging buffers (last run)
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

template <class Body>
Result measure(const std::string& mode, size_t staging_mib, size_t bytes, Body&& body) {
  Result r{mode, staging_mib, 1e30, 0, 0};
  for (int i = 0; i < kRepeats; ++i) {
    const double s = body();
    r.best_seconds = std::min(r.best_seconds, s);
    r.mean_seconds += s / kRepeats;
  }
  r.gbps = double(bytes) / r.best_seconds / 1e9;
  std::printf("  %-28s staging %4zu MiB: best %.3f s, mean %.3f s, %.2f GB/s\n", mode.c_str(), staging_mib,
              r.best_seconds, r.mean_seconds, r.gbps);
  std::fflush(stdout);
  return r;
}

// Host matrices whose data and scales point into `bytes` (laid out back to back).
std::vector<QuantizedMatrix> matrices_over(const uint8_t* bytes, int count, const QuantizedMatrix& shape) {
  std::vector<QuantizedMatrix> out;
  size_t offset = 0;
  for (int i = 0; i < count; ++i) {
    QuantizedMatrix m = shape;
    m.data = bytes + offset;
    offset += m.data_bytes();
    m.scales = bytes + offset;
    offset += m.scale_bytes();
    out.push_back(m);
  }
  return out;
}

// Seconds of the transfer; `setup_seconds` receives the time spent creating the uploader (pinned allocations).
double staged_upload(const std::vector<QuantizedMatrix>& host, size_t total, DeviceAllocator& pool,
                     cudaStream_t stream, size_t staging_bytes, std::vector<DeviceMatrix>& device,
                     double& setup_seconds) {
  device.clear();
  for (const QuantizedMatrix& m : host) device.push_back(DeviceMatrix::allocate(m, "expert", pool));
  const auto setup_start = std::chrono::steady_clock::now();
  StagedUploader uploader(stream, total, {}, staging_bytes);
  setup_seconds = seconds_since(setup_start);
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < host.size(); ++i) {
    uploader.copy(device[i].data_buffer().data(), host[i].data, host[i].data_bytes(), "expert data");
    uploader.copy(device[i].scales_buffer().data(), host[i].scales, host[i].scale_bytes(), "expert scales");
  }
  uploader.finish();
  return seconds_since(start);
}

void check_copy(const QuantizedMatrix& host, const DeviceMatrix& device) {
  std::vector<uint8_t> back(host.data_bytes());
  device.data_buffer().download(back.data(), back.size());
  check(std::memcmp(back.data(), host.data, back.size()) == 0, "bench_cuda_upload: uploaded bytes differ");
}

}  // namespace
}  // namespace dsv4::cuda

int main(int argc, char** argv) {
  using namespace dsv4;
  using namespace dsv4::cuda;
  std::string json_path = "bench_cuda_upload.json", file_dir = std::filesystem::temp_directory_path().string();
  double gib = 4.0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (arg == "--gib" && i + 1 < argc) {
      gib = std::atof(argv[++i]);
    } else if (arg == "--file-dir" && i + 1 < argc) {
      file_dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: bench_cuda_upload [--json PATH] [--gib N] [--file-dir DIR]\n");
      return 2;
    }
  }
  try {
    const DeviceContext context(0);
    std::printf("device: %s\n", context.describe().c_str());

    const OwnedQuantizedMatrix layout = allocate_quantized_matrix(WeightFormat::MXFP4, kRows, kCols, ScaleType::E8M0);
    const size_t per_matrix = layout.matrix.stored_bytes();
    const int count = std::max(1, int(gib * double(size_t(1) << 30) / double(per_matrix)));
    const size_t total = per_matrix * size_t(count);
    std::printf("synthetic set: %d MXFP4 matrices [%lld, %lld], %.2f GB\n", count, (long long)kRows,
                (long long)kCols, double(total) / 1e9);

    std::vector<uint8_t> pageable(total);
    std::mt19937_64 rng(1);
    for (size_t i = 0; i + 8 <= total; i += 8) {
      const uint64_t v = rng();
      std::memcpy(pageable.data() + i, &v, 8);
    }
    const std::vector<QuantizedMatrix> host = matrices_over(pageable.data(), count, layout.matrix);

    DeviceAllocator pool(context.index());
    pool.reserve(total + size_t(count) * 2 * DeviceAllocator::kAlignment, "synthetic weights");
    std::vector<Result> results;
    std::vector<DeviceMatrix> device;

    // Ceiling: one pinned buffer, plain cudaMemcpy.
    {
      const size_t chunk = std::min(total, size_t(1) << 30);
      void* pinned = nullptr;
      DSV4_CUDA_CHECK(cudaHostAlloc(&pinned, chunk, cudaHostAllocDefault));
      std::memcpy(pinned, pageable.data(), chunk);
      DeviceBuffer target(chunk, "memcpy target");
      results.push_back(measure("cudaMemcpy pinned (ceiling)", chunk / kMiB, chunk, [&] {
        const auto start = std::chrono::steady_clock::now();
        DSV4_CUDA_CHECK(cudaMemcpy(target.data(), pinned, chunk, cudaMemcpyHostToDevice));
        return seconds_since(start);
      }));
      DSV4_CUDA_CHECK(cudaFreeHost(pinned));
    }
    const double ceiling = results.front().gbps;

    results.push_back(measure("pageable cudaMemcpy", 0, total, [&] {
      device.clear();
      const auto start = std::chrono::steady_clock::now();
      for (const QuantizedMatrix& m : host) device.emplace_back(m, "expert", pool);
      return seconds_since(start);
    }));
    check_copy(host.back(), device.back());

    for (const size_t staging_mib : {size_t(8), size_t(16), size_t(32), size_t(64), size_t(128)}) {
      double setup = 0;
      results.push_back(measure("staged from pageable", staging_mib, total, [&] {
        return staged_upload(host, total, pool, context.copy_stream(), staging_mib * kMiB, device, setup);
      }));
      results.back().setup_seconds = setup;
      check_copy(host.back(), device.back());
    }

    // The checkpoint case: the same bytes in a file, mapped read-only as the safetensors reader maps shards. Each
    // repeat maps the file afresh so the page faults are paid every time.
    const std::filesystem::path file = std::filesystem::path(file_dir) / "dsv4-bench-upload.bin";
    {
      std::FILE* out = std::fopen(file.c_str(), "wb");
      check(out != nullptr, "bench_cuda_upload: cannot write ", file.string());
      const bool written = std::fwrite(pageable.data(), 1, total, out) == total;
      std::fclose(out);
      check(written, "bench_cuda_upload: short write to ", file.string());
    }
    const int fd = ::open(file.c_str(), O_RDONLY);
    check(fd >= 0, "bench_cuda_upload: cannot open ", file.string());
    double mapped_setup = 0;
    results.push_back(measure("staged from mmapped file", StagedUploader::kDefaultStagingBytes / kMiB, total, [&] {
      void* mapping = ::mmap(nullptr, total, PROT_READ, MAP_PRIVATE, fd, 0);
      check(mapping != MAP_FAILED, "bench_cuda_upload: mmap failed");
      const std::vector<QuantizedMatrix> mapped = matrices_over(static_cast<const uint8_t*>(mapping), count,
                                                                layout.matrix);
      const double s = staged_upload(mapped, total, pool, context.copy_stream(),
                                     StagedUploader::kDefaultStagingBytes, device, mapped_setup);
      check_copy(host.back(), device.back());
      ::munmap(mapping, total);
      return s;
    }));
    results.back().setup_seconds = mapped_setup;
    ::close(fd);
    std::filesystem::remove(file);
    device.clear();

    std::printf("\n| mode | staging | best s | mean s | GB/s | %% of pinned cudaMemcpy | setup s |\n");
    std::printf("|---|---|---|---|---|---|---|\n");
    for (const Result& r : results)
      std::printf("| %s | %zu MiB | %.3f | %.3f | %.2f | %.0f | %.3f |\n", r.mode.c_str(), r.staging_mib,
                  r.best_seconds, r.mean_seconds, r.gbps, 100.0 * r.gbps / ceiling, r.setup_seconds);

    std::FILE* out = std::fopen(json_path.c_str(), "w");
    check(out != nullptr, "bench_cuda_upload: cannot write ", json_path);
    std::fprintf(out, "{\n  \"benchmark\": \"bench_cuda_upload\",\n  \"device\": %s,\n", context.json().c_str());
    std::fprintf(out, "  \"bytes\": %zu,\n  \"matrices\": %d,\n  \"repeats\": %d,\n  \"results\": [\n", total, count,
                 kRepeats);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(out,
                   "    {\"mode\": \"%s\", \"staging_mib\": %zu, \"best_seconds\": %.4f, \"mean_seconds\": %.4f, "
                   "\"gbps\": %.2f, \"percent_of_pinned_memcpy\": %.1f, \"setup_seconds\": %.4f}%s\n",
                   r.mode.c_str(), r.staging_mib, r.best_seconds, r.mean_seconds, r.gbps, 100.0 * r.gbps / ceiling,
                   r.setup_seconds, i + 1 < results.size() ? "," : "");
    }
    std::fprintf(out, "  ]\n}\n");
    std::fclose(out);
    std::printf("wrote %s\n", json_path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_upload: %s\n", e.what());
    return 1;
  }
  return 0;
}
