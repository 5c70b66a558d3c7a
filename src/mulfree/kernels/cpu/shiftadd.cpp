// Kernel family 'shiftadd': ShiftAddLLM lookup-table GEMV for Latency-mode BCQ weights
// (reference: mulfree.ops.bcq.bcq_lut_gemv; storage format in ops/bcq.py).
//
// y[n] = sum_c sum_i alpha_i(c, n/g) * LUT_c[key_i(n, c)], LUT_c[key] = sum_s (bit s ? +x : -x)[8c+s].
// The 256-entry table is split in two 16-entry halves (low/high nibble of the key, 4 activations
// each), built with sign flips and adds; alpha = sum_t sign_t 2^exp_t is applied to the two half
// tables of each (chunk, row group, plane) with exponent shifts (ldexp / vscalefps / exponent-field
// add) and adds, then every row adds one lookup per half. No multiplication touches a weight.
//
// Kernel weight layout ("tiles"), built once by kernels/shiftadd.py `prepare`:
//   tiles uint8 [ceil(N/16), C, q, 16]: byte of row 16*t + lane, chunk c (8 columns), plane i.
//   exps, signs int8 [C, ceil(N/g), q, T]: the APoT terms of alpha (sign 0 = absent term).
// Every path scales the tables term by term and adds lookups chunk by chunk, plane by plane, so scalar, AVX2
// and AVX-512 agree bit for bit on normal numbers.
#include "mulfree_cpu.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int kLanes = 16;  // rows per tile

struct Job {
  const float *tables;  // [C][2][16]: low-nibble and high-nibble signed sums
  const uint8_t *tiles; // [NT][C][q][16]
  const int8_t *exps, *signs;  // [C][NG][q][T]
  float *y;
  int64_t N, C, NG, group, q, T;
};

// Signed sums of 4 activations for all 16 sign patterns: t[j] = ((±x0 + ±x1) + ±x2) + ±x3,
// + where bit s of j is set. The same expression order is used by every path.
void build_tables(const float *x, int64_t K, int64_t C, float *tables) {
  for (int64_t c = 0; c < C; ++c) {
    float xs[8];
    for (int s = 0; s < 8; ++s) {
      const int64_t k = 8 * c + s;
      xs[s] = k < K ? x[k] : 0.0f;
    }
    for (int half = 0; half < 2; ++half) {
      const float *h = xs + 4 * half;
      float *t = tables + (c * 2 + half) * 16;
      for (int j = 0; j < 16; ++j) {
        float v = (j & 1) ? h[0] : -h[0];
        v += (j & 2) ? h[1] : -h[1];
        v += (j & 4) ? h[2] : -h[2];
        v += (j & 8) ? h[3] : -h[3];
        t[j] = v;
      }
    }
  }
}

// alpha_i(c, G) applied to the two half tables with exponent shifts: out = sum_t sign_t ldexp(t, e_t),
// terms added in order t (sign 0 = absent). Shared by all rows of group G, so the shifts cost
// O(C * q * T * 32) per group instead of per row.
void scale_tables(const Job &j, int64_t c, int64_t G, int64_t i, float *out) {
  const float *tb = j.tables + c * 32;
  const int64_t s0 = ((c * j.NG + G) * j.q + i) * j.T;
  for (int e = 0; e < 32; ++e) out[e] = 0.0f;
  for (int64_t tt = 0; tt < j.T; ++tt) {
    const int8_t s = j.signs[s0 + tt];
    if (!s) continue;
    for (int e = 0; e < 32; ++e) {
      const float v = std::ldexp(tb[e], j.exps[s0 + tt]);
      out[e] = s > 0 ? out[e] + v : out[e] - v;
    }
  }
}

// One tile of 16 rows, row by row: the oracle, and the fallback when a tile spans row groups.
void tile_scalar(const Job &j, int64_t t) {
  float acc[kLanes] = {0.0f};
  float st[32];
  for (int64_t c = 0; c < j.C; ++c) {
    for (int64_t i = 0; i < j.q; ++i) {
      int64_t last_group = -1;
      for (int lane = 0; lane < kLanes; ++lane) {
        const int64_t n = t * kLanes + lane;
        if (n >= j.N) break;
        if (n / j.group != last_group) {
          last_group = n / j.group;
          scale_tables(j, c, last_group, i, st);
        }
        const uint8_t key = j.tiles[((t * j.C + c) * j.q + i) * kLanes + lane];
        acc[lane] += st[key & 15] + st[16 + (key >> 4)];
      }
    }
  }
  const int64_t rows = std::min<int64_t>(kLanes, j.N - t * kLanes);
  std::memcpy(j.y + t * kLanes, acc, rows * sizeof(float));
}

bool tile_in_one_group(const Job &j, int64_t t) {
  const int64_t first = t * kLanes, last = std::min(j.N, first + kLanes) - 1;
  return first / j.group == last / j.group;
}

