// Kernel family 'hadamard': the online side of randomized Hadamard incoherence processing (reference:
// ops/hadamard.py, RandomHadamard.apply_input / invert_output): sign flips, the unnormalized block
// Walsh-Hadamard transform and one power-of-two scale. Only adds and subtracts, in the
// reference's butterfly order (level h = 1, 2, 4, ...: x[j], x[j + h] <- x[j] + x[j + h], x[j] - x[j + h]),
// so results equal it bit for bit.
#include "hadamard.h"

#include <immintrin.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "mulfree_cpu.h"
#include "pool.h"

namespace {

using F32Rows = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using ConstRows = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Mask = nb::ndarray<const bool, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

constexpr int64_t kRowsPerChunk = 16;            // rows a pool chunk transforms
constexpr int64_t kParallelFloats = int64_t(1) << 16;  // below this many floats a call stays on one thread

void butterflies(float *v, int64_t block) {
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t g = 0; g < block; g += 2 * h)
      for (int64_t j = g; j < g + h; ++j) {
        const float a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
}

// The same butterflies, 8 lanes at a time (block >= 8): levels 1, 2 and 4 inside each vector (the partner
// lane swapped in, a + c kept in the lower lane of each pair and a - c in the upper), then levels 8 ...
// between vectors, two per pass (half the loads and stores). Each output of a level is the same single add
// or subtract of the same two floats as in the scalar loop, so the result equals it bit for bit.
__attribute__((target("avx2"))) void butterflies_avx2(float *v, int64_t block) {
  for (int64_t j = 0; j < block; j += 8) {
    __m256 x = _mm256_loadu_ps(v + j);
    __m256 s = _mm256_permute_ps(x, 0xB1);  // lanes 1 0 3 2: the partner at distance 1
    x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xAA);
    s = _mm256_permute_ps(x, 0x4E);  // lanes 2 3 0 1: distance 2
    x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xCC);
    s = _mm256_permute2f128_ps(x, x, 0x01);  // the other 128-bit half: distance 4
    x = _mm256_blend_ps(_mm256_add_ps(x, s), _mm256_sub_ps(s, x), 0xF0);
    _mm256_storeu_ps(v + j, x);
  }
  int64_t h = 8;
  for (; 4 * h <= block; h *= 4)  // levels h and 2h in one pass over the four quarters of each 4h group
    for (int64_t g = 0; g < block; g += 4 * h)
      for (int64_t j = g; j < g + h; j += 8) {
        const __m256 a0 = _mm256_loadu_ps(v + j), a1 = _mm256_loadu_ps(v + j + h);
        const __m256 a2 = _mm256_loadu_ps(v + j + 2 * h), a3 = _mm256_loadu_ps(v + j + 3 * h);
        const __m256 b0 = _mm256_add_ps(a0, a1), b1 = _mm256_sub_ps(a0, a1);
        const __m256 b2 = _mm256_add_ps(a2, a3), b3 = _mm256_sub_ps(a2, a3);
        _mm256_storeu_ps(v + j, _mm256_add_ps(b0, b2));
        _mm256_storeu_ps(v + j + h, _mm256_add_ps(b1, b3));
        _mm256_storeu_ps(v + j + 2 * h, _mm256_sub_ps(b0, b2));
        _mm256_storeu_ps(v + j + 3 * h, _mm256_sub_ps(b1, b3));
      }
  if (h < block)  // an odd number of levels from 8 on: the last alone
    for (int64_t j = 0; j < h; j += 8) {
      const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
      _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
      _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
    }
}

// One row: signs (input transforms), butterflies per block, then signs (output inverses) and the exact
// power-of-two scale. The scalar oracle reads the bool mask; the AVX2 row flips sign bits with a mask of -0.0f
// (negative) and +0.0f lanes (`sign_bits`, made once per call): the same negation, bit for bit.
void row_scalar(float *v, int64_t n, const bool *neg, const float *, int64_t block, float scale, bool signs_first) {
  if (signs_first)
    for (int64_t k = 0; k < n; ++k) v[k] = neg[k] ? -v[k] : v[k];
  for (int64_t b = 0; b < n; b += block) butterflies(v + b, block);
  for (int64_t k = 0; k < n; ++k) v[k] = (!signs_first && neg[k] ? -v[k] : v[k]) * scale;
}

