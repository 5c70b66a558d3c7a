// Panel GEMM, AMX-INT8 tier (Sapphire Rapids and later; the avx512 backend while set_amx is on): the codes as the
// first operand (a T2R4 row block is 64 consecutive k per bit pair, so a tile row is a shift and a mask, no
// transpose), the activations packed once per call as the second operand (VNNI layout), tdpbssd into 2 x 2 blocks
// of C tiles, which the finishing step transposes. Built only with a compiler that has the AMX intrinsics
// (MF_HAVE_AMX).
#include "gemm.h"

#if MF_HAVE_AMX
#include <vector>

namespace ternary {
namespace {

// From 8 tokens the partly empty activation tiles still beat the 4-row VNNI GEMV tiles; below, the tiles win
// (docs/packed.md).
constexpr int64_t kAmxPanelMinTokens = 8;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The activation tiles of one 32-token block tb in the VNNI layout tdpbssd reads its second operand in (row kq
// holds k-quad kq of 16 tokens), its k steps contiguous:
// A[((tb * nks + ks) * 2 + h) * 1024 + kq * 64 + 4 n + e] = q[32 tb + 16 h + n, 64 ks + 4 kq + e], tokens past T
// zero: per k step one 16 x 16 dword transpose of 16 tokens' 64 bytes.
__attribute__((target(MF_AVX512))) void amx_pack_acts(const int8_t *Q, int64_t T, int64_t Kpad, int64_t tb,
                                                      int8_t *A) {
  const int64_t nks = Kpad / 64;
  for (int64_t ks = 0; ks < nks; ++ks)
    for (int64_t h = 0; h < 2; ++h) {
      __m512i r[16];
      for (int64_t n = 0; n < 16; ++n) {
        const int64_t t = tb * kAmxTokens + 16 * h + n;
        r[n] = t < T ? _mm512_loadu_si512(Q + t * Kpad + ks * 64) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      int8_t *dst = A + ((tb * nks + ks) * 2 + h) * kTileBytes;
      for (int kq = 0; kq < 16; ++kq) _mm512_store_si512(dst + kq * 64, r[kq]);
    }
}

// Every job's activations as tiles, packed over the pool into the caller's buffers, kept between calls
// (fresh pages cost faults).
void prepare_amx(int threads, const LinearJob *jobs, int njobs, const int8_t **out) {
  // (A reference to the caller's buffers, so the pool's workers see them, not their own thread_local ones.)
  thread_local std::vector<LineVec<int8_t>> caller_acts;
  std::vector<LineVec<int8_t>> &acts = caller_acts;
  grow(acts, njobs);
  std::vector<std::pair<int, int64_t>> blocks;  // (job, token block)
  for (int i = 0; i < njobs; ++i) {
    const LinearJob &j = jobs[i];
    const int64_t nblk = round_up(j.T, kAmxTokens) / kAmxTokens;
    grow(acts[(size_t)i], nblk * kAmxTokens * j.Kpad);
    for (int64_t tb = 0; tb < nblk; ++tb) blocks.emplace_back(i, tb);
    out[i] = acts[(size_t)i].data();
  }
  get_pool(threads).run_chunks((int64_t)blocks.size(), [&](int64_t c) {
    const auto [i, tb] = blocks[(size_t)c];
    amx_pack_acts(jobs[i].Q, jobs[i].T, jobs[i].Kpad, tb, acts[(size_t)i].data());
  });
}

// The codes of row groups g0 .. g0+7 for row blocks [b0, b1) as weight tiles, rows past G code 1 (weight 0):
// B[(((ks - ks0) * 2 + i) * 16 + nn) * 64 + e] = code of row 16 i + nn at k = 64 ks + e. In T2R4 a row's 64-byte
// block holds 64 consecutive k in each bit pair, so a tile row is one shift and one mask: no transposes.
__attribute__((target(MF_AVX512))) void amx_unpack(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0, int64_t b0,
                                                   int64_t b1, int8_t *B) {
  const __m512i m3 = _mm512_set1_epi8(3);
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t i = 0; i < 2; ++i)
      for (int nn = 0; nn < 16; ++nn) {  // row 16 i + nn = row group 4 i + nn / 4, row nn % 4
        const int64_t g = g0 + 4 * i + nn / 4;
        const __m512i r = g < G ? _mm512_loadu_si512(W + g * Kpad + b * kBlock + (nn % 4) * 64)
                                : _mm512_set1_epi8((char)t2r4::kZeroByte);
        for (int s = 0; s < 4; ++s)
          _mm512_store_si512(B + (((4 * (b - b0) + s) * 2 + i) * 16 + nn) * 64,
                             _mm512_and_si512(_mm512_srli_epi16(r, 2 * s), m3));
      }
}

// C block [2 token tiles][2 row tiles] of 16 rows x 16 tokens += one panel x one 32-token block of activations
// over k steps [ks0, ks1) (C zeroed first when ks0 == 0): tdpbssd(C, weight tile, activation tile). The npf lines
// pf[] are prefetched into L2, spread over the k steps. `resident`: the C tiles stay in tmm0-3 from one chunk to
// the next (one block only) and are stored after the last k step `nks`, instead of a store and a reload per chunk.
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
  // tmm4-5: the weight tiles (rows 0-15, 16-31), tmm6-7: the activation tiles (tokens 0-15, 16-31); C tile
  // 2 it + i takes rows 16 i.. and tokens 16 it... Each operand tile is reloaded for the next k step right after
  // its last reader (the tiles are not renamed, so a load waits for the multiplies that read the old contents),
  // which keeps the tile unit fed. The activation tiles come from L2 without software prefetch, which measured
  // slower (docs/packed.md).
  auto w_tile = [&](int64_t ks, int i) { return B + ((ks - ks0) * 2 + i) * kTileBytes; };
  auto a_tile = [&](int64_t ks, int h) { return A + (ks * 2 + h) * kTileBytes; };
  const int64_t per = (npf + (ks1 - ks0) - 1) / (ks1 - ks0);
  _tile_loadd(4, w_tile(ks0, 0), 64);
  _tile_loadd(6, a_tile(ks0, 0), 64);
  for (int64_t ks = ks0; ks < ks1; ++ks) {
    _tile_loadd(7, a_tile(ks, 1), 64);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(5, w_tile(ks, 1), 64);
    _tile_dpbssd(2, 4, 7);
    if (ks + 1 < ks1) _tile_loadd(4, w_tile(ks + 1, 0), 64);
    _tile_dpbssd(1, 5, 6);
    if (ks + 1 < ks1) _tile_loadd(6, a_tile(ks + 1, 0), 64);
    _tile_dpbssd(3, 5, 7);
    for (int64_t l = (ks - ks0) * per; l < std::min(npf, (ks - ks0 + 1) * per); ++l) prefetch_line_l2(pf[l]);
  }
  if (resident && ks1 < nks) return;
  _tile_stored(0, C, 64);
  _tile_stored(1, C + 256, 64);
  _tile_stored(2, C + 512, 64);
  _tile_stored(3, C + 768, 64);
}

// The four [row][token] tiles of a C block in the C-tile layout the finishing steps read ([token][row]).
__attribute__((target(MF_AVX512))) void amx_c_layout(const int32_t *C, int32_t *out) {
  for (int tile = 0; tile < 4; ++tile) {
    __m512i r[16];
    for (int m = 0; m < 16; ++m) r[m] = _mm512_load_si512(C + tile * 256 + m * 16);
    transpose16x16_epi32(r);
    for (int n = 0; n < 16; ++n) _mm512_store_si512(out + tile * 256 + n * 16, r[n]);
  }
}

void amx_finish(const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0) {
  alignas(64) int32_t c[4 * 256];
  amx_c_layout(C, c);
  panel_finish_avx512(j, c, n0, t0);
}

void amx_finish_glu(const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0) {
  alignas(64) int32_t g[4 * 256], u[4 * 256];
  amx_c_layout(Cg, g);
  amx_c_layout(Cu, u);
  panel_finish_glu_avx512(j, g, u, n0, t0);
}

// Every 32-token block against the chunk's panel, the chunk's prefetches spread over the blocks' tile loops
// (all at once before the first block was slower, docs/packed.md).
void multiply_amx(const PanelTier &, const PanelChunk &c) {
  const int64_t nblk = round_up(c.j.T, kAmxTokens) / kAmxTokens, nl = c.nlines;
  for (int64_t tb = 0; tb < nblk; ++tb)
    amx_block(c.acts + tb * kAmxTokens * c.j.Kpad, c.panel, c.ks0, c.ks1, c.j.Kpad / 64, nblk == 1,
              c.C + tb * 4 * 256, c.lines + nl * tb / nblk, nl * (tb + 1) / nblk - nl * tb / nblk);
}

}  // namespace

__attribute__((target(MF_AMX))) void amx_end() { _tile_release(); }

// A static object: with a local one gcc 12 dropped the row / column stores before ldtilecfg (it does not see the
// instruction read them), leaving the tiles unconfigured.
__attribute__((target(MF_AMX))) void amx_tiles_16x64() {
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

// The C blocks are finished as the AVX-512 tier's once transposed.
extern const PanelTier kPanelAmx = {
    kAmxPanelMinTokens, prepare_amx,    amx_tiles_16x64, amx_end, amx_unpack, multiply_amx,
    amx_finish,         amx_finish_glu, nullptr,         0};  // no blocks: multiply_amx runs the tile loop

}  // namespace ternary
#endif  // MF_HAVE_AMX
