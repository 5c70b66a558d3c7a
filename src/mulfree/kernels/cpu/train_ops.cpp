// The fused element-wise parts of MMfree training (nn/fused.py), forward and backward: RMSNorm (with the
// BitLinear's per-token int8 quantization), ternarization, the MLGRU's state scan and output gate, and the GLU. Backward passes
// recompute what the forward produced from the few tensors autograd keeps. References: ops/fused_train.py.
// Rows (or channel blocks of the scan) are spread over the shared pool; weight gradients are summed per fixed
// chunk of rows and the chunks reduced in order, so every result is the same for any thread count.
#include "elementwise.h"
#include "mulfree_cpu.h"
#include "pool.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <utility>

using namespace ternary;

namespace {

template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using F2 = Arr<const float, nb::ndim<2>>;
using F3 = Arr<const float, nb::ndim<3>>;
using Out2 = Arr<float, nb::ndim<2>>;
using Out3 = Arr<float, nb::ndim<3>>;
using F1 = Arr<const float, nb::ndim<1>>;
using Out1 = Arr<float, nb::ndim<1>>;

constexpr int64_t kRows = 16;   // rows per chunk (and per weight-gradient partial sum); a multiple of 4
static_assert(kRows % 4 == 0, "ternarize packs whole T2R4 row groups per chunk");
constexpr int64_t kChans = 64;  // channels per scan work item

MF_INLINE float dsiluf(float x) {
  const float s = sigmoidf(x);
  return s * (1.0f + x * (1.0f - s));
}

// dx = r (g - y mean(g y)) with y = x r, g = dy w (RMSNorm backward); dw_acc += dy y.
MF_INLINE void rmsnorm_bwd_row_impl(const float *x, const float *w, const float *dy, int64_t K, double eps, float *dx,
                                    float *dw_acc) {
  const float r = rms_factor(x, K, eps);
  const float dot = lane_sum(K, [&](int64_t k) {
    const float y = x[k] * r;
    dw_acc[k] += dy[k] * y;
    return dy[k] * w[k] * y;
  });
  const float m = dot / (float)K;
  for (int64_t k = 0; k < K; ++k) dx[k] = r * (dy[k] * w[k] - x[k] * r * m);
}
MF_ISA_VARIANTS(rmsnorm_bwd_row,
                (const float *x, const float *w, const float *dy, int64_t K, double eps, float *dx, float *dw_acc),
                (x, w, dy, K, eps, dx, dw_acc))

// The MLGRU's sequence scan over channels [k0, k1) (at most kChans) of one sequence (rows ld apart): f, i from
// the gates, h_t = f h_{t-1} + i written to h. keep[t] == 0 zeroes i (and with skip sets f = 1). Time runs in the
// outer loop and the channels in the inner one, so the inner loop is contiguous and vectorizes; each channel's
// arithmetic is the same as one channel at a time.
MF_INLINE void mlgru_scan_impl(const float *fi, const float *ff, const float *lb, const uint8_t *keep, bool skip,
                               const float *h0, int64_t k0, int64_t k1, int64_t T, int64_t ld, float *h) {
  float st[kChans], zero[kChans];
  const int64_t n = k1 - k0;
  for (int64_t e = 0; e < n; ++e) {
    st[e] = h0 ? h0[k0 + e] : 0.f;
    zero[e] = 0.f;
  }
  const float *l = lb ? lb + k0 : zero;  // lb = 0 leaves f as it is, bit for bit
  for (int64_t t = 0; t < T; ++t) {
    const float *a = fi + t * ld + k0, *g = ff + t * ld + k0;
    float *out = h + t * ld + k0;
    if (!keep || keep[t]) {
      for (int64_t e = 0; e < n; ++e) {
        const float f = l[e] + (1.0f - l[e]) * sigmoidf(g[e]);
        st[e] = f * st[e] + siluf(a[e]) * (1.0f - f);
        out[e] = st[e];
      }
    } else {  // a masked step: i = 0, and with skip f = 1
      for (int64_t e = 0; e < n; ++e) {
        const float f = skip ? 1.f : l[e] + (1.0f - l[e]) * sigmoidf(g[e]);
        st[e] = f * st[e] + 0.f;
        out[e] = st[e];
      }
    }
  }
}
MF_ISA_VARIANTS(mlgru_scan,
                (const float *fi, const float *ff, const float *lb, const uint8_t *keep, bool skip, const float *h0,
                 int64_t k0, int64_t k1, int64_t T, int64_t ld, float *h),
                (fi, ff, lb, keep, skip, h0, k0, k1, T, ld, h))

// o = rmsnorm(fg) gw silu(h) for one token.
MF_INLINE void mlgru_gate_row_impl(const float *fg, const float *gw, const float *h, int64_t D, double eps, float *o) {
  const float r = rms_factor(fg, D, eps);
  for (int64_t k = 0; k < D; ++k) o[k] = fg[k] * r * gw[k] * siluf(h[k]);
}
MF_ISA_VARIANTS(mlgru_gate_row, (const float *fg, const float *gw, const float *h, int64_t D, double eps, float *o),
                (fg, gw, h, D, eps, o))

// Backward of the output gate for one token: dfg, dgw_acc += do n silu(h), and dh (into dh) = do n gw silu'(h).
// The rows never overlap (the binding checks): restrict spares gcc the alias checks that kept the loop scalar.
MF_INLINE void mlgru_gate_bwd_row_impl(const float *__restrict fg, const float *__restrict gw,
                                       const float *__restrict h, const float *__restrict dout, int64_t D, double eps,
                                       float *__restrict dfg, float *__restrict dgw_acc, float *__restrict dh) {
  const float r = rms_factor(fg, D, eps);
  for (int64_t k = 0; k < D; ++k) {  // the element-wise part first (a float sum in it keeps the loop scalar)
    const float n = fg[k] * r, s = siluf(h[k]);
    dgw_acc[k] += dout[k] * n * s;
    dh[k] = dout[k] * n * gw[k] * dsiluf(h[k]);
    dfg[k] = dout[k] * gw[k] * s;  // dn, finished below once the mean of dn n is known
  }
  const float m = lane_sum(D, [&](int64_t k) { return dfg[k] * (fg[k] * r); }) / (float)D;
  for (int64_t k = 0; k < D; ++k) dfg[k] = r * (dfg[k] - fg[k] * r * m);
}
MF_ISA_VARIANTS(mlgru_gate_bwd_row,
                (const float *fg, const float *gw, const float *h, const float *dout, int64_t D, double eps, float *dfg,
                 float *dgw_acc, float *dh),
                (fg, gw, h, dout, D, eps, dfg, dgw_acc, dh))

// The adjoint scan over channels [k0, k1) (at most kChans) of one sequence, time reversed (time outer, channels
// inner, as the forward). dfi holds the direct dL/dh on entry and dL/dfi on return; dff, dlb_acc (+= per channel)
// and dh0 (when h0) are written.
MF_INLINE void mlgru_scan_bwd_impl(const float *fi, const float *ff, const float *lb, const uint8_t *keep, bool skip,
                                   const float *h0, const float *h, int64_t k0, int64_t k1, int64_t T, int64_t ld,
                                   float *dfi, float *dff, float *dlb_acc, float *dh0) {
  // The lb gradient sums in a local row (gcc does not vectorize a += through the caller's pointer), added once.
  float acc[kChans], f_next[kChans], zero[kChans], dl[kChans];
  const int64_t n = k1 - k0;
  for (int64_t e = 0; e < n; ++e) acc[e] = f_next[e] = zero[e] = dl[e] = 0.f;
  const float *l = lb ? lb + k0 : zero;  // lb = 0 leaves f and dff as they are, bit for bit
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * ld + k0;
    const float *a = fi + o, *g = ff + o;
    const float *prev = t > 0 ? h + o - ld : (h0 ? h0 + k0 : zero);
    float *di = dfi + o, *dg = dff + o;
    if (!keep || keep[t]) {
      for (int64_t e = 0; e < n; ++e) {
        acc[e] = di[e] + f_next[e] * acc[e];
        const float sg = sigmoidf(g[e]), f = l[e] + (1.0f - l[e]) * sg;
        const float df = acc[e] * prev[e] - acc[e] * siluf(a[e]);
        di[e] = acc[e] * (1.0f - f) * dsiluf(a[e]);
        const float dsg = df * sg * (1.0f - sg);
        dg[e] = dsg * (1.0f - l[e]);
        dl[e] += df * (1.0f - sg);
        f_next[e] = f;
      }
    } else {  // a masked step: i = 0, and with skip f = 1 (no gradient to ff or lb)
      for (int64_t e = 0; e < n; ++e) {
        acc[e] = di[e] + f_next[e] * acc[e];
        const float sg = sigmoidf(g[e]), df = acc[e] * prev[e];
        di[e] = 0.f;
        dg[e] = skip ? 0.f : df * sg * (1.0f - sg) * (1.0f - l[e]);
        if (!skip) dl[e] += df * (1.0f - sg);
        f_next[e] = skip ? 1.f : l[e] + (1.0f - l[e]) * sg;
      }
    }
  }
  for (int64_t e = 0; e < n; ++e) {
    if (lb) dlb_acc[k0 + e] += dl[e];
    if (h0) dh0[k0 + e] = f_next[e] * acc[e];
  }
}
MF_ISA_VARIANTS(mlgru_scan_bwd,
                (const float *fi, const float *ff, const float *lb, const uint8_t *keep, bool skip, const float *h0,
                 const float *h, int64_t k0, int64_t k1, int64_t T, int64_t ld, float *dfi, float *dff, float *dlb_acc,
                 float *dh0),
                (fi, ff, lb, keep, skip, h0, h, k0, k1, T, ld, dfi, dff, dlb_acc, dh0))

