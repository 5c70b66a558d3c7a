// The packed MMfree model walk (engine.h): each step's linears in one parallel region, the per-token steps
// between them in another.
#include "engine.h"

#include "elementwise.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace ternary {

PackedLinear::PackedLinear(Arr<const uint8_t, nb::ndim<2>> p, int64_t n, int64_t k, double s, Vec w, Format f)
    : packed(p), N(n), K(k), scale(s), norm(w), fmt(f) {
  if (n < 1 || k < 1) throw std::invalid_argument("packed weight needs N, K >= 1");
  if ((int64_t)p.shape(0) != t2r4::row_groups(N) || (int64_t)p.shape(1) != group_bytes(fmt, kpad()))
    throw std::invalid_argument("packed weight shape does not match (N, K)");
  if ((int64_t)w.shape(0) != K) throw std::invalid_argument("norm weight length does not match K");
  if (fmt == Format::T1R4) wsum = std::make_shared<const LineVec<int32_t>>(t1_row_sums(p.data(), N, kpad()));
}

void QBuf::reserve(int64_t T, const PackedLinear &p) {
  q.resize((size_t)(T * p.kpad()));
  sa.resize((size_t)T);
  sq.resize((size_t)T);
}
void QBuf::row(Isa isa, const float *x, int64_t t, const PackedLinear &p, double eps, float *tmp) {
  rmsnorm_quant_row(isa, x, p.norm.data(), p.K, p.kpad(), eps, tmp, q.data() + t * p.kpad(), &sa[t], &sq[t]);
}
void QBuf::fill(Isa isa, const float *x, int64_t T, int64_t ldx, const PackedLinear &p, double eps, int threads) {
  reserve(T, p);
  for_ranges(threads, T, [&](int64_t t0, int64_t t1) {
    LineVec<float> tmp((size_t)p.K);
    for (int64_t t = t0; t < t1; ++t) row(isa, x + t * ldx, t, p, eps, tmp.data());
  });
}
LinearJob QBuf::job(const PackedLinear &p, int64_t T, float *Y, int64_t ldy) const {
  LinearJob j{p.packed.data(), p.N, p.kpad(), (float)p.scale, q.data(), sq.data(), sa.data(), T, Y, nullptr, ldy};
  j.fmt = p.fmt;
  j.wsum = p.wsum ? p.wsum->data() : nullptr;
  j.K = p.K;
  return j;
}

Engine::Engine(int64_t vocab, int64_t d, int64_t inter, double eps, double bitlinear_eps, const std::string &backend,
               int threads)
    : V_(vocab), d_(d), I_(inter), eps_(eps), beps_(bitlinear_eps), isa_(parse_isa(backend)), threads_(threads) {
  if (vocab < 1 || d < 1 || inter < 1) throw std::invalid_argument("vocab, hidden and intermediate sizes must be >= 1");
  if (!(eps > 0) || !(bitlinear_eps > 0)) throw std::invalid_argument("eps and bitlinear_eps must be > 0");
}

void Engine::set_embedding_f32(Arr<const float, nb::ndim<2>> e) {
  check_emb(e.shape(0), e.shape(1));
  emb_f32_ = e;
  emb_is_bf16_ = false;
}
void Engine::set_embedding_bf16(Arr<const uint16_t, nb::ndim<2>> e) {
  check_emb(e.shape(0), e.shape(1));
  emb_bf16_ = e;
  emb_is_bf16_ = true;
}
void Engine::check_format(const PackedLinear &p) {
  if (fmt_ && *fmt_ != p.fmt) throw std::invalid_argument("every linear of an engine must have the same packed format");
  fmt_ = p.fmt;
}

void Engine::set_head(Vec norm, const PackedLinear &head) {
  if ((int64_t)norm.shape(0) != d_ || head.K != d_ || head.N != V_)
    throw std::invalid_argument("lm_head shapes do not match the config");
  check_format(head);
  norm_ = norm;
  head_.assign(1, head);
}

