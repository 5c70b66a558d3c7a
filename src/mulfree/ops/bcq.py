"""Binary-coding quantization (BCQ) with APoT scales, its storage format and the LUT-GEMV reference.

A weight W [N, K] (out N, in K) is W = Σ_{i<q} α_i ∘ b_i with bit planes b_i ∈ {±1}^{N×K} and
scales α_i shared by a tile of `g` rows × `cg` columns (cg=1: Accuracy mode, one scale set per
column and row group; cg=8: Latency mode, one scale set per 8 columns so it can be applied to
a lookup-table sum). Every α is an APoT value Σ_t sign_t 2^exp_t (see `ops/powers.py`).

Storage (what `mulfree quantize shiftadd` writes):
  planes uint8 [q, N, ceil(K/8)]: bit s (LSB first) of byte c in row n of plane i is 1 iff
         b_i[n, 8c+s] = +1; padding bits beyond K are 0 (they meet zero-padded activations).
         Example: b_i[n, 0:8] = (+1,-1,-1,-1,-1,-1,-1,+1) -> byte 0b10000001 = 129.
  exps, signs int8 [ceil(K/cg), ceil(N/g), q, T]: the T APoT terms of α_i for column tile
         k // cg and row group n // g.

The LUT GEMV (Latency mode) computes y = W x as: per 8 activations a 256-entry table of all
±x sums (built with adds only), one lookup per (row, plane, 8 columns) keyed by the plane byte,
then the lookup is scaled by α_i with exponent shifts and added.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch

from mulfree.ops.powers import EXP_MAX, EXP_MIN, apot_value, shift_scale


@lru_cache(maxsize=8)
def level_signs(q: int) -> torch.Tensor:
    """All 2^q sign patterns [2^q, q] in {-1, +1}."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=q)))


