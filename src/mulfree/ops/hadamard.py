"""Randomized Hadamard incoherence processing that stays multiplication-free (QuIP#-style).

A linear y = W x is rewritten as y = W' x' with x' = T x, T = 2^s · H_b · D and W' = W T⁻¹:
D is a random ±1 diagonal (sign flips), H_b the block-diagonal Walsh–Hadamard matrix with blocks of
b = the largest power of two dividing the input width (576 → 64, 1536 → 512), and s = -⌊log2 b / 2⌋.
Since H_b H_b = b·I, T⁻¹ = D H_b 2^(-log2 b - s). The online side (sign flips, the butterfly
`fwht` of adds and subtracts, and a power-of-two scale) needs no multiplication; quantizing W'
against the rotated Hessian T H Tᵀ spreads outlier columns over whole blocks.
"""

from __future__ import annotations

import math

import torch


def hadamard_block(n: int) -> int:
    """Largest power of two dividing n (the Hadamard block size used for width n)."""
    if n < 1:
        raise ValueError(f"width must be positive, got {n}")
    return n & -n


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalized block-diagonal Walsh–Hadamard transform along the last dim (adds only):
    x [..., n] -> x H_b with H_b = diag(H, …, H), H the Sylvester Hadamard of size `block` (n % block == 0)."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"block {block} must be a power of two dividing the width {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)  # (rows, blocks, pairs, 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], y.shape[1], block)
        h *= 2
    return y.reshape(*lead, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The ±1 diagonal D [n] (fp32) drawn from `seed` with a CPU generator (reproducible on reload)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


class RandomHadamard:
    """The input transform T = 2^s · H_b · D of one linear (width `dim`, signs from `seed`)."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed = dim, seed
        self.block = hadamard_block(dim)
        log2b = int(math.log2(self.block))
        self.shift_in = -(log2b // 2)  # online scale 2^s
        self.shift_w = -log2b - self.shift_in  # weight-side scale of T⁻¹
        self.negative = random_signs(dim, seed) < 0

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = T x along the last dim: sign flips, butterflies, one exponent shift."""
        x = torch.where(self.negative, -x, x)
        return torch.ldexp(fwht(x, self.block), torch.tensor(float(self.shift_in), dtype=x.dtype))

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W T⁻¹ = W D H_b 2^(-log2 b - s) for W [N, dim]."""
        w = torch.where(self.negative, -w, w)
        return torch.ldexp(fwht(w, self.block), torch.tensor(float(self.shift_w), dtype=w.dtype))

    def rotate_output_weight(self, w: torch.Tensor) -> torch.Tensor:
        """U W for W [dim, K] (this transform applied to the output side, i.e. to the rows' mix)."""
        return self.apply_input(w.T).T.contiguous()

    def invert_output(self, y: torch.Tensor) -> torch.Tensor:
        """y = U⁻¹ y'' along the last dim: y'' H_b D · 2^(-log2 b - s) (butterflies, sign flips, one shift)."""
        return self._butterflies_then_signs(y, self.shift_w)

    def fold_input(self, w: torch.Tensor) -> torch.Tensor:
        """W T for W [N, dim]: a weight that takes x itself where W takes T x (rows · H_b D · 2^s)."""
        return self._butterflies_then_signs(w, self.shift_in)

    def _butterflies_then_signs(self, y: torch.Tensor, shift: int) -> torch.Tensor:
        y = fwht(y, self.block)
        y = torch.where(self.negative, -y, y)
        return torch.ldexp(y, torch.tensor(float(shift), dtype=y.dtype))

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """H' = T H Tᵀ for H = E[x xᵀ] [dim, dim], in float64."""
        h = h.double()
        return self.apply_input(self.apply_input(h).T).T.contiguous()

    def meta(self) -> dict:
        """What `describe` stores so the transform can be rebuilt on load."""
        return {"transform": "hadamard", "block": self.block, "seed": self.seed}
