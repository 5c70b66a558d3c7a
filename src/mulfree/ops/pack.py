"""2-bit packed ternary weights, format "T2R4" (the layout the CPU kernels read), and its references.

Layout of a ternary matrix t [N, K] (t in {-1, 0, 1}), 2.0 bits per weight:
- codes c = t + 1 in {0, 1, 2}; K is padded to a multiple of 256 (Kpad), N to a multiple of 4,
  padding codes are 1 (weight 0);
- rows are taken in groups of 4 ("R4": the 4 rows a SIMD loop works on are adjacent in memory, so the
  weight stream is strictly sequential); group g occupies bytes [g*Kpad, (g+1)*Kpad) of a uint8 array
  of shape [ceil(N/4), Kpad];
- within a group, block b (weights 256b .. 256b+255 of each row) is 256 bytes: row r of the group
  owns bytes [b*256 + r*64, b*256 + r*64 + 64);
- byte j of that 64-byte run holds k = 256b + j, +64, +128, +192 in bit pairs 0-1, 2-3, 4-5, 6-7.
  One 64-byte load + 4 shift/and steps give 4 vectors of 64 codes, each lined up with 64
  consecutive activations, so `vpdpbusd` (u8 codes x s8 activations) needs no shuffles.

Worked byte: row 0, block 0, byte j = 5 with t[0, 5] = -1, t[0, 69] = 0, t[0, 133] = +1,
t[0, 197] = 0 -> codes 0, 1, 2, 1 -> byte = 0 | 1 << 2 | 2 << 4 | 1 << 6 = 0x64 (100).

The kernels compute sum_k c*q exactly and subtract sum_k q, which gives sum_k t*q; the float
result is (sum_k t*q) * a_scale * w_scale, with w_scale the per-tensor scale the weight was trained
with (stored beside the trits: never recomputed from trits, see `ternarize`).

The 1.6-bit format "T1R4" (`mulfree-t1`) lives in `mulfree.ops.pack_t1`; `FORMATS` / `packed_format` bind each
format's name to its layout functions and matmul reference, so callers and tests take either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mulfree.ops import pack_t1
from mulfree.ops.ternary import check_trits, weight_quant

FORMAT = "mulfree-t2"
FORMAT_VERSION = 1
BLOCK = 256  # weights per row per block
ROWS = 4  # rows interleaved per group


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 256-weight blocks."""
    return -(-k // BLOCK) * BLOCK


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of the uint8 array `pack_ternary` returns for an [n, k] matrix."""
    return -(-n // ROWS), padded_k(k)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack trits t [N, K] (int8 in {-1, 0, 1}) into T2R4 bytes, uint8 [ceil(N/4), Kpad].

    Example: pack_ternary(torch.tensor([[-1, 0, 1]], dtype=torch.int8)).shape == (1, 256).
    """
    check_trits(t, "pack_ternary")
    n, k = t.shape
    g, kpad = packed_shape(n, k)
    codes = torch.ones(g * ROWS, kpad, dtype=torch.uint8)
    codes[:n, :k] = (t.to(torch.int16) + 1).to(torch.uint8)
    # [G, 4 rows, nb, 4 shifts, 64 bytes] -> [G, nb, 4 rows, 64 bytes, 4 shifts]
    c = codes.view(g, ROWS, kpad // BLOCK, 4, 64).permute(0, 2, 1, 4, 3)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return packed.reshape(g, kpad).contiguous()


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_ternary`: T2R4 bytes -> trits int8 [N, K] for the given (N, K)."""
    n, k = int(shape[0]), int(shape[1])
    g, kpad = packed_shape(n, k)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (g, kpad):
        raise ValueError(f"packed tensor must be uint8 {(g, kpad)} for shape {(n, k)}, got {packed.dtype} {tuple(packed.shape)}")
    p = packed.view(g, kpad // BLOCK, ROWS, 64)
    c = torch.stack([(p >> (2 * s)) & 3 for s in range(4)], dim=-1)  # [G, nb, 4 rows, 64, 4 shifts]
    if (c == 3).any():
        raise ValueError("packed tensor holds code 3, which is not a ternary value")
    codes = c.permute(0, 2, 1, 4, 3).reshape(g * ROWS, kpad)
    return (codes[:n, :k].to(torch.int8) - 1).contiguous()


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Trits and scale of a weight: (t int8 [N, K], scale) with W̃ = scale * t.

    A latent weight goes through `weight_quant` (absmean). A weight that is already ternary
    (values in {-a, 0, a}) keeps its own a: absmean of trits would shrink the scale.
    """
    w = w.detach().float()
    mags = torch.unique(w.abs())
    nonzero = mags[mags > 0]
    if nonzero.numel() <= 1 and w.numel() > 1:
        scale = float(nonzero[0]) if nonzero.numel() else 1.0
        return torch.sign(w).to(torch.int8), scale
    t, s = weight_quant(w)
    return t, float(s)


def packed_matmul_ref(packed: torch.Tensor, n: int, q: torch.Tensor) -> torch.Tensor:
    """Reference of `ternary_matmul`: exact int32 out[t, n] = sum_k trit[n, k] * q[t, k] (q int8 [T, K])."""
    k = q.shape[1]
    t = unpack_ternary(packed, (n, padded_k(k)))[:, :k]
    return (q.to(torch.int64) @ t.to(torch.int64).T).to(torch.int32)


@dataclass(frozen=True)
class PackedFormat:
    """One packed weight format (ggml's type traits): names, version, bits per weight, the layout functions and
    the reference of `ternary_matmul` on it."""

    name: str  # as recorded in a packed dir's config.json
    short: str  # as `mulfree pack --format` and the C++ kernels name it
    version: int
    bits_per_weight: float
    pack: Callable[[torch.Tensor], torch.Tensor]  # trits int8 [N, K] -> uint8 packed_shape(N, K)
    unpack: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]  # (packed, (N, K)) -> trits int8 [N, K]
    packed_shape: Callable[[int, int], tuple[int, int]]
    padded_k: Callable[[int], int]  # the activation row length the kernels read
    matmul_ref: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]  # (packed, N, q [T, K]) -> int32 [T, N]


FORMATS: dict[str, PackedFormat] = {f.name: f for f in (
    PackedFormat(FORMAT, "t2", FORMAT_VERSION, 2.0, pack_ternary, unpack_ternary, packed_shape, padded_k,
                 packed_matmul_ref),
    PackedFormat(pack_t1.FORMAT, "t1", pack_t1.FORMAT_VERSION, pack_t1.BITS_PER_WEIGHT, pack_t1.pack_t1,
                 pack_t1.unpack_t1, pack_t1.packed_shape, pack_t1.padded_k, pack_t1.packed_matmul_ref),
)}
SHORT_NAMES = {"t2": FORMAT, "t1": pack_t1.FORMAT, "t1.6": pack_t1.FORMAT}


def packed_format(name: str) -> PackedFormat:
    """The format called `name`: its full name (`mulfree-t2`, `mulfree-t1`) or a short one (`t2`, `t1`, `t1.6`).

    Example: packed_format("t1").packed_shape(5, 300) == (2, 256)."""
    fmt = FORMATS.get(SHORT_NAMES.get(name, name)) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown packed format {name!r}; use one of {', '.join(sorted(SHORT_NAMES))} "
                         f"({', '.join(FORMATS)})")
    return fmt