def _nearest_codes(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Codes in {-1., +1.} [G, m, q] of the level Σ ±α_i nearest to each weight of w [G, m]."""
    combos = level_signs(alpha.shape[-1])  # [L, q]
    levels = alpha @ combos.T  # [G, L]
    return combos[(w.unsqueeze(-1) - levels.unsqueeze(1)).abs_().argmin(-1)]


def bcq_assign(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Nearest BCQ code for each weight given fixed scales: w [G, m], alpha [G, q] -> bits bool [G, m, q]."""
    return _nearest_codes(w, alpha) > 0


def bcq_fit(
    w: torch.Tensor, bits: int, rounds: int = 10, terms: int = 3, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit q-bit BCQ with APoT scales to each row of w [G, m] (one group per row), all groups at once.
    `mask` [G, m] (bool) marks valid entries when groups are padded to a common length.

    Greedy init (b_i = sign(r), α_i = mean|r|), then `rounds` × {least-squares refit of α on the
    current codes; sort |α| descending; APoT-round α; reassign codes to the nearest of the 2^q
    levels}; each group keeps the iterate with the lowest squared error, so more rounds never
    hurt. With rounds=0 the greedy α is still APoT-rounded and the codes reassigned, so the result
    is always exactly Σ α_i b_i with APoT α. Runs in float64 numpy (`bcq_fit_np`).

    Returns (bits bool [G, m, q], alpha fp32 [G, q] (APoT values), exps int8 [G, q, T], signs int8 [G, q, T]).
    """
    wn = w.detach().double().numpy()
    vf = np.ones(wn.shape) if mask is None else mask.numpy().astype(np.float64)
    idx, exps, signs = bcq_fit_np(wn * vf, vf, bits, rounds, terms)
    exps_t, signs_t = torch.from_numpy(exps).to(torch.int8), torch.from_numpy(signs).to(torch.int8)
    return torch.from_numpy(level_signs(bits).numpy()[idx] > 0), apot_value(exps_t, signs_t), exps_t, signs_t


def bcq_fit_np(
    wn: np.ndarray, vf: np.ndarray, bits: int, rounds: int, terms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`bcq_fit` on float64 arrays: masked weights wn [G, m] (zero where vf is 0), validity vf [G, m]
    (1. or 0.) -> (level index [G, m] (bit q-1-i set iff b_i = +1), exps [G, q, T], signs [G, q, T]).

    The Accuracy-mode solver calls it once per column on a few hundred weights, where the cost is
    the number of numpy calls per round (torch's per-op overhead is larger still): the loop keeps
    only the APoT values and the winning iterate's sorted |α|, whose terms are derived once at the end.
    """
    G, m = wn.shape
    combos, combos_t, outer, ridge, flat = _fit_constants(G, m, bits)
    L = combos.shape[0]
    r = wn.copy()
    alpha = np.empty((G, bits))
    idx = np.zeros((G, m), dtype=np.int64)
    for i in range(bits):  # greedy init; code index bit (q-1-i) is 1 where b_i = +1
        pos = r >= 0
        alpha[:, i] = (np.abs(r) * vf).sum(-1) / np.maximum(vf.sum(-1), 1.0)
        r -= alpha[:, i : i + 1] * np.where(pos, 1.0, -1.0)
        idx |= pos.astype(np.int64) << (bits - 1 - i)
    w2 = (wn * wn).sum(-1)
    wl = wn[..., None]  # [G, m, 1]
    vflat = vf.ravel()
    wflat = wn.ravel()

    def level_stats(idx):  # per (group, level): number of valid weights and their sum
        keys = (flat + idx).ravel()
        return np.bincount(keys, vflat, G * L).reshape(G, L), np.bincount(keys, wflat, G * L).reshape(G, L)

    counts, sums = level_stats(idx)
    best_err = np.full(G, np.inf)
    best_idx, best_alpha = np.empty((G, m), dtype=np.int64), np.empty((G, bits))
    with np.errstate(divide="ignore"):
        for _ in range(max(rounds, 1)):
            if rounds > 0:  # normal equations BᵀB α = Bᵀw from the level statistics
                sol = np.linalg.solve((counts @ outer).reshape(G, bits, bits) + ridge, (sums @ combos)[..., None])
                sol = sol[..., 0]
                alpha = np.where(np.isfinite(sol), sol, alpha)
            raw = -np.sort(-np.abs(alpha), axis=-1)
            alpha = _apot_value_np(raw, terms)  # the fallback of the next solve, as the APoT value
            levels = alpha @ combos_t  # [G, L]
            prev, idx = idx, np.abs(wl - levels[:, None, :]).argmin(-1)
            counts, sums = level_stats(idx)
            err = w2 - 2 * (levels * sums).sum(-1) + (levels * levels * counts).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            np.copyto(best_idx, idx, where=better[:, None])
            np.copyto(best_alpha, raw, where=better[:, None])
            if np.array_equal(idx, prev):  # fixed point: every further round would repeat this one
                break
    _, exps, signs = _apot_round_np(best_alpha, terms)
    return best_idx, exps, signs


@lru_cache(maxsize=16)
def _fit_constants(G: int, m: int, bits: int) -> tuple[np.ndarray, ...]:
    """Read-only arrays of `bcq_fit_np` for G groups of m weights: level signs [L, q] and their
    transpose, sign products [L, q*q], the normal equations' ridge [q, q], group offsets [G, 1]."""
    combos = level_signs(bits).double().numpy()  # [L, q], row L = sign pattern of level index L
    L = combos.shape[0]
    outer = (combos[:, :, None] * combos[:, None, :]).reshape(L, -1)
    return combos, np.ascontiguousarray(combos.T), outer, 1e-6 * m * np.eye(bits), np.arange(G)[:, None] * L


def _apot_value_np(alpha: np.ndarray, terms: int) -> np.ndarray:
    """The value of `_apot_round_np` alone (same operations, no terms kept); call under errstate(divide)."""
    r, value = alpha, 0.0
    for t in range(terms):
        term = np.sign(r) * np.exp2(np.minimum(np.maximum(np.rint(np.log2(np.abs(r))), EXP_MIN), EXP_MAX))
        value = value + term
        if t + 1 < terms:
            r = r - term
    return value


def _apot_round_np(alpha: np.ndarray, terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`ops.powers.apot_round` in float64 numpy (same greedy rule, exponents clamped alike)."""
    r = alpha.copy()
    value = np.zeros_like(r)
    exps, signs = np.empty(r.shape + (terms,)), np.empty(r.shape + (terms,))
    with np.errstate(divide="ignore"):
        for t in range(terms):
            e = np.minimum(np.maximum(np.rint(np.log2(np.abs(r))), EXP_MIN), EXP_MAX)
            s = np.sign(r)
            term = s * np.exp2(e)  # exact: a signed power of two
            value += term
            r -= term
            exps[..., t] = np.where(s == 0, 0.0, e)
            signs[..., t] = s
    return value, exps, signs


def pack_planes(bits: torch.Tensor) -> torch.Tensor:
    """Pack bool planes [q, N, K] (True = +1) into uint8 [q, N, ceil(K/8)], LSB = lowest column."""
    q, n, k = bits.shape
    pad = (-k) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(q, n, -1, 8)
    weights = torch.tensor([1 << s for s in range(8)], dtype=torch.uint8)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_planes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_planes`: uint8 [q, N, ceil(K/8)] -> bool [q, N, K]."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :k].bool()


def bcq_scales(exps: torch.Tensor, signs: torch.Tensor, n: int, k: int, group: int, col_group: int) -> torch.Tensor:
    """Per-weight scales [q, N, K] from stored APoT terms [ceil(K/cg), ceil(N/g), q, T]."""
    alpha = apot_value(exps, signs)  # [Ck, Gn, q]
    alpha = alpha.repeat_interleave(col_group, 0)[:k].repeat_interleave(group, 1)[:, :n]  # [K, N, q]
    return alpha.permute(2, 1, 0)


def bcq_dequantize(
    planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor, n: int, k: int, group: int, col_group: int
) -> torch.Tensor:
    """Dense fp32 W [N, K] = Σ_i α_i ∘ b_i from the stored format."""
    b = unpack_planes(planes, k).float() * 2 - 1
    return (bcq_scales(exps, signs, n, k, group, col_group) * b).sum(0)


def lut_tables(x: torch.Tensor) -> torch.Tensor:
    """Per 8 activations, the 256 signed sums: x [K] -> LUT [ceil(K/8), 256] with
    LUT[c, key] = Σ_s (bit s of key ? +x[8c+s] : -x[8c+s]); built with adds only (table doubling)."""
    x = torch.nn.functional.pad(x.float().flatten(), (0, (-x.numel()) % 8)).view(-1, 8)
    table = -x.sum(-1, keepdim=True)  # key 0: all -1
    for s in range(8):
        table = torch.cat([table, table + (x[:, s : s + 1] + x[:, s : s + 1])], dim=-1)
    return table


def bcq_lut_gemv(
    x: torch.Tensor, planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor, n: int, group: int
) -> torch.Tensor:
    """Reference LUT GEMV for Latency-mode weights (col_group 8): y [N] = W x, x [K].

    One table lookup per (plane, row, 8 columns), scaled by α with exponent shifts (`shift_scale`).
    """
    lut = lut_tables(x)  # [C, 256]
    c = lut.shape[0]
    vals = lut[torch.arange(c), planes[..., :c].long()]  # [q, N, C]
    rows = torch.arange(n) // group
    e = exps[:, rows].permute(2, 1, 0, 3)  # [q, N, C, T]
    s = signs[:, rows].permute(2, 1, 0, 3)
    return shift_scale(vals, e, s).sum((0, 2))
