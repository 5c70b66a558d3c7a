"""BitLinear: the MatMul-free LM's projection (official `FusedBitLinear`, reference form).

y = actq(RMSNorm(x)) · wq(W)ᵀ: each layer owns an RMSNorm (eps 1e-6, the value the official fused
path really uses), activations are per-token absmax int8, weights per-tensor absmean ternary.
The product is computed as an integer matmul, (q · tᵀ) · (s_x · s_w): sums of int8 × {-1,0,1} are
exact in fp32, so the result does not depend on summation order (parallel and step forms agree to
the bit) and equals what the packed integer kernels compute. Backward is the straight-through
estimator: dx = dy · W̃, dW = dyᵀ · x̃, with only the int8 activations and their scales saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.nn import fused
from mulfree.nn.norm import RMSNorm, rms_norm
from mulfree.ops.ternary import activation_quant, weight_quant


class _BitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        q, s_x = activation_quant(x)
        t, s_w = weight_quant(weight)
        tf = t.float()
        y = torch.matmul(q.float(), tf.t()) * (s_x * s_w)
        ctx.save_for_backward(q, s_x, t, s_w)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, s_x, t, s_w = ctx.saved_tensors
        dy = dy.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (torch.matmul(dy, t.float()) * s_w).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_q = (q.float() * s_x).reshape(-1, q.shape[-1])
            dw = torch.matmul(dy.reshape(-1, dy.shape[-1]).t(), x_q).to(ctx.w_dtype)
        return dx, dw


def bitlinear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Quantized linear on already-normalized x [..., K] with latent weight [N, K] -> [..., N]."""
    return _BitLinearFunction.apply(x, weight)


def _apply(p: fused.Prologue, x: torch.Tensor) -> torch.Tensor:
    """A prologue in plain torch ops (the unfused path)."""
    if p.kind == "norm":
        return rms_norm(x, p.weight, p.eps)
    if p.kind == "glu":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    return (rms_norm(x, p.weight, p.eps).float() * F.silu(p.h)).to(x.dtype)  # "gate"


class BitLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, eps)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, prologue: fused.Prologue | None = None) -> torch.Tensor:
        """y = BitLinear(prologue(x)); the fused path keeps x (and the prologue's inputs) for backward."""
        if fused.active(x):
            return fused.bitlinear(x, self.norm.weight, self.weight, self.norm.eps, prologue)
        if prologue is not None:
            x = _apply(prologue, x)
        if fused.triton_active(x):
            return fused.triton_bitlinear(x, self.norm.weight, self.weight, self.norm.eps)
        return bitlinear(self.norm(x), self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
