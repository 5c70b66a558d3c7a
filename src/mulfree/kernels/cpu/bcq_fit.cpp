// Kernel family 'bcq_fit': the Accuracy-mode ShiftAdd column fit (reference: mulfree.ops.bcq.bcq_fit_np,
// the same algorithm in numpy float64). GPTQ's column loop asks for one fit per weight column, and the
// reference's cost there is its numpy calls (a dozen per ALS round), not arithmetic: here a column's
// G groups of m weights are fitted in one call. Per group: greedy init, then per round the q x q normal
// equations from per-level counts and sums (Gaussian elimination with partial pivoting), sorted |alpha|,
// APoT rounding (greedy signed powers of two), nearest-level assignment; the best iterate by squared
// error is kept and the loop stops at a fixed point. Sums run in index order; the solve's rounding may
// differ from LAPACK's in the last bits, so results equal the reference's except at exact ties.
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "bcq_fit.h"
#include "mulfree_cpu.h"

namespace {

constexpr int kMaxBits = 8;
constexpr double kExpMin = -100.0, kExpMax = 100.0;  // ops/powers.py EXP_MIN, EXP_MAX

template <class T>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

// Level l's sign of plane i: +1 iff bit (q - 1 - i) of l is set (ops/bcq.py level_signs).
inline double level_sign(int l, int i, int q) { return (l >> (q - 1 - i)) & 1 ? 1.0 : -1.0; }

// One greedy APoT term of r: sign(r) * 2^clamp(rint(log2|r|)); sign 0 (and term 0) for r == 0.
inline double apot_term(double r, double *e_out) {
  const double e = std::min(std::max(std::rint(std::log2(std::abs(r))), kExpMin), kExpMax);
  const double s = (r > 0) - (r < 0);
  if (e_out) *e_out = s == 0 ? 0.0 : e;
  return s * std::exp2(e);
}

// The APoT value of alpha with `terms` greedy terms (ops/bcq.py _apot_value_np).
double apot_value(double a, int terms) {
  double r = a, value = 0.0;
  for (int t = 0; t < terms; ++t) {
    const double term = apot_term(r, nullptr);
    value += term;
    r -= term;
  }
  return value;
}

// Solves A x = b (n x n, row-major, A and b overwritten) by elimination with partial pivoting.
void solve(double *A, double *b, int n) {
  for (int k = 0; k < n; ++k) {
    int p = k;
    for (int i = k + 1; i < n; ++i)
      if (std::abs(A[i * n + k]) > std::abs(A[p * n + k])) p = i;
    if (p != k) {
      for (int j = 0; j < n; ++j) std::swap(A[k * n + j], A[p * n + j]);
      std::swap(b[k], b[p]);
    }
    for (int i = k + 1; i < n; ++i) {
      const double l = A[i * n + k] / A[k * n + k];
      for (int j = k; j < n; ++j) A[i * n + j] -= l * A[k * n + j];
      b[i] -= l * b[k];
    }
  }
  for (int k = n - 1; k >= 0; --k) {
    double s = b[k];
    for (int j = k + 1; j < n; ++j) s -= A[k * n + j] * b[j];
    b[k] = s / A[k * n + k];
  }
}

}  // namespace

