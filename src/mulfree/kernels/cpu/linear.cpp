// The GEMV tile table (every ISA and token count filled, falling back to the next lower tier) and the drivers
// that run a step's linears over the pool.
#include "gemv.h"

#include <array>
#include <climits>
#include <stdexcept>

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

// The T1R4 tiles of each tier: the VNNI tiers read formats/t1.h's digit step as a linear map (two vpdpbusd per
// digit, no digit formed); AVX2 decodes the digits with compares.
const TileSetT1 &tile_set_t1(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return kGemvT1Avx512;
#if MF_HAVE_AVXVNNI
    case Isa::AvxVnni: return kGemvT1AvxVnni;
#else
    case Isa::AvxVnni:
#endif
    case Isa::Avx2: return kGemvT1Avx2;
    case Isa::Scalar: break;
  }
  return kGemvT1Scalar;
}

using TileTableT1 = std::array<std::array<TileT1, kMaxTile>, 4>;
const TileTableT1 kTilesT1 = [] {
  TileTableT1 table{};
  for (int i = 0; i < (int)table.size(); ++i) {
    const TileSetT1 &set = tile_set_t1((Isa)i);
    for (int nt = 1; nt <= kMaxTile; ++nt) {
      const int n = std::min(nt, set.count);
      table[(size_t)i][(size_t)nt - 1] = TileT1{set.tiles[n - 1], n};
    }
  }
  return table;
}();

}  // namespace

const Tile &gemv_tile(Isa isa, int nt) { return kTiles[(size_t)isa][(size_t)nt - 1]; }
const TileT1 &gemv_tile_t1(Isa isa, int nt) { return kTilesT1[(size_t)isa][(size_t)nt - 1]; }

Format parse_format(const std::string &name) {
  if (name == "t2") return Format::T2R4;
  if (name == "t1") return Format::T1R4;
  throw std::invalid_argument("unknown packed format '" + name + "' (expected t2 or t1)");
}

LineVec<int32_t> t1_row_sums(const uint8_t *W, int64_t N, int64_t Kpad) {
  static const auto lut = [] {
    std::array<int8_t, 256> t{};
    for (int b = 0; b < 256; ++b) t[(size_t)b] = (int8_t)t1::trit_sum((uint8_t)b);
    return t;
  }();
  const int64_t G = t1::row_groups(N);
  LineVec<int32_t> sums((size_t)(G * t1::kRows), 0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t b = 0; b < Kpad / t1::kBlock; ++b) {
      const t1::Block &blk = reinterpret_cast<const t1::Block *>(W + g * t1::group_bytes(Kpad))[b];
      for (int r = 0; r < t1::kRows; ++r) {
        int32_t s = 0;
        for (uint8_t byte : blk.rows[r]) s += lut[byte];
        sums[(size_t)(g * t1::kRows + r)] += s;
      }
    }
  return sums;
}

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
    const uint8_t *W = j.W + gs * j.group_bytes();
    for (int64_t t0 = 0; t0 < T;) {
      const int nt = (int)std::min<int64_t>(kMaxTile, T - t0);
      if (j.fmt == Format::T1R4) {
        const TileT1 &tile = gemv_tile_t1(isa, nt);
        tile.fn(W, j.Kpad, ge - gs, j.Q + t0 * j.Kpad, j.Kpad, j.sumq + t0, j.wsum + gs * kRows, st + t0 * width,
                width);
        t0 += tile.tokens;
      } else {
        const Tile &tile = gemv_tile(isa, nt);
        tile.fn(W, j.Kpad, ge - gs, j.Q + t0 * j.Kpad, j.Kpad, st + t0 * width, width);
        t0 += tile.tokens;
      }
    }
    const int64_t n0 = gs * kRows, n1 = std::min(j.N, ge * kRows);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t sq = j.fmt == Format::T1R4 ? 0 : j.sumq[t];  // T1R4 tiles give sum trit * q already
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
  if (uses_panels(isa, jobs[0].fmt, min_t))
    return jobs[0].fmt == Format::T1R4 ? run_linears_t1_panels(isa, threads, jobs, njobs)
                                       : run_linears_panels(isa, threads, jobs, njobs);
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
