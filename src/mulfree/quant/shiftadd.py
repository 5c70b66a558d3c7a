"""ShiftAddLLM post-training reparameterization: BCQ bit planes with APoT scales, fitted column by
column inside the shared GPTQ solver so quantization errors are compensated with the Hessian.

`group` counts the weights that share one scale set (as in the paper): Accuracy mode (`acc`): every
input column gets its own scale set per `group` output rows, refitted by ALS on the column as GPTQ
has updated it. Latency mode (`lat`): 8 consecutive input columns × `group`/8 rows share one scale
set (fitted when the solver reaches the first of the 8; LLaMA setting 8 × 16), so the LUT kernel
can apply α to a table sum; each column then only re-picks its codes for the fixed α.
Optional mixed bits: per block, the most sensitive layers (paper criterion
‖IS‖_F · std(IS)², IS = W / diag(chol(H⁻¹))) get the higher width under an average-bit budget.
Optional incoherence processing (`incoherence`, see `ops/hadamard.py`) quantizes U W T⁻¹ instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mulfree.ops.bcq import bcq_assign, bcq_fit, bcq_fit_np, level_signs, pack_planes
from mulfree.ops.powers import apot_value
from mulfree.quant.base import QuantMethod
from mulfree.quant.gptq import Incoherence, act_order, gptq_solve, native_loop
from mulfree.quant.qlinear import ShiftAddLinear

MODES = {"acc": 1, "lat": 8}


def _row_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [N, m] in groups of `group` rows, flattened and padded: ([G, group*m], mask)."""
    n, m = x.shape
    pad = (-n) % group
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(-1, group * m)
    mask = (torch.arange(n + pad) < n).unsqueeze(1).expand(-1, m).reshape(-1, group * m)
    return xp, mask