void bcq_fit_group(const double *w, const double *v, int m, int q, int rounds, int terms, int64_t *idx, int8_t *exps,
               int8_t *signs) {
  const int L = 1 << q;
  std::vector<double> r(w, w + m), counts(L), sums(L), levels(L);
  std::vector<int64_t> prev(m), best_idx(m);
  double alpha[kMaxBits], raw[kMaxBits], best_alpha[kMaxBits] = {};
  double vsum = 0.0, w2 = 0.0;
  for (int j = 0; j < m; ++j) vsum += v[j], w2 += w[j] * w[j];
  std::fill(idx, idx + m, 0);
  for (int i = 0; i < q; ++i) {  // greedy init: b_i = sign(r), alpha_i = mean |r| over valid weights
    double s = 0.0;
    for (int j = 0; j < m; ++j) s += std::abs(r[j]) * v[j];
    alpha[i] = s / std::max(vsum, 1.0);
    for (int j = 0; j < m; ++j) {
      const bool pos = r[j] >= 0;
      r[j] -= alpha[i] * (pos ? 1.0 : -1.0);
      idx[j] |= (int64_t)pos << (q - 1 - i);
    }
  }
  auto stats = [&] {
    std::fill(counts.begin(), counts.end(), 0.0);
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int j = 0; j < m; ++j) counts[idx[j]] += v[j], sums[idx[j]] += w[j];
  };
  stats();
  double best_err = std::numeric_limits<double>::infinity();
  const double ridge = 1e-6 * m;
  for (int round = 0; round < std::max(rounds, 1); ++round) {
    if (rounds > 0) {  // normal equations B^T B alpha = B^T w from the level statistics
      double A[kMaxBits * kMaxBits], b[kMaxBits];
      for (int i = 0; i < q; ++i) {
        b[i] = 0.0;
        for (int l = 0; l < L; ++l) b[i] += sums[l] * level_sign(l, i, q);
        for (int k = 0; k < q; ++k) {
          double s = 0.0;
          for (int l = 0; l < L; ++l) s += counts[l] * level_sign(l, i, q) * level_sign(l, k, q);
          A[i * q + k] = s + (i == k ? ridge : 0.0);
        }
      }
      solve(A, b, q);
      for (int i = 0; i < q; ++i)
        if (std::isfinite(b[i])) alpha[i] = b[i];
    }
    for (int i = 0; i < q; ++i) raw[i] = std::abs(alpha[i]);
    std::sort(raw, raw + q, [](double a, double c) { return a > c; });
    for (int i = 0; i < q; ++i) alpha[i] = apot_value(raw[i], terms);
    for (int l = 0; l < L; ++l) {
      double s = 0.0;
      for (int i = 0; i < q; ++i) s += alpha[i] * level_sign(l, i, q);
      levels[l] = s;
    }
    std::copy(idx, idx + m, prev.begin());
    for (int j = 0; j < m; ++j) {
      int arg = 0;
      double best = std::abs(w[j] - levels[0]);
      for (int l = 1; l < L; ++l) {
        const double d = std::abs(w[j] - levels[l]);
        if (d < best) best = d, arg = l;
      }
      idx[j] = arg;
    }
    stats();
    double cross = 0.0, square = 0.0;
    for (int l = 0; l < L; ++l) cross += levels[l] * sums[l], square += levels[l] * levels[l] * counts[l];
    const double err = w2 - 2 * cross + square;
    if (err < best_err) {
      best_err = err;
      std::copy(idx, idx + m, best_idx.begin());
      std::copy(raw, raw + q, best_alpha);
    }
    if (std::equal(idx, idx + m, prev.begin())) break;  // a fixed point: every further round repeats it
  }
  std::copy(best_idx.begin(), best_idx.end(), idx);
  for (int i = 0; i < q; ++i) {  // the terms of the best sorted |alpha| (ops/bcq.py _apot_round_np)
    double rr = best_alpha[i];
    for (int t = 0; t < terms; ++t) {
      double e;
      const double term = apot_term(rr, &e);
      rr -= term;
      exps[i * terms + t] = (int8_t)e;
      signs[i * terms + t] = (int8_t)((term > 0) - (term < 0));
    }
  }
}

namespace {

void bcq_fit_groups(Arr<const double> w, Arr<const double> valid, int bits, int rounds, int terms, Arr<int64_t> idx,
                    Arr<int8_t> exps, Arr<int8_t> signs) {
  if (w.ndim() != 2 || valid.ndim() != 2 || idx.ndim() != 2 || exps.ndim() != 3 || signs.ndim() != 3)
    throw std::invalid_argument("bcq_fit: w, valid, idx [G, m]; exps, signs [G, q, T]");
  const int64_t G = w.shape(0), m = w.shape(1);
  if (bits < 1 || bits > kMaxBits || terms < 1 || rounds < 0)
    throw std::invalid_argument("bcq_fit: bits in 1..8, terms >= 1, rounds >= 0");
  if ((int64_t)valid.shape(0) != G || (int64_t)valid.shape(1) != m || (int64_t)idx.shape(0) != G ||
      (int64_t)idx.shape(1) != m || (int64_t)exps.shape(0) != G || (int64_t)exps.shape(1) != bits ||
      (int64_t)exps.shape(2) != terms || signs.shape(0) != exps.shape(0) || signs.shape(1) != exps.shape(1) ||
      signs.shape(2) != exps.shape(2))
    throw std::invalid_argument("bcq_fit: shapes do not match");
  nb::gil_scoped_release release;
  for (int64_t g = 0; g < G; ++g)
    bcq_fit_group(w.data() + g * m, valid.data() + g * m, (int)m, bits, rounds, terms, idx.data() + g * m,
              exps.data() + g * bits * terms, signs.data() + g * bits * terms);
}

}  // namespace

void register_bcq_fit(nb::module_ &m) {
  m.def("bcq_fit_groups", &bcq_fit_groups, nb::arg("w"), nb::arg("valid"), nb::arg("bits"), nb::arg("rounds"),
        nb::arg("terms"), nb::arg("idx"), nb::arg("exps"), nb::arg("signs"),
        "BCQ + ALS + APoT fit of G groups of m float64 weights (ops/bcq.py bcq_fit_np): level index per weight "
        "into idx [G, m], APoT exponents and signs into exps / signs int8 [G, q, T].");
}
