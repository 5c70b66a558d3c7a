// The two fp32 products of a ternary BitLinear's backward on AMX-BF16, at fp32 accuracy:
//   dx = dy @ trits               [T, N] x [N, K]
//   dW = (dy * a[:, None])^T @ q  [N, T] x [T, K]   (computed as its transpose q^T @ (dy * a), then stored transposed)
// One operand of each is exact in bf16 (trits in {-1, 0, 1}; int8 codes), and an fp32 value splits exactly into
// three bf16 parts hi + mid + lo (8 significand bits each, by truncation), so three tdpbf16ps passes with fp32
// accumulation give the fp32 product up to the order of its sums. Both operands are packed once per call into tiles:
// - first operand (rows x 32 of the reduction): tile [16 rows][32 bf16];
// - second operand (the reduction in pairs x columns): tile [16 pairs][16 columns x 2 bf16] (VNNI layout).
// Rows, columns and the reduction are zero-padded to whole 32 x 32 blocks; the split operand is packed 32 rows or
// columns and up to 128 reduction steps at a time, by the pool item that multiplies them, whose C blocks wait in
// its scratch between those chunks. Against MKL's fp32 GEMMs on a Sapphire Rapids host: docs/mmfree.md.
#include "gemm.h"

#include <nanobind/ndarray.h>

namespace {
using namespace ternary;

#if MF_HAVE_AMX
#define MF_AMX_BF16 MF_AVX512 ",avx512bf16,amx-tile,amx-bf16"

constexpr int64_t kTile = 512;  // bf16 elements of one tile (16 x 64 bytes)
constexpr int64_t kAhead = 2;   // steps between a prefetch and its tile load
constexpr int64_t kRowsAhead = 64;  // rows between a prefetch and its load when a panel of a row-major array is packed

// The operands' geometry: M rows x N columns of output, R the reduction; counts of 16-wide tiles and 32-deep steps.
struct Shape {
  int64_t M, N, R;
  int64_t mt() const { return round_up(M, 32) / 16; }
  int64_t nt() const { return round_up(N, 32) / 16; }
  int64_t rs() const { return (R + 31) / 32; }
};

// The first n of 16 lanes.
inline __mmask16 lanes(int64_t n) { return (__mmask16)((1u << n) - 1); }
// x as nparts parts, each an fp32 value whose low 16 bits are zero (its bf16 is its high half): the truncation of
// what the earlier parts leave. With 3, part[0] + part[1] + part[2] = x exactly (24 significand bits in three runs of
// 8); with 1, x truncated (exact for the trits and int8 codes). Truncation never rounds up to inf and needs no
// conversion, so packing is a mask and a subtraction per part.
__attribute__((target(MF_AMX_BF16), always_inline)) inline void split(__m512 x, int nparts, __m512 part[3]) {
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int p = 0; p < nparts; ++p) {
    part[p] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), high));
    x = _mm512_sub_ps(x, part[p]);
  }
}
// The high halves of 32 split parts, lo's 16 then hi's: their bf16 values in order (exact: the low halves are zero).
__attribute__((target(MF_AMX_BF16), always_inline)) inline __m512i halves(__m512 lo, __m512 hi) {
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}
// Lane c holding the bf16 of even[c] in its low half and of odd[c] in its high half (the VNNI pair layout).
__attribute__((target(MF_AMX_BF16), always_inline)) inline __m512i pairs(__m512 even, __m512 odd) {
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(_mm512_castps_si512(even), 16),
                                 _mm512_castps_si512(odd));
}

// First-operand tiles from src [M, R] (row stride ld): parts tiles of row tile i and step s at
// A + ((p * mt + i) * rs + s) * kTile, row m % 16 holding src[m, 32 s ..]. nparts as in split.
__attribute__((target(MF_AMX_BF16))) void pack_rows_tile(const float *src, int64_t ld, const Shape &sh, int nparts,
                                                          uint16_t *A, int64_t i) {
  const int64_t mt = sh.mt(), rs = sh.rs();
  for (int64_t mm = 0; mm < 16; ++mm) {
    const int64_t m = 16 * i + mm;
    for (int64_t s = 0; s < rs; ++s) {
      __m512 part[2][3];
      for (int h = 0; h < 2; ++h) {
        const int64_t r0 = 32 * s + 16 * h, n = m < sh.M ? std::clamp<int64_t>(sh.R - r0, 0, 16) : 0;
        split(_mm512_maskz_loadu_ps(lanes(n), src + m * ld + r0), nparts, part[h]);
      }
      for (int p = 0; p < nparts; ++p)
        _mm512_store_si512(A + ((p * mt + i) * rs + s) * kTile + mm * 32, halves(part[0][p], part[1][p]));
    }
  }
}

