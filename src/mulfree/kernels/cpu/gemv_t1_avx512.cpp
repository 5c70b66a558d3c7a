// T1R4 GEMV tiles, AVX-512 VNNI tier: 4 rows x 1-4 tokens, and no base-3 digit is ever formed.
//
// The digit step of formats/t1.h is 3 m_j = 256 c_j + m_(j+1) (m_0 the byte, every m_j a byte), so for a digit
// vector lined up with its activations q_j, sum c_j q_j = (3 sum m_j q_j - sum m_(j+1) q_j) / 256: two vpdpbusd
// per digit (the bytes m as the unsigned operand, the int8 activations as they are), and m steps by two byte adds.
// Each int32 lane of 3 S - T is 256 times the dot of its own four codes, so the shift is exact; vpdpbusd wraps, and
// a lane's true value stays below 2^31 for up to 1638 blocks, so the accumulators are folded every 1024 blocks.
// The codes are trit + 1, so sum trit * q = sum c * q - sum q.
#include "gemv.h"

namespace ternary {
namespace {

constexpr int64_t kT1PrefetchBytes = kPrefetchBlocks * kBlock;  // 4 KiB ahead along the rows, as the other tiles
constexpr int64_t kFoldBlocks = 1024;                            // blocks between two folds of S and T
constexpr int kPairs = t1::kRows / 2;                            // one zmm holds two rows of a block

// The 32 activations of digit j of block b, in both 256-bit halves (one per row of a pair).
__attribute__((target(MF_AVX512), always_inline)) inline __m512i digit_acts(const int8_t *x) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x));
}

// Rows of one row group against NT tokens: out[n * ldo + r] = sum_k trit[r, k] * X[n * ldx + k].
// One token has too few accumulators to hide the vpdpbusd latency, so it keeps two sets (even and odd digits).
template <int NT>
__attribute__((target(MF_AVX512), always_inline)) inline void group_t1_avx512(const uint8_t *W, int64_t Kpad,
                                                                              const int8_t *X, int64_t ldx,
                                                                              const int32_t *sumq, int32_t *out,
                                                                              int64_t ldo) {
  constexpr int kSets = NT == 1 ? 2 : 1;
  __m512i dot[kPairs][NT];  // sum c * q per lane, folded
  #pragma GCC unroll 2
  for (int p = 0; p < kPairs; ++p)
    #pragma GCC unroll 4
    for (int n = 0; n < NT; ++n) dot[p][n] = _mm512_setzero_si512();
  const int64_t nb = Kpad / t1::kBlock;
  for (int64_t b0 = 0; b0 < nb; b0 += kFoldBlocks) {
    __m512i S[kPairs][NT][kSets], T[kPairs][NT][kSets];
    #pragma GCC unroll 2
    for (int p = 0; p < kPairs; ++p)
      #pragma GCC unroll 4
      for (int n = 0; n < NT; ++n)
        #pragma GCC unroll 2
        for (int s = 0; s < kSets; ++s) S[p][n][s] = T[p][n][s] = _mm512_setzero_si512();
    for (int64_t b = b0; b < std::min(nb, b0 + kFoldBlocks); ++b) {
      const uint8_t *wb = W + b * (int64_t)sizeof(t1::Block);
      prefetch_line_l2(wb + kT1PrefetchBytes);
      prefetch_line_l2(wb + kT1PrefetchBytes + 64);
      const int8_t *xb = X + b * t1::kBlock;
      #pragma GCC unroll 2
      for (int p = 0; p < kPairs; ++p) {
        __m512i m = _mm512_loadu_si512(wb + p * 2 * t1::kRowBytes);
        #pragma GCC unroll 5
        for (int j = 0; j < t1::kTrits; ++j) {
          const __m512i next = _mm512_add_epi8(_mm512_add_epi8(m, m), m);
          #pragma GCC unroll 4
          for (int n = 0; n < NT; ++n) {
            const __m512i q = digit_acts(xb + n * ldx + j * t1::kRowBytes);
            S[p][n][j % kSets] = _mm512_dpbusd_epi32(S[p][n][j % kSets], m, q);
            T[p][n][j % kSets] = _mm512_dpbusd_epi32(T[p][n][j % kSets], next, q);
          }
          m = next;
        }
      }
    }
    #pragma GCC unroll 2
    for (int p = 0; p < kPairs; ++p)
      #pragma GCC unroll 4
      for (int n = 0; n < NT; ++n)
        #pragma GCC unroll 2
        for (int s = 0; s < kSets; ++s) {
          const __m512i three_s = _mm512_add_epi32(_mm512_slli_epi32(S[p][n][s], 1), S[p][n][s]);
          dot[p][n] = _mm512_add_epi32(dot[p][n], _mm512_srai_epi32(_mm512_sub_epi32(three_s, T[p][n][s]), 8));
        }
  }
  #pragma GCC unroll 4
  for (int n = 0; n < NT; ++n) {
    alignas(16) int32_t rows[t1::kRows];
    store_row_sums_avx2(_mm512_castsi512_si256(dot[0][n]), _mm512_extracti64x4_epi64(dot[0][n], 1),
                        _mm512_castsi512_si256(dot[1][n]), _mm512_extracti64x4_epi64(dot[1][n], 1), rows);
    _mm_storeu_si128((__m128i *)(out + n * ldo),
                     _mm_sub_epi32(_mm_load_si128((const __m128i *)rows), _mm_set1_epi32(sumq[n])));
  }
}

template <int NT>
__attribute__((target(MF_AVX512))) void tile_t1_avx512(const uint8_t *W, int64_t Kpad, int64_t ngroups,
                                                         const int8_t *X, int64_t ldx, const int32_t *sumq,
                                                         const int32_t *, int32_t *out, int64_t ldo) {
  const int64_t gb = t1::group_bytes(Kpad);
  for (int64_t g = 0; g < ngroups; ++g)
    group_t1_avx512<NT>(W + g * gb, Kpad, X, ldx, sumq, out + g * t1::kRows, ldo);
}

}  // namespace

extern const TileSetT1 kGemvT1Avx512 = {
    4, {tile_t1_avx512<1>, tile_t1_avx512<2>, tile_t1_avx512<3>, tile_t1_avx512<4>}};

}  // namespace ternary
