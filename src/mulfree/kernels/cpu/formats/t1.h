// Packed ternary format T1R4 (`mulfree-t1`, written by ops/pack_t1.py::pack_t1): 1.6 bits per weight, five trits
// per byte in base 3 (the idea of llama.cpp's TQ1_0), rows interleaved by 4 as in T2R4 (formats/t2r4.h).
//
// A ternary matrix t [N, K] (t in {-1, 0, 1}) is stored as codes c = t + 1 in {0, 1, 2}; K is padded to a
// multiple of 160 (Kpad), N to a multiple of 4, padding codes are 1 (weight 0). Row group g is bytes
// [g * Kpad * 4 / 5, (g + 1) * Kpad * 4 / 5) of a uint8 [ceil(N / 4), Kpad * 4 / 5] array, Kpad / 160 `Block`s:
//
//   block b of group g: weights 160 b .. 160 b + 159 of the group's 4 rows, row r in bytes [32 r, 32 r + 32)
//   byte i of a row: the codes of k = 160 b + i + 32 j, j = 0 .. 4, as the base-3 number n = sum_j c_j 3^(4 - j)
//   (c_0 the most significant digit) stored in fixed point: byte = ceil(256 n / 243)
//
// Digit j is then ((byte * 3^j mod 256) * 3) >> 8: multiplying the fraction byte / 256 by 3 moves the next digit
// above the binary point. Rounding up adds less than 1/256 to n / 243, which 3^j scales to less than 3^j / 256 <=
// 3^-(5 - j) (as 243 <= 256), the gap below the next digit, so no digit is read one too high. Each step is byte
// arithmetic: m_0 = byte, c_j = (3 m_j) >> 8, m_(j+1) = 3 m_j mod 256. So one 32-byte row load expands into five
// vectors of 32 codes, vector j lined up with the 32 consecutive activations 160 b + 32 j ..: the AVX2 kernel
// reads c_j off m_j with two compares (thresholds 86 and 171) and steps m with two byte adds.
//
// Every byte decodes to five valid codes (the 13 values the packer never writes too), so the kernels and the
// reference agree on any input. The per-tensor scale the weight was trained with is stored beside the codes.
//
// Worked byte: row 0, block 0, byte i = 5 with t[0, 5] = -1, t[0, 37] = 0, t[0, 69] = +1, t[0, 101] = 0,
// t[0, 133] = +1 -> codes 0, 1, 2, 1, 2 -> n = 0*81 + 1*27 + 2*9 + 1*3 + 2 = 50 -> ceil(12800 / 243) = 53 = 0x35
// (checked below). Padding, five zero weights: n = 121 -> 0x80.
#pragma once
#include <cstdint>

namespace t1 {

constexpr int64_t kBlock = 160;  // weights per row per block
constexpr int kRows = 4;         // rows per row group
constexpr int kRowBytes = 32;    // one row of a block: 160 weights, 5 per byte
constexpr int kTrits = 5;        // trits per byte

// One block of a row group: rows[r][i] holds the codes of k = i + 32 j (j = 0 .. 4) of row r.
struct Block {
  uint8_t rows[kRows][kRowBytes];
};
static_assert(sizeof(Block) == 128, "a T1R4 block is 4 rows x 32 bytes");
// 8 bits per 5 weights: 1.6 bits per weight.
static_assert(8 * sizeof(Block) * 5 == 8 * kRows * kBlock, "T1R4 stores 1.6 bits per weight");
constexpr double kBitsPerWeight = 8.0 * sizeof(Block) / (kRows * kBlock);

// The code (trit + 1) of digit j (k = i + 32 j) of a block row's byte i.
constexpr int code(uint8_t byte, int j) {
  int m = byte;
  for (int s = 0; s < j; ++s) m = 3 * m & 255;
  return 3 * m >> 8;
}
// Byte i of a block row from the codes of k = i, i + 32, i + 64, i + 96, i + 128.
constexpr uint8_t pack_byte(int c0, int c1, int c2, int c3, int c4) {
  const int n = (((c0 * 3 + c1) * 3 + c2) * 3 + c3) * 3 + c4;
  return (uint8_t)((256 * n + 242) / 243);
}
static_assert(pack_byte(0, 1, 2, 1, 2) == 0x35 && code(0x35, 0) == 0 && code(0x35, 1) == 1 && code(0x35, 2) == 2 &&
                  code(0x35, 3) == 1 && code(0x35, 4) == 2,
              "the worked byte");
constexpr uint8_t kZeroByte = pack_byte(1, 1, 1, 1, 1);  // five zero weights (0x80): the padding
static_assert(kZeroByte == 0x80, "the padding byte");

// Every one of the 243 code quintuples survives pack_byte -> code.
constexpr bool all_round_trip() {
  for (int n = 0; n < 243; ++n) {
    const int c[kTrits] = {n / 81, n / 27 % 3, n / 9 % 3, n / 3 % 3, n % 3};
    const uint8_t b = pack_byte(c[0], c[1], c[2], c[3], c[4]);
    for (int j = 0; j < kTrits; ++j)
      if (code(b, j) != c[j]) return false;
  }
  return true;
}
static_assert(all_round_trip(), "base-3 fixed point round trip");

// Sum of the five trits (code - 1) of a byte: the per-row trit sums the AVX2 kernel needs (it multiplies trits by
// activations + 128).
constexpr int trit_sum(uint8_t byte) {
  int s = 0;
  for (int j = 0; j < kTrits; ++j) s += code(byte, j) - 1;
  return s;
}

// Kpad of a K-long row, the number of row groups of N rows, and the bytes of one row group.
constexpr int64_t padded_k(int64_t K) { return (K + kBlock - 1) / kBlock * kBlock; }
constexpr int64_t row_groups(int64_t N) { return (N + kRows - 1) / kRows; }
constexpr int64_t group_bytes(int64_t Kpad) { return Kpad / kBlock * (int64_t)sizeof(Block); }

}  // namespace t1
