"""The exact BitLinear quantizers of the MatMul-free LM (official `weight_quant` / `activation_quant`).

Weights: per-tensor absmean ternary, W̃ = scale · t, t ∈ {-1, 0, 1}, scale = max(mean|W|, 1e-5).
Activations: per-token (last dim) absmax int8, x̃ = scale · q, q ∈ [-128, 127],
scale = max(max|x|, 1e-5) / 127. Rounding is torch.round (half to even), as in the official
pure-torch reference. Both return the integer tensor and the float scale so that kernels can do
the integer product and apply `scale_w * scale_x` once.
"""

from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize a weight: returns (t int8 in {-1,0,1}, scale fp32 scalar) with W̃ = scale · t.

    Never call this on an already-ternary tensor: absmean of trits shrinks the scale (the
    non-zero fraction); store the original scale instead.
    """
    w = w.float()
    scale = w.abs().mean().clamp(min=WEIGHT_EPS)
    t = (w * (1.0 / scale)).round().clamp(-1, 1).to(torch.int8)
    return t, scale


def activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 absmax quantization: returns (q int8 [..., K], scale fp32 [..., 1]), x̃ = scale · q."""
    x = x.float()
    inv = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    q = (x * inv).round().clamp(-128, 127).to(torch.int8)
    return q, 1.0 / inv


def fake_weight_quant(w: torch.Tensor) -> torch.Tensor:
    """W̃ = scale · t with a straight-through gradient (identity backward), in w's dtype."""
    t, scale = weight_quant(w)
    wq = (t.float() * scale).to(w.dtype)
    return w + (wq - w).detach()


def fake_activation_quant(x: torch.Tensor) -> torch.Tensor:
    """x̃ = scale · q with a straight-through gradient, in x's dtype."""
    q, scale = activation_quant(x)
    xq = (q.float() * scale).to(x.dtype)
    return x + (xq - x).detach()


def check_trits(t: torch.Tensor, packer: str) -> None:
    """Raise ValueError unless t is a 2-D tensor of exactly -1, 0 and 1 (a float 0.5 or NaN would pack as a trit)."""
    if t.dim() != 2:
        raise ValueError(f"{packer} expects a 2-D tensor, got shape {tuple(t.shape)}")
    if not ((t == -1) | (t == 0) | (t == 1)).all():
        raise ValueError(f"{packer} expects values in {{-1, 0, 1}}")
