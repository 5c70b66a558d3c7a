// Kernel family 'shiftadd', one token: the ShiftAddLLM lookup-table GEMV for Latency-mode BCQ weights
// (reference: mulfree.ops.bcq.bcq_lut_gemv; storage format in ops/bcq.py).
//
// y[n] = sum_c sum_i alpha_i(c, n/g) * LUT_c[key_i(n, c)], LUT_c[key] = sum_s (bit s ? +x : -x)[8c+s].
// The 256-entry table is split in two 16-entry halves (low/high nibble of the key, 4 activations
// each), built with sign flips and adds; alpha = sum_t sign_t 2^exp_t is applied to the two half
// tables of each (chunk, row group, plane) with exponent shifts (ldexp / vscalefps / exponent-field
// add) and adds, then every row adds one lookup per half. No multiplication touches a weight.
//
// Kernel weight layout: shiftadd.h.
// Every path adds, per row, chunk by chunk and plane by plane, (lo + hi) of tables scaled term by
// term, so scalar, AVX2 and AVX-512 agree bit for bit on normal numbers. Row groups narrower than a
// quad (group < 64) scale the row's lookup sum instead: alpha * (lo + hi), term by term.
// With 16-row groups that halves the shift work, which dominates there.
#include "shiftadd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace shiftadd {
namespace {

constexpr int kPrefetchChunks = 4;           // AVX-512 key prefetch distance in chunks (hides the key stream's latency)

// Signed sums of 4 activations for all 16 sign patterns: t[j] = ((±x0 + ±x1) + ±x2) + ±x3,
// + where bit s of j is set, then the negated copy. The same expression order is used by every path.
void build_tables(const float *x, int64_t K, int64_t C, float *tables) {
  for (int64_t c = 0; c < C; ++c) {
    float xs[8];
    for (int s = 0; s < 8; ++s) {
      const int64_t k = 8 * c + s;
      xs[s] = k < K ? x[k] : 0.0f;
    }
    float *t = tables + c * 64;
    for (int half = 0; half < 2; ++half) {
      const float *h = xs + 4 * half;
      for (int j = 0; j < 16; ++j) {
        float v = (j & 1) ? h[0] : -h[0];
        v += (j & 2) ? h[1] : -h[1];
        v += (j & 4) ? h[2] : -h[2];
        v += (j & 8) ? h[3] : -h[3];
        t[16 * half + j] = v;
        t[32 + 16 * half + j] = -v;
      }
    }
  }
}

// Sign-bit masks: bit 31 of lane j of kFlip[s] is set where bit s of j is clear (that x is negated).
alignas(64) const uint32_t kFlip[4][16] = {
    {0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0, 0x80000000u, 0,
     0x80000000u, 0},
    {0x80000000u, 0x80000000u, 0, 0, 0x80000000u, 0x80000000u, 0, 0, 0x80000000u, 0x80000000u, 0, 0, 0x80000000u,
     0x80000000u, 0, 0},
    {0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0, 0, 0, 0, 0x80000000u, 0x80000000u, 0x80000000u,
     0x80000000u, 0, 0, 0, 0},
    {0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0x80000000u, 0, 0, 0,
     0, 0, 0, 0, 0}};

// build_tables with 16 sign patterns per zmm (same sums, same order); the tail chunk goes scalar.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void build_tables_avx512(const float *x, int64_t K, int64_t C,
                                                                              float *tables) {
  const int64_t full = K / 8;
  __m512i m[4];
  for (int s = 0; s < 4; ++s) m[s] = _mm512_load_si512(kFlip[s]);
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  for (int64_t c = 0; c < full; ++c) {
    float *t = tables + c * 64;
    for (int half = 0; half < 2; ++half) {
      const float *h = x + 8 * c + 4 * half;
      __m512i v[4];
      for (int s = 0; s < 4; ++s) v[s] = _mm512_xor_si512(_mm512_castps_si512(_mm512_set1_ps(h[s])), m[s]);
      const __m512 sum = _mm512_add_ps(
          _mm512_add_ps(_mm512_add_ps(_mm512_castsi512_ps(v[0]), _mm512_castsi512_ps(v[1])), _mm512_castsi512_ps(v[2])),
          _mm512_castsi512_ps(v[3]));
      _mm512_storeu_ps(t + 16 * half, sum);
      _mm512_storeu_ps(t + 32 + 16 * half, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sum), sign)));
    }
  }
  if (full < C) build_tables(x + 8 * full, K - 8 * full, C - full, tables + full * 64);
}