// dgate = dz up silu'(gate), dup = dz silu(gate) for one row of gate_up [2I].
MF_INLINE void glu_bwd_row_impl(const float *gu, const float *dz, int64_t I, float *dgu) {
  for (int64_t k = 0; k < I; ++k) {
    const float g = gu[k], u = gu[I + k];
    dgu[k] = dz[k] * u * dsiluf(g);
    dgu[I + k] = dz[k] * siluf(g);
  }
}
MF_ISA_VARIANTS(glu_bwd_row, (const float *gu, const float *dz, int64_t I, float *dgu), (gu, dz, I, dgu))

// *sum += sum |w| over n values, in 16 float64 lanes (the same order on every ISA).
MF_INLINE void abs_sum_impl(const float *w, int64_t n, double *sum) {
  constexpr int kLanes = 16;
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += std::fabs((double)w[i + l]);
  for (; i < n; ++i) s[0] += std::fabs((double)w[i]);
  for (int l = 0; l < kLanes; ++l) *sum += s[l];
}
MF_ISA_VARIANTS(abs_sum, (const float *w, int64_t n, double *sum), (w, n, sum))

// out = clamp(round_half_even(w * inv), -1, 1) over n values, as std::min(1, std::max(-1, v)) gives it (NaN -> -1),
// spelled out: std::min / std::max do not carry MF_VEC's optimize attribute, so gcc called them per element.
MF_INLINE float trit_of(float w, float inv) {
  const float v = __builtin_rintf(w * inv), lo = -1.0f < v ? v : -1.0f;
  return lo < 1.0f ? lo : 1.0f;
}
MF_INLINE void trits_impl(const float *w, int64_t n, float inv, float *out) {
  for (int64_t i = 0; i < n; ++i) out[i] = trit_of(w[i], inv);
}
MF_ISA_VARIANTS(trits, (const float *w, int64_t n, float inv, float *out), (w, n, inv, out))

