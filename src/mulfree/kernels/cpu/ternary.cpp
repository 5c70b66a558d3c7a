// Kernel family 'ternary': packed 2-bit ternary GEMV/GEMM (format T2R4, see ops/pack.py),
// fused RMSNorm + per-token int8 quantization, the MLGRU / GLU elementwise steps and a whole
// MMfree forward (`Engine`) so that decoding costs one Python call per token.
//
// Every ISA path computes the exact integer dot product sum_k c[n,k] * q[t,k] (c = trit + 1),
// then y = (dot - sum_k q[t,k]) * w_scale * a_scale[t]. Paths: AVX-512 VNNI (vpdpbusd),
// AVX2 (vpmaddubsw + vpmaddwd), scalar (the oracle); the caller names one at run time.
#include "mulfree_cpu.h"
#include "pool.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <climits>
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 256;  // weights per row per block (64 bytes, 4 per byte)
constexpr int kRows = 4;         // rows interleaved per row group
constexpr int kMaxTile = 4;      // tokens per GEMM micro-tile


// ---------------------------------------------------------------------------------------------
// Micro-kernels: one row group (4 rows x Kpad weights) against NT tokens of int8 activations.
// out[t * 4 + r] = sum_k c[r, k] * q[t, k]  (codes c = trit + 1 in {0, 1, 2}).
// A tile call covers `ngroups` consecutive row groups (one call per span, so the per-call cost and the
// switch between ISA-specific and generic code are paid once per span, not once per row group):
// out[t * ldo + g * 4 + r] = dot of row r of group g with token t.
using TileFn = void (*)(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx, int32_t *out,
                        int64_t ldo);

template <int NT>
void group_scalar(const uint8_t *W, int64_t Kpad, const int8_t *X, int64_t ldx, int32_t *out, int64_t ldo) {
  int32_t acc[kRows][NT] = {};
  for (int64_t b = 0; b < Kpad / kBlock; ++b) {
    for (int r = 0; r < kRows; ++r) {
      const uint8_t *w = W + b * kBlock + r * 64;
      for (int j = 0; j < 64; ++j) {
        const int byte = w[j];
        for (int s = 0; s < 4; ++s) {
          const int c = (byte >> (2 * s)) & 3;
          const int64_t k = b * kBlock + s * 64 + j;
          for (int t = 0; t < NT; ++t) acc[r][t] += c * X[t * ldx + k];
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ldo + r] = acc[r][t];
}

// Software prefetch into L2 of the 256-byte block `kPrefetchBlocks` ahead (4 KiB; prefetches never fault,
// so running past the matrix end is harmless); the L1 streamer takes it from there. On a Sapphire Rapids
// host, idle, cold 5632x2048 sweeps (benchmarks/gemv_prefetch.cpp) gave, in GB/s at 2 threads: none 16.7,
// L1 (T0) 2 KiB ahead 17.8, L2 (T1) 4 KiB ahead 23.6 -- above the plain read loop's 19.2 in the same run.
constexpr int64_t kPrefetchBlocks = 16;

__attribute__((always_inline)) inline void prefetch_line_l2(const uint8_t *p) {
  _mm_prefetch((const char *)p, _MM_HINT_T1);
}
__attribute__((always_inline)) inline void prefetch_block(const uint8_t *p) {
  for (int l = 0; l < 4; ++l) prefetch_line_l2(p + 64 * l);
}

__attribute__((target("avx2"), always_inline)) inline __m256i ld256(const void *p) {
  return _mm256_loadu_si256((const __m256i *)p);
}

// Sums the 8 int32 lanes of each of a0..a3 into out[0..3]: [r0, r1, r2, r3] in one 128-bit lane.
__attribute__((target("avx2,fma"), always_inline)) inline void store_row_sums_avx2(__m256i a0, __m256i a1, __m256i a2,
                                                                                  __m256i a3, int32_t *out) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  _mm_storeu_si128((__m128i *)out, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// Adds one row block (64 bytes at w, activations at xb) to the int16 sums s1 (codes c) and s4 (4c) of group_avx2.
template <int NT>
__attribute__((target("avx2,fma"), always_inline)) inline void add_block_avx2(const uint8_t *w, const int8_t *xb,
                                                                              int64_t ldx, __m256i *s1, __m256i *s4) {
  const __m256i m3 = _mm256_set1_epi8(0x03), m12 = _mm256_set1_epi8(0x0c);
  #pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {  // the two 32-byte halves of the row block
    const __m256i lo = _mm256_loadu_si256((const __m256i *)(w + 32 * h));
    const __m256i hi = _mm256_srli_epi16(lo, 4);
    const __m256i c0 = _mm256_and_si256(lo, m3), c1 = _mm256_and_si256(lo, m12);
    const __m256i c2 = _mm256_and_si256(hi, m3), c3 = _mm256_and_si256(hi, m12);
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const int8_t *x = xb + t * ldx + 32 * h;
      s1[t] = _mm256_add_epi16(s1[t], _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)x)));
      s4[t] = _mm256_add_epi16(s4[t], _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(x + 64))));
      s1[t] = _mm256_add_epi16(s1[t], _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(x + 128))));
      s4[t] = _mm256_add_epi16(s4[t], _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(x + 192))));
    }
  }
}

template <int NT>
__attribute__((target("avx2,fma"), always_inline)) inline void group_avx2(const uint8_t *W, int64_t Kpad,
                                                                          const int8_t *X, int64_t ldx, int32_t *out,
                                                                          int64_t ldo) {
  __m256i acc[kRows][NT];
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_si256();
  // Bit pairs 0 and 2 are masked in place (c <= 3) and pairs 1 and 3 as 4c (<= 12) from v and v >> 4: one
  // shift per 32 bytes instead of three. The 4c products go to their own int16 sums (|4c*q + 4c*q| <= 3072,
  // 4 per block, 2 blocks summed <= 24576; the c sums <= 6144); the 4c sums are widened, then divided by 4
  // (exact). Widening once per two blocks saves 2.5 of 31 vector ops per 64 weight bytes (ALU-bound here).
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = Kpad / kBlock;
  for (int64_t b = 0; b < nb; b += 2) {
    const bool pair = b + 1 < nb;
    prefetch_block(W + (b + kPrefetchBlocks) * kBlock);
    prefetch_block(W + (b + 1 + kPrefetchBlocks) * kBlock);
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      __m256i s1[NT], s4[NT];
      #pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) s1[t] = s4[t] = _mm256_setzero_si256();
      add_block_avx2<NT>(W + b * kBlock + r * 64, X + b * kBlock, ldx, s1, s4);
      if (pair) add_block_avx2<NT>(W + (b + 1) * kBlock + r * 64, X + (b + 1) * kBlock, ldx, s1, s4);
      #pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_add_epi32(_mm256_madd_epi16(s1[t], ones),
                                                                 _mm256_srai_epi32(_mm256_madd_epi16(s4[t], ones), 2)));
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) store_row_sums_avx2(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out + t * ldo);
}

#if MF_HAVE_AVXVNNI
// AVX-VNNI (256-bit vpdpbusd). Decode: as the AVX-512 decode below, bit pairs masked in place, but with
// 16 ymm registers one accumulator per row for pairs 0/2 (c) and one for 1/3 (4c), pairs 2/3 from v >> 4;
// the 4c sums are divided by 4 at the end (exact). More tokens: each bit pair shifted down, one
// accumulator per row and token.
template <int NT>
__attribute__((target("avx2,fma,avxvnni"), always_inline)) inline void group_avxvnni(const uint8_t *W, int64_t Kpad,
                                                                                    const int8_t *X, int64_t ldx,
                                                                                    int32_t *out, int64_t ldo) {
  const __m256i m3 = _mm256_set1_epi8(0x03), m12 = _mm256_set1_epi8(0x0c);
  if constexpr (NT == 1) {
    __m256i a1[kRows], a4[kRows];
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) a1[r] = a4[r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < Kpad / kBlock; ++b) {
      const int64_t k = b * kBlock;
      prefetch_block(W + (b + kPrefetchBlocks) * kBlock);
      #pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i lo = _mm256_loadu_si256((const __m256i *)(W + k + r * 64 + 32 * h));
          const __m256i hi = _mm256_srli_epi16(lo, 4);
          a1[r] = _mm256_dpbusd_avx_epi32(a1[r], _mm256_and_si256(lo, m3), ld256(X + k + 32 * h));
          a4[r] = _mm256_dpbusd_avx_epi32(a4[r], _mm256_and_si256(lo, m12), ld256(X + k + 64 + 32 * h));
          a1[r] = _mm256_dpbusd_avx_epi32(a1[r], _mm256_and_si256(hi, m3), ld256(X + k + 128 + 32 * h));
          a4[r] = _mm256_dpbusd_avx_epi32(a4[r], _mm256_and_si256(hi, m12), ld256(X + k + 192 + 32 * h));
        }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) a1[r] = _mm256_add_epi32(a1[r], _mm256_srai_epi32(a4[r], 2));
    store_row_sums_avx2(a1[0], a1[1], a1[2], a1[3], out);
  } else {
    __m256i acc[kRows][NT];
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
      #pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < Kpad / kBlock; ++b) {
      const int64_t k = b * kBlock;
      #pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256((const __m256i *)(W + k + r * 64 + 32 * h));
          #pragma GCC unroll 4
          for (int s = 0; s < 4; ++s) {
            const __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), m3);
            #pragma GCC unroll 4
            for (int t = 0; t < NT; ++t)
              acc[r][t] = _mm256_dpbusd_avx_epi32(acc[r][t], c, ld256(X + t * ldx + k + 64 * s + 32 * h));
          }
        }
    }
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) store_row_sums_avx2(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out + t * ldo);
  }
}
#endif  // MF_HAVE_AVXVNNI

#define MF_AVX512 "avx512f,avx512bw,avx512vl,avx512vnni"

