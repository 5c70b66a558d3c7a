// Can a lookup-table ternary GEMM beat the multiply-accumulate one (docs/packed.md, "The AVX2 bound" and "Lookup
// tables on AVX-512")? Weight x token products per second of one core for the leanest exact loops we could write,
// each over one panel chunk in L1/L2 against a block of tokens and checked against a scalar reference, in pairs:
// a table loop and the multiply-accumulate loop of the same instruction set.
// AVX-512 (VBMI, VNNI), run where the CPU has them:
// - lut512: bitnet.cpp TL2 / T-MAC style, 3 weights per index (27 combinations), so a 64-byte table per token and
//   k-triple holds every sum w0 a0 + w1 a1 + w2 a2. The sums need 16 bits to be exact, so each table is two byte
//   tables (low bytes, signed high bytes). Per 32 rows, 2 k-triples and one token: 2 vpermi2b (the two triples'
//   tables side by side, a row's two indices in adjacent bytes), then vpmaddubsw against ones adds each row's
//   two lookups into int16 (low and high bytes apart: 2 vpmaddubsw, 2 vpaddw), widened every 32 steps.
//   The four tables of a token pair and triple pair stay in registers across kBlocks index vectors (128 rows).
// - vnni: the panel GEMM's own inner loop (gemm_avx512.cpp): per k-quad two 16-row panel vectors against the
//   broadcast activation quads of 12 tokens, 24 vpdpbusd. gcc moves some accumulators through the stack here, so
//   this is a lower bound of the tier's loop (its whole 128-token prefill runs faster per core: docs/packed.md).
// AVX2, run everywhere:
// - lut256: vpshufb looks up 16 bytes per lane, so the 27 sums of a triple fold on their sign (w -> -w negates the
//   sum): 14 magnitudes in a low-byte and a high-byte table (both lanes alike), the row's sign beside its index.
//   Per 32 rows, one triple and one token: 2 vpshufb, 2 vpunpck (low and high bytes into int16), 2 vpsignw, 2 vpaddw;
//   int16 sums widened every 64 triples.
// - maddubs: the AVX2 ceiling (docs/packed.md, "The AVX2 bound"): one real k chunk of a panel (16 KiB of trits,
//   8 k steps x 32 rows) against 128 tokens whose activations stream from L2: per k-quad 2 broadcasts, 8 vpmaddubsw
//   with the panel as memory operand and 8 vpaddw (inline assembly), int16 sums widened every 4 k steps.
// Every table loop builds its tables outside the timed loop (a real kernel builds them per token), so it is an
// upper bound of such a kernel.
//
//   g++ -O3 -o /tmp/lut_peak benchmarks/lut_peak.cpp && /tmp/lut_peak
//
// Prints G products/s per core for each loop (best of 5 passes), the ratios and a JSON line.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni"), noinline))
#define AVX2 __attribute__((target("avx2"), noinline))

