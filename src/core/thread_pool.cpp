#include "core/thread_pool.hpp"

#include <cstdlib>
#include <string>

#include "core/error.hpp"

namespace dsv4 {

namespace {
// Set while a thread runs items of a job: nested parallel_for calls then run inline.
thread_local bool inside_parallel_region = false;
}  // namespace

ThreadPool::ThreadPool(int thread_count) {
  check(thread_count >= 1, "ThreadPool: thread count must be at least 1, got ", thread_count);
  workers_.reserve(thread_count - 1);
  for (int i = 0; i + 1 < thread_count; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(state_mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::run_items() {
  const bool was_inside = inside_parallel_region;
  inside_parallel_region = true;
  for (int64_t i = next_item_.fetch_add(1); i < end_item_; i = next_item_.fetch_add(1)) {
    try {
      (*job_)(i);
    } catch (...) {
      std::lock_guard lock(error_mutex_);
      if (!first_error_) first_error_ = std::current_exception();
      // Skip the remaining items: the job has failed.
      next_item_.store(end_item_);
    }
  }
  inside_parallel_region = was_inside;
}

void ThreadPool::worker_loop() {
  uint64_t seen_generation = 0;
  for (;;) {
    {
      std::unique_lock lock(state_mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
      if (stopping_) return;
      seen_generation = generation_;
    }
    run_items();
    {
      std::lock_guard lock(state_mutex_);
      if (--workers_busy_ == 0) work_done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t begin, int64_t end, const std::function<void(int64_t)>& fn) {
  if (begin >= end) return;
  if (workers_.empty() || end - begin == 1 || inside_parallel_region) {
    const bool was_inside = inside_parallel_region;
    inside_parallel_region = true;
    try {
      for (int64_t i = begin; i < end; ++i) fn(i);
    } catch (...) {
      inside_parallel_region = was_inside;
      throw;
    }
    inside_parallel_region = was_inside;
    return;
  }
  std::lock_guard submit(submit_mutex_);
  {
    std::lock_guard lock(state_mutex_);
    job_ = &fn;
    next_item_.store(begin);
    end_item_ = end;
    first_error_ = nullptr;
    workers_busy_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  work_ready_.notify_all();
  run_items();
  {
    std::unique_lock lock(state_mutex_);
    work_done_.wait(lock, [&] { return workers_busy_ == 0; });
    job_ = nullptr;
  }
  if (first_error_) std::rethrow_exception(first_error_);
}

int ThreadPool::default_thread_count() {
  if (const char* env = std::getenv("DSV4_THREADS"); env != nullptr && *env != '\0') {
    char* tail = nullptr;
    const long value = std::strtol(env, &tail, 10);
    check(*tail == '\0' && value >= 1 && value <= 4096, "DSV4_THREADS must be a positive integer, got '", env,
          "'");
    return static_cast<int>(value);
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : static_cast<int>(hardware);
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(default_thread_count());
  return pool;
}

}  // namespace dsv4
