"""The numpy and C++ column loops of the GPTQ solver and the ShiftAdd Accuracy-mode fit against the torch
loops they replaced (kept below as references, copied from the implementation before the rewrite), and
against each other: equal codes, scales and dequantized weights, bit for bit, on small awkward layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mulfree.kernels import backend, cpu_module, kernel_threads, use_threads
from mulfree.ops.bcq import bcq_fit, bcq_fit_np, level_signs
from mulfree.ops.powers import EXP_MAX, EXP_MIN, apot_value
from mulfree.quant.base import HessianStats
from mulfree.quant.gptq import UniformQuantizer, gptq_solve
from mulfree.quant.shiftadd import BCQColumnQuantizer, _row_groups


def _bcq_fit_ref(w, bits, rounds=10, terms=3, mask=None):
    """`bcq_fit` before the rewrite: APoT terms of every round kept, torch-shaped outputs."""
    wn = w.detach().double().numpy()
    vf = np.ones(wn.shape) if mask is None else mask.numpy().astype(np.float64)
    wn = wn * vf
    G, m = wn.shape
    combos = level_signs(bits).double().numpy()
    L = combos.shape[0]
    r = wn.copy()
    alpha = np.empty((G, bits))
    idx = np.zeros((G, m), dtype=np.int64)
    for i in range(bits):
        pos = r >= 0
        alpha[:, i] = (np.abs(r) * vf).sum(-1) / np.maximum(vf.sum(-1), 1.0)
        r -= alpha[:, i : i + 1] * np.where(pos, 1.0, -1.0)
        idx |= pos.astype(np.int64) << (bits - 1 - i)
    outer = (combos[:, :, None] * combos[:, None, :]).reshape(L, -1)
    ridge = 1e-6 * m * np.eye(bits)
    flat = np.arange(G)[:, None] * L
    w2 = (wn * wn).sum(-1)

    def level_stats(idx):
        keys = (flat + idx).ravel()
        return (np.bincount(keys, vf.ravel(), G * L).reshape(G, L), np.bincount(keys, wn.ravel(), G * L).reshape(G, L))

    counts, sums = level_stats(idx)
    best_err = np.full(G, np.inf)
    best = (np.empty((G, m), dtype=np.int64), np.empty((G, bits, terms)), np.empty((G, bits, terms)))
    for _ in range(max(rounds, 1)):
        if rounds > 0:
            sol = np.linalg.solve((counts @ outer).reshape(G, bits, bits) + ridge, (sums @ combos)[..., None])[..., 0]
            alpha = np.where(np.isfinite(sol), sol, alpha)
        alpha = -np.sort(-np.abs(alpha), axis=-1)
        alpha, exps, signs = _apot_round_ref(alpha, terms)
        levels = alpha @ combos.T
        prev, idx = idx, np.abs(wn[..., None] - levels[:, None, :]).argmin(-1)
        counts, sums = level_stats(idx)
        err = w2 - 2 * (levels * sums).sum(-1) + (levels * levels * counts).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        for kept, new in zip(best, (idx, exps, signs)):
            kept[better] = new[better]
        if np.array_equal(idx, prev):
            break
    idx, exps, signs = best
    exps_t, signs_t = torch.from_numpy(exps).to(torch.int8), torch.from_numpy(signs).to(torch.int8)
    return torch.from_numpy(combos[idx] > 0), apot_value(exps_t, signs_t), exps_t, signs_t


def _apot_round_ref(alpha, terms):
    r = alpha.copy()
    value = np.zeros_like(r)
    exps, signs = np.empty(r.shape + (terms,)), np.empty(r.shape + (terms,))
    with np.errstate(divide="ignore"):
        for t in range(terms):
            e = np.minimum(np.maximum(np.rint(np.log2(np.abs(r))), EXP_MIN), EXP_MAX)
            s = np.sign(r)
            term = s * np.exp2(e)
            value += term
            r -= term
            exps[..., t] = np.where(s == 0, 0.0, e)
            signs[..., t] = s
    return value, exps, signs


def _solve_ref(w, h, quantizer, perm, blocksize, percdamp=0.01):
    """`gptq._solve` before the rewrite: the torch column loop on [N, B] lazy blocks, on one torch thread as the
    solver runs (the lazy-block update's matmul rounds differently with more threads)."""
    with use_threads(kernel_threads(), torch_ops=1):
        return _solve_ref_loop(w, h, quantizer, perm, blocksize, percdamp)


def _solve_ref_loop(w, h, quantizer, perm, blocksize, percdamp):
    w = w.float().clone()
    h = h.float().clone()  # fp32, as the solver factors H (GPTQ reference)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    k = w.shape[1]
    q = torch.zeros_like(w)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qcol = quantizer.quantize_column_ref(w1, i, i1 + i)
            q[:, i1 + i] = qcol
            err = (w1[:, i] - qcol) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)]


