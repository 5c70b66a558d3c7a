"""Ternary GLU channel mixer (official `HGRNBitMLP`): one fused BitLinear d → 2I, SiLU(gate) ⊙ up, BitLinear I → d."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mulfree.nn import fused
from mulfree.nn.bitlinear import BitLinear


def glu_intermediate_size(hidden_size: int, hidden_ratio: int = 4) -> int:
    """The official hidden-size rule: 256 · ceil(int(d · ratio · 2/3) / 256) (370M: 2816, 1.3B: 5632)."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


class TernaryGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6):
        """`eps` is the two BitLinears' own input-norm eps."""
        super().__init__()
        self.gate_proj = BitLinear(hidden_size, 2 * intermediate_size, eps)
        self.down_proj = BitLinear(intermediate_size, hidden_size, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_proj(x)
        if fused.active(gate_up):
            return self.down_proj(fused.glu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # first half is the gate
        return self.down_proj(F.silu(gate) * up)