// AVX2 exponent-add masks: all-ones where the + table entry has a nonzero exponent field.
void build_nonzero(const float *tables, int64_t C, uint32_t *nz) {
  for (int64_t c = 0; c < C; ++c)
    for (int e = 0; e < 32; ++e) {
      uint32_t bits;
      std::memcpy(&bits, tables + c * 64 + e, 4);
      nz[c * 32 + e] = (bits & 0x7f800000u) ? 0xffffffffu : 0u;
    }
}

// The same with two ymm per half table, plus the exponent-add masks.
__attribute__((target("avx2,fma"))) void build_tables_avx2(const float *x, int64_t K, int64_t C, float *tables,
                                                           uint32_t *nz) {
  const int64_t full = K / 8;
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  const __m256i expo = _mm256_set1_epi32(0x7f800000), zero = _mm256_setzero_si256(), ones = _mm256_set1_epi32(-1);
  for (int64_t c = 0; c < full; ++c) {
    float *t = tables + c * 64;
    for (int half = 0; half < 2; ++half) {
      const float *h = x + 8 * c + 4 * half;
      for (int r = 0; r < 2; ++r) {
        __m256 v[4];
        for (int s = 0; s < 4; ++s)
          v[s] = _mm256_xor_ps(_mm256_set1_ps(h[s]), _mm256_load_ps((const float *)(kFlip[s] + 8 * r)));
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), v[2]), v[3]);
        _mm256_storeu_ps(t + 16 * half + 8 * r, sum);
        _mm256_storeu_ps(t + 32 + 16 * half + 8 * r, _mm256_xor_ps(sum, sign));
        const __m256i is_zero = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(sum), expo), zero);
        _mm256_storeu_si256((__m256i *)(nz + c * 32 + 16 * half + 8 * r), _mm256_xor_si256(is_zero, ones));
      }
    }
  }
  if (full < C) {
    build_tables(x + 8 * full, K - 8 * full, C - full, tables + full * 64);
    build_nonzero(tables + full * 64, C - full, nz + full * 32);
  }
}

// alpha applied to one table entry with exponent shifts: sum_t sign_t ldexp(v, e_t), terms in order.
float scaled(const Job &j, float v, int64_t s0) {
  float out = 0.0f;
  for (int64_t t = 0; t < j.T; ++t) {
    const int8_t s = j.signs[s0 + t];
    if (!s) continue;
    const float p = std::ldexp(v, j.exps[s0 + t]);
    out = s > 0 ? out + p : out - p;
  }
  return out;
}

// One row, entry by entry: the oracle, and the fallback for quads whose tiles span row groups.
void row_scalar(const Job &j, int64_t n) {
  const int64_t Q = n / kQuadRows, r = n % kQuadRows, byte = (r % kLanes) * kQuad + r / kLanes;
  const int64_t G = n / j.group;
  const bool narrow = j.group < kQuadRows;
  float acc = 0.0f;
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 64;
    for (int64_t i = 0; i < j.q; ++i) {
      const uint8_t key = j.key_block(Q, c, i)[byte];
      const int64_t s0 = j.term(c, G, i);
      acc += narrow ? scaled(j, tb[key & 15] + tb[16 + (key >> 4)], s0)
                    : scaled(j, tb[key & 15], s0) + scaled(j, tb[16 + (key >> 4)], s0);
    }
  }
  j.y[n] = acc;
}

