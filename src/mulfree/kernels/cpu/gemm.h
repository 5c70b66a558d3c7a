// Panel GEMMs for prefill: one backend per tier (gemm_avx2.cpp, gemm_avxvnni.cpp, gemm_avx512.cpp, gemm_amx.cpp)
// behind one driver (gemm.cpp).
//
// The weights of 32 output rows are unpacked once per k chunk into a panel of codes c = trit + 1, which then
// serves every token of the batch; the SIMD tiers' panels are in the VNNI layout (16 k-quads x [16 rows x
// 4 bytes] per 64 k and 16 rows):
// - AMX-INT8 (Sapphire Rapids and later): its panel is 16 rows x 64 k per tile (a T2R4 row block shifted and
//   masked, gemm_amx.cpp); tdpbssd multiplies it by a tile of activations in the VNNI layout (64 k x 16 tokens)
//   into a 16 x 16 int32 C tile of rows x tokens. Per k step a 2 x 2 block of C tiles (tmm0-3) takes two code
//   tiles (tmm4-5, 32 rows) and two activation tiles (tmm6-7, 32 tokens); finishing transposes the C tiles.
// - AVX-512 VNNI (no AMX, or AMX off): per k-quad, the two 16-row zmm of the panel against a broadcast
//   activation quad of each of up to 12 tokens: 24 zmm accumulators, no horizontal sums, no transposes.
// - 256-bit (avx2, avxvnni): the same, one 16-row tile at a time, 4 tokens.
// All give C[t][n] = sum_k c[n, k] q[t, k] in the same C-tile layout, so C - sum_k q[t, k] is the exact dot,
// already in the [T, N] order of the outputs, and one finishing step per register width serves them.
//
// The VNNI panel from T2R4: dword kq of a 64-byte row block holds k-quad kq in all four bit pairs s (k = 64s + 4kq
// .. +3), so one 16 x 16 dword transpose of a row tile's block serves four k steps:
// panel(s) row kq = (transposed row kq) >> 2s & 0x03030303.
#pragma once
#include "linear.h"

#include <atomic>
#include <cstring>

