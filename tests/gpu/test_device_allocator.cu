// DeviceContext (device specs, selection errors, report) and the DeviceAllocator pool: alignment, reuse and merging
// of freed pieces, statistics, slab sizing, the out-of-memory message, allocations outliving the allocator, and many
// threads allocating at once (checked for overlap on the host and by writing and reading back every allocation).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backends/cuda/cuda_check.hpp"
#include "backends/cuda/device.hpp"
#include "backends/cuda/device_allocator.hpp"
#include "backends/cuda/device_context.hpp"
#include "backends/cuda/device_matrix.hpp"
#include "core/quantized_matrix.hpp"
#include "support/device_buffers.hpp"
#include "support/expect_error.hpp"

namespace dsv4::cuda {
namespace {

using dsv4::testing::expect_error;

constexpr size_t kMiB = size_t(1) << 20;

size_t rounded(size_t bytes) { return (bytes + 255) / 256 * 256; }

uintptr_t address(const DeviceAllocation& a) { return reinterpret_cast<uintptr_t>(a.data()); }

TEST(DeviceSpec, ParsesCudaAndCudaN) {
  EXPECT_EQ(parse_device_spec("cuda"), 0);
  EXPECT_EQ(parse_device_spec("cuda:0"), 0);
  EXPECT_EQ(parse_device_spec("cuda:7"), 7);
  for (const char* bad : {"gpu:0", "cuda:", "cuda:-1", "cuda:1x", "cuda:99999999999", "CUDA:0", "cuda0", ""})
    expect_error([&] { parse_device_spec(bad); }, {"expected 'cuda' or 'cuda:N'"});
}

TEST(DeviceContext, OpensTheFirstDeviceAndReportsIt) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const DeviceContext context = DeviceContext::open("cuda:0");
  EXPECT_EQ(context.index(), 0);
  EXPECT_EQ(context.info().sm_major, 9);
  EXPECT_NE(context.compute_stream(), nullptr);
  EXPECT_NE(context.copy_stream(), nullptr);
  EXPECT_NE(context.compute_stream(), context.copy_stream());
  const DeviceMemoryInfo memory = context.memory();
  EXPECT_GT(memory.total_bytes, 0u);
  EXPECT_LE(memory.free_bytes, memory.total_bytes);
  const std::string description = context.describe();
  EXPECT_NE(description.find("cuda:0 " + context.info().name), std::string::npos) << description;
  EXPECT_NE(description.find(" SMs"), std::string::npos) << description;
  const std::string json = context.json();
  EXPECT_NE(json.find("\"multiprocessors\": " + std::to_string(context.info().multiprocessors)), std::string::npos)
      << json;
  EXPECT_NE(json.find("\"memory_total_bytes\": " + std::to_string(memory.total_bytes)), std::string::npos) << json;
  std::printf("%s\n%s\n", description.c_str(), json.c_str());

  // The streams take work and report its completion: each one's fill is there once it has synchronised.
  DeviceBuffer buffer(4096, "stream check");
  std::vector<uint8_t> back(buffer.bytes());
  DSV4_CUDA_CHECK(cudaMemsetAsync(buffer.data(), 0x5A, buffer.bytes(), context.compute_stream()));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(context.compute_stream()));
  buffer.download(back.data(), back.size());
  EXPECT_EQ(back, std::vector<uint8_t>(back.size(), 0x5A)) << "compute stream";
  Stream stream("test");
  DSV4_CUDA_CHECK(cudaMemsetAsync(buffer.data(), 0xA5, buffer.bytes(), stream.get()));
  stream.synchronize();
  buffer.download(back.data(), back.size());
  EXPECT_EQ(back, std::vector<uint8_t>(back.size(), 0xA5)) << "a new stream";
}

TEST(DeviceContext, MissingDeviceNamesWhatExists) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  const int count = int(list_devices().size());
  expect_error([&] { DeviceContext context(count); },
               {"cuda:" + std::to_string(count) + " does not exist", std::to_string(count) + " visible", "cuda:0 "});
  expect_error([&] { DeviceContext::open("cuda:x"); }, {"cuda:x"});
}