// ---------------------------------------------------------------------------------------------
// AVX-512: a zmm holds 16 rows; each scaled 16-entry half table lives in a register (vpermps).
// alpha is applied with vscalefps (exact multiply by 2^e; e = -inf gives 0 for an absent term), a
// negative term reads the negated table. Starting from the first term instead of 0 only changes
// the sign of zero entries, which never reaches y (acc starts at +0 and x + -0 == x).

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void scale_avx512(const Job &j, const float *tb,
                                                                               int64_t s0, __m512 &lo, __m512 &hi) {
  const int8_t *sg = j.signs + s0;
  const float *es = j.escale + s0;
  const float *p = tb + (sg[0] < 0 ? 32 : 0);
  __m512 e = _mm512_set1_ps(es[0]);
  lo = _mm512_scalef_ps(_mm512_loadu_ps(p), e);
  hi = _mm512_scalef_ps(_mm512_loadu_ps(p + 16), e);
  for (int64_t t = 1; t < j.T; ++t) {
    p = tb + (sg[t] < 0 ? 32 : 0);
    e = _mm512_set1_ps(es[t]);
    lo = _mm512_add_ps(lo, _mm512_scalef_ps(_mm512_loadu_ps(p), e));
    hi = _mm512_add_ps(hi, _mm512_scalef_ps(_mm512_loadu_ps(p + 16), e));
  }
}

// Tile B of a 64-byte key block: acc += lo[nibble 2B] + hi[nibble 2B+1] for 16 rows.
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 lookup_avx512(__m512i k, __m512 lo, __m512 hi,
                                                                                  __m512 acc) {
  return _mm512_add_ps(acc, lookup_pair_avx512<B>(k, lo, hi));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void store_quad_avx512(const Job &j, int64_t Q,
                                                                                   const __m512 *acc) {
  for (int b = 0; b < kQuad; ++b) {
    const int64_t r0 = Q * kQuadRows + b * kLanes, rows = std::min<int64_t>(kLanes, j.N - r0);
    if (rows <= 0) break;
    _mm512_mask_storeu_ps(j.y + r0, (__mmask16)((1u << rows) - 1), acc[b]);
  }
}

// NQ consecutive quads whose rows all lie in row group G: the scaled tables serve all of them.
template <int NQ>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quads_shared_avx512(const Job &j, int64_t Q0, int64_t G) {
  __m512 acc[NQ][kQuad];
  for (int a = 0; a < NQ; ++a)
    for (int b = 0; b < kQuad; ++b) acc[a][b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 64;
    for (int64_t i = 0; i < j.q; ++i) {
      __m512 lo, hi;
      scale_avx512(j, tb, j.term(c, G, i), lo, hi);
      for (int a = 0; a < NQ; ++a) {
        _mm_prefetch((const char *)j.key_block(Q0 + a, c + kPrefetchChunks, i), _MM_HINT_T0);  // never faults
        const __m512i k = _mm512_loadu_si512(j.key_block(Q0 + a, c, i));
        acc[a][0] = lookup_avx512<0>(k, lo, hi, acc[a][0]);
        acc[a][1] = lookup_avx512<1>(k, lo, hi, acc[a][1]);
        acc[a][2] = lookup_avx512<2>(k, lo, hi, acc[a][2]);
        acc[a][3] = lookup_avx512<3>(k, lo, hi, acc[a][3]);
      }
    }
  }
  for (int a = 0; a < NQ; ++a) store_quad_avx512(j, Q0 + a, acc[a]);
}

// One quad whose tiles each lie in one row group (groups of 16..63 rows): tables per tile group.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quad_tiles_avx512(const Job &j, int64_t Q,
                                                                            const int64_t *G) {
  __m512 acc[kQuad];
  for (int b = 0; b < kQuad; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 64;
    for (int64_t i = 0; i < j.q; ++i) {
      const __m512i k = _mm512_loadu_si512(j.key_block(Q, c, i));
      __m512 lo, hi;
      scale_avx512(j, tb, j.term(c, G[0], i), lo, hi);
      acc[0] = lookup_avx512<0>(k, lo, hi, acc[0]);
      if (G[1] != G[0]) scale_avx512(j, tb, j.term(c, G[1], i), lo, hi);
      acc[1] = lookup_avx512<1>(k, lo, hi, acc[1]);
      if (G[2] != G[1]) scale_avx512(j, tb, j.term(c, G[2], i), lo, hi);
      acc[2] = lookup_avx512<2>(k, lo, hi, acc[2]);
      if (G[3] != G[2]) scale_avx512(j, tb, j.term(c, G[3], i), lo, hi);
      acc[3] = lookup_avx512<3>(k, lo, hi, acc[3]);
    }
  }
  store_quad_avx512(j, Q, acc);
}