namespace {

constexpr int kRows = 32;     // vnni: rows of the panel (two 16-row vectors)
constexpr int kBlocks = 4;    // lut512, lut256: index vectors of 32 rows each
constexpr int kLutRows = 32 * kBlocks;
constexpr int kK = 1536;      // reduction depth of the chunk (512 k-triples, 256 pairs of them)
constexpr int kTriples = kK / 3;
constexpr int kPairs = kK / 6;
constexpr int kTokens = 12;   // tokens per block (lut512, lut256, vnni)
constexpr int kWiden = 32;    // lut512: pair steps between widenings (int16 sums stay below 2^15)
constexpr int kWiden256 = 64; // lut256: triple steps between widenings (|sum| <= 384 a step)
constexpr int kMaddTokens = 128;  // maddubs: tokens against one 16 KiB chunk (512 k x 32 rows)
constexpr int64_t kLdq = 2048;    // maddubs: activation row stride

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// lut512: idx[p][rb][64] holds row 32 rb + r's index for triple 2p in byte 2r and for triple 2p + 1 in byte 2r + 1
// (+ 64, which selects vpermi2b's second table); lo / hi [t][triple][64]: the token's table bytes. C [t][kLutRows]
// = the dots.
AVX512 void lut512_block(const uint8_t *idx, const uint8_t *lo, const uint8_t *hi, int32_t *C) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int t0 = 0; t0 < kTokens; t0 += 2)
    for (int p0 = 0; p0 < kPairs; p0 += kWiden) {
      __m512i sl[2][kBlocks], sh[2][kBlocks];
      for (int t = 0; t < 2; ++t)
        for (int rb = 0; rb < kBlocks; ++rb) sl[t][rb] = sh[t][rb] = _mm512_setzero_si512();
      for (int p = p0; p < p0 + kWiden; ++p) {
        __m512i ix[kBlocks];
        for (int rb = 0; rb < kBlocks; ++rb) ix[rb] = _mm512_load_si512(idx + (p * kBlocks + rb) * 64);
        for (int t = 0; t < 2; ++t) {
          const int64_t at = ((int64_t)(t0 + t) * 2 * kPairs + 2 * p) * 64;
          const __m512i l0 = _mm512_load_si512(lo + at), l1 = _mm512_load_si512(lo + at + 64);
          const __m512i h0 = _mm512_load_si512(hi + at), h1 = _mm512_load_si512(hi + at + 64);
          for (int rb = 0; rb < kBlocks; ++rb) {
            const __m512i vl = _mm512_permutex2var_epi8(l0, ix[rb], l1), vh = _mm512_permutex2var_epi8(h0, ix[rb], h1);
            sl[t][rb] = _mm512_add_epi16(sl[t][rb], _mm512_maddubs_epi16(vl, ones));  // unsigned low bytes
            sh[t][rb] = _mm512_add_epi16(sh[t][rb], _mm512_maddubs_epi16(ones, vh));  // signed high bytes
          }
        }
      }
      for (int t = 0; t < 2; ++t)  // word r of block rb's sums is row 32 rb + r: value = low + 256 high
        for (int rb = 0; rb < kBlocks; ++rb)
          for (int half = 0; half < 2; ++half) {
            const __m512i l = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sl[t][rb], half));
            const __m512i h = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sh[t][rb], half));
            int32_t *c = C + (t0 + t) * kLutRows + 32 * rb + 16 * half;
            const __m512i sum = _mm512_add_epi32(l, _mm512_slli_epi32(h, 8));
            _mm512_storeu_si512(c, p0 == 0 ? sum : _mm512_add_epi32(_mm512_loadu_si512(c), sum));
          }
    }
}

// vnni: panel[kq][2][16 rows x 4 codes] (codes c = trit + 1, unsigned), q [t][kK] int8; C [t][32] = sum c q.
AVX512 void vnni_block(const uint8_t *panel, const int8_t *q, int32_t *C) {
  __m512i acc[kTokens][2];
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
  for (int kq = 0; kq < kK / 4; ++kq) {
    const __m512i p0 = _mm512_load_si512(panel + kq * 128), p1 = _mm512_load_si512(panel + kq * 128 + 64);
#pragma GCC unroll 12
    for (int t = 0; t < kTokens; ++t) {
      const __m512i a = _mm512_set1_epi32(*(const int32_t *)(q + t * kK + 4 * kq));
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], p0, a);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], p1, a);
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < kTokens; ++t) {
    _mm512_storeu_si512(C + t * kRows, acc[t][0]);
    _mm512_storeu_si512(C + t * kRows + 16, acc[t][1]);
  }
}

