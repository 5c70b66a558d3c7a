"""Round-to-nearest (RTN) baseline: the uniform per-(row, group) grid of GPTQ without compensation."""

from __future__ import annotations

import torch

from mulfree.quant.gptq import UniformQuantizer
from mulfree.quant.qlinear import UniformLinear


class RTN:
    """RTN as a walker method: needs no calibration data."""

    name = "rtn"
    needs_hessian = False

    def __init__(self, bits: int, group: int = 128):
        self.bits, self.group = bits, group

    def config(self) -> dict:
        return {"bits": self.bits, "group_size": self.group}

    def quantize(self, w: torch.Tensor, h: torch.Tensor | None, bias: torch.Tensor | None) -> UniformLinear:
        n, k = w.shape
        group = k if self.group <= 0 else min(self.group, k)
        uq = UniformQuantizer(w, self.bits, group)
        uq.quantize_all(w)
        layer = UniformLinear(k, n, bias is not None, self.bits, group)
        layer.load_state_dict({**uq.state(), **({"bias": bias} if bias is not None else {})})
        return layer