// ---------------------------------------------------------------------------------------------
// AVX2: a ymm holds 8 rows; a 16-entry lookup is two 8-entry vpermps and a blend on index bit 3.
// 2^e is applied by adding e to the exponent field, masked to 0 where the entry is 0 (precomputed
// `nz`; exact for normal entries and results); an absent term reads an all-zero table and mask.

alignas(64) const float kZeros[32] = {};

// One APoT term of the 4 table vectors (masked exponent add; never -0, so 0 + term == term).
__attribute__((target("avx2,fma"))) inline void term_avx2(const Job &j, const float *tb, const float *nz, int64_t s,
                                                          __m256 *v) {
  const int8_t sg = j.signs[s];
  const float *p = sg == 0 ? kZeros : tb + (sg < 0 ? 32 : 0);
  const float *m = sg == 0 ? kZeros : nz;
  const __m256i e = _mm256_set1_epi32(j.exps[s] * (1 << 23));
  for (int r = 0; r < 4; ++r) {
    const __m256i sh = _mm256_add_epi32(_mm256_castps_si256(_mm256_loadu_ps(p + 8 * r)), e);
    v[r] = _mm256_and_ps(_mm256_loadu_ps(m + 8 * r), _mm256_castsi256_ps(sh));
  }
}

__attribute__((target("avx2,fma"))) inline void scale_avx2(const Job &j, int64_t c, int64_t s0, __m256 *st) {
  const float *tb = j.tables + c * 64;
  const float *nz = reinterpret_cast<const float *>(j.nz + c * 32);
  term_avx2(j, tb, nz, s0, st);
  for (int64_t t = 1; t < j.T; ++t) {
    __m256 v[4];
    term_avx2(j, tb, nz, s0 + t, v);
    for (int r = 0; r < 4; ++r) st[r] = _mm256_add_ps(st[r], v[r]);
  }
}

// Tile B, 8 lanes: nibbles at bit 8B (lo) and 8B + 4 (hi) of every 32-bit key lane; the blend
// selector is the nibble's bit 3 moved to bit 31.
template <int B>
__attribute__((target("avx2,fma"))) inline __m256 lookup_avx2(__m256i k, const __m256 *st, __m256 acc) {
  const __m256i il = B == 0 ? k : _mm256_srli_epi32(k, 8 * B), sl = _mm256_slli_epi32(k, 28 - 8 * B);
  const __m256i ih = _mm256_srli_epi32(k, 8 * B + 4), sh = B == 3 ? k : _mm256_slli_epi32(k, 24 - 8 * B);
  return _mm256_add_ps(acc, _mm256_add_ps(lookup16_avx2(il, sl, st[0], st[1]), lookup16_avx2(ih, sh, st[2], st[3])));
}

