// Python binding of the 'shiftadd' family: ShiftAddWeights holds Latency-mode BCQ weights in the
// quad layout (shiftadd.h) and runs the one-token GEMV (shiftadd.cpp) and the T-token GEMM
// (shiftadd_gemm.cpp) on them.
#include "pool.h"
#include "shiftadd.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace shiftadd;

template <class T>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

// Weights in kernel layout, checked once and held (no copy) so a call converts only x and y.
class LutWeights {
 public:
  LutWeights(Arr<const uint8_t> keys, Arr<const int8_t> exps, Arr<const int8_t> signs, Arr<const float> escale,
             int64_t n, int64_t group)
      : keys_(keys), exps_(exps), signs_(signs), escale_(escale), n_(n), group_(group) {
    if (keys.ndim() != 5 || exps.ndim() != 4 || signs.ndim() != 4 || escale.ndim() != 4)
      throw std::invalid_argument("ShiftAddWeights: keys [NQ, C, q, 16, 4], exps/signs/escale [NG, C, q, T]");
    nq_ = (n + kQuadRows - 1) / kQuadRows, ng_ = exps.shape(0), c_ = exps.shape(1), q_ = exps.shape(2);
    t_ = exps.shape(3);
    if (group < 1 || n < 1 || t_ < 1 || (int64_t)keys.shape(0) != nq_ || (int64_t)keys.shape(1) != c_ ||
        (int64_t)keys.shape(2) != q_ || keys.shape(3) != kLanes || keys.shape(4) != kQuad ||
        ng_ != (n + group - 1) / group)
      throw std::invalid_argument("ShiftAddWeights: shapes of keys and exps do not match n and group");
    for (int d = 0; d < 4; ++d)
      if (signs.shape(d) != exps.shape(d) || escale.shape(d) != exps.shape(d))
        throw std::invalid_argument("ShiftAddWeights: signs/escale shape != exps shape");
  }

  // y [N] = W x, x [K] with ceil(K / 8) == C.
  void gemv(Arr<const float> x, Arr<float> y, const std::string &backend, int threads) const {
    const Isa isa = parse_isa(backend);
    if (x.ndim() != 1 || y.ndim() != 1 || (int64_t)(x.shape(0) + 7) / 8 != c_ || (int64_t)y.shape(0) != n_)
      throw std::invalid_argument("shiftadd gemv: shapes of x, keys, exps and y do not match");
    const int64_t K = x.shape(0), C = c_;
    thread_local std::vector<float> tables;
    thread_local std::vector<uint32_t> nz;
    tables.resize(C * kTableFloats);
    nz.resize(avx2_class(isa) ? C * kMaskWords : 0);
    const Job j = job(tables.data(), nz.empty() ? nullptr : nz.data(), y.data());
    nb::gil_scoped_release release;
    build_lut(isa, x.data(), K, C, tables.data(), nz.data());
    const int64_t nq = nq_;
    get_pool(std::max(1, threads)).run_chunks((nq + 1) / 2, [&](int64_t u) { run_pair(j, isa, u, nq); });
  }

  // y [T, N] = x [T, K] W^T; row t equals gemv(x[t]) bit for bit.
  void gemm(Arr<const float> x, Arr<float> y, const std::string &backend, int threads) const {
    const Isa isa = parse_isa(backend);
    if (x.ndim() != 2 || y.ndim() != 2 || (int64_t)(x.shape(1) + 7) / 8 != c_ || (int64_t)y.shape(1) != n_ ||
        y.shape(0) != x.shape(0))
      throw std::invalid_argument("shiftadd gemm: shapes of x, keys, exps and y do not match");
    const Job w = job(nullptr, nullptr, nullptr);
    nb::gil_scoped_release release;
    lut_gemm(w, isa, x.data(), (int64_t)x.shape(0), (int64_t)x.shape(1), y.data(), threads);
  }

 private:
  Job job(const float *tables, const uint32_t *nz, float *y) const {
    return Job{tables, nz, keys_.data(), exps_.data(), signs_.data(), escale_.data(), y, n_, c_, ng_, group_, q_, t_};
  }

  Arr<const uint8_t> keys_;
  Arr<const int8_t> exps_, signs_;
  Arr<const float> escale_;
  int64_t n_, group_, nq_ = 0, c_ = 0, q_ = 0, ng_ = 0, t_ = 0;
};

}  // namespace

void register_shiftadd(nb::module_ &m) {
  nb::class_<LutWeights>(m, "ShiftAddWeights", "Latency-mode BCQ weights in the LUT kernels' quad layout.")
      .def(nb::init<Arr<const uint8_t>, Arr<const int8_t>, Arr<const int8_t>, Arr<const float>, int64_t, int64_t>(),
           nb::arg("keys"), nb::arg("exps"), nb::arg("signs"), nb::arg("escale"), nb::arg("n"), nb::arg("group"))
      .def("gemv", &LutWeights::gemv, nb::arg("x"), nb::arg("y"), nb::arg("backend"), nb::arg("threads"),
           "y[N] = W x via 16-entry LUT halves, exponent shifts and adds.")
      .def("gemm", &LutWeights::gemm, nb::arg("x"), nb::arg("y"), nb::arg("backend"), nb::arg("threads"),
           "y[T, N] = x[T, K] W^T: per-token tables, token tiles sharing each quad pair's key reads; row t equals "
           "gemv(x[t]) bit for bit.");
}
