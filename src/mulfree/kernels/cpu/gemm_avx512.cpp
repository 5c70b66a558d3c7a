// Panel GEMM, AVX-512 VNNI tier (also the unpack and finishing steps of the AMX tier).
#include "elementwise.h"
#include "gemm.h"

#include <array>
#include <utility>

namespace ternary {
namespace {

// VNNI panels: the panel's unpack pays off from about 12 tokens; below, the 4-row GEMV tiles win (docs/packed.md).
constexpr int64_t kVnniPanelMinTokens = 12;
constexpr int kVnniTokens = 12;  // tokens per VNNI block: 2 x 12 accumulators + 2 codes + 1 quad

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

template <int... N>
constexpr std::array<PanelBlockFn, sizeof...(N)> vnni_blocks(std::integer_sequence<int, N...>) {
  return {vnni_block<N + 1>...};
}
constexpr auto kVnniBlocks = vnni_blocks(std::make_integer_sequence<int, kVnniTokens>{});

// 16 float outputs of a C tile row: (c - sum q) * (s_x * s_w) -- (s_x * s_w) in fp32, then one product: the
// torch BitLinear's own order.
__attribute__((target(MF_AVX512), always_inline)) inline __m512 panel_dequant(const int32_t *c, __m512i sq, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c), sq)), s);
}

}  // namespace

__attribute__((target(MF_AVX512))) void unpack_panel_avx512(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0,
                                                             int64_t b0, int64_t b1, int8_t *B) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0; i < 2; ++i) {
      __m512i r[16];
      for (int nn = 0; nn < 16; ++nn) {  // row 16 i + nn = row group 4 i + nn / 4, row nn % 4
        const int64_t g = g0 + 4 * i + nn / 4;
        r[nn] = g < G ? _mm512_loadu_si512(W + g * Kpad + b * kBlock + (nn % 4) * 64)
                      : _mm512_set1_epi8((char)t2r4::kZeroByte);
      }
      transpose16x16_epi32(r);
      for (int s = 0; s < 4; ++s) {
        int8_t *dst = B + ((4 * (b - b0) + s) * 2 + i) * kTileBytes;
        for (int kq = 0; kq < 16; ++kq)
          _mm512_storeu_si512(dst + kq * 64, _mm512_and_si512(_mm512_srli_epi16(r[kq], 2 * s), m3));
      }
    }
}

// 16 outputs per vector, masked at the matrix edge.
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

// With the GLU of elementwise.h inlined, as glu_pairs would run it on AVX-512.
MF_VEC __attribute__((target(MF_AVX512))) void panel_finish_glu_avx512(const LinearJob &j, const int32_t *Cg,
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
      glu_pairs_impl(g, u, kPanelRows, j.Y + t * j.ldy + n0);
    }
}

extern const PanelTier kPanelAvx512 = {
    kVnniPanelMinTokens, prepare_none,       tiles_none, tiles_none, unpack_panel_avx512, multiply_blocks,
    panel_finish_avx512, panel_finish_glu_avx512, kVnniBlocks.data(), kVnniTokens};

}  // namespace ternary
