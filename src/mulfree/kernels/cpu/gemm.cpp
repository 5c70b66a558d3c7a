// The panel GEMM driver: picks the tier (the one place AMX is chosen), then runs every panel of every linear
// of the call over the pool.
#include "gemm.h"

#include <cstdlib>
#include <string>

namespace ternary {
namespace {

// T1R4 weights run as panels only from this many tokens: every call converts them to T2R4 first (gemm_t1.cpp),
// which costs about two decode steps, so their GEMV tiles win for longer (docs/packed.md).
constexpr int64_t kT1PanelMinTokens = 32;

// The panel tier of `isa`: AMX when it is on (set_amx, and a build with AMX), else the ISA's own tier, else the
// next lower one this build has; none for scalar.
const PanelTier *panel_tier(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
#if MF_HAVE_AMX
      if (amx_switch().load(std::memory_order_relaxed)) return &kPanelAmx;
#endif
      return &kPanelAvx512;
    case Isa::AvxVnni:
#if MF_HAVE_AVXVNNI
      return &kPanelAvxVnni;
#endif
    case Isa::Avx2: return &kPanelAvx2;
    case Isa::Scalar: break;
  }
  return nullptr;
}

}  // namespace

std::atomic<bool> &amx_switch() {
  static std::atomic<bool> on{cpu_features().amx_int8 && !(std::getenv("MULFREE_AMX") &&
                                                            std::string(std::getenv("MULFREE_AMX")) == "0")};
  return on;
}

bool uses_panels(Isa isa, Format fmt, int64_t T) {
  const PanelTier *tier = panel_tier(isa);
  return tier && T >= std::max(tier->min_tokens, fmt == Format::T1R4 ? kT1PanelMinTokens : int64_t{0});
}

void prepare_none(int, const LinearJob *jobs, int njobs, const int8_t **acts) {
  for (int i = 0; i < njobs; ++i) acts[i] = jobs[i].Q;
}
void tiles_none() {}

// The next chunk's weight prefetches go out a share before each token block rather than all before the first (a
// burst of 64 runs ahead of the fill buffers; docs/packed.md has the measurements).
void multiply_blocks(const PanelTier &tier, const PanelChunk &c) {
  const int64_t bt = tier.block_tokens, nb = (c.j.T + bt - 1) / bt;
  for (int64_t b = 0, t0 = 0; t0 < c.j.T; ++b, t0 += bt) {
    for (int64_t l = b * c.nlines / nb; l < (b + 1) * c.nlines / nb; ++l) prefetch_line_l2(c.lines[l]);
    tier.blocks[std::min(bt, c.j.T - t0) - 1](c.acts, c.j.Kpad, t0, c.panel, c.ks0, c.ks1, c.C);
  }
}

// Panels of 32 rows over the pool, each unpacked once per k chunk and run against every token.
void run_linears_panels(Isa isa, int threads, const LinearJob *jobs, int njobs) {
  const PanelTier &tier = *panel_tier(isa);
  // (A reference to the caller's buffer, so the pool's workers see it, not their own thread_local ones.)
  thread_local std::vector<const int8_t *> caller_acts;
  std::vector<const int8_t *> &acts = caller_acts;
  acts.resize((size_t)njobs);
  tier.prepare(threads, jobs, njobs, acts.data());
  const auto chunks = row_group_chunks(jobs, njobs, kPanelRows / kRows);  // one 32-row panel each
  get_pool(threads).run_chunks((int64_t)chunks.size(), [&](int64_t c) {
    const auto [i, g0] = chunks[(size_t)c];
    const LinearJob &j = jobs[i];
    const int64_t nks = j.Kpad / 64;
    thread_local LineVec<int8_t> panel;
    panel.resize((size_t)(kPanelRows * 64 * kPanelChunkSteps));
    const int64_t nblk = round_up(j.T, kAmxTokens) / kAmxTokens, cblk = nblk * 4 * 256;
    thread_local LineVec<int32_t> cbuf;
    cbuf.resize((size_t)(2 * cblk));
    int32_t *C = cbuf.data();
    // C blocks of the panel at row group gp for every token: k in chunks whose panel slice stays in L1 across
    // all tokens (the C blocks wait in memory between chunks); each slice is unpacked just before its use, into
    // the same 16 KiB buffer, whose lines stay in L1 (docs/packed.md has the measurements behind the blocking).
    // The weight lines of the chunk of k steps from ks of the panel at row group gn of job jn.
    auto chunk_lines = [&](const LinearJob &jn, int64_t gn, int64_t ks, const uint8_t **lines) {
      int64_t nl = 0;
      for (int64_t g = gn; g < std::min(jn.groups(), gn + kPanelRows / kRows); ++g)
        for (int64_t off = ks * 64; off < std::min(jn.Kpad / 64, ks + kPanelChunkSteps) * 64; off += 64)
          lines[nl++] = jn.W + g * jn.Kpad + off;
      return nl;
    };
    auto run_panel = [&](int64_t gp, int32_t *Cp, bool gate) {
      for (int64_t ks0 = 0; ks0 < nks; ks0 += kPanelChunkSteps) {
        const int64_t ks1 = std::min(nks, ks0 + kPanelChunkSteps);
        tier.unpack(j.W, j.groups(), j.Kpad, gp, ks0 / 4, ks1 / 4, panel.data());
        // The next chunk's weights go into L2 while this one multiplies (the unpack reads them from memory);
        // after the last chunk, the first chunk of the panel this thread most likely runs next: the up panel
        // after the gate panel, else Pool::likely_next's work item (a wrong guess costs 64 idle prefetches).
        const uint8_t *lines[kPanelRows / kRows * kPanelChunkSteps];
        int64_t nl = 0;
        if (ks1 < nks)
          nl = chunk_lines(j, gp, ks1, lines);
        else if (gate)
          nl = chunk_lines(j, gp + j.glu / kRows, 0, lines);
        else if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < (int64_t)chunks.size())
          nl = chunk_lines(jobs[chunks[(size_t)cn].first], chunks[(size_t)cn].second, 0, lines);
        tier.multiply(tier, PanelChunk{j, acts[(size_t)i], panel.data(), ks0, ks1, Cp, lines, nl});
      }
    };
    tier.begin();
    run_panel(g0, C, j.glu > 0);
    if (j.glu) {
      run_panel(g0 + j.glu / kRows, C + cblk, false);
      for (int64_t tb = 0; tb < nblk; ++tb)
        tier.finish_glu(j, C + tb * 4 * 256, C + cblk + tb * 4 * 256, g0 * kRows, tb * kAmxTokens);
    } else {
      for (int64_t tb = 0; tb < nblk; ++tb) tier.finish(j, C + tb * 4 * 256, g0 * kRows, tb * kAmxTokens);
    }
    tier.end();
  });
}

}  // namespace ternary
