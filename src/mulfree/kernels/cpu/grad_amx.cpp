// The two fp32 products of a ternary BitLinear's backward on AMX-BF16, at fp32 accuracy:
//   dx = dy @ trits               [T, N] x [N, K]
//   dW = (dy * a[:, None])^T @ q  [N, T] x [T, K]   (computed as its transpose q^T @ (dy * a), then stored transposed)
// One operand of each is exact in bf16 (trits in {-1, 0, 1}; int8 codes), and an fp32 value splits exactly into
// three bf16 parts hi + mid + lo (8 significand bits each), so three tdpbf16ps passes with fp32 accumulation give
// the fp32 product up to the order of its sums. Both operands are packed once per call into tiles:
// - first operand (rows x 32 of the reduction): tile [16 rows][32 bf16];
// - second operand (the reduction in pairs x columns): tile [16 pairs][16 columns x 2 bf16] (VNNI layout).
// Rows, columns and the reduction are zero-padded to whole 32 x 32 blocks; the split operand is packed a slice at a
// time. Against MKL's fp32 GEMMs on a Sapphire Rapids host: docs/mmfree.md.
#include "gemm.h"

#include <nanobind/ndarray.h>

namespace {
using namespace ternary;

#if MF_HAVE_AMX
#define MF_AMX_BF16 MF_AVX512 ",avx512bf16,amx-tile,amx-bf16"

constexpr int64_t kTile = 512;  // bf16 elements of one tile (16 x 64 bytes)

// The operands' geometry: M rows x N columns of output, R the reduction; counts of 16-wide tiles and 32-deep steps.
struct Shape {
  int64_t M, N, R;
  int64_t mt() const { return round_up(M, 32) / 16; }
  int64_t nt() const { return round_up(N, 32) / 16; }
  int64_t rs() const { return (R + 31) / 32; }
};

// bf16 bits of 16 floats, round to nearest even (NaN stays NaN).
__attribute__((target(MF_AMX_BF16), always_inline)) inline __m256i bf16(__m512 x) {
  return (__m256i)_mm512_cvtneps_pbh(x);
}
__attribute__((target(MF_AMX_BF16), always_inline)) inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// The first n of 16 lanes.
inline __mmask16 lanes(int64_t n) { return (__mmask16)((1u << n) - 1); }
// One 512-bit row from two halves.
__attribute__((target(MF_AMX_BF16), always_inline)) inline __m512i join(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
// x as nparts bf16 parts, each the rounding of what the earlier ones leave: with 3, part[0] + part[1] + part[2] = x
// exactly; with 1, x rounded (exact for the trits and int8 codes).
__attribute__((target(MF_AMX_BF16), always_inline)) inline void split(__m512 x, int nparts, __m256i part[3]) {
  for (int p = 0; p < nparts; ++p) {
    part[p] = bf16(x);
    x = _mm512_sub_ps(x, widen(part[p]));
  }
}

// First-operand tiles from src [M, R] (row stride ld): parts tiles of row tile i and step s at
// A + ((p * mt + i) * rs + s) * kTile, row m % 16 holding src[m, 32 s ..]. nparts as in split.
__attribute__((target(MF_AMX_BF16))) void pack_rows_tile(const float *src, int64_t ld, const Shape &sh, int nparts,
                                                          uint16_t *A, int64_t i) {
  const int64_t mt = sh.mt(), rs = sh.rs();
  for (int64_t mm = 0; mm < 16; ++mm) {
    const int64_t m = 16 * i + mm;
    for (int64_t s = 0; s < rs; ++s) {
      __m256i part[2][3];
      for (int h = 0; h < 2; ++h) {
        const int64_t r0 = 32 * s + 16 * h, n = m < sh.M ? std::clamp<int64_t>(sh.R - r0, 0, 16) : 0;
        const __m512 x = _mm512_maskz_loadu_ps(lanes(n), src + m * ld + r0);
        split(x, nparts, part[h]);
      }
      for (int p = 0; p < nparts; ++p)
        _mm512_store_si512(A + ((p * mt + i) * rs + s) * kTile + mm * 32,
                           join(part[0][p], part[1][p]));
    }
  }
}
void pack_rows(int threads, const float *src, int64_t ld, const Shape &sh, int nparts, uint16_t *A) {
  get_pool(threads).run_chunks(sh.mt(), [&](int64_t i) { pack_rows_tile(src, ld, sh, nparts, A, i); }, false);
}

// First-operand tiles of src^T for src [R, M] (row stride ld), one part (exact inputs): row m of a tile holds
// src[32 s .., m]; two 16 x 16 transposes per 32 x 16 block.
__attribute__((target(MF_AMX_BF16))) void pack_cols_tile(const float *src, int64_t ld, const Shape &sh, uint16_t *A,
                                                          int64_t i) {
  const int64_t rs = sh.rs();
  const int64_t m0 = 16 * i, n = std::clamp<int64_t>(sh.M - m0, 0, 16);
  for (int64_t s = 0; s < rs; ++s) {
    __m256i half[2][16];
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
      for (int64_t rr = 0; rr < 16; ++rr) {
        const int64_t k = 32 * s + 16 * h + rr;
        r[rr] = k < sh.R ? _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(n), src + k * ld + m0))
                         : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      for (int mm = 0; mm < 16; ++mm) half[h][mm] = bf16(_mm512_castsi512_ps(r[mm]));
    }
    for (int mm = 0; mm < 16; ++mm)
      _mm512_store_si512(A + (i * rs + s) * kTile + mm * 32,
                         join(half[0][mm], half[1][mm]));
  }
}
void pack_cols(int threads, const float *src, int64_t ld, const Shape &sh, uint16_t *A) {
  get_pool(threads).run_chunks(sh.mt(), [&](int64_t i) { pack_cols_tile(src, ld, sh, A, i); }, false);
}