// AVX-512: NB tiles of one row group at once; each scaled 16-entry half table lives in a register
// (vpermps lookup); alpha applied to the tables with vscalefps (exact multiply by 2^e).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 flip_sign(__m512 v, __m512i mask) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), mask));  // avx512f only (no DQ)
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tiles_avx512(const Job &j, int64_t t0) {
  const int64_t G = (t0 * kLanes) / j.group;
  const __m512i m15 = _mm512_set1_epi32(15);
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const __m512 lo = _mm512_loadu_ps(j.tables + c * 32), hi = _mm512_loadu_ps(j.tables + c * 32 + 16);
    for (int64_t i = 0; i < j.q; ++i) {
      const int64_t s0 = ((c * j.NG + G) * j.q + i) * j.T;
      __m512 slo = _mm512_setzero_ps(), shi = _mm512_setzero_ps();
      for (int64_t tt = 0; tt < j.T; ++tt) {
        // Branch-free (signs are random): sign 0 -> scale by 2^-inf = 0; sign -1 -> flip sign bit.
        const int8_t s = j.signs[s0 + tt];
        const __m512 e = _mm512_set1_ps(s ? (float)j.exps[s0 + tt] : -INFINITY);
        const __m512i neg = _mm512_set1_epi32((int)((uint32_t)(s < 0) << 31));
        slo = _mm512_add_ps(slo, flip_sign(_mm512_scalef_ps(lo, e), neg));
        shi = _mm512_add_ps(shi, flip_sign(_mm512_scalef_ps(hi, e), neg));
      }
      for (int b = 0; b < NB; ++b) {
        const uint8_t *kp = j.tiles + (((t0 + b) * j.C + c) * j.q + i) * kLanes;
        const __m512i key = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)kp));
        const __m512 v = _mm512_add_ps(_mm512_permutexvar_ps(_mm512_and_si512(key, m15), slo),
                                       _mm512_permutexvar_ps(_mm512_srli_epi32(key, 4), shi));
        acc[b] = _mm512_add_ps(acc[b], v);
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t rows = std::min<int64_t>(kLanes, j.N - (t0 + b) * kLanes);
    _mm512_mask_storeu_ps(j.y + (t0 + b) * kLanes, (__mmask16)((1u << rows) - 1), acc[b]);
  }
}

// AVX2: 8 rows per ymm, two 8-entry permutes + blend per 16-entry lookup; 2^e applied by adding
// e to the exponent field (exact for normal v and result; v == 0 stays 0 via a mask).
__attribute__((target("avx2,fma"))) __m256 ldexp_avx2(__m256 v, int e) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i shifted = _mm256_add_epi32(bits, _mm256_set1_epi32(e * (1 << 23)));
  const __m256i is_zero = _mm256_cmpeq_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7f800000)),
                                             _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_andnot_si256(is_zero, shifted));
}

__attribute__((target("avx2,fma"))) __m256 lookup16_avx2(__m256i idx, __m256 t0, __m256 t1) {
  const __m256 a = _mm256_permutevar8x32_ps(t0, idx), b = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
}

template <int NB>
__attribute__((target("avx2,fma"))) void tiles_avx2(const Job &j, int64_t t0) {
  const int64_t G = (t0 * kLanes) / j.group;
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 acc[NB][2];
  for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < j.C; ++c) {
    const float *tb = j.tables + c * 32;
    __m256 base[4];
    for (int r = 0; r < 4; ++r) base[r] = _mm256_loadu_ps(tb + 8 * r);
    for (int64_t i = 0; i < j.q; ++i) {
      const int64_t s0 = ((c * j.NG + G) * j.q + i) * j.T;
      __m256 st[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t tt = 0; tt < j.T; ++tt) {
        // Branch-free: sign 0 -> all-zero keep mask; sign -1 -> flip sign bit.
        const int8_t s = j.signs[s0 + tt];
        const __m256 keep = _mm256_castsi256_ps(_mm256_set1_epi32(s ? -1 : 0));
        const __m256 neg = _mm256_castsi256_ps(_mm256_set1_epi32((int)((uint32_t)(s < 0) << 31)));
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_and_ps(keep, _mm256_xor_ps(ldexp_avx2(base[r], j.exps[s0 + tt]), neg));
          st[r] = _mm256_add_ps(st[r], a);
        }
      }
      for (int b = 0; b < NB; ++b) {
        const uint8_t *kp = j.tiles + (((t0 + b) * j.C + c) * j.q + i) * kLanes;
        for (int h = 0; h < 2; ++h) {
          const __m256i key = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(kp + 8 * h)));
          const __m256 v = _mm256_add_ps(lookup16_avx2(_mm256_and_si256(key, m15), st[0], st[1]),
                                         lookup16_avx2(_mm256_srli_epi32(key, 4), st[2], st[3]));
          acc[b][h] = _mm256_add_ps(acc[b][h], v);
        }
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    alignas(32) float out[kLanes];
    _mm256_store_ps(out, acc[b][0]);
    _mm256_store_ps(out + 8, acc[b][1]);
    const int64_t rows = std::min<int64_t>(kLanes, j.N - (t0 + b) * kLanes);
    std::memcpy(j.y + (t0 + b) * kLanes, out, rows * sizeof(float));
  }
}

