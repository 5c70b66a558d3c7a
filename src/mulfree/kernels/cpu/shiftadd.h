// Kernel family 'shiftadd': ShiftAddLLM lookup-table products for Latency-mode BCQ weights
// (reference: mulfree.ops.bcq.bcq_lut_gemv; storage format in ops/bcq.py). One-token kernels live
// in shiftadd.cpp (narrow row groups: shiftadd_narrow.cpp), the T-token driver in shiftadd_gemm.cpp, the Python
// class in shiftadd_bind.cpp.
//
// Kernel weight layout ("quads"), built once by kernels/shiftadd.py `prepare`:
//   keys uint8 [ceil(N/64), C, q, 16, 4]: byte b of lane l of quad Q = key of row 64Q + 16b + l,
//     chunk c (8 columns), plane i. One 64-byte block holds 64 rows' keys of one (c, i).
//   exps, signs int8 [ceil(N/g), C, q, T]: the APoT terms of alpha (sign 0 = absent term), row
//     group outermost so that one row group's terms are read in order;
//   escale fp32, same shape: the exponent as a float, -inf for an absent term (vscalefps operand);
//   delta int32, same shape: the term as one add to a float's bits (made by the binding).
// Per token the kernels read a table block of kTableFloats floats per chunk ((lo16, hi16) signed
// sums, then their negation) and, on AVX2, kMaskWords exponent-add masks per chunk.
#pragma once
#include "mulfree_cpu.h"

#include <immintrin.h>

#include <cstdint>

namespace shiftadd {

constexpr int kLanes = 16;                 // rows per tile (one zmm of fp32)
constexpr int kQuad = 4;                   // tiles per quad = bytes per 32-bit key lane
constexpr int kQuadRows = kLanes * kQuad;  // 64
constexpr int kQuadBytes = kQuadRows;      // key bytes per (quad, chunk, plane)
constexpr int kTableFloats = 64;           // per chunk: lo16, hi16, -lo16, -hi16
constexpr int kMaskWords = 32;             // per chunk (AVX2 only): nonzero-exponent masks of lo16, hi16

// One token's product over the whole weight: tables/nz/y are that token's, the rest is the weight.
struct Job {
  const float *tables;          // [C][2][32]: (lo16, hi16) signed sums, then their negation
  const uint32_t *nz;           // [C][32]: all-ones where the table entry has a nonzero exponent (AVX2)
  const uint8_t *keys;          // [NQ][C][q][16][4]
  const int8_t *exps, *signs;   // [NG][C][q][T]
  const float *escale;          // [NG][C][q][T]
  const int32_t *delta;         // [NG][C][q][T]: (e << 23) + sign bit if negative (narrow groups, AVX2)
  float *y;
  int64_t N, C, NG, group, q, T;

  int64_t term(int64_t c, int64_t G, int64_t i) const { return ((G * C + c) * q + i) * T; }
  const uint8_t *key_block(int64_t Q, int64_t c, int64_t i) const { return keys + ((Q * C + c) * q + i) * kQuadBytes; }
};

// Tables (and, for AVX2-class isa, masks into nz) of one token x [K], C = ceil(K / 8) chunks.
void build_lut(Isa isa, const float *x, int64_t K, int64_t C, float *tables, uint32_t *nz);

// One token's product is work_items(j) items of rows, each written by one run_item call:
// y[n] = sum_c sum_i alpha * (lo + hi lookups). Items are quad pairs (128 rows), or half quads (32 rows)
// for row groups narrower than a quad.
int64_t work_items(const Job &j);
void run_item(const Job &j, Isa isa, int64_t u);

// Half h of quad Q whose 16-row tiles each lie in one narrow row group G[b] (shiftadd_narrow.cpp; AVX2-class or
// AVX-512 isa): AVX2 lanes 8h.. of the 4 tiles, AVX-512 tiles 2h and 2h + 1.
void narrow_half(const Job &j, Isa isa, int64_t Q, const int64_t *G, int h);

// A 16-entry lookup on AVX2: entries idx & 7 of t0 (sel bit 31 clear) or of t1 (set).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 lookup16_avx2(__m256i idx, __m256i sel, __m256 t0,
                                                                            __m256 t1) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(sel));  // sel bit 31 = index bit 3
}

// Tile B (0-3) of a 64-byte key block on AVX-512: lo[nibble 2B] + hi[nibble 2B + 1] for its 16 rows (vpermps reads
// an index's low 4 bits, so each 16-entry half table is one operand).
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 lookup_pair_avx512(__m512i k,
                                                                                                      __m512 lo,
                                                                                                      __m512 hi) {
  const __m512i kl = B == 0 ? k : _mm512_srli_epi32(k, 8 * B);
  return _mm512_add_ps(_mm512_permutexvar_ps(kl, lo), _mm512_permutexvar_ps(_mm512_srli_epi32(k, 8 * B + 4), hi));
}

// Y [T, N] = X [T, K] W^T: per token the same tables and run_item calls as one GEMV (bit-identical
// rows), with tokens tiled so that each quad pair's keys are read once per tile. `w` carries the
// weight fields of Job (tables, nz, y ignored).
void lut_gemm(const Job &w, Isa isa, const float *x, int64_t T, int64_t K, float *y, int threads);

}  // namespace shiftadd