// One quad; G[b] is the row group of tile b (all equal when the quad lies in one group).
__attribute__((target("avx2,fma"))) void quad_avx2(const Job &j, int64_t Q, const int64_t *G) {
  __m256 acc[kQuad][2];
  for (int b = 0; b < kQuad; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
  const bool shared = G[0] == G[3];
  for (int64_t c = 0; c < j.C; ++c) {
    for (int64_t i = 0; i < j.q; ++i) {
      const uint8_t *kp = j.key_block(Q, c, i);
      const __m256i k0 = _mm256_loadu_si256((const __m256i *)kp), k1 = _mm256_loadu_si256((const __m256i *)(kp + 32));
      __m256 st[4];
      scale_avx2(j, c, j.term(c, G[0], i), st);
      acc[0][0] = lookup_avx2<0>(k0, st, acc[0][0]);
      acc[0][1] = lookup_avx2<0>(k1, st, acc[0][1]);
      if (!shared && G[1] != G[0]) scale_avx2(j, c, j.term(c, G[1], i), st);
      acc[1][0] = lookup_avx2<1>(k0, st, acc[1][0]);
      acc[1][1] = lookup_avx2<1>(k1, st, acc[1][1]);
      if (!shared && G[2] != G[1]) scale_avx2(j, c, j.term(c, G[2], i), st);
      acc[2][0] = lookup_avx2<2>(k0, st, acc[2][0]);
      acc[2][1] = lookup_avx2<2>(k1, st, acc[2][1]);
      if (!shared && G[3] != G[2]) scale_avx2(j, c, j.term(c, G[3], i), st);
      acc[3][0] = lookup_avx2<3>(k0, st, acc[3][0]);
      acc[3][1] = lookup_avx2<3>(k1, st, acc[3][1]);
    }
  }
  for (int b = 0; b < kQuad; ++b) {
    const int64_t r0 = Q * kQuadRows + b * kLanes, rows = std::min<int64_t>(kLanes, j.N - r0);
    if (rows <= 0) break;
    alignas(32) float out[kLanes];
    _mm256_store_ps(out, acc[b][0]);
    _mm256_store_ps(out + 8, acc[b][1]);
    std::memcpy(j.y + r0, out, rows * sizeof(float));
  }
}

// Quads Q0, Q0 + 1 in row group G: the scaled tables of each (c, i) are made once for 128 rows.
// Sixteen 8-row accumulators do not fit in 16 ymm, so chunks go in blocks: the first 32-row
// sub-block scales the block's tables into an L1 buffer, the other three reload them, and each
// sub-block keeps its 4 accumulators in memory between blocks (same addition order per row).
__attribute__((target("avx2,fma"))) void pair_shared_avx2(const Job &j, int64_t Q0, int64_t G) {
  constexpr int kBuf = 64;  // scaled (chunk, plane) tables per block: 8 KiB
  alignas(32) float buf[kBuf][32];
  alignas(32) float accs[4][kQuad][8] = {};  // [quad * 2 + half][tile][lane]
  const int64_t cb = std::max<int64_t>(1, kBuf / j.q);
  for (int64_t c0 = 0; c0 < j.C; c0 += cb) {
    const int64_t c1 = std::min(j.C, c0 + cb);
    for (int sb = 0; sb < 4; ++sb) {
      __m256 acc[kQuad];
      for (int b = 0; b < kQuad; ++b) acc[b] = _mm256_load_ps(accs[sb][b]);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t i = 0; i < j.q; ++i) {
          float *sp = buf[(c - c0) * j.q + i];
          __m256 st[4];
          if (sb == 0) {
            scale_avx2(j, c, j.term(c, G, i), st);
            for (int r = 0; r < 4; ++r) _mm256_store_ps(sp + 8 * r, st[r]);
          } else {
            for (int r = 0; r < 4; ++r) st[r] = _mm256_load_ps(sp + 8 * r);
          }
          const __m256i k = _mm256_loadu_si256((const __m256i *)(j.key_block(Q0 + (sb >> 1), c, i) + 32 * (sb & 1)));
          acc[0] = lookup_avx2<0>(k, st, acc[0]);
          acc[1] = lookup_avx2<1>(k, st, acc[1]);
          acc[2] = lookup_avx2<2>(k, st, acc[2]);
          acc[3] = lookup_avx2<3>(k, st, acc[3]);
        }
      }
      for (int b = 0; b < kQuad; ++b) _mm256_store_ps(accs[sb][b], acc[b]);
    }
  }
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < kQuad; ++b) {
      const int64_t r0 = (Q0 + a) * kQuadRows + b * kLanes, rows = std::min<int64_t>(kLanes, j.N - r0);
      if (rows <= 0) break;
      float out[kLanes];
      std::memcpy(out, accs[2 * a][b], 8 * sizeof(float));
      std::memcpy(out + 8, accs[2 * a + 1][b], 8 * sizeof(float));
      std::memcpy(j.y + r0, out, rows * sizeof(float));
    }
}

