// Python binding of the 'shiftadd' family: ShiftAddWeights holds Latency-mode BCQ weights in the
// quad layout (shiftadd.h) and runs the one-token GEMV (shiftadd.cpp) and the T-token GEMM
// (shiftadd_gemm.cpp) on them; `forward` is a whole layer call (incoherence transforms and bias
// around the product) so that a decode step pays one Python-to-C++ crossing per linear.
#include "shiftadd_layer.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

using shiftadd::Arr;
using shiftadd::LutLayer;

void register_shiftadd(nb::module_ &m) {
  nb::class_<LutLayer>(m, "ShiftAddWeights", "Latency-mode BCQ weights in the LUT kernels' quad layout.")
      .def(nb::init<Arr<const uint8_t>, Arr<const int8_t>, Arr<const int8_t>, Arr<const float>, int64_t, int64_t>(),
           nb::arg("keys"), nb::arg("exps"), nb::arg("signs"), nb::arg("escale"), nb::arg("n"), nb::arg("group"))
      .def("gemv", &LutLayer::gemv, nb::arg("x"), nb::arg("y"), nb::arg("backend"), nb::arg("threads"),
           "y[N] = W x via 16-entry LUT halves, exponent shifts and adds.")
      .def("set_input_transform", &LutLayer::set_input_transform, nb::arg("negative"), nb::arg("block"),
           nb::arg("shift"), "Make forward apply x -> 2^shift H_b D x first (the layer's incoherence input transform).")
      .def("set_output", &LutLayer::set_output, nb::arg("negative").none(), nb::arg("block"), nb::arg("shift"),
           nb::arg("bias").none(), "Make forward finish with y -> 2^shift D H_b y (output inverse) and + bias.")
      .def("forward", &LutLayer::forward, nb::arg("x"), nb::arg("y"), nb::arg("backend"), nb::arg("threads"),
           "The whole layer on x[T, K] into y[T, N]: input transform, GEMV (T = 1) or GEMM, output inverse, bias.")
      .def("gemm", &LutLayer::gemm, nb::arg("x"), nb::arg("y"), nb::arg("backend"), nb::arg("threads"),
           "y[T, N] = x[T, K] W^T: per-token tables, token tiles sharing each quad pair's key reads; row t equals "
           "gemv(x[t]) bit for bit.");
}
