// The AVX2 ceiling of the ternary GEMMs (docs/packed.md, "The AVX2 bound"): weight x token products per second of
// one core for the leanest vpmaddubsw loop we could write over one real k chunk of a panel (16 KiB of trits,
// 8 k steps x 32 rows) against 128 tokens whose activations stream from L2: per k-quad 2 broadcasts, 8
// vpmaddubsw with the panel as memory operand and 8 vpaddw, int16 sums widened every 4 k steps.
//
//   g++ -O3 -mavx2 -o /tmp/maddubs_peak benchmarks/maddubs_peak.cpp && /tmp/maddubs_peak
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The quad is written in assembly: with intrinsics gcc's output varies with the surroundings (it copies the
// accumulators once per iteration, or spills the operands), and the point is the instructions' own limit.

// One k-quad of 2 tokens (broadcast from u0, u1) against the 4 row vectors of a panel (memory operands at b,
// b + 32, b + 1024, b + 1056): 2 vpbroadcastd, 8 vpmaddubsw, 8 vpaddw.
inline void quad(const uint8_t *u0, const uint8_t *u1, const int8_t *b, __m256i (&c)[2][4]) {
  using V = const __m256i;
  __m256i a0, a1, p0, p1;
  asm("vpbroadcastd %[u0], %[a0]\n\t vpbroadcastd %[u1], %[a1]\n\t"
      "vpmaddubsw %[w0], %[a0], %[p0]\n\t vpmaddubsw %[w0], %[a1], %[p1]\n\t"
      "vpaddw %[p0], %[c00], %[c00]\n\t vpaddw %[p1], %[c10], %[c10]\n\t"
      "vpmaddubsw %[w1], %[a0], %[p0]\n\t vpmaddubsw %[w1], %[a1], %[p1]\n\t"
      "vpaddw %[p0], %[c01], %[c01]\n\t vpaddw %[p1], %[c11], %[c11]\n\t"
      "vpmaddubsw %[w2], %[a0], %[p0]\n\t vpmaddubsw %[w2], %[a1], %[p1]\n\t"
      "vpaddw %[p0], %[c02], %[c02]\n\t vpaddw %[p1], %[c12], %[c12]\n\t"
      "vpmaddubsw %[w3], %[a0], %[p0]\n\t vpmaddubsw %[w3], %[a1], %[p1]\n\t"
      "vpaddw %[p0], %[c03], %[c03]\n\t vpaddw %[p1], %[c13], %[c13]"
      : [c00] "+x"(c[0][0]), [c01] "+x"(c[0][1]), [c02] "+x"(c[0][2]), [c03] "+x"(c[0][3]), [c10] "+x"(c[1][0]),
        [c11] "+x"(c[1][1]), [c12] "+x"(c[1][2]), [c13] "+x"(c[1][3]), [a0] "=&x"(a0), [a1] "=&x"(a1),
        [p0] "=&x"(p0), [p1] "=&x"(p1)
      : [u0] "m"(*(const int32_t *)u0), [u1] "m"(*(const int32_t *)u1), [w0] "m"(*(V *)b), [w1] "m"(*(V *)(b + 32)),
        [w2] "m"(*(V *)(b + 1024)), [w3] "m"(*(V *)(b + 1056)));
}

// One panel chunk B [8 k steps][2 row tiles][16 k-quads][16 rows x 4 trits] against T tokens U [T][ldq] (biased
// to unsigned), as in a GEMM: 2 tokens at a time, int16 sums widened into C every 4 k steps.
__attribute__((noinline)) void panel_chunk(const int8_t *B, const uint8_t *U, int64_t ldq, int T, int32_t *C) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t0 = 0; t0 < T; t0 += 2) {
    const uint8_t *u = U + t0 * ldq;
    for (int kb = 0; kb < 8; kb += 4) {
      __m256i c[2][4];
      for (auto &row : c)
        for (auto &x : row) x = _mm256_setzero_si256();
      for (int ks = kb; ks < kb + 4; ++ks)
        for (int kq = 0; kq < 16; ++kq)
          quad(u + ks * 64 + kq * 4, u + ldq + ks * 64 + kq * 4, B + (ks * 32 + kq) * 64, c);
      for (int t = 0; t < 2; ++t)
        for (int r = 0; r < 4; ++r) {
          int32_t *out = C + (t0 + t) * 32 + 8 * r;
          const __m256i s = _mm256_madd_epi16(c[t][r], ones);
          _mm256_storeu_si256((__m256i *)out,
                              kb == 0 ? s : _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)out), s));
        }
    }
  }
}

}  // namespace

int main() {
  const int T = 128;
  const int64_t ldq = 2048;
  auto *B = (int8_t *)std::aligned_alloc(64, 16384);
  auto *U = (uint8_t *)std::aligned_alloc(64, T * ldq);
  auto *C = (int32_t *)std::aligned_alloc(64, T * 32 * 4);
  for (int i = 0; i < 16384; ++i) B[i] = (int8_t)(std::rand() % 3 - 1);
  for (int64_t i = 0; i < T * ldq; ++i) U[i] = (uint8_t)std::rand();
  const int reps = 20000;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) panel_chunk(B, U + (r % 4) * 512, ldq, T, C);
    std::printf("panel chunk, %d tokens: %.1f G products/s (check %d)\n", T,
                reps * (double)T * 32 * 512 / seconds_since(t0) / 1e9, C[5]);
  }
}
