// Panel GEMM, AVX2 tier (vpmaddubsw), and the 256-bit unpack and finishing steps it shares with AVX-VNNI.
#include "elementwise.h"
#include "gemm.h"

#include <array>

namespace ternary {
namespace {

// AVX2 panels overtake the GEMV tiles from about 8 tokens of a batch (docs/packed.md).
constexpr int64_t kAvx2PanelMinTokens = 8;

// Transposes an 8 x 8 matrix of dwords held as 8 rows (column j ends in r[j]).
__attribute__((target("avx2"), always_inline)) inline void transpose8x8_epi32(__m256i r[8]) {
  __m256i u[8];
  for (int i = 0; i < 8; i += 4) {  // a 4 x 4 transpose in each lane: u[i + c] = columns c and c + 4 of rows i..
    const __m256i t0 = _mm256_unpacklo_epi32(r[i], r[i + 1]), t1 = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[i + 2], r[i + 3]), t3 = _mm256_unpackhi_epi32(r[i + 2], r[i + 3]);
    u[i] = _mm256_unpacklo_epi64(t0, t2);
    u[i + 1] = _mm256_unpackhi_epi64(t0, t2);
    u[i + 2] = _mm256_unpacklo_epi64(t1, t3);
    u[i + 3] = _mm256_unpackhi_epi64(t1, t3);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2x128_si256(u[c], u[c + 4], 0x31);
  }
}

// The 256-bit form of the VNNI block (gemm_avx512.cpp), one 16-row tile (2 ymm of 8 rows x 4 codes) at a time:
// vpmaddubsw gives int16 pair sums (|c q + c q| <= 512) that are summed over at most 4 k steps (64 quads:
// -32768 .. 32512, exact), then widened by vpmaddwd into the int32 C rows.
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

constexpr std::array<PanelBlockFn, kYmmTokens> kAvx2Blocks = {avx2_block<1>, avx2_block<2>, avx2_block<3>,
                                                             avx2_block<4>};

// One C tile row as outputs (plain loops gcc vectorizes).
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

}  // namespace

// unpack_panel_avx512 with 256-bit registers: the same layout from four 8 x 8 dword transposes per 16-row tile
// and row block.
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
            r[nn] = g < G ? ld256(W + g * Kpad + b * kBlock + (nn % 4) * 64 + 32 * dh)
                          : _mm256_set1_epi8((char)t2r4::kZeroByte);
          }
          transpose8x8_epi32(r);
          for (int s = 0; s < 4; ++s)
            for (int j = 0; j < 8; ++j)
              _mm256_storeu_si256((__m256i *)(B + (((4 * (b - b0) + s) * 2 + i) * 16 + 8 * dh + j) * 64 + 32 * rh),
                                  _mm256_and_si256(_mm256_srli_epi16(r[j], 2 * s), m3));
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

extern const PanelTier kPanelAvx2 = {
    kAvx2PanelMinTokens, prepare_none,          tiles_none, tiles_none, unpack_panel_avx2, multiply_blocks,
    panel_finish_avx2,   panel_finish_glu_avx2, kAvx2Blocks.data(), kYmmTokens};

}  // namespace ternary
