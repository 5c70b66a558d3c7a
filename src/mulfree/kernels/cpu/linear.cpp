// The GEMV tile table (every ISA and token count filled, falling back to the next lower tier) and the drivers
// that run a step's linears over the pool.
#include "gemv.h"

#include <array>
#include <climits>

namespace ternary {
namespace {

// The tiles that serve each Isa: its own tier, else the next lower one this build has (like ggml's
// arch-fallback.h; a build without AVX-VNNI intrinsics reports no AVX-VNNI, but the table still has a row).
const TileSet &tile_set(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return kGemvAvx512;
#if MF_HAVE_AVXVNNI
    case Isa::AvxVnni: return kGemvAvxVnni;
#else
    case Isa::AvxVnni:
#endif
    case Isa::Avx2: return kGemvAvx2;
    case Isa::Scalar: break;
  }
  return kGemvScalar;
}

// kTiles[isa][nt - 1]: the tier's nt-token tile, else its largest.
using TileTable = std::array<std::array<Tile, kMaxTile>, 4>;
const TileTable kTiles = [] {
  TileTable table{};
  for (int i = 0; i < (int)table.size(); ++i) {
    const TileSet &set = tile_set((Isa)i);
    for (int nt = 1; nt <= kMaxTile; ++nt) {
      const int n = std::min(nt, set.count);
      table[(size_t)i][(size_t)nt - 1] = Tile{set.tiles[n - 1], n};
    }
  }
  return table;
}();

}  // namespace

const Tile &gemv_tile(Isa isa, int nt) { return kTiles[(size_t)isa][(size_t)nt - 1]; }

std::vector<std::pair<int, int64_t>> row_group_chunks(const LinearJob *jobs, int njobs, int64_t step) {
  std::vector<std::pair<int, int64_t>> chunks;
  for (int i = 0; i < njobs; ++i)
    for (int64_t g = 0; g < jobs[i].out_groups(); g += step) chunks.emplace_back(i, g);
  return chunks;
}

void linear_rows(Isa isa, const LinearJob &j, int64_t g0, int64_t g1) {
  // Outputs of up to 16 row groups are staged, then each token's 64 values are written at once:
  // whole cache lines instead of 16-byte pieces of a line that [T, N] outputs evict in between.
  constexpr int64_t kSpan = 16;
  thread_local LineVec<int32_t> stage;
  const int64_t T = j.T;
  for (int64_t gs = g0; gs < g1; gs += kSpan) {
    const int64_t ge = std::min(g1, gs + kSpan), width = (ge - gs) * kRows;
    stage.resize((size_t)(T * width));
    int32_t *st = stage.data();
    for (int64_t t0 = 0; t0 < T;) {
      const Tile &tile = gemv_tile(isa, (int)std::min<int64_t>(kMaxTile, T - t0));
      tile.fn(j.W + gs * j.Kpad, j.Kpad, ge - gs, j.Q + t0 * j.Kpad, j.Kpad, st + t0 * width, width);
      t0 += tile.tokens;
    }
    const int64_t n0 = gs * kRows, n1 = std::min(j.N, ge * kRows);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t sq = j.sumq[t];
      const int32_t *src = st + t * width - n0;
      if (j.Yi) {
        int32_t *yi = j.Yi + t * j.ldy;
        for (int64_t n = n0; n < n1; ++n) yi[n] = src[n] - sq;
      } else {  // (s_x * s_w) in fp32, then one product: the torch BitLinear's own order
        const float s = j.a_scale[t] * j.w_scale;
        float *y = j.Y + t * j.ldy;
        for (int64_t n = n0; n < n1; ++n) y[n] = (float)(src[n] - sq) * s;
      }
    }
  }
}

void run_linears(Isa isa, int threads, const LinearJob *jobs, int njobs) {
  int64_t work = 0, min_t = INT64_MAX;
  for (int i = 0; i < njobs; ++i) {
    work += jobs[i].N * jobs[i].Kpad * jobs[i].T;
    min_t = std::min(min_t, jobs[i].T);
  }
  if (uses_panels(isa, min_t)) return run_linears_panels(isa, threads, jobs, njobs);
  if (work < (int64_t(1) << 20)) {  // too small to pay for a hand-off to other threads
    for (int i = 0; i < njobs; ++i) linear_rows(isa, jobs[i], 0, jobs[i].groups());
    return;
  }
  const auto chunks = row_group_chunks(jobs, njobs, kChunk);
  get_pool(threads).run_chunks((int64_t)chunks.size(), [&](int64_t c) {
    const auto [i, g0] = chunks[(size_t)c];
    if (const int64_t cn = Pool::likely_next(c); cn >= 0 && cn < (int64_t)chunks.size())
      prefetch_head(jobs[chunks[(size_t)cn].first], chunks[(size_t)cn].second);
    linear_rows(isa, jobs[i], g0, std::min(jobs[i].groups(), g0 + kChunk));
  });
}

}  // namespace ternary
