"""Pure-torch references of the fused training ops (nn/fused.py, kernels/cpu/train_ops.cpp), differentiable.

Every RMS factor is `ops.fused.rms_factor` (a float64 sum rounded once to fp32), as in the packed engine, and
the weight scale mean|W| is a float64 sum too, so the fused BitLinear's int8 and ternary codes equal these
exactly. Quantizers pass gradients straight through (STE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mulfree.ops.fused import rms_factor
from mulfree.ops.scan import linear_recurrence_naive
from mulfree.ops.ternary import WEIGHT_EPS, activation_quant, fake_activation_quant


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rms_factor(x) · w (fp32)."""
    return x * rms_factor(x, eps) * w


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(trits fp32 [N, K], scale) with scale = max(mean|w|, 1e-5), the mean summed in float64."""
    scale = (w.detach().double().abs().sum() / w.numel()).float().clamp(min=WEIGHT_EPS)
    return (w.detach() * (1.0 / scale)).round().clamp(-1, 1), scale


def bitlinear_codes(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float):
    """(q int8 [T, K], a_scale [T, 1], trits fp32 [N, K], w_scale) of the fused BitLinear's forward."""
    q, s_x = activation_quant(rmsnorm(x, norm_w, eps))
    return (q, s_x, *ternarize(weight))


def bitlinear(x: torch.Tensor, norm_w: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = actq(rmsnorm(x)) · wq(W)ᵀ with straight-through quantizers."""
    t, scale = ternarize(weight)
    return F.linear(fake_activation_quant(rmsnorm(x, norm_w, eps)), weight + (t * scale - weight).detach())


def scan(fi: torch.Tensor, ff: torch.Tensor, lb: torch.Tensor | None = None, h0: torch.Tensor | None = None,
         keep: torch.Tensor | None = None, skip: bool = False) -> torch.Tensor:
    """The MLGRU's states [B, T, D] from its input and forget projections (keep False: padding)."""
    f = torch.sigmoid(ff)
    if lb is not None:
        f = lb + (1 - lb) * f
    i = F.silu(fi) * (1 - f)
    if keep is not None:
        k = keep.unsqueeze(-1).bool()
        i = torch.where(k, i, torch.zeros_like(i))
        if skip:
            f = torch.where(k, f, torch.ones_like(f))
    return linear_recurrence_naive(f, i, h0)[0]


def gate(fg: torch.Tensor, gw: torch.Tensor, eps: float, h: torch.Tensor) -> torch.Tensor:
    """The MLGRU's output before o_proj: rmsnorm(fg) · gw · silu(h)."""
    return rmsnorm(fg, gw, eps) * F.silu(h)


def glu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up with gate, up the two halves of gate_up [..., 2I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