void Engine::add_layer(const Layer &ly) {
  auto need = [](const PackedLinear &p, int64_t N, int64_t K, const char *name) {
    if (p.N != N || p.K != K) throw std::invalid_argument(std::string(name) + " shape does not match the config");
  };
  need(ly.i_proj, d_, d_, "i_proj");
  need(ly.f_proj, d_, d_, "f_proj");
  need(ly.g_proj, d_, d_, "g_proj");
  need(ly.o_proj, d_, d_, "o_proj");
  need(ly.gate_proj, 2 * I_, d_, "gate_proj");
  need(ly.down_proj, d_, I_, "down_proj");
  for (const PackedLinear *p : {&ly.i_proj, &ly.f_proj, &ly.g_proj, &ly.o_proj, &ly.gate_proj, &ly.down_proj})
    check_format(*p);
  for (const Vec *v : {&ly.attn_norm, &ly.g_norm, &ly.mlp_norm})
    if ((int64_t)v->shape(0) != d_) throw std::invalid_argument("norm length does not match hidden_size");
  if (ly.lower_bound && (int64_t)ly.lower_bound->shape(0) != d_)
    throw std::invalid_argument("lower_bound length does not match hidden_size");
  layers_.push_back(ly);
}

void Engine::check_ready(const int64_t *ids, int64_t T) const {
  if (T < 1) throw std::invalid_argument("forward needs at least one token");
  if (head_.empty() || (emb_is_bf16_ ? !emb_bf16_.is_valid() : !emb_f32_.is_valid()))
    throw std::invalid_argument("engine is not fully loaded (embedding / head missing)");
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= V_) throw std::invalid_argument("token id out of range");
}

void Engine::forward(Arr<const int64_t, nb::ndim<1>> ids, Arr<float, nb::ndim<2>> state, Arr<float, nb::ndim<2>> logits,
                     bool all_logits) {
  const int64_t T = (int64_t)ids.shape(0);
  check_ready(ids.data(), T);
  check_state(state.shape(0), state.shape(1));
  const int64_t R = all_logits ? T : 1;
  if ((int64_t)logits.shape(0) != R || (int64_t)logits.shape(1) != V_)
    throw std::invalid_argument("logits buffer has the wrong shape");
  // Long prompts run in even windows of at most kPrefillWindow tokens, one after the other on the same state: the
  // same result (every step is per token, or the recurrence in token order), with the per-token buffers of a
  // window in cache and the scratch bounded by the window, not the prompt.
  const int64_t nwin = (T + kPrefillWindow - 1) / kPrefillWindow, W = (T + nwin - 1) / nwin;
  nb::gil_scoped_release release;
  for (int64_t w0 = 0; w0 < T; w0 += W) {
    const int64_t n = std::min(W, T - w0);
    std::vector<int64_t> rows;
    for (int64_t t = std::max(w0, T - R); t < w0 + n; ++t) rows.push_back(t - w0);
    run(ids.data() + w0, n, {Segment{0, n, state.data()}}, rows, logits.data() + (all_logits ? w0 : 0) * V_);
  }
}

void Engine::forward_batch(Arr<const int64_t, nb::ndim<1>> ids, Arr<float, nb::ndim<3>> states,
                           Arr<float, nb::ndim<2>> logits) {
  const int64_t B = (int64_t)ids.shape(0);
  check_ready(ids.data(), B);
  if ((int64_t)states.shape(0) != B || (int64_t)states.shape(1) != num_layers() || (int64_t)states.shape(2) != d_)
    throw std::invalid_argument("states must have shape [batch, num_layers, hidden_size]");
  if ((int64_t)logits.shape(0) != B || (int64_t)logits.shape(1) != V_)
    throw std::invalid_argument("logits buffer must have shape [batch, vocab_size]");
  std::vector<Segment> segs((size_t)B);
  std::vector<int64_t> rows((size_t)B);
  for (int64_t b = 0; b < B; ++b) {
    segs[(size_t)b] = Segment{b, 1, states.data() + b * num_layers() * d_};
    rows[(size_t)b] = b;
  }
  nb::gil_scoped_release release;
  run(ids.data(), B, segs, rows, logits.data());
}

void Engine::forward_ragged(Arr<const int64_t, nb::ndim<1>> ids, Arr<const int64_t, nb::ndim<1>> lengths,
                            std::vector<Arr<float, nb::ndim<2>>> states, Arr<float, nb::ndim<2>> logits) {
  const int64_t T = (int64_t)ids.shape(0), S = (int64_t)lengths.shape(0);
  check_ready(ids.data(), T);
  if (S < 1 || (int64_t)states.size() != S) throw std::invalid_argument("need one state per sequence (and one sequence at least)");
  if ((int64_t)logits.shape(0) != S || (int64_t)logits.shape(1) != V_)
    throw std::invalid_argument("logits buffer must have shape [sequences, vocab_size]");
  std::vector<Segment> segs((size_t)S);
  std::vector<int64_t> rows((size_t)S);
  int64_t start = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = lengths.data()[s];
    if (n < 1 || n > T - start) throw std::invalid_argument("sequence lengths must be >= 1 and sum to len(ids)");
    check_state(states[(size_t)s].shape(0), states[(size_t)s].shape(1));
    for (int64_t r = 0; r < s; ++r)
      if (states[(size_t)r].data() == states[(size_t)s].data()) throw std::invalid_argument("two sequences share one state");
    segs[(size_t)s] = Segment{start, n, states[(size_t)s].data()};
    start += n;
    rows[(size_t)s] = start - 1;
  }
  if (start != T) throw std::invalid_argument("sequence lengths must be >= 1 and sum to len(ids)");
  nb::gil_scoped_release release;
  run(ids.data(), T, segs, rows, logits.data());
}