// The T2R4 bytes of row group g (rows 4g..4g+3 of w [N, K]) into dst [Kpad], as ops/pack.py::pack_ternary lays
// them out: in each 256-wide k block, row r's byte j holds the codes trit + 1 of k = j, 64 + j, 128 + j, 192 + j
// in bits 0-1, 2-3, 4-5, 6-7; rows past N and k past K hold code 1 (trit 0).
MF_INLINE void pack_group_impl(const float *w, int64_t N, int64_t K, int64_t Kpad, float inv, int64_t g,
                               uint8_t *dst) {
  for (int64_t b = 0; b < Kpad; b += 256)
    for (int64_t r = 0; r < 4; ++r) {
      const int64_t row = 4 * g + r;
      const float *src = row < N ? w + row * K + b : w;  // rows past N read nothing
      uint8_t *out = dst + b + 64 * r;
      if (row < N && b + 256 <= K) {
        for (int64_t j = 0; j < 64; ++j)
          out[j] = (uint8_t)((int)(trit_of(src[j], inv) + 1.0f) | (int)(trit_of(src[64 + j], inv) + 1.0f) << 2 |
                             (int)(trit_of(src[128 + j], inv) + 1.0f) << 4 |
                             (int)(trit_of(src[192 + j], inv) + 1.0f) << 6);
        continue;
      }
      for (int64_t j = 0; j < 64; ++j) {
        int byte = 0;
        for (int64_t q = 0; q < 4; ++q) {
          const int64_t k = b + 64 * q + j;
          byte |= (row < N && k < K ? (int)(trit_of(src[64 * q + j], inv) + 1.0f) : 1) << (2 * q);
        }
        out[j] = (uint8_t)byte;
      }
    }
}
MF_ISA_VARIANTS(pack_group, (const float *w, int64_t N, int64_t K, int64_t Kpad, float inv, int64_t g, uint8_t *dst),
                (w, N, K, Kpad, inv, g, dst))

