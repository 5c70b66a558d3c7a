// T1R4 GEMV tiles, AVX2 tier (vpcmpgtb + vpmaddubsw): 4 rows x 1-2 tokens. AVX-VNNI and AVX-512 hosts run these too:
// the base-3 decode, not the dot product, is the work here.
#include "gemv.h"

namespace ternary {
namespace {

constexpr int64_t kT1PrefetchBytes = kPrefetchBlocks * kBlock;  // 4 KiB ahead along the rows, as the T2R4 tiles

// Rows of one row group against NT tokens of biased activations xb = q + 128 (u8).
//
// Per 32-byte row load, digit j of every byte comes from m_j = byte * 3^j mod 256 (formats/t1.h) kept as
// s_j = m_j ^ 0x80 (signed m_j - 128; s_(j+1) = 3 s_j mod 256 as well, since 3 * 128 = 128 mod 256): the trit is
// [s < -42] - [s > 42] from two compares (masks -1 / 0), i.e. -1 for m < 86, +1 for m >= 171. vpmaddubsw takes
// the activations as the unsigned operand and the trits as the signed one, so no code + 1 is formed: the sum is
// sum t * (q + 128) = sum t * q + 128 * wsum (wsum: the row's trit sum, precomputed), which the store undoes.
// int16 sums: |t * xb + t * xb| <= 510 per pair, 5 per block (<= 2550), widened once per block by vpmaddwd.
template <int NT>
__attribute__((target("avx2,fma"), always_inline)) inline void group_t1_avx2(const uint8_t *W, int64_t Kpad,
                                                                             const uint8_t *XB, const int32_t *wsum,
                                                                             int32_t *out, int64_t ldo) {
  __m256i acc[t1::kRows][NT] = {};
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  const __m256i lo = _mm256_set1_epi8(-42), hi = _mm256_set1_epi8(42);
  const int64_t nb = Kpad / t1::kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t *wb = W + b * (int64_t)sizeof(t1::Block);
    prefetch_line_l2(wb + kT1PrefetchBytes);
    prefetch_line_l2(wb + kT1PrefetchBytes + 64);
    const uint8_t *xb = XB + b * t1::kBlock;
    #pragma GCC unroll 4
    for (int r = 0; r < t1::kRows; ++r) {
      __m256i s = _mm256_xor_si256(ld256(wb + r * t1::kRowBytes), flip);
      __m256i sum[NT];
      #pragma GCC unroll 5
      for (int j = 0; j < t1::kTrits; ++j) {
        const __m256i t = _mm256_sub_epi8(_mm256_cmpgt_epi8(lo, s), _mm256_cmpgt_epi8(s, hi));
        #pragma GCC unroll 2
        for (int n = 0; n < NT; ++n) {
          const __m256i p = _mm256_maddubs_epi16(ld256(xb + n * Kpad + 32 * j), t);
          sum[n] = j ? _mm256_add_epi16(sum[n], p) : p;
        }
        if (j + 1 < t1::kTrits) s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
      }
      #pragma GCC unroll 2
      for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(sum[n], ones));
    }
  }
  const __m128i bias = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)wsum), 7);  // 128 * wsum
  #pragma GCC unroll 2
  for (int n = 0; n < NT; ++n) {
    alignas(16) int32_t rows[t1::kRows];
    store_row_sums_avx2(acc[0][n], acc[1][n], acc[2][n], acc[3][n], rows);
    _mm_storeu_si128((__m128i *)(out + n * ldo), _mm_sub_epi32(_mm_load_si128((const __m128i *)rows), bias));
  }
}

template <int NT>
__attribute__((target("avx2,fma"))) void tile_t1_avx2(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X,
                                                        int64_t ldx, const int32_t *, const int32_t *wsum, int32_t *out,
                                                        int64_t ldo) {
  // The activations as unsigned q + 128, once per tile call (Kpad bytes per token against 64 rows of weights).
  thread_local LineVec<uint8_t> biased;
  biased.resize((size_t)(NT * Kpad));
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  for (int n = 0; n < NT; ++n)
    for (int64_t k = 0; k < Kpad; k += 32)
      _mm256_storeu_si256((__m256i *)(biased.data() + n * Kpad + k), _mm256_xor_si256(ld256(X + n * ldx + k), flip));
  const int64_t gb = t1::group_bytes(Kpad);
  for (int64_t g = 0; g < ngroups; ++g)
    group_t1_avx2<NT>(W + g * gb, Kpad, biased.data(), wsum + g * t1::kRows, out + g * t1::kRows, ldo);
}

}  // namespace

extern const TileSetT1 kGemvT1Avx2 = {2, {tile_t1_avx2<1>, tile_t1_avx2<2>}};

}  // namespace ternary