// Sums the 16 int32 lanes of each of acc0..acc3 into out[0..3] (transpose-and-add instead of 4 reductions).
__attribute__((target(MF_AVX512), always_inline)) inline void store_row_sums(__m512i a0, __m512i a1, __m512i a2,
                                                                             __m512i a3, int32_t *out) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  _mm_storeu_si128((__m128i *)out, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// Decode (one token): the bit pair s of every byte is masked in place (c << 2s, at most 192 as u8)
// instead of shifted down, and each s has its own accumulator, divided by 4^s (exact) at the end. That
// takes the three shifts per 64 bytes off port 0, which vpdpbusd also needs; 16 independent
// accumulators also hide the vpdpbusd latency.
__attribute__((target(MF_AVX512), always_inline)) inline void group_avx512_decode(const uint8_t *W, int64_t Kpad,
                                                                                  const int8_t *X, int32_t *out) {
  __m512i acc[kRows][4];
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    #pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8((char)0xc0);
  for (int64_t b = 0; b < Kpad / kBlock; ++b) {
    const int8_t *xb = X + b * kBlock;
    // Hold the 256 activations in registers across the 4 rows (the empty asm keeps gcc from folding
    // them back into memory operands, which makes the loop load-port bound).
    __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
    __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
    asm("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3));
    prefetch_block(W + (b + kPrefetchBlocks) * kBlock);
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      __m512i v = _mm512_loadu_si512(W + b * kBlock + r * 64);
      asm("" : "+v"(v));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(v, m0), x0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(v, m1), x1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(v, m2), x2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(v, m3), x3);
    }
  }
  __m512i a[kRows];
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    a[r] = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
                            _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
  store_row_sums(a[0], a[1], a[2], a[3], out);
}

template <int NT>
__attribute__((target(MF_AVX512), always_inline)) inline void group_avx512(const uint8_t *W, int64_t Kpad,
                                                                           const int8_t *X, int64_t ldx, int32_t *out,
                                                                           int64_t ldo) {
  if constexpr (NT == 1) {
    group_avx512_decode(W, Kpad, X, out);
    return;
  }
  __m512i acc[kRows][NT];
  #pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_si512();
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t b = 0; b < Kpad / kBlock; ++b) {
    const int8_t *xb = X + b * kBlock;
    #pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      __m512i v = _mm512_loadu_si512(W + b * kBlock + r * 64);
      asm("" : "+v"(v));
      #pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), m3);
        #pragma GCC unroll 4
        for (int t = 0; t < NT; ++t)
          acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c, _mm512_loadu_si512(xb + t * ldx + s * 64));
      }
    }
  }
  #pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) store_row_sums(acc[0][t], acc[1][t], acc[2][t], acc[3][t], out + t * ldo);
}

// The exported tiles: the group kernels above over `ngroups` row groups.
template <int NT>
void tile_scalar(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx, int32_t *out,
                 int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_scalar<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}
template <int NT>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X,
                                                     int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avx2<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}
#if MF_HAVE_AVXVNNI
template <int NT>
__attribute__((target("avx2,fma,avxvnni"))) void tile_avxvnni(const uint8_t *W, int64_t Kpad, int64_t ngroups,
                                                                const int8_t *X, int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avxvnni<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}
#endif
template <int NT>
__attribute__((target(MF_AVX512))) void tile_avx512(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X,
                                                    int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avx512<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}

const TileFn kTiles[4][kMaxTile + 1] = {  // indexed by Isa
    {nullptr, tile_scalar<1>, tile_scalar<2>, tile_scalar<3>, tile_scalar<4>},
    {nullptr, tile_avx2<1>, tile_avx2<2>, nullptr, nullptr},  // 256-bit tiles stop at 2 tokens (linear_rows)
#if MF_HAVE_AVXVNNI
    {nullptr, tile_avxvnni<1>, tile_avxvnni<2>, nullptr, nullptr},
#else
    {},  // a build without AVX-VNNI intrinsics reports no AVX-VNNI, so Isa::AvxVnni never reaches a table
#endif
    {nullptr, tile_avx512<1>, tile_avx512<2>, tile_avx512<3>, tile_avx512<4>},
};

// ---------------------------------------------------------------------------------------------
// A BitLinear application on quantized activations: Y[t, n] = (dot - sumq[t]) * a_scale[t] * w_scale.
struct LinearJob {
  const uint8_t *W;  // packed [ceil(N/4), Kpad]
  int64_t N, Kpad;
  float w_scale;
  const int8_t *Q;  // [T, Kpad]
  const int32_t *sumq;
  const float *a_scale;
  int64_t T;
  float *Y;      // [T, ldy] float output, or
  int32_t *Yi;   // [T, ldy] exact integer output sum_k trit * q
  int64_t ldy;
  // glu = I > 0 (panel GEMMs only, I % kPanelRows == 0): rows [0, I) are gates, [I, 2I) ups, and the output
  // is Y[t, n] = silu(gate_n) * up_n for n < I, as glu_row would compute it from the [T, 2I] result.
  int64_t glu = 0;
  int64_t groups() const { return (N + kRows - 1) / kRows; }
  int64_t out_groups() const { return glu ? glu / kRows : groups(); }  // row groups that own outputs
};

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Work items of the GEMV regions: 16 row groups (64 rows), small enough to balance two threads, big
// enough that claiming one (an atomic CAS) is noise.
constexpr int64_t kChunk = 16;

// The first kPrefetchBlocks blocks of rows g0.. of j into L2. The kernels prefetch that far ahead along
// the rows, so at a work item's end they prefetch the next item's head, which another thread may own, and
// the head of the next item this thread claims (or of the next job in the same item) would be read cold.
// Items are claimed dynamically; Pool::likely_next names the likely next one.
void prefetch_head(const LinearJob &j, int64_t g0) {
  for (int64_t b = 0; b < kPrefetchBlocks; ++b) prefetch_block(j.W + g0 * j.Kpad + b * kBlock);
}

// The work items of one parallel region over several linears: (job, first row group), every `step`
// row groups of every job.
std::vector<std::pair<int, int64_t>> row_group_chunks(const LinearJob *jobs, int njobs, int64_t step) {
  std::vector<std::pair<int, int64_t>> chunks;
  for (int i = 0; i < njobs; ++i)
    for (int64_t g = 0; g < jobs[i].out_groups(); g += step) chunks.emplace_back(i, g);
  return chunks;
}

void linear_rows(Isa isa, const LinearJob &j, int64_t g0, int64_t g1) {
  // Outputs of up to 16 row groups are staged, then each token's 64 values are written at once:
  // whole cache lines instead of 16-byte pieces of a line that [T, N] outputs evict in between.
  constexpr int64_t kSpan = 16;
  thread_local LineVec<int32_t> stage;
  // AVX2 has 16 ymm registers: 4 rows x 2 tokens of accumulators is the most that stays in them.
  const int64_t max_tile = avx2_class(isa) ? 2 : kMaxTile;
  const int64_t T = j.T;
  for (int64_t gs = g0; gs < g1; gs += kSpan) {
    const int64_t ge = std::min(g1, gs + kSpan), width = (ge - gs) * kRows;
    stage.resize((size_t)(T * width));
    int32_t *st = stage.data();
    for (int64_t t0 = 0; t0 < T; t0 += max_tile) {
      const int nt = (int)std::min<int64_t>(max_tile, T - t0);
      kTiles[(int)isa][nt](j.W + gs * j.Kpad, j.Kpad, ge - gs, j.Q + t0 * j.Kpad, j.Kpad, st + t0 * width, width);
    }
    const int64_t n0 = gs * kRows, n1 = std::min(j.N, ge * kRows);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t sq = j.sumq[t];
      const int32_t *src = st + t * width - n0;
      if (j.Yi) {
        int32_t *yi = j.Yi + t * j.ldy;
        for (int64_t n = n0; n < n1; ++n) yi[n] = src[n] - sq;
      } else {  // (s_x * s_w) in fp32, then one product: the torch BitLinear's own order
        const float s = j.a_scale[t] * j.w_scale;
        float *y = j.Y + t * j.ldy;
        for (int64_t n = n0; n < n1; ++n) y[n] = (float)(src[n] - sq) * s;
      }
    }
  }
}

// Off when the CPU / OS / compiler lacks AMX or MULFREE_AMX=0; set_amx() switches it (tests, benchmarks).
std::atomic<bool> &amx_switch() {
  static std::atomic<bool> on{cpu_features().amx_int8 && !(std::getenv("MULFREE_AMX") &&
                                                            std::string(std::getenv("MULFREE_AMX")) == "0")};
  return on;
}

// ---------------------------------------------------------------------------------------------
// Panel GEMM for prefill (uses_panels: enough tokens on a SIMD backend): the weights of 32 output rows
// are unpacked once per k chunk into a panel of codes c = trit + 1 in the VNNI layout (16 k-quads x
// [16 rows x 4 bytes] per 64 k and 16 rows), which then serves every token of the batch, either as AMX
// B tiles or as vpdpbusd / vpmaddubsw operands (the 256-bit blocks further down):
// - AMX-INT8 (Sapphire Rapids and later): tdpbsud multiplies a signed A tile (16 tokens x 64 bytes of
//   int8 activations) by the unsigned B tile (64 k x 16 output rows) into a 16 x 16 int32 C tile. Per k
//   step a 2 x 2 block of C tiles (tmm0-3) takes two A tiles (tmm4-5, 32 tokens) and two B tiles
//   (tmm6-7, 32 rows).
// - AVX-512 VNNI (no AMX, or AMX off): per k-quad, the two 16-row zmm of the panel against a broadcast
//   activation quad of each of up to 12 tokens: 24 zmm accumulators, no horizontal sums, no transposes.
// Both give C[t][n] = sum_k c[n, k] q[t, k] in the same C-tile layout, so C - sum_k q[t, k] is the exact
// dot, already in the [T, N] order of the outputs, and one finishing step serves both.
//
// The panel from T2R4: dword kq of a 64-byte row block holds k-quad kq in all four bit pairs s (k = 64s + 4kq
// .. +3), so one 16 x 16 dword transpose of a row tile's block serves four k steps:
// panel(s) row kq = (transposed row kq) >> 2s & 0x03030303.
#define MF_AMX MF_AVX512 ",amx-tile,amx-int8"
constexpr int64_t kPanelRows = 32;       // output rows per panel: 2 row tiles = 8 row groups
constexpr int64_t kAmxTokens = 32;       // tokens per C block: 2 A tiles (also the C layout's block)
constexpr int64_t kPanelMinTokens = 16;  // AMX: below this the 4-row VNNI tiles win (a partly empty A tile)
// VNNI panels: the panel's unpack pays off from about 48 tokens (1.3b prefill, 2 threads, tok/s, panels vs
// 4-row tiles: 243 vs 252 at 32 tokens, 298 vs 263 at 64, 339 vs 206-225 at 128).
constexpr int64_t kVnniPanelMinTokens = 48;
constexpr int64_t kTileBytes = 1024;
constexpr int64_t kPanelChunkSteps = 8;  // k steps (64 k each) per chunk: a 16 KiB panel slice, 2 row blocks
constexpr int kVnniTokens = 12;          // tokens per VNNI block: 2 x 12 accumulators + 2 codes + 1 quad
// 256-bit panels (avx2, avxvnni): one 16-row tile at a time, 4 tokens: 2 x 4 accumulators + 2 codes + 4 quads
// (with 6 tokens gcc loads all 6 quads first and spills accumulators).
constexpr int kYmmTokens = 4;
// Where the 256-bit panels overtake the 2-token tiles (1.3b linears, 2 threads, panels / tiles speed): AVX2
// 1.09 at 32 tokens, 1.25 at 48, 1.35 at 128; AVX-VNNI (whose tiles need no widening) 0.80-0.84 at 32,
// 1.03-1.06 at 48, 1.12-1.16 at 64 and 128.
constexpr int64_t kAvx2PanelMinTokens = 32, kAvxVnniPanelMinTokens = 64;

