"""GPTQ: one sequential error-compensation solver shared by every column quantizer, plus the uniform
(integer grid) quantizer that makes it the GPTQ baseline.

The solver walks the (optionally activation-ordered) columns of W [N, K] in lazy blocks, asks a
`ColumnQuantizer` for each quantized column and spreads the error over the remaining columns with
the upper Cholesky factor of H⁻¹ (Frantar et al. 2023). ShiftAdd reuses it with a BCQ quantizer,
and both methods share the optional randomized Hadamard incoherence step (`Incoherence`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mulfree.kernels import backend, cpu_module, kernel_threads, use_threads
from mulfree.ops.hadamard import RandomHadamard
from mulfree.quant.base import QuantMethod


class ColumnQuantizer(Protocol):
    """What the GPTQ solver needs from a quantizer."""

    def order(self, diag_h: torch.Tensor) -> torch.Tensor:
        """Column processing order (a permutation of range(K)) given diag(H)."""

    def quantize_column(self, block: np.ndarray, i: int, col: int) -> np.ndarray:
        """Quantize column i of the current lazy block, given transposed as fp32 `block` [B, N] (row i
        is the column, contiguous; absolute permuted position `col`); later rows of `block` are up to
        date and may be used to fit shared scales. Returns the dequantized column fp32 [N] and records
        the codes for original column `perm[col]`."""

    def quantize_block(self, block: np.ndarray, hinv: np.ndarray, start: int, q: np.ndarray, err: np.ndarray) -> bool:
        """Run the solver's column loop over a whole lazy block natively (`kernels/cpu/gptq_columns.cpp`): `block`
        [B, N] the columns start..start+B-1 of the order as rows, updated as the loop updates them, `hinv` [B, B]
        their rows of the inverse factor; fills q (dequantized) and err (scaled errors) [B, N] and records the
        codes. False when there is no native loop (the solver then calls `quantize_column` per column)."""


def native_loop(name: str):
    """The C++ column loop `name` of the extension, or None on the reference backend or without the extension."""
    mod = cpu_module()
    return getattr(mod, name) if mod is not None and backend() != "reference" else None


def act_order(diag_h: torch.Tensor) -> torch.Tensor:
    """GPTQ activation order: columns by diag(H) descending."""
    return torch.argsort(diag_h, descending=True)


@torch.no_grad()
def gptq_solve(
    w: torch.Tensor,
    h: torch.Tensor,
    quantizer: ColumnQuantizer,
    perm: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Quantize W [N, K] column by column in order `perm`, compensating errors with H [K, K].

    Returns the dequantized weight [N, K] in the original column order. The column loop is
    thousands of tiny ops, so it runs on a transposed copy of each lazy block (a column is a
    contiguous row): in C++ where the quantizer has a native loop (`quantize_block`), else in numpy
    (whose per-call cost is a fraction of torch's); all on one torch thread (the block update, a
    matmul, stays in torch); every value equals the plain torch loop's.
    """
    with use_threads(kernel_threads(), torch_ops=1):
        return _solve(w, h, quantizer, perm, blocksize, percdamp)


def _solve(w, h, quantizer, perm, blocksize, percdamp):
    hinv, dead = _inverse_factor(h, perm, percdamp)
    w = w.float()[:, perm]
    w[:, dead] = 0
    k = w.shape[1]
    qt = np.zeros((k, w.shape[0]), dtype=np.float32)  # [K, N]: dequantized columns as rows
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].T.contiguous().numpy()  # [B, N]
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2].numpy()
        if quantizer.quantize_block(w1, np.ascontiguousarray(hinv1), i1, qt[i1:i2], err1):
            w[:, i2:] -= torch.from_numpy(err1).T.contiguous() @ hinv[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            qcol = quantizer.quantize_column(w1, i, i1 + i)
            qt[i1 + i] = qcol
            err = (w1[i] - qcol) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * err
            err1[i] = err
        w[:, i2:] -= torch.from_numpy(err1).T.contiguous() @ hinv[i1:i2, i2:]
    return torch.from_numpy(qt).T[:, torch.argsort(perm)]


def _inverse_factor(h: torch.Tensor, perm: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened, permuted H⁻¹ as float32, the permuted dead-column mask).

    fp32 as in the GPTQ reference, and each step is freed as the next is made, so at most two [K, K] fp32
    matrices are alive (127 MB each for a 5632-wide H) and one once the column loop runs."""
    h = h.index_select(0, perm).index_select(1, perm).float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return upper.contiguous(), dead  # (cholesky returns the upper factor as a transposed view)


class UniformQuantizer:
    """Asymmetric min-max integer grid per (row, group of `group` input columns), `bits` bits.

    Group parameters are fixed from the original weight before compensation ("static groups"),
    so activation order and groups combine. Codes are uint8 [N, K]; W̃ = (code − zero) · scale.
    """

    def __init__(self, w: torch.Tensor, bits: int, group: int):
        n, k = w.shape
        self.bits, self.group = bits, group
        maxq = 2**bits - 1
        pad = (-k) % group
        wg = torch.nn.functional.pad(w.float(), (0, pad)).view(n, -1, group)
        if pad:  # padded entries must not widen the last group's range
            valid = (torch.arange(k + pad) < k).view(1, -1, group)
            lo = torch.where(valid, wg, torch.inf).amin(-1).clamp(max=0)
            hi = torch.where(valid, wg, -torch.inf).amax(-1).clamp(min=0)
        else:
            lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.scale = scale  # [N, G]
        self.zero = torch.round(-lo / scale)  # [N, G]
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.perm = torch.arange(k)
        self._scale_t = self.scale.T.contiguous().numpy()  # [G, N]: one group's scales contiguous
        self._zero_t = self.zero.T.contiguous().numpy()
        self._native = native_loop("gptq_columns_uniform")

    def order(self, diag_h: torch.Tensor) -> torch.Tensor:
        self.perm = act_order(diag_h)
        return self.perm

    def quantize_column(self, block: np.ndarray, i: int, col: int) -> np.ndarray:
        orig = int(self.perm[col])
        g = orig // self.group
        s, z = self._scale_t[g], self._zero_t[g]
        code = np.clip(np.rint(block[i] / s) + z, 0, 2**self.bits - 1)
        self.codes.numpy()[:, orig] = code
        return (code - z) * s

    def quantize_block(self, block: np.ndarray, hinv: np.ndarray, start: int, q: np.ndarray, err: np.ndarray) -> bool:
        if self._native is None:
            return False
        orig = self.perm[start : start + block.shape[0]].numpy()
        self._native(block, hinv, q, err, orig, self._scale_t, self._zero_t, self.group, 2**self.bits - 1,
                     self.codes.numpy())
        return True

    def quantize_all(self, w: torch.Tensor) -> torch.Tensor:
        """Round every column to nearest at once (RTN); returns the dequantized weight."""
        s = self.scale.repeat_interleave(self.group, 1)[:, : w.shape[1]]
        z = self.zero.repeat_interleave(self.group, 1)[:, : w.shape[1]]
        code = torch.clamp(torch.round(w.float() / s) + z, 0, 2**self.bits - 1)
        self.codes = code.to(torch.uint8)
        return (code - z) * s

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to store: codes uint8 [N, K], scale and zero fp32 [N, ceil(K/group)]."""
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}


