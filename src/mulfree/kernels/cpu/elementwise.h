// Elementwise steps of the packed MMfree forward (RMSNorm, per-token int8 quantization, the MLGRU and GLU
// steps), each compiled per ISA tier in elementwise.cpp, and the inline float helpers they share with the
// panel GEMMs' fused GLU. References: ops/fused.py.
#pragma once
#include "mulfree_cpu.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// no-trapping-math lets gcc if-convert the clamps, so these loops vectorize (results unchanged); with
// fp-contract=off each product and sum rounds on its own, as in torch's elementwise ops (FMAs only where written).
#define MF_VEC __attribute__((optimize("no-trapping-math", "fp-contract=off")))
#define MF_INLINE MF_VEC __attribute__((always_inline)) inline

namespace ternary {

// exp(x) as torch's vectorized CPU kernels compute it inside sigmoid and silu (the SLEEF u10 algorithm:
// x = q ln2 + s with ln2 split in two, a degree-5 polynomial, 2^q applied as two halves), with the same
// operations and FMAs, so sigmoidf / siluf give torch's bits (test_silu_has_torch_bits); a correctly rounded
// exp differs from them in ~10 % of inputs by 1 ulp. In float, not double, it is also cheaper. No libm calls,
// so the elementwise loops vectorize for each ISA.
MF_INLINE float pow2i(int32_t e) {
  const uint32_t bits = (uint32_t)(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
MF_INLINE float exp_torch(float d) {
  const float qf = __builtin_rintf(d * 1.44269504088896341f);
  // q = qf as an integer, read from the mantissa of qf + 1.5 * 2^23 (exact for |q| < 2^22; a float-to-int
  // conversion would be undefined for the huge inputs that the last two lines settle)
  const float qm = qf + 12582912.0f;
  int32_t q;
  std::memcpy(&q, &qm, 4);
  q -= 0x4B400000;
  float s = __builtin_fmaf(qf, -0.693145751953125f, d);
  s = __builtin_fmaf(qf, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = __builtin_fmaf(u, s, 0.00139304355252534151077271f);
  u = __builtin_fmaf(u, s, 0.00833336077630519866943359f);
  u = __builtin_fmaf(u, s, 0.0416664853692054748535156f);
  u = __builtin_fmaf(u, s, 0.166666671633720397949219f);
  u = __builtin_fmaf(u, s, 0.5f);
  u = 1.0f + __builtin_fmaf(s * s, u, s);
  u = u * pow2i(q >> 1) * pow2i(q - (q >> 1));
  u = d < -104.0f ? 0.0f : u;
  return d > 100.0f ? std::numeric_limits<float>::infinity() : u;
}
MF_INLINE float sigmoidf(float x) { return 1.0f / (1.0f + exp_torch(-x)); }
MF_INLINE float siluf(float x) { return x / (1.0f + exp_torch(-x)); }

// out[k] = silu(g[k]) * u[k] (the GLU; inlined into the 256-bit panel GEMMs' fused GLU).
MF_INLINE void glu_pairs_impl(const float *g, const float *u, int64_t n, float *out) {
  for (int64_t k = 0; k < n; ++k) out[k] = siluf(g[k]) * u[k];
}

// One function per ISA tier from NAME_impl (scalar, AVX2 + FMA, AVX-512), and NAME(isa, ...) choosing one.
#define MF_UNPAREN(...) __VA_ARGS__
#define MF_ISA_VARIANTS(NAME, PARAMS, ARGS)                                                            \
  static MF_VEC void NAME##_scalar PARAMS { NAME##_impl ARGS; }                                               \
  static MF_VEC __attribute__((target("avx2,fma"))) void NAME##_avx2 PARAMS { NAME##_impl ARGS; }           \
  static MF_VEC __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void NAME##_avx512 PARAMS { \
    NAME##_impl ARGS;                                                                                  \
  }                                                                                                    \
  void NAME(Isa isa, MF_UNPAREN PARAMS) {                                                              \
    if (isa == Isa::Avx512)                                                                            \
      NAME##_avx512 ARGS;                                                                              \
    else if (avx2_class(isa))                                                                          \
      NAME##_avx2 ARGS;                                                                                \
    else                                                                                               \
      NAME##_scalar ARGS;                                                                              \
  }

// The RMS factor rsqrt(mean(x²) + eps) of one row: a double sum of squares, so that the rounded float factor is
// the same as the torch reference's (ops/fused.py) whatever the summation order. It runs in 32 lanes (every
// ISA the same lanes and order), which the ISA variants vectorize: 4 zmm or 8 ymm of doubles.
MF_INLINE float rms_factor(const float *x, int64_t K, double eps) {
  constexpr int kLanes = 32;
  double s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] = __builtin_fma((double)x[k + l], (double)x[k + l], s[l]);
  for (; k < K; ++k) s[0] = __builtin_fma((double)x[k], (double)x[k], s[0]);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return (float)(1.0 / std::sqrt(s[0] / (double)K + eps));
}

// The sum of term(k) over k in [0, n) in 16 fixed lanes, then a fixed tree: a float reduction in source order
// does not vectorize, and fixed lanes give every ISA variant the same order (as rms_factor above).
template <class F>
MF_INLINE float lane_sum(int64_t n, F &&term) {
  constexpr int kLanes = 16;
  float s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += term(k + l);
  for (; k < n; ++k) s[0] += term(k);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// The steps, each dispatched to the variant of `isa` (AVX-VNNI runs the AVX2 one).
// out = x * rms_factor(x) * w over one row of K.
void rmsnorm_row(Isa isa, const float *x, const float *w, int64_t K, double eps, float *out);
// RMSNorm (fp32 factor from a float64 sum) then per-token absmax int8 of one row, zero-padded to Kpad:
// q, *a_scale = max|xhat| / 127 and *sumq = sum q.
void rmsnorm_quant_row(Isa isa, const float *x, const float *w, int64_t K, int64_t Kpad, double eps, float *tmp,
                       int8_t *q, float *a_scale, int32_t *sumq);
// MLGRU phase 1: the state update of channels [k0, k1) for T tokens in turn (rows ld apart; lb == nullptr
// for no lower bound); fi[k] is overwritten with silu(state[k]) for phase 2. Token t updates the state row
// state + t * sld: sld = 0 for T tokens of one sequence, else one state per token (a batched decode step).
void mlgru_state(Isa isa, float *fi, const float *ff, const float *lb, int64_t k0, int64_t k1, float *state, int64_t T,
                 int64_t ld, int64_t sld = 0);
// MLGRU phase 2, one token: out = rmsnorm(fg) * g_norm * silu_s.
void mlgru_out(Isa isa, const float *fg, const float *gnorm, int64_t d, double eps, const float *silu_s, float *out);
// out = silu(g) * u over n values; glu_row: the same with g, u = the two halves of gate_up [2I].
void glu_pairs(Isa isa, const float *g, const float *u, int64_t n, float *out);
void glu_row(Isa isa, const float *gate_up, int64_t I, float *out);

}  // namespace ternary
