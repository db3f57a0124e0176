// A small persistent thread pool for the CPU backend: one parallel_for at a time, the calling thread joins in.
// Sized from DSV4_THREADS when set (a positive integer), else std::thread::hardware_concurrency().
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dsv4 {

class ThreadPool {
 public:
  // thread_count counts the caller too: ThreadPool(1) runs everything on the calling thread.
  explicit ThreadPool(int thread_count);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) once for every i in [begin, end), spread over the pool's threads (dynamic scheduling, so items of
  // uneven cost balance). Returns when all calls have finished. The first exception thrown by fn is rethrown here
  // after the others finish. A parallel_for issued from inside fn runs serially on that thread (no deadlock).
  void parallel_for(int64_t begin, int64_t end, const std::function<void(int64_t)>& fn);

  // The process-wide pool the CPU ops use, created on first use.
  static ThreadPool& global();
  // DSV4_THREADS if it holds a positive integer (an invalid value throws dsv4::Error), else the hardware count.
  static int default_thread_count();

 private:
  void worker_loop();
  void run_items();

  std::vector<std::thread> workers_;
  std::mutex submit_mutex_;  // one parallel_for at a time from outside threads

  std::mutex state_mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  uint64_t generation_ = 0;  // bumped per job; workers wait for a change
  int workers_busy_ = 0;
  bool stopping_ = false;

  // The current job (valid while workers_busy_ > 0 or the caller runs it).
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<int64_t> next_item_{0};
  int64_t end_item_ = 0;
  std::exception_ptr first_error_;
  std::mutex error_mutex_;
};

}  // namespace dsv4