__attribute__((target("avx2"))) void row_avx2(float *v, int64_t n, const bool *, const float *sign_bits,
                                              int64_t block, float scale, bool signs_first) {
  if (signs_first)  // n is a multiple of block >= 8
    for (int64_t k = 0; k < n; k += 8)
      _mm256_storeu_ps(v + k, _mm256_xor_ps(_mm256_loadu_ps(v + k), _mm256_loadu_ps(sign_bits + k)));
  for (int64_t b = 0; b < n; b += block) butterflies_avx2(v + b, block);
  const __m256 s = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) {
    const __m256 flip = signs_first ? zero : _mm256_loadu_ps(sign_bits + k);
    _mm256_storeu_ps(v + k, _mm256_mul_ps(_mm256_xor_ps(_mm256_loadu_ps(v + k), flip), s));
  }
}

void hadamard_bound(ConstRows x, F32Rows y, Mask negative, int64_t block, int shift, bool signs_first,
                    const std::string &backend, int threads) {
  const int64_t rows = (int64_t)x.shape(0), n = (int64_t)x.shape(1);
  check_hadamard(n, block, (int64_t)negative.shape(0));
  if ((int64_t)y.shape(0) != rows || (int64_t)y.shape(1) != n)
    throw std::invalid_argument("hadamard: x and y shapes differ");
  const Isa isa = parse_isa(backend);
  nb::gil_scoped_release release;
  hadamard_rows(x.data(), y.data(), rows, n, negative.data(), block, shift, signs_first, isa, threads);
}

}  // namespace

void check_hadamard(int64_t n, int64_t block, int64_t mask_len) {
  if (block < 1 || (block & (block - 1)) || n % block)
    throw std::invalid_argument("block must be a power of two dividing the row width");
  if (mask_len != n) throw std::invalid_argument("sign mask length must equal the row width");
}

// The power of two is one exact product (what torch.ldexp computes). Each row is copied to y just before it is
// transformed there (still in L1), not in a separate pass over the whole array.
void hadamard_rows(const float *x, float *y, int64_t rows, int64_t n, const bool *neg, int64_t block, int shift,
                   bool signs_first, Isa isa, int threads) {
  const float scale = std::ldexp(1.0f, shift);
  const bool vector = isa != Isa::Scalar && block >= 8;
  thread_local LineVec<float> sign_bits;  // reused: a decode step transforms hundreds of single rows
  sign_bits.resize(vector ? n : 0);
  for (int64_t k = 0; k < (int64_t)sign_bits.size(); ++k) sign_bits[k] = neg[k] ? -0.0f : 0.0f;
  const float *bits = sign_bits.data();  // the caller's buffer (in a worker, the name means the worker's own)
  auto chunk = [&](int64_t c) {
    for (int64_t r = c * kRowsPerChunk, e = std::min(rows, r + kRowsPerChunk); r < e; ++r) {
      if (x != y) std::memcpy(y + r * n, x + r * n, n * sizeof(float));
      (vector ? row_avx2 : row_scalar)(y + r * n, n, neg, bits, block, scale, signs_first);
    }
  };
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  if (threads <= 1 || rows * n < kParallelFloats) {
    for (int64_t c = 0; c < chunks; ++c) chunk(c);
    return;
  }
  get_pool(threads).run_chunks(chunks, chunk);
}

void register_hadamard(nb::module_ &m) {
  m.def("hadamard", &hadamard_bound, nb::arg("x"), nb::arg("y"), nb::arg("negative"), nb::arg("block"),
        nb::arg("shift"), nb::arg("signs_first"), nb::arg("backend"), nb::arg("threads") = 1,
        "Float32 x [rows, n] transformed into y (the same shape; y may be x itself): sign flips where "
        "`negative`, the block Walsh-Hadamard butterflies (adds and subtracts, ops/hadamard.py::fwht's order) "
        "and one power-of-two scale 2^shift; signs before the butterflies when signs_first (an input transform "
        "T x), after them otherwise (an output inverse). "
        "`backend` 'scalar' runs the plain loops, any other the AVX2 ones (equal bit for bit); rows split over "
        "`threads` when there are enough of them.");
}