// Second-operand tiles from src [R, N] (row stride ld), each row r scaled by scale[r] when given: tile of column
// tile j and step s at B + ((p * nt + j) * rs + s) * kTile, row q holding the pairs (src[32 s + 2 q, c],
// src[32 s + 2 q + 1, c]) of its 16 columns.
__attribute__((target(MF_AMX_BF16))) void pack_pairs_tile(const float *src, int64_t ld, const float *scale,
                                                           const Shape &sh, int nparts, uint16_t *B, int64_t j) {
  const int64_t nt = sh.nt(), rs = sh.rs();
  const int64_t c0 = 16 * j, n = std::clamp<int64_t>(sh.N - c0, 0, 16);
  for (int64_t s = 0; s < rs; ++s)
    for (int64_t q = 0; q < 16; ++q) {
      __m256i part[2][3];
      for (int e = 0; e < 2; ++e) {
        const int64_t r = 32 * s + 2 * q + e;
        __m512 x = r < sh.R ? _mm512_maskz_loadu_ps(lanes(n), src + r * ld + c0) : _mm512_setzero_ps();
        if (scale && r < sh.R) x = _mm512_mul_ps(x, _mm512_set1_ps(scale[r]));
        split(x, nparts, part[e]);
      }
      for (int p = 0; p < nparts; ++p) {
        const __m256i lo = _mm256_unpacklo_epi16(part[0][p], part[1][p]);  // pairs 0-3 | 8-11
        const __m256i hi = _mm256_unpackhi_epi16(part[0][p], part[1][p]);  // pairs 4-7 | 12-15
        const __m512i row = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)),
                                               _mm256_permute2x128_si256(lo, hi, 0x31), 1);
        _mm512_store_si512(B + ((p * nt + j) * rs + s) * kTile + q * 32, row);
      }
    }
}
void pack_pairs(int threads, const float *src, int64_t ld, const float *scale, const Shape &sh, int nparts,
                uint16_t *B) {
  get_pool(threads).run_chunks(sh.nt(), [&](int64_t j) { pack_pairs_tile(src, ld, scale, sh, nparts, B, j); }, false);
}