class BCQColumnQuantizer:
    """Column quantizer for `gptq_solve` producing BCQ planes and APoT scales (acc or lat layout)."""

    def __init__(self, n: int, k: int, bits: int, group: int, mode: str, rounds: int, terms: int):
        self.n, self.k, self.bits, self.group, self.rounds, self.terms = n, k, bits, group, rounds, terms
        self.col_group = MODES[mode]
        self.planes = torch.zeros(bits, n, k, dtype=torch.bool)
        shape = (math.ceil(k / self.col_group), math.ceil(n / group), bits, terms)
        self.exps = torch.zeros(shape, dtype=torch.int8)
        self.signs = torch.zeros(shape, dtype=torch.int8)
        self.perm = torch.arange(k)
        self._alpha_rows: torch.Tensor | None = None  # [N, q], lat mode: scales of the current tile
        groups = math.ceil(n / group)
        self._col = np.zeros((groups, group))  # acc mode: one column in row groups, zero-padded
        self._valid = (np.arange(groups * group) < n).astype(np.float64).reshape(groups, group)
        self._native_fit = native_loop("bcq_fit_groups")  # the C++ column fit (None: numpy, as the reference)
        self._native_block = native_loop("gptq_columns_bcq") if self.col_group == 1 else None
        self._fit_idx = np.zeros((groups, group), dtype=np.int64)  # the C++ fit's level indices
        self._signs = level_signs(bits).numpy()  # [L, q] fp32 ±1 of each level index
        self._group_of_row = np.arange(n) // group

    def order(self, diag_h: torch.Tensor) -> torch.Tensor:
        """Acc: act order. Lat: whole 8-column tiles by summed diag(H), a narrow tail tile last."""
        if self.col_group == 1:
            self.perm = act_order(diag_h)
            return self.perm
        full = self.k // 8
        score = diag_h[: full * 8].view(full, 8).sum(-1)
        tiles = torch.argsort(score, descending=True)
        perm = (tiles.unsqueeze(1) * 8 + torch.arange(8)).flatten()
        self.perm = torch.cat([perm, torch.arange(full * 8, self.k)])
        return self.perm

    def _fit(self, x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit scales for columns x [N, m] of column tile `tile`: (α per row [N, q], codes [N, m, q])."""
        xg, mask = _row_groups(x, self.group)
        bits, alpha, exps, signs = bcq_fit(xg, self.bits, self.rounds, self.terms, mask)
        self.exps[tile], self.signs[tile] = exps, signs
        codes = bits.reshape(-1, x.shape[1], self.bits)[: self.n]
        return alpha.repeat_interleave(self.group, 0)[: self.n], codes

    def _fit_column(self, x: np.ndarray, orig: int) -> np.ndarray:
        """Acc mode: fit column `orig` (x fp32 [N]) with the C++ fit (`kernels/cpu/bcq_fit.cpp`), or in numpy
        (`bcq_fit_np`: `_fit` without the torch round trips, the same values) on the reference backend or
        without the extension; records codes and scales, returns the dequantized column [N]."""
        self._col.reshape(-1)[: self.n] = x
        if self._native_fit is not None:
            idx, exps, signs = self._fit_idx, self.exps[orig].numpy(), self.signs[orig].numpy()
            self._native_fit(self._col, self._valid, self.bits, self.rounds, self.terms, idx, exps, signs)
        else:
            idx, exps, signs = bcq_fit_np(self._col, self._valid, self.bits, self.rounds, self.terms)
            self.exps[orig], self.signs[orig] = torch.from_numpy(exps), torch.from_numpy(signs)
        sgn = self._signs[idx].reshape(-1, self.bits)[: self.n]  # [N, q] ±1
        self.planes.numpy()[:, :, orig] = sgn.T > 0
        alpha = apot_value(self.exps[orig], self.signs[orig]).numpy()[self._group_of_row]  # [N, q]
        return (sgn * alpha).sum(-1)

    def quantize_block(self, block: np.ndarray, hinv: np.ndarray, start: int, q: np.ndarray, err: np.ndarray) -> bool:
        """Acc mode: the whole lazy block in C++ (`_fit_column`'s fit and values); Lat mode has no native loop."""
        if self._native_block is None:
            return False
        orig = self.perm[start : start + block.shape[0]].numpy()
        self._native_block(block, hinv, q, err, orig, self.bits, self.rounds, self.terms, self.group,
                           self.planes.numpy().view(np.uint8), self.exps.numpy(), self.signs.numpy())
        return True

    def quantize_column(self, block: np.ndarray, i: int, col: int) -> np.ndarray:
        orig = int(self.perm[col])
        if self.col_group == 1:  # the fit's codes are already the nearest levels of the column
            return self._fit_column(block[i], orig)
        if orig % 8 == 0:
            width = min(8, self.k - orig)
            self._alpha_rows = self._fit(torch.from_numpy(block[i : i + width].T), orig // 8)[0]
        alpha = self._alpha_rows
        bits = bcq_assign(torch.from_numpy(block[i : i + 1].T), alpha)[:, 0]  # [N, q]
        self.planes[:, :, orig] = bits.T
        return ((bits.float() * 2 - 1) * alpha).sum(-1).numpy()


def sensitivity(w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01) -> float:
    """Paper's mixed-bit criterion C = ‖IS‖_F · std(IS)², IS = W / diag(chol(H⁻¹)) per column."""
    h = h.double() + percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.double)
    d = torch.diag(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)).float()
    imp = w.float() / d.unsqueeze(0)
    return float(imp.norm() * imp.std() ** 2)


class ShiftAdd(QuantMethod):
    """ShiftAddLLM as a walker method (GPTQ-compensated BCQ + APoT), `mode` acc or lat."""

    name = "shiftadd"
    needs_stats = True

    def __init__(
        self,
        bits: int,
        group: int = 128,
        mode: str = "acc",
        rounds: int = 10,
        terms: int = 3,
        blocksize: int = 128,
        percdamp: float = 0.01,
        mixed_bits: float | None = None,
        incoherence: str = "none",
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if blocksize % 8:
            raise ValueError(f"blocksize must be a multiple of 8 (whole LUT tiles), got {blocksize}")
        self.bits, self.group, self.mode, self.rounds, self.terms = bits, group, mode, rounds, terms
        self.blocksize, self.percdamp, self.mixed_bits = blocksize, percdamp, mixed_bits
        self.incoherence = Incoherence(incoherence, seed)

    @property
    def needs_block_stats(self) -> bool:
        return self.mixed_bits is not None  # sensitivities of every linear of the block

    def assign_bits(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, int]:
        """Bits per layer of one block: `bits` everywhere, or with `mixed_bits` = avg (e.g. 2.2)
        the most sensitive layers get bits+1 under that size-weighted average."""
        if self.mixed_bits is None:
            return {name: self.bits for name in layers}
        scores = {name: sensitivity(w, h, self.percdamp) for name, (w, h) in layers.items()}
        sizes = {name: w.numel() for name, (w, _) in layers.items()}
        return allocate_bits(scores, sizes, self.bits, self.bits + 1, self.mixed_bits)

    def resume_after(self, layers: int) -> None:
        self.incoherence.layers = layers  # the Hadamard signs are drawn by layer index

    def config(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group,
            "mode": self.mode,
            "rounds": self.rounds,
            "apot_terms": self.terms,
            "blocksize": self.blocksize,
            "percdamp": self.percdamp,
            "mixed_bits": self.mixed_bits,
            **self.incoherence.config(),
        }

    def quantize(
        self, w: torch.Tensor, h: torch.Tensor | None, bias: torch.Tensor | None, bits: int | None = None
    ) -> ShiftAddLinear:
        n, k = w.shape
        bits = bits or self.bits
        w, h, rin, rout = self.incoherence.rotate(w, h)
        cq_rows = self.group // MODES[self.mode]  # group = weights per scale set (lat: 8 columns x group/8 rows)
        group = n if self.group <= 0 else min(max(1, cq_rows), n)
        cq = BCQColumnQuantizer(n, k, bits, group, self.mode, self.rounds, self.terms)
        if h is None:  # no calibration: identity Hessian = plain BCQ column by column
            h = torch.eye(k)
        gptq_solve(w, h, cq, cq.order(torch.diag(h)), self.blocksize, self.percdamp)
        layer = ShiftAddLinear(k, n, bias is not None, bits, group, cq.col_group, self.terms)
        state = {"planes": pack_planes(cq.planes), "exps": cq.exps, "signs": cq.signs}
        if bias is not None:
            state["bias"] = bias
        layer.load_state_dict(state)
        layer.rht, layer.rht_out = rin, rout
        return layer


def allocate_bits(scores: dict[str, float], sizes: dict[str, int], low: int, high: int, avg: float) -> dict[str, int]:
    """Give `high` bits to the most sensitive layers while the size-weighted mean stays <= avg."""
    bits = {name: low for name in scores}
    total = sum(sizes.values())
    used = low * total
    for name in sorted(scores, key=scores.get, reverse=True):
        extra = (high - low) * sizes[name]
        if used + extra <= avg * total:
            bits[name] = high
            used += extra
    return bits
