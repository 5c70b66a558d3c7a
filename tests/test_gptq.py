"""GPTQ solver and the RTN / GPTQ baselines: exact RTN equivalence under a diagonal Hessian,
lower output error than RTN on correlated inputs, codes on the grid, awkward shapes."""

from __future__ import annotations

import pytest
import torch

from mulfree.quant.gptq import GPTQ, UniformQuantizer, gptq_solve
from mulfree.quant.rtn import RTN


def _correlated_inputs(k: int, t: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(t, k, generator=g) @ mix * torch.linspace(0.2, 3, k)


@pytest.mark.parametrize("n,k,group", [(7, 13, 4), (16, 64, 32), (1, 9, 9)], ids=["N7-K13-G4", "N16-K64-G32", "N1-K9"])
def test_diagonal_hessian_gives_rtn(n, k, group):
    w = torch.randn(n, k)
    rtn = UniformQuantizer(w, 3, group).quantize_all(w)
    uq = UniformQuantizer(w, 3, group)
    q = gptq_solve(w, torch.eye(k) * 2.0, uq, torch.arange(k), blocksize=8)
    torch.testing.assert_close(q, rtn)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    torch.manual_seed(0)
    x = _correlated_inputs(48)
    h = x.T @ x / x.shape[0]
    w = torch.randn(24, 48)
    err = {}
    for method in (RTN(bits, 16), GPTQ(bits, 16, blocksize=16)):
        wq = method.quantize(w, h, None).dequantize()
        err[method.name] = ((x @ (w - wq).T) ** 2).mean().item()
    assert err["gptq"] < 0.9 * err["rtn"]


def test_uniform_codes_on_grid_and_dequantize():
    torch.manual_seed(1)
    w = torch.randn(10, 21)
    layer = RTN(3, 8).quantize(w, None, torch.ones(10))
    assert layer.codes.max() <= 7 and layer.scale.shape == (10, 3)
    wq = layer.dequantize()
    assert (wq - w).abs().max() <= layer.scale.max() / 2 + 1e-6
    x = torch.randn(2, 21)
    torch.testing.assert_close(layer(x), x @ wq.T + 1)
