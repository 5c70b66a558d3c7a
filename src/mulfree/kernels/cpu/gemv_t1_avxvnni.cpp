// T1R4 GEMV tiles, AVX-VNNI tier (256-bit vpdpbusd; Intel client cores since Alder Lake): 4 rows x 1-2 tokens,
// the AVX-512 tier's digit-free sums (gemv_t1_avx512.cpp) one row per ymm. With 16 ymm registers a row group runs
// as two passes of two rows over its blocks (the group's bytes stay in L1 between them).
// Built only with a compiler that has the AVX-VNNI intrinsics (MF_HAVE_AVXVNNI); the table falls back to AVX2.
#include "gemv.h"

#if MF_HAVE_AVXVNNI
namespace ternary {
namespace {

constexpr int64_t kT1PrefetchBytes = kPrefetchBlocks * kBlock;  // 4 KiB ahead along the rows, as the other tiles
constexpr int64_t kFoldBlocks = 1024;                            // as the AVX-512 tier: exact below 1638 blocks

// Rows r0, r0 + 1 of one row group against NT tokens: dot[i][n] = 8 lanes of sum_k c * q of row r0 + i.
template <int NT>
__attribute__((target("avx2,fma,avxvnni"), always_inline)) inline void pair_t1_avxvnni(const uint8_t *W, int64_t Kpad,
                                                                                      int r0, const int8_t *X,
                                                                                      int64_t ldx,
                                                                                      __m256i (&dot)[2][NT]) {
  constexpr int kSets = NT == 1 ? 2 : 1;  // one token: even and odd digits apart, to hide the vpdpbusd latency
  const int64_t nb = Kpad / t1::kBlock;
  for (int64_t b0 = 0; b0 < nb; b0 += kFoldBlocks) {
    __m256i S[2][NT][kSets], T[2][NT][kSets];
    #pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
      #pragma GCC unroll 2
      for (int n = 0; n < NT; ++n)
        #pragma GCC unroll 2
        for (int s = 0; s < kSets; ++s) S[i][n][s] = T[i][n][s] = _mm256_setzero_si256();
    for (int64_t b = b0; b < std::min(nb, b0 + kFoldBlocks); ++b) {
      const uint8_t *wb = W + b * (int64_t)sizeof(t1::Block);
      if (r0 == 0) prefetch_line_l2(wb + kT1PrefetchBytes);
      else prefetch_line_l2(wb + kT1PrefetchBytes + 64);
      const int8_t *xb = X + b * t1::kBlock;
      __m256i m[2] = {ld256(wb + r0 * t1::kRowBytes), ld256(wb + (r0 + 1) * t1::kRowBytes)};
      #pragma GCC unroll 5
      for (int j = 0; j < t1::kTrits; ++j)
        #pragma GCC unroll 2
        for (int i = 0; i < 2; ++i) {
          const __m256i next = _mm256_add_epi8(_mm256_add_epi8(m[i], m[i]), m[i]);
          #pragma GCC unroll 2
          for (int n = 0; n < NT; ++n) {
            const __m256i q = ld256(xb + n * ldx + j * t1::kRowBytes);
            S[i][n][j % kSets] = _mm256_dpbusd_avx_epi32(S[i][n][j % kSets], m[i], q);
            T[i][n][j % kSets] = _mm256_dpbusd_avx_epi32(T[i][n][j % kSets], next, q);
          }
          m[i] = next;
        }
    }
    #pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
      #pragma GCC unroll 2
      for (int n = 0; n < NT; ++n)
        #pragma GCC unroll 2
        for (int s = 0; s < kSets; ++s) {
          const __m256i three_s = _mm256_add_epi32(_mm256_slli_epi32(S[i][n][s], 1), S[i][n][s]);
          dot[i][n] = _mm256_add_epi32(dot[i][n], _mm256_srai_epi32(_mm256_sub_epi32(three_s, T[i][n][s]), 8));
        }
  }
}

template <int NT>
__attribute__((target("avx2,fma,avxvnni"))) void tile_t1_avxvnni(const uint8_t *W, int64_t Kpad, int64_t ngroups,
                                                                 const int8_t *X, int64_t ldx, const int32_t *sumq,
                                                                 const int32_t *, int32_t *out, int64_t ldo) {
  const int64_t gb = t1::group_bytes(Kpad);
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i lo[2][NT], hi[2][NT];
    for (int i = 0; i < 2; ++i)
      for (int n = 0; n < NT; ++n) lo[i][n] = hi[i][n] = _mm256_setzero_si256();
    pair_t1_avxvnni<NT>(W + g * gb, Kpad, 0, X, ldx, lo);
    pair_t1_avxvnni<NT>(W + g * gb, Kpad, 2, X, ldx, hi);
    for (int n = 0; n < NT; ++n) {
      alignas(16) int32_t rows[t1::kRows];
      store_row_sums_avx2(lo[0][n], lo[1][n], hi[0][n], hi[1][n], rows);
      _mm_storeu_si128((__m128i *)(out + n * ldo + g * t1::kRows),
                       _mm_sub_epi32(_mm_load_si128((const __m128i *)rows), _mm_set1_epi32(sumq[n])));
    }
  }
}

}  // namespace

extern const TileSetT1 kGemvT1AvxVnni = {2, {tile_t1_avxvnni<1>, tile_t1_avxvnni<2>}};

}  // namespace ternary
#endif
