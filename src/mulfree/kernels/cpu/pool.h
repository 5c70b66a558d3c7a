// Persistent thread pool shared by every kernel family of the `_cpu` extension.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// Persistent thread pool with dynamic chunks: a parallel region is a numbered list of chunks that
// every thread (the caller included) claims with a compare-and-swap, so a worker the OS has not
// scheduled yet simply claims nothing instead of stalling the region (this host kind is shared).
// Idle workers spin briefly on a generation counter, then sleep on a condition variable.
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
  }
  int size() const { return n_; }

  // Calls fn(c) for every c in [0, nchunks) across the threads; returns when all are done.
  template <class F>
  void run_chunks(int64_t nchunks, F &&fn) {
    if (nchunks <= 0) return;
    if (n_ == 1 || nchunks == 1) {
      for (int64_t c = 0; c < nchunks; ++c) fn(c);
      return;
    }
    fn_ = [](void *ctx, int64_t c) { (*static_cast<std::remove_reference_t<F> *>(ctx))(c); };
    ctx_ = &fn;
    nchunks_.store(nchunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t g = (++posted_) & 0xffffffffu;
    state_.store(g << 32, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.store(g, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    work(g);
    while (done_.load(std::memory_order_acquire) != nchunks) _mm_pause();
  }

 private:
  // Claims and runs chunks of region g until none is left (or a newer region was posted).
  void work(uint64_t g) {
    for (;;) {
      uint64_t v = state_.load(std::memory_order_acquire);
      if ((v >> 32) != g || (int64_t)(v & 0xffffffffu) >= nchunks_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // The region cannot end (nor fn_/ctx_ change) while this chunk is outstanding.
      fn_(ctx_, (int64_t)(v & 0xffffffffu));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        if (++spins < 20000) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        sleepers_.fetch_sub(1);
        spins = 0;
      }
      seen = g;
      work(g);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  void (*fn_)(void *, int64_t) = nullptr;
  void *ctx_ = nullptr;
  uint64_t posted_ = 0;                  // regions posted (caller side only)
  std::atomic<uint64_t> state_{0};       // region << 32 | next unclaimed chunk
  std::atomic<int64_t> nchunks_{0};
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

// The process-wide pool for `threads` threads (<= 0: one per hardware thread), created on first use.
Pool &get_pool(int threads);
