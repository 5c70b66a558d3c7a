// Panel GEMM, AMX-INT8 tier (Sapphire Rapids and later; the avx512 backend while set_amx is on): activations
// packed into A tiles once per call, the AVX-512 VNNI tier's panels as B tiles, tdpbsud into 2 x 2 blocks of C
// tiles. Built only with a compiler that has the AMX intrinsics (MF_HAVE_AMX).
#include "gemm.h"

#if MF_HAVE_AMX
#include <vector>

namespace ternary {
namespace {

// From 8 tokens the partly empty A tiles still beat the 4-row VNNI GEMV tiles; below, the tiles win (docs/packed.md).
constexpr int64_t kAmxPanelMinTokens = 8;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A tiles of one 32-token block tb, its k steps contiguous:
// A[((tb * nks + ks) * 32 + tt) * 64 + e] = q[32 tb + tt, 64 ks + e], tokens past T zero.
void amx_pack_acts(const int8_t *Q, int64_t T, int64_t Kpad, int64_t tb, int8_t *A) {
  const int64_t nks = Kpad / 64;
  for (int64_t tt = 0; tt < kAmxTokens; ++tt) {
    const int64_t t = tb * kAmxTokens + tt;
    for (int64_t ks = 0; ks < nks; ++ks) {
      int8_t *dst = A + ((tb * nks + ks) * kAmxTokens + tt) * 64;
      if (t < T)
        std::memcpy(dst, Q + t * Kpad + ks * 64, 64);
      else
        std::memset(dst, 0, 64);
    }
  }
}

// Every job's activations as A tiles, packed over the pool into the caller's buffers, kept between calls
// (fresh pages cost faults).
void prepare_amx(int threads, const LinearJob *jobs, int njobs, const int8_t **out) {
  // (A reference to the caller's buffers, so the pool's workers see them, not their own thread_local ones.)
  thread_local std::vector<LineVec<int8_t>> caller_acts;
  std::vector<LineVec<int8_t>> &acts = caller_acts;
  if (acts.size() < (size_t)njobs) acts.resize((size_t)njobs);
  std::vector<std::pair<int, int64_t>> blocks;  // (job, token block)
  for (int i = 0; i < njobs; ++i) {
    const LinearJob &j = jobs[i];
    const int64_t nblk = round_up(j.T, kAmxTokens) / kAmxTokens;
    acts[(size_t)i].resize(std::max(acts[(size_t)i].size(), (size_t)(nblk * kAmxTokens * j.Kpad)));
    for (int64_t tb = 0; tb < nblk; ++tb) blocks.emplace_back(i, tb);
    out[i] = acts[(size_t)i].data();
  }
  get_pool(threads).run_chunks((int64_t)blocks.size(), [&](int64_t c) {
    const auto [i, tb] = blocks[(size_t)c];
    amx_pack_acts(jobs[i].Q, jobs[i].T, jobs[i].Kpad, tb, acts[(size_t)i].data());
  });
}

// C block [2 token tiles][2 row tiles][16][16] += one 32-token block of A x one panel of B over k steps
// [ks0, ks1) (C zeroed first when ks0 == 0). The npf lines pf[] are prefetched into L2, spread over the k steps.
// `resident`: the C tiles stay in tmm0-3 from one chunk to the next (one block only) and are stored after the
// last k step `nks`, instead of a store and a reload per chunk.
__attribute__((target(MF_AMX))) void amx_block(const int8_t *A, const int8_t *B, int64_t ks0, int64_t ks1,
                                               int64_t nks, bool resident, int32_t *C, const uint8_t *const *pf,
                                               int64_t npf) {
  if (ks0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else if (!resident) {
    _tile_loadd(0, C, 64);
    _tile_loadd(1, C + 256, 64);
    _tile_loadd(2, C + 512, 64);
    _tile_loadd(3, C + 768, 64);
  }
  // Each operand tile is reloaded for the next k step right after its last reader (the tiles are not renamed,
  // so a load waits for the multiplies that read the old contents), which keeps the tile unit fed. The A tiles
  // come from L2 without software prefetch, which measured slower (docs/packed.md).
  auto a_tile = [&](int64_t ks, int h) { return A + (ks * 2 + h) * kTileBytes; };
  auto b_tile = [&](int64_t ks, int h) { return B + ((ks - ks0) * 2 + h) * kTileBytes; };
  const int64_t per = (npf + (ks1 - ks0) - 1) / (ks1 - ks0);
  _tile_loadd(4, a_tile(ks0, 0), 64);
  _tile_loadd(6, b_tile(ks0, 0), 64);
  for (int64_t ks = ks0; ks < ks1; ++ks) {
    _tile_loadd(7, b_tile(ks, 1), 64);
    _tile_dpbsud(0, 4, 6);
    _tile_loadd(5, a_tile(ks, 1), 64);
    _tile_dpbsud(1, 4, 7);
    if (ks + 1 < ks1) _tile_loadd(4, a_tile(ks + 1, 0), 64);
    _tile_dpbsud(2, 5, 6);
    if (ks + 1 < ks1) _tile_loadd(6, b_tile(ks + 1, 0), 64);
    _tile_dpbsud(3, 5, 7);
    for (int64_t l = (ks - ks0) * per; l < std::min(npf, (ks - ks0 + 1) * per); ++l) prefetch_line_l2(pf[l]);
  }
  if (resident && ks1 < nks) return;
  _tile_stored(0, C, 64);
  _tile_stored(1, C + 256, 64);
  _tile_stored(2, C + 512, 64);
  _tile_stored(3, C + 768, 64);
}

// Every 32-token block against the chunk's panel, the chunk's prefetches spread over the blocks' tile loops
// (all at once before the first block was slower, docs/packed.md).
void multiply_amx(const PanelTier &, const PanelChunk &c) {
  const int64_t nblk = round_up(c.j.T, kAmxTokens) / kAmxTokens, nl = c.nlines;
  for (int64_t tb = 0; tb < nblk; ++tb)
    amx_block(c.acts + tb * kAmxTokens * c.j.Kpad, c.panel, c.ks0, c.ks1, c.j.Kpad / 64, nblk == 1,
              c.C + tb * 4 * 256, c.lines + nl * tb / nblk, nl * (tb + 1) / nblk - nl * tb / nblk);
}

// Eight 16 x 64-byte tiles. A static object: with a local one gcc 12 dropped the row / column stores
// before ldtilecfg (it does not see the instruction read them), leaving the tiles unconfigured.
__attribute__((target(MF_AMX))) void amx_begin() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int i = 0; i < 8; ++i) {
      c.rows[i] = 16;
      c.colsb[i] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&cfg);
}
__attribute__((target(MF_AMX))) void amx_end() { _tile_release(); }

}  // namespace

// B tiles are the AVX-512 VNNI panels, and the C tiles are finished as those.
extern const PanelTier kPanelAmx = {
    kAmxPanelMinTokens,  prepare_amx,             amx_begin, amx_end, unpack_panel_avx512, multiply_amx,
    panel_finish_avx512, panel_finish_glu_avx512, nullptr,   0};  // no blocks: multiply_amx runs the tile loop

}  // namespace ternary
#endif  // MF_HAVE_AMX
