// GEMV tiles, AVX-512 VNNI tier (512-bit vpdpbusd): 4 rows x 1-4 tokens.
#include "gemv.h"

namespace ternary {
namespace {

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

template <int NT>
__attribute__((target(MF_AVX512))) void tile_avx512(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X,
                                                    int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avx512<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}

}  // namespace

extern const TileSet kGemvAvx512 = {4, {tile_avx512<1>, tile_avx512<2>, tile_avx512<3>, tile_avx512<4>}};

}  // namespace ternary
