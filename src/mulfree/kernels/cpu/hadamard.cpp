// Kernel family 'hadamard': the online side of randomized Hadamard incoherence processing (reference:
// ops/hadamard.py, RandomHadamard.apply_input / invert_output): sign flips, the unnormalized block
// Walsh-Hadamard transform and one power-of-two scale. Only adds and subtracts, in the
// reference's butterfly order (level h = 1, 2, 4, ...: x[j], x[j + h] <- x[j] + x[j + h], x[j] - x[j + h]),
// so results equal it bit for bit.
#include "hadamard.h"

#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "mulfree_cpu.h"

namespace {

using F32Rows = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Mask = nb::ndarray<const bool, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

void butterflies(float *v, int64_t block) {
  for (int64_t h = 1; h < block; h *= 2)
    for (int64_t g = 0; g < block; g += 2 * h)
      for (int64_t j = g; j < g + h; ++j) {
        const float a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
}

void hadamard_rows(F32Rows x, Mask negative, int64_t block, int shift, bool signs_first) {
  const int64_t rows = (int64_t)x.shape(0), n = (int64_t)x.shape(1);
  check_hadamard(n, block, (int64_t)negative.shape(0));
  nb::gil_scoped_release release;
  hadamard_inplace(x.data(), rows, n, negative.data(), block, shift, signs_first);
}

}  // namespace

void check_hadamard(int64_t n, int64_t block, int64_t mask_len) {
  if (block < 1 || (block & (block - 1)) || n % block)
    throw std::invalid_argument("block must be a power of two dividing the row width");
  if (mask_len != n) throw std::invalid_argument("sign mask length must equal the row width");
}

// The power of two is one exact product (what torch.ldexp computes).
void hadamard_inplace(float *x, int64_t rows, int64_t n, const bool *neg, int64_t block, int shift,
                      bool signs_first) {
  const float scale = std::ldexp(1.0f, shift);
  for (int64_t r = 0; r < rows; ++r) {
    float *v = x + r * n;
    if (signs_first)
      for (int64_t k = 0; k < n; ++k) v[k] = neg[k] ? -v[k] : v[k];
    for (int64_t b = 0; b < n; b += block) butterflies(v + b, block);
    for (int64_t k = 0; k < n; ++k) v[k] = (!signs_first && neg[k] ? -v[k] : v[k]) * scale;
  }
}

void register_hadamard(nb::module_ &m) {
  m.def("hadamard_", &hadamard_rows, nb::arg("x"), nb::arg("negative"), nb::arg("block"), nb::arg("shift"),
        nb::arg("signs_first"),
        "In place on float32 x [rows, n]: sign flips where `negative`, the block Walsh-Hadamard butterflies "
        "(adds and subtracts, ops/hadamard.py::fwht's order) and one power-of-two scale 2^shift; signs before "
        "the butterflies when signs_first (an input transform T x), after them otherwise (an output inverse).");
}