// out = A x B over every 32 x 32 block, the parts of the split operand (A or B, `parts` of them) summed in the
// C tiles; out[m, n] at out + m * ldo + n, or out + n * ldo + m when `transposed`.
__attribute__((target(MF_AMX_BF16))) void multiply_block(const uint16_t *A, int a_parts, const uint16_t *B,
                                                          int b_parts, const Shape &sh, float *out, int64_t ldo,
                                                          bool transposed, int64_t i, int64_t j) {
  const int64_t mt = sh.mt(), nt = sh.nt(), rs = sh.rs();
  amx_tiles_16x64();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < rs; ++s)
    for (int p = 0; p < std::max(a_parts, b_parts); ++p) {
      if (p < a_parts) {
        _tile_loadd(4, A + ((p * mt + i) * rs + s) * kTile, 64);
        _tile_loadd(5, A + ((p * mt + i + 1) * rs + s) * kTile, 64);
      }
      if (p < b_parts) {
        _tile_loadd(6, B + ((p * nt + j) * rs + s) * kTile, 64);
        _tile_loadd(7, B + ((p * nt + j + 1) * rs + s) * kTile, 64);
      }
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  alignas(64) float C[4][256];
  _tile_stored(0, C[0], 64);
  _tile_stored(1, C[1], 64);
  _tile_stored(2, C[2], 64);
  _tile_stored(3, C[3], 64);
  _tile_release();
  for (int t = 0; t < 4; ++t) {  // tile t: rows 16 (i + t / 2) .., columns 16 (j + t % 2) ..
    const int64_t m0 = 16 * (i + t / 2), n0 = 16 * (j + t % 2);
    const int64_t rows = std::clamp<int64_t>(sh.M - m0, 0, 16), cols = std::clamp<int64_t>(sh.N - n0, 0, 16);
    if (!transposed) {
      for (int64_t r = 0; r < rows; ++r)
        _mm512_mask_storeu_ps(out + (m0 + r) * ldo + n0, lanes(cols), _mm512_load_ps(C[t] + 16 * r));
    } else {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(C[t] + 16 * r);
      transpose16x16_epi32(v);
      for (int64_t r = 0; r < cols; ++r)
        _mm512_mask_storeu_ps(out + (n0 + r) * ldo + m0, lanes(rows), _mm512_castsi512_ps(v[r]));
    }
  }
}

// Consecutive blocks share the panel of the operand with more parts (3 bf16 parts of an fp32 operand), which
// then stays in L2 while the other operand's panels stream past.
void multiply(int threads, const uint16_t *A, int a_parts, const uint16_t *B, int b_parts, const Shape &sh,
              float *out, int64_t ldo, bool transposed) {
  const int64_t nbm = sh.mt() / 2, nbn = sh.nt() / 2;
  const bool rows_first = a_parts >= b_parts;
  get_pool(threads).run_chunks(nbm * nbn, [&](int64_t c) {
    const int64_t i = rows_first ? c / nbn : c % nbm, j = rows_first ? c % nbn : c / nbm;
    multiply_block(A, a_parts, B, b_parts, sh, out, ldo, transposed, 2 * i, 2 * j);
  }, false);
}

// Scratch that only grows: the calls of a training step alternate between shapes, and a vector that shrank would
// zero-fill its pages again when it grows back.
void grow(LineVec<uint16_t> &v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize((size_t)n);
}

// The split operand is packed and multiplied a slice at a time, each slice's three parts about kSliceBytes (so
// they stay in L2 while the other operand's panels pass, and the scratch stays small).
constexpr int64_t kSliceBytes = int64_t(2) << 20;
int64_t slice_of(int64_t depth) {
  return std::max<int64_t>(32, kSliceBytes / (3 * 2 * std::max<int64_t>(depth, 32)) / 32 * 32);
}

// out [T, K] = dy [T, N] @ trits [N, K]: dy's rows a slice at a time.
void grad_input(int threads, const float *dy, const float *trits, int64_t T, int64_t N, int64_t K, float *out) {
  const Shape whole{T, K, N};
  const int64_t rows = slice_of(32 * whole.rs());
  thread_local LineVec<uint16_t> a, b;
  grow(a, 3 * (rows / 16) * whole.rs() * kTile);
  grow(b, whole.nt() * whole.rs() * kTile);
  pack_pairs(threads, trits, K, nullptr, whole, 1, b.data());
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const Shape sh{std::min(rows, T - t0), K, N};
    pack_rows(threads, dy + t0 * N, N, sh, 3, a.data());
    multiply(threads, a.data(), 3, b.data(), 1, sh, out + t0 * K, K, false);
  }
}

