// Streaming read bandwidth of this machine (GB/s): the roofline of benchmarks/decode.py, which compiles this file
// with the machine's g++ into ~/.cache/mulfree on first use and calls it through ctypes:
//
//   g++ -O2 -shared -fPIC -o bandwidth.so benchmarks/bandwidth.cpp -lpthread
//   double read_bandwidth(int64_t nbytes, int threads, int reps)
//
// Each thread sums its slice of one nbytes buffer; the best of `reps` sweeps counts. Sweeps alternate a plain
// load loop and one that prefetches into L2 4 KiB ahead like the engine's GEMV kernels, so the roofline is the
// faster of the two ways to stream memory.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

template <bool kPrefetch>
__attribute__((target("avx2"))) uint64_t read_slice_avx2(const uint8_t *p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    if (kPrefetch) {
      _mm_prefetch((const char *)(p + i + 4096), _MM_HINT_T1);
      _mm_prefetch((const char *)(p + i + 4096 + 64), _MM_HINT_T1);
    }
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
  }
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t v[4];
  _mm256_store_si256((__m256i *)v, a0);
  return v[0] + v[1] + v[2] + v[3];
}

uint64_t read_slice_scalar(const uint8_t *p, size_t n) {
  uint64_t s = 0;
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    s += v;
  }
  return s;
}

}  // namespace

extern "C" double read_bandwidth(int64_t nbytes, int threads, int reps) {
  const size_t n = (size_t)nbytes / 4096 * 4096;
  const int nt = std::max(1, threads);
  uint8_t *buf = static_cast<uint8_t *>(std::aligned_alloc(4096, std::max<size_t>(n, 4096)));
  if (!buf) return 0.0;
  for (size_t i = 0; i < n; i += 64) buf[i] = (uint8_t)i;  // touch every page
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2");
  // Threads 1 .. nt-1 wait for each sweep's start; the caller sweeps the first slice and times the whole sweep.
  std::atomic<int> started{0}, done{0};
  std::atomic<uint64_t> sink{0};
  auto sweep = [&](int r, int c) {
    const size_t a = n / 4096 * c / nt * 4096, b = n / 4096 * (c + 1) / nt * 4096;
    sink += !avx2 ? read_slice_scalar(buf + a, b - a)
            : r % 2 ? read_slice_avx2<true>(buf + a, b - a)
                    : read_slice_avx2<false>(buf + a, b - a);
  };
  std::vector<std::thread> workers;
  for (int c = 1; c < nt; ++c)
    workers.emplace_back([&, c] {
      for (int r = 0; r < reps; ++r) {
        while (started.load(std::memory_order_acquire) <= r) _mm_pause();
        sweep(r, c);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    });
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    started.store(r + 1, std::memory_order_release);
    sweep(r, 0);
    while (done.load(std::memory_order_acquire) < (r + 1) * (nt - 1)) _mm_pause();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, (double)n / s / 1e9);
  }
  for (auto &w : workers) w.join();
  std::free(buf);
  return best;
}
