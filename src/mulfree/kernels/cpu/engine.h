// The packed MMfree model walk: PackedLinear (one BitLinear's packed weight), Layer (one block's named weights)
// and Engine (embedding -> layers -> norm -> head, prefill or decode, in one native call per step).
#pragma once
#include "linear.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace ternary {

template <class T, class... Extra>
using Arr = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using Vec = Arr<const float, nb::ndim<1>>;

// A packed weight [N, K], T2R4 (formats/t2r4.h) or T1R4 (formats/t1.h), with its trained scale and the RMSNorm
// weight of its input. T1R4 weights carry their rows' trit sums (computed from the bytes when built), which the
// AVX2 tiles need.
struct PackedLinear {
  Arr<const uint8_t, nb::ndim<2>> packed;
  int64_t N, K;
  double scale;
  Vec norm;
  Format fmt;
  std::shared_ptr<const LineVec<int32_t>> wsum;  // T1R4: [row groups * 4]

  PackedLinear(Arr<const uint8_t, nb::ndim<2>> p, int64_t n, int64_t k, double s, Vec w, Format f = Format::T2R4);
  int64_t kpad() const { return padded_k(fmt, K); }
};

// One MMfree block (nn/mlgru.py, nn/glu.py; the module names of models/mmfree.py's MMFreeBlock):
// x += o_proj(g_norm(g_proj(a)) * silu(h)) with a = attn_norm(x) and the MLGRU state h from i_proj, f_proj
// (forget gate floored by lower_bound, none in layer 0); x += down_proj(silu(gate) * up) from gate_proj of
// mlp_norm(x).
struct Layer {
  Vec attn_norm;
  PackedLinear i_proj, f_proj, g_proj, o_proj;
  Vec g_norm;
  std::optional<Vec> lower_bound;
  Vec mlp_norm;
  PackedLinear gate_proj, down_proj;
};

// Per-linear quantized input: q [T, Kpad], scales, sums.
struct QBuf {
  LineVec<int8_t> q;
  LineVec<float> sa;
  LineVec<int32_t> sq;
  void reserve(int64_t T, const PackedLinear &p);
  // Token t's row x (after reserve); tmp holds p.K floats.
  void row(Isa isa, const float *x, int64_t t, const PackedLinear &p, double eps, float *tmp);
  // Every row of x [T, ldx], split by tokens over the pool.
  void fill(Isa isa, const float *x, int64_t T, int64_t ldx, const PackedLinear &p, double eps, int threads);
  LinearJob job(const PackedLinear &p, int64_t T, float *Y, int64_t ldy) const;
};

// Two norm eps, as the official model: `eps` (rms_norm_eps) for attn_norm, g_norm, mlp_norm and the final norm;
// `bitlinear_eps` for every BitLinear's own input norm (the rmsnorm_quant of i/f/g/o_proj, gate/down_proj and
// lm_head; the official fused BitLinear always uses 1e-6).
class Engine {
 public:
  // forward runs prompts longer than this in windows (the per-token buffers of 256 tokens of the 1.3b shape,
  // ~22 MB, against ~45 MB for 512, which made the elementwise steps and panel outputs 12 % slower per token).
  static constexpr int64_t kPrefillWindow = 256;
  Engine(int64_t vocab, int64_t d, int64_t inter, double eps, double bitlinear_eps, const std::string &backend,
         int threads);
  void set_embedding_f32(Arr<const float, nb::ndim<2>> e);
  void set_embedding_bf16(Arr<const uint16_t, nb::ndim<2>> e);
  void set_head(Vec norm, const PackedLinear &head);
  void add_layer(const Layer &layer);
  int64_t num_layers() const { return (int64_t)layers_.size(); }
  // ids [T]; state [L, d] updated in place; logits [R, V] with R = T (all_logits) or 1 (last token). Prompts past
  // kPrefillWindow tokens run in windows.
  void forward(Arr<const int64_t, nb::ndim<1>> ids, Arr<float, nb::ndim<2>> state, Arr<float, nb::ndim<2>> logits,
               bool all_logits);
  // One decode step of B independent sequences: ids [B] (token b of sequence b), states [B, L, d] (sequence b's
  // recurrent state, contiguous; a caller keeping states elsewhere gathers them in and scatters them back),
  // updated in place; logits [B, V]. Every linear runs once over the B tokens (T = B: the weights are read once
  // per step for all sequences); the MLGRU update of token b uses state row b.
  void forward_batch(Arr<const int64_t, nb::ndim<1>> ids, Arr<float, nb::ndim<3>> states,
                     Arr<float, nb::ndim<2>> logits);
  // One step of S sequences that each feed any number of tokens (a continuous-batching step: decode tokens
  // and prompt chunks together): ids [T] holds sequence s's lengths[s] tokens after sequence s-1's; states[s]
  // [L, d] is sequence s's state, updated in place; logits [S, V] of each sequence's last token. Every linear
  // runs once over all T tokens; the MLGRU update runs each sequence's tokens in order on its own state.
  void forward_ragged(Arr<const int64_t, nb::ndim<1>> ids, Arr<const int64_t, nb::ndim<1>> lengths,
                      std::vector<Arr<float, nb::ndim<2>>> states, Arr<float, nb::ndim<2>> logits);