void Engine::check_state(size_t layers, size_t d) const {
  if ((int64_t)layers != num_layers() || (int64_t)d != d_)
    throw std::invalid_argument("state must have shape [num_layers, hidden_size]");
}

void Engine::run(const int64_t *idp, int64_t T, const std::vector<Segment> &segs, const std::vector<int64_t> &rows,
                 float *lg) {
  const int64_t L = num_layers(), d = d_, R = (int64_t)rows.size();
  // Scratch lives in the engine and only grows: fresh pages for every call cost page faults.
  std::lock_guard<std::mutex> lock(busy_);
  for (auto *v : {&h_, &a_, &fi_, &ff_, &fg_}) grow(*v, T * d);
  grow(big_, T * 2 * I_);
  float *h = h_.data(), *a = a_.data(), *fi = fi_.data();
  for (int64_t t = 0; t < T; ++t) embed(idp[t], h + t * d);
  const std::vector<StateItem> items = panels(T) ? state_items(segs, T) : std::vector<StateItem>{};
  for (int64_t l = 0; l < L; ++l) layer_forward(layers_[(size_t)l], l, T, segs, items);
  if (R == 0) return;  // a prompt window before the last: no logits
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = rows[(size_t)r];
    if (L > 0) add_row(h + t * d, fi + t * d);
    rmsnorm_row(isa_, h + t * d, norm_.data(), d, eps_, a + r * d);
  }
  qi_.fill(isa_, a, R, d, head_[0], beps_, threads_);
  const LinearJob hj = qi_.job(head_[0], R, lg, V_);
  run_linears(isa_, threads_, &hj, 1);
}

template <class F>
void Engine::per_token(int64_t T, F &&fn) {
  for_ranges(threads_, T, [&](int64_t t0, int64_t t1) {
    thread_local LineVec<float> tmp;
    grow(tmp, 2 * std::max(I_, d_));
    for (int64_t t = t0; t < t1; ++t) fn(t, tmp.data());
  });
}

