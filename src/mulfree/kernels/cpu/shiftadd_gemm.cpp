// Kernel family 'shiftadd', T tokens: the batched LUT GEMM Y [T, N] = X [T, K] W^T on the quad
// layout of shiftadd.h. Each token gets its own tables and runs exactly the one-token kernels
// (run_item), so every row of Y equals a GEMV of that token bit for bit. What the batch buys is
// the weight stream: tokens are tiled, and a work item runs all tokens of a tile on one item of rows,
// so its keys and APoT terms come from memory once per tile and from L1/L2 afterwards.
#include "pool.h"
#include "shiftadd.h"

#include <algorithm>

namespace shiftadd {
namespace {

constexpr int64_t kTileTableBytes = 512 << 10;  // tables of one token tile: about half an L2
constexpr int64_t kMaxTile = 32;                // tokens per tile at most (small K)

}  // namespace

void lut_gemm(const Job &w, Isa isa, const float *x, int64_t T, int64_t K, float *y, int threads) {
  const int64_t C = w.C, items = work_items(w);
  const bool masks = avx2_class(isa);
  const int64_t per_token = C * (kTableFloats + (masks ? kMaskWords : 0)) * 4;
  const int64_t tile = std::min(T, std::clamp<int64_t>(kTileTableBytes / per_token, 1, kMaxTile));
  thread_local LineVec<float> table_buf;
  thread_local LineVec<uint32_t> nz_buf;
  table_buf.resize(tile * C * kTableFloats);
  nz_buf.resize(masks ? tile * C * kMaskWords : 0);
  // Plain pointers: a lambda naming a thread_local reads the running worker's own (empty) copy.
  float *const tables = table_buf.data();
  uint32_t *const nz = nz_buf.data();
  Pool &pool = get_pool(std::max(1, threads));
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t nt = std::min(tile, T - t0);
    pool.run_chunks(nt, [&](int64_t t) {
      build_lut(isa, x + (t0 + t) * K, K, C, tables + t * C * kTableFloats,
                masks ? nz + t * C * kMaskWords : nullptr);
    });
    // Few items (narrow layers) would leave a thread idle: split the tile's tokens into parts then.
    const int64_t parts = std::min<int64_t>(nt, (4 * pool.size() + items - 1) / items);
    pool.run_chunks(items * parts, [&](int64_t u) {
      const int64_t p = u % items, part = u / items;
      Job j = w;
      for (int64_t t = nt * part / parts; t < nt * (part + 1) / parts; ++t) {
        j.tables = tables + t * C * kTableFloats;
        j.nz = masks ? nz + t * C * kMaskWords : nullptr;
        j.y = y + (t0 + t) * w.N;
        run_item(j, isa, p);
      }
    });
  }
}

}  // namespace shiftadd