// lut256: mag[j][rb][32] holds row 32 rb + r's |index| (0..13) for triple j in byte r; sgn[j][rb][2][16] its sign
// (+1, -1, 0) as int16 in the order the unpacks leave the rows (rows 0-7, 16-23, then 8-15, 24-31); lo / hi
// [t][j][32] the token's 14 low / high table bytes in both lanes. C [t][kLutRows] = the dots.
AVX2 void lut256_block(const uint8_t *mag, const int16_t *sgn, const uint8_t *lo, const uint8_t *hi, int32_t *C) {
  for (int t = 0; t < kTokens; ++t)
    for (int j0 = 0; j0 < kTriples; j0 += kWiden256) {
      __m256i acc[kBlocks][2];
      for (auto &a : acc) a[0] = a[1] = _mm256_setzero_si256();
      for (int j = j0; j < j0 + kWiden256; ++j) {
        const int64_t at = ((int64_t)t * kTriples + j) * 32;
        const __m256i tl = _mm256_load_si256((const __m256i *)(lo + at));
        const __m256i th = _mm256_load_si256((const __m256i *)(hi + at));
        for (int rb = 0; rb < kBlocks; ++rb) {
          const __m256i ix = _mm256_load_si256((const __m256i *)(mag + (j * kBlocks + rb) * 32));
          const __m256i vl = _mm256_shuffle_epi8(tl, ix), vh = _mm256_shuffle_epi8(th, ix);
          const int16_t *sg = sgn + (j * kBlocks + rb) * 32;
          const __m256i w0 = _mm256_sign_epi16(_mm256_unpacklo_epi8(vl, vh), _mm256_load_si256((const __m256i *)sg));
          const __m256i w1 =
              _mm256_sign_epi16(_mm256_unpackhi_epi8(vl, vh), _mm256_load_si256((const __m256i *)(sg + 16)));
          acc[rb][0] = _mm256_add_epi16(acc[rb][0], w0);
          acc[rb][1] = _mm256_add_epi16(acc[rb][1], w1);
        }
      }
      for (int rb = 0; rb < kBlocks; ++rb)
        for (int u = 0; u < 2; ++u)  // acc[rb][u]: rows 8u + 0..7 (low lane), 16 + 8u + 0..7 (high lane)
          for (int lane = 0; lane < 2; ++lane) {
            int32_t *c = C + t * kLutRows + 32 * rb + 16 * lane + 8 * u;
            const __m256i w = _mm256_cvtepi16_epi32(lane ? _mm256_extracti128_si256(acc[rb][u], 1)
                                                         : _mm256_castsi256_si128(acc[rb][u]));
            _mm256_storeu_si256((__m256i *)c, j0 == 0 ? w : _mm256_add_epi32(_mm256_loadu_si256((__m256i *)c), w));
          }
    }
}

// maddubs: the quad is written in assembly: with intrinsics gcc's output varies with the surroundings (it copies
// the accumulators once per iteration, or spills the operands), and the point is the instructions' own limit.
// One k-quad of 2 tokens (broadcast from u0, u1) against the 4 row vectors of a panel (memory operands at b,
// b + 32, b + 1024, b + 1056): 2 vpbroadcastd, 8 vpmaddubsw, 8 vpaddw.
__attribute__((target("avx2"))) inline void quad(const uint8_t *u0, const uint8_t *u1, const int8_t *b,
                                                 __m256i (&c)[2][4]) {
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

// maddubs: one panel chunk B [8 k steps][2 row tiles][16 k-quads][16 rows x 4 trits] against kMaddTokens tokens
// U [T][kLdq] (biased to unsigned), as in a GEMM: 2 tokens at a time, int16 sums widened into C [T][32] every 4 k
// steps.
AVX2 void maddubs_chunk(const int8_t *B, const uint8_t *U, int32_t *C) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int t0 = 0; t0 < kMaddTokens; t0 += 2) {
    const uint8_t *u = U + t0 * kLdq;
    for (int kb = 0; kb < 8; kb += 4) {
      __m256i c[2][4];
      for (auto &row : c)
        for (auto &x : row) x = _mm256_setzero_si256();
      for (int ks = kb; ks < kb + 4; ++ks)
        for (int kq = 0; kq < 16; ++kq)
          quad(u + ks * 64 + kq * 4, u + kLdq + ks * 64 + kq * 4, B + (ks * 32 + kq) * 64, c);
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

template <class F>
double best_rate(F &&run, double products, int reps) {  // G products per second, best of 5 passes
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) run();
    best = std::max(best, reps * products / seconds_since(t0) / 1e9);
  }
  return best;
}

template <class T>
T *aligned(size_t n) {
  return (T *)std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
}