TEST(DeviceAllocator, AlignsEveryAllocationAndCountsRoundedBytes) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 4 * kMiB);
  std::mt19937 rng(1);
  std::vector<DeviceAllocation> live;
  size_t expected_in_use = 0;
  for (size_t bytes : {size_t(1), size_t(255), size_t(256), size_t(257), size_t(1000), size_t(4096)}) {
    live.push_back(pool.allocate(bytes, "fixed size"));
    expected_in_use += rounded(bytes);
  }
  for (int i = 0; i < 200; ++i) {
    const size_t bytes = 1 + rng() % 100000;
    live.push_back(pool.allocate(bytes, "random size"));
    expected_in_use += rounded(bytes);
  }
  for (const DeviceAllocation& a : live) {
    ASSERT_TRUE(a);
    EXPECT_EQ(address(a) % DeviceAllocator::kAlignment, 0u) << "allocation of " << a.bytes() << " bytes";
  }
  const DeviceAllocatorStats stats = pool.stats();
  EXPECT_EQ(stats.in_use_bytes, expected_in_use);
  EXPECT_EQ(stats.peak_in_use_bytes, expected_in_use);
  EXPECT_EQ(stats.allocations, live.size());
  EXPECT_EQ(stats.reserved_bytes, stats.slabs * 4 * kMiB);
  EXPECT_GE(stats.reserved_bytes, stats.in_use_bytes);

  EXPECT_FALSE(pool.allocate(0, "empty"));
  EXPECT_EQ(pool.stats().allocations, live.size());

  live.clear();
  const DeviceAllocatorStats after = pool.stats();
  EXPECT_EQ(after.in_use_bytes, 0u);
  EXPECT_EQ(after.allocations, 0u);
  EXPECT_EQ(after.peak_in_use_bytes, expected_in_use);
  EXPECT_EQ(after.reserved_bytes, stats.reserved_bytes);  // kept for reuse until release_unused()
  EXPECT_EQ(pool.release_unused(), stats.reserved_bytes);
  EXPECT_EQ(pool.stats().reserved_bytes, 0u);
  EXPECT_EQ(pool.stats().slabs, 0u);
}

TEST(DeviceAllocator, ReusesFreedMemoryAndMergesNeighbours) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 8 * kMiB);
  DeviceAllocation first = pool.allocate(kMiB, "first");
  const uintptr_t first_address = address(first);
  first.reset();
  DeviceAllocation again = pool.allocate(kMiB, "again");
  EXPECT_EQ(address(again), first_address);
  again.reset();

  // Three neighbours freed out of order merge back into one piece that a request of their sum reuses.
  DeviceAllocation a = pool.allocate(kMiB, "a"), b = pool.allocate(kMiB, "b"), c = pool.allocate(kMiB, "c");
  const uintptr_t start = std::min({address(a), address(b), address(c)});
  b.reset();
  c.reset();
  a.reset();
  DeviceAllocation merged = pool.allocate(8 * kMiB, "merged");
  EXPECT_EQ(address(merged), start);
  EXPECT_EQ(pool.stats().slabs, 1u);
  EXPECT_EQ(pool.stats().reserved_bytes, 8 * kMiB);
  merged.reset();

  // Best fit: of two holes, the smaller one that fits is taken.
  DeviceAllocation big_hole = pool.allocate(3 * kMiB, "big hole"), keep1 = pool.allocate(kMiB, "keep 1"),
                   small_hole = pool.allocate(kMiB, "small hole"), keep2 = pool.allocate(kMiB, "keep 2");
  const uintptr_t small_address = address(small_hole);
  big_hole.reset();
  small_hole.reset();
  DeviceAllocation fitted = pool.allocate(kMiB - 512, "fitted");
  EXPECT_EQ(address(fitted), small_address);
  EXPECT_EQ(pool.stats().slabs, 1u);
}

