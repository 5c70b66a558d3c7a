"""1.6-bit packed ternary weights, format "T1R4" (`mulfree-t1`), and its references. The C++ definition is
`kernels/cpu/formats/t1.h`; docs/packed.md has the same layout.

Layout of a ternary matrix t [N, K] (t in {-1, 0, 1}), 1.6 bits per weight (five trits per byte, in base 3):
- codes c = t + 1 in {0, 1, 2}; K is padded to a multiple of 160 (Kpad), N to a multiple of 4, padding codes
  are 1 (weight 0);
- rows in groups of 4 ("R4", as T2R4): group g occupies bytes [g * Kpad*4/5, (g+1) * Kpad*4/5) of a uint8
  array of shape [ceil(N/4), Kpad*4/5];
- within a group, block b (weights 160b .. 160b+159 of each row) is 128 bytes: row r of the group owns bytes
  [b*128 + r*32, b*128 + r*32 + 32);
- byte i of that 32-byte run holds the codes of k = 160b + i + 32j, j = 0..4, as the base-3 number
  n = sum_j c_j * 3^(4-j) (c_0 the most significant digit) in fixed point: byte = ceil(256 * n / 243).

Decoding digit j: ((byte * 3^j mod 256) * 3) >> 8, i.e. m_0 = byte, c_j = (3 * m_j) >> 8,
m_(j+1) = 3 * m_j mod 256 (byte arithmetic, what the AVX2 kernel does on 32 bytes at once; rounding up keeps every
digit exact because 3^5 = 243 <= 256). Every byte decodes to five valid codes, so unpacking never fails; the 13
byte values the packer never writes decode like the others (the kernels agree with this reference on them).

Worked byte: row 0, block 0, byte i = 5 with t[0, 5] = -1, t[0, 37] = 0, t[0, 69] = +1, t[0, 101] = 0,
t[0, 133] = +1 -> codes 0, 1, 2, 1, 2 -> n = 0*81 + 1*27 + 2*9 + 1*3 + 2 = 50 -> byte = ceil(12800 / 243)
= 53 (0x35). Five zero weights (the padding) are n = 121 -> 0x80.

The kernels compute sum_k t * q exactly in int32; the float result is (sum_k t * q) * a_scale * w_scale with the
per-tensor scale the weight was trained with (stored beside the bytes, as for T2R4).
"""

from __future__ import annotations

import torch

from mulfree.ops.ternary import check_trits

FORMAT = "mulfree-t1"
FORMAT_VERSION = 1
BLOCK = 160  # weights per row per block
ROWS = 4  # rows interleaved per group
ROW_BYTES = 32  # bytes of one row of a block
TRITS = 5  # trits per byte
BITS_PER_WEIGHT = 1.6


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 160-weight blocks."""
    return -(-k // BLOCK) * BLOCK


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the uint8 array `pack_t1` returns for an [n, k] matrix."""
    return -(-n // ROWS), padded_k(k) * ROWS // TRITS


def encode_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., 5] in {0, 1, 2} (digit 0 first) -> bytes [...]: ceil(256 * n / 243), n = sum c_j 3^(4-j)."""
    n = torch.zeros(codes.shape[:-1], dtype=torch.int32)
    for j in range(TRITS):
        n = n * 3 + codes[..., j].to(torch.int32)
    return ((256 * n + 242) // 243).to(torch.uint8)


def decode_bytes(b: torch.Tensor) -> torch.Tensor:
    """Bytes [...] -> codes [..., 5] in {0, 1, 2}: c_j = (3 * m_j) >> 8, m_(j+1) = 3 * m_j mod 256, m_0 = byte."""
    m = b.to(torch.int32)
    codes = []
    for _ in range(TRITS):
        codes.append((3 * m) >> 8)
        m = (3 * m) & 255
    return torch.stack(codes, dim=-1).to(torch.uint8)


def pack_t1(t: torch.Tensor) -> torch.Tensor:
    """Pack trits t [N, K] (int8 in {-1, 0, 1}) into T1R4 bytes, uint8 [ceil(N/4), Kpad*4/5].

    Example: pack_t1(torch.tensor([[-1, 0, 1]], dtype=torch.int8)).shape == (1, 128).
    """
    check_trits(t, "pack_t1")
    n, k = t.shape
    g, nbytes = packed_shape(n, k)
    kpad = padded_k(k)
    codes = torch.ones(g * ROWS, kpad, dtype=torch.uint8)
    codes[:n, :k] = (t.to(torch.int16) + 1).to(torch.uint8)
    # [G, 4 rows, nb, 5 digits, 32 bytes] -> [G, nb, 4 rows, 32 bytes, 5 digits]
    c = codes.view(g, ROWS, kpad // BLOCK, TRITS, ROW_BYTES).permute(0, 2, 1, 4, 3)
    return encode_codes(c).reshape(g, nbytes).contiguous()


def unpack_t1(packed: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_t1`: T1R4 bytes -> trits int8 [N, K] for the given (N, K)."""
    n, k = int(shape[0]), int(shape[1])
    g, nbytes = packed_shape(n, k)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (g, nbytes):
        raise ValueError(f"packed tensor must be uint8 {(g, nbytes)} for shape {(n, k)}, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    kpad = padded_k(k)
    c = decode_bytes(packed.view(g, kpad // BLOCK, ROWS, ROW_BYTES))  # [G, nb, 4 rows, 32 bytes, 5 digits]
    codes = c.permute(0, 2, 1, 4, 3).reshape(g * ROWS, kpad)
    return (codes[:n, :k].to(torch.int8) - 1).contiguous()


def packed_matmul_ref(packed: torch.Tensor, n: int, q: torch.Tensor) -> torch.Tensor:
    """Reference of `ternary_matmul(..., fmt="mulfree-t1")`: exact int32 out[t, n] = sum_k trit[n, k] * q[t, k]
    (q int8 [T, K])."""
    k = q.shape[1]
    t = unpack_t1(packed, (n, padded_k(k)))[:, :k]
    return (q.to(torch.int64) @ t.to(torch.int64).T).to(torch.int32)
