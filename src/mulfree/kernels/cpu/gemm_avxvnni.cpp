// Panel GEMM, AVX-VNNI tier (256-bit vpdpbusd); the unpack and finishing steps are AVX2's (gemm_avx2.cpp).
// Built only with a compiler that has the AVX-VNNI intrinsics (MF_HAVE_AVXVNNI); the driver falls back to AVX2.
#include "gemm.h"

#if MF_HAVE_AVXVNNI
#include <array>

namespace ternary {
namespace {

// AVX-VNNI panels overtake its GEMV tiles from about 8 tokens of a batch (docs/packed.md).
constexpr int64_t kAvxVnniPanelMinTokens = 8;

// The 256-bit form of the VNNI block (gemm_avx512.cpp), one 16-row tile (2 ymm of 8 rows x 4 codes) at a time.
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
        const int8_t *row = B + (((ks - ks0) * 2 + i) * 16 + kq) * 64;  // 2 halves of 8 rows x 4 codes
        const __m256i b[2] = {ld256(row), ld256(row + 32)};
        #pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) {
          const __m256i a = _mm256_set1_epi32(act_quad(q + t * ldq, ks, kq));
          acc[t][0] = _mm256_dpbusd_avx_epi32(acc[t][0], b[0], a);
          acc[t][1] = _mm256_dpbusd_avx_epi32(acc[t][1], b[1], a);
        }
      }
    #pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
      for (int h = 0; h < 2; ++h) _mm256_storeu_si256((__m256i *)(C + c_offset(t0 + t) + 256 * i + 8 * h), acc[t][h]);
  }
}

constexpr std::array<PanelBlockFn, kYmmTokens> kAvxVnniBlocks = {avxvnni_block<1>, avxvnni_block<2>,
                                                                avxvnni_block<3>, avxvnni_block<4>};

}  // namespace

extern const PanelTier kPanelAvxVnni = {
    kAvxVnniPanelMinTokens, prepare_none,          tiles_none, tiles_none, unpack_panel_avx2, multiply_blocks,
    panel_finish_avx2,      panel_finish_glu_avx2, kAvxVnniBlocks.data(), kYmmTokens};

}  // namespace ternary
#endif  // MF_HAVE_AVXVNNI