TEST(DeviceAllocator, SizesSlabsForLargeRequestsAndReserve) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 2 * kMiB);
  EXPECT_EQ(pool.slab_bytes(), 2 * kMiB);
  DeviceAllocation large = pool.allocate(5 * kMiB + 1, "large");
  EXPECT_EQ(pool.stats().slabs, 1u);
  EXPECT_EQ(pool.stats().reserved_bytes, 6 * kMiB);  // the 2 MiB granularity above the request
  large.reset();
  EXPECT_EQ(pool.release_unused(), 6 * kMiB);

  // reserve() makes one slab that a known set of allocations then fills without another cudaMalloc.
  pool.reserve(10 * kMiB + 100 * 256, "planned set");
  EXPECT_EQ(pool.stats().slabs, 1u);
  const size_t reserved = pool.stats().reserved_bytes;
  EXPECT_EQ(reserved, 12 * kMiB);
  std::vector<DeviceAllocation> set;
  for (int i = 0; i < 10; ++i) set.push_back(pool.allocate(kMiB, "planned"));
  for (int i = 0; i < 100; ++i) set.push_back(pool.allocate(1 + size_t(i), "planned small"));
  EXPECT_EQ(pool.stats().slabs, 1u);
  EXPECT_EQ(pool.stats().reserved_bytes, reserved);
  pool.reserve(kMiB, "fits already");  // a free piece this large exists: nothing added
  EXPECT_EQ(pool.stats().slabs, 1u);
}

TEST(DeviceAllocator, OutOfMemoryNamesTheRequestAndTheFreeMemory) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 2 * kMiB);
  DeviceAllocation held = pool.allocate(1000, "held");
  const DeviceContext context(0);
  const size_t total = context.memory().total_bytes;
  const size_t request = 2 * total + 12345;
  expect_error([&] { (void)pool.allocate(request, "oversized test request"); },
               {"out of device memory on cuda:0", "'oversized test request'", std::to_string(rounded(request)),
                "free of", "this pool holds"});
  expect_error([&] { pool.reserve(request, "oversized reserve"); }, {"'oversized reserve'", "free of"});
  // The failure leaves the pool as it was and usable; no CUDA error lingers.
  EXPECT_EQ(pool.stats().allocations, 1u);
  EXPECT_EQ(pool.stats().in_use_bytes, 1024u);
  DeviceAllocation after = pool.allocate(kMiB, "after the failure");
  EXPECT_TRUE(after);
  DSV4_CUDA_CHECK(cudaMemset(after.data(), 0, after.bytes()));
  DSV4_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST(DeviceAllocator, AllocationsOutliveTheAllocator) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocation survivor;
  {
    DeviceAllocator pool(0, 2 * kMiB);
    survivor = pool.allocate(4096, "survivor");
  }
  std::vector<uint8_t> pattern(4096, 0xA7), back(4096, 0);
  DSV4_CUDA_CHECK(cudaMemcpy(survivor.data(), pattern.data(), 4096, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(back.data(), survivor.data(), 4096, cudaMemcpyDeviceToHost));
  EXPECT_EQ(back, pattern);
  survivor.reset();
}

TEST(DeviceAllocator, BacksDeviceBuffersAndMatrices) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 2 * kMiB);
  {
    DeviceBuffer buffer(pool, 1000, "pooled buffer");
    EXPECT_EQ(buffer.bytes(), 1000u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer.data()) % 256, 0u);
    std::vector<uint8_t> values(1000), back(1000);
    for (size_t i = 0; i < values.size(); ++i) values[i] = uint8_t(i * 7);
    buffer.upload(values.data(), values.size());
    DeviceBuffer moved = std::move(buffer);
    moved.download(back.data(), back.size());
    EXPECT_EQ(back, values);
    EXPECT_EQ(pool.stats().allocations, 1u);

    OwnedQuantizedMatrix host = allocate_quantized_matrix(WeightFormat::MXFP4, 33, 70, ScaleType::E8M0);
    for (size_t i = 0; i < host.storage->data.size(); ++i) host.storage->data[i] = uint8_t(i * 13 + 1);
    for (size_t i = 0; i < host.storage->scales.size(); ++i) host.storage->scales[i] = uint8_t(120 + i % 9);
    const DeviceMatrix matrix(host.matrix, "pooled matrix", pool);
    EXPECT_EQ(pool.stats().allocations, 3u);
    std::vector<uint8_t> data(host.storage->data.size()), scales(host.storage->scales.size());
    matrix.data_buffer().download(data.data(), data.size());
    matrix.scales_buffer().download(scales.data(), scales.size());
    EXPECT_EQ(data, host.storage->data);
    EXPECT_EQ(scales, host.storage->scales);
    EXPECT_EQ(matrix.view().data, matrix.data_buffer().data());
    EXPECT_EQ(matrix.view().rows, 33);
    EXPECT_EQ(matrix.view().cols, 70);
  }
  EXPECT_EQ(pool.stats().allocations, 0u);
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
}

