// GEMV tiles of the packed ternary kernels, one file per format and instruction-set tier (T2R4: gemv_scalar.cpp,
// gemv_avx2.cpp, gemv_avxvnni.cpp, gemv_avx512.cpp; T1R4: gemv_t1_scalar.cpp, gemv_t1_avx2.cpp, gemv_t1_avxvnni.cpp,
// gemv_t1_avx512.cpp), and the dispatch tables over them (linear.cpp).
//
// A tile multiplies row groups (4 rows x Kpad weights each) by NT tokens of int8 activations:
// out[t * ldo + g * 4 + r] = sum_k c[row r of group g, k] * X[t * ldx + k] (codes c = trit + 1 in {0, 1, 2})
// for `ngroups` consecutive groups, so the call and the switch between ISA-specific and generic code are paid
// once per span of row groups, not once per group.
#pragma once
#include "linear.h"

namespace ternary {

constexpr int kMaxTile = 4;  // tokens per GEMV tile, at most

using TileFn = void (*)(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx, int32_t *out,
                        int64_t ldo);

// One tier's tiles: tiles[n - 1] takes n tokens, n = 1 .. count.
struct TileSet {
  int count;
  TileFn tiles[kMaxTile];
};
extern const TileSet kGemvScalar;   // 1-4 tokens: the oracle
extern const TileSet kGemvAvx2;     // 1-2 tokens: 4 rows x 2 tokens of accumulators fill the 16 ymm registers
#if MF_HAVE_AVXVNNI
extern const TileSet kGemvAvxVnni;  // 1-2 tokens
#endif
extern const TileSet kGemvAvx512;   // 1-4 tokens

// A tile for a run of tokens and how many of them it takes.
struct Tile {
  TileFn fn;
  int tokens;
};
// The tile for the next `nt` (1 .. kMaxTile) tokens on `isa`: the tier's nt-token tile, else its largest
// one; a tier this build lacks falls back to the next lower one.
const Tile &gemv_tile(Isa isa, int nt);

// T1R4 tiles (gemv_t1_<isa>.cpp; formats/t1.h): the same span of row groups (4 rows x Kpad weights,
// t1::group_bytes(Kpad) bytes each) and tokens, but out[t * ldo + g * 4 + r] is the exact signed
// sum_k trit * X[t * ldx + k]; sumq[t] = sum_k X[t * ldx + k] (the job's, padding zero: the VNNI tiles need it),
// wsum[g * 4 + r] = sum_k trit of that row (the AVX2 tiles need it).
using TileT1Fn = void (*)(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx,
                          const int32_t *sumq, const int32_t *wsum, int32_t *out, int64_t ldo);
struct TileSetT1 {
  int count;
  TileT1Fn tiles[kMaxTile];
};
extern const TileSetT1 kGemvT1Scalar;  // 1-4 tokens: the oracle
extern const TileSetT1 kGemvT1Avx2;    // 1-2 tokens
#if MF_HAVE_AVXVNNI
extern const TileSetT1 kGemvT1AvxVnni;  // 1-2 tokens
#endif
extern const TileSetT1 kGemvT1Avx512;  // 1-4 tokens
struct TileT1 {
  TileT1Fn fn;
  int tokens;
};
const TileT1 &gemv_tile_t1(Isa isa, int nt);

// Sums the 8 int32 lanes of each of a0..a3 into out[0..3]: [r0, r1, r2, r3] in one 128-bit lane.
__attribute__((target("avx2"), always_inline)) inline void store_row_sums_avx2(__m256i a0, __m256i a1, __m256i a2,
                                                                                  __m256i a3, int32_t *out) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  _mm_storeu_si128((__m128i *)out, _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

}  // namespace ternary
