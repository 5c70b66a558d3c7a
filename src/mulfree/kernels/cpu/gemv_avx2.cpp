// GEMV tiles, AVX2 tier (vpmaddubsw + vpmaddwd): 4 rows x 1-2 tokens.
#include "gemv.h"

namespace ternary {
namespace {

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
  __m256i acc[kRows][NT] = {};
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
      __m256i s1[NT] = {}, s4[NT] = {};
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

template <int NT>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X,
                                                     int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avx2<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}

}  // namespace

extern const TileSet kGemvAvx2 = {2, {tile_avx2<1>, tile_avx2<2>}};

}  // namespace ternary