// First-operand tiles of src^T for src [R, M] (row stride ld), one part (exact inputs): row m of a tile holds
// src[32 s .., m]; two 16 x 16 transposes per 32 x 16 block.
__attribute__((target(MF_AMX_BF16))) void pack_cols_tile(const float *src, int64_t ld, const Shape &sh, uint16_t *A,
                                                          int64_t i) {
  const int64_t rs = sh.rs();
  const int64_t m0 = 16 * i, n = std::clamp<int64_t>(sh.M - m0, 0, 16);
  for (int64_t s = 0; s < rs; ++s) {
    __m512i r[2][16];
    for (int h = 0; h < 2; ++h) {
      for (int64_t rr = 0; rr < 16; ++rr) {
        const int64_t k = 32 * s + 16 * h + rr;
        r[h][rr] = k < sh.R ? _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(n), src + k * ld + m0))
                            : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r[h]);
    }
    for (int mm = 0; mm < 16; ++mm)
      _mm512_store_si512(A + (i * rs + s) * kTile + mm * 32,
                         halves(_mm512_castsi512_ps(r[0][mm]), _mm512_castsi512_ps(r[1][mm])));
  }
}
void pack_cols(int threads, const float *src, int64_t ld, const Shape &sh, uint16_t *A) {
  get_pool(threads).run_chunks(sh.mt(), [&](int64_t i) { pack_cols_tile(src, ld, sh, A, i); }, false);
}

// Second-operand tiles from src [R, N] (row stride ld), each row r scaled by scale[r] when given: tile of column
// tile j and step s at B + ((p * nt + j) * rs + s) * kTile, row q holding the pairs (src[32 s + 2 q, c],
// src[32 s + 2 q + 1, c]) of its 16 columns. One pass over the rows packs the two tiles of a 32-column panel.
__attribute__((target(MF_AMX_BF16))) void pack_pairs_panel(const float *src, int64_t ld, const float *scale,
                                                            const Shape &sh, int nparts, uint16_t *B, int64_t panel) {
  const int64_t nt = sh.nt(), rs = sh.rs();
  for (int64_t s = 0; s < rs; ++s)
    for (int64_t q = 0; q < 16; ++q)
      for (int64_t j = 2 * panel; j < 2 * panel + 2; ++j) {
        const int64_t c0 = 16 * j, n = std::clamp<int64_t>(sh.N - c0, 0, 16);
        __m512 part[2][3];
        for (int e = 0; e < 2; ++e) {
          const int64_t r = 32 * s + 2 * q + e;
          if (r + kRowsAhead < sh.R) _mm_prefetch((const char *)(src + (r + kRowsAhead) * ld + c0), _MM_HINT_T0);
          __m512 x = r < sh.R ? _mm512_maskz_loadu_ps(lanes(n), src + r * ld + c0) : _mm512_setzero_ps();
          if (scale && r < sh.R) x = _mm512_mul_ps(x, _mm512_set1_ps(scale[r]));
          split(x, nparts, part[e]);
        }
        for (int p = 0; p < nparts; ++p)
          _mm512_store_si512(B + ((p * nt + j) * rs + s) * kTile + q * 32, pairs(part[0][p], part[1][p]));
      }
}
void pack_pairs(int threads, const float *src, int64_t ld, const float *scale, const Shape &sh, int nparts,
                uint16_t *B) {
  get_pool(threads).run_chunks(sh.nt() / 2, [&](int64_t p) { pack_pairs_panel(src, ld, scale, sh, nparts, B, p); },
                               false);
}

// Where one operand's tiles are: part p of tile row / column t at step s at `tiles + p * part + (t * rs + s) * kTile`.
struct Tiles {
  const uint16_t *tiles;
  int parts;
  int64_t part, rs;
  const uint16_t *at(int p, int64_t t, int64_t s) const { return tiles + p * part + (t * rs + s) * kTile; }
};

