// The elementwise steps of elementwise.h, each written once (NAME_impl) and compiled for every ISA tier, so the
// loops vectorize with the widest registers the chosen backend allows.
#include "elementwise.h"

#include <immintrin.h>

#include <algorithm>

namespace ternary {

// ---------------------------------------------------------------------------------------------
// Float steps (rms_factor: elementwise.h).
MF_INLINE void rmsnorm_row_impl(const float *x, const float *w, int64_t K, double eps, float *out) {
  const float r = rms_factor(x, K, eps);
  for (int64_t k = 0; k < K; ++k) out[k] = x[k] * r * w[k];
}
MF_ISA_VARIANTS(rmsnorm_row, (const float *x, const float *w, int64_t K, double eps, float *out), (x, w, K, eps, out))

// Scalar tails of quant_row_*: amax over [k0, K) and q / sum over [k0, K).
// A NaN anywhere makes the max NaN (so the scale is NaN and the output shows it, as torch's amax does).
static inline float absmax_tail(const float *x, int64_t k0, int64_t K, float m) {
  for (int64_t k = k0; k < K; ++k) m = x[k] != x[k] ? x[k] : std::max(m, std::fabs(x[k]));
  return m;
}
static inline int32_t quant_tail(const float *x, int64_t k0, int64_t K, float inv, int8_t *q) {
  int32_t s = 0;
  for (int64_t k = k0; k < K; ++k) {
    const int32_t qi = (int32_t)std::min(127.f, std::max(-128.f, std::nearbyint(x[k] * inv)));
    q[k] = (int8_t)qi;
    s += qi;
  }
  return s;
}

// q = round_half_even(xhat * inv), inv = 127 * (1 / max(|xhat|max, 1e-5)) as torch evaluates `127.0 / t`
// (a reciprocal, then the product), clamped to int8; returns sum q. Max is exact in any order and each element
// is rounded alone, so every ISA gives identical bytes, and the bytes and scales of the torch references.
using QuantFn = int32_t (*)(const float *x, int64_t K, float *inv_out, int8_t *q);

static int32_t quant_row_scalar(const float *x, int64_t K, float *inv_out, int8_t *q) {
  const float inv = 127.0f * (1.0f / std::max(absmax_tail(x, 0, K, 0.f), 1e-5f));
  *inv_out = inv;
  return quant_tail(x, 0, K, inv, q);
}

static __attribute__((target("avx2,fma"))) int32_t quant_row_avx2(const float *x, int64_t K, float *inv_out,
                                                                   int8_t *q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float mv[8];
  _mm256_store_ps(mv, m);
  float amax = absmax_tail(x, k, K, 0.f);
  for (float v : mv) amax = std::max(amax, v);
  if (_mm256_movemask_ps(nan)) amax = std::numeric_limits<float>::quiet_NaN();
  const float inv = 127.0f * (1.0f / std::max(amax, 1e-5f));
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

static __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) int32_t quant_row_avx512(const float *x,
                                                                                               int64_t K,
                                                                                               float *inv_out,
                                                                                               int8_t *q) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    m = _mm512_max_ps(m, _mm512_abs_ps(v));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float amax = absmax_tail(x, k, K, 0.f);
  amax = nan || amax != amax ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, _mm512_reduce_max_ps(m));
  const float inv = 127.0f * (1.0f / std::max(amax, 1e-5f));
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

void rmsnorm_quant_row(Isa isa, const float *x, const float *w, int64_t K, int64_t Kpad, double eps, float *tmp,
                       int8_t *q, float *a_scale, int32_t *sumq) {
  rmsnorm_row(isa, x, w, K, eps, tmp);
  static const QuantFn kQuant[4] = {quant_row_scalar, quant_row_avx2, quant_row_avx2, quant_row_avx512};  // by Isa
  float inv;
  *sumq = kQuant[(int)isa](tmp, K, &inv, q);
  std::memset(q + K, 0, (size_t)(Kpad - K));
  *a_scale = 1.0f / inv;
}

// ---------------------------------------------------------------------------------------------
// MLGRU time steps (math: nn/mlgru.py) in two phases, so that phase 1 can run per channel range and phase 2
// per token. The state update loops over the tokens inside one call per channel range (fewer calls).
MF_INLINE void mlgru_state_impl(float *fi, const float *ff, const float *lb, int64_t k0, int64_t k1, float *state,
                                int64_t T, int64_t ld, int64_t sld) {
  for (int64_t t = 0; t < T; ++t, fi += ld, ff += ld, state += sld)
    for (int64_t k = k0; k < k1; ++k) {
      float f = sigmoidf(ff[k]);
      if (lb) f = lb[k] + (1.0f - lb[k]) * f;
      const float i = siluf(fi[k]) * (1.0f - f);
      state[k] = f * state[k] + i;
      fi[k] = siluf(state[k]);
    }
}
MF_ISA_VARIANTS(mlgru_state,
                (float *fi, const float *ff, const float *lb, int64_t k0, int64_t k1, float *state, int64_t T, int64_t ld,
                 int64_t sld),
                (fi, ff, lb, k0, k1, state, T, ld, sld))

MF_INLINE void mlgru_out_impl(const float *fg, const float *gnorm, int64_t d, double eps, const float *silu_s,
                              float *out) {
  const float r = rms_factor(fg, d, eps);
  for (int64_t k = 0; k < d; ++k) out[k] = fg[k] * r * gnorm[k] * silu_s[k];
}
MF_ISA_VARIANTS(mlgru_out, (const float *fg, const float *gnorm, int64_t d, double eps, const float *silu_s, float *out),
                (fg, gnorm, d, eps, silu_s, out))

MF_ISA_VARIANTS(glu_pairs, (const float *g, const float *u, int64_t n, float *out), (g, u, n, out))
void glu_row(Isa isa, const float *gate_up, int64_t I, float *out) { glu_pairs(isa, gate_up, gate_up + I, I, out); }

}  // namespace ternary