 private:
  // Tokens [start, start + len) of one sequence, whose state is state [L, d].
  struct Segment {
    int64_t start, len;
    float *state;
  };
  // The walk over T tokens in segments (the sequences' token ranges in order, covering [0, T)); logits of the
  // tokens rows[0..R) into lg [R, V].
  void run(const int64_t *ids, int64_t T, const std::vector<Segment> &segs, const std::vector<int64_t> &rows,
           float *lg);
  void check_ready(const int64_t *ids, int64_t T) const;
  void check_emb(size_t v, size_t d);
  void check_state(size_t layers, size_t d) const;  // a state is [num_layers, hidden_size]
  // fn(t, tmp) for every token t, split by tokens over the pool; tmp holds 2 I floats (any linear's K).
  template <class F>
  void per_token(int64_t T, F &&fn);
  void add_row(float *h, const float *x) const;  // h += x over one row of width d
  void embed(int64_t id, float *out) const;
  // The MLGRU state update of a panel step as pool items (segment, channels [k0, k1)), about 16 tokens' worth of
  // channels each: a long segment splits over channels, a one-token one (batched decode) is one item with its
  // whole state row, which the hardware prefetcher streams (channel ranges of 32 rows were latency-bound).
  struct StateItem {
    int64_t seg, k0, k1;
  };
  std::vector<StateItem> state_items(const std::vector<Segment> &segs, int64_t T) const;
  // One block over T tokens: h [T, d] += its two residual branches (the last down projection is left in fi_
  // and added by the next step that reads h); each segment's layer-l state row updated in place (after panel
  // GEMMs, by `items`: state_items(segs, T), made once per step).
  void layer_forward(const Layer &ly, int64_t l, int64_t T, const std::vector<Segment> &segs,
                     const std::vector<StateItem> &items);

  int64_t V_, d_, I_;
  double eps_, beps_;  // rms_norm_eps; the BitLinear input norms' eps
  Isa isa_;
  int threads_;
  std::optional<Format> fmt_;  // of every linear: set by the first one added
  void check_format(const PackedLinear &p);
  bool panels(int64_t T) const { return uses_panels(isa_, fmt_.value_or(Format::T2R4), T); }
  bool emb_is_bf16_ = false;
  Arr<const float, nb::ndim<2>> emb_f32_;
  Arr<const uint16_t, nb::ndim<2>> emb_bf16_;
  Vec norm_;
  std::vector<PackedLinear> head_;
  std::vector<Layer> layers_;
  std::mutex busy_;  // one forward at a time per engine (scratch is shared)
  LineVec<float> h_, a_, fi_, ff_, fg_, big_;
  QBuf qi_, qf_, qg_;
};

}  // namespace ternary
