#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "core/thread_pool.hpp"

namespace dsv4 {
namespace {

TEST(ThreadPool, EveryIndexRunsExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> hits(n + 10);
      pool.parallel_for(5, 5 + n, [&](int64_t i) { hits[i].fetch_add(1); });
      for (int64_t i = 0; i < n + 10; ++i) EXPECT_EQ(hits[i].load(), (i >= 5 && i < 5 + n) ? 1 : 0) << i;
    }
  }
}

TEST(ThreadPool, UsesSeveralThreads) {
  ThreadPool pool(4);
  std::mutex mutex;
  std::set<std::thread::id> seen;
  pool.parallel_for(0, 64, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  EXPECT_GT(seen.size(), 1u);
}

TEST(ThreadPool, NestedCallsRunInline) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  pool.parallel_for(0, 10, [&](int64_t i) { pool.parallel_for(0, 10, [&](int64_t j) { sum += i * 10 + j; }); });
  EXPECT_EQ(sum.load(), 99 * 100 / 2);
}

TEST(ThreadPool, RethrowsTheFirstErrorAndStaysUsable) {
  ThreadPool pool(3);
  EXPECT_THROW(pool.parallel_for(0, 100, [](int64_t i) {
    if (i == 42) throw std::runtime_error("item 42");
  }),
               std::runtime_error);
  std::atomic<int> count{0};
  pool.parallel_for(0, 50, [&](int64_t) { ++count; });
  EXPECT_EQ(count.load(), 50);
}

TEST(ThreadPool, ConcurrentCallersAreSerialised) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 20; ++rep) pool.parallel_for(0, 100, [&](int64_t) { ++total; });
    });
  for (auto& caller : callers) caller.join();
  EXPECT_EQ(total.load(), 4 * 20 * 100);
}

TEST(ThreadPool, ThreadCountFromEnvironment) {
  const char* saved = std::getenv("DSV4_THREADS");
  const std::string saved_value = saved ? saved : "";
  setenv("DSV4_THREADS", "3", 1);
  EXPECT_EQ(ThreadPool::default_thread_count(), 3);
  for (const char* bad : {"0", "-2", "two", "4x"}) {
    setenv("DSV4_THREADS", bad, 1);
    EXPECT_THROW(ThreadPool::default_thread_count(), Error) << bad;
  }
  unsetenv("DSV4_THREADS");
  EXPECT_GE(ThreadPool::default_thread_count(), 1);
  if (saved) setenv("DSV4_THREADS", saved_value.c_str(), 1);
  EXPECT_THROW(ThreadPool(0), Error);
}

}  // namespace
}  // namespace dsv4
