#include "backends/cuda/kernels/l2_prefetch.hpp"

#include <algorithm>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/kernels/l2_prefetch.cuh"
#include "backends/cuda/per_device_cache.hpp"
#include "core/error.hpp"

namespace dsv4::cuda {

namespace {

uint64_t whole_units(uint64_t bytes) { return bytes & ~uint64_t(15); }

// The device's greatest (most urgent) stream priority, queried once per device.
int greatest_priority() {
  static PerDeviceCache<int> cache;
  static const int key = 0;
  return cache.get(&key, [] {
    int least = 0, greatest = 0;
    DSV4_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    return greatest;
  });
}

uint64_t scale_bytes(const DeviceMatrixView& w) {
  if (w.scales == nullptr) return 0;
  // One scale row per 128-row band for FP8_BLOCK128, one per row otherwise; 4-byte entries for F32 scales.
  const int64_t scale_rows = w.format == WeightFormat::FP8_BLOCK128 ? (w.rows + kFp8BlockSize - 1) / kFp8BlockSize
                                                                    : w.rows;
  return uint64_t(scale_rows * w.scales_per_row) * (w.scale_type == ScaleType::F32 ? 4 : 1);
}

}  // namespace

uint64_t add_l2_prefetch_matrix(L2PrefetchParams& p, const DeviceMatrixView& w, uint64_t budget) {
  uint64_t added = 0;
  const std::pair<const uint8_t*, uint64_t> parts[] = {{w.data, uint64_t(w.rows) * w.data_row_bytes},
                                                       {w.scales, scale_bytes(w)}};
  for (const auto& [data, bytes] : parts) {
    const uint64_t take = std::min(bytes, budget - added);
    if (data == nullptr || take == 0) continue;
    check(p.range_count < kL2PrefetchMaxRanges, "l2_prefetch: more than ", kL2PrefetchMaxRanges, " ranges");
    p.ranges[size_t(p.range_count++)] = L2PrefetchRange{data, take};
    added += take;
  }
  return added;
}

uint64_t l2_prefetch_bytes(const L2PrefetchParams& p) {
  uint64_t bytes = 0;
  for (int r = 0; r < std::clamp(p.range_count, 0, kL2PrefetchMaxRanges); ++r)
    bytes += whole_units(p.ranges[size_t(r)].bytes);
  return bytes;
}

void check_l2_prefetch_params(const L2PrefetchParams& p) {
  check(p.range_count >= 0 && p.range_count <= kL2PrefetchMaxRanges, "l2_prefetch: range_count ", p.range_count,
        " outside [0, ", kL2PrefetchMaxRanges, "]");
  for (int r = 0; r < p.range_count; ++r) {
    const L2PrefetchRange& range = p.ranges[size_t(r)];
    check(range.data != nullptr || range.bytes == 0, "l2_prefetch: range ", r, " has ", range.bytes,
          " bytes but no data");
    check(reinterpret_cast<uintptr_t>(range.data) % 16 == 0, "l2_prefetch: range ", r,
          " is not 16-byte aligned (cp.async.bulk.prefetch needs it)");
  }
}

void run_l2_prefetch(const L2PrefetchParams& p) {
  check_l2_prefetch_params(p);
  l2_prefetch::Args args{};
  uint64_t chunks = 0;
  for (int r = 0; r < p.range_count; ++r) {
    const uint64_t bytes = whole_units(p.ranges[size_t(r)].bytes);
    if (bytes == 0) continue;
    args.data[args.range_count] = static_cast<const uint8_t*>(p.ranges[size_t(r)].data);
    args.bytes[args.range_count] = bytes;
    chunks += (bytes + l2_prefetch::kChunkBytes - 1) / l2_prefetch::kChunkBytes;
    args.chunks_end[args.range_count++] = chunks;
  }
  if (chunks == 0) return;
  // At most one CTA per SM: more would only queue more requests on the same copy engines.
  const uint64_t ctas = std::min<uint64_t>((chunks + l2_prefetch::kThreads - 1) / l2_prefetch::kThreads,
                                           uint64_t(device_multiprocessors()));
  cudaLaunchAttribute priority{};
  priority.id = cudaLaunchAttributePriority;
  priority.val.priority = greatest_priority();
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(l2_prefetch::kThreads);
  config.stream = p.stream;
  config.attrs = &priority;
  config.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&config, l2_prefetch::l2_prefetch_kernel, args), "l2_prefetch", __FILE__, __LINE__);
}

}  // namespace dsv4::cuda
