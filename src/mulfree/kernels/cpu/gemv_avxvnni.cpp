// GEMV tiles, AVX-VNNI tier (256-bit vpdpbusd; Intel client cores since Alder Lake): 4 rows x 1-2 tokens.
// Built only with a compiler that has the AVX-VNNI intrinsics (MF_HAVE_AVXVNNI); the table falls back to AVX2.
#include "gemv.h"

#if MF_HAVE_AVXVNNI
namespace ternary {
namespace {

// Decode: as the AVX-512 decode, bit pairs masked in place, but with 16 ymm registers one accumulator per row
// for pairs 0/2 (c) and one for 1/3 (4c), pairs 2/3 from v >> 4; the 4c sums are divided by 4 at the end
// (exact). More tokens: each bit pair shifted down, one accumulator per row and token.
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

template <int NT>
__attribute__((target("avx2,fma,avxvnni"))) void tile_avxvnni(const uint8_t *W, int64_t Kpad, int64_t ngroups,
                                                                const int8_t *X, int64_t ldx, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_avxvnni<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}

}  // namespace

extern const TileSet kGemvAvxVnni = {2, {tile_avxvnni<1>, tile_avxvnni<2>}};

}  // namespace ternary
#endif  // MF_HAVE_AVXVNNI
