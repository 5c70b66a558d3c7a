// Packed ternary format T2R4 (`mulfree-t2`, written by ops/pack.py::pack_ternary): 2.0 bits per weight.
//
// A ternary matrix t [N, K] (t in {-1, 0, 1}) is stored as codes c = t + 1 in {0, 1, 2}; K is padded to a
// multiple of 256 (Kpad), N to a multiple of 4, padding codes are 1 (weight 0). Rows go in groups of 4 ("R4":
// the 4 rows a SIMD loop works on are adjacent, so the weight stream is strictly sequential): row group g is
// bytes [g * Kpad, (g + 1) * Kpad) of a uint8 [ceil(N / 4), Kpad] array, Kpad / 256 `Block`s in a row:
//
//   block b of group g: weights 256 b .. 256 b + 255 of the group's 4 rows, row r in bytes [64 r, 64 r + 64)
//   byte j of a row: k = 256 b + j, + 64, + 128, + 192 in bit pairs 0-1, 2-3, 4-5, 6-7
//
// One 64-byte load and 4 shift/and steps give 4 vectors of 64 codes, each lined up with 64 consecutive int8
// activations, so vpdpbusd (u8 codes x s8 activations) needs no shuffles. The per-tensor scale the weight was
// trained with is stored beside the codes (`<name>.scale`), not in the blocks.
//
// Worked byte: row 0, block 0, byte j = 5 with t[0, 5] = -1, t[0, 69] = 0, t[0, 133] = +1, t[0, 197] = 0
// -> codes 0, 1, 2, 1 -> 0 | 1 << 2 | 2 << 4 | 1 << 6 = 0x64 (checked below).
//
// Kernels compute sum_k c * q exactly and subtract sum_k q, which gives sum_k t * q; the float output is
// (sum_k t * q) * a_scale[token] * w_scale.
#pragma once
#include <cstdint>

namespace t2r4 {

constexpr int64_t kBlock = 256;  // weights per row per block
constexpr int kRows = 4;         // rows per row group
constexpr int kRowBytes = 64;    // one row of a block: 256 weights, 4 per byte

// One block of a row group: rows[r][j] holds the codes of k = j + 64 s in bit pair s (s = 0 .. 3).
struct Block {
  uint8_t rows[kRows][kRowBytes];
};
static_assert(sizeof(Block) == 256, "a T2R4 block is 4 rows x 64 bytes");
constexpr int kBitsPerWeight = 8 * (int)sizeof(Block) / (kRows * (int)kBlock);
static_assert(kBitsPerWeight == 2, "T2R4 stores 2 bits per weight");

// The code (trit + 1) of weight k = 64 s + j of a block row, from the row's byte j.
constexpr int code(uint8_t byte, int s) { return (byte >> (2 * s)) & 3; }
// Byte j of a block row from the codes of k = j, j + 64, j + 128, j + 192.
constexpr uint8_t pack_byte(int c0, int c1, int c2, int c3) { return (uint8_t)(c0 | c1 << 2 | c2 << 4 | c3 << 6); }
static_assert(pack_byte(0, 1, 2, 1) == 0x64 && code(0x64, 0) == 0 && code(0x64, 2) == 2, "the worked byte");
constexpr uint8_t kZeroByte = pack_byte(1, 1, 1, 1);  // four zero weights (0x55): the padding

// Kpad of a K-long row, and the number of row groups of N rows.
constexpr int64_t padded_k(int64_t K) { return (K + kBlock - 1) / kBlock * kBlock; }
constexpr int64_t row_groups(int64_t N) { return (N + kRows - 1) / kRows; }

}  // namespace t2r4