// The per-token steps between two linears run as one region over the tokens (each token's rows stay in L1 from
// one step to the next). Each layer's down projection (in fi) is added to h by the next step that reads h: the
// next layer's first region, or the final norm (for the rows the head reads).
void Engine::layer_forward(const Layer &ly, int64_t l, int64_t T, const std::vector<Segment> &segs,
                           const std::vector<StateItem> &items) {
  const int64_t d = d_, I = I_;
  float *h = h_.data(), *a = a_.data(), *fi = fi_.data(), *ff = ff_.data(), *fg = fg_.data(), *big = big_.data();
  QBuf &qi = qi_, &qf = qf_, &qg = qg_;
  qi.reserve(T, ly.i_proj);
  qf.reserve(T, ly.f_proj);
  qg.reserve(T, ly.g_proj);
  per_token(T, [&](int64_t t, float *tmp) {
    if (l > 0) add_row(h + t * d, fi + t * d);
    rmsnorm_row(isa_, h + t * d, ly.attn_norm.data(), d, eps_, a + t * d);
    qi.row(isa_, a + t * d, t, ly.i_proj, beps_, tmp);
    qf.row(isa_, a + t * d, t, ly.f_proj, beps_, tmp);
    qg.row(isa_, a + t * d, t, ly.g_proj, beps_, tmp);
  });
  const LinearJob ifg[3] = {qi.job(ly.i_proj, T, fi, d), qf.job(ly.f_proj, T, ff, d), qg.job(ly.g_proj, T, fg, d)};
  // The recurrence is independent per channel: run on each chunk's channels as their i/f/g rows are done, or after
  // a panel GEMM over the pool by the step's (sequence, channel range) items; the output norm per token.
  const float *lb = ly.lower_bound ? ly.lower_bound->data() : nullptr;
  auto state_update = [&](const Segment &g, int64_t k0, int64_t k1) {
    mlgru_state(isa_, fi + g.start * d, ff + g.start * d, lb, k0, k1, g.state + l * d, g.len, d, 0);
  };
  if (panels(T)) {
    run_linears(isa_, threads_, ifg, 3);
    get_pool(threads_).run_chunks((int64_t)items.size(), [&](int64_t c) {
      const StateItem &it = items[(size_t)c];
      state_update(segs[(size_t)it.seg], it.k0, it.k1);
    });
  } else {
    run_aligned_linears(isa_, threads_, ifg, 3, [&](int64_t k0, int64_t k1) {
      for (const Segment &g : segs) state_update(g, k0, k1);
    });
  }
  qi.reserve(T, ly.o_proj);
  per_token(T, [&](int64_t t, float *tmp) {
    mlgru_out(isa_, fg + t * d, ly.g_norm.data(), d, eps_, fi + t * d, a + t * d);
    qi.row(isa_, a + t * d, t, ly.o_proj, beps_, tmp);
  });
  const LinearJob oj = qi.job(ly.o_proj, T, fi, d);
  run_linears(isa_, threads_, &oj, 1);
  qi.reserve(T, ly.gate_proj);
  per_token(T, [&](int64_t t, float *tmp) {
    add_row(h + t * d, fi + t * d);
    rmsnorm_row(isa_, h + t * d, ly.mlp_norm.data(), d, eps_, a + t * d);
    qi.row(isa_, a + t * d, t, ly.gate_proj, beps_, tmp);
  });
  // In panel GEMMs the GLU is applied to each panel's outputs ([T, I] written, never [T, 2I]); otherwise,
  // where the up rows start on a row group, to each chunk's gate and up rows.
  const bool fused_glu = panels(T) && I % kPanelRows == 0;
  LinearJob gj = qi.job(ly.gate_proj, T, big, fused_glu ? I : 2 * I);
  if (fused_glu) {
    gj.glu = I;
    run_linears(isa_, threads_, &gj, 1);
  } else if (!panels(T) && I % kRows == 0) {
    LinearJob halves[2] = {gj, gj};
    halves[0].N = halves[1].N = I;
    halves[1].W += I / kRows * gj.group_bytes();
    if (gj.wsum) halves[1].wsum += I;
    halves[1].Y += I;
    run_aligned_linears(isa_, threads_, halves, 2, [&](int64_t n0, int64_t n1) {
      for (int64_t t = 0; t < T; ++t) {
        float *y = big + t * 2 * I;
        glu_pairs(isa_, y + n0, y + I + n0, n1 - n0, y + n0);
      }
    });
  } else {
    run_linears(isa_, threads_, &gj, 1);
    for_ranges(threads_, T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) glu_row(isa_, big + t * 2 * I, I, big + t * 2 * I);
    });
  }
  qi.fill(isa_, big, T, fused_glu ? I : 2 * I, ly.down_proj, beps_, threads_);
  const LinearJob dj = qi.job(ly.down_proj, T, fi, d);
  run_linears(isa_, threads_, &dj, 1);
}

std::vector<Engine::StateItem> Engine::state_items(const std::vector<Segment> &segs, int64_t T) const {
  std::vector<StateItem> items;
  for (int64_t s = 0; s < (int64_t)segs.size(); ++s) {
    const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>((16 * segs[(size_t)s].len + T - 1) / T, d_ / 16));
    for (int64_t p = 0; p < pieces; ++p)  // piece edges on 16 channels (whole vectors)
      items.push_back({s, d_ * p / pieces / 16 * 16, p + 1 == pieces ? d_ : d_ * (p + 1) / pieces / 16 * 16});
  }
  return items;
}

void Engine::check_emb(size_t v, size_t d) {
  if ((int64_t)v != V_ || (int64_t)d != d_) throw std::invalid_argument("embedding shape does not match the config");
}

void Engine::add_row(float *h, const float *x) const {
  for (int64_t k = 0; k < d_; ++k) h[k] += x[k];
}

void Engine::embed(int64_t id, float *out) const {
  if (emb_is_bf16_) {
    const uint16_t *row = emb_bf16_.data() + id * d_;
    for (int64_t k = 0; k < d_; ++k) {
      const uint32_t bits = (uint32_t)row[k] << 16;
      std::memcpy(out + k, &bits, 4);
    }
  } else {
    std::memcpy(out, emb_f32_.data() + id * d_, (size_t)d_ * 4);
  }
}

}  // namespace ternary