// One 32 x 32 block (row tiles i, i + 1 of A; column tiles j, j + 1 of B) over `steps` reduction steps, added to
// the four C tiles in acc (set when `first`), the parts of the split operand summed; the caller has configured
// the tiles.
__attribute__((target(MF_AMX_BF16))) void multiply_block(const Tiles &A, const Tiles &B, int64_t steps, int64_t i,
                                                          int64_t j, bool first, float *acc) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, 64);
    _tile_loadd(1, acc + 256, 64);
    _tile_loadd(2, acc + 512, 64);
    _tile_loadd(3, acc + 768, 64);
  }
  const Tiles &shared = A.parts == 1 ? A : B;  // the one-part operand streams from L3, the split one sits in L2
  const int64_t st = A.parts == 1 ? i : j;
  for (int64_t s = 0; s < steps; ++s) {
    if (s + kAhead < steps)
      for (int64_t t = st; t < st + 2; ++t)
        for (int l = 0; l < 16; ++l) _mm_prefetch((const char *)(shared.at(0, t, s + kAhead) + 32 * l), _MM_HINT_T0);
    for (int p = 0; p < std::max(A.parts, B.parts); ++p) {
      if (p < A.parts) {
        _tile_loadd(4, A.at(p, i, s), 64);
        _tile_loadd(5, A.at(p, i + 1, s), 64);
      }
      if (p < B.parts) {
        _tile_loadd(6, B.at(p, j, s), 64);
        _tile_loadd(7, B.at(p, j + 1, s), 64);
      }
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, 64);
  _tile_stored(1, acc + 256, 64);
  _tile_stored(2, acc + 512, 64);
  _tile_stored(3, acc + 768, 64);
}

// The block of acc (row tiles i, i + 1; column tiles j, j + 1) into out [M, N]: out[m, n] at out + m * ldo + n, or
// out + n * ldo + m when `transposed`; rows and columns past M and N dropped.
__attribute__((target(MF_AMX_BF16))) void store_block(const float *acc, int64_t M, int64_t N, float *out, int64_t ldo,
                                                       bool transposed, int64_t i, int64_t j) {
  for (int t = 0; t < 4; ++t) {  // tile t: rows 16 (i + t / 2) .., columns 16 (j + t % 2) ..
    const float *C = acc + 256 * t;
    const int64_t m0 = 16 * (i + t / 2), n0 = 16 * (j + t % 2);
    const int64_t rows = std::clamp<int64_t>(M - m0, 0, 16), cols = std::clamp<int64_t>(N - n0, 0, 16);
    if (!transposed) {
      for (int64_t r = 0; r < rows; ++r)
        _mm512_mask_storeu_ps(out + (m0 + r) * ldo + n0, lanes(cols), _mm512_load_ps(C + 16 * r));
    } else {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(C + 16 * r);
      transpose16x16_epi32(v);
      for (int64_t r = 0; r < cols; ++r)
        _mm512_mask_storeu_ps(out + (n0 + r) * ldo + m0, lanes(rows), _mm512_castsi512_ps(v[r]));
    }
  }
}

// Pool items over the 32-wide panels of the split operand, in `groups` ranges of the other operand's panels each
// (more than one only when the panels alone would leave threads idle; each range packs its panel again).
struct Items {
  int64_t panels, others, groups;
  Items(int64_t panels, int64_t others, int threads)
      : panels(panels), others(others),
        groups(std::max<int64_t>(1, std::min(others, (4 * threads + panels - 1) / std::max<int64_t>(panels, 1)))) {}
  int64_t count() const { return panels * groups; }
  int64_t panel(int64_t c) const { return c / groups; }
  int64_t begin(int64_t c) const { return others * (c % groups) / groups; }
  int64_t end(int64_t c) const { return others * (c % groups + 1) / groups; }
};

// Reduction steps of the split operand's panel packed at a time: its 3 parts x 2 tiles x steps stay within ~768 KiB
// of L2 beside the other operand's stream and the item's accumulators.
constexpr int64_t kChunkSteps = 128;