int64_t chunks_of(int64_t rows) { return (rows + kRows - 1) / kRows; }

// A region of a training op: torch's own threads run between our calls, so the pool's workers sleep soon after
// instead of spinning on the cores those threads want.
template <class F>
void run_train(int threads, int64_t nchunks, F &&fn) {
  get_pool(threads).run_chunks(nchunks, fn, false);
}

// fn(r) for every row r, kRows rows per pool chunk.
template <class F>
void for_rows(int threads, int64_t rows, F &&fn) {
  run_train(threads, chunks_of(rows), [&](int64_t c) {
    for (int64_t r = c * kRows, e = std::min(rows, r + kRows); r < e; ++r) fn(r, c);
  });
}

// out[k] = sum over chunks of part[c][k], in chunk order.
void reduce_parts(const std::vector<float> &part, int64_t parts, int64_t K, float *out) {
  for (int64_t k = 0; k < K; ++k) out[k] = 0.f;
  for (int64_t c = 0; c < parts; ++c)
    for (int64_t k = 0; k < K; ++k) out[k] += part[(size_t)(c * K + k)];
}

void need(bool ok, const char *what) {
  if (!ok) throw std::invalid_argument(what);
}

struct Seq {  // the [B, T, D] geometry of the MLGRU tensors
  int64_t B, T, D;
  template <class A>
  bool same(const A &a) const {
    return (int64_t)a.shape(0) == B && (int64_t)a.shape(1) == T && (int64_t)a.shape(2) == D;
  }
};

}  // namespace