INCOHERENCE = {"none": (False, False), "hadamard": (True, False), "hadamard-out": (False, True),
               "hadamard-io": (True, True)}  # name -> (input side, output side)


class Incoherence:
    """Optional randomized Hadamard incoherence processing shared by the Hessian-based methods:
    `hadamard` rotates the input side, `hadamard-out` the output side, `hadamard-io` both. Layer i
    (in quantization order) draws its signs from seed + 2i (input) and seed + 2i + 1 (output); `layers` is the
    number of layers rotated so far (its methods' `resume_after` sets it)."""

    def __init__(self, kind: str = "none", seed: int = 0):
        if kind not in INCOHERENCE:
            raise ValueError(f"incoherence must be one of {sorted(INCOHERENCE)}, got {kind!r}")
        self.kind, self.seed, self.layers = kind, seed, 0

    def config(self) -> dict:
        return {"incoherence": self.kind, "incoherence_seed": self.seed}

    def rotate(self, w: torch.Tensor, h: torch.Tensor | None) -> tuple:
        """(W'', H', input transform | None, output transform | None) for the next layer:
        W'' = U W T⁻¹ and H' = T H Tᵀ for the enabled sides."""
        side_in, side_out = INCOHERENCE[self.kind]
        base = self.seed + 2 * self.layers
        self.layers += 1
        rin = RandomHadamard(w.shape[1], base) if side_in else None
        rout = RandomHadamard(w.shape[0], base + 1) if side_out else None
        w = w.float()
        if rin is not None:
            w = rin.rotate_weight(w)
            h = None if h is None else rin.rotate_hessian(h).float()
        if rout is not None:
            w = rout.rotate_output_weight(w)
        return w, h, rin, rout


class GPTQ(QuantMethod):
    """The GPTQ baseline as a walker method: uniform grid, activation order, error compensation."""

    name = "gptq"
    needs_stats = True

    def __init__(
        self, bits: int, group: int = 128, blocksize: int = 128, percdamp: float = 0.01, incoherence: str = "none",
        seed: int = 0,
    ):
        self.bits, self.group, self.blocksize, self.percdamp = bits, group, blocksize, percdamp
        self.incoherence = Incoherence(incoherence, seed)

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group, "blocksize": self.blocksize, "percdamp": self.percdamp,
                **self.incoherence.config()}

    def resume_after(self, layers: int) -> None:
        self.incoherence.layers = layers  # the Hadamard signs are drawn by layer index

    def quantize(self, w: torch.Tensor, h: torch.Tensor | None, bias: torch.Tensor | None, bits: int | None = None):
        from mulfree.quant.qlinear import UniformLinear

        n, k = w.shape
        bits = bits or self.bits
        w, h, rin, rout = self.incoherence.rotate(w, h)
        group = k if self.group <= 0 else min(self.group, k)
        uq = UniformQuantizer(w, bits, group)
        gptq_solve(w, h, uq, uq.order(torch.diag(h)), self.blocksize, self.percdamp)
        layer = UniformLinear(k, n, bias is not None, bits, group)
        layer.load_state_dict({**uq.state(), **({"bias": bias} if bias is not None else {})})
        layer.rht, layer.rht_out = rin, rout
        return layer
