// The 1.6-bit (T1R4, src/mulfree/kernels/cpu/formats/t1.h) GEMV tile against the 2-bit (T2R4) one on AVX2, and the
// other base-3 decodes tried for it, on the same random trits: one row group (4 rows) per call, 1 token, a cold sweep
// over `mats` matrices of 5632 x 2048 (the 1.3b shape's gate/up rows), split over `threads` threads by row groups.
//
//   g++ -O2 -o /tmp/t1_tiles benchmarks/t1_tiles.cpp -lpthread && /tmp/t1_tiles 64 1
//
// Variants (each a copy of the loop, so the file stands alone; "t1" is the one in gemv_t1_avx2.cpp):
//   t2        the T2R4 AVX2 tile (gemv_avx2.cpp): shift / and per bit pair, vpmaddubsw(codes, q)
//   t1        digit j from s_j = m_j ^ 0x80 by two vpcmpgtb (trit = [s < -42] - [s > 42]), s_(j+1) = 3 s_j by two
//             vpaddb, vpmaddubsw(q + 128, trit), minus 128 * the row's trit sum at the end
//   t1-code   the same compares forming codes c = t + 1 against unbiased q (one more op per 32 weights)
//   t1-xored  as t1 on bytes stored already xored with 0x80 (one op less per 32 bytes; not the format)
//   t1-avg    llama.cpp TQ1_0's AVX2 decode: 3m/4 by two vpavgb, the top two bits by a shift and a mask
//   t1-mul    16-bit digits: vpmullw by 3^j, vpmulhuw by 3, vpackuswb (codes come out in pack order: speed only)
// Prints G weights/s, GB/s of packed weights and ms per matrix (best of `reps`), checks every variant but t1-mul
// against a scalar dot product on matrix 0, and ends with a JSON line.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#define AVX2 __attribute__((target("avx2")))

namespace {

constexpr int64_t N = 5632, K = 2048, KP2 = 2048, KP1 = 2080, G = N / 4;
constexpr int64_t B2 = G * KP2, B1 = G * KP1 * 4 / 5;  // bytes per matrix

AVX2 inline __m256i ld(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
AVX2 inline void hsum4(__m256i a0, __m256i a1, __m256i a2, __m256i a3, int32_t *out) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  _mm_storeu_si128((__m128i *)out, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}
inline void prefetch(const uint8_t *p) { _mm_prefetch((const char *)p, _MM_HINT_T1); }

// out[r] = sum_k c * x (T2R4 codes)
AVX2 void t2_group(const uint8_t *W, const int8_t *X, const uint8_t *, int32_t *out) {
  __m256i acc[4] = {};
  const __m256i ones = _mm256_set1_epi16(1), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
  for (int64_t b = 0; b < KP2 / 256; b += 2) {
    for (int l = 0; l < 8; ++l) prefetch(W + (b + 16) * 256 + 64 * l);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m256i s1 = _mm256_setzero_si256(), s4 = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int bb = 0; bb < 2; ++bb) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i lo = ld(W + (b + bb) * 256 + r * 64 + 32 * h), hi = _mm256_srli_epi16(lo, 4);
          const int8_t *x = X + (b + bb) * 256 + 32 * h;
          s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(lo, m3), ld(x)));
          s4 = _mm256_add_epi16(s4, _mm256_maddubs_epi16(_mm256_and_si256(lo, m12), ld(x + 64)));
          s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(hi, m3), ld(x + 128)));
          s4 = _mm256_add_epi16(s4, _mm256_maddubs_epi16(_mm256_and_si256(hi, m12), ld(x + 192)));
        }
      }
      acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(s1, ones),
                                                         _mm256_srai_epi32(_mm256_madd_epi16(s4, ones), 2)));
    }
  }
  hsum4(acc[0], acc[1], acc[2], acc[3], out);
}

// The digit decodes: the 16-bit pair sums of the digit in s (m ^ 0x80) against activations x.
enum Decode { kTrit, kCode, kAvg };
template <Decode D>
AVX2 inline __m256i digit_dot(__m256i s, __m256i x) {
  const __m256i lo = _mm256_set1_epi8(-42), hi = _mm256_set1_epi8(42);
  if (D == kTrit)  // trit [s < -42] - [s > 42] against x + 128
    return _mm256_maddubs_epi16(x, _mm256_sub_epi8(_mm256_cmpgt_epi8(lo, s), _mm256_cmpgt_epi8(s, hi)));
  if (D == kCode)  // code 1 + [s < -42] - [s > 42] (masks are -1) against x
    return _mm256_maddubs_epi16(
        _mm256_sub_epi8(_mm256_add_epi8(_mm256_set1_epi8(1), _mm256_cmpgt_epi8(lo, s)), _mm256_cmpgt_epi8(s, hi)), x);
  // llama.cpp's form works on m itself: the loop's xor is undone first (an extra op it would not pay)
  __m256i q = _mm256_subs_epu8(_mm256_xor_si256(s, _mm256_set1_epi8((char)0x80)), _mm256_set1_epi8(1));
  q = _mm256_avg_epu8(q, _mm256_avg_epu8(q, _mm256_setzero_si256()));
  return _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 6), _mm256_set1_epi8(3)), x);
}

