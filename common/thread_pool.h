// ThreadPool: a fixed set of worker threads for data-parallel loops in kernels.
//
// ParallelFor splits [0, n) into chunks that the calling thread and the workers take from a
// shared counter; it returns when every chunk is done. Workers spin briefly between loops
// (decode steps issue thousands of short loops) and then sleep. One ParallelFor runs at a
// time per pool: calls from several threads are serialised by a mutex. A pool of size 1 runs
// everything on the caller.
//
//   ThreadPool pool(2);
//   pool.ParallelFor(rows, /*grain=*/4, [&](int64_t begin, int64_t end) { ... });
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moe::common {

class ThreadPool {
 public:
  // num_threads counts the caller: 2 means the caller plus one worker. 0 means hardware
  // concurrency.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) over disjoint ranges covering [0, n), each at most `grain` long
  // (grain <= 0 picks n / (4 * threads)).
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // A process-wide pool sized by SetDefaultThreads (default: hardware concurrency).
  static ThreadPool& Default();
  static void SetDefaultThreads(int num_threads);

 private:
  void WorkerLoop();
  void RunChunks();

  const int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // serialises ParallelFor callers

  // The current loop, published by bumping generation_.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};

  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
};

}  // namespace moe::common