// Runs the pool items: item c calls chunk(c, s0, last, acc) for each reduction chunk from step s0 (once for an
// empty reduction, which then zeroes its C blocks), with the tiles configured and acc holding the 4 KiB C block
// of each panel in its range.
template <class Chunk>
void run_items(int threads, const Items &items, int64_t rs, Chunk &&chunk) {
  get_pool(threads).run_chunks(items.count(), [&](int64_t c) {
    thread_local LineVec<float> acc;
    grow(acc, (items.end(c) - items.begin(c)) * 1024);
    amx_tiles_16x64();
    for (int64_t s0 = 0; s0 == 0 || s0 < rs; s0 += kChunkSteps) chunk(c, s0, s0 + kChunkSteps >= rs, acc.data());
    amx_end();
  }, false);
}

// out [T, K] = dy [T, N] @ trits [N, K]. The trits are packed once for all threads; each pool item packs 32 rows of
// dy (three parts) into its thread's scratch, a reduction chunk at a time, and multiplies the chunk by every trit
// panel of its range while it sits in L2, so the read of dy overlaps the other thread's tile work.
void grad_input(int threads, const float *dy, const float *trits, int64_t T, int64_t N, int64_t K, float *out) {
  const Shape whole{T, K, N};
  thread_local LineVec<uint16_t> b;
  grow(b, whole.nt() * whole.rs() * kTile);
  pack_pairs(threads, trits, K, nullptr, whole, 1, b.data());
  const Tiles trit_tiles{b.data(), 1, 0, whole.rs()};  // b names each thread's own scratch inside the items
  const Items items(whole.mt() / 2, whole.nt() / 2, threads);
  run_items(threads, items, whole.rs(), [&](int64_t c, int64_t s0, bool last, float *acc) {
    const int64_t t0 = 32 * items.panel(c), rows = std::min<int64_t>(32, T - t0);
    const Shape sh{rows, K, std::min(32 * kChunkSteps, N - 32 * s0)};
    thread_local LineVec<uint16_t> a;
    grow(a, 3 * 2 * sh.rs() * kTile);
    for (int64_t i = 0; i < 2; ++i) pack_rows_tile(dy + t0 * N + 32 * s0, N, sh, 3, a.data(), i);
    const Tiles A{a.data(), 3, 2 * sh.rs() * kTile, sh.rs()}, B{trit_tiles.at(0, 0, s0), 1, 0, whole.rs()};
    for (int64_t j = items.begin(c); j < items.end(c); ++j, acc += 1024) {
      multiply_block(A, B, sh.rs(), 0, 2 * j, s0 == 0, acc);
      if (last) store_block(acc, rows, K, out + t0 * K, K, false, 0, 2 * j);
    }
  });
}

// out [N, K] = (dy * a)^T @ q as its transpose q^T [K, T] @ (dy * a) [T, N]. q^T is packed once for all threads;
// each pool item packs 32 columns of dy * a (three parts), a chunk of tokens at a time, as in grad_input.
void grad_weight(int threads, const float *dy, const float *a_scale, const float *q, int64_t T, int64_t N, int64_t K,
                 float *out) {
  const Shape whole{K, N, T};
  thread_local LineVec<uint16_t> a;
  grow(a, whole.mt() * whole.rs() * kTile);
  pack_cols(threads, q, K, whole, a.data());
  const Tiles code_tiles{a.data(), 1, 0, whole.rs()};
  const Items items(whole.nt() / 2, whole.mt() / 2, threads);
  run_items(threads, items, whole.rs(), [&](int64_t c, int64_t s0, bool last, float *acc) {
    const int64_t n0 = 32 * items.panel(c), cols = std::min<int64_t>(32, N - n0), r0 = 32 * s0;
    const Shape sh{K, cols, std::min(32 * kChunkSteps, T - r0)};
    thread_local LineVec<uint16_t> b;
    grow(b, 3 * 2 * sh.rs() * kTile);
    pack_pairs_panel(dy + r0 * N + n0, N, a_scale + r0, sh, 3, b.data(), 0);
    const Tiles A{code_tiles.at(0, 0, s0), 1, 0, whole.rs()}, B{b.data(), 3, 2 * sh.rs() * kTile, sh.rs()};
    for (int64_t i = items.begin(c); i < items.end(c); ++i, acc += 1024) {
      multiply_block(A, B, sh.rs(), 2 * i, 0, s0 == 0, acc);
      if (last) store_block(acc, K, cols, out + n0 * K, K, true, 2 * i, 0);
    }
  });
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