// Transposes a 16 x 16 matrix of dwords held as 16 rows.
__attribute__((target(MF_AVX512), always_inline)) inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Rows now hold 4-dword pieces of 4 output rows per 128-bit lane; two lane shuffles finish it.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// The panel slice of row groups g0 .. g0+7 (rows past the matrix get code 1 = weight 0) for row blocks
// [b0, b1), k steps from ks0 = 4 b0: B[(((ks - ks0) * 2 + i) * 16 + kq) * 64 + 4 nn + e] = code of row 16 i + nn
// at k = 64 ks + 4 kq + e.
__attribute__((target(MF_AVX512))) void unpack_panel(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0,
                                                          int64_t b0, int64_t b1, int8_t *B) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0; i < 2; ++i) {
      __m512i r[16];
      for (int nn = 0; nn < 16; ++nn) {  // row 16 i + nn = row group 4 i + nn / 4, row nn % 4
        const int64_t g = g0 + 4 * i + nn / 4;
        r[nn] = g < G ? _mm512_loadu_si512(W + g * Kpad + b * kBlock + (nn % 4) * 64) : _mm512_set1_epi8(0x55);
      }
      transpose16x16_epi32(r);
      for (int s = 0; s < 4; ++s) {
        int8_t *dst = B + ((4 * (b - b0) + s) * 2 + i) * kTileBytes;
        for (int kq = 0; kq < 16; ++kq)
          _mm512_storeu_si512(dst + kq * 64, _mm512_and_si512(_mm512_srli_epi16(r[kq], 2 * s), m3));
      }
    }
}

// Transposes an 8 x 8 matrix of dwords held as 8 rows (column j ends in r[j]).
__attribute__((target("avx2"), always_inline)) inline void transpose8x8_epi32(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c]: columns c (low lane) and c + 4 (high lane) of 4 rows
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
  }
}

// unpack_panel with 256-bit registers (the avx2 / avxvnni panel GEMMs): the same layout from four 8 x 8
// dword transposes per 16-row tile and row block.
__attribute__((target("avx2"))) void unpack_panel_avx2(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0,
                                                       int64_t b0, int64_t b1, int8_t *B) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t rh = 0; rh < 2; ++rh)    // rows 8 rh .. 8 rh + 7 of the tile
        for (int64_t dh = 0; dh < 2; ++dh) {  // dwords (k-quads) 8 dh .. 8 dh + 7
          __m256i r[8];
          for (int nn = 0; nn < 8; ++nn) {  // row 16 i + 8 rh + nn = row group 4 i + 2 rh + nn / 4, row nn % 4
            const int64_t g = g0 + 4 * i + 2 * rh + nn / 4;
            r[nn] = g < G ? ld256(W + g * Kpad + b * kBlock + (nn % 4) * 64 + 32 * dh) : _mm256_set1_epi8(0x55);
          }
          transpose8x8_epi32(r);
          for (int s = 0; s < 4; ++s)
            for (int j = 0; j < 8; ++j)
              _mm256_storeu_si256((__m256i *)(B + (((4 * (b - b0) + s) * 2 + i) * 16 + 8 * dh + j) * 64 + 32 * rh),
                                  _mm256_and_si256(_mm256_srli_epi16(r[j], 2 * s), m3));
        }
}

#if MF_HAVE_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A tiles of one 32-token block tb, its k steps contiguous:
// A[((tb * nks + ks) * 32 + tt) * 64 + e] = q[32 tb + tt, 64 ks + e], tokens past T zero.
void amx_pack_acts(const int8_t *Q, int64_t T, int64_t Kpad, int64_t tb, int8_t *A) {
  const int64_t nks = Kpad / 64;
  for (int64_t tt = 0; tt < kAmxTokens; ++tt) {
    const int64_t t = tb * kAmxTokens + tt;
    for (int64_t ks = 0; ks < nks; ++ks) {
      int8_t *dst = A + ((tb * nks + ks) * kAmxTokens + tt) * 64;
      if (t < T)
        std::memcpy(dst, Q + t * Kpad + ks * 64, 64);
      else
        std::memset(dst, 0, 64);
    }
  }
}

// C block [2 token tiles][2 row tiles][16][16] += one 32-token block of A x one panel of B over k steps
// [ks0, ks1) (C zeroed first when ks0 == 0). The npf lines pf[] are prefetched into L2, spread over the k steps.
__attribute__((target(MF_AMX))) void amx_block(const int8_t *A, const int8_t *B, int64_t ks0, int64_t ks1,
                                               int32_t *C, const uint8_t *const *pf, int64_t npf) {
  if (ks0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, C, 64);
    _tile_loadd(1, C + 256, 64);
    _tile_loadd(2, C + 512, 64);
    _tile_loadd(3, C + 768, 64);
  }
  // Each operand tile is reloaded for the next k step right after its last reader (the tiles are not renamed,
  // so a load waits for the multiplies that read the old contents), which keeps the tile unit fed: ~4 % less
  // time per step in a standalone loop than all four loads ahead of the four multiplies. The A tiles come from
  // L2 without software prefetch: prefetching them two steps ahead (32 prefetcht0 per step) cost 3-5 % of
  // 1.3b prefill at 128 tokens and 4-6 % on 370m, and was level at 512.
  auto a_tile = [&](int64_t ks, int h) { return A + (ks * 2 + h) * kTileBytes; };
  auto b_tile = [&](int64_t ks, int h) { return B + ((ks - ks0) * 2 + h) * kTileBytes; };
  const int64_t per = (npf + (ks1 - ks0) - 1) / (ks1 - ks0);
  _tile_loadd(4, a_tile(ks0, 0), 64);
  _tile_loadd(6, b_tile(ks0, 0), 64);
  for (int64_t ks = ks0; ks < ks1; ++ks) {
    _tile_loadd(7, b_tile(ks, 1), 64);
    _tile_dpbsud(0, 4, 6);
    _tile_loadd(5, a_tile(ks, 1), 64);
    _tile_dpbsud(1, 4, 7);
    if (ks + 1 < ks1) _tile_loadd(4, a_tile(ks + 1, 0), 64);
    _tile_dpbsud(2, 5, 6);
    if (ks + 1 < ks1) _tile_loadd(6, b_tile(ks + 1, 0), 64);
    _tile_dpbsud(3, 5, 7);
    for (int64_t l = (ks - ks0) * per; l < std::min(npf, (ks - ks0 + 1) * per); ++l) prefetch_line_l2(pf[l]);
  }
  _tile_stored(0, C, 64);
  _tile_stored(1, C + 256, 64);
  _tile_stored(2, C + 512, 64);
  _tile_stored(3, C + 768, 64);
}

// Eight 16 x 64-byte tiles. A static object: with a local one gcc 12 dropped the row / column stores
// before ldtilecfg (it does not see the instruction read them), leaving the tiles unconfigured.
__attribute__((target(MF_AMX))) void amx_begin() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
      c.rows[i] = 16;
      c.colsb[i] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&cfg);
}
__attribute__((target(MF_AMX))) void amx_end() { _tile_release(); }

#endif  // MF_HAVE_AMX

// Offset of token t's 16-row C tile row in the C-tile layout of amx_block (row tile i at + 256 * i).
constexpr int64_t c_offset(int64_t t) { return t / kAmxTokens * 1024 + (t % kAmxTokens) / 16 * 512 + t % 16 * 16; }

// Activation quad kq of k step ks of one token's int8 row (4 consecutive k, broadcast against a panel row).
inline int32_t act_quad(const int8_t *row, int64_t ks, int kq) {
  int32_t quad;
  std::memcpy(&quad, row + ks * 64 + kq * 4, 4);
  return quad;
}

// C rows of tokens [t0, t0 + NT) += their activations x one panel over k steps [ks0, ks1) (set, not
// added, when ks0 == 0) by vpdpbusd: codes unsigned, the broadcast activation quad signed.
template <int NT>
__attribute__((target(MF_AVX512))) void vnni_block(const int8_t *Q, int64_t ldq, int64_t t0, const int8_t *B,
                                                   int64_t ks0, int64_t ks1, int32_t *C) {
  __m512i acc[NT][2];
  #pragma GCC unroll 12
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < 2; ++i)
      acc[t][i] = ks0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(C + c_offset(t0 + t) + 256 * i);
  const int8_t *q = Q + t0 * ldq;
  for (int64_t ks = ks0; ks < ks1; ++ks)
    for (int kq = 0; kq < 16; ++kq) {
      const __m512i b0 = _mm512_load_si512(B + (((ks - ks0) * 2) * 16 + kq) * 64);
      const __m512i b1 = _mm512_load_si512(B + (((ks - ks0) * 2 + 1) * 16 + kq) * 64);
      #pragma GCC unroll 12
      for (int t = 0; t < NT; ++t) {
        const __m512i a = _mm512_set1_epi32(act_quad(q + t * ldq, ks, kq));
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], b0, a);
        acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], b1, a);
      }
    }
  #pragma GCC unroll 12
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < 2; ++i) _mm512_store_si512(C + c_offset(t0 + t) + 256 * i, acc[t][i]);
}

using PanelBlockFn = void (*)(const int8_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t, int32_t *);
template <int... N>
constexpr std::array<PanelBlockFn, sizeof...(N) + 1> vnni_blocks(std::integer_sequence<int, N...>) {
  return {nullptr, vnni_block<N + 1>...};
}
constexpr auto kVnniBlocks = vnni_blocks(std::make_integer_sequence<int, kVnniTokens>{});