TEST(DeviceAllocator, ManyThreadsGetDisjointMemory) {
  if (!has_device()) GTEST_SKIP() << "no CUDA device";
  DeviceAllocator pool(0, 8 * kMiB);
  constexpr int kThreads = 8, kOperations = 3000, kMaxLive = 24;
  std::vector<std::vector<DeviceAllocation>> live(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      DSV4_CUDA_CHECK(cudaSetDevice(0));
      std::mt19937 rng(100 + t);
      std::vector<DeviceAllocation>& mine = live[size_t(t)];
      for (int op = 0; op < kOperations; ++op) {
        if (mine.size() < kMaxLive && (mine.empty() || rng() % 3 != 0)) {
          // Mostly small pieces, sometimes past a slab, so slabs are added while other threads allocate.
          const size_t bytes = rng() % 50 == 0 ? 9 * kMiB + rng() % kMiB : 1 + rng() % (256 * 1024);
          mine.push_back(pool.allocate(bytes, "thread " + std::to_string(t)));
        } else {
          const size_t victim = rng() % mine.size();
          std::swap(mine[victim], mine.back());
          mine.pop_back();
        }
      }
      // Stamp what is still held with this thread's byte; an overlap with another thread shows up on read-back.
      for (const DeviceAllocation& a : mine) DSV4_CUDA_CHECK(cudaMemset(a.data(), 0x10 + t, a.bytes()));
    });
  for (std::thread& thread : threads) thread.join();

  struct Range {
    uintptr_t begin, end;
    int thread;
  };
  std::vector<Range> ranges;
  size_t expected_in_use = 0;
  for (int t = 0; t < kThreads; ++t)
    for (const DeviceAllocation& a : live[size_t(t)]) {
      ranges.push_back({address(a), address(a) + a.bytes(), t});
      expected_in_use += rounded(a.bytes());
      EXPECT_EQ(address(a) % 256, 0u);
    }
  std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) { return x.begin < y.begin; });
  for (size_t i = 1; i < ranges.size(); ++i)
    EXPECT_LE(ranges[i - 1].end, ranges[i].begin) << "allocations of threads " << ranges[i - 1].thread << " and "
                                                  << ranges[i].thread << " overlap";
  const DeviceAllocatorStats stats = pool.stats();
  EXPECT_EQ(stats.allocations, ranges.size());
  EXPECT_EQ(stats.in_use_bytes, expected_in_use);
  EXPECT_GE(stats.peak_in_use_bytes, expected_in_use);

  for (int t = 0; t < kThreads; ++t)
    for (const DeviceAllocation& a : live[size_t(t)]) {
      std::vector<uint8_t> back(a.bytes());
      DSV4_CUDA_CHECK(cudaMemcpy(back.data(), a.data(), a.bytes(), cudaMemcpyDeviceToHost));
      const auto wrong = std::find_if(back.begin(), back.end(), [&](uint8_t v) { return v != 0x10 + t; });
      ASSERT_EQ(wrong, back.end()) << "thread " << t << " allocation of " << a.bytes() << " bytes: byte "
                                   << (wrong - back.begin()) << " is " << int(*wrong);
    }
  live.clear();
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
  EXPECT_EQ(pool.stats().allocations, 0u);
}

}  // namespace
}  // namespace dsv4::cuda