class _UniformRef(UniformQuantizer):
    def quantize_column_ref(self, block, i, col):
        orig = int(self.perm[col])
        g = orig // self.group
        s, z = self.scale[:, g], self.zero[:, g]
        code = torch.clamp(torch.round(block[:, i] / s) + z, 0, 2**self.bits - 1)
        self.codes[:, orig] = code.to(torch.uint8)
        return (code - z) * s


class _BCQRef(BCQColumnQuantizer):
    def _fit_ref(self, x, tile):
        xg, mask = _row_groups(x, self.group)
        bits, alpha, exps, signs = _bcq_fit_ref(xg, self.bits, self.rounds, self.terms, mask)
        self.exps[tile], self.signs[tile] = exps, signs
        codes = bits.reshape(-1, x.shape[1], self.bits)[: self.n]
        return alpha.repeat_interleave(self.group, 0)[: self.n], codes

    def quantize_column_ref(self, block, i, col):
        orig = int(self.perm[col])
        alpha, codes = self._fit_ref(block[:, i : i + 1], orig)
        bits = codes[:, 0]
        self.planes[:, :, orig] = bits.T
        return ((bits.float() * 2 - 1) * alpha).sum(-1)


def _layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    h = x.T @ x / x.shape[0]
    h[:, 1] = h[1, :] = 0  # one dead input column
    return torch.randn(n, k, generator=g) * 0.02, h


SHAPES = [(7, 13, 0), (130, 72, 1), (200, 96, 2)]
IDS = ["N7-K13", "N130-K72", "N200-K96"]


@pytest.mark.parametrize("n,k,seed", SHAPES, ids=IDS)
@pytest.mark.parametrize("bits,group,blocksize", [(3, 8, 16), (2, 32, 128), (4, 5, 7)])
def test_gptq_column_loop_equals_torch_reference(n, k, seed, bits, group, blocksize):
    w, h = _layer(n, k, seed)
    new, ref = UniformQuantizer(w, bits, group), _UniformRef(w, bits, group)
    q = gptq_solve(w, h, new, new.order(torch.diag(h)), blocksize)
    q_ref = _solve_ref(w, h, ref, ref.order(torch.diag(h)), blocksize)
    assert torch.equal(q, q_ref) and torch.equal(new.codes, ref.codes)


@pytest.mark.parametrize("n,k,seed", SHAPES, ids=IDS)
@pytest.mark.parametrize("bits,group,rounds,blocksize", [(3, 128, 10, 128), (2, 16, 3, 24), (1, 7, 0, 8), (4, 64, 10, 40)])
def test_shiftadd_acc_column_loop_equals_torch_reference(n, k, seed, bits, group, rounds, blocksize):
    w, h = _layer(n, k, seed)
    group = min(group, n)
    new, ref = (cls(n, k, bits, group, "acc", rounds, 3) for cls in (BCQColumnQuantizer, _BCQRef))
    q = gptq_solve(w, h, new, new.order(torch.diag(h)), blocksize)
    q_ref = _solve_ref(w, h, ref, ref.order(torch.diag(h)), blocksize)
    assert torch.equal(q, q_ref)
    assert torch.equal(new.planes, ref.planes)
    # the scales: equal values (an APoT value can have two greedy spellings, as 2^b + 2^(b-1) = 2^(b+1) - 2^(b-1),
    # and the native fit's float64 α may land on the other one than the torch loop's)
    assert torch.equal(apot_value(new.exps, new.signs), apot_value(ref.exps, ref.signs))


@pytest.mark.parametrize("bits,rounds", [(1, 0), (2, 1), (3, 10), (4, 5)])
@pytest.mark.parametrize("g,m", [(1, 1), (5, 128), (3, 77)], ids=["G1-m1", "G5-m128", "G3-m77"])
def test_bcq_fit_equals_reference(bits, rounds, g, m):
    torch.manual_seed(bits * 100 + m)
    w = torch.randn(g, m) * 0.02
    w[:, ::5] = 0  # exact zeros and ties
    mask = torch.rand(g, m) > 0.2
    for got, want in zip(bcq_fit(w, bits, rounds, 3, mask), _bcq_fit_ref(w, bits, rounds, 3, mask)):
        assert torch.equal(got, want)


