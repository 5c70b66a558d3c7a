// Kernel family 'gptq_columns': the GPTQ solver's column loop over one lazy block (reference: the Python loop in
// quant/gptq.py `_solve` with the quantizers' `quantize_column`). Per column: quantize it (the uniform grid of
// `UniformQuantizer`, or the Accuracy-mode BCQ fit of `BCQColumnQuantizer`), record its codes, and spread its
// error over the block's later columns with the block's rows of the inverse Hessian factor. Python pays a dozen
// numpy calls per column there; this runs the whole block in one call, with the GIL released. Every value is
// computed with the reference's float32 operations in the same order (a multiply, then a subtract: the baseline
// x86-64 build has no FMA to contract them), so the results are bit-identical (tests/test_quant_speed.py).
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "bcq_fit.h"
#include "mulfree_cpu.h"

namespace {

template <class T>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

struct Block {
  float *w;            // [B, N] the block's columns as rows, updated in place
  const float *hinv;   // [B, B] the block's rows of the upper inverse factor
  float *q, *err;      // [B, N] dequantized columns and their scaled errors
  const int64_t *orig; // [B] original column index of each block column
  int64_t B, N;
};

Block check_block(Arr<float> w, Arr<const float> hinv, Arr<float> q, Arr<float> err, Arr<const int64_t> orig) {
  if (w.ndim() != 2 || hinv.ndim() != 2 || q.ndim() != 2 || err.ndim() != 2 || orig.ndim() != 1)
    throw std::invalid_argument("gptq_columns: w, q, err [B, N]; hinv [B, B]; orig [B]");
  const int64_t B = w.shape(0), N = w.shape(1);
  if ((int64_t)hinv.shape(0) != B || (int64_t)hinv.shape(1) != B || (int64_t)q.shape(0) != B ||
      (int64_t)q.shape(1) != N || (int64_t)err.shape(0) != B || (int64_t)err.shape(1) != N ||
      (int64_t)orig.shape(0) != B)
    throw std::invalid_argument("gptq_columns: shapes do not match");
  return {w.data(), hinv.data(), q.data(), err.data(), orig.data(), B, N};
}

// The solver loop: `quantize(i, column, out)` writes column i's dequantized values; then
// err = (w_i - q_i) / hinv[i][i] and w_j -= hinv[i][j] * err for j >= i.
template <class Quantize>
void solve_block(const Block &b, Quantize quantize) {
  for (int64_t i = 0; i < b.B; ++i) {
    float *wi = b.w + i * b.N, *qi = b.q + i * b.N, *ei = b.err + i * b.N;
    const float *hi = b.hinv + i * b.B;
    quantize(i, wi, qi);
    const float d = hi[i];
    for (int64_t r = 0; r < b.N; ++r) ei[r] = (wi[r] - qi[r]) / d;
    for (int64_t j = i; j < b.B; ++j) {
      const float h = hi[j];
      float *wj = b.w + j * b.N;
      for (int64_t r = 0; r < b.N; ++r) wj[r] -= h * ei[r];
    }
  }
}

// UniformQuantizer.quantize_column: code = clip(rint(w / s) + z, 0, maxq), q = (code - z) * s, the scale and
// zero of the column's group (scale_t / zero_t [groups, N]); codes [N, K] uint8.
void columns_uniform(Arr<float> w, Arr<const float> hinv, Arr<float> q, Arr<float> err, Arr<const int64_t> orig,
                     Arr<const float> scale_t, Arr<const float> zero_t, int group, int maxq, Arr<uint8_t> codes) {
  const Block b = check_block(w, hinv, q, err, orig);
  if (scale_t.ndim() != 2 || zero_t.ndim() != 2 || codes.ndim() != 2 || (int64_t)scale_t.shape(1) != b.N ||
      scale_t.shape(0) != zero_t.shape(0) || scale_t.shape(1) != zero_t.shape(1) || (int64_t)codes.shape(0) != b.N)
    throw std::invalid_argument("gptq_columns_uniform: scale_t, zero_t [G, N]; codes [N, K]");
  if (group < 1 || maxq < 1 || maxq > 255)
    throw std::invalid_argument("gptq_columns_uniform: group >= 1 and maxq in 1..255 (uint8 codes)");
  const int64_t K = codes.shape(1), G = scale_t.shape(0);
  for (int64_t i = 0; i < b.B; ++i)
    if (b.orig[i] < 0 || b.orig[i] >= K || b.orig[i] / group >= G)
      throw std::invalid_argument("gptq_columns_uniform: column index out of range");
  const float top = (float)maxq;
  uint8_t *code = codes.data();
  nb::gil_scoped_release release;
  solve_block(b, [&](int64_t i, const float *col, float *out) {
    const int64_t c = b.orig[i];
    const float *s = scale_t.data() + (c / group) * b.N, *z = zero_t.data() + (c / group) * b.N;
    for (int64_t r = 0; r < b.N; ++r) {
      const float v = std::min(std::max(std::nearbyint(col[r] / s[r]) + z[r], 0.0f), top);
      code[r * K + c] = v == v ? (uint8_t)v : 0;  // NaN (a non-finite H): 0, as numpy's cast gives, not UB
      out[r] = (v - z[r]) * s[r];
    }
  });
}

// BCQColumnQuantizer._fit_column (Accuracy mode): the column in groups of `group` rows, fitted per group
// (bcq_fit_group); the level index's bit q-1-p is plane p's sign, written to planes [q, N, K] (bool bytes); the
// APoT terms go to exps / signs [K, G, q, T]; q = sum over planes of ±alpha_p in float32.
void columns_bcq(Arr<float> w, Arr<const float> hinv, Arr<float> q, Arr<float> err, Arr<const int64_t> orig,
                 int bits, int rounds, int terms, int group, Arr<uint8_t> planes, Arr<int8_t> exps,
                 Arr<int8_t> signs) {
  const Block b = check_block(w, hinv, q, err, orig);
  if (planes.ndim() != 3 || exps.ndim() != 4 || signs.ndim() != 4 || group < 1)
    throw std::invalid_argument("gptq_columns_bcq: planes [q, N, K]; exps, signs [K, G, q, T]; group >= 1");
  const int64_t K = planes.shape(2), G = (b.N + group - 1) / group;
  if ((int64_t)planes.shape(0) != bits || (int64_t)planes.shape(1) != b.N || (int64_t)exps.shape(0) != K ||
      (int64_t)exps.shape(1) != G || (int64_t)exps.shape(2) != bits || (int64_t)exps.shape(3) != terms ||
      signs.shape(0) != exps.shape(0) || signs.shape(1) != exps.shape(1) || signs.shape(2) != exps.shape(2) ||
      signs.shape(3) != exps.shape(3) || bits < 1 || bits > 8 || terms < 1 || rounds < 0)
    throw std::invalid_argument("gptq_columns_bcq: shapes do not match");
  for (int64_t i = 0; i < b.B; ++i)
    if (b.orig[i] < 0 || b.orig[i] >= K) throw std::invalid_argument("gptq_columns_bcq: column index out of range");
  std::vector<double> col(G * group, 0.0), valid(G * group, 0.0);
  std::fill(valid.begin(), valid.begin() + b.N, 1.0);
  std::vector<int64_t> idx(G * group);
  std::vector<float> alpha(G * bits);
  uint8_t *plane = planes.data();
  nb::gil_scoped_release release;
  solve_block(b, [&](int64_t i, const float *x, float *out) {
    const int64_t c = b.orig[i];
    std::copy(x, x + b.N, col.begin());
    int8_t *e = exps.data() + c * G * bits * terms, *s = signs.data() + c * G * bits * terms;
    for (int64_t g = 0; g < G; ++g)
      bcq_fit_group(col.data() + g * group, valid.data() + g * group, group, bits, rounds, terms,
                    idx.data() + g * group, e + g * bits * terms, s + g * bits * terms);
    for (int64_t a = 0; a < G * bits; ++a) {  // apot_value: sum_t sign_t * 2^exp_t
      float v = 0.0f;
      for (int t = 0; t < terms; ++t) v += (float)s[a * terms + t] * std::ldexp(1.0f, e[a * terms + t]);
      alpha[a] = v;
    }
    for (int64_t r = 0; r < b.N; ++r) {
      const float *al = alpha.data() + (r / group) * bits;
      float v = 0.0f;
      for (int p = 0; p < bits; ++p) {
        const bool pos = (idx[r] >> (bits - 1 - p)) & 1;
        plane[(p * b.N + r) * K + c] = pos;
        v += pos ? al[p] : -al[p];
      }
      out[r] = v;
    }
  });
}

}  // namespace

void register_gptq_columns(nb::module_ &m) {
  m.def("gptq_columns_uniform", &columns_uniform, nb::arg("w"), nb::arg("hinv"), nb::arg("q"), nb::arg("err"),
        nb::arg("orig"), nb::arg("scale_t"), nb::arg("zero_t"), nb::arg("group"), nb::arg("maxq"), nb::arg("codes"),
        "GPTQ's column loop over one lazy block with the uniform grid (quant/gptq.py UniformQuantizer).");
  m.def("gptq_columns_bcq", &columns_bcq, nb::arg("w"), nb::arg("hinv"), nb::arg("q"), nb::arg("err"),
        nb::arg("orig"), nb::arg("bits"), nb::arg("rounds"), nb::arg("terms"), nb::arg("group"), nb::arg("planes"),
        nb::arg("exps"), nb::arg("signs"),
        "GPTQ's column loop over one lazy block with the Accuracy-mode BCQ fit (quant/shiftadd.py).");
}
