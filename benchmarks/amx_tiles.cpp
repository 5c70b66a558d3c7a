// Two measurements of the AMX prefill loop of src/mulfree/kernels/cpu/gemm_amx.cpp (amx_block, run by the panel
// driver in gemm.cpp), in one run:
// 1. Alignment: a 11264 x 2048 linear at 128 tokens with its activation tiles and panel buffer 64-byte
//    aligned vs 16 bytes past a line (what malloc / std::vector give): the experiment behind LineVec in
//    mulfree_cpu.h. Each k step is one 2 x 2 block of tdpbsud (32 tokens x 32 rows x 64 k); per 8-step chunk
//    the panel slice is rewritten as the engine's unpack does (16 KiB), and each panel's 128 x 32 outputs are
//    stored to [T, N].
// 2. Warm-up: the first 8-step block after a stretch of other work (a scalar multiply chain, or AVX-512 FMAs)
//    vs the three blocks right after it: the tile unit runs slower for a while after ~1000+ cycles without
//    tile work, which is what the engine's first block after each chunk's unpack pays.
//
//   g++ -O2 -o /tmp/amx_tiles benchmarks/amx_tiles.cpp -lpthread && /tmp/amx_tiles 2
//
// Prints TSC ticks per k step (best of 5 passes for 1; means for 2), the ratios and a JSON line. Needs a CPU
// with AMX-INT8 and Linux >= 5.16 (the tile state is requested with arch_prctl).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw"), noinline))

constexpr long kN = 11264, kK = 2048, kT = 128, kChunkSteps = 8;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static TileConfig cfg;

// C [2 token tiles][2 row tiles][16][16] += A (32 tokens) x B (32 rows) over k steps [ks0, ks1).
AMX void amx_block(const int8_t *A, const int8_t *B, long ks0, long ks1, int32_t *C) {
  if (ks0 == 0) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  } else {
    _tile_loadd(0, C, 64); _tile_loadd(1, C + 256, 64); _tile_loadd(2, C + 512, 64); _tile_loadd(3, C + 768, 64);
  }
  for (long ks = ks0; ks < ks1; ++ks) {
    _tile_loadd(4, A + ks * 2048, 64);
    _tile_loadd(5, A + ks * 2048 + 1024, 64);
    _tile_loadd(6, B + (ks - ks0) * 2048, 64);
    _tile_loadd(7, B + (ks - ks0) * 2048 + 1024, 64);
    _tile_dpbsud(0, 4, 6); _tile_dpbsud(1, 4, 7); _tile_dpbsud(2, 5, 6); _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, C, 64); _tile_stored(1, C + 256, 64); _tile_stored(2, C + 512, 64); _tile_stored(3, C + 768, 64);
}

// The unpack's memory traffic: 2 bits per weight in, one code byte per weight out.
AMX void unpack(const uint8_t *W, int8_t *B, long bytes_out) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (long i = 0; i < bytes_out / 4; i += 64) {
    const __m512i v = _mm512_loadu_si512(W + i);
    for (int s = 0; s < 4; ++s) _mm512_storeu_si512(B + 4 * i + 64 * s, _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), m3));
  }
}

AMX void finish(const int32_t *C, int32_t *Y, long n0) {
  for (long t = 0; t < kT; ++t) {
    _mm512_storeu_si512(Y + t * kN + n0, _mm512_loadu_si512(C + (t % 64) * 16));
    _mm512_storeu_si512(Y + t * kN + n0 + 16, _mm512_loadu_si512(C + (t % 64) * 16 + 1024));
  }
}

// One thread's share of the panels (every nth), `passes` times; returns (ticks, k steps).
AMX void worker(int tid, int nth, long offset, const int8_t *A, const uint8_t *W, int32_t *Y, int passes,
                std::atomic<uint64_t> *ticks, std::atomic<uint64_t> *steps) {
  syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
  _tile_loadconfig(&cfg);
  std::vector<int8_t> bbuf(32 * 64 * kChunkSteps + 128);
  int8_t *B = (int8_t *)(((uintptr_t)bbuf.data() + 63) & ~(uintptr_t)63) + offset;
  alignas(64) static thread_local int32_t C[4 * 1024];
  uint64_t tk = 0, st = 0;
  for (int r = 0; r < passes; ++r)
    for (long p = tid; p < kN / 32; p += nth) {
      for (long ks0 = 0; ks0 < kK / 64; ks0 += kChunkSteps) {
        unpack(W + (p * kK / 64 + ks0) * 512, B, 32 * 64 * kChunkSteps);
        for (long tb = 0; tb < kT / 32; ++tb) {
          const uint64_t t0 = __rdtsc();
          amx_block(A + tb * 32 * kK, B, ks0, ks0 + kChunkSteps, C + tb * 1024);
          tk += __rdtsc() - t0, st += kChunkSteps;
        }
      }
      finish(C, Y, p * 32);
    }
  _tile_release();
  *ticks += tk, *steps += st;
}