// ---------------------------------------------------------------------------------------------

// Row groups of the tiles of quad Q (rows beyond N count as the last row's group); false when a
// tile spans two groups.
bool tile_groups(const Job &j, int64_t Q, int64_t *G) {
  for (int b = 0; b < kQuad; ++b) {
    const int64_t first = std::min(j.N - 1, Q * kQuadRows + b * kLanes);
    const int64_t last = std::min(j.N - 1, first + kLanes - 1);
    G[b] = first / j.group;
    if (last / j.group != G[b]) return false;
  }
  return true;
}

// Quad Q, alone: SIMD when each tile lies in one row group, else row by row.
void run_quad(const Job &j, Isa isa, int64_t Q) {
  int64_t G[kQuad];
  if (isa == Isa::Scalar || !tile_groups(j, Q, G)) {
    for (int64_t n = Q * kQuadRows; n < std::min(j.N, (Q + 1) * kQuadRows); ++n) row_scalar(j, n);
  } else if (avx2_class(isa)) {
    quad_avx2(j, Q, G);
  } else if (G[0] == G[3]) {
    quads_shared_avx512<1>(j, Q, G[0]);
  } else {
    quad_tiles_avx512(j, Q, G);
  }
}

}  // namespace

void build_lut(Isa isa, const float *x, int64_t K, int64_t C, float *tables, uint32_t *nz) {
  if (isa == Isa::Avx512) {
    build_tables_avx512(x, K, C, tables);
  } else if (avx2_class(isa)) {
    build_tables_avx2(x, K, C, tables, nz);
  } else {
    build_tables(x, K, C, tables);
  }
}

int64_t work_items(const Job &j) {
  const int64_t NQ = (j.N + kQuadRows - 1) / kQuadRows;
  return j.group < kQuadRows ? 2 * NQ : (NQ + 1) / 2;
}

// Work item u: with narrow row groups half u % 2 of quad u / 2 (AVX2: lanes 8h.. of its 4 tiles; AVX-512: tiles
// 2h, 2h + 1; the scalar fallback takes the AVX2 rows); else quads [2u, 2u + 2), where a pair
// lying in one row group (128 rows) shares one set of scaled tables and everything else runs quad by quad.
void run_item(const Job &j, Isa isa, int64_t u) {
  const int64_t NQ = (j.N + kQuadRows - 1) / kQuadRows;
  if (j.group < kQuadRows) {
    const int64_t Q = u / 2;
    const int h = (int)(u % 2);
    int64_t G[kQuad];
    if (isa != Isa::Scalar && tile_groups(j, Q, G)) return narrow_half(j, isa, Q, G, h);
    for (int b = 0; b < kQuad; ++b)
      for (int l = 0; l < 8; ++l) {
        const int64_t n = Q * kQuadRows + b * kLanes + 8 * h + l;
        if (n < j.N) row_scalar(j, n);
      }
    return;
  }
  const int64_t Q0 = 2 * u;
  if (isa != Isa::Scalar && Q0 + 1 < NQ) {
    const int64_t G = (Q0 * kQuadRows) / j.group;
    if (std::min(j.N - 1, (Q0 + 2) * kQuadRows - 1) / j.group == G)
      return isa == Isa::Avx512 ? quads_shared_avx512<2>(j, Q0, G) : pair_shared_avx2(j, Q0, G);
  }
  for (int64_t Q = Q0; Q < std::min(NQ, Q0 + 2); ++Q) run_quad(j, isa, Q);
}

}  // namespace shiftadd