void register_train_ops(nb::module_ &m) {
  m.def(
      "norm_quant",
      [](F2 x, F1 w, double eps, Out2 out, std::optional<Out1> a_scale, bool dequant, const std::string &backend,
         int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0), K = (int64_t)x.shape(1);
        need((int64_t)w.shape(0) == K && (int64_t)out.shape(0) == T && (int64_t)out.shape(1) == K &&
                 (!a_scale || (int64_t)a_scale->shape(0) == T),
             "norm_quant shapes do not match");
        nb::gil_scoped_release release;
        run_train(threads, chunks_of(T), [&](int64_t c) {
          LineVec<float> tmp((size_t)K);
          LineVec<int8_t> q((size_t)K);
          float s;
          int32_t sumq;
          for (int64_t t = c * kRows, e = std::min(T, t + kRows); t < e; ++t) {
            rmsnorm_quant_row(isa, x.data() + t * K, w.data(), K, K, eps, tmp.data(), q.data(), &s, &sumq);
            const float m = dequant ? s : 1.0f;
            float *o = out.data() + t * K;
            for (int64_t k = 0; k < K; ++k) o[k] = (float)q[(size_t)k] * m;
            if (a_scale) a_scale->data()[t] = s;
          }
        });
      },
      nb::arg("x"), nb::arg("w"), nb::arg("eps"), nb::arg("out"), nb::arg("a_scale").none(), nb::arg("dequant"),
      nb::arg("backend"), nb::arg("threads"),
      "RMSNorm then per-token absmax int8 of x [T, K], written as fp32: the codes q (dequant false) or q * a_scale "
      "(the quantized activations, recomputed for backward); a_scale [T] when given.");

  m.def(
      "ternarize",
      [](F2 w, std::optional<Out2> out, const std::string &backend, int threads,
         std::optional<Arr<uint8_t, nb::ndim<2>>> packed) {
        const Isa isa = parse_isa(backend);
        const int64_t N = (int64_t)w.shape(0), K = (int64_t)w.shape(1);
        need(N * K > 0 && (out || packed), "ternarize needs a weight and an output");
        need(!out || ((int64_t)out->shape(0) == N && (int64_t)out->shape(1) == K), "ternarize shapes do not match");
        const int64_t Kpad = (K + 255) / 256 * 256;
        need(!packed || ((int64_t)packed->shape(0) == (N + 3) / 4 && (int64_t)packed->shape(1) == Kpad),
             "packed must be [ceil(N / 4), K rounded up to 256] bytes");
        nb::gil_scoped_release release;
        const int64_t nc = chunks_of(N);
        std::vector<double> part((size_t)nc, 0.0);
        run_train(threads, nc, [&](int64_t c) {
          const int64_t r0 = c * kRows, r1 = std::min(N, r0 + kRows);
          abs_sum(isa, w.data() + r0 * K, (r1 - r0) * K, &part[(size_t)c]);
        });
        double sum = 0.0;
        for (double v : part) sum += v;
        const float scale = std::max((float)(sum / (double)(N * K)), 1e-5f), inv = 1.0f / scale;
        run_train(threads, nc, [&](int64_t c) {
          const int64_t r0 = c * kRows, r1 = std::min(N, r0 + kRows);
          if (out) trits(isa, w.data() + r0 * K, (r1 - r0) * K, inv, out->data() + r0 * K);
          for (int64_t g = r0 / 4; packed && g < (r1 + 3) / 4; ++g)  // kRows is a multiple of 4
            pack_group(isa, w.data(), N, K, Kpad, inv, g, packed->data() + g * Kpad);
        });
        return scale;
      },
      nb::arg("w"), nb::arg("out").none(), nb::arg("backend"), nb::arg("threads"), nb::kw_only(),
      nb::arg("packed").none() = nb::none(),
      "Absmean ternarization of w [N, K]: the trits as fp32 into out and / or packed to T2R4 bytes into packed "
      "(pack_ternary's layout, for the packed kernels); returns the scale max(mean|w|, 1e-5) (the mean a float64 "
      "sum in fixed chunks, rounded once).");

  m.def(
      "rmsnorm_fwd",
      [](F2 x, F1 w, double eps, Out2 out, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0), K = (int64_t)x.shape(1);
        need((int64_t)w.shape(0) == K && (int64_t)out.shape(0) == T && (int64_t)out.shape(1) == K,
             "rmsnorm_fwd shapes do not match");
        nb::gil_scoped_release release;
        for_rows(threads, T, [&](int64_t t, int64_t) {
          rmsnorm_row(isa, x.data() + t * K, w.data(), K, eps, out.data() + t * K);
        });
      },
      nb::arg("x"), nb::arg("w"), nb::arg("eps"), nb::arg("out"), nb::arg("backend"), nb::arg("threads"),
      "out = x * rms_factor(x) * w over rows of x [T, K].");

  m.def(
      "rmsnorm_bwd",
      [](F2 x, F1 w, F2 dy, double eps, Out2 dx, Out1 dw, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)x.shape(0), K = (int64_t)x.shape(1);
        need((int64_t)w.shape(0) == K && (int64_t)dy.shape(0) == T && (int64_t)dy.shape(1) == K &&
                 (int64_t)dx.shape(0) == T && (int64_t)dx.shape(1) == K && (int64_t)dw.shape(0) == K,
             "rmsnorm_bwd shapes do not match");
        nb::gil_scoped_release release;
        std::vector<float> part((size_t)(chunks_of(T) * K), 0.f);
        for_rows(threads, T, [&](int64_t t, int64_t c) {
          rmsnorm_bwd_row(isa, x.data() + t * K, w.data(), dy.data() + t * K, K, eps, dx.data() + t * K,
                          part.data() + c * K);
        });
        reduce_parts(part, chunks_of(T), K, dw.data());
      },
      nb::arg("x"), nb::arg("w"), nb::arg("dy"), nb::arg("eps"), nb::arg("dx"), nb::arg("dw"), nb::arg("backend"),
      nb::arg("threads"), "RMSNorm backward from x and dL/d(out): dx [T, K] and dw [K] (the factor recomputed).");

  m.def(
      "mlgru_scan",
      [](F3 fi, F3 ff, std::optional<F1> lb, std::optional<F2> h0, std::optional<Arr<const uint8_t, nb::ndim<2>>> keep,
         bool skip, Out3 h, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const Seq s{(int64_t)fi.shape(0), (int64_t)fi.shape(1), (int64_t)fi.shape(2)};
        need(s.same(ff) && s.same(h) && (!lb || (int64_t)lb->shape(0) == s.D) &&
                 (!h0 || ((int64_t)h0->shape(0) == s.B && (int64_t)h0->shape(1) == s.D)) &&
                 (!keep || ((int64_t)keep->shape(0) == s.B && (int64_t)keep->shape(1) == s.T)),
             "mlgru_scan shapes do not match");
        nb::gil_scoped_release release;
        const int64_t nk = (s.D + kChans - 1) / kChans, TD = s.T * s.D;
        run_train(threads, s.B * nk, [&](int64_t c) {
          const int64_t b = c / nk, k0 = c % nk * kChans;
          mlgru_scan(isa, fi.data() + b * TD, ff.data() + b * TD, lb ? lb->data() : nullptr,
                     keep ? keep->data() + b * s.T : nullptr, skip, h0 ? h0->data() + b * s.D : nullptr, k0,
                     std::min(s.D, k0 + kChans), s.T, s.D, h.data() + b * TD);
        });
      },
      nb::arg("fi"), nb::arg("ff"), nb::arg("lb").none(), nb::arg("h0").none(), nb::arg("keep").none(), nb::arg("skip"),
      nb::arg("h"), nb::arg("backend"), nb::arg("threads"),
      "The MLGRU's state scan over [B, T, D] gates: f = sigmoid(ff) (lifted by lb), i = silu(fi) (1 - f), "
      "h_t = f h_{t-1} + i into h.");

  m.def(
      "mlgru_scan_bwd",
      [](F3 fi, F3 ff, std::optional<F1> lb, std::optional<F2> h0, std::optional<Arr<const uint8_t, nb::ndim<2>>> keep,
         bool skip, F3 h, Out3 dh, Out3 dff, Out1 dlb, std::optional<Out2> dh0, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const Seq s{(int64_t)fi.shape(0), (int64_t)fi.shape(1), (int64_t)fi.shape(2)};
        need(s.same(ff) && s.same(h) && s.same(dh) && s.same(dff) && (int64_t)dlb.shape(0) == s.D &&
                 (!lb || (int64_t)lb->shape(0) == s.D) && (bool)h0 == (bool)dh0 &&
                 (!h0 || ((int64_t)h0->shape(0) == s.B && (int64_t)h0->shape(1) == s.D && (int64_t)dh0->shape(0) == s.B &&
                          (int64_t)dh0->shape(1) == s.D)) &&
                 (!keep || ((int64_t)keep->shape(0) == s.B && (int64_t)keep->shape(1) == s.T)),
             "mlgru_scan_bwd shapes do not match");
        nb::gil_scoped_release release;
        const int64_t nk = (s.D + kChans - 1) / kChans, TD = s.T * s.D;
        std::vector<float> lpart((size_t)(s.B * s.D), 0.f);
        run_train(threads, s.B * nk, [&](int64_t c) {
          const int64_t b = c / nk, k0 = c % nk * kChans;
          mlgru_scan_bwd(isa, fi.data() + b * TD, ff.data() + b * TD, lb ? lb->data() : nullptr,
                         keep ? keep->data() + b * s.T : nullptr, skip, h0 ? h0->data() + b * s.D : nullptr,
                         h.data() + b * TD, k0, std::min(s.D, k0 + kChans), s.T, s.D, dh.data() + b * TD,
                         dff.data() + b * TD, lpart.data() + b * s.D, h0 ? dh0->data() + b * s.D : nullptr);
        });
        reduce_parts(lpart, s.B, s.D, dlb.data());
      },
      nb::arg("fi"), nb::arg("ff"), nb::arg("lb").none(), nb::arg("h0").none(), nb::arg("keep").none(), nb::arg("skip"),
      nb::arg("h"), nb::arg("dh"), nb::arg("dff"), nb::arg("dlb"), nb::arg("dh0").none(), nb::arg("backend"),
      nb::arg("threads"),
      "The scan's backward: dh holds dL/dh on entry and dL/dfi on return; dff, dlb [D] and dh0 (when h0) written.");

  m.def(
      "mlgru_gate",
      [](F2 fg, F1 gw, F2 h, double eps, Out2 out, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)fg.shape(0), D = (int64_t)fg.shape(1);
        need((int64_t)gw.shape(0) == D && (int64_t)h.shape(0) == T && (int64_t)h.shape(1) == D &&
                 (int64_t)out.shape(0) == T && (int64_t)out.shape(1) == D,
             "mlgru_gate shapes do not match");
        nb::gil_scoped_release release;
        for_rows(threads, T, [&](int64_t r, int64_t) {
          mlgru_gate_row(isa, fg.data() + r * D, gw.data(), h.data() + r * D, D, eps, out.data() + r * D);
        });
      },
      nb::arg("fg"), nb::arg("gw"), nb::arg("h"), nb::arg("eps"), nb::arg("out"), nb::arg("backend"), nb::arg("threads"),
      "The MLGRU's output gate over rows: rmsnorm(fg) * gw * silu(h).");

  m.def(
      "mlgru_gate_bwd",
      [](F2 fg, F1 gw, F2 h, F2 dout, double eps, Out2 dfg, Out1 dgw, Out2 dh, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)fg.shape(0), D = (int64_t)fg.shape(1);
        for (const auto *a : {&h, &dout})
          need((int64_t)a->shape(0) == T && (int64_t)a->shape(1) == D, "mlgru_gate_bwd shapes do not match");
        need((int64_t)gw.shape(0) == D && (int64_t)dgw.shape(0) == D && (int64_t)dfg.shape(0) == T &&
                 (int64_t)dfg.shape(1) == D && (int64_t)dh.shape(0) == T && (int64_t)dh.shape(1) == D,
             "mlgru_gate_bwd shapes do not match");
        const auto span = [](const auto &a) {
          return std::pair<const float *, const float *>{a.data(), a.data() + a.size()};
        };
        const std::pair<const float *, const float *> all[7] = {span(dfg), span(dgw), span(dh), span(fg),
                                                                 span(gw),  span(h),   span(dout)};
        for (int o = 0; o < 3; ++o)  // each output against every other array
          for (int i = 0; i < 7; ++i)
            need(i == o || all[o].second <= all[i].first || all[i].second <= all[o].first,
                 "mlgru_gate_bwd outputs must not overlap other arrays");
        nb::gil_scoped_release release;
        std::vector<float> part((size_t)(chunks_of(T) * D), 0.f);
        for_rows(threads, T, [&](int64_t r, int64_t c) {
          const int64_t o = r * D;
          mlgru_gate_bwd_row(isa, fg.data() + o, gw.data(), h.data() + o, dout.data() + o, D, eps, dfg.data() + o,
                             part.data() + c * D, dh.data() + o);
        });
        reduce_parts(part, chunks_of(T), D, dgw.data());
      },
      nb::arg("fg"), nb::arg("gw"), nb::arg("h"), nb::arg("dout"), nb::arg("eps"), nb::arg("dfg"), nb::arg("dgw"),
      nb::arg("dh"), nb::arg("backend"), nb::arg("threads"), "The output gate's backward: dfg, dgw [D] and dh.");

  m.def(
      "glu_fwd",
      [](F2 gate_up, Out2 out, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)gate_up.shape(0), I = (int64_t)out.shape(1);
        need((int64_t)gate_up.shape(1) == 2 * I && (int64_t)out.shape(0) == T, "glu_fwd shapes do not match");
        nb::gil_scoped_release release;
        for_rows(threads, T, [&](int64_t t, int64_t) { glu_row(isa, gate_up.data() + t * 2 * I, I, out.data() + t * I); });
      },
      nb::arg("gate_up"), nb::arg("out"), nb::arg("backend"), nb::arg("threads"), "z = silu(gate) * up over rows.");

  m.def(
      "glu_bwd",
      [](F2 gate_up, F2 dz, Out2 dgate_up, const std::string &backend, int threads) {
        const Isa isa = parse_isa(backend);
        const int64_t T = (int64_t)gate_up.shape(0), I = (int64_t)dz.shape(1);
        need((int64_t)gate_up.shape(1) == 2 * I && (int64_t)dz.shape(0) == T && (int64_t)dgate_up.shape(0) == T &&
                 (int64_t)dgate_up.shape(1) == 2 * I,
             "glu_bwd shapes do not match");
        nb::gil_scoped_release release;
        for_rows(threads, T, [&](int64_t t, int64_t) {
          glu_bwd_row(isa, gate_up.data() + t * 2 * I, dz.data() + t * I, I, dgate_up.data() + t * 2 * I);
        });
      },
      nb::arg("gate_up"), nb::arg("dz"), nb::arg("dgate_up"), nb::arg("backend"), nb::arg("threads"),
      "GLU backward: d(gate_up) [T, 2I] from dL/dz.");
}