enum class Isa { Scalar, Avx2, Avx512 };

Isa parse_isa(const std::string &name) {
  const CpuFeatures &f = cpu_features();
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2" && f.avx2 && f.fma) return Isa::Avx2;
  if (name == "avx512" && f.avx512f && f.avx512bw && f.avx512vl) return Isa::Avx512;
  throw std::invalid_argument("backend '" + name + "' is unknown or not supported by this CPU");
}

// Tiles [t0, t1): batches of up to 8 (AVX-512) / 4 (AVX2) consecutive tiles of one row group
// share the scaled tables; a tile spanning two row groups runs the scalar path.
void run_tiles(const Job &j, Isa isa, int64_t t0, int64_t t1) {
  const int64_t max_nb = isa == Isa::Avx512 ? 8 : 4;
  int64_t t = t0;
  while (t < t1) {
    if (isa == Isa::Scalar || !tile_in_one_group(j, t)) {
      tile_scalar(j, t++);
      continue;
    }
    const int64_t G = (t * kLanes) / j.group;
    int64_t nb = 1;
    while (nb < max_nb && t + nb < t1 && tile_in_one_group(j, t + nb) && ((t + nb) * kLanes) / j.group == G) ++nb;
    if (isa == Isa::Avx512) {
      switch (nb) {
        case 8: tiles_avx512<8>(j, t); break;
        case 7: tiles_avx512<7>(j, t); break;
        case 6: tiles_avx512<6>(j, t); break;
        case 5: tiles_avx512<5>(j, t); break;
        case 4: tiles_avx512<4>(j, t); break;
        case 3: tiles_avx512<3>(j, t); break;
        case 2: tiles_avx512<2>(j, t); break;
        default: tiles_avx512<1>(j, t); break;
      }
    } else {
      switch (nb) {
        case 4: tiles_avx2<4>(j, t); break;
        case 3: tiles_avx2<3>(j, t); break;
        case 2: tiles_avx2<2>(j, t); break;
        default: tiles_avx2<1>(j, t); break;
      }
    }
    t += nb;
  }
}

template <class T>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

void lut_gemv(Arr<const float> x, Arr<const uint8_t> tiles, Arr<const int8_t> exps, Arr<const int8_t> signs,
              Arr<float> y, int64_t n, int64_t group, const std::string &backend, int threads) {
  const Isa isa = parse_isa(backend);
  if (x.ndim() != 1 || tiles.ndim() != 4 || exps.ndim() != 4 || signs.ndim() != 4 || y.ndim() != 1)
    throw std::invalid_argument("shiftadd_lut_gemv: x [K], tiles [NT, C, q, 16], exps/signs [C, NG, q, T], y [N]");
  const int64_t K = x.shape(0), NT = tiles.shape(0), C = tiles.shape(1), q = tiles.shape(2);
  const int64_t NG = exps.shape(1), T = exps.shape(3);
  if (group < 1 || NT != (n + kLanes - 1) / kLanes || tiles.shape(3) != kLanes || C != (K + 7) / 8 ||
      (int64_t)y.shape(0) != n || exps.shape(0) != (size_t)C || exps.shape(2) != (size_t)q ||
      NG != (n + group - 1) / group)
    throw std::invalid_argument("shiftadd_lut_gemv: shapes of x, tiles, exps and y do not match");
  for (int d = 0; d < 4; ++d)
    if (signs.shape(d) != exps.shape(d)) throw std::invalid_argument("shiftadd_lut_gemv: signs shape != exps shape");
  std::vector<float> tables(C * 32);
  Job j{tables.data(), tiles.data(), exps.data(), signs.data(), y.data(), n, C, NG, group, q, T};
  nb::gil_scoped_release release;
  build_tables(x.data(), K, C, tables.data());
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(threads, NT));
  if (nt == 1) return run_tiles(j, isa, 0, NT);
  std::vector<std::thread> pool;
  const int64_t per = (NT + nt - 1) / nt;
  for (int w = 1; w < nt; ++w)
    pool.emplace_back(run_tiles, std::cref(j), isa, std::min(NT, w * per), std::min(NT, (w + 1) * per));
  run_tiles(j, isa, 0, std::min(NT, per));
  for (auto &th : pool) th.join();
}

}  // namespace

void register_shiftadd(nb::module_ &m) {
  m.def("shiftadd_lut_gemv", &lut_gemv, nb::arg("x"), nb::arg("tiles"), nb::arg("exps"), nb::arg("signs"),
        nb::arg("y"), nb::arg("n"), nb::arg("group"), nb::arg("backend"), nb::arg("threads"),
        "y[N] = W x for Latency-mode BCQ weights via 16-entry LUT halves, exponent shifts and adds.");
}
