// The process-wide thread pools (one per thread count) behind get_pool().
#include "pool.h"

// One pool per thread count, created on first use and kept for the life of the process
// (never destroyed: joining at interpreter exit could hang).
Pool &get_pool(int threads) {
  static std::mutex mu;
  static std::vector<Pool *> pools(65, nullptr);
  if (threads <= 0) threads = (int)std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, 64);
  std::lock_guard<std::mutex> lk(mu);
  if (!pools[threads]) pools[threads] = new Pool(threads);
  return *pools[threads];
}

