"""BitLinear quantizers, the MLGRU recurrence and the GLU against independent references."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mulfree.nn import fused
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.glu import glu_intermediate_size
from mulfree.nn.mlgru import MLGRU
from mulfree.ops.scan import linear_recurrence, linear_recurrence_naive
from mulfree.ops.ternary import activation_quant, weight_quant


def test_weight_quant_matches_official_formula():
    w = torch.randn(37, 53) * 0.05
    t, scale = weight_quant(w)
    s_w = 1.0 / w.abs().mean().clamp(min=1e-5)
    official = (w * s_w).round().clamp(-1, 1) / s_w
    assert t.dtype == torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}
    torch.testing.assert_close(t.float() * scale, official, rtol=1e-6, atol=0)


def test_activation_quant_matches_official_formula():
    x = torch.randn(3, 5, 67)
    q, scale = activation_quant(x)
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    official = (x * s).round().clamp(-128, 127) / s
    assert q.dtype == torch.int8 and scale.shape == (3, 5, 1)
    torch.testing.assert_close(q.float() * scale, official, rtol=1e-6, atol=0)


class _RecordMatmul(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, F.linear, torch.Tensor.matmul, torch.mm, torch.bmm):
            self.operands.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **(kwargs or {}))


def test_bitlinear_matmul_sees_only_int8_and_ternary_values(monkeypatch):
    layer = BitLinear(45, 29)
    x = torch.randn(2, 7, 45)
    with torch.no_grad(), _RecordMatmul() as rec:  # inference: the unfused ops, one torch matmul
        y = layer(x)
    assert len(rec.operands) == 1
    acts, weights = rec.operands[0]
    assert torch.equal(acts, acts.round()) and acts.min() >= -128 and acts.max() <= 127
    assert set(weights.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # Training (the fused path): int8 codes again, times the trits on the packed kernels (2-bit codes, ternary by
    # construction; tests/test_fused_train.py checks that product against the fp32 matmul of the trits).
    seen = []
    scaled_product = fused._scaled_product
    monkeypatch.setattr(fused, "_scaled_product", lambda q, s, w: seen.append(q.clone()) or scaled_product(q, s, w))
    if fused.active(x):
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
        (codes,) = seen
        assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
    # And the scaled result is the fake-quantized linear of the official reference.
    xn = layer.norm(x)
    q, s_x = activation_quant(xn)
    t, s_w = weight_quant(layer.weight)
    torch.testing.assert_close(y, F.linear(q.float() * s_x, t.float() * s_w), rtol=1e-5, atol=1e-6)


def test_bitlinear_gradients_are_straight_through():
    layer = BitLinear(33, 17)
    x = torch.randn(4, 33, requires_grad=True)
    w = layer.weight
    dy = torch.randn(4, 17)
    gx, gw = torch.autograd.grad((layer(x) * dy).sum(), (x, w))
    # Reference: STE via detach tricks on the official fake-quant formulas.
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    xn = layer.norm(x2)
    q, s_x = activation_quant(xn)
    t, s_w = weight_quant(w2)
    xq = xn + (q.float() * s_x - xn).detach()
    wq = w2 + (t.float() * s_w - w2).detach()
    rx, rw = torch.autograd.grad((F.linear(xq, wq) * dy).sum(), (x2, w2))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B,T,D,with_h0", [(1, 1, 1, False), (2, 63, 50, True), (3, 17, 7, False)], ids=lambda v: str(v))
def test_recurrence_matches_naive_outputs_and_gradients(B, T, D, with_h0):
    f = torch.rand(B, T, D, requires_grad=True)
    i = torch.randn(B, T, D, requires_grad=True)
    h0 = torch.randn(B, D, requires_grad=True) if with_h0 else None
    inputs = (f, i) + ((h0,) if with_h0 else ())
    a, a_last = linear_recurrence(f, i, h0)
    b, b_last = linear_recurrence_naive(f, i, h0)
    assert torch.equal(a, b) and torch.equal(a_last, b_last)
    w = torch.randn_like(a)
    ga = torch.autograd.grad((a * w).sum() + a_last.sum(), inputs)
    gb = torch.autograd.grad((b * w).sum() + b_last.sum(), inputs, allow_unused=True, materialize_grads=True)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_mlgru_step_form_equals_sequence_form():
    layer = MLGRU(24)
    for p in layer.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 11, 24)
    lb = torch.rand(24) * 0.5
    y, h = layer(x, lb)
    state, ys = None, []
    for t in range(11):
        yt, state = layer(x[:, t : t + 1], lb, state)
        ys.append(yt)
    assert (torch.cat(ys, 1) - y).abs().max() < 1e-6
    assert torch.equal(state, h)


def test_mlgru_matches_hand_written_reference():
    layer = MLGRU(16)
    x = torch.randn(1, 5, 16)
    lb = torch.full((16,), 0.25)
    y, _ = layer(x, lb)
    f = lb + (1 - lb) * torch.sigmoid(layer.f_proj(x))
    i = F.silu(layer.i_proj(x)) * (1 - f)
    h, hs = torch.zeros(1, 16), []
    for t in range(5):
        h = f[:, t] * h + i[:, t]
        hs.append(h)
    g = layer.g_proj(x)
    gn = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.g_norm.weight
    ref = layer.o_proj(gn * F.silu(torch.stack(hs, 1)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,expected", [(1024, 2816), (2048, 5632), (2560, 6912)])
def test_official_glu_hidden_size_rule(d, expected):
    assert glu_intermediate_size(d) == expected


@pytest.mark.parametrize("mask_mode", ["official", "skip"])
def test_mlgru_padding_rules(mask_mode):
    """official: a padded step has i = 0, so the state decays by f there; skip: the state passes it untouched."""
    layer = MLGRU(16, mask_mode=mask_mode)
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, False, False, True, True]])
    _, h_masked = layer(x, None, None, mask)
    f = torch.sigmoid(layer.f_proj(x))
    i = F.silu(layer.i_proj(x)) * (1 - f) * mask[..., None]
    if mask_mode == "skip":
        f = torch.where(mask[..., None], f, torch.ones_like(f))
    h = torch.zeros(1, 16)
    for t in range(6):
        h = f[:, t] * h + i[:, t]
    torch.testing.assert_close(h_masked, h, rtol=1e-6, atol=1e-7)


def test_mlgru_eps_split():
    """g_norm takes `eps`; the four projections' own norms take `bitlinear_eps` (as the official layer)."""
    layer = MLGRU(16, eps=1e-5, bitlinear_eps=1e-6)
    assert layer.g_norm.eps == 1e-5
    assert {p.norm.eps for p in (layer.i_proj, layer.f_proj, layer.g_proj, layer.o_proj)} == {1e-6}
    assert MLGRU(16, eps=1e-5).i_proj.norm.eps == 1e-5  # bitlinear_eps defaults to eps