// The 256-bit forms of vnni_block, one 16-row tile (2 ymm of 8 rows x 4 codes) at a time. AVX-VNNI: as
// vnni_block. AVX2: vpmaddubsw gives int16 pair sums (|c q + c q| <= 512) that are summed over at most 4 k
// steps (64 quads: -32768 .. 32512, exact), then widened by vpmaddwd into the int32 C rows.
#if MF_HAVE_AVXVNNI
template <int NT>
__attribute__((target("avx2,fma,avxvnni"))) void avxvnni_block(const int8_t *Q, int64_t ldq, int64_t t0,
                                                                 const int8_t *B, int64_t ks0, int64_t ks1, int32_t *C) {
  const int8_t *q = Q + t0 * ldq;
  for (int64_t i = 0; i < 2; ++i) {
    __m256i acc[NT][2];
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
      for (int h = 0; h < 2; ++h)
        acc[t][h] = ks0 == 0 ? _mm256_setzero_si256() : ld256(C + c_offset(t0 + t) + 256 * i + 8 * h);
    for (int64_t ks = ks0; ks < ks1; ++ks)
      #pragma GCC unroll 2
      for (int kq = 0; kq < 16; ++kq) {
        const int8_t *b = B + (((ks - ks0) * 2 + i) * 16 + kq) * 64;
        const __m256i b0 = ld256(b), b1 = ld256(b + 32);
        #pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const __m256i a = _mm256_set1_epi32(act_quad(q + t * ldq, ks, kq));
          acc[t][0] = _mm256_dpbusd_avx_epi32(acc[t][0], b0, a);
          acc[t][1] = _mm256_dpbusd_avx_epi32(acc[t][1], b1, a);
        }
      }
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
      for (int h = 0; h < 2; ++h) _mm256_storeu_si256((__m256i *)(C + c_offset(t0 + t) + 256 * i + 8 * h), acc[t][h]);
  }
}
#endif  // MF_HAVE_AVXVNNI

template <int NT>
__attribute__((target("avx2,fma"))) void avx2_block(const int8_t *Q, int64_t ldq, int64_t t0, const int8_t *B,
                                                      int64_t ks0, int64_t ks1, int32_t *C) {
  const int8_t *q = Q + t0 * ldq;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t kb = ks0; kb < ks1; kb += 4) {
      __m256i acc[NT][2];
      #pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
      for (int64_t ks = kb; ks < std::min(ks1, kb + 4); ++ks)
        #pragma GCC unroll 2
        for (int kq = 0; kq < 16; ++kq) {
          const int8_t *b = B + (((ks - ks0) * 2 + i) * 16 + kq) * 64;
          const __m256i b0 = ld256(b), b1 = ld256(b + 32);
          #pragma GCC unroll 4
          for (int t = 0; t < NT; ++t) {
            const __m256i a = _mm256_set1_epi32(act_quad(q + t * ldq, ks, kq));
            acc[t][0] = _mm256_add_epi16(acc[t][0], _mm256_maddubs_epi16(b0, a));
            acc[t][1] = _mm256_add_epi16(acc[t][1], _mm256_maddubs_epi16(b1, a));
          }
        }
      #pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        for (int h = 0; h < 2; ++h) {
          int32_t *c = C + c_offset(t0 + t) + 256 * i + 8 * h;
          const __m256i sum = _mm256_madd_epi16(acc[t][h], ones);
          _mm256_storeu_si256((__m256i *)c, kb == 0 ? sum : _mm256_add_epi32(ld256(c), sum));
        }
    }
}

constexpr std::array<PanelBlockFn, kYmmTokens + 1> kAvx2Blocks = {nullptr, avx2_block<1>, avx2_block<2>, avx2_block<3>,
                                                                 avx2_block<4>};
#if MF_HAVE_AVXVNNI
constexpr std::array<PanelBlockFn, kYmmTokens + 1> kAvxVnniBlocks = {nullptr, avxvnni_block<1>, avxvnni_block<2>,
                                                                    avxvnni_block<3>, avxvnni_block<4>};
#else
constexpr std::array<PanelBlockFn, kYmmTokens + 1> kAvxVnniBlocks = {};  // never used (see kTiles)
#endif

// panel_finish writes one C block (tokens t0.., rows n0..) as LinearJob outputs: (c - sum q) * (s_x * s_w), the
// scales product in fp32 and then one product, the torch BitLinear's own order (integer jobs carry no scales).
// panel_finish_glu takes the gate block Cg and the up block Cu (rows n0.. and I + n0..) and writes
// silu(gate) * up with those products and the arithmetic of glu_row. AVX-512 versions here; the 256-bit ones
// and the dispatch by ISA are defined with the elementwise steps below.
void glu_pairs(Isa isa, const float *g, const float *u, int64_t n, float *out);
void panel_finish(Isa isa, const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0);
void panel_finish_glu(Isa isa, const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0);

// 16 float outputs of a C tile row: (c - sum q) * (s_x * s_w) -- (s_x * s_w) in fp32, then one product: the
// torch BitLinear's own order.
__attribute__((target(MF_AVX512), always_inline)) inline __m512 panel_dequant(const int32_t *c, __m512i sq, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c), sq)), s);
}

// panel_finish on AVX-512: 16 outputs per vector, masked at the matrix edge.
__attribute__((target(MF_AVX512))) void panel_finish_avx512(const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0) {
  for (int64_t it = 0; it < 2; ++it)
    for (int64_t tt = 0; tt < 16; ++tt) {
      const int64_t t = t0 + 16 * it + tt;
      if (t >= j.T) return;
      const __m512i sq = _mm512_set1_epi32(j.sumq[t]);
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t n = n0 + 16 * i;
        if (n >= j.N) break;
        const __mmask16 m = j.N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j.N - n)) - 1);
        const int32_t *c = C + ((it * 2 + i) * 16 + tt) * 16;
        if (j.Yi)
          _mm512_mask_storeu_epi32(j.Yi + t * j.ldy + n, m, _mm512_sub_epi32(_mm512_load_si512(c), sq));
        else  // the scales are read here only: integer jobs carry none
          _mm512_mask_storeu_ps(j.Y + t * j.ldy + n, m, panel_dequant(c, sq, _mm512_set1_ps(j.a_scale[t] * j.w_scale)));
      }
    }
}

// panel_finish_glu on AVX-512.
__attribute__((target(MF_AVX512))) void panel_finish_glu_avx512(const LinearJob &j, const int32_t *Cg,
                                                                const int32_t *Cu, int64_t n0, int64_t t0) {
  alignas(64) float g[kPanelRows], u[kPanelRows];
  for (int64_t it = 0; it < 2; ++it)
    for (int64_t tt = 0; tt < 16; ++tt) {
      const int64_t t = t0 + 16 * it + tt;
      if (t >= j.T) return;
      const __m512i sq = _mm512_set1_epi32(j.sumq[t]);
      const __m512 s = _mm512_set1_ps(j.a_scale[t] * j.w_scale);
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t c = ((it * 2 + i) * 16 + tt) * 16;
        _mm512_store_ps(g + 16 * i, panel_dequant(Cg + c, sq, s));
        _mm512_store_ps(u + 16 * i, panel_dequant(Cu + c, sq, s));
      }
      glu_pairs(Isa::Avx512, g, u, kPanelRows, j.Y + t * j.ldy + n0);
    }
}

// Whether panel GEMMs run on AMX now (amx_switch, and a build with AMX).
bool amx_on() {
#if MF_HAVE_AMX
  return amx_switch().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

// All linears of one call as panel GEMMs: panels of 32 rows over the pool, each unpacked once per k chunk
// and run against every token (on AMX, activations are first packed into A tiles, once per job).
void run_linears_panels(Isa isa, int threads, const LinearJob *jobs, int njobs) {
  [[maybe_unused]] const bool amx = isa == Isa::Avx512 && amx_on();
  const PanelBlockFn *block_fns = isa == Isa::Avx512    ? kVnniBlocks.data()
                                : isa == Isa::AvxVnni ? kAvxVnniBlocks.data()
                                                      : kAvx2Blocks.data();
  const int64_t block_tokens = isa == Isa::Avx512 ? kVnniTokens : kYmmTokens;
  // The caller's buffers, kept between calls (fresh pages cost faults); packed over the pool.
  // (A reference, so the pool's workers see the caller's buffers, not their own thread_local ones.)
  thread_local std::vector<LineVec<int8_t>> caller_acts;
  [[maybe_unused]] std::vector<LineVec<int8_t>> &acts = caller_acts;
#if MF_HAVE_AMX
  if (amx) {
    if (acts.size() < (size_t)njobs) acts.resize((size_t)njobs);
    std::vector<std::pair<int, int64_t>> blocks;  // (job, token block)
    for (int i = 0; i < njobs; ++i) {
      const LinearJob &j = jobs[i];
      const int64_t nblk = round_up(j.T, kAmxTokens) / kAmxTokens;
      acts[(size_t)i].resize(std::max(acts[(size_t)i].size(), (size_t)(nblk * kAmxTokens * j.Kpad)));
      for (int64_t tb = 0; tb < nblk; ++tb) blocks.emplace_back(i, tb);
    }
    get_pool(threads).run_chunks((int64_t)blocks.size(), [&](int64_t c) {
      const auto [i, tb] = blocks[(size_t)c];
      amx_pack_acts(jobs[i].Q, jobs[i].T, jobs[i].Kpad, tb, acts[(size_t)i].data());
    });
  }
#endif
  const auto chunks = row_group_chunks(jobs, njobs, kPanelRows / kRows);  // one 32-row panel each
  get_pool(threads).run_chunks((int64_t)chunks.size(), [&](int64_t c) {
    const auto [i, g0] = chunks[(size_t)c];
    const LinearJob &j = jobs[i];
    const int64_t nks = j.Kpad / 64;
    thread_local LineVec<int8_t> panel;
    panel.resize((size_t)(kPanelRows * 64 * kPanelChunkSteps));
    const int64_t nblk = round_up(j.T, kAmxTokens) / kAmxTokens, cblk = nblk * 4 * 256;
    thread_local LineVec<int32_t> cbuf;
    cbuf.resize((size_t)(2 * cblk));
    int32_t *C = cbuf.data();
    // C blocks of the panel at row group gp for every token: k in chunks whose panel slice stays in
    // L1 across all tokens (C blocks wait in memory between chunks); each slice is unpacked just before
    // its use, into the same 16 KiB buffer, whose lines stay in L1 (a fresh slice of a K-long panel per
    // chunk took 1-8 % more CPU time on the 1.3b linears). On AMX the first token block of a chunk runs ~1.5x
    // slower per k step than the others (TSC ticks, 1.3b prefill: 164 vs 112; 201 vs 104 while the next
    // chunk's weight prefetches were issued all at once before it). Part of it is the tile unit's warm-up
    // after ~1000+ cycles without tile work (benchmarks/amx_tiles.cpp; a 2000-tick FMA loop in place of the
    // unpack: 276 vs 104). Unpacking the next chunk in pieces between this chunk's blocks made every block
    // slower (~12 % less prefill), and dummy tile ops inside the unpack did not help.
    // The weight lines of the chunk of k steps from ks of the panel at row group gn of job jn.
    auto chunk_lines = [&](const LinearJob &jn, int64_t gn, int64_t ks, const uint8_t **lines) {
      int64_t nl = 0;
      for (int64_t g = gn; g < std::min(jn.groups(), gn + kPanelRows / kRows); ++g)
        for (int64_t off = ks * 64; off < std::min(jn.Kpad / 64, ks + kPanelChunkSteps) * 64; off += 64)
          lines[nl++] = jn.W + g * jn.Kpad + off;
      return nl;
    };
    auto run_panel = [&](int64_t gp, int32_t *Cp, bool gate) {
      for (int64_t ks0 = 0; ks0 < nks; ks0 += kPanelChunkSteps) {
        const int64_t ks1 = std::min(nks, ks0 + kPanelChunkSteps);
        (isa == Isa::Avx512 ? unpack_panel : unpack_panel_avx2)(j.W, j.groups(), j.Kpad, gp, ks0 / 4, ks1 / 4,
                                                                panel.data());
        // The next chunk's weights go into L2 while this one multiplies (the unpack reads them from memory);
        // after the last chunk, the first chunk of the panel this thread most likely runs next: the up panel
        // after the gate panel, else Pool::likely_next's work item (a wrong guess costs 64 idle prefetches).
        const uint8_t *lines[kPanelRows / kRows * kPanelChunkSteps];
        int64_t nl = 0;
        if (ks1 < nks)
          nl = chunk_lines(j, gp, ks1, lines);
        else if (gate)
          nl = chunk_lines(j, gp + j.glu / kRows, 0, lines);
        else if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < (int64_t)chunks.size())
          nl = chunk_lines(jobs[chunks[(size_t)cn].first], chunks[(size_t)cn].second, 0, lines);
#if MF_HAVE_AMX
        if (amx) {  // spread over the tile loop (the 64 at once before the first block: 4-7 % less prefill)
          for (int64_t tb = 0; tb < nblk; ++tb)
            amx_block(acts[(size_t)i].data() + tb * kAmxTokens * j.Kpad, panel.data(), ks0, ks1, Cp + tb * 4 * 256,
                      lines + nl * tb / nblk, nl * (tb + 1) / nblk - nl * tb / nblk);
          continue;
        }
#endif
        for (int64_t l = 0; l < nl; ++l) prefetch_line_l2(lines[l]);
        for (int64_t t0 = 0; t0 < j.T; t0 += block_tokens)
          block_fns[std::min(block_tokens, j.T - t0)](j.Q, j.Kpad, t0, panel.data(), ks0, ks1, Cp);
      }
    };
#if MF_HAVE_AMX
    if (amx) amx_begin();
#endif
    run_panel(g0, C, j.glu > 0);
    if (j.glu) {
      run_panel(g0 + j.glu / kRows, C + cblk, false);
      for (int64_t tb = 0; tb < nblk; ++tb)
        panel_finish_glu(isa, j, C + tb * 4 * 256, C + cblk + tb * 4 * 256, g0 * kRows, tb * kAmxTokens);
    } else {
      for (int64_t tb = 0; tb < nblk; ++tb) panel_finish(isa, j, C + tb * 4 * 256, g0 * kRows, tb * kAmxTokens);
    }
#if MF_HAVE_AMX
    if (amx) amx_end();
#endif
  });
}

