"""First-order linear recurrence h_t = f_t ⊙ h_{t-1} + i_t (the HGRN / MLGRU state update).

`linear_recurrence` processes a whole sequence at once (training, prefill): like the official
`fused_recurrent_hgrn` kernel it walks time in order, so its arithmetic is exactly that of the
one-token `linear_recurrence_step` used in decoding, and the two forms agree to the bit. Autograd
stores only f and the states; the backward pass runs the adjoint recurrence
dh_t = g_t + f_{t+1} ⊙ dh_{t+1}, then di = dh, df = dh ⊙ h_{t-1}, dh0 = f_0 ⊙ dh_0.
`linear_recurrence_naive` is the autograd-through-a-loop reference used in tests.
Shapes: f, i [B, T, D] fp32; h0 [B, D] or None; returns (states [B, T, D], last state [B, D]).
"""

from __future__ import annotations

import torch


def linear_recurrence_step(f: torch.Tensor, i: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """One step: f, i, h [B, D] -> new h [B, D]."""
    return i if h is None else f * h + i


def linear_recurrence_naive(
    f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop over time with autograd through every step."""
    h = h0
    out = []
    for t in range(f.shape[1]):
        h = linear_recurrence_step(f[:, t], i[:, t], h)
        out.append(h)
    return torch.stack(out, dim=1), h


class _LinearRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        f, i = f.contiguous(), i.contiguous()
        out = torch.empty_like(i)
        h = h0
        for t in range(f.shape[1]):
            h = linear_recurrence_step(f[:, t], i[:, t], h)
            out[:, t] = h
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(f, out, h0 if h0 is not None else out.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        f, out, h0 = ctx.saved_tensors
        grad = grad.contiguous()
        dh = torch.empty_like(grad)
        acc = grad[:, -1]
        dh[:, -1] = acc
        for t in range(f.shape[1] - 2, -1, -1):
            acc = grad[:, t] + f[:, t + 1] * acc
            dh[:, t] = acc
        prev = torch.cat([h0.unsqueeze(1) if ctx.has_h0 else torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        df = dh * prev
        dh0 = f[:, 0] * dh[:, 0] if ctx.has_h0 else None
        return df, dh, dh0


def linear_recurrence(
    f: torch.Tensor, i: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-sequence recurrence with a hand-written backward; equals the naive loop."""
    states = _LinearRecurrence.apply(f, i, h0)
    return states, states[:, -1]
