// GEMV tiles, scalar tier: the oracle of the SIMD tiers (plain loops over the T2R4 codes).
#include "gemv.h"

namespace ternary {
namespace {

template <int NT>
void group_scalar(const uint8_t *W, int64_t Kpad, const int8_t *X, int64_t ldx, int32_t *out, int64_t ldo) {
  int32_t acc[kRows][NT] = {};
  for (int64_t b = 0; b < Kpad / kBlock; ++b) {
    for (int r = 0; r < kRows; ++r) {
      const uint8_t *w = W + b * kBlock + r * t2r4::kRowBytes;
      for (int j = 0; j < t2r4::kRowBytes; ++j) {
        for (int s = 0; s < 4; ++s) {
          const int c = t2r4::code(w[j], s);
          const int64_t k = b * kBlock + s * 64 + j;
          for (int t = 0; t < NT; ++t) acc[r][t] += c * X[t * ldx + k];
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < kRows; ++r) out[t * ldo + r] = acc[r][t];
}

template <int NT>
void tile_scalar(const uint8_t *W, int64_t Kpad, int64_t ngroups, const int8_t *X, int64_t ldx, int32_t *out,
                 int64_t ldo) {
  for (int64_t g = 0; g < ngroups; ++g) group_scalar<NT>(W + g * Kpad, Kpad, X, ldx, out + g * kRows, ldo);
}

}  // namespace

extern const TileSet kGemvScalar = {4, {tile_scalar<1>, tile_scalar<2>, tile_scalar<3>, tile_scalar<4>}};

}  // namespace ternary