// Batches of at least kPanelMinTokens (AMX), kVnniPanelMinTokens (AVX-512 VNNI), kAvxVnniPanelMinTokens or
// kAvx2PanelMinTokens tokens run as panel GEMMs.
bool uses_panels(Isa isa, int64_t T) {
  if (isa == Isa::Avx512) return T >= (amx_on() ? kPanelMinTokens : kVnniPanelMinTokens);
  return avx2_class(isa) && T >= (isa == Isa::AvxVnni ? kAvxVnniPanelMinTokens : kAvx2PanelMinTokens);
}

// Runs several independent linears in one parallel region (each split evenly by row groups).
void run_linears(Isa isa, int threads, const LinearJob *jobs, int njobs) {
  int64_t work = 0, min_t = INT64_MAX;
  for (int i = 0; i < njobs; ++i) {
    work += jobs[i].N * jobs[i].Kpad * jobs[i].T;
    min_t = std::min(min_t, jobs[i].T);
  }
  if (uses_panels(isa, min_t)) return run_linears_panels(isa, threads, jobs, njobs);
  if (work < (int64_t(1) << 20)) {  // too small to pay for a hand-off to other threads
    for (int i = 0; i < njobs; ++i) linear_rows(isa, jobs[i], 0, jobs[i].groups());
    return;
  }
  const auto chunks = row_group_chunks(jobs, njobs, kChunk);
  get_pool(threads).run_chunks((int64_t)chunks.size(), [&](int64_t c) {
    const auto [i, g0] = chunks[(size_t)c];
    if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < (int64_t)chunks.size())
      prefetch_head(jobs[chunks[(size_t)cn].first], chunks[(size_t)cn].second);
    linear_rows(isa, jobs[i], g0, std::min(jobs[i].groups(), g0 + kChunk));
  });
}

// Runs linears of equal N in one parallel region whose chunks own the same rows of every job, then
// calls epi(n0, n1) on those rows in the same chunk: an elementwise step over the outputs (the MLGRU state
// update over i/f/g, silu(gate) * up over the two GLU halves) runs split across the threads, next to the
// outputs it reads, at no extra hand-off. Not for panel GEMMs (the caller checks uses_panels).
template <class F>
void run_aligned_linears(Isa isa, int threads, const LinearJob *jobs, int njobs, F &&epi) {
  const int64_t N = jobs[0].N, groups = jobs[0].groups();
  auto rows = [&](int64_t g0, int64_t g1) {
    for (int i = 1; i < njobs; ++i) prefetch_head(jobs[i], g0);
    for (int i = 0; i < njobs; ++i) linear_rows(isa, jobs[i], g0, g1);
    epi(g0 * kRows, std::min(N, g1 * kRows));
  };
  if (N * jobs[0].Kpad * jobs[0].T * njobs < (int64_t(1) << 20)) return rows(0, groups);  // as run_linears
  const int64_t nc = (groups + kChunk - 1) / kChunk;
  get_pool(threads).run_chunks(nc, [&](int64_t c) {
    if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < nc) prefetch_head(jobs[0], cn * kChunk);
    rows(c * kChunk, std::min(groups, (c + 1) * kChunk));
  });
}

// Splits [0, n) into contiguous ranges over the pool (inline when n < 2: decode steps are too
// small to pay for a hand-off).
template <class F>
void for_ranges(int threads, int64_t n, F &&fn) {
  if (n < 2) {
    fn(0, n);
    return;
  }
  const int64_t nc = std::min<int64_t>(n, 16);
  get_pool(threads).run_chunks(nc, [&](int64_t c) { fn(n * c / nc, n * (c + 1) / nc); });
}

// no-trapping-math lets gcc if-convert the clamps, so these loops vectorize (results unchanged); with
// fp-contract=off each product and sum rounds on its own, as in torch's elementwise ops (FMAs only where written).
#define MF_VEC __attribute__((optimize("no-trapping-math", "fp-contract=off")))
#define MF_INLINE MF_VEC __attribute__((always_inline)) inline
// Each elementwise step is written once (NAME_impl) and compiled for every ISA, so the loops
// vectorize with the widest registers the chosen backend allows.
#define MF_UNPAREN(...) __VA_ARGS__
#define MF_ISA_VARIANTS(NAME, PARAMS, ARGS)                                                            \
  MF_VEC void NAME##_scalar PARAMS { NAME##_impl ARGS; }                                                      \
  MF_VEC __attribute__((target("avx2,fma"))) void NAME##_avx2 PARAMS { NAME##_impl ARGS; }                  \
  MF_VEC __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void NAME##_avx512 PARAMS {       \
    NAME##_impl ARGS;                                                                                  \
  }                                                                                                    \
  void NAME(Isa isa, MF_UNPAREN PARAMS) {                                                              \
    if (isa == Isa::Avx512)                                                                            \
      NAME##_avx512 ARGS;                                                                              \
    else if (avx2_class(isa))                                                                          \
      NAME##_avx2 ARGS;                                                                                \
    else                                                                                               \
      NAME##_scalar ARGS;                                                                              \
  }

// ---------------------------------------------------------------------------------------------
// Float steps. The RMS uses a double sum of squares so that the rounded float factor is the
// same as the torch reference's (ops/fused.py) whatever the summation order. It runs in 32 lanes (every
// ISA the same lanes and order), which the variants below vectorize: 4 zmm or 8 ymm of doubles.
MF_INLINE float rms_factor(const float *x, int64_t K, double eps) {
  constexpr int kLanes = 32;
  double s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] = __builtin_fma((double)x[k + l], (double)x[k + l], s[l]);
  for (; k < K; ++k) s[0] = __builtin_fma((double)x[k], (double)x[k], s[0]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return (float)(1.0 / std::sqrt(s[0] / (double)K + eps));
}

MF_INLINE void rmsnorm_row_impl(const float *x, const float *w, int64_t K, double eps, float *out) {
  const float r = rms_factor(x, K, eps);
  for (int64_t k = 0; k < K; ++k) out[k] = x[k] * r * w[k];
}
MF_ISA_VARIANTS(rmsnorm_row, (const float *x, const float *w, int64_t K, double eps, float *out), (x, w, K, eps, out))

// Scalar tails of quant_row_*: amax over [k0, K) and q / sum over [k0, K).
inline float absmax_tail(const float *x, int64_t k0, int64_t K, float m) {
  for (int64_t k = k0; k < K; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}
inline int32_t quant_tail(const float *x, int64_t k0, int64_t K, float inv, int8_t *q) {
  int32_t s = 0;
  for (int64_t k = k0; k < K; ++k) {
    const int32_t qi = (int32_t)std::min(127.f, std::max(-128.f, std::nearbyint(x[k] * inv)));
    q[k] = (int8_t)qi;
    s += qi;
  }
  return s;
}

// q = round_half_even(xhat * 127 / max(|xhat|max, 1e-5)), clamped to int8; returns sum q. Max is
// exact in any order and each element is rounded alone, so every ISA gives identical bytes.
using QuantFn = int32_t (*)(const float *x, int64_t K, float *inv_out, int8_t *q);

int32_t quant_row_scalar(const float *x, int64_t K, float *inv_out, int8_t *q) {
  const float inv = 127.0f / std::max(absmax_tail(x, 0, K, 0.f), 1e-5f);
  *inv_out = inv;
  return quant_tail(x, 0, K, inv, q);
}

__attribute__((target("avx2,fma"))) int32_t quant_row_avx2(const float *x, int64_t K, float *inv_out, int8_t *q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  alignas(32) float mv[8];
  _mm256_store_ps(mv, m);
  float amax = absmax_tail(x, k, K, 0.f);
  for (float v : mv) amax = std::max(amax, v);
  const float inv = 127.0f / std::max(amax, 1e-5f);
  *inv_out = inv;
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  __m256i acc = _mm256_setzero_si256();
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    acc = _mm256_add_epi32(acc, qi);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(w16, w16));
  }
  alignas(32) int32_t av[8];
  _mm256_store_si256((__m256i *)av, acc);
  int32_t sum = quant_tail(x, k, K, inv, q);
  for (int32_t v : av) sum += v;
  return sum;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) int32_t quant_row_avx512(const float *x, int64_t K,
                                                                                        float *inv_out, int8_t *q) {
  __m512 m = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float amax = std::max(absmax_tail(x, k, K, 0.f), _mm512_reduce_max_ps(m));
  const float inv = 127.0f / std::max(amax, 1e-5f);
  *inv_out = inv;
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  __m512i acc = _mm512_setzero_si512();
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
    acc = _mm512_add_epi32(acc, qi);
    _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(qi));
  }
  return quant_tail(x, k, K, inv, q) + _mm512_reduce_add_epi32(acc);
}

