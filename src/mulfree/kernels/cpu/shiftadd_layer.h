// Kernel family 'shiftadd': one Latency-mode linear layer in the LUT kernels' quad layout (shiftadd.h),
// with its incoherence transforms (hadamard.h) and bias, as held by the Python binding (shiftadd_bind.cpp)
// and run by the Llama decode step (shiftadd_llama.cpp).
#pragma once
#include "hadamard.h"
#include "pool.h"
#include "shiftadd.h"

#include <nanobind/ndarray.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace shiftadd {

template <class T>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu>;

// Weights in kernel layout, checked once and held (no copy) so a call converts only x and y.
class LutLayer {
 public:
  LutLayer(Arr<const uint8_t> keys, Arr<const int8_t> exps, Arr<const int8_t> signs, Arr<const float> escale,
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
    delta_.resize(exps.size());
    for (size_t s = 0; s < delta_.size(); ++s)
      delta_[s] = (int32_t)(((uint32_t)(int32_t)exps.data()[s] << 23) + (signs.data()[s] < 0 ? 0x80000000u : 0u));
  }

  // The layer's input transform x -> T x, applied by `forward` (hadamard.h; held, no copy).
  void set_input_transform(Arr<const bool> negative, int64_t block, int shift) {
    const int64_t k = (int64_t)negative.shape(0);
    if ((k + 7) / 8 != c_) throw std::invalid_argument("input transform width does not match the weight's");
    check_hadamard(k, block, k);
    in_ = Transform{negative, block, shift, true};
  }

  // The layer's output inverse y'' -> U^-1 y'' and bias, applied by `forward`.
  void set_output(std::optional<Arr<const bool>> negative, int64_t block, int shift,
                  std::optional<Arr<const float>> bias) {
    if (negative) {
      check_hadamard(n_, block, (int64_t)negative->shape(0));
      out_ = Transform{*negative, block, shift, true};
    }
    if (bias) {
      if (bias->ndim() != 1 || (int64_t)bias->shape(0) != n_) throw std::invalid_argument("bias must have n entries");
      bias_ = *bias;
      has_bias_ = true;
    }
  }

  // The whole layer on x [T, K]: y [T, N] = U^-1 (W (T x)) + b, each part only if set; one GIL release.
  // Equals the Python composition (hadamard_, gemv / gemm, hadamard_, + bias) bit for bit.
  void forward(Arr<const float> x, Arr<float> y, const std::string &backend, int threads) const {
    const Isa isa = parse_isa(backend);
    if (x.ndim() != 2 || y.ndim() != 2 || !accepts((int64_t)x.shape(1)) || (int64_t)y.shape(1) != n_ ||
        y.shape(0) != x.shape(0))
      throw std::invalid_argument("shiftadd forward: shapes of x, keys, exps, input transform and y do not match");
    nb::gil_scoped_release release;
    run(isa, x.data(), (int64_t)x.shape(0), (int64_t)x.shape(1), y.data(), threads);
  }

  // forward on raw rows x [T, K] (K accepted; no GIL needed).
  void run(Isa isa, const float *x, int64_t T, int64_t K, float *y, int threads) const {
    thread_local std::vector<float> rotated;
    if (in_.on) {
      rotated.resize(T * K);
      hadamard_rows(x, rotated.data(), T, K, in_.negative.data(), in_.block, in_.shift, true, isa, threads);
      x = rotated.data();
    }
    product(isa, x, T, K, y, threads);
    if (out_.on) hadamard_rows(y, y, T, n_, out_.negative.data(), out_.block, out_.shift, false, isa, threads);
    if (has_bias_)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < n_; ++n) y[t * n_ + n] += bias_.data()[n];
  }

  int64_t n() const { return n_; }
  // Whether rows of K inputs fit these weights (and the input transform, when set).
  bool accepts(int64_t K) const { return (K + 7) / 8 == c_ && (!in_.on || (int64_t)in_.negative.shape(0) == K); }

  // y [N] = W x, x [K] with ceil(K / 8) == C.
  void gemv(Arr<const float> x, Arr<float> y, const std::string &backend, int threads) const {
    const Isa isa = parse_isa(backend);
    if (x.ndim() != 1 || y.ndim() != 1 || (int64_t)(x.shape(0) + 7) / 8 != c_ || (int64_t)y.shape(0) != n_)
      throw std::invalid_argument("shiftadd gemv: shapes of x, keys, exps and y do not match");
    nb::gil_scoped_release release;
    product(isa, x.data(), 1, (int64_t)x.shape(0), y.data(), threads);
  }

  // y [T, N] = x [T, K] W^T; row t equals gemv(x[t]) bit for bit.
  void gemm(Arr<const float> x, Arr<float> y, const std::string &backend, int threads) const {
    const Isa isa = parse_isa(backend);
    if (x.ndim() != 2 || y.ndim() != 2 || (int64_t)(x.shape(1) + 7) / 8 != c_ || (int64_t)y.shape(1) != n_ ||
        y.shape(0) != x.shape(0))
      throw std::invalid_argument("shiftadd gemm: shapes of x, keys, exps and y do not match");
    nb::gil_scoped_release release;
    product(isa, x.data(), (int64_t)x.shape(0), (int64_t)x.shape(1), y.data(), threads);
  }

 private:
  // y [T, N] = x [T, K] W^T without the GIL: the one-token kernels for T = 1, else the tiled GEMM.
  void product(Isa isa, const float *x, int64_t T, int64_t K, float *y, int threads) const {
    if (T != 1) return lut_gemm(job(nullptr, nullptr, nullptr), isa, x, T, K, y, threads);
    thread_local std::vector<float> tables;
    thread_local std::vector<uint32_t> nz;
    tables.resize(c_ * kTableFloats);
    nz.resize(avx2_class(isa) ? c_ * kMaskWords : 0);
    const Job j = job(tables.data(), nz.empty() ? nullptr : nz.data(), y);
    build_lut(isa, x, K, c_, tables.data(), nz.data());
    get_pool(std::max(1, threads)).run_chunks(work_items(j), [&](int64_t u) { run_item(j, isa, u); });
  }

  Job job(const float *tables, const uint32_t *nz, float *y) const {
    return Job{tables, nz, keys_.data(), exps_.data(), signs_.data(), escale_.data(), delta_.data(), y,
               n_, c_, ng_, group_, q_, t_};
  }

  Arr<const uint8_t> keys_;
  Arr<const int8_t> exps_, signs_;
  Arr<const float> escale_;
  std::vector<int32_t> delta_;
  struct Transform {
    Arr<const bool> negative;
    int64_t block = 1;
    int shift = 0;
    bool on = false;
  };
  Transform in_, out_;
  Arr<const float> bias_;
  bool has_bias_ = false;
  int64_t n_, group_, nq_ = 0, c_ = 0, q_ = 0, ng_ = 0, t_ = 0;
};

}  // namespace shiftadd
