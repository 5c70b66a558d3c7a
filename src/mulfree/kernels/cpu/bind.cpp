// Python bindings of the packed ternary family: PackedLinear, Layer, Engine and the single-kernel entry points
// (each with its pure-torch reference in ops/, called from kernels/ternary.py).
#include "elementwise.h"
#include "engine.h"
#include "gemm.h"

#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <stdexcept>

using namespace ternary;

namespace {

// The packed weight [row groups, group bytes] of n rows against activations of padded length Kpad (zero past k,
// 0: none), in format fmt.
void check_product(const Arr<const uint8_t, nb::ndim<2>> &packed, int64_t n, int64_t Kpad, Format fmt, int64_t k) {
  if (n < 1 || Kpad < 1 || padded_k(fmt, Kpad) != Kpad || (int64_t)packed.shape(1) != group_bytes(fmt, Kpad) ||
      (int64_t)packed.shape(0) != t2r4::row_groups(n))
    throw std::invalid_argument("packed / activation shapes do not match");
  if (k < 0 || k > Kpad || (k && padded_k(fmt, k) != Kpad))
    throw std::invalid_argument("k does not match the activations' padded length");
}

}  // namespace

void register_ternary(nb::module_ &m) {
  nb::class_<PackedLinear>(m, "PackedLinear",
                           "A packed ternary weight [N, K] (format t2: T2R4, or t1: T1R4) with its scale and RMSNorm weight.")
      .def(
          "__init__",
          [](PackedLinear *self, Arr<const uint8_t, nb::ndim<2>> packed, int64_t n, int64_t k, double scale, Vec norm,
             const std::string &format) { new (self) PackedLinear(packed, n, k, scale, norm, parse_format(format)); },
          nb::arg("packed"), nb::arg("n"), nb::arg("k"), nb::arg("scale"), nb::arg("norm"), nb::kw_only(),
          nb::arg("format") = "t2")
      .def_prop_ro("format", [](const PackedLinear &p) { return p.fmt == Format::T1R4 ? "t1" : "t2"; })
      .def_ro("n", &PackedLinear::N)
      .def_ro("k", &PackedLinear::K)
      .def_ro("scale", &PackedLinear::scale);

  nb::class_<Layer>(m, "Layer", "One MMfree block's weights by name (the module names of MMFreeBlock).")
      .def(
          "__init__",
          [](Layer *self, Vec attn_norm, const PackedLinear &i_proj, const PackedLinear &f_proj,
             const PackedLinear &g_proj, const PackedLinear &o_proj, Vec g_norm, std::optional<Vec> lower_bound,
             Vec mlp_norm, const PackedLinear &gate_proj, const PackedLinear &down_proj) {
            new (self) Layer{attn_norm, i_proj, f_proj, g_proj, o_proj, g_norm, lower_bound, mlp_norm, gate_proj,
                             down_proj};
          },
          nb::kw_only(), nb::arg("attn_norm"), nb::arg("i_proj"), nb::arg("f_proj"), nb::arg("g_proj"),
          nb::arg("o_proj"), nb::arg("g_norm"), nb::arg("lower_bound").none() = nb::none(), nb::arg("mlp_norm"),
          nb::arg("gate_proj"), nb::arg("down_proj"))
      .def_ro("attn_norm", &Layer::attn_norm)
      .def_ro("i_proj", &Layer::i_proj)
      .def_ro("f_proj", &Layer::f_proj)
      .def_ro("g_proj", &Layer::g_proj)
      .def_ro("o_proj", &Layer::o_proj)
      .def_ro("g_norm", &Layer::g_norm)
      .def_ro("lower_bound", &Layer::lower_bound)
      .def_ro("mlp_norm", &Layer::mlp_norm)
      .def_ro("gate_proj", &Layer::gate_proj)
      .def_ro("down_proj", &Layer::down_proj);

  nb::class_<Engine>(m, "Engine", "Whole MMfree forward on packed weights (prefill T tokens, decode 1, decode B sequences, or a ragged step).")
      .def(
          "__init__",
          [](Engine *self, int64_t vocab, int64_t d, int64_t inter, double eps, const std::string &backend, int threads,
             std::optional<double> bitlinear_eps) {
            new (self) Engine(vocab, d, inter, eps, bitlinear_eps.value_or(eps), backend, threads);
          },
          nb::arg("vocab_size"), nb::arg("hidden_size"), nb::arg("intermediate_size"), nb::arg("eps"),
          nb::arg("backend"), nb::arg("threads"), nb::kw_only(), nb::arg("bitlinear_eps").none() = nb::none(),
          "eps: rms_norm_eps (attn_norm, g_norm, mlp_norm, the final norm); bitlinear_eps: every BitLinear's input "
          "norm (None: eps).")
      .def("set_embedding_f32", &Engine::set_embedding_f32)
      .def("set_embedding_bf16", &Engine::set_embedding_bf16)
      .def("set_head", &Engine::set_head, nb::arg("norm"), nb::arg("head"))
      .def("add_layer", &Engine::add_layer, nb::arg("layer"))
      .def("forward", &Engine::forward, nb::arg("ids"), nb::arg("state"), nb::arg("logits"), nb::arg("all_logits"))
      .def("forward_batch", &Engine::forward_batch, nb::arg("ids"), nb::arg("states"), nb::arg("logits"),
           "One decode step of B sequences: ids [B], states [B, L, d] (contiguous, updated in place), logits [B, V].")
      .def("forward_ragged", &Engine::forward_ragged, nb::arg("ids"), nb::arg("lengths"), nb::arg("states"),
           nb::arg("logits"),
           "One step of S sequences feeding lengths[s] tokens each (ids concatenated): states, a list of S [L, d] "
           "(updated in place); logits [S, V] of each sequence's last token.")
      .def_prop_ro("num_layers", &Engine::num_layers);

  m.def(
      "ternary_matmul",
      [](Arr<const uint8_t, nb::ndim<2>> packed, int64_t n, Arr<const int8_t, nb::ndim<2>> q,
         Arr<const int32_t, nb::ndim<1>> sumq, Arr<int32_t, nb::ndim<2>> out, const std::string &backend, int threads,
         const std::string &format, int64_t k) {
        const Isa isa = parse_isa(backend);
        const Format fmt = parse_format(format);
        const int64_t Kpad = (int64_t)q.shape(1), T = (int64_t)q.shape(0);
        check_product(packed, n, Kpad, fmt, k);
        if ((int64_t)sumq.shape(0) != T || (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != n)
          throw std::invalid_argument("sumq / out shapes do not match");
        nb::gil_scoped_release release;
        LineVec<int32_t> wsum;
        if (fmt == Format::T1R4) wsum = t1_row_sums(packed.data(), n, Kpad);
        LinearJob j{packed.data(), n, Kpad, 1.0f, q.data(), sumq.data(), nullptr, T, nullptr, out.data(), n};
        j.fmt = fmt;
        j.wsum = wsum.data();
        j.K = k;
        run_linears(isa, threads, &j, 1);
      },
      nb::arg("packed"), nb::arg("n"), nb::arg("q"), nb::arg("sumq"), nb::arg("out"), nb::arg("backend"),
      nb::arg("threads"), nb::kw_only(), nb::arg("format") = "t2", nb::arg("k") = 0,
      "Exact out[t, n] = sum_k trit[n, k] * q[t, k] on packed weights (format t2: T2R4, q [T, Kpad] with Kpad a "
      "multiple of 256; t1: T1R4, Kpad a multiple of 160), q zero past k (0: Kpad).");

  m.def(
      "ternary_matmul_scaled",
      [](Arr<const uint8_t, nb::ndim<2>> packed, int64_t n, Arr<const int8_t, nb::ndim<2>> q,
         Arr<const int32_t, nb::ndim<1>> sumq, Arr<const float, nb::ndim<1>> a_scale, double w_scale,
         Arr<float, nb::ndim<2>> out, const std::string &backend, int threads, int64_t k) {
        const Isa isa = parse_isa(backend);
        const int64_t Kpad = (int64_t)q.shape(1), T = (int64_t)q.shape(0);
        check_product(packed, n, Kpad, Format::T2R4, k);
        if ((int64_t)sumq.shape(0) != T || (int64_t)a_scale.shape(0) != T || (int64_t)out.shape(0) != T ||
            (int64_t)out.shape(1) != n)
          throw std::invalid_argument("sumq / a_scale / out shapes do not match");
        nb::gil_scoped_release release;
        LinearJob j{packed.data(), n, Kpad, (float)w_scale, q.data(), sumq.data(), a_scale.data(), T, out.data(),
                    nullptr, n};
        j.K = k;
        run_linears(isa, threads, &j, 1);
      },
      nb::arg("packed"), nb::arg("n"), nb::arg("q"), nb::arg("sumq"), nb::arg("a_scale"), nb::arg("w_scale"),
      nb::arg("out"), nb::arg("backend"), nb::arg("threads"), nb::kw_only(), nb::arg("k") = 0,
      "out[t, n] = (sum_k trit[n, k] * q[t, k]) * (a_scale[t] * w_scale) on T2R4 weights, the scales' product in "
      "fp32 and then one product (the BitLinear's order); q [T, Kpad] zero past k.");

  m.def(
      "bitlinear",
      [](const PackedLinear &p, Arr<const float, nb::ndim<2>> x, Arr<float, nb::ndim<2>> out, double eps,
         const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0);
        if ((int64_t)x.shape(1) != p.K || (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != p.N)
          throw std::invalid_argument("x / out shapes do not match the linear");
        nb::gil_scoped_release release;
        QBuf qb;
        qb.fill(isa, x.data(), T, p.K, p, eps, threads);
        const LinearJob j = qb.job(p, T, out.data(), p.N);
        run_linears(isa, threads, &j, 1);
      },
      nb::arg("linear"), nb::arg("x"), nb::arg("out"), nb::arg("eps"), nb::arg("backend"), nb::arg("threads"),
      "BitLinear on packed weights: RMSNorm -> int8 per-token quant -> ternary matmul -> scales.");

  m.def(
      "rmsnorm_quant",
      [](Arr<const float, nb::ndim<2>> x, Vec w, double eps, Arr<int8_t, nb::ndim<2>> q, Arr<float, nb::ndim<1>> a_scale,
         Arr<int32_t, nb::ndim<1>> sumq, const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0), K = (int64_t)x.shape(1), Kpad = (int64_t)q.shape(1);
        if ((int64_t)w.shape(0) != K || (int64_t)q.shape(0) != T || Kpad < K || (int64_t)a_scale.shape(0) != T ||
            (int64_t)sumq.shape(0) != T)
          throw std::invalid_argument("rmsnorm_quant shapes do not match");
        nb::gil_scoped_release release;
        LineVec<float> tmp((size_t)K);
        for (int64_t t = 0; t < T; ++t)
          rmsnorm_quant_row(isa, x.data() + t * K, w.data(), K, Kpad, eps, tmp.data(), q.data() + t * Kpad,
                            a_scale.data() + t, sumq.data() + t);
      },
      nb::arg("x"), nb::arg("w"), nb::arg("eps"), nb::arg("q"), nb::arg("a_scale"), nb::arg("sumq"), nb::arg("backend"),
      "Fused RMSNorm + per-token absmax int8 quantization (round half to even), zero-padded to q's width.");

  m.def(
      "mlgru_step",
      [](Arr<const float, nb::ndim<2>> fi, Arr<const float, nb::ndim<2>> ff, Arr<const float, nb::ndim<2>> fg, Vec lb,
         bool has_lb, Vec gnorm, double eps, Arr<float, nb::ndim<1>> state, Arr<float, nb::ndim<2>> out,
         const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)fi.shape(0), d = (int64_t)fi.shape(1);
        for (auto *a : {&fi, &ff, &fg})
          if ((int64_t)a->shape(0) != T || (int64_t)a->shape(1) != d) throw std::invalid_argument("gate shapes differ");
        if ((int64_t)lb.shape(0) != d || (int64_t)gnorm.shape(0) != d || (int64_t)state.shape(0) != d ||
            (int64_t)out.shape(0) != T || (int64_t)out.shape(1) != d)
          throw std::invalid_argument("mlgru_step shapes do not match");
        std::vector<float> silu_s((size_t)d);  // the engine's two phases (phase 1 overwrites its gate input)
        for (int64_t t = 0; t < T; ++t) {
          std::memcpy(silu_s.data(), fi.data() + t * d, (size_t)d * 4);
          mlgru_state(isa, silu_s.data(), ff.data() + t * d, has_lb ? lb.data() : nullptr, 0, d, state.data(), 1, d);
          mlgru_out(isa, fg.data() + t * d, gnorm.data(), d, eps, silu_s.data(), out.data() + t * d);
        }
      },
      nb::arg("fi"), nb::arg("ff"), nb::arg("fg"), nb::arg("lb"), nb::arg("has_lb"), nb::arg("g_norm"), nb::arg("eps"),
      nb::arg("state"), nb::arg("out"), nb::arg("backend"), "MLGRU recurrence over T tokens + gated, normed output (fp32).");

  m.def(
      "glu_step",
      [](Arr<const float, nb::ndim<2>> gate_up, Arr<float, nb::ndim<2>> out, const std::string &backend) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)gate_up.shape(0), I = (int64_t)out.shape(1);
        if ((int64_t)gate_up.shape(1) != 2 * I || (int64_t)out.shape(0) != T)
          throw std::invalid_argument("glu_step shapes do not match");
        for (int64_t t = 0; t < T; ++t) glu_row(isa, gate_up.data() + t * 2 * I, I, out.data() + t * I);
      },
      nb::arg("gate_up"), nb::arg("out"), nb::arg("backend"), "z = silu(gate) * up with gate, up = the two halves of gate_up.");

  m.def(
      "set_amx",
      [](bool on) {
        if (on && !cpu_features().amx_int8)
          throw std::invalid_argument("AMX-INT8 is not available on this CPU / OS");
        return amx_switch().exchange(on);
      },
      nb::arg("on"),
      "Use AMX tiles for ternary GEMMs of >= 8 tokens on the avx512 backend (default: on where the CPU and OS allow, "
      "unless MULFREE_AMX=0); returns the previous setting.");
  m.def("amx_enabled", [] { return amx_switch().load(); },
        "Whether set_amx (or MULFREE_AMX) has AMX on: the ternary panels, and the training products on AMX-BF16.");
}
