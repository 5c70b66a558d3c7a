// Kernel family 'shiftadd', one token, row groups narrower than a quad (group < 64 rows: Latency mode's 16-row
// scale sets): alpha scales each row's lookup sum, alpha * (lo + hi), term by term, instead of the tables, so a
// 16-row tile shifts 2 vectors per term instead of 4 (shiftadd.cpp has the wide groups and the driver).
#include "shiftadd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace shiftadd {
namespace {

// 2^e and the term's sign are one integer add to the float's bits (delta: e << 23, plus the sign
// bit when negative). Where the lookup's exponent field is 0 (the same rule as `nz`) the terms are
// garbage, and the sum is masked to 0 once at the end (no FP exceptions are unmasked).
__attribute__((target("avx2,fma"))) inline __m256 scale_rows_avx2(const Job &j, __m256 v, int64_t s0) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i zero_exp =
      _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
  __m256 out = _mm256_setzero_ps();
  for (int64_t t = 0; t < j.T; ++t) {
    if (j.signs[s0 + t] == 0) continue;
    out = _mm256_add_ps(out, _mm256_castsi256_ps(_mm256_add_epi32(bits, _mm256_set1_epi32(j.delta[s0 + t]))));
  }
  return _mm256_andnot_ps(_mm256_castsi256_ps(zero_exp), out);
}

// Tile B's (lo + hi) lookups of 8 rows from unscaled tables t[0..3] (lo 0-7, lo 8-15, hi 0-7, hi 8-15).
template <int B>
__attribute__((target("avx2,fma"))) inline __m256 lookup_rows_avx2(__m256i k, const __m256 *t) {
  const __m256i il = B == 0 ? k : _mm256_srli_epi32(k, 8 * B), sl = _mm256_slli_epi32(k, 28 - 8 * B);
  const __m256i ih = _mm256_srli_epi32(k, 8 * B + 4), sh = B == 3 ? k : _mm256_slli_epi32(k, 24 - 8 * B);
  return _mm256_add_ps(lookup16_avx2(il, sl, t[0], t[1]), lookup16_avx2(ih, sh, t[2], t[3]));
}

// Half h (8 lanes of each tile: 32 rows) of a quad whose tiles each lie in one narrow row group G[b]:
// 4 accumulators, 4 tables and the temporaries fit in 16 ymm, and 32-row work items balance threads.
__attribute__((target("avx2,fma"))) void quad_narrow_avx2(const Job &j, int64_t Q, const int64_t *G, int h) {
  __m256 acc[kQuad];
  for (int b = 0; b < kQuad; ++b) acc[b] = _mm256_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 64;
    const __m256 t[4] = {_mm256_loadu_ps(tb), _mm256_loadu_ps(tb + 8), _mm256_loadu_ps(tb + 16),
                         _mm256_loadu_ps(tb + 24)};
    for (int64_t i = 0; i < j.q; ++i) {
      const __m256i k = _mm256_loadu_si256((const __m256i *)(j.key_block(Q, c, i) + 32 * h));
      acc[0] = _mm256_add_ps(acc[0], scale_rows_avx2(j, lookup_rows_avx2<0>(k, t), j.term(c, G[0], i)));
      acc[1] = _mm256_add_ps(acc[1], scale_rows_avx2(j, lookup_rows_avx2<1>(k, t), j.term(c, G[1], i)));
      acc[2] = _mm256_add_ps(acc[2], scale_rows_avx2(j, lookup_rows_avx2<2>(k, t), j.term(c, G[2], i)));
      acc[3] = _mm256_add_ps(acc[3], scale_rows_avx2(j, lookup_rows_avx2<3>(k, t), j.term(c, G[3], i)));
    }
  }
  for (int b = 0; b < kQuad; ++b) {
    const int64_t r0 = Q * kQuadRows + b * kLanes + 8 * h, rows = std::min<int64_t>(8, j.N - r0);
    if (rows <= 0) break;
    alignas(32) float out[8];
    _mm256_store_ps(out, acc[b]);
    std::memcpy(j.y + r0, out, rows * sizeof(float));
  }
}

// Narrow row groups on AVX-512: tiles 2H and 2H + 1 of a quad (32 rows, as an AVX2 half), 16 lanes each. The
// 16-entry half tables are single vpermps operands (no blend), and alpha is added to each row's lookup sum as in
// scale_rows_avx2, the same operations per lane in the same order: bit-identical to it and to the oracle.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 scale_rows_avx512(const Job &j, __m512 v,
                                                                                     int64_t s0) {
  const __m512i bits = _mm512_castps_si512(v);
  const __mmask16 normal = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x7f800000));
  __m512 out = _mm512_setzero_ps();
  for (int64_t t = 0; t < j.T; ++t) {
    if (j.signs[s0 + t] == 0) continue;
    out = _mm512_add_ps(out, _mm512_castsi512_ps(_mm512_add_epi32(bits, _mm512_set1_epi32(j.delta[s0 + t]))));
  }
  return _mm512_maskz_mov_ps(normal, out);
}

template <int H>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quad_narrow_avx512(const Job &j, int64_t Q,
                                                                             const int64_t *G) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 64;
    const __m512 lo = _mm512_loadu_ps(tb), hi = _mm512_loadu_ps(tb + 16);
    for (int64_t i = 0; i < j.q; ++i) {
      const __m512i k = _mm512_loadu_si512(j.key_block(Q, c, i));
      acc0 = _mm512_add_ps(acc0, scale_rows_avx512(j, lookup_pair_avx512<2 * H>(k, lo, hi), j.term(c, G[2 * H], i)));
      acc1 = _mm512_add_ps(
          acc1, scale_rows_avx512(j, lookup_pair_avx512<2 * H + 1>(k, lo, hi), j.term(c, G[2 * H + 1], i)));
    }
  }
  const __m512 acc[2] = {acc0, acc1};
  for (int a = 0; a < 2; ++a) {
    const int64_t r0 = Q * kQuadRows + (2 * H + a) * kLanes, rows = std::min<int64_t>(kLanes, j.N - r0);
    if (rows <= 0) break;
    _mm512_mask_storeu_ps(j.y + r0, (__mmask16)((1u << rows) - 1), acc[a]);
  }
}

}  // namespace

void narrow_half(const Job &j, Isa isa, int64_t Q, const int64_t *G, int h) {
  if (isa == Isa::Avx512) return h ? quad_narrow_avx512<1>(j, Q, G) : quad_narrow_avx512<0>(j, Q, G);
  quad_narrow_avx2(j, Q, G, h);
}

}  // namespace shiftadd
