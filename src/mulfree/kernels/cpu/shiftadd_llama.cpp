// Kernel family 'shiftadd': one decode step of a Llama-architecture model whose seven projections per block
// are Latency-mode ShiftAdd layers (shiftadd_layer.h), in one native call (reference: the torch forward of
// mulfree.models.llama.LlamaLM). Per block: RMSNorm, q/k/v products, RoPE (halves rotated, as transformers'
// Llama), the new key and value written into the caller's cache, attention over the cache, the o product
// and residual add, RMSNorm, gate/up products, SiLU(gate) * up, the down product and residual add.
// The products run on the thread pool; attention splits heads over it. Embedding, final norm and head stay
// in torch (their dtype and threading are the model's).
#include "shiftadd_layer.h"

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <mutex>
#include <vector>

namespace {

using shiftadd::Arr;
using shiftadd::LutLayer;

constexpr int kProjections = 7;  // q, k, v, o, gate, up, down

// out = x / sqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm computes it in fp32.
void rms_norm(const float *x, const float *w, int64_t D, float eps, float *out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = w[i] * (x[i] * r);
}

// RoPE on `heads` vectors of Dh: v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[Dh/2:], v[:Dh/2]).
void rope(float *v, int64_t heads, int64_t Dh, const float *cos, const float *sin) {
  const int64_t half = Dh / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float *p = v + h * Dh;
    for (int64_t i = 0; i < half; ++i) {
      const float a = p[i], b = p[i + half];
      p[i] = a * cos[i] - b * sin[i];
      p[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

class LutLlama {
 public:
  // blocks: per block the 7 ShiftAddWeights (q, k, v, o, gate, up, down, each with its transforms and bias
  // attached); norms: per block (input_layernorm, post_attention_layernorm) weights, fp32 [D].
  LutLlama(std::vector<std::vector<nb::object>> blocks, std::vector<std::vector<Arr<const float>>> norms,
           int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : D_(hidden), H_(heads), Hkv_(kv_heads), Dh_(head_dim), eps_((float)eps), scale_((float)scale) {
    if (blocks.size() != norms.size() || blocks.empty())
      throw std::invalid_argument("LutLlama: one entry of projections and norms per block");
    if (Hkv_ < 1 || H_ % Hkv_ || Dh_ < 2 || Dh_ % 2)
      throw std::invalid_argument("LutLlama: kv_heads must divide heads and head_dim must be even");
    const int64_t widths[kProjections] = {H_ * Dh_, Hkv_ * Dh_, Hkv_ * Dh_, D_, -1, -1, D_};
    for (size_t b = 0; b < blocks.size(); ++b) {
      if (blocks[b].size() != kProjections || norms[b].size() != 2)
        throw std::invalid_argument("LutLlama: each block needs 7 projections and 2 norm weights");
      for (int p = 0; p < kProjections; ++p) {
        const LutLayer *layer = nb::cast<const LutLayer *>(blocks[b][p]);
        if (widths[p] > 0 && layer->n() != widths[p])
          throw std::invalid_argument("LutLlama: a projection's output width does not match the model shape");
        layers_.push_back(layer);
        held_.push_back(blocks[b][p]);
      }
      const LutLayer *const *P = &layers_[b * kProjections];
      if (b == 0) I_ = P[4]->n();
      const int64_t inputs[kProjections] = {D_, D_, D_, H_ * Dh_, D_, D_, I_};
      if (P[4]->n() != I_ || P[5]->n() != I_)
        throw std::invalid_argument("LutLlama: gate and up widths must be the same in every block");
      for (int p = 0; p < kProjections; ++p)
        if (!P[p]->accepts(inputs[p]))
          throw std::invalid_argument("LutLlama: a projection's input width does not match the model shape");
      for (const auto &w : norms[b])
        if (w.ndim() != 1 || (int64_t)w.shape(0) != D_) throw std::invalid_argument("LutLlama: norm weight != [D]");
      norms_.push_back({norms[b][0], norms[b][1]});
    }
  }

  // One token through every block, in place on x [D]; cos/sin [Dh] of its position; keys[b] / values[b]:
  // fp32 [H_kv, cap, Dh] caches holding positions < len, this token's key and value are written at len.
  void step(Arr<float> x, Arr<const float> cos, Arr<const float> sin, std::vector<Arr<float>> keys,
            std::vector<Arr<float>> values, int64_t len, const std::string &backend, int threads) {
    const Isa isa = parse_isa(backend);
    const size_t L = norms_.size();
    if (x.ndim() != 1 || (int64_t)x.shape(0) != D_ || cos.ndim() != 1 || (int64_t)cos.shape(0) != Dh_ ||
        sin.ndim() != 1 || (int64_t)sin.shape(0) != Dh_ || keys.size() != L || values.size() != L)
      throw std::invalid_argument("LutLlama.step: x [D], cos/sin [head_dim] and one cache per block");
    for (size_t b = 0; b < L; ++b)
      for (const auto *c : {&keys[b], &values[b]})
        if (c->ndim() != 3 || (int64_t)c->shape(0) != Hkv_ || (int64_t)c->shape(2) != Dh_ ||
            len < 0 || len >= (int64_t)c->shape(1))
          throw std::invalid_argument("LutLlama.step: caches must be [kv_heads, cap > len, head_dim]");
    nb::gil_scoped_release release;
    std::lock_guard<std::mutex> turn(busy_);
    Pool &pool = get_pool(std::max(1, threads));
    float *h = x.data();
    buf_.resize(D_ + (H_ + 2 * Hkv_) * Dh_ + H_ * Dh_ + D_ + 2 * I_ + H_ * (len + 1));
    float *xn = buf_.data(), *q = xn + D_, *k = q + H_ * Dh_, *v = k + Hkv_ * Dh_, *att = v + Hkv_ * Dh_;
    float *o = att + H_ * Dh_, *g = o + D_, *u = g + I_, *scores = u + I_;
    for (size_t b = 0; b < L; ++b) {
      const LutLayer *const *P = &layers_[b * kProjections];
      rms_norm(h, norms_[b][0].data(), D_, eps_, xn);
      P[0]->run(isa, xn, 1, D_, q, threads);
      P[1]->run(isa, xn, 1, D_, k, threads);
      P[2]->run(isa, xn, 1, D_, v, threads);
      rope(q, H_, Dh_, cos.data(), sin.data());
      rope(k, Hkv_, Dh_, cos.data(), sin.data());
      const int64_t cap = keys[b].shape(1);
      float *kc = keys[b].data(), *vc = values[b].data();
      for (int64_t gk = 0; gk < Hkv_; ++gk) {
        std::copy(k + gk * Dh_, k + (gk + 1) * Dh_, kc + (gk * cap + len) * Dh_);
        std::copy(v + gk * Dh_, v + (gk + 1) * Dh_, vc + (gk * cap + len) * Dh_);
      }
      pool.run_chunks(H_, [&](int64_t hd) { attend(q, kc, vc, cap, len + 1, hd, scores + hd * (len + 1), att); });
      P[3]->run(isa, att, 1, H_ * Dh_, o, threads);
      for (int64_t i = 0; i < D_; ++i) h[i] += o[i];
      rms_norm(h, norms_[b][1].data(), D_, eps_, xn);
      P[4]->run(isa, xn, 1, D_, g, threads);
      P[5]->run(isa, xn, 1, D_, u, threads);
      for (int64_t i = 0; i < I_; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      P[6]->run(isa, g, 1, I_, o, threads);
      for (int64_t i = 0; i < D_; ++i) h[i] += o[i];
    }
  }

 private:
  // Head hd of one query over T cached positions: softmax(q k^T * scale) v into att[hd].
  void attend(const float *q, const float *kc, const float *vc, int64_t cap, int64_t T, int64_t hd, float *s,
              float *att) const {
    const int64_t gk = hd / (H_ / Hkv_);
    const float *qh = q + hd * Dh_, *kh = kc + gk * cap * Dh_, *vh = vc + gk * cap * Dh_;
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; ++t) {
      float dot = 0.0f;
      for (int64_t i = 0; i < Dh_; ++i) dot += qh[i] * kh[t * Dh_ + i];
      s[t] = dot * scale_;
      mx = std::max(mx, s[t]);
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < T; ++t) sum += (s[t] = std::exp(s[t] - mx));
    float *out = att + hd * Dh_;
    std::fill(out, out + Dh_, 0.0f);
    for (int64_t t = 0; t < T; ++t) {
      const float p = s[t] / sum;
      for (int64_t i = 0; i < Dh_; ++i) out[i] += p * vh[t * Dh_ + i];
    }
  }

  int64_t D_, H_, Hkv_, Dh_, I_ = 0;
  float eps_, scale_;
  std::vector<const LutLayer *> layers_;
  std::vector<nb::object> held_;  // keeps the Python ShiftAddWeights (and their tensors) alive
  std::vector<std::vector<Arr<const float>>> norms_;
  std::vector<float> buf_;  // a step's scratch: one step at a time (busy_)
  std::mutex busy_;
};

}  // namespace

void register_shiftadd_llama(nb::module_ &m) {
  nb::class_<LutLlama>(m, "ShiftAddLlama", "One-token decode of a Llama model with Latency-mode ShiftAdd projections.")
      .def(nb::init<std::vector<std::vector<nb::object>>, std::vector<std::vector<Arr<const float>>>, int64_t, int64_t,
                    int64_t, int64_t, double, double>(),
           nb::arg("blocks"), nb::arg("norms"), nb::arg("hidden"), nb::arg("heads"), nb::arg("kv_heads"),
           nb::arg("head_dim"), nb::arg("eps"), nb::arg("scale"))
      .def("step", &LutLlama::step, nb::arg("x"), nb::arg("cos"), nb::arg("sin"), nb::arg("keys"), nb::arg("values"),
           nb::arg("length"), nb::arg("backend"), nb::arg("threads"),
           "One token through every block, in place on x [D]; writes its key and value at `length` of each cache.");
}
