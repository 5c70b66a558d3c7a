// Persistent thread pool shared by every kernel family of the `_cpu` extension.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// Persistent thread pool with dynamic chunks: a parallel region is a numbered list of chunks that
// every thread (the caller included) claims with a compare-and-swap, so a worker the OS has not
// scheduled yet simply claims nothing instead of stalling the region (this host kind is shared).
// The caller claims from the front and the workers from the back, so with two threads each keeps
// about the same half of every region: the rows and channels one region writes are mostly read by
// the same core in the next (faster prefill, docs/packed.md). Idle workers spin briefly on a generation
// counter (about 0.5 ms: the engine posts regions back to back), then sleep on a condition variable; a region
// posted with linger = false (the training ops, which alternate with torch's own threads) lets them sleep
// almost at once instead of spinning on a core torch's threads want.
//
// A worker the OS deschedules while it holds a chunk (another process wants its core) stalls the region
// until it runs again, milliseconds later; at dozens of regions per decoded token that made two threads
// slower than one. So the caller times its wait for the others: a wait far longer than its own chunks took and
// over 1 ms is a stall (over a quarter of its own share, at least 0.2 ms, when that share took 0.4 ms or more: a
// prefill's regions are few and long, so a wait just under 1 ms cost each of them a good part of its time), after
// which the caller runs regions alone for 40 ms (longer periods lost the second core for too long when the
// competition is bursty, e.g. a server's own HTTP threads; docs/packed.md). While waiting it yields its core, in
// case the stalled worker is queued on it. For a second after a stall the workers also yield their core between
// chunks every 0.3 ms of running, so the scheduler's turn for the other process comes while they hold no chunk
// instead of in the middle of one (a busy core's 2-thread decode and prefill then beat one thread).
class Pool {
 public:
  explicit Pool(int n) : n_(std::max(1, n)) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
  }
  int size() const { return n_; }

  // The chunk this thread most likely claims after chunk c (for prefetching): c + 1 on the caller, c - 1
  // on a worker.
  static int64_t likely_next(int64_t c) { return c + claim_step(); }

  // Calls fn(c) for every c in [0, nchunks) across the threads; returns when all are done. Callers on several
  // threads (two Python threads, two engines) take turns: a region's state belongs to one caller.
  template <class F>
  void run_chunks(int64_t nchunks, F &&fn, bool linger = true) {
    if (nchunks <= 0) return;
    if (n_ == 1 || nchunks == 1) {
      for (int64_t c = 0; c < nchunks; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> turn(caller_mu_);
    if (Clock::now() < solo_until_) {
      for (int64_t c = 0; c < nchunks; ++c) fn(c);
      return;
    }
    constexpr int64_t kMax = (int64_t(1) << 24) - 1;  // the 24-bit chunk fields of state_
    spins_.store(linger ? kLingerSpins : kBriefSpins, std::memory_order_relaxed);
    for (int64_t base = 0; base < nchunks; base += kMax) run_region(base, std::min(kMax, nchunks - base), fn);
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr int kLingerSpins = 20000, kBriefSpins = 200;  // _mm_pause rounds before a worker sleeps
  static constexpr std::chrono::microseconds kStallFloor{1000}, kSolo{40000};
  static constexpr std::chrono::microseconds kLongShare{400}, kLongFloor{200};  // long regions: a lower floor
  // After a stall: how long workers yield, the running time between their yields, and the gap between two checks
  // that means a worker was off its core meanwhile (its running time starts again).
  static constexpr std::chrono::microseconds kContended{1000000}, kRunBudget{300}, kGap{100};

  // One parallel region: fn(base + c) for c in [0, n), n <= kMax.
  template <class F>
  void run_region(int64_t base, int64_t n, F &fn) {
    fn_ = [](void *ctx, int64_t c) { (*static_cast<F *>(ctx))(c); };
    ctx_ = &fn;
    base_ = base;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t g = ++posted_;
    state_.store(pack(g, 0, (uint64_t)n), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.store(g, std::memory_order_release);
    }
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    const Clock::time_point t0 = Clock::now();
    const int64_t mine = work(g, false);
    if (done_.load(std::memory_order_acquire) == n) return;
    const Clock::time_point t1 = Clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) != n; ++spins) {
      if (spins < 2000)
        _mm_pause();
      else
        std::this_thread::yield();
    }
    const Clock::time_point t2 = Clock::now();
    const Clock::duration own = t1 - t0;
    const Clock::duration floor =
        own < kLongShare ? Clock::duration(kStallFloor) : std::clamp<Clock::duration>(own / 4, kLongFloor, kStallFloor);
    if (t2 - t1 > std::max<Clock::duration>(floor, 8 * own / std::max<int64_t>(1, mine))) {
      solo_until_ = t2 + kSolo;
      contended_until_.store((t2 + kContended).time_since_epoch().count(), std::memory_order_relaxed);
    }
  }

  // state_: region (low 16 bits) << 48 | next chunk from the front << 24 | one past the next from the back.
  static uint64_t pack(uint64_t g, uint64_t front, uint64_t back) { return (g & 0xffff) << 48 | front << 24 | back; }
  static int &claim_step() {
    thread_local int step = 1;
    return step;
  }

  // Claims and runs chunks of region g, from the front or the back, until none is left (or a newer region
  // was posted); returns how many it ran.
  int64_t work(uint64_t g, bool from_back) {
    claim_step() = from_back ? -1 : 1;
    int64_t ran = 0;
    for (;;) {
      if (from_back) yield_if_due();
      uint64_t v = state_.load(std::memory_order_acquire);
      const uint64_t front = v >> 24 & 0xffffff, back = v & 0xffffff;
      if ((v >> 48) != (g & 0xffff) || front >= back) return ran;
      const uint64_t next = from_back ? pack(g, front, back - 1) : pack(g, front + 1, back);
      if (!state_.compare_exchange_weak(v, next, std::memory_order_acq_rel)) continue;
      // The region cannot end (nor fn_/ctx_ change) while this chunk is outstanding.
      fn_(ctx_, base_ + (int64_t)(from_back ? back - 1 : front));
      done_.fetch_add(1, std::memory_order_release);
      ++ran;
    }
  }

  // Called by a worker before each claim: while contended, yields once it has run kRunBudget since it last got its
  // core.
  void yield_if_due() {
    thread_local Clock::time_point since{}, last{};
    const Clock::time_point now = Clock::now();
    if (now.time_since_epoch().count() >= contended_until_.load(std::memory_order_relaxed)) return;
    if (now - last > kGap) since = now;
    last = now;
    if (now - since > kRunBudget) {
      std::this_thread::yield();
      since = last = Clock::now();
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        if (++spins < spins_.load(std::memory_order_relaxed)) {
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
      work(g, true);
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  void (*fn_)(void *, int64_t) = nullptr;
  void *ctx_ = nullptr;
  int64_t base_ = 0;
  uint64_t posted_ = 0;                  // regions posted (caller side only)
  Clock::time_point solo_until_{};       // regions run on the caller alone until then (caller side only)
  std::atomic<int64_t> contended_until_{0};  // workers yield between chunks until then (steady_clock ticks)
  std::atomic<uint64_t> state_{0};       // see pack()
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> spins_{kLingerSpins};  // the last region's linger
  std::mutex mu_;
  std::mutex caller_mu_;  // held by the thread whose regions run now
  std::condition_variable cv_;
};

// The process-wide pool for `threads` threads (<= 0: one per hardware thread), created on first use.
Pool &get_pool(int threads);
