// Can a lookup-table ternary GEMM beat the multiply-accumulate one on an AVX-512 VNNI host (docs/packed.md,
// "Lookup tables on AVX-512")? Weight x token products per second of one core for the leanest exact loops we could
// write, each over one panel chunk in L1/L2 against a block of tokens, and checked against a scalar reference:
// - lut: bitnet.cpp TL2 / T-MAC style, 3 weights per index (27 combinations), so a 64-byte table per token and
//   k-triple holds every sum w0 a0 + w1 a1 + w2 a2. The sums need 16 bits to be exact, so each table is two byte
//   tables (low bytes, signed high bytes). Per 32 rows, 2 k-triples and one token: 2 vpermi2b (the two triples'
//   tables side by side, a row's two indices in adjacent bytes), then vpmaddubsw against ones adds each row's
//   two lookups into int16 (low and high bytes apart: 2 vpmaddubsw, 2 vpaddw), widened every 32 steps. The
//   tables are built outside the timed loop (a real kernel builds them per token), so this is an upper bound.
//   The four tables of a token pair and triple pair stay in registers across kBlocks index vectors (128 rows).
// - vnni: the panel GEMM's own inner loop (gemm_avx512.cpp): per k-quad two 16-row panel vectors against the
//   broadcast activation quads of 12 tokens, 24 vpdpbusd. gcc moves some accumulators through the stack here, so
//   this is a lower bound of the tier's loop (its whole 128-token prefill runs faster per core: docs/packed.md).
//
//   g++ -O3 -mavx512f -mavx512bw -mavx512vbmi -mavx512vnni -o /tmp/lut_peak benchmarks/lut_peak.cpp && /tmp/lut_peak
//
// Prints G products/s per core for each (best of 5 passes), their ratio and a JSON line.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kRows = 32;     // vnni: rows of the panel (two 16-row vectors)
constexpr int kBlocks = 4;    // lut: index vectors of 32 rows each (two bytes a row: one per k-triple of a pair)
constexpr int kLutRows = 32 * kBlocks;
constexpr int kK = 1536;      // reduction depth of the chunk (512 k-triples, 256 pairs of them)
constexpr int kPairs = kK / 6;
constexpr int kTokens = 12;   // tokens per block (both loops)
constexpr int kWiden = 32;    // lut: pair steps between widenings (int16 sums stay below 2^15)

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// lut: idx[p][rb][64] holds row 32 rb + r's index for triple 2p in byte 2r and for triple 2p + 1 in byte 2r + 1
// (+ 64, which selects vpermi2b's second table); lo / hi [t][triple][64]: the token's table bytes. C [t][kLutRows]
// = the dots.
__attribute__((noinline)) void lut_block(const uint8_t *idx, const uint8_t *lo, const uint8_t *hi, int32_t *C) {
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
__attribute__((noinline)) void vnni_block(const uint8_t *panel, const int8_t *q, int32_t *C) {
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

template <class F>
double best_rate(F &&run, int rows, int reps) {  // G products per second, best of 5 passes
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) run();
    best = std::max(best, reps * (double)kTokens * rows * kK / seconds_since(t0) / 1e9);
  }
  return best;
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

  auto *idx = (uint8_t *)std::aligned_alloc(64, kPairs * kBlocks * 64);
  auto *lo = (uint8_t *)std::aligned_alloc(64, (size_t)kTokens * 2 * kPairs * 64);
  auto *hi = (uint8_t *)std::aligned_alloc(64, (size_t)kTokens * 2 * kPairs * 64);
  for (int p = 0; p < kPairs; ++p)
    for (int r = 0; r < kLutRows; ++r)
      for (int e = 0; e < 2; ++e) {
        const int8_t *tr = &w[r * kK + 3 * (2 * p + e)];
        const int combo = (tr[0] + 1) + 3 * (tr[1] + 1) + 9 * (tr[2] + 1);
        idx[(p * kBlocks + r / 32) * 64 + 2 * (r % 32) + e] = (uint8_t)(combo + 64 * e);
      }
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < 2 * kPairs; ++j)
      for (int e = 0; e < 64; ++e) {
        const int8_t *x = &a[t * kK + 3 * j];
        const int sum = e < 27 ? (e % 3 - 1) * x[0] + (e / 3 % 3 - 1) * x[1] + (e / 9 - 1) * x[2] : 0;
        lo[((int64_t)t * 2 * kPairs + j) * 64 + e] = (uint8_t)(sum & 0xff);
        hi[((int64_t)t * 2 * kPairs + j) * 64 + e] = (uint8_t)(int8_t)(sum >> 8);
      }

  auto *panel = (uint8_t *)std::aligned_alloc(64, kK / 4 * 128);
  std::vector<int32_t> qsum(kTokens, 0);
  for (int kq = 0; kq < kK / 4; ++kq)
    for (int half = 0; half < 2; ++half)
      for (int n = 0; n < 16; ++n)
        for (int e = 0; e < 4; ++e)
          panel[kq * 128 + half * 64 + 4 * n + e] = (uint8_t)(w[(16 * half + n) * kK + 4 * kq + e] + 1);
  for (int t = 0; t < kTokens; ++t)
    for (int k = 0; k < kK; ++k) qsum[t] += a[t * kK + k];

  lut_block(idx, lo, hi, c_lut.data());
  vnni_block(panel, a.data(), c_vnni.data());
  bool exact = true;
  for (int t = 0; t < kTokens; ++t) {
    for (int r = 0; r < kLutRows; ++r) exact = exact && c_lut[t * kLutRows + r] == ref[t * kLutRows + r];
    for (int r = 0; r < kRows; ++r) exact = exact && c_vnni[t * kRows + r] - qsum[t] == ref[t * kLutRows + r];
  }
  if (!exact) {
    std::printf("mismatch against the scalar reference\n");
    return 1;
  }
  const double lut = best_rate([&] { lut_block(idx, lo, hi, c_lut.data()); }, kLutRows, 1000);
  const double vnni = best_rate([&] { vnni_block(panel, a.data(), c_vnni.data()); }, kRows, 4000);
  std::printf("one core, %d k x %d tokens (lut %d rows, vnni %d), both exact against a scalar reference\n", kK,
              kTokens, kLutRows, kRows);
  std::printf("lut (vpermi2b, 3 weights per index, tables prebuilt): %6.1f G products/s\n", lut);
  std::printf("vnni (vpdpbusd, the panel GEMM's loop):                %6.1f G products/s\n", vnni);
  std::printf("lut / vnni: %.2fx\n", lut / vnni);
  std::printf("{\"bench\": \"lut_peak\", \"lut_gps\": %.1f, \"vnni_gps\": %.1f, \"ratio\": %.3f}\n", lut, vnni,
              lut / vnni);
}