// The value of combination `combo` (w0 + 1) + 3 (w1 + 1) + 9 (w2 + 1) of a triple with activations x.
int triple_sum(int combo, const int8_t *x) {
  return (combo % 3 - 1) * x[0] + (combo / 3 % 3 - 1) * x[1] + (combo / 9 - 1) * x[2];
}

}  // namespace

int main() {
  std::srand(1);
  std::vector<int8_t> w(kLutRows * kK), a(kTokens * kK);  // trits [row][k], activations [token][k]
  for (auto &x : w) x = (int8_t)(std::rand() % 3 - 1);
  for (auto &x : a) x = (int8_t)(std::rand() % 256 - 128);
  std::vector<int32_t> ref(kTokens * kLutRows, 0), c_lut(kTokens * kLutRows), c_vnni(kTokens * kRows);
  for (int t = 0; t < kTokens; ++t)
    for (int r = 0; r < kLutRows; ++r)
      for (int k = 0; k < kK; ++k) ref[t * kLutRows + r] += w[r * kK + k] * a[t * kK + k];
  auto combo = [&](int r, int j) {
    const int8_t *tr = &w[r * kK + 3 * j];
    return (tr[0] + 1) + 3 * (tr[1] + 1) + 9 * (tr[2] + 1);
  };
  auto same = [&](const std::vector<int32_t> &c, int rows, const std::vector<int32_t> &bias) {
    for (int t = 0; t < kTokens; ++t)
      for (int r = 0; r < rows; ++r)
        if (c[t * rows + r] - bias[t] != ref[t * kLutRows + r]) return false;
    return true;
  };
  const std::vector<int32_t> none(kTokens, 0);
  const double lut_products = (double)kTokens * kLutRows * kK;
  double lut512 = 0, vnni = 0;

  if (__builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni")) {
    auto *idx = aligned<uint8_t>(kPairs * kBlocks * 64);
    auto *lo = aligned<uint8_t>((size_t)kTokens * 2 * kPairs * 64), *hi = aligned<uint8_t>((size_t)kTokens * 2 * kPairs * 64);
    for (int p = 0; p < kPairs; ++p)
      for (int r = 0; r < kLutRows; ++r)
        for (int e = 0; e < 2; ++e) idx[(p * kBlocks + r / 32) * 64 + 2 * (r % 32) + e] = (uint8_t)(combo(r, 2 * p + e) + 64 * e);
    for (int t = 0; t < kTokens; ++t)
      for (int j = 0; j < 2 * kPairs; ++j)
        for (int e = 0; e < 64; ++e) {
          const int sum = e < 27 ? triple_sum(e, &a[t * kK + 3 * j]) : 0;
          lo[((int64_t)t * 2 * kPairs + j) * 64 + e] = (uint8_t)(sum & 0xff);
          hi[((int64_t)t * 2 * kPairs + j) * 64 + e] = (uint8_t)(int8_t)(sum >> 8);
        }
    auto *panel = aligned<uint8_t>(kK / 4 * 128);
    std::vector<int32_t> qsum(kTokens, 0);
    for (int kq = 0; kq < kK / 4; ++kq)
      for (int half = 0; half < 2; ++half)
        for (int n = 0; n < 16; ++n)
          for (int e = 0; e < 4; ++e)
            panel[kq * 128 + half * 64 + 4 * n + e] = (uint8_t)(w[(16 * half + n) * kK + 4 * kq + e] + 1);
    for (int t = 0; t < kTokens; ++t)
      for (int k = 0; k < kK; ++k) qsum[t] += a[t * kK + k];
    lut512_block(idx, lo, hi, c_lut.data());
    vnni_block(panel, a.data(), c_vnni.data());
    if (!same(c_lut, kLutRows, none) || !same(c_vnni, kRows, qsum)) {
      std::printf("AVX-512 loops: mismatch against the scalar reference\n");
      return 1;
    }
    lut512 = best_rate([&] { lut512_block(idx, lo, hi, c_lut.data()); }, lut_products, 1000);
    vnni = best_rate([&] { vnni_block(panel, a.data(), c_vnni.data()); }, (double)kTokens * kRows * kK, 4000);
  }

  auto *mag = aligned<uint8_t>(kTriples * kBlocks * 32);
  auto *sgn = aligned<int16_t>(kTriples * kBlocks * 32);
  auto *lo2 = aligned<uint8_t>((size_t)kTokens * kTriples * 32), *hi2 = aligned<uint8_t>((size_t)kTokens * kTriples * 32);
  for (int j = 0; j < kTriples; ++j)
    for (int r = 0; r < kLutRows; ++r) {
      const int m = combo(r, j) - 13, i = r % 32;  // -13..13: the sign-folded index
      mag[(j * kBlocks + r / 32) * 32 + i] = (uint8_t)std::abs(m);
      const int slot = (i / 8 % 2) * 16 + (i / 16) * 8 + i % 8;  // rows 0-7, 16-23 | 8-15, 24-31
      sgn[(j * kBlocks + r / 32) * 32 + slot] = (int16_t)((m > 0) - (m < 0));
    }
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < kTriples; ++j)
      for (int e = 0; e < 32; ++e) {
        const int sum = e % 16 < 14 ? triple_sum(13 + e % 16, &a[t * kK + 3 * j]) : 0;
        lo2[((int64_t)t * kTriples + j) * 32 + e] = (uint8_t)(sum & 0xff);
        hi2[((int64_t)t * kTriples + j) * 32 + e] = (uint8_t)(int8_t)(sum >> 8);
      }
  lut256_block(mag, sgn, lo2, hi2, c_lut.data());

  auto *B = aligned<int8_t>(16384);
  auto *U = aligned<uint8_t>((size_t)kMaddTokens * kLdq);
  std::vector<int32_t> c_madd(kMaddTokens * 32), ref_madd(kMaddTokens * 32, 0);
  for (int i = 0; i < 16384; ++i) B[i] = (int8_t)(std::rand() % 3 - 1);
  for (int64_t i = 0; i < kMaddTokens * kLdq; ++i) U[i] = (uint8_t)std::rand();
  for (int t = 0; t < kMaddTokens; ++t)
    for (int n = 0; n < 32; ++n)
      for (int k = 0; k < 512; ++k)
        ref_madd[t * 32 + n] +=
            B[(k / 64 * 32 + n / 16 * 16 + k % 64 / 4) * 64 + n % 16 * 4 + k % 4] * U[t * kLdq + k];
  maddubs_chunk(B, U, c_madd.data());
  if (!same(c_lut, kLutRows, none) || c_madd != ref_madd) {
    std::printf("AVX2 loops: mismatch against the scalar reference\n");
    return 1;
  }
  const double lut256 = best_rate([&] { lut256_block(mag, sgn, lo2, hi2, c_lut.data()); }, lut_products, 1000);
  int shift = 0;
  const double madd = best_rate([&] { maddubs_chunk(B, U + (shift++ % 4) * 512, c_madd.data()); },
                                (double)kMaddTokens * 32 * 512, 20000);

  std::printf("one core, G products/s (best of 5 passes), every loop exact against a scalar reference\n");
  if (vnni > 0) {
    std::printf("AVX-512  lut512 (vpermi2b, 3 weights per index):   %6.1f\n", lut512);
    std::printf("AVX-512  vnni (vpdpbusd, the panel GEMM's loop):    %6.1f   lut / vnni %.2fx\n", vnni, lut512 / vnni);
  }
  std::printf("AVX2     lut256 (vpshufb, sign-folded triples):    %6.1f\n", lut256);
  std::printf("AVX2     maddubs (vpmaddubsw, 128 tokens from L2): %6.1f   lut / maddubs %.2fx\n", madd, lut256 / madd);
  std::printf("{\"bench\": \"lut_peak\", \"lut512_gps\": %.1f, \"vnni_gps\": %.1f, \"lut256_gps\": %.1f, "
              "\"maddubs_gps\": %.1f, \"lut512_vs_vnni\": %.3f, \"lut256_vs_maddubs\": %.3f}\n",
              lut512, vnni, lut256, madd, vnni > 0 ? lut512 / vnni : 0.0, lut256 / madd);
}
