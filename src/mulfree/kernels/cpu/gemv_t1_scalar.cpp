// T1R4 GEMV tiles, scalar tier: the oracle of the AVX2 tier (plain loops over the base-3 bytes, formats/t1.h).
#include "gemv.h"

namespace ternary {
namespace {

template <int NT>
void group_t1_scalar(const uint8_t *W, int64_t Kpad, const int8_t *X, int64_t ldx, int32_t *out, int64_t ldo) {
  int32_t acc[t1::kRows][NT] = {};
  for (int64_t b = 0; b < Kpad / t1::kBlock; ++b) {
    for (int r = 0; r < t1::kRows; ++r) {
      const uint8_t *w = W + b * (int64_t)sizeof(t1::Block) + r * t1::kRowBytes;
      for (int i = 0; i < t1::kRowBytes; ++i) {
        for (int j = 0; j < t1::kTrits; ++j) {
          const int t = t1::code(w[i], j) - 1;
          const int64_t k = b * t1::kBlock + j * t1::kRowBytes + i;
          for (int n = 0; n < NT; ++n) acc[r][n] += t * X[n * ldx + k];
        }
      }
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int r = 0; r < t1::kRows; ++r) out[n * ldo + r] = acc[r][n];
}

template <int NT>
void tile_t1_scalar(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx, const int32_t *,
                    const int32_t *, int32_t *out, int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g)
    group_t1_scalar<NT>(W + g * t1::group_bytes(Kpad), Kpad, X, ldx, out + g * t1::kRows, ldo);
}

}  // namespace

extern const TileSetT1 kGemvT1Scalar = {4, {tile_t1_scalar<1>, tile_t1_scalar<2>, tile_t1_scalar<3>, tile_t1_scalar<4>}};

}  // namespace ternary