// The T1R4 loop (gemv_t1_avx2.cpp for one token), decode D.
template <bool kXored, Decode D>
AVX2 void t1_loop(const uint8_t *W, const uint8_t *Xa, int32_t *out) {
  __m256i acc[4] = {};
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  for (int64_t b = 0; b < KP1 / 160; ++b) {
    prefetch(W + b * 128 + 4096);
    prefetch(W + b * 128 + 4096 + 64);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m256i s = ld(W + b * 128 + r * 32);
      if (!kXored) s = _mm256_xor_si256(s, flip);
      __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 5
      for (int j = 0; j < 5; ++j) {
        sum = _mm256_add_epi16(sum, digit_dot<D>(s, ld(Xa + b * 160 + 32 * j)));
        if (j < 4) s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
      }
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(sum, ones));
    }
  }
  hsum4(acc[0], acc[1], acc[2], acc[3], out);
}

// t1, t1-xored: out[r] = sum_k t * (x + 128), the caller subtracts 128 * the trit sums; the others sum_k c * x
AVX2 void t1_group(const uint8_t *W, const int8_t *, const uint8_t *XB, int32_t *out) {
  t1_loop<false, kTrit>(W, XB, out);
}
AVX2 void t1_xored_group(const uint8_t *W, const int8_t *, const uint8_t *XB, int32_t *out) {
  t1_loop<true, kTrit>(W, XB, out);
}
AVX2 void t1_code_group(const uint8_t *W, const int8_t *X, const uint8_t *, int32_t *out) {
  t1_loop<false, kCode>(W, (const uint8_t *)X, out);
}
AVX2 void t1_avg_group(const uint8_t *W, const int8_t *X, const uint8_t *, int32_t *out) {
  t1_loop<false, kAvg>(W, (const uint8_t *)X, out);
}
AVX2 void t1_mul_group(const uint8_t *W, const int8_t *X, const uint8_t *, int32_t *out) {
  __m256i acc[4] = {};
  const __m256i ones = _mm256_set1_epi16(1), three = _mm256_set1_epi16(3), hm = _mm256_set1_epi16((short)0xFF00);
  static const short p3[5] = {1, 3, 9, 27, 81};
  for (int64_t b = 0; b < KP1 / 160; ++b) {
    prefetch(W + b * 128 + 4096);
    prefetch(W + b * 128 + 4096 + 64);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256i v = ld(W + b * 128 + r * 32), e = _mm256_slli_epi16(v, 8), o = _mm256_and_si256(v, hm);
      __m256i sum = _mm256_setzero_si256();
#pragma GCC unroll 5
      for (int j = 0; j < 5; ++j) {
        const __m256i pj = _mm256_set1_epi16(p3[j]);
        const __m256i c = _mm256_packus_epi16(_mm256_mulhi_epu16(_mm256_mullo_epi16(e, pj), three),
                                              _mm256_mulhi_epu16(_mm256_mullo_epi16(o, pj), three));
        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(c, ld(X + b * 160 + 32 * j)));
      }
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(sum, ones));
    }
  }
  hsum4(acc[0], acc[1], acc[2], acc[3], out);
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char **argv) {
  const int mats = argc > 1 ? std::atoi(argv[1]) : 64, threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 5;
  std::mt19937 rng(1);
  // the same random trits in both formats (codes c = t + 1; padding k in [K, KP1) is code 1)
  std::vector<uint8_t> W2((size_t)(B2 * mats)), W1((size_t)(B1 * mats)), W1x((size_t)(B1 * mats));
  std::vector<int32_t> tsum((size_t)N, 0);  // trit sums of matrix 0
  std::vector<int8_t> codes((size_t)(N * KP1));
  for (int m = 0; m < mats; ++m) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < KP1; ++k) codes[(size_t)(n * KP1 + k)] = (int8_t)(k < K ? rng() % 3 : 1);
    uint8_t *w2 = W2.data() + m * B2, *w1 = W1.data() + m * B1;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t g = n / 4, r = n % 4;
      for (int64_t k = 0; k < KP2; ++k)  // T2R4: block k / 256, row r's 64 bytes, byte k % 64, bit pair (k % 256) / 64
        w2[g * KP2 + k / 256 * 256 + r * 64 + k % 64] |= (uint8_t)(codes[(size_t)(n * KP1 + k)] << (2 * (k % 256 / 64)));
      for (int64_t b = 0; b < KP1 / 160; ++b)  // T1R4: block b, row r's 32 bytes, byte i holds k = 160 b + i + 32 j
        for (int i = 0; i < 32; ++i) {
          int v = 0;
          for (int j = 0; j < 5; ++j) v = 3 * v + codes[(size_t)(n * KP1 + b * 160 + i + 32 * j)];
          w1[g * (KP1 * 4 / 5) + b * 128 + r * 32 + i] = (uint8_t)((256 * v + 242) / 243);
        }
      if (m == 0)
        for (int64_t k = 0; k < K; ++k) tsum[(size_t)n] += codes[(size_t)(n * KP1 + k)] - 1;
    }
  }
  for (size_t i = 0; i < W1.size(); ++i) W1x[i] = W1[i] ^ 0x80;
  std::vector<int8_t> X((size_t)KP1, 0);
  std::vector<uint8_t> XB((size_t)KP1);
  for (int64_t k = 0; k < K; ++k) X[(size_t)k] = (int8_t)(rng() % 256 - 128);
  int32_t sumx = 0;
  for (int64_t k = 0; k < KP1; ++k) {
    XB[(size_t)k] = (uint8_t)X[(size_t)k] ^ 0x80;
    sumx += X[(size_t)k];
  }
  // reference: sum_k t * x of matrix 0, from the T2R4 bytes
  std::vector<int32_t> ref((size_t)N, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      ref[(size_t)n] += (((W2[(size_t)(n / 4 * KP2 + k / 256 * 256 + n % 4 * 64 + k % 64)] >> (2 * (k % 256 / 64))) & 3) - 1) *
                        X[(size_t)k];

  using Fn = void (*)(const uint8_t *, const int8_t *, const uint8_t *, int32_t *);
  struct Variant {
    std::string name;
    Fn fn;
    const std::vector<uint8_t> *w;
    int64_t bytes;
    int kind;  // 0: sum c*x, 1: sum t*(x + 128), -1: no check
  };
  const std::vector<Variant> variants = {
      {"t2", t2_group, &W2, B2, 0},        {"t1", t1_group, &W1, B1, 1},          {"t1-code", t1_code_group, &W1, B1, 0},
      {"t1-xored", t1_xored_group, &W1x, B1, 1}, {"t1-avg", t1_avg_group, &W1, B1, 0}, {"t1-mul", t1_mul_group, &W1, B1, -1}};
  std::vector<int32_t> out((size_t)N);
  std::string json = "{\"benchmark\": \"t1_tiles\", \"threads\": " + std::to_string(threads) + ", \"gw_s\": {";
  for (const Variant &v : variants) {
    for (int64_t g = 0; g < G; ++g) v.fn(v.w->data() + g * (v.bytes / G), X.data(), XB.data(), out.data() + 4 * g);
    bool ok = true;
    for (int64_t n = 0; n < N && v.kind >= 0; ++n)
      ok &= (v.kind == 0 ? out[(size_t)n] - sumx : out[(size_t)n] - 128 * tsum[(size_t)n]) == ref[(size_t)n];
    double best = 1e30;
    for (int rep = 0; rep < reps; ++rep) {
      const double t0 = now();
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          std::vector<int32_t> o((size_t)N);
          for (int m = 0; m < mats; ++m)
            for (int64_t g = G * t / threads; g < G * (t + 1) / threads; ++g)
              v.fn(v.w->data() + m * v.bytes + g * (v.bytes / G), X.data(), XB.data(), o.data() + 4 * g);
        });
      for (auto &th : pool) th.join();
      best = std::min(best, now() - t0);
    }
    const double gws = (double)N * K * mats / best / 1e9;
    std::printf("%-9s %6.1f G weights/s  %6.2f GB/s  %.3f ms/matrix  %s\n", v.name.c_str(), gws,
                (double)v.bytes * mats / best / 1e9, best / mats * 1e3, v.kind < 0 ? "(speed only)" : ok ? "exact" : "WRONG");
    json += (json.back() == '{' ? "\"" : ", \"") + v.name + "\": " + std::to_string(gws);
  }
  std::printf("%s}}\n", json.c_str());
}