@pytest.mark.skipif(cpu_module() is None, reason="extension not built")
@pytest.mark.parametrize("bits,rounds,terms", [(1, 0, 1), (2, 3, 2), (3, 10, 3), (4, 6, 3)])
def test_native_column_fit_equals_numpy_fit(bits, rounds, terms):
    """`_cpu.bcq_fit_groups` (the quantizer's Acc.-mode fit) gives `bcq_fit_np`'s codes and APoT terms on
    groups with padding, zeros and ties, at weight scales from 1e-3 to 1."""
    mod, rng = cpu_module(), np.random.default_rng(bits)
    for scale, (g, m) in zip((1e-3, 0.02, 1.0, 0.02), ((1, 1), (5, 128), (12, 16), (3, 77))):
        w = rng.standard_normal((g, m)) * scale
        w[:, ::5] = 0.0
        valid = np.ones((g, m))
        valid[-1, m // 2 :], w[-1, m // 2 :] = 0.0, 0.0
        idx, exps, signs = np.zeros((g, m), np.int64), np.zeros((g, bits, terms), np.int8), np.zeros((g, bits, terms), np.int8)
        mod.bcq_fit_groups(w, valid, bits, rounds, terms, idx, exps, signs)
        ref_idx, ref_exps, ref_signs = bcq_fit_np(w, valid, bits, rounds, terms)
        assert np.array_equal(idx, ref_idx)
        assert np.array_equal(exps, ref_exps.astype(np.int8)) and np.array_equal(signs, ref_signs.astype(np.int8))
    with pytest.raises(ValueError, match="shapes"):
        mod.bcq_fit_groups(w, valid, bits, rounds, terms, idx[:, :1].copy(), exps, signs)


@pytest.mark.skipif(cpu_module() is None or backend() == "reference",
                    reason="extension not built, or MULFREE_BACKEND=reference forces the numpy loop")
@pytest.mark.parametrize("kind", ["gptq", "shiftadd-acc"])
@pytest.mark.parametrize("n,k,seed,blocksize", [(7, 13, 3, 5), (200, 96, 4, 128), (129, 40, 5, 16)])
def test_native_column_loop_equals_numpy_loop(kind, n, k, seed, blocksize, monkeypatch):
    """The C++ lazy-block loop (`gptq_columns.cpp`) gives the numpy column loop's dequantized weight, codes and
    scales bit for bit, and is what the solver runs off the reference backend."""
    w, h = _layer(n, k, seed)

    def make():
        return UniformQuantizer(w, 3, 8) if kind == "gptq" else BCQColumnQuantizer(n, k, 3, min(64, n), "acc", 10, 3)

    def solve():
        block = np.zeros((1, n), np.float32)
        native = make().quantize_block(block, np.ones((1, 1), np.float32), 0, block.copy(), block.copy())
        qz = make()
        q = gptq_solve(w, h, qz, qz.order(torch.diag(h)), blocksize)
        return native, q, [qz.codes] if kind == "gptq" else [qz.planes, qz.exps, qz.signs]

    native, q, state = solve()
    monkeypatch.setenv("MULFREE_BACKEND", "reference")
    python, q_ref, state_ref = solve()
    assert native and not python
    assert torch.equal(q, q_ref) and all(torch.equal(a, b) for a, b in zip(state, state_ref, strict=True))


@pytest.mark.skipif(cpu_module() is None, reason="extension not built")
def test_native_column_loop_rejects_bad_arguments():
    mod = cpu_module()
    w, hinv = np.zeros((4, 6), np.float32), np.eye(4, dtype=np.float32)
    q, err, orig = np.zeros_like(w), np.zeros_like(w), np.arange(4, dtype=np.int64)
    scale, zero, codes = np.ones((1, 6), np.float32), np.zeros((1, 6), np.float32), np.zeros((6, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes do not match"):
        mod.gptq_columns_uniform(w, np.eye(3, dtype=np.float32), q, err, orig, scale, zero, 4, 7, codes)
    with pytest.raises(ValueError, match="out of range"):
        mod.gptq_columns_uniform(w, hinv, q, err, orig + 1, scale, zero, 4, 7, codes)
    for group, maxq in ((0, 7), (4, 0), (4, 256)):  # a zero group would divide by zero; codes are uint8
        with pytest.raises(ValueError, match="group >= 1 and maxq"):
            mod.gptq_columns_uniform(w, hinv, q, err, orig, scale, zero, group, maxq, codes)
    planes, exps = np.zeros((3, 6, 4), np.uint8), np.zeros((4, 1, 3, 3), np.int8)
    with pytest.raises(ValueError, match="out of range"):
        mod.gptq_columns_bcq(w, hinv, q, err, orig - 1, 3, 10, 3, 6, planes, exps, exps.copy())
    with pytest.raises(ValueError, match="shapes do not match"):
        mod.gptq_columns_bcq(w, hinv, q, err, orig, 2, 10, 3, 6, planes, exps, exps.copy())


@pytest.mark.parametrize("k", [1, 7, 256, 300, 576, 1100])
def test_hessian_upper_strips_equal_full_product(k):
    """`HessianStats` sums only H's upper triangle, in row strips, and mirrors it: exactly symmetric, and equal to
    the float64 xᵀx within float32 rounding."""
    g = torch.Generator().manual_seed(k)
    stats, xs = HessianStats(k), [torch.randn(2, 40, k, generator=g) for _ in range(3)]
    for x in xs:
        stats.add_batch(x)
    rows = torch.cat([x.reshape(-1, k) for x in xs]).double()
    h = stats.hessian()
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-5)
