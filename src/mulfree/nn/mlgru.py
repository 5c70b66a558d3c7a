"""MLGRU, the MatMul-free token mixer (official `HGRNBitAttention`), with every projection a BitLinear.

    f = σ(BL_f(x)),  f ← lb + (1 − lb)·f        (learned per-layer lower bound; lb = 0 in layer 0)
    i = SiLU(BL_i(x)) ⊙ (1 − f)
    h_t = f_t ⊙ h_{t−1} + i_t                   (fp32 state)
    o = BL_o(RMSNorm(BL_g(x)) ⊙ SiLU(h))        ("official" output gate, as the checkpoints were trained)

`output_gate="paper"` uses the paper's σ(BL_g(x)) ⊙ h instead (needs retraining; not checkpoint-compatible).
Padding (`mask` False): `mask_mode="official"` zeroes only the input i there, as the official layer does, so
the state decays by f across a hole (left padding from a zero state stays zero); `"skip"` also sets f = 1, so
the state passes a hole untouched (a padded sequence then equals the unpadded one, also for right padding).
The official `num_heads` only reshapes this element-wise recurrence, so it needs no parameter here.
The parallel scan serves training and prefill; T = 1 with a state is the O(1) decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.nn import fused
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.norm import RMSNorm
from mulfree.ops.scan import linear_recurrence, linear_recurrence_step

OUTPUT_GATES = ("official", "paper")
MASK_MODES = ("official", "skip")


class MLGRU(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        output_gate: str = "official",
        bitlinear_eps: float | None = None,
        mask_mode: str = "official",
    ):
        """`eps` is the g_norm's; `bitlinear_eps` (default: `eps`) the four projections' own input norms."""
        super().__init__()
        if output_gate not in OUTPUT_GATES:
            raise ValueError(f"output_gate must be one of {OUTPUT_GATES}, got {output_gate!r}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.output_gate = output_gate
        self.mask_mode = mask_mode
        bl_eps = eps if bitlinear_eps is None else bitlinear_eps
        self.i_proj = BitLinear(hidden_size, hidden_size, bl_eps)
        self.f_proj = BitLinear(hidden_size, hidden_size, bl_eps)
        self.g_proj = BitLinear(hidden_size, hidden_size, bl_eps)
        self.o_proj = BitLinear(hidden_size, hidden_size, bl_eps)
        self.g_norm = RMSNorm(hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        lower_bound: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        pre_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], lower_bound [D], state [B, D], mask [B, T] (False = padding) -> (out [B, T, D], state [B, D]).

        Padded positions get i = 0 (and f = 1 with mask_mode "skip"); left-padded batches decode correctly either way.
        `pre_norm` (the block's norm) is applied to x first: inside each projection on the fused path, so that
        backward keeps x, not its normalized copy.
        """
        if self.output_gate == "official" and fused.active(x):
            pre = None if pre_norm is None else fused.Prologue("norm", pre_norm.weight, pre_norm.eps)
            fi, ff, fg = (proj(x, pre) for proj in (self.i_proj, self.f_proj, self.g_proj))
            h = fused.mlgru_scan(fi, ff, lower_bound, state, mask, self.mask_mode == "skip")
            out = self.o_proj(fg, fused.Prologue("gate", self.g_norm.weight, self.g_norm.eps, h))
            return out, h[:, -1].clone()
        if pre_norm is not None:
            x = pre_norm(x)
        f = torch.sigmoid(self.f_proj(x)).float()
        if lower_bound is not None:
            f = lower_bound + (1 - lower_bound) * f
        i = F.silu(self.i_proj(x)).float() * (1 - f)
        if mask is not None:
            keep = mask.unsqueeze(-1).bool()
            i = torch.where(keep, i, torch.zeros_like(i))
            if self.mask_mode == "skip":
                f = torch.where(keep, f, torch.ones_like(f))
        if x.shape[1] == 1 and state is not None:
            h_last = linear_recurrence_step(f[:, 0], i[:, 0], state)
            h = h_last.unsqueeze(1)
        elif fused.triton_active(f):
            h, h_last = fused.triton_recurrence(f, i, state)
        else:
            h, h_last = linear_recurrence(f, i, state)
        g = self.g_proj(x)
        if self.output_gate == "official":
            o = self.g_norm(g).float() * F.silu(h)
        else:
            o = torch.sigmoid(g).float() * h
        return self.o_proj(o.to(x.dtype)), h_last