// RMSNorm (fp32 factor from a float64 sum) then quant_row, zero-padded to Kpad.
void rmsnorm_quant_row(Isa isa, const float *x, const float *w, int64_t K, int64_t Kpad, double eps, float *tmp,
                       int8_t *q, float *a_scale, int32_t *sumq) {
  rmsnorm_row(isa, x, w, K, eps, tmp);
  static const QuantFn kQuant[4] = {quant_row_scalar, quant_row_avx2, quant_row_avx2, quant_row_avx512};  // by Isa
  float inv;
  *sumq = kQuant[(int)isa](tmp, K, &inv, q);
  std::memset(q + K, 0, (size_t)(Kpad - K));
  *a_scale = 1.0f / inv;
}

// exp(x) as torch's vectorized CPU kernels compute it inside sigmoid and silu (the SLEEF u10 algorithm:
// x = q ln2 + s with ln2 split in two, a degree-5 polynomial, 2^q applied as two halves), with the same
// operations and FMAs, so sigmoidf / siluf give torch's bits (no mismatch in 30M inputs;
// test_silu_has_torch_bits). A correctly rounded exp differs from them in ~10 % of inputs by 1 ulp. In float,
// not double, it is also cheaper (1.3b prefill +4-12 %). No libm calls, so the elementwise loops vectorize
// for each ISA.
MF_INLINE float pow2i(int32_t e) {
  const uint32_t bits = (uint32_t)(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
MF_INLINE float exp_torch(float d) {
  const float qf = __builtin_rintf(d * 1.44269504088896341f);
  // q = qf as an integer, read from the mantissa of qf + 1.5 * 2^23 (exact for |q| < 2^22; a float-to-int
  // conversion would be undefined for the huge inputs that the last two lines settle)
  const float qm = qf + 12582912.0f;
  int32_t q;
  std::memcpy(&q, &qm, 4);
  q -= 0x4B400000;
  float s = __builtin_fmaf(qf, -0.693145751953125f, d);
  s = __builtin_fmaf(qf, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = __builtin_fmaf(u, s, 0.00139304355252534151077271f);
  u = __builtin_fmaf(u, s, 0.00833336077630519866943359f);
  u = __builtin_fmaf(u, s, 0.0416664853692054748535156f);
  u = __builtin_fmaf(u, s, 0.166666671633720397949219f);
  u = __builtin_fmaf(u, s, 0.5f);
  u = 1.0f + __builtin_fmaf(s * s, u, s);
  u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
  u = d < -104.0f ? 0.0f : u;
  return d > 100.0f ? std::numeric_limits<float>::infinity() : u;
}
MF_INLINE float sigmoidf(float x) { return 1.0f / (1.0f + exp_torch(-x)); }
MF_INLINE float siluf(float x) { return x / (1.0f + exp_torch(-x)); }

// MLGRU time steps (math: reference/matmulfree.md 1.4; lb == nullptr for layer 0) in two phases, so that
// phase 1 can run per channel range and phase 2 per token. Phase 1: state update for channels [k0, k1) of
// T tokens in turn (rows ld apart); fi[k] is overwritten with silu(state[k]) for phase 2 (mlgru_out, which
// needs all channels). The token loop is inside, not one call per token: 1.3b prefill +1-3 %.
MF_INLINE void mlgru_state_impl(float *fi, const float *ff, const float *lb, int64_t k0, int64_t k1, float *state,
                                int64_t T, int64_t ld) {
  for (int64_t t = 0; t < T; ++t, fi += ld, ff += ld)
    for (int64_t k = k0; k < k1; ++k) {
      float f = sigmoidf(ff[k]);
      if (lb) f = lb[k] + (1.0f - lb[k]) * f;
      const float i = siluf(fi[k]) * (1.0f - f);
      state[k] = f * state[k] + i;
      fi[k] = siluf(state[k]);
    }
}
MF_ISA_VARIANTS(mlgru_state,
                (float *fi, const float *ff, const float *lb, int64_t k0, int64_t k1, float *state, int64_t T, int64_t ld),
                (fi, ff, lb, k0, k1, state, T, ld))

MF_INLINE void mlgru_out_impl(const float *fg, const float *gnorm, int64_t d, double eps, const float *silu_s,
                              float *out) {
  const float r = rms_factor(fg, d, eps);
  for (int64_t k = 0; k < d; ++k) out[k] = fg[k] * r * gnorm[k] * silu_s[k];
}
MF_ISA_VARIANTS(mlgru_out, (const float *fg, const float *gnorm, int64_t d, double eps, const float *silu_s, float *out),
                (fg, gnorm, d, eps, silu_s, out))

MF_INLINE void glu_pairs_impl(const float *g, const float *u, int64_t n, float *out) {
  for (int64_t k = 0; k < n; ++k) out[k] = siluf(g[k]) * u[k];
}
MF_ISA_VARIANTS(glu_pairs, (const float *g, const float *u, int64_t n, float *out), (g, u, n, out))
void glu_row(Isa isa, const float *gate_up, int64_t I, float *out) { glu_pairs(isa, gate_up, gate_up + I, I, out); }

// panel_finish and panel_finish_glu on 256-bit registers (plain loops gcc vectorizes), and their dispatch.
MF_INLINE void finish_row(const LinearJob &j, const int32_t *__restrict c, int32_t sq, int64_t t, int64_t n,
                          int64_t m) {
  if (j.Yi) {
    int32_t *__restrict y = j.Yi + t * j.ldy + n;
    for (int64_t e = 0; e < m; ++e) y[e] = c[e] - sq;
  } else {
    float *__restrict y = j.Y + t * j.ldy + n;
    const float s = j.a_scale[t] * j.w_scale;
    for (int64_t e = 0; e < m; ++e) y[e] = (float)(c[e] - sq) * s;
  }
}
MF_VEC __attribute__((target("avx2,fma"))) void panel_finish_avx2(const LinearJob &j, const int32_t *C, int64_t n0,
                                                                  int64_t t0) {
  for (int64_t it = 0; it < 2; ++it)
    for (int64_t tt = 0; tt < 16; ++tt) {
      const int64_t t = t0 + 16 * it + tt;
      if (t >= j.T) return;
      const int32_t sq = j.sumq[t];
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t n = n0 + 16 * i;
        const int32_t *c = C + ((it * 2 + i) * 16 + tt) * 16;
        // A full row of 16 with a constant trip count: two ymm, no remainder loop.
        if (j.N - n >= 16)
          finish_row(j, c, sq, t, n, 16);
        else
          finish_row(j, c, sq, t, n, std::max<int64_t>(0, j.N - n));
      }
    }
}
void panel_finish(Isa isa, const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0) {
  isa == Isa::Avx512 ? panel_finish_avx512(j, C, n0, t0) : panel_finish_avx2(j, C, n0, t0);
}

MF_VEC __attribute__((target("avx2,fma"))) void panel_finish_glu_avx2(const LinearJob &j, const int32_t *Cg,
                                                                      const int32_t *Cu, int64_t n0, int64_t t0) {
  float g[kPanelRows], u[kPanelRows];
  for (int64_t it = 0; it < 2; ++it)
    for (int64_t tt = 0; tt < 16; ++tt) {
      const int64_t t = t0 + 16 * it + tt;
      if (t >= j.T) return;
      const int32_t sq = j.sumq[t];
      const float s = j.a_scale[t] * j.w_scale;
      for (int64_t i = 0; i < 2; ++i)
        for (int64_t e = 0; e < 16; ++e) {
          const int64_t c = ((it * 2 + i) * 16 + tt) * 16 + e;
          g[16 * i + e] = (float)(Cg[c] - sq) * s;
          u[16 * i + e] = (float)(Cu[c] - sq) * s;
        }
      glu_pairs_impl(g, u, kPanelRows, j.Y + t * j.ldy + n0);
    }
}
void panel_finish_glu(Isa isa, const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0) {
  isa == Isa::Avx512 ? panel_finish_glu_avx512(j, Cg, Cu, n0, t0) : panel_finish_glu_avx2(j, Cg, Cu, n0, t0);
}

// ---------------------------------------------------------------------------------------------
// Python-facing types.
template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

struct PackedLinear {
  Arr<const uint8_t, nb::ndim<2>> packed;
  int64_t N, K;
  double scale;
  Arr<const float, nb::ndim<1>> norm;

  PackedLinear(Arr<const uint8_t, nb::ndim<2>> p, int64_t n, int64_t k, double s, Arr<const float, nb::ndim<1>> w)
      : packed(p), N(n), K(k), scale(s), norm(w) {
    const int64_t Kpad = (K + kBlock - 1) / kBlock * kBlock;
    if ((int64_t)p.shape(0) != (N + kRows - 1) / kRows || (int64_t)p.shape(1) != Kpad)
      throw std::invalid_argument("packed weight shape does not match (N, K)");
    if ((int64_t)w.shape(0) != K) throw std::invalid_argument("norm weight length does not match K");
  }
  int64_t kpad() const { return (K + kBlock - 1) / kBlock * kBlock; }
};

struct Layer {
  Arr<const float, nb::ndim<1>> attn_norm, g_norm, mlp_norm, lb;
  bool has_lb;
  PackedLinear i, f, g, o, gate, down;
};

// Per-linear quantized input: q [T, Kpad], scales, sums.
struct QBuf {
  LineVec<int8_t> q;
  LineVec<float> sa;
  LineVec<int32_t> sq;
  void reserve(int64_t T, const PackedLinear &p) {
    q.resize((size_t)(T * p.kpad()));
    sa.resize((size_t)T);
    sq.resize((size_t)T);
  }
  // Token t's row x (after reserve); tmp holds p.K floats.
  void row(Isa isa, const float *x, int64_t t, const PackedLinear &p, double eps, float *tmp) {
    rmsnorm_quant_row(isa, x, p.norm.data(), p.K, p.kpad(), eps, tmp, q.data() + t * p.kpad(), &sa[t], &sq[t]);
  }
  void fill(Isa isa, const float *x, int64_t T, int64_t ldx, const PackedLinear &p, double eps, int threads) {
    reserve(T, p);
    for_ranges(threads, T, [&](int64_t t0, int64_t t1) {
      LineVec<float> tmp((size_t)p.K);
      for (int64_t t = t0; t < t1; ++t) row(isa, x + t * ldx, t, p, eps, tmp.data());
    });
  }
  LinearJob job(const PackedLinear &p, int64_t T, float *Y, int64_t ldy) const {
    return LinearJob{p.packed.data(), p.N, p.kpad(), (float)p.scale, q.data(), sq.data(), sa.data(), T, Y, nullptr, ldy};
  }
};

class Engine {
 public:
  Engine(int64_t vocab, int64_t d, int64_t inter, double eps, const std::string &backend, int threads)
      : V_(vocab), d_(d), I_(inter), eps_(eps), isa_(parse_isa(backend)), threads_(threads) {}

  void set_embedding_f32(Arr<const float, nb::ndim<2>> e) {
    check_emb(e.shape(0), e.shape(1));
    emb_f32_ = e;
    emb_is_bf16_ = false;
  }
  void set_embedding_bf16(Arr<const uint16_t, nb::ndim<2>> e) {
    check_emb(e.shape(0), e.shape(1));
    emb_bf16_ = e;
    emb_is_bf16_ = true;
  }
  void set_head(Arr<const float, nb::ndim<1>> norm, const PackedLinear &head) {
    if ((int64_t)norm.shape(0) != d_ || head.K != d_ || head.N != V_)
      throw std::invalid_argument("lm_head shapes do not match the config");
    norm_ = norm;
    head_.assign(1, head);
  }
  void add_layer(Arr<const float, nb::ndim<1>> attn_norm, const PackedLinear &i, const PackedLinear &f,
                 const PackedLinear &g, const PackedLinear &o, Arr<const float, nb::ndim<1>> g_norm,
                 Arr<const float, nb::ndim<1>> lb, bool has_lb, Arr<const float, nb::ndim<1>> mlp_norm,
                 const PackedLinear &gate, const PackedLinear &down) {
    auto need = [](const PackedLinear &p, int64_t N, int64_t K, const char *name) {
      if (p.N != N || p.K != K) throw std::invalid_argument(std::string(name) + " shape does not match the config");
    };
    need(i, d_, d_, "i_proj");
    need(f, d_, d_, "f_proj");
    need(g, d_, d_, "g_proj");
    need(o, d_, d_, "o_proj");
    need(gate, 2 * I_, d_, "gate_proj");
    need(down, d_, I_, "down_proj");
    for (auto *v : {&attn_norm, &g_norm, &lb, &mlp_norm})
      if ((int64_t)v->shape(0) != d_) throw std::invalid_argument("norm / lower-bound length does not match hidden_size");
    layers_.push_back(Layer{attn_norm, g_norm, mlp_norm, lb, has_lb, i, f, g, o, gate, down});
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

  // ids [T]; state [L, d] updated in place; logits [R, V] with R = T (all_logits) or 1 (last token).
  void forward(Arr<const int64_t, nb::ndim<1>> ids, Arr<float, nb::ndim<2>> state, Arr<float, nb::ndim<2>> logits,
               bool all_logits) {
    const int64_t T = (int64_t)ids.shape(0), L = num_layers(), d = d_, I = I_;
    if (T < 1) throw std::invalid_argument("forward needs at least one token");
    if (head_.empty() || (emb_is_bf16_ ? !emb_bf16_.is_valid() : !emb_f32_.is_valid()))
      throw std::invalid_argument("engine is not fully loaded (embedding / head missing)");
    if ((int64_t)state.shape(0) != L || (int64_t)state.shape(1) != d)
      throw std::invalid_argument("state must have shape [num_layers, hidden_size]");
    const int64_t R = all_logits ? T : 1;
    if ((int64_t)logits.shape(0) != R || (int64_t)logits.shape(1) != V_)
      throw std::invalid_argument("logits buffer has the wrong shape");
    for (int64_t t = 0; t < T; ++t)
      if (ids.data()[t] < 0 || ids.data()[t] >= V_) throw std::invalid_argument("token id out of range");
    const int64_t *idp = ids.data();
    float *st = state.data();
    float *lg = logits.data();
    nb::gil_scoped_release release;

    // Scratch lives in the engine and only grows: fresh pages for every call cost page faults.
    std::lock_guard<std::mutex> lock(busy_);
    for (auto *v : {&h_, &a_, &fi_, &ff_, &fg_}) v->resize(std::max(v->size(), (size_t)(T * d)));
    big_.resize(std::max(big_.size(), (size_t)(T * 2 * I)));
    float *h = h_.data(), *a = a_.data(), *fi = fi_.data(), *ff = ff_.data(), *fg = fg_.data(), *big = big_.data();
    QBuf &qi = qi_, &qf = qf_, &qg = qg_;
    for (int64_t t = 0; t < T; ++t) embed(idp[t], h + t * d);
    // The per-token steps between two linears run as one region over the tokens (each token's rows stay in
    // L1 from one step to the next). Each layer's down projection (in fi) is added to h by the next step that
    // reads h: the next layer's first region, or the final norm (for the rows the head reads).
    for (int64_t l = 0; l < L; ++l) {
      const Layer &ly = layers_[(size_t)l];
      qi.reserve(T, ly.i);
      qf.reserve(T, ly.f);
      qg.reserve(T, ly.g);
      per_token(T, [&](int64_t t, float *tmp) {
        if (l > 0) add_row(h + t * d, fi + t * d);
        rmsnorm_row(isa_, h + t * d, ly.attn_norm.data(), d, eps_, a + t * d);
        qi.row(isa_, a + t * d, t, ly.i, eps_, tmp);
        qf.row(isa_, a + t * d, t, ly.f, eps_, tmp);
        qg.row(isa_, a + t * d, t, ly.g, eps_, tmp);
      });
      const LinearJob ifg[3] = {qi.job(ly.i, T, fi, d), qf.job(ly.f, T, ff, d),
                                qg.job(ly.g, T, fg, d)};
      // The recurrence is independent per channel (run on each chunk's channels as their i/f/g rows
      // are done, or split over the pool after a panel GEMM), the output norm per token.
      float *s = st + l * d;
      const float *lb = ly.has_lb ? ly.lb.data() : nullptr;
      auto state_update = [&](int64_t k0, int64_t k1) {
        mlgru_state(isa_, fi, ff, lb, k0, k1, s, T, d);
      };
      if (uses_panels(isa_, T)) {
        run_linears(isa_, threads_, ifg, 3);
        for_ranges(threads_, d, state_update);
      } else {
        run_aligned_linears(isa_, threads_, ifg, 3, state_update);
      }
      qi.reserve(T, ly.o);
      per_token(T, [&](int64_t t, float *tmp) {
        mlgru_out(isa_, fg + t * d, ly.g_norm.data(), d, eps_, fi + t * d, a + t * d);
        qi.row(isa_, a + t * d, t, ly.o, eps_, tmp);
      });
      const LinearJob oj = qi.job(ly.o, T, fi, d);
      run_linears(isa_, threads_, &oj, 1);
      qi.reserve(T, ly.gate);
      per_token(T, [&](int64_t t, float *tmp) {
        add_row(h + t * d, fi + t * d);
        rmsnorm_row(isa_, h + t * d, ly.mlp_norm.data(), d, eps_, a + t * d);
        qi.row(isa_, a + t * d, t, ly.gate, eps_, tmp);
      });
      // In panel GEMMs the GLU is applied to each panel's outputs ([T, I] written, never [T, 2I]);
      // otherwise, where the up rows start on a row group, to each chunk's gate and up rows.
      const bool fused_glu = uses_panels(isa_, T) && I % kPanelRows == 0;
      LinearJob gj = qi.job(ly.gate, T, big, fused_glu ? I : 2 * I);
      if (fused_glu) {
        gj.glu = I;
        run_linears(isa_, threads_, &gj, 1);
      } else if (!uses_panels(isa_, T) && I % kRows == 0) {
        LinearJob halves[2] = {gj, gj};
        halves[0].N = halves[1].N = I;
        halves[1].W += I / kRows * gj.Kpad;
        halves[1].Y += I;
        run_aligned_linears(isa_, threads_, halves, 2, [&](int64_t n0, int64_t n1) {
          for (int64_t t = 0; t < T; ++t) {
            float *y = big + t * 2 * I;
            glu_pairs(isa_, y + n0, y + I + n0, n1 - n0, y + n0);
          }
        });
      } else {
        run_linears(isa_, threads_, &gj, 1);
        for_ranges(threads_, T, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) glu_row(isa_, big + t * 2 * I, I, big + t * 2 * I);
        });
      }
      qi.fill(isa_, big, T, fused_glu ? I : 2 * I, ly.down, eps_, threads_);
      const LinearJob dj = qi.job(ly.down, T, fi, d);
      run_linears(isa_, threads_, &dj, 1);
    }
    const int64_t t0 = T - R;
    for (int64_t t = 0; t < R; ++t) {
      if (L > 0) add_row(h + (t0 + t) * d, fi + (t0 + t) * d);
      rmsnorm_row(isa_, h + (t0 + t) * d, norm_.data(), d, eps_, a + t * d);
    }
    qi.fill(isa_, a, R, d, head_[0], eps_, threads_);
    const LinearJob hj = qi.job(head_[0], R, lg, V_);
    run_linears(isa_, threads_, &hj, 1);
  }

 private:
  void check_emb(size_t v, size_t d) {
    if ((int64_t)v != V_ || (int64_t)d != d_) throw std::invalid_argument("embedding shape does not match the config");
  }
  // fn(t, tmp) for every token t, split by tokens over the pool; tmp holds 2 I floats (any linear's K).
  template <class F>
  void per_token(int64_t T, F &&fn) {
    for_ranges(threads_, T, [&](int64_t t0, int64_t t1) {
      thread_local LineVec<float> tmp;
      tmp.resize(std::max(tmp.size(), (size_t)(2 * std::max(I_, d_))));
      for (int64_t t = t0; t < t1; ++t) fn(t, tmp.data());
    });
  }
  // h += x over one row of width d.
  void add_row(float *h, const float *x) const {
    for (int64_t k = 0; k < d_; ++k) h[k] += x[k];
  }
  void embed(int64_t id, float *out) const {
    if (emb_is_bf16_) {
      const uint16_t *row = emb_bf16_.data() + id * d_;
      for (int64_t k = 0; k < d_; ++k) {
        const uint32_t bits = (uint32_t)row[k] << 16;
        std::memcpy(out + k, &bits, 4);
      }
    } else {
      std::memcpy(out, emb_f32_.data() + id * d_, (size_t)d_ * 4);
    }
  }

  int64_t V_, d_, I_;
  double eps_;
  Isa isa_;
  int threads_;
  bool emb_is_bf16_ = false;
  Arr<const float, nb::ndim<2>> emb_f32_;
  Arr<const uint16_t, nb::ndim<2>> emb_bf16_;
  Arr<const float, nb::ndim<1>> norm_;
  std::vector<PackedLinear> head_;
  std::vector<Layer> layers_;
  std::mutex busy_;  // one forward at a time per engine (scratch is shared)
  LineVec<float> h_, a_, fi_, ff_, fg_, big_;
  QBuf qi_, qf_, qg_;
};

// ---------------------------------------------------------------------------------------------
// Streaming read bandwidth (GB/s): each thread sums its slice of a large buffer, best of `reps`. Reps
// alternate a plain load loop and one that prefetches into L2 4 KiB ahead like the GEMV (which beat the
// plain loop on a Sapphire Rapids host), so the roofline is the faster of the two ways to stream memory.
template <bool kPrefetch>
__attribute__((target("avx2,fma"))) uint64_t read_slice_avx2(const uint8_t *p, size_t n) {
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

double read_bandwidth(int64_t nbytes, int threads, int reps) {
  nb::gil_scoped_release release;
  const size_t n = (size_t)nbytes / 4096 * 4096;
  uint8_t *buf = static_cast<uint8_t *>(std::aligned_alloc(4096, n));
  if (!buf) throw std::bad_alloc();
  for (size_t i = 0; i < n; i += 64) buf[i] = (uint8_t)i;  // touch every page
  const bool avx2 = cpu_features().avx2;
  Pool &pool = get_pool(threads);
  std::atomic<uint64_t> sink{0};
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const int nt = pool.size();
    pool.run_chunks(nt, [&](int64_t c) {
      const size_t a = n / 4096 * c / nt * 4096, b = n / 4096 * (c + 1) / nt * 4096;
      sink += !avx2 ? read_slice_scalar(buf + a, b - a)
              : r % 2 ? read_slice_avx2<true>(buf + a, b - a)
                      : read_slice_avx2<false>(buf + a, b - a);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, (double)n / s / 1e9);
  }
  std::free(buf);
  return best;
}

}  // namespace

void register_ternary(nb::module_ &m) {
  nb::class_<PackedLinear>(m, "PackedLinear", "A packed T2R4 ternary weight [N, K] with its scale and RMSNorm weight.")
      .def(nb::init<Arr<const uint8_t, nb::ndim<2>>, int64_t, int64_t, double, Arr<const float, nb::ndim<1>>>(),
           nb::arg("packed"), nb::arg("n"), nb::arg("k"), nb::arg("scale"), nb::arg("norm"))
      .def_ro("n", &PackedLinear::N)
      .def_ro("k", &PackedLinear::K)
      .def_ro("scale", &PackedLinear::scale);

  nb::class_<Engine>(m, "Engine", "Whole MMfree forward on packed weights (prefill T tokens or decode 1).")
      .def(nb::init<int64_t, int64_t, int64_t, double, const std::string &, int>(), nb::arg("vocab_size"),
           nb::arg("hidden_size"), nb::arg("intermediate_size"), nb::arg("eps"), nb::arg("backend"),
           nb::arg("threads"))
      .def("set_embedding_f32", &Engine::set_embedding_f32)
      .def("set_embedding_bf16", &Engine::set_embedding_bf16)
      .def("set_head", &Engine::set_head)
      .def("add_layer", &Engine::add_layer)
      .def("forward", &Engine::forward, nb::arg("ids"), nb::arg("state"), nb::arg("logits"), nb::arg("all_logits"))
      .def_prop_ro("num_layers", &Engine::num_layers);

  m.def(
      "ternary_matmul",
      [](Arr<const uint8_t, nb::ndim<2>> packed, int64_t n, Arr<const int8_t, nb::ndim<2>> q,
         Arr<const int32_t, nb::ndim<1>> sumq, Arr<int32_t, nb::ndim<2>> out, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t Kpad = (int64_t)q.shape(1), T = (int64_t)q.shape(0);
        if (Kpad % kBlock || (int64_t)packed.shape(1) != Kpad || (int64_t)packed.shape(0) != (n + kRows - 1) / kRows)
          throw std::invalid_argument("packed / activation shapes do not match");
        if ((int64_t)sumq.shape(0) != T || (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != n)
          throw std::invalid_argument("sumq / out shapes do not match");
        const LinearJob j{packed.data(), n, Kpad, 1.0f, q.data(), sumq.data(), nullptr, T, nullptr, out.data(), n};
        nb::gil_scoped_release release;
        run_linears(isa, threads, &j, 1);
      },
      nb::arg("packed"), nb::arg("n"), nb::arg("q"), nb::arg("sumq"), nb::arg("out"), nb::arg("backend"),
      nb::arg("threads"), "Exact out[t, n] = sum_k trit[n, k] * q[t, k] on packed T2R4 weights.");

  m.def(
      "bitlinear",
      [](const PackedLinear &p, Arr<const float, nb::ndim<2>> x, Arr<float, nb::ndim<2>> out, double eps,
         const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0);
        if ((int64_t)x.shape(1) != p.K || (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != p.N)
          throw std::invalid_argument("x / out shapes do not match the linear");
        nb::gil_scoped_release release;
        QBuf qb;
        qb.fill(isa, x.data(), T, p.K, p, eps, threads);
        const LinearJob j = qb.job(p, T, out.data(), p.N);
        run_linears(isa, threads, &j, 1);
      },
      nb::arg("linear"), nb::arg("x"), nb::arg("out"), nb::arg("eps"), nb::arg("backend"), nb::arg("threads"),
      "BitLinear on packed weights: RMSNorm -> int8 per-token quant -> ternary matmul -> scales.");

  m.def(
      "rmsnorm_quant",
      [](Arr<const float, nb::ndim<2>> x, Arr<const float, nb::ndim<1>> w, double eps, Arr<int8_t, nb::ndim<2>> q,
         Arr<float, nb::ndim<1>> a_scale, Arr<int32_t, nb::ndim<1>> sumq, const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0), K = (int64_t)x.shape(1), Kpad = (int64_t)q.shape(1);
        if ((int64_t)w.shape(0) != K || (int64_t)q.shape(0) != T || Kpad < K || (int64_t)a_scale.shape(0) != T ||
            (int64_t)sumq.shape(0) != T)
          throw std::invalid_argument("rmsnorm_quant shapes do not match");
        nb::gil_scoped_release release;
        LineVec<float> tmp((size_t)K);
        for (int64_t t = 0; t < T; ++t)
          rmsnorm_quant_row(isa, x.data() + t * K, w.data(), K, Kpad, eps, tmp.data(), q.data() + t * Kpad,
                            a_scale.data() + t, sumq.data() + t);
      },
      nb::arg("x"), nb::arg("w"), nb::arg("eps"), nb::arg("q"), nb::arg("a_scale"), nb::arg("sumq"), nb::arg("backend"),
      "Fused RMSNorm + per-token absmax int8 quantization (round half to even), zero-padded to q's width.");

  m.def(
      "mlgru_step",
      [](Arr<const float, nb::ndim<2>> fi, Arr<const float, nb::ndim<2>> ff, Arr<const float, nb::ndim<2>> fg,
         Arr<const float, nb::ndim<1>> lb, bool has_lb, Arr<const float, nb::ndim<1>> gnorm, double eps,
         Arr<float, nb::ndim<1>> state, Arr<float, nb::ndim<2>> out, const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)fi.shape(0), d = (int64_t)fi.shape(1);
        for (auto *a : {&fi, &ff, &fg})
          if ((int64_t)a->shape(0) != T || (int64_t)a->shape(1) != d) throw std::invalid_argument("gate shapes differ");
        if ((int64_t)lb.shape(0) != d || (int64_t)gnorm.shape(0) != d || (int64_t)state.shape(0) != d ||
            (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != d)
          throw std::invalid_argument("mlgru_step shapes do not match");
        std::vector<float> silu_s((size_t)d);  // the engine's two phases (phase 1 overwrites its gate input)
        for (int64_t t = 0; t < T; ++t) {
          std::memcpy(silu_s.data(), fi.data() + t * d, (size_t)d * 4);
          mlgru_state(isa, silu_s.data(), ff.data() + t * d, has_lb ? lb.data() : nullptr, 0, d, state.data(), 1, d);
          mlgru_out(isa, fg.data() + t * d, gnorm.data(), d, eps, silu_s.data(), out.data() + t * d);
        }
      },
      nb::arg("fi"), nb::arg("ff"), nb::arg("fg"), nb::arg("lb"), nb::arg("has_lb"), nb::arg("g_norm"), nb::arg("eps"),
      nb::arg("state"), nb::arg("out"), nb::arg("backend"), "MLGRU recurrence over T tokens + gated, normed output (fp32).");

  m.def(
      "glu_step",
      [](Arr<const float, nb::ndim<2>> gate_up, Arr<float, nb::ndim<2>> out, const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)gate_up.shape(0), I = (int64_t)out.shape(1);
        if ((int64_t)gate_up.shape(1) != 2 * I || (int64_t)out.shape(0) != T)
          throw std::invalid_argument("glu_step shapes do not match");
        for (int64_t t = 0; t < T; ++t) glu_row(isa, gate_up.data() + t * 2 * I, I, out.data() + t * I);
      },
      nb::arg("gate_up"), nb::arg("out"), nb::arg("backend"), "z = silu(gate) * up with gate, up = the two halves of gate_up.");

  m.def(
      "set_amx",
      [](bool on) {
        if (on && !cpu_features().amx_int8)
          throw std::invalid_argument("AMX-INT8 is not available on this CPU / OS");
        return amx_switch().exchange(on);
      },
      nb::arg("on"),
      "Use AMX tiles for ternary GEMMs of >= 16 tokens on the avx512 backend (default: on where the CPU and OS allow, "
      "unless MULFREE_AMX=0); returns the previous setting.");

  m.def("read_bandwidth", &read_bandwidth, nb::arg("nbytes"), nb::arg("threads"), nb::arg("reps"),
        "Streaming read bandwidth in GB/s over a buffer of nbytes (best of reps).");
}