namespace ternary {

constexpr int64_t kAmxTokens = 32;       // tokens per C block: 2 activation tiles (also the C layout's block)
constexpr int64_t kTileBytes = 1024;     // one 16 x 64-byte tile
constexpr int64_t kPanelChunkSteps = 8;  // k steps (64 k each) per chunk: a 16 KiB panel slice, 2 row blocks
// Tokens per 256-bit block (avx2, avxvnni): 2 x 4 accumulators + 2 codes + 4 quads of the 16 ymm registers
// (with 6 tokens gcc loads all 6 quads first and spills accumulators).
constexpr int kYmmTokens = 4;

// Offset of token t's 16-row C tile row in the C-tile layout (row tile i at + 256 * i).
constexpr int64_t c_offset(int64_t t) { return t / kAmxTokens * 1024 + (t % kAmxTokens) / 16 * 512 + t % 16 * 16; }

// Activation quad kq of k step ks of one token's int8 row (4 consecutive k, broadcast against a panel row).
inline int32_t act_quad(const int8_t *row, int64_t ks, int kq) {
  int32_t quad;
  std::memcpy(&quad, row + ks * 64 + kq * 4, 4);
  return quad;
}

// Transposes a 16 x 16 matrix of dwords held as 16 rows.
__attribute__((target(MF_AVX512), always_inline)) inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Rows now hold 4-dword pieces of 4 output rows per 128-bit lane; two lane shuffles finish it.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// One k chunk of one panel: C blocks (rows of row group g0.. of j, every token) += activations x panel over
// k steps [ks0, ks1) (set, not added, when ks0 == 0), while `lines` are prefetched into L2.
struct PanelChunk {
  const LinearJob &j;
  const int8_t *acts;   // the job's activations as PanelTier::prepare left them (AMX: tiles in the VNNI layout)
  const int8_t *panel;  // the unpacked panel slice of the chunk
  int64_t ks0, ks1;
  int32_t *C;           // [ceil(T / 32) blocks][2 token tiles][2 row tiles][16][16]
  const uint8_t *const *lines;
  int64_t nlines;
};

// C rows of tokens [t0, t0 + NT) += their activations x one panel over k steps [ks0, ks1).
using PanelBlockFn = void (*)(const int8_t *Q, int64_t ldq, int64_t t0, const int8_t *B, int64_t ks0, int64_t ks1,
                              int32_t *C);

// One tier's panel GEMM: the driver calls prepare once per call, then per 32-row work item begin, per k
// chunk unpack and multiply, then finish (or finish_glu) per 32-token block, then end.
struct PanelTier {
  int64_t min_tokens;  // batches of at least this many tokens run as panels (see uses_panels)
  // Activations of every job in the layout multiply reads (acts[i] for job i; AMX packs activation tiles).
  void (*prepare)(int threads, const LinearJob *jobs, int njobs, const int8_t **acts);
  void (*begin)();  // AMX: load the tile configuration
  void (*end)();    // AMX: release the tiles
  // The panel slice of row groups g0 .. g0+7 (rows past G get code 1 = weight 0) for row blocks [b0, b1), in
  // the VNNI layout B[(((ks - ks0) * 2 + i) * 16 + kq) * 64 + 4 nn + e] = code of row 16 i + nn at
  // k = 64 ks + 4 kq + e (AMX: the layout of its own first operand).
  void (*unpack)(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0, int64_t b0, int64_t b1, int8_t *B);
  void (*multiply)(const PanelTier &tier, const PanelChunk &chunk);
  // One C block (tokens t0.., rows n0..) as LinearJob outputs: (c - sum q) * (s_x * s_w), the scales product in
  // fp32 and then one product, the torch BitLinear's own order (integer jobs carry no scales).
  void (*finish)(const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0);
  // The gate block Cg and the up block Cu (rows n0.. and I + n0..) as silu(gate) * up, with the products of
  // finish and the arithmetic of glu_row.
  void (*finish_glu)(const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0);
  const PanelBlockFn *blocks;  // multiply_blocks: blocks[n - 1] takes n tokens, n = 1 .. block_tokens
  int block_tokens;
};
extern const PanelTier kPanelAvx2, kPanelAvx512;
#if MF_HAVE_AVXVNNI
extern const PanelTier kPanelAvxVnni;
#endif
#if MF_HAVE_AMX
extern const PanelTier kPanelAmx;
// Configures this thread's eight tiles as 16 rows x 64 bytes each (every AMX kernel of the package uses that shape).
void amx_tiles_16x64();
// Releases this thread's tiles (they hold state the OS saves at every switch while configured).
void amx_end();
#endif

// The pieces tiers share: the SIMD tiers' multiply (prefetch the chunk's lines, then `blocks` over the tokens)
// and prepare (none: blocks read the activations in place), begin / end (nothing), and the 256-bit and AVX-512
// unpack and finishing steps.
void multiply_blocks(const PanelTier &tier, const PanelChunk &chunk);
void prepare_none(int threads, const LinearJob *jobs, int njobs, const int8_t **acts);
void tiles_none();
void unpack_panel_avx2(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0, int64_t b0, int64_t b1, int8_t *B);
void panel_finish_avx2(const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0);
void panel_finish_glu_avx2(const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0);
void unpack_panel_avx512(const uint8_t *W, int64_t G, int64_t Kpad, int64_t g0, int64_t b0, int64_t b1, int8_t *B);
void panel_finish_avx512(const LinearJob &j, const int32_t *C, int64_t n0, int64_t t0);
void panel_finish_glu_avx512(const LinearJob &j, const int32_t *Cg, const int32_t *Cu, int64_t n0, int64_t t0);

// Off when the CPU / OS / compiler lacks AMX or MULFREE_AMX=0; set_amx() switches it (tests, benchmarks).
std::atomic<bool> &amx_switch();

}  // namespace ternary
