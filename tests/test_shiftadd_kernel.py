"""ShiftAdd LUT GEMV and GEMM: every backend equals the dense product and the torch reference; all
compiled paths agree bit for bit; awkward shapes (odd K, N not a multiple of 16, 64 or the group;
groups that share a 64-row quad, split one, or split a 16-row tile); the GEMM equals T GEMV calls
exactly for T in 1..64."""

from __future__ import annotations

import copy

import pytest
import torch

from mulfree.kernels import available_backends
from mulfree.kernels import backend as current_backend
from mulfree.kernels import shiftadd as kernel
from mulfree.ops.bcq import bcq_dequantize, bcq_lut_gemv, lut_tables
from mulfree.ops.powers import apot_round

SHAPES = [
    (1, 8, 1, 3),
    (37, 29, 37, 3),
    (50, 64, 32, 2),
    (64, 131, 16, 3),
    (33, 17, 8, 1),
    (130, 200, 128, 4),
    (200, 40, 64, 3),
    (96, 16, 48, 3),
    (300, 24, 24, 2),
    (65, 1000, 256, 3),
]


def _weights(n, k, g, q, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c, ng = -(-k // 8), -(-n // g)
    planes = torch.randint(0, 256, (q, n, c), dtype=torch.uint8, generator=gen)
    _, exps, signs = apot_round(torch.rand(c, ng, q, generator=gen) * 0.1 + 0.01, 3)
    return planes, exps, signs


def test_lut_tables_are_signed_sums():
    x = torch.randn(11)
    lut = lut_tables(x)
    xp = torch.nn.functional.pad(x, (0, 5)).view(2, 8)
    for key in (0, 1, 129, 255, 170):
        signs = torch.tensor([1.0 if key >> s & 1 else -1.0 for s in range(8)])
        torch.testing.assert_close(lut[:, key], (xp * signs).sum(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,k,g,q", SHAPES, ids=[f"N{n}-K{k}-G{g}-Q{q}" for n, k, g, q in SHAPES])
@pytest.mark.parametrize("backend", available_backends())
def test_kernel_matches_dense(n, k, g, q, backend):
    planes, exps, signs = _weights(n, k, g, q)
    x = torch.randn(k)
    dense = bcq_dequantize(planes, exps, signs, n, k, g, 8).double() @ x.double()
    y = kernel.lut_gemv(x, kernel.prepare(planes, exps, signs, n, g), backend)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, bcq_lut_gemv(x, planes, exps, signs, n, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,g", [(70, 32), (300, 128), (200, 16)])
def test_compiled_backends_agree_exactly(threads, n, g):
    compiled = [b for b in available_backends() if b != "reference"]
    if not compiled:
        pytest.skip("extension not built")
    planes, exps, signs = _weights(n, 45, g, 3, seed=1)
    w = kernel.prepare(planes, exps, signs, n, g)
    x = torch.randn(45)
    outs = [kernel.lut_gemv(x, w, b, threads) for b in compiled]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_prepared_weights_survive_deepcopy():
    if "scalar" not in available_backends():
        pytest.skip("extension not built")
    planes, exps, signs = _weights(40, 24, 16, 2)
    w = kernel.prepare(planes, exps, signs, 40, 16)
    x = torch.randn(24)
    y = kernel.lut_gemv(x, w, "scalar")  # creates the extension handle
    clone = copy.deepcopy(w)
    assert torch.equal(kernel.lut_gemv(x, clone, "scalar"), y)


def test_kernel_rejects_mismatched_shapes():
    if "scalar" not in available_backends():
        pytest.skip("extension not built")
    planes, exps, signs = _weights(20, 16, 16, 2)
    w = kernel.prepare(planes, exps, signs, 20, 16)
    with pytest.raises(ValueError, match="do not match"):
        kernel.lut_gemv(torch.randn(24), w, "scalar")


GEMM_TOKENS = [1, 2, 3, 7, 16, 33, 64]
GEMM_SHAPES = [(37, 29, 37, 3), (200, 131, 64, 3), (130, 45, 16, 2)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("t", GEMM_TOKENS, ids=[f"T{t}" for t in GEMM_TOKENS])
@pytest.mark.parametrize("n,k,g,q", GEMM_SHAPES, ids=[f"N{n}-K{k}-G{g}-Q{q}" for n, k, g, q in GEMM_SHAPES])
@pytest.mark.parametrize("backend", available_backends())
def test_gemm_equals_gemv_per_token(n, k, g, q, t, threads, backend):
    """Row t of the GEMM is the GEMV of token t bit for bit (same tables, same kernels, same order);
    the reference backend loops the reference GEMV, so it is exact too."""
    planes, exps, signs = _weights(n, k, g, q, seed=t)
    w = kernel.prepare(planes, exps, signs, n, g)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
    y = kernel.lut_gemm(x, w, backend, threads)
    assert y.shape == (t, n) and not torch.isnan(y).any()
    expect = torch.stack([kernel.lut_gemv(x[i], w, backend, threads) for i in range(t)])
    assert torch.equal(y, expect)


def test_gemm_matches_dense_and_backends_agree():
    planes, exps, signs = _weights(300, 200, 128, 3, seed=3)
    w = kernel.prepare(planes, exps, signs, 300, 128)
    x = torch.randn(40, 200)
    dense = x.double() @ bcq_dequantize(planes, exps, signs, 300, 200, 128, 8).double().T
    outs = [kernel.lut_gemm(x, w, b, 2) for b in available_backends()]
    for y in outs:
        torch.testing.assert_close(y.double(), dense, rtol=1e-5, atol=1e-5)
    compiled = [y for b, y in zip(available_backends(), outs) if b != "reference"]
    for y in compiled[1:]:
        assert torch.equal(y, compiled[0])


def test_gemm_rejects_mismatched_shapes():
    if "scalar" not in available_backends():
        pytest.skip("extension not built")
    planes, exps, signs = _weights(20, 16, 16, 2)
    w = kernel.prepare(planes, exps, signs, 20, 16)
    with pytest.raises(ValueError, match="do not match"):
        kernel.lut_gemm(torch.randn(3, 24), w, "scalar")


LAYER_INPUTS = [(1, 37), (5, 37), (2, 3, 37), (1, 1, 37), (4, 1, 37)]


@pytest.mark.parametrize("shape", LAYER_INPUTS, ids=["x".join(map(str, s)) for s in LAYER_INPUTS])
def test_latency_layer_uses_lut_kernels_without_dense_weight(shape):
    """ShiftAddLinear (col_group 8) under no_grad: any leading dims go through the LUT kernels
    (row by row equal to the GEMV), match the dense product, and leave no fp32 dense copy behind;
    with grad enabled it still uses the dense weight."""
    from mulfree.quant.qlinear import ShiftAddLinear

    n, k, g = 70, 37, 16
    layer = ShiftAddLinear(k, n, True, bits=3, group=g, col_group=8, terms=3)
    planes, exps, signs = _weights(n, k, g, 3, seed=5)
    layer.planes.copy_(planes), layer.exps.copy_(exps), layer.signs.copy_(signs)
    layer.bias.normal_()
    x = torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], n) and layer._dense is None
    rows = x.reshape(-1, k)
    per_token = torch.stack([kernel.lut_gemv(r, layer.kernel_weights(), threads=torch.get_num_threads()) for r in rows])
    assert torch.equal(y.reshape(-1, n), per_token + layer.bias)
    dense = torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    torch.testing.assert_close(y.double(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # grad enabled: dense path
    assert layer._dense is not None


@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("backend", available_backends())
def test_layer_forward_is_one_call_equal_to_the_composition(tokens, backend):
    """`kernel.forward` (input Hadamard, LUT product, output inverse, bias in one native call) equals the
    composition of the separate kernels bit for bit, and the dense rotated layer within float error."""
    from mulfree.kernels import hadamard
    from mulfree.ops.hadamard import RandomHadamard
    from mulfree.quant.qlinear import ShiftAddLinear

    n, k, g = 96, 64, 16
    layer = ShiftAddLinear(k, n, True, bits=3, group=g, col_group=8, terms=3)
    planes, exps, signs = _weights(n, k, g, 3, seed=7)
    layer.planes.copy_(planes), layer.exps.copy_(exps), layer.signs.copy_(signs)
    layer.bias.normal_()
    layer.rht, layer.rht_out = RandomHadamard(k, 3), RandomHadamard(n, 4)
    x = torch.randn(tokens, k)
    w = layer.kernel_weights()
    y = kernel.forward(x, w, backend, threads=2)
    xr = hadamard.apply_input(layer.rht, x, backend)
    raw = torch.stack([kernel.lut_gemv(r, w, backend) for r in xr])
    assert torch.equal(y, hadamard.invert_output(layer.rht_out, raw, backend) + layer.bias)
    if backend == current_backend():  # the layer itself runs the backend in effect (MULFREE_BACKEND or the best)
        with torch.no_grad():
            assert torch.equal(layer(x), y)
    dense = layer.rht_out.invert_output(torch.nn.functional.linear(xr.double(), layer.dequantize().double()))
    torch.testing.assert_close(y.double(), dense + layer.bias.double(), rtol=1e-5, atol=1e-5)