__attribute__((noinline)) void scalar_work(long n) {
  uint64_t x = 1;
  for (long i = 0; i < n; ++i) asm volatile("imul $3, %0, %0" : "+r"(x));
}
AMX void vector_work(float *buf, long n) {
  const __m512 a = _mm512_set1_ps(1.0001f);
  for (long i = 0; i < n; ++i) _mm512_store_ps(buf + i % 64 * 16, _mm512_fmadd_ps(_mm512_load_ps(buf + i % 64 * 16), a, a));
}

// Mean ticks per k step of the first block after `gap` iterations of other work, and of the three after it.
AMX void warm_up(bool vector, long gap, const int8_t *A, const int8_t *B, double *first, double *next) {
  alignas(64) static int32_t C[1024];
  alignas(64) static float buf[1024];
  constexpr int kReps = 2000;
  uint64_t t_first = 0, t_next = 0;
  _tile_loadconfig(&cfg);
  for (int r = 0; r < kReps; ++r) {
    vector ? vector_work(buf, gap) : scalar_work(gap);
    _mm_lfence();
    const uint64_t t0 = __rdtsc();
    amx_block(A, B, 1, 1 + kChunkSteps, C);
    _mm_mfence(), _mm_lfence();
    const uint64_t t1 = __rdtsc();
    for (int b = 0; b < 3; ++b) amx_block(A, B, 1, 1 + kChunkSteps, C);
    _mm_mfence(), _mm_lfence();
    t_first += t1 - t0, t_next += __rdtsc() - t1;
  }
  _tile_release();
  *first = (double)t_first / (kReps * kChunkSteps), *next = (double)t_next / (3 * kReps * kChunkSteps);
}

int main(int argc, char **argv) {
  const int nth = argc > 1 ? atoi(argv[1]) : 2;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  int8_t *abuf = (int8_t *)aligned_alloc(64, kT * kK + 64);
  uint8_t *W = (uint8_t *)aligned_alloc(64, kN * kK / 4);
  int32_t *Y = (int32_t *)aligned_alloc(64, kT * kN * 4);
  memset(abuf, 1, kT * kK + 64), memset(W, 0x55, kN * kK / 4), memset(Y, 0, kT * kN * 4);
  double per_step[2];
  for (int v = 0; v < 2; ++v) {
    const long offset = v == 0 ? 0 : 16;
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      std::atomic<uint64_t> ticks{0}, steps{0};
      std::vector<std::thread> threads;
      for (int t = 0; t < nth; ++t) threads.emplace_back(worker, t, nth, offset, abuf + offset, W, Y, 2, &ticks, &steps);
      for (auto &t : threads) t.join();
      best = std::min(best, (double)ticks / steps);
    }
    per_step[v] = best;
    printf("%-34s %6.0f TSC ticks per k step\n", v == 0 ? "A tiles and panel 64-byte aligned" : "both 16 bytes past a line", best);
  }
  printf("misaligned / aligned: %.2fx\n\n", per_step[1] / per_step[0]);

  std::string json;
  for (bool vector : {false, true})
    for (long gap : {100L, 1000L, 3000L, 10000L}) {
      double first, next;
      warm_up(vector, gap, abuf, (const int8_t *)W, &first, &next);
      printf("after %5ld %-13s first block %4.0f, next blocks %4.0f ticks per k step: %.2fx\n", gap,
             vector ? "AVX-512 FMAs" : "scalar imuls", first, next, first / next);
      char item[128];
      snprintf(item, sizeof item, "%s{\"work\": \"%s\", \"iterations\": %ld, \"first\": %.1f, \"next\": %.1f}",
               json.empty() ? "" : ", ", vector ? "fma" : "imul", gap, first, next);
      json += item;
    }
  printf("{\"benchmark\": \"amx_tiles\", \"threads\": %d, \"aligned_ticks_per_step\": %.1f, "
         "\"misaligned_ticks_per_step\": %.1f, \"warm_up\": [%s]}\n", nth, per_step[0], per_step[1], json.c_str());
}