// out [N, K] = (dy * a)^T @ q as its transpose q^T [K, T] @ (dy * a) [T, N]: dy's columns a slice at a time.
void grad_weight(int threads, const float *dy, const float *a_scale, const float *q, int64_t T, int64_t N, int64_t K,
                 float *out) {
  const Shape whole{K, N, T};
  const int64_t cols = slice_of(32 * whole.rs());
  thread_local LineVec<uint16_t> a, b;
  grow(a, whole.mt() * whole.rs() * kTile);
  grow(b, 3 * (cols / 16) * whole.rs() * kTile);
  pack_cols(threads, q, K, whole, a.data());
  for (int64_t n0 = 0; n0 < N; n0 += cols) {
    const Shape sh{K, std::min(cols, N - n0), T};
    pack_pairs(threads, dy + n0, N, a_scale, sh, 3, b.data());
    multiply(threads, a.data(), 1, b.data(), 3, sh, out + n0 * K, K, true);
  }
}
#endif  // MF_HAVE_AMX

template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;

void need(bool ok, const char *what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace

void register_grad_amx(nb::module_ &m) {
  m.def(
      "ternary_grad_input",
      [](Arr<const float, nb::ndim<2>> dy, Arr<const float, nb::ndim<2>> trits, Arr<float, nb::ndim<2>> out,
         int threads) {
        need(cpu_features().amx_bf16, "ternary_grad_input needs AMX-BF16 (cpu_features()['amx_bf16'])");
        const int64_t T = (int64_t)dy.shape(0), N = (int64_t)dy.shape(1), K = (int64_t)trits.shape(1);
        need((int64_t)trits.shape(0) == N && (int64_t)out.shape(0) == T && (int64_t)out.shape(1) == K,
             "ternary_grad_input: dy [T, N], trits [N, K] and out [T, K] do not match");
#if MF_HAVE_AMX
        nb::gil_scoped_release release;
        grad_input(threads, dy.data(), trits.data(), T, N, K, out.data());
#endif
      },
      nb::arg("dy"), nb::arg("trits"), nb::arg("out"), nb::arg("threads"),
      "out = dy @ trits in fp32 accuracy on AMX-BF16 (dy split into three exact bf16 parts; trits exact in bf16).");
  m.def(
      "ternary_grad_weight",
      [](Arr<const float, nb::ndim<2>> dy, Arr<const float, nb::ndim<1>> a_scale, Arr<const float, nb::ndim<2>> q,
         Arr<float, nb::ndim<2>> out, int threads) {
        need(cpu_features().amx_bf16, "ternary_grad_weight needs AMX-BF16 (cpu_features()['amx_bf16'])");
        const int64_t T = (int64_t)dy.shape(0), N = (int64_t)dy.shape(1), K = (int64_t)q.shape(1);
        need((int64_t)a_scale.shape(0) == T && (int64_t)q.shape(0) == T && (int64_t)out.shape(0) == N &&
                 (int64_t)out.shape(1) == K,
             "ternary_grad_weight: dy [T, N], a_scale [T], q [T, K] and out [N, K] do not match");
#if MF_HAVE_AMX
        nb::gil_scoped_release release;
        grad_weight(threads, dy.data(), a_scale.data(), q.data(), T, N, K, out.data());
#endif
      },
      nb::arg("dy"), nb::arg("a_scale"), nb::arg("q"), nb::arg("out"), nb::arg("threads"),
      "out = (dy * a_scale[:, None])^T @ q in fp32 accuracy on AMX-BF16, for integer codes q (|q| < 256, exact in "
      "bf16); dy * a_scale is rounded to fp32 once, then split into three exact bf16 parts.");
}
