"""Ternary GLU channel mixer (official `HGRNBitMLP`): one fused BitLinear d → 2I, SiLU(gate) ⊙ up, BitLinear I → d."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.nn import fused
from mulfree.nn.bitlinear import BitLinear
from mulfree.nn.norm import RMSNorm


def glu_intermediate_size(hidden_size: int, hidden_ratio: int = 4) -> int:
    """The official hidden-size rule: 256 · ceil(int(d · ratio · 2/3) / 256) (370M: 2816, 1.3B: 5632)."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


class TernaryGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6):
        """`eps` is the two BitLinears' own input-norm eps."""
        super().__init__()
        self.gate_proj = BitLinear(hidden_size, 2 * intermediate_size, eps)
        self.down_proj = BitLinear(intermediate_size, hidden_size, eps)

    def forward(self, x: torch.Tensor, pre_norm: RMSNorm | None = None) -> torch.Tensor:
        """`pre_norm` (the block's norm) is applied to x first: on the fused path the whole GLU is one autograd
        node that keeps x only (`fused.glu`; gate_up is recomputed in backward)."""
        if fused.active(x):
            gate, down = self.gate_proj, self.down_proj
            pre_w, pre_eps = (None, 0.0) if pre_norm is None else (pre_norm.weight, pre_norm.eps)
            return fused.glu(x, pre_w, pre_eps, gate.norm.weight, gate.weight, gate.norm.eps, down.norm.weight,
                             down.weight, down.norm.eps)
        if pre_norm is not None:
            x = pre_norm(x)
        gate, up = self.gate_proj(x).chunk(2, dim=-1)  # first half is the gate
        return self.down_proj(F.silu(gate) * up)
